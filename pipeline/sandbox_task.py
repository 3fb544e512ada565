"""The worker side of a sandbox job: `run_job`, the one task that touches a sandbox.

Who needs what: trainer and sandbox workers only run `run_job`, which needs the broker,
the artifact directory (inputs in, weights out) and a sandbox backend, never the
database. A sandbox result goes back over the Redis result backend and the coordinator
(pipeline/stages.py) records it. Tasks are written so that a second run of the same
message is harmless (pipeline/stages.py: one row per candidate, compare-and-set stage
changes).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from celery import bootsteps
from celery.signals import worker_process_init, worker_ready

from pipeline import celery_app, events
from pipeline.cancellation import cancel_check
from pipeline.celery_app import QUEUES, app
from pipeline.declarations import templates_for
from pipeline.families import FAMILIES
from pipeline.settings import Settings, backend_kwargs
from pipeline.text import is_redis_url
from sandbox import runner
from sandbox.backends.watch import Watch
from sandbox.schema import Job, Result, SchemaError

log = logging.getLogger(__name__)

LONGEST_JOB_S = 6 * 3600     # the broker must not hand a running job to a second worker
JOB_RETRIES = 3              # infrastructure errors (not the candidate's) are retried
PROGRESS_RELAY_S = 2.0       # live LM losses: at most one event per job this often

_backend = None
_backend_lock = threading.Lock()
# Per model kind, the declarations this process can derive without a declare sandbox
# (pipeline/declarations.py); built on first use, after every family has registered.
_templates: dict | None = None


def _forget_backend(_settings: Settings | None = None) -> None:
    # the learnt declarations go too: they came from that backend's sandboxes
    global _backend, _templates
    _backend = None
    _templates = None


celery_app._on_configure.append(_forget_backend)


def backend():
    """The sandbox backend of this process, built once (the probe is not free)."""
    global _backend
    with _backend_lock:
        if _backend is None:
            from sandbox.backends import make_backend
            s = celery_app.settings()
            b = make_backend(s.sandbox_backend, **backend_kwargs(s))
            require_confinement(b, s)   # the confinement canary, see below
            _backend = b
        return _backend


def templates(model_kind: str):
    global _templates
    with _backend_lock:
        if _templates is None:
            _templates = templates_for(FAMILIES)
        return _templates.get(model_kind)


# --------------------------------------------------------------------------------------
# Confinement canary (sandbox/canary.py; SECURITY.md). Before this process runs any
# sandbox job it runs sandbox.canary.check_confinement on its backend, once per (backend,
# settings); if the sandbox does not confine (network reachable, a 0600 host file readable, the memory
# limit not enforced) every job is refused with the canary's reason, unless
# Settings.allow_unconfined (SELFPROG_ALLOW_UNCONFINED=1, development only) is set.
# A worker that consumes the trainer/sandbox queues runs it at start (worker_ready) and
# stops consuming those queues when it fails, so the jobs wait for a confined worker.
_canary_reports: dict[tuple, object] = {}
_canary_lock = threading.Lock()


class UnconfinedSandbox(RuntimeError):
    """The start-up canary found that this sandbox does not confine."""


def confinement_report(b, s: Settings):
    """The canary's report for backend `b` (run once per backend kind and settings)."""
    from sandbox.canary import check_confinement
    key = (getattr(b, "name", type(b).__name__), s.sandbox_backend, s.sandbox_image,
           s.sandbox_runtime, os.environ.get("SELFPROG_SABOTAGE", ""))
    with _canary_lock:
        if key not in _canary_reports:
            _canary_reports[key] = check_confinement(b)
        return _canary_reports[key]


def require_confinement(b, s: Settings) -> None:
    report = confinement_report(b, s)
    if report.ok:
        return
    if s.allow_unconfined:
        log.warning("running sandbox jobs UNCONFINED (allow_unconfined is set): %s",
                    report.summary())
        return
    log.error("refusing sandbox jobs: %s (fix the sandbox, see `selfprog-cli doctor`, or set "
              "SELFPROG_ALLOW_UNCONFINED=1 for development only)", report.summary())
    raise UnconfinedSandbox(report.summary() + "; refusing to run candidates "
                            "(SELFPROG_ALLOW_UNCONFINED=1 overrides, development only)")


@worker_ready.connect
def _canary_at_worker_start(sender=None, **_):
    """Check the sandbox before this worker takes trainer/sandbox jobs."""
    try:
        queues = set(sender.app.amqp.queues.consume_from or ()) or set(QUEUES)   # no -Q: all
    except AttributeError:
        return
    ours = [q for q in ("trainer", "sandbox") if q in queues]
    if not ours:
        return
    try:
        backend()
    except Exception as e:   # unconfined, or no backend at all: take no sandbox jobs
        log.error("this worker will not take %s jobs: %s", "/".join(ours), e)
        for q in ours:
            sender.cancel_task_queue(q)
