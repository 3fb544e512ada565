"""Benchmark of the self task's two-step evaluation. Not a test: it prints numbers.

    python bench/bench_declare.py [--preset quick] [--backend process] [--repeat 3]

The few-shot evaluation of the quick preset's seed LM, side by side in one run:

- one step: the candidate's code in the scoring sandbox (`backend.execute` of the job
  with its source: the path before the declaration existed);
- two steps: a `declare` sandbox runs the candidate's code once, then a fresh sandbox
  trains and scores on harness code only (`sandbox.runner.run`): what the loop runs for
  a source that is not exactly the family's rendering of a design;
- derived: what the loop runs for a source that is (almost every LM-written candidate):
  its declaration follows from its design and one real declaration of another
  rendering (pipeline/declarations.py, learnt once before the timing), so only the
  scoring sandbox runs.

Interleaved, so drift hits all alike. Prints the median seconds of each, the scores
(they must be equal) and the ratios two steps / one step and derived / one step.

`--prewarm N` keeps N pre-warmed sandboxes (as the embedded default keeps
EMBEDDED_PREWARM in pipeline/settings.py). Before each timed evaluation the script waits
until the pool is full again, so neither path pays for the other's refill; the pool's
counters are printed, so a path that ran cold (nothing taken) shows. Without it (0),
every sandbox starts cold. `--batch K` times K evaluations back to back per sample (as
a run evaluates its candidates one after another): then the refills of the pool
overlap the following evaluations instead of being waited for, and the seconds are per
evaluation.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import celery_app, sandbox_task  # noqa: E402
from pipeline.declarations import Templates  # noqa: E402
from pipeline.families import transformer  # noqa: E402
from pipeline.jobs import RunContext  # noqa: E402
from pipeline.settings import Settings, preset  # noqa: E402
from sandbox import runner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--backend", default="process", choices=["process", "docker"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prewarm", type=int, default=0,
                   help="pre-warmed sandboxes kept ready (0: cold, as before)")
    p.add_argument("--batch", type=int, default=1,
                   help="evaluations back to back per timed sample")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="selfprog-bench-declare-") as tmp:
        tmp = Path(tmp)
        s = Settings.from_env(database_url=f"sqlite:///{tmp / 'lineage.db'}",
                              artifact_dir=str(tmp / "artifacts"), sandbox_backend=args.backend,
                              sandbox_prewarm=args.prewarm)
        celery_app.configure(s)
        cfg = preset(args.preset, task="self")
        ctx = RunContext("bench-declare", cfg, s)
        ctx.prepare()
        job = ctx.evaluate_job("lm", 0, 0, ctx.seed_source()).validate()
        backend = sandbox_task.backend()
        pool = backend._pool if args.prewarm else None
        if args.prewarm and pool is None:
            raise SystemExit(f"the {args.backend} backend cannot pre-warm here")
        if pool is not None:
            backend.prewarm_for(job)
        templates = Templates(transformer)
        runner.run(job, tmp / "learn", backend, templates=templates)   # one real declaration
        times: dict[str, list[float]] = {"one step": [], "two steps": [], "derived": []}
        scores: dict[str, float | None] = {}
        for r in range(args.repeat):
            for name in times:
                if pool is not None and not pool.wait_ready(300):
                    raise SystemExit("the pre-warmed pool did not fill in 300 s")
                t = time.monotonic()
                for b in range(args.batch):
                    out = tmp / f"{name.replace(' ', '-')}-{r}-{b}"
                    runner._DECLARED.clear()     # a new candidate: never declared before
                    if name == "one step":
                        res = backend.execute(job, out)
                    elif name == "two steps":
                        res = runner.run(job, out, backend)
                    else:
                        res = runner.run(job, out, backend, templates=templates)
                    if res.status != "ok":
                        raise SystemExit(f"{name}: {res.status} {res.reason}")
                    scores[name] = res.score
                times[name].append((time.monotonic() - t) / args.batch)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"self task, preset {args.preset}, {args.backend} backend, "
              f"prewarm {args.prewarm}, {args.repeat} repeats of {args.batch} "
              f"(median wall seconds per evaluation)")
        print(f"{'path':<12} {'seconds':>8} {'score':>10}")
        for k in times:
            print(f"{k:<12} {med[k]:>8.2f} {scores[k]:>10.4f}")
        for k in ("two steps", "derived"):
            print(f"ratio {k} / one step: {med[k] / med['one step']:.2f}x"
                  + ("" if scores["one step"] == scores[k] else "  (SCORES DIFFER)"))
        print(f"declarations derived without a sandbox: {templates.derived}")
        if pool is not None:
            print(f"pre-warmed pool: {pool.stats}")
        backend.close()


if __name__ == "__main__":
    main()
