"""The small Debian-built kernel on trivmm's display, seen and typed into by a real VNC client.

One boot of ``python -m trivmm run --display 800x600 --vnc unix:PATH`` with the small kernel
(efifb on the framebuffer screen_info announces, fbcon on it, the VT keyboard on atkbd) and
/init's ``trivmm.vtshell`` (a shell on tty1):

* the guest writes a marker to tty1; vncdotool's ``vncdo`` captures the screen and
  tesseract (Debian's ``tesseract-ocr``, installed here) reads the marker off it;
* ``vncdo`` types a command (with Shift for ``$``, ``(``, ``*``, ``)`` and ``>``) that the
  shell on tty1 runs: its output appears on the serial console, and the typed line on the
  screen;
* ``exit`` typed the same way ends the shell, and /init powers the VM off.

The screenshots are kept under the test's tmp dir, and copied to ``$TRIVMM_ARTIFACTS`` when
that is set. vncdo runs as a process of its own: vncdotool's Twisted reactor starts once per
process, and tests/kvm/test_display.py stops the one in pytest's.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import prerequisite_missing
from tests.e2e.test_linux_boot import SMALL_BOOT_TIMEOUT, _guest
from trivmm.guest.build import GuestBuildError, ensure_debian_packages

pytestmark = pytest.mark.e2e
WIDTH, HEIGHT = 800, 600
SCREEN_MARKER = "TRIVMM-SCREEN-OK"
VTSHELL_MARKER = "TRIVMM-VTSHELL-READY"
# Run by /init (trivmm.cmd) before the VT shell: a clear screen, then the marker at its top.
SCREEN_SCRIPT = f"printf '\\033[H\\033[J' >/dev/tty1; echo {SCREEN_MARKER} >/dev/tty1\n"
SHELL_BANNER = "Enter 'help' for a list of built-in commands."  # busybox ash's, before its first prompt
TYPED_COMMAND = "echo VNC-TYPED-$((6*7)) > /dev/ttyS0"
TYPED_OUTPUT = "VNC-TYPED-42"
FBCON_OPTIONS = ("CONFIG_FB_EFI=y", "CONFIG_FRAMEBUFFER_CONSOLE=y", "CONFIG_VT=y")
OCR_SCORE = 0.85  # the share of the marker's letters OCR must find on one line, in order
# The boot to the VT shell: ~320 s with the host at load 6, 570 s at load 9 (busybox's links
# and fbcon's first drawing on top of the small kernel's boot).
DISPLAY_BOOT_TIMEOUT = 2 * SMALL_BOOT_TIMEOUT
OCR_DEADLINE = 120.0  # seconds for the marker to appear on a screenshot (fbcon draws at emulated CPL0)
TYPED_DEADLINE = 120.0


def _tesseract() -> str:
    try:
        ensure_debian_packages(["tesseract-ocr", "tesseract-ocr-eng"])
    except GuestBuildError as exc:
        prerequisite_missing("tesseract", f"cannot install Debian's tesseract-ocr: {exc}")
    path = shutil.which("tesseract")
    if path is None:
        prerequisite_missing("tesseract", "tesseract-ocr installed but no tesseract on PATH")
    return path


def ocr(tesseract: str, screenshot: Path) -> str:
    """What tesseract reads on ``screenshot``: fbcon's light-on-black text, cropped to what
    is drawn, inverted to dark on white and scaled 3x (its 8x16 glyphs are small for OCR)."""
    from PIL import Image, ImageOps

    image = Image.open(screenshot).convert("L")
    box = image.getbbox()
    if box is None:
        return ""
    left, top, right, bottom = box
    image = image.crop((max(left - 8, 0), max(top - 8, 0), min(right + 8, WIDTH), min(bottom + 8, HEIGHT)))
    image = ImageOps.invert(image).resize((image.width * 3, image.height * 3), Image.Resampling.LANCZOS)
    scaled = screenshot.with_name(screenshot.stem + "-ocr.png")
    image.save(scaled)
    result = subprocess.run([tesseract, str(scaled), "stdout", "--psm", "6"], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def best_line_match(text: str, wanted: str) -> tuple[float, str]:
    """The line of ``text`` that holds most of ``wanted`` (case aside), and the share of
    ``wanted``'s characters it holds, in order (difflib's matching blocks)."""
    best = (0.0, "")
    for line in text.splitlines():
        matcher = difflib.SequenceMatcher(None, line.upper(), wanted.upper(), autojunk=False)
        found = sum(block.size for block in matcher.get_matching_blocks()) / len(wanted)
        best = max(best, (found, line.strip()))
    return best


def vncdo(socket_path: Path, *actions: str, timeout: float = 60) -> None:
    """One vncdo session (a connection of its own): ``actions`` as on its command line."""
    argv = [sys.executable, "-m", "vncdotool.command", "-s", str(socket_path), "--force-caps",
            "-t", str(int(timeout)), *actions]  # fmt: skip
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 30)
    assert result.returncode == 0, (argv, result.stdout, result.stderr)


class SerialConsole:
    """The guest's serial console (trivmm's stdout), read on a thread and kept."""

    def __init__(self, stream: IO[bytes], log: Path) -> None:
        self._stream = stream
        self._log = log
        self._data = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with self._log.open("ab") as log:
            while chunk := os.read(self._stream.fileno(), 65536):
                with self._lock:
                    self._data.extend(chunk)
                log.write(chunk)
                log.flush()

    @property
    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float, process: subprocess.Popen[bytes]) -> float:
        """Seconds until ``pattern`` (a regex) appeared; fails when trivmm exits first or at ``timeout``."""
        started = time.monotonic()
        while not re.search(pattern, self.text):
            tail = self.text[-3000:]
            assert process.poll() is None, f"trivmm exited ({process.returncode}) before {pattern!r}:\n{tail}"
            assert time.monotonic() - started < timeout, f"no {pattern!r} in {timeout} s:\n{tail}"
            time.sleep(0.2)
        return time.monotonic() - started


def keep_artifact(path: Path) -> None:
    target = os.environ.get("TRIVMM_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_small_kernel_draws_fbcon_and_a_vnc_client_reads_and_types_into_it(tmp_path: Path) -> None:
    from PIL import Image

    small = _guest("small")
    config = (small / "config").read_text() if (small / "config").exists() else ""
    missing = [option for option in FBCON_OPTIONS if option not in config.splitlines()]
    if missing:
        prerequisite_missing("guests", f"the small guest lacks {', '.join(missing)} (built before display "
                                       "support): run `python -m trivmm guest build --small-only`")  # fmt: skip
    tesseract = _tesseract()
    socket_path = tmp_path / "vnc.sock"
    command = base64.urlsafe_b64encode(SCREEN_SCRIPT.encode()).decode().rstrip("=")
    argv = [sys.executable, "-m", "trivmm", "run", "--kernel", str(small / "vmlinux"),
            "--initrd", str(small / "initramfs.cpio"), "--display", f"{WIDTH}x{HEIGHT}",
            "--vnc", f"unix:{socket_path}",
            # quiet: fbcon draws each glyph at emulated CPL0 here; a scrolling boot log is minutes
            "--append", f"quiet trivmm.cmd={command} trivmm.vtshell"]  # fmt: skip
    started = time.monotonic()
    stderr_path = tmp_path / "trivmm.stderr"
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file)
    assert process.stdout is not None
    serial = SerialConsole(process.stdout, tmp_path / "console.log")
    screen = tmp_path / "display-linux-fbcon.png"
    typed = tmp_path / "display-linux-typed.png"
    try:
        serial.wait_for(VTSHELL_MARKER, DISPLAY_BOOT_TIMEOUT, process)
        boot_seconds = time.monotonic() - started
        assert "TRIVMM-CMD-END rc=0" in serial.text, serial.text[-3000:]
        # The marker on the screen, read by OCR, and the shell's banner under it (keys typed before the shell
        # reads them would be echoed by the tty first): fbcon may still be drawing, so try until both are there.
        deadline = time.monotonic() + OCR_DEADLINE
        while True:
            vncdo(socket_path, "capture", str(screen))
            text = ocr(tesseract, screen)
            score, line = best_line_match(text, SCREEN_MARKER)
            shell_ready = best_line_match(text, SHELL_BANNER)[0] >= OCR_SCORE
            if (score >= OCR_SCORE and shell_ready) or time.monotonic() > deadline:
                break
            time.sleep(2)
        keep_artifact(screen)
        print(f"boot to the VT shell with the display: {boot_seconds:.1f} s; OCR read {text!r}")
        shot = Image.open(screen).convert("RGB")
        assert shot.size == (WIDTH, HEIGHT)
        assert shot.getbbox() is not None and len(shot.getcolors(1 << 16) or ()) >= 2, "a blank screen"
        # OCR of fbcon's 8x16 glyphs is near exact: a letter misread (tesseract reads its V as U) still
        # passes, a screen without the line does not.
        assert score >= OCR_SCORE, f"OCR read {text!r} (best line {line!r}, {score:.2f})"
        # Typed through VNC: the VT shell runs it, its output goes to the serial port.
        for start in range(0, len(TYPED_COMMAND), 8):  # a few keys at a time: the guest reads each byte at an IRQ
            vncdo(socket_path, "type", TYPED_COMMAND[start : start + 8], "pause", "0.5")
        vncdo(socket_path, "key", "enter")
        typed_seconds = serial.wait_for(re.escape(TYPED_OUTPUT), TYPED_DEADLINE, process)
        assert "VNC-TYPED-$" not in serial.text  # the shell's arithmetic ran: the command was typed whole
        vncdo(socket_path, "pause", "1", "capture", str(typed))
        keep_artifact(typed)
        typed_text = ocr(tesseract, typed)
        print(f"typed command's output on serial after {typed_seconds:.1f} s; OCR then read {typed_text!r}")
        after = Image.open(typed).convert("RGB")
        below_marker = (0, 16, WIDTH, HEIGHT)
        assert after.crop(below_marker) != shot.crop(below_marker), "the typed line is not on the screen"
        assert best_line_match(typed_text, TYPED_COMMAND)[0] >= 0.8, typed_text  # OCR misreads $, v, 0 at times
        # exit: /init goes on and powers the VM off.
        vncdo(socket_path, "type", "exit", "key", "enter")
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        print(serial.text[-3000:])
    stderr = stderr_path.read_text(errors="replace")
    assert process.returncode == 0, stderr
    assert f"VNC server on unix:{socket_path}" in stderr
    assert not socket_path.exists()
