"""Pre-warmed sandboxes: started ahead, each used for exactly one job.

A fresh sandbox pays seconds to import torch and transformers (and on a GPU to
initialise CUDA) before its candidate runs; on a GPU that start-up is most of the cost
of a candidate (bench/bench_prewarm.py measures it). A warm sandbox is confined
exactly like a cold one and runs `harness.warm_main` in a job directory that holds no
job (`staging.stage_skeleton`): it imports, signals that it is
ready and blocks on stdin. The backend stages the one job it will ever run, writes
"go", and from then on supervises it as a cold run; afterwards it is destroyed.

`WarmPool` is the part both backends share: it keeps `size` sandboxes of one *profile*
(what a sandbox must have been started with to run a job: limits, threads, model kind,
device) ready, hands each out once, starts replacements in a background thread,
recycles sandboxes that died or grew old, and throws away the ones a change of
profile made useless. How a sandbox is made is the backend's `spawn(key)`; the object
it returns has

    key, born           the profile it was made for, time.monotonic() at start
    alive() -> bool     still running
    is_ready() -> bool  the imports are done and it waits for "go"
    destroy()           kill it and remove everything it had (idempotent)

The pool holds no reference to the backend (`spawn` must not either): collecting the
backend runs its finalizer, which closes the pool and destroys the idle sandboxes.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Protocol

log = logging.getLogger(__name__)

WARM_MAX_AGE_S = 30 * 60.0       # an idle pre-warmed sandbox older than this is recycled


def imports_of(job) -> tuple[str, str]:
    """(model kind, device): what a warm sandbox for `job` imports and initialises
    before "go" (harness.warm_main); part of every backend's profile."""
    device = str(job.params.get("device", "auto"))
    return ("t5" if job.model_kind == "t5" else "other",
            device if device in ("auto", "cpu", "cuda") else "cpu")


class WarmSandbox(Protocol):
    key: tuple
    born: float

    def alive(self) -> bool: ...
    def is_ready(self) -> bool: ...
    def destroy(self) -> None: ...


class WarmPool:
    """Keeps `size` pre-warmed sandboxes ready for the profile of the latest job."""

    def __init__(self, size: int, spawn: Callable[[tuple], WarmSandbox], *,
                 max_age_s: float = WARM_MAX_AGE_S):
        self.size = size
        self.spawn = spawn
        self.max_age_s = float(max_age_s)
        self.stats = {"spawned": 0, "taken": 0, "recycled": 0, "failed": 0}
        self._cond = threading.Condition()
        self._idle: list[WarmSandbox] = []
        self._doomed: list[WarmSandbox] = []
        self._key: tuple | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._retry_at = 0.0
        self._tick = max(0.5, min(30.0, self.max_age_s / 4))
        self._pid = os.getpid()

    def _after_fork(self) -> None:
        """In a forked child (a Celery prefork worker, say) the sandboxes and the thread
        are the parent's: forget them (never kill them) and start over. Call locked."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._idle, self._doomed, self._thread = [], [], None

    # -------------------------------------------------------------- the job side
    def _retarget(self, key: tuple) -> bool:
        """Locked. Make `key` the profile to keep ready; True if it already was."""
        self._after_fork()
        if self._closed or key == self._key:
            return not self._closed
        self._doomed += self._idle
        self._idle = []
        self._key = key
        self._start_thread()
        self._cond.notify_all()
        return False

    def target(self, key: tuple) -> None:
        """Keep sandboxes of profile `key` ready (hands nothing out)."""
        with self._cond:
            self._retarget(key)

    def take(self, key: tuple) -> WarmSandbox | None:
        """A warm sandbox of profile `key`, never handed out again; or None (the pool
        then targets `key`, and the caller runs its job cold)."""
        with self._cond:
            if not self._retarget(key):
                return None
            now = time.monotonic()
            usable = [w for w in self._idle if now - w.born < self.max_age_s and w.alive()]
            self._doomed += [w for w in self._idle if w not in usable]
            ready = [w for w in usable if w.is_ready()]
            chosen = (ready or usable or [None])[0]       # oldest ready, else oldest
            self._idle = [w for w in usable if w is not chosen]
            if chosen is not None:
                self.stats["taken"] += 1
            self._cond.notify_all()                       # start its replacement
            return chosen

    def idle(self) -> list[WarmSandbox]:
        with self._cond:
            return list(self._idle)

    def wait_ready(self, timeout: float) -> bool:
        """Until `size` sandboxes are idle and ready (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if len(self._idle) >= self.size and all(w.is_ready() for w in self._idle):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        with self._cond:
            self._after_fork()
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(60)
        with self._cond:
            doomed, self._idle, self._doomed = self._idle + self._doomed, [], []
        for w in doomed:
            discard(w)

    # -------------------------------------------------------------- the thread
    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="selfprog-prewarm", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                for w in list(self._idle):
                    if now - w.born >= self.max_age_s or not w.alive():
                        self._idle.remove(w)
                        self._doomed.append(w)
                        self.stats["recycled"] += 1
                doomed, self._doomed = self._doomed, []
                need = self.size - len(self._idle) if now >= self._retry_at else 0
                key = self._key
            for w in doomed:
                discard(w)
            for _ in range(max(0, need)):
                try:
                    w = self.spawn(key)
                except Exception as e:   # keep the thread: back off and try again
                    self.stats["failed"] += 1
                    self._retry_at = time.monotonic() + min(60.0, 2.0 ** self.stats["failed"])
                    log.warning("could not start a pre-warmed sandbox: %s", e)
                    break
                with self._cond:
                    if self._closed or key != self._key:
                        self._doomed.append(w)
                    else:
                        self._idle.append(w)
                        self.stats["spawned"] += 1
                        self.stats["failed"] = 0
            with self._cond:
                if self._closed:
                    return      # close() joins this thread, then destroys what is left
                if not self._doomed and (len(self._idle) >= self.size
                                         or time.monotonic() < self._retry_at):
                    self._cond.wait(self._tick)


def discard(w: WarmSandbox) -> None:
    """Destroy a warm sandbox; an error is logged, never raised (cleanup paths)."""
    try:
        w.destroy()
    except Exception as e:
        log.error("could not remove pre-warmed sandbox %r: %s", w, e)
