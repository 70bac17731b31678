"""Put a Linux kernel, its initrd and command line into guest memory; say how to enter it.

Three ways in, one entry state each:

* ``linux64`` for a bzImage: the 64-bit boot protocol -- protected-mode kernel at 1 MiB,
  zero page (``boot_params``) with the image's own setup header, entry at +0x200 in long
  mode with an identity map of the first 4 GiB, RSI = zero page; the kernel's own
  decompressor then unpacks the payload in the guest;
* ``linux64`` for an ELF vmlinux, as Firecracker does: segments at their physical
  addresses, entry at ``e_entry`` in long mode, RSI = a zero page with a minimal header;
* ``pvh`` for an ELF vmlinux with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note: 32-bit protected
  mode, paging off, EBX = ``hvm_start_info`` (memmap, command line, initrd as module 0).
  A bzImage is booted this way too unless ``linux64`` is asked for: the loader unpacks its
  payload (``extract_vmlinux``) and, when that is an ELF vmlinux with the PVH note, loads
  the vmlinux as above -- the guest's decompressor never runs. A payload it cannot unpack,
  or a kernel without the note, boots by ``linux64`` under ``auto`` and is refused under
  ``pvh``. ``BootEntry.unpacked`` says which happened.

A display (``screen``: ``trivmm.boot.screen_info``) is announced in the zero page's
``screen_info``, which only ``linux64`` has: under ``auto`` a display makes a Linux kernel
(a bzImage, unpacked by trivmm all the same, or an ELF vmlinux with Linux's ELF notes) boot
by ``linux64`` through its 64-bit entry rather than PVH.

All of them get the same MP table and ACPI tables. Every size and address that comes from
the files is checked before it is used; a bad image is a ``KernelImageError``.
"""

from __future__ import annotations

import enum
import functools
import logging
import struct

import attrs

from trivmm.boot import layout
from trivmm.boot.acpi import acpi_tables
from trivmm.boot.bzimage import KernelImageError, SetupHeader, extract_vmlinux, payload_compression
from trivmm.boot.e820 import E820Entry, memory_map
from trivmm.boot.elf import ElfImage
from trivmm.boot.layout import PciLayout
from trivmm.boot.mptable import build_mptable
from trivmm.boot.screen_info import ScreenInfo
from trivmm.memory import GuestMemory, GuestMemoryError

__all__ = ["BootProtocol", "BootEntry", "check_kernel", "load_kernel", "KernelImageError"]

_PAGE = 0x1000
_PDE_2M = 0x83  # present | writable | 2 MiB page
_PTE_TABLE = 0x03  # present | writable
_GDT_NULL = 0
_GDT_CODE64 = 0x00AF_9B00_0000_FFFF
_GDT_CODE32 = 0x00CF_9B00_0000_FFFF
_GDT_DATA = 0x00CF_9300_0000_FFFF
_GDT_TSS = 0x0080_8B00_0000_FFFF
_ELF_INITRD_ADDR_MAX = 0x7FFF_FFFF
_ELF_KERNEL_ALIGNMENT = 0x0100_0000
_BOOT_PROTOCOL_VERSION = 0x020F
_LOADER_TYPE_UNDEFINED = 0xFF
_HVM_START_MAGIC = 0x336E_C578
_E820_MAX = 128
_ZERO_CHUNK = 1 << 20  # zero a segment's bss this much at a time: no buffer as large as the bss
_PVH_ENTRY_LIMIT = 1 << 32  # the PVH entry runs in 32-bit protected mode
_log = logging.getLogger(__name__)


class BootProtocol(enum.Enum):
    LINUX64 = "linux64"
    PVH = "pvh"


@attrs.frozen
class BootEntry:
    """The BSP's entry state: mode, instruction pointer and the pointer register's value."""

    protocol: BootProtocol
    rip: int
    boot_info: int  # RSI (zero page) for linux64, EBX (hvm_start_info) for PVH
    kernel_end: int
    initrd: tuple[int, int] | None
    # The compression of a bzImage's payload that the loader unpacked to load the vmlinux
    # inside it ("lz4", ...); None when the kernel was loaded as it was given.
    unpacked: str | None = None


def _write(memory: GuestMemory, address: int, data: bytes | memoryview, what: str) -> None:
    try:
        memory.write(address, data)
    except GuestMemoryError:
        raise KernelImageError(
            f"{what} ({len(data)} bytes at {address:#x}) does not fit in {memory.size >> 20} MiB of guest memory"
        ) from None


