"""Where trivmm puts things in guest-physical memory (x86-64), Firecracker-like."""

from __future__ import annotations

__all__ = ["GDT", "IDT", "PVH_START_INFO", "PVH_MEMMAP", "PVH_MODLIST", "ZERO_PAGE",
           "BOOT_STACK", "PML4", "PDPT", "PD", "PD_PAGES", "CMDLINE", "CMDLINE_MAX", "EBDA_START",
           "BIOS_START", "ACPI_START", "HIMEM_START", "MMIO_GAP_START", "MMIO_GAP_END",
           "IOAPIC_ADDRESS", "LAPIC_ADDRESS", "MIN_MEMORY", "ram_ranges"]  # fmt: skip

GDT = 0x500
IDT = 0x520
PVH_START_INFO = 0x6000
PVH_MODLIST = 0x6040  # one 32-byte module entry (the initrd)
PVH_MEMMAP = 0x6080  # up to 32 24-byte entries, below ZERO_PAGE
ZERO_PAGE = 0x7000
BOOT_STACK = 0x8FF0
PML4 = 0x9000
PDPT = 0xA000
PD = 0xB000  # four page directories: identity-map the first 4 GiB with 2 MiB pages
PD_PAGES = 4
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00  # MP table (the kernel scans 639K..640K)
BIOS_START = 0xA0000
ACPI_START = 0xE0000  # RSDP, then the other ACPI tables, up to 1 MiB
HIMEM_START = 0x100000
MMIO_GAP_START = 0xC000_0000  # 3 GiB .. 4 GiB: device MMIO, IOAPIC, LAPIC
MMIO_GAP_END = 1 << 32
IOAPIC_ADDRESS = 0xFEC0_0000
LAPIC_ADDRESS = 0xFEE0_0000
MIN_MEMORY = 2 << 20


def ram_ranges(memory_size: int) -> list[tuple[int, int]]:
    """Guest RAM as (base, size): below the MMIO gap, then from 4 GiB on."""
    if memory_size < MIN_MEMORY:
        raise ValueError(f"guest memory must be at least {MIN_MEMORY >> 20} MiB")
    low = min(memory_size, MMIO_GAP_START)
    ranges = [(0, low)]
    if memory_size > low:
        ranges.append((MMIO_GAP_END, memory_size - low))
    return ranges
