"""How the process backend starts a sandbox (sandbox/backends/process.py): the child's
set-up between fork and exec (`preexec`), its rlimits and environment, the bubblewrap
wrapping, and the pre-warmed sandboxes (`spawn_warm_process`, one `WarmProcess` each)
the warm pool (sandbox/backends/warm.py) keeps.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.backends.base import job_env, sabotaged
from sandbox.backends.bwrap import BWRAP_PROCESSES, bwrap_argv
from sandbox.backends.errors import SandboxError
from sandbox.backends.process_tree import kill_run, pick_uid, release_uid, sandboxed_pid, set_priority
from sandbox.backends.staging import cleanup, stage_skeleton
from sandbox.protocol import STDERR_FILE, STDOUT_FILE, WARM_COMMAND
from sandbox.schema import Job

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
WARM_CPU_S = 600                 # CPU seconds a pre-warmed sandbox may spend before "go"
# A pre-warmed sandbox imports at this niceness until "go" gives it the job's (0): a
# refill started when a job takes a sandbox then uses mostly the CPU that job leaves
# idle instead of slowing it (bench/bench_declare.py measures the two-step evaluation,
# which takes two sandboxes at a time).
WARM_NICE = 10
HARNESS_FOUND_S = 5.0            # how long a spawn looks for its harness process to renice

_libc = ctypes.CDLL(None, use_errno=True)   # loaded here: never dlopen after fork

# TEST ONLY: the SELFPROG_SABOTAGE property (base.py) that switches each rlimit off.
_RLIMIT_PROPERTY = {resource.RLIMIT_AS: "memory", resource.RLIMIT_CPU: "cpu",
                    resource.RLIMIT_NPROC: "pids", resource.RLIMIT_FSIZE: "file-size",
                    resource.RLIMIT_NOFILE: "open-files", resource.RLIMIT_CORE: "core"}



def sandbox_env(tmp: Path, threads: int) -> dict[str, str]:
    host = dict(os.environ) if sabotaged("env") else {}   # TEST ONLY: see base.py
    return {**host, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **job_env(str(tmp), threads, seccomp=not sabotaged("seccomp"))}

def job_rlimits(job: Job, wrapped: bool = False) -> list[tuple[int, int]]:
    """The job's rlimits; `wrapped`: under bubblewrap, whose own processes count."""
    lim = job.limits
    threads = int(job.params.get("num_threads", 1))
    mb = 1024 * 1024
    cpu = math.ceil(lim.timeout_s * max(1.0, lim.cpus, threads)) + 5
    wrapper_procs = BWRAP_PROCESSES if wrapped else 0
    wanted = [
        (resource.RLIMIT_AS, (lim.memory_mb + AS_HEADROOM_MB + AS_PER_THREAD_MB * threads) * mb),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, lim.pids + wrapper_procs),
        (resource.RLIMIT_FSIZE, lim.output_mb * mb),
        (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ]
    out = []
    for res, value in wanted:
        if sabotaged(_RLIMIT_PROPERTY[res]):   # TEST ONLY: see base.py
            continue
        _, hard = resource.getrlimit(res)
        # Never above our own hard limit (as non-root we could not raise it anyway).
        out.append((res, value if hard == resource.RLIM_INFINITY else min(value, hard)))
    return out

def preexec(uid: int | None, netns: bool, rlimits: list[tuple[int, int]], nice: int = 0):
    """The child's set-up between fork and exec, in this order: network namespace
    (needs root, so first; unconfined only: bubblewrap makes its own), no-new-privs,
    rlimits (as root we may set any value), niceness, drop groups, gid and uid, then the
    parent-death signal (a credential change would clear it). Then bubblewrap, as
    the job uid, builds the rest (sandbox/backends/bwrap.py)."""
    root = os.geteuid() == 0
    flags = CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET
    no_new_privs = not sabotaged("no-new-privileges")   # TEST ONLY: see base.py

    def setup() -> None:
        if netns and _libc.unshare(flags) != 0:
            raise OSError(ctypes.get_errno(), "unshare(network namespace) failed")
        if no_new_privs and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        os.umask(0o077)
        for res, value, *hard in rlimits:     # (res, value) or (res, soft, hard)
            resource.setrlimit(res, (value, hard[0] if hard else value))
        if nice:
            os.nice(nice)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        # After the uid change: changing credentials clears the parent-death signal.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return setup


