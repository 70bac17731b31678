"""Helpers of the CLI tests: ``python -m trivmm serve`` in the background, ``vm`` verbs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def start_service(state_dir: Path, *, listen: str = "none", timeout: float = 60) -> subprocess.Popen[str]:
    """``serve`` on ``state_dir``, once it has said where its control socket is."""
    process = subprocess.Popen([sys.executable, "-m", "trivmm", "serve", "--state-dir", str(state_dir),
                                "--listen", listen], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)  # fmt: skip
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("trivmm: control socket "):
            if listen != "none":
                lines.append(process.stdout.readline())
            process.banner = "".join(lines)  # type: ignore[attr-defined]
            return process
    process.kill()
    raise AssertionError(f"the service did not start: {''.join(lines)}{process.stdout.read()}")


def stop_service(process: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def vm(state_dir: Path, *args: str, cwd: Path | None = None, input: bytes | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``python -m trivmm vm ARGS --state-dir STATE_DIR``."""
    result = subprocess.run([sys.executable, "-m", "trivmm", "vm", *args, "--state-dir", str(state_dir)], env=ENV,
                            cwd=cwd, input=input, capture_output=True, timeout=timeout)  # fmt: skip
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))  # fmt: skip
