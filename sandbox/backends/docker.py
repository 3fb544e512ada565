"""Docker backend: every job runs in a fresh, hardened container from the sandbox image.

    backend = DockerBackend(image="selfprog-sandbox:latest", runtime="runsc", gpus="0,1")
    result = backend.execute(job, out_dir)

The job directory (`base.stage`) is bind-mounted at /job: read-only as a whole (job.json,
in/, lib/), with `out/` mounted over it writable. Scratch (/job/tmp, /tmp) is tmpfs,
so it is size-limited and charged to the container's memory limit. The container is
removed after every run, whatever happened; containers left behind by a worker that
died are found by label and removed when a backend starts (`reap_orphans`).

Every container is made by `create_hardened_container`, which builds the one allowed
profile (DESIGN.md 3.4) and refuses anything else: privileged mode, added capabilities,
host network/PID/IPC/user namespaces, mounts other than the job directory pieces,
devices other than GPU DeviceRequests, environment variables outside a short list.
After creating a container it inspects it and removes it again if the engine did not
apply the profile (a daemon default or an older API silently dropping a field).

Bounds on `out/`: a bind mount cannot carry a size limit, and a tmpfs `out/` would vanish
when the container stops (before the backend could copy results). So: RLIMIT_FSIZE
bounds each file at `limits.output_mb`; while the job runs the backend measures `out/`
every POLL_S seconds and kills the container once it holds more than `output_mb` (or
more than MAX_OUT_ENTRIES entries); `collect` checks the declared outputs again. The
overshoot is what the candidate can write in one poll interval; for a hard bound put
the workroot on its own filesystem (see docs/docker.md).

Trust: the process holding the Docker socket is root on the host. Only the sandbox
worker gets it, through a socket proxy (docker-compose.yml, docs/docker.md).
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sandbox.backends.base import (HARNESS_COMMAND, WARM_COMMAND, SandboxError, Stopped, Watch,
                                   Watching, check_inputs, cleanup, collect, format_logs,
                                   sabotage_enabled, stage, stage_job, stage_skeleton)
from sandbox.backends.warm import WARM_MAX_AGE_S, WarmPool, discard, imports_of
from sandbox.schema import Job, Result

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "selfprog-sandbox:latest"
LABEL_SANDBOX = "selfprog.sandbox"
LABEL_JOB = "selfprog.job_id"
LABEL_OWNER = "selfprog.owner"
LABEL_PID = "selfprog.owner_pid"          # the process that started it, and that
LABEL_PID_START = "selfprog.owner_start"  # process's start time (pid reuse)

POLL_S = 0.5                     # how often the deadline loop looks at out/
MAX_OUT_ENTRIES = 10_000         # files + dirs in out/ (inodes are a resource too)
LOG_TAIL_LINES = 2000
LOG_TAIL_BYTES = 64 * 1024
LOG_MAX_SIZE = "1m"              # json-file bound per container: the daemon keeps no more
SCRATCH_MIN_MB, SCRATCH_MAX_MB = 16, 1024
SYS_TMP_MB = 16                  # /tmp: TMPDIR points at /job/tmp, so /tmp stays tiny
SHM_MB = 64
MAX_OPEN_FILES = 1024
KILL_WAIT_S = 30

# Environment variables a sandbox may be given. Nothing of the host's environment
# (tokens, DB URLs, proxies) is passed: the backend builds the environment from nothing.
ALLOWED_ENV = frozenset({
    "HOME", "TMPDIR", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME", "MPLCONFIGDIR",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "PYTHONDONTWRITEBYTECODE", "LANG",
})
# What callers might try to pass to the engine and why it is refused.
FORBIDDEN = {
    "privileged": "privileged containers can do anything the host kernel allows",
    "cap_add": "no capability may be added (all are dropped)",
    "network_mode": "the network is always 'none'",
    "network": "the network is always 'none'",
    "pid_mode": "the host PID namespace is never shared",
    "ipc_mode": "the host IPC namespace is never shared",
    "userns_mode": "the host user namespace is never shared",
    "uts_mode": "the host UTS namespace is never shared",
    "cgroupns": "the host cgroup namespace is never shared",
    "volumes": "only the job directory is mounted",
    "volumes_from": "only the job directory is mounted",
    "mounts": "only the job directory is mounted",
    "binds": "only the job directory is mounted",
    "tmpfs": "scratch tmpfs mounts are fixed by the profile",
    "devices": "no host devices (GPUs only as DeviceRequests)",
    "device_cgroup_rules": "no host devices",
    "security_opt": "security options are fixed by the profile",
    "user": "the sandbox runs as the image's own non-root user",
    "read_only": "the root filesystem is always read-only",
    "oom_kill_disable": "the memory limit must be able to kill",
    "sysctls": "no sysctls",
    "extra_hosts": "no network",
    "dns": "no network",
    "ports": "no network",
    "environment": "use env=, which only accepts ALLOWED_ENV names",
}
_RUNTIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class HardeningError(SandboxError):
    """A container was asked for outside the hardened profile (or did not get it)."""


# --------------------------------------------------------------------------- engine

def _docker():
    try:
        import docker
    except ImportError as e:  # pragma: no cover - the docker SDK is a project dependency
        raise SandboxError("the docker Python SDK is not installed") from e
    return docker


def connect(timeout: int = 60):
    """A client for the engine named by DOCKER_HOST (default: the local socket)."""
    docker = _docker()
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as e:  # DockerException, requests errors: all mean "no engine"
        raise SandboxError(f"no Docker engine: {e}") from None
    return client


def image_user(client, image: str) -> tuple[int, int]:
    """The image's configured user as numeric (uid, gid); refuses root or a user name.

    A name could map to uid 0 through the image's /etc/passwd, so only numbers are
    accepted: the backend must know the sandbox is not root without running it.
    """
    docker = _docker()
    try:
        attrs = client.images.get(image).attrs
    except docker.errors.ImageNotFound:
        raise SandboxError(f"the sandbox image {image} is missing; build it with "
                           "scripts/build-images.sh") from None
    except docker.errors.APIError as e:
        raise SandboxError(f"cannot inspect the sandbox image {image}: {e}") from None
    user = (attrs.get("Config") or {}).get("User") or ""
    uid_s, _, gid_s = user.partition(":")
    if not uid_s.isdigit() or (gid_s and not gid_s.isdigit()):
        raise HardeningError(f"the image {image} must set a numeric non-root USER "
                             f"(uid:gid), not {user or 'nothing (root)'!r}")
    uid = int(uid_s)
    gid = int(gid_s) if gid_s else uid
    if uid == 0 or gid == 0:
        raise HardeningError(f"the image {image} runs as root ({user!r}); refusing it")
    return uid, gid


def docker_available(image: str = DEFAULT_IMAGE) -> tuple[bool, str]:
    """Whether the Docker backend can run here: an engine answers and the image is usable.

    For the 'auto' backend choice and `doctor`; `why` says what is missing.
    """
    try:
        client = connect(timeout=10)
    except SandboxError as e:
        return False, str(e)
    try:
        uid, _ = image_user(client, image)
    except SandboxError as e:
        return False, str(e)
    finally:
        client.close()
    return True, f"Docker engine and image {image} (uid {uid}) available"


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read().decode(errors="replace")
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return stat_line.rsplit(")", 1)[-1].split()[19]


def _owner_alive(labels: dict) -> bool:
    pid, start = labels.get(LABEL_PID, ""), labels.get(LABEL_PID_START, "")
    return pid.isdigit() and start != "" and _process_start(int(pid)) == start


def reap_orphans(client, owner: str | None = None, *, keep_live_owners: bool = False,
                 workroot: Path | None = None) -> int:
    """Remove sandbox containers (label selfprog.sandbox=1), running or not.

    With `owner`, only those that worker started. With `keep_live_owners`, not those
    whose starting process (pid and start time, labelled) is still alive: that is
    how a backend reaps at start, so that the sibling processes of one worker (Celery
    prefork children share the hostname) or a second worker on the same host keep
    their running jobs, while the containers of a process that died are removed.
    With `workroot`, the job directory a removed container had mounted at /job is
    removed too when it lies directly under `workroot` (a dead worker's job dirs and
    warm skeletons). Returns how many containers were removed.
    """
    docker = _docker()
    filters = {"label": [f"{LABEL_SANDBOX}=1"]}
    if owner is not None:
        filters["label"].append(f"{LABEL_OWNER}={owner}")
    removed = 0
    for c in client.containers.list(all=True, filters=filters):
        if keep_live_owners and _owner_alive(c.labels):
            continue
        try:
            c.remove(force=True)
            removed += 1
            jobdir = _job_mount(c, workroot)
            if jobdir is not None:
                cleanup(jobdir)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as e:
            log.warning("could not remove orphan sandbox %s: %s", c.short_id, e)
    if removed:
        log.warning("removed %d orphaned sandbox container(s)%s", removed,
                    f" of {owner}" if owner else "")
    return removed


def _job_mount(container, workroot: Path | None) -> Path | None:
    """The host dir `container` had at /job, if it is a job dir directly under `workroot`."""
    if workroot is None:
        return None
    for m in container.attrs.get("Mounts") or []:
        if m.get("Destination") == "/job":
            src = Path(m.get("Source") or "")
            if src.parent == Path(workroot).resolve() and src.name:
                return src
    return None


# --------------------------------------------------------------------------- the profile

def gpu_device_requests(gpus: str, count: int, slot: int = 0) -> list:
    """DeviceRequests for `count` GPUs out of a worker's `gpus` ('all' or '0,1,...').

    'all' hands the job every GPU the engine sees. A list is this worker's share (each
    worker gets its own SELFPROG_SANDBOX_GPUS); jobs take `count` of them in turn,
    starting at `slot`, so concurrent jobs of one worker spread over its GPUs.
    """
    docker = _docker()
    if count <= 0 or not gpus:
        return []
    if gpus.strip() == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if not ids or not all(re.fullmatch(r"[0-9]+|GPU-[0-9a-fA-F-]+", g) for g in ids):
        raise SandboxError(f"bad GPU list {gpus!r}: use 'all' or ids like '0,1'")
    chosen = [ids[(slot + i) % len(ids)] for i in range(min(count, len(ids)))]
    return [docker.types.DeviceRequest(device_ids=chosen, capabilities=[["gpu"]])]


def warm_command(model_kind: str = "t5", device: str = "auto") -> list[str]:
    """A pre-warmed sandbox's command: harness.warm_main, ready signalled by a file."""
    return ["python", "-I", "-c", WARM_COMMAND, model_kind, device, "file"]


