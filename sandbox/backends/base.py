"""The backend-neutral half of a sandbox run: staging a job directory and collecting it.

Every backend (local process, Docker) does the same three things around its own way of
starting the harness (docs/CONTRACTS.md, "Sandbox job -> harness -> result"):

    jobdir = stage(job, workroot, uid=..., gid=...)   # fresh dir: job.json in/ out/ tmp/ lib/
    ... start `python -I -c HARNESS_COMMAND` with cwd=jobdir (Docker: mount it at /job),
        wait with a wall-clock deadline, kill everything it left, read the log tails ...
    result = collect(job, jobdir, out_dir, exit_code=..., timed_out=..., oom_killed=...,
                     stdout_tail=..., stderr_tail=..., duration_s=...)
    cleanup(jobdir)

Nothing here trusts the job directory after the run: the sandbox could write anything
under `out/` (symlinks, FIFOs, huge or malformed files, a forged result.json). `collect`
reads at most MAX_RESULT_BYTES of JSON, validates it with the one schema, copies only
regular files that the result declares, within the size limit, with a well-formed
safetensors header; anything else turns the result into `crashed` with the reason.
Nothing is ever unpickled.

Layout and ownership (uid/gid: the sandbox user when the backend drops privileges):

    workroot/            0711 root   (others may traverse, not list: job names stay private)
      <job>-XXXXXXXX/    0755 root   (the sandbox cannot create or rename entries here)
        job.json         0444 root   (inputs rewritten to in/<name>.safetensors)
        in/              0755 root, files 0444 root (copies, never links to host files)
        lib/sandbox/     0755 root, *.py 0444 root (the harness package, minus backends/)
        out/             0700 uid    (the only writable place for results)
        tmp/             0700 uid    (HOME, TMPDIR and caches)
        stdout, stderr   0600 root   (the backend opens them and hands the sandbox fds)
"""
from __future__ import annotations

import errno
import hmac
import json
import logging
import math
import os
import secrets
import shutil
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sandbox.schema import (MAX_LOG_CHARS, MAX_REASON_CHARS, MAX_RESULT_BYTES, Job, Result,
                            SchemaError)

__all__ = ["HARNESS_COMMAND", "WARM_COMMAND", "SandboxError", "stage", "check_inputs",
           "stage_skeleton", "stage_job", "collect", "cleanup", "read_tail",
           "check_safetensors", "Watch", "Watching", "Stopped", "ProgressTail", "PACKAGE_DIR"]

# What every backend runs inside the job directory (the contract's exact command line).
HARNESS_COMMAND = "import sys; sys.path.insert(0, 'lib'); from sandbox.harness import main; main('.')"
# A pre-warmed sandbox (process backend, `prewarm`): imports, waits for "go" on stdin,
# then runs the same main('.'); its arguments follow the command (sandbox.harness.warm_main).
WARM_COMMAND = ("import sys; sys.path.insert(0, 'lib'); from sandbox.harness import warm_main; "
                "warm_main('.', *sys.argv[1:])")

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # the `sandbox` package
MAX_HEADER_BYTES = 16 * 1024 * 1024                      # safetensors JSON header bound
MAX_PROGRESS_READ = 64 * 1024                            # progress bytes read per poll
MAX_PROGRESS_LINE = 200
MAX_TENSORS = 100_000
# safetensors dtypes we accept and their item sizes (sub-byte float types are refused).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class SandboxError(RuntimeError):
    """The trusted side cannot run a job (bad input file, sandbox not usable)."""


# ----------------------------------------------------------------- sabotage (TEST ONLY)
SABOTAGE_ENV = "SELFPROG_SABOTAGE"


def sabotage_enabled() -> bool:
    """TEST ONLY. True when SELFPROG_SABOTAGE=1: the backends then switch their
    confinement OFF (process: no network namespace, no uid drop, no rlimits, the host
    environment; docker: root, host network and PID namespace, the host's / mounted at
    /host, the host environment, no limits). It exists so that tests/attacks can prove
    its deny tests detect an unconfined sandbox (they must FAIL with it on). Never set it
    anywhere a real candidate runs; the start-up canary (sandbox/canary.py) reports such
    a sandbox as not confined and the workers refuse to take jobs on it. Only the
    backends' confinement set-up reads it.
    """
    return os.environ.get(SABOTAGE_ENV) == "1"