# --------------------------------------------------------------------------------------


def queue_for(job: Job) -> str:
    return "sandbox" if job.kind == "evaluate" else "trainer"


@app.task(name="selfprog.run_job", bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=JOB_RETRIES)
def run_job(self, job: dict, out_dir: str, run: dict | None = None) -> dict:
    """Run one job in a fresh sandbox; return its validated result as plain JSON data.

    The same job may run twice (a worker died after finishing but before acking); that
    is harmless: it writes only into its own out_dir, and the coordinator records a
    candidate's result once. No database access here: trainer and sandbox workers need
    the broker and the artifact directory only.

    An error of the infrastructure (the engine unreachable, an input file missing) is
    not the candidate's fault: it is retried, and only then does the job end as
    `crashed` with the reason, so the run records it and goes on.

    `run` ({"run_id", "iteration", "arm"}) names the run the job is for: an LM training
    job relays its losses live as `lm_step` events, and any job is stopped when the
    run is cancelled while it runs (`watch_for`).
    """
    try:
        job_obj = Job.from_dict(job)
    except SchemaError as e:   # e.g. a generated source over the size bound
        return Result(job_id=str(job.get("job_id", "unknown"))[:96], kind=job.get("kind", "evaluate"),
                      status="rejected", reason=f"schema: {e}").validate().to_dict()
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        result = runner.run(job_obj, Path(out_dir), backend(), watch=watch_for(job_obj, run),
                            templates=templates(job_obj.model_kind))
    except Exception as e:
        if not isinstance(e, SchemaError) and not app.conf.task_always_eager \
                and self.request.retries < JOB_RETRIES:
            log.warning("job %s: %s: %s; retrying", job_obj.job_id, type(e).__name__, e)
            raise self.retry(exc=e, countdown=2 ** self.request.retries)
        log.exception("job %s could not run", job_obj.job_id)
        result = Result.failure(job_obj, "crashed",
                                f"the sandbox could not run the job: {type(e).__name__}: {e}")
    return Result.from_dict(result.to_dict()).to_dict()   # validated on this side too


def watch_for(job: Job, run: dict | None) -> Watch | None:
    """What the sandbox backend watches while `job` of `run` runs (None: nothing)."""
    if not run or not run.get("run_id"):
        return None
    run_id = str(run["run_id"])
    return Watch(on_progress=relay_progress(run) if job.kind == "train_lm" else None,
                 cancelled=cancel_check(run_id))


def relay_progress(run: dict | None):
    """An `on_progress(step, loss)` that publishes `lm_step` events for the run named in
    `run`, at most one every PROGRESS_RELAY_S seconds (None without `run`)."""
    if not run or not run.get("run_id"):
        return None
    last = [float("-inf")]

    def relay(step: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_RELAY_S:
            last[0] = now
            events.emit(str(run["run_id"]), "lm_step", iteration=run.get("iteration"),
                        arm=run.get("arm"), step=step, loss=loss)
    return relay


@worker_process_init.connect
def _fresh_backend_per_process(**_):
    _forget_backend()


class LeaseRenewal(bootsteps.StartStopStep):
    """Keep the Redis visibility timeout from expiring under a live worker.

    Kombu's Redis transport emulates acknowledgements: a delivered message waits in the
    `unacked` hash, indexed by delivery time in `unacked_index`, and any worker puts it
    back on its queue once it is older than the visibility timeout. This step, in the
    worker's main process, re-stamps every message this worker holds (running or
    prefetched) every quarter of the timeout. While the worker lives its jobs are never
    handed out twice, however long they run; when it dies (SIGKILL, power loss) the
    stamps stop and its jobs come back after one visibility timeout.
    """
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, c, **kw):
        super().__init__(c, **kw)
        self.timer_ref = None

    def start(self, c):
        opts = c.app.conf.broker_transport_options or {}
        vt = float(opts.get("visibility_timeout") or 3600)
        if not is_redis_url(str(c.app.conf.broker_url or "")):
            return
        self.timer_ref = c.timer.call_repeatedly(max(0.5, min(60.0, vt / 4)), renew_leases, (c,),
                                                 priority=10)

    def stop(self, c):
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None


def renew_leases(consumer) -> int:
    """Re-stamp the unacknowledged messages this consumer holds; returns how many."""
    try:
        channel = consumer.task_consumer.channel
        qos = channel.qos
        tags = list(qos._delivered)
        if not tags or not hasattr(qos, "unacked_index_key"):
            return 0
        now = time.time()
        with channel.conn_or_acquire() as client:
            # XX: only messages still unacknowledged (an ack removes the entry; never
            # bring one back).
            client.zadd(qos.unacked_index_key, {t: now for t in tags}, xx=True)
        return len(tags)
    except Exception as e:   # the broker is away: the restore sweep waits for us too
        log.warning("could not renew message leases: %s", e)
        return 0


app.steps["consumer"].add(LeaseRenewal)
