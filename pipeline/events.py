"""Live events of a run: stage changes, candidates finishing, iterations closing.

Embedded, an event goes straight to the callbacks registered in this process (the CLI's
progress lines). Distributed, it is also published on Redis (channel `selfprog:run:<id>`)
for `selfprog-cli watch`. Events are for people watching; the lineage DB stays the
record of truth, so losing one never loses data.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any, Callable

from pipeline.text import is_redis_url

log = logging.getLogger(__name__)
Callback = Callable[[str, dict], None]

_local: dict[str, list[Callback]] = defaultdict(list)
_redis_url: str = ""


def channel(run_id: str) -> str:
    return f"selfprog:run:{run_id}"


def configure(redis_url: str) -> None:
    global _redis_url
    _redis_url = redis_url if is_redis_url(redis_url) else ""


def subscribe(run_id: str, callback: Callback | None) -> None:
    if callback is not None:
        _local[run_id].append(callback)


def unsubscribe(run_id: str) -> None:
    _local.pop(run_id, None)


def emit(run_id: str, event: str, **info: Any) -> None:
    for cb in list(_local.get(run_id, ())):
        try:
            cb(event, info)
        except Exception:  # a broken progress printer must not stop a run
            log.exception("progress callback failed")
    if _redis_url:
        try:
            import redis
            redis.Redis.from_url(_redis_url, socket_timeout=2).publish(
                channel(run_id), json.dumps({"event": event, **info}, default=str))
        except Exception as e:  # watching is best effort
            log.warning("could not publish event %s: %s", event, e)
