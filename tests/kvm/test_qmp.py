"""The QMP control socket on a running VM (trivmm/qmp, docs/qmp.md): QEMU's own client
library, ``qemu.qmp``, stops, continues and quits a guest that counts at CPL3 (the counter
at 0x4000 stops and moves again); SHUTDOWN says who ended the guest (a client's reset, the
guest's power-off or panic, the host); every client gets the
events, a client that leaves mid-command harms nothing; ``run --api-sock`` serves it from
the CLI. Under trio (the client on a worker thread's asyncio loop: qemu.qmp is asyncio
only) and asyncio (the client in the VM's own loop). Input that is malformed, too large,
or sent by too many clients is tested without a VM in tests/unit/test_qmp_protocol.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from qemu.qmp import QMPClient

import trivmm
from tests.kvm.guests import assemble
from tests.unit.test_qmp_protocol import RawClient
from trivmm import StopReason, VmConfig
from trivmm.qmp import QmpServer

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
COUNTER = 0x4000  # cpl3_loop.S increments it for ever
T = TypeVar("T")


async def on_asyncio(backend: str, client: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio client (qemu.qmp) beside the VM: in this loop under asyncio, on a
    worker thread's own asyncio loop under trio."""
    if backend == "asyncio":
        return await client()
    return await anyio.to_thread.run_sync(lambda: asyncio.run(client()))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await anyio.sleep(0.005)  # on either loop (anyio), the client's asyncio one included


async def next_event(qmp: QMPClient) -> dict[str, Any]:
    event = await asyncio.wait_for(qmp.events.get(), 10)
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    return dict(event)


async def disconnect(qmp: QMPClient) -> None:
    """qemu.qmp re-raises the server's end of stream after ``quit`` (as QEMU closes the
    socket then too; qemu.machine ignores it the same way)."""
    with contextlib.suppress(EOFError):
        await qmp.disconnect()


async def stop_continue_quit(path: str, counter: Callable[[], int]) -> list[str]:
    """What a management tool does with a guest, through qemu.qmp; returns the events seen."""
    qmp = QMPClient("trivmm-test")
    await qmp.connect(path)  # greeting, then qmp_capabilities
    seen = []
    try:
        assert qmp.greeting is not None and qmp.greeting.QMP.capabilities == []
        assert await qmp.execute("query-status") == {"status": "running", "running": True, "singlestep": False}
        await until(lambda: counter() > 1000)

        assert await qmp.execute("stop") == {}
        seen.append((await next_event(qmp))["event"])
        assert await qmp.execute("query-status") == {"status": "paused", "running": False, "singlestep": False}
        frozen = counter()
        await asyncio.sleep(0.2)
        assert counter() == frozen, "the guest ran while paused"
        assert await qmp.execute("stop") == {}  # already paused: nothing happens, no event

        assert await qmp.execute("cont") == {}
        seen.append((await next_event(qmp))["event"])
        await until(lambda: counter() > frozen + 1000)
        assert (await qmp.execute("query-status"))["running"] is True

        assert await qmp.execute("quit") == {}
        shutdown = await next_event(qmp)
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        seen.append(shutdown["event"])
    finally:
        await disconnect(qmp)
    return seen


@BACKENDS
def test_qemu_qmp_stops_continues_and_quits_a_guest(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)
    path = tmp_path / "qmp.sock"

    async def main() -> None:
        with anyio.fail_after(60):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                memory = vm.memory
                assert memory is not None
                with QmpServer(vm, path) as server:
                    async with anyio.create_task_group() as tg:
                        await tg.start(server.serve)
                        client = functools.partial(stop_continue_quit, str(path), lambda: memory.read_u32(COUNTER))
                        events = await on_asyncio(backend, client)
                    # serve() has returned by itself: the VM ended and SHUTDOWN went out
                result = await vm.wait()
        assert events == ["STOP", "RESUME", "SHUTDOWN"]
        assert result.reason is StopReason.STOPPED
        assert not path.exists()

    anyio.run(main, backend=backend)


async def serve_beside(vm: trivmm.VM, path: Path, body: Callable[[], Awaitable[None]]) -> None:
    """``body`` with a QMP server on ``vm``; returns once the server has ended by itself."""
    with QmpServer(vm, path) as server:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            await body()


