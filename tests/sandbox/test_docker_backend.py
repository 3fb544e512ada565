"""The Docker sandbox backend against a real engine and the real sandbox image.

The hardening is checked twice: by `docker inspect` of a live sandbox (what the engine
was told) and by behaviour (what a candidate can actually do). Candidates here are run
with the policy gate bypassed (`backend.execute` directly), so the container itself is
what is tested. A probe candidate reports what it saw by raising
`RuntimeError("PROBE {json}")`; the harness turns that into an `invalid` result whose
reason carries the JSON back.

Without an engine or the image these tests skip with the reason; with
SELFPROG_REQUIRE_DOCKER=1 (CI) they fail instead. Set up the engine and image with
scripts/ci-docker.sh. The refusal tests of the profile function and the GPU
DeviceRequest tests need no engine: there is no GPU inside Docker on the build machines,
so for GPUs only the request that would be sent is checked.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")

from sandbox.backends import staging                                     # noqa: E402
from sandbox.backends.docker import (DockerBackend, create_hardened_container,  # noqa: E402
                                     docker_available, reap_orphans)
from sandbox.backends.docker_profile import (ALLOWED_ENV, LABEL_JOB, LABEL_OWNER,  # noqa: E402
                                             HardeningError, check_profile,
                                             gpu_device_requests, hardened_config)
from sandbox.schema import Job, Limits                                    # noqa: E402
from tests.support.docker import IMAGE, OWNER, SANDBOX_UID, require_runtime  # noqa: E402


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["runc", "runsc"])
def backend(request, client, tmp_path):
    """The backend with the engine's default runtime, and again with gVisor (runsc)."""
    runtime = None
    if request.param == "runsc":
        require_runtime(client, "runsc")   # skips, or fails where runsc must be there
        runtime = "runsc"
    b = DockerBackend(image=IMAGE, workroot=tmp_path / "work", client=client, owner=OWNER,
                      runtime=runtime)
    yield b
    # Whatever the test did, no container of ours may be left, and no job directory.
    left = client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={OWNER}"})
    assert not left, f"containers left behind: {[c.name for c in left]}"
    assert not any((tmp_path / "work").iterdir()), "job directories left behind"


def _job(source: str, *, kind: str = "evaluate", limits: Limits | None = None,
         **params) -> Job:
    return Job(job_id=f"t-{uuid.uuid4().hex[:12]}", kind=kind, source=source,
               model_kind="cnn", params=params,
               limits=limits or Limits(timeout_s=120, memory_mb=2048)).validate()


def _probe(backend, body: str, tmp_path: Path, limits: Limits | None = None) -> dict:
    """Run `body` as a candidate; it fills `report` (a dict). Returns the report."""
    source = "report = {}\n" + body + "\nimport json\nraise RuntimeError('PROBE ' + json.dumps(report))\n"
    result = backend.execute(_job(source, limits=limits), tmp_path / "out")
    assert result.status == "invalid" and "PROBE " in result.reason, (result.status, result.reason,
                                                                       result.logs)
    text = result.reason.split("PROBE ", 1)[1]
    return json.loads(text[:text.rindex("}") + 1])


