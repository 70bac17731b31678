"""``--copy-storage``: the disks' contents streamed with the memory, as ``virsh migrate
--copy-storage-all`` (docs/migration.md, "Copying storage").

The source sends every writable disk's guest-visible contents in DISK sections (zero
extents as zero runs) in round 0, beside the memory; the virtio-blk devices record the
chunks their writes touch meanwhile (``BlockDevice.written``, a ``WriteTracker``), and each
later round -- the final one too, with the devices quiesced -- sends those chunks again,
flagged RESEND. The destination writes each run into its own image, at the path its
configuration gives (the CLI's ``--disk``), checked before anything is written: the disk
exists and is writable there, the first pass goes in order from offset 0 and stays inside
the image, a RESEND run only covers what the first pass already did; and at END each
writable disk must have been copied whole. Read-only disks are not copied.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import anyio

from trivmm.devices.virtio.block import SECTOR_SIZE, TRACK_CHUNK, BlockDevice, WriteTracker
from trivmm.errors import MigrationError
from trivmm.images import ImageError
from trivmm.migration.stream import MAX_DISK_RUN_BYTES, MAX_DISK_ZERO_BYTES, DiskRun

if TYPE_CHECKING:
    from trivmm.vm import VM

__all__ = ["StorageCopy", "DiskReceiver", "block_devices"]

_ZERO = bytes(MAX_DISK_RUN_BYTES)


def block_devices(vm: VM) -> list[BlockDevice]:
    """The VM's virtio-blk devices, in the order of its configuration's disks."""
    return [device for device in vm.virtio_devices if isinstance(device, BlockDevice)]


def _size(device: BlockDevice) -> int:
    return device.capacity * SECTOR_SIZE


class StorageCopy:
    """The source's side: which disks are copied, their write tracking, their runs."""

    def __init__(self, vm: VM) -> None:
        self.disks = [(index, device) for index, device in enumerate(block_devices(vm)) if not device.readonly]
        self.total = sum(_size(device) for _, device in self.disks)
        self._by_index = dict(self.disks)

    def start_tracking(self) -> None:
        """Writes are recorded from now on (call it with the devices quiesced)."""
        for _, device in self.disks:
            device.written = WriteTracker()

    def stop_tracking(self) -> None:
        for _, device in self.disks:
            device.written = None

    def everything(self) -> list[tuple[int, int, int]]:
        """Every copied disk, whole: (disk, offset, length)."""
        return [(index, 0, _size(device)) for index, device in self.disks if _size(device)]

    def written(self) -> list[tuple[int, int, int]]:
        """The extents written since the last call (adjacent chunks merged), and the record
        starts afresh."""
        extents: list[tuple[int, int, int]] = []
        for index, device in self.disks:
            tracker = device.written
            if tracker is None:
                continue
            size = _size(device)
            for chunk in tracker.take():
                start = chunk * TRACK_CHUNK
                end = min(start + TRACK_CHUNK, size)
                if start >= end:
                    continue
                if extents and extents[-1][0] == index and extents[-1][1] + extents[-1][2] == start:
                    extents[-1] = (index, extents[-1][1], end - extents[-1][1])
                else:
                    extents.append((index, start, end - start))
        return extents

    def read(self, disk: int, offset: int, length: int, *, resend: bool) -> list[DiskRun]:
        """The runs carrying an extent of ``disk`` (a worker thread: reads the image); zero
        stretches merged into zero runs."""
        image = self._by_index[disk].image
        runs: list[DiskRun] = []
        end = offset + length
        while offset < end:
            count = min(MAX_DISK_RUN_BYTES, end - offset)
            try:
                data = image.read(offset, count)
            except ImageError as exc:
                raise MigrationError(f"reading disk {disk} for the copy failed: {exc}") from None
            if memoryview(_ZERO)[:count] == data:
                last = runs[-1] if runs else None
                if last is not None and last.data is None and last.length + count <= MAX_DISK_ZERO_BYTES:
                    runs[-1] = DiskRun(disk, last.offset, last.length + count, resend=resend)
                else:
                    runs.append(DiskRun(disk, offset, count, resend=resend))
            else:
                runs.append(DiskRun(disk, offset, count, data, resend))
            offset += count
        return runs


class DiskReceiver:
    """The destination's side: checks each run against this VM's disks and writes it into
    the image (see the module docstring)."""

    def __init__(self, vm: VM, source_paths: list[str]) -> None:
        self._devices = block_devices(vm)
        self._paths = [str(disk.path) for disk in vm.config.disks]
        self._source_paths = source_paths
        self._next: list[int | None] = [None] * len(self._devices)  # None: not copied (yet)

    @property
    def copying(self) -> bool:
        return any(done is not None for done in self._next)

    def check(self, run: DiskRun) -> None:
        if run.disk >= len(self._devices):
            raise MigrationError(f"disk run for disk {run.disk}; this VM has {len(self._devices)} disks")
        device, done = self._devices[run.disk], self._next[run.disk]
        if device.readonly:
            raise MigrationError(f"disk run for disk {run.disk}, which is read-only here")
        if done is None:
            path = self._paths[run.disk]
            if run.disk < len(self._source_paths) and os.path.abspath(path) == os.path.abspath(
                    self._source_paths[run.disk]):  # fmt: skip
                raise MigrationError(f"the storage copy would write into the source's own image {path} (shared "
                                     "storage needs no copy: give the destination its own images)")  # fmt: skip
            done = self._next[run.disk] = 0
        end = run.offset + run.length
        if run.resend:
            if end > done:
                raise MigrationError(f"disk run resends bytes {run.offset}..{end - 1} of disk {run.disk}, of which "
                                     f"only those below {done} were sent")  # fmt: skip
            return
        if run.offset != done:
            raise MigrationError(f"disk run at offset {run.offset} of disk {run.disk}, where {done} was due")
        if end > _size(device):
            raise MigrationError(f"disk run of {run.length} bytes at offset {run.offset} runs past disk {run.disk}'s "
                                 f"{_size(device)} bytes here")  # fmt: skip

    async def write(self, run: DiskRun) -> None:
        await anyio.to_thread.run_sync(self._write, run)
        if not run.resend:
            done = self._next[run.disk]
            assert done is not None
            self._next[run.disk] = done + run.length

    def _write(self, run: DiskRun) -> None:
        image = self._devices[run.disk].image
        try:
            if run.data is None:
                image.write_zeroes(run.offset, run.length, unmap=True)
            else:
                image.write(run.offset, run.data)
        except ImageError as exc:
            raise MigrationError(f"writing disk {run.disk} ({self._paths[run.disk]}) failed: {exc}") from None

    async def finish(self) -> None:
        """At END: with a copy, every writable disk must be whole; then flushed."""
        if not self.copying:
            return
        short = [f"disk {index}: {done or 0} of {_size(device)} bytes"
                 for index, (device, done) in enumerate(zip(self._devices, self._next, strict=True))
                 if not device.readonly and (done or 0) != _size(device)]  # fmt: skip
        if short:
            raise MigrationError(f"the stream ended before the disks were copied ({'; '.join(short)})")
        for device in self._devices:
            if not device.readonly:
                try:
                    await anyio.to_thread.run_sync(device.image.flush)
                except ImageError as exc:
                    raise MigrationError(f"flushing the copied disk failed: {exc}") from None
