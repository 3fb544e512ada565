"""Benchmark of the self-programming core. Not a test: it prints numbers.

    python bench/bench_core.py stages       # quick preset: seconds per stage of the loop
    python bench/bench_core.py overhead     # one evaluation: process sandbox vs in-process
    python bench/bench_core.py validity --preset quick --iterations 3 [--set k=v ...]
                                            # per iteration: the LM's training (steps, why it
                                            # stopped, held-out copy accuracy and p_intact),
                                            # and the fraction of generated candidates that
                                            # are valid and that change exactly one parameter
        [--effect-steps 600 --effect-seeds 3 --plot effect.png]
                                            # then Figure 2 at equal steps: each distinct LM
                                            # of the run (the seed, each selected one)
                                            # trained again for the same steps, data and
                                            # seeds; its loss against iteration 0's

Everything runs on the embedded default (SQLite in a temporary directory). Ratios are
measured side by side in the same process, so they compare like with like on this
machine; absolute seconds depend on the machine and on what else it is doing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import celery_app, refinement, runs, sandbox_task  # noqa: E402
from pipeline.store import store_for
from pipeline.jobs import RunContext  # noqa: E402
from pipeline.settings import Settings, preset  # noqa: E402


def _settings(tmp: Path, backend: str = "process") -> Settings:
    return Settings.from_env(database_url=f"sqlite:///{tmp / 'bench.db'}",
                             artifact_dir=str(tmp / "artifacts"), sandbox_backend=backend)


def seed_evaluation_job(settings: Settings, cfg):
    """The few-shot evaluation job of the seed source in a fresh run directory: what
    one candidate costs (bench_prewarm and bench_backends measure this job too)."""
    ctx = RunContext("bench", cfg, settings)
    ctx.prepare()
    return ctx.evaluate_job("lm", 0, 0, ctx.seed_source()).validate()


def stages(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        s = _settings(Path(d), args.backend)
        cfg = preset("quick", **_sets(args))
        t0 = time.monotonic()
        run_id = runs.launch(s, cfg)
        wall = time.monotonic() - t0
        store = store_for(s.database_url)
        print(f"quick preset, {cfg.iterations} iterations x {cfg.candidates} candidates, "
              f"backend {args.backend}: {wall:.1f} s wall")
        print(f"{'iter':>4} {'LM train s':>11} {'generate s':>11} {'evals':>6} {'eval s (sum)':>13} {'eval s (mean)':>14}")
        for it in store.iterations(run_id):
            evs = [c.duration_s for c in store.candidates(run_id, iteration=it.index)
                   if c.duration_s is not None]
            print(f"{it.index:>4} {it.lm_seconds or 0:>11.1f} {it.gen_seconds or 0:>11.1f} "
                  f"{len(evs):>6} {sum(evs):>13.1f} {statistics.mean(evs) if evs else 0:>14.2f}")


def overhead(args) -> None:
    """One few-shot evaluation of the seed source: sandboxed vs the harness in this process."""
    from sandbox import harness, runner

    with tempfile.TemporaryDirectory() as d:
        s = _settings(Path(d), args.backend)
        celery_app.configure(s)
        cfg = preset("quick", **_sets(args))
        job = seed_evaluation_job(s, cfg)
        backend = sandbox_task.backend()
        sandboxed, inproc = [], []
        for _ in range(args.repeat):
            t = time.monotonic()
            res = runner.run(job, Path(d) / "out", backend)
            sandboxed.append(time.monotonic() - t)
            assert res.status == "ok", res.reason
            root = Path(d) / f"inproc-{len(inproc)}"
            (root / "out").mkdir(parents=True)
            t = time.monotonic()
            # our own seed source, in a benchmark process: the in-process baseline
            ref = harness.run(job, root)
            inproc.append(time.monotonic() - t)
            assert ref.status == "ok" and abs(ref.score - res.score) < 1e-6, (ref.status, ref.score, res.score)
        a, b = statistics.median(sandboxed), statistics.median(inproc)
        print(f"one evaluation (quick preset, {cfg.fewshot_samples} few-shot samples), "
              f"median of {args.repeat}:")
        print(f"  {args.backend} sandbox : {a:.2f} s")
        print(f"  in-process      : {b:.2f} s")
        print(f"  ratio sandbox / in-process = {a / b:.1f}x   (fixed cost per sandbox {a - b:.2f} s)")


def validity(args) -> None:
    """Does the LM edit its input? Per iteration: how long its LM trained and why it
    stopped, how well it copies on the held-out pairs, and of its samples the share that
    are valid (evaluated) and that change exactly one design parameter."""
    from pipeline.catalog import get_task
    from pipeline.families import get_family

    with tempfile.TemporaryDirectory() as d:
        s = _settings(Path(d), args.backend)
        cfg = preset(args.preset, iterations=args.iterations, **_sets(args))
        family = get_family(get_task(cfg.task).family)
        t0 = time.monotonic()
        run_id = runs.launch(s, cfg)
        store = store_for(s.database_url)
        print(f"preset {args.preset}, task {cfg.task} ({cfg.iterations} iterations x "
              f"{cfg.candidates} candidates, d_model {cfg.d_model}, corpus {cfg.dataset_size}, "
              f"temperature {cfg.temperature}), {time.monotonic() - t0:.0f} s wall")
        print(f"{'iter':>4} {'LM steps':>8} {'stop':>9} {'LM s':>6} {'copy acc':>8} {'p_intact':>8} "
              f"{'generated':>9} {'valid':>6} {'one change':>10} {'no change':>9} {'decision':>9}")
        for it in store.iterations(run_id, arm="lm"):
            rows = store.candidates(run_id, iteration=it.index, arm="lm")
            inc = next(c for c in rows if c.role == "incumbent")
            gen = [c for c in rows if c.role == "candidate"]
            valid = [c for c in gen if c.status == "evaluated"]
            edits = [refinement.edits(family, inc.design, c.design) for c in gen]
            one, none = edits.count(1), edits.count(0)
            n = max(1, len(gen))
            acc = "-" if it.lm_copy_accuracy is None else f"{it.lm_copy_accuracy:.4f}"
            pi = "-" if it.lm_p_intact is None else f"{it.lm_p_intact:.3f}"
            print(f"{it.index:>4} {len(it.lm_losses or []):>8} {it.lm_stop or '-':>9} "
                  f"{it.lm_seconds or 0:>6.0f} {acc:>8} {pi:>8} {len(gen):>9} "
                  f"{len(valid) / n:>6.0%} {one / n:>10.0%} {none / n:>9.0%} "
                  f"{it.decision or '-':>9}")
        t = sandbox_task.templates(family.MODEL_KIND)
        if t is not None:
            print(f"declare sandboxes skipped (declaration derived from the design): {t.derived}")
        if args.effect_steps:
            effect(s, cfg, run_id, args.effect_steps, args.effect_seeds, args.plot)


def effect(s: Settings, cfg, run_id: str, steps: int, seeds: int, plot: str | None) -> None:
    """The self-programming effect of the paper's Figure 2, at equal steps: the LM each
    iteration trained (and the one the run selected last) trained again for `steps`
    optimizer steps on the run's corpus, under `seeds` seeds (the same ones for every
    LM), with the run's learning rate, no copy criterion and no time budget. A later LM
    whose loss is lower in the same steps learns faster per step; the seconds column
    says what its steps cost here. The loss compared is the mean over the last TAIL
    steps (a single step's loss is noisy), as mean and spread over the seeds."""
    from dataclasses import replace
    from sandbox import runner

    store = store_for(s.database_url)
    celery_app.configure(s)
    its = store.iterations(run_id, arm="lm")
    lms: list[tuple[str, str]] = [(f"iteration {it.index}", it.source_in) for it in its]
    last = its[-1].selected_id if its else None
    if last is not None:
        lms.append(("selected last", store.get_candidate(last).source))
    fixed = replace(cfg, lm_copy_criterion=0.0, lm_budget_s=0.0, lm_max_steps=steps,
                    lm_epochs=max(cfg.lm_epochs, 1000))
    ctx = RunContext(run_id, fixed, s)      # the run's own directory: the same corpus
    backend = sandbox_task.backend()
    seen: dict[str, str] = {}
    curves: list[tuple[str, list[float]]] = []
    print(f"\nFigure 2 at equal steps: each LM trained {steps} steps under seeds "
          f"{cfg.seed}..{cfg.seed + seeds - 1}, lr {cfg.lm_lr}; loss: mean of the last "
          f"{TAIL} steps, mean +- std over the seeds")
    print(f"{'LM':<16} {'design (d_ff/enc+dec/heads)':>27} {'loss':>16} {'vs it 0':>8} "
          f"{'s per run':>9}")
    base = None
    for name, source in lms:
        if source in seen:
            print(f"{name:<16} (the same source as {seen[source]})")
            continue
        seen[source] = name
        finals, runs_s, mean_curve, failed = [], [], None, ""
        for k in range(seeds):
            job = ctx.train_job("lm", k, source)   # seed cfg.seed + k, for every LM alike
            with tempfile.TemporaryDirectory() as out:
                res = runner.run(job, Path(out), backend)
            if res.status != "ok":
                failed = f"{res.status}: {res.reason[:80]}"
                break
            losses = [x for x in res.losses if x is not None]
            finals.append(statistics.mean(losses[-TAIL:]))
            runs_s.append(res.duration_s)
            mean_curve = losses if mean_curve is None else [
                (m * k + x) / (k + 1) for m, x in zip(mean_curve, losses)]
        if failed:
            print(f"{name:<16} {failed}")
            continue
        m = statistics.mean(finals)
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        base = m if base is None else base
        curves.append((name, mean_curve))
        d = (res.declaration or {}).get("model", {})
        size = (f"{d.get('d_ff', '?')}/{d.get('num_layers', '?')}+"
                f"{d.get('num_decoder_layers', '?')}/{d.get('num_heads', '?')}")
        print(f"{name:<16} {size:>27} {m:>9.4f} +-{sd:.4f} {m / base:>8.3f} "
              f"{statistics.median(runs_s):>9.0f}")
    if plot and curves:
        _plot_effect(curves, steps, seeds, Path(plot))
        print(f"plot: {plot}")


TAIL = 100


def _plot_effect(curves, steps: int, seeds: int, path: Path) -> None:
    from matplotlib.figure import Figure

    from pipeline.plots import smooth

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, losses in curves:
        ax.plot(*smooth(losses, 25), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LM training loss (nats/token, smoothed)")
    ax.set_yscale("log")
    ax.set_title(f"Each selected LM trained {steps} steps on the same corpus "
                 f"(mean of {seeds} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def _sets(args) -> dict:
    out = {}
    for item in args.set or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["stages", "overhead", "validity"])
    p.add_argument("--backend", default="process", choices=["process", "docker"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--effect-steps", type=int, default=0,
                   help="validity: then train every LM of the run this many steps (Figure 2)")
    p.add_argument("--effect-seeds", type=int, default=3,
                   help="validity --effect-steps: seeds per LM")
    p.add_argument("--plot", help="validity --effect-steps: write the curves to this PNG")
    a = p.parse_args()
    {"stages": stages, "overhead": overhead, "validity": validity}[a.what](a)
