"""Stopping, cancelling, resuming and failing an embedded run (SQLite, no broker: the
default `make launch` path), with real sandboxes (the process backend).

A "stop" is the process dying in the middle of a stage: a progress callback raises a
BaseException when the stage starts, which no stage catches, so the run is left
`running` at that stage in the lineage DB, as after a crash; `resume` must carry it on.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from pipeline import events, runs, stages
from pipeline.jobs import RunContext
from pipeline.store import LineageStore
from tests.support.cluster import check_complete_run, quick_config, running_sandboxes, wait_for
from tests.support.runs import embedded_settings, iteration_at_evaluation

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the process sandbox needs root")


class Stop(BaseException):
    """The coordinator process 'dies' here (not an Exception: nothing records it)."""


def _stop_at(stage: str, seen: list):
    fired = []

    def progress(event: str, info: dict) -> None:
        seen.append((event, info))
        if event == "stage" and info.get("stage") == stage and not fired:
            fired.append(True)
            raise Stop(stage)
    return progress


@pytest.mark.slow
@pytest.mark.parametrize("stage,lose_weights", [
    ("preparing", False),     # not prepared yet: recover starts the run over
    ("training", False),
    ("generating", False),
    ("generating", True),     # the trained LM's weights are gone: train again first
    ("evaluating", False),
])
def test_embedded_resume_after_a_stop_at_each_stage(sqlite_url, tmp_path, stage, lose_weights):
    settings = embedded_settings(sqlite_url, tmp_path)
    config = quick_config(iterations=1)
    seen: list = []
    with pytest.raises(Stop):
        runs.launch(settings, config, progress=_stop_at(stage, seen))
    store = LineageStore(sqlite_url)
    (run,) = store.list_runs()
    assert run.status == "running"     # as a crash leaves it
    ctx = RunContext(run.id, config, settings)
    if stage == "preparing":
        assert not (ctx.dir / "prepared").exists() and store.iterations(run.id) == []
    else:
        assert store.get_iteration(run.id, 0).stage == stage
    weights = ctx.lm_weights("lm", 0)
    if lose_weights:
        assert weights.exists()
        weights.unlink()

    after: list = []
    runs.resume(settings, run.id, progress=lambda e, i: after.append((e, i)))
    check_complete_run(store, run.id, config)
    stages_after = [i["stage"] for e, i in after if e == "stage"]
    expected = {"preparing": ["preparing", "training", "generating", "evaluating"],
                "training": ["training", "generating", "evaluating"],
                "generating": ["generating", "evaluating"],
                "evaluating": ["evaluating"]}[stage]
    if lose_weights:
        expected = ["training", "generating", "evaluating"]
    assert stages_after == expected, stages_after
    assert weights.exists()
    it = store.get_iteration(run.id, 0)
    assert it.lm_losses and it.decision in ("kept", "replaced")
    store.close()


def test_a_failing_stage_ends_the_run_failed_with_its_reason(sqlite_url, tmp_path):
    settings = embedded_settings(sqlite_url, tmp_path)
    # the LM cannot be trained in one second: after_training fails the run
    config = quick_config(iterations=1, train_timeout_s=1.0)
    seen: list = []
    run_id = runs.launch(settings, config, progress=lambda e, i: seen.append((e, i)))
    with LineageStore(sqlite_url) as store:
        run = store.get_run(run_id)
        assert run.status == "failed", run
        assert run.error.startswith("after_training: RuntimeError: the LM defined by the "
                                    "current source could not be trained (timeout:"), run.error
        assert "1 s deadline" in run.error
        assert [it.stage for it in store.iterations(run_id)] == ["training"]
    assert [e for e, _ in seen if e == "failed"] == ["failed"]
    assert not any(e == "stage" and i["stage"] == "generating" for e, i in seen)


LOOPS_FOREVER = '''
import torch


def build_model(vocab_size):
    while True:
        pass


def train(model):
    return torch.optim.SGD(model.parameters(), lr=0.1), 8
'''


def test_cancel_mid_evaluation_stops_the_sandbox_and_the_run(sqlite_url, tmp_path):
    """Fails if a running job's watch is not told about the cancel (pipeline/sandbox_task.py
    `watch_for`): the endless candidate would then run to its 300 s deadline."""
    # Cold sandboxes: the candidate's sandbox is found by its job directory's name, which
    # a pre-warmed sandbox's directory (named before its job exists) does not carry.
    settings = embedded_settings(sqlite_url, tmp_path, sandbox_prewarm=0)
    config = quick_config(iterations=2, candidates=2, eval_timeout_s=300.0)
    store, ctx, inc = iteration_at_evaluation(
        settings, config, lambda ctx: [LOOPS_FOREVER, ctx.seed_source()])
    run_id = ctx.run_id
    errors: list = []

    def evaluate() -> None:
        try:
            stages._dispatch(store, ctx, 0, "lm", "evaluating")
        except BaseException as e:   # reported below
            errors.append(e)

    worker = threading.Thread(target=evaluate)
    worker.start()
    try:
        wait_for(lambda: any(name.startswith(f"{run_id}.lm.i0.c1")
                             for name in running_sandboxes(os.getpid()).values()),
                 240, "the endless candidate's sandbox")
        time.sleep(1.0)
        started = time.monotonic()
        # every row is still open: results are recorded when the whole batch is back
        assert runs.cancel(settings, run_id) == 3
        worker.join(timeout=60)
        took = time.monotonic() - started
        assert not worker.is_alive(), "the cancelled evaluation is still running"
    finally:
        worker.join()
    assert not errors, errors
    assert took < 30, took
    assert running_sandboxes(os.getpid()) == {}
    assert store.get_run(run_id).status == "cancelled"
    rows = store.candidates(run_id)
    assert [(c.index, c.status) for c in rows] == [(0, "cancelled"), (1, "cancelled"),
                                                   (2, "cancelled")], rows
    assert all(c.reason == "run cancelled" and c.score is None for c in rows)
    it = store.get_iteration(run_id, 0)
    assert it.stage == "evaluating" and it.selected_id is None     # no selection
    assert store.get_iteration(run_id, 1) is None                   # no next iteration


def test_a_replaced_iteration_links_the_winner_and_starts_the_next_from_it(sqlite_url,
                                                                          tmp_path):
    """Candidate 1 is the seed trained with four times the steps (clearly better),
    candidate 2 the seed with a learning rate too small to help: candidate 1 is re-scored,
    wins, and iteration 1 starts from its source with it as the incumbent's parent."""
    settings = embedded_settings(sqlite_url, tmp_path)
    config = quick_config(iterations=2, candidates=2)
    store, ctx, inc = iteration_at_evaluation(settings, config, lambda ctx: [
        ctx.seed_source().replace("batch_size = 16", "batch_size = 4"),
        ctx.seed_source().replace("lr=0.01", "lr=1e-06")])
    run_id = ctx.run_id
    better, worse = store.candidates(run_id, iteration=0)[1:]
    assert better.source != inc.source and worse.source != inc.source
    seen: list = []
    events.subscribe(run_id, _stop_at("training", seen))   # iteration 1's first stage
    try:
        with pytest.raises(Stop):
            stages._dispatch(store, ctx, 0, "lm", "evaluating")
    finally:
        events.unsubscribe(run_id)
    it0 = store.get_iteration(run_id, 0)
    inc, better, worse = store.candidates(run_id, iteration=0)
    assert [c.status for c in (inc, better, worse)] == ["evaluated"] * 3, \
        [(c.status, c.reason) for c in (inc, better, worse)]
    assert worse.score >= inc.score > better.score, (inc.score, better.score, worse.score)
    assert it0.stage == "done" and it0.decision == "replaced" and it0.selected_id == better.id
    assert better.parent_id == inc.id
    assert better.rescore is not None and not better.flagged           # re-scored, agreed
    assert abs(better.rescore - better.score) <= config.rescore_tolerance * max(1.0, better.score)
    assert [i for e, i in seen if e == "rescore"][0]["flagged"] is False
    it1 = store.get_iteration(run_id, 1)
    assert it1.source_in == better.source
    nxt = store.get_candidate(it1.incumbent_id)
    assert nxt.parent_id == better.id and nxt.source == better.source and nxt.role == "incumbent"
    assert [c.id for c in store.lineage(nxt.id)] == [inc.id, better.id, nxt.id]
    assert it1.stage == "training"
