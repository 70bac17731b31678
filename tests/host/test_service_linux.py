"""The host service with a Linux guest: ``serve``, ``vm define`` the small Debian-built
guest with a shell, ``vm start``, ``vm console`` through a pipe (type a command, see its
output, detach with Ctrl-]), ``vm stop``, ``vm list``. Minutes on a nested host."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.test_linux_boot import SMALL_BOOT_TIMEOUT, _guest
from tests.host.cli import ENV, start_service, stop_service, vm
from tests.host.test_cli import rows

pytestmark = pytest.mark.e2e


def test_a_linux_guest_through_serve_define_start_console_and_stop(state_dir: Path) -> None:
    small = _guest("small")
    service = start_service(state_dir)
    console = None
    try:
        defined = vm(state_dir, "define", "small", "--kernel", str(small / "vmlinux"), "--initrd",
                     str(small / "initramfs.cpio"), "--memory", "256M", "--append", "trivmm.shell")  # fmt: skip
        assert defined.returncode == 0, defined.stderr
        assert vm(state_dir, "start", "small").stdout == "VM small started (running)\n"
        console = subprocess.Popen([sys.executable, "-m", "trivmm", "vm", "console", "small", "--state-dir",
                                    str(state_dir)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)  # fmt: skip
        assert console.stdin is not None and console.stdout is not None and console.stderr is not None
        output = bytearray()
        stdout = console.stdout

        def read() -> None:
            while chunk := stdout.read1(4096):  # type: ignore[attr-defined]
                output.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()

        def wait_for(text: bytes, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while text not in output:
                assert console is not None and console.poll() is None, bytes(output[-2000:])
                assert time.monotonic() < deadline, f"no {text!r} on the console: {bytes(output[-2000:])!r}"
                time.sleep(0.2)

        wait_for(b"/ # ", SMALL_BOOT_TIMEOUT)  # the shell's prompt (from the history, or live)
        console.stdin.write(b"echo SERVICE-$((6*7))-CONSOLE\n")
        console.stdin.flush()
        wait_for(b"SERVICE-42-CONSOLE", 120)  # the shell evaluated what we typed
        console.stdin.write(b"\x1d")  # Ctrl-]: detach, the VM runs on
        console.stdin.flush()
        assert console.wait(30) == 0
        reader.join(10)
        assert console.stderr.read().decode().endswith("Detached from VM small\n")
        assert rows(vm(state_dir, "list").stdout)["small"][0] == "running"
        stopped = vm(state_dir, "stop", "small", "--timeout", "5")  # the small kernel has no ACPI: forced
        assert stopped.returncode == 0 and stopped.stdout.startswith("VM small stopped ("), stopped
        assert rows(vm(state_dir, "list").stdout)["small"][0] == "stopped"
        log = (state_dir / "vms" / "small" / "console.log").read_bytes()
        assert b"SERVICE-42-CONSOLE" in log  # kept on disk too
    finally:
        if console is not None and console.poll() is None:
            console.kill()
        assert stop_service(service) == 0
