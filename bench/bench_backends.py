"""Sandbox overhead: the same evaluation job on the Docker backend, the process backend
(bubblewrap) and process-unconfined.

    python bench/bench_backends.py [--repeat 3] [--image selfprog-sandbox:latest] [--no-docker]

One quick-preset run directory is prepared once; its few-shot evaluation of the seed
source is then run `--repeat` times on each backend, alternating (docker, process,
process-unconfined, docker, ...) so that background load hits all alike. Prints each
time, the medians, the ratio docker / process (container overhead) and the ratio
process / process-unconfined (what bubblewrap costs). Docker is left out where it
cannot run (or with --no-docker). Not a test: numbers depend on the machine.
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
    ap.add_argument("--no-docker", action="store_true")
    args = ap.parse_args()

    from sandbox.backends.docker import docker_available
    ok, why = (False, "--no-docker") if args.no_docker else docker_available(args.image)
    if not ok:
        print(f"bench_backends: Docker left out ({why})")

    with tempfile.TemporaryDirectory() as d:
        settings = Settings.from_env(env={}, artifact_dir=str(Path(d) / "artifacts"))
        job = seed_evaluation_job(settings, preset("quick", fewshot_samples=args.fewshot_samples))
        backends = {**({"docker": make_backend("docker", image=args.image)} if ok else {}),
                    "process": make_backend("process"),
                    "process-unconfined": make_backend("process-unconfined")}
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
                print(f"  {name:18s} run {i + 1}: {wall:6.2f} s wall "
                      f"(harness {res.duration_s:5.2f} s, score {res.score:.4f})")
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"evaluation job (quick preset, {args.fewshot_samples} few-shot samples), "
          f"median of {args.repeat}:")
    for name in backends:
        print(f"  {name:18s} {med[name]:6.2f} s")
    if "docker" in med:
        print(f"container overhead ratio docker / process = {med['docker'] / med['process']:.2f}")
    print("bubblewrap ratio process / process-unconfined = "
          f"{med['process'] / med['process-unconfined']:.2f}")
    print(f"same score on every backend: {len({frozenset(v) for v in scores.values()}) == 1}")


if __name__ == "__main__":
    main()
