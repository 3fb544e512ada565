"""The processes of a process-backend run: per-job uids, the process table, killing.

Every run of the process backend (sandbox/backends/process.py) gets a uid no other
process has; afterwards its process group is SIGKILLed and then every process still
owned by that uid (a `setsid` or double-fork escapee) is killed by a helper that
becomes that uid and calls kill(-1, SIGKILL).
"""
from __future__ import annotations

import logging
import os
import random
import resource
import signal
import subprocess
import threading
import time

from sandbox.backends.errors import SandboxError

log = logging.getLogger(__name__)

# uids handed to pre-warmed sandboxes that may not have a process yet: never picked twice.
_RESERVED_UIDS: set[int] = set()
_RESERVED_LOCK = threading.Lock()


def release_uid(uid: int) -> None:
    """A reserved uid (pick_uid(reserve=True)) may be picked again."""
    with _RESERVED_LOCK:
        _RESERVED_UIDS.discard(uid)


def pick_uid(base: int, span: int, reserve: bool = False) -> int:
    """A uid in [base, base + span) that no process has and no pre-warmed sandbox holds."""
    with _RESERVED_LOCK:
        busy = {u for _, u in processes()} | _RESERVED_UIDS
        for _ in range(100):
            uid = base + random.randrange(span)
            if uid not in busy:
                if reserve:
                    _RESERVED_UIDS.add(uid)
                return uid
    raise SandboxError("no free sandbox uid")


def kill_run(proc: subprocess.Popen, uid: int | None) -> int:
    """Kill a run's process group, then everything its uid still owns (a `setsid` or
    double-fork escapee); without a uid of its own, what is left of its session.
    Returns how many processes outside the process group had to be killed."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    survivors = 0
    for _ in range(100):
        if uid is not None:
            alive = [pid for pid, u in processes() if u == uid]
        else:  # no uid of its own: the best we have is its session id
            alive = [pid for pid in session_members(proc.pid)]
        if not alive:
            return survivors
        survivors += len(alive)
        if uid is not None:
            kill_uid(uid)
        else:
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.01)
    log.error("processes of sandbox run %s survive SIGKILL", proc.pid)
    return survivors


def kill_uid(uid: int) -> None:
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


def proc_table() -> list[tuple[int, int, int, int]]:
    """(pid, real uid, process group, session) of every live, non-zombie process, from
    /proc/<pid>/status (ids as seen from this /proc's PID namespace)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("State", "Uid", "NSpgid", "NSsid") and value.split():
                fields[key] = value.split()[0]
        if len(fields) == 4 and fields["State"] not in ("Z", "X"):
            out.append((int(entry), int(fields["Uid"]), int(fields["NSpgid"]),
                        int(fields["NSsid"])))
    return out


def processes() -> list[tuple[int, int]]:
    """(pid, real uid) of every live, non-zombie process."""
    return [(pid, uid) for pid, uid, _, _ in proc_table()]


def session_members(sid: int) -> list[int]:
    """Live processes in session (or process group) `sid`: a run's tree without a uid."""
    return [pid for pid, _, pgrp, session in proc_table() if sid in (pgrp, session)]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        line = f.read().decode(errors="replace")
    fields = line[line.rfind(")") + 2:].split()     # field 3 onward
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime, stime


def peak_rss_kb(pid: int) -> int:
    """A process's peak resident set size (VmHWM), in KiB, from /proc."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


def set_cpu_limit(pid: int, uid: int, seconds: int) -> None:
    """Set RLIMIT_CPU (soft = hard = `seconds`) of a running sandbox, then check it.

    Done as the sandbox's own uid (a forked helper, like kill_uid): prlimit() on another
    uid's process needs CAP_SYS_RESOURCE, which root in a container may lack; lowering
    the hard limit of one's own process needs nothing.
    """
    child = os.fork()
    if child == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            resource.prlimit(pid, resource.RLIMIT_CPU, (seconds, seconds))
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    with open(f"/proc/{pid}/limits") as f:
        row = next((line for line in f if line.startswith("Max cpu time")), "")
    if os.waitstatus_to_exitcode(status) != 0 or row.split()[3:5] != [str(seconds)] * 2:
        raise SandboxError(f"could not set the CPU limit of sandbox {pid}")


def sandboxed_pid(pid: int, wrapper: str = "bwrap") -> int:
    """The process a wrapper started as `pid` runs for it: the first descendant, following
    only children, whose command is not the wrapper's (bubblewrap: its monitor, then its
    PID 1, then the harness); `pid` itself when it is not the wrapper."""
    for _ in range(8):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != wrapper:
                    return pid
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            break
        if len(children) != 1:
            break
        pid = children[0]
    raise SandboxError(f"no process of the sandbox found under {pid}")


def set_priority(pid: int, uid: int, nice: int) -> None:
    """Give a sandbox the niceness `nice`: every process of its uid, and the scheduler's
    autogroup of the session `pid` leads. Where the kernel groups each session
    (sched_autogroup_enabled, on here), CPU is shared between sessions first and a
    process's own niceness only counts within its session; every sandbox is a session
    of its own. Lowering a niceness needs root (pre-warming needs it anyway). A kernel
    without autogroups has no such file: the process niceness alone then applies."""
    os.setpriority(os.PRIO_USER, uid, nice)
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except FileNotFoundError:
        pass