def _ours(client, job_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"})


# --------------------------------------------------------------------------- inspect a live sandbox

@pytest.mark.docker
def test_live_sandbox_has_the_hardened_profile(backend, client, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFPROG_TEST_HOST_SECRET", "do-not-leak")
    job = _job("import time\ntime.sleep(60)\n",
               limits=Limits(timeout_s=120, memory_mb=1536, cpus=0.5, pids=77))
    results = []
    runner = threading.Thread(target=lambda: results.append(backend.execute(job, tmp_path / "out")))
    runner.start()
    try:
        attrs = None
        for _ in range(600):
            found = _ours(client, job.job_id)
            if found:
                attrs = client.api.inspect_container(found[0].id)
                if attrs["State"]["Running"]:
                    break
            time.sleep(0.1)
        assert attrs and attrs["State"]["Running"], "the sandbox never ran"
        hc, cfg = attrs["HostConfig"], attrs["Config"]
        assert hc["NetworkMode"] == "none"
        assert hc["ReadonlyRootfs"] is True
        assert hc["CapDrop"] in (["ALL"], ["CAP_ALL"]) and not hc["CapAdd"]
        assert any(s.startswith("no-new-privileges") for s in hc["SecurityOpt"])
        assert not hc["Privileged"]
        assert cfg["User"] == f"{SANDBOX_UID}:{SANDBOX_UID}"
        assert hc["Memory"] == hc["MemorySwap"] == 1536 * 1024 * 1024
        assert hc["PidsLimit"] == 77
        assert hc["NanoCpus"] == 500_000_000
        assert hc["Init"] is True
        assert hc["LogConfig"]["Type"] == "json-file" and hc["LogConfig"]["Config"]["max-size"]
        assert cfg["Labels"]["selfprog.sandbox"] == "1"
        assert cfg["Labels"][LABEL_JOB] == job.job_id
        assert cfg["Labels"][LABEL_OWNER] == OWNER
        assert cfg["WorkingDir"] == "/job"
        mounts = {m["Target"]: m for m in hc["Mounts"]}
        assert set(mounts) == {"/job", "/job/out"}
        assert mounts["/job"]["ReadOnly"] is True and not mounts["/job/out"].get("ReadOnly")
        assert set(hc["Tmpfs"]) == {"/job/tmp", "/tmp"}
        assert not hc.get("Binds") and not hc.get("Devices")
        env_names = {e.split("=", 1)[0] for e in cfg["Env"]}
        assert "SELFPROG_TEST_HOST_SECRET" not in env_names
        assert env_names <= ALLOWED_ENV | {"PATH", "HOSTNAME"}, env_names
        assert hc["Runtime"] == (backend.runtime or "runc")
        if backend.runtime is None:
            # The process really is the unprivileged uid, as the host kernel sees it.
            # (Under gVisor the host sees the sentry, not the sandbox's processes; the
            # uid is checked from inside by test_root_filesystem_and_inputs_are_read_only.)
            top = client.api.top(attrs["Id"], ps_args="-o pid,uid,comm")
            uids = {int(row[1]) for row in top["Processes"]}
            assert uids == {SANDBOX_UID}, top
    finally:
        for c in _ours(client, job.job_id):
            c.kill()
        runner.join(timeout=120)
    assert results and results[0].status == "crashed"   # killed from outside: signal 9
    assert not _ours(client, job.job_id)


# --------------------------------------------------------------------------- behaviour

@pytest.mark.docker
def test_no_network_not_even_to_the_host(backend, tmp_path):
    # A server on this host, on every interface: the sandbox must reach none of them.
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    addresses = {"127.0.0.1"}
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))   # no packet is sent; this only picks a route
        addresses.add(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, peer = server.accept()
                accepted.append(peer)
                conn.close()
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        report = _probe(backend, f"""
import socket
for host in {sorted(addresses)!r}:
    try:
        socket.create_connection((host, {port}), timeout=3).close()
        report[host] = "connected"
    except OSError as e:
        report[host] = type(e).__name__
try:
    report["dns"] = str(socket.getaddrinfo("pypi.org", 443)[0][4])
except OSError as e:
    report["dns"] = "failed: " + type(e).__name__
report["ifaces"] = [n for _, n in socket.if_nameindex()]
""", tmp_path)
    finally:
        stop.set()
        t.join()
        server.close()
    assert not accepted, f"the sandbox reached the host server: {accepted}"
    for host in addresses:
        assert report[host] != "connected", report
    assert report["dns"].startswith("failed"), report
    assert report["ifaces"] == ["lo"], report


@pytest.mark.docker
def test_root_filesystem_and_inputs_are_read_only(backend, tmp_path):
    report = _probe(backend, """
import os
for path in ("/etc/selfprog-owned", "/opt/venv/owned", "/job/owned", "/job/in/owned",
             "/job/lib/sandbox/harness.py", "/job/job.json", "/job/out/ok", "/job/tmp/ok",
             "/tmp/ok"):
    try:
        with open(path, "a") as f:
            f.write("x")
        report[path] = "written"
    except OSError as e:
        report[path] = type(e).__name__
report["uid"] = os.getuid()
""", tmp_path)
    for path in ("/etc/selfprog-owned", "/opt/venv/owned", "/job/owned", "/job/in/owned",
                 "/job/lib/sandbox/harness.py", "/job/job.json"):
        assert report[path] != "written", (path, report)
    for path in ("/job/out/ok", "/job/tmp/ok", "/tmp/ok"):   # the writable places
        assert report[path] == "written", (path, report)
    assert report["uid"] == SANDBOX_UID


@pytest.mark.docker
def test_memory_limit_kills(backend, tmp_path):
    # Touch every page (b"\\x01" * n), so the memory is really used, not just reserved.
    source = "chunks = []\nwhile True:\n    chunks.append(b'\\x01' * (64 * 1024 * 1024))\n"
    result = backend.execute(_job(source, limits=Limits(timeout_s=120, memory_mb=768)),
                             tmp_path / "out")
    assert result.status == "oom", (result.status, result.reason, result.logs)


@pytest.mark.docker
def test_pids_limit_holds_against_a_fork_bomb(backend, client, tmp_path):
    body = """
import os, time
report["forked"] = 0
for i in range(500):
    try:
        pid = os.fork()
    except OSError as e:
        report["error"] = type(e).__name__
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    report["forked"] += 1
"""
    if backend.runtime is None:
        # runc: the kernel's pids cgroup refuses the 48th task; the candidate sees EAGAIN.
        report = _probe(backend, body, tmp_path,
                        limits=Limits(timeout_s=120, memory_mb=2048, pids=48))
        assert report.get("error"), report
        assert report["forked"] < 48, report
    else:
        # gVisor: the pids cgroup bounds the sentry's host threads, not the sandbox's
        # own tasks (the sentry alone needs dozens, hence 128). The bomb exhausts them
        # and the whole sandbox dies: contained, recorded as crashed, nothing left.
        source = "report = {}\n" + body + "\nraise RuntimeError('PROBE ' + str(report))\n"
        job = _job(source, limits=Limits(timeout_s=120, memory_mb=2048, pids=128))
        result = backend.execute(job, tmp_path / "out")
        assert result.status == "crashed" or (
            result.status == "invalid" and "error" in result.reason), result
        assert not _ours(client, job.job_id)


@pytest.mark.docker
def test_deadline_kills_a_process_that_ignores_sigterm(backend, client, tmp_path):
    source = ("import signal\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "while True:\n    pass\n")
    job = _job(source, limits=Limits(timeout_s=8, memory_mb=2048))
    result = backend.execute(job, tmp_path / "out")
    assert result.status == "timeout", (result.status, result.reason)
    assert not _ours(client, job.job_id), "the container outlived its deadline"


@pytest.mark.docker
def test_output_directory_is_bounded(backend, tmp_path):
    # One file over the limit: RLIMIT_FSIZE stops the write itself (EFBIG). The file is
    # removed at once, but if the backend's watch sees the 2 MB already written first,
    # it kills the run instead; either way the write never succeeds.
    source = ("import os\n"
              "try:\n"
              "    with open('/job/out/big.safetensors', 'wb') as f:\n"
              "        f.write(b'\\0' * (3 * 1024 * 1024))\n"
              "    outcome = 'written'\n"
              "except OSError as e:\n"
              "    os.unlink('/job/out/big.safetensors')\n"
              "    outcome = 'refused ' + type(e).__name__\n"
              "raise RuntimeError(outcome)\n")
    result = backend.execute(_job(source, limits=Limits(timeout_s=60, memory_mb=2048, output_mb=2)),
                             tmp_path / "out")
    assert (result.status == "invalid" and "refused" in result.reason) or (
        result.status == "crashed" and "output limit" in result.reason), result
    # Many files under the per-file limit: the backend's watch kills the container.
    source = ("import os, time\n"
              "for i in range(8):\n"
              "    with open(f'/job/out/f{i}', 'wb') as f:\n"
              "        f.write(os.urandom(1024 * 1024))\n"
              "time.sleep(60)\n")
    result = backend.execute(_job(source, limits=Limits(timeout_s=60, memory_mb=2048, output_mb=2)),
                             tmp_path / "out")
    assert result.status == "crashed" and "output limit" in result.reason, result


@pytest.mark.docker
def test_container_is_removed_whatever_happens(backend, client, tmp_path):
    cases = {
        "raises": "raise ValueError('candidate bug')\n",
        "exits 0 early": "import os\nos._exit(0)\n",
        "killed by a signal": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    }
    expected = {"raises": "invalid", "exits 0 early": "crashed", "killed by a signal": "crashed"}
    for name, source in cases.items():
        job = _job(source)
        result = backend.execute(job, tmp_path / "out")
        assert result.status == expected[name], (name, result.status, result.reason)
        assert not _ours(client, job.job_id), name


@pytest.mark.docker
def test_orphans_are_reaped_by_owner(client, tmp_path):
    import subprocess

    # A process that has exited: the "worker" whose containers are orphans.
    dead = subprocess.Popen(["true"])
    dead.wait()
    workroot = tmp_path / "work"
    made = {}
    for name, owner, pid in (("dead", OWNER + "-a", dead.pid),        # a dead process of a
                             ("sibling", OWNER + "-a", os.getpid()),  # live process, same host
                             ("other", OWNER + "-b", dead.pid)):      # another worker's
        job = _job("pass\n")
        jobdir = staging.stage(job, workroot)
        c = create_hardened_container(client, image=IMAGE, jobdir=jobdir, workroot=workroot,
                                      job_id=job.job_id, owner=owner, owner_pid=pid,
                                      user=(SANDBOX_UID, SANDBOX_UID), memory_mb=256, cpus=0.5,
                                      pids=16, output_mb=1, command=["sleep", "300"])
        c.start()
        made[name] = c
    try:
        # A worker (re)starting as OWNER-a removes what its dead process left behind...
        DockerBackend(image=IMAGE, workroot=workroot, client=client, owner=OWNER + "-a")
        with pytest.raises(docker.errors.NotFound):
            made["dead"].reload()
        # ...but not the running job of a live process of the same worker, nor another
        # worker's containers.
        for name in ("sibling", "other"):
            made[name].reload()
            assert made[name].status == "running", name
        assert reap_orphans(client, owner=OWNER + "-b") == 1
        assert reap_orphans(client, owner=OWNER + "-a") == 1   # no keep_live_owners: all
    finally:
        for c in made.values():
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass


@pytest.mark.docker
def test_tiny_evaluation_through_the_real_harness(backend, tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    data = tmp_path / "data.safetensors"
    save_file({"train_x": x[:64].contiguous(), "train_y": y[:64].contiguous(),
               "eval_x": x[64:].contiguous()}, str(data))
    save_file({"eval_y": y[64:].contiguous()}, str(tmp_path / "labels.safetensors"))
    source = (
        "import torch\n"
        "from torch import nn\n\n"
        "def build_model(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))\n\n"
        "def train(model):\n"
        "    return torch.optim.SGD(model.parameters(), lr=0.1), 16\n"
    )
    job = Job(job_id=f"t-{uuid.uuid4().hex[:12]}", kind="evaluate", source=source,
              model_kind="cnn", inputs={"data": str(data)},
              params={"score": "accuracy", "num_classes": 2, "input_shape": [1, 8, 8],
                      "epochs": 2, "seed": 0},
              limits=Limits(timeout_s=120, memory_mb=2048),
              labels=str(tmp_path / "labels.safetensors")).validate()
    result = backend.execute(job, tmp_path / "out")
    assert result.status == "ok", (result.reason, result.logs)
    assert result.score is not None and math.isfinite(result.score) and 0 <= result.score <= 1
    assert len(result.losses) == 8 and all(math.isfinite(v) for v in result.losses)
    assert result.param_count == 64 * 16 + 16 + 16 * 2 + 2
    print(f"container start-to-exit for a tiny evaluation: {result.duration_s:.2f} s")


@pytest.mark.docker
def test_docker_available_names_what_is_missing(client):
    assert docker_available(IMAGE)[0]
    ok, why = docker_available("selfprog-no-such-image:never")
    assert not ok and "missing" in why


# --------------------------------------------------------------------------- the profile function
# These need no engine: the refusals happen before anything is sent to it.

@pytest.fixture
def staged(tmp_path):
    job = _job("pass\n")
    workroot = tmp_path / "work"
    jobdir = staging.stage(job, workroot)
    spec = dict(image=IMAGE, jobdir=jobdir, workroot=workroot, job_id=job.job_id, owner=OWNER,
                user=(SANDBOX_UID, SANDBOX_UID), memory_mb=512, cpus=1.0, pids=64, output_mb=8)
    return spec


@pytest.mark.parametrize("extra", [
    {"privileged": True},
    {"cap_add": ["SYS_ADMIN"]},
    {"network_mode": "host"},
    {"pid_mode": "host"},
    {"ipc_mode": "host"},
    {"userns_mode": "host"},
    {"volumes": {"/": {"bind": "/host", "mode": "rw"}}},
    {"mounts": [{"Target": "/host", "Source": "/", "Type": "bind"}]},
    {"devices": ["/dev/kmsg:/dev/kmsg"]},
    {"security_opt": ["seccomp=unconfined"]},
    {"read_only": False},
    {"oom_kill_disable": True},
])
def test_profile_refuses_anything_outside_it(staged, extra):
    class NoEngine:   # any call to the engine would be a failure of the refusal
        def __getattr__(self, name):
            raise AssertionError(f"the engine was called ({name}) for a refused container")
    with pytest.raises(HardeningError):
        create_hardened_container(NoEngine(), **staged, **extra)


def test_profile_refuses_bad_values(staged, tmp_path):
    bad = [
        dict(jobdir=Path("/etc")),                       # a host directory, not a job dir
        dict(jobdir=staged["workroot"]),                 # the workroot itself
        dict(user=(0, 0)),
        dict(env={"SELFPROG_DATABASE_URL": "postgresql://..."}),
        dict(runtime="runsc --debug"),
        dict(device_requests=[docker.types.DeviceRequest(count=1, capabilities=[["compute", "utility"]])]),
    ]
    for change in bad:
        with pytest.raises(HardeningError):
            hardened_config(**{**staged, **change})
    link = tmp_path / "work" / "link"
    link.symlink_to(staged["jobdir"])
    with pytest.raises(HardeningError):
        hardened_config(**{**staged, "jobdir": link})


def test_profile_as_built(staged):
    cfg = hardened_config(**staged)
    assert cfg["network_mode"] == "none" and cfg["read_only"] and cfg["init"]
    assert cfg["cap_drop"] == ["ALL"] and cfg["security_opt"] == ["no-new-privileges:true"]
    assert cfg["mem_limit"] == cfg["memswap_limit"] == "512m"
    assert not cfg["privileged"] and "device_requests" not in cfg and "runtime" not in cfg
    assert hardened_config(**staged, runtime="runsc")["runtime"] == "runsc"
    # check_profile catches an engine that dropped part of the profile
    attrs = {"HostConfig": {"NetworkMode": "host", "Privileged": True, "CapDrop": [],
                            "ReadonlyRootfs": False, "Mounts": []},
             "Config": {"User": ""}}
    problems = " ".join(check_profile(attrs, cfg))
    for word in ("NetworkMode", "privileged", "CapDrop", "read-only", "User", "mounts"):
        assert word in problems


def test_gpu_device_requests():
    # No GPU inside Docker here: this checks the request that would be sent to the engine.
    assert gpu_device_requests("", 1) == [] and gpu_device_requests("all", 0) == []
    (every,) = gpu_device_requests("all", 1)
    assert every["Count"] == -1 and every["Capabilities"] == [["gpu"]]
    assert [r["DeviceIDs"] for r in (gpu_device_requests("0,1", 1, slot=s)[0] for s in range(3))] \
        == [["0"], ["1"], ["0"]]
    assert gpu_device_requests("0,1,2,3", 2, slot=2)[0]["DeviceIDs"] == ["2", "3"]
    assert gpu_device_requests("0", 4)[0]["DeviceIDs"] == ["0"]   # never more than the worker has
    with pytest.raises(Exception):
        gpu_device_requests("0;rm -rf /", 1)


def test_gpu_requests_reach_the_container_config(staged):
    cfg = hardened_config(**staged, device_requests=gpu_device_requests("1", 1))
    (req,) = cfg["device_requests"]
    assert req["DeviceIDs"] == ["1"] and req["Capabilities"] == [["gpu"]]
    assert "devices" not in cfg


@pytest.mark.docker
def test_make_backend_docker_and_auto(client, tmp_path, caplog):
    from sandbox.backends import make_backend
    from sandbox.backends.process import ProcessBackend

    # Settings for either backend may be passed; each takes what it knows.
    kw = dict(workroot=tmp_path / "work", owner=OWNER, allow_unconfined=True)
    assert isinstance(make_backend("docker", image=IMAGE, **kw), DockerBackend)
    assert isinstance(make_backend("auto", image=IMAGE, **kw), DockerBackend)
    with caplog.at_level("WARNING"):
        fallback = make_backend("auto", image="selfprog-no-such-image:never", **kw)
    assert isinstance(fallback, ProcessBackend)
    assert "WEAKER" in caplog.text


# --------------------------------------------------------------------------- compose

def test_compose_file_validates_and_keeps_the_socket_behind_the_proxy():
    import shutil
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[2]   # the repository
    compose = shutil.which("docker-compose")
    if compose is None:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER") == "1":
            pytest.fail("SELFPROG_REQUIRE_DOCKER=1 but docker-compose is not installed")
        pytest.skip("docker-compose not installed (scripts/docker-engine.sh installs it)")
    for profile in ([], ["--profile", "gpu"]):
        proc = subprocess.run([compose, *profile, "config"], cwd=root, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]   # the gpu profile: every service
    for name, svc in services.items():
        mounts = " ".join(str(v) for v in svc.get("volumes", []))
        assert ("docker.sock" in mounts) == (name == "docker-proxy"), name
        env = svc.get("environment") or {}
        if "DOCKER_HOST" in env:
            assert env["DOCKER_HOST"] == "tcp://docker-proxy:2375"
            assert name in ("trainer-worker", "sandbox-worker", "trainer-worker-gpu",
                            "sandbox-worker-gpu"), name
    assert "DOCKER_HOST" not in (services["coordinator"].get("environment") or {})
    for name in ("coordinator", "trainer-worker", "sandbox-worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "gpu" not in (services[name].get("profiles") or [])
    for name in ("trainer-worker-gpu", "sandbox-worker-gpu"):
        assert services[name]["profiles"] == ["gpu"]
        (dev,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["capabilities"] == ["gpu"]
    assert services["redis"]["healthcheck"] and services["postgres"]["healthcheck"]
    assert services["migrate"]["command"] == ["selfprog-cli", "db", "upgrade"]
