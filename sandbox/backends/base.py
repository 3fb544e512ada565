"""The Backend template: what every sandbox backend does around its own way of confining.

Every backend (local process, Docker) runs a job the same way (docs/CONTRACTS.md,
"Sandbox job -> harness -> result"):

    execute(job, out_dir, watch)
      cold: jobdir = staging.stage(job, ...)        a fresh job directory
            run = _start(job, jobdir)               start `python -I -c HARNESS_COMMAND`
      warm: w = pool.take(_profile(job))            a pre-warmed sandbox (warm.py) ...
            run = _go(job, w, sources)              ... gets the job's files and "go"
      _supervise(job, run, out_dir, watch):
            _wait_for_exit / Watching.poll          the deadline, the caller's Watch,
                                                    _check_running (a backend's own bound)
            _stop(run, outcome)                     kill everything the run left, always
            _logs(run); collect.collect(...)        decide the Result, copy outputs
            _release(run); staging.cleanup(jobdir)

`Backend` is that skeleton; a subclass supplies only what differs: how a sandbox is
started (`_stage`, `_start`, `_go`), waited for (`_wait_for_exit`, `_check_running`),
killed (`_stop`), read (`_logs`) and released (`_release`), and what a warm sandbox
must share with a job (`_profile`).
"""
from __future__ import annotations

import logging
import os
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sandbox.backends.collect import collect, format_logs
from sandbox.backends.staging import check_inputs, cleanup
from sandbox.backends.warm import WARM_MAX_AGE_S, WarmPool, WarmSandbox, discard
from sandbox.backends.watch import Stopped, Watch, Watching
from sandbox.schema import Job, Result
from sandbox.seccomp import ENV as SECCOMP_ENV

log = logging.getLogger(__name__)

WATCH_POLL_S = 0.5               # how often a waiting backend polls the run and the Watch

# ----------------------------------------------------------------- sabotage (TEST ONLY)
SABOTAGE_ENV = "SELFPROG_SABOTAGE"

# TEST ONLY. The confinement properties SELFPROG_SABOTAGE can switch off, one by one
# (`SELFPROG_SABOTAGE=network` or `=network,env`; `1` or `all`: every one). A property a
# backend does not have is ignored by it (the process backend gets its PID and IPC
# namespaces and its read-only root from bubblewrap, all three switched off by "bwrap";
# it has no capability set of its own).
SABOTAGE_PROPERTIES = {
    "network": "the host's network (process: no network namespace; docker: network host)",
    "files": "docker: the host's / mounted read-write at /host, a writable root filesystem",
    "user": "root (process: no per-job uid; docker: uid 0)",
    "env": "the host's environment is passed in",
    "memory": "no memory bound (process: RLIMIT_AS; docker: the memory and swap limit)",
    "pids": "no process count bound (process: RLIMIT_NPROC; docker: the pids limit)",
    "pid-namespace": "docker: the host's PID namespace",
    "file-size": "no file-size bound (RLIMIT_FSIZE / the fsize ulimit; docker: tmpfs sizes)",
    "open-files": "no open-files bound (RLIMIT_NOFILE / the nofile ulimit)",
    "core": "core dumps allowed (RLIMIT_CORE / the core ulimit)",
    "cpu": "no CPU bound (process: RLIMIT_CPU; docker: the CPU quota)",
    "capabilities": "docker: the engine's default capabilities instead of none",
    "no-new-privileges": "no PR_SET_NO_NEW_PRIVS (docker: no no-new-privileges)",
    "ipc": "docker: the host's IPC namespace",
    "runtime": "process: the trusted virtual environment (data sets, pipeline and all) "
               "instead of the sandbox runtime",
    "seccomp": "no seccomp filter from the harness (sandbox/seccomp.py): exec and the "
               "namespace, mount, ptrace, bpf... calls are allowed again",
    "bwrap": "process: no bubblewrap (the host's filesystem, /tmp, /dev/shm, processes and "
             "compilers are the sandbox's, as with process-unconfined)",
}


def sabotaged_properties() -> frozenset[str]:
    """TEST ONLY. The confinement properties switched off by SELFPROG_SABOTAGE (empty:
    none, the normal case). The backends then run candidates without exactly those
    (SABOTAGE_PROPERTIES says what each means). It exists so that tests/attacks can
    prove each deny test detects the loss of the property it names (it must FAIL with
    that property off). Never set it anywhere a real candidate runs; the start-up canary
    (sandbox/canary.py) reports such a sandbox as not confined and the workers refuse to
    take jobs on it. Only the backends' confinement set-up reads it. An unknown name is
    an error, so that a typo cannot sabotage nothing and pass."""
    raw = os.environ.get(SABOTAGE_ENV, "").strip()
    if raw in ("", "0"):
        return frozenset()
    if raw in ("1", "all"):
        return frozenset(SABOTAGE_PROPERTIES)
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - set(SABOTAGE_PROPERTIES))
    if unknown:
        raise ValueError(f"{SABOTAGE_ENV}: unknown confinement properties {unknown}; "
                         f"known: {sorted(SABOTAGE_PROPERTIES)}")
    return names


