"""One place for configuration.

`Settings` is how this installation runs (database, broker, sandbox backend, limits);
it comes from `SELFPROG_*` environment variables, with CLI overrides on top.
`RunConfig` is what one experiment does (iterations, candidates, sizes); a preset
gives the defaults, the CLI overrides fields, and the whole of it is stored with the run
so a run can be resumed or repeated exactly.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from pipeline.bounds import Range, Rule, job_bound
from pipeline.catalog import UnknownTask, get_task
from pipeline.families import transformer
from pipeline.text import first_line
from sandbox.backends import BACKENDS as SANDBOX_BACKENDS   # auto, docker, process, process-unconfined
from sandbox.schema import (JOB_PARAMS, MAX_BATCH_SIZE, MAX_SAMPLES, MAX_TIMEOUT_S, OPTIMIZERS,
                            T5_CONFIG_KEYS)


# Pre-warmed sandboxes of the embedded default (one process runs every job in turn):
# two, because a self-task evaluation takes two at once (declare, then score:
# sandbox/runner.py); with one, the second step waited for a replacement to import
# torch (bench/bench_declare.py: 2.1x a one-step evaluation, against 1.0x with two).
EMBEDDED_PREWARM = 2


class ConfigError(ValueError):
    """Bad configuration: the message is meant for the user, one line."""


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///selfprog.db"
    broker_url: str = ""                      # empty: embedded (in-process, no broker)
    result_backend: str = ""                  # defaults to the broker URL
    artifact_dir: str = "selfprog-artifacts"
    data_dir: str = ""                        # torchvision data sets (mnist, cifar10, emnist)
    sandbox_backend: str = "auto"             # SANDBOX_BACKENDS: auto | docker | process
                                              # | process-unconfined (by name only)
    sandbox_image: str = "selfprog-sandbox:latest"
    sandbox_runtime: str = ""                 # e.g. runsc (gVisor) for the docker backend
    sandbox_gpus: str = ""                    # "" none, "all", or "0,1": device ids
    # The process backend's Python environment (sandbox/backends/runtime.py: the image's
    # package set only, built by `make setup`); the trusted venv is never bound.
    sandbox_python_prefix: str = "/opt/selfprog/sandbox-runtime"
    sandbox_memory_mb: int = 4096
    sandbox_cpus: float = 1.0
    sandbox_pids: int = 256
    # Pre-warmed sandboxes kept ready per process that runs sandbox jobs (imports done,
    # waiting for one job; where a backend cannot, e.g. the process backend without
    # root, every job runs cold). Unset, `from_env` makes it EMBEDDED_PREWARM for the
    # embedded default and 0 with a broker, where every sandbox worker process would
    # hold its own (docs/docker.md: size it against memory).
    sandbox_prewarm: int = 0
    allow_unconfined: bool = False            # run candidates even if the canary escapes
    device: str = "auto"                      # where the harness trains: cpu | cuda | auto
    # Redis broker: seconds before a message that a worker took but never acknowledged is
    # handed to another worker. Live workers renew the lease of the messages they hold
    # (pipeline/worker.py), so this bounds how long a dead worker's job waits, not how
    # long a job may run. Tests use a few seconds; see docs/deploy.md.
    visibility_timeout_s: float = 6 * 3600.0
    # The web view's access token (`selfprog-cli serve`, pipeline/web/): required when it
    # listens beyond the loopback interface. Kept out of repr so it never reaches a log.
    web_token: str = dataclasses.field(default="", repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> "Settings":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("SELFPROG_" + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw, "SELFPROG_" + f.name.upper())
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "sandbox_prewarm" not in values:
            values["sandbox_prewarm"] = 0 if values.get("broker_url") else EMBEDDED_PREWARM
        s = cls(**values)
        if s.sandbox_backend not in SANDBOX_BACKENDS:
            raise ConfigError(f"unknown sandbox backend {s.sandbox_backend!r} "
                              f"(choose {', '.join(SANDBOX_BACKENDS)})")
        if s.sandbox_prewarm < 0:
            raise ConfigError("SELFPROG_SANDBOX_PREWARM must be 0 (off) or more")
        if not s.visibility_timeout_s >= 2:
            raise ConfigError("SELFPROG_VISIBILITY_TIMEOUT_S must be at least 2 seconds")
        if s.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown device {s.device!r} (choose auto, cpu or cuda)")
        return s

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def artifacts(self) -> Path:
        return Path(self.artifact_dir)


@dataclass(frozen=True)
class RunConfig:
    """Everything one run of the loop does. Stored with the run, as JSON."""
    preset: str = "quick"
    task: str = "self"                 # "self": the LM programs itself; else a vision task
    # one arm per proposer (pipeline/proposers/): "lm" (the paper's), "random" (random
    # refinements, the control), "lineage" (the LM fine-tuned on the run's own lineage)
    arms: tuple[str, ...] = ("lm",)
    seed: int = 0
    iterations: int = 10
    candidates: int = 8
    # refinement dataset and tokenizer
    dataset_size: int = 4096
    vocab_size: int = 1024
    # the seed LM (paper: 2 encoder / 2 decoder layers, 8 heads, d_ff 1024, d_model 512)
    d_model: int = 512
    seed_layers: int = 2
    seed_decoder_layers: int = 2
    seed_heads: int = 8
    seed_d_ff: int = 1024
    lm_lr: float = 1e-3
    lm_batch_size: int = 16
    # training stage: until the LM copies its input (sandbox/lm_schedule.py: p_intact on
    # a held-out slice of the corpus reaches lm_copy_criterion, then the learning rate
    # decays to zero over lm_decay_steps), or until a cap: lm_budget_s of wall time,
    # lm_max_steps, lm_epochs over the corpus, whichever comes first
    lm_epochs: int = 3
    lm_max_steps: int = 0              # 0: no cap
    lm_copy_criterion: float = 0.8     # 0: no criterion, train lm_epochs/lm_max_steps
    lm_budget_s: float = 0.0           # 0: no budget
    lm_warmup_steps: int = 100
    lm_decay_steps: int = 300
    heldout_samples: int = 64          # refinement pairs the criterion is measured on
    # reprogramming stage (sampling)
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 512
    # draw sample_factor x candidates (the LM's samples, or random refinements) and keep
    # `candidates` of them, preferring distinct networks that differ from the input
    # (refinement.choose_distinct); 1: every draw is a candidate, as in the paper
    sample_factor: int = 1
    # the moves a refinement may make: "paper" (the paper's parameters), or a family's
    # larger space ("extended": a CNN's kernel size, learning rate and batch size too,
    # pipeline/families/cnn.py); the corpus and the random arm draw from the same space
    design_space: str = "paper"
    # the lineage arm: fine-tuning steps on the run's improving edits before sampling,
    # their learning rate, batch size and share of corpus pairs in each batch
    lineage_steps: int = 60
    lineage_lr: float = 3e-4
    lineage_batch: int = 16
    lineage_mix: float = 0.5
    # evaluation ("extended few-shot")
    fewshot_samples: int = 1024
    fewshot_epochs: int = 1
    rescore_tolerance: float = 0.01    # relative; a winner's second score must agree
    # an evaluation whose key (pipeline/evaluations.py) is stored already, by this run or
    # another, takes the stored outcome instead of a sandbox; the re-score of a would-be
    # winner always runs fresh
    reuse_evaluations: bool = True
    # programming other AI: training and evaluation subsets of the task
    train_samples: int = 10_000
    eval_samples: int = 2_000
    task_epochs: int = 2               # paper: each candidate network trains two epochs
    # sandbox bounds per job kind
    train_timeout_s: float = 3600.0
    eval_timeout_s: float = 900.0
    num_threads: int = 1
    max_candidate_params: int = 500_000_000
    # the `selfprog-cli sweep` this run is a cell of ("" for a plain launch)
    sweep: str = ""

    def with_overrides(self, **overrides: Any) -> "RunConfig":
        known = {f.name: f for f in fields(self)}
        clean: dict[str, Any] = {}
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in known:
                raise ConfigError(f"unknown run setting {k!r}")
            if k == "arms" and isinstance(v, str):
                v = tuple(a.strip() for a in v.split(",") if a.strip())
            clean[k] = _parse(known[k], v, k) if isinstance(v, str) and known[k].type != "str" else v
        return dataclasses.replace(self, **clean).validate()

    def validate(self) -> "RunConfig":
        """Every field within its bound (RUN_BOUNDS), then the rules between fields; all
        that is wrong in one ConfigError line, before anything of the run starts."""
        problems = [p for f in fields(self) if f.name in RUN_BOUNDS
                    for p in [RUN_BOUNDS[f.name].problem(f.name, getattr(self, f.name), f.type)]
                    if p]
        if not problems:     # the rules between fields assume each field in its bound
            problems = [p for rule in CROSS_FIELD_RULES for p in [rule(self)] if p]
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "arms" in values:
            values["arms"] = tuple(values["arms"])
        return cls(**values)


# ------------------------------------------------------------- RunConfig's bounds
# Every field of RunConfig has one (tests/pipeline/test_settings.py fails for a field
# without). A field that reaches a sandbox job takes that job parameter's own bound
# (sandbox/schema.py), so that no run is launched that its first job of that kind would
# refuse, after the LM has trained; the seed LM's design takes the transformer family's
# ranges; the rest what the loop can do anything sensible with.

def _known_preset(value: Any) -> str | None:
    if value not in PRESETS:
        return f"unknown preset {value!r} (choose {', '.join(sorted(PRESETS))})"
    return None


def _known_task(value: Any) -> str | None:
    try:
        get_task(value)
    except (UnknownTask, TypeError) as exc:
        return first_line(exc)
    return None


def _known_arms(value: Any) -> str | None:
    from pipeline.proposers import names   # (the proposers import what imports settings)
    arms = tuple(value) if isinstance(value, (tuple, list)) else ()
    unknown = [a for a in arms if a not in names()]
    if not arms or unknown or len(set(arms)) != len(arms):
        return (f"arms must be distinct names from {', '.join(names())}, got {value!r}"
                + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else ""))
    return None


def _flag(name: str) -> Rule:
    return Rule(lambda v: None if isinstance(v, bool) else f"{name} must be true or false, got {v!r}")


def _known_design_space(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return f"design_space must be a name, got {value!r}"
    return None


# A sweep's name names its figure file (<artifact-dir>/sweeps/<name>.png): one plain
# path component, never a path.
_SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def _sweep_name(value: Any) -> str | None:
    if value == "" or (isinstance(value, str) and _SWEEP_NAME.fullmatch(value)):
        return None
    return (f"sweep must be empty or a name of letters, digits, '_', '.' and '-' "
            f"(at most 96, not starting with '.', '_' or '-'), got {value!r}")


_DESIGN = transformer.RANGES
_SAMPLES = 10_000_000           # pairs or task samples: far past any machine's run
RUN_BOUNDS: dict[str, Range | Rule] = {
    "preset": Rule(_known_preset),
    "task": Rule(_known_task),
    "arms": Rule(_known_arms),
    "seed": Range(0, JOB_PARAMS["seed"][2]),         # and seed + iterations: a rule below
    "iterations": Range(1, 10_000),
    "candidates": Range(1, MAX_SAMPLES),
    "dataset_size": Range(1, _SAMPLES),
    "vocab_size": job_bound("vocab_size"),
    "d_model": Range(*T5_CONFIG_KEYS["d_model"][1:]),
    "seed_layers": Range(*_DESIGN["num_layers"]),
    "seed_decoder_layers": Range(*_DESIGN["num_decoder_layers"]),
    "seed_heads": Range(*_DESIGN["num_heads"]),
    "seed_d_ff": Range(*_DESIGN["d_ff"]),
    "lm_lr": Range(0, OPTIMIZERS["AdamW"]["lr"][2], open_lo=True),   # the seed LM's AdamW
    "lm_batch_size": Range(1, MAX_BATCH_SIZE),
    "lm_epochs": job_bound("epochs"),
    "lm_max_steps": job_bound("max_steps"),
    "lm_copy_criterion": job_bound("copy_criterion"),
    "lm_budget_s": job_bound("budget_s"),
    "lm_warmup_steps": job_bound("warmup_steps"),
    "lm_decay_steps": job_bound("decay_steps"),
    "heldout_samples": Range(1, _SAMPLES),
    "temperature": job_bound("temperature"),
    "top_k": job_bound("top_k"),
    "top_p": Range(0, 1, open_lo=True),              # 0 would keep no token
    "max_new_tokens": job_bound("max_new_tokens"),
    "sample_factor": Range(1, MAX_SAMPLES),          # and x candidates: a rule below
    "design_space": Rule(_known_design_space),       # and the task family's: a rule below
    "lineage_steps": job_bound("finetune_steps"),
    "lineage_lr": job_bound("finetune_lr"),
    "lineage_batch": job_bound("finetune_batch"),
    "lineage_mix": Range(0, 0.99),                   # 1 would leave no lineage pair a step
    "fewshot_samples": Range(1, _SAMPLES),           # and within dataset_size: a rule below
    "fewshot_epochs": job_bound("epochs"),
    "rescore_tolerance": Range(0, 1),
    "train_samples": Range(1, _SAMPLES),
    "eval_samples": Range(1, _SAMPLES),
    "task_epochs": job_bound("epochs"),
    "train_timeout_s": Range(0, MAX_TIMEOUT_S, open_lo=True),
    "eval_timeout_s": Range(0, MAX_TIMEOUT_S, open_lo=True),
    "num_threads": job_bound("num_threads"),
    "max_candidate_params": job_bound("max_params"),
    "sweep": Rule(_sweep_name),
    "reuse_evaluations": _flag("reuse_evaluations"),
}


def _draws_fit_one_generate_job(c: RunConfig) -> str | None:
    # the LM arm asks one generate job for every draw (pipeline/jobs.py)
    if c.candidates * c.sample_factor > MAX_SAMPLES:
        return (f"candidates x sample_factor is {c.candidates * c.sample_factor}, more than "
                f"the {MAX_SAMPLES} samples one generate job may return")
    return None


def _job_seeds_fit(c: RunConfig) -> str | None:
    # iteration i trains and samples with seed + i (pipeline/jobs.py)
    if c.seed + c.iterations - 1 > JOB_PARAMS["seed"][2]:
        return (f"seed + iterations - 1 must be at most {JOB_PARAMS['seed'][2]} (iteration i "
                "trains and samples with seed + i)")
    return None


def _fewshot_in_corpus(c: RunConfig) -> str | None:
    if c.fewshot_samples > c.dataset_size:   # the few-shot set is the corpus's first pairs
        return "fewshot_samples cannot exceed dataset_size"
    return None


def _heads_divide_d_model(c: RunConfig) -> str | None:
    if c.d_model % c.seed_heads:
        return "d_model must be divisible by seed_heads"
    return None


def _design_space_of_the_family(c: RunConfig) -> str | None:
    from pipeline.families import get_family
    spaces = getattr(get_family(get_task(c.task).family), "SPACES", {"paper": None})
    if c.design_space not in spaces:
        return f"design_space must be one of {', '.join(spaces)} for task {c.task}, got {c.design_space!r}"
    return None


CROSS_FIELD_RULES: tuple[Callable[[RunConfig], str | None], ...] = (
    _draws_fit_one_generate_job, _job_seeds_fit, _fewshot_in_corpus, _heads_divide_d_model,
    _design_space_of_the_family)


PRESETS: dict[str, RunConfig] = {
    # The paper's section 4.1 setting.
    "paper": RunConfig(preset="paper"),
    # Tiny sizes: a whole run finishes in minutes on a 2-core CPU machine.
    "quick": RunConfig(
        preset="quick", iterations=3, candidates=4, dataset_size=4096, vocab_size=512,
        # The seed LM of the measured recipe (docs/REPRODUCTION.md): heads of width 16,
        # AdamW 3e-3 after a 100-step warm-up, trained until it copies its input (p_intact
        # 0.8 on the held-out pairs, ~1,100-1,500 steps), then decayed over 200 steps; at
        # most 2,500 steps (a cap in steps, so that a run does not depend on the machine's
        # load) or 4 minutes; 4,096 pairs so that it does not memorise the corpus on the
        # way. A self-written LM that is bigger trains slower per step and may need more.
        # Criterion 0.8, not 0.6: on a quiet machine 0.6 gave 62% and 75% single edits in
        # two of three iterations, 0.8 gave 100% in all three for ~15 s more per LM.
        # Sampling at temperature 0.7 drops most of the template tokens a temperature-1
        # sample corrupts. Measured: docs/REPRODUCTION.md, bench/bench_core.py.
        d_model=64, seed_heads=4, seed_d_ff=256, lm_lr=3e-3, lm_batch_size=16, lm_epochs=20,
        lm_max_steps=2500, lm_budget_s=240.0, lm_copy_criterion=0.8, lm_decay_steps=200,
        temperature=0.7,
        max_new_tokens=96, train_samples=1000, eval_samples=300,
        # eval_timeout_s: an evaluation (64 steps) took up to ~100 s of wall time on the
        # 2-core machine under a load average of ~13; a slow but honest candidate must
        # not end as a timeout.
        train_timeout_s=600.0, eval_timeout_s=300.0,
        # The few-shot score ranks candidates, so it must measure learning: the whole
        # corpus twice (64 steps at batch 16). With 32 pairs (2 steps) it was mostly the
        # untrained model's loss, and one design scored under another seed moved more
        # than two designs differed (bench/bench_fewshot.py; numbers in bench/README.md).
        fewshot_samples=512, fewshot_epochs=2,
        # Few-shot loss favours bigger models, and every iteration trains its LM from
        # scratch: a cap (2.7x the seed LM) keeps a whole quick run within minutes.
        # A candidate above it ends invalid, with the reason.
        max_candidate_params=800_000,
    ),
    # The smallest run that goes through every stage, in about a minute: the LM (d_model
    # 32, heads of width 4) trains 8 epochs of 512 pairs (256 steps), stays on the
    # plateau where it writes the template with random numbers, and does not learn to
    # edit one parameter. For tests and for trying the service, not for results.
    "smoke": RunConfig(
        preset="smoke", iterations=3, candidates=4, dataset_size=512, vocab_size=512,
        d_model=32, lm_lr=1e-2, lm_batch_size=16, lm_epochs=8, lm_max_steps=0,
        max_new_tokens=96, train_samples=1000, eval_samples=300,
        train_timeout_s=600.0, eval_timeout_s=300.0, fewshot_samples=512, fewshot_epochs=2,
        max_candidate_params=800_000,
    ),
    # The paper's section 4.2 search (n=8 candidates, 5 iterations, 2 epochs per
    # candidate, seed network of one hidden layer of 16 units, LM of 2+2 layers, 8 heads,
    # d_ff 1024) with what a 2-core CPU affords: the quick preset's LM recipe (d_model 64
    # instead of 512, 4 heads, d_ff 256, 4,096 pairs with the header line, trained once
    # until it copies its input, at most 3,000 steps; sampled at temperature 0.7);
    # 2,000 training and 1,000 evaluation samples per task. docs/REPRODUCTION.md lists
    # every difference.
    "paper-vision-cpu": RunConfig(
        preset="paper-vision-cpu", iterations=5, candidates=8, task_epochs=2,
        arms=("lm", "random"), dataset_size=4096, vocab_size=512, d_model=64,
        seed_heads=4, seed_d_ff=256, lm_lr=3e-3, lm_batch_size=16, lm_epochs=20,
        lm_max_steps=3000, lm_copy_criterion=0.8, lm_decay_steps=200, temperature=0.7,
        max_new_tokens=256, sample_factor=2, fewshot_samples=32, train_samples=2000,
        eval_samples=1000, train_timeout_s=1800.0, eval_timeout_s=240.0,
    ),
}


# Programming another network (a task that is not self-programming, e.g. a vision task)
# changes two defaults of every preset, unless the run sets them itself:
# - arms: the random control arm runs beside the LM, same budget and seeds, same run;
# - max_new_tokens: at least 256, because CNN sources are longer than LM sources (~100
#   tokens against ~40 with the run's own tokenizer, the same for every design); a budget
#   near the source's length cuts off a candidate that wanders a little, and it ends
#   rejected as a syntax error.
VISION_ARMS = ("lm", "random")
VISION_MIN_NEW_TOKENS = 256


def preset(name: str, **overrides: Any) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose {', '.join(sorted(PRESETS))})")
    base = PRESETS[name]
    overrides = _fewshot_within_corpus(base, overrides)
    task = overrides.get("task") or base.task
    try:
        self_programming = get_task(task).self_programming
    except UnknownTask as exc:
        raise ConfigError(str(exc)) from None
    if not self_programming:
        vision: dict[str, Any] = {"arms": VISION_ARMS,
                                  "max_new_tokens": max(base.max_new_tokens, VISION_MIN_NEW_TOKENS)}
        overrides = {**vision, **{k: v for k, v in overrides.items() if v is not None}}
    return base.with_overrides(**overrides)


def _fewshot_within_corpus(base: RunConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The few-shot set is the first pairs of the refinement corpus: a run that shrinks
    the corpus below its preset's few-shot size, and names no few-shot size itself,
    scores on the whole (smaller) corpus instead of being refused."""
    if overrides.get("dataset_size") is None or overrides.get("fewshot_samples") is not None:
        return overrides
    try:
        size = int(overrides["dataset_size"])
    except (TypeError, ValueError):
        return overrides          # with_overrides reports it
    if 1 <= size < base.fewshot_samples:
        return {**overrides, "fewshot_samples": size}
    return overrides


def _parse(f: dataclasses.Field, raw: str, where: str) -> Any:
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{where}: {raw!r} is not a valid {typ}") from None
    return raw


def backend_kwargs(s: Settings) -> dict[str, Any]:
    """The keyword arguments of `sandbox.backends.make_backend` for these settings (the
    workers, pipeline/sandbox_task.py, and `selfprog-cli doctor` both use it); the
    translation itself is sandbox.backends.backend_options."""
    from sandbox.backends import backend_options
    return backend_options(s.sandbox_backend, image=s.sandbox_image, runtime=s.sandbox_runtime,
                           gpus=s.sandbox_gpus, prewarm=s.sandbox_prewarm,
                           allow_unconfined=s.allow_unconfined,
                           python_prefix=s.sandbox_python_prefix)
