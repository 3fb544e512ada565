"""Distributed deployment: sandbox-worker scaling, and embedded against distributed.

    python bench/bench_distributed.py throughput [--jobs 6]   # 1 vs 2 sandbox workers
    python bench/bench_distributed.py e2e                     # quick run: embedded vs Celery
    python bench/bench_distributed.py all

Needs Redis (SELFPROG_BENCH_REDIS_URL, default redis://127.0.0.1:6379/14; the DB is
flushed) and PostgreSQL (SELFPROG_BENCH_POSTGRES_URL, default the local test server; a
private schema is made and dropped). Workers are real Celery processes
(tests/support/cluster.py) with the process sandbox backend (--backend docker to change).
Each comparison is measured side by side in one invocation; not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402
from celery import group  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from pipeline import celery_app, runs, sandbox_task, stages  # noqa: E402
from pipeline.store import store_for
from pipeline.jobs import RunContext  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from tests.support.cluster import Cluster, quick_config  # noqa: E402

REDIS_URL = os.environ.get("SELFPROG_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
POSTGRES_URL = os.environ.get("SELFPROG_BENCH_POSTGRES_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


class Schema:
    """A private PostgreSQL schema for one benchmark, dropped afterwards."""

    def __enter__(self) -> str:
        self.engine = create_engine(POSTGRES_URL)
        self.name = "selfprog_bench_" + uuid.uuid4().hex[:10]
        with self.engine.begin() as c:
            c.execute(text(f"CREATE SCHEMA {self.name}"))
        return make_url(POSTGRES_URL).update_query_dict(
            {"options": f"-csearch_path={self.name}"}).render_as_string(hide_password=False)

    def __exit__(self, *exc) -> None:
        with self.engine.begin() as c:
            c.execute(text(f"DROP SCHEMA {self.name} CASCADE"))
        self.engine.dispose()


def _flush() -> None:
    redis.Redis.from_url(REDIS_URL).flushdb()


def _settings(tmp: Path, database_url: str, broker: str, backend: str) -> Settings:
    return Settings.from_env(env={}, database_url=database_url, broker_url=broker,
                             artifact_dir=str(tmp / "artifacts"), sandbox_backend=backend)


def throughput(args) -> float:
    """The same batch of evaluation jobs through 1 and then 2 sandbox workers."""
    _flush()
    with tempfile.TemporaryDirectory() as d, Schema() as db:
        tmp = Path(d)
        settings = _settings(tmp, db, REDIS_URL, args.backend)
        celery_app.configure(settings)
        config = quick_config(fewshot_samples=32)
        ctx = RunContext("benchthruput", config, settings)
        ctx.prepare()
        jobs = [ctx.evaluate_job("lm", 0, i, ctx.seed_source()) for i in range(args.jobs)]
        sig = group(sandbox_task.run_job.si(stages._wire(j), str(tmp / "out")).set(queue="sandbox")
                    for j in jobs)
        walls = {}
        with Cluster(tmp, broker_url=REDIS_URL, database_url=db, backend=args.backend) as cl:
            for n in (1, 2):
                cl.start(f"sandbox{n}", "sandbox")
                if args.warmup:
                    # the first job of a worker also probes its sandbox backend
                    group(list(sig.tasks)[:n]).apply_async().get(timeout=900)
                t0 = time.monotonic()
                results = sig.apply_async().get(timeout=1800)
                walls[n] = time.monotonic() - t0
                bad = [r for r in results if r["status"] != "ok"]
                if bad:
                    sys.exit(f"evaluation failed: {bad[0]['status']}: {bad[0]['reason']}")
                print(f"  {n} sandbox worker(s): {args.jobs} evaluations in {walls[n]:6.1f} s "
                      f"({args.jobs / walls[n]:.3f} jobs/s)")
    ratio = walls[1] / walls[2]
    print(f"evaluation throughput ratio 2 workers / 1 worker = {ratio:.2f} "
          f"({os.cpu_count()} CPU cores, backend {args.backend})")
    celery_app.configure(Settings.from_env(env={}))
    return ratio


def e2e(args) -> float:
    """One quick run embedded (in this process), one through Celery workers."""
    _flush()
    config = quick_config()
    walls = {}
    with tempfile.TemporaryDirectory() as d, Schema() as db:
        tmp = Path(d)
        embedded = _settings(tmp / "embedded", db, "", args.backend)
        t0 = time.monotonic()
        run_id = runs.launch(embedded, config)
        walls["embedded"] = time.monotonic() - t0
        status = store_for(embedded.database_url).get_run(run_id).status
        print(f"  embedded:    {walls['embedded']:6.1f} s  ({status})")

        with Cluster(tmp / "cluster", broker_url=REDIS_URL, database_url=db,
                     backend=args.backend) as cl:
            for name, queue in (("coordinator", "coordinator"), ("trainer", "trainer"),
                                ("sandbox1", "sandbox"), ("sandbox2", "sandbox")):
                cl.start(name, queue, wait=False)
            for w in list(cl.workers.values()):
                cl.wait_ready(w)
            distributed = _settings(tmp / "cluster", db, REDIS_URL, args.backend)
            t0 = time.monotonic()
            run_id = runs.launch(distributed, config)
            walls["distributed"] = time.monotonic() - t0
            status = store_for(distributed.database_url).get_run(run_id).status
            print(f"  distributed: {walls['distributed']:6.1f} s  ({status}; coordinator, "
                  f"trainer, 2 sandbox workers already running)")
    ratio = walls["distributed"] / walls["embedded"]
    print(f"end-to-end quick run ({config.iterations} iterations x {config.candidates} "
          f"candidates), ratio distributed / embedded = {ratio:.2f}")
    celery_app.configure(Settings.from_env(env={}))
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["throughput", "e2e", "all"])
    ap.add_argument("--jobs", type=int, default=6, help="evaluations per batch (throughput)")
    ap.add_argument("--backend", default="process", choices=["process", "docker"])
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="do not warm each worker with a batch first")
    args = ap.parse_args()
    if args.what in ("throughput", "all"):
        throughput(args)
    if args.what in ("e2e", "all"):
        e2e(args)
    _flush()


if __name__ == "__main__":
    main()