def sabotaged(prop: str) -> bool:
    """TEST ONLY. Whether SELFPROG_SABOTAGE switched confinement property `prop` off."""
    assert prop in SABOTAGE_PROPERTIES, prop
    return prop in sabotaged_properties()


def sabotage_enabled() -> bool:
    """TEST ONLY. True when SELFPROG_SABOTAGE switches any confinement property off."""
    return bool(sabotaged_properties())


def job_env(tmp: str, threads: int, seccomp: bool = True) -> dict[str, str]:
    """A sandbox's environment, built from nothing: no variable of the host (tokens, DB
    URLs, proxies) leaks in. `tmp` is its HOME, TMPDIR and cache dir. `seccomp=False`
    (TEST ONLY, SELFPROG_SABOTAGE) tells the harness not to install its filter."""
    off = {} if seccomp else {SECCOMP_ENV: "off"}
    return {**off,
        "HOME": tmp, "TMPDIR": tmp, "XDG_CACHE_HOME": f"{tmp}/.cache",
        "TORCH_HOME": f"{tmp}/torch", "HF_HOME": f"{tmp}/hf", "MPLCONFIGDIR": f"{tmp}/mpl",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
    }


class NotStarted(Exception):
    """Raised by a backend's `_start` when the sandbox never started (nothing of the
    candidate ran): the job ends `crashed` saying why."""


@dataclass(eq=False)
class Run:
    """One started sandbox (a backend's `last_run`, for tests and diagnostics)."""
    jobdir: Path
    started: float              # time.monotonic() when the job's deadline began
    warm: bool = False          # ran in a pre-warmed sandbox


@dataclass
class Outcome:
    """How the waiting ended, as `collect` needs it."""
    exit_code: int | None = None    # subprocess terms: -N killed by signal N
    timed_out: bool = False
    stopped: bool = False           # the caller's Watch cancelled it
    oom_killed: bool = False
    failure: str = ""               # the backend's own reason to call it `crashed`
    duration_s: float = 0.0


RUNNING = object()   # `_wait_for_exit`: the sandbox has not ended yet


