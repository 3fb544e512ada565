"""Fixtures shared by the attack suite: both real backends, planted host resources.

The backends are the real ones (a root process backend; the Docker backend on the real
engine and image). Docker params skip when there is no engine or image, and fail
instead under SELFPROG_REQUIRE_DOCKER=1 (the `client` fixture of test_docker_backend).
Every planted resource is made here, owned by root, so that an attack's success or
failure is decided by what this side observes.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.support.docker import IMAGE, OWNER, require_runtime
from tests.support.env import require_root

BACKENDS = ("process", "docker")


def pytest_configure(config):
    config.addinivalue_line("markers", "deny: a confinement (deny) test: switching off a "
                                       "property it names (tests/support/sabotage.py) must "
                                       "make it fail")
    config.addinivalue_line("markers", "sabotage_control: normal behaviour that must still "
                                       "pass under SELFPROG_SABOTAGE=1")


@pytest.fixture(scope="module")
def docker_backend(client):   # noqa: F811  (test_docker_backend's skip/fail policy)
    from sandbox.backends.docker import DockerBackend, reap_orphans
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-attacks-docker-"))
    b = DockerBackend(image=IMAGE, workroot=workroot, client=client, owner=OWNER + "-attacks")
    yield b
    reap_orphans(client, owner=OWNER + "-attacks")
    shutil.rmtree(workroot, ignore_errors=True)


@pytest.fixture(scope="module")
def gvisor_backend(client):   # noqa: F811
    """The Docker backend with gVisor (runsc): skips only where the engine lacks runsc
    (tests/support/docker.py require_runtime says when that fails instead)."""
    from sandbox.backends.docker import DockerBackend, reap_orphans
    require_runtime(client, "runsc")
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-attacks-gvisor-"))
    b = DockerBackend(image=IMAGE, workroot=workroot, client=client, runtime="runsc",
                      owner=OWNER + "-attacks-gvisor")
    yield b
    reap_orphans(client, owner=OWNER + "-attacks-gvisor")
    shutil.rmtree(workroot, ignore_errors=True)


@pytest.fixture(scope="module")
def docker_warm_backend(client):   # noqa: F811
    """A Docker backend with one pre-warmed container (prewarm=1)."""
    from sandbox.backends.docker import DockerBackend, reap_orphans
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-attacks-docker-warm-"))
    b = DockerBackend(image=IMAGE, workroot=workroot, client=client, prewarm=1,
                      owner=OWNER + "-attacks-warm")
    yield b
    b.close()
    reap_orphans(client, owner=OWNER + "-attacks-warm")
    shutil.rmtree(workroot, ignore_errors=True)


@pytest.fixture(scope="module")
def process_warm_backend():
    """A confined ProcessBackend with one pre-warmed sandbox (prewarm=1)."""
    require_root("the confined process backend")
    from sandbox.backends.process import ProcessBackend
    workroot = Path(tempfile.mkdtemp(prefix="selfprog-attacks-process-warm-"))
    os.chmod(workroot, 0o711)
    b = ProcessBackend(workroot=workroot / "jobs", prewarm=1)
    b.probe()
    yield b
    b.close()
    shutil.rmtree(workroot, ignore_errors=True)


@pytest.fixture
def sandbox(request):
    """The backend named by the test's `backend_name` parameter."""
    return request.getfixturevalue(f"{request.getfixturevalue('backend_name')}_backend")


@dataclass
class Host:
    """What the attacks aim at, planted on this host by root."""
    dir: Path                 # 0755 root
    secret: Path              # 0600 root, holds `token`
    token: str
    lineage_db: Path          # a real lineage DB (LineageStore makes it 0600)
    victim: Path              # 0644 root: must never change
    nowrite: Path             # 0755 root dir: nothing may appear in it
    public: Path              # 0644 root, holds `token`, in a 0755 dir under /var/tmp
    service_pid: int = field(default_factory=os.getpid)


@pytest.fixture(scope="session")
def host():
    d = Path(tempfile.mkdtemp(prefix="selfprog-attack-host-"))
    os.chmod(d, 0o755)
    token = "tok-" + secrets.token_hex(12)
    secret = d / "secret.txt"
    secret.write_text(token)
    os.chmod(secret, 0o600)
    from pipeline.store import LineageStore
    db = d / "lineage.db"
    store = LineageStore(f"sqlite:///{db}", create=True)
    store.create_run(config={"note": token}, task="self", preset="quick", seed=0)
    store.close()
    victim = d / "victim.txt"
    victim.write_text("unchanged")
    os.chmod(victim, 0o644)
    nowrite = d / "nowrite"
    nowrite.mkdir(mode=0o755)
    # World-readable, outside /tmp (which a sandbox may have its own of): only a
    # filesystem sandbox keeps it from the job uid.
    pub = Path(tempfile.mkdtemp(prefix="selfprog-attack-public-", dir="/var/tmp"))
    os.chmod(pub, 0o755)
    public = pub / "public.txt"
    public.write_text(token)
    os.chmod(public, 0o644)
    yield Host(dir=d, secret=secret, token=token, lineage_db=db, victim=victim, nowrite=nowrite,
               public=public)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(pub, ignore_errors=True)


@pytest.fixture(scope="session")
def cnn_data(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    path = tmp_path_factory.mktemp("cnn") / "data.safetensors"
    # What a sandbox may see (no evaluation labels); those are in cnn_labels, beside it.
    save_file({"train_x": x[:16].contiguous(), "train_y": y[:16].contiguous(),
               "eval_x": x[16:].contiguous()}, str(path))
    save_file({"eval_y": y[16:].contiguous()}, str(path.with_name("labels.safetensors")))
    return path


@pytest.fixture(scope="session")
def cnn_labels(cnn_data) -> Path:
    """The evaluation labels of cnn_data: read by the trusted side only (Job.labels)."""
    return cnn_data.with_name("labels.safetensors")


@dataclass
class TcpServer:
    port: int
    accepted: list = field(default_factory=list)


@pytest.fixture
def tcp_server():
    """A TCP server on every interface of this host; records who connected."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    server.settimeout(0.2)
    info = TcpServer(port=server.getsockname()[1])
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, peer = server.accept()
                info.accepted.append(peer)
                conn.close()
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield info
    stop.set()
    t.join(5)
    server.close()


@pytest.fixture
def udp_server():
    """A UDP 'DNS server' on 127.0.0.1; records every datagram it receives."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    info = TcpServer(port=sock.getsockname()[1])
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
                info.accepted.append((peer, data[:64]))
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield info
    stop.set()
    t.join(5)
    sock.close()
