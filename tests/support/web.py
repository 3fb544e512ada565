"""The web view for tests: the real `selfprog-cli serve` in a process of its own, and a
real headless Chromium (Debian's package, scripts/browser.sh) driven by Playwright."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from tests.support.env import missing

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
# No network beyond the page under test, no first-run or background chatter, a fresh
# profile each time (Playwright's own browser downloads are never used).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log_path = proc, url, log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of a GET, errors included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@contextlib.contextmanager
def serve(database_url: str, *, token: str = "", host: str = "127.0.0.1",
          broker_url: str = "", log_dir: Path | None = None) -> Iterator[Server]:
    """`selfprog-cli serve` on a free port until the block ends."""
    port = free_port()
    log = Path(tempfile.mkdtemp(dir=log_dir)) / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SELFPROG_WEB_TOKEN": token,
           "SELFPROG_BROKER_URL": broker_url}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--database-url",
                                 database_url, "serve", "--host", host, "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {server.log()[-2000:]}")
            try:
                if get(server.url + "/static/app.css")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer in 60 s: {server.log()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser() -> Iterator:
    """A Playwright browser context on Debian's headless Chromium, fresh profile."""
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is missing (make browser: scripts/browser.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="selfprog-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": 1280, "height": 900})
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def watch_console(page) -> list[str]:
    """Every console message and page error of `page` (CSP refusals show up here)."""
    seen: list[str] = []
    page.on("console", lambda m: seen.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: seen.append(f"pageerror: {e}"))
    return seen


def assert_not_blank(png: bytes, where: str) -> None:
    """A screenshot shows something: its pixels vary (a blank or one-colour page does not)."""
    from PIL import Image, ImageStat
    image = Image.open(io.BytesIO(png)).convert("L")
    variance = ImageStat.Stat(image).var[0]
    assert variance > 100, f"{where}: the screenshot is blank (pixel variance {variance:.1f})"
