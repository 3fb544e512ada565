"""A cancel is final, and a run never waits in silence for workers that are not there.

Real Celery workers over the test Redis, the real PostgreSQL, process sandboxes
(tests/support/cluster.py); the CLI runs as a user runs it, in a subprocess.
"""
from __future__ import annotations

import json
import time

import pytest
import redis

from pipeline.cancellation import cancel_key
from pipeline.store import LineageStore
from tests.support.cluster import QUICK_ARGS, Cluster, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def _error_line(p) -> str:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    return errors[0]


def test_no_live_worker_launch_fails_fast_naming_the_queue_and_doctor_says_so(
        postgres_url, redis_url, tmp_path):
    cl = Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url)
    started = time.monotonic()
    p = cl.cli("launch", *QUICK_ARGS, timeout=60)
    took = time.monotonic() - started
    assert p.returncode == 1, (p.stdout, p.stderr)
    line = _error_line(p)
    for q in ("'coordinator'", "'trainer'", "'sandbox'"):
        assert q in line, line
    assert "no run was created" in line and "celery -A pipeline.worker worker -Q" in line
    # No hang: it gives starting workers pipeline/cli/run.py's WORKER_WAIT_S, then says so
    # (the bound is generous: a loaded 2-core machine starts the CLI slowly).
    assert took < 60, took
    with LineageStore(postgres_url) as store:
        assert store.list_runs() == []
    assert redis.Redis.from_url(redis_url).llen("coordinator") == 0   # nothing submitted

    d = cl.cli("doctor", "--skip-canary", "--json", timeout=120)
    checks = {c["name"]: c for c in json.loads(d.stdout)["checks"]}
    assert d.returncode == 1, d.stdout
    assert checks["workers"]["status"] == "fail", checks["workers"]
    assert "'trainer'" in checks["workers"]["detail"] and "-Q sandbox" in checks["workers"]["fix"]

    # one queue served: the others are named, not it
    with cl:
        cl.start("coordinator", "coordinator")
        p = cl.cli("launch", *QUICK_ARGS, timeout=60)
        line = _error_line(p)
        assert p.returncode == 1 and "'trainer'" in line and "'sandbox'" in line, line
        assert "'coordinator'" not in line, line
        d = cl.cli("doctor", "--skip-canary", "--json", timeout=120)
        checks = {c["name"]: c for c in json.loads(d.stdout)["checks"]}
        assert checks["workers"]["status"] == "fail"
        assert "'coordinator'" not in checks["workers"]["detail"], checks["workers"]
        # detached, the run is submitted to wait for its workers, with a warning
        p = cl.cli("launch", *QUICK_ARGS, "--detach", "--json", timeout=60)
        assert p.returncode == 0, p.stderr
        assert "warning: no live worker consumes queue(s) 'trainer', 'sandbox'" in p.stderr
        assert json.loads(p.stdout)["status"] == "submitted"


@pytest.mark.slow
def test_cancel_during_lm_training_is_final_and_resume_anyway_takes_it_back(
        postgres_url, redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    with Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url) as cl, \
            LineageStore(postgres_url, create=True) as store:
        for name in ("coordinator", "trainer", "sandbox"):
            cl.start(name, name, wait=False)
        for w in cl.workers.values():
            cl.wait_ready(w)
        d = cl.cli("doctor", "--skip-canary", "--json", timeout=120)
        checks = {c["name"]: c for c in json.loads(d.stdout)["checks"]}
        assert checks["workers"]["status"] == "ok", checks["workers"]
        # a long training stage, so that the cancel surely lands in it
        p = cl.cli("launch", *QUICK_ARGS, "--set", "lm_epochs=400", "--detach", timeout=120)
        assert p.returncode == 0, p.stderr
        run_id = p.stdout.strip()
        trainer = cl.workers["trainer"]
        wait_for(lambda: trainer.running_sandboxes(), 240, "the LM training sandbox",
                 diagnose=cl.logs)
        assert store.get_iteration(run_id, 0).stage == "training"

        c = cl.cli("cancel", run_id, "--json")
        assert c.returncode == 0, c.stderr
        wait_for(lambda: not trainer.running_sandboxes(), 30, "the training sandbox to stop")
        # the stopped training's result reaches the coordinator, which records nothing
        coordinator = cl.workers["coordinator"]
        wait_for(lambda: coordinator.succeeded("selfprog.loop.after_training")
                 or "raised unexpected" in coordinator.text(), 60, "after_training to run",
                 diagnose=cl.logs)
        time.sleep(1)
        assert coordinator.succeeded("selfprog.loop.after_training") == 1, coordinator.text()
        assert "raised unexpected" not in coordinator.text()
        run = store.get_run(run_id)
        assert run.status == "cancelled" and run.error is None, (run.status, run.error)
        assert [it.stage for it in store.iterations(run_id)] == ["training"]
        assert all(c.status == "cancelled" for c in store.candidates(run_id))
        assert r.exists(cancel_key(run_id))

        # resume refuses a cancelled run, and says how to carry it on anyway
        p = cl.cli("resume", run_id)
        assert p.returncode == 1 and f"resume --anyway {run_id}" in _error_line(p), p.stderr
        assert store.get_run(run_id).status == "cancelled"
        assert "--anyway" in cl.cli("resume", "--help").stdout

        p = cl.cli("resume", run_id, "--anyway", "--detach", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout) == {"run_id": run_id, "status": "submitted"}
        assert not r.exists(cancel_key(run_id))
        assert store.get_run(run_id).status == "running"
        assert [c.status for c in store.candidates(run_id)] == ["pending"]
        # the training starts again and is not stopped by a stale flag
        wait_for(lambda: trainer.running_sandboxes(), 120, "the training to start again",
                 diagnose=cl.logs)
        time.sleep(6)   # > CANCEL_CHECK_S: a job that saw a cancel flag would be gone
        assert trainer.running_sandboxes() and store.get_run(run_id).status == "running"
        assert cl.cli("cancel", run_id).returncode == 0
        wait_for(lambda: not trainer.running_sandboxes(), 30, "the training sandbox to stop")


def test_a_worker_whose_sandbox_does_not_confine_stops_consuming_its_sandbox_queue(
        postgres_url, redis_url, tmp_path):
    """The start-up canary (pipeline/sandbox_task.py): a worker on a sandbox that does not
    confine (SELFPROG_SABOTAGE=1: the test-only switch that turns confinement off) takes
    no sandbox jobs. It stays up for its other queue, and doctor sees the hole."""
    with Cluster(tmp_path, broker_url=redis_url, database_url=postgres_url,
                 env={"SELFPROG_SABOTAGE": "1", "SELFPROG_ALLOW_UNCONFINED": ""}) as cl:
        w = cl.start("unconfined", "coordinator,sandbox")
        wait_for(lambda: "will not take sandbox jobs" in w.text(), 180,
                 "the worker's canary to refuse", diagnose=w.text)
        assert "does NOT confine" in w.text() or "refusing" in w.text(), w.text()
        assert w.alive
        d = cl.cli("doctor", "--skip-canary", "--json", SELFPROG_SABOTAGE="", timeout=120)
        checks = {c["name"]: c for c in json.loads(d.stdout)["checks"]}
        detail = checks["workers"]["detail"]
        assert checks["workers"]["status"] == "fail" and "'sandbox'" in detail, detail
        assert "'coordinator'" not in detail, detail     # the worker lives, minus sandbox
