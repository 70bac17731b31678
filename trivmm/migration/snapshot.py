"""Snapshot a running VM to a file or stream; build a VM from one and run it on.

``snapshot_vm`` pauses the vCPUs (``VM.pause``), quiesces the devices whose backends work
beside them (``Quiescent``: virtio), captures every piece of state while they are parked,
writes it and resumes the guest if it was running (unless asked not to). To a stream
(a ``ByteSink``): version 1 -- CONFIG, the STATE sections, guest memory as runs of pages,
END. To a file: version 3 -- the same sections with a MEMORY_MAP instead of the runs, then
each memory slot's image, raw and page-aligned, zero pages left as holes (a sparse file).
A file is written under a temporary name beside the target and renamed into place once
complete and fsynced, so a failed snapshot (a full disk) leaves no partial file behind,
and a snapshot written over an older one never changes the file a restored VM maps.

``restore_vm`` reads the CONFIG section, checks the destination's configuration against it
(or takes it from the snapshot), builds the VM with ``incoming=True`` (memory, devices and
vCPUs, no kernel loaded), then reads the rest: each memory run is checked against the slots
and written into guest memory as it arrives; every other section is checked and kept
until the END section has been read, and only then applied. A version 3 file's slot images
are checked against the file's size and the slots, then mapped copy-on-write over guest
memory (``MemoryRegion.map_file_private``): nothing is read until the guest touches it, so
a restore costs the same for any memory size. Their checksums are checked only with
``verify_memory=True`` (which reads all of it first). Any failure closes the VM being
built -- its fds, threads and memory are released -- and raises ``MigrationError``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import mmap
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import anyio
import attrs

from trivmm.boot.layout import ram_ranges
from trivmm.config import DiskConfig, NetConfig, VmConfig, VsockConfig
from trivmm.cpu.quirks import QuirkHooks
from trivmm.cpu.templates import get_template
from trivmm.errors import ConfigError, MigrationError
from trivmm.images._base import pwrite_all
from trivmm.memory import MemoryRegion
from trivmm.migration.codec import decode_state, encode_state
from trivmm.migration.devices import DEVICE_PREFIX, DeviceSet, Quiescent, vm_devices
from trivmm.migration.state import (
    PLATFORM_SECTIONS,
    VcpuState,
    apply_platform,
    apply_quirks,
    apply_vcpu,
    capture_platform,
    capture_quirks,
    capture_vcpu,
    check_platform,
    decode_vcpu,
    encode_vcpu,
)
from trivmm.migration.storage import DiskReceiver
from trivmm.migration.stream import (
    MAPPED_VERSION,
    PAGE_SIZE,
    VERSION,
    ByteSink,
    ByteSource,
    FileSink,
    FileSource,
    MemoryMapEntry,
    MemoryRun,
    SectionKind,
    StreamReader,
    StreamWriter,
    decode_disk_run,
    decode_memory_map,
    decode_run,
    encode_header,
    encode_memory_map,
    encode_section,
    image_checksum,
    page_runs,
)

if TYPE_CHECKING:
    from trivmm.console import ConsoleInput, ConsoleOutput
    from trivmm.vm import VM

__all__ = ["snapshot_vm", "restore_vm", "SnapshotInfo", "SavedConfig", "SnapshotTarget", "SnapshotSource",
           "saved_regions"]

SnapshotTarget = str | os.PathLike[str] | ByteSink
SnapshotSource = str | os.PathLike[str] | ByteSource
MAX_SECTIONS = 4096  # state sections a stream may announce
_SCAN_WINDOW_PAGES = 4096  # pages scanned for zero runs per worker-thread call (16 MiB)


@attrs.frozen
class SnapshotInfo:
    """What a snapshot wrote: bytes (a file's zero pages are holes: its apparent size is
    larger), pages (and how many were zero, costing nothing), and how long the guest was
    paused for it."""

    size: int
    pages: int
    zero_pages: int
    paused_seconds: float


# --- the CONFIG section ----------------------------------------------------------------------------


@attrs.frozen
class SavedDisk:
    path: str
    format: str | None
    readonly: bool
    serial: str | None


@attrs.frozen
class SavedNet:
    tap: str | None
    mac: str | None


@attrs.frozen
class SavedVsock:
    cid: int
    uds: str


@attrs.frozen
class SavedConfig:
    """The source VM's configuration as the snapshot carries it: its ``VmConfig`` (with the
    CPU template resolved), its memory slots (guest base, size) and the names of the state
    sections that follow."""

    kernel: str | None
    initrd: str | None
    append: str
    memory: int
    vcpus: int
    cpu_template: str
    boot_protocol: str
    cmdline_base: str
    transport: str
    rng: bool
    disks: tuple[SavedDisk, ...]
    net: tuple[SavedNet, ...]
    vsock: SavedVsock | None
    memory_slots: tuple[tuple[int, int], ...]
    sections: tuple[str, ...]
    # The framebuffer (width, height), carried as one more memory slot after RAM's
    # (``saved_regions``); absent from snapshots written before displays travelled.
    display: tuple[int, int] | None = None
    # Whether the guest was running when the snapshot or migration began: a destination
    # of a paused source starts paused (``VM.start_paused``), as QEMU's does.
    running: bool = True

    @classmethod
    def of(cls, vm: VM, sections: list[str], *, running: bool) -> SavedConfig:
        c = vm.config
        assert vm.memory is not None
        return cls(
            kernel=None if c.kernel is None else str(c.kernel), initrd=None if c.initrd is None else str(c.initrd),
            append=c.append, memory=c.memory, vcpus=c.vcpus, cpu_template=vm.template.name,
            boot_protocol=c.boot_protocol, cmdline_base=c.cmdline_base, transport=c.transport, rng=c.rng,
            disks=tuple(SavedDisk(str(d.path), d.format, d.readonly, d.serial) for d in c.disks),
            net=tuple(SavedNet(n.tap, n.mac) for n in c.net),
            vsock=None if c.vsock is None else SavedVsock(c.vsock.cid, str(c.vsock.uds)),
            memory_slots=tuple((r.guest_base, r.size) for r in vm.memory), sections=tuple(sections),
            display=c.display, running=running,
        )  # fmt: skip

    def vm_config(self) -> VmConfig:
        """The ``VmConfig`` to build the destination from when none is given."""
        try:
            return VmConfig(
                kernel=self.kernel, initrd=self.initrd, append=self.append, memory=self.memory, vcpus=self.vcpus,
                cpu_template=self.cpu_template, boot_protocol=self.boot_protocol, cmdline_base=self.cmdline_base,
                transport=self.transport, rng=self.rng,
                disks=tuple(DiskConfig(d.path, d.format, d.readonly, d.serial) for d in self.disks),
                net=tuple(NetConfig(n.tap, n.mac) for n in self.net),
                vsock=None if self.vsock is None else VsockConfig(self.vsock.cid, self.vsock.uds),
                display=self.display,
            )  # fmt: skip
        except (ConfigError, TypeError, ValueError) as exc:
            raise MigrationError(f"the snapshot's configuration is not valid: {exc}") from None

    def check(self, config: VmConfig) -> None:
        """``MigrationError`` listing every way ``config`` differs from the source's shape."""
        try:
            template = get_template(config.cpu_template).name
        except ValueError as exc:
            raise MigrationError(str(exc)) from None
        mine = {"memory": _size(config.memory), "vcpus": config.vcpus, "CPU template": template,
                "virtio-rng": config.rng, "disks": len(config.disks), "NICs": len(config.net),
                "vsock": config.vsock is not None, "display": _screen(config.display)}  # fmt: skip
        theirs = {"memory": _size(self.memory), "vcpus": self.vcpus, "CPU template": self.cpu_template,
                  "virtio-rng": self.rng, "disks": len(self.disks), "NICs": len(self.net),
                  "vsock": self.vsock is not None, "display": _screen(self.display)}  # fmt: skip
        if config.rng or config.disks or config.net or config.vsock:
            mine["virtio transport"], theirs["virtio transport"] = config.transport, self.transport
        wrong = [f"{key} {mine[key]} here, {theirs[key]} in the snapshot" for key in mine if mine[key] != theirs[key]]
        if wrong:
            raise MigrationError(f"the snapshot does not fit this VM: {'; '.join(wrong)}")
        if tuple(ram_ranges(config.memory)) != self.memory_slots:
            raise MigrationError("the snapshot's memory slots are not this VM's "
                                 f"({list(self.memory_slots)} against {ram_ranges(config.memory)})")  # fmt: skip


