"""The evaluation key: everything that decides a score, as one sha256.

An evaluation job (pipeline/jobs.py `RunContext.evaluate_job`) is a pure function of

    source      the exact source bytes
    job         its kind, model kind, parameters (seed apart) and limits
    data        a digest of each input file the sandbox gets, and of the labels the
                trusted side scores predictions with
    seed        the job's seed
    harness     a digest of the modules staged into the sandbox (sandbox/protocol.py
                SANDBOX_MODULES) and of the trusted-side scorer (sandbox/backends/collect.py)
    backend     the backend kind and its runtime identity (`Backend.identity()`: the
                process backend's interpreter and packages, a Docker image's content id)
    torch       the torch version, and the device (the job's `device` and GPUs)

so two jobs with one key score the same (up to the nondeterminism the trust check's
re-score bounds). The lineage DB keeps one evaluation per key (pipeline/store/models.py
`Evaluation`); the loop reuses a stored outcome instead of starting a sandbox
(pipeline/stages.py). `key_parts` is the one place that says what goes in.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from importlib import metadata
from pathlib import Path

from sandbox.schema import Job

KEY_VERSION = 1     # bump when what goes into the key changes meaning

_SANDBOX_DIR = Path(__file__).resolve().parent.parent / "sandbox"
_digests: dict[tuple, str] = {}
_lock = threading.Lock()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes; remembered per (path, size, mtime) so that a run's task
    data is read once, not once per candidate."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if memo in _digests:
            return _digests[memo]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    with _lock:
        _digests[memo] = h.hexdigest()
    return _digests[memo]


def data_digest(path: str | os.PathLike) -> str:
    """A digest of the tensors a safetensors file holds (sorted by name: dtype, shape,
    bytes) and of its metadata (sorted), not of its bytes: the writer lays the header
    out in no fixed order, so two files of the same data need not be byte-identical.
    Any other file: its bytes. Remembered like `file_digest`."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return file_digest(p)
    st = p.stat()
    memo = ("tensors", str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if memo in _digests:
            return _digests[memo]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        meta = header.pop("__metadata__", None) or {}
        h.update(json.dumps(meta, sort_keys=True).encode() + b"\0")
        for name in sorted(header):
            t = header[name]
            begin, end = t["data_offsets"]
            h.update(json.dumps([name, t["dtype"], t["shape"]]).encode() + b"\0")
            f.seek(base + begin)
            left = end - begin
            while left > 0:
                block = f.read(min(left, 1 << 20))
                if not block:
                    raise ValueError(f"{p}: truncated tensor {name}")
                h.update(block)
                left -= len(block)
    with _lock:
        _digests[memo] = h.hexdigest()
    return _digests[memo]


def harness_files() -> list[Path]:
    """The code that runs in a sandbox or scores its output: SANDBOX_MODULES, then the
    trusted-side scorer of predictions."""
    from sandbox.protocol import SANDBOX_MODULES
    return [_SANDBOX_DIR / f"{m}.py" for m in SANDBOX_MODULES] + [_SANDBOX_DIR / "backends" / "collect.py"]


def harness_digest(files: list[Path] | None = None) -> str:
    h = hashlib.sha256()
    for f in files if files is not None else harness_files():
        h.update(f.name.encode() + b"\0" + file_digest(f).encode() + b"\0")
    return h.hexdigest()


def torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def backend_identity(settings) -> str:
    """The identity of the backend that runs this process's sandbox jobs.

    Embedded (one process runs every job) it is that backend's own `identity()`. With a
    broker the sandbox workers may be elsewhere: the coordinator derives it from the same
    settings (so does a caller whose settings are not the ones this process runs jobs with) (the process backend: this interpreter, as every service of one deployment
    runs one image; Docker: the image's id where the engine is reachable, else its name).
    Each result carries the identity the worker really used (Result.usage["backend"]),
    stored beside the evaluation."""
    from pipeline import celery_app
    if settings.embedded and celery_app.settings() == settings:
        from pipeline.sandbox_task import backend
        return backend().identity()      # the very backend this process runs jobs in
    kind = settings.sandbox_backend
    if kind in ("process", "process-unconfined"):
        from sandbox.backends import runtime   # every process sandbox runs the runtime's python
        python = runtime.interpreter(settings.sandbox_python_prefix)
        return f"{kind}:{runtime.interpreter_identity(python)}"
    try:
        from sandbox.backends.docker import connect, image_identity
        from sandbox.backends.docker_profile import DEFAULT_IMAGE
        image = settings.sandbox_image or DEFAULT_IMAGE
        return f"docker:{image_identity(connect(timeout=10), image)}:{settings.sandbox_runtime or 'runc'}"
    except Exception:
        return f"{kind}:unresolved:{settings.sandbox_image or 'default'}:{settings.sandbox_runtime or 'runc'}"


def key_parts(job: Job, backend: str, *, harness: str | None = None) -> dict:
    """What decides `job`'s score (see the module docstring), as plain JSON data.
    `harness`: the harness digest to use instead of this checkout's (`harness_digest`)."""
    from dataclasses import asdict
    params = {k: v for k, v in job.params.items() if k != "seed"}
    data = {name: data_digest(path) for name, path in sorted(job.inputs.items())}
    if job.labels:
        data["labels"] = data_digest(job.labels)
    return {
        "version": KEY_VERSION,
        "source": hashlib.sha256(job.source.encode("utf-8", "surrogateescape")).hexdigest(),
        "kind": job.kind, "model_kind": job.model_kind, "params": params,
        "limits": asdict(job.limits), "data": data, "seed": job.params.get("seed"),
        "harness": harness if harness is not None else harness_digest(), "backend": backend, "torch": torch_version(),
        "device": {"device": job.params.get("device"), "gpus": job.limits.gpus},
    }


def evaluation_key(parts: dict) -> str:
    """The key of an evaluation: sha256 of its parts (`key_parts`) as canonical JSON."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def key_for(job: Job, settings) -> tuple[str, dict]:
    """(key, parts) for `job` as this process's backend would run it."""
    parts = key_parts(job, backend_identity(settings))
    return evaluation_key(parts), parts
