"""Sandbox backends: the ways a job directory gets run.

`make_backend(name, **kw)` is the one place a backend is chosen by name (settings and
CLI pass the name through). Every backend has `execute(job, out_dir) -> Result` and
uses `sandbox.backends.base` for staging and collecting, so they differ only in how the
harness process is started and confined.
"""
from __future__ import annotations

from typing import Any

BACKENDS = ("process",)   # the Docker engineer adds "docker" and "auto" here


def make_backend(name: str, **kw: Any):
    """Build the backend called `name`; keyword arguments go to its constructor."""
    if name == "process":
        from sandbox.backends.process import ProcessBackend
        return ProcessBackend(**kw)
    # "docker": DockerBackend(**kw); "auto": docker when an engine and the sandbox image
    # are there, else process. Both belong here, next to "process".
    raise ValueError(f"unknown sandbox backend {name!r}; known: {', '.join(BACKENDS)}")