def _check_segments_fit(memory: GuestMemory, elf: ElfImage) -> None:
    """Refuse, before anything is written or allocated, segments that do not fit in guest RAM."""
    total = 0
    for segment in elf.segments:
        if segment.paddr < layout.HIMEM_START:
            raise KernelImageError(f"ELF segment at {segment.paddr:#x} is below 1 MiB")
        if not memory.contains(segment.paddr, segment.memsz):
            raise KernelImageError(f"ELF segment of {segment.memsz:#x} bytes at {segment.paddr:#x} does not fit "
                                   f"in {memory.size >> 20} MiB of guest memory")  # fmt: skip
        total += segment.memsz
    if total > memory.size:
        raise KernelImageError(f"ELF segments need {total:#x} bytes together; the guest has {memory.size >> 20} MiB")


def _load_segments(memory: GuestMemory, elf: ElfImage) -> None:
    """Copy each segment's file bytes; zero the rest up to its memsz, a bounded chunk at a time."""
    for segment in elf.segments:
        memory.write(segment.paddr, segment.data)
        address, end = segment.paddr + len(segment.data), segment.paddr + segment.memsz
        while address < end:
            length = min(_ZERO_CHUNK, end - address)
            memory.fill(address, length)
            address += length


@functools.cache
def _page_tables() -> tuple[bytes, bytes, bytes]:
    """PML4, PDPT and page directories of the identity map of the first 4 GiB (2 MiB
    pages): the same bytes for every guest, built once per process."""
    pml4 = struct.pack("<Q", layout.PDPT | _PTE_TABLE)
    pdpt = struct.pack(f"<{layout.PD_PAGES}Q", *((layout.PD + i * _PAGE) | _PTE_TABLE for i in range(layout.PD_PAGES)))
    entries = layout.PD_PAGES * 512
    pd = struct.pack(f"<{entries}Q", *((j << 21) | _PDE_2M for j in range(entries)))
    return pml4, pdpt, pd


def _write_page_tables(memory: GuestMemory) -> None:
    pml4, pdpt, pd = _page_tables()
    memory.write(layout.PML4, pml4)
    memory.write(layout.PDPT, pdpt)
    memory.write(layout.PD, pd)


def _gdt_and_idt(protocol: BootProtocol) -> bytes:
    """The bytes from ``layout.GDT`` on: the GDT, then the empty IDT written over its
    last 8 bytes (``layout.IDT`` is GDT + 0x20: the TSS descriptor's place)."""
    code = _GDT_CODE64 if protocol is BootProtocol.LINUX64 else _GDT_CODE32
    area = bytearray(struct.pack("<5Q", _GDT_NULL, _GDT_NULL, code, _GDT_DATA, _GDT_TSS))
    idt = layout.IDT - layout.GDT
    assert 0 <= idt <= len(area) - 8, "the IDT is expected over the GDT's last entry"
    area[idt : idt + 8] = bytes(8)
    return bytes(area)


_GDT_AND_IDT = {protocol: _gdt_and_idt(protocol) for protocol in BootProtocol}


def _write_gdt(memory: GuestMemory, protocol: BootProtocol) -> None:
    memory.write(layout.GDT, _GDT_AND_IDT[protocol])


def _place_initrd(memory: GuestMemory, initrd: bytes, kernel_end: int, addr_max: int) -> int:
    low_end = memory.regions[0].guest_end
    top = min(addr_max + 1, low_end)
    address = (top - len(initrd)) & ~(_PAGE - 1)
    if address < kernel_end:
        raise KernelImageError(
            f"initrd of {len(initrd)} bytes does not fit between the kernel's end ({kernel_end:#x}) "
            f"and {top:#x}: give the guest more memory"
        )
    _write(memory, address, initrd, "initrd")
    return address


def _cmdline_bytes(cmdline: str, limit: int) -> bytes:
    data = cmdline.encode() + b"\0"
    if b"\0" in data[:-1]:
        raise KernelImageError("kernel command line contains a NUL byte")
    if len(data) > limit:
        raise KernelImageError(f"kernel command line is {len(data) - 1} bytes; this kernel takes at most {limit - 1}")
    return data


