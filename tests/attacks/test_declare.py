"""The self task in two steps (sandbox/runner.py `_run_declared`): a T5 candidate's code
runs once, in a `declare` sandbox, to state its model and learning dynamics as data
(sandbox/schema.py `Declaration`); training, generation and the few-shot score then run
in fresh sandboxes on harness code only. Real process backend.

* An honest candidate's few-shot score is the one-step score (the old path: the
  candidate's code in the scoring sandbox), same seed, same number.
* The forgery a string evaluation reached (the candidate patching the harness in its own
  process) changes the one-step score and no longer changes the two-step one.
* A candidate whose model or optimizer cannot be declared is `invalid`, with the reason.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sandbox import runner
from sandbox.schema import Declaration, Job, Limits, SchemaError
from tests.support.candidates import TINY, candidate

FORGED = 1e-06

# What the string evaluation reached, written out (the gate is bypassed here):
# patch the harness so that it reports a made-up loss and skips its integrity check.
HARNESS_FORGERY = candidate("", '''
    exec("import sys\\n"
         "h = sys.modules['sandbox.harness']\\n"
         "h.mean_loss = lambda xs: 1e-06\\n"
         "h.Integrity.check = lambda self: None\\n")
    ''')


@pytest.fixture(scope="module")
def t5_data(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    p = tmp_path_factory.mktemp("t5") / "fewshot.safetensors"
    save_file({"input_ids": torch.randint(2, 60, (16, 6), generator=g),
               "attention_mask": torch.ones(16, 6, dtype=torch.int64),
               "labels": torch.randint(2, 60, (16, 4), generator=g)}, str(p))
    return p


def _job(source: str, data: Path) -> Job:
    return Job(job_id=f"decl-{uuid.uuid4().hex[:8]}", kind="evaluate", source=source,
               model_kind="t5", inputs={"data": str(data)},
               params={"vocab_size": 64, "epochs": 1, "num_threads": 1, "seed": 3,
                       "device": "cpu"},
               limits=Limits(timeout_s=120, memory_mb=2048, pids=64, output_mb=16)).validate()


def test_honest_fewshot_score_is_unchanged_by_the_two_steps(process_backend, t5_data, tmp_path):
    job = _job(TINY, t5_data)
    old = process_backend.execute(job, tmp_path / "old")           # one step, as before
    new = runner.run(job, tmp_path / "new", process_backend)        # declare, then harness only
    assert old.status == "ok" and new.status == "ok", (old.reason, new.reason)
    assert new.score == old.score and new.losses == old.losses
    assert new.param_count == old.param_count
    decl = Declaration.from_dict(new.declaration)
    assert decl.optimizer == "AdamW" and decl.batch_size == 8 and decl.model["d_model"] == 16


def test_harness_forgery_no_longer_changes_the_score(process_backend, t5_data, tmp_path):
    honest = runner.run(_job(TINY, t5_data), tmp_path / "honest", process_backend)
    one_step = process_backend.execute(_job(HARNESS_FORGERY, t5_data), tmp_path / "one")
    assert one_step.status == "ok" and one_step.score == FORGED     # the old path: forged
    two_step = runner.run(_job(HARNESS_FORGERY, t5_data), tmp_path / "two", process_backend,
                          gate=False)
    assert two_step.status == "ok", two_step.reason
    assert two_step.score == honest.score != FORGED


@pytest.mark.parametrize("build,train,why", [
    ("", "optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)",
     "optimizer Adamax is not one of"),
    ("", "optimizer = torch.optim.AdamW(list(model.parameters())[:2], lr=1e-3)",
     "exactly all of the model's parameters"),
    ("", "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, maximize=True)",
     "optimizer setting 'maximize'"),
    ("with torch.no_grad():\n    model.shared.weight.mul_(3.0)\n", "", "custom initialisation"),
    ("", "batch_size = 0", "batch size 0"),
])
def test_a_candidate_that_cannot_be_declared_is_invalid(process_backend, t5_data, tmp_path,
                                                         build, train, why):
    source = TINY.replace("    return transformers.T5ForConditionalGeneration(config)\n",
                          "    model = transformers.T5ForConditionalGeneration(config)\n"
                          + "".join("    " + line + "\n" for line in build.splitlines())
                          + "    return model\n")
    if train:
        head, _, tail = source.partition("def train(model):\n")
        lines = tail.splitlines()
        key = train.split("=")[0].strip()
        lines = ["    " + train if line.strip().startswith(key + " =") else line for line in lines]
        source = head + "def train(model):\n" + "\n".join(lines) + "\n"
    r = runner.run(_job(source, t5_data), tmp_path / "out", process_backend, gate=False)
    assert r.status == "invalid", (r.status, r.reason)
    assert r.reason.startswith("cannot be declared:") and why in r.reason, r.reason


@pytest.mark.parametrize("bad", [
    {"model": {"vocab_size": 64, "d_model": 10**9}},
    {"model": {"vocab_size": 64, "is_decoder": True}},
    {"optimizer": "LBFGS"},
    {"hyper": {"lr": float("inf")}},
    {"hyper": {"foreach": True}},
    {"batch_size": 10**9},
])
def test_declaration_schema_is_bounded_and_allow_listed(bad):
    good = {"model": {"vocab_size": 64, "d_model": 16}, "optimizer": "SGD",
            "hyper": {"lr": 0.1}, "batch_size": 8}
    Declaration.from_dict(good)
    with pytest.raises(SchemaError):
        Declaration.from_dict({**good, **bad})


def test_a_declare_step_that_did_not_finish_keeps_its_status_and_reason(t5_data, tmp_path):
    """Stopped (its run cancelled), timed out or crashed while declaring: not the
    candidate's `invalid`, and the job itself never starts."""
    from sandbox.backends.watch import STOPPED_REASON
    from sandbox.schema import Result

    class StopsEverything:   # a backend whose every job is stopped by a cancel
        def __init__(self):
            self.kinds = []

        def execute(self, job, out_dir):
            self.kinds.append(job.kind)
            return Result.failure(job, "crashed", STOPPED_REASON)

    b = StopsEverything()
    runner._DECLARED.clear()     # an earlier test may have declared TINY in this process
    r = runner.run(_job(TINY, t5_data), tmp_path, b)
    assert (r.status, r.reason, r.kind) == ("crashed", STOPPED_REASON, "evaluate")
    assert b.kinds == ["declare"]
