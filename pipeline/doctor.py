"""`selfprog-cli doctor`: what this installation has, what it lacks, and how to fix it.

Each check ends ok, warn or fail, with a one-line detail and, when something is missing,
a one-line fix. A check fails only when the configured setup needs what is missing
(the Docker engine when SELFPROG_SANDBOX_BACKEND=docker, Redis when a broker is set,
a GPU when the sandbox or the harness is told to use one, a confining sandbox unless
allow_unconfined, a process backend with bubblewrap unless process-unconfined is asked
for by name or allow_unconfined); the sandbox backend check says which confinement is in
force (docker, bubblewrap or unconfined). Otherwise a missing piece is a warning. `run_checks` never raises.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.settings import Settings, backend_kwargs
from pipeline.text import first_line, hide_password, sqlite_path

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    status: str          # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _first_line(e: BaseException) -> str:
    return first_line(e, limit=300)


def check_docker(s: Settings) -> tuple[Check, Check]:
    """The engine, then the sandbox image."""
    from sandbox.backends import SandboxError
    from sandbox.backends.docker import connect, image_user
    need = FAIL if s.sandbox_backend == "docker" else WARN
    try:
        client = connect(timeout=10)
    except SandboxError as e:
        engine = Check("docker engine", need, _first_line(e),
                       "start it: bash scripts/docker-engine.sh (or set DOCKER_HOST); without "
                       "it 'auto' falls back to the weaker process sandbox")
        image = Check("sandbox image", need, "not checked: no Docker engine",
                      "after the engine: bash scripts/build-images.sh")
        return engine, image
    try:
        version = client.version().get("Version", "?")
        engine = Check("docker engine", OK, f"Docker {version} at "
                       f"{os.environ.get('DOCKER_HOST') or 'the local socket'}")
        try:
            uid, gid = image_user(client, s.sandbox_image)
            image = Check("sandbox image", OK, f"{s.sandbox_image} (runs as uid {uid}:{gid})")
        except SandboxError as e:
            image = Check("sandbox image", need, _first_line(e),
                          "build it: bash scripts/build-images.sh")
        if s.sandbox_runtime:
            runtimes = client.info().get("Runtimes") or {}
            if s.sandbox_runtime not in runtimes:
                engine = Check("docker engine", need,
                               f"the engine has no runtime {s.sandbox_runtime!r} "
                               f"(it has {', '.join(sorted(runtimes)) or 'none'})",
                               "register it in /etc/docker/daemon.json (scripts/docker-engine.sh "
                               "does for runsc), or unset SELFPROG_SANDBOX_RUNTIME")
    finally:
        client.close()
    return engine, image


def check_redis(s: Settings) -> Check:
    if s.embedded:
        return Check("redis", OK, "not used: embedded mode (no SELFPROG_BROKER_URL), tasks run "
                     "in-process")
    try:
        import redis
        client = redis.Redis.from_url(s.broker_url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        return Check("redis", OK, f"broker answers at {hide_password(s.broker_url)}")
    except Exception as e:   # noqa: BLE001 - any failure means "no broker"
        return Check("redis", FAIL, f"{hide_password(s.broker_url)}: {_first_line(e)}",
                     "start it: bash scripts/services.sh (or docker-compose up -d redis), or "
                     "unset SELFPROG_BROKER_URL to run embedded")


def check_workers(s: Settings, timeout: float = 3.0) -> Check:
    """With a broker: does a live worker consume each queue? (Else runs wait forever.)"""
    if s.embedded:
        return Check("workers", OK, "not used: embedded mode, tasks run in-process")
    from pipeline.celery_app import QUEUES, configure, queue_consumers, worker_command
    configure(s)
    consumers = queue_consumers(timeout=timeout)
    missing = [q for q in QUEUES if not consumers[q]]
    if missing:
        return Check("workers", FAIL, "no live worker consumes queue(s) "
                     + ", ".join(repr(q) for q in missing),
                     "start one per queue: " + "; ".join(worker_command(q) for q in missing))
    return Check("workers", OK, "; ".join(f"{q}: {', '.join(sorted(consumers[q]))}"
                                          for q in QUEUES))


def check_database(s: Settings) -> Check:
    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.engine import make_url

    from pipeline.store import schema_is_current
    try:
        url = make_url(s.database_url)
    except Exception as e:   # noqa: BLE001
        return Check("database", FAIL, f"bad URL {s.database_url!r}: {_first_line(e)}",
                     "set SELFPROG_DATABASE_URL to e.g. sqlite:///selfprog.db")
    shown = hide_password(s.database_url)
    path = sqlite_path(url)
    if path is not None:
        if not path.exists():
            return Check("database", WARN, f"no lineage database yet at {path}",
                         "it is created by the first `selfprog-cli launch`")
        mode = path.stat().st_mode & 0o777
        if mode & 0o044:
            return Check("database", WARN, f"{path} is readable by other users (mode "
                         f"{oct(mode)}); a process-sandboxed candidate could read it",
                         f"chmod 600 {path}")
    engine = create_engine(s.database_url, connect_args=(
        {"connect_timeout": 5} if url.get_backend_name().startswith("postgres") else {}))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            tables = set(inspect(conn).get_table_names())
        current = schema_is_current(engine) if "runs" in tables else False
    except Exception as e:   # noqa: BLE001
        return Check("database", FAIL, f"{shown}: {_first_line(getattr(e, 'orig', None) or e)}",
                     "start PostgreSQL (bash scripts/services.sh) or check SELFPROG_DATABASE_URL")
    finally:
        engine.dispose()
    if "runs" not in tables:
        return Check("database", WARN, f"{shown} answers but has no lineage tables yet",
                     "run `selfprog-cli db upgrade` (or the first launch creates them)")
    if not current:
        return Check("database", WARN, f"{shown} has an older lineage schema; queries refuse it",
                     "run `selfprog-cli db upgrade`")
    return Check("database", OK, f"{shown} answers, lineage schema up to date")


def check_gpus(s: Settings) -> Check:
    wanted = bool(s.sandbox_gpus) or s.device == "cuda"
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(n)]
    except Exception as e:   # noqa: BLE001
        n, names = 0, [f"torch.cuda failed: {_first_line(e)}"]
    if n:
        return Check("gpus", OK, f"{n} GPU(s): {', '.join(names)}")
    if wanted:
        return Check("gpus", FAIL, "no CUDA GPU visible to torch, but SELFPROG_SANDBOX_GPUS or "
                     "SELFPROG_DEVICE=cuda asks for one",
                     "install the NVIDIA driver and container toolkit, or unset "
                     "SELFPROG_SANDBOX_GPUS / set SELFPROG_DEVICE=auto")
    return Check("gpus", OK, "none; training runs on the CPU"
                 + (f" ({names[0]})" if names else ""))


def check_sandbox_runtime(s: Settings) -> Check:
    """The process sandbox's Python environment (sandbox/backends/runtime.py): there,
    and holding nothing beyond the allow-list."""
    from sandbox.backends import runtime
    need = FAIL if s.sandbox_backend.startswith("process") else WARN
    problems = runtime.check_runtime(s.sandbox_python_prefix)
    if problems:
        return Check("sandbox runtime", need, "; ".join(problems)[:300],
                     "make setup (bash scripts/sandbox-runtime.sh) rebuilds it from the venv")
    held = runtime.manifest(s.sandbox_python_prefix)
    return Check("sandbox runtime", OK, f"{s.sandbox_python_prefix}: {len(held)} distributions, "
                 f"all on the allow-list ({', '.join(runtime.ROOTS)} and their requirements)")


def check_seccomp(s: Settings) -> Check:
    """The harness's filter (sandbox/seccomp.py) exists for this architecture."""
    import platform

    from sandbox import seccomp
    try:
        n = len(seccomp.program()) // 8
    except seccomp.SeccompUnavailable as e:
        return Check("seccomp filter", FAIL, _first_line(e),
                     "sandbox/seccomp.py knows x86_64 and aarch64 only")
    return Check("seccomp filter", OK, f"{platform.machine()}: {n} BPF instructions; denies "
                 + ", ".join(seccomp.DENIED[:8]) + f" and {len(seccomp.DENIED) - 8} more, "
                 "namespace flags of clone")


