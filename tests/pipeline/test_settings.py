"""RunConfig's bounds (pipeline/settings.py RUN_BOUNDS): every field has one, a value
outside it is refused in one line that names the field, the ends of a range are inside,
every preset lies within them, and the rules between fields hold."""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.bounds import Range
from pipeline.settings import PRESETS, RUN_BOUNDS, ConfigError, RunConfig, preset
from sandbox.schema import JOB_PARAMS, MAX_SAMPLES

FIELDS = dataclasses.fields(RunConfig)
# Values each field that is not a number refuses; a new such field needs a line here.
REFUSED = {
    "preset": ["nope", ""],
    "task": ["nope", ""],
    "arms": [(), ("lm", "nope"), ("lm", "lm")],
    "sweep": ["../escape", ".hidden", "a/b", "x" * 97],
    # not one of the family's spaces (the self task's transformer has only "paper")
    "design_space": ["", "nope", "extended"],
    "reuse_evaluations": ["yes", 1, None],
}


def refused(field: dataclasses.Field) -> list:
    bound = RUN_BOUNDS[field.name]
    if not isinstance(bound, Range):
        return REFUSED[field.name]
    values = [bound.lo if bound.open_lo else bound.lo - 1, bound.hi + 1, float("nan"),
              float("inf")]
    if field.type == "int":
        values.append(bound.lo + 0.5)          # not an integer, even inside the range
    return values


def refusal(config: RunConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        config.validate()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_run_setting_has_a_bound_that_refuses_what_lies_outside(field):
    assert field.name in RUN_BOUNDS, f"RunConfig.{field.name} has no bound in RUN_BOUNDS"
    base = preset("quick")
    for value in refused(field):
        assert field.name in refusal(dataclasses.replace(base, **{field.name: value})), value
    bound = RUN_BOUNDS[field.name]
    if isinstance(bound, Range):      # the ends are inside (the open one excepted)
        ends = [bound.hi] if bound.open_lo else [bound.lo, bound.hi]
        assert [bound.problem(field.name, v, field.type) for v in ends] == [None] * len(ends)


def test_no_bound_names_a_field_that_does_not_exist():
    assert set(RUN_BOUNDS) == {f.name for f in FIELDS}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_lies_within_the_bounds(name):
    assert PRESETS[name].validate() is PRESETS[name]
    preset(name, task="digits").validate()          # with the vision defaults


def test_the_draws_of_an_iteration_fit_one_generate_job():
    fits = preset("quick", candidates=8, sample_factor=MAX_SAMPLES // 8)
    assert fits.candidates * fits.sample_factor == MAX_SAMPLES
    message = refusal(dataclasses.replace(fits, sample_factor=MAX_SAMPLES // 8 + 1))
    assert message.startswith("candidates x sample_factor is 72, more than the 64 samples")


def test_every_iterations_job_seed_fits_the_sandboxs_bound():
    top = JOB_PARAMS["seed"][2]
    assert preset("quick", iterations=3, seed=top - 2).seed == top - 2
    assert "seed + iterations" in refusal(dataclasses.replace(preset("quick", iterations=3),
                                                              seed=top - 1))


def test_the_rules_between_fields_still_hold():
    assert refusal(dataclasses.replace(preset("quick"), dataset_size=16, fewshot_samples=32)) \
        == "fewshot_samples cannot exceed dataset_size"
    assert refusal(dataclasses.replace(preset("quick"), d_model=66)) \
        == "d_model must be divisible by seed_heads"


def test_every_problem_is_said_at_once_on_one_line():
    message = refusal(dataclasses.replace(preset("quick"), sample_factor=0, iterations=-1))
    assert message == ("iterations must be an integer in [1, 10000], got -1; "
                       "sample_factor must be an integer in [1, 64], got 0")


def test_run_config_round_trips_and_rejects_nonsense():
    cfg = preset("quick", arms="lm,random")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(candidates=0), dict(arms="lm,nope"), dict(fewshot_samples=10**9),
                dict(temperature=0.0), dict(iterations="many")):
        with pytest.raises(ConfigError):
            preset("quick", **bad)
    with pytest.raises(ConfigError):   # both named: the few-shot set must fit the corpus
        preset("quick", dataset_size=16, fewshot_samples=32)


def test_a_smaller_corpus_brings_the_preset_few_shot_set_with_it():
    full = preset("quick")
    assert full.fewshot_samples > 16
    # only the corpus named (as `--set dataset_size=16` gives it): the whole corpus
    assert preset("quick", dataset_size="16").fewshot_samples == 16
    assert preset("quick", dataset_size=full.dataset_size * 2).fewshot_samples == full.fewshot_samples
    assert preset("quick", dataset_size=64, fewshot_samples=8).fewshot_samples == 8
