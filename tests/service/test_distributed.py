"""The distributed deployment for real: Celery workers over Redis, PostgreSQL, sandboxes.

Workers are separate processes started here (tests/cluster.py), configured only through
SELFPROG_* variables; trainer and sandbox workers get a database URL that cannot work,
so a run completing proves they never need the lineage DB. Nothing is mocked.
"""
from __future__ import annotations

import json
import os

import pytest
import redis

from pipeline import celery_app, refinement, stages
from pipeline.store import store_for
from pipeline import tokenizer as tk
from pipeline.jobs import RunContext
from pipeline.settings import Settings
from pipeline.store import LineageStore
from sandbox.schema import Result
from tests.support.cluster import QUICK_ARGS, Cluster, check_complete_run, quick_config



def _start(cl: Cluster, *specs: tuple[str, str]) -> None:
    for name, queue in specs:
        cl.start(name, queue, wait=False)
    for name, _ in specs:
        cl.wait_ready(cl.workers[name])


def docker_ready() -> tuple[bool, str]:
    try:
        from sandbox.backends.docker import docker_available
    except ImportError as exc:        # the docker SDK is not installed
        return False, str(exc)
    return docker_available(os.environ.get("SELFPROG_SANDBOX_IMAGE", "selfprog-sandbox:latest"))


# --------------------------------------------------------------------------- end to end
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_cli_launch_goes_through_celery_workers_and_lands_in_postgres(
        postgres_url, redis_url, tmp_path):
    with Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url) as cl:
        _start(cl, ("coordinator", "coordinator"), ("trainer", "trainer"),
               ("sandbox1", "sandbox"), ("sandbox2", "sandbox"))
        # both arms: the random control arm's candidates always pass the policy gate, so
        # every iteration has several evaluations in flight whatever the LM wrote
        p = cl.cli("launch", *QUICK_ARGS, "--set", "arms=lm,random", "--json")
        assert p.returncode == 0, p.stderr + cl.logs()
        out = json.loads(p.stdout)
        assert out["status"] == "completed", (out, cl.logs())
        with LineageStore(postgres_url) as store:
            cands = check_complete_run(store, out["run_id"], quick_config(arms="lm,random"))
        assert any(c.status == "evaluated" for c in cands)
        # live events came back over Redis to the attached CLI
        assert "[iteration 1]" in p.stderr and "LM trained:" in p.stderr, p.stderr
        assert "LM step" in p.stderr, p.stderr           # per-step losses, from the trainer
        # the chord spread over both sandbox workers; LM jobs went to the trainer
        # a reused outcome (pipeline/evaluations.py) ran no sandbox job
        evaluations = sum(1 for c in cands if c.status != "rejected" and not c.reused)
        s1, s2 = cl.workers["sandbox1"].succeeded(), cl.workers["sandbox2"].succeeded()
        assert s1 >= 1 and s2 >= 1, (s1, s2)
        assert s1 + s2 >= evaluations
        assert cl.workers["trainer"].succeeded() >= 4      # 2 x (train, generate)
        assert cl.workers["coordinator"].succeeded() == 0  # no sandbox job ran there


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.docker
@pytest.mark.slow
def test_docker_sandboxes_detach_and_watch(postgres_url, redis_url, tmp_path):
    ok, why = docker_ready()
    if not ok:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER") == "1":
            pytest.fail(f"SELFPROG_REQUIRE_DOCKER=1 but Docker is not usable: {why}")
        pytest.skip(f"no Docker engine with the sandbox image: {why}")
    with Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url,
                 backend="docker") as cl:
        _start(cl, ("coordinator", "coordinator"), ("trainer", "trainer"),
               ("sandbox1", "sandbox"), ("sandbox2", "sandbox"))
        p = cl.cli("launch", *QUICK_ARGS, "--detach")
        assert p.returncode == 0, p.stderr
        run_id = p.stdout.strip()
        assert len(run_id) == 12, p.stdout
        w = cl.cli("watch", run_id, "--json")
        assert w.returncode == 0, w.stderr + cl.logs()
        lines = [json.loads(line) for line in w.stdout.splitlines()]
        assert lines[-1] == {"event": "end", "run_id": run_id, "status": "completed",
                             "error": None}
        assert any(e["event"] == "iteration" for e in lines)
        with LineageStore(postgres_url) as store:
            cands = check_complete_run(store, run_id, quick_config())
        assert any(c.status == "evaluated" for c in cands)
        # a reused outcome (pipeline/evaluations.py) ran no sandbox job
        evaluations = sum(1 for c in cands if c.status != "rejected" and not c.reused)
        assert cl.workers["sandbox1"].succeeded() + cl.workers["sandbox2"].succeeded() \
            >= evaluations
    # every sandbox container is gone
    import docker
    client = docker.from_env()
    try:
        assert client.containers.list(all=True, filters={"label": "selfprog.sandbox=1"}) == []
    finally:
        client.close()


