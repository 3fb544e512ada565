"""The evaluation cache: the key, the stored outcome, its reuse, provenance and cost.

Real sandboxes (the process backend), real SQLite and PostgreSQL; the race between
workers runs on real PostgreSQL (several processes claiming one key), and through real
Celery workers over Redis in tests/service/test_evaluation_race.py.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import shutil
import sys

import pytest

from pipeline import stages
from pipeline.evaluations import evaluation_key, harness_digest, harness_files, key_for, key_parts
from pipeline.jobs import RunContext
from pipeline.settings import preset
from pipeline.store import LineageStore
from sandbox.backends.process import ProcessBackend
from tests.support.runs import embedded_settings, iteration_at_evaluation, random_refinements

TINY = dict(task="digits", arms=("lm",), iterations=1, candidates=2, dataset_size=128,
            lm_epochs=2, train_samples=300, eval_samples=100, max_new_tokens=200)
PARTS = {"version": 1, "source": "0" * 64}


def _config(**kw):
    return preset("quick", **{**TINY, **kw})


def _ctx(tmp_path, **kw) -> RunContext:
    ctx = RunContext("keytest", _config(**kw), embedded_settings("sqlite://", tmp_path))
    ctx.prepare()
    return ctx


# ------------------------------------------------------------------------ the key
def _flip_last_byte(path) -> None:
    """Change one value of the file's last tensor."""
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))


def test_the_key_changes_with_source_seed_data_harness_and_backend(tmp_path):
    ctx = _ctx(tmp_path)
    seed = ctx.seed_source()
    job = ctx.evaluate_job("lm", 0, 0, seed)
    backend = ProcessBackend(python=sys.executable).identity()
    base = evaluation_key(key_parts(job, backend))
    # the same job again (another iteration, another job id): the same key
    again = ctx.evaluate_job("lm", 3, 5, seed)
    assert again.job_id != job.job_id and evaluation_key(key_parts(again, backend)) == base

    assert evaluation_key(key_parts(ctx.evaluate_job("lm", 0, 0, seed + " "), backend)) != base
    other_seed = RunContext("keytest", _config(seed=1), ctx.settings)
    assert evaluation_key(key_parts(other_seed.evaluate_job("lm", 0, 0, seed), backend)) != base

    # other task data: the same file names, other bytes
    data = tmp_path / "other-task.safetensors"
    shutil.copy(job.inputs["data"], data)
    assert evaluation_key(key_parts(dataclasses.replace(job, inputs={"data": str(data)}),
                                    backend)) == base
    _flip_last_byte(data)
    assert evaluation_key(key_parts(dataclasses.replace(job, inputs={"data": str(data)}),
                                    backend)) != base
    labels = tmp_path / "labels.safetensors"
    shutil.copy(job.labels, labels)
    _flip_last_byte(labels)
    assert evaluation_key(key_parts(dataclasses.replace(job, labels=str(labels)), backend)) != base
    # the same tensors written again (the writer orders its header as it likes): same key
    rewritten = RunContext("keytest2", ctx.config, ctx.settings)
    rewritten.prepare()
    assert evaluation_key(key_parts(rewritten.evaluate_job("lm", 0, 0, seed), backend)) == base

    # a changed harness file: the copied modules digest as the originals until one changes
    copies = []
    for f in harness_files():
        copies.append(tmp_path / "harness" / f.name)
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(f, copies[-1])
    assert harness_digest(copies) == harness_digest()
    with open(copies[-2], "a") as f:        # the harness module itself
        f.write("\n# changed\n")
    assert harness_digest(copies) != harness_digest()
    assert evaluation_key(key_parts(job, backend, harness=harness_digest(copies))) != base

    # another backend: another interpreter (its own prefix and packages), or Docker
    system = shutil.which("python3", path="/usr/bin")
    if system and system != sys.executable:
        other = ProcessBackend(python=system).identity()
        assert other != backend
        assert evaluation_key(key_parts(job, other)) != base
    assert evaluation_key(key_parts(job, "docker:sha256:" + "1" * 64 + ":runc")) != base
    # the key is a function of its parts, which name everything above
    parts = key_parts(job, backend)
    assert set(parts) == {"version", "source", "kind", "model_kind", "params", "limits", "data",
                          "seed", "harness", "backend", "torch", "device"}
    assert parts["backend"] == backend and parts["seed"] == ctx.config.seed
    assert key_for(job, ctx.settings)[1]["backend"].startswith("process:")


