"""The small Linux guest migrated hot while it works (issue 6, item 10), in one process: a
source VM booted with a virtio-blk disk (ext4 made by ``mke2fs -d``) and a vsock device,
and a destination taken from ``trivmm.migration.listen("unix:...")``. Shared storage: both
ends open the same image (the source's devices stay quiesced after the hand-over).

One boot. The guest mounts the disk, writes a file on it, starts ``vsock_helper listen``,
and prints a counter line every 0.5 s until that helper has served one connection. The
host migrates it while it counts, then connects to the guest's vsock port through the
destination's socket (the connection re-made after migration: the destination resets the
vsock transport, a listening socket survives it). The guest then writes a second file,
reads the first, connects to the host over vsock itself, unmounts and powers off.

Checked: the source's console followed by the destination's is the counter sequence with
no number lost or repeated (the serial state travels, so a line in flight is finished on
the destination); both vsock directions work on the destination; the guest exits cleanly
there; and after power-off the host finds both files in the image (debugfs).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc
import attrs
import pytest

import trivmm
from tests.conftest import prerequisite_missing
from tests.e2e.test_linux_boot import SMALL_BOOT_TIMEOUT, _guest
from tests.e2e.test_virtio_linux import _debugfs_cat, _ext4
from trivmm import DiskConfig, StopReason, VmConfig, VsockConfig
from trivmm.guest.build import ensure_debian_packages
from trivmm.migration import MigrationInfo, listen

pytestmark = pytest.mark.e2e
GUEST_CID, GUEST_PORT, HOST_PORT = 3, 7000, 6000
MIGRATE_AT = 6  # the source's console shows this many counter lines: migrate
CONNECT_AFTER = 4  # the destination's console shows this many more: connect over vsock
MAX_COUNT = 400  # the guest's own limit (200 s): the script ends even if vsock never comes

# Run by the test initramfs's /init between TRIVMM-CMD-BEGIN and TRIVMM-CMD-END.
GUEST_SCRIPT = f"""\
mkdir -p /m && mount -t ext4 /dev/vda /m || exit 1
echo "written on the source" > /m/before.txt && sync
vsock_helper listen {GUEST_PORT} &
helper=$!
i=0
while kill -0 $helper 2>/dev/null && [ $i -lt {MAX_COUNT} ]; do
  i=$((i+1)); echo "COUNT $i"
  sleep 0.5 2>/dev/null || usleep 500000
done
wait $helper; echo "helper rc=$?"
echo "written on the destination after $i" > /m/after.txt
echo "read back: $(cat /m/before.txt) / $(cat /m/after.txt)"
echo "vsock out: $(vsock_helper connect 2 {HOST_PORT} hello-after-migration)"
sync && umount /m && echo UNMOUNTED
"""


def _counts(console: bytes | bytearray) -> list[int]:
    return [int(n) for n in re.findall(rb"^COUNT (\d+)\r?$", console, re.MULTILINE)]


class Run:
    """What the source and the destination showed, and what the host received."""

    def __init__(self) -> None:
        self.source = bytearray()
        self.destination = bytearray()
        self.info: MigrationInfo | None = None
        self.result: trivmm.VmExit | None = None
        self.vsock_reply = b""  # the guest's answer to the host's connection after migration
        self.vsock_in: list[bytes] = []  # what the guest sent to the host after migration
        self.times: dict[str, float] = {}


async def _serve_upper(stream: anyio.abc.ByteStream, received: list[bytes]) -> None:
    async with stream:
        data = b""
        with anyio.move_on_after(30):
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
        received.append(data)
        await stream.send(data.upper())


async def _connect_to_guest(uds: Path) -> bytes:
    """Firecracker's convention: CONNECT <port>, OK <host port>, then the bytes."""
    async with await anyio.connect_unix(uds) as stream:
        await stream.send(f"CONNECT {GUEST_PORT}\n".encode())
        reply = b""
        while b"\n" not in reply:
            reply += await stream.receive()
        assert reply.startswith(b"OK "), reply
        await stream.send(b"ping-after-migration")
        await stream.send_eof()
        data = reply.split(b"\n", 1)[1]
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                return data