# ------------------------------------------------------------------- the CLI's edges
@pytest.mark.postgres
@pytest.mark.redis
def test_detach_cancel_resume_and_watch_edges(postgres_url, redis_url, tmp_path):
    cl = Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url)
    # no worker at all: the run is submitted and waits in the coordinator queue
    p = cl.cli("launch", *QUICK_ARGS, "--detach", "--json")
    assert p.returncode == 0, p.stderr
    run_id = json.loads(p.stdout)["run_id"]
    assert redis.Redis.from_url(redis_url).llen("coordinator") == 1
    c = cl.cli("cancel", run_id[:6])
    assert c.returncode == 0 and "cancelled" in c.stdout, c.stderr
    with LineageStore(postgres_url) as store:
        assert store.get_run(run_id).status == "cancelled"
    for args, words in ((("cancel", run_id), "already cancelled"),
                        (("resume", run_id), "was cancelled"),
                        (("watch", run_id), f"run {run_id} cancelled"),
                        (("cancel", "nope1234"), "unknown run")):
        r = cl.cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and words in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
    # embedded: no broker, so nothing to detach from or watch
    for args in (("launch", "--detach"), ("watch", run_id)):
        r = cl.cli(*args, SELFPROG_BROKER_URL="")
        assert r.returncode == 1 and "SELFPROG_BROKER_URL" in r.stderr, r.stderr
    # a broker that does not answer: one line, at once
    r = cl.cli("launch", "--detach", SELFPROG_BROKER_URL="redis://127.0.0.1:9/0")
    assert r.returncode == 1 and "does not answer" in r.stderr, r.stderr