# ---------------------------------------------------------------------- the store
def test_claim_reuse_discard_and_take_over(store):
    key = "a" * 64
    assert store.claim_evaluation(key, parts=PARTS, claimant="one")[0] == "claimed"
    assert store.claim_evaluation(key, parts=PARTS, claimant="one")[0] == "claimed"  # its own
    assert store.claim_evaluation(key, parts=PARTS, claimant="two")[0] == "busy"
    # only the claimant completes it; a timeout says nothing about the source: discarded
    assert not store.complete_evaluation(key, claimant="two", parts=PARTS, status="ok",
                                         reusable=True, score=0.5)
    assert store.complete_evaluation(key, claimant="one", parts=PARTS, status="timeout",
                                     reusable=False, reason="too slow")
    state, row = store.claim_evaluation(key, parts=PARTS, claimant="two")
    assert state == "claimed" and row.claimant == "two"
    usage = {"wall_s": 2.5, "cpu_s": 1.25, "peak_rss_mb": 300.0, "backend": "process:x",
             "host": "h"}
    assert store.complete_evaluation(key, claimant="two", parts=PARTS, status="ok",
                                     reusable=True, score=0.75, param_count=10, duration_s=2.5,
                                     usage=usage)
    state, row = store.claim_evaluation(key, parts=PARTS, claimant="three")
    assert state == "done" and row.score == 0.75 and row.result_status == "ok"
    assert (row.backend, row.host, row.wall_s, row.cpu_s, row.peak_rss_mb) == \
        ("process:x", "h", 2.5, 1.25, 300.0)
    # a done evaluation is never overwritten, by its claimant or anyone
    for who in ("two", "four"):
        assert not store.complete_evaluation(key, claimant=who, parts=PARTS, status="ok",
                                             reusable=True, score=0.1)
    assert store.get_evaluation(key).score == 0.75
    # a stale claim (its claimant presumed dead) is taken over by one compare-and-set
    stale = "b" * 64
    assert store.claim_evaluation(stale, parts=PARTS, claimant="dead")[0] == "claimed"
    assert store.claim_evaluation(stale, parts=PARTS, claimant="alive", stale_after_s=3600)[0] == "busy"
    state, row = store.claim_evaluation(stale, parts=PARTS, claimant="alive", stale_after_s=0)
    assert state == "claimed" and row.claimant == "alive"
    assert not store.complete_evaluation(stale, claimant="dead", parts=PARTS, status="ok",
                                         reusable=True, score=0.2)
    # reuse off: nobody claimed it, the first outcome is inserted, never a second
    free = "c" * 64
    assert store.complete_evaluation(free, claimant="x", parts=PARTS, status="ok", reusable=True,
                                     score=0.3)
    assert not store.complete_evaluation(free, claimant="y", parts=PARTS, status="ok",
                                         reusable=True, score=0.4)
    assert store.get_evaluation(free).score == 0.3
    with pytest.raises(Exception):
        store.claim_evaluation("not-a-key", parts=PARTS, claimant="x")


def _claim_many(url: str, claimant: str, keys: list[str], barrier, out) -> None:
    s = LineageStore(url)
    try:
        barrier.wait(timeout=60)
        out.put([(k, s.claim_evaluation(k, parts=PARTS, claimant=claimant)[0]) for k in keys])
    finally:
        s.close()


@pytest.mark.postgres
def test_processes_racing_on_keys_get_one_claim_each(postgres_url):
    LineageStore(postgres_url, create=True).close()
    keys = [f"{i:064x}" for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim_many, args=(postgres_url, f"w{i}", keys, barrier, out))
             for i in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for k in keys:
        states = [dict(r)[k] for r in results]
        assert states.count("claimed") == 1 and states.count("busy") == 3, (k, states)
    with LineageStore(postgres_url) as s:
        assert all(s.get_evaluation(k).status == "running" for k in keys)