def _screen(display: tuple[int, int] | None) -> str:
    return "none" if display is None else f"{display[0]}x{display[1]}"


def saved_regions(vm: VM) -> list[MemoryRegion]:
    """The memory a snapshot or migration carries, as its slots in order: guest RAM's
    regions, then the framebuffer's (a display's pages are guest-visible memory too)."""
    assert vm.memory is not None
    regions = list(vm.memory)
    if vm.display is not None:
        regions.append(vm.display.memory_region())
    return regions


def _size(size: int) -> str:
    return f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size} bytes"


def _decode_config(payload: bytes) -> SavedConfig:
    saved = decode_state(SavedConfig, payload, "config")
    if len(saved.sections) > MAX_SECTIONS or len(set(saved.sections)) != len(saved.sections):
        raise MigrationError(f"config: more than {MAX_SECTIONS} state sections, or one named twice")
    return saved


def _state_sections(vm: VM, devices: DeviceSet) -> list[str]:
    """The names of ``vm``'s state sections, in the order they are written and applied."""
    names = []
    for index, runner in enumerate(vm.runners):
        names.append(f"vcpu/{index}")
        if isinstance(runner.hooks, QuirkHooks):
            names.append(f"quirks/{index}")
    return names + list(PLATFORM_SECTIONS) + devices.section_names()


