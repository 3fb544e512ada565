"""Pre-warmed Docker sandboxes (DockerBackend(prewarm=N), SELFPROG_SANDBOX_PREWARM).

Real containers on the real engine, no mocks. A warm container must have the same
hardened profile as a cold one, give the same result, serve exactly one job and be
removed after it; nothing of a job may be in it before the job is assigned; no
container may outlive the backend or its dead worker.
No test asserts speed (bench/bench_prewarm.py measures it).
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")


from sandbox.backends import staging                                      # noqa: E402
from sandbox.backends.docker import DockerBackend, reap_orphans           # noqa: E402
from sandbox.backends.docker_profile import (LABEL_JOB, LABEL_OWNER,       # noqa: E402
                                             HardeningError, check_profile, hardened_config)
from sandbox.protocol import READY_FILE                                   # noqa: E402
from tests.support.docker import IMAGE, OWNER, SANDBOX_UID, require_runtime  # noqa: E402
from tests.support.candidates import (DEADLINE_DODGER, TINY, candidate,  # noqa: E402
                                        check_loopback_server_unreachable,
                                        make_job)

READY_S = 300      # imports on a loaded 2-core machine can be slow; this is not a speed test
pytestmark = pytest.mark.docker


def job(source: str, data_file: Path, **kw):
    # The T5 jobs of the process backend's tests, with room for torch in a container
    # (and for gVisor's own threads, which its pids limit counts: docs/docker.md).
    return make_job(source, data_file, **{"memory_mb": 2048, "pids": 256, **kw})


# Each backend here has an owner label of its own, so that one test's check for
# "nothing left" does not see the module's shared warm backend; all are reaped at the end.
OWNERS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def reap_all(client):
    yield
    for owner in OWNERS:
        reap_orphans(client, owner=owner)


def ours(client, owner: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={owner}"})


def new_backend(client, workroot: Path, **kw) -> DockerBackend:
    OWNERS.append(f"{OWNER}-{len(OWNERS)}")
    return DockerBackend(image=IMAGE, workroot=workroot, client=client, owner=OWNERS[-1], **kw)


@pytest.fixture(scope="module")
def warm(client, data_file, tmp_path_factory):
    workroot = tmp_path_factory.mktemp("warm-work")
    b = new_backend(client, workroot, prewarm=1)
    b.prewarm_for(job(TINY, data_file))
    yield b
    b.close()
    assert not ours(client, b.owner), "containers left behind"
    assert not any(workroot.iterdir()), "job directories left behind"


def run_warm(backend: DockerBackend, j, out: Path):
    assert backend._pool.wait_ready(READY_S), "no warm container became ready"
    result = backend.execute(j, out)
    assert backend.last_run.warm, "the job did not run in a pre-warmed container"
    return result


def gone(client, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


# ----------------------------------------------------------------- same results

@pytest.mark.parametrize("runtime", [None, "runsc"])
def test_warm_container_gives_the_cold_result(client, data_file, tmp_path, runtime):
    if runtime:
        require_runtime(client, runtime)   # skips, or fails where runsc must be there
    j = job(TINY, data_file)
    b = new_backend(client, tmp_path / "work", prewarm=1, runtime=runtime)
    try:
        cold = b.execute(j, tmp_path / "cold")          # the first job of a profile: cold
        assert cold.status == "ok", (cold.reason, cold.logs)
        assert not b.last_run.warm
        assert b._pool.wait_ready(READY_S)
        (w,) = b._pool.idle()
        assert client.api.inspect_container(w.container.id)["HostConfig"]["Runtime"] == \
            (runtime or "runc")
        hot = run_warm(b, j, tmp_path / "warm")
        assert hot.status == "ok", (hot.reason, hot.logs)
        assert b.last_run.container_id == w.container.id
        assert (hot.score, hot.losses, hot.param_count) == (cold.score, cold.losses,
                                                            cold.param_count)
    finally:
        b.close()
    assert not ours(client, b.owner)


def test_train_lm_in_a_warm_container_brings_weights_back(warm, data_file, tmp_path):
    result = run_warm(warm, job(TINY, data_file, kind="train_lm"), tmp_path)
    assert result.status == "ok", (result.reason, result.logs)
    assert (tmp_path / "weights.safetensors").stat().st_size > 0


def test_each_warm_container_serves_one_job_and_is_removed(warm, client, data_file, tmp_path):
    j = job(TINY, data_file)
    first = run_warm(warm, j, tmp_path / "a")
    run1 = warm.last_run
    second = run_warm(warm, j, tmp_path / "b")
    run2 = warm.last_run
    assert first.status == second.status == "ok" and first.score == second.score
    assert run1.container_id != run2.container_id
    assert gone(client, run1.container_id) and gone(client, run2.container_id)
    assert not run1.jobdir.exists() and not run2.jobdir.exists()
    assert warm._pool.wait_ready(READY_S)              # the replacement is another one
    assert all(w.container.id not in (run1.container_id, run2.container_id)
               for w in warm._pool.idle())


# ----------------------------------------------------------------- confinement holds

def test_an_idle_warm_container_is_hardened_and_holds_no_job(warm, client, data_file, tmp_path):
    run_warm(warm, job(TINY, data_file), tmp_path)      # a job ran before
    assert warm._pool.wait_ready(READY_S)
    (w,) = warm._pool.idle()
    assert not (w.jobdir / "job.json").exists()
    assert os.listdir(w.jobdir / "in") == []
    assert os.listdir(w.jobdir / "out") == [READY_FILE]   # no seal key, no result
    attrs = client.api.inspect_container(w.container.id)
    # The whole profile, as the engine applied it: the same check a cold one passes.
    config = hardened_config(**warm.spec.for_job(w.key, w.jobdir, "warm", warm=True))
    assert check_profile(attrs, config) == []
    hc, cfg = attrs["HostConfig"], attrs["Config"]
    assert hc["NetworkMode"] == "none" and hc["ReadonlyRootfs"] is True
    assert hc["CapDrop"] in (["ALL"], ["CAP_ALL"]) and not hc["Privileged"]
    assert cfg["User"] == f"{SANDBOX_UID}:{SANDBOX_UID}"
    assert not cfg["OpenStdin"] and cfg["Labels"][LABEL_JOB] == "warm"
    assert attrs["State"]["Running"]


def test_warm_network_to_a_loopback_server_is_unreachable(warm, data_file, tmp_path):
    def run(j):
        return run_warm(warm, job(j.source, data_file), tmp_path)
    check_loopback_server_unreachable(run, data_file)


def test_warm_stdin_is_closed_to_the_candidate(warm, data_file, tmp_path):
    # Nothing reaches a warm sandbox's stdin: "go" is a file only the backend can write.
    src = candidate("import sys\n", """
        raise RuntimeError(f"STDIN {sys.stdin.buffer.read(64)!r}")
        """)
    result = run_warm(warm, job(src, data_file), tmp_path)
    assert result.status == "invalid" and "STDIN b''" in result.reason, result.reason


def test_warm_deadline_kills_a_process_that_ignores_sigterm(warm, client, data_file, tmp_path):
    result = run_warm(warm, job(DEADLINE_DODGER, data_file, timeout_s=8), tmp_path)
    assert result.status == "timeout", (result.status, result.reason)
    assert gone(client, warm.last_run.container_id)


# ----------------------------------------------------------------- profiles, lifetime

def test_a_job_of_another_profile_runs_cold_and_retargets(client, data_file, tmp_path):
    b = new_backend(client, tmp_path / "work", prewarm=1)
    try:
        b.prewarm_for(job(TINY, data_file))
        assert b._pool.wait_ready(READY_S)
        (old,) = b._pool.idle()
        other = job(TINY, data_file, memory_mb=2304)       # another memory limit
        assert b.execute(other, tmp_path / "a").status == "ok"
        assert not b.last_run.warm                           # never in a mismatched one
        assert b._pool.wait_ready(READY_S)
        (new,) = b._pool.idle()
        assert new is not old and gone(client, old.container.id)
        assert client.api.inspect_container(new.container.id)["HostConfig"]["Memory"] == \
            2304 * 1024 * 1024
        assert b.execute(other, tmp_path / "b").status == "ok" and b.last_run.warm
    finally:
        b.close()
    assert not ours(client, b.owner)


def test_closing_or_dropping_the_backend_removes_warm_containers(client, data_file, tmp_path):
    for how in ("close", "gc"):
        workroot = tmp_path / how
        b = new_backend(client, workroot, prewarm=2)
        b.prewarm_for(job(TINY, data_file))
        assert b._pool.wait_ready(READY_S)
        owner = b.owner
        assert len(ours(client, owner)) == 2
        if how == "close":
            b.close()
        else:
            del b
            gc.collect()
        assert not ours(client, owner), how
        assert not list(workroot.iterdir()), how


def test_warm_containers_of_a_killed_worker_are_reaped(client, data_file, tmp_path):
    """A worker SIGKILLed with warm containers waiting: the next backend of that worker
    (same owner) removes them, as it removes a dead worker's running jobs."""
    workroot = tmp_path / "work"
    OWNERS.append(owner := f"{OWNER}-killed")
    script = textwrap.dedent(f"""
        import sys, time
        from sandbox.backends.docker import DockerBackend
        from pathlib import Path
        from tests.support.candidates import make_job
        b = DockerBackend(image={IMAGE!r}, workroot={str(workroot)!r}, owner={owner!r},
                          prewarm=2)
        b.prewarm_for(make_job({TINY!r}, Path({str(data_file)!r}), memory_mb=2048, pids=256))
        assert b._pool.wait_ready({READY_S})
        print("READY", flush=True)
        time.sleep(600)
        """)
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[2])   # the repository
    try:
        assert worker.stdout.readline().strip() == b"READY"
        assert len(ours(client, owner)) == 2
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    left = ours(client, owner)
    assert len(left) == 2 and all(c.status == "running" for c in left)   # orphans now
    DockerBackend(image=IMAGE, workroot=workroot, client=client, owner=owner)   # it restarts
    assert not ours(client, owner)
    assert not list(workroot.iterdir())                       # nor their job directories