def _zero_page(setup_raw: bytes, cmdline_size: int, initrd: tuple[int, int] | None,
               e820: tuple[E820Entry, ...], rsdp: int, screen: ScreenInfo | None = None) -> bytes:  # fmt: skip
    page = bytearray(_PAGE)
    if screen is not None:
        info = screen.pack()
        page[: len(info)] = info  # struct screen_info opens boot_params
    page[0x1F1 : 0x1F1 + len(setup_raw)] = setup_raw
    struct.pack_into("<B", page, 0x210, _LOADER_TYPE_UNDEFINED)  # type_of_loader
    struct.pack_into("<I", page, 0x228, layout.CMDLINE)  # cmd_line_ptr
    struct.pack_into("<I", page, 0x238, cmdline_size)
    if initrd:
        address, size = initrd
        struct.pack_into("<II", page, 0x218, address & 0xFFFF_FFFF, size & 0xFFFF_FFFF)
        struct.pack_into("<II", page, 0x0C0, address >> 32, size >> 32)  # ext_ramdisk_*
    if len(e820) > _E820_MAX:
        raise KernelImageError(f"{len(e820)} memory map entries exceed the zero page's {_E820_MAX}")
    struct.pack_into("<B", page, 0x1E8, len(e820))
    for i, entry in enumerate(e820):
        struct.pack_into("<QQI", page, 0x2D0 + 20 * i, entry.address, entry.size, entry.type)
    struct.pack_into("<Q", page, 0x070, rsdp)  # acpi_rsdp_addr
    return bytes(page)


def _elf_setup_header(cmdline_size: int) -> bytes:
    """The fields of a setup header a kernel entered at startup_64 reads (boot.rst)."""
    raw = bytearray(0x268 - 0x1F1)

    def put(offset: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, raw, offset - 0x1F1, value)

    put(0x1FE, "<H", 0xAA55)
    put(0x202, "<I", 0x5372_6448)
    put(0x206, "<H", _BOOT_PROTOCOL_VERSION)
    put(0x22C, "<I", _ELF_INITRD_ADDR_MAX)
    put(0x230, "<I", _ELF_KERNEL_ALIGNMENT)
    put(0x238, "<I", cmdline_size)
    return bytes(raw)


@functools.lru_cache(maxsize=32)
def _memory_map(ram: tuple[tuple[int, int], ...]) -> tuple[tuple[E820Entry, ...], bytes]:
    """The e820 map of guest RAM ``ram`` and the same as PVH memmap entries, as bytes."""
    e820 = tuple(memory_map(list(ram)))
    return e820, b"".join(struct.pack("<QQII", entry.address, entry.size, entry.type, 0) for entry in e820)


def _hvm_start_info(memory: GuestMemory, cmdline_size: int, initrd: tuple[int, int] | None,
                    e820: tuple[E820Entry, ...], pvh_memmap: bytes, rsdp: int) -> None:  # fmt: skip
    max_entries = (layout.ZERO_PAGE - layout.PVH_MEMMAP) // 24
    if len(e820) > max_entries:
        raise KernelImageError(f"{len(e820)} memory map entries exceed PVH's room for {max_entries}")
    memory.write(layout.PVH_MEMMAP, pvh_memmap)
    modules = 0
    if initrd:
        memory.write(layout.PVH_MODLIST, struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0))
        modules = 1
    info = struct.pack("<IIIIQQQQII", _HVM_START_MAGIC, 1, 0, modules, layout.PVH_MODLIST if modules else 0,
                       layout.CMDLINE, rsdp, layout.PVH_MEMMAP, len(e820), 0)  # fmt: skip
    memory.write(layout.PVH_START_INFO, info)


def check_kernel(kernel: bytes) -> None:
    """Raise ``KernelImageError`` unless ``kernel`` parses as a bzImage or an ELF vmlinux."""
    if kernel[:4] == b"\x7fELF":
        ElfImage.parse(kernel)
        return
    try:
        SetupHeader.parse(kernel)
    except KernelImageError as exc:
        raise KernelImageError(f"not a bzImage or an ELF vmlinux: {exc}") from None


