"""Benchmark: does the few-shot score measure learning, or the luck of one seed?

    python bench/bench_fewshot.py [--designs 6] [--seeds 3]
                                  [--variant NAME:key=value,key=value ...]

A run keeps the candidate with the best few-shot score, so the score must tell designs
apart by more than it moves when one design is scored again under another seed (the
job's seed sets the initial weights and the order of the few-shot pairs). For each
variant of the quick preset this bench scores K distinct transformer designs, sampled
from the family's ranges within the preset's `max_candidate_params`, under S seeds, each
exactly as a run scores a candidate (`RunContext.evaluate_job`, one fresh process
sandbox per evaluation), and prints side by side:

    between   std of the K design means (how far apart designs score)
    within    mean over designs of the std over seeds (how far one design moves)
    ratio     between / within: well above 1 means the ranking is the designs'
    eval s    median wall time of one evaluation, sandbox start included
    fit s     the last of those jobs run again in this process, no sandbox: the
              training itself, i.e. about what an evaluation costs in a warm sandbox

The default variants are the quick preset's few-shot set before it was enlarged
(32 pairs, 1 epoch) and the quick preset as it is now. Every variant uses the same
designs and seeds; each variant's run directory is prepared once (corpus, tokenizer,
few-shot tensors), as `launch` prepares one. Absolute seconds depend on the machine
and on what else it is doing.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.families import transformer  # noqa: E402
from pipeline.jobs import RunContext  # noqa: E402
from pipeline.settings import RunConfig, Settings, preset  # noqa: E402
from sandbox import runner  # noqa: E402
from sandbox.backends import make_backend  # noqa: E402

# The quick preset's few-shot set before it was enlarged: 32 pairs at batch 16,
# i.e. two optimizer steps per evaluation.
BEFORE = "before:fewshot_samples=32,fewshot_epochs=1"


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    sets = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, _, v = item.partition("=")
        sets[k.strip()] = v.strip()
    return name, sets


def param_count(design, vocab_size: int) -> int:
    """Trainable parameters of a design's model, counted as the harness counts them."""
    ns: dict = {}
    exec(compile(transformer.render(design), "<design>", "exec"), ns)   # our own rendering
    model = ns["build_model"](vocab_size)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def sample_designs(cfg: RunConfig, vocab_size: int, k: int, seed: int) -> list:
    """K distinct designs of the family that fit under the preset's parameter cap."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(10_000):
        d = transformer.sample_design(rng, cfg)
        key = tuple(d.params().values())
        if key in seen or param_count(d, vocab_size) > cfg.max_candidate_params:
            continue
        seen.add(key)
        out.append(d)
        if len(out) == k:
            return out
    raise SystemExit(f"found only {len(out)} designs under {cfg.max_candidate_params} parameters")


def score_variant(name: str, cfg: RunConfig, settings: Settings, backend, designs: list,
                  seeds: list[int], work: Path) -> dict:
    ctx = RunContext(f"fewshot-{name}", cfg, settings)
    ctx.prepare()
    scores: list[list[float]] = []
    times: list[float] = []
    for i, d in enumerate(designs):
        d = dataclasses.replace(d, d_model=cfg.d_model, lr=cfg.lm_lr, batch_size=cfg.lm_batch_size)
        row = []
        for s in seeds:
            job = ctx.evaluate_job("lm", 0, i, transformer.render(d))
            job = dataclasses.replace(job, job_id=f"{job.job_id}.s{s}",
                                      params={**job.params, "seed": s}).validate()
            out = work / name / f"d{i}-s{s}"
            out.mkdir(parents=True)
            t = time.monotonic()
            res = runner.run(job, out, backend)
            times.append(time.monotonic() - t)
            if res.status != "ok":
                raise SystemExit(f"{name}: design {d.params()} seed {s}: {res.status}: {res.reason}")
            row.append(res.score)
            print(f"  {name:<10} design {i} {d.params()} seed {s}: {res.score:.4f} "
                  f"({times[-1]:.1f} s, {len(res.losses)} steps)", flush=True)
        scores.append(row)
    # the same job in this process, no sandbox: what the training itself costs
    from sandbox import harness
    root = work / name / "inproc"
    (root / "out").mkdir(parents=True)
    t = time.monotonic()
    ref = harness.run(job, root)
    fit_s = time.monotonic() - t
    assert ref.status == "ok", ref.reason
    means = [statistics.mean(r) for r in scores]
    between = statistics.stdev(means)
    within = statistics.mean(statistics.stdev(r) for r in scores)
    return {"name": name, "cfg": cfg, "scores": scores, "between": between, "within": within,
            "ratio": between / within if within > 0 else float("inf"),
            "identical": all(len(set(r)) == 1 for r in scores),
            "eval_s": statistics.median(times), "fit_s": fit_s, "steps": len(res.losses)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--designs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--design-seed", type=int, default=1, help="seed of the design sampler")
    p.add_argument("--variant", action="append", metavar="NAME:k=v,k=v",
                   help=f"a variant of the quick preset (default: {BEFORE!r} and 'quick:')")
    a = p.parse_args()
    variants = [parse_variant(v) for v in (a.variant or [BEFORE, "quick:"])]
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        settings = Settings.from_env(database_url=f"sqlite:///{work / 'bench.db'}",
                                     artifact_dir=str(work / "artifacts"),
                                     sandbox_backend="process", sandbox_prewarm=0)
        backend = make_backend("process", allow_unconfined=settings.allow_unconfined)
        configs = [(name, preset("quick", **sets)) for name, sets in variants]
        # one set of designs for every variant (the structural parameters; d_model,
        # learning rate and batch follow each variant's preset)
        first = RunContext("fewshot-designs", configs[0][1], settings)
        first.prepare()
        designs = sample_designs(configs[0][1], first.tokenizer.get_vocab_size(),
                                 a.designs, a.design_seed)
        rows = [score_variant(name, cfg, settings, backend, designs, seeds, work)
                for name, cfg in configs]
    quick = preset("quick")
    evals = quick.iterations * (quick.candidates + 1)
    print()
    print(f"{a.designs} designs x {a.seeds} seeds, process sandbox; quick run = "
          f"{quick.iterations} iterations x {quick.candidates} candidates (+1 incumbent or rescore "
          f"each) ~ {evals} evaluations")
    print(f"{'variant':<10} {'samples':>7} {'epochs':>6} {'steps':>5} {'between':>8} {'within':>8} "
          f"{'ratio':>6} {'eval s':>7} {'fit s':>6} {'run evals s':>11}")
    for r in rows:
        c = r["cfg"]
        print(f"{r['name']:<10} {c.fewshot_samples:>7} {c.fewshot_epochs:>6} {r['steps']:>5} "
              f"{r['between']:>8.4f} {r['within']:>8.4f} {r['ratio']:>6.1f} {r['eval_s']:>7.1f} "
              f"{r['fit_s']:>6.1f} {r['eval_s'] * evals:>11.0f}")
        if r["identical"]:
            print(f"{'':<10} (every design scored the same under every seed)")
    print()
    print("design means per variant (the designs' order, best first per variant):")
    for r in rows:
        means = [statistics.mean(s) for s in r["scores"]]
        order = sorted(range(len(means)), key=means.__getitem__)
        print(f"  {r['name']:<10} " + "  ".join(f"d{i}={means[i]:.3f}" for i in order))
    for i, d in enumerate(designs):
        print(f"  d{i}: {d.params()}")


if __name__ == "__main__":
    main()
