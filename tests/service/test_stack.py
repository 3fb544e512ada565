"""The lab service end to end: docker-compose.yml brought up for real, used from the host.

What the README's service section promises, on a machine with no container registry and
with the host's own Redis and PostgreSQL on the standard ports:

- the images that are missing are built (scripts/local-images.sh: Redis, PostgreSQL and
  the Docker-API proxy from the local base image; scripts/trainer-image.sh: the service
  image, a cached rebuild so that it holds the code under test);
- `compose up -d` under a project name of its own, with the published ports moved
  (SELFPROG_REDIS_PORT, SELFPROG_POSTGRES_PORT) and a job-directory parent of its own
  (SELFPROG_JOBS_TMPDIR), comes up healthy;
- a quick run (1 iteration, 2 candidates) is launched and followed from the host CLI
  through the stack's broker, and `runs`, `show` and `lineage --json` agree with the
  stack's PostgreSQL, read directly;
- a detached run is cancelled while its LM trains: the sandbox container training it is
  inspected first (the hardened profile, as the engine applied it), then the run ends
  `cancelled` and the container is gone;
- `compose down -v` leaves no container, network, volume or job directory.

Slow (a few minutes; the first build of the service image takes ~10 minutes on 2 cores,
later ones are cached) and it needs a Docker engine with Compose, so it runs only with
SELFPROG_TEST_STACK=1. Compose v2 (`docker compose`) is used where present, else
Debian's `docker-compose` 1.29. The tests run in file order and share one stack.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.docker,
    # the first test also pays for the shared fixture: building the service image takes
    # ~10 minutes on 2 cores when its dependencies changed
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("SELFPROG_TEST_STACK") != "1",
                       reason="the compose stack test runs with SELFPROG_TEST_STACK=1"),
]

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_IMAGE = os.environ.get("SELFPROG_SANDBOX_IMAGE", "selfprog-sandbox:latest")
# The quick preset, cut to what proves the path: one LM epoch (32 steps), 2 candidates.
QUICK = ["--preset", "smoke", "--iterations", "1", "--candidates", "2", "--set", "lm_epochs=1"]
# The run that is cancelled: long enough that it is surely still training.
LONG_TRAINING = ["--preset", "smoke", "--iterations", "1", "--candidates", "2", "--set", "lm_epochs=200"]
TERMINAL = ("completed", "failed", "cancelled")


# --------------------------------------------------------------------------- helpers

def compose_command() -> list[str]:
    """`docker compose` (v2) where the plugin is there, else `docker-compose` (v1)."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("SELFPROG_TEST_STACK=1 but neither `docker compose` nor `docker-compose` "
                "is installed (scripts/docker-engine.sh installs docker-compose)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n"
                    f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