# ------------------------------------------------------------------------ the loop
def _evaluated(store, ctx):
    stages._dispatch(store, ctx, 0, "lm", "evaluating")
    return store.candidates(ctx.run_id, iteration=0)


@pytest.mark.slow
def test_same_key_is_evaluated_once_and_reused_with_the_same_score(database_url, tmp_path):
    settings = embedded_settings(database_url, tmp_path)
    config = _config()
    twin = lambda ctx: [ctx.seed_source(), random_refinements(ctx, ctx.seed_source(), 0)[0]]
    store, ctx, inc = iteration_at_evaluation(settings, config, twin)
    cands = _evaluated(store, ctx)
    # the incumbent and candidate 1 have one source: one sandbox, the same score
    assert [c.status for c in cands] == ["evaluated"] * 3
    assert cands[0].evaluation_key == cands[1].evaluation_key != cands[2].evaluation_key
    assert cands[0].score == cands[1].score
    assert [c.reused for c in cands] == [False, True, False]
    evs = store.evaluations(ctx.run_id)
    assert len(evs) == 2 and evs[cands[0].evaluation_key].reuses == 1
    first = evs[cands[0].evaluation_key]
    assert first.wall_s > 0 and first.cpu_s > 0 and first.peak_rss_mb > 50
    assert first.backend.startswith("process:") and first.host and first.run_id == ctx.run_id
    assert first.parts["seed"] == config.seed

    # another run with the same configuration: nothing starts a sandbox
    store2, ctx2, _ = iteration_at_evaluation(settings, config, twin)
    again = _evaluated(store2, ctx2)
    assert all(c.reused for c in again)
    assert [c.score for c in again] == [c.score for c in cands]
    assert [c.evaluation_key for c in again] == [c.evaluation_key for c in cands]
    assert len(store2.evaluations(ctx2.run_id)) == 2

    # reuse off: every candidate runs its own sandbox, and scores the same
    store3, ctx3, _ = iteration_at_evaluation(settings, _config(reuse_evaluations=False), twin)
    fresh = _evaluated(store3, ctx3)
    assert not any(c.reused for c in fresh)
    assert [c.score for c in fresh] == [c.score for c in cands]
    assert [c.evaluation_key for c in fresh] == [c.evaluation_key for c in cands]


@pytest.mark.slow
def test_a_resumed_iteration_reuses_what_its_first_attempt_evaluated(sqlite_url, tmp_path):
    from pipeline.sandbox_task import run_job
    settings = embedded_settings(sqlite_url, tmp_path)
    store, ctx, inc = iteration_at_evaluation(
        settings, _config(), lambda ctx: random_refinements(ctx, ctx.seed_source(), 0))
    # The first attempt: the incumbent's sandbox ran and its outcome was stored, then the
    # coordinator died before the chord ended (no candidate recorded).
    job = ctx.evaluate_job("lm", 0, 0, inc.source)
    key, parts = key_for(job, settings)
    assert store.claim_evaluation(key, parts=parts, claimant=job.job_id, run_id=ctx.run_id)[0] == "claimed"
    result = run_job.apply(args=[stages._wire(job), str(ctx.eval_dir(job))]).get()
    stages.record_evaluation.run.__wrapped__(result, key=key, claimant=job.job_id, parts=parts,
                                             run_id=ctx.run_id)
    assert all(c.status == "pending" for c in store.candidates(ctx.run_id))
    # resume: the incumbent takes the stored outcome, the others run
    stages.recover.run.__wrapped__(run_id=ctx.run_id)
    cands = store.candidates(ctx.run_id, iteration=0)
    assert store.get_run(ctx.run_id).status == "completed"
    assert cands[0].reused and cands[0].score == stages.Result.from_dict(result).score
    assert not any(c.reused for c in cands[1:] if c.evaluation_key != key)
    assert store.get_evaluation(key).reuses >= 1
