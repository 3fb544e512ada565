"""Sandbox backends: the ways a job directory gets run.

    backend = make_backend(name, **backend_options(name, image=..., runtime=..., gpus=...,
                                                   prewarm=..., allow_unconfined=...))
    result = backend.execute(job, out_dir)

`make_backend` is the one place a backend is chosen by name; `backend_options` the one
place settings become its constructor's arguments (the worker and `doctor` both call
it with their settings' plain values: this package never imports pipeline/). Every
backend follows the template of sandbox/backends/base.py (staging.py, collect.py,
watch.py, warm.py), so they differ only in how the harness process is started and
confined (process.py with bwrap.py, docker.py with docker_profile.py).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

BACKENDS = ("auto", "docker", "process", "process-unconfined")


class SandboxError(RuntimeError):
    """The trusted side cannot run a job (bad input file, sandbox not usable)."""


def backend_options(name: str, *, image: str | None = None, runtime: str | None = None,
                    gpus: str | None = None, prewarm: int = 0,
                    allow_unconfined: bool = False,
                    python_prefix: str | None = None) -> dict[str, Any]:
    """The constructor arguments of backend `name` from plain settings values (empty
    strings mean "not set"); `auto` gets those of every backend it may pick."""
    kw: dict[str, Any] = {"prewarm": int(prewarm or 0)}
    if name in ("process", "process-unconfined", "auto"):
        kw["allow_unconfined"] = bool(allow_unconfined)
        if python_prefix:
            kw["runtime_prefix"] = python_prefix
    if name in ("docker", "auto"):
        kw.update(image=image or None, runtime=runtime or None, gpus=gpus or None)
        if kw["image"] is None:
            del kw["image"]
    return kw


def make_backend(name: str, **kw: Any):
    """Build the backend called `name`; keyword arguments go to its constructor.

    `auto` picks Docker where the engine and image are there, else the bubblewrap
    `process` backend where bubblewrap is installed, else refuses: it never falls back
    to `process-unconfined`, which only its name gets."""
    if name == "process":
        from sandbox.backends.process import ProcessBackend
        return ProcessBackend(**kw)
    if name == "process-unconfined":
        from sandbox.backends.process import UnconfinedProcessBackend
        return UnconfinedProcessBackend(**kw)
    if name in ("docker", "auto"):
        from sandbox.backends.docker import DEFAULT_IMAGE, DockerBackend, docker_available
        if name == "docker":
            return DockerBackend(**_accepted(DockerBackend, kw))
        ok, why = docker_available(kw.get("image") or DEFAULT_IMAGE)
        if ok:
            return DockerBackend(**_accepted(DockerBackend, kw))
        from sandbox.backends.bwrap import BwrapMissing, find_bwrap
        from sandbox.backends.process import ProcessBackend
        try:
            find_bwrap(kw.get("bwrap"))
        except BwrapMissing:
            raise SandboxError(
                f"sandbox backend 'auto' has nothing that confines here: Docker cannot run "
                f"({why}) and bubblewrap (bwrap) is not installed. Install the Docker engine "
                "(bash scripts/docker-engine.sh) or bubblewrap (apt-get install bubblewrap), "
                "or pass --backend process-unconfined explicitly (WEAKER isolation: "
                "SECURITY.md)") from None
        logging.getLogger(__name__).warning(
            "sandbox backend 'auto': %s; using the bubblewrap process backend, whose "
            "isolation is WEAKER than a container's (no cgroup memory limit, no seccomp)", why)
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
