"""What the browser tests share: Debian's chromium driven by Playwright, and the real host
service (``python -m trivmm serve``) in a subprocess on a free port with its own state dir."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx

from tests.conftest import prerequisite_missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
DOCS_IMAGES = Path(__file__).parents[2] / "docs" / "images"
SCREENSHOTS_VARIABLE = "TRIVMM_DOCS_SCREENSHOTS"  # =1: the screenshots also go to docs/images
SERVICE_START_TIMEOUT = 60.0
_URL = re.compile(r"web console (http://\S+) ")

# the text of xterm.js's buffer, every line (window.trivmm.term is the VM page's terminal)
XTERM_TEXT = """() => {
  const buffer = window.trivmm.term.buffer.active;
  const lines = [];
  for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
  return lines.join("\\n");
}"""

# noVNC's canvas: its size, how many pixels are not black, and the pixels asked for
CANVAS = """(points) => {
  const canvas = document.querySelector("#screen canvas");
  if (!canvas || canvas.width === 0) return null;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let lit = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] | data[i + 1] | data[i + 2]) lit++;
  const at = (x, y) => (y * canvas.width + x) * 4;
  const pixels = points.map(([x, y]) => Array.from(data.slice(at(x, y), at(x, y) + 3)));
  return {width: canvas.width, height: canvas.height, lit, pixels};
}"""


def chromium_executable() -> str:
    """Debian's chromium, installed through apt when missing; Playwright for Python importable."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        prerequisite_missing("playwright", "Playwright for Python is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        from trivmm.guest.build import ensure_debian_packages

        try:
            ensure_debian_packages(["chromium"])
        except Exception as exc:  # no root, no apt, no network: the test cannot run here
            prerequisite_missing("chromium", f"Debian's chromium is not installed and installing it failed: {exc}")
    return CHROMIUM


def save_screenshot(page: Any, directory: Path, name: str, *, docs: bool = True, **options: Any) -> Path:
    """``page`` (or an element: ``options['element']``) as ``directory/name``; also as
    docs/images/name when TRIVMM_DOCS_SCREENSHOTS=1 (and ``docs``)."""
    target = options.pop("element", page)
    path = directory / name
    target.screenshot(path=str(path), **options)
    if docs and os.environ.get(SCREENSHOTS_VARIABLE) == "1":
        DOCS_IMAGES.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS_IMAGES / name)
    return path


@attrs.define(eq=False)
class Service:
    """``python -m trivmm serve`` on 127.0.0.1, any free port, state in ``state_dir``."""

    state_dir: Path
    process: subprocess.Popen[bytes]
    url: str
    output: list[str]

    @property
    def token(self) -> str:
        return (self.state_dir / "web-token").read_text().strip()

    @property
    def origin(self) -> str:
        return self.url.rstrip("/")

    @contextlib.contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """An httpx client logged in with the token, with the Origin and CSRF headers set."""
        with httpx.Client(base_url=self.url, timeout=60) as client:
            yield self._log_in(client)

    def _log_in(self, client: httpx.Client) -> httpx.Client:
        response = client.post("/login", data={"token": self.token}, headers={"origin": self.origin})
        assert response.status_code == 303, response.text
        csrf = client.get("/api/session").json()["csrf"]
        client.headers.update({"origin": self.origin, "x-csrf-token": csrf})
        return client

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_service(state_dir: Path) -> Service:
    process = subprocess.Popen([sys.executable, "-m", "trivmm", "serve", "--state-dir", str(state_dir),
                                "--listen", "127.0.0.1:0"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            output.append(line)
            if _URL.search(line):
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + SERVICE_START_TIMEOUT
    while not found.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"the service did not print its web console URL: {''.join(output)}")
    match = next(m for m in map(_URL.search, output) if m)
    return Service(state_dir, process, match.group(1), output)


@contextlib.contextmanager
def service_running(state_dir: Path) -> Iterator[Service]:
    """The service for a ``with`` block; stopped with SIGINT after it (exit status checked)."""
    service = start_service(state_dir)
    try:
        yield service
    finally:
        rc = service.stop()
        assert rc in (0, 130, -signal.SIGINT), ("the service's exit status", rc, "".join(service.output)[-3000:])
