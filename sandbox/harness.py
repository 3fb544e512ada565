"""The harness: the only code that runs inside a sandbox next to a generated source.

    python -I -c "import sys; sys.path.insert(0, 'lib'); from sandbox.harness import main; main('.')"

It reads `job.json` and the tensors under `in/`, turns the candidate source into a
module, and does one of three jobs:

    train_lm   build the LM the source defines, train it text-to-text, write its weights
    generate   rebuild that LM, load the weights, sample n refinements of a prompt
    evaluate   "extended few-shot": train the candidate's model briefly and score it

The score is always computed here, from model outputs on data the candidate cannot
change; the candidate only decides its architecture and learning dynamics (`train()`
returns an optimizer and a batch size, the loop is ours). Whatever happens, the
harness tries to leave a `out/result.json`; the backend treats a missing one as a crash.

Reward-hacking guards (SECURITY.md, "Forging a result"). The candidate runs in this
very process, so nothing here is a boundary against code that can introspect the
interpreter (the policy gate forbids that: no sys/gc/frames/dunders); these guards make
the simple ways of lying fail loudly instead of silently:

* Before the candidate's module body runs, the harness takes the result seal key the
  backend left in `out/.seal-key` and deletes the file, then captures its own references
  (`_Trusted`) to everything a score or the result depends on (cross_entropy, isfinite,
  clip_grad_norm_, TensorBase.item, safetensors, json, hmac, os.replace, ...) and a
  snapshot of the namespaces they live in (`_Integrity`). Scores are computed through
  the captured references; if the candidate rebound any snapshotted name (monkeypatched
  torch, the loss, the harness itself), the job ends `invalid` saying which.
* `result.json` goes out with `result.seal`: an HMAC (key from the backend) over the
  result's bytes and the SHA-256 of every declared output. A result the candidate wrote
  itself (then `os._exit(0)`), or rewrote from a background process after the harness,
  fails the backend's check and the job ends `crashed`. Nothing the candidate prints is
  ever parsed.
* A T5 candidate must build exactly a `T5ForConditionalGeneration` made only of
  transformers/torch modules, with no hooks and no per-instance `forward`: a custom
  forward could read the teacher-forced decoder input one step ahead and score a loss
  it did not earn. Model outputs must be plain `torch.Tensor`s (no subclass with
  `__torch_function__`), and no torch function/dispatch mode may be active while the
  harness scores.
* Weights are written to a temporary name and renamed into place, so a link or file the
  candidate planted at `out/weights.safetensors` is replaced, never followed; no
  candidate code runs after the weights are written.
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
import types
from pathlib import Path

from sandbox.schema import MAX_REASON_CHARS, Job, Result, SchemaError

CANDIDATE_FILE = "<candidate>"
SEAL_KEY_FILE = ".seal-key"      # written by the backend into out/, removed by main()
SEAL_FILE = "result.seal"        # hex HMAC-SHA256, see seal_digest()
READY_FILE = ".warm-ready"       # warm_main(ready="file"): imports done, waiting for "go"
GO_FILE = "go"                   # warm_main(ready="file"): the backend's "go", in the job dir
GO_POLL_S = 0.01
PROGRESS_FILE = "progress.jsonl"  # {"step": n, "loss": x} lines while fit() trains
PROGRESS_EVERY_S = 0.5           # at most two lines a second: display only
SETUP_EXIT_CODE = 3              # the sandbox cannot run the job at all (not the candidate)
SETUP_ERROR_PREFIX = "selfprog-setup-error: "
SEAL_CONTEXT = b"selfprog-result-seal-v1\x00"


class SetupError(Exception):
    """The sandbox cannot run this job (e.g. CUDA asked for, none visible); raised
    before any candidate code runs. main() exits SETUP_EXIT_CODE saying why."""


class CandidateError(Exception):
    """The candidate did something wrong: the job ends `invalid` with this reason."""


def seal_digest(key: bytes, result_bytes: bytes, outputs: list[tuple[str, str]]) -> str:
    """HMAC-SHA256 over the result document and (name, sha256 hex) of each output.

    The backend computes the same function (it imports it from here) to check that
    `out/result.json` and the declared outputs are the ones the harness wrote.
    """
    import hashlib
    import hmac
    mac = hmac.new(key, SEAL_CONTEXT, hashlib.sha256)
    mac.update(len(result_bytes).to_bytes(8, "little") + result_bytes)
    for name, digest in outputs:
        mac.update(b"\x00" + name.encode() + b"\x00" + digest.encode())
    return mac.hexdigest()


def _take_seal_key(root: Path) -> bytes | None:
    """Read and delete out/.seal-key (before any candidate code runs)."""
    path = root / "out" / SEAL_KEY_FILE
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


class _Trusted:
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


class _Integrity:
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
            "sandbox.harness": sys.modules[__name__],
            "sandbox.schema": sys.modules[Result.__module__],
            "sandbox.schema.Result": Result,
        }
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
# Captured when the harness module is imported, before any candidate code exists.
_os_open, _os_write, _os_read, _os_close, _os_unlink = os.open, os.write, os.read, os.close, os.unlink


def main(jobdir: str | os.PathLike = ".") -> None:
    root = Path(jobdir)
    started = time.monotonic()
    seal_key = _take_seal_key(root)     # first: no candidate code has run yet
    job = Job.from_json((root / "job.json").read_bytes())
    trusted = None
    try:
        trusted = _Trusted()
        if job.model_kind == "t5":   # the T5 classes enter the snapshot
            env = dict(os.environ)
            import transformers  # noqa: F401
            import transformers.models.t5.modeling_t5  # noqa: F401
            for name in set(os.environ) - set(env):   # torch's inductor sets a cache dir
                del os.environ[name]
        integrity = _Integrity()
        result = run(job, root, trusted, integrity)
    except SetupError as e:
        sys.stderr.write(f"{SETUP_ERROR_PREFIX}{e}\n")
        sys.stderr.flush()
        os._exit(SETUP_EXIT_CODE)
    except MemoryError:
        result = Result.failure(job, "oom", "MemoryError: the candidate ran out of memory")
    except CandidateError as e:
        result = Result.failure(job, "invalid", str(e))
    except BaseException as e:  # the candidate's own exceptions, SystemExit included
        status = "oom" if _is_oom(e) else "invalid"
        result = Result.failure(job, status, _describe(e))
    result.duration_s = round(time.monotonic() - started, 3)
    try:
        result.validate()
    except SchemaError as e:   # e.g. a finite loss above the schema's bound
        result = Result.failure(job, "invalid", f"the result is out of bounds: {e}")
    _write_result(root, result, seal_key, trusted)
    # Leave at once: no atexit handler or thread the candidate registered gets to run.
    sys.stdout.flush()
    sys.stderr.flush()
    (trusted.os_exit if trusted else os._exit)(0)


def warm_main(jobdir: str | os.PathLike = ".", model_kind: str = "t5", device: str = "auto",
              ready: str = "-1") -> None:
    """A pre-warmed sandbox (`prewarm`, sandbox/backends/warm.py): pay the imports
    ahead, then wait for the one job this sandbox will ever run, then run it with `main`.

    Started in a job directory that holds no job yet (no job.json, no inputs, no seal
    key): it imports what `main` would (torch, safetensors, torch._dynamo and, for a T5
    job, transformers), initialises CUDA when the job will use it, says it is ready and
    waits for "go". The backend stages the job's files, then says "go".

    `ready` picks the signals. A file descriptor number (process backend): one byte
    written to it for ready; "go" is a line on stdin, EOF means leave. "file" (Docker:
    no fd or open stdin crosses into a container, so the profile stays the cold one):
    out/READY_FILE for ready (removed at "go"); "go" is GO_FILE appearing in the job
    dir, which only the backend can write. Only this trusted code runs before "go";
    `main` then reads the seal key and takes the integrity snapshot before any
    candidate code runs, exactly as in a cold sandbox. Environment variables the
    imports set are removed again, as `main` does.
    """
    env = dict(os.environ)
    import safetensors.torch  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401
    import torch.nn.functional  # noqa: F401
    if model_kind == "t5":
        import transformers  # noqa: F401
        import transformers.models.t5.modeling_t5  # noqa: F401
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        try:
            torch.cuda.init()
            torch.empty(1, device="cuda")     # the context, not only the driver
        except Exception:   # the job will meet (and report) the same error itself
            pass
    for name in set(os.environ) - set(env):
        del os.environ[name]
    marker = Path(jobdir) / "out" / READY_FILE
    if ready == "file":
        marker.touch(mode=0o600)
    elif int(ready) >= 0:
        try:
            os.write(int(ready), b"r")
        finally:
            os.close(int(ready))
    if ready == "file":
        go = Path(jobdir) / GO_FILE
        while not go.exists():
            time.sleep(GO_POLL_S)
        marker.unlink()
        main(jobdir)
        return
    line = b""
    while not line.endswith(b"\n") and len(line) < 16:
        chunk = os.read(0, 1)
        if not chunk:
            os._exit(0)                   # the backend gave this sandbox up
        line += chunk
    if line != b"go\n":
        os._exit(2)
    devnull = os.open(os.devnull, os.O_RDONLY)   # stdin as in a cold sandbox
    os.dup2(devnull, 0)
    os.close(devnull)
    main(jobdir)


def _write_result(root: Path, result: Result, seal_key: bytes | None, t) -> None:
    """result.json (and result.seal when the backend gave a key), each written to a
    temporary name and renamed: a half-written result is never read."""
    import hashlib
    import json
    from dataclasses import asdict
    dumps = t.json_dumps if t else json.dumps
    sha = t.sha256 if t else hashlib.sha256
    replace = t.os_replace if t else os.replace
    data = dumps(asdict(result), sort_keys=True, allow_nan=False).encode()
    out = root / "out"
    if seal_key is not None:
        digests = []
        for name in result.outputs:
            digests.append((name, _file_sha256(out / name, sha)))
        _write_file(out / ".result.seal.tmp", seal_digest(seal_key, data, digests).encode())
        replace(out / ".result.seal.tmp", out / SEAL_FILE)
    _write_file(out / ".result.json.tmp", data)
    replace(out / ".result.json.tmp", out / "result.json")


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


def run(job: Job, root: Path, t: "_Trusted | None" = None,
        integrity: "_Integrity | None" = None) -> Result:
    t = t or _Trusted()
    integrity = integrity or _Integrity()
    torch = t.torch

    torch.set_num_threads(int(job.params.get("num_threads", 1)))
    torch.manual_seed(int(job.params.get("seed", 0)))
    device = _device(job.params.get("device", "auto"))
    module = load_candidate(job.source)
    integrity.check()

    if job.kind == "train_lm":
        model = build(module, job, device, t)
        data = _load(root, job, "data", t)
        losses = fit(model, module, data, job, device, t, integrity,
                     progress=root / "out" / PROGRESS_FILE)
        n = count_params(model)
        score = _mean(losses)
        _save_weights(model, root / "out" / "weights.safetensors", t)   # no candidate code after this
        return Result(job_id=job.job_id, kind=job.kind, status="ok", losses=losses,
                      param_count=n, score=score, outputs=["weights.safetensors"])

    if job.kind == "generate":
        model = build(module, job, device, t)
        _load_weights(model, root / job.inputs["weights"], t)
        samples = generate(model, job, device)
        integrity.check()
        return Result(job_id=job.job_id, kind=job.kind, status="ok", samples=samples,
                      param_count=count_params(model))

    # evaluate
    model = build(module, job, device, t)
    data = _load(root, job, "data", t)
    before = _fingerprint(model, t)
    losses = fit(model, module, data, job, device, t, integrity)
    if _fingerprint(model, t) == before:
        raise CandidateError("training did not change the model's parameters")
    if job.params.get("score", "loss") == "loss":
        score = _mean(losses)   # the paper's L_S(c): mean training loss over the few-shot epoch
        curve = []
    else:
        score = accuracy(model, data["eval_x"], data["eval_y"], device, t)
        curve = [score]
    integrity.check()
    return Result(job_id=job.job_id, kind=job.kind, status="ok", score=score, losses=losses,
                  eval_curve=curve, param_count=count_params(model))


def load_candidate(source: str) -> types.ModuleType:
    """Run the candidate's module body in a fresh namespace (we are inside the sandbox)."""
    module = types.ModuleType("candidate")
    try:
        code = compile(source, CANDIDATE_FILE, "exec")
    except SyntaxError as e:
        raise CandidateError(f"SyntaxError: {e.msg} (line {e.lineno})") from None
    except (MemoryError, RecursionError):   # the parser's own limit, not the model's memory
        raise CandidateError("the source is too deeply nested to compile") from None
    exec(code, module.__dict__)
    for name in ("build_model", "train"):
        if not callable(module.__dict__.get(name)):
            raise CandidateError(f"the source does not define {name}()")
    return module


