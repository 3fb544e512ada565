"""Pre-warmed process sandboxes (ProcessBackend(prewarm=N), SELFPROG_SANDBOX_PREWARM).

Real processes, no mocks. A warm sandbox must behave like a cold one (same result, same
confinement) and serve exactly one job; nothing of a job may be in it before the job is
assigned, and no process may outlive the backend. No test asserts speed.
"""
from __future__ import annotations

import gc
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.settings import ConfigError, Settings
from sandbox.backends.process import ProcessBackend
from sandbox.backends.process_spawn import WARM_CPU_S, WARM_NICE
from sandbox.backends.process_tree import processes as _processes, sandboxed_pid
from tests.support.candidates import (DEADLINE_DODGER, TINY, candidate,
                                        check_loopback_server_unreachable,
                                        check_planted_secret_unreadable, make_job)

pytestmark = pytest.mark.root("the confined process backend")   # skips without root; fails in CI

READY_S = 300      # imports on a loaded 2-core machine can be slow; this is not a speed test


def _workroot() -> Path:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700 (see test_process_backend).
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-prewarm-"))
    os.chmod(workroot, 0o711)
    return workroot


@pytest.fixture(scope="module")
def warm(data_file):
    workroot = _workroot()
    b = ProcessBackend(workroot=workroot, prewarm=1)
    iso = b.probe()
    assert iso.uid_drop and iso.netns and not iso.warnings, iso
    b.prewarm_for(make_job(TINY, data_file))
    yield b
    b.close()
    shutil.rmtree(workroot, ignore_errors=True)


def uids_alive(uids) -> list[int]:
    return [pid for pid, u in _processes() if u in set(uids)]


def run_warm(backend: ProcessBackend, job, out):
    assert backend._pool.wait_ready(READY_S), "no warm sandbox became ready"
    result = backend.execute(job, out)
    assert backend.last_run.warm, "the job did not run in a pre-warmed sandbox"
    return result


# ----------------------------------------------------------------- same results

def test_warm_evaluation_gives_the_cold_score(warm, data_file, tmp_path):
    job = make_job(TINY, data_file)
    cold = ProcessBackend(workroot=warm.workroot)        # prewarm 0: today's behaviour
    cold_result = cold.execute(job, tmp_path / "cold")
    assert cold_result.status == "ok", cold_result
    assert cold._pool is None and not cold.last_run.warm

    warm_result = run_warm(warm, job, tmp_path / "warm")
    assert warm_result.status == "ok", warm_result
    assert warm_result.score == cold_result.score
    assert warm_result.losses == cold_result.losses
    assert warm_result.param_count == cold_result.param_count


def test_train_lm_in_a_warm_sandbox_brings_weights_back(warm, data_file, tmp_path):
    result = run_warm(warm, make_job(TINY, data_file, kind="train_lm"), tmp_path)
    assert result.status == "ok", result
    assert (tmp_path / "weights.safetensors").stat().st_size > 0


def test_each_warm_sandbox_serves_one_job(warm, data_file, tmp_path):
    job = make_job(TINY, data_file)
    first = run_warm(warm, job, tmp_path / "a")
    run1 = warm.last_run
    second = run_warm(warm, job, tmp_path / "b")
    run2 = warm.last_run
    assert first.status == second.status == "ok"
    assert first.score == second.score
    assert run1.uid != run2.uid and run1.pid != run2.pid
    assert not os.path.exists(f"/proc/{run1.pid}")            # the first process is gone
    assert not uids_alive([run1.uid, run2.uid])
    assert not run1.jobdir.exists() and not run2.jobdir.exists()
    # The replacement is a different sandbox again.
    assert warm._pool.wait_ready(READY_S)
    assert all(w.uid not in (run1.uid, run2.uid) for w in warm._pool.idle())


def test_an_idle_warm_sandbox_holds_nothing_of_any_job(warm, data_file, tmp_path):
    run_warm(warm, make_job(TINY, data_file), tmp_path)     # a job ran before
    assert warm._pool.wait_ready(READY_S)
    (w,) = warm._pool.idle()
    assert w.proc.poll() is None
    assert not (w.jobdir / "job.json").exists()
    assert os.listdir(w.jobdir / "in") == []
    assert os.listdir(w.jobdir / "out") == []                # no seal key, no result
    # It waits confined: its own uid, no network but a loopback (the harness itself,
    # under bubblewrap's two processes).
    harness = sandboxed_pid(w.proc.pid)
    with open(f"/proc/{harness}/status") as f:
        uid_line = next(line for line in f if line.startswith("Uid:"))
    assert set(uid_line.split()[1:]) == {str(w.uid)}
    assert os.readlink(f"/proc/{harness}/ns/net") != os.readlink("/proc/self/ns/net")


def test_cpu_limit_covers_the_warm_up_and_the_job(warm, data_file, tmp_path):
    src = candidate("import resource\n", """
        soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
        raise RuntimeError(f"CPU {soft} {hard}")
        """)
    job = make_job(src, data_file, timeout_s=20)
    result = run_warm(warm, job, tmp_path)
    assert result.status == "invalid", result
    soft, hard = (int(x) for x in result.reason.split("CPU ")[1].split()[:2])
    budget = dict(ProcessBackend._rlimits(job))[resource.RLIMIT_CPU]
    assert soft == hard                                        # the candidate cannot raise it
    assert budget <= soft <= budget + WARM_CPU_S


