"""Container overhead: the same evaluation job on the Docker backend and the process backend.

    python bench/bench_backends.py [--repeat 3] [--image selfprog-sandbox:latest]

One quick-preset run directory is prepared once; its few-shot evaluation of the seed
source is then run `--repeat` times on each backend, alternating (docker, process,
docker, ...) so that background load hits both alike. Prints each time, the medians and
the ratio docker / process. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_core import seed_evaluation_job  # noqa: E402
from pipeline.settings import Settings, preset  # noqa: E402
from sandbox import runner  # noqa: E402
from sandbox.backends import make_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--image", default="selfprog-sandbox:latest")
    ap.add_argument("--fewshot-samples", type=int, default=32)
    args = ap.parse_args()

    from sandbox.backends.docker import docker_available
    ok, why = docker_available(args.image)
    if not ok:
        sys.exit(f"bench_backends: Docker is not usable here ({why})")

    with tempfile.TemporaryDirectory() as d:
        settings = Settings.from_env(env={}, artifact_dir=str(Path(d) / "artifacts"))
        job = seed_evaluation_job(settings, preset("quick", fewshot_samples=args.fewshot_samples))
        backends = {"docker": make_backend("docker", image=args.image),
                    "process": make_backend("process")}
        times: dict[str, list[float]] = {name: [] for name in backends}
        scores: dict[str, set] = {name: set() for name in backends}
        for i in range(args.repeat):
            for name, backend in backends.items():
                t0 = time.monotonic()
                res = runner.run(job, Path(d) / "out" / f"{name}{i}", backend)
                wall = time.monotonic() - t0
                if res.status != "ok":
                    sys.exit(f"{name}: {res.status}: {res.reason}\n{res.logs[-2000:]}")
                times[name].append(wall)
                scores[name].add(round(res.score, 6))
                print(f"  {name:8s} run {i + 1}: {wall:6.2f} s wall "
                      f"(harness {res.duration_s:5.2f} s, score {res.score:.4f})")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"evaluation job (quick preset, {args.fewshot_samples} few-shot samples), "
          f"median of {args.repeat}:")
    for name in backends:
        print(f"  {name:8s} {med[name]:6.2f} s")
    print(f"container overhead ratio docker / process = {med['docker'] / med['process']:.2f}")
    print(f"same score on both backends: {scores['docker'] == scores['process']}")


if __name__ == "__main__":
    main()
