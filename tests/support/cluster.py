"""Real Celery workers as child processes, for the distributed tests and benchmarks.

    with Cluster(tmp_path, broker_url=..., database_url=...) as cl:
        cl.start("coordinator", "coordinator")
        cl.start("sandbox1", "sandbox", db=False)
        ...
        cl.kill("sandbox1")          # SIGKILL to the worker's whole process group

Each worker is `python -m celery -A pipeline.worker worker -Q <queue>` in its own
session, configured only through SELFPROG_* environment variables, logging to
`<tmp>/logs/<name>.log`. Workers started with `db=False` get a database URL that
cannot work, which proves the trainer and sandbox queues never touch the lineage DB.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[2]
NO_DATABASE = "postgresql+psycopg2://nobody@127.0.0.1:9/no-database-on-this-queue"
READY = re.compile(r"\bready\.")


def redis_up(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def _die_with_parent() -> None:
    # A killed test run must not leave workers behind consuming the test queues.
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG


class Worker:
    def __init__(self, name: str, queue: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.queue, self.proc, self.log = name, queue, proc, log

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def succeeded(self, task: str = "selfprog.run_job") -> int:
        """How many `task` runs this worker finished (from its log)."""
        return len(re.findall(rf"Task {re.escape(task)}\[[^\]]+\] succeeded", self.text()))

    def descendants(self) -> list[int]:
        """Pids of every live process below this worker (pool children, sandboxes)."""
        return descendants(self.proc.pid)

    def running_sandboxes(self) -> dict[int, str]:
        """{pid: job directory name} of harness processes this worker runs now."""
        return running_sandboxes(self.proc.pid)


def descendants(root: int) -> list[int]:
    """Pids of every live process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def running_sandboxes(root: int) -> dict[int, str]:
    """{pid: job directory name} of sandbox harness processes below `root` (process
    backend)."""
    found = {}
    for pid in descendants(root):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if b"sandbox.harness" in cmd:
            found[pid] = Path(cwd).name
    return found


class Cluster:
    def __init__(self, tmp_path: Path, *, broker_url: str, database_url: str,
                 backend: str = "process", visibility_timeout_s: float = 6.0,
                 env: dict[str, str] | None = None) -> None:
        self.dir = Path(tmp_path)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.broker_url, self.database_url = broker_url, database_url
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SELFPROG_")},
            "PYTHONPATH": str(REPO),
            "SELFPROG_BROKER_URL": broker_url,
            "SELFPROG_DATABASE_URL": database_url,
            "SELFPROG_ARTIFACT_DIR": str(self.dir / "artifacts"),
            "SELFPROG_SANDBOX_BACKEND": backend,
            "SELFPROG_VISIBILITY_TIMEOUT_S": str(visibility_timeout_s),
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        self.workers: dict[str, Worker] = {}
        self._generation: dict[str, int] = {}

    # ---------------------------------------------------------------- workers
    def start(self, name: str, queue: str, *, concurrency: int = 1, db: bool | None = None,
              wait: bool = True, timeout: float = 120.0) -> Worker:
        """Start a worker for `queue`; by default only the coordinator gets the DB."""
        db = queue == "coordinator" if db is None else db
        env = dict(self.env)
        if not db:
            env["SELFPROG_DATABASE_URL"] = NO_DATABASE
        gen = self._generation[name] = self._generation.get(name, 0) + 1
        log = self.dir / "logs" / f"{name}.{gen}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "pipeline.worker", "worker", "-Q", queue,
               "-n", f"{name}@{socket.gethostname()}", "--concurrency", str(concurrency),
               "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
               "--without-heartbeat", "--loglevel", "INFO"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        w = self.workers[name] = Worker(name, queue, proc, log)
        if wait:
            self.wait_ready(w, timeout)
        return w

    def wait_ready(self, w: Worker, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY.search(w.text()):
                return
            if not w.alive:
                raise RuntimeError(f"worker {w.name} exited {w.proc.returncode}:\n{w.text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker {w.name} not ready after {timeout}s:\n{w.text()[-3000:]}")

    def kill(self, name: str) -> None:
        """SIGKILL the worker's whole process group: no shutdown, no acks, no goodbyes."""
        w = self.workers[name]
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.proc.wait(timeout=30)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        w = self.workers.pop(name, None)
        if w is None or not w.alive:
            return
        try:
            os.killpg(w.proc.pid, signal.SIGQUIT)   # cold shutdown: do not wait for jobs
            w.proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.workers):
            self.stop(name)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted((self.dir / "logs").glob("*.log")))

    # ---------------------------------------------------------------- the CLI
    def cli(self, *args: str, timeout: float = 600.0, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                              env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)


class RedisServer:
    """A private redis-server on its own port (for restarting it under a running run)."""

    def __init__(self, tmp_path: Path, *, persist: bool = False) -> None:
        self.dir = Path(tmp_path) / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist \
            else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=open(self.dir / "log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not redis_up(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("private redis-server did not start: "
                                   + (self.dir / "log").read_text()[-2000:])
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


# ------------------------------------------------------------------ checking a run
QUICK_ARGS = ("--preset", "smoke", "--iterations", "2", "--candidates", "2",
              "--fewshot-samples", "16", "--set", "dataset_size=128", "--set", "lm_epochs=2")


def quick_config(**kw):
    from pipeline.settings import preset
    base = dict(iterations=2, candidates=2, dataset_size=128, lm_epochs=2, fewshot_samples=16)
    return preset("smoke", **{**base, **kw})


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1, diagnose=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f"\n{diagnose()}" if diagnose else ""))


def check_complete_run(store, run_id: str, config) -> list:
    """A finished run that lost nothing and duplicated nothing; returns its candidates."""
    from pipeline.store import TERMINAL_STATUSES
    run = store.get_run(run_id)
    assert run.status == "completed", (run.status, run.error)
    for arm in config.arms:
        its = store.iterations(run_id, arm=arm)
        assert [it.index for it in its] == list(range(config.iterations)), its
        for it in its:
            assert it.stage == "done" and it.selected_id is not None and it.decision
    cands = store.candidates(run_id)
    keys = [(c.arm, c.iteration, c.index) for c in cands]
    assert len(keys) == len(set(keys)), f"duplicate candidates: {keys}"
    for c in cands:
        assert c.status in TERMINAL_STATUSES, (c.iteration, c.index, c.status)
    for arm in config.arms:
        for i in range(config.iterations):
            idx = sorted(k[2] for k in keys if k[0] == arm and k[1] == i)
            # the incumbent, then exactly the n generated candidates: a generation that
            # failed, or a recovery that lost the generated batch, is not a complete run
            assert idx == list(range(config.candidates + 1)), (arm, i, idx)
    return cands