# ----------------------------------------------------------------- result seal
# stage(..., seal=True) leaves a random key in out/.seal-key; the harness reads and
# deletes it before any candidate code runs and writes out/result.seal, an HMAC over
# result.json and the declared outputs (sandbox.harness.seal_digest). collect() then
# refuses a result the harness did not write. The key lives only here (in memory) and,
# until the harness removes it, in the job's own out/.
_SEALS: dict[str, bytes] = {}
_SEALS_LOCK = threading.Lock()


# --------------------------------------------------------------------------- staging

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
        for sub in ("in", "lib", "lib/sandbox"):
            (jobdir / sub).mkdir(mode=0o755)
        for f in sorted(PACKAGE_DIR.glob("*.py")):   # top level only: backends/ stays out
            dst = jobdir / "lib" / "sandbox" / f.name
            shutil.copyfile(f, dst, follow_symlinks=False)
            os.chmod(dst, 0o444)
        for sub in ("out", "tmp"):
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
        _copy_input(src, jobdir / "in" / f"{name}.safetensors")
    staged = Job(job_id=job.job_id, kind=job.kind, source=job.source,
                 model_kind=job.model_kind,
                 inputs={name: f"in/{name}.safetensors" for name in job.inputs},
                 params=dict(job.params), limits=job.limits)
    (jobdir / "job.json").write_text(staged.validate().to_json())
    os.chmod(jobdir / "job.json", 0o444)
    if seal:
        _plant_seal_key(jobdir, uid, gid)


def _plant_seal_key(jobdir: Path, uid: int | None, gid: int | None) -> None:
    from sandbox.harness import SEAL_KEY_FILE
    key = secrets.token_hex(32).encode()
    path = jobdir / "out" / SEAL_KEY_FILE
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


def _take_seal(jobdir: Path) -> bytes | None:
    with _SEALS_LOCK:
        return _SEALS.pop(str(jobdir), None)


def _verify_seal(key: bytes, jobdir: Path, result: Result) -> str:
    """Why the result is not the harness's own (''  when it is)."""
    from sandbox.harness import SEAL_FILE, seal_digest
    out = Path(jobdir) / "out"
    data = _read_regular(out / "result.json", MAX_RESULT_BYTES)
    got = _read_regular(out / SEAL_FILE, 256)
    if data is None or got is None:
        return "the result carries no valid seal (it was not written by the harness)"
    digests = []
    for name in result.outputs:
        h = _hash_regular(out / name)
        if h is None:
            return f"output {name} cannot be read for the seal check"
        digests.append((name, h))
    if not hmac.compare_digest(got.strip(), seal_digest(key, data, digests).encode()):
        return "the result's seal does not match (result or outputs not written by the harness)"
    return ""


