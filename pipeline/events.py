"""Live events of a run: stage changes, candidates finishing, iterations closing.

Embedded, an event goes straight to the callbacks registered in this process (the CLI's
progress lines). Distributed, it is also published on Redis (channel `selfprog:run:<id>`)
for `selfprog-cli watch` and the web view's live pages (`Follower` reads them back).
Events are for people watching; the lineage DB stays the
record of truth, so losing one never loses data.
"""
from __future__ import annotations

import json
import logging
import time
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


class Follower:
    """The live events of one run from Redis pub/sub, reconnecting after a Redis restart
    (events published while it is away are lost; the DB is the record)."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url, self.channel = url, channel(run_id)
        self.pubsub = None
        self._connect()

    def _connect(self) -> None:
        import redis
        try:
            self.pubsub = redis.Redis.from_url(self.url, socket_timeout=10).pubsub(
                ignore_subscribe_messages=True)
            self.pubsub.subscribe(self.channel)
        except redis.RedisError as e:
            log.warning("cannot follow live events (%s); retrying", e)
            self.close()

    def get(self, timeout: float) -> dict | None:
        import redis
        if self.pubsub is None:
            time.sleep(timeout)
            self._connect()
            return None
        try:
            msg = self.pubsub.get_message(timeout=timeout)
        except (redis.RedisError, OSError) as e:
            log.warning("lost the live events (%s); reconnecting", e)
            self.close()
            return None
        if not msg:
            return None
        try:
            data = json.loads(msg["data"])
        except (TypeError, ValueError):
            return None
        return data if isinstance(data, dict) and "event" in data else None

    def close(self) -> None:
        if self.pubsub is not None:
            try:
                self.pubsub.close()
            except Exception:
                pass
            self.pubsub = None