def sandbox_env(threads: int = 1) -> dict[str, str]:
    """The whole environment of a sandbox (the image adds PATH and LANG)."""
    tmp = "/job/tmp"
    return {
        "HOME": tmp, "TMPDIR": tmp, "XDG_CACHE_HOME": f"{tmp}/.cache",
        "TORCH_HOME": f"{tmp}/torch", "HF_HOME": f"{tmp}/hf", "MPLCONFIGDIR": f"{tmp}/mpl",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
    }


def hardened_config(*, image: str, jobdir: Path, workroot: Path, job_id: str, owner: str,
                    user: tuple[int, int], memory_mb: int, cpus: float, pids: int,
                    output_mb: int, env: dict[str, str] | None = None,
                    runtime: str | None = None, device_requests: list | None = None,
                    command: list[str] | None = None, owner_pid: int | None = None,
                    warm: bool = False, **refused: Any) -> dict[str, Any]:
    """The keyword arguments for `client.containers.create` of one sandbox.

    This is the only profile there is. Anything in `refused` is an attempt to step
    outside it and raises HardeningError, as do values that would weaken it.
    `warm=True` is a pre-warmed sandbox: the same profile, but its job directory must
    hold no job yet (no job.json, nothing in in/) and its command is `warm_command`.
    """
    docker = _docker()
    if refused:
        why = "; ".join(f"{k}: {FORBIDDEN.get(k, 'not part of the hardened profile')}"
                        for k in sorted(refused))
        raise HardeningError(f"refusing a sandbox container outside the profile ({why})")

    # Mounts: the job dir and nothing else, and the job dir must be one of ours.
    jobdir, workroot = Path(jobdir), Path(workroot)
    if not jobdir.is_absolute() or jobdir.resolve() != jobdir or jobdir.parent != workroot.resolve():
        raise HardeningError(f"{jobdir} is not a job directory directly under {workroot}")
    st = os.lstat(jobdir)
    if not stat.S_ISDIR(st.st_mode):
        raise HardeningError(f"{jobdir} is not a directory")
    if warm and ((jobdir / "job.json").exists() or any(os.scandir(jobdir / "in"))):
        raise HardeningError(f"{jobdir} already holds a job; a warm sandbox starts empty")
    if not warm and not (jobdir / "job.json").is_file():
        raise HardeningError(f"{jobdir} is not a staged job directory")
    for sub in ("out", "tmp"):
        if not stat.S_ISDIR(os.lstat(jobdir / sub).st_mode):   # lstat: no symlinked out/
            raise HardeningError(f"{jobdir / sub} must be a directory")

    uid, gid = user
    if uid <= 0 or gid <= 0:
        raise HardeningError("a sandbox never runs as root")
    env = dict(env if env is not None else sandbox_env())
    bad_env = sorted(set(env) - ALLOWED_ENV)
    if bad_env:
        raise HardeningError(f"environment variables {bad_env} are not allowed in a sandbox")
    if runtime is not None and not _RUNTIME.match(runtime):
        raise HardeningError(f"bad container runtime name {runtime!r}")
    for dr in device_requests or []:
        if not isinstance(dr, docker.types.DeviceRequest) or dr.capabilities != [["gpu"]] \
                or dr.driver not in ("", "nvidia", None):
            raise HardeningError("only GPU DeviceRequests may give a sandbox devices")
    if not (64 <= memory_mb and 0 < cpus and 8 <= pids and 1 <= output_mb):
        raise HardeningError("limits out of range")

    pid = os.getpid() if owner_pid is None else owner_pid
    scratch_mb = max(SCRATCH_MIN_MB, min(SCRATCH_MAX_MB, memory_mb // 4))
    tmpfs_opts = "rw,noexec,nosuid,nodev"
    mib = 1024 * 1024
    config: dict[str, Any] = dict(
        image=image,
        command=command or (warm_command() if warm else ["python", "-I", "-c", HARNESS_COMMAND]),
        working_dir="/job",
        user=f"{uid}:{gid}",
        environment=env,
        labels={LABEL_SANDBOX: "1", LABEL_JOB: job_id, LABEL_OWNER: owner,
                LABEL_PID: str(pid), LABEL_PID_START: _process_start(pid) or ""},
        hostname="sandbox",
        detach=True,
        stdin_open=False,
        tty=False,
        # isolation
        network_mode="none",
        ipc_mode="private",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        init=True,          # reaps zombies; signals reach the whole tree when we kill
        privileged=False,
        # limits: swap equal to memory, so the limit cannot be dodged by swapping
        mem_limit=f"{memory_mb}m",
        memswap_limit=f"{memory_mb}m",
        nano_cpus=int(round(cpus * 1e9)),
        pids_limit=pids,
        shm_size=f"{SHM_MB}m",
        ulimits=[
            docker.types.Ulimit(name="core", soft=0, hard=0),
            docker.types.Ulimit(name="nofile", soft=MAX_OPEN_FILES, hard=MAX_OPEN_FILES),
            docker.types.Ulimit(name="fsize", soft=output_mb * mib, hard=output_mb * mib),
        ],
        log_config=docker.types.LogConfig(type="json-file",
                                          config={"max-size": LOG_MAX_SIZE, "max-file": "1"}),
        # the job directory: read-only, with out/ writable; scratch in memory
        mounts=[
            docker.types.Mount(target="/job", source=str(jobdir), type="bind", read_only=True),
            docker.types.Mount(target="/job/out", source=str(jobdir / "out"), type="bind",
                               read_only=False),
        ],
        tmpfs={
            "/job/tmp": f"{tmpfs_opts},size={scratch_mb}m,uid={uid},gid={gid},mode=0700",
            "/tmp": f"{tmpfs_opts},size={SYS_TMP_MB}m,mode=1777",
        },
    )
    if runtime:
        config["runtime"] = runtime
    if device_requests:
        config["device_requests"] = list(device_requests)
    if sabotage_enabled():
        _sabotage(config)
    return config


def _sabotage(config: dict[str, Any]) -> None:
    """TEST ONLY (base.sabotage_enabled): a container that confines nothing, the way a
    careless `docker run` would be: root, host network and PIDs, the host's / at /host
    read-write, the host's environment, every capability, no limits."""
    docker = _docker()
    log.error("UNCONFINED docker sandbox: SABOTAGE MODE (SELFPROG_SABOTAGE=1, tests only)")
    for key in ("mem_limit", "memswap_limit", "nano_cpus", "pids_limit", "ulimits",
                "cap_drop", "security_opt", "ipc_mode"):
        config.pop(key, None)
    config.update(user="0:0", network_mode="host", pid_mode="host", read_only=False,
                  environment={**{k: v for k, v in os.environ.items() if k != "PATH"},
                               **config["environment"]})
    config["mounts"] = config["mounts"] + [
        docker.types.Mount(target="/host", source="/", type="bind", read_only=False)]
    config["tmpfs"] = {k: re.sub(r",size=[^,]*", "", v) for k, v in config["tmpfs"].items()}


def check_profile(attrs: dict, config: dict[str, Any]) -> list[str]:
    """What in an inspected container differs from the hardened profile (empty: none)."""
    hc = attrs.get("HostConfig") or {}
    cfg = attrs.get("Config") or {}
    problems = []

    def want(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    mem = int(config["mem_limit"][:-1]) * 1024 * 1024
    want(hc.get("NetworkMode") == "none", f"NetworkMode {hc.get('NetworkMode')!r}")
    want(hc.get("ReadonlyRootfs") is True, "root filesystem not read-only")
    want(not hc.get("Privileged"), "privileged")
    want([c.upper() for c in hc.get("CapDrop") or []] in (["ALL"], ["CAP_ALL"]), "CapDrop not ALL")
    want(not hc.get("CapAdd"), f"CapAdd {hc.get('CapAdd')}")
    want(any(s.startswith("no-new-privileges") for s in hc.get("SecurityOpt") or []),
         "no-new-privileges missing")
    want(hc.get("Memory") == mem and hc.get("MemorySwap") == mem, "memory/swap limit")
    want(hc.get("NanoCpus") == config["nano_cpus"], "NanoCpus")
    want(hc.get("PidsLimit") == config["pids_limit"], "PidsLimit")
    want(hc.get("PidMode") in ("", None), f"PidMode {hc.get('PidMode')!r}")
    want(hc.get("IpcMode") in ("private", "none"), f"IpcMode {hc.get('IpcMode')!r}")
    want(hc.get("UsernsMode") in ("", None), f"UsernsMode {hc.get('UsernsMode')!r}")
    want(not hc.get("Binds") and not hc.get("VolumesFrom"), "extra volumes")
    want(not hc.get("Devices"), f"Devices {hc.get('Devices')}")
    want(not cfg.get("OpenStdin"), "stdin open")
    want(hc.get("Init") is True, "no init process")
    mounts = sorted((m.get("Target"), m.get("Source"), bool(m.get("ReadOnly")))
                    for m in hc.get("Mounts") or [])
    expected = sorted((m["Target"], m["Source"], bool(m["ReadOnly"])) for m in config["mounts"])
    want(mounts == expected, f"mounts {mounts}")
    want(set(hc.get("Tmpfs") or {}) == set(config["tmpfs"]), "tmpfs mounts")
    want(cfg.get("User") == config["user"], f"User {cfg.get('User')!r}")
    return problems


def create_hardened_container(client, **spec: Any):
    """Create (not start) one sandbox container; the only way this code makes one.

    `spec` is what `hardened_config` accepts. The created container is inspected and
    removed again if the engine did not apply every part of the profile.
    """
    docker = _docker()
    config = hardened_config(**spec)
    try:
        container = client.containers.create(**config)
    except docker.errors.ImageNotFound:
        raise SandboxError(f"the sandbox image {config['image']} is missing") from None
    except docker.errors.APIError as e:
        raise SandboxError(f"the engine refused the sandbox container: {e}") from None
    try:
        problems = ([] if sabotage_enabled() else   # TEST ONLY: the profile is off on purpose
                    check_profile(client.api.inspect_container(container.id), config))
    except BaseException:
        _remove(container)
        raise
    if problems:
        _remove(container)
        raise HardeningError("the engine did not apply the hardened profile: "
                             + "; ".join(problems))
    return container


def _remove(container) -> None:
    """Remove a container whatever its state; retry while the engine is busy with it."""
    docker = _docker()
    for attempt in range(5):
        try:
            container.remove(force=True)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as e:   # e.g. "removal already in progress"
            if attempt == 4:
                log.error("could not remove sandbox container %s: %s", container.short_id, e)
                return
            time.sleep(0.2 * (attempt + 1))


def dir_usage(path: Path, max_entries: int = MAX_OUT_ENTRIES) -> tuple[int, int]:
    """(bytes on disk, entries) under `path`, without following links; stops counting
    entries past `max_entries` (the caller treats that as over the limit anyway)."""
    total, entries = 0, 0
    stack = [str(path)]
    while stack and entries <= max_entries:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                entries += 1
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512   # real usage: sparse files cost nothing
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return total, entries


# --------------------------------------------------------------------------- the backend

@dataclass
class DockerRun:
    """The last run's identity, for tests and diagnostics."""
    container_id: str
    jobdir: Path
    warm: bool = False          # ran in a pre-warmed container


class DockerBackend:
    """Run each job in a fresh hardened container (same interface as ProcessBackend).

    With `prewarm=N` (Settings.sandbox_prewarm) it keeps N containers of the latest
    job's profile started ahead (sandbox/backends/warm.py): the same hardened profile,
    in an empty job dir; the harness has imported torch (and initialised CUDA) and
    waits for "go". `execute` stages the job into one, writes the "go" file, and
    supervises it exactly like a cold container; each serves one job and is removed.
    """

    name = "docker"

    def __init__(self, image: str = DEFAULT_IMAGE, workroot: Path | str | None = None,
                 runtime: str | None = None, gpus: str | None = None, client=None,
                 owner: str | None = None, keep_jobdirs: bool = False, prewarm: int = 0,
                 prewarm_max_age_s: float = WARM_MAX_AGE_S):
        self.keep_jobdirs = keep_jobdirs
        self.client = client or connect()
        self.last_run: DockerRun | None = None
        # Every setting a container gets, in one place (the warm pool's thread holds it).
        self.spec = ContainerSpec(
            image=image,
            # The engine resolves bind-mount sources on *its* host: a worker that runs in
            # a container must have the workroot at the same path as on the host.
            workroot=(Path(workroot) if workroot
                      else Path(tempfile.gettempdir()) / "selfprog-docker-jobs").resolve(),
            # The hostname, plus the pid labels: reaping at start removes what dead
            # processes of this host left behind and leaves live ones alone.
            owner=owner or socket.gethostname(),
            user=image_user(self.client, image),
            runtime=runtime or None, gpus=(gpus or "").strip())
        reap_orphans(self.client, owner=self.owner, keep_live_owners=True,
                     workroot=self.workroot)
        self.prewarm = max(0, int(prewarm))
        self._pool: WarmPool | None = None
        if self.prewarm:
            # `spawn` must not hold the backend: collecting it runs the finalizer.
            spawn = partial(spawn_warm_container, client=self.client, spec=self.spec)
            self._pool = WarmPool(self.prewarm, spawn, max_age_s=prewarm_max_age_s)
            self._finalizer = weakref.finalize(self, self._pool.close)

    image = property(lambda self: self.spec.image)
    workroot = property(lambda self: self.spec.workroot)
    owner = property(lambda self: self.spec.owner)
    user = property(lambda self: self.spec.user)
    runtime = property(lambda self: self.spec.runtime)
    gpus = property(lambda self: self.spec.gpus)

    def close(self) -> None:
        """Remove the idle pre-warmed containers and stop making new ones."""
        if self._pool is not None:
            self._finalizer()

    def __enter__(self) -> "DockerBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ profiles
    @staticmethod
    def _profile(job: Job) -> tuple:
        """What a container must have been created with to run `job`: its limits but
        the deadline (counted from "go"), threads, GPUs, model kind and device."""
        lim = job.limits
        return (lim.memory_mb, lim.cpus, lim.pids, lim.output_mb, lim.gpus,
                int(job.params.get("num_threads", 1)), *imports_of(job))

    def prewarm_for(self, job: Job) -> None:
        """Start warming containers for jobs like `job` now (no-op without prewarm)."""
        job.validate()
        if self._pool is not None and not sabotage_enabled():
            self._pool.target(self._profile(job))

    # ------------------------------------------------------------------ running
    def execute(self, job: Job, out_dir: Path, watch: Watch | None = None) -> Result:
        """Run one job to completion and return its Result (never the candidate's exception).

        Raises SandboxError only when the sandbox itself cannot be made (engine or image
        missing, profile refused): that is not the candidate's doing. `watch`
        (base.Watch): relay its training losses, stop it when cancelled.
        """
        docker = _docker()
        job.validate()
        if self._pool is not None:
            result = self._execute_warm(job, Path(out_dir), watch)
            if result is not None:
                return result
        jobdir = stage(job, self.workroot, seal=True)
        container = None
        try:
            _hand_out_dir(jobdir, self.user)
            container = create_hardened_container(
                self.client, **self.spec.for_job(self._profile(job), jobdir, job.job_id))
            self.last_run = DockerRun(container.id, jobdir)
            try:
                container.start()
            except docker.errors.APIError as e:
                raise SandboxError(f"the sandbox container did not start: {e}") from None
            return self._supervise(job, container, jobdir, Path(out_dir), time.monotonic(),
                                   Watching(jobdir, watch))
        finally:
            if container is not None:
                _remove(container)
            if not self.keep_jobdirs:
                cleanup(jobdir)

    def _execute_warm(self, job: Job, out_dir: Path, watch: Watch | None = None) -> Result | None:
        """Run `job` in a pre-warmed container; None when there is none to use (the
        caller then runs it cold). Nothing of the job reaches a container before it is
        taken, and a container is never given a second job."""
        if sabotage_enabled():
            return None
        sources = check_inputs(job)          # a bad input is refused as in a cold run
        warm = self._pool.take(self._profile(job))
        if warm is None:
            return None
        try:
            stage_job(job, warm.jobdir, sources, seal=True)
            started = time.monotonic()
            _send_go(warm.jobdir)
        except Exception as e:
            # Never started: nothing of the candidate ran.
            log.warning("pre-warmed sandbox %s unusable (%s); running the job cold",
                        warm.container.short_id, e)
            discard(warm)
            return None
        self.last_run = DockerRun(warm.container.id, warm.jobdir, warm=True)
        try:
            return self._supervise(job, warm.container, warm.jobdir, out_dir, started,
                                   Watching(warm.jobdir, watch))
        finally:
            _remove(warm.container)
            if not self.keep_jobdirs:
                cleanup(warm.jobdir)

    def _supervise(self, job: Job, container, jobdir: Path, out_dir: Path, started: float,
                   watching: Watching) -> Result:
        """Wait for a started container under the job's deadline (from `started`) and
        output bound, polling the caller's Watch; kill it if need be (or when the caller
        cancels), and collect its result."""
        docker = _docker()
        import requests

        lim = job.limits
        exit_code: int | None = None
        timed_out = stopped = False
        over_output = ""
        out_path = jobdir / "out"
        deadline = started + lim.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            try:
                status = container.wait(timeout=max(0.05, min(POLL_S, remaining)))
                exit_code = _exit_code(status)
                break
            except requests.exceptions.RequestException:
                pass   # still running: the wait timed out
            try:
                watching.poll()
            except Stopped:
                stopped = True
                break
            used, entries = dir_usage(out_path)
            if used > lim.output_mb * 1024 * 1024 or entries > MAX_OUT_ENTRIES:
                over_output = (f"out/ grew past the {lim.output_mb} MB output limit"
                               if entries <= MAX_OUT_ENTRIES else
                               f"out/ holds more than {MAX_OUT_ENTRIES} entries")
                break
        duration = time.monotonic() - started
        if not stopped:
            watching.poll(final=True)   # the last step
        if exit_code is None:   # deadline, output bound or cancel: kill the whole container
            try:
                container.kill()
            except docker.errors.APIError:
                pass   # it exited on its own in the meantime
            try:
                container.wait(timeout=KILL_WAIT_S)
            except requests.exceptions.RequestException:
                raise SandboxError(f"sandbox {container.short_id} survives SIGKILL") from None
        state = self.client.api.inspect_container(container.id)["State"]
        oom_killed = bool(state.get("OOMKilled")) and not timed_out
        if exit_code is None and not (timed_out or over_output or stopped):
            exit_code = _exit_code({"StatusCode": state.get("ExitCode")})
        stdout = _tail(container, stdout=True)
        stderr = _tail(container, stdout=False)
        if over_output:
            return Result.failure(job, "crashed", over_output, duration_s=round(duration, 3),
                                  logs=format_logs(stdout, stderr))
        return collect(job, jobdir, out_dir, exit_code=exit_code, timed_out=timed_out,
                       oom_killed=oom_killed, stdout_tail=stdout, stderr_tail=stderr,
                       duration_s=duration, stopped=stopped)


def _hand_out_dir(jobdir: Path, user: tuple[int, int]) -> None:
    """Give the sandbox user `out/`, the one place in the job dir it may write."""
    if os.geteuid() == 0:
        os.chown(jobdir / "out", *user)
    else:
        # Without root out/ cannot be handed to the sandbox uid; let it write there.
        # The workroot is 0711: other host users cannot find the dir.
        os.chmod(jobdir / "out", 0o777)


def _send_go(jobdir: Path) -> None:
    """Tell a warm container its job is staged: GO_FILE in the job dir, which is
    read-only to the container (so only the backend can say it) and which
    harness.warm_main polls for. Written after the job's files and its seal key."""
    from sandbox.harness import GO_FILE
    fd = os.open(jobdir / GO_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o444)
    os.close(fd)


@dataclass(eq=False)
class WarmContainer:
    """One pre-warmed container (a `warm.WarmSandbox`): started, importing or waiting
    for "go" in a job directory that holds no job."""
    container: Any
    jobdir: Path
    key: tuple
    born: float

    def alive(self) -> bool:
        docker = _docker()
        try:
            self.container.reload()
        except docker.errors.APIError:
            return False
        return self.container.status == "running"

    def is_ready(self) -> bool:
        from sandbox.harness import READY_FILE
        try:   # lstat: a regular file the harness made, never followed
            return stat.S_ISREG(os.lstat(self.jobdir / "out" / READY_FILE).st_mode)
        except OSError:
            return False

    def destroy(self) -> None:
        _remove(self.container)
        cleanup(self.jobdir)


def spawn_warm_container(key: tuple, *, client, spec: "ContainerSpec") -> WarmContainer:
    """The warm pool's `spawn`: create and start one warm container of profile `key`
    in an empty job directory."""
    docker = _docker()
    jobdir = stage_skeleton(spec.workroot, "warm-")
    container = None
    try:
        _hand_out_dir(jobdir, spec.user)
        container = create_hardened_container(client, **spec.for_job(key, jobdir, "warm",
                                                                     warm=True))
        try:
            container.start()
        except docker.errors.APIError as e:
            raise SandboxError(f"the warm sandbox container did not start: {e}") from None
    except BaseException:
        if container is not None:
            _remove(container)
        cleanup(jobdir)
        raise
    return WarmContainer(container=container, jobdir=jobdir, key=key, born=time.monotonic())


@dataclass(eq=False)
class ContainerSpec:
    """A backend's fixed settings, which every container it makes gets. Plain data: the
    warm pool's thread holds this, never the backend."""
    image: str
    workroot: Path
    owner: str
    user: tuple[int, int]
    runtime: str | None
    gpus: str
    _gpu_slot: Any = field(default_factory=itertools.count)
    _lock: Any = field(default_factory=threading.Lock)

    def for_job(self, profile: tuple, jobdir: Path, job_id: str,
                warm: bool = False) -> dict[str, Any]:
        """What create_hardened_container gets for a job (or a warm sandbox) of
        `profile` (DockerBackend._profile)."""
        memory_mb, cpus, pids, output_mb, gpus, threads, model_kind, device = profile
        device_requests = []
        if gpus > 0:
            if self.gpus:
                with self._lock:   # concurrent jobs of one worker take its GPUs in turn
                    slot = next(self._gpu_slot) * gpus
                device_requests = gpu_device_requests(self.gpus, gpus, slot)
            else:
                log.warning("a job asks for %d GPU(s) but this worker has none configured "
                            "(SELFPROG_SANDBOX_GPUS); it runs without", gpus)
        return dict(image=self.image, jobdir=jobdir, workroot=self.workroot, job_id=job_id,
                    owner=self.owner, user=self.user, memory_mb=memory_mb, cpus=cpus,
                    pids=pids, output_mb=output_mb, env=sandbox_env(threads),
                    runtime=self.runtime, device_requests=device_requests, warm=warm,
                    command=warm_command(model_kind, device) if warm else None)


def _exit_code(status: dict) -> int | None:
    """Docker's exit status in subprocess terms: 128+N (docker-init's way of saying
    'killed by signal N') becomes -N; an engine error gives None."""
    code = status.get("StatusCode")
    if not isinstance(code, int) or code < 0:
        return None
    if 128 < code < 128 + 65:
        return -(code - 128)
    return code


def _tail(container, *, stdout: bool) -> bytes:
    docker = _docker()
    try:
        data = container.logs(stdout=stdout, stderr=not stdout, tail=LOG_TAIL_LINES)
    except docker.errors.APIError:
        return b""
    return data[-LOG_TAIL_BYTES:]
