"""Staging a job directory for a sandbox, and removing it afterwards.

    jobdir = stage(job, workroot, uid=..., gid=..., seal=True)   # fresh dir, see below
    ... a backend runs the harness in it (sandbox/backends/base.py) ...
    cleanup(jobdir)

Layout and ownership (names: sandbox/protocol.py; uid/gid: the sandbox user when the
backend drops privileges):

    workroot/            0711 root   (others may traverse, not list: job names stay private)
      <job>-XXXXXXXX/    0755 root   (the sandbox cannot create or rename entries here)
        job.json         0444 root   (inputs rewritten to in/<name>.safetensors)
        in/              0755 root, files 0444 root (copies, never links to host files)
        lib/sandbox/     0755 root, SANDBOX_MODULES 0444 root (nothing else of the package)
        out/             0700 uid    (the only writable place for results)
        tmp/             0700 uid    (HOME, TMPDIR and caches)
        stdout, stderr   0600 root   (the backend opens them and hands the sandbox fds)

Result seal: stage(..., seal=True) leaves a random key in out/.seal-key; the harness
reads and deletes it before any candidate code runs and writes out/result.seal, an
HMAC over result.json and the declared outputs (sandbox/protocol.py `seal_digest`).
collect (sandbox/backends/collect.py) then refuses a result the harness did not write.
The key lives only here (in memory) and, until the harness removes it, in the job's
own out/.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from sandbox.backends.errors import SandboxError
from sandbox.protocol import (IN_DIR, JOB_FILE, LIB_DIR, OUT_DIR, SEAL_KEY_FILE, TMP_DIR,
                              module_files)
from sandbox.schema import Job

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # the `sandbox` package

_SEALS: dict[str, bytes] = {}
_SEALS_LOCK = threading.Lock()


def stage(job: Job, workroot: Path, *, uid: int | None = None, gid: int | None = None,
          seal: bool = False) -> Path:
    """Make a fresh job directory under `workroot` for `job` and return it.

    `job.inputs` are host paths; each is copied (never linked) to `in/<name>.safetensors`.
    A missing input, a symlink or anything but a regular file is refused with
    SandboxError before anything is created. `uid`/`gid`, when given, own `out/` and
    `tmp/` (the caller must be root to chown); otherwise the caller's uid owns them.
    """
    job.validate()
    sources = check_inputs(job)
    jobdir = stage_skeleton(workroot, f"{job.job_id[:40]}-", uid=uid, gid=gid)
    try:
        stage_job(job, jobdir, sources, uid=uid, gid=gid, seal=seal)
    except BaseException:
        cleanup(jobdir)
        raise
    return jobdir


def check_inputs(job: Job) -> dict[str, Path]:
    """The job's input files as host paths, each checked to be a regular file (not a
    link); SandboxError names the first one that is not."""
    sources: dict[str, Path] = {}
    for name, host_path in job.inputs.items():
        p = Path(host_path)
        try:
            st = os.lstat(p)
        except OSError as e:
            raise SandboxError(f"input {name!r}: cannot stat {p}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise SandboxError(f"input {name!r}: {p} is a symlink; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            raise SandboxError(f"input {name!r}: {p} is not a regular file")
        sources[name] = p
    return sources


def stage_skeleton(workroot: Path, prefix: str, *, uid: int | None = None,
                   gid: int | None = None) -> Path:
    """A fresh job directory with nothing of any job in it: empty `in/`, the harness
    under `lib/sandbox/`, `out/` and `tmp/` owned by uid/gid. `stage_job` fills it.

    A pre-warmed sandbox (process backend) starts in such a directory and gets its one
    job's files only when that job is assigned to it.
    """
    workroot = Path(workroot)
    workroot.mkdir(parents=True, exist_ok=True)
    if uid is not None:
        # The child starts in its job dir (cwd is set while still root), but anything
        # that resolves an absolute path (safetensors does) must traverse every parent.
        for parent in workroot.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise SandboxError(f"workroot {workroot} is under {parent}, which other users "
                                   "cannot enter; the sandbox uid could not reach its job dir")
    if os.geteuid() == 0:
        os.chown(workroot, 0, 0)
    os.chmod(workroot, 0o711)
    jobdir = Path(tempfile.mkdtemp(prefix=prefix, dir=workroot))
    try:
        os.chmod(jobdir, 0o755)
        for sub in (IN_DIR, LIB_DIR, f"{LIB_DIR}/sandbox"):
            (jobdir / sub).mkdir(mode=0o755)
        for name in module_files():   # SANDBOX_MODULES only: never backends/, policy ...
            dst = jobdir / LIB_DIR / "sandbox" / name
            shutil.copyfile(PACKAGE_DIR / name, dst, follow_symlinks=False)
            os.chmod(dst, 0o444)
        for sub in (OUT_DIR, TMP_DIR):
            d = jobdir / sub
            d.mkdir(mode=0o700)
            if uid is not None:
                os.chown(d, uid, gid if gid is not None else uid)
    except BaseException:
        cleanup(jobdir)
        raise
    return jobdir


def stage_job(job: Job, jobdir: Path, sources: dict[str, Path], *, uid: int | None = None,
              gid: int | None = None, seal: bool = False) -> None:
    """Put one job into a `stage_skeleton` directory: its inputs (copies) under `in/`,
    `job.json` with the inputs rewritten, and (seal=True) the result seal key in `out/`.

    Everything written here is root's, in directories the sandbox cannot write, except
    the seal key, which is created without following links (`out/` is the sandbox's).
    The caller cleans the directory up if this raises.
    """
    jobdir = Path(jobdir)
    for name, src in sources.items():
        _copy_input(src, jobdir / IN_DIR / f"{name}.safetensors")
    staged = Job(job_id=job.job_id, kind=job.kind, source=job.source,
                 model_kind=job.model_kind,
                 inputs={name: f"{IN_DIR}/{name}.safetensors" for name in job.inputs},
                 params=dict(job.params), limits=job.limits, declaration=job.declaration)
    (jobdir / JOB_FILE).write_text(staged.validate().to_json())
    os.chmod(jobdir / JOB_FILE, 0o444)
    if seal:
        _plant_seal_key(jobdir, uid, gid)


def _plant_seal_key(jobdir: Path, uid: int | None, gid: int | None) -> None:
    key = secrets.token_hex(32).encode()
    path = jobdir / OUT_DIR / SEAL_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
    try:
        os.write(fd, key)
        # On the fd, not the path: out/ may belong to a sandbox that is already running
        # (a pre-warmed one), which could swap the name for a link in between.
        os.fchmod(fd, 0o444)   # out/ is the sandbox's (0700): only it can read or remove this
        if uid is not None:
            os.fchown(fd, uid, gid if gid is not None else uid)
    finally:
        os.close(fd)
    with _SEALS_LOCK:
        _SEALS[str(jobdir)] = key


def take_seal(jobdir: Path) -> bytes | None:
    """The seal key staged for `jobdir`, forgotten here (collect checks with it once)."""
    with _SEALS_LOCK:
        return _SEALS.pop(str(jobdir), None)


def _copy_input(src: Path, dst: Path) -> None:
    # O_NOFOLLOW + fstat: the file checked is the file copied, even if the path changes.
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"cannot open input {src}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise SandboxError(f"input {src} is not a regular file")
        with open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    os.chmod(dst, 0o444)


def cleanup(jobdir: Path) -> None:
    """Remove a job directory, whatever the sandbox did to the modes inside it."""
    jobdir = Path(jobdir)
    take_seal(jobdir)
    if not jobdir.exists() and not jobdir.is_symlink():
        return

    def retry(func, path, _exc):
        # The sandbox may have chmod-ed its own dirs to 000; as non-root that stops
        # rmtree. Give the parent back its write/search bits and try once more.
        try:
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass
    shutil.rmtree(jobdir, onerror=retry)