class Backend:
    """The execute / warm / supervise skeleton; see the module docstring."""

    name = "backend"
    workroot: Path

    def __init__(self, *, keep_jobdirs: bool = False, prewarm: int = 0,
                 prewarm_max_age_s: float = WARM_MAX_AGE_S,
                 spawn: Callable[[tuple], WarmSandbox] | None = None):
        self.keep_jobdirs = keep_jobdirs          # debugging only: leaves job dirs behind
        self.last_run: Any = None
        self.prewarm = max(0, int(prewarm))
        self._pool: WarmPool | None = None
        if self.prewarm and spawn is not None:
            # `spawn` must not hold the backend: collecting the backend (or leaving the
            # interpreter) runs the finalizer, which kills the idle sandboxes.
            self._pool = WarmPool(self.prewarm, spawn, max_age_s=prewarm_max_age_s)
            self._finalizer = weakref.finalize(self, self._pool.close)

    def close(self) -> None:
        """Kill the idle pre-warmed sandboxes and stop making new ones (no-op without)."""
        if self._pool is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the skeleton
    def prewarm_for(self, job: Job) -> None:
        """Start warming sandboxes for jobs like `job` now, instead of after the first
        such job ran cold (no-op without prewarm, or where this backend cannot warm)."""
        job.validate()
        self._ready()
        if self._pool is not None and self._can_warm():
            self._pool.target(self._profile(job))

    def execute(self, job: Job, out_dir: Path, watch: Watch | None = None) -> Result:
        """Run one job to completion; always returns a Result (never the candidate's
        exception). Raises SandboxError only when the sandbox itself cannot be made
        (not the candidate's doing). `watch` (sandbox/backends/watch.py): relay its
        training losses, stop it when cancelled."""
        job.validate()
        self._ready()
        out_dir = Path(out_dir)
        if self._pool is not None and self._can_warm():
            result = self._execute_warm(job, out_dir, watch)
            if result is not None:
                return result
        jobdir = self._stage(job)
        try:
            run = self._start(job, jobdir)
        except NotStarted as e:
            self._remove_dir(jobdir)
            return Result.failure(job, "crashed", f"the sandbox could not start: {e}")
        except BaseException:
            self._remove_dir(jobdir)
            raise
        return self._supervise(job, run, out_dir, watch)

    def _execute_warm(self, job: Job, out_dir: Path, watch: Watch | None) -> Result | None:
        """Run `job` in a pre-warmed sandbox; None when there is none to use (the caller
        then runs it cold). Nothing of the job reaches a sandbox before it is taken, and
        a sandbox is never given a second job."""
        sources = check_inputs(job)          # a bad input is refused as in a cold run
        warm = self._pool.take(self._profile(job))
        if warm is None:
            return None
        try:
            run = self._go(job, warm, sources)
        except Exception as e:
            # Not started (it died, or could not be limited): nothing of the candidate ran.
            log.warning("pre-warmed sandbox %r unusable (%s); running the job cold", warm, e)
            discard(warm)
            return None
        return self._supervise(job, run, out_dir, watch)

    def _supervise(self, job: Job, run: Run, out_dir: Path, watch: Watch | None) -> Result:
        """Wait for a started sandbox under the job's deadline (from `run.started`) and
        the caller's Watch; then kill everything of the run, collect its result and
        remove its directory. Cold and warm runs alike."""
        self.last_run = run
        outcome: Outcome | None = None
        try:
            try:
                outcome = self._wait(job, run, Watching(run.jobdir, watch))
            finally:
                self._stop(run, outcome)        # nothing of the run outlives this
            stdout, stderr = self._logs(run)
            if outcome.failure:
                result = Result.failure(job, "crashed", outcome.failure,
                                        duration_s=round(outcome.duration_s, 3),
                                        logs=format_logs(stdout, stderr))
            else:
                result = collect(job, run.jobdir, out_dir, exit_code=outcome.exit_code,
                                 timed_out=outcome.timed_out, oom_killed=outcome.oom_killed,
                                 stopped=outcome.stopped, stdout_tail=stdout,
                                 stderr_tail=stderr, duration_s=outcome.duration_s)
            # The cost is the backend's measurement, whatever the harness wrote.
            result.usage = {"wall_s": round(outcome.duration_s, 3), **self._usage(run),
                            "backend": self.identity(), "host": socket.gethostname()}
            return result.validate()
        finally:
            self._release(run)
            self._remove_dir(run.jobdir)

    def _wait(self, job: Job, run: Run, watching: Watching) -> Outcome:
        """Until the sandbox exits, the deadline passes, the caller cancels or the
        backend's own bound (`_check_running`) is crossed."""
        deadline = run.started + job.limits.timeout_s
        outcome = Outcome()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.timed_out = True
                break
            code = self._wait_for_exit(run, max(0.05, min(WATCH_POLL_S, remaining)))
            if code is not RUNNING:
                outcome.exit_code = code
                break
            try:
                watching.poll()
            except Stopped:
                outcome.stopped = True
                break
            outcome.failure = self._check_running(job, run)
            if outcome.failure:
                break
        outcome.duration_s = time.monotonic() - run.started
        if not outcome.stopped:
            watching.poll(final=True)           # the last step
        return outcome

    def _remove_dir(self, jobdir: Path) -> None:
        if not self.keep_jobdirs:
            cleanup(jobdir)

    # ------------------------------------------------------------------ what differs
    def identity(self) -> str:
        """What this backend runs sandboxes with, as one string that changes whenever a
        score could (pipeline/evaluations.py puts it into the evaluation key): the
        interpreter and its packages, or the image's id."""
        raise NotImplementedError

    def _usage(self, run: Run) -> dict:
        """CPU seconds and peak resident memory (MiB) of an ended run, where this backend
        can measure them cheaply (None each where it cannot)."""
        return {"cpu_s": None, "peak_rss_mb": None}

    def _ready(self) -> None:
        """Check (once) that this backend can run sandboxes here; raise SandboxError if not."""

    def _can_warm(self) -> bool:
        """Whether jobs may run in pre-warmed sandboxes here (sabotaged ones too: they
        are confined, or not, exactly like cold ones)."""
        return True

    def _profile(self, job: Job) -> tuple:
        """What a pre-warmed sandbox must have been started with to run `job`."""
        raise NotImplementedError

    def _stage(self, job: Job) -> Path:
        """A staged job directory for `job` (staging.stage with this backend's owner)."""
        raise NotImplementedError

    def _start(self, job: Job, jobdir: Path) -> Run:
        """Start the harness on a staged job directory; NotStarted if it never started.
        Whatever it made before failing it removes itself (the base removes `jobdir`)."""
        raise NotImplementedError

    def _go(self, job: Job, warm: WarmSandbox, sources: dict[str, Path]) -> Run:
        """Stage `job` into a taken warm sandbox and tell it to go; raise if it cannot
        (the sandbox is then discarded and the job runs cold)."""
        raise NotImplementedError

    def _wait_for_exit(self, run: Run, timeout: float):
        """The run's exit code (subprocess terms), or RUNNING after `timeout` seconds."""
        raise NotImplementedError

    def _check_running(self, job: Job, run: Run) -> str:
        """A reason to end a still running sandbox now ('' for none)."""
        return ""

    def _stop(self, run: Run, outcome: Outcome | None) -> None:
        """Kill everything of the run, whatever happened (`outcome` is None when waiting
        itself failed); may complete `outcome` with what only the end shows."""
        raise NotImplementedError

    def _logs(self, run: Run) -> tuple[bytes, bytes]:
        """The run's stdout and stderr tails."""
        raise NotImplementedError

    def _release(self, run: Run) -> None:
        """Free what the run held besides its job directory (after collecting)."""
