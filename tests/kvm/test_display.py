"""The display, keyboard and VNC server with a tiny guest (guests/display.S) that draws a
pattern into the framebuffer at CPL3 and stores the scancodes its IRQ 1 handler reads:

* the framebuffer is guest memory in its own slot, and KVM's dirty log on that slot finds
  exactly what the guest drew; an idle guest is polled but never scanned;
* a real VNC client (vncdotool) captures a screenshot whose pixels are the guest's pattern,
  and types a key the guest receives (its scancodes checked in guest memory);
* ``python -m trivmm run --display ... --vnc unix:...`` serves the same, and Escape typed
  over VNC powers the guest off.

Under trio and asyncio."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from tests.kvm.guests import assemble
from tests.unit.rfb_client import RfbClient
from trivmm import VM, VmConfig, open_vm
from trivmm.devices.display import Rect
from trivmm.vnc import VncServer

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
WIDTH, HEIGHT = 320, 200
DONE, KEYCOUNT, KEYS = 0x4000, 0x4FF0, 0x5000
BLUE = 0x80


def pattern_pixel(x: int, y: int, blue: int = BLUE) -> tuple[int, int, int]:
    """The guest's pattern as (red, green, blue)."""
    return x & 0xFF, y & 0xFF, blue


def native_pattern() -> bytes:
    return b"".join(bytes([BLUE, y & 0xFF, x & 0xFF, 0]) for y in range(HEIGHT) for x in range(WIDTH))


def display_guest(tmp_path: Path, *, busy: bool = False) -> Path:
    """guests/display.S for a WIDTH x HEIGHT screen (busy: redrawing for ever), in a
    directory of its own (the file is read when a VM is built)."""
    out = tmp_path / ("busy" if busy else "idle")
    out.mkdir(exist_ok=True)
    return assemble("display", out, symbols={"width": WIDTH, "height": HEIGHT, "busy": int(busy)})


