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

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any



from sandbox.backends.errors import SandboxError  # noqa: F401  (re-exported)


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


@dataclass(frozen=True)
class Registered:
    """One backend: its class (imported only when used), whether it can run here
    (`probe`, what `auto` asks) and what `selfprog-cli doctor` says of its confinement
    (the class's `confinement_report`, on a built and probed backend)."""
    name: str
    module: str
    cls: str

    def load(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)

    def probe(self, **kw: Any) -> tuple[bool, str]:
        """(can run here, why not): the class's `available`, no sandbox started."""
        return self.load().available(**kw)


# name -> backend; `auto` tries AUTO_ORDER and never picks process-unconfined.
REGISTRY = {r.name: r for r in (
    Registered("docker", "sandbox.backends.docker", "DockerBackend"),
    Registered("process", "sandbox.backends.process", "ProcessBackend"),
    Registered("process-unconfined", "sandbox.backends.process", "UnconfinedProcessBackend"),
)}
AUTO_ORDER = ("docker", "process")
BACKENDS = ("auto", *REGISTRY)


def make_backend(name: str, **kw: Any):
    """Build the backend called `name`; keyword arguments go to its constructor.

    `auto` picks the first of AUTO_ORDER whose probe says it can run here (Docker where
    the engine and image are there, else bubblewrap), else refuses: it never falls back
    to `process-unconfined`, which only its name gets."""
    if name in REGISTRY:
        cls = REGISTRY[name].load()
        return cls(**(kw if name.startswith("process") else _accepted(cls, kw)))
    if name != "auto":
        raise ValueError(f"unknown sandbox backend {name!r}; known: {', '.join(BACKENDS)}")
    why_not = []
    for candidate in AUTO_ORDER:
        ok, why = REGISTRY[candidate].probe(**kw)
        if ok:
            if why_not:
                logging.getLogger(__name__).warning(
                    "sandbox backend 'auto': %s; using the bubblewrap process backend, whose "
                    "isolation is WEAKER than a container's (no cgroup memory limit)",
                    "; ".join(why_not))
            cls = REGISTRY[candidate].load()
            return cls(**_accepted(cls, kw))
        why_not.append(why)
    raise SandboxError(
        f"sandbox backend 'auto' has nothing that confines here: Docker cannot run "
        f"({why_not[0]}) and bubblewrap (bwrap) is not installed. Install the Docker engine "
        "(bash scripts/docker-engine.sh) or bubblewrap (apt-get install bubblewrap), "
        "or pass --backend process-unconfined explicitly (WEAKER isolation: "
        "SECURITY.md)")


def _accepted(cls, kw: dict[str, Any]) -> dict[str, Any]:
    # 'auto' gets the settings for either backend (image, gpus, allow_unconfined...);
    # each constructor takes the ones it knows.
    params = inspect.signature(cls).parameters
    if kw.get("prewarm") and "prewarm" not in params:
        logging.getLogger(__name__).warning(
            "sandbox prewarm=%s is ignored: the %s backend starts every sandbox cold",
            kw["prewarm"], getattr(cls, "name", cls.__name__))
    return {k: v for k, v in kw.items() if k in params}
