"""Declarations derived instead of declared (pipeline/declarations.py).

The shortcut may only ever give what the declare sandbox would have given: checked
against real declare runs on the process backend, and the score must not move. Anything
that is not byte for byte a rendering is declared for real.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import replace

import pytest

from pipeline.declarations import Templates, templates_for
from pipeline.families import FAMILIES, transformer
from pipeline.settings import preset
from sandbox import runner
from sandbox.schema import Job, Limits

PARAMS = {"vocab_size": 64, "max_params": 2_000_000, "num_threads": 1, "device": "cpu"}


def _declaration_of(design) -> dict:
    """A declaration consistent with `design`, as the T5 template declares one (the keys
    the five numbers do not set carry made-up but fixed values)."""
    base = {"model": {"vocab_size": 64, "dropout_rate": 0.0, "pad_token_id": 0,
                      "eos_token_id": 1, "decoder_start_token_id": 0},
            "optimizer": "AdamW", "hyper": {"weight_decay": 0.01}, "batch_size": 0}
    return transformer.derived_declaration(base, design)


def _seed():
    return transformer.seed_design(preset("quick"))


def test_only_exact_renderings_are_derived():
    t = Templates(transformer)
    seed = _seed()
    t.learn(transformer.render(seed), PARAMS, _declaration_of(seed))
    other = replace(seed, d_ff=300, num_heads=2)
    src = transformer.render(other)
    assert t.derive(src, PARAMS) == _declaration_of(other)
    assert t.derived == 1
    for changed in (src + "\n",                                        # one more byte
                    src.replace("dropout_rate=0.0", "dropout_rate=0.5"),
                    src.replace(f"lr={seed.lr!r}", "lr=0.5"),            # other dynamics
                    src.replace("    return optimizer, batch_size",
                                "    model.shared.weight.data.zero_()\n"
                                "    return optimizer, batch_size"),
                    "x = 1\n" + src):
        assert changed != src and t.derive(changed, PARAMS) is None, changed
    # another vocabulary or cap: nothing was learnt for those declare parameters
    assert t.derive(src, {**PARAMS, "max_params": 1}) is None
    # out of the schema's bounds: left to the real declare step, which says why
    assert t.derive(transformer.render(replace(seed, d_ff=10**9)), PARAMS) is None
    assert t.derived == 1


def test_a_declaration_that_the_derivation_does_not_reproduce_is_not_learnt():
    t = Templates(transformer)
    seed = _seed()
    wrong = _declaration_of(seed)
    wrong["model"]["d_ff"] += 1                       # not what the source says
    t.learn(transformer.render(seed), PARAMS, wrong)
    t.learn("x = 1\n", PARAMS, _declaration_of(seed))  # not a rendering
    assert t.derive(transformer.render(replace(seed, d_ff=300)), PARAMS) is None


def test_only_families_that_can_derive_get_templates():
    assert set(templates_for(FAMILIES)) == {"t5"}


@pytest.mark.root("the confined process backend")
def test_a_derived_declaration_scores_exactly_as_a_declared_one(process_backend, data_file,
                                                                 tmp_path):
    seed = _seed()
    other = transformer.refine(seed, random.Random(5))

    def job(design) -> Job:
        return Job(job_id=f"derive-{uuid.uuid4().hex[:8]}", kind="evaluate",
                   source=transformer.render(design), model_kind="t5",
                   inputs={"data": str(data_file)}, params={**PARAMS, "epochs": 1, "seed": 3},
                   limits=Limits(timeout_s=120, memory_mb=2048, pids=64,
                                 output_mb=16)).validate()

    t = Templates(transformer)
    runner._DECLARED.clear()
    first = runner.run(job(seed), tmp_path / "seed", process_backend, templates=t)
    assert first.status == "ok", first.reason
    assert t.derived == 0                                 # the first one is declared for real

    j = job(other)
    runner._DECLARED.clear()
    real = runner.run(j, tmp_path / "real", process_backend)        # declare sandbox, then score
    runner._DECLARED.clear()
    derived = runner.run(j, tmp_path / "derived", process_backend, templates=t)
    assert t.derived == 1                                 # no declare sandbox this time
    assert real.status == derived.status == "ok", (real.reason, derived.reason)
    assert derived.declaration == real.declaration
    assert derived.score == real.score and derived.losses == real.losses
    assert derived.param_count == real.param_count