def _read_regular(path: Path, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(limit + 1)
    return data if len(data) <= limit else None


def _hash_regular(path: Path) -> str | None:
    import hashlib
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------- collecting

def read_tail(path: Path, limit_bytes: int = 4 * MAX_LOG_CHARS) -> bytes:
    """The last `limit_bytes` of a log file, without reading the rest (it may be huge)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - limit_bytes))
        return f.read(limit_bytes)


def _clean_text(data: bytes | str, limit: int) -> str:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = text.replace("\x00", "")
    return text[-limit:] if limit > 0 else ""


def format_logs(stdout_tail: bytes | str, stderr_tail: bytes | str) -> str:
    """stdout and stderr tails as one bounded text (≤ MAX_LOG_CHARS, no NULs)."""
    half = MAX_LOG_CHARS // 2 - 32
    out = _clean_text(stdout_tail, half)
    err = _clean_text(stderr_tail, MAX_LOG_CHARS - 64 - len(out))
    text = ""
    if out:
        text += "--- stdout (tail) ---\n" + out + ("\n" if not out.endswith("\n") else "")
    if err:
        text += "--- stderr (tail) ---\n" + err
    return text[-MAX_LOG_CHARS:]


def collect(job: Job, jobdir: Path, out_dir: Path, *, exit_code: int | None, timed_out: bool,
            oom_killed: bool, stdout_tail: bytes | str, stderr_tail: bytes | str,
            duration_s: float, stopped: bool = False) -> Result:
    """Decide what a finished run ended as, and bring its declared outputs across.

    Call it only after every process of the run is gone (so nothing in `out/` changes).
    `exit_code` follows subprocess: a negative value -N means killed by signal N (a
    Docker backend converts 128+N itself); None means it never got an exit status.
    Order of decisions: stopped (the caller cancelled it: `crashed`, saying so) >
    timeout (the backend's deadline fired) > oom (the OS or the
    backend killed it for memory, or the harness reported oom) > crashed (signal,
    non-zero exit, no or invalid result.json, result for another job, bad outputs) >
    the harness's own ok / invalid.

    `duration_s` is the backend's wall-clock measurement; it replaces the harness's
    own, which the candidate could have influenced.
    """
    logs = format_logs(stdout_tail, stderr_tail)
    extra = {"logs": logs, "duration_s": round(float(duration_s), 3)}
    seal_key = _take_seal(Path(jobdir))

    def fail(status: str, reason: str) -> Result:
        return Result.failure(job, status, reason, **extra)

    if stopped:
        return fail("crashed", STOPPED_REASON)
    if timed_out:
        return fail("timeout", f"killed after the {job.limits.timeout_s:g} s deadline")
    if oom_killed:
        return fail("oom", f"killed for using more than {job.limits.memory_mb} MB of memory")

    result, why = _read_result(job, Path(jobdir))
    if result is not None and result.status == "oom":
        return fail("oom", result.reason or "the harness reported out of memory")
    if exit_code is None:
        return fail("crashed", "the sandbox gave no exit status")
    if exit_code < 0:
        return fail("crashed", f"killed by signal {-exit_code}"
                    + (f"; {why}" if result is None else ""))
    if exit_code != 0:
        setup = _setup_error(exit_code, stderr_tail)
        if result is None and setup:
            return fail("crashed", f"the sandbox cannot run this job: {setup}")
        if result is None and _looks_oom(logs):
            return fail("oom", f"exited with code {exit_code} after a memory allocation failed")
        return fail("crashed", f"exited with code {exit_code}" + (f"; {why}" if why else ""))
    if result is None:
        return fail("crashed", f"exited 0 without a valid result: {why}")
    if result.status not in ("ok", "invalid"):
        return fail("crashed", f"the harness may not report status {result.status!r}")
    if seal_key is not None:
        problem = _verify_seal(seal_key, Path(jobdir), result)
        if problem:
            return fail("crashed", problem)

    # Bring the declared outputs across; any bad one voids the run.
    out_dir = Path(out_dir)
    for name in result.outputs:
        problem = _copy_output(Path(jobdir) / "out", name, out_dir, job.limits.output_mb)
        if problem:
            for copied in result.outputs:   # leave no half set of outputs behind
                try:
                    os.unlink(out_dir / copied)
                except OSError:
                    pass
            return fail("crashed", f"output {name}: {problem}")
    result.logs = logs
    result.duration_s = extra["duration_s"]
    return result.validate()


def _setup_error(exit_code: int, stderr_tail: bytes | str) -> str:
    """The harness's set-up error (harness.SetupError), if it exited saying one. Text
    from the sandbox: it only ever words a `crashed` result's reason."""
    from sandbox.harness import SETUP_ERROR_PREFIX, SETUP_EXIT_CODE
    if exit_code != SETUP_EXIT_CODE:
        return ""
    text = _clean_text(stderr_tail, 4 * MAX_REASON_CHARS)
    lines = [line for line in text.splitlines() if line.startswith(SETUP_ERROR_PREFIX)]
    return lines[-1][len(SETUP_ERROR_PREFIX):][:MAX_REASON_CHARS // 2] if lines else ""


def _looks_oom(logs: str) -> bool:
    # Only used to tell a crash from an allocation failure the harness could not
    # report; the text comes from the sandbox, so it can only make a failure an oom.
    low = logs.lower()
    return any(s in low for s in ("memoryerror", "std::bad_alloc", "cannot allocate memory",
                                  "can't allocate memory", "out of memory"))


def _read_result(job: Job, jobdir: Path) -> tuple[Result | None, str]:
    path = jobdir / "out" / "result.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None, "no out/result.json"
        if e.errno == errno.ELOOP:
            return None, "out/result.json is a symlink"
        return None, f"cannot open out/result.json: {e.strerror}"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None, "out/result.json is not a regular file"
        data = f.read(MAX_RESULT_BYTES + 1)
    if len(data) > MAX_RESULT_BYTES:
        return None, f"out/result.json is larger than {MAX_RESULT_BYTES} bytes"
    try:
        result = Result.from_json(data)
    except SchemaError as e:
        return None, f"invalid out/result.json: {e}"[:MAX_REASON_CHARS]
    if result.job_id != job.job_id or result.kind != job.kind:
        return None, "out/result.json is for another job"
    return result, ""


def _copy_output(src_dir: Path, name: str, out_dir: Path, output_mb: int) -> str:
    """Copy one declared output; return the reason it was refused, or ''."""
    try:
        fd = os.open(src_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink; not followed"
        return f"cannot open: {e.strerror}"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_size > output_mb * 1024 * 1024:
            return f"{st.st_size} bytes, more than the {output_mb} MB output limit"
        problem = check_safetensors(f, st.st_size)
        if problem:
            return problem
        out_dir.mkdir(parents=True, exist_ok=True)
        f.seek(0)
        tmp = out_dir / f".{name}.partial"
        with open(tmp, "wb") as fout:
            remaining = st.st_size   # copy exactly what was checked, nothing appended later
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                fout.write(chunk)
                remaining -= len(chunk)
        if remaining:
            os.unlink(tmp)
            return "shrank while being copied"
        os.replace(tmp, out_dir / name)
    return ""


def _strict_json(raw: bytes):
    """JSON bytes from the sandbox as Python data, or None: UTF-8 only, no NaN or
    Infinity, no nesting past the parser's limit."""
    def no_constants(name):
        raise ValueError(name)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def check_safetensors(f, size: int) -> str:
    """Check a safetensors file's header against its size; return the problem or ''.

    Format: 8-byte little-endian header length N, N bytes of JSON object
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
    then the data buffer. Offsets are relative to the buffer, must match dtype x shape,
    must not overlap and must cover the buffer exactly (as the safetensors library
    itself requires). Only the header is read.
    """
    if size < 8:
        return "too short for a safetensors file"
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        return f"safetensors header of {n} bytes is larger than {MAX_HEADER_BYTES}"
    if 8 + n > size:
        return "safetensors header runs past the end of the file"
    header = _strict_json(f.read(n))
    if header is None:
        return "safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    if len(header) > MAX_TENSORS:
        return "too many tensors"
    buffer = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                return "safetensors __metadata__ must map text to text"
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            return f"tensor {key[:64]!r}: malformed entry"
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            return f"tensor {key[:64]!r}: dtype {str(dtype)[:16]!r} not accepted"
        if not isinstance(shape, list) or len(shape) > 16 or not all(
                type(d) is int and d >= 0 for d in shape):
            return f"tensor {key[:64]!r}: bad shape"
        if not isinstance(offs, list) or len(offs) != 2 or not all(
                type(o) is int and o >= 0 for o in offs) or offs[0] > offs[1]:
            return f"tensor {key[:64]!r}: bad data_offsets"
        count = 1
        for d in shape:
            count *= d
        if offs[1] > buffer or offs[1] - offs[0] != count * DTYPE_SIZES[dtype]:
            return f"tensor {key[:64]!r}: data_offsets do not match dtype, shape or file size"
        spans.append((offs[0], offs[1]))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            return "tensor data overlaps or leaves gaps"
        position = end
    if position != buffer:
        return "tensor data does not cover the file"
    return ""


# --------------------------------------------------------------------------- watching a job
STOPPED_REASON = "stopped: its run was cancelled while it ran"


@dataclass
class Watch:
    """What the caller of `execute` wants while a job runs; both parts optional.

    `on_progress(step, loss)` hears the training losses (display only, ProgressTail);
    `cancelled()` returning True stops the job: the backend kills it like a deadline
    and returns `crashed` with STOPPED_REASON. Backends poll both every half second.
    """
    on_progress: Callable[[int, float], None] | None = None
    cancelled: Callable[[], bool] | None = None


class Stopped(Exception):
    """Raised by Watching.poll once the caller has cancelled the job."""


class Watching:
    """One running job seen through a Watch (the backends' wait loops call `poll`)."""

    def __init__(self, jobdir: Path, watch: Watch | None):
        self.watch = watch or Watch()
        self.progress = ProgressTail(jobdir, self.watch.on_progress)

    @property
    def active(self) -> bool:
        return self.watch.on_progress is not None or self.watch.cancelled is not None

    def poll(self, final: bool = False) -> None:
        """Relay new progress; raise Stopped if cancelled (not on the `final` poll,
        after the job has ended by itself)."""
        self.progress.poll()
        if final or self.watch.cancelled is None:
            return
        try:
            stop = self.watch.cancelled()
        except Exception as e:     # cannot tell: keep running, the deadline still holds
            log.warning("could not check whether the job was cancelled: %s", e)
            return
        if stop:
            raise Stopped()


class ProgressTail:
    """Relays a running job's training losses: the new lines of out/progress.jsonl
    (harness.fit writes {"step": n, "loss": x}) become `on_progress(step, loss)` calls.

    The file is the sandbox's, so it is read like everything else from there: opened
    without following links, regular files only, at most MAX_PROGRESS_READ new bytes a
    poll, lines over MAX_PROGRESS_LINE dropped, exactly {step: int >= 0, loss: finite
    float} accepted. Only the newest good line of a poll is passed on. What it relays is
    for display (`lm_step` events); results still come only from `collect`.
    """

    def __init__(self, jobdir: Path, on_progress=None):
        from sandbox.harness import PROGRESS_FILE
        self.path = Path(jobdir) / "out" / PROGRESS_FILE
        self.on_progress = on_progress
        self.pos = 0
        self.partial = b""

    def poll(self) -> None:
        if self.on_progress is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return
            if st.st_size < self.pos:          # rewritten from the start
                self.pos, self.partial = 0, b""
            f.seek(self.pos)
            data = f.read(MAX_PROGRESS_READ)
        self.pos += len(data)
        *lines, rest = (self.partial + data).split(b"\n")
        self.partial = rest if len(rest) <= MAX_PROGRESS_LINE else b""
        for line in reversed(lines):
            point = _progress_point(line)
            if point is not None:
                try:
                    self.on_progress(*point)
                except Exception as e:   # a broken relay must not end the job
                    log.warning("progress relay failed: %s", e)
                return


def _progress_point(line: bytes) -> tuple[int, float] | None:
    if not line or len(line) > MAX_PROGRESS_LINE:
        return None
    d = _strict_json(line)
    if not isinstance(d, dict) or set(d) != {"step", "loss"}:
        return None
    step, loss = d["step"], d["loss"]
    if type(step) is not int or not 0 <= step < 1 << 40 or type(loss) not in (int, float):
        return None
    loss = float(loss)
    return (step, loss) if math.isfinite(loss) else None


# --------------------------------------------------------------------------- cleanup

def cleanup(jobdir: Path) -> None:
    """Remove a job directory, whatever the sandbox did to the modes inside it."""
    jobdir = Path(jobdir)
    _take_seal(jobdir)
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