def _refuse_unsaveable(devices: DeviceSet) -> None:
    if devices.refused:
        reasons = "; ".join(f"{name}: {why}" for name, why in devices.refused.items())
        raise MigrationError(f"this VM's state cannot be saved: {reasons}")


# --- snapshot ----------------------------------------------------------------------------------------


async def snapshot_vm(vm: VM, target: SnapshotTarget, *, resume: bool = True) -> SnapshotInfo:
    """Write ``vm``'s complete state to ``target`` (a path, or a ``ByteSink`` such as an
    anyio byte stream). The vCPUs are paused for it; a guest that was running runs on after
    (``resume=False`` leaves it paused, once the snapshot is complete: a failed one always
    resumes a guest that was running). Refused, before anything is paused, for a VM with a
    device that cannot be saved yet."""
    if vm.vm is None or vm.memory is None:
        raise MigrationError("the VM is closed")
    devices = vm_devices(vm)
    _refuse_unsaveable(devices)
    names = _state_sections(vm, devices)
    was_paused = vm.paused
    if not was_paused:
        await vm.pause()
    paused_at = time.monotonic()
    paused_for: float | None = None
    quiesced: list[Quiescent] = []

    async def release_guest(*, failed: bool = False) -> None:  # once: when the stream is written, or on failure
        nonlocal paused_for
        if paused_for is None:
            paused_for = time.monotonic() - paused_at
            for provider in reversed(quiesced):
                provider.resume_after_snapshot()
            if (resume or failed) and not was_paused and vm.vm is not None:  # a failure never leaves it paused
                with anyio.CancelScope(shield=True):
                    await vm.resume()

    try:
        for provider in devices.providers.values():
            if isinstance(provider, Quiescent):
                quiesced.append(provider)  # resumed even if its quiesce fails half-way
                await provider.quiesce()
        states = await anyio.to_thread.run_sync(_capture, vm, devices)
        assert [name for name, _ in states] == names
        config = encode_state(SavedConfig.of(vm, names, running=not was_paused))
        if isinstance(target, str | os.PathLike):
            async with _mapped_file(target) as fd:
                size, pages, zero_pages = await _write_mapped(fd, saved_regions(vm), config, states)
                await release_guest()  # the fsync and rename need no paused guest
            assert paused_for is not None
            return SnapshotInfo(size, pages, zero_pages, paused_for)
        writer = StreamWriter(target)
        await writer.header()
        await writer.section(SectionKind.CONFIG, "config", config)
        for name, payload in states:
            await writer.section(SectionKind.STATE, name, payload)
        pages, zero_pages = await _send_memory(writer, saved_regions(vm))
        await writer.end()
        if isinstance(target, FileSink):
            await target.flush()  # all of it in the file before the guest runs on
        await release_guest()
        assert paused_for is not None
        return SnapshotInfo(writer.bytes_written, pages, zero_pages, paused_for)
    except ValueError as exc:  # a section the stream cannot carry (encode_section)
        raise MigrationError(f"the VM's state does not fit the stream: {exc}") from None
    finally:
        await release_guest(failed=True)  # a no-op once released after the write


