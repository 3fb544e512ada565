"""The client side of a run: launch, resume, cancel, and follow it.

These run in the process of whoever asks (the CLI, a test, a notebook): they write the
run's status in the lineage DB and hand the work to the coordinator stages
(pipeline/stages.py), in-process when embedded or through the broker. A distributed
run's live events come back over Redis pub/sub (`events.Follower`); the lineage DB decides
when a run has ended.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable

from pipeline import celery_app, events
from pipeline.events import Follower
from pipeline.cancellation import announce_cancel, clear_cancel
from pipeline.settings import RunConfig, Settings
from pipeline.stages import recover, start
from pipeline.store import (RUN_ACTIVE_STATUSES, RUN_TERMINAL_STATUSES, LineageStore, StoreError,
                            store_for)

log = logging.getLogger(__name__)


def _store(settings: Settings) -> LineageStore:
    """The lineage store of these settings, created or upgraded if it must be (a run
    is about to be written into it)."""
    return store_for(settings.database_url)


def launch(settings: Settings, config: RunConfig,
           progress: Callable[[str, dict], None] | None = None, *, detach: bool = False) -> str:
    """Create a run and execute it: in-process when embedded, else on the workers."""
    config.validate()      # a config built without `preset` is bounded too, before any run
    celery_app.configure(settings)
    store = _store(settings)
    run_id = store.create_run(config=config.to_dict(), task=config.task,
                              preset=config.preset, seed=config.seed)
    _execute(settings, run_id, progress, detach,
             lambda: start.apply_async(kwargs=dict(run_id=run_id)))
    return run_id


class RunStateError(StoreError):
    """The run is in a state that does not allow this (e.g. cancelling a finished run)."""


def find_completed(store: LineageStore, config: RunConfig) -> str | None:
    """A completed run with exactly this configuration, if the database has one (the
    benches read such a run back instead of launching it again)."""
    for run in store.list_runs(limit=1000):
        # from_dict: a setting newer than the stored run takes its default
        if run.status == "completed" and RunConfig.from_dict(run.config) == config:
            return run.id
    return None


def read_back_or_launch(settings: Settings, config: RunConfig,
                        urls: list[str]) -> tuple[LineageStore, str, float | None]:
    """A completed run of `config` from the first lineage DB of `urls` that has one, else
    a run launched into `settings`' database, which must complete: (its store, its id,
    the seconds the launch took, None when read back). For the benches."""
    for url in urls:
        store = store_for(url)
        run_id = find_completed(store, config)
        if run_id is not None:
            return store, run_id, None
    store = _store(settings)
    started = time.monotonic()
    run_id = launch(settings, config)
    run = store.get_run(run_id)
    if run.status != "completed":
        raise RunStateError(f"run {run_id} did not complete: {run.error}")
    return store, run_id, time.monotonic() - started


def resume(settings: Settings, run_id: str,
           progress: Callable[[str, dict], None] | None = None, *, detach: bool = False,
           anyway: bool = False) -> str:
    """Carry on a run from what the lineage DB says, after a crash or a stage failure.

    Every unfinished iteration is restarted at its recorded stage; candidates that
    already reached a final state are not run again. The work is done by the `recover`
    stage on the coordinator (which holds the run's artifacts); here the run is only
    marked running again. Safe to call on a run that is still moving: whatever it
    dispatches twice is absorbed by the compare-and-set stage changes.

    A cancelled run is refused (RunStateError) unless `anyway`: then the cancel is
    taken back (the DB status, the candidates it cancelled, the Redis flag that stops
    running jobs) and the run carries on like any other.
    """
    celery_app.configure(settings)
    store = _store(settings)
    run = store.get_run(run_id)
    run_id = run.id
    check_resumable(run.id, run.status, anyway=anyway)
    if run.status == "completed":
        return run_id
    if run.status == "cancelled":
        clear_cancel(settings, run_id)
        reopened = store.reopen_cancelled(run_id)
        log.info("run %s: cancel taken back, %d candidate(s) pending again", run_id, reopened)
    store.set_run_status(run_id, "running")
    events.emit(run_id, "resumed")
    _execute(settings, run_id, progress, detach,
             lambda: recover.apply_async(kwargs=dict(run_id=run_id)))
    return run_id


def check_resumable(run_id: str, status: str, *, anyway: bool = False) -> None:
    """Raise RunStateError when a run in `status` may not be resumed: a cancel is final
    unless the user says to resume it anyway."""
    if status == "cancelled" and not anyway:
        raise RunStateError(f"run {run_id} was cancelled; a cancel is final. To carry it on "
                            f"anyway: selfprog-cli resume --anyway {run_id}")


def cancel(settings: Settings, run_id: str) -> int:
    """Stop a run: no new stage starts, unfinished candidates end as cancelled, and jobs
    already in a sandbox are stopped within seconds (pipeline/cancellation.py; their results
    are not recorded). Returns how many candidates were cancelled.
    """
    store = _store(settings)
    run = store.get_run(run_id)
    if run.status in RUN_TERMINAL_STATUSES:
        raise RunStateError(f"run {run.id} is already {run.status}; nothing to cancel")
    celery_app.configure(settings)
    store.set_run_status(run.id, "cancelled")
    announce_cancel(settings, run.id)
    n = store.cancel_pending(run.id)
    events.emit(run.id, "done", status="cancelled")
    return n


def _execute(settings: Settings, run_id: str, progress, detach: bool, kick: Callable[[], None]) -> None:
    if settings.embedded:
        events.subscribe(run_id, progress)
        try:
            # Eager Celery runs each next stage inside the previous one: a deep stack.
            sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))
            kick()
        except Exception as e:
            # The failing stage has marked the run failed with its reason (or, failing
            # outside a stage, we do it here): the caller reads the outcome from the DB.
            store = _store(settings)
            if store.get_run(run_id).status in RUN_ACTIVE_STATUSES:
                store.set_run_status(run_id, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            log.warning("run %s failed: %s", run_id, e)
        finally:
            events.unsubscribe(run_id)
        return
    if detach:
        kick()
        return
    follower = Follower(settings.broker_url, run_id)   # subscribed before the first event
    try:
        kick()
        attach(settings, run_id, progress, follower=follower)
    finally:
        follower.close()


def attach(settings: Settings, run_id: str, progress=None, poll_s: float = 1.0, *,
           follower: Follower | None = None) -> str:
    """Follow a run on the workers until it ends; forward its live events. Returns the
    run's final status. The lineage DB decides when the run has ended."""
    store = _store(settings)
    run_id = store.get_run(run_id).id
    own = follower is None
    follower = follower or Follower(settings.broker_url, run_id)

    def forward(data: dict) -> None:
        if progress:
            event = data.pop("event")
            try:
                progress(event, data)
            except Exception:
                log.exception("progress callback failed")

    try:
        while True:
            data = follower.get(poll_s)
            if data:
                forward(data)
                continue   # drain a burst before asking the DB again
            status = store.get_run(run_id).status
            if status in RUN_TERMINAL_STATUSES:
                # the last events (the final iteration, "done") may trail the DB write
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    data = follower.get(0.2)
                    if data:
                        forward(data)
                return status
    finally:
        if own:
            follower.close()
