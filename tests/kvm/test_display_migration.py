"""A VM with a display travels whole: its framebuffer is one more memory slot after RAM's
in snapshots (a version 3 file, mapped; a version 1 stream) and in hot migration (sent whole
in round 0 and again at stop-and-copy, the display keeping its own dirty log for the screen).
The restored display reports the whole screen changed, so a VNC client redraws at once.
Tiny guests of tests/kvm/test_display.py: one that draws its pattern and idles, one that
redraws for ever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import trivmm
from tests.kvm.test_display import BLUE, DONE, HEIGHT, WIDTH, display_guest, native_pattern, wait_for
from tests.kvm.test_qmp import BACKENDS
from tests.unit.rfb_client import RfbClient
from trivmm import VM, MigrationError, VmConfig
from trivmm.devices.display import Rect
from trivmm.migration import listen

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
SCREEN = Rect(0, 0, WIDTH, HEIGHT)


def _pixels(vm: VM) -> bytes:
    assert vm.display is not None
    return vm.display.read(SCREEN)


class _Chunks:
    """A ByteSink, then a ByteSource, over a list of chunks."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def send(self, item: bytes) -> None:
        if item:  # an empty chunk would read as the end of the stream
            self.chunks.append(bytes(item))

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.chunks:
            raise anyio.EndOfStream
        return self.chunks.pop(0)


@BACKENDS
def test_a_display_vm_snapshots_to_a_file_and_a_stream_and_restores_its_screen(backend: str, tmp_path: Path) -> None:
    config = VmConfig(kernel=display_guest(tmp_path), memory="16M", display=(WIDTH, HEIGHT))
    path = tmp_path / "display.snap"

    async def main() -> None:
        stream = _Chunks()
        async with trivmm.open_vm(config) as source:
            await wait_for(lambda: source.memory is not None and source.memory.read_u32(DONE) == 1)
            await source.snapshot(path)
            await source.snapshot(stream)
            assert _pixels(source) == native_pattern()
        for what in (path, stream):
            vm = await VM.restore(what)
            with vm:
                assert vm.config.display == (WIDTH, HEIGHT) and vm.display is not None
                assert _pixels(vm) == native_pattern(), what
                assert vm.display.refresh() == [SCREEN]  # the whole screen is news to a viewer
                assert vm.display.refresh() == []
        with pytest.raises(MigrationError, match="display none here, 320x200 in the snapshot"):
            await VM.restore(path, VmConfig(kernel=display_guest(tmp_path), memory="16M"))

    anyio.run(main, backend=backend)


@BACKENDS
def test_hot_migration_carries_the_framebuffer_as_it_was_at_the_switch_over(backend: str, tmp_path: Path) -> None:
    config = VmConfig(kernel=display_guest(tmp_path, busy=True), memory="16M", display=(WIDTH, HEIGHT))

    async def main() -> None:
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
            await wait_for(lambda: source.memory is not None and source.memory.read_u32(DONE) >= 1)
            received: list[tuple[bytes, list[Rect]]] = []
            destinations: list[VM] = []

            async def destination() -> None:
                vm = await listener.accept()
                with vm:
                    assert vm.display is not None
                    received.append((_pixels(vm), vm.display.refresh()))  # before it runs
                    destinations.append(vm)
                    await vm.run()  # the source waits for it to run (RUNNING) before it completes

            async with anyio.create_task_group() as tg:
                tg.start_soon(destination)
                info = await source.migrate(listener.uri, downtime_ms=5)
                await destinations[0].stop()
            assert source.paused and info.status == "completed"
            pixels, damage = received[0]
            assert pixels == _pixels(source)  # the source's screen as it stopped
            assert damage == [SCREEN]

    anyio.run(main, backend=backend)


def test_run_incoming_serves_vnc_for_the_display_that_came(tmp_path: Path) -> None:
    """``run --incoming file:SNAP --vnc unix:PATH``: the display comes with the guest, the
    first screen a viewer asks for is the guest's pattern (no redraw needed), and the
    restored keyboard still works (Escape powers the guest off)."""
    config = VmConfig(kernel=display_guest(tmp_path), memory="16M", display=(WIDTH, HEIGHT))
    snapshot, socket_path = tmp_path / "display.snap", tmp_path / "in.sock"

    async def take() -> None:
        async with trivmm.open_vm(config) as source:
            await wait_for(lambda: source.memory is not None and source.memory.read_u32(DONE) == 1)
            await source.snapshot(snapshot)

    anyio.run(take)
    refused = subprocess.run([sys.executable, "-m", "trivmm", "run", "--incoming", f"file:{snapshot}",
                              "--display", "640x480"], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "the display comes from the migration stream" in refused.stderr
    process = subprocess.Popen([sys.executable, "-m", "trivmm", "run", "--incoming", f"file:{snapshot}",
                                "--vnc", f"unix:{socket_path}"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    async def view() -> None:
        await wait_for(socket_path.exists)
        client = await RfbClient.connect(str(socket_path))
        assert (client.width, client.height) == (WIDTH, HEIGHT)
        await client.request()
        with anyio.fail_after(10):
            screen = await client.read_update()
        assert screen[-1][5][-4:] == bytes([BLUE, (HEIGHT - 1) & 0xFF, (WIDTH - 1) & 0xFF, 0])
        await client.key(0xFF1B, True)  # Escape: the guest powers off
        await client.key(0xFF1B, False)
        await client.closed()

    try:
        anyio.run(view)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert b"the guest runs here" in stderr and f"VNC server on unix:{socket_path}".encode() in stderr