class Stack:
    """One compose project: its name, env file, ports, and the host CLI's environment."""

    def __init__(self) -> None:
        self.project = f"selfprog-test-{uuid.uuid4().hex[:8]}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.project}-", dir="/tmp"))
        self.jobs = self.tmp / "selfprog-docker-jobs"
        self.redis_port, self.postgres_port, self.web_port = free_port(), free_port(), free_port()
        self.web_token = uuid.uuid4().hex
        self.env_file = self.tmp / "stack.env"
        self.env_file.write_text(
            f"SELFPROG_REDIS_PORT={self.redis_port}\n"
            f"SELFPROG_POSTGRES_PORT={self.postgres_port}\n"
            f"SELFPROG_WEB_PORT={self.web_port}\n"
            f"SELFPROG_WEB_TOKEN={self.web_token}\n"
            f"SELFPROG_JOBS_TMPDIR={self.tmp}\n"
            f"SELFPROG_SANDBOX_IMAGE={SANDBOX_IMAGE}\n")
        self.compose = [*compose_command(), "-f", str(ROOT / "docker-compose.yml"),
                        "-p", self.project, "--env-file", str(self.env_file)]
        self.broker_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.database_url = (f"postgresql+psycopg2://selfprog:selfprog@127.0.0.1:"
                             f"{self.postgres_port}/selfprog")
        self.down_done = False

    def add_env(self, text: str) -> None:
        with self.env_file.open("a") as f:
            f.write(text)

    def cli_env(self) -> dict[str, str]:
        """The host CLI's environment: the stack's broker and database, nothing else
        of this machine's SELFPROG_* settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELFPROG_")}
        env.update(SELFPROG_BROKER_URL=self.broker_url,
                   SELFPROG_DATABASE_URL=self.database_url,
                   SELFPROG_ARTIFACT_DIR=str(self.tmp / "host-artifacts"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        return env

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return run([sys.executable, "-c", "from pipeline.cli import main; main()", *args],
                   env=self.cli_env(), timeout=timeout, check=check)

    def cli_json(self, *args: str, timeout: float = 120) -> Any:
        return json.loads(self.cli(*args, "--json", timeout=timeout).stdout)

    def up(self) -> None:
        run([*self.compose, "up", "-d"], timeout=600)

    def logs(self) -> str:
        return run([*self.compose, "logs", "--no-color", "--tail", "40"], timeout=120,
                   check=False).stdout[-12000:]

    def down(self) -> None:
        if not self.down_done:
            run([*self.compose, "down", "-v", "--remove-orphans", "-t", "5"], timeout=300)
            self.down_done = True


def project_objects(client, project: str) -> dict[str, list[str]]:
    label = {"label": f"com.docker.compose.project={project}"}
    return {
        "containers": [c.name for c in client.containers.list(all=True, filters=label)],
        "networks": [n.name for n in client.networks.list(filters=label)],
        "volumes": [v.name for v in client.volumes.list(filters=label)],
    }


def wait_healthy(client, stack: Stack, timeout: float = 300) -> None:
    """redis and postgres healthy, migrate exited 0, every other service running."""
    deadline = time.monotonic() + timeout
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = {}
        for c in client.containers.list(all=True, filters={
                "label": f"com.docker.compose.project={stack.project}"}):
            c.reload()
            service = c.labels["com.docker.compose.service"]
            s = c.attrs["State"]
            if service == "migrate":
                state[service] = ("ok" if s["Status"] == "exited" and s["ExitCode"] == 0
                                  else f"{s['Status']} {s['ExitCode']}")
            elif "Health" in s:
                state[service] = "ok" if s["Health"]["Status"] == "healthy" else s["Health"]["Status"]
            else:
                state[service] = "ok" if s["Status"] == "running" else s["Status"]
        want = {"redis", "postgres", "migrate", "docker-proxy", "coordinator",
                "trainer-worker", "sandbox-worker", "web"}
        if set(state) >= want and all(v == "ok" for v in state.values()) \
                and workers_consume(stack):
            return
        if state.get("migrate", "").startswith("exited"):
            break   # a failed migration does not heal
        time.sleep(2)
    pytest.fail(f"the stack did not come up healthy: {state}\n{stack.logs()}")


def workers_consume(stack: "Stack") -> bool:
    """Every queue has a live worker (running containers may still be importing torch)."""
    out = stack.cli("doctor", "--skip-canary", "--json", check=False, timeout=120)
    try:
        checks = json.loads(out.stdout)
    except ValueError:
        return False
    checks = checks.get("checks", checks) if isinstance(checks, dict) else checks
    return any(c.get("name") == "workers" and c.get("status") == "ok" for c in checks)


def query(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    from sqlalchemy import create_engine, text
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def run_status(stack: Stack, run_id: str) -> str:
    (row,) = query(stack.database_url, "SELECT status FROM runs WHERE id = :id", id=run_id)
    return row["status"]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def client():
    docker = pytest.importorskip("docker")
    try:
        c = docker.from_env(timeout=120)
        c.ping()
    except Exception as e:  # noqa: BLE001 - any failure means "no engine"
        pytest.fail(f"SELFPROG_TEST_STACK=1 but no Docker engine answers: {e} "
                    "(scripts/ci-docker.sh starts one)")
    yield c
    c.close()


@pytest.fixture(scope="module")
def stack(client, request):
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    s = Stack()
    # build what is missing: the base and sandbox images come from scripts/ci-docker.sh
    for image, how in (("selfprog-base:bookworm", "scripts/base-image.sh"),
                       (SANDBOX_IMAGE, "scripts/build-images.sh")):
        if not client.images.list(name=image):
            run(["bash", how], timeout=1800)
    env_lines = run(["bash", "scripts/local-images.sh"], timeout=1200).stdout
    s.add_env(env_lines)
    # the service image holds the code under test: a cached rebuild takes seconds
    run(["bash", "scripts/trainer-image.sh"], timeout=2400)
    timings["images"] = time.monotonic() - t0
    try:
        t1 = time.monotonic()
        s.up()
        wait_healthy(client, s)
        timings["up"] = time.monotonic() - t1
        s.timings = timings
        yield s
    finally:
        if request.session.testsfailed:
            print(f"--- compose logs of {s.project}\n{s.logs()}")
        try:
            s.down()
        finally:
            # after a failure: sandboxes the stopped workers left behind (their job dirs
            # are in s.tmp, removed next)
            for c in client.containers.list(all=True, filters={"label": "selfprog.sandbox=1"}):
                if any(m.get("Source", "").startswith(str(s.tmp)) for m in c.attrs["Mounts"]):
                    c.remove(force=True)
            shutil.rmtree(s.tmp, ignore_errors=True)
        print("stack test timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


# --------------------------------------------------------------------------- tests

def test_a_quick_run_through_the_broker_followed_from_the_host_cli(stack):
    t0 = time.monotonic()
    out = stack.cli("launch", *QUICK, "--json", timeout=900)
    stack.timings["quick run"] = time.monotonic() - t0
    report = json.loads(out.stdout)
    run_id = report["run_id"]
    assert report["status"] == "completed", report
    # followed: the live events reached the host (stage changes, the LM's training)
    assert "LM trained:" in out.stderr, out.stderr[-2000:]

    # what the CLI says is what the stack's PostgreSQL holds
    (db_run,) = query(stack.database_url, "SELECT * FROM runs WHERE id = :id", id=run_id)
    assert db_run["status"] == "completed" and db_run["error"] is None
    db_its = query(stack.database_url, "SELECT * FROM iterations WHERE run_id = :id "
                   "ORDER BY index", id=run_id)
    db_cands = {c["id"]: c for c in query(
        stack.database_url, "SELECT * FROM candidates WHERE run_id = :id", id=run_id)}
    assert [it["index"] for it in db_its] == [0] and db_its[0]["stage"] == "done"
    assert sum(c["role"] == "candidate" for c in db_cands.values()) == 2

    listed = {r["id"]: r for r in stack.cli_json("runs")}
    assert listed[run_id]["status"] == "completed"
    assert listed[run_id]["iterations_done"] == 1
    assert listed[run_id]["task"] == db_run["task"] and listed[run_id]["preset"] == db_run["preset"]

    shown = stack.cli_json("show", run_id)
    assert shown["id"] == run_id and shown["status"] == "completed"
    assert shown["config"]["candidates"] == 2 and shown["config"]["iterations"] == 1
    (row,) = shown["iterations"]
    it = db_its[0]
    assert (row["selected_id"], row["incumbent_id"], row["decision"], row["stage"]) == \
        (it["selected_id"], it["incumbent_id"], it["decision"], it["stage"])
    assert row["total"] == 2
    assert row["evaluated"] == sum(c["role"] == "candidate" and c["status"] == "evaluated"
                                   for c in db_cands.values())
    assert row["score"] == db_cands[it["selected_id"]]["score"]

    chain = stack.cli_json("lineage", str(it["selected_id"]))
    expected, cid = [], it["selected_id"]
    while cid is not None:          # the parent chain, as the database has it
        (c,) = query(stack.database_url, "SELECT id, parent_id, sha256, status FROM candidates "
                     "WHERE id = :id", id=cid)
        expected.append(c)
        cid = c["parent_id"]
    expected.reverse()              # seed first, as lineage prints it
    assert [(s["id"], s["parent_id"], s["sha256"], s["status"]) for s in chain] == \
        [(c["id"], c["parent_id"], c["sha256"], c["status"]) for c in expected]
    assert chain[-1]["id"] == it["selected_id"] and chain[-1]["run_id"] == run_id


def test_the_web_service_shows_the_runs_with_its_token_only(stack):
    # after the quick run above: the web service reads the same PostgreSQL, read-only
    base = f"http://127.0.0.1:{stack.web_port}"

    def get(path: str, token: str | None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers),
                                        timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    listed = {r["id"] for r in stack.cli_json("runs")}
    status, body = get("/api/runs", stack.web_token)
    assert status == 200, body[:500]
    served = json.loads(body)
    assert {r["id"] for r in served} == listed and listed
    run_id = served[0]["id"]
    status, page = get(f"/runs/{run_id}", stack.web_token)
    assert status == 200 and run_id.encode() in page and b'id="tree"' in page
    assert get("/api/runs", None)[0] == 401
    assert get(f"/runs/{run_id}", "not-the-token")[0] == 401
    assert stack.web_token not in run([*stack.compose, "logs", "--no-color", "web"],
                                      timeout=120, check=False).stdout


def test_a_run_cancelled_while_its_lm_trains_ends_cancelled_and_its_sandbox_is_gone(
        stack, client):
    import docker

    run_id = stack.cli_json("launch", *LONG_TRAINING, "--detach")["run_id"]
    # the sandbox container that trains the run's LM
    container = None
    deadline = time.monotonic() + 300
    while container is None and time.monotonic() < deadline:
        for c in client.containers.list(filters={"label": "selfprog.sandbox=1"}):
            # the training job's own sandbox (not the short `declare` one before it)
            if c.labels.get("selfprog.job_id", "") == f"{run_id}.lm.i0.train":
                container = c
        if container is None:
            assert run_status(stack, run_id) not in TERMINAL, stack.logs()
            time.sleep(0.5)
    assert container is not None, f"no sandbox container of run {run_id} appeared"
    (it,) = query(stack.database_url, "SELECT stage FROM iterations WHERE run_id = :id",
                  id=run_id)
    assert it["stage"] == "training"

    # The hardened profile, as the engine applied it to a live sandbox started through
    # the stack's Docker-API proxy.
    container.reload()
    attrs = container.attrs
    host, config = attrs["HostConfig"], attrs["Config"]
    assert attrs["State"]["Running"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
    assert any(o.startswith("no-new-privileges") for o in host["SecurityOpt"] or [])
    assert not host["Privileged"]
    assert host["Memory"] > 0 and host["MemorySwap"] == host["Memory"]
    assert host["PidsLimit"] and host["PidsLimit"] > 0
    assert host["Init"] is True
    uid, _, gid = config["User"].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), config["User"]
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert mounts["/job"]["RW"] is False
    # its job directory lies in the stack's own job root, at the same path for the engine
    assert Path(mounts["/job"]["Source"]).parent == stack.jobs

    t0 = time.monotonic()
    stack.cli("cancel", run_id)
    status = run_status(stack, run_id)
    while status not in TERMINAL and time.monotonic() - t0 < 120:
        time.sleep(0.5)
        status = run_status(stack, run_id)
    gone = False
    while not gone and time.monotonic() - t0 < 120:
        try:
            client.containers.get(container.id)
            time.sleep(0.5)
        except docker.errors.NotFound:
            gone = True
    stack.timings["cancel to container gone"] = time.monotonic() - t0
    assert gone, "the cancelled run's sandbox container is still there"
    # The stopped training job still reports back to the coordinator (after_training);
    # that must not turn the cancelled run into a failed one. Give it the time it takes.
    settle = time.monotonic() + 20
    db_run = {}
    while time.monotonic() < settle:
        (db_run,) = query(stack.database_url, "SELECT status, error FROM runs WHERE id = :id",
                          id=run_id)
        if db_run["status"] != "cancelled" or db_run["error"]:
            break
        time.sleep(1)
    assert db_run["status"] == "cancelled", db_run
    open_cands = query(stack.database_url, "SELECT id, status FROM candidates WHERE run_id = :id "
                       "AND status IN ('pending', 'running')", id=run_id)
    assert open_cands == []


def test_down_leaves_no_container_network_volume_or_job_directory(stack, client):
    assert project_objects(client, stack.project)["containers"]   # it was up
    t0 = time.monotonic()
    stack.down()
    stack.timings["down"] = time.monotonic() - t0
    assert project_objects(client, stack.project) == \
        {"containers": [], "networks": [], "volumes": []}
    # no sandbox container of this stack's workers, and no job directory
    left = [c.name for c in client.containers.list(all=True, filters={"label": "selfprog.sandbox=1"})
            if any(m.get("Source", "").startswith(str(stack.tmp)) for m in c.attrs["Mounts"])]
    assert left == []
    assert not stack.jobs.exists() or list(stack.jobs.iterdir()) == []
