"""Put a Linux kernel, its initrd and command line into guest memory; say how to enter it.

Three ways in, one entry state each:

* ``linux64`` for a bzImage: the 64-bit boot protocol -- protected-mode kernel at 1 MiB,
  zero page (``boot_params``) with the image's own setup header, entry at +0x200 in long
  mode with an identity map of the first 4 GiB, RSI = zero page;
* ``linux64`` for an ELF vmlinux, as Firecracker does: segments at their physical
  addresses, entry at ``e_entry`` in long mode, RSI = a zero page with a minimal header;
* ``pvh`` for an ELF vmlinux with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note: 32-bit protected
  mode, paging off, EBX = ``hvm_start_info`` (memmap, command line, initrd as module 0).

All of them get the same MP table and ACPI tables. Every size and address that comes from
the files is checked before it is used; a bad image is a ``KernelImageError``.
"""

from __future__ import annotations

import enum
import struct

import attrs

from trivmm.boot import layout
from trivmm.boot.acpi import AcpiTables
from trivmm.boot.bzimage import KernelImageError, SetupHeader
from trivmm.boot.e820 import E820Entry, memory_map
from trivmm.boot.elf import ElfImage
from trivmm.boot.mptable import build_mptable
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


def _write(memory: GuestMemory, address: int, data: bytes, what: str) -> None:
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


def _write_page_tables(memory: GuestMemory) -> None:
    memory.write_u64(layout.PML4, layout.PDPT | _PTE_TABLE)
    for i in range(layout.PD_PAGES):
        memory.write_u64(layout.PDPT + 8 * i, (layout.PD + i * _PAGE) | _PTE_TABLE)
    entries = layout.PD_PAGES * 512
    memory.write(layout.PD, struct.pack(f"<{entries}Q", *((j << 21) | _PDE_2M for j in range(entries))))


def _write_gdt(memory: GuestMemory, protocol: BootProtocol) -> None:
    code = _GDT_CODE64 if protocol is BootProtocol.LINUX64 else _GDT_CODE32
    memory.write(layout.GDT, struct.pack("<5Q", _GDT_NULL, _GDT_NULL, code, _GDT_DATA, _GDT_TSS))
    memory.write_u64(layout.IDT, 0)


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
               e820: list[E820Entry], rsdp: int) -> bytes:  # fmt: skip
    page = bytearray(_PAGE)
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


def _hvm_start_info(memory: GuestMemory, cmdline_size: int, initrd: tuple[int, int] | None,
                    e820: list[E820Entry], rsdp: int) -> None:  # fmt: skip
    max_entries = (layout.ZERO_PAGE - layout.PVH_MEMMAP) // 24
    if len(e820) > max_entries:
        raise KernelImageError(f"{len(e820)} memory map entries exceed PVH's room for {max_entries}")
    for i, entry in enumerate(e820):
        memory.write(layout.PVH_MEMMAP + 24 * i, struct.pack("<QQII", entry.address, entry.size, entry.type, 0))
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


def load_kernel(memory: GuestMemory, kernel: bytes, *, initrd: bytes | None = None,
                cmdline: str = "", vcpus: int = 1, protocol: str = "auto") -> BootEntry:  # fmt: skip
    """Lay out the kernel and everything it is booted with; return the BSP's entry state."""
    if protocol not in ("auto", "linux64", "pvh"):
        raise ValueError(f"unknown boot protocol {protocol!r} (auto, linux64, pvh)")
    elf: ElfImage | None = None
    header: SetupHeader | None = None
    if kernel[:4] == b"\x7fELF":
        elf = ElfImage.parse(kernel)
        if protocol == "pvh" and elf.pvh_entry is None:
            raise KernelImageError("kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
        mode = BootProtocol.PVH if protocol != "linux64" and elf.pvh_entry is not None else BootProtocol.LINUX64
        if mode is BootProtocol.PVH and elf.pvh_entry is not None and elf.pvh_entry >= _PVH_ENTRY_LIMIT:
            raise KernelImageError(f"PVH entry {elf.pvh_entry:#x} is not a 32-bit address")
        _check_segments_fit(memory, elf)
    else:
        try:
            header = SetupHeader.parse(kernel)
        except KernelImageError as exc:
            raise KernelImageError(f"not a bzImage or an ELF vmlinux: {exc}") from None
        if protocol == "pvh":
            raise KernelImageError("PVH entry needs an ELF vmlinux, not a bzImage")
        mode = BootProtocol.LINUX64

    cmdline_limit = layout.CMDLINE_MAX
    if header is not None and header.cmdline_size:
        cmdline_limit = min(cmdline_limit, header.cmdline_size + 1)
    cmd = _cmdline_bytes(cmdline, cmdline_limit)

    memory.write(layout.CMDLINE, cmd)
    _write_page_tables(memory)
    _write_gdt(memory, mode)
    memory.write(layout.EBDA_START, build_mptable(vcpus))
    acpi = AcpiTables(vcpus)
    for address, blob in acpi.blobs:
        memory.write(address, blob)
    e820 = memory_map([(r.guest_base, r.size) for r in memory])

    if elf is not None:
        _load_segments(memory, elf)
        kernel_end = elf.end
        addr_max = _ELF_INITRD_ADDR_MAX
        entry = elf.pvh_entry if mode is BootProtocol.PVH else elf.entry
        setup_raw = _elf_setup_header(len(cmd) - 1)
    else:
        assert header is not None
        image = kernel[header.setup_size :]
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
        _hvm_start_info(memory, len(cmd) - 1, placed, e820, acpi.rsdp_address)
        boot_info = layout.PVH_START_INFO
    else:
        memory.write(layout.ZERO_PAGE, _zero_page(setup_raw, len(cmd) - 1, placed, e820, acpi.rsdp_address))
        boot_info = layout.ZERO_PAGE
    assert entry is not None
    return BootEntry(mode, entry, boot_info, kernel_end, placed)
