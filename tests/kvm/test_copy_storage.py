"""``--copy-storage`` between two VMs in one process: a tiny guest (dirty_writer.S, which
dirties memory and never drives its disk) with a virtio-blk disk migrated to a destination
that has its own, empty image of the same size and format (raw, or qcow2 where qemu-img is
found).

The guest does not write its disk, so a host task writes into the source's image the way
the device's worker thread does (``image.write``, then ``device.written.mark``) while the
migration is active; the device's own marking is checked by tests/unit/test_copy_storage.py.
Checked: the destination's image ends up equal to the source's, byte for byte, writes made
during the copy included; the guest counts on there; the progress figures; cold copies;
and the refusals (the source's own image, another size, a file: target), after which the
source runs on."""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import attrs
import pytest

import trivmm
from tests.kvm.guests import assemble
from tests.kvm.test_embedding import Resources
from tests.kvm.test_migration import (
    BACKENDS,
    ENV,
    PAGES,
    SLOW,
    _start,
    _wait,
    counter,
    keeps_counting,
    wait_for,
    writer,
)
from trivmm import VM, DiskConfig, MigrationError, VmConfig
from trivmm.devices.virtio.block import BlockDevice
from trivmm.kvm import Kvm
from trivmm.migration import MigrationInfo, listen

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
DISK = 8 << 20


@pytest.fixture(autouse=True)
def _shared_kvm_fd() -> None:
    Kvm.shared()


def source_image(path: Path) -> Path:
    data = bytearray(DISK)
    data[: 3 << 20] = random.Random(7).randbytes(3 << 20)  # then 5 MiB of zeros: zero runs
    path.write_bytes(bytes(data))
    return path


def empty_image(path: Path, fmt: str, size: int = DISK) -> Path:
    if fmt == "raw":
        with open(path, "wb") as file:
            file.truncate(size)
    else:
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img (Debian's qemu-utils) is not installed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


def guest_view(path: Path, fmt: str) -> bytes:
    """The bytes the guest sees on an image."""
    if fmt == "raw":
        return path.read_bytes()
    flat = path.with_name(path.name + ".flat")
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(flat)], check=True)
    return flat.read_bytes()


def disk_of(vm: VM) -> BlockDevice:
    (device,) = [d for d in vm.virtio_devices if isinstance(d, BlockDevice)]
    return device


async def write_while_active(source: VM, writes: list[int]) -> None:
    """What the guest's driver would make the device do during the copy: write a sector,
    and mark it, as ``BlockDevice._execute`` does -- only while the migration is "active"
    (the real device is quiesced for the final pass; these writes are not)."""
    device, rng = disk_of(source), random.Random(11)
    while source.migration.status in ("none", "setup", "active"):
        if source.migration.status == "active" and device.written is not None:
            offset = rng.randrange(DISK // 512) * 512
            device.image.write(offset, len(writes).to_bytes(4, "little") * 128)
            device.written.mark(offset, 512)
            writes.append(offset)
        await anyio.sleep(0.01)


async def migrate_with_storage(tmp_path: Path, config: VmConfig, destination_disk: DiskConfig, *, cold: bool = False,
                               writes: list[int] | None = None) -> MigrationInfo:  # fmt: skip
    """Migrate ``config``'s guest to a destination with ``destination_disk``; the guest
    counts on there; both VMs released."""
    resources = Resources()
    adapt = lambda saved: attrs.evolve(saved, disks=(destination_disk,))  # noqa: E731
    async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
        resources.note(source)
        await wait_for(lambda: counter(source) > PAGES)
        async with anyio.create_task_group() as tg:
            received: list[VM] = []

            async def take() -> None:
                vm = await listener.accept(adapt=adapt)
                received.append(vm)
                with vm:
                    await vm.run()

            tg.start_soon(take)
            if writes is not None:
                tg.start_soon(write_while_active, source, writes)
            info = await source.migrate(listener.uri, downtime_ms=1, cold=cold, copy_storage=True)
            await source.stop()
            (vm,) = received
            resources.note(vm)
            await keeps_counting(vm)
            await vm.stop()
    resources.assert_released()
    return info


@BACKENDS
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_hot_copy_storage_carries_the_disk_and_the_writes_made_during_the_copy(backend: str, fmt: str,
                                                                                tmp_path: Path) -> None:  # fmt: skip
    src = source_image(tmp_path / "src.raw")
    dst = empty_image(tmp_path / f"dst.{fmt}", fmt)  # qcow2: 64 KiB clusters, as the source's (the discard
    if fmt == "qcow2":  # alignment in the device's configuration space is the cluster size: it must match)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(src.with_suffix(".qcow2"))],
                       check=True)  # fmt: skip
        src = src.with_suffix(".qcow2")
    config = writer(tmp_path, SLOW, disks=[DiskConfig(src, fmt)])
    writes: list[int] = []
    migrate = functools.partial(migrate_with_storage, tmp_path, config, DiskConfig(dst, fmt), writes=writes)
    info = anyio.run(migrate, backend=backend)
    assert info.status == "completed" and info.rounds >= 3, info
    assert writes, "no write was made during the copy"
    assert guest_view(dst, fmt) == guest_view(src, fmt)  # every write made during the copy was sent again
    assert info.disk_total == DISK and info.disk_remaining == 0 and info.disk_transferred > DISK
    assert info.to_qmp()["disk"] == {"transferred": info.disk_transferred, "remaining": 0, "total": DISK}


