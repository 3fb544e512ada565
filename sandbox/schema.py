"""The wire format of a sandbox job and its result: one schema, validated on both sides.

A job goes from trusted code into a sandbox as `job.json`; the harness inside writes
`result.json`; the backend reads it back and validates it here before anything trusted
looks at it. Everything is bounded (string and list sizes) and every number finite,
so a hostile candidate cannot smuggle megabytes, NaNs or odd types across.
Pure standard library: this module also runs inside the sandbox image.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

JOB_KINDS = ("train_lm", "generate", "evaluate", "declare")
MODEL_KINDS = ("t5", "cnn")
SCORE_KINDS = {"loss": "min", "accuracy": "max"}  # score kind -> direction (better is ...)

# What a sandbox run can end as. The harness writes ok/invalid/oom itself; the backend
# adds the ones the harness cannot report (it was killed, or never started).
RESULT_STATUSES = ("ok", "invalid", "timeout", "oom", "rejected", "crashed")
# why an LM's training stopped (sandbox/lm_schedule.py): it copies its input, its time
# budget or step cap ran out, or its epochs did
LM_STOPS = ("criterion", "budget", "max_steps", "epochs")

MAX_SOURCE_BYTES = 64 * 1024
MAX_RESULT_BYTES = 4 * 1024 * 1024
MAX_LOG_CHARS = 16 * 1024
MAX_REASON_CHARS = 2000
MAX_CURVE = 20_000          # points in a loss curve
MAX_SAMPLES = 64            # sequences one generate job may return
MAX_SAMPLE_TOKENS = 4096
MAX_PROMPT_TOKENS = 4096
MAX_NUMBER = 1e15
MAX_TIMEOUT_S = 86_400.0    # one sandbox run's wall-clock limit (Limits.timeout_s)

_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,96}$")
_INPUT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# An accuracy-scored evaluation's output: int64 class ids [N] for the N rows of eval_x,
# one tensor named "predictions"; the trusted side scores it (sandbox/backends/collect.py).
PREDICTIONS_FILE = "predictions.safetensors"
PREDICTIONS_TENSOR = "predictions"
_OUTPUT_FILE = re.compile(r"^[a-z][a-z0-9_]{0,31}\.safetensors$")

# Parameters a job may carry, with their type and bounds: anything else is refused.
JOB_PARAMS: dict[str, tuple[type, float, float]] = {
    "seed": (int, 0, 2**31 - 1),
    "epochs": (int, 1, 1000),
    "max_steps": (int, 0, 10_000_000),      # 0: no cap
    "vocab_size": (int, 8, 1_000_000),
    "num_classes": (int, 2, 10_000),
    "n": (int, 1, MAX_SAMPLES),
    "max_new_tokens": (int, 1, MAX_SAMPLE_TOKENS),
    "temperature": (float, 1e-3, 100.0),
    "top_k": (int, 0, 1_000_000),
    "top_p": (float, 0.0, 1.0),
    "num_threads": (int, 1, 256),
    "max_batch_size": (int, 1, 65536),
    "max_params": (int, 1, 10**11),
    # train_lm: until it copies (sandbox/lm_schedule.py)
    "copy_criterion": (float, 0.0, 1.0),    # 0: no criterion
    "budget_s": (float, 0.0, 86_400.0),     # 0: no budget
    "warmup_steps": (int, 0, 1_000_000),
    "decay_steps": (int, 0, 1_000_000),
    # generate, for the lineage proposer: fine-tune first (sandbox/finetune.py)
    "finetune_steps": (int, 0, 100_000),
    "finetune_lr": (float, 1e-8, 1.0),
    "finetune_batch": (int, 1, 4096),
    "finetune_mix": (float, 0.0, 1.0),
}
JOB_TEXT_PARAMS = {"score": tuple(SCORE_KINDS), "device": ("cpu", "cuda", "auto")}
JOB_LIST_PARAMS = {"prompt_ids": MAX_PROMPT_TOKENS, "input_shape": 4}


class SchemaError(ValueError):
    """A job or result does not follow the schema."""


def _lm_metrics(m: Any) -> dict:
    """A train_lm result's copy metrics (sandbox/lm_schedule.py), exactly these keys."""
    keys = {"copy_accuracy", "p_intact", "stop", "criterion_step"}
    if not isinstance(m, dict) or set(m) != keys:
        raise SchemaError(f"lm_metrics must have exactly the keys {sorted(keys)}")
    for k in ("copy_accuracy", "p_intact"):
        if not 0.0 <= _finite(m[k], k) <= 1.0:
            raise SchemaError(f"{k} must lie in [0, 1]")
    if m["stop"] not in LM_STOPS:
        raise SchemaError(f"stop must be one of {LM_STOPS}")
    step = m["criterion_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < -1:
        raise SchemaError("criterion_step must be an integer >= -1")
    return {"copy_accuracy": float(m["copy_accuracy"]), "p_intact": float(m["p_intact"]),
            "stop": m["stop"], "criterion_step": step}


def _finite(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SchemaError(f"{what}: expected a number, got {type(x).__name__}")
    if not math.isfinite(x) or abs(x) > MAX_NUMBER:
        raise SchemaError(f"{what}: number {x!r} is not finite or out of range")
    return x


def _text(x: Any, what: str, limit: int) -> str:
    if not isinstance(x, str):
        raise SchemaError(f"{what}: expected text")
    if len(x) > limit:
        raise SchemaError(f"{what}: {len(x)} characters, more than {limit}")
    if "\x00" in x:
        raise SchemaError(f"{what}: contains a NUL byte")
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate: not text that can go over the wire
        raise SchemaError(f"{what}: not encodable as UTF-8") from None
    return x


USAGE_NUMBERS = ("wall_s", "cpu_s", "peak_rss_mb")   # measured by the backend, never the harness
USAGE_TEXTS = ("backend", "host")                      # the worker's backend identity and host


def _usage(u: Any) -> dict:
    """A result's `usage`: the sandbox's wall and CPU seconds and peak resident memory,
    and where it ran. The backend sets it after the sandbox ended (sandbox/backends/base.py
    `_supervise`); whatever the harness wrote there is replaced."""
    if not isinstance(u, dict) or set(u) - set(USAGE_NUMBERS) - set(USAGE_TEXTS):
        raise SchemaError("usage must be an object of " + ", ".join(USAGE_NUMBERS + USAGE_TEXTS))
    out: dict = {}
    for k in USAGE_NUMBERS:
        v = u.get(k)
        out[k] = None if v is None else _finite(v, f"usage.{k}")
    for k in USAGE_TEXTS:
        v = u.get(k)
        out[k] = None if v is None else _text(v, f"usage.{k}", 200)
    return out


def _curve(xs: Any, what: str) -> list[float]:
    if not isinstance(xs, list) or len(xs) > MAX_CURVE:
        raise SchemaError(f"{what}: expected a list of at most {MAX_CURVE} numbers")
    return [float(_finite(x, what)) for x in xs]


@dataclass(frozen=True)
class Limits:
    """Resources one sandbox run may use."""
    timeout_s: float = 300.0
    memory_mb: int = 4096
    cpus: float = 1.0
    pids: int = 256
    output_mb: int = 1024
    gpus: int = 0

    def validate(self) -> "Limits":
        _finite(self.timeout_s, "limits.timeout_s")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise SchemaError(f"limits.timeout_s must be in (0, {MAX_TIMEOUT_S:g}]")
        for name, lo, hi in (("memory_mb", 64, 1 << 20), ("pids", 8, 100_000),
                             ("output_mb", 1, 1 << 20), ("gpus", 0, 64)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SchemaError(f"limits.{name} must be an integer in [{lo}, {hi}]")
        _finite(self.cpus, "limits.cpus")
        if not 0 < self.cpus <= 256:
            raise SchemaError("limits.cpus must be in (0, 256]")
        return self


# What a T5 candidate may declare (sandbox/harness.py `declare`): the T5Config keys that
# shape the model, each with its type and bounds ...
T5_CONFIG_KEYS: dict[str, tuple[type, float, float]] = {
    "vocab_size": (int, 8, 1_000_000), "d_model": (int, 1, 16_384), "d_kv": (int, 1, 4096),
    "d_ff": (int, 1, 131_072), "num_layers": (int, 1, 128), "num_decoder_layers": (int, 1, 128),
    "num_heads": (int, 1, 512), "relative_attention_num_buckets": (int, 1, 4096),
    "relative_attention_max_distance": (int, 1, 1_000_000), "dropout_rate": (float, 0.0, 1.0),
    "layer_norm_epsilon": (float, 1e-12, 1.0), "initializer_factor": (float, 1e-6, 1e3),
    "decoder_start_token_id": (int, 0, 1_000_000), "pad_token_id": (int, 0, 1_000_000),
    "eos_token_id": (int, 0, 1_000_000),
}
T5_CONFIG_CHOICES = {"feed_forward_proj": ("relu", "gelu", "gated-gelu", "gated-relu",
                                           "silu", "gated-silu"),
                     "tie_word_embeddings": (True, False)}
# ... and the optimizers it may use, with the hyperparameters read from its param groups.
_FLAGS = (bool, 0, 1)
OPTIMIZERS: dict[str, dict[str, tuple[type, float, float]]] = {
    "AdamW": {"lr": (float, 0.0, 10.0), "beta1": (float, 0.0, 1.0), "beta2": (float, 0.0, 1.0),
              "eps": (float, 0.0, 1.0), "weight_decay": (float, 0.0, 10.0), "amsgrad": _FLAGS},
    "Adam": {"lr": (float, 0.0, 10.0), "beta1": (float, 0.0, 1.0), "beta2": (float, 0.0, 1.0),
             "eps": (float, 0.0, 1.0), "weight_decay": (float, 0.0, 10.0), "amsgrad": _FLAGS},
    "SGD": {"lr": (float, 0.0, 10.0), "momentum": (float, 0.0, 1.0),
            "dampening": (float, 0.0, 1.0), "weight_decay": (float, 0.0, 10.0),
            "nesterov": _FLAGS},
    "RMSprop": {"lr": (float, 0.0, 10.0), "alpha": (float, 0.0, 1.0), "eps": (float, 0.0, 1.0),
                "weight_decay": (float, 0.0, 10.0), "momentum": (float, 0.0, 1.0),
                "centered": _FLAGS},
    "Adagrad": {"lr": (float, 0.0, 10.0), "lr_decay": (float, 0.0, 10.0),
                "weight_decay": (float, 0.0, 10.0), "initial_accumulator_value": (float, 0.0, 1e3),
                "eps": (float, 0.0, 1.0)},
}
MAX_BATCH_SIZE = 65536


def _bounded(value: Any, spec: tuple[type, float, float], what: str) -> Any:
    typ, lo, hi = spec
    if typ is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{what}: expected true or false")
        return value
    _finite(value, what)
    if typ is int and not isinstance(value, int):
        raise SchemaError(f"{what}: expected an integer")
    if not lo <= value <= hi:
        raise SchemaError(f"{what}={value} outside [{lo}, {hi}]")
    return typ(value)


@dataclass
class Declaration:
    """A T5 candidate's model and learning dynamics, as data (the self task).

    The candidate's code runs once, in a `declare` job, to produce this; training the LM,
    generating and the few-shot score then run in fresh sandboxes on harness code only,
    which build the model (`T5Config(**model)`) and the optimizer (`optimizer` from
    OPTIMIZERS with `hyper`) from it. Every key is allow-listed, every number bounded.
    """
    model: dict[str, Any]
    optimizer: str
    hyper: dict[str, Any]
    batch_size: int

    def validate(self) -> "Declaration":
        if not isinstance(self.model, dict):
            raise SchemaError("declaration.model must be a mapping")
        for key, value in self.model.items():
            if key in T5_CONFIG_KEYS:
                self.model[key] = _bounded(value, T5_CONFIG_KEYS[key], f"model.{key}")
            elif key in T5_CONFIG_CHOICES:
                if isinstance(value, bool) is not isinstance(T5_CONFIG_CHOICES[key][0], bool) \
                        or value not in T5_CONFIG_CHOICES[key]:
                    raise SchemaError(f"model.{key} must be one of {T5_CONFIG_CHOICES[key]}")
            else:
                raise SchemaError(f"model.{str(key)[:64]!r} is not a declarable T5Config key")
        if "vocab_size" not in self.model:
            raise SchemaError("declaration.model needs vocab_size")
        if self.optimizer not in OPTIMIZERS:
            raise SchemaError(f"optimizer must be one of {sorted(OPTIMIZERS)}")
        if not isinstance(self.hyper, dict):
            raise SchemaError("declaration.hyper must be a mapping")
        allowed = OPTIMIZERS[self.optimizer]
        for key, value in self.hyper.items():
            if key not in allowed:
                raise SchemaError(f"{self.optimizer} has no declarable hyperparameter "
                                  f"{str(key)[:64]!r}")
            self.hyper[key] = _bounded(value, allowed[key], f"hyper.{key}")
        self.batch_size = _bounded(self.batch_size, (int, 1, MAX_BATCH_SIZE), "batch_size")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Declaration":
        if not isinstance(d, dict) or set(d) != {"model", "optimizer", "hyper", "batch_size"}:
            raise SchemaError("a declaration is {model, optimizer, hyper, batch_size}")
        try:
            return cls(model=dict(d["model"]) if isinstance(d["model"], dict) else d["model"],
                       optimizer=d["optimizer"],
                       hyper=dict(d["hyper"]) if isinstance(d["hyper"], dict) else d["hyper"],
                       batch_size=d["batch_size"]).validate()
        except TypeError as e:
            raise SchemaError(str(e)) from None


@dataclass
class Job:
    """One unit of sandboxed work: a source, the tensors it may see, and bounds.

    `inputs` maps a logical name (``data``, ``weights``, ...) to a file. On the trusted
    side it is a host path; the backend stages each file read-only into the sandbox as
    ``in/<name>.safetensors`` and the harness only ever sees that.

    `labels` (trusted side only, never staged: the sandbox's job.json has it empty) is
    the host path of a safetensors file holding ``eval_y``. An accuracy-scored
    evaluation returns its predictions for ``eval_x`` and the backend scores them
    against these labels (sandbox/backends/collect.py `score_predictions`), so no
    held-out label is ever inside a sandbox that runs candidate code.
    """
    job_id: str
    kind: str
    source: str
    model_kind: str = "t5"
    inputs: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    labels: str = ""
    declaration: dict | None = None

    def validate(self) -> "Job":
        if not isinstance(self.job_id, str) or not _JOB_ID.match(self.job_id):
            raise SchemaError("job_id must match [A-Za-z0-9_.-]{1,96}")
        if self.kind not in JOB_KINDS:
            raise SchemaError(f"kind must be one of {JOB_KINDS}, got {self.kind!r}")
        if self.model_kind not in MODEL_KINDS:
            raise SchemaError(f"model_kind must be one of {MODEL_KINDS}")
        if len(_text(self.source, "source", MAX_SOURCE_BYTES).encode()) > MAX_SOURCE_BYTES:
            raise SchemaError(f"source is larger than {MAX_SOURCE_BYTES} bytes")
        if not isinstance(self.inputs, dict) or len(self.inputs) > 8:
            raise SchemaError("inputs must be a mapping of at most 8 files")
        for name, path in self.inputs.items():
            if not isinstance(name, str) or not _INPUT_NAME.match(name):
                raise SchemaError(f"input name {name!r} is not allowed")
            _text(path, f"inputs.{name}", 4096)
        _text(self.labels, "labels", 4096)
        if self.declaration is not None:
            # harness code only: the model and optimizer come from the declaration
            if self.kind not in ("train_lm", "generate", "evaluate") or self.model_kind != "t5":
                raise SchemaError("only T5 train_lm/generate/evaluate jobs run a declaration")
            if self.source:
                raise SchemaError("a job with a declaration carries no source")
            self.declaration = Declaration.from_dict(self.declaration).to_dict()
        elif self.kind == "declare" and self.model_kind != "t5":
            raise SchemaError("only a T5 source is declared")
        if not isinstance(self.params, dict):
            raise SchemaError("params must be a mapping")
        for key, value in self.params.items():
            if key in JOB_PARAMS:
                typ, lo, hi = JOB_PARAMS[key]
                _finite(value, f"params.{key}")
                if typ is int and not isinstance(value, int):
                    raise SchemaError(f"params.{key} must be an integer")
                if not lo <= value <= hi:
                    raise SchemaError(f"params.{key}={value} outside [{lo}, {hi}]")
            elif key in JOB_TEXT_PARAMS:
                if value not in JOB_TEXT_PARAMS[key]:
                    raise SchemaError(f"params.{key} must be one of {JOB_TEXT_PARAMS[key]}")
            elif key in JOB_LIST_PARAMS:
                if not isinstance(value, list) or len(value) > JOB_LIST_PARAMS[key]:
                    raise SchemaError(f"params.{key} must be a list of at most "
                                      f"{JOB_LIST_PARAMS[key]} integers")
                for v in value:
                    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
                        raise SchemaError(f"params.{key} holds a bad integer {v!r}")
            else:
                raise SchemaError(f"unknown job parameter {key!r}")
        if self.kind == "evaluate" and self.params.get("score", "loss") not in SCORE_KINDS:
            raise SchemaError("evaluate jobs need a score kind")
        if not isinstance(self.limits, Limits):
            raise SchemaError("limits must be a Limits")
        self.limits.validate()
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> "Job":
        if not isinstance(d, dict):
            raise SchemaError("a job must be a JSON object")
        unknown = set(d) - {"job_id", "kind", "source", "model_kind", "inputs", "params", "limits",
                            "labels", "declaration"}
        if unknown:
            raise SchemaError(f"unknown job fields: {sorted(unknown)}")
        limits = d.get("limits") or {}
        if not isinstance(limits, dict) or set(limits) - set(Limits.__dataclass_fields__):
            raise SchemaError("bad limits")
        try:
            job = cls(job_id=d.get("job_id"), kind=d.get("kind"), source=d.get("source"),
                      model_kind=d.get("model_kind", "t5"), inputs=d.get("inputs") or {},
                      params=d.get("params") or {}, limits=Limits(**limits),
                      labels=d.get("labels", ""), declaration=d.get("declaration"))
        except TypeError as e:
            raise SchemaError(str(e)) from None
        return job.validate()

    @classmethod
    def from_json(cls, text: str | bytes) -> "Job":
        return cls.from_dict(strict_json(text))


@dataclass
class Result:
    """What comes back from a sandbox run. Data only; the score is the harness's own."""
    job_id: str
    kind: str
    status: str
    reason: str = ""
    score: float | None = None
    param_count: int | None = None
    losses: list[float] = field(default_factory=list)       # per training step
    eval_curve: list[float] = field(default_factory=list)   # per epoch, where there is one
    samples: list[list[int]] = field(default_factory=list)  # generate: token ids
    outputs: list[str] = field(default_factory=list)        # files written under out/
    duration_s: float = 0.0
    logs: str = ""                                          # bounded tail, added by the backend
    declaration: dict | None = None                         # declare: the Declaration
    lm_metrics: dict | None = None                          # train_lm: how well it copies
    usage: dict | None = None                               # what the sandbox cost, by the backend

    def validate(self) -> "Result":
        if not isinstance(self.job_id, str) or not _JOB_ID.match(self.job_id):
            raise SchemaError("result job_id is malformed")
        if self.kind not in JOB_KINDS:
            raise SchemaError("result kind is unknown")
        if self.status not in RESULT_STATUSES:
            raise SchemaError(f"result status {self.status!r} is unknown")
        _text(self.reason, "reason", MAX_REASON_CHARS)
        _text(self.logs, "logs", MAX_LOG_CHARS)
        if self.score is not None:
            _finite(self.score, "score")
        if self.param_count is not None:
            if isinstance(self.param_count, bool) or not isinstance(self.param_count, int) \
                    or not 0 <= self.param_count < 10**13:
                raise SchemaError("param_count must be a non-negative integer")
        self.losses = _curve(self.losses, "losses")
        self.eval_curve = _curve(self.eval_curve, "eval_curve")
        if not isinstance(self.samples, list) or len(self.samples) > MAX_SAMPLES:
            raise SchemaError(f"at most {MAX_SAMPLES} samples")
        for s in self.samples:
            if not isinstance(s, list) or len(s) > MAX_SAMPLE_TOKENS:
                raise SchemaError("a sample must be a list of token ids")
            for t in s:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**31:
                    raise SchemaError("token ids must be non-negative integers")
        if not isinstance(self.outputs, list) or len(self.outputs) > 4:
            raise SchemaError("at most 4 output files")
        for name in self.outputs:
            if not isinstance(name, str) or not _OUTPUT_FILE.match(name):
                raise SchemaError(f"output file name {name!r} is not allowed")
        _finite(self.duration_s, "duration_s")
        if self.declaration is not None:
            self.declaration = Declaration.from_dict(self.declaration).to_dict()
        if self.lm_metrics is not None:
            self.lm_metrics = _lm_metrics(self.lm_metrics)
        if self.usage is not None:
            self.usage = _usage(self.usage)
        if self.status == "ok" and self.kind == "declare" and self.declaration is None:
            raise SchemaError("an ok declare result must carry the declaration")
        if self.status == "ok" and self.kind == "evaluate" and self.score is None \
                and PREDICTIONS_FILE not in self.outputs:
            raise SchemaError("an ok evaluation must carry a score or its predictions")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Result":
        if not isinstance(d, dict):
            raise SchemaError("a result must be a JSON object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SchemaError(f"unknown result fields: {sorted(unknown)}")
        try:
            return cls(**d).validate()
        except TypeError as e:
            raise SchemaError(str(e)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "Result":
        return cls.from_dict(strict_json(text))

    @classmethod
    def failure(cls, job: Job, status: str, reason: str, **kw: Any) -> "Result":
        return cls(job_id=job.job_id, kind=job.kind, status=status,
                   reason=reason[:MAX_REASON_CHARS], **kw).validate()


def strict_json(text: str | bytes, limit: int = MAX_RESULT_BYTES) -> Any:
    """JSON from the other side of the sandbox boundary as Python data: at most `limit`
    bytes, UTF-8 only, no NaN or Infinity, no nesting past the parser's limit. The one
    JSON reader for sandbox documents (job.json, result.json, progress lines,
    safetensors headers); raises SchemaError."""
    if isinstance(text, bytes):
        if len(text) > limit:
            raise SchemaError(f"document larger than {limit} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SchemaError("document is not valid UTF-8") from None
    if len(text) > limit:
        raise SchemaError(f"document larger than {limit} bytes")

    def no_constants(name: str) -> Any:  # NaN / Infinity are not JSON
        raise SchemaError(f"non-finite number {name} in document")
    try:
        return json.loads(text, parse_constant=no_constants)
    except json.JSONDecodeError as e:
        raise SchemaError(f"not JSON: {e.msg}") from None
    except RecursionError:
        raise SchemaError("document nested too deeply") from None
