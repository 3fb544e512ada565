"""The root a confined process sandbox sees: the bubblewrap (`bwrap`) command line.

    argv = bwrap_argv(find_bwrap(), [python, "-I", "-c", HARNESS_COMMAND], jobdir=jobdir,
                      python=python, gpu=False, network=False)

The process backend (sandbox/backends/process.py) starts every sandbox, cold or
pre-warmed, through this argv, after its own set-up (uid drop, rlimits, no-new-privs).
bubblewrap then gives it:

* its own user, PID, IPC, UTS and (where the kernel has one) cgroup namespace, and a
  network namespace with only a downed loopback; no further user namespaces inside
  (--disable-userns); its own session; it dies with the backend (--die-with-parent).
  When the harness exits, bubblewrap's PID 1 exits and the kernel kills whatever else
  is left in the PID namespace;
* a read-only root made of nothing but what the interpreter needs: the multiarch
  library directory and the loader (/usr/lib/<multiarch>, /usr/lib64), the interpreter
  binary, its standard library, the sandbox runtime's prefix (sandbox/backends/runtime.py:
  the image's package set only; never the trusted virtual environment, which holds the
  data sets and their labels), /etc/ld.so.cache, and SHELL_TOOLS (sh, cat, sleep, env). No compiler, assembler or linker,
  no /home, /root, /work, /var, /etc beyond that one file, no host /tmp or /dev/shm;
* a fresh /proc (only the sandbox's processes) and a minimal /dev (null, zero, random,
  urandom, full, tty, pts) remounted read-only, plus the GPU device nodes for a job
  that may use a GPU;
* a private /tmp (TMP_MB) and /dev/shm (SHM_MB): tmpfs that vanish with the sandbox;
* the job directory at its own path, read-only, with only its `out/` and `tmp/` writable.

The job directory is bound as a directory, not copied: a pre-warmed sandbox sees the
files the backend stages into it later (staging.stage_job).

bubblewrap 0.8 has no noexec for its tmpfs mounts and the writable binds keep the host
file system's flags; a file the candidate writes is still not run, since the harness's
seccomp filter (sandbox/seccomp.py) denies execve. ctypes runs machine code in-process
anyway: native code gets exactly the interpreter's confinement (SECURITY.md).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from sandbox.backends.runtime import stdlib_dirs
from sandbox.protocol import OUT_DIR, TMP_DIR

# The same sizes as the Docker profile's (sandbox/backends/docker_profile.py):
# TMPDIR is the job's own tmp/, so /tmp stays small.
TMP_MB = 16
SHM_MB = 64
# Programs besides the interpreter: what a candidate's shell-out (os.system needs sh)
# and the attack suite use. Never a compiler, assembler or linker.
SHELL_TOOLS = ("sh", "cat", "sleep", "env")
TOOL_DIR = "/usr/bin"
LIB_DIRS = ("/usr/lib64",)          # the loader (/lib64/ld-linux-*.so.2 resolves here)
ETC_FILES = ("/etc/ld.so.cache",)   # where the loader finds libraries (libcuda included)
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps/*")
# bubblewrap's own processes (its monitor outside, PID 1 inside): they count against
# the job uid's RLIMIT_NPROC.
BWRAP_PROCESSES = 2


class BwrapMissing(RuntimeError):
    """bubblewrap is not installed (or not where it was said to be)."""


def find_bwrap(path: str | None = None) -> str:
    """The bwrap executable: `path` if given, else the one on PATH."""
    found = shutil.which(path or "bwrap")
    if not found:
        raise BwrapMissing(
            f"bubblewrap ({path or 'bwrap'}) is not installed: install it (Debian/Ubuntu: "
            "apt-get install bubblewrap), or use the Docker backend (--backend docker), "
            "or pass --backend process-unconfined to run WITHOUT a filesystem, PID and IPC "
            "sandbox (weaker: SECURITY.md)")
    return found


def bwrap_argv(bwrap: str, argv: list[str], *, jobdir: Path, python: str, gpu: bool,
               network: bool = False, prefix: str | None = None) -> list[str]:
    """The bubblewrap command that runs `argv` in `jobdir` (see the module docstring).
    `network=True` only for SELFPROG_SABOTAGE=network (tests)."""
    jobdir = Path(jobdir)
    args = [bwrap, "--unshare-user", "--disable-userns", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not network:
        args.append("--unshare-net")
    args += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(SHM_MB << 20), "--tmpfs", "/dev/shm",
             "--perms", "1777", "--size", str(TMP_MB << 20), "--tmpfs", "/tmp"]
    args += root_args(python, prefix)     # after /tmp: an interpreter may live under it
    if gpu:
        for pattern in GPU_DEVICES:
            for dev in sorted(glob.glob(pattern)):
                args += ["--dev-bind", dev, dev]
    j = str(jobdir)
    args += ["--ro-bind", j, j,
             "--bind", str(jobdir / OUT_DIR), str(jobdir / OUT_DIR),
             "--bind", str(jobdir / TMP_DIR), str(jobdir / TMP_DIR),
             "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", j,
             # bubblewrap sets PWD; the sandbox's environment is the backend's alone
             "--", os.path.join(TOOL_DIR, "env"), "-u", "PWD", *argv]
    return args


def root_args(python: str, prefix: str | None = None) -> list[str]:
    """Read-only binds of what `python` needs: its symlink chain, `prefix` (the sandbox
    runtime; None: the venv `python` is in), the system Python's standard library, the
    libraries and loader, SHELL_TOOLS; the /bin, /lib, /lib64 links of a merged-/usr host.
    Not this interpreter's own prefix: that is the trusted environment."""
    args: list[str] = []
    seen: set[str] = set()

    def bind(path: str) -> None:
        p = os.path.normpath(path)
        if _under(p, seen) or not os.path.exists(p):
            return
        seen.add(p)
        args.extend(["--ro-bind", p, p])

    def bind_chain(path: str) -> None:
        """Each symlink on the way to the real file, as a symlink; the file, bound."""
        p = os.path.abspath(path)
        for _ in range(40):
            if not os.path.islink(p):
                bind(p)
                return
            target = os.readlink(p)
            if p not in seen and not _under(p, seen):
                seen.add(p)
                args.extend(["--symlink", target, p])
            p = os.path.normpath(os.path.join(os.path.dirname(p), target))

    prefix = prefix or _venv_root(python)
    if prefix:
        bind(prefix)
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        bind(f"/usr/lib/{multiarch}")
    for d in LIB_DIRS:
        bind(d)
    for d in stdlib_dirs():
        bind(d)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and libdir not in ("/usr/lib", "/usr/lib64"):   # a /usr/local or /opt build
        bind(libdir)
    bind_chain(python)
    # The runtime's interpreter links to the system one (sys._base_executable's target).
    bind_chain(os.path.realpath(sys._base_executable))
    for tool in SHELL_TOOLS:
        bind_chain(os.path.join(TOOL_DIR, tool))
    for f in ETC_FILES:
        bind(f)
    for link in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(link):
            args.extend(["--symlink", os.readlink(link), link])
    return args


def _venv_root(python: str) -> str | None:
    """The virtual environment `python` belongs to (the directory with pyvenv.cfg)."""
    bindir = os.path.dirname(os.path.abspath(python))
    for d in (bindir, os.path.dirname(bindir)):
        if os.path.isfile(os.path.join(d, "pyvenv.cfg")):
            return d
    return None


def _under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)