def test_cold_copy_storage(tmp_path: Path) -> None:
    src = source_image(tmp_path / "src.raw")
    dst = empty_image(tmp_path / "dst.raw", "raw")
    config = writer(tmp_path, SLOW, disks=[DiskConfig(src, "raw")])
    info = anyio.run(functools.partial(migrate_with_storage, tmp_path, config, DiskConfig(dst, "raw"), cold=True))
    assert info.cold and info.disk_transferred == DISK
    assert dst.read_bytes() == src.read_bytes()


def test_copy_storage_refusals_leave_the_source_running(tmp_path: Path) -> None:
    src = source_image(tmp_path / "src.raw")
    small = empty_image(tmp_path / "small.raw", "raw", DISK // 2)
    config = writer(tmp_path, SLOW, disks=[DiskConfig(src, "raw")])

    async def main() -> None:
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > PAGES)
            cases = [(DiskConfig(src, "raw"), "the storage copy would write into the source's own image"),
                     (DiskConfig(small, "raw"), "runs past disk 0's 4194304 bytes here")]  # fmt: skip
            for disk, error in cases:
                async with anyio.create_task_group() as tg:

                    async def refuse(disk: DiskConfig = disk) -> None:
                        with pytest.raises(MigrationError):
                            await listener.accept(adapt=lambda saved: attrs.evolve(saved, disks=(disk,)))

                    tg.start_soon(refuse)
                    with pytest.raises(MigrationError, match=f"the destination refused the migration: .*{error}"):
                        await source.migrate(listener.uri, copy_storage=True)
                assert not source.paused and disk_of(source).written is None
                await keeps_counting(source)
            with pytest.raises(MigrationError, match="copy-storage needs a destination"):
                await source.migrate(f"file:{tmp_path / 'x.snap'}", copy_storage=True)
            await source.stop()
        assert src.read_bytes()[: 3 << 20] == random.Random(7).randbytes(3 << 20)  # the source's image untouched

    anyio.run(main)


def test_the_cli_refuses_copy_storage_into_a_file(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trivmm", "migrate", str(tmp_path / "none.qmp"), "file:x.snap",
                           "--copy-storage"], env=ENV, capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and b"--copy-storage needs a destination" in done.stderr


def test_the_cli_copies_storage_between_processes(tmp_path: Path) -> None:
    """``run --api-sock`` with a disk, ``run --incoming unix:... --disk`` with an empty
    image of the same size, ``migrate --copy-storage``: the destination's image is the
    source's once the migration has completed, and its console continues the count."""
    src = source_image(tmp_path / "src.raw")
    dst = empty_image(tmp_path / "dst.raw", "raw")
    elf = assemble("serial_counter", tmp_path)
    api = tmp_path / "src.qmp"
    source = _start(["run", "--kernel", str(elf), "--memory", "16M", "--disk", str(src), "--api-sock", str(api)],
                    tmp_path, "src")  # fmt: skip
    destination = _start(["run", "--incoming", "unix:in.sock", "--disk", str(dst)], tmp_path, "dst")
    try:
        _wait(lambda: api.exists() and (tmp_path / "src.out").read_bytes().count(b"\n") > 20, source, "the source")
        _wait(lambda: (tmp_path / "in.sock").exists(), destination, "the destination")
        migrate = subprocess.run([sys.executable, "-m", "trivmm", "migrate", str(api), "unix:in.sock",
                                  "--copy-storage"], cwd=tmp_path, env=ENV, capture_output=True,
                                 timeout=120)  # fmt: skip
        assert migrate.returncode == 0, migrate.stderr.decode()
        assert source.wait(timeout=30) == 0
        assert dst.read_bytes() == src.read_bytes()
        before = (tmp_path / "src.out").read_bytes()
        _wait(lambda: (tmp_path / "dst.out").read_bytes().count(b"\n") > 10, destination, "the destination's output")
    finally:
        for proc in (source, destination):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = (before + (tmp_path / "dst.out").read_bytes()).split(b"\n")[:-1]
    assert lines == [f"{n:08x}".encode() for n in range(1, len(lines) + 1)], lines[-5:]
