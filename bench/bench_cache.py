"""The evaluation cache, on against off, side by side. Not a test: it prints numbers.

    python bench/bench_cache.py [--task digits] [--seeds 0] [--preset paper-vision-cpu]
        [--set KEY=VALUE ...]

For each seed, the same run twice on the embedded default with the process sandbox: once
with `reuse_evaluations=false` (every candidate, incumbents included, in a sandbox of its
own), once with it on (a candidate whose evaluation key, pipeline/evaluations.py, is
stored already takes the stored outcome). Each run gets a fresh lineage database, so
the run with reuse on starts from an empty cache: what it saves it saves within the run
(incumbents scored again, byte-identical candidates). The seed's order alternates (off
first, then on first) so that neither arm always runs on the warmer machine.

Per run: sandbox evaluations (candidates scored in a sandbox of their own, plus the
would-be winners' fresh re-scores, which never reuse), evaluations reused, the run's wall
time, and each arm's final network and accuracy; then the ratios, and whether the final
results are identical (the same selected source and score in every arm and iteration).

The defaults shrink paper-vision-cpu (3 iterations, 4 candidates, a short LM training,
smaller data subsets: the `SMALL` settings below) so that one seed takes a few minutes on
a loaded 2-core machine; `--full` runs the preset as it is.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import runs  # noqa: E402
from pipeline.cli.run import parse_sets  # noqa: E402
from pipeline.settings import ConfigError, Settings, preset  # noqa: E402
from pipeline.store import LineageStore  # noqa: E402

SMALL = {"iterations": "3", "candidates": "4", "dataset_size": "512", "lm_epochs": "2",
         "lm_max_steps": "150", "train_samples": "600", "eval_samples": "300"}


def measure(url: str, run_id: str) -> dict:
    with LineageStore(url) as store:
        run = store.get_run(run_id)
        cands, its = store.candidates(run_id), store.iterations(run_id)
    by_id = {c.id: c for c in cands}
    scored = [c for c in cands if c.evaluation_key]
    selected = [(it.arm, it.index, by_id[it.selected_id].sha256, by_id[it.selected_id].score)
                for it in sorted(its, key=lambda i: (i.arm, i.index))]
    return {"status": run.status, "error": run.error,
            "sandbox": sum(not c.reused for c in scored) + sum(c.rescore is not None for c in cands),
            "reused": sum(c.reused for c in scored), "selected": selected,
            "end": {arm: sel[-1][3] for arm in ("lm", "random")
                    for sel in [[s for s in selected if s[0] == arm]] if sel}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="digits")
    p.add_argument("--seeds", default="0")
    p.add_argument("--preset", default="paper-vision-cpu")
    p.add_argument("--full", action="store_true", help="the preset as it is, without SMALL")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    sets = {**({} if args.full else SMALL), **parse_sets(args.set or [])}
    try:
        configs = {(seed, reuse): preset(args.preset, task=args.task, seed=seed,
                                         **{**sets, "reuse_evaluations": str(reuse)})
                   for seed in seeds for reuse in (False, True)}
    except ConfigError as exc:
        raise SystemExit(f"bench_cache: {exc}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n, seed in enumerate(seeds):
            pair = {}
            for reuse in ((False, True) if n % 2 == 0 else (True, False)):
                url = f"sqlite:///{Path(d) / f'seed{seed}-{reuse}.db'}"
                settings = Settings.from_env(database_url=url,
                                             artifact_dir=str(Path(d) / f"art-{seed}-{reuse}"),
                                             sandbox_backend="process")
                t0 = time.monotonic()
                run_id = runs.launch(settings, configs[(seed, reuse)])
                m = {**measure(url, run_id), "wall_s": time.monotonic() - t0}
                if m["status"] != "completed":
                    raise SystemExit(f"seed {seed} reuse={reuse}: {m['status']}: {m['error']}")
                pair[reuse] = m
                print(f"seed {seed} reuse {'on ' if reuse else 'off'}: run {run_id}, "
                      f"{m['wall_s']:.0f} s", flush=True)
            rows.append((seed, pair))
    print(f"\n{args.task}, preset {args.preset}"
          + ("" if args.full else " with " + " ".join(f"{k}={v}" for k, v in SMALL.items()))
          + "; process sandbox, embedded; reuse off vs on, side by side")
    print(f"{'seed':>4} {'sandbox off':>11} {'sandbox on':>10} {'reused':>6} {'evals on/off':>12} "
          f"{'wall off':>8} {'wall on':>7} {'wall on/off':>11} {'LM end':>7} {'random end':>10} "
          f"{'identical':>9}")
    for seed, pair in rows:
        off, on = pair[False], pair[True]
        same = off["selected"] == on["selected"]
        print(f"{seed:>4} {off['sandbox']:>11} {on['sandbox']:>10} {on['reused']:>6} "
              f"{on['sandbox'] / off['sandbox']:>12.2f} {off['wall_s']:>7.0f}s {on['wall_s']:>6.0f}s "
              f"{on['wall_s'] / off['wall_s']:>11.2f} {on['end'].get('lm', float('nan')):>7.1%} "
              f"{on['end'].get('random', float('nan')):>10.1%} {'yes' if same else 'NO':>9}")
        if not same:
            for a, b in zip(off["selected"], on["selected"]):
                if a != b:
                    print(f"     differs: off {a} / on {b}")


if __name__ == "__main__":
    main()