async def _wait_for(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    with anyio.move_on_after(timeout):
        while not predicate():
            await anyio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def _migrate(run: Run, config: VmConfig, tmp_path: Path) -> None:
    started = time.monotonic()
    new_uds = tmp_path / "dst-vsock.sock"  # the source still holds its own socket path

    def adapt(saved: VmConfig) -> VmConfig:  # a destination names its own host devices
        assert saved.vsock is not None
        disks = tuple(attrs.evolve(disk) for disk in saved.disks)  # the same image: shared storage
        return attrs.evolve(saved, disks=disks, vsock=VsockConfig(saved.vsock.cid, new_uds))

    async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, anyio.create_task_group() as tg:
        destination: list[trivmm.VM] = []

        async def take() -> None:
            vm = await listener.accept(console_output=run.destination.extend, adapt=adapt)
            destination.append(vm)
            with vm:
                run.result = await vm.run()

        tg.start_soon(take)
        async with trivmm.open_vm(config, console_output=run.source.extend) as source:
            await _wait_for(lambda: len(_counts(run.source)) >= MIGRATE_AT, "the counter on the source",
                            SMALL_BOOT_TIMEOUT)  # fmt: skip
            run.times["boot"] = time.monotonic() - started
            run.info = await source.migrate(listener.uri)
            run.times["migration"] = run.info.total_time
            run.times["migrated at"] = time.monotonic() - started
            assert source.paused and source.migration.run_state() == "postmigrate"
            await source.stop()
        on_source = len(_counts(run.source))
        await _wait_for(lambda: len(_counts(run.source + run.destination)) >= on_source + CONNECT_AFTER,
                        "the counter on the destination", 60)  # fmt: skip
        run.times["counting there at"] = time.monotonic() - started
        unix = await anyio.create_unix_listener(f"{new_uds}_{HOST_PORT}")
        tg.start_soon(unix.serve, lambda stream: _serve_upper(stream, run.vsock_in))
        with anyio.fail_after(60):
            run.vsock_reply = await _connect_to_guest(new_uds)
        run.times["vsock done at"] = time.monotonic() - started
        await _wait_for(lambda: run.result is not None, "the guest's power-off on the destination", 120)
        run.times["total"] = time.monotonic() - started
        tg.cancel_scope.cancel()


def test_small_guest_migrated_hot_keeps_its_console_disk_and_vsock(tmp_path: Path) -> None:
    small = _guest("small")
    try:
        ensure_debian_packages(["e2fsprogs"])
    except Exception as exc:
        prerequisite_missing("disk tools", f"e2fsprogs could not be installed: {exc}")
    image = tmp_path / "disk.raw"
    _ext4(image, "a raw image from the host\n")
    command = base64.urlsafe_b64encode(GUEST_SCRIPT.encode()).decode().rstrip("=")
    config = VmConfig(
        kernel=small / "vmlinux", initrd=small / "initramfs.cpio", memory="128M", vcpus=2,
        append=f"trivmm.cmd={command}", disks=[DiskConfig(image, "raw")],
        vsock=VsockConfig(GUEST_CID, tmp_path / "src-vsock.sock"),
    )  # fmt: skip
    run = Run()
    try:
        anyio.run(_migrate, run, config, tmp_path, backend="trio")
    finally:  # shown when the test fails
        print("source:", run.source.decode(errors="replace")[-4000:])
        print("destination:", run.destination.decode(errors="replace")[-4000:])
        print("migration:", run.info, "times:", run.times)
    source, destination = run.source.decode(errors="replace"), run.destination.decode(errors="replace")
    info = run.info
    assert info is not None and info.status == "completed" and not info.cold, info

    # The counter goes on on the destination where it stopped on the source: the source's
    # console followed by the destination's counts 1, 2, 3, ... with nothing lost or repeated.
    counts = _counts(run.source + run.destination)
    assert counts == list(range(1, len(counts) + 1)), (counts, source[-1500:], destination[-1500:])
    assert len(_counts(run.source)) >= MIGRATE_AT and len(_counts(run.destination)) >= CONNECT_AFTER - 1

    # vsock re-made on the destination, both ways; then the guest wrote, read and powered off.
    assert run.vsock_reply == b"PING-AFTER-MIGRATION", (run.vsock_reply, destination[-2000:])
    assert run.vsock_in == [b"hello-after-migration"], (run.vsock_in, destination[-2000:])
    assert "vsock out: HELLO-AFTER-MIGRATION" in destination, destination[-2000:]
    assert "helper rc=0" in destination and "UNMOUNTED" in destination, destination[-2000:]
    assert "read back: written on the source / written on the destination after" in destination
    assert "TRIVMM-CMD-END rc=0" in destination, destination[-2000:]
    assert run.result is not None and run.result.reason in (StopReason.POWER_OFF, StopReason.RESET), run.result

    # The host finds what the guest wrote on both ends in the shared image.
    assert _debugfs_cat(image, "before.txt") == "written on the source\n"
    last = counts[-1]
    assert _debugfs_cat(image, "after.txt") == f"written on the destination after {last}\n"
