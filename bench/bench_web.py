"""Server time of the web view's run page, for runs of 100 and 1,000 candidates.

    python bench/bench_web.py [--repeat 15] [--postgres]

Fills a lineage through the store API (tests/support/lineage.py: 10 iterations with
9 or 99 generated candidates each plus their incumbents), then, alternating between
the two runs:
- in process: the ASGI application (pipeline/web/app.py) answers GET /runs/RUN,
  timed from the request to the last byte, no network (the server's own time);
- split: the store's reads alone (get_run, iterations, candidates without their
  texts, as the page reads them), to show what of it is the database and what the
  figures and the template;
- over HTTP: the real `selfprog-cli serve`, a GET from this process (adds the
  loopback round trip and uvicorn).
Prints medians and the ratio 1,000 / 100. Target: under 300 ms for 1,000 candidates.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store import LineageStore  # noqa: E402
from pipeline.web import create_app  # noqa: E402
from tests.support.lineage import fill_run  # noqa: E402
from tests.support.web import get, serve  # noqa: E402


def asgi_get(app, path: str) -> tuple[int, int]:
    """(status, body bytes) of one GET through the ASGI app, in this process."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 50000), "headers": [(b"host", b"127.0.0.1:8000")]}
    out = {"status": 0, "size": 0}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["size"] += len(message.get("body", b""))

    asyncio.run(app(scope, receive, send))
    return out["status"], out["size"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--postgres", metavar="URL",
                    help="a PostgreSQL URL (an empty database) instead of an SQLite file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    url = args.postgres or f"sqlite:///{tmp / 'lineage.db'}"
    writer = LineageStore(url, create=True)
    t0 = time.perf_counter()
    runs = {n: fill_run(writer, iterations=10, candidates=n // 10 - 1, arms=("lm",), seed=n)
            for n in (100, 1000)}
    writer.close()
    print(f"filled {url.split('://')[0]} with runs of 100 and 1,000 candidates in "
          f"{time.perf_counter() - t0:.1f} s")

    store = LineageStore(url, read_only=True)
    app = create_app(store)
    for n, run_id in runs.items():      # warm up: templates compiled, pool connected
        status, size = asgi_get(app, f"/runs/{run_id}")
        assert status == 200, status
        assert len(store.candidates(run_id)) == n
        print(f"run page of {n:>5} candidates: {size / 1024:.0f} KiB of HTML")
    page = {n: [] for n in runs}
    reads = {n: [] for n in runs}
    for _ in range(args.repeat):
        for n, run_id in runs.items():
            page[n].append(timed(lambda: asgi_get(app, f"/runs/{run_id}")))
            reads[n].append(timed(lambda: (store.get_run(run_id), store.iterations(run_id),
                                           store.candidates(run_id, texts=False))))
    store.close()

    http = {n: [] for n in runs}
    with serve(url, log_dir=tmp) as server:
        for n, run_id in runs.items():
            assert get(f"{server.url}/runs/{run_id}")[0] == 200
        for _ in range(args.repeat):
            for n, run_id in runs.items():
                http[n].append(timed(lambda: get(f"{server.url}/runs/{run_id}")))

    series = (("page", page), ("reads", reads), ("http", http))
    med = {k: {n: statistics.median(v) * 1000 for n, v in d.items()} for k, d in series}
    low = {k: {n: min(v) * 1000 for n, v in d.items()} for k, d in series}
    # on a loaded machine the median carries other processes' time; the minimum is
    # closest to the server's own work
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"{args.repeat} times each")
    print("ms (median / min)           100 cand.        1,000 cand.    ratio of medians")
    for key, label in (("page", "run page, in process"), ("reads", "  of it: store reads"),
                       ("http", "run page over HTTP")):
        a, b = med[key][100], med[key][1000]
        print(f"{label:<26} {a:>6.1f} / {low[key][100]:>5.1f}   "
              f"{b:>7.1f} / {low[key][1000]:>6.1f}   {b / a:>5.2f}")
    verdict = "under" if med["page"][1000] < 300 else "OVER"
    print(f"\n1,000 candidates: {med['page'][1000]:.0f} ms server time, {verdict} the 300 ms target")


if __name__ == "__main__":
    main()
