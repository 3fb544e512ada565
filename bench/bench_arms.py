"""The LM arm against the random arm on vision tasks, over seeds. Not a test: it prints numbers.

    python bench/bench_arms.py --tasks digits,mnist5k --seeds 0,1,2 \\
        [--preset paper-vision-cpu] [--set KEY=VALUE ...] [--database-url URL] [--plot arms.png]

For each task and seed, one run of the preset (both arms: the LM refines the network, the
control arm applies random single-parameter refinements, same budget and seeds, same
run), on the embedded default with the process sandbox. With --database-url, a completed
run of the same task, preset, seed and settings already in that lineage database is
read instead of launched again (so runs made with `selfprog-cli launch` count, and an
interrupted bench resumes); new runs go into that database too. Without it, runs go to a
temporary SQLite database.

Per run it prints the seed network's accuracy, each arm's final accuracy (the network
the last iteration selected), the share of the LM arm's candidates that were valid
(built, trained and scored), and the share of the LM's samples that changed exactly one
design parameter of their input (the iterations' recorded rate: every sample it wrote,
also those a sample_factor > 1 did not keep as candidates). Per task: means over seeds
with the sample standard deviation, LM minus random per seed, and each of the reproduction's targets (LM valid >= 80%,
single edits >= 70%, LM end no more than 1 point below random) met or missed.
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
from pipeline.settings import ConfigError, Settings, preset  # noqa: E402

VALID_TARGET, SINGLE_TARGET, GAP_TARGET = 0.80, 0.70, -0.01


def measure(store, run_id: str) -> dict:
    iterations, candidates = store.iterations(run_id), store.candidates(run_id)
    outcomes = report.arm_outcomes(iterations, candidates)
    written = [c for c in candidates if c.arm == "lm" and c.role == "candidate"]
    generated = len(written)
    valid = sum(c.status == "evaluated" for c in written)
    # measured on every sample the LM wrote, also those a sample_factor > 1 left out
    rates = [i.single_edit_rate for i in iterations if i.arm == "lm" and i.single_edit_rate is not None]
    lm0 = next(i for i in iterations if i.arm == "lm" and i.index == 0)
    by_id = {c.id: c for c in candidates}
    # per iteration, the accuracy of the network it selected (the incumbent's, if kept)
    curves = {arm: [by_id[it.selected_id].score for it in sorted(iterations, key=lambda i: i.index)
                    if it.arm == arm] for arm in report.arm_order(it.arm for it in iterations)}
    return {"run": run_id, "start": outcomes["lm"]["start"], "lm": outcomes["lm"]["end"],
            "random": outcomes["random"]["end"], "generated": generated,
            "valid": valid / max(1, generated),
            "single": statistics.mean(rates) if rates else 0.0,
            "lm_steps": len(lm0.lm_losses or []), "p_intact": lm0.lm_p_intact,
            "curves": curves}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.1%} +- {sd:4.1%}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="digits,mnist5k")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--preset", default="paper-vision-cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--database-url", help="lineage DB to read finished runs from and add new ones to")
    p.add_argument("--backend", default="process", choices=["process", "docker"])
    p.add_argument("--plot", help="write each arm's accuracy per iteration (mean and range) to this PNG")
    args = p.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:   # every configuration first: a bad --set stops the bench before any run starts
        configs = {(task, seed): preset(args.preset, task=task, seed=seed,
                                        **parse_sets(args.set or []))
                   for task in tasks for seed in seeds}
    except ConfigError as exc:
        raise SystemExit(f"bench_arms: {exc}")

    with tempfile.TemporaryDirectory() as d:
        url = args.database_url or f"sqlite:///{Path(d) / 'bench.db'}"
        settings = Settings.from_env(database_url=url, artifact_dir=str(Path(d) / "artifacts"),
                                     sandbox_backend=args.backend)
        results: dict[str, list[dict]] = {}
        for (task, seed), cfg in configs.items():
            try:
                store, run_id, seconds = runs.read_back_or_launch(settings, cfg, [url])
            except runs.RunStateError as exc:
                raise SystemExit(f"{task}, seed {seed}: {exc}")
            how = "read back" if seconds is None else f"launched, {seconds:.0f} s"
            results.setdefault(task, []).append({**measure(store, run_id), "seed": seed})
            print(f"{task} seed {seed}: run {run_id} ({how})", flush=True)
        print_table(args.preset, results)
        if args.plot:
            plot(results, Path(args.plot))
            print(f"plot: {args.plot}")


def print_table(preset_name: str, results: dict[str, list[dict]]) -> None:
    print(f"\npreset {preset_name}; accuracy on the evaluation subset, LM arm's generated candidates")
    print(f"{'task':<9} {'seed':>4} {'run':<12} {'start':>6} {'LM end':>7} {'random end':>10} "
          f"{'LM-rand':>8} {'LM valid':>8} {'1 edit':>7} {'LM steps':>8} {'p_intact':>8}")
    for task, rows in results.items():
        for r in rows:
            print(f"{task:<9} {r['seed']:>4} {r['run']:<12} {r['start']:>6.1%} {r['lm']:>7.1%} "
                  f"{r['random']:>10.1%} {(r['lm'] - r['random']) * 100:>+7.1f}p "
                  f"{r['valid']:>8.0%} {r['single']:>7.0%} {r['lm_steps']:>8} "
                  f"{r['p_intact'] if r['p_intact'] is not None else float('nan'):>8.2f}")
    print(f"\n{'task':<9} {'seeds':>5} {'LM end':>15} {'random end':>15} {'LM - random':>14} "
          f"{'LM valid':>8} {'1 edit':>7}  targets")
    for task, rows in results.items():
        gaps = [r["lm"] - r["random"] for r in rows]
        generated = sum(r["generated"] for r in rows)
        valid = sum(r["valid"] * r["generated"] for r in rows) / max(1, generated)
        single = statistics.mean(r["single"] for r in rows)
        gap_sd = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        checks = [("valid", valid >= VALID_TARGET), ("1 edit", single >= SINGLE_TARGET),
                  ("within 1 point", statistics.mean(gaps) >= GAP_TARGET)]
        print(f"{task:<9} {len(rows):>5} {spread([r['lm'] for r in rows]):>15} "
              f"{spread([r['random'] for r in rows]):>15} "
              f"{statistics.mean(gaps) * 100:>+6.1f} +- {gap_sd * 100:.1f}p "
              f"{valid:>8.0%} {single:>7.0%}  "
              + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in checks))


def plot(results: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.figure import Figure

    from pipeline.plots import ARM_STYLE

    fig = Figure(figsize=(5 * len(results), 3.8))
    for k, (task, rows) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), k + 1)
        for arm in rows[0]["curves"]:   # every arm the runs ran (the registry's order)
            colour = ARM_STYLE.get(arm, {}).get("color")
            # iteration -1 is the seed network, the same for every arm
            curves = [[r["start"], *r["curves"][arm]] for r in rows]
            xs = list(range(-1, len(curves[0]) - 1))
            per_step = list(zip(*curves))
            ax.plot(xs, [statistics.mean(v) for v in per_step], color=colour,
                    label=f"{arm} arm (mean of {len(rows)} seeds)")
            ax.fill_between(xs, [min(v) for v in per_step], [max(v) for v in per_step],
                            color=colour, alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("iteration (-1: the seed network)")
        ax.set_ylabel("accuracy of the selected network")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


if __name__ == "__main__":
    main()
