"""Local process backend: run the harness as a confined child process on this machine.

For machines without Docker (the embedded default). What confines a run:

* a fresh job directory (`base.stage`), cwd of the child; the candidate may write only
  `out/` and `tmp/`;
* as root, a per-job unprivileged uid/gid (uid_base + random offset, no supplementary
  groups): host files that are not world-readable (0600 secrets, the lineage DB if its
  mode is right, /etc/shadow) are unreadable, and RLIMIT_NPROC counts only this job;
* a new network namespace (only a downed loopback: no route anywhere, not even to
  servers on the host's 127.0.0.1);
* rlimits: address space, CPU seconds, processes/threads, file size, open files, no
  core dumps; PR_SET_NO_NEW_PRIVS (setuid binaries gain nothing);
* a scrubbed environment; its own session and process group; stdin from /dev/null;
  stdout/stderr to files that RLIMIT_FSIZE bounds, read back as bounded tails;
* a wall-clock deadline; after *every* run the whole process group is SIGKILLed and
  then every process still owned by the job uid (a `setsid` or double-fork escapee)
  is killed by a helper that becomes that uid and calls kill(-1, SIGKILL).

Weaker than the Docker backend (docs: SECURITY/this docstring; `isolation` reports it):
the host filesystem stays visible (world-readable files are readable, no read-only
root, /tmp world-writable dirs are writable); memory is bounded as *address space*
(RLIMIT_AS = memory_mb + headroom for what torch reserves but does not touch), not as
resident memory with a cgroup; no PID namespace (the candidate sees host processes);
no seccomp filter; no CPU quota (RLIMIT_CPU is a backstop, the deadline is the limit).
As non-root there is no uid drop at all, and the network namespace needs
unprivileged user namespaces; both need `allow_unconfined=True`, which logs a warning.
"""
from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.backends.base import (HARNESS_COMMAND, SandboxError, cleanup, collect, read_tail,
                                   sabotage_enabled, stage)
from sandbox.schema import Job, Result

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# Address space that `import torch, transformers` and a small training step reserve
# without using. Measured here (torch 2.14.1 CPU path, transformers 5.24, Python 3.11):
# VmPeak 3.24 GB right after the imports (0.75 GB resident), 3.7 GB after a few steps
# of a tiny T5 with one thread, 3.9 GB with two (each thread adds stacks and a malloc
# arena). So a job's RLIMIT_AS is memory_mb + 4 GiB + 256 MiB per thread.
AS_HEADROOM_MB = 4096
AS_PER_THREAD_MB = 256
MAX_OPEN_FILES = 256
LOG_TAIL_BYTES = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)   # loaded here: never dlopen after fork


@dataclass
class Isolation:
    """What this backend really got on this machine (checked, not assumed)."""
    uid_drop: bool = False
    netns: bool = False
    userns: bool = False
    python_ok: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"uid_drop": self.uid_drop, "netns": self.netns, "userns": self.userns,
                "python_ok": self.python_ok, "warnings": list(self.warnings)}


@dataclass
class RunInfo:
    """The last run's identity, for tests and diagnostics."""
    uid: int | None
    pid: int
    jobdir: Path
    survivors_killed: int = 0