def _capture(vm: VM, devices: DeviceSet) -> list[tuple[str, bytes]]:
    """Every state section of a VM whose vCPUs are parked (on a worker thread: ioctls)."""
    assert vm.vm is not None
    states: list[tuple[str, bytes]] = []
    for index, (vcpu, runner) in enumerate(zip(vm.vcpus, vm.runners, strict=True)):
        states.append((f"vcpu/{index}", encode_vcpu(capture_vcpu(vcpu))))
        quirks = capture_quirks(runner.hooks)
        if quirks is not None:
            states.append((f"quirks/{index}", quirks))
    states += capture_platform(vm.vm).items()
    states += [(DEVICE_PREFIX + name, provider.save_state()) for name, provider in devices.providers.items()]
    return states


async def _send_memory(writer: StreamWriter, regions: list[MemoryRegion]) -> tuple[int, int]:
    """Every page of every slot as runs (zero runs merged); returns (pages, zero pages)."""
    pages = zero_pages = 0
    for slot, region in enumerate(regions):
        pending: MemoryRun | None = None  # a zero run that the next window may extend
        for first, count in _windows(region.pages):
            runs = await anyio.to_thread.run_sync(_scan, region, slot, first, count)
            for run in runs:
                pages += run.pages
                if run.data is None:
                    zero_pages += run.pages
                    if pending is not None:
                        run = MemoryRun(slot, pending.first_page, pending.pages + run.pages)
                    pending = run
                    continue
                if pending is not None:
                    await writer.run(pending)
                    pending = None
                await writer.run(run)
        if pending is not None:
            await writer.run(pending)
    return pages, zero_pages


