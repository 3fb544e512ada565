"""Candidate sources and sandbox jobs shared by the sandbox, attack and service tests.

Each helper here is a small, real candidate (a T5 or CNN module) or a check that runs a
job through some sandbox and asserts what the sandbox must prevent.
"""
from __future__ import annotations

import os
import socket
import textwrap
import threading
from pathlib import Path

from pipeline.families import transformer
from sandbox.backends.process_tree import processes as _processes
from sandbox.schema import Job, Limits


TINY = transformer.render(transformer.Design(1, 1, 64, 2, d_model=16, lr=1e-3, batch_size=8))


def make_job(source: str, data_file: Path, kind: str = "evaluate", job_id: str = "t", **limits) -> Job:
    lim = {"timeout_s": 60, "memory_mb": 1024, "pids": 64, "output_mb": 64, **limits}
    return Job(job_id=job_id, kind=kind, source=source, inputs={"data": str(data_file)},
               params={"vocab_size": 64, "epochs": 1, "num_threads": 1},
               limits=Limits(**lim)).validate()


def candidate(body: str, build: str) -> str:
    """A T5-family module whose build_model does something hostile first."""
    return textwrap.dedent(body) + "\n" + TINY.replace(
        "def build_model(vocab_size):\n",
        "def build_model(vocab_size):\n" + textwrap.indent(textwrap.dedent(build), "    "))


def uid_processes(uid: int) -> list[int]:
    return [pid for pid, u in _processes() if u == uid]


# Ignores SIGTERM/SIGINT, loops forever and leaves a double-forked escapee in its own
# session: the deadline must still end it all (used by the warm-sandbox tests too).
DEADLINE_DODGER = candidate("import os, signal\n", """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            while True:
                pass
        os._exit(0)
    while True:
        pass
    """)


def check_loopback_server_unreachable(run, data_file) -> None:
    """`run(job)` executes a job in some sandbox; its candidate must not reach a server
    listening on the host's loopback."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(20)

    def serve():
        try:
            conn, _ = server.accept()
            accepted.append(conn)
        except OSError:
            pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    src = candidate("import socket\n", f"""
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
        except OSError as e:
            raise RuntimeError(f"BLOCKED {{type(e).__name__}}: {{e}}")
        raise RuntimeError("CONNECTED")
        """)
    try:
        result = run(make_job(src, data_file))
    finally:
        server.close()
        t.join(5)
    assert result.status == "invalid", result
    assert "BLOCKED" in result.reason and "CONNECTED" not in result.reason
    assert not accepted


def check_planted_secret_unreadable(run, data_file, tmp_path) -> None:
    """`run(job)` executes a job in some sandbox; a 0600 host file must stay unreadable
    (to the job uid: PermissionError) or absent (in a filesystem sandbox: FileNotFoundError)."""
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    os.chmod(secret_dir, 0o755)
    secret = secret_dir / "token"
    secret.write_text("s3cr3t-value")
    os.chmod(secret, 0o600)
    src = candidate("", f"""
        try:
            leaked = open({str(secret)!r}).read()
        except OSError as e:
            raise RuntimeError(f"DENIED {{type(e).__name__}}")
        raise RuntimeError("LEAKED " + leaked)
        """)
    result = run(make_job(src, data_file))
    assert result.status == "invalid", result
    assert any(f"DENIED {e}" in result.reason for e in ("PermissionError", "FileNotFoundError")), \
        result.reason
    assert "s3cr3t" not in result.reason + result.logs


def cnn_source(prelude: str, body: str, tail: str = "") -> str:
    """A CNN-family candidate whose build_model runs `body` first."""
    return (textwrap.dedent(prelude).strip() + "\nimport torch\nfrom torch import nn\n\n\n"
            "def build_model(input_shape, num_classes):\n"
            + textwrap.indent("\n".join(textwrap.dedent(piece).strip("\n")
                                         for piece in body.split("\x01")).strip() + "\n", "    ")
            + "    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))\n\n\n"
            "def train(model):\n    return torch.optim.SGD(model.parameters(), lr=0.1), 8\n"
            + textwrap.dedent(tail))
