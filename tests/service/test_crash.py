"""Crash safety with real processes: SIGKILLed workers, a restarted Redis.

Each test runs a quick run on real Celery workers (tests/cluster.py) against the real
PostgreSQL and a real Redis, breaks something in the middle, and checks that the run
still ends `completed` with every candidate accounted for exactly once.

The visibility timeout is 5 s here (SELFPROG_VISIBILITY_TIMEOUT_S): a message that a
dead worker took comes back after 5 s instead of the production 6 hours. Live workers
renew the lease of the messages they hold, so nothing runs twice because it is slow.
"""
from __future__ import annotations

import os
import time

import pytest

from pipeline import celery_app, runs
from pipeline.settings import Settings
from pipeline.store import LineageStore
from tests.support.cluster import Cluster, RedisServer, check_complete_run, quick_config, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]
VT = 5.0
WORKERS = (("coordinator", "coordinator"), ("trainer", "trainer"),
           ("sandbox1", "sandbox"), ("sandbox2", "sandbox"))


def _cluster(tmp_path, broker_url: str, database_url: str, workers=WORKERS) -> Cluster:
    cl = Cluster(tmp_path, broker_url=broker_url, database_url=database_url,
                 visibility_timeout_s=VT)
    for name, queue in workers:
        cl.start(name, queue, wait=False)
    for name, _ in workers:
        cl.wait_ready(cl.workers[name])
    return cl


def _launch(cl: Cluster, config) -> tuple[Settings, str]:
    settings = Settings.from_env(env={}, database_url=cl.database_url, broker_url=cl.broker_url,
                                 artifact_dir=cl.env["SELFPROG_ARTIFACT_DIR"],
                                 visibility_timeout_s=VT)
    return settings, runs.launch(settings, config, detach=True)


def _wait_finished(store: LineageStore, run_id: str, cl: Cluster, timeout: float = 420.0) -> None:
    wait_for(lambda: store.get_run(run_id).status in ("completed", "failed", "cancelled"),
             timeout, f"run {run_id} to finish", poll=0.5,
             diagnose=lambda: f"{store.iterations(run_id)}\n{cl.logs()}")


def test_sandbox_worker_killed_in_the_middle_of_a_job(postgres_url, redis_url, tmp_path,
                                                      restore_embedded):
    config = quick_config(iterations=1)
    # one sandbox worker at first, so the first evaluation is surely its
    with _cluster(tmp_path, redis_url, postgres_url, WORKERS[:3]) as cl, \
            LineageStore(postgres_url, create=True) as store:
        _, run_id = _launch(cl, config)
        victim = cl.workers["sandbox1"]
        running = wait_for(lambda: {pid: name for pid, name in victim.running_sandboxes().items()
                                    if name.startswith(run_id)},   # a job, not a canary
                           300, "an evaluation on sandbox1", poll=0.05, diagnose=cl.logs)
        pid, jobdir = next(iter(running.items()))
        # <run>.lm.i<k>.c<index>, or its `.declare` step (sandbox/runner.py: a T5 candidate
        # is declared in a sandbox of its own before it is scored)
        job_id = jobdir.rsplit("-", 1)[0].removesuffix(".declare")
        cl.kill("sandbox1")
        # the sandbox died with its worker (parent-death signal), it did not linger
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the orphaned sandbox to die")
        cl.start("sandbox2", "sandbox")      # the only sandbox worker left
        _wait_finished(store, run_id, cl)
        cands = check_complete_run(store, run_id, config)
        iteration, index = job_id.split(".i", 1)[1].split(".c")
        killed = next(c for c in cands if c.iteration == int(iteration) and c.index == int(index))
        # its job came back (visibility timeout) and ran to a real verdict on sandbox2
        assert killed.status != "cancelled" and "crashed" not in killed.reason, killed
        assert killed.duration_s is not None and killed.duration_s > 0
        assert cl.workers["sandbox2"].succeeded() >= 1


def test_coordinator_killed_twice_in_the_middle_of_a_run(postgres_url, redis_url, tmp_path,
                                                         restore_embedded):
    config = quick_config()
    with _cluster(tmp_path, redis_url, postgres_url) as cl, \
            LineageStore(postgres_url, create=True) as store:
        _, run_id = _launch(cl, config)
        # 1. while its first stage runs (`start`: corpus and tokenizer being prepared)
        wait_for(lambda: store.get_run(run_id).status == "running", 120,
                 "the coordinator to start the run", poll=0.02, diagnose=cl.logs)
        cl.kill("coordinator")
        cl.start("coordinator", "coordinator")        # same node name: a restart
        # 2. in the middle of iteration 0: its candidates are being evaluated
        wait_for(lambda: (it := store.get_iteration(run_id, 0)) is not None
                 and it.stage == "evaluating", 300, "iteration 0 to reach evaluation",
                 diagnose=cl.logs)
        cl.kill("coordinator")
        # the sandboxes go on meanwhile; their results wait in Redis for a coordinator
        time.sleep(2)
        cl.start("coordinator", "coordinator")
        _wait_finished(store, run_id, cl)
        check_complete_run(store, run_id, config)


@pytest.mark.parametrize("persistence", ["append-only file", "none"])
def test_redis_restarted_under_a_running_run(postgres_url, tmp_path, restore_embedded,
                                             persistence):
    """With persistence (the compose setting) Redis comes back with its queues and the run
    goes on by itself; without, its messages and chord state are gone and `resume`
    re-dispatches the run from the DB."""
    server = RedisServer(tmp_path, persist=persistence != "none")
    server.start()
    config = quick_config(iterations=1)
    try:
        with _cluster(tmp_path, server.url, postgres_url) as cl, \
                LineageStore(postgres_url, create=True) as store:
            _, run_id = _launch(cl, config)
            wait_for(lambda: any(name.startswith(run_id) for w in cl.workers.values()
                                 if w.queue == "sandbox"
                                 for name in w.running_sandboxes().values()), 300,
                     "an evaluation to run", poll=0.05, diagnose=cl.logs)
            server.kill()
            time.sleep(1)
            server.start()
            if persistence == "none":
                p = cl.cli("resume", run_id, "--json", timeout=480)
                assert p.returncode == 0, p.stderr + cl.logs()
            _wait_finished(store, run_id, cl)
            check_complete_run(store, run_id, config)
    finally:
        server.kill()
        celery_app.configure(Settings.from_env(env={}))