def build(module: types.ModuleType, job: Job, device, t: _Trusted):
    torch = t.torch

    if job.model_kind == "t5":
        import transformers
        model = module.build_model(int(job.params["vocab_size"]))
        if type(model) is not transformers.T5ForConditionalGeneration:
            raise CandidateError(f"build_model() returned {type(model).__name__}, "
                                 "not a T5ForConditionalGeneration")
        _check_t5_structure(model)
        if model.config.vocab_size < int(job.params["vocab_size"]):
            raise CandidateError("the model's vocabulary is smaller than the tokenizer's")
    else:
        shape = tuple(job.params["input_shape"])
        model = module.build_model(shape, int(job.params["num_classes"]))
        if not isinstance(model, torch.nn.Module):
            raise CandidateError(f"build_model() returned {type(model).__name__}, not an nn.Module")
    n = count_params(model)
    if n == 0:
        raise CandidateError("the model has no trainable parameters")
    if n > int(job.params.get("max_params", 10**11)):
        raise CandidateError(f"the model has {n} parameters, more than the limit "
                             f"{job.params['max_params']}")
    return model.to(device)


def _check_t5_structure(model) -> None:
    """Only library modules, no hooks, no per-instance forward (see the module docstring)."""
    import torch
    for name, m in model.named_modules():
        where = name or "the model"
        if not type(m).__module__.startswith(("transformers.", "torch.nn.")):
            raise CandidateError(f"{where} is a {type(m).__name__} defined by the candidate; "
                                 "a T5 candidate may only configure library modules")
        if "forward" in vars(m):
            raise CandidateError(f"{where} has its own forward; not allowed for a T5 candidate")
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            if getattr(m, hooks, None):
                raise CandidateError(f"{where} carries {hooks.strip('_')}; not allowed")
    g = torch.nn.modules.module
    for hooks in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks", "_global_module_registration_hooks",
                  "_global_parameter_registration_hooks", "_global_buffer_registration_hooks"):
        if getattr(g, hooks, None):
            raise CandidateError(f"the candidate installed global module hooks ({hooks.strip('_')})")


