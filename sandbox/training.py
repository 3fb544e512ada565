"""In-sandbox ML: build the candidate's model, train it with our loop, predict with it.

The candidate only decides its architecture and learning dynamics (`train()` returns an
optimizer and a batch size; the loop is ours). Every loss, accuracy and check here goes
through the references the harness captured before the candidate ran (sandbox/guards.py
`Trusted`), so a candidate cannot report a better number than it earned:

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
import time
import types
from pathlib import Path

from sandbox.guards import CandidateError, Integrity, SetupError, Trusted
from sandbox.protocol import PROGRESS_EVERY_S
from sandbox.schema import OPTIMIZERS, PREDICTIONS_TENSOR, T5_CONFIG_CHOICES, T5_CONFIG_KEYS, Declaration, Job

CANDIDATE_FILE = "<candidate>"    # the file name compile() gives the candidate's code


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


def build(module: types.ModuleType, job: Job, device, t: Trusted):
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


def _no_modes(t: Trusted) -> None:
    if t.function_modes() or t.dispatch_modes():
        raise CandidateError("the candidate left a torch function/dispatch mode active; "
                             "scores are only computed without one")


def fit(model, module, data: dict, job: Job, device, t: Trusted,
        integrity: Integrity, progress: Path | None = None, dynamics=None,
        schedule=None) -> list[float]:
    """Train for `epochs` over the data with the candidate's optimizer and batch size
    (`train(model)` of `module`, or `dynamics` = (optimizer, batch_size) built from a
    declaration).

    Returns the loss of every step. The loss is ours (cross-entropy on the model's
    logits, through references captured before the candidate ran), so a candidate
    cannot report a better number than it earned. With `progress`, the latest step and
    loss are appended there as JSON lines, at most every PROGRESS_EVERY_S seconds, for
    people watching (the backend relays them; nothing is decided on them). `schedule`
    (the LM's training, sandbox/lm_schedule.py) sets the learning rate before each step
    and decides when to stop.
    """
    optimizer, batch_size = dynamics or _learning_dynamics(module, model, job, t)
    integrity.check()
    x_key = "input_ids" if job.model_kind == "t5" else "train_x"
    n = data[x_key].shape[0]
    gen = t.Generator().manual_seed(int(job.params.get("seed", 0)))
    max_steps = int(job.params.get("max_steps", 0))
    amp = device.type == "cuda"
    losses: list[float] = []
    stopped = False
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
            if schedule is not None:
                schedule.before_step(len(losses) + 1)
            optimizer.step()
            losses.append(value)
            if report is not None:
                report.step(len(losses), value)
            if schedule is not None and schedule.after_step(len(losses)):
                stopped = True
                break
            if max_steps and len(losses) >= max_steps:
                stopped = True
                break
        if stopped:
            break
    if report is not None:
        report.close(len(losses), losses[-1] if losses else None)
    integrity.check()
    return losses


class _Progress:
    """Appends {"step", "loss"} lines to out/progress.jsonl, throttled (see fit)."""

    def __init__(self, path: Path, t: Trusted):
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


def _ce(t: Trusted, logits, target, **kw):
    """Cross-entropy on plain tensors, with no torch mode or subclass in the way."""
    _no_modes(t)
    with t.no_subclass_fn():
        return t.cross_entropy(t.float_(logits), target, **kw)


def t5_loss(model, data: dict, idx, device, t: Trusted):
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


def predict(model, x, num_classes: int, device, t: Trusted, batch_size: int = 512):
    """The model's class ids for `x`: int64 [N], argmax of its logits in eval mode.

    Only predictions leave the sandbox; the trusted side scores them against labels that
    never enter it (sandbox/backends/collect.py `score_predictions`)."""
    model.eval()
    parts = []
    with t.no_grad():
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start:start + batch_size].to(device))
            _check_logits(logits, min(batch_size, x.shape[0] - start), num_classes, t)
            _no_modes(t)
            with t.no_subclass_fn():
                parts.append(t.to(t.argmax(logits, 1), "cpu"))
    with t.no_subclass_fn():
        return t.to(t.cat(parts), dtype=t.torch.int64).contiguous()


def save_predictions(pred, path: Path, t: Trusted) -> None:
    """Like save_weights: a temporary name renamed over whatever sits at `path`."""
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        t.os_unlink(tmp)
    except OSError:
        pass
    t.save_file({PREDICTIONS_TENSOR: pred}, str(tmp))
    t.os_replace(tmp, path)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _learning_dynamics(module, model, job: Job, t: Trusted):
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


def _check_logits(logits, batch: int, classes: int | None, t: Trusted) -> None:
    # Exactly a torch.Tensor: a subclass could carry __torch_function__ and answer the
    # harness's own operations on it (the loss, argmax) with numbers of its choosing.
    if type(logits) is not t.Tensor:
        raise CandidateError(f"the model returned {type(logits).__name__}, not a plain tensor")
    if logits.shape[0] != batch or (classes is not None and tuple(logits.shape) != (batch, classes)):
        want = f"[{batch}, {classes}]" if classes is not None else f"[{batch}, ...]"
        raise CandidateError(f"the model returned shape {list(logits.shape)}, expected {want}")


def fingerprint(model, t: Trusted) -> list[float]:
    with t.no_grad(), t.no_subclass_fn():
        return [t.float(t.item(t.tensor_sum(t.detach(p).double()))) for p in model.parameters()]


def pick_device(name: str):
    """'auto': CUDA when the sandbox sees a GPU, else the CPU. 'cuda' without a visible
    GPU is refused (SetupError) rather than quietly trained on the CPU."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise SetupError("device 'cuda' was asked for, but no CUDA device is visible in the "
                         "sandbox (see SELFPROG_SANDBOX_GPUS and the compose 'gpu' profile)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def load_input(root: Path, job: Job, name: str, t: Trusted) -> dict:
    if name not in job.inputs:
        raise RuntimeError(f"the job has no '{name}' input")
    return t.load_file(str(root / job.inputs[name]))


def save_weights(model, path: Path, t: Trusted) -> None:
    # To a temporary name, then renamed over whatever the candidate planted at `path`
    # (a symlink is replaced, not followed). save_model handles T5's tied embeddings.
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        t.os_unlink(tmp)
    except OSError:
        pass
    t.save_model(model.cpu(), str(tmp))
    t.os_replace(tmp, path)


def load_weights(model, path: Path, t: Trusted) -> None:
    missing, unexpected = t.load_model(model, str(path), strict=False, device="cpu")
    if unexpected or any("shared" not in m and "embed_tokens" not in m and "lm_head" not in m
                         for m in missing):
        raise CandidateError("the weights do not fit the model this source defines")


def mean_loss(xs: list[float]) -> float:
    if not xs:
        raise CandidateError("training ran no steps (is the data empty?)")
    m = sum(xs) / len(xs)
    if not math.isfinite(m):
        raise CandidateError("the mean loss is not finite")
    return m


# ---------------------------------------------------------------- declarations (self task)
# Config entries that are bookkeeping, not the model: ignored when a candidate's config is
# compared with the one its declaration builds.
_CONFIG_BOOKKEEPING = {"transformers_version", "_name_or_path", "architectures",
                       "_attn_implementation_autoset", "_attn_implementation_internal",
                       "_commit_hash", "torch_dtype", "dtype"}


def declare(module, model, job: Job, t: Trusted) -> Declaration:
    """What a T5 candidate's `build_model` and `train` amount to, as a Declaration, or a
    CandidateError saying why they cannot be declared.

    Declarable means: the model is exactly `T5ForConditionalGeneration(T5Config(**model))`
    for the declared keys (its config equals the one they build, and its parameters equal
    those of a model built from them after the same seed: no custom initialisation or
    surgery), and the optimizer is one of OPTIMIZERS over all of the model's parameters,
    in groups with one set of hyperparameters, exactly as that class builds them."""
    optimizer, batch_size = _learning_dynamics(module, model, job, t)
    cfg = model.config.to_dict()
    declared = {k: cfg[k] for k in (*T5_CONFIG_KEYS, *T5_CONFIG_CHOICES)
                if cfg.get(k) is not None}
    if isinstance(declared.get("eos_token_id"), list):
        raise CandidateError("eos_token_id must be one token id")
    kind = type(optimizer).__name__
    if kind not in OPTIMIZERS or type(optimizer).__module__.split(".")[:2] != ["torch", "optim"]:
        raise CandidateError(f"optimizer {kind} is not one of "
                             f"{', '.join(sorted(OPTIMIZERS))}")
    groups = optimizer.param_groups
    hyper = _hyper(kind, groups[0])
    if any(_hyper(kind, g) != hyper for g in groups[1:]):
        raise CandidateError("the optimizer's parameter groups differ")
    ours = [id(p) for p in model.parameters()]
    theirs = [id(p) for g in groups for p in g["params"]]
    if sorted(ours) != sorted(theirs):
        raise CandidateError("the optimizer must update exactly all of "
                             "the model's parameters")
    try:
        decl = Declaration(model=declared, optimizer=kind, hyper=hyper,
                           batch_size=batch_size).validate()
    except Exception as e:   # SchemaError: a value outside the bounds
        raise CandidateError(f"{e}") from None
    # The declaration must rebuild exactly this model and this optimizer.
    seed = int(job.params.get("seed", 0))
    t.torch.manual_seed(seed)
    again = build_declared(decl, job, t.torch.device("cpu"), t)
    other = {k: v for k, v in again.config.to_dict().items() if k not in _CONFIG_BOOKKEEPING}
    mine = {k: v for k, v in cfg.items() if k not in _CONFIG_BOOKKEEPING}
    diff = sorted(k for k in set(other) | set(mine) if other.get(k, _NONE) != mine.get(k, _NONE))
    if diff:
        raise CandidateError(f"the model's config sets {diff[0]!r}, which "
                             "is not a declarable T5Config key (or differs from its default)")
    mine_sd, other_sd = model.state_dict(), again.state_dict()
    if list(mine_sd) != list(other_sd):
        raise CandidateError("the model's modules differ from those its "
                             "T5Config builds")
    with t.no_grad():
        for name, value in mine_sd.items():
            ref = other_sd[name]
            if value.shape != ref.shape or value.dtype != ref.dtype \
                    or not t.torch.equal(value.detach().cpu(), ref):
                raise CandidateError(f"{name} is not as its T5Config builds "
                                     "it (custom initialisation or changes after building)")
    fresh = make_optimizer(decl, again, t)
    want = {k: v for k, v in fresh.param_groups[0].items() if k != "params"}
    for g in groups:
        got = {k: v for k, v in g.items() if k != "params"}
        if got != want:
            bad = sorted(k for k in set(got) | set(want) if got.get(k, _NONE) != want.get(k, _NONE))
            raise CandidateError(f"optimizer setting {bad[0]!r} is not "
                                 "declarable")
    return decl


_NONE = object()


def _hyper(kind: str, group: dict) -> dict:
    out = {}
    for key in OPTIMIZERS[kind]:
        if key in ("beta1", "beta2"):
            betas = group.get("betas")
            if not isinstance(betas, tuple | list) or len(betas) != 2:
                raise CandidateError("betas must be two numbers")
            value = betas[0] if key == "beta1" else betas[1]
        else:
            value = group.get(key)
        if hasattr(value, "item"):   # a tensor learning rate
            raise CandidateError(f"{key} must be a number, not a tensor")
        out[key] = value
    return out


def build_declared(decl: Declaration, job: Job, device, t: Trusted):
    """The model a declaration describes; no candidate code involved."""
    import transformers
    config = transformers.T5Config(**decl.model)
    if config.vocab_size < int(job.params["vocab_size"]):
        raise CandidateError("the model's vocabulary is smaller than the tokenizer's")
    model = transformers.T5ForConditionalGeneration(config)
    n = count_params(model)
    if n > int(job.params.get("max_params", 10**11)):
        raise CandidateError(f"the model has {n} parameters, more than the limit "
                             f"{job.params['max_params']}")
    return model.to(device)


def make_optimizer(decl: Declaration, model, t: Trusted):
    """The declared optimizer over all of the model's parameters."""
    kw = dict(decl.hyper)
    if "beta1" in kw:
        kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
    cls = getattr(t.torch.optim, decl.optimizer)
    return cls(model.parameters(), **kw)


def declared_dynamics(decl: Declaration, model, job: Job, t: Trusted):
    cap = int(job.params.get("max_batch_size", 4096))
    if decl.batch_size > cap:
        raise CandidateError(f"the declared batch size {decl.batch_size} is more than {cap}")
    return make_optimizer(decl, model, t), decl.batch_size
