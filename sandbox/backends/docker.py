"""Docker backend: every job runs in a fresh, hardened container from the sandbox image.

    backend = DockerBackend(image="selfprog-sandbox:latest", runtime="runsc", gpus="0,1")
    result = backend.execute(job, out_dir)

The run itself follows the template of sandbox/backends/base.py; every container is
made by `create_hardened_container` from the one profile of
sandbox/backends/docker_profile.py, inspected, and removed again if the engine did not
apply it. The container is removed after every run, whatever happened; containers left
behind by a worker that died are found by label and removed when a backend starts
(`reap_orphans`).

Bounds on `out/`: a bind mount cannot carry a size limit, and a tmpfs `out/` would vanish
when the container stops (before the backend could copy results). So: RLIMIT_FSIZE
bounds each file at `limits.output_mb`; while the job runs the backend measures `out/`
every WATCH_POLL_S seconds and kills the container once it holds more than `output_mb`
(or more than MAX_OUT_ENTRIES entries); `collect` checks the declared outputs again. The
overshoot is what the candidate can write in one poll interval; for a hard bound put
the workroot on its own filesystem (see docs/docker.md).

Trust: the process holding the Docker socket is root on the host. Only the sandbox
worker gets it, through a socket proxy (docker-compose.yml, docs/docker.md).
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sandbox.backends.errors import SandboxError
from sandbox.backends.base import RUNNING, Backend, Outcome, Run, sabotaged
from sandbox.backends.collect import LOG_TAIL_BYTES
from sandbox.backends.docker_profile import (DEFAULT_IMAGE, LABEL_OWNER, LABEL_PID,
                                             LABEL_PID_START, LABEL_SANDBOX, HardeningError,
                                             check_profile, docker_sdk, gpu_device_requests,
                                             hardened_config, process_start, sandbox_env,
                                             warm_command)
from sandbox.backends.staging import cleanup, stage, stage_job, stage_skeleton
from sandbox.backends.warm import WARM_MAX_AGE_S, imports_of
from sandbox.protocol import GO_FILE, OUT_DIR, READY_FILE
from sandbox.schema import Job

log = logging.getLogger(__name__)

MAX_OUT_ENTRIES = 10_000         # files + dirs in out/ (inodes are a resource too)
LOG_TAIL_LINES = 2000
KILL_WAIT_S = 30


# --------------------------------------------------------------------------- engine

def connect(timeout: int = 60):
    """A client for the engine named by DOCKER_HOST (default: the local socket)."""
    docker = docker_sdk()
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as e:  # DockerException, requests errors: all mean "no engine"
        raise SandboxError(f"no Docker engine: {e}") from None
    return client


def image_identity(client, image: str) -> str:
    """The content id (sha256:...) of `image` as the engine has it now."""
    return client.images.get(image).id


def image_user(client, image: str) -> tuple[int, int]:
    """The image's configured user as numeric (uid, gid); refuses root or a user name.

    A name could map to uid 0 through the image's /etc/passwd, so only numbers are
    accepted: the backend must know the sandbox is not root without running it.
    """
    docker = docker_sdk()
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


def _owner_alive(labels: dict) -> bool:
    pid, start = labels.get(LABEL_PID, ""), labels.get(LABEL_PID_START, "")
    return pid.isdigit() and start != "" and process_start(int(pid)) == start


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
    docker = docker_sdk()
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


def create_hardened_container(client, **spec: Any):
    """Create (not start) one sandbox container; the only way this code makes one.

    `spec` is what `hardened_config` accepts. The created container is inspected and
    removed again if the engine did not apply every part of the profile.
    """
    docker = docker_sdk()
    config = hardened_config(**spec)
    try:
        container = client.containers.create(**config)
    except docker.errors.ImageNotFound:
        raise SandboxError(f"the sandbox image {config['image']} is missing") from None
    except docker.errors.APIError as e:
        raise SandboxError(f"the engine refused the sandbox container: {e}") from None
    try:
        problems = check_profile(client.api.inspect_container(container.id), config)
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
    docker = docker_sdk()
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

@dataclass(eq=False)
class DockerRun(Run):
    """One Docker-backend run (`last_run`): its container."""
    container_id: str = ""
    container: Any = field(default=None, repr=False)
    cpu_seen: float | None = None    # the container's cgroup, at the latest sample
    peak_bytes: int | None = None
    cpu_at_go: float = 0.0           # a warm container's CPU spent warming up


# Where the engine's containers' cgroups are on this host (cgroupfs v1, systemd v2): read
# while a container runs (they go with it). A worker that cannot see them (in a
# container of its own) records no CPU seconds or memory peak.
_CGROUP_CPU = ("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage",              # ns
               "/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat")       # usage_usec
_CGROUP_PEAK = ("/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes",
                "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak")


def cgroup_usage(container_id: str) -> tuple[float | None, int | None]:
    """(CPU seconds, peak memory bytes) of a running container, from its cgroup."""
    cpu = peak = None
    for path in _CGROUP_CPU:
        try:
            text = Path(path.format(id=container_id)).read_text()
        except OSError:
            continue
        if path.endswith("cpu.stat"):
            usec = next((int(l.split()[1]) for l in text.splitlines() if l.startswith("usage_usec")), None)
            cpu = None if usec is None else usec / 1e6
        else:
            cpu = int(text) / 1e9
        break
    for path in _CGROUP_PEAK:
        try:
            peak = int(Path(path.format(id=container_id)).read_text())
            break
        except (OSError, ValueError):
            continue
    return cpu, peak


class DockerBackend(Backend):
    """Run each job in a fresh hardened container (same interface as ProcessBackend).

    With `prewarm=N` (Settings.sandbox_prewarm) it keeps N containers of the latest
    job's profile started ahead (sandbox/backends/warm.py): the same hardened profile,
    in an empty job dir; the harness has imported torch (and initialised CUDA) and
    waits for "go". `execute` stages the job into one, writes the "go" file, and
    supervises it exactly like a cold container; each serves one job and is removed.
    """

    name = "docker"

    @classmethod
    def available(cls, image: str | None = None, **_: object) -> tuple[bool, str]:
        """Whether the engine and the image are there (`auto`), nothing started."""
        return docker_available(image or DEFAULT_IMAGE)

    def confinement_report(self, requested: str, allow_unconfined: bool) -> tuple[str, str, str]:
        """(ok, detail, fix) for `selfprog-cli doctor`."""
        return ("ok", f"{requested!r} picks docker ({self.spec.image}"
                + (f", runtime {self.spec.runtime}" if self.spec.runtime else "")
                + "); confinement: docker, the harness's seccomp filter inside", "")

    def __init__(self, image: str = DEFAULT_IMAGE, workroot: Path | str | None = None,
                 runtime: str | None = None, gpus: str | None = None, client=None,
                 owner: str | None = None, keep_jobdirs: bool = False, prewarm: int = 0,
                 prewarm_max_age_s: float = WARM_MAX_AGE_S):
        self.client = client or connect()
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
        # `spawn` must not hold the backend: collecting it runs the finalizer.
        spawn = partial(spawn_warm_container, client=self.client, spec=self.spec)
        super().__init__(keep_jobdirs=keep_jobdirs, prewarm=prewarm,
                         prewarm_max_age_s=prewarm_max_age_s, spawn=spawn)

    image = property(lambda self: self.spec.image)
    workroot = property(lambda self: self.spec.workroot)
    owner = property(lambda self: self.spec.owner)
    user = property(lambda self: self.spec.user)
    runtime = property(lambda self: self.spec.runtime)
    gpus = property(lambda self: self.spec.gpus)

    def identity(self) -> str:
        """The image's content id (not its tag: a rebuilt image under the same tag is
        another identity) and the runtime that runs it."""
        return f"docker:{image_identity(self.client, self.image)}:{self.runtime or 'runc'}"

    # ------------------------------------------------------------------ the template's parts
    def _profile(self, job: Job) -> tuple:
        """What a container must have been created with to run `job`: its limits but
        the deadline (counted from "go"), threads, GPUs, model kind and device."""
        lim = job.limits
        return (lim.memory_mb, lim.cpus, lim.pids, lim.output_mb, lim.gpus,
                int(job.params.get("num_threads", 1)), *imports_of(job))

    def _stage(self, job: Job) -> Path:
        return stage(job, self.workroot, seal=True)

    def _start(self, job: Job, jobdir: Path) -> DockerRun:
        docker = docker_sdk()
        _hand_out_dir(jobdir, self.user)
        container = create_hardened_container(
            self.client, **self.spec.for_job(self._profile(job), jobdir, job.job_id))
        self.last_run = DockerRun(jobdir=jobdir, started=time.monotonic(),
                                  container_id=container.id, container=container)
        try:
            container.start()
        except docker.errors.APIError as e:
            _remove(container)
            raise SandboxError(f"the sandbox container did not start: {e}") from None
        except BaseException:
            _remove(container)
            raise
        self.last_run.started = time.monotonic()
        return self.last_run

    def _go(self, job: Job, warm: "WarmContainer", sources: dict[str, Path]) -> DockerRun:
        stage_job(job, warm.jobdir, sources, seal=True)
        warmed, _ = cgroup_usage(warm.container.id)   # not the job's cost
        started = time.monotonic()
        _send_go(warm.jobdir)
        return DockerRun(jobdir=warm.jobdir, started=started, warm=True,
                         container_id=warm.container.id, container=warm.container,
                         cpu_at_go=warmed or 0.0)

    def _wait_for_exit(self, run: DockerRun, timeout: float):
        import requests
        try:
            return _exit_code(run.container.wait(timeout=timeout))
        except requests.exceptions.RequestException:
            return RUNNING   # still running: the wait timed out

    def _check_running(self, job: Job, run: DockerRun) -> str:
        self._sample(run)
        used, entries = dir_usage(run.jobdir / OUT_DIR)
        if entries > MAX_OUT_ENTRIES:
            return f"out/ holds more than {MAX_OUT_ENTRIES} entries"
        if used > job.limits.output_mb * 1024 * 1024:
            return f"out/ grew past the {job.limits.output_mb} MB output limit"
        return ""

    def _sample(self, run: DockerRun) -> None:
        cpu, peak = cgroup_usage(run.container_id)
        if cpu is not None:
            run.cpu_seen = max(run.cpu_seen or 0.0, cpu)
        if peak is not None:
            run.peak_bytes = max(run.peak_bytes or 0, peak)

    def _usage(self, run: DockerRun) -> dict:
        return {"cpu_s": None if run.cpu_seen is None else round(max(0.0, run.cpu_seen - run.cpu_at_go), 3),
                "peak_rss_mb": None if run.peak_bytes is None else round(run.peak_bytes / 2**20, 1)}

    def _stop(self, run: DockerRun, outcome: Outcome | None) -> None:
        """Kill the whole container unless it exited (deadline, output bound, cancel);
        then read what only the engine knows: killed for memory, the exit code."""
        docker = docker_sdk()
        import requests
        container = run.container
        if outcome is None or outcome.exit_code is None:
            try:
                container.kill()
            except docker.errors.APIError:
                pass   # it exited on its own in the meantime
            try:
                container.wait(timeout=KILL_WAIT_S)
            except requests.exceptions.RequestException:
                raise SandboxError(f"sandbox {container.short_id} survives SIGKILL") from None
        if outcome is None:
            return
        state = self.client.api.inspect_container(container.id)["State"]
        outcome.oom_killed = bool(state.get("OOMKilled")) and not outcome.timed_out
        if outcome.exit_code is None and not (outcome.timed_out or outcome.failure
                                              or outcome.stopped):
            outcome.exit_code = _exit_code({"StatusCode": state.get("ExitCode")})

    def _logs(self, run: DockerRun) -> tuple[bytes, bytes]:
        return _tail(run.container, stdout=True), _tail(run.container, stdout=False)

    def _release(self, run: DockerRun) -> None:
        _remove(run.container)


def _hand_out_dir(jobdir: Path, user: tuple[int, int]) -> None:
    """Give the sandbox user `out/`, the one place in the job dir it may write."""
    if sabotaged("user"):   # TEST ONLY: it runs as root then (docker_profile._sabotage)
        user = (0, 0)
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
        docker = docker_sdk()
        try:
            self.container.reload()
        except docker.errors.APIError:
            return False
        return self.container.status == "running"

    def is_ready(self) -> bool:
        try:   # lstat: a regular file the harness made, never followed
            return stat.S_ISREG(os.lstat(self.jobdir / OUT_DIR / READY_FILE).st_mode)
        except OSError:
            return False

    def destroy(self) -> None:
        _remove(self.container)
        cleanup(self.jobdir)


def spawn_warm_container(key: tuple, *, client, spec: "ContainerSpec") -> WarmContainer:
    """The warm pool's `spawn`: create and start one warm container of profile `key`
    in an empty job directory."""
    docker = docker_sdk()
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
    docker = docker_sdk()
    try:
        data = container.logs(stdout=stdout, stderr=not stdout, tail=LOG_TAIL_LINES)
    except docker.errors.APIError:
        return b""
    return data[-LOG_TAIL_BYTES:]