def run_on(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


def keys_of(vm: VM) -> bytes:
    assert vm.memory is not None
    return vm.memory.read(KEYS, vm.memory.read_u32(KEYCOUNT))


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_the_dirty_log_finds_what_the_guest_drew_and_idle_is_never_scanned(backend: str, tmp_path: Path) -> None:
    config = VmConfig(kernel=display_guest(tmp_path), memory="16M", display=(WIDTH, HEIGHT))

    async def main() -> None:
        async with open_vm(config) as vm:
            assert vm.display is not None and vm.i8042 is not None and vm.memory is not None
            await wait_for(lambda: vm.memory.read_u32(DONE) == 1)  # type: ignore[union-attr]
            display = vm.display
            assert display.refresh() == [Rect(0, 0, WIDTH, HEIGHT)]
            assert display.read(display.screen) == native_pattern()
            scans = display.scans
            for _ in range(20):  # idle: KVM reports no dirty page, nothing is read
                assert display.refresh() == []
                await anyio.sleep(0.01)
            assert display.scans == scans
            # A key: the guest stores its scancodes and paints a 16x16 square in their colour.
            assert vm.i8042.key(0x1E, True) and vm.i8042.key(0x1E, False)
            await wait_for(lambda: len(keys_of(vm)) == 2)
            assert keys_of(vm) == b"\x1e\x9e"
            await wait_for(lambda: display.read(Rect(15, 15, 1, 1)) == b"\x9e\x9e\x9e\x00")
            assert display.refresh() == [Rect(0, 0, 16, 16)]  # the square: exactly
            assert display.scans == scans + 1
            # A snapshot saves the framebuffer too (tests/kvm/test_display_migration.py) and
            # leaves the display's own change tracking as it was: nothing new to scan.
            await vm.snapshot(tmp_path / "display.snap")
            assert (tmp_path / "display.snap").exists() and not vm.paused
            assert display.refresh() == [] and display.scans == scans + 1

    run_on(backend, main)


@pytest.fixture(scope="module")
def vncdotool() -> Iterator[object]:
    """vncdotool's API; its Twisted reactor (a thread, started by the first connect) runs
    once per process, so it is shut down once, after this module."""
    from vncdotool import api  # the test extra (pyproject.toml)

    yield api
    api.shutdown()


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_vnc_client_sees_the_guests_pattern_and_types_into_it(backend: str, tmp_path: Path,
                                                               vncdotool: object) -> None:  # fmt: skip
    from PIL import Image

    config = VmConfig(kernel=display_guest(tmp_path), memory="16M", display=(WIDTH, HEIGHT))
    socket_path = tmp_path / "vnc.sock"
    shots = [tmp_path / "before.png", tmp_path / "after.png"]

    def client_session() -> None:
        client = vncdotool.connect(str(socket_path), timeout=30)  # type: ignore[attr-defined]
        try:
            client.captureScreen(str(shots[0]))
            client.keyPress("a")
            deadline = time.monotonic() + 30
            while True:  # the square appears once the guest has taken the key
                client.refreshScreen(incremental=True)
                client.captureScreen(str(shots[1]))
                if Image.open(shots[1]).convert("RGB").getpixel((0, 0)) != pattern_pixel(0, 0):
                    break
                assert time.monotonic() < deadline, "the key never reached the screen"
                time.sleep(0.1)
        finally:
            client.disconnect()

    async def main() -> None:
        async with open_vm(config) as vm:
            assert vm.display is not None and vm.memory is not None
            with VncServer(vm.display, vm.i8042, f"unix:{socket_path}") as server:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.serve)
                    await wait_for(lambda: vm.memory.read_u32(DONE) == 1)  # type: ignore[union-attr]
                    with anyio.fail_after(90):
                        await anyio.to_thread.run_sync(client_session)
                    tg.cancel_scope.cancel()
            assert keys_of(vm) == b"\x1e\x9e"  # 'a' pressed and released, set 1 as Linux gets it

    run_on(backend, main)
    before = Image.open(shots[0]).convert("RGB")
    assert before.size == (WIDTH, HEIGHT)
    for x, y in ((0, 0), (17, 3), (255, 199), (300, 128), (WIDTH - 1, HEIGHT - 1)):
        assert before.getpixel((x, y)) == pattern_pixel(x, y), (x, y)
    after = Image.open(shots[1]).convert("RGB")
    assert after.getpixel((0, 0)) == after.getpixel((15, 15)) == (0x9E, 0x9E, 0x9E)  # the release's code
    assert after.getpixel((16, 16)) == pattern_pixel(16, 16)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_watched_idle_guest_costs_polls_not_scans_and_a_busy_one_is_streamed(backend: str, tmp_path: Path) -> None:
    idle = VmConfig(kernel=display_guest(tmp_path), memory="16M", display=(WIDTH, HEIGHT))
    busy = VmConfig(kernel=display_guest(tmp_path, busy=True), memory="16M", display=(WIDTH, HEIGHT))

    async def watch(config: VmConfig, seconds: float) -> tuple[int, int, int]:
        """(polls, scans, updates) while a client asks for updates for ``seconds``."""
        async with open_vm(config) as vm:
            assert vm.display is not None and vm.memory is not None
            await wait_for(lambda: vm.memory.read_u32(DONE) >= 1)  # type: ignore[union-attr]
            with VncServer(vm.display, vm.i8042, f"unix:{tmp_path / 'w.sock'}") as server:
                async with anyio.create_task_group() as tg:
                    await tg.start(server.serve)
                    client = await RfbClient.connect(str(tmp_path / "w.sock"))
                    await client.request()
                    with anyio.fail_after(10):
                        await client.read_update()
                    polls, scans, updates = vm.display.polls, vm.display.scans, 0
                    with anyio.move_on_after(seconds):
                        while True:
                            await client.request(incremental=True)
                            await client.read_update()
                            updates += 1
                    result = vm.display.polls - polls, vm.display.scans - scans, updates
                    await client.aclose()
                    tg.cancel_scope.cancel()
        return result

    async def main() -> None:
        polls, scans, updates = await watch(idle, 1.0)
        assert polls >= 15 and scans == 0 and updates == 0  # 30 polls a second, nothing read or sent
        polls, scans, updates = await watch(busy, 1.0)
        assert scans >= 5 and updates >= 5  # every tick finds the screen redrawn

    run_on(backend, main)


def test_the_cli_serves_vnc_and_escape_powers_the_guest_off(tmp_path: Path) -> None:
    elf = display_guest(tmp_path)
    socket_path = tmp_path / "cli.sock"
    process = subprocess.Popen([sys.executable, "-m", "trivmm", "run", "--kernel", str(elf), "--memory", "16M",
                                "--display", f"{WIDTH}x{HEIGHT}", "--vnc", f"unix:{socket_path}"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    async def main() -> None:
        await wait_for(socket_path.exists)
        client = await RfbClient.connect(str(socket_path))
        assert (client.width, client.height) == (WIDTH, HEIGHT)
        with anyio.fail_after(30):
            while True:  # until the guest has drawn
                await client.request()
                screen = await client.read_update()
                if screen[-1][5][-4:] == bytes([BLUE, (HEIGHT - 1) & 0xFF, (WIDTH - 1) & 0xFF, 0]):
                    break
                await anyio.sleep(0.05)
        await client.key(0xFF1B, True)  # Escape: the guest powers off
        await client.key(0xFF1B, False)
        await client.closed()

    try:
        anyio.run(main, backend="trio")
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr
    assert f"VNC server on unix:{socket_path}".encode() in stderr
    assert not socket_path.exists()  # removed on the way out