def pick_backend(s: Settings):
    """The backend this configuration gives (what a worker would build), and a Check."""
    from sandbox.backends import make_backend
    kw = backend_kwargs(s)   # what a worker builds, prewarm included
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-doctor-"))
    os.chmod(workroot, 0o711)
    kw["workroot"] = workroot / "jobs"
    try:
        logging.getLogger("sandbox.backends").disabled = True   # doctor says it itself
        backend = make_backend(s.sandbox_backend, **kw)
        probe = getattr(backend, "probe", None)   # the process backends check here
        if probe is not None:
            probe()
    except Exception as e:   # noqa: BLE001
        shutil.rmtree(workroot, ignore_errors=True)
        return None, workroot, Check("sandbox backend", FAIL,
                                     f"{s.sandbox_backend!r} cannot run: {_first_line(e)}",
                                     "see the docker checks above; for the process backend "
                                     "install bubblewrap (apt-get install bubblewrap) and run "
                                     "as root with the venv where other users can read it; "
                                     "make setup builds the sandbox runtime")
    finally:
        logging.getLogger("sandbox.backends").disabled = False
    status, detail, fix = backend.confinement_report(s.sandbox_backend, s.allow_unconfined)
    return backend, workroot, Check("sandbox backend", status, detail, fix)


def check_canary(s: Settings, backend) -> Check:
    from sandbox.canary import check_confinement
    if backend is None:
        return Check("confinement", FAIL, "not checked: no sandbox backend",
                     "fix the sandbox backend first")
    report = check_confinement(backend)
    if report.ok:
        return Check("confinement", OK, report.summary())
    return Check("confinement", WARN if s.allow_unconfined else FAIL, report.summary(),
                 "workers refuse candidates on this sandbox; fix the isolation (run as root, "
                 "network namespaces, Docker), or for development only set "
                 "SELFPROG_ALLOW_UNCONFINED=1")


