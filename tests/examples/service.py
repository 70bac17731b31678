"""An example service (examples/*_service.py) in a subprocess, for the tests to call over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"asyncio": ROOT / "examples" / "asyncio_service.py", "trio": ROOT / "examples" / "trio_service.py"}
START_TIMEOUT = 60.0  # seconds from the process start to a healthy /healthz
_LISTENING = re.compile(r"listening on (http://\S+)")


class Service:
    """``examples/<kind>_service.py --port 0 ARGS`` with stdout and stderr in files under
    ``directory`` (a pipe could fill up and stall the service), healthy once constructed."""

    def __init__(self, kind: str, directory: Path, *args: str) -> None:
        self.kind = kind
        self.stdout = directory / f"{kind}-service.out"
        self.stderr = directory / f"{kind}-service.err"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(SCRIPTS[kind]), "--port", "0", *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)  # fmt: skip
        try:
            self.url = self._wait_until_healthy()
        except BaseException:
            self.kill()
            raise
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _wait_until_healthy(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the {self.kind} service exited with {self.proc.returncode}:\n{self.log}")
            if url is None:
                found = _LISTENING.search(self.stdout.read_text(errors="replace"))
                url = found and found[1]
            if url is not None:
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"the {self.kind} service was not healthy within {START_TIMEOUT} s:\n{self.log}")

    @property
    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        response = self.client.get("/healthz")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def run(self, body: object, **kwargs: Any) -> httpx.Response:
        return self.client.post("/run", json=body, **kwargs)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``signum``; return the exit status (failing if it takes over ``timeout`` s)."""
        self.client.close()
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the {self.kind} service did not exit within {timeout} s of "
                                 f"{signal.Signals(signum).name}:\n{self.log}") from None  # fmt: skip

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