def _no_modes(t: _Trusted) -> None:
    if t.function_modes() or t.dispatch_modes():
        raise CandidateError("the candidate left a torch function/dispatch mode active; "
                             "scores are only computed without one")


def fit(model, module, data: dict, job: Job, device, t: _Trusted,
        integrity: _Integrity, progress: Path | None = None) -> list[float]:
    """Train for `epochs` over the data with the candidate's optimizer and batch size.

    Returns the loss of every step. The loss is ours (cross-entropy on the model's
    logits, through references captured before the candidate ran), so a candidate
    cannot report a better number than it earned. With `progress`, the latest step and
    loss are appended there as JSON lines, at most every PROGRESS_EVERY_S seconds, for
    people watching (the backend relays them; nothing is decided on them).
    """
    optimizer, batch_size = _learning_dynamics(module, model, job, t)
    integrity.check()
    x_key = "input_ids" if job.model_kind == "t5" else "train_x"
    n = data[x_key].shape[0]
    gen = t.Generator().manual_seed(int(job.params.get("seed", 0)))
    max_steps = int(job.params.get("max_steps", 0))
    amp = device.type == "cuda"
    losses: list[float] = []
    report = _Progress(progress, t) if progress is not None else None
    model.train()
    for _ in range(int(job.params.get("epochs", 1))):
        order = t.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            with t.autocast(device.type, dtype=t.torch.bfloat16, enabled=amp):
                if job.model_kind == "t5":
                    loss = t5_loss(model, data, idx, device, t)
                else:
                    x, y = data["train_x"][idx].to(device), data["train_y"][idx].to(device)
                    logits = model(x)
                    _check_logits(logits, len(idx), int(job.params["num_classes"]), t)
                    loss = _ce(t, logits, y)
            with t.no_subclass_fn():
                value = t.float(t.item(t.detach(loss)))
            if not math.isfinite(value):
                raise CandidateError(f"the training loss became non-finite at step {len(losses)}")
            optimizer.zero_grad(set_to_none=True)
            t.backward(loss)
            t.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(value)
            if report is not None:
                report.step(len(losses), value)
            if max_steps and len(losses) >= max_steps:
                break
        if max_steps and len(losses) >= max_steps:
            break
    if report is not None:
        report.close(len(losses), losses[-1] if losses else None)
    integrity.check()
    return losses


