"""Three proposers at equal evaluation budget, on searches where the proposer matters.
Not a test: it prints numbers.

    python bench/bench_proposers.py --tasks digits,mnist5k --seeds 0,1,2,3,4 \\
        [--arms random,lm,lineage] [--iterations 8] [--candidates 2] [--set KEY=VALUE ...] \\
        [--database-url URL] [--plot proposers.png]

The search is not exhaustive: 2 candidates per iteration (every draw a candidate,
sample_factor 1) in the CNN family's extended design space (pipeline/families/cnn.py:
kernel size, learning rate and batch size beside the paper's four parameters; from a
design 8-14 one-step moves exist), so which moves a proposer tries decides what the
search finds. Per task and seed, one run of `paper-vision-cpu` with every arm side by side
(same seed network, same data, same evaluations per iteration); the self task uses the
`quick` preset (the LM programs itself).

Per arm it reads the best score seen against evaluations spent (pipeline/report.py
`best_so_far`: every candidate row of the arm counts, a rejected or invalid one too, the
incumbent's evaluation in each iteration included; all arms of a run spend the same
number), and reports at the budget they all reached: the mean over seeds with a 95%
t-interval, and per task the paired differences lineage - random and lineage - lm (the
same seed is one pair), with their 95% interval and how many seeds each arm won. A
difference whose interval excludes 0 is one the seeds resolve; otherwise the bench says
"not resolved". With --database-url, a completed run of the same configuration is read
back instead of launched again (an interrupted bench resumes; several benches over other
seeds can run side by side, each into its own database, and one more with every
database given reads them all).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import report, runs  # noqa: E402
from pipeline.cli.run import parse_sets  # noqa: E402
from pipeline.settings import ConfigError, RunConfig, Settings, preset  # noqa: E402

# two-sided 95% critical values of Student's t, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (0 for a single value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    df = len(values) - 1
    t = T95.get(df) or T95[min(k for k in T95 if k >= df)] if df <= 30 else 1.96
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def config_for(task: str, seed: int, arms: tuple[str, ...], args, sets: dict) -> RunConfig:
    if task == "self":
        base = dict(preset="quick", iterations=args.iterations, candidates=args.candidates)
    else:
        base = dict(preset="paper-vision-cpu", iterations=args.iterations,
                    candidates=args.candidates, design_space="extended")
    name = base.pop("preset")
    return preset(name, task=task, seed=seed, arms=",".join(arms), sample_factor=1,
                  **{**base, **sets})


def measure(store, run_id: str, arms: tuple[str, ...], better: str) -> dict:
    candidates, iterations = store.candidates(run_id), store.iterations(run_id)
    curves = {arm: report.best_so_far(candidates, arm, better) for arm in arms}
    tuned = [it for it in iterations if it.arm == "lineage" and it.finetune_losses]
    repeats = {arm: [it.repeat_rate for it in iterations if it.arm == arm and it.repeat_rate is not None]
               for arm in arms}
    return {"run": run_id, "curves": curves,
            "tuned_iterations": len(tuned),
            "repeat": {a: statistics.mean(v) if v else None for a, v in repeats.items()}}


def at_budget(curve: list[tuple[int, float]], budget: int) -> float:
    return [b for n, b in curve if n <= budget][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,mnist5k")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--arms", default="random,lm,lineage")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--database-url", action="append",
                   help="lineage DB to read finished runs from and add new ones to; repeated: "
                        "read from each, launch into the first (benches run side by side)")
    p.add_argument("--backend", default="process", choices=["process", "docker"])
    p.add_argument("--plot", help="best score against evaluations spent, per task, to this PNG")
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    try:   # every configuration first: a bad --set stops the bench before any run starts
        sets = parse_sets(args.set or [])
        configs = {(task, seed): config_for(task, seed, arms, args, sets)
                   for task in tasks for seed in seeds}
    except ConfigError as exc:
        raise SystemExit(f"bench_proposers: {exc}")

    with tempfile.TemporaryDirectory() as d:
        urls = args.database_url or [f"sqlite:///{Path(d) / 'bench.db'}"]
        url = urls[0]
        settings = Settings.from_env(database_url=url, artifact_dir=str(Path(d) / "artifacts"),
                                     sandbox_backend=args.backend)
        results: dict[str, list[dict]] = {}
        for (task, seed), cfg in configs.items():
            try:
                store, run_id, seconds = runs.read_back_or_launch(settings, cfg, urls)
            except runs.RunStateError as exc:
                raise SystemExit(f"{task}, seed {seed}: {exc}")
            how = "read back" if seconds is None else f"launched, {seconds:.0f} s"
            results.setdefault(task, []).append(
                {**measure(store, run_id, arms, report.direction(task)), "seed": seed})
            print(f"{task} seed {seed}: run {run_id} ({how})", flush=True)
        print_tables(results, arms, args)
        if args.plot:
            plot(results, arms, Path(args.plot))
            print(f"plot: {args.plot}")


def print_tables(results: dict[str, list[dict]], arms: tuple[str, ...], args) -> None:
    print(f"\n{args.candidates} candidates x {args.iterations} iterations per arm, "
          "best score at equal evaluations (mean +- 95% interval over seeds)")
    for task, rows in results.items():
        better = report.direction(task)
        budget = min(r["curves"][a][-1][0] for r in rows for a in arms)
        finals = {a: [at_budget(r["curves"][a], budget) for r in rows] for a in arms}
        print(f"\n{task} ({len(rows)} seeds, {budget} evaluations per arm, "
              f"{'higher' if better == 'max' else 'lower'} is better)")
        print(f"  {'seed':>4} {'run':<12} " + " ".join(f"{a:>9}" for a in arms)
              + "  lineage fine-tuned in / repeats of improving moves (lm, lineage)")
        for r, *vals in zip(rows, *finals.values()):
            rep = r["repeat"]
            print(f"  {r['seed']:>4} {r['run']:<12} " + " ".join(f"{v:>9.4f}" for v in vals)
                  + f"  {r['tuned_iterations']} it. / "
                  + ", ".join("-" if rep.get(a) is None else f"{rep[a]:.0%}" for a in ("lm", "lineage")))
        for a in arms:
            m, h = interval(finals[a])
            print(f"  {a:<8} {m:.4f} +- {h:.4f}")
        if "lineage" not in arms:
            continue
        sign = 1 if better == "max" else -1
        for other in (a for a in arms if a != "lineage"):
            gains = [sign * (x - y) for x, y in zip(finals["lineage"], finals[other])]
            m, h = interval(gains)
            wins = sum(g > 0 for g in gains)
            ties = sum(g == 0 for g in gains)
            verdict = ("lineage better" if m - h > 0 else "lineage worse" if m + h < 0
                       else "not resolved")
            print(f"  lineage - {other:<7} gain {m:+.4f} +- {h:.4f} (paired; positive: lineage "
                  f"better) wins {wins}, ties {ties}, losses {len(gains) - wins - ties}: {verdict}")


def plot(results: dict[str, list[dict]], arms: tuple[str, ...], path: Path) -> None:
    from matplotlib.figure import Figure

    from pipeline.plots import ARM_STYLE
    fig = Figure(figsize=(5 * len(results), 3.8))
    for k, (task, rows) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), k + 1)
        budget = min(r["curves"][a][-1][0] for r in rows for a in arms)
        xs = list(range(1, budget + 1))
        for arm in arms:
            per_seed = [[at_budget(r["curves"][arm], n) for n in xs] for r in rows]
            stats = [interval(list(v)) for v in zip(*per_seed)]
            colour = ARM_STYLE.get(arm, {}).get("color")
            ax.plot(xs, [m for m, _ in stats], color=colour, label=f"{arm} (mean of {len(rows)})")
            ax.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats],
                            color=colour, alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("evaluations spent")
        ax.set_ylabel("best score so far (95% interval)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


if __name__ == "__main__":
    main()