def _windows(pages: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each scan window over a slot of ``pages`` pages."""
    for first in range(0, pages, _SCAN_WINDOW_PAGES):
        yield first, min(_SCAN_WINDOW_PAGES, pages - first)


def _scan(region: MemoryRegion, slot: int, first: int, count: int) -> list[MemoryRun]:
    return list(page_runs(region.mapping, slot, first, count))


async def _write_mapped(fd: int, regions: list[MemoryRegion], config: bytes,
                        states: list[tuple[str, bytes]]) -> tuple[int, int, int]:  # fmt: skip
    """A version 3 snapshot into ``fd``: the slot images first (page-aligned, after room
    for the sections), then the sections at offset 0, the map carrying the images'
    checksums. Returns (bytes written, pages, zero pages): zero pages are holes."""

    def sections(entries: list[MemoryMapEntry]) -> bytes:
        parts = [encode_header(MAPPED_VERSION), encode_section(0, SectionKind.CONFIG, "config", config)]
        parts += [encode_section(i, SectionKind.STATE, name, payload) for i, (name, payload) in enumerate(states, 1)]
        parts.append(encode_section(len(states) + 1, SectionKind.MEMORY_MAP, "", encode_memory_map(entries)))
        parts.append(encode_section(len(states) + 2, SectionKind.END, "", b""))
        return b"".join(parts)

    placeholder = [MemoryMapEntry(slot, 0, region.pages, 0) for slot, region in enumerate(regions)]
    offset = -(-len(sections(placeholder)) // PAGE_SIZE) * PAGE_SIZE  # the map's size does not change
    entries: list[MemoryMapEntry] = []
    pages = zero_pages = written = 0
    for slot, region in enumerate(regions):
        crc = 0
        for first, count in _windows(region.pages):
            window = functools.partial(_write_image_window, fd, offset, region, slot, first, count, crc)
            crc, zeros = await anyio.to_thread.run_sync(window)
            zero_pages += zeros
            written += (count - zeros) * PAGE_SIZE
        entries.append(MemoryMapEntry(slot, offset, region.pages, crc))
        pages += region.pages
        offset += region.size
    head = sections(entries)
    await anyio.to_thread.run_sync(_write_head, fd, head, offset)
    return written + len(head), pages, zero_pages


def _write_image_window(fd: int, image_offset: int, region: MemoryRegion, slot: int, first: int, count: int,
                        crc: int) -> tuple[int, int]:  # fmt: skip
    """Pages ``first .. first+count-1`` of a slot into its image (zero runs left as holes);
    returns the image checksum so far and the zero pages seen."""
    runs = list(page_runs(region.mapping, slot, first, count))
    zeros = 0
    for run in runs:
        if run.data is None:
            zeros += run.pages
        else:
            pwrite_all(fd, run.data, image_offset + run.first_page * PAGE_SIZE)
    return image_checksum(iter(runs), crc), zeros


def _write_head(fd: int, head: bytes, size: int) -> None:
    os.ftruncate(fd, size)  # the images' trailing zero pages: a hole
    pwrite_all(fd, head, 0)


@contextlib.asynccontextmanager
async def _mapped_file(target: str | os.PathLike[str]) -> AsyncIterator[int]:
    """A temporary file's fd beside ``target``; renamed into place (after an fsync) once
    the body has finished, removed if it fails."""
    path = Path(target)
    try:
        make = functools.partial(tempfile.mkstemp, prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        fd, partial = await anyio.to_thread.run_sync(make)
    except OSError as exc:
        raise MigrationError(f"cannot write the snapshot {path}: {exc.strerror or exc}") from None
    try:
        yield fd
        await anyio.to_thread.run_sync(os.fsync, fd)
        await anyio.to_thread.run_sync(os.close, fd)
        fd = -1
        await anyio.to_thread.run_sync(os.replace, partial, path)
    except OSError as exc:
        _discard_fd(fd, partial)
        raise MigrationError(f"writing the snapshot {path} failed: {exc.strerror or exc}") from None
    except BaseException:
        _discard_fd(fd, partial)
        raise


def _discard_fd(fd: int, partial: str) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(partial)


# --- restore ---------------------------------------------------------------------------------------


async def restore_vm(source: SnapshotSource, config: VmConfig | None = None, *, console_output: ConsoleOutput = None,
                     console_input: ConsoleInput = None, kvm_path: str = "/dev/kvm",
                     adapt: Callable[[VmConfig], VmConfig] | None = None,
                     verify_memory: bool = False, map_memory: bool = True) -> VM:  # fmt: skip
    """A VM built from the snapshot or stream ``source``, its state applied, ready to
    ``run()`` on from where the source stopped. ``config`` (None: the snapshot's own,
    passed through ``adapt`` if given -- e.g. a destination's own disk paths) must have the
    source's shape -- memory, vCPUs, CPU template, devices -- or this raises
    ``MigrationError``, as it does for any problem with the stream; the VM built so far is
    then closed. A snapshot file (version 3) has its memory mapped, not read:
    ``verify_memory`` reads it first to check its checksums (every other section is always
    checked); ``map_memory=False`` copies it into the VM's own memory instead (slower, but
    the VM no longer depends on the file: a mapped file truncated under a running VM kills
    the process with SIGBUS at the next touch of a page it lost)."""
    from trivmm.vm import VM

    async with _source_for(source) as (stream, file):
        reader = StreamReader(stream)
        first = await reader.section()
        if first.kind is not SectionKind.CONFIG:
            raise MigrationError(f"the stream starts with a {first.kind.name} section, not its configuration")
        saved = _decode_config(first.payload)
        if config is None:
            config = saved.vm_config()
            if adapt is not None:
                try:
                    config = adapt(config)
                except (ConfigError, TypeError, ValueError) as exc:
                    raise MigrationError(f"the destination's configuration is not valid: {exc}") from None
        saved.check(config)
        build = functools.partial(VM, config, console_output=console_output, console_input=console_input,
                                  kvm_path=kvm_path, incoming=True)  # fmt: skip
        with anyio.CancelScope(shield=True):  # a VM built is a VM closed below
            vm = await anyio.to_thread.run_sync(build)
        try:
            await _receive(vm, saved, reader, file, verify_memory, map_memory)
            if file is not None and reader.version != MAPPED_VERSION:
                await reader.expect_end_of_input()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(vm.close)
            raise
    return vm


@contextlib.asynccontextmanager
async def _source_for(source: SnapshotSource) -> AsyncIterator[tuple[ByteSource, IO[bytes] | None]]:
    """``source`` as a byte source, and the file behind it (None for a stream)."""
    if not isinstance(source, str | os.PathLike):
        yield source, None
        return
    try:
        file = await anyio.to_thread.run_sync(open, source, "rb")
    except OSError as exc:
        raise MigrationError(f"cannot read the snapshot {source}: {exc.strerror or exc}") from None
    try:
        yield FileSource(file), file
    finally:
        file.close()


async def _receive(vm: VM, saved: SavedConfig, reader: StreamReader, file: IO[bytes] | None = None,
                   verify_memory: bool = False, map_memory: bool = True) -> None:  # fmt: skip
    """Read the sections after CONFIG into ``vm`` (built with ``incoming=True``); a version
    3 ``file``'s slot images are mapped once every section has been checked."""
    assert vm.memory is not None
    devices = vm_devices(vm)
    _refuse_unsaveable(devices)
    expected = _state_sections(vm, devices)
    if set(expected) != set(saved.sections):
        missing, extra = sorted(set(expected) - set(saved.sections)), sorted(set(saved.sections) - set(expected))
        raise MigrationError(f"the snapshot's state does not fit this VM: this VM also has {missing or 'nothing'}, "
                             f"the snapshot also has {extra or 'nothing'}")  # fmt: skip
    regions = saved_regions(vm)
    memory = _MemoryReceiver(regions)
    disks = DiskReceiver(vm, [disk.path for disk in saved.disks])
    states: dict[str, bytes] = {}
    vcpus: dict[str, VcpuState] = {}
    images: list[MemoryMapEntry] | None = None
    while True:
        section = await reader.section()
        if section.kind is SectionKind.END:
            break
        if section.kind is SectionKind.MEMORY_MAP:
            if file is None:
                raise MigrationError(f"section {section.sequence}: a memory map, but not in a snapshot file")
            if images is not None:
                raise MigrationError(f"section {section.sequence}: a second memory map")
            images = decode_memory_map(section.payload)
        elif section.kind is SectionKind.MEMORY:
            run = decode_run(section.payload, reader.version or VERSION)
            memory.check(run)
            await memory.write(run)
        elif section.kind is SectionKind.DISK:
            disk_run = decode_disk_run(section.payload)
            disks.check(disk_run)
            await disks.write(disk_run)
        elif section.kind is SectionKind.STATE:
            name = section.name
            if name not in saved.sections:
                raise MigrationError(f"section {section.sequence}: unknown state section {name!r}")
            if name in states:
                raise MigrationError(f"section {section.sequence}: state section {name!r} appears twice")
            if name.startswith("vcpu/"):
                vcpus[name] = decode_vcpu(section.payload, name)
            elif name in PLATFORM_SECTIONS:
                check_platform(name, section.payload)
            states[name] = section.payload
        else:
            raise MigrationError(f"section {section.sequence}: a second {section.kind.name} section")
    missing = [name for name in expected if name not in states]
    if missing:
        raise MigrationError(f"the stream ended without state section(s) {', '.join(missing)}")
    if reader.version == MAPPED_VERSION:
        if images is None:
            raise MigrationError("the snapshot file has no memory map")
        assert file is not None
        await anyio.to_thread.run_sync(_map_images, regions, images, file.fileno(), reader.sections_end,
                                       verify_memory, map_memory)  # fmt: skip
    else:
        memory.check_complete()
        await disks.finish()
    await anyio.to_thread.run_sync(_apply, vm, devices, states, vcpus)
    if vm.display is not None:
        vm.display.invalidate()  # its pages came from the stream, unseen by the dirty log: redraw it all
    vm.start_paused = not saved.running
    vm.incoming = False


def _map_images(regions: list[MemoryRegion], images: list[MemoryMapEntry], fd: int, sections_end: int,
                verify: bool, map_memory: bool = True) -> None:  # fmt: skip
    """Check a version 3 file's map against the slots and the file, then map each image
    copy-on-write over its slot (``verify``: check the images' checksums first;
    ``map_memory=False``: copy each image's data into the slot instead)."""
    if sorted(entry.slot for entry in images) != list(range(len(regions))):
        raise MigrationError(f"the memory map names slots {sorted(e.slot for e in images)}; "
                             f"this VM has {len(regions)}")  # fmt: skip
    size = os.fstat(fd).st_size
    extents = []
    for entry in images:
        region = regions[entry.slot]
        if entry.pages != region.pages:
            raise MigrationError(f"the memory map gives slot {entry.slot} {entry.pages} pages; it has {region.pages}")
        end = entry.file_offset + region.size
        if entry.file_offset < sections_end or end > size:
            raise MigrationError(f"slot {entry.slot}'s image (bytes {entry.file_offset}..{end}) is not inside "
                                 f"the file's {size} bytes after its sections (truncated or corrupt)")  # fmt: skip
        extents.append((entry.file_offset, end))
    extents.sort()
    if extents[-1][1] != size:
        raise MigrationError(f"the snapshot file has {size - extents[-1][1]} bytes after its last memory image")
    if any(a_end > b_start for (_, a_end), (b_start, _) in itertools.pairwise(extents)):
        raise MigrationError("the memory map's slot images overlap")
    if verify:
        for entry in images:
            _verify_image(fd, entry)
    for entry in images:
        try:
            if map_memory:
                regions[entry.slot].map_file_private(fd, entry.file_offset)
            else:
                _read_image(fd, entry.file_offset, regions[entry.slot])
        except (OSError, ValueError) as exc:
            raise MigrationError(f"cannot {'map' if map_memory else 'read'} slot {entry.slot}'s image: {exc}") from None


def _read_image(fd: int, offset: int, region: MemoryRegion) -> None:
    """Copy an image's data extents (SEEK_DATA/SEEK_HOLE: holes are zero pages, left
    untouched in the fresh slot) into ``region``."""
    end = offset + region.size
    at = offset
    with memoryview(region.mapping) as memory:
        while at < end:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after ``at``
                return
            if data >= end:
                return
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            view = memory[data - offset : hole - offset]
            while view:
                count = os.preadv(fd, [view], data)
                if count <= 0:
                    raise OSError(f"the file ended at byte {data} inside slot data")
                view, data = view[count:], data + count
            at = hole


def _verify_image(fd: int, entry: MemoryMapEntry) -> None:
    with mmap.mmap(fd, entry.pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ,
                   offset=entry.file_offset) as image:  # fmt: skip
        crc = 0
        for first, count in _windows(entry.pages):
            crc = image_checksum(page_runs(image, entry.slot, first, count), crc)
    if crc != entry.checksum:
        raise MigrationError(f"slot {entry.slot}'s memory image has a bad checksum (the snapshot file is corrupt)")


def _apply(vm: VM, devices: DeviceSet, states: dict[str, bytes], vcpus: dict[str, VcpuState]) -> None:
    """Apply checked state to a VM whose vCPUs never ran: vCPUs, their host-quirk hooks,
    the in-kernel platform, then the devices (which may raise interrupt lines again)."""
    assert vm.vm is not None
    for index, vcpu in enumerate(vm.vcpus):
        apply_vcpu(vcpu, vcpus[f"vcpu/{index}"])
    for index, runner in enumerate(vm.runners):
        name = f"quirks/{index}"
        if name in states:
            apply_quirks(runner.hooks, states[name], name)
    apply_platform(vm.vm, {name: states[name] for name in PLATFORM_SECTIONS}, vm.vcpus)
    for name, provider in devices.providers.items():
        section = DEVICE_PREFIX + name
        try:
            provider.restore_state(states[section])
        except ValueError as exc:
            raise MigrationError(f"{section}: {exc}") from None


class _MemoryReceiver:
    """Checks each run against the VM's slots -- in order, no gaps, no overlaps, inside
    the slot -- and writes it into guest memory. A RESEND run (stream version 2) may
    replace any pages the first pass has already covered."""

    def __init__(self, regions: list[MemoryRegion]) -> None:
        self._regions = regions
        self._next = [0] * len(self._regions)

    def check(self, run: MemoryRun) -> None:
        if run.slot >= len(self._regions):
            raise MigrationError(f"memory run for slot {run.slot}; this VM has {len(self._regions)} slots")
        region, expected = self._regions[run.slot], self._next[run.slot]
        if run.resend:
            if run.first_page + run.pages > expected:
                raise MigrationError(f"memory run resends pages {run.first_page}..{run.first_page + run.pages - 1} "
                                     f"of slot {run.slot}, of which only pages below {expected} were sent")  # fmt: skip
            return
        if run.first_page != expected:
            raise MigrationError(f"memory run at page {run.first_page} of slot {run.slot}, where page {expected} "
                                 "was due (pages missing, repeated or out of order)")  # fmt: skip
        if run.first_page + run.pages > region.pages:
            raise MigrationError(f"memory run of {run.pages} pages at page {run.first_page} runs past slot "
                                 f"{run.slot}'s {region.pages} pages")  # fmt: skip

    async def write(self, run: MemoryRun) -> None:
        region = self._regions[run.slot]
        start, length = run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE
        if run.data is None:  # zero pages: dropped from the mapping (reads as zero, costs no memory)
            region.mapping.madvise(mmap.MADV_DONTNEED, start, length)
        else:
            await anyio.to_thread.run_sync(_copy_into, region.mapping, start, run.data)
        if not run.resend:
            self._next[run.slot] += run.pages

    def check_complete(self) -> None:
        short = [f"slot {slot}: {done} of {region.pages} pages"
                 for slot, (region, done) in enumerate(zip(self._regions, self._next, strict=True))
                 if done != region.pages]  # fmt: skip
        if short:
            raise MigrationError(f"the stream ended before all guest memory was sent ({'; '.join(short)})")


def _copy_into(mapping: mmap.mmap, start: int, data: bytes) -> None:
    mapping[start : start + len(data)] = data
