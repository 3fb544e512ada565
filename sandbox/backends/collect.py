"""Collecting a finished sandbox run: decide what it ended as, bring its outputs across.

    result = collect(job, jobdir, out_dir, exit_code=..., timed_out=..., oom_killed=...,
                     stdout_tail=..., stderr_tail=..., duration_s=...)

Nothing here trusts the job directory after the run: the sandbox could write anything
under `out/` (symlinks, FIFOs, huge or malformed files, a forged result.json). `collect`
reads at most MAX_RESULT_BYTES of JSON, validates it with the one schema
(sandbox/schema.py), checks the harness's seal (sandbox/protocol.py `seal_digest`),
copies only regular files that the result declares, within the size limit, with a
well-formed safetensors header; anything else turns the result into `crashed` with the
reason. Nothing is ever unpickled.

An accuracy-scored evaluation is scored here, on the trusted side: the sandbox returns
its predictions for the evaluation inputs (`out/predictions.safetensors`), which are
checked (one int64 tensor of exactly the labels' length, every value a class id) and
compared with labels the sandbox never saw (`Job.labels`); whatever score the sandbox
itself reported is dropped.
"""
from __future__ import annotations

import errno
import hmac
import os
import stat
import struct
from pathlib import Path

from sandbox.backends.staging import take_seal
from sandbox.backends.watch import STOPPED_REASON
from sandbox.protocol import (OUT_DIR, RESULT_FILE, SEAL_FILE, SETUP_ERROR_PREFIX,
                              SETUP_EXIT_CODE, seal_digest)
from sandbox.schema import (MAX_LOG_CHARS, MAX_REASON_CHARS, MAX_RESULT_BYTES,
                            PREDICTIONS_FILE, PREDICTIONS_TENSOR, Job, Result, SchemaError,
                            strict_json)

LOG_TAIL_BYTES = 64 * 1024                               # of stdout and of stderr, per run
MAX_HEADER_BYTES = 16 * 1024 * 1024                      # safetensors JSON header bound
MAX_TENSORS = 100_000
# safetensors dtypes we accept and their item sizes (sub-byte float types are refused).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


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
    seal_key = take_seal(Path(jobdir))

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
        problem = _copy_output(Path(jobdir) / OUT_DIR, name, out_dir, job.limits.output_mb)
        if problem:
            for copied in result.outputs:   # leave no half set of outputs behind
                try:
                    os.unlink(out_dir / copied)
                except OSError:
                    pass
            return fail("crashed", f"output {name}: {problem}")
    result.logs = logs
    result.duration_s = extra["duration_s"]
    if result.status == "ok" and job.kind == "evaluate" and job.params.get("score") == "accuracy":
        score, problem = score_predictions(job, out_dir / PREDICTIONS_FILE
                                           if PREDICTIONS_FILE in result.outputs else None)
        if problem:
            return fail("crashed", problem)
        result.score, result.eval_curve = score, [score]
    return result.validate()


def score_predictions(job: Job, path: Path | None) -> tuple[float | None, str]:
    """Accuracy of the predictions at `path` against the labels at `job.labels`
    (trusted side); returns (accuracy, '') or (None, the reason they cannot be scored).

    The predictions must be one tensor named "predictions", int64, shape exactly [N]
    for the N labels, every value in 0..num_classes-1."""
    if not job.labels:
        return None, "the job names no evaluation labels to score its predictions against"
    if path is None:
        return None, f"an accuracy evaluation must return {PREDICTIONS_FILE}"
    import torch
    from safetensors.torch import load_file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        return None, f"{PREDICTIONS_FILE}: cannot open: {e.strerror}"
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, problem = read_safetensors_header(f, size)
    if problem:
        return None, f"{PREDICTIONS_FILE}: {problem}"
    labels = load_file(job.labels)["eval_y"]
    n = int(labels.shape[0])
    info = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(info) != {PREDICTIONS_TENSOR}:
        return None, f"{PREDICTIONS_FILE}: must hold exactly one tensor, '{PREDICTIONS_TENSOR}'"
    entry = info[PREDICTIONS_TENSOR]
    if entry["dtype"] != "I64" or entry["shape"] != [n]:
        return None, (f"{PREDICTIONS_FILE}: expected int64 [{n}], got "
                      f"{str(entry['dtype'])[:8]} {str(entry['shape'])[:40]}")
    pred = load_file(str(path))[PREDICTIONS_TENSOR]
    classes = int(job.params["num_classes"])
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= classes):
        return None, f"{PREDICTIONS_FILE}: a prediction outside the class ids 0..{classes - 1}"
    return int(torch.eq(pred, labels.long()).sum()) / max(1, n), ""


def _setup_error(exit_code: int, stderr_tail: bytes | str) -> str:
    """The harness's set-up error (sandbox/guards.py SetupError), if it exited saying
    one. Text from the sandbox: it only ever words a `crashed` result's reason."""
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
    path = jobdir / OUT_DIR / RESULT_FILE
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


def check_safetensors(f, size: int) -> str:
    """Check a safetensors file's header against its size; return the problem or ''.

    Format: 8-byte little-endian header length N, N bytes of JSON object
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
    then the data buffer. Offsets are relative to the buffer, must match dtype x shape,
    must not overlap and must cover the buffer exactly (as the safetensors library
    itself requires). Only the header is read.
    """
    header, problem = read_safetensors_header(f, size)
    if problem:
        return problem
    if len(header) > MAX_TENSORS:
        return "too many tensors"
    buffer = size - f.tell()           # the header read ends where the buffer begins
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


def read_safetensors_header(f, size: int) -> tuple[dict, str]:
    """A safetensors file's JSON header (bounded, strict), or ({}, the problem)."""
    if size < 8:
        return {}, "too short for a safetensors file"
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
        return {}, f"safetensors header of {n} bytes is larger than {MAX_HEADER_BYTES}"
    if 8 + n > size:
        return {}, "safetensors header runs past the end of the file"
    try:
        header = strict_json(f.read(n), limit=MAX_HEADER_BYTES)
    except SchemaError:
        return {}, "safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return {}, "safetensors header is not a JSON object"
    return header, ""


def _verify_seal(key: bytes, jobdir: Path, result: Result) -> str:
    """Why the result is not the harness's own (''  when it is)."""
    out = Path(jobdir) / OUT_DIR
    data = _read_regular(out / RESULT_FILE, MAX_RESULT_BYTES)
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