class _Progress:
    """Appends {"step", "loss"} lines to out/progress.jsonl, throttled (see fit)."""

    def __init__(self, path: Path, t: _Trusted):
        self.t = t
        self.last = 0.0
        self.written = 0
        try:
            self.fd = t.os_open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o644)
        except OSError:       # progress is a nicety: training goes on without it
            self.fd = -1

    def step(self, n: int, loss: float, force: bool = False) -> None:
        now = time.monotonic()
        if self.fd < 0 or (not force and now - self.last < PROGRESS_EVERY_S) or n == self.written:
            return
        self.last, self.written = now, n
        try:
            self.t.os_write(self.fd, self.t.json_dumps({"step": n, "loss": loss}).encode() + b"\n")
        except OSError:
            pass

    def close(self, n: int, loss: float | None) -> None:
        if loss is not None:
            self.step(n, loss, force=True)
        if self.fd >= 0:
            self.t.os_close(self.fd)
            self.fd = -1


def _ce(t: _Trusted, logits, target, **kw):
    """Cross-entropy on plain tensors, with no torch mode or subclass in the way."""
    _no_modes(t)
    with t.no_subclass_fn():
        return t.cross_entropy(t.float_(logits), target, **kw)


def t5_loss(model, data: dict, idx, device, t: _Trusted):
    """Text-to-text cross-entropy, with the decoder fed the shifted labels (teacher forcing)."""
    mask = data["attention_mask"][idx]
    width = max(int(mask.sum(1).max()), 1)           # trim the batch's common padding
    labels = data["labels"][idx]
    label_width = max(int((labels != -100).sum(1).max()), 1)
    input_ids = data["input_ids"][idx, :width].to(device)
    mask = mask[:, :width].to(device)
    labels = labels[:, :label_width].to(device)
    start = t.zeros_like(labels[:, :1])              # T5's decoder start token is pad (0)
    decoder_in = t.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask,
                   decoder_input_ids=decoder_in).logits
    _check_logits(logits, len(idx), None, t)
    with t.no_subclass_fn():
        flat = t.flatten(logits, 0, 1)
    return _ce(t, flat, labels.flatten(), ignore_index=-100)


