"""The Celery app of this installation, and its configuration. It knows no tasks.

The task modules register themselves on `app` when imported: pipeline/sandbox_task.py
(`run_job`, the one task that touches a sandbox) and pipeline/stages.py (the loop's
coordinator stages). pipeline/worker.py, the worker entry point, imports all of them:

    celery -A pipeline.worker worker -Q coordinator      # the loop (pipeline/stages.py)
    celery -A pipeline.worker worker -Q trainer          # LM training and generation
    celery -A pipeline.worker worker -Q sandbox          # candidate evaluations

Embedded (no `SELFPROG_BROKER_URL`), the same tasks run eagerly in the calling process:
there is one loop, and the deployment only decides where each task executes.
Messages are JSON only: nothing a worker receives is ever unpickled.

Messages that must not be lost are acknowledged late. On Redis an unacknowledged
message comes back after `visibility_timeout_s`; a live worker renews the lease of
every message it holds (pipeline/sandbox_task.py, `LeaseRenewal`), so a long job is
never handed to a second worker while its first one is alive, and a dead worker's job
comes back after the visibility timeout.
"""
from __future__ import annotations

import os

from celery import Celery

from pipeline import events
from pipeline.settings import Settings

QUEUES = ("coordinator", "trainer", "sandbox")

app = Celery("selfprog")
_settings: Settings | None = None
# Called with the new settings whenever `configure` switches installations (the sandbox
# task module drops the backend it built for the previous settings).
_on_configure: list = []


def configure(settings: Settings) -> Celery:
    """Point the app at this installation: eager in-process, or a broker."""
    global _settings
    previous = _settings
    _settings = settings
    for hook in _on_configure:
        hook(settings)
    broker = settings.broker_url or "memory://"
    if previous is not None and (previous.broker_url, previous.result_backend) != \
            (settings.broker_url, settings.result_backend):
        _drop_connections()
    vt = float(settings.visibility_timeout_s)
    transport = {
        "visibility_timeout": vt,
        # How often a worker looks for expired unacknowledged messages (kombu's default
        # is a sweep every 100 s; it should be a fraction of the visibility timeout).
        "unacked_restore_interval": max(1.0, min(10.0, vt / 10)),
        "unacked_restore_throttle": 1,
    }
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
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": vt},
        result_expires=7 * 24 * 3600,
        task_default_queue="coordinator",
        task_routes={"selfprog.loop.*": {"queue": "coordinator"},
                     "selfprog.run_job": {"queue": "sandbox"}},
        # Survive a Redis restart: keep reconnecting, and retry storing a result (a
        # lost result of a chord member would leave its chord waiting forever).
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend_always_retry=True,
        result_backend_max_retries=60,
        redis_backend_health_check_interval=10,
        worker_hijack_root_logger=False,
    )
    events.configure(settings.broker_url)
    return app


def _drop_connections() -> None:
    """Forget the broker connections and result backend the app made for the previous
    configuration (Celery caches them at first use), so the next message goes where the
    new settings say. Only a process that switches installations needs this (tests,
    benchmarks, a CLI launching to another broker)."""
    # Only the references: the pools themselves are kombu's, shared per broker URL, and
    # stay usable for a later switch back.
    app._after_fork()
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


def queue_consumers(timeout: float = 3.0) -> dict[str, list[str]]:
    """{queue: [names of the live workers consuming it]} for each of QUEUES, asked over
    the broker (Celery's remote control: every live worker answers within `timeout`
    seconds, busy or not). Raises when the broker cannot be reached."""
    found: dict[str, list[str]] = {q: [] for q in QUEUES}
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    for worker, queues in replies.items():
        for q in queues or ():
            name = q.get("name") if isinstance(q, dict) else None
            if name in found:
                found[name].append(worker)
    return found


def worker_command(queue: str) -> str:
    return f"celery -A pipeline.worker worker -Q {queue}"


def settings() -> Settings:
    """The settings `configure` was last given (from the environment until then)."""
    if _settings is None:
        configure(Settings.from_env())
    return _settings


configure(Settings.from_env())
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
