"""The guest's physical memory map, as e820 entries (boot_params) or PVH memmap entries."""

from __future__ import annotations

import attrs

from trivmm.boot.layout import ACPI_START, EBDA_START, HIMEM_START

__all__ = ["E820Entry", "E820_RAM", "E820_RESERVED", "memory_map"]

E820_RAM = 1
E820_RESERVED = 2


@attrs.frozen
class E820Entry:
    address: int
    size: int
    type: int


def memory_map(ram: list[tuple[int, int]]) -> list[E820Entry]:
    """RAM below the EBDA, the EBDA and BIOS area reserved, then RAM from 1 MiB on."""
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
        E820Entry(ACPI_START, HIMEM_START - ACPI_START, E820_RESERVED),
    ]
    for base, size in ram:
        start = max(base, HIMEM_START)
        if base + size > start:
            entries.append(E820Entry(start, base + size - start, E820_RAM))
    return entries
