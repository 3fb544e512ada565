"""The hardened container profile: the one way a sandbox container may be configured.

    config = hardened_config(image=..., jobdir=..., workroot=..., job_id=..., owner=...,
                             user=(uid, gid), memory_mb=..., cpus=..., pids=..., output_mb=...)
    problems = check_profile(client.api.inspect_container(id), config)

`hardened_config` builds the keyword arguments of `client.containers.create` and refuses
anything else: privileged mode, added capabilities, host network/PID/IPC/user
namespaces, mounts other than the job directory pieces, devices other than GPU
DeviceRequests, environment variables outside ALLOWED_ENV (FORBIDDEN says why each
is refused). `check_profile` compares what the engine applied with it (a daemon default
or an older API silently dropping a field). The runner is sandbox/backends/docker.py.

The job directory is bind-mounted at /job: read-only as a whole (job.json, in/, lib/),
with `out/` mounted over it writable. Scratch (/job/tmp, /tmp) is tmpfs, so it is
size-limited and charged to the container's memory limit.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from sandbox.backends.errors import SandboxError
from sandbox.backends.base import SECCOMP_ENV, job_env, sabotaged, sabotaged_properties
from sandbox.protocol import HARNESS_COMMAND, JOB_FILE, WARM_COMMAND

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "selfprog-sandbox:latest"
LABEL_SANDBOX = "selfprog.sandbox"
LABEL_JOB = "selfprog.job_id"
LABEL_OWNER = "selfprog.owner"
LABEL_PID = "selfprog.owner_pid"          # the process that started it, and that
LABEL_PID_START = "selfprog.owner_start"  # process's start time (pid reuse)

LOG_MAX_SIZE = "1m"              # json-file bound per container: the daemon keeps no more
SCRATCH_MIN_MB, SCRATCH_MAX_MB = 16, 1024
SYS_TMP_MB = 16                  # /tmp: TMPDIR points at /job/tmp, so /tmp stays tiny
SHM_MB = 64
MAX_OPEN_FILES = 1024

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


def docker_sdk():
    try:
        import docker
    except ImportError as e:  # pragma: no cover - the docker SDK is a project dependency
        raise SandboxError("the docker Python SDK is not installed") from e
    return docker


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read().decode(errors="replace")
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    return stat_line.rsplit(")", 1)[-1].split()[19]


def gpu_device_requests(gpus: str, count: int, slot: int = 0) -> list:
    """DeviceRequests for `count` GPUs out of a worker's `gpus` ('all' or '0,1,...').

    'all' hands the job every GPU the engine sees. A list is this worker's share (each
    worker gets its own SELFPROG_SANDBOX_GPUS); jobs take `count` of them in turn,
    starting at `slot`, so concurrent jobs of one worker spread over its GPUs.
    """
    docker = docker_sdk()
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
    """The whole environment of a sandbox (the image adds PATH and LANG). The harness's
    seccomp filter needs no-new-privileges: without it (TEST ONLY) there is none."""
    return job_env("/job/tmp", threads,
                   seccomp=not (sabotaged("seccomp") or sabotaged("no-new-privileges")))


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
    docker = docker_sdk()
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
    if warm and ((jobdir / JOB_FILE).exists() or any(os.scandir(jobdir / "in"))):
        raise HardeningError(f"{jobdir} already holds a job; a warm sandbox starts empty")
    if not warm and not (jobdir / JOB_FILE).is_file():
        raise HardeningError(f"{jobdir} is not a staged job directory")
    for sub in ("out", "tmp"):
        if not stat.S_ISDIR(os.lstat(jobdir / sub).st_mode):   # lstat: no symlinked out/
            raise HardeningError(f"{jobdir / sub} must be a directory")

    uid, gid = user
    if uid <= 0 or gid <= 0:
        raise HardeningError("a sandbox never runs as root")
    env = dict(env if env is not None else sandbox_env())
    # TEST ONLY: the harness's seccomp switch exists only under SELFPROG_SABOTAGE
    allowed_env = ALLOWED_ENV | ({SECCOMP_ENV} if sabotaged_properties() else set())
    bad_env = sorted(set(env) - allowed_env)
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
                LABEL_PID: str(pid), LABEL_PID_START: process_start(pid) or ""},
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
    if sabotaged_properties():   # TEST ONLY (base.py sabotaged_properties)
        _sabotage(config, sabotaged_properties())
    return config


def _sabotage(config: dict[str, Any], props: frozenset[str]) -> None:
    """TEST ONLY (base.py sabotaged_properties): switch off exactly the confinement
    properties in `props`, each the way a careless `docker run` would leave it."""
    docker = docker_sdk()
    log.error("UNCONFINED docker sandbox: SABOTAGE MODE (SELFPROG_SABOTAGE=%s, tests only)",
              ",".join(sorted(props)))
    ulimits = {u["Name"]: u for u in config["ulimits"]}
    if "network" in props:
        config["network_mode"] = "host"
    if "files" in props:
        config["read_only"] = False
        config["mounts"] = config["mounts"] + [
            docker.types.Mount(target="/host", source="/", type="bind", read_only=False)]
    if "user" in props:              # out/ is root's then too (docker._hand_out_dir)
        config["user"] = "0:0"
        config["tmpfs"] = {k: re.sub(r"uid=\d+,gid=\d+", "uid=0,gid=0", v)
                           for k, v in config["tmpfs"].items()}
    if "env" in props:
        config["environment"] = {**{k: v for k, v in os.environ.items() if k != "PATH"},
                                 **config["environment"]}
    if "memory" in props:
        config.pop("mem_limit")
        config.pop("memswap_limit")
    if "pids" in props:
        config.pop("pids_limit")
    if "pid-namespace" in props:
        config["pid_mode"] = "host"
    if "file-size" in props:
        ulimits.pop("fsize")
        config["tmpfs"] = {k: re.sub(r",size=[^,]*", "", v) for k, v in config["tmpfs"].items()}
    if "open-files" in props:      # the engine's own limit (runc may not raise it)
        ulimits.pop("nofile")
    if "core" in props:
        ulimits["core"] = docker.types.Ulimit(name="core", soft=-1, hard=-1)
    if "cpu" in props:
        config.pop("nano_cpus")
    if "capabilities" in props:
        config.pop("cap_drop")
    if "no-new-privileges" in props:
        config.pop("security_opt")
    if "ipc" in props:
        config["ipc_mode"] = "host"
    config["ulimits"] = list(ulimits.values())


def check_profile(attrs: dict, config: dict[str, Any]) -> list[str]:
    """What in an inspected container differs from the hardened profile (empty: none).
    TEST ONLY: the parts of a property switched off by SELFPROG_SABOTAGE are not checked
    (base.py sabotaged_properties), every other part is."""
    hc = attrs.get("HostConfig") or {}
    cfg = attrs.get("Config") or {}
    off = sabotaged_properties()
    problems = []

    def want(cond: bool, what: str, prop: str = "") -> None:
        if not cond and prop not in off:
            problems.append(what)

    mem = int(config.get("mem_limit", "0m")[:-1]) * 1024 * 1024
    want(hc.get("NetworkMode") == "none", f"NetworkMode {hc.get('NetworkMode')!r}", "network")
    want(hc.get("ReadonlyRootfs") is True, "root filesystem not read-only", "files")
    want(not hc.get("Privileged"), "privileged")
    want([c.upper() for c in hc.get("CapDrop") or []] in (["ALL"], ["CAP_ALL"]), "CapDrop not ALL",
         "capabilities")
    want(not hc.get("CapAdd"), f"CapAdd {hc.get('CapAdd')}")
    want(any(s.startswith("no-new-privileges") for s in hc.get("SecurityOpt") or []),
         "no-new-privileges missing", "no-new-privileges")
    want(hc.get("Memory") == mem and hc.get("MemorySwap") == mem, "memory/swap limit", "memory")
    want(hc.get("NanoCpus") == config.get("nano_cpus"), "NanoCpus", "cpu")
    want(hc.get("PidsLimit") == config.get("pids_limit"), "PidsLimit", "pids")
    want(hc.get("PidMode") in ("", None), f"PidMode {hc.get('PidMode')!r}", "pid-namespace")
    want(hc.get("IpcMode") in ("private", "none"), f"IpcMode {hc.get('IpcMode')!r}", "ipc")
    want(hc.get("UsernsMode") in ("", None), f"UsernsMode {hc.get('UsernsMode')!r}")
    want(not hc.get("Binds") and not hc.get("VolumesFrom"), "extra volumes")
    want(not hc.get("Devices"), f"Devices {hc.get('Devices')}")
    want(not cfg.get("OpenStdin"), "stdin open")
    want(hc.get("Init") is True, "no init process")
    ulimits = sorted((u.get("Name"), u.get("Soft"), u.get("Hard")) for u in hc.get("Ulimits") or [])
    expected_ul = sorted((u["Name"], u["Soft"], u["Hard"]) for u in config["ulimits"])
    want(ulimits == expected_ul, f"ulimits {ulimits}")
    mounts = sorted((m.get("Target"), m.get("Source"), bool(m.get("ReadOnly")))
                    for m in hc.get("Mounts") or [])
    expected = sorted((m["Target"], m["Source"], bool(m["ReadOnly"])) for m in config["mounts"])
    want(mounts == expected, f"mounts {mounts}")
    want(set(hc.get("Tmpfs") or {}) == set(config["tmpfs"]), "tmpfs mounts")
    want(cfg.get("User") == config["user"], f"User {cfg.get('User')!r}")
    return problems