def test_an_idle_sandbox_waits_at_low_priority_and_its_job_runs_at_normal(warm, data_file,
                                                                        tmp_path):
    # A refill must not slow the job that is running; the job itself must not be slowed.
    assert warm._pool.wait_ready(READY_S)
    (w,) = warm._pool.idle()
    harness = sandboxed_pid(w.proc.pid)
    assert os.getpriority(os.PRIO_PROCESS, harness) == WARM_NICE
    if os.path.exists(f"/proc/{harness}/autogroup"):   # the kernel groups CPU by session
        with open(f"/proc/{harness}/autogroup") as f:
            assert f.read().split()[-1] == str(WARM_NICE)
    src = candidate("import os\n", """
        raise RuntimeError(f"NICE {os.getpriority(os.PRIO_PROCESS, 0)}")
        """)
    result = run_warm(warm, make_job(src, data_file), tmp_path)
    assert result.status == "invalid", result
    assert int(result.reason.split("NICE ")[1].split()[0]) == 0


# ----------------------------------------------------------------- confinement holds

def test_warm_network_to_a_loopback_server_is_unreachable(warm, data_file, tmp_path):
    check_loopback_server_unreachable(lambda job: run_warm(warm, job, tmp_path), data_file)


def test_warm_planted_secret_file_is_unreadable(warm, data_file, tmp_path):
    check_planted_secret_unreadable(lambda job: run_warm(warm, job, tmp_path), data_file, tmp_path)


def test_warm_loop_past_the_deadline_times_out_and_leaves_nothing(warm, data_file, tmp_path):
    result = run_warm(warm, make_job(DEADLINE_DODGER, data_file, timeout_s=8), tmp_path)
    assert result.status == "timeout", result
    assert "deadline" in result.reason
    assert not uids_alive([warm.last_run.uid])
    assert not os.path.exists(f"/proc/{warm.last_run.pid}")


def test_warm_host_environment_does_not_leak(warm, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFPROG_TEST_SECRET", "env-s3cr3t")
    src = candidate("import os\n", """
        raise RuntimeError("ENV " + " ".join(sorted(os.environ)))
        """)
    result = run_warm(warm, make_job(src, data_file), tmp_path)
    names = set(result.reason.split("ENV ")[1].split(" (candidate line")[0].split())
    assert "SELFPROG_TEST_SECRET" not in names
    assert names <= {"PATH", "LANG", "HOME", "TMPDIR", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME",
                     "MPLCONFIGDIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE",
                     "TRANSFORMERS_OFFLINE", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE"}


# ----------------------------------------------------------------- profiles, lifetime

def test_a_job_of_another_profile_runs_cold_and_retargets(data_file, tmp_path):
    workroot = _workroot()
    b = ProcessBackend(workroot=workroot, prewarm=1)
    try:
        b.prewarm_for(make_job(TINY, data_file))
        assert b._pool.wait_ready(READY_S)
        (old,) = b._pool.idle()
        other = make_job(TINY, data_file, memory_mb=768)       # another RLIMIT_AS
        result = b.execute(other, tmp_path)
        assert result.status == "ok", result
        assert not b.last_run.warm                              # never in a mismatched one
        assert b._pool.wait_ready(READY_S)
        (new,) = b._pool.idle()
        assert new is not old and old.proc.poll() is not None
        result = b.execute(other, tmp_path)
        assert result.status == "ok" and b.last_run.warm
    finally:
        b.close()
        shutil.rmtree(workroot, ignore_errors=True)


def test_closing_or_dropping_the_backend_leaves_no_process(data_file):
    for how in ("close", "gc"):
        workroot = _workroot()
        b = ProcessBackend(workroot=workroot, prewarm=2)
        b.prewarm_for(make_job(TINY, data_file))
        assert b._pool.wait_ready(READY_S)
        idle = b._pool.idle()
        assert len(idle) == 2
        uids = [w.uid for w in idle]
        assert uids_alive(uids)
        if how == "close":
            b.close()
        else:
            del b, idle
            gc.collect()
        assert not uids_alive(uids), how
        assert not [p for p in workroot.iterdir() if p.name.startswith("warm-")], how
        shutil.rmtree(workroot, ignore_errors=True)


def test_an_old_warm_sandbox_is_recycled(data_file):
    workroot = _workroot()
    b = ProcessBackend(workroot=workroot, prewarm=1, prewarm_max_age_s=3)
    try:
        b.prewarm_for(make_job(TINY, data_file))

        def wait(cond):
            t0 = time.monotonic()
            while time.monotonic() - t0 < READY_S and not cond():
                time.sleep(0.1)
            return cond()
        assert wait(lambda: b._pool.idle())
        (first,) = b._pool.idle()
        assert wait(lambda: first.proc.poll() is not None and b._pool.idle()
                    and b._pool.idle()[0] is not first)
        assert b._pool.stats["recycled"] >= 1
        assert wait(lambda: not uids_alive([first.uid]) and not first.jobdir.exists())
    finally:
        b.close()
        shutil.rmtree(workroot, ignore_errors=True)


def test_prewarm_setting():
    # unset: two for the embedded default (a self-task evaluation takes two sandboxes),
    # none per worker process with a broker
    assert Settings.from_env({}).sandbox_prewarm == 2
    assert Settings.from_env({"SELFPROG_BROKER_URL": "redis://127.0.0.1:6379/0"}).sandbox_prewarm == 0
    assert Settings.from_env({}, broker_url="redis://127.0.0.1:6379/0").sandbox_prewarm == 0
    assert Settings.from_env({"SELFPROG_SANDBOX_PREWARM": "0"}).sandbox_prewarm == 0
    assert Settings.from_env({"SELFPROG_SANDBOX_PREWARM": "2"}).sandbox_prewarm == 2
    with pytest.raises(ConfigError):
        Settings.from_env({"SELFPROG_SANDBOX_PREWARM": "-1"})
    assert ProcessBackend()._pool is None                     # 0: no pool, no thread