@BACKENDS
def test_shutdown_says_who_ended_the_guest(backend: str, tmp_path: Path) -> None:
    loop = assemble("cpl3_loop", tmp_path)
    echo = assemble("serial_echo", tmp_path)  # powers off after a newline on its serial port
    panic = assemble("panic", tmp_path)  # reports a kernel panic through pvpanic at once
    path = tmp_path / "qmp.sock"

    async def main() -> None:
        with anyio.fail_after(60):
            async with trivmm.open_vm(VmConfig(kernel=loop, memory="16M")) as vm:

                async def reset() -> None:
                    client = await RawClient.connect(path)
                    assert await client.execute("system_reset", id=1) == {"return": {}, "id": 1}
                    shutdown = await client.event("SHUTDOWN")
                    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
                    assert await client.closed()

                await serve_beside(vm, path, reset)
                assert (await vm.wait()).reason is StopReason.RESET  # trivmm ends a VM at a reset

            async with trivmm.open_vm(VmConfig(kernel=echo, memory="16M")) as vm:

                async def power_off() -> None:
                    client = await RawClient.connect(path)
                    assert (await client.execute("query-status"))["return"]["status"] == "running"
                    await vm.console.send(b"\n")
                    shutdown = await client.event("SHUTDOWN")
                    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
                    assert await client.closed()

                await serve_beside(vm, path, power_off)
                assert (await vm.wait()).reason is StopReason.POWER_OFF

            async with trivmm.open_vm(VmConfig(kernel=loop, memory="16M")) as vm:

                async def host_stop() -> None:
                    client = await RawClient.connect(path)
                    await vm.stop()  # the host, not the guest nor a client
                    shutdown = await client.event("SHUTDOWN")
                    assert shutdown["data"] == {"guest": False, "reason": "host-signal"}

                await serve_beside(vm, path, host_stop)

            # A server made before the VM runs: "prelaunch" until run() starts it.
            with trivmm.VM(VmConfig(kernel=panic, memory="16M")) as vm, QmpServer(vm, path) as server:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.serve)
                    client = await RawClient.connect(path)
                    assert (await client.execute("query-status"))["return"]["status"] == "prelaunch"
                    assert (await vm.run()).reason is StopReason.PANIC
                    assert (await client.event("GUEST_PANICKED"))["data"] == {"action": "poweroff"}
                    assert (await client.event("SHUTDOWN"))["data"] == {"guest": True, "reason": "guest-panic"}

    anyio.run(main, backend=backend)


@BACKENDS
def test_every_client_gets_the_events_and_one_that_leaves_mid_command_harms_nothing(
    backend: str, tmp_path: Path
) -> None:
    elf = assemble("cpl3_loop", tmp_path)
    path = tmp_path / "qmp.sock"

    async def main() -> None:
        with anyio.fail_after(60):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                memory = vm.memory
                assert memory is not None

                async def body() -> None:
                    watchers = [await RawClient.connect(path) for _ in range(12)]
                    mode = os.stat(path).st_mode
                    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

                    # Asks for a stop and is gone before the answer: the stop happens all the same.
                    leaver = await RawClient.connect(path)
                    await leaver.send_raw(b'{"execute": "stop"}\n{"execute": "query-commands"}\n')
                    await leaver.aclose()
                    for watcher in watchers:
                        assert set(await watcher.event("STOP")) == {"event", "timestamp"}
                    assert (await watchers[0].execute("query-status"))["return"]["status"] == "paused"
                    frozen = memory.read_u32(COUNTER)

                    # Garbage and an oversize message from one client: its error (and for the
                    # oversize one, its connection), nobody else's.
                    rude = await RawClient.connect(path)
                    await rude.send_raw(b"} \n")
                    assert (await rude.reply())["error"]["desc"].startswith("JSON parse error")
                    with contextlib.suppress(anyio.BrokenResourceError):  # closed before it has it all
                        await rude.send_raw(b"[" * 200 + b"]" * 200 + b'{"execute": "cont", "x": "' + b"y" * (2 << 20))
                    assert (await rude.reply())["error"]["desc"].startswith("JSON parse error, nesting deeper")
                    assert (await rude.reply())["error"]["desc"].startswith("JSON parse error, a message is longer")
                    assert await rude.closed()
                    assert memory.read_u32(COUNTER) == frozen and vm.paused

                    assert await watchers[5].execute("cont", id="go") == {"return": {}, "id": "go"}
                    for watcher in watchers:
                        await watcher.event("RESUME")
                    await until(lambda: memory.read_u32(COUNTER) > frozen + 1000)
                    assert await watchers[0].execute("quit") == {"return": {}}
                    for watcher in watchers:
                        assert (await watcher.event("SHUTDOWN"))["data"]["reason"] == "host-qmp-quit"
                        assert await watcher.closed()

                await serve_beside(vm, path, body)
                assert (await vm.wait()).reason is StopReason.STOPPED

    anyio.run(main, backend=backend)


def test_the_cli_serves_qmp_with_api_sock(tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)
    path = tmp_path / "api.sock"
    command = [sys.executable, "-m", "trivmm", "run", "--kernel", str(elf), "--memory", "16M", "--api-sock", str(path)]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        async def client() -> list[str]:
            qmp = QMPClient("trivmm-cli-test")
            await qmp.connect(str(path))
            events = []
            try:
                assert (await qmp.execute("query-status"))["status"] == "running"
                await qmp.execute("stop")
                events.append((await next_event(qmp))["event"])
                await qmp.execute("cont")
                events.append((await next_event(qmp))["event"])
                await qmp.execute("quit")
                events.append((await next_event(qmp))["event"])
            finally:
                await disconnect(qmp)
            return events

        assert asyncio.run(asyncio.wait_for(client(), 30)) == ["STOP", "RESUME", "SHUTDOWN"]
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr  # quit: the VM was stopped, not failed
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    path.write_text("keep me")  # not a socket: refused before the guest runs, left alone
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == f"trivmm: QMP socket: {path} exists and is not a socket (not replaced)"
    assert path.read_text() == "keep me"
