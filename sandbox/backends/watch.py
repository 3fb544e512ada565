"""Watching a running sandbox job: relay its training losses, stop it when cancelled.

    result = backend.execute(job, out_dir, watch=Watch(on_progress=..., cancelled=...))

The backends' wait loops (sandbox/backends/base.py) poll a `Watching` every half second.
"""
from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sandbox.protocol import OUT_DIR, PROGRESS_FILE
from sandbox.schema import SchemaError, strict_json

log = logging.getLogger(__name__)

MAX_PROGRESS_READ = 64 * 1024                            # progress bytes read per poll
MAX_PROGRESS_LINE = 200
STOPPED_REASON = "stopped: its run was cancelled while it ran"


@dataclass
class Watch:
    """What the caller of `execute` wants while a job runs; both parts optional.

    `on_progress(step, loss)` hears the training losses (display only, ProgressTail);
    `cancelled()` returning True stops the job: the backend kills it like a deadline
    and returns `crashed` with STOPPED_REASON. Backends poll both every half second.
    """
    on_progress: Callable[[int, float], None] | None = None
    cancelled: Callable[[], bool] | None = None


class Stopped(Exception):
    """Raised by Watching.poll once the caller has cancelled the job."""


class Watching:
    """One running job seen through a Watch (the backends' wait loops call `poll`)."""

    def __init__(self, jobdir: Path, watch: Watch | None):
        self.watch = watch or Watch()
        self.progress = ProgressTail(jobdir, self.watch.on_progress)

    @property
    def active(self) -> bool:
        return self.watch.on_progress is not None or self.watch.cancelled is not None

    def poll(self, final: bool = False) -> None:
        """Relay new progress; raise Stopped if cancelled (not on the `final` poll,
        after the job has ended by itself)."""
        self.progress.poll()
        if final or self.watch.cancelled is None:
            return
        try:
            stop = self.watch.cancelled()
        except Exception as e:     # cannot tell: keep running, the deadline still holds
            log.warning("could not check whether the job was cancelled: %s", e)
            return
        if stop:
            raise Stopped()


class ProgressTail:
    """Relays a running job's training losses: the new lines of out/progress.jsonl
    (sandbox/training.py `fit` writes {"step": n, "loss": x}) become `on_progress(step, loss)` calls.

    The file is the sandbox's, so it is read like everything else from there: opened
    without following links, regular files only, at most MAX_PROGRESS_READ new bytes a
    poll, lines over MAX_PROGRESS_LINE dropped, exactly {step: int >= 0, loss: finite
    float} accepted. Only the newest good line of a poll is passed on. What it relays is
    for display (`lm_step` events); results still come only from `collect`.
    """

    def __init__(self, jobdir: Path, on_progress=None):
        self.path = Path(jobdir) / OUT_DIR / PROGRESS_FILE
        self.on_progress = on_progress
        self.pos = 0
        self.partial = b""

    def poll(self) -> None:
        if self.on_progress is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return
            if st.st_size < self.pos:          # rewritten from the start
                self.pos, self.partial = 0, b""
            f.seek(self.pos)
            data = f.read(MAX_PROGRESS_READ)
        self.pos += len(data)
        *lines, rest = (self.partial + data).split(b"\n")
        self.partial = rest if len(rest) <= MAX_PROGRESS_LINE else b""
        for line in reversed(lines):
            point = _progress_point(line)
            if point is not None:
                try:
                    self.on_progress(*point)
                except Exception as e:   # a broken relay must not end the job
                    log.warning("progress relay failed: %s", e)
                return


def _progress_point(line: bytes) -> tuple[int, float] | None:
    if not line or len(line) > MAX_PROGRESS_LINE:
        return None
    try:
        d = strict_json(line)
    except SchemaError:
        return None
    if not isinstance(d, dict) or set(d) != {"step", "loss"}:
        return None
    step, loss = d["step"], d["loss"]
    if type(step) is not int or not 0 <= step < 1 << 40 or type(loss) not in (int, float):
        return None
    loss = float(loss)
    return (step, loss) if math.isfinite(loss) else None
