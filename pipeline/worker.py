"""The Celery app, and the one task that touches a sandbox.

    celery -A pipeline.worker worker -Q coordinator      # the loop (pipeline.loop)
    celery -A pipeline.worker worker -Q trainer          # LM training and generation
    celery -A pipeline.worker worker -Q sandbox          # candidate evaluations

Embedded (no `SELFPROG_BROKER_URL`), the same tasks run eagerly in the calling process:
there is one loop, and the deployment only decides where each task executes.
Messages are JSON only: nothing a worker receives is ever unpickled.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from celery import Celery
from celery.signals import worker_process_init

from pipeline import events
from pipeline.settings import Settings
from sandbox import runner
from sandbox.schema import Job, Result, SchemaError

log = logging.getLogger(__name__)

LONGEST_JOB_S = 6 * 3600     # the broker must not hand a running job to a second worker
QUEUES = ("coordinator", "trainer", "sandbox")

app = Celery("selfprog")
_settings: Settings | None = None
_backend = None
_backend_lock = threading.Lock()


def configure(settings: Settings) -> Celery:
    """Point the app at this installation: eager in-process, or a broker."""
    global _settings, _backend
    _settings, _backend = settings, None
    broker = settings.broker_url or "memory://"
    app.conf.update(
        broker_url=broker,
        result_backend=settings.result_backend or (broker if settings.broker_url else "cache+memory://"),
        task_always_eager=settings.embedded,
        task_eager_propagates=True,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        # Work that must not be lost: acknowledge after the task ran, and give the
        # message back if the worker process dies in the middle of it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": LONGEST_JOB_S},
        result_backend_transport_options={"visibility_timeout": LONGEST_JOB_S},
        result_expires=7 * 24 * 3600,
        task_default_queue="coordinator",
        task_routes={"selfprog.loop.*": {"queue": "coordinator"}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    events.configure(settings.broker_url)
    return app


def settings() -> Settings:
    if _settings is None:
        configure(Settings.from_env())
    return _settings


def backend():
    """The sandbox backend of this process, built once (the probe is not free)."""
    global _backend
    with _backend_lock:
        if _backend is None:
            from sandbox.backends import make_backend
            s = settings()
            kw = {"allow_unconfined": s.allow_unconfined}
            if s.sandbox_backend in ("docker", "auto"):
                kw.update(image=s.sandbox_image, runtime=s.sandbox_runtime or None,
                          gpus=s.sandbox_gpus or None)
            _backend = make_backend(s.sandbox_backend, **kw)
        return _backend


def queue_for(job: Job) -> str:
    return "sandbox" if job.kind == "evaluate" else "trainer"


@app.task(name="selfprog.run_job", acks_late=True, reject_on_worker_lost=True)
def run_job(job: dict, out_dir: str) -> dict:
    """Run one job in a fresh sandbox; return its validated result as plain JSON data.

    The same job may run twice (a worker died after finishing but before acking); that
    is harmless: it writes only into its own out_dir, and the coordinator records a
    candidate's result once.
    """
    try:
        job_obj = Job.from_dict(job)
    except SchemaError as e:   # e.g. a generated source over the size bound
        return Result(job_id=str(job.get("job_id", "unknown"))[:96], kind=job.get("kind", "evaluate"),
                      status="rejected", reason=f"schema: {e}").validate().to_dict()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = runner.run(job_obj, Path(out_dir), backend())
    return Result.from_dict(result.to_dict()).to_dict()   # validated on this side too


@worker_process_init.connect
def _fresh_backend_per_process(**_):
    global _backend
    _backend = None


configure(Settings.from_env())
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import pipeline.loop  # noqa: E402,F401  (registers the coordinator tasks)
