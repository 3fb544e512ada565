"""In-sandbox guards: what the harness captures before a candidate's code runs.

The candidate runs in the harness's own process, so nothing here is a boundary against
code that can introspect the interpreter (the policy gate, sandbox/policy.py, forbids
that: no sys/gc/frames/dunders); these guards make the simple ways of lying fail loudly
instead of silently (SECURITY.md, "Forging a result"):

* `take_seal_key` reads the result seal key the backend left in `out/.seal-key` and
  deletes the file, before any candidate code runs.
* `Trusted` captures the harness's own references to everything a score or the result
  depends on (cross_entropy, isfinite, clip_grad_norm_, TensorBase.item, safetensors,
  json, hmac, os.replace, ...); scores are computed through them.
* `Integrity` snapshots the namespaces they live in, and every module of the sandbox
  package (sandbox/protocol.py SANDBOX_MODULES) with the classes it defines; `check()`
  ends the job `invalid` naming any name the candidate rebound.
* `write_result` writes `result.json` and `result.seal` (an HMAC, sandbox/protocol.py
  `seal_digest`, over the result's bytes and the SHA-256 of every declared output), each
  to a temporary name and renamed: a result the candidate wrote itself fails the
  backend's check (sandbox/backends/collect.py) and the job ends `crashed`.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from sandbox.protocol import (OUT_DIR, RESULT_FILE, SANDBOX_MODULES, SEAL_FILE, SEAL_KEY_FILE,
                              seal_digest)
from sandbox.schema import Result


class SetupError(Exception):
    """The sandbox cannot run this job (e.g. CUDA asked for, none visible); raised
    before any candidate code runs. main() exits SETUP_EXIT_CODE saying why."""


class CandidateError(Exception):
    """The candidate did something wrong: the job ends `invalid` with this reason."""


def take_seal_key(root: Path) -> bytes | None:
    """Read and delete out/.seal-key (before any candidate code runs)."""
    path = root / OUT_DIR / SEAL_KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        key = os.read(fd, 256)
    finally:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass
    return key.strip() or None


class Trusted:
    """References the harness uses after the candidate ran, captured before it did."""

    def __init__(self) -> None:
        import hashlib
        import hmac
        import json

        import safetensors.torch as st
        import torch
        import torch.nn.functional as F

        self.torch = torch
        self.cross_entropy = F.cross_entropy
        self.isfinite = torch.isfinite
        self.clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        self.autocast = torch.autocast
        self.no_grad = torch.no_grad
        self.randperm = torch.randperm
        self.Generator = torch.Generator
        self.zeros_like = torch.zeros_like
        self.cat = torch.cat
        self.Tensor = torch.Tensor
        self.Module = torch.nn.Module
        self.Optimizer = torch.optim.Optimizer
        tb = torch._C.TensorBase          # a C type: immutable, so these cannot be patched
        self.item = tb.item
        self.float_ = tb.float
        self.flatten = tb.flatten
        self.detach = tb.detach
        self.argmax = tb.argmax
        self.to = tb.to
        self.eq = tb.eq
        self.sum = tb.sum
        self.backward = torch.Tensor.backward
        self.tensor_sum = torch.sum
        self.function_modes = torch._C._len_torch_function_stack
        self.dispatch_modes = torch._C._len_torch_dispatch_stack
        self.no_subclass_fn = torch._C.DisableTorchFunctionSubclass
        self.save_file = st.save_file
        self.save_model = st.save_model
        self.load_file = st.load_file
        self.load_model = st.load_model
        self.json_dumps = json.dumps
        self.sha256 = hashlib.sha256
        self.hmac = hmac
        self.os_open, self.os_write, self.os_close = os.open, os.write, os.close
        self.os_read, self.os_fsync, self.os_replace = os.read, os.fsync, os.replace
        self.os_unlink, self.os_exit = os.unlink, os._exit
        self.isinstance, self.type, self.float, self.int = isinstance, type, float, int
        self.len, self.sum_ = len, sum


class Integrity:
    """A snapshot of the namespaces the harness relies on; `check()` names any rebinding.

    Only names that existed at the snapshot are compared (lazy imports may add new
    ones); a changed or deleted binding is the candidate tampering with trusted code.
    """

    def __init__(self) -> None:
        import builtins
        import json

        import safetensors.torch as st
        import torch
        import torch.nn.functional as F

        # torch rebinds some of its own names (torch.manual_seed ...) when the first
        # optimizer imports torch._dynamo; import it now so that the snapshot is stable.
        env = dict(os.environ)
        import torch._dynamo  # noqa: F401
        for name in set(os.environ) - set(env):
            del os.environ[name]

        spaces: dict[str, object] = {
            "builtins": builtins, "torch": torch, "torch.nn.functional": F,
            "torch.nn.utils": torch.nn.utils, "torch.nn.utils.clip_grad": torch.nn.utils.clip_grad,
            "torch.autograd": torch.autograd, "torch.Tensor": torch.Tensor,
            "torch.nn.Module": torch.nn.Module, "torch.optim.Optimizer": torch.optim.Optimizer,
            "safetensors.torch": st, "json": json, "os": os, "math": math,
        }
        spaces.update(_own_namespaces())
        t5 = sys.modules.get("transformers.models.t5.modeling_t5")
        if t5 is not None:
            spaces["transformers.models.t5.modeling_t5"] = t5
            for name, value in vars(t5).items():
                if isinstance(value, type) and value.__module__ == t5.__name__:
                    spaces[f"{t5.__name__}.{name}"] = value
        self.snapshot = {label: (ns, dict(vars(ns))) for label, ns in spaces.items()}
        # What a class could already answer (own or inherited): a new own attribute with
        # one of these names shadows an inherited method (torch.Tensor.item = ...).
        self.reachable = {label: set(dir(ns)) for label, ns in spaces.items() if isinstance(ns, type)}

    def check(self) -> None:
        for label, (ns, before) in self.snapshot.items():
            now = vars(ns)
            for key, value in before.items():
                if key in ("__dict__", "__weakref__", "__doc__"):
                    continue
                if now.get(key, _MISSING) is not value:
                    raise CandidateError(f"the candidate replaced {label}.{key}; "
                                         "trusted code may not be modified")
            if isinstance(ns, type):   # a new own attribute that shadows an inherited one
                added = sorted((set(now) - set(before)) & self.reachable[label])
                if added:
                    raise CandidateError(f"the candidate added {label}.{added[0]}; "
                                         "trusted code may not be modified")


_MISSING = object()
# Captured when this module is imported (by the harness), before any candidate code exists.
_os_open, _os_write, _os_read, _os_close, _os_unlink = os.open, os.write, os.read, os.close, os.unlink


def write_result(root: Path, result: Result, seal_key: bytes | None, t) -> None:
    """result.json (and result.seal when the backend gave a key), each written to a
    temporary name and renamed: a half-written result is never read."""
    import hashlib
    import json
    from dataclasses import asdict
    dumps = t.json_dumps if t else json.dumps
    sha = t.sha256 if t else hashlib.sha256
    replace = t.os_replace if t else os.replace
    data = dumps(asdict(result), sort_keys=True, allow_nan=False).encode()
    out = root / OUT_DIR
    if seal_key is not None:
        digests = []
        for name in result.outputs:
            digests.append((name, _file_sha256(out / name, sha)))
        _write_file(out / ".result.seal.tmp", seal_digest(seal_key, data, digests).encode())
        replace(out / ".result.seal.tmp", out / SEAL_FILE)
    _write_file(out / f".{RESULT_FILE}.tmp", data)
    replace(out / f".{RESULT_FILE}.tmp", out / RESULT_FILE)


def _write_file(path: Path, data: bytes) -> None:
    try:
        _os_unlink(path)          # whatever the candidate planted there (a link, a FIFO)
    except OSError:
        pass
    fd = _os_open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[_os_write(fd, view):]
    finally:
        _os_close(fd)


def _file_sha256(path: Path, sha) -> str:
    h = sha()
    fd = _os_open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            chunk = _os_read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    finally:
        _os_close(fd)


def _own_namespaces() -> dict[str, object]:
    """The loaded modules of SANDBOX_MODULES and the classes each defines."""
    spaces: dict[str, object] = {}
    for name in SANDBOX_MODULES:
        label = "sandbox" if name == "__init__" else f"sandbox.{name}"
        module = sys.modules.get(label)
        if module is None:
            continue
        spaces[label] = module
        for attr, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == label:
                spaces[f"{label}.{attr}"] = value
    return spaces
