"""Benchmark: pre-warmed sandboxes (SELFPROG_SANDBOX_PREWARM) against cold ones.

    python bench/bench_prewarm.py [--jobs 5] [--backend process|docker|both] [--set k=v ...]

One quick-preset evaluation job (the seed source, built as `bench_core.py overhead`
builds it), run N times in a row through three backends of each kind, side by side in
one run:

    prewarm 0          every job starts a fresh sandbox (the default)
    prewarm 1          back to back: the next job comes at once, so its sandbox may
                       still be importing (the replacement starts when one is taken)
    prewarm 1, ready   the bench waits (untimed) until the warm sandbox is ready: the
                       best case, e.g. a worker between iterations of the loop

`--backend both` (the default) measures the process backend and, when an engine and
the sandbox image are there, the Docker backend. Latency is the wall time of
`backend.execute` as the caller sees it. Ratios compare medians measured in the same
process against that backend's own cold row; absolute seconds depend on the machine
and on what else it is doing (this bench does not pin CPUs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_core import _sets, _settings, seed_evaluation_job  # noqa: E402
from pipeline.settings import preset  # noqa: E402
from sandbox.backends.docker import DockerBackend, docker_available  # noqa: E402
from sandbox.backends.process import ProcessBackend  # noqa: E402


def series(backend, job, out: Path, n: int, wait_ready: bool) -> list[float]:
    times = []
    for _ in range(n):
        if wait_ready and not backend._pool.wait_ready(600):
            raise SystemExit("no warm sandbox became ready within 600 s")
        t = time.monotonic()
        res = backend.execute(job, out)
        times.append(time.monotonic() - t)
        assert res.status == "ok", res.reason
        if backend._pool is not None:
            assert backend.last_run.warm or not wait_ready, "a 'ready' job ran cold"
    return times


def measure(make, job, out: Path, n: int) -> tuple[dict[str, list[float]], dict]:
    """The three rows for one backend kind; `make(prewarm)` builds a backend."""
    cold, warm = make(0), make(1)
    try:
        warm.prewarm_for(job)            # the pool starts warming; not part of any latency
        warm._pool.wait_ready(600)
        rows = {"prewarm 0": series(cold, job, out, n, wait_ready=False),
                "prewarm 1, ready": series(warm, job, out, n, wait_ready=True)}
        warm._pool.wait_ready(600)
        rows["prewarm 1, back to back"] = [t for _ in range(n)
                                           for t in series(warm, job, out, 1, wait_ready=False)]
        return rows, dict(warm._pool.stats)
    finally:
        warm.close()


def main(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        s = _settings(tmp)
        cfg = preset("quick", **_sets(args))
        job = seed_evaluation_job(s, cfg)
        workroot = Path(tempfile.mkdtemp(prefix="selfprog-bench-"))
        os.chmod(workroot, 0o711)

        kinds = ["process", "docker"] if args.backend == "both" else [args.backend]
        if "docker" in kinds:
            ok, why = docker_available(s.sandbox_image)
            if not ok:
                if args.backend == "docker":
                    raise SystemExit(f"the Docker backend cannot run: {why}")
                print(f"(docker rows skipped: {why})")
                kinds.remove("docker")
        makers = {
            "process": lambda n: ProcessBackend(workroot=workroot, prewarm=n),
            "docker": lambda n: DockerBackend(image=s.sandbox_image, workroot=workroot / "docker",
                                              prewarm=n),
        }
        results = {k: measure(makers[k], job, tmp / "out", args.jobs) for k in kinds}
        shutil.rmtree(workroot, ignore_errors=True)

        print(f"quick preset evaluation ({cfg.fewshot_samples} few-shot samples, d_model "
              f"{cfg.d_model}, {cfg.num_threads} thread), {args.jobs} sequential jobs per row, "
              f"{os.cpu_count()} CPUs")
        print(f"{'':<34}" + "".join(f"{'job ' + str(i + 1):>8}" for i in range(args.jobs))
              + f"{'median':>9}{'ratio':>8}")
        for kind, (rows, stats) in results.items():
            base = statistics.median(rows["prewarm 0"])
            for name, times in rows.items():
                m = statistics.median(times)
                print(f"{kind + ', ' + name:<34}" + "".join(f"{t:>7.2f}s" for t in times)
                      + f"{m:>8.2f}s{m / base:>7.2f}x")
            print(f"  {kind}: ratio = median / median({kind}, prewarm 0); saved per job "
                  f"(ready): {base - statistics.median(rows['prewarm 1, ready']):.2f} s; "
                  f"pool stats {stats}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=5)
    p.add_argument("--backend", choices=["process", "docker", "both"], default="both")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    main(p.parse_args())
