"""Benchmark of candidate evaluation for vision tasks. Not a test: it prints numbers.

    python bench/bench_vision.py [--task mnist5k] [--sizes quick,paper-vision-cpu] [--repeat 2]

For each size (a preset's train/eval subset sizes and epochs) and each of a few
candidate networks, one evaluation job (train `task_epochs` epochs on the training
subset, score accuracy on the evaluation subset) is run side by side:

- sandboxed: through the same runner and backend the loop uses (process backend; the
  docker backend too when `docker info` works and the sandbox image exists), i.e. a
  fresh interpreter that imports torch, reads the staged tensors, trains, scores;
- in-process: `sandbox.harness.run` called directly in this process on the same job
  (fine for our own rendered sources, in a benchmark only).

It prints seconds per evaluation, candidate evaluations per minute (one at a time, as
the embedded default runs them) and the ratio sandboxed / in-process, all measured in
this one run. Absolute numbers depend on the machine and on what else it is doing.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import celery_app, sandbox_task  # noqa: E402
from pipeline.store import store_for
from pipeline.families import cnn  # noqa: E402
from pipeline.jobs import RunContext  # noqa: E402
from pipeline.settings import Settings, preset  # noqa: E402

# The networks a search evaluates early on: the paper's seed, its Table 2 edit (two
# convs and a pool), and a few refinements further (wider convs, deeper dense part).
DESIGNS = {
    "seed (1x16 dense)": cnn.SEED,
    "table2 (2 conv x32, 1x16)": cnn.Design(hidden_layers=1, conv_layers=2, channels=32, hidden_size=16),
    "4 steps (2 conv x64, 2x32)": cnn.Design(hidden_layers=2, conv_layers=2, channels=64, hidden_size=32),
}


def docker_ready(image: str) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
        return ok and subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                                     timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mnist5k")
    p.add_argument("--sizes", default="quick,paper-vision-cpu",
                   help="presets whose train/eval sizes and epochs to use (comma-separated)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--no-docker", action="store_true")
    args = p.parse_args()

    from sandbox import harness, runner

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tmp.chmod(0o755)
        backends = ["process"]
        base = Settings.from_env(database_url=f"sqlite:///{tmp / 'bench.db'}",
                                 artifact_dir=str(tmp / "artifacts"), sandbox_backend="process")
        if not args.no_docker and docker_ready(base.sandbox_image):
            backends.append("docker")
        print(f"task {args.task}; backends: {', '.join(backends)} "
              f"(docker {'found' if 'docker' in backends else 'not available: skipped'}); "
              f"median of {args.repeat}, one evaluation at a time, num_threads=1")
        summary = []
        for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            cfg = preset(size, task=args.task, dataset_size=64, iterations=1, candidates=1)
            celery_app.configure(base)
            store = store_for(base.database_url)
            run_id = store.create_run(config=cfg.to_dict(), task=args.task, preset=size, seed=0)
            ctx = RunContext(run_id, cfg, base)
            ctx.prepare()
            from safetensors.torch import load_file
            data = load_file(str(ctx.dir / "task.safetensors"))   # eval_y is not in it
            print(f"\n== {size}: {len(data['train_y'])} train / {len(data['eval_x'])} eval samples, "
                  f"{cfg.task_epochs} epochs, input {list(ctx.task.input_shape)}")
            head = f"{'candidate':<28} {'params':>8} {'acc':>6} {'in-proc s':>9}"
            for b in backends:
                head += f" {b + ' s':>10} {b + '/in-proc':>15}"
            print(head)
            times: dict[str, list[float]] = {b: [] for b in ["inproc", *backends]}
            for name, design in DESIGNS.items():
                source = cnn.render(design)
                job = ctx.evaluate_job("lm", 0, 0, source).validate()
                per: dict[str, list[float]] = {b: [] for b in ["inproc", *backends]}
                acc = params = None
                for r in range(args.repeat):
                    for b in backends:       # interleaved, so drift hits both alike
                        s = Settings.from_env(database_url=base.database_url,
                                              artifact_dir=base.artifact_dir, sandbox_backend=b)
                        celery_app.configure(s)
                        t = time.monotonic()
                        res = runner.run(job, tmp / f"out-{b}-{r}", sandbox_task.backend())
                        per[b].append(time.monotonic() - t)
                        if res.status != "ok":
                            raise SystemExit(f"{b} evaluation of {name} failed: {res.status} {res.reason}")
                        acc, params = res.score, res.param_count
                    root = tmp / f"inproc-{r}"
                    (root / "out").mkdir(parents=True, exist_ok=True)
                    t = time.monotonic()
                    res = harness.run(job, root)
                    if res.status == "ok" and res.score is None:   # predictions: score them
                        from sandbox.backends.collect import score_predictions
                        res.score, _ = score_predictions(job, root / "out" / "predictions.safetensors")
                    per["inproc"].append(time.monotonic() - t)
                    if res.status != "ok" or abs(res.score - acc) > 0.02:
                        print(f"  note: in-process result differs: {res.status} {res.score} vs {acc}")
                med = {b: statistics.median(v) for b, v in per.items()}
                for b in med:
                    times[b].append(med[b])
                line = f"{name:<28} {params:>8,} {acc:>6.3f} {med['inproc']:>9.2f}"
                for b in backends:
                    line += f" {med[b]:>10.2f} {med[b] / med['inproc']:>14.1f}x"
                print(line)
            mean = {b: statistics.mean(v) for b, v in times.items()}
            line = f"{'evaluations per minute':<28} {'':>8} {'':>6} {60 / mean['inproc']:>9.1f}"
            for b in backends:
                line += f" {60 / mean[b]:>10.1f} {mean[b] / mean['inproc']:>14.1f}x"
            print(line)
            print("  fixed cost per sandboxed evaluation (mean difference): "
                  + ", ".join(f"{b} {mean[b] - mean['inproc']:.2f} s" for b in backends))
            summary.append((size, {b: 60 / v for b, v in mean.items()}))
        print("\nsummary, evaluations per minute:")
        for size, rate in summary:
            print(f"  {size:<18} " + "  ".join(f"{b} {v:.1f}" for b, v in rate.items()))


if __name__ == "__main__":
    main()