def _unpack_bzimage(kernel: bytes, *, required: bool, need_pvh: bool = True) -> tuple[ElfImage, str] | None:
    """The vmlinux inside a bzImage and its payload's compression, when it has a PVH entry
    (or ``need_pvh`` is false); else None, or -- ``required`` -- a ``KernelImageError`` that
    says why not."""
    try:
        compression = payload_compression(kernel)
        elf = ElfImage.parse(extract_vmlinux(kernel))
    except KernelImageError as exc:
        if required:
            raise KernelImageError(f"PVH entry into a bzImage needs its payload unpacked: {exc}") from None
        _log.info("bzImage payload not unpacked (%s): entering by the 64-bit boot protocol", exc)
        return None
    if elf.pvh_entry is None and need_pvh:
        if required:
            raise KernelImageError("the bzImage's vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
        _log.info("bzImage's vmlinux has no PVH entry note: entering by the 64-bit boot protocol")
        return None
    return elf, compression


def load_kernel(memory: GuestMemory, kernel: bytes, *, initrd: bytes | None = None,
                cmdline: str = "", vcpus: int = 1, protocol: str = "auto", pci: PciLayout | None = None,
                virtio_mmio: tuple[tuple[int, int, int], ...] = (),
                screen: ScreenInfo | None = None) -> BootEntry:  # fmt: skip
    """Lay out the kernel and everything it is booted with; return the BSP's entry state.
    ``pci`` and ``virtio_mmio`` ((base, size, gsi) each) are announced in the ACPI tables,
    ``screen`` (a framebuffer) in the zero page."""
    if protocol not in ("auto", "linux64", "pvh"):
        raise ValueError(f"unknown boot protocol {protocol!r} (auto, linux64, pvh)")
    # A display needs the zero page: under auto, Linux is entered by linux64 (see the docstring).
    linux64_for_linux = screen is not None and protocol == "auto"
    elf: ElfImage | None = None
    header: SetupHeader | None = None
    unpacked: str | None = None
    if kernel[:4] == b"\x7fELF":
        elf = ElfImage.parse(kernel)
    else:
        try:
            header = SetupHeader.parse(kernel)
        except KernelImageError as exc:
            raise KernelImageError(f"not a bzImage or an ELF vmlinux: {exc}") from None
        if protocol != "linux64":
            found = _unpack_bzimage(kernel, required=protocol == "pvh", need_pvh=not linux64_for_linux)
            if found is not None:
                elf, unpacked = found
    if elf is not None:
        if protocol == "pvh" and elf.pvh_entry is None:
            raise KernelImageError("kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
        linux = elf.linux or header is not None  # a vmlinux, or one unpacked from a bzImage
        pvh = protocol != "linux64" and elf.pvh_entry is not None and not (linux64_for_linux and linux)
        mode = BootProtocol.PVH if pvh else BootProtocol.LINUX64
        if mode is BootProtocol.PVH and elf.pvh_entry is not None and elf.pvh_entry >= _PVH_ENTRY_LIMIT:
            raise KernelImageError(f"PVH entry {elf.pvh_entry:#x} is not a 32-bit address")
        _check_segments_fit(memory, elf)
    else:
        mode = BootProtocol.LINUX64

    cmdline_limit = layout.CMDLINE_MAX
    if header is not None and header.cmdline_size:  # the bzImage's limit holds for its vmlinux too
        cmdline_limit = min(cmdline_limit, header.cmdline_size + 1)
    cmd = _cmdline_bytes(cmdline, cmdline_limit)

    memory.write(layout.CMDLINE, cmd)
    _write_page_tables(memory)
    _write_gdt(memory, mode)
    memory.write(layout.EBDA_START, build_mptable(vcpus))
    acpi = acpi_tables(vcpus, pci=pci, virtio_mmio=virtio_mmio)
    for address, blob in acpi.blobs:
        memory.write(address, blob)
    e820, pvh_memmap = _memory_map(tuple((r.guest_base, r.size) for r in memory))

    if elf is not None:
        _load_segments(memory, elf)
        kernel_end = elf.end
        addr_max = _ELF_INITRD_ADDR_MAX
        entry = elf.pvh_entry if mode is BootProtocol.PVH else elf.entry
        setup_raw = _elf_setup_header(len(cmd) - 1)
    else:
        assert header is not None
        image = memoryview(kernel)[header.setup_size :]
        _write(memory, layout.HIMEM_START, image, "kernel")
        decompressed_end = max(header.pref_address, layout.HIMEM_START) + header.init_size
        kernel_end = max(layout.HIMEM_START + len(image), decompressed_end)
        if not memory.contains(layout.HIMEM_START, kernel_end - layout.HIMEM_START):
            raise KernelImageError(
                f"kernel needs memory up to {kernel_end:#x} to unpack; the guest has {memory.size >> 20} MiB")
        addr_max = header.initrd_addr_max
        entry = layout.HIMEM_START + 0x200
        setup_raw = header.raw

    placed = None
    if initrd:
        placed = (_place_initrd(memory, initrd, kernel_end, addr_max), len(initrd))

    if mode is BootProtocol.PVH:
        if screen is not None:
            _log.warning("the display is not announced: PVH entry has no screen_info (boot by linux64 for it)")
        _hvm_start_info(memory, len(cmd) - 1, placed, e820, pvh_memmap, acpi.rsdp_address)
        boot_info = layout.PVH_START_INFO
    else:
        memory.write(layout.ZERO_PAGE, _zero_page(setup_raw, len(cmd) - 1, placed, e820, acpi.rsdp_address, screen))
        boot_info = layout.ZERO_PAGE
    assert entry is not None
    return BootEntry(mode, entry, boot_info, kernel_end, placed, unpacked)