# ------------------------------------------------------ duplicate deliveries, one by one
def _queue_lengths(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    return {q: client.llen(q) for q in celery_app.QUEUES}


@pytest.mark.postgres
@pytest.mark.redis
def test_each_stage_delivered_twice_moves_once_and_redelivery_redispatches(
        postgres_url, redis_url, tmp_path, restore_embedded):
    """Every coordinator stage, run again as a duplicate (returns, dispatches nothing)
    and as a redelivery (dispatches its next stage again, the first delivery may have
    died before it could), never duplicates a row or a selection. The stage functions
    run here against real Redis and PostgreSQL; what they dispatch stays in the queues."""
    settings = Settings.from_env(env={}, database_url=postgres_url, broker_url=redis_url,
                                 artifact_dir=str(tmp_path / "artifacts"),
                                 sandbox_backend="process")
    celery_app.configure(settings)
    store = store_for(settings.database_url)
    config = quick_config()
    run_id = store.create_run(config=config.to_dict(), task="self", preset="quick", seed=0)
    store.set_run_status(run_id, "running")
    ctx = RunContext(run_id, config, settings)
    ctx.prepare()
    stage = {name: getattr(stages, name).run.__wrapped__
             for name in ("begin_iteration", "after_training", "after_generation",
                          "finish_iteration")}
    kw = dict(run_id=run_id, index=0, arm="lm")

    def twice(name: str, *args, **extra) -> None:
        stage[name](*args, **kw, **extra)               # the first delivery
        stage[name](*args, **kw, **extra)               # a duplicate

    twice("begin_iteration")
    assert store.get_iteration(run_id, 0).stage == "training"
    assert _queue_lengths(redis_url) == {"coordinator": 0, "trainer": 1, "sandbox": 0}
    with stages.redelivery():
        stage["begin_iteration"](**kw)
    assert _queue_lengths(redis_url)["trainer"] == 2

    trained = Result(job_id=f"{run_id}.lm.i0.train", kind="train_lm", status="ok",
                     losses=[3.0, 2.0, 1.0], duration_s=1.0).to_dict()
    twice("after_training", trained)
    it = store.get_iteration(run_id, 0)
    assert it.stage == "generating" and it.lm_losses == [3.0, 2.0, 1.0]
    assert len(store.curves(run_id, "lm_loss")) == 1
    assert _queue_lengths(redis_url)["trainer"] == 3

    sources = [refinement.render(refinement.refine(
        refinement.design_from_params(refinement.parse(ctx.seed_source(), ctx.task),
                                      config, ctx.task),
        __import__("random").Random(i), ctx.task), ctx.task) for i in range(2)]
    generated = Result(job_id=f"{run_id}.lm.i0.generate", kind="generate", status="ok",
                       samples=[tk.encode(ctx.tokenizer, s) for s in sources]).to_dict()
    twice("after_generation", generated)
    rows = store.candidates(run_id, iteration=0)
    assert [c.index for c in rows] == [0, 1, 2] and all(c.status == "running" for c in rows)
    assert _queue_lengths(redis_url)["sandbox"] == 3             # one chord of 3
    with stages.redelivery():
        stage["after_generation"](generated, **kw)
    assert len(store.candidates(run_id, iteration=0)) == 3      # still one row each
    assert _queue_lengths(redis_url)["sandbox"] == 6             # the chord again

    ids = [c.id for c in rows]
    # the incumbent stays best (a would-be new winner would first be re-scored)
    scores = [Result(job_id=f"{run_id}.lm.i0.c{c.index}", kind="evaluate", status="ok",
                     score=s, duration_s=1.0).to_dict() for c, s in zip(rows, (1.0, 2.0, 3.0))]
    twice("finish_iteration", scores, candidate_ids=ids)
    # a late duplicate chord with other numbers changes nothing
    late = [dict(r, score=0.5) for r in scores]
    stage["finish_iteration"](late, candidate_ids=ids, **kw)
    it = store.get_iteration(run_id, 0)
    assert it.stage == "done" and it.decision == "kept" and it.selected_id == ids[0]
    assert [c.score for c in store.candidates(run_id, iteration=0)] == [1.0, 2.0, 3.0]
    assert _queue_lengths(redis_url)["coordinator"] == 1         # begin_iteration(1), once
    with stages.redelivery():
        stage["finish_iteration"](scores, candidate_ids=ids, **kw)
    assert _queue_lengths(redis_url)["coordinator"] == 2
    # ...and that second begin_iteration(1) would find the iteration under way
    stage["begin_iteration"](run_id=run_id, index=1, arm="lm")
    stage["begin_iteration"](run_id=run_id, index=1, arm="lm")
    assert store.get_iteration(run_id, 1).stage == "training"
    assert _queue_lengths(redis_url)["trainer"] == 4
    assert len(store.candidates(run_id, iteration=1)) == 1

    # Iteration 1: a candidate beats the incumbent, so its score is checked again in a
    # fresh sandbox before it wins. That re-score job is sent once per delivery that
    # needs it: never by a duplicate, again by a redelivery and by `recover`.
    kw1 = dict(kw, index=1)
    stage["after_training"](dict(trained, job_id=f"{run_id}.lm.i1.train"), **kw1)
    stage["after_generation"](dict(generated, job_id=f"{run_id}.lm.i1.generate"), **kw1)
    rows = store.candidates(run_id, iteration=1)
    sandbox = _queue_lengths(redis_url)["sandbox"]
    better = [Result(job_id=f"{run_id}.lm.i1.c{c.index}", kind="evaluate", status="ok",
                     score=s, duration_s=1.0).to_dict() for c, s in zip(rows, (1.0, 0.5, 3.0))]
    for _ in range(2):
        stage["finish_iteration"](better, candidate_ids=[c.id for c in rows], **kw1)
    assert store.get_iteration(run_id, 1).stage == "selecting"
    assert _queue_lengths(redis_url)["sandbox"] == sandbox + 1    # one re-score job
    with stages.redelivery():
        stage["finish_iteration"](better, candidate_ids=[c.id for c in rows], **kw1)
    stage["finish_iteration"]([], candidate_ids=[], recovering=True, **kw1)
    assert _queue_lengths(redis_url)["sandbox"] == sandbox + 3
    assert store.get_iteration(run_id, 1).stage == "selecting"    # still waiting for it
