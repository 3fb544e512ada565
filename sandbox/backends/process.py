"""Local process backend: run the harness as a confined child process on this machine.

For machines without Docker (the embedded default). Two names (sandbox/backends/__init__.py):

* `process` (ProcessBackend): everything below, and every sandbox runs under bubblewrap
  (sandbox/backends/bwrap.py): its own user, PID, IPC, UTS and network namespaces, a
  read-only root of only what the interpreter needs (no host /home, /work, /var, /tmp,
  /dev/shm, no compiler), a private sized /tmp and /dev/shm, the job directory with
  only out/ and tmp/ writable. It refuses to start where bubblewrap is missing or cannot
  make its namespaces.
* `process-unconfined` (UnconfinedProcessBackend): the same without bubblewrap, only by
  name: it warns when built and in its `isolation` report (WEAKER, see below).

What confines a run in both:

* a fresh job directory (sandbox/backends/staging.py), cwd of the child; the candidate
  may write only `out/` and `tmp/`;
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

Weaker than the Docker backend in both (SECURITY.md; `isolation` reports it): memory is
bounded as *address space* (RLIMIT_AS = memory_mb + headroom for what torch reserves but
does not touch), not as resident memory with a cgroup; no seccomp profile of its own (the harness installs sandbox/seccomp.py in both); no CPU quota
(RLIMIT_CPU is a backstop, the deadline is the limit). process-unconfined also leaves
the host filesystem visible (world-readable files are readable, /tmp and /dev/shm are
writable and outlive the job), shows the host's processes and its compilers.
As non-root there is no uid drop at all, and the network namespace needs
unprivileged user namespaces; both need `allow_unconfined=True`, which logs a warning.

Pre-warmed sandboxes (`prewarm=N`, Settings.sandbox_prewarm; 0 = off, the default). A
fresh sandbox pays a few seconds to import torch and transformers (and on a GPU to
initialise CUDA) before its candidate runs. With prewarm on, the backend keeps N
sandboxes started ahead, each confined exactly like a job (same `_preexec` and the same
bubblewrap command: namespaces, its own uid, the job's rlimits, scrubbed environment,
own session; the job directory is bound, so what is staged later is seen), running
`harness.warm_main` in a job directory that holds no job (`staging.stage_skeleton`): it
imports, then blocks on stdin. `execute` takes one (`warm.WarmPool.take`), stages that one
job's files into it (`staging.stage_job`: inputs, job.json, seal key), sets its CPU limit
to what it used warming up plus the job's own budget, gives it normal priority (it warms
up at WARM_NICE, so a refill yields the CPU to the job that is running), writes "go", and from then on
treats it as a cold run: the deadline counts from "go", and afterwards the process
group and every process of its uid are killed and its directory removed. A sandbox
serves one job only; a replacement is started in the background as soon as one is
taken. Confinement depends on a job's limits, threads, model kind and device, so the
pool holds sandboxes for the profile of the most recent job; a job of another profile
(the first one included) runs cold and retargets the pool. Idle sandboxes older than
`prewarm_max_age_s` are recycled; `close()`, garbage collection of the backend and
interpreter exit kill the idle ones (each also dies with the pool's thread:
PR_SET_PDEATHSIG). Needs root with the uid drop; elsewhere every job runs cold.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sandbox.backends import runtime
from sandbox.backends.errors import SandboxError
from sandbox.backends.base import (RUNNING, Backend, NotStarted, Outcome, Run, sabotage_enabled,
                                   sabotaged, sabotaged_properties)
from sandbox.backends.bwrap import BwrapMissing, find_bwrap
from sandbox.backends.collect import LOG_TAIL_BYTES, read_tail
from sandbox.backends.process_tree import (cpu_seconds, kill_run, kill_uid, peak_rss_kb, pick_uid,
                                           sandboxed_pid, set_cpu_limit, set_priority)
from sandbox.backends.process_spawn import (CLONE_NEWNET, CLONE_NEWUSER, WarmProcess, _libc,
                                            job_rlimits, preexec, sandbox_env,
                                            spawn_warm_process, wrap)
from sandbox.backends.staging import stage, stage_job
from sandbox.backends.warm import WARM_MAX_AGE_S, imports_of
from sandbox.protocol import HARNESS_COMMAND, OUT_DIR, STDERR_FILE, STDOUT_FILE, TMP_DIR
from sandbox.schema import Job

log = logging.getLogger(__name__)

RUNTIME_ENV = "SELFPROG_SANDBOX_PYTHON_PREFIX"   # Settings.sandbox_python_prefix
UNCONFINED_WARNING = (
    "process-unconfined: candidates run WITHOUT bubblewrap, WEAKER isolation: the host's "
    "world-readable files, /tmp, /dev/shm, processes and compilers are the sandbox's "
    "(SECURITY.md); use the 'process' (bubblewrap) or 'docker' backend to confine them")


@dataclass
class Isolation:
    """What this backend really got on this machine (checked, not assumed)."""
    confinement: str = "bubblewrap"     # "bubblewrap", or "unconfined" (no filesystem,
                                        # PID or IPC sandbox: process-unconfined)
    uid_drop: bool = False
    netns: bool = False
    userns: bool = False
    pidns: bool = False
    python_ok: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"confinement": self.confinement, "uid_drop": self.uid_drop,
                "netns": self.netns, "userns": self.userns, "pidns": self.pidns,
                "python_ok": self.python_ok, "warnings": list(self.warnings)}


@dataclass(eq=False)
class RunInfo(Run):
    """One process-backend run (`last_run`): its uid, its harness process."""
    uid: int | None = None
    pid: int = 0
    harness_pid: int = 0         # the harness under bubblewrap, once found
    cpu_seen: float = 0.0        # its CPU seconds and peak RSS at the latest sample
    hwm_kb: int = 0
    cpu_at_go: float = 0.0       # a warm sandbox's CPU spent warming up (not the job's)
    survivors_killed: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    sandbox: "WarmProcess | None" = field(default=None, repr=False)   # when warm


USAGE_SAMPLE_S = 0.05           # how often a running harness's CPU and memory are read


class ProcessBackend(Backend):
    """The `process` backend: every sandbox under bubblewrap (sandbox/backends/bwrap.py);
    refuses to start where bubblewrap is missing or cannot make its namespaces."""
    name = "process"
    confine = True               # run every sandbox under bubblewrap

    def __init__(self, workroot: Path | str | None = None, python: str | None = None,
                 runtime_prefix: str | None = None, uid_base: int = 200_000, allow_unconfined: bool = False,
                 uid_range: int = 100_000, keep_jobdirs: bool = False, prewarm: int = 0,
                 prewarm_max_age_s: float = WARM_MAX_AGE_S, bwrap: str | None = None):
        self.workroot = Path(workroot) if workroot else Path(tempfile.gettempdir()) / "selfprog-sandbox"
        # The sandbox runtime (sandbox/backends/runtime.py), never this interpreter's
        # environment; `python` (tests: a wrapper) runs instead of its interpreter.
        self.runtime_prefix = (runtime_prefix or os.environ.get(RUNTIME_ENV)
                               or runtime.DEFAULT_PREFIX)
        self.python = python or runtime.interpreter(self.runtime_prefix)
        self.uid_base = uid_base
        self.uid_range = uid_range
        self.allow_unconfined = allow_unconfined
        self.bwrap = bwrap                # bubblewrap's path; None: `bwrap` on PATH
        self.isolation: Isolation | None = None
        self._wrapper: str | None = None  # the bwrap in use (None: unconfined)
        self._lock = threading.Lock()
        spawn = partial(spawn_warm_process, workroot=self.workroot, uid_base=uid_base,
                        uid_range=uid_range)
        super().__init__(keep_jobdirs=keep_jobdirs, prewarm=prewarm,
                         prewarm_max_age_s=prewarm_max_age_s, spawn=spawn)

    # ------------------------------------------------------------------ registry
    @classmethod
    def available(cls, bwrap: str | None = None, **_: object) -> tuple[bool, str]:
        """Whether this backend can run here without starting anything (`auto`)."""
        try:
            find_bwrap(bwrap)
        except BwrapMissing as e:
            return False, str(e)
        return True, ""

    def confinement_report(self, requested: str, allow_unconfined: bool) -> tuple[str, str, str]:
        """(ok | warn | fail, detail, fix) for `selfprog-cli doctor`, after `probe`."""
        rt = (f"; sandbox runtime {self.runtime_prefix} "
              f"({len(runtime.manifest(self.runtime_prefix))} distributions of the allow-list)")
        if self.isolation.confinement == "unconfined":
            detail = ("confinement: unconfined, the local process backend WITHOUT bubblewrap: "
                      "WEAKER isolation (host files, /tmp, /dev/shm, processes and compilers "
                      "visible to candidates; no cgroup memory limit)" + rt)
            asked = requested == "process-unconfined" or allow_unconfined
            return ("warn" if asked else "fail", detail,
                    "install bubblewrap and use --backend process, or Docker")
        detail = ("confinement: bubblewrap, the local process backend (namespaces, a read-only "
                  "root of the interpreter and the sandbox runtime only, the harness's seccomp "
                  "filter; WEAKER than a container: no cgroup memory limit)" + rt)
        if requested == "auto":
            return ("warn", f"'auto' picks {detail}",
                    "install the Docker engine and the sandbox image for container isolation")
        return "ok", detail, ""

    # ------------------------------------------------------------------ probing
    def probe(self) -> Isolation:
        """Check once what confinement this machine gives; raise if it is not enough.

        Runs a tiny child confined as a job is (bubblewrap, uid drop) that checks the
        interpreter starts and finds torch/transformers/safetensors, and reports the
        network interfaces and processes it sees.
        """
        with self._lock:
            if self.isolation is not None:
                return self.isolation
            iso = Isolation(confinement="bubblewrap" if self.confine else "unconfined")
            root = os.geteuid() == 0
            if not sabotaged("runtime"):   # TEST ONLY: see base.py
                problems = runtime.check_runtime(self.runtime_prefix)
                if problems:
                    raise SandboxError("the sandbox runtime is not usable: " + "; ".join(problems))
            else:
                self.runtime_prefix = sys.prefix   # the trusted venv, data sets and all
                self.python = sys.executable
            if self.confine and not sabotaged("bwrap"):   # TEST ONLY: see base.py
                try:
                    self._wrapper = find_bwrap(self.bwrap)
                except BwrapMissing as e:
                    raise SandboxError(str(e)) from None
                iso.netns = iso.userns = iso.pidns = True   # the probe run checks them
            else:
                iso.netns = self._try_unshare(CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET)
                iso.userns = iso.netns and not root
            if not iso.netns:
                iso.warnings.append("no network namespace: candidates can reach the network")
            if root:
                ok, why = self._probe_run(drop=True, netns=iso.netns)
                if ok:
                    iso.uid_drop = iso.python_ok = True
                elif self._wrapper and "bwrap" in why and "cannot enter" not in why:
                    raise SandboxError(self._bwrap_failed(why))
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
                    if self._wrapper and "bwrap" in why:
                        raise SandboxError(self._bwrap_failed(why))
                    raise SandboxError(f"the process sandbox cannot run {self.python}: {why}")
                iso.python_ok = True
            if iso.warnings and not self.allow_unconfined:
                raise SandboxError("the process sandbox does not confine here: "
                                   + "; ".join(iso.warnings)
                                   + " (pass allow_unconfined=True to run anyway)")
            if not self.confine:   # asked for by name: runs, and says so every time
                iso.warnings.append(UNCONFINED_WARNING)
            for w in iso.warnings:
                log.warning("UNCONFINED process sandbox: %s", w)
            if sabotage_enabled():   # TEST ONLY (base.py sabotaged_properties)
                iso.netns = iso.netns and not sabotaged("network")
                iso.uid_drop = iso.uid_drop and not sabotaged("user")
                if self._wrapper is None:
                    iso.confinement, iso.pidns = "unconfined", False
                iso.warnings.append("SABOTAGE MODE (tests only): SELFPROG_SABOTAGE="
                                    + ",".join(sorted(sabotaged_properties())))
                log.error("UNCONFINED process sandbox: %s", iso.warnings[-1])
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
        code = ("import importlib.util as u, json, os, socket; "
                "missing = [m for m in ('torch', 'transformers', 'safetensors') if u.find_spec(m) is None]; "
                "print(json.dumps({'missing': missing, 'ifaces': [n for _, n in socket.if_nameindex()], "
                "'pids': sum(p.isdigit() for p in os.listdir('/proc'))}))")
        uid = pick_uid(self.uid_base, self.uid_range) if drop else None
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)
            for sub in (OUT_DIR, TMP_DIR):       # what bubblewrap binds writable
                os.mkdir(Path(tmp) / sub, 0o755)
            argv = [self.python, "-I", "-c", code]
            try:
                proc = subprocess.run(
                    wrap(self._wrapper, argv, Path(tmp), python=self.python, gpu=False,
                         netns=netns, prefix=self.runtime_prefix),
                    cwd=tmp, env=self._env(Path(tmp) / TMP_DIR, 1),
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                    preexec_fn=self._preexec(uid, netns and not self._wrapper, rlimits=[]),
                    start_new_session=True)
            except (OSError, subprocess.SubprocessError) as e:
                return False, f"{type(e).__name__}: {e}{self._why_unreadable()}"
            finally:
                if uid is not None:
                    kill_uid(uid)
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
        if self._wrapper and report["pids"] > 3:   # bubblewrap's two and the probe
            return False, f"bwrap: the PID namespace shows {report['pids']} processes"
        return True, ""

    def _bwrap_failed(self, why: str) -> str:
        return (f"bubblewrap ({self._wrapper}) cannot make the process sandbox here: {why}. "
                "It needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0; "
                "in a container, a seccomp profile that allows them); or use the Docker "
                "backend, or pass --backend process-unconfined (WEAKER: SECURITY.md)")

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

    # ------------------------------------------------------------------ the template's parts
    def _ready(self) -> None:
        self.probe()

    def _can_warm(self) -> bool:
        # Needs the uid drop: kill and CPU limit work per uid.
        return self.isolation.uid_drop

    def _profile(self, job: Job) -> tuple:
        """What a warm sandbox must have been started with to run `job`: its rlimits but
        CPU (set at "go"), threads (environment), model kind and device (what it
        imports), whether it has a network namespace, bubblewrap (None: unconfined) and
        the interpreter."""
        threads = int(job.params.get("num_threads", 1))
        limits = tuple((res, v) for res, v in self._rlimits(job, self._wrapper is not None)
                       if res != resource.RLIMIT_CPU)
        return (limits, threads, *imports_of(job), self.isolation.netns, self._wrapper,
                self.python, self.runtime_prefix)

    def _stage(self, job: Job) -> Path:
        uid = pick_uid(self.uid_base, self.uid_range) if self.isolation.uid_drop else None
        return stage(job, self.workroot, uid=uid, gid=uid, seal=True)

    def _start(self, job: Job, jobdir: Path) -> RunInfo:
        # The uid `_stage` picked owns out/ (nothing of the sandbox has run yet).
        uid = os.stat(jobdir / OUT_DIR).st_uid if self.isolation.uid_drop else None
        threads = int(job.params.get("num_threads", 1))
        started = time.monotonic()
        stdout_path, stderr_path = jobdir / STDOUT_FILE, jobdir / STDERR_FILE
        try:
            with open(stdout_path, "xb") as out, open(stderr_path, "xb") as err:
                os.chmod(stdout_path, 0o600)
                os.chmod(stderr_path, 0o600)
                argv = [self.python, "-I", "-c", HARNESS_COMMAND]
                proc = subprocess.Popen(
                    wrap(self._wrapper, argv, jobdir, python=self.python,
                         gpu=imports_of(job)[1] != "cpu", netns=self.isolation.netns,
                         prefix=self.runtime_prefix),
                    cwd=jobdir, env=self._env(jobdir / TMP_DIR, threads),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                    start_new_session=True,
                    preexec_fn=self._preexec(uid, self.isolation.netns and not self._wrapper,
                                             self._rlimits(job, self._wrapper is not None)))
        except (OSError, subprocess.SubprocessError) as e:
            # The child never started (e.g. preexec failed): nothing of the candidate ran.
            raise NotStarted(f"{type(e).__name__}: {e}") from None
        return RunInfo(jobdir=jobdir, started=started, uid=uid, pid=proc.pid, proc=proc)

    def _go(self, job: Job, warm: "WarmProcess", sources: dict[str, Path]) -> RunInfo:
        proc, uid, jobdir = warm.proc, warm.uid, warm.jobdir
        cpu_budget = dict(self._rlimits(job, self._wrapper is not None)).get(resource.RLIMIT_CPU)
        stage_job(job, jobdir, sources, uid=uid, gid=uid, seal=True)
        # On the harness itself (under bubblewrap, two processes below `proc`).
        harness = sandboxed_pid(proc.pid) if self._wrapper else proc.pid
        # RLIMIT_CPU: what it spent warming up, plus the job's own budget (soft = hard).
        if cpu_budget is not None:   # None: TEST ONLY, SELFPROG_SABOTAGE=cpu
            set_cpu_limit(harness, uid, math.ceil(cpu_seconds(harness)) + cpu_budget)
        set_priority(harness, uid, 0)      # the job's own priority (it warmed up at WARM_NICE)
        try:
            warmed = cpu_seconds(harness)  # not the job's cost (its usage subtracts it)
        except OSError:
            warmed = 0.0
        started = time.monotonic()
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        return RunInfo(jobdir=jobdir, started=started, warm=True, uid=uid, pid=proc.pid,
                       proc=proc, sandbox=warm, cpu_at_go=warmed, harness_pid=harness)

    def identity(self) -> str:
        return f"{self.name}:{runtime.interpreter_identity(self.python)}"

    def _wait_for_exit(self, run: RunInfo, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            self._sample(run)
            code = run.proc.poll()
            if code is not None:
                return code
            if time.monotonic() >= deadline:
                return RUNNING
            time.sleep(min(USAGE_SAMPLE_S, max(0.0, deadline - time.monotonic())))

    def _sample(self, run: RunInfo) -> None:
        """Note the harness's CPU seconds and peak RSS while it runs. Under bubblewrap
        the child's rusage says nothing of the harness (bubblewrap's PID 1 reaps it and
        is killed, not waited for) and its peak RSS is the forking worker's, so the
        harness itself is read from /proc, every USAGE_SAMPLE_S: the last sample before
        it exits is its cost, short of at most that interval."""
        try:
            if not run.harness_pid:
                run.harness_pid = sandboxed_pid(run.proc.pid) if self._wrapper else run.proc.pid
            run.cpu_seen = max(run.cpu_seen, cpu_seconds(run.harness_pid))
            run.hwm_kb = max(run.hwm_kb, peak_rss_kb(run.harness_pid))
        except (OSError, ValueError, SandboxError):
            pass   # not started yet, or gone: the samples so far stand

    def _usage(self, run: RunInfo) -> dict:
        if not run.harness_pid:
            return super()._usage(run)
        return {"cpu_s": round(max(0.0, run.cpu_seen - run.cpu_at_go), 3),
                "peak_rss_mb": round(run.hwm_kb / 1024, 1) if run.hwm_kb else None}

    def _stop(self, run: RunInfo, outcome: Outcome | None) -> None:
        """Kill the run's process group, then everything the job uid still owns."""
        run.survivors_killed = kill_run(run.proc, run.uid)
        if run.sandbox is not None:
            run.sandbox.release()
        # SIGXCPU (the CPU-seconds backstop) is a deadline too, measured in CPU time.
        if outcome is not None and outcome.exit_code == -signal.SIGXCPU:
            outcome.timed_out = True

    def _logs(self, run: RunInfo) -> tuple[bytes, bytes]:
        return (read_tail(run.jobdir / STDOUT_FILE, LOG_TAIL_BYTES),
                read_tail(run.jobdir / STDERR_FILE, LOG_TAIL_BYTES))

    # ------------------------------------------------------------------ confinement
    _env = staticmethod(sandbox_env)
    _rlimits = staticmethod(job_rlimits)
    _preexec = staticmethod(preexec)

class UnconfinedProcessBackend(ProcessBackend):
    """`process-unconfined`: the process backend without bubblewrap (per-job uid, network
    namespace, rlimits, kill paths only; see the module docstring). WEAKER: never picked
    by `auto`, only by name; it warns when built and in its `isolation` report."""
    name = "process-unconfined"
    confine = False

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        log.warning("%s", UNCONFINED_WARNING)

    @classmethod
    def available(cls, **_: object) -> tuple[bool, str]:
        return True, ""