def generate(model, job: Job, device) -> list[list[int]]:
    """Sample n refinements of the prompt in one batched call."""
    import torch

    prompt = torch.tensor([job.params["prompt_ids"]], dtype=torch.long, device=device)
    extra = {}
    try:
        # A cache that grows layer by layer: the default one is sized by the encoder's
        # depth and breaks when a self-written LM has more decoder than encoder layers.
        from transformers import DynamicCache, EncoderDecoderCache
        extra["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    except ImportError:
        pass
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt),
            do_sample=True, num_return_sequences=int(job.params["n"]),
            max_new_tokens=int(job.params["max_new_tokens"]),
            temperature=float(job.params.get("temperature", 1.0)),
            top_k=int(job.params.get("top_k", 0)), top_p=float(job.params.get("top_p", 1.0)),
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **extra,
        )
    samples = []
    for row in out.tolist():
        ids = row[1:] if row and row[0] == 0 else row   # drop the decoder start token
        if 1 in ids:
            ids = ids[:ids.index(1)]                     # cut at end-of-sequence
        samples.append([t for t in ids if t > 1])        # no pad/eos inside a sample
    return samples


def accuracy(model, x, y, device, t: _Trusted, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with t.no_grad():
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start:start + batch_size].to(device))
            _check_logits(logits, min(batch_size, x.shape[0] - start), None, t)
            _no_modes(t)
            with t.no_subclass_fn():
                hits = t.eq(t.to(t.argmax(logits, 1), "cpu"), y[start:start + batch_size])
                correct += t.int(t.item(t.sum(hits)))
    return correct / max(1, x.shape[0])


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _learning_dynamics(module, model, job: Job, t: _Trusted):
    got = module.train(model)
    if not (isinstance(got, tuple) and len(got) == 2):
        raise CandidateError("train(model) must return (optimizer, batch_size)")
    optimizer, batch_size = got
    if not isinstance(optimizer, t.Optimizer):
        raise CandidateError(f"train() returned {type(optimizer).__name__}, not a torch optimizer")
    cap = int(job.params.get("max_batch_size", 4096))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= cap:
        raise CandidateError(f"train() returned batch size {batch_size!r}, outside 1..{cap}")
    ours = {id(p) for p in model.parameters()}
    if not any(id(p) in ours for g in optimizer.param_groups for p in g["params"]):
        raise CandidateError("the optimizer does not update the model's parameters")
    return optimizer, batch_size