def wrap(wrapper: str | None, argv: list[str], jobdir: Path, *, python: str, gpu: bool,
         netns: bool, prefix: str | None = None) -> list[str]:
    """`argv` under bubblewrap (`wrapper`, its path), or as it is when unconfined."""
    if wrapper is None:
        return argv
    return bwrap_argv(wrapper, argv, jobdir=jobdir, python=python, gpu=gpu, network=not netns,
                      prefix=prefix)


@dataclass(eq=False)
class WarmProcess:
    """One pre-warmed process sandbox (a `warm.WarmSandbox`): started, importing or
    waiting for "go"; no job yet."""
    proc: subprocess.Popen
    uid: int
    jobdir: Path
    key: tuple
    born: float
    ready_r: int            # read end of the pipe warm_main writes one byte to when ready
    ready: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def is_ready(self) -> bool:
        if not self.ready and self.ready_r >= 0:
            try:
                self.ready = os.read(self.ready_r, 1) == b"r"
            except OSError:   # nothing yet (EAGAIN)
                pass
        return self.ready

    def release(self) -> None:
        """After its job (kill_run done): free its fds and its uid."""
        if self.ready_r >= 0:
            os.close(self.ready_r)
            self.ready_r = -1
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()   # EOF: a sandbox still waiting leaves by itself
        except OSError:
            pass
        release_uid(self.uid)

    def destroy(self) -> None:
        kill_run(self.proc, self.uid)
        self.release()
        cleanup(self.jobdir)


def spawn_warm_process(key: tuple, *, workroot: Path, uid_base: int,
                       uid_range: int) -> WarmProcess:
    """Start one pre-warmed sandbox for profile `key` (ProcessBackend._profile), confined
    as a job of that profile would be. Runs in the pool's thread, which is the parent of
    every sandbox it starts, so they die with it (PR_SET_PDEATHSIG)."""
    limits, threads, model_kind, device, netns, wrapper, python, prefix = key
    uid = pick_uid(uid_base, uid_range, reserve=True)
    jobdir = None
    ready_r = ready_w = -1
    try:
        jobdir = stage_skeleton(workroot, "warm-", uid=uid, gid=uid)
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
        # The job's limits, except CPU: the warm-up's own allowance until "go" sets
        # the job's (hard limit ours until then: only the harness runs before "go").
        rlimits = [*limits, (resource.RLIMIT_CPU, WARM_CPU_S, cpu_hard)]
        stdout_path, stderr_path = jobdir / STDOUT_FILE, jobdir / STDERR_FILE
        with open(stdout_path, "xb") as out, open(stderr_path, "xb") as err:
            os.chmod(stdout_path, 0o600)
            os.chmod(stderr_path, 0o600)
            argv = [python, "-I", "-c", WARM_COMMAND, model_kind, device, str(ready_w)]
            proc = subprocess.Popen(
                wrap(wrapper, argv, jobdir, python=python, gpu=device != "cpu", netns=netns,
                     prefix=prefix),
                cwd=jobdir, env=sandbox_env(jobdir / "tmp", threads),
                stdin=subprocess.PIPE, stdout=out, stderr=err, close_fds=True,
                pass_fds=(ready_w,), start_new_session=True,
                preexec_fn=preexec(uid, netns and not wrapper, rlimits,
                                                   nice=WARM_NICE))
    except BaseException:
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        if jobdir is not None:
            cleanup(jobdir)
        release_uid(uid)
        raise
    os.close(ready_w)
    warm = WarmProcess(proc=proc, uid=uid, jobdir=jobdir, key=key,
                       born=time.monotonic(), ready_r=ready_r)
    _lower_priority(warm, wrapper)
    return warm


def _lower_priority(warm: "WarmProcess", wrapper: str | None) -> None:
    """The warm-up at WARM_NICE for its whole session (process_tree.set_priority): the
    session is the harness's, which bubblewrap makes (--new-session) just before it
    starts the interpreter, so wait for that process. Not found in time: the process
    niceness from `_preexec` still applies."""
    deadline = time.monotonic() + HARNESS_FOUND_S
    while warm.alive() and time.monotonic() < deadline:
        try:
            harness = sandboxed_pid(warm.proc.pid) if wrapper else warm.proc.pid
            set_priority(harness, warm.uid, WARM_NICE)
            return
        except (SandboxError, OSError):
            time.sleep(0.01)
    log.debug("pre-warmed sandbox %r: no harness process to renice", warm)
