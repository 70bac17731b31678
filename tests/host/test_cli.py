"""``python -m trivmm serve`` and ``vm ...`` through subprocesses: the verbs, their errors
and exit statuses, a console through a pipe, and a service killed with SIGKILL."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.host.cli import ENV, start_service, stop_service, vm
from tests.host.test_manager import tiny_guest_test
from tests.kvm.guests import assemble


def rows(listing: str) -> dict[str, list[str]]:
    """``vm list``'s table: each VM's name to its other columns, split at spaces."""
    return {line.split()[0]: line.split()[1:] for line in listing.splitlines()[2:]}


def test_verbs_without_a_service_say_how_to_start_one(state_dir: Path) -> None:
    result = vm(state_dir, "list")
    assert result.returncode == 1
    assert result.stderr == (f"trivmm: no trivmm service at {state_dir}/trivmm.sock: start it with "
                             f"`python -m trivmm serve --state-dir {state_dir}`\n")  # fmt: skip


def test_bad_listen_addresses_are_bad_input(state_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trivmm", "serve", "--state-dir", str(state_dir), "--listen",
                             "nowhere"], env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "bad --listen 'nowhere'" in result.stderr


def test_definitions_listing_and_errors(state_dir: Path, tmp_path: Path) -> None:
    service = start_service(state_dir)
    try:
        assert f"control socket {state_dir}/trivmm.sock" in service.banner  # type: ignore[attr-defined]
        assert stat.S_IMODE(os.lstat(state_dir / "trivmm.sock").st_mode) == 0o600
        (tmp_path / "vmlinux").write_bytes(b"")
        result = vm(state_dir, "define", "web", "--kernel", "vmlinux", "--memory", "256M", "--autostart", cwd=tmp_path)
        assert (result.returncode, result.stdout) == (0, "VM web defined\n"), result.stderr
        info = vm(state_dir, "info", "web").stdout
        assert f"Run options: --kernel {tmp_path}/vmlinux --memory 256M" in info  # made absolute
        assert "Autostart:   yes" in info and "State:       stopped" in info
        result = vm(state_dir, "define", "bad", "--", "--vcpus", "x")
        assert result.returncode == 2
        assert result.stderr == "trivmm: bad run options: argument --vcpus: invalid int value: 'x'\n"
        assert vm(state_dir, "define", "web").returncode == 1  # taken
        result = vm(state_dir, "start", "nope")
        assert (result.returncode, result.stderr) == (2, "trivmm: no VM named 'nope' is defined\n")
        result = vm(state_dir, "stop", "web")
        assert (result.returncode, result.stderr) == (1, "trivmm: VM 'web' is not running (stopped)\n")
        listing = vm(state_dir, "list").stdout.splitlines()
        assert listing[0].split() == ["Name", "State", "vCPUs", "Memory", "Display", "Autostart", "Last", "exit"]
        assert listing[2].split() == ["web", "stopped", "1", "256", "MiB", "-", "yes", "-"]
        assert vm(state_dir, "undefine", "web").stdout == "VM web undefined\n"
        assert len(vm(state_dir, "list").stdout.splitlines()) == 2
    finally:
        assert stop_service(service) == 0
    assert not (state_dir / "trivmm.sock").exists()


@tiny_guest_test
def test_start_console_through_a_pipe_stop_and_undefine(state_dir: Path, tmp_path: Path) -> None:
    assemble("serial_counter", tmp_path)
    service = start_service(state_dir)
    try:
        assert vm(state_dir, "define", "count", "--kernel", "serial_counter.elf", "--memory", "16M",
                  cwd=tmp_path).returncode == 0  # fmt: skip
        assert vm(state_dir, "start", "count").stdout == "VM count started (running)\n"
        result = vm(state_dir, "start", "count")
        assert (result.returncode, result.stderr) == (1, "trivmm: VM 'count' is already running\n")
        console = subprocess.Popen([sys.executable, "-m", "trivmm", "vm", "console", "count", "--state-dir",
                                    str(state_dir)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)  # fmt: skip
        assert console.stdout is not None and console.stdin is not None
        output = b""
        while output.count(b"\n") < 3:
            chunk = console.stdout.read1(4096)  # type: ignore[attr-defined]
            assert chunk, console.stderr.read() if console.stderr else ""
            output += chunk
        console.stdin.write(b"\x1d")  # Ctrl-]
        console.stdin.flush()
        assert console.wait(30) == 0
        assert console.stderr is not None
        assert console.stderr.read().decode() == ("Connected to VM count (escape character is ^])\n"
                                                  "\r\nDetached from VM count\n")  # fmt: skip
        assert all(len(line) == 8 for line in output.split(b"\n")[1:3])  # the counter's lines
        assert vm(state_dir, "pause", "count").stdout == "VM count paused (paused)\n"
        assert vm(state_dir, "resume", "count").stdout == "VM count resumed (running)\n"
        snapshot = vm(state_dir, "snapshot", "count", "count.snap", cwd=tmp_path)
        assert snapshot.returncode == 0 and (tmp_path / "count.snap").stat().st_size > 16 << 20
        result = vm(state_dir, "stop", "count")  # it has no ACPI: stopped at once
        assert result.stdout == ("VM count stopped (forced off: the guest does not listen to its power button "
                                 "(no ACPI driver for it))\n")  # fmt: skip
        assert rows(vm(state_dir, "list").stdout)["count"][0] == "stopped"
        events = vm(state_dir, "events", "count").stdout
        assert "state running    started" in events and "snapshot running" in events
        assert vm(state_dir, "undefine", "count").returncode == 0
    finally:
        assert stop_service(service) == 0


@tiny_guest_test
def test_a_service_killed_with_sigkill_keeps_its_definitions(state_dir: Path, tmp_path: Path) -> None:
    assemble("serial_counter", tmp_path)
    service = start_service(state_dir)
    try:
        assert vm(state_dir, "define", "count", "--kernel", "serial_counter.elf", "--memory", "16M",
                  cwd=tmp_path).returncode == 0  # fmt: skip
        assert vm(state_dir, "define", "auto", "--autostart", "--kernel", "serial_counter.elf", "--memory", "16M",
                  cwd=tmp_path).returncode == 0  # fmt: skip
        assert vm(state_dir, "start", "count").returncode == 0
    finally:
        assert stop_service(service, signal.SIGKILL) == -signal.SIGKILL
    assert vm(state_dir, "list").returncode == 1  # nobody there: the socket file is stale
    service = start_service(state_dir)
    try:
        deadline = time.monotonic() + 30
        while rows(listing := vm(state_dir, "list").stdout).get("auto", [""])[0] != "running":
            assert time.monotonic() < deadline, listing
            time.sleep(0.2)
        assert rows(listing)["count"] == ["stopped", "1", "16", "MiB", "-", "no", "service", "restarted"]
        assert "service restarted" in vm(state_dir, "events", "count").stdout
        assert vm(state_dir, "start", "count").returncode == 0
    finally:
        assert stop_service(service) == 0  # SIGTERM: the VMs are stopped, the service ends
    service = start_service(state_dir)
    try:
        assert rows(vm(state_dir, "list").stdout)["count"] == ["stopped", "1", "16", "MiB", "-", "no", "service",
                                                               "stopped"]  # fmt: skip
    finally:
        assert stop_service(service) == 0


@pytest.mark.kvm
def test_two_services_cannot_share_a_state_directory(state_dir: Path) -> None:
    service = start_service(state_dir)
    try:
        second = subprocess.run([sys.executable, "-m", "trivmm", "serve", "--state-dir", str(state_dir), "--listen",
                                 "none"], env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert second.returncode == 1
        assert second.stderr == f"trivmm: another trivmm service uses the state directory {state_dir}\n"
        assert vm(state_dir, "list").returncode == 0  # the first one still serves
    finally:
        assert stop_service(service) == 0


def test_the_service_prints_the_web_consoles_address_and_token_file(state_dir: Path) -> None:
    pytest.importorskip("trivmm.host.web")
    service = start_service(state_dir, listen="127.0.0.1:0")
    try:
        banner = service.banner  # type: ignore[attr-defined]
        assert re.search(rf"^trivmm: web console http://127\.0\.0\.1:[1-9]\d*/ \(login token in "
                         rf"{re.escape(str(state_dir))}/web-token\)$", banner, re.MULTILINE), banner  # fmt: skip
    finally:
        assert stop_service(service) == 0


@tiny_guest_test
def test_the_console_on_a_terminal_is_raw_and_ctrl_close_bracket_detaches(state_dir: Path, tmp_path: Path) -> None:
    assemble("serial_counter", tmp_path)
    service = start_service(state_dir)
    controller, terminal = pty.openpty()
    try:
        assert vm(state_dir, "define", "count", "--kernel", str(tmp_path / "serial_counter.elf"), "--memory",
                  "16M").returncode == 0  # fmt: skip
        assert vm(state_dir, "start", "count").returncode == 0
        saved = termios.tcgetattr(terminal)
        console = subprocess.Popen([sys.executable, "-m", "trivmm", "vm", "console", "count", "--state-dir",
                                    str(state_dir)], env=ENV, stdin=terminal, stdout=terminal,
                                   stderr=subprocess.PIPE)  # fmt: skip
        output = b""
        deadline = time.monotonic() + 30
        while output.count(b"\n") < 5:
            assert time.monotonic() < deadline, output
            readable, _, _ = select.select([controller], [], [], 1)
            if readable:
                output += os.read(controller, 4096)
        assert not termios.tcgetattr(terminal)[3] & termios.ICANON  # raw while attached
        os.write(controller, b"\x1d")
        assert console.wait(30) == 0
        assert console.stderr is not None and b"Detached from VM count" in console.stderr.read()
        assert termios.tcgetattr(terminal) == saved  # the terminal's mode is given back
        assert rows(vm(state_dir, "list").stdout)["count"][0] == "running"
    finally:
        os.close(controller)
        os.close(terminal)
        assert stop_service(service) == 0