def run_checks(s: Settings, *, canary: bool = True) -> list[Check]:
    checks: list[Check] = []
    for fn in (check_docker,):
        try:
            checks.extend(fn(s))
        except Exception as e:   # noqa: BLE001
            checks.append(Check("docker engine", FAIL if s.sandbox_backend == "docker" else WARN,
                                _first_line(e), "bash scripts/docker-engine.sh"))
    redis_ok = True
    for fn in (check_redis, check_workers, check_database, check_gpus, check_sandbox_runtime,
               check_seccomp):
        if fn is check_workers and not redis_ok:
            checks.append(Check("workers", FAIL, "not checked: the broker does not answer"))
            continue
        try:
            checks.append(fn(s))
        except Exception as e:   # noqa: BLE001
            checks.append(Check(fn.__name__.removeprefix("check_"), FAIL, _first_line(e)))
        if fn is check_redis:
            redis_ok = checks[-1].status != FAIL
    backend, workroot, picked = pick_backend(s)
    checks.append(picked)
    try:
        if canary:
            checks.append(check_canary(s, backend))
        else:
            checks.append(Check("confinement", WARN, "skipped (--skip-canary)",
                                "run `selfprog-cli doctor` without --skip-canary"))
    finally:
        close = getattr(backend, "close", None)   # stops the warm pool, if any
        if close is not None:
            try:
                close()
            except Exception:   # noqa: BLE001 - the checks are what matter here
                pass
        shutil.rmtree(workroot, ignore_errors=True)
    return checks


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0