# ----------------------------------------------------------------- the profile function
# No engine needed: the refusals happen before anything is sent to it.

def test_warm_profile_only_for_an_empty_job_directory(tmp_path):
    workroot = tmp_path / "work"
    j = job("pass\n", Path(__file__))
    spec = dict(image=IMAGE, workroot=workroot, job_id=j.job_id, owner=OWNER,
                user=(SANDBOX_UID, SANDBOX_UID), memory_mb=512, cpus=1.0, pids=64, output_mb=8)
    empty = staging.stage_skeleton(workroot, "warm-")
    cfg = hardened_config(**spec, jobdir=empty, warm=True)
    assert "warm_main" in " ".join(cfg["command"])
    staged = staging.stage(make_job("pass\n", Path(__file__)), workroot)
    cold = hardened_config(**spec, jobdir=staged)
    # The same profile as a cold sandbox: only the command and the job dir differ.
    assert {k: v for k, v in cfg.items() if k not in ("command", "mounts")} == \
        {k: v for k, v in cold.items() if k not in ("command", "mounts")}
    assert cfg["stdin_open"] is False
    with pytest.raises(HardeningError, match="already holds a job"):
        hardened_config(**spec, jobdir=staged, warm=True)
    with pytest.raises(HardeningError, match="not a staged job directory"):
        hardened_config(**spec, jobdir=empty)
    with pytest.raises(HardeningError):                      # not a caller's choice
        hardened_config(**spec, jobdir=staged, stdin_open=True)