class ProcessBackend:
    name = "process"

    def __init__(self, workroot: Path | str | None = None, python: str = sys.executable,
                 uid_base: int = 200_000, allow_unconfined: bool = False,
                 uid_range: int = 100_000, keep_jobdirs: bool = False):
        self.workroot = Path(workroot) if workroot else Path(tempfile.gettempdir()) / "selfprog-sandbox"
        self.python = python
        self.uid_base = uid_base
        self.uid_range = uid_range
        self.allow_unconfined = allow_unconfined
        self.keep_jobdirs = keep_jobdirs          # debugging only: leaves job dirs behind
        self.isolation: Isolation | None = None
        self.last_run: RunInfo | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ probing
    def probe(self) -> Isolation:
        """Check once what confinement this machine gives; raise if it is not enough.

        Runs a tiny child under the same preexec as a job (new netns, uid drop) that
        checks the interpreter starts and finds torch/transformers/safetensors, and
        reports the network interfaces it sees.
        """
        with self._lock:
            if self.isolation is not None:
                return self.isolation
            if sabotage_enabled():   # TEST ONLY (base.sabotage_enabled): nothing confines
                iso = Isolation(python_ok=True, warnings=[
                    "SABOTAGE MODE (SELFPROG_SABOTAGE=1, tests only): no network namespace, "
                    "no uid drop, no rlimits, host environment"])
                log.error("UNCONFINED process sandbox: %s", iso.warnings[0])
                self.isolation = iso
                return iso
            iso = Isolation()
            root = os.geteuid() == 0
            iso.netns = self._try_unshare(CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET)
            iso.userns = iso.netns and not root
            if not iso.netns:
                iso.warnings.append("no network namespace: candidates can reach the network")
            if root:
                ok, why = self._probe_run(drop=True, netns=iso.netns)
                if ok:
                    iso.uid_drop = iso.python_ok = True
                elif self.allow_unconfined:
                    iso.warnings.append(f"the sandbox uid cannot run the interpreter ({why}); "
                                        "running WITHOUT the uid drop")
                else:
                    raise SandboxError(f"the process sandbox cannot run {self.python} as an "
                                       f"unprivileged uid: {why}. Put the virtualenv where "
                                       "other users can read it (e.g. /opt), or pass "
                                       "allow_unconfined=True for development")
            else:
                iso.warnings.append("not root: no per-job uid, the candidate can read "
                                    "everything this user can read")
            if not iso.python_ok:
                ok, why = self._probe_run(drop=False, netns=iso.netns)
                if not ok:
                    raise SandboxError(f"the process sandbox cannot run {self.python}: {why}")
                iso.python_ok = True
            if iso.warnings and not self.allow_unconfined:
                raise SandboxError("the process sandbox does not confine here: "
                                   + "; ".join(iso.warnings)
                                   + " (pass allow_unconfined=True to run anyway)")
            for w in iso.warnings:
                log.warning("UNCONFINED process sandbox: %s", w)
            self.isolation = iso
            return iso

    @staticmethod
    def _try_unshare(flags: int) -> bool:
        pid = os.fork()
        if pid == 0:  # child: only syscalls, then leave
            os._exit(0 if _libc.unshare(flags) == 0 else 1)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    def _probe_run(self, drop: bool, netns: bool) -> tuple[bool, str]:
        code = ("import importlib.util as u, json, socket; "
                "missing = [m for m in ('torch', 'transformers', 'safetensors') if u.find_spec(m) is None]; "
                "print(json.dumps({'missing': missing, 'ifaces': [n for _, n in socket.if_nameindex()]}))")
        uid = self._pick_uid() if drop else None
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            try:
                proc = subprocess.run(
                    [self.python, "-I", "-c", code], cwd=tmp, env=self._env(Path(tmp), 1),
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                    preexec_fn=self._preexec(uid, netns, rlimits=[]), start_new_session=True)
            except (OSError, subprocess.SubprocessError) as e:
                return False, f"{type(e).__name__}: {e}{self._why_unreadable()}"
            finally:
                if uid is not None:
                    self._kill_uid(uid)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            return False, f"exit {proc.returncode}: {err[0][:300]}{self._why_unreadable()}"
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            return False, "the probe printed no report"
        if report["missing"]:
            return False, f"cannot import {report['missing']}{self._why_unreadable()}"
        if netns and report["ifaces"] != ["lo"]:
            return False, f"network namespace shows interfaces {report['ifaces']}"
        return True, ""

    def _why_unreadable(self) -> str:
        """Name the directory on the interpreter's path that other users cannot enter."""
        paths = [Path(self.python).absolute(), Path(sys.prefix)]
        for p in paths:
            for d in [*reversed(p.parents), p]:
                try:
                    mode = os.stat(d).st_mode
                except OSError:
                    continue
                if os.path.isdir(d) and not mode & 0o001:
                    return f" ({d} is mode {oct(mode & 0o777)}: other users cannot enter it)"
        return ""

    # ------------------------------------------------------------------ running
    def execute(self, job: Job, out_dir: Path) -> Result:
        """Run one job to completion; always returns a Result (never the candidate's exception)."""
        job.validate()
        iso = self.probe()
        uid = self._pick_uid() if iso.uid_drop else None
        jobdir = stage(job, self.workroot, uid=uid, gid=uid, seal=True)
        threads = int(job.params.get("num_threads", 1))
        started = time.monotonic()
        stdout_path, stderr_path = jobdir / "stdout", jobdir / "stderr"
        timed_out = False
        exit_code: int | None = None
        proc = None
        try:
            with open(stdout_path, "xb") as out, open(stderr_path, "xb") as err:
                os.chmod(stdout_path, 0o600)
                os.chmod(stderr_path, 0o600)
                proc = subprocess.Popen(
                    [self.python, "-I", "-c", HARNESS_COMMAND], cwd=jobdir,
                    env=self._env(jobdir / "tmp", threads), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, close_fds=True, start_new_session=True,
                    preexec_fn=self._preexec(uid, iso.netns,
                                             [] if sabotage_enabled() else self._rlimits(job)))
            self.last_run = RunInfo(uid=uid, pid=proc.pid, jobdir=jobdir)
            try:
                exit_code = proc.wait(timeout=job.limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
        except (OSError, subprocess.SubprocessError) as e:
            # The child never started (e.g. preexec failed): nothing of the candidate ran.
            reason = f"the sandbox could not start: {type(e).__name__}: {e}"
            if proc is None:
                cleanup(jobdir)
                return Result.failure(job, "crashed", reason)
        finally:
            if proc is not None:
                killed = self._kill_all(proc, uid)
                if self.last_run is not None:
                    self.last_run.survivors_killed = killed
                if exit_code is None and not timed_out:
                    exit_code = proc.returncode
        # SIGXCPU (the CPU-seconds backstop) is a deadline too, measured in CPU time.
        if exit_code is not None and exit_code in (-signal.SIGXCPU,):
            timed_out = True
        try:
            return collect(job, jobdir, Path(out_dir), exit_code=exit_code, timed_out=timed_out,
                           oom_killed=False,
                           stdout_tail=read_tail(stdout_path, LOG_TAIL_BYTES),
                           stderr_tail=read_tail(stderr_path, LOG_TAIL_BYTES),
                           duration_s=time.monotonic() - started)
        finally:
            if not self.keep_jobdirs:
                cleanup(jobdir)

    def _env(self, tmp: Path, threads: int) -> dict[str, str]:
        # Built from nothing: no variable of the host (tokens, DB URLs, proxies) leaks in.
        tmp = str(tmp)
        host = dict(os.environ) if sabotage_enabled() else {}   # TEST ONLY: see base
        return {**host,
            "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp,
            "XDG_CACHE_HOME": f"{tmp}/.cache", "TORCH_HOME": f"{tmp}/torch",
            "HF_HOME": f"{tmp}/hf", "MPLCONFIGDIR": f"{tmp}/mpl",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
        }

    @staticmethod
    def _rlimits(job: Job) -> list[tuple[int, int]]:
        lim = job.limits
        threads = int(job.params.get("num_threads", 1))
        mb = 1024 * 1024
        cpu = math.ceil(lim.timeout_s * max(1.0, lim.cpus, threads)) + 5
        wanted = [
            (resource.RLIMIT_AS, (lim.memory_mb + AS_HEADROOM_MB + AS_PER_THREAD_MB * threads) * mb),
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_NPROC, lim.pids),
            (resource.RLIMIT_FSIZE, lim.output_mb * mb),
            (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
            (resource.RLIMIT_CORE, 0),
        ]
        out = []
        for res, value in wanted:
            _, hard = resource.getrlimit(res)
            # Never above our own hard limit (as non-root we could not raise it anyway).
            out.append((res, value if hard == resource.RLIM_INFINITY else min(value, hard)))
        return out

    @staticmethod
    def _preexec(uid: int | None, netns: bool, rlimits: list[tuple[int, int]]):
        """The child's set-up between fork and exec, in this order: network namespace
        (needs root, so first), no-new-privs, rlimits (as root we may set any value),
        drop groups, gid and uid, then the parent-death signal (a credential change
        would clear it)."""
        root = os.geteuid() == 0
        flags = CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET

        def setup() -> None:
            if netns and _libc.unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), "unshare(network namespace) failed")
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
            os.umask(0o077)
            for res, value in rlimits:
                resource.setrlimit(res, (value, value))
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            # After the uid change: changing credentials clears the parent-death signal.
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        return setup

    def _pick_uid(self) -> int:
        busy = {u for _, u in _processes()}
        for _ in range(100):
            uid = self.uid_base + random.randrange(self.uid_range)
            if uid not in busy:
                return uid
        raise SandboxError("no free sandbox uid")

    # ------------------------------------------------------------------ killing
    def _kill_all(self, proc: subprocess.Popen, uid: int | None) -> int:
        """Kill the run's process group, then everything the job uid still owns.

        Returns how many processes outside the process group had to be killed.
        """
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        survivors = 0
        for _ in range(100):
            if uid is not None:
                alive = [pid for pid, u in _processes() if u == uid]
            else:  # no uid of its own: the best we have is its session id
                alive = [pid for pid in _session_members(proc.pid)]
            if not alive:
                return survivors
            survivors += len(alive)
            if uid is not None:
                self._kill_uid(uid)
            else:
                for pid in alive:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            time.sleep(0.01)
        log.error("processes of sandbox run %s survive SIGKILL", proc.pid)
        return survivors

    @staticmethod
    def _kill_uid(uid: int) -> None:
        """kill(-1, SIGKILL) as the job uid: the kernel signals every process of that uid
        at once (a fork bomb cannot outrun a scan-and-kill loop this way)."""
        if os.geteuid() != 0:
            return
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)   # the caller itself is spared
            except BaseException:
                os._exit(1)
            os._exit(0)
        os.waitpid(pid, 0)


def _processes() -> list[tuple[int, int]]:
    """(pid, real uid) of every live, non-zombie process, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read().decode(errors="replace")
        except OSError:
            continue
        uid = state = None
        for line in status.splitlines():
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uid = int(line.split()[1])
        if uid is not None and state not in ("Z", "X"):
            out.append((int(entry), uid))
    return out


def _session_members(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()   # after "(comm)": state ppid pgrp session
        if fields and fields[0] not in ("Z", "X") and (int(fields[2]) == sid or int(fields[3]) == sid):
            out.append(int(entry))
    return out
