"""Start-up confinement check: run canary jobs in a backend and see whether it confines.

    report = check_confinement(backend)
    if not report.ok: ...   # report.checks: {name: (ok, detail)}

The service (pipeline/worker.py, `doctor`) checks that its sandbox really confines before it runs a
single candidate, instead of assuming so. The canaries are candidates that try, from
inside the sandbox, what a hostile one would (they go straight to `backend.execute`:
the policy gate would refuse them, and the gate is not what is being checked):

* ``network``    connect to a TCP server this process opens on 127.0.0.1 (and on the
                 host's outward address, where there is one); it must not be reached.
* ``host_file``  read a file with a random token that this process plants, mode 0600,
                 under a 0755 directory (also tried under /host, where a careless
                 container would mount the host); the token must not come back.
* ``memory``     touch four times the job's memory limit and reserve 12 GB of address
                 space (what RLIMIT_AS bounds); the job must end ``oom``.

Each check is decided by what this (trusted) side observes: the server's accept log,
whether the token appears anywhere in the result, the recorded status. A canary that
cannot run at all (the backend is broken) makes its checks fail with the reason.
Cost: two small sandbox runs (seconds on the process backend, a few more on Docker).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.schema import Job, Limits

log = logging.getLogger(__name__)

MEMORY_MB = 256          # the memory canary's limit; it touches 4x this ...
VIRTUAL_MB = 12 * 1024   # ... and reserves this much address space (beyond RLIMIT_AS)

_PROBE = '''
import json, os, socket
report = {}
for host in HOSTS:
    try:
        socket.create_connection((host, PORT), timeout=3).close()
        report["connect " + host] = "connected"
    except OSError as e:
        report["connect " + host] = type(e).__name__
for path in (SECRET, "/host" + SECRET):
    try:
        with open(path) as f:
            report["read " + path] = "read: " + f.read(200)
    except OSError as e:
        report["read " + path] = type(e).__name__
raise RuntimeError("CANARY " + json.dumps(report))
'''

# Resident memory (touched pages) is what a cgroup limit counts; address space is what
# the process backend's RLIMIT_AS counts, with several GB of headroom for what torch
# reserves. So: reserve VIRTUAL_MB in all, and touch the first TOUCH_MB of it.
_MEMORY = '''
import mmap
hog = []
touched = 0
for _ in range(VIRTUAL_MB // 64):
    chunk = mmap.mmap(-1, 64 * 1024 * 1024)      # anonymous: reserved, not yet resident
    if touched < TOUCH_MB:
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1
        touched += 64
    hog.append(chunk)
raise RuntimeError("CANARY allocated %d MB, touched %d MB" % (len(hog) * 64, touched))
'''

_MODEL = '''

def build_model(input_shape, num_classes):
    raise RuntimeError("unreachable")


def train(model):
    raise RuntimeError("unreachable")
'''


@dataclass
class CanaryReport:
    ok: bool
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    backend: str = ""

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, (ok, detail) in self.checks.items() if not ok]

    def summary(self) -> str:
        if self.ok:
            return f"the {self.backend} sandbox confines (" + ", ".join(self.checks) + ")"
        return f"the {self.backend} sandbox does NOT confine: " + "; ".join(self.failures())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "backend": self.backend,
                "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in self.checks.items()}}


def _outward_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))   # TEST-NET: no packet is sent, a route is chosen
        addr = probe.getsockname()[0]
        return None if addr.startswith("127.") else addr
    except OSError:
        return None
    finally:
        probe.close()


def _canary_job(source: str, limits: Limits) -> Job:
    return Job(job_id=f"canary-{uuid.uuid4().hex[:12]}", kind="evaluate", source=source,
               model_kind="cnn", params={"num_classes": 2, "input_shape": [1, 4, 4]},
               limits=limits).validate()


def check_confinement(backend, timeout_s: float = 60.0) -> CanaryReport:
    """Run the canaries in `backend`; `ok` only if every check holds."""
    checks: dict[str, tuple[bool, str]] = {}
    name = getattr(backend, "name", type(backend).__name__)
    token = secrets.token_hex(16)
    plant = Path(tempfile.mkdtemp(prefix="selfprog-canary-"))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    accepted: list[str] = []
    stop = threading.Event()
    try:
        os.chmod(plant, 0o755)
        secret = plant / "secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.chmod(secret, 0o600)

        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", 0))
        server.listen(8)
        server.settimeout(0.2)
        port = server.getsockname()[1]

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, peer = server.accept()
                    accepted.append(f"{peer[0]}:{peer[1]}")
                    conn.close()
                except OSError:
                    pass
        threading.Thread(target=serve, daemon=True, name="canary-server").start()

        hosts = ["127.0.0.1"] + [a for a in [_outward_address()] if a]
        source = (f"HOSTS = {hosts!r}\nPORT = {port}\nSECRET = {str(secret)!r}\n"
                  + _PROBE + _MODEL)
        with tempfile.TemporaryDirectory(prefix="selfprog-canary-out-") as out:
            try:
                result = backend.execute(_canary_job(source, Limits(timeout_s=timeout_s,
                                                                    memory_mb=1024, pids=32,
                                                                    output_mb=1)), Path(out))
            except Exception as e:   # noqa: BLE001 - a broken backend is a failed check
                why = f"the canary could not run: {type(e).__name__}: {e}"
                checks["network"] = (False, why)
                checks["host_file"] = (False, why)
                result = None
        if result is not None:
            text = result.reason + "\n" + result.logs
            report = {}
            if "CANARY " in result.reason:
                raw = result.reason.split("CANARY ", 1)[1]
                try:
                    report = json.loads(raw[:raw.rindex("}") + 1])
                except ValueError:
                    report = {}
            if not report:
                why = f"the canary did not report ({result.status}: {result.reason[:200]})"
                checks["network"] = (False, why)
                checks["host_file"] = (token not in text, why)
            else:
                reached = [k for k, v in report.items() if k.startswith("connect") and v == "connected"]
                if accepted or reached:
                    checks["network"] = (False, "a sandboxed process reached a server on this "
                                         f"host ({', '.join(reached) or ', '.join(accepted)})")
                else:
                    checks["network"] = (True, "no connection reached this host ("
                                         + ", ".join(f"{k.split()[1]}: {v}" for k, v in report.items()
                                                     if k.startswith("connect")) + ")")
                if token in text:
                    checks["host_file"] = (False, f"a sandboxed process read {secret} (mode 0600)")
                else:
                    checks["host_file"] = (True, "a planted 0600 file stayed unreadable ("
                                           + ", ".join(sorted({v for k, v in report.items()
                                                               if k.startswith("read")})) + ")")

        total = 4 * MEMORY_MB
        mem_source = f"VIRTUAL_MB = {VIRTUAL_MB}\nTOUCH_MB = {total}\n" + _MEMORY + _MODEL
        with tempfile.TemporaryDirectory(prefix="selfprog-canary-out-") as out:
            try:
                r = backend.execute(_canary_job(mem_source, Limits(
                    timeout_s=timeout_s, memory_mb=MEMORY_MB, pids=32, output_mb=1)), Path(out))
                if r.status == "oom":
                    checks["memory"] = (True, f"touching {total} MB under a {MEMORY_MB} MB "
                                        "limit ended oom")
                else:
                    checks["memory"] = (False, f"touching {total} MB under a {MEMORY_MB} MB limit "
                                        f"ended {r.status}: {r.reason[:200]}")
            except Exception as e:   # noqa: BLE001
                checks["memory"] = (False, f"the canary could not run: {type(e).__name__}: {e}")
    finally:
        stop.set()
        server.close()
        shutil.rmtree(plant, ignore_errors=True)
    report = CanaryReport(ok=all(ok for ok, _ in checks.values()), checks=checks, backend=name)
    (log.info if report.ok else log.error)("%s", report.summary())
    return report
