"""HostManager with the tiny guests: definitions, the life of a VM, consoles, events,
serialised operations, a display's VNC socket, and what a restarted service finds."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from tests.kvm.guests import assemble
from trivmm.host import HostManager, InvalidDefinition, UnknownVm, VmState, VmStateConflict
from trivmm.host.store import Store

F = TypeVar("F", bound=Callable[..., Any])


def tiny_guest_test(test: F) -> F:
    """A test that runs tiny guests: it needs /dev/kvm and GNU binutils."""
    return pytest.mark.kvm(pytest.mark.usefixtures("binutils")(test))  # type: ignore[no-any-return]


async def until_state(manager: HostManager, name: str, *states: VmState, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while manager.info(name).state not in states:
            await anyio.sleep(0.02)


async def test_definitions_are_checked_with_runs_parser_and_listed(state_dir: Path) -> None:
    async with HostManager.open(state_dir) as manager:
        summary = await manager.define("web-1", ["--memory", "256M", "--vcpus", "2", "--display", "640x480"],
                                       autostart=False)  # fmt: skip
        assert (summary.state, summary.memory, summary.vcpus, summary.display) == (VmState.STOPPED, 256 << 20, 2,
                                                                                   (640, 480))  # fmt: skip
        await manager.define("a-builtin", [])
        assert [s.name for s in manager.list()] == ["a-builtin", "web-1"]
        with pytest.raises(InvalidDefinition, match="unrecognized arguments: --bogus"):
            await manager.define("bad", ["--bogus"])
        with pytest.raises(InvalidDefinition, match="argument --vcpus: invalid int value"):
            await manager.define("bad", ["--vcpus", "many"])
        with pytest.raises(InvalidDefinition, match="--vnc is not for a VM of the host service"):
            await manager.define("bad", ["--display", "64x48", "--vnc", "unix:/tmp/x.sock"])
        with pytest.raises(InvalidDefinition, match="memory"):  # VmConfig's own checks
            await manager.define("bad", ["--memory", "1K"])
        with pytest.raises(InvalidDefinition, match="bad VM name"):
            await manager.define("../etc", [])
        with pytest.raises(VmStateConflict, match="already defined"):
            await manager.define("web-1", [])
        with pytest.raises(UnknownVm, match="no VM named 'nope'"):
            manager.info("nope")
        with pytest.raises(UnknownVm):
            await manager.start("nope")
        with pytest.raises(VmStateConflict, match="not running"):
            await manager.stop("web-1")
        assert "bad" not in [s.name for s in manager.list()]
        await manager.undefine("a-builtin")
        assert [s.name for s in manager.list()] == ["web-1"]
    assert (state_dir / "trivmm.db").exists() and stat.S_IMODE(state_dir.stat().st_mode) == 0o700


@pytest.mark.kvm
async def test_the_builtin_guest_runs_to_its_power_off(state_dir: Path) -> None:
    async with HostManager.open(state_dir) as manager:
        await manager.define("hello", [])
        async with manager.subscribe() as events:
            await manager.start("hello")
            await until_state(manager, "hello", VmState.STOPPED)
            seen = []
            with anyio.move_on_after(1):
                async for event in events:
                    seen.append((event.kind, event.state, event.detail))
                    if event.state is VmState.STOPPED:
                        break
        assert seen == [("state", VmState.STARTING, ""), ("state", VmState.RUNNING, "started"),
                        ("state", VmState.STOPPED, "the guest powered off")]  # fmt: skip
        assert manager.info("hello").last_exit == "powered off"
        assert manager.console_log("hello").read_bytes().startswith(b"Hello from the trivmm built-in guest!")
        await manager.start("hello")  # a stopped VM starts again
        await until_state(manager, "hello", VmState.STOPPED)
        assert [e.state for e in manager.events("hello")].count(VmState.RUNNING) == 2


@tiny_guest_test
async def test_a_running_vm_pauses_resumes_snapshots_and_stops(state_dir: Path, tmp_path: Path) -> None:
    counter = assemble("serial_counter", tmp_path)
    async with HostManager.open(state_dir) as manager:
        await manager.define("count", ["--kernel", str(counter), "--memory", "16M"])
        summary = await manager.start("count")
        assert summary.state is VmState.RUNNING
        with pytest.raises(VmStateConflict, match="already running"):
            await manager.start("count")
        with pytest.raises(VmStateConflict, match="stop it before undefining"):
            await manager.undefine("count")
        async with manager.console("count") as console:
            lines = b""
            with anyio.fail_after(20):
                while lines.count(b"\n") < 3:
                    lines += await console.receive()
        assert lines.split(b"\n")[1].isalnum()
        assert (await manager.pause("count")).state is VmState.PAUSED
        with pytest.raises(VmStateConflict, match="is paused: it cannot be paused"):
            await manager.pause("count")
        await anyio.sleep(0.2)
        size = manager.console_log("count").stat().st_size
        await anyio.sleep(0.5)
        assert manager.console_log("count").stat().st_size == size  # paused: no output
        await manager.snapshot("count", tmp_path / "count.snap")
        assert (tmp_path / "count.snap").stat().st_size > 16 << 20 and manager.info("count").state is VmState.PAUSED
        assert (await manager.resume("count")).state is VmState.RUNNING
        started = time.monotonic()
        summary = await manager.stop("count", timeout=30)  # no ACPI: nothing to wait for, forced at once
        assert time.monotonic() - started < 10
        assert summary.state is VmState.STOPPED
        assert summary.last_exit == "forced off: the guest does not listen to its power button (no ACPI driver for it)"
        with pytest.raises(VmStateConflict, match="start it to attach"):
            async with manager.console("count"):
                pass
        await manager.undefine("count")
        assert not (state_dir / "vms" / "count").exists()


@tiny_guest_test
async def test_a_graceful_stop_presses_the_power_button(state_dir: Path, tmp_path: Path) -> None:
    elf = assemble("power_button", tmp_path)
    async with HostManager.open(state_dir) as manager:
        await manager.define("button", ["--kernel", str(elf), "--memory", "16M"])
        await manager.start("button")
        await anyio.sleep(0.5)  # the guest enables its button
        summary = await manager.stop("button", timeout=30)
        assert (summary.state, summary.last_exit) == (VmState.STOPPED, "powered off")
        assert [e.detail for e in manager.events("button")][-2:] == ["power button pressed", "the guest powered off"]


@tiny_guest_test
async def test_a_guest_that_listens_but_ignores_its_power_button_is_forced_after_the_timeout(
        state_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    elf = assemble("power_button", tmp_path, symbols={"ignore": 1})
    async with HostManager.open(state_dir) as manager:
        await manager.define("deaf", ["--kernel", str(elf), "--memory", "16M"])
        await manager.start("deaf")
        await anyio.sleep(0.5)  # the guest enables its button
        started = time.monotonic()
        summary = await manager.stop("deaf", timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 10
        assert summary.last_exit == "forced off: the guest did not power off within 1 s of its power button"


@tiny_guest_test
async def test_console_input_reaches_the_guest_and_a_panic_is_a_crash(state_dir: Path, tmp_path: Path) -> None:
    echo, panic = assemble("serial_echo", tmp_path), assemble("panic", tmp_path)
    async with HostManager.open(state_dir) as manager:
        await manager.define("echo", ["--kernel", str(echo), "--memory", "16M"])
        await manager.define("panic", ["--kernel", str(panic), "--memory", "16M"])
        await manager.start("echo")
        async with manager.console("echo") as console:
            await console.send(b"hi\n")  # serial_echo powers off after a newline
            with anyio.fail_after(20), pytest.raises(anyio.EndOfStream):
                while True:
                    await console.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await console.send(b"more")
        await until_state(manager, "echo", VmState.STOPPED)
        assert manager.info("echo").last_exit == "powered off"
        await manager.start("panic")
        await until_state(manager, "panic", VmState.CRASHED)
        assert manager.info("panic").last_exit == "guest panicked"
        await manager.start("panic")  # a crashed VM can start again
        await until_state(manager, "panic", VmState.CRASHED)


@tiny_guest_test
async def test_concurrent_starts_and_stops_of_one_vm_are_serialised(state_dir: Path, tmp_path: Path) -> None:
    counter = assemble("serial_counter", tmp_path)
    async with HostManager.open(state_dir) as manager:
        await manager.define("count", ["--kernel", str(counter), "--memory", "16M"])
        outcomes: list[str] = []

        async def attempt(operation: str) -> None:
            try:
                if operation == "start":
                    await manager.start("count")
                else:
                    await manager.stop("count", force=operation == "force")
                outcomes.append(operation)
            except VmStateConflict:
                outcomes.append("conflict")

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(attempt, "start")
        assert sorted(outcomes) == ["conflict"] * 3 + ["start"]  # exactly one start
        outcomes.clear()
        async with anyio.create_task_group() as tg:
            for operation in ("stop", "start", "force", "start", "stop", "start"):
                tg.start_soon(attempt, operation)
        final = manager.info("count").state
        assert final in (VmState.RUNNING, VmState.STOPPED)
        # the recorded states alternate as a VM's life does: no start while running, no stop twice
        states = [e.state for e in manager.events("count", limit=1000) if e.kind == "state"]
        life = [s for s in states if s in (VmState.RUNNING, VmState.STOPPED)]
        assert all(a != b for a, b in itertools.pairwise(life)), states
        if final is VmState.RUNNING:
            await manager.stop("count", force=True)
        assert manager.info("count").state is VmState.STOPPED


@tiny_guest_test
async def test_a_vm_with_a_display_has_a_vnc_socket_while_it_runs(state_dir: Path, tmp_path: Path) -> None:
    elf = assemble("display", tmp_path, symbols={"width": 64, "height": 48, "busy": 0})
    async with HostManager.open(state_dir) as manager:
        await manager.define("screen", ["--kernel", str(elf), "--memory", "16M", "--display", "64x48"])
        assert manager.display_socket("screen") is None
        await manager.start("screen")
        path = manager.display_socket("screen")
        assert path == state_dir / "vms" / "screen" / "vnc.sock"
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        stream = await anyio.connect_unix(path)
        async with stream:
            with anyio.fail_after(10):
                assert await stream.receive(12) == b"RFB 003.008\n"
        await manager.stop("screen", force=True)
        assert manager.display_socket("screen") is None and not path.exists()


@tiny_guest_test
async def test_a_restarted_service_reports_stopped_vms_and_starts_autostart_ones(state_dir: Path,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    counter = assemble("serial_counter", tmp_path)
    async with HostManager.open(state_dir) as manager:
        await manager.define("plain", ["--kernel", str(counter), "--memory", "16M"])
        await manager.define("auto", ["--kernel", str(counter), "--memory", "16M"], autostart=True)
        await manager.start("plain")
    store = Store(state_dir / "trivmm.db")  # as a service killed with its VM running leaves it
    assert store.vm("plain").state is VmState.STOPPED and store.vm("plain").last_exit == "service stopped"
    store.set_state("plain", VmState.RUNNING, "started")
    store.close()
    async with HostManager.open(state_dir) as manager:
        assert manager.info("plain").state is VmState.STOPPED
        assert manager.info("plain").last_exit == "service restarted"
        assert manager.events("plain")[-1].detail == "service restarted"
        await until_state(manager, "auto", VmState.RUNNING)


@tiny_guest_test
def test_the_manager_works_under_asyncio(state_dir: Path, tmp_path: Path) -> None:
    counter = assemble("serial_counter", tmp_path)

    async def main() -> list[VmState]:
        async with HostManager.open(state_dir) as manager:
            await manager.define("count", ["--kernel", str(counter), "--memory", "16M"])
            states = [(await manager.start("count")).state, (await manager.pause("count")).state,
                      (await manager.resume("count")).state]  # fmt: skip
            states.append((await manager.reset("count")).state)
            states.append((await manager.stop("count", force=True)).state)
            return states

    assert asyncio.run(main()) == [VmState.RUNNING, VmState.PAUSED, VmState.RUNNING, VmState.RUNNING,
                                   VmState.STOPPED]  # fmt: skip


@pytest.mark.kvm
async def test_a_vm_whose_kernel_is_gone_fails_to_start_with_the_reason(state_dir: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not a kernel")
    async with HostManager.open(state_dir) as manager:
        await manager.define("broken", ["--kernel", str(kernel)])
        from trivmm.host import HostError

        with pytest.raises(HostError, match="VM 'broken' could not start"):
            await manager.start("broken")
        assert manager.info("broken").state is VmState.CRASHED
        assert manager.info("broken").last_exit.startswith("error: ")  # type: ignore[union-attr]
        await manager.undefine("broken")



async def test_a_state_directory_others_may_write_is_refused(state_dir: Path) -> None:
    """A pre-made state directory (e.g. /tmp/vms) others can write could hold their
    web-token or definitions: the manager and the service refuse it and write nothing."""
    from trivmm.errors import ConfigError
    from trivmm.host import HostError
    from trivmm.host.service import serve

    state_dir.mkdir(mode=0o700)
    state_dir.chmod(0o777)
    with pytest.raises(HostError, match=r"can be written by others \(mode 777\): chmod 700"):
        async with HostManager.open(state_dir):
            pass
    with pytest.raises(ConfigError, match="can be written by others"):  # exit status 2
        await serve(state_dir, None)
    assert os.listdir(state_dir) == []
    state_dir.chmod(0o700)
    async with HostManager.open(state_dir) as manager:
        assert manager.list() == []


async def test_a_kernel_or_disk_that_is_no_file_is_refused_at_start(state_dir: Path, tmp_path: Path) -> None:
    """A FIFO kernel used to wedge the start in its shielded build thread (a forced stop and
    the service's own shutdown then waited for ever); /dev/zero would be read for ever."""
    fifo = tmp_path / "kernel.fifo"
    os.mkfifo(fifo)
    with anyio.fail_after(10):
        async with HostManager.open(state_dir) as manager:
            await manager.define("fifo", ["--kernel", str(fifo)])
            await manager.define("zero", ["--initrd", "/dev/zero"])
            await manager.define("disk", ["--disk", str(fifo)])
            for name, what in (("fifo", f"kernel {fifo} is not a regular file"),
                               ("zero", "initrd /dev/zero is not a regular file"),
                               ("disk", f"disk {fifo} is not a file or block device")):  # fmt: skip
                with pytest.raises(InvalidDefinition, match=f"VM '{name}' could not start: the {what}"):
                    await manager.start(name)
                assert manager.info(name).state is VmState.CRASHED


@pytest.mark.kvm
async def test_a_database_that_cannot_record_a_stop_loses_the_record_not_the_service(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A SQLite error (a full disk) while a VM's end is recorded used to escape its task
    into the manager's task group: every VM and the service ended with it."""
    import sqlite3

    async with HostManager.open(state_dir) as manager:
        await manager.define("hello", [])
        record = manager.store.set_state

        def disk_full(name: str, state: VmState, *args: Any, **kwargs: Any) -> Any:
            if state is VmState.STOPPED:
                raise sqlite3.OperationalError("database or disk is full")
            return record(name, state, *args, **kwargs)

        monkeypatch.setattr(manager.store, "set_state", disk_full)
        async with manager.subscribe() as events:
            await manager.start("hello")
            await until_state(manager, "hello", VmState.STOPPED)
            with anyio.fail_after(5):
                async for event in events:
                    if event.state is VmState.STOPPED:
                        break
        assert manager.info("hello").last_exit == "powered off"
        await manager.start("hello")  # the service goes on
        await until_state(manager, "hello", VmState.STOPPED)