def _check_logits(logits, batch: int, classes: int | None, t: _Trusted) -> None:
    # Exactly a torch.Tensor: a subclass could carry __torch_function__ and answer the
    # harness's own operations on it (the loss, argmax) with numbers of its choosing.
    if type(logits) is not t.Tensor:
        raise CandidateError(f"the model returned {type(logits).__name__}, not a plain tensor")
    if logits.shape[0] != batch or (classes is not None and tuple(logits.shape) != (batch, classes)):
        want = f"[{batch}, {classes}]" if classes is not None else f"[{batch}, ...]"
        raise CandidateError(f"the model returned shape {list(logits.shape)}, expected {want}")


def _fingerprint(model, t: _Trusted) -> list[float]:
    with t.no_grad(), t.no_subclass_fn():
        return [t.float(t.item(t.tensor_sum(t.detach(p).double()))) for p in model.parameters()]


def _device(name: str):
    """'auto': CUDA when the sandbox sees a GPU, else the CPU. 'cuda' without a visible
    GPU is refused (SetupError) rather than quietly trained on the CPU."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise SetupError("device 'cuda' was asked for, but no CUDA device is visible in the "
                         "sandbox (see SELFPROG_SANDBOX_GPUS and the compose 'gpu' profile)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _load(root: Path, job: Job, name: str, t: _Trusted) -> dict:
    if name not in job.inputs:
        raise RuntimeError(f"the job has no '{name}' input")
    return t.load_file(str(root / job.inputs[name]))


def _save_weights(model, path: Path, t: _Trusted) -> None:
    # To a temporary name, then renamed over whatever the candidate planted at `path`
    # (a symlink is replaced, not followed). save_model handles T5's tied embeddings.
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        t.os_unlink(tmp)
    except OSError:
        pass
    t.save_model(model.cpu(), str(tmp))
    t.os_replace(tmp, path)


def _load_weights(model, path: Path, t: _Trusted) -> None:
    missing, unexpected = t.load_model(model, str(path), strict=False, device="cpu")
    if unexpected or any("shared" not in m and "embed_tokens" not in m and "lm_head" not in m
                         for m in missing):
        raise CandidateError("the weights do not fit the model this source defines")


def _mean(xs: list[float]) -> float:
    if not xs:
        raise CandidateError("training ran no steps (is the data empty?)")
    m = sum(xs) / len(xs)
    if not math.isfinite(m):
        raise CandidateError("the mean loss is not finite")
    return m


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text or type(e).__name__ == "OutOfMemoryError"


def _describe(e: BaseException) -> str:
    """The exception and, where it came from the candidate, the line in its source."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == CANDIDATE_FILE:
            where = f" (candidate line {frame.lineno}, in {frame.name})"
    text = f"{type(e).__name__}: {e}{where}"
    return text[:MAX_REASON_CHARS]


if __name__ == "__main__":  # pragma: no cover - the backends use the -c form above
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
