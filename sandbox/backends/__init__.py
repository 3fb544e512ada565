"""Sandbox backends: the ways a job directory gets run.

`make_backend(name, **kw)` is the one place a backend is chosen by name (settings and
CLI pass the name through). Every backend has `execute(job, out_dir) -> Result` and
uses `sandbox.backends.base` for staging and collecting, so they differ only in how the
harness process is started and confined.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

BACKENDS = ("process", "docker", "auto")


def make_backend(name: str, **kw: Any):
    """Build the backend called `name`; keyword arguments go to its constructor."""
    if name == "process":
        from sandbox.backends.process import ProcessBackend
        return ProcessBackend(**kw)
    if name in ("docker", "auto"):
        from sandbox.backends.docker import DEFAULT_IMAGE, DockerBackend, docker_available
        if name == "docker":
            return DockerBackend(**_accepted(DockerBackend, kw))
        ok, why = docker_available(kw.get("image") or DEFAULT_IMAGE)
        if ok:
            return DockerBackend(**_accepted(DockerBackend, kw))
        from sandbox.backends.process import ProcessBackend
        logging.getLogger(__name__).warning(
            "sandbox backend 'auto': %s; using the local process backend, whose isolation "
            "is WEAKER (no container: host files stay visible, no cgroup memory limit)", why)
        return ProcessBackend(**_accepted(ProcessBackend, kw))
    raise ValueError(f"unknown sandbox backend {name!r}; known: {', '.join(BACKENDS)}")


def _accepted(cls, kw: dict[str, Any]) -> dict[str, Any]:
    # 'auto' gets the settings for either backend (image, gpus, allow_unconfined...);
    # each constructor takes the ones it knows.
    params = inspect.signature(cls).parameters
    if kw.get("prewarm") and "prewarm" not in params:
        logging.getLogger(__name__).warning(
            "sandbox prewarm=%s is ignored: the %s backend starts every sandbox cold",
            kw["prewarm"], getattr(cls, "name", cls.__name__))
    return {k: v for k, v in kw.items() if k in params}
