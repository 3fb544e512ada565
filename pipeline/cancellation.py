"""Cancelling a run stops its jobs that are already in a sandbox.

Workers have no database (by design), so `cancel` (pipeline/runs.py) also sets a flag on
Redis that a running job's watch reads; embedded, where the worker is the coordinator's
own process, the watch reads the lineage DB.
"""
from __future__ import annotations

import logging
import time

from pipeline import celery_app
from pipeline.settings import Settings
from pipeline.text import is_redis_url

log = logging.getLogger(__name__)

CANCEL_TTL_S = 7 * 24 * 3600
CANCEL_CHECK_S = 2.0


def cancel_key(run_id: str) -> str:
    return f"selfprog:cancelled:{run_id}"


def announce_cancel(s: Settings, run_id: str) -> None:
    """Tell running jobs of `run_id` to stop (distributed: a Redis flag; best effort,
    the DB status is what stops new work)."""
    if is_redis_url(s.broker_url):
        import redis
        try:
            redis.Redis.from_url(s.broker_url, socket_timeout=5).set(
                cancel_key(run_id), "1", ex=CANCEL_TTL_S)
        except Exception as e:
            log.warning("could not tell running jobs of run %s to stop: %s", run_id, e)


def clear_cancel(s: Settings, run_id: str) -> None:
    """Take back `announce_cancel` (for a cancelled run resumed anyway). Unlike the
    announcement this must not fail silently: a flag left behind would stop the resumed
    run's jobs again."""
    if is_redis_url(s.broker_url):
        import redis
        redis.Redis.from_url(s.broker_url, socket_timeout=5).delete(cancel_key(run_id))


def cancel_check(run_id: str):
    """A `cancelled()` for jobs of `run_id`: True once the run was cancelled; asks Redis
    (or, embedded, the lineage DB) at most every CANCEL_CHECK_S seconds."""
    s = celery_app.settings()
    if is_redis_url(s.broker_url):
        import redis
        client = redis.Redis.from_url(s.broker_url, socket_timeout=2)

        def ask() -> bool:
            return bool(client.exists(cancel_key(run_id)))
    elif s.embedded:
        def ask() -> bool:
            from pipeline.store import store_for
            return store_for(s.database_url).get_run(run_id).status == "cancelled"
    else:
        return None
    state = {"at": float("-inf"), "stop": False}

    def cancelled() -> bool:
        now = time.monotonic()
        if not state["stop"] and now - state["at"] >= CANCEL_CHECK_S:
            state["at"] = now
            state["stop"] = ask()
        return state["stop"]
    return cancelled
