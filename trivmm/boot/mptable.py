"""Intel MultiProcessor Specification 1.4 tables, for kernels without ACPI.

Layout at ``EBDA_START``: the 16-byte floating pointer, then the configuration table: one
processor entry per vCPU (APIC id = vCPU index), an ISA bus, the IOAPIC, ISA IRQs 0-15
wired one-to-one to IOAPIC pins 0-15 (KVM's default GSI routing), and LINT0/LINT1 as
ExtINT/NMI.
"""

from __future__ import annotations

import functools
import struct

from trivmm.boot.layout import EBDA_START, IOAPIC_ADDRESS, LAPIC_ADDRESS

__all__ = ["build_mptable", "MAX_CPUS", "ioapic_id"]

MAX_CPUS = 254
_APIC_VERSION = 0x14
_IOAPIC_VERSION = 0x11
_CPU_ENABLED, _CPU_BSP = 0x01, 0x02
_CPU_SIGNATURE = 0x600  # family 6
_CPU_FEATURES = 0x201  # FPU | APIC
_BUS_ISA = 0
_MP_INT, _MP_NMI, _MP_EXTINT = 0, 1, 3
_LEGACY_IRQS = 16


def ioapic_id(vcpus: int) -> int:
    return vcpus  # the first id after the CPUs'


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


@functools.lru_cache(maxsize=32)
def build_mptable(vcpus: int, address: int = EBDA_START) -> bytes:
    """Return the floating pointer and configuration table, to be written at ``address``.
    (Immutable bytes that depend on nothing else: cached per process.)"""
    if not 1 <= vcpus <= MAX_CPUS:
        raise ValueError(f"an MP table describes 1..{MAX_CPUS} CPUs, not {vcpus}")
    entries = []
    for cpu in range(vcpus):
        flags = _CPU_ENABLED | (_CPU_BSP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, cpu, _APIC_VERSION, flags, _CPU_SIGNATURE, _CPU_FEATURES))
    entries.append(struct.pack("<BB6s", 1, _BUS_ISA, b"ISA   "))
    io_apic = ioapic_id(vcpus)
    entries.append(struct.pack("<BBBBI", 2, io_apic, _IOAPIC_VERSION, 1, IOAPIC_ADDRESS))
    for irq in range(_LEGACY_IRQS):
        entries.append(struct.pack("<BBHBBBB", 3, _MP_INT, 0, _BUS_ISA, irq, io_apic, irq))
    entries.append(struct.pack("<BBHBBBB", 4, _MP_EXTINT, 0, _BUS_ISA, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", 4, _MP_NMI, 0, _BUS_ISA, 0, 0xFF, 1))
    body = b"".join(entries)
    table_address = address + 16
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBx", b"PCMP", 44 + len(body), 4, 0,
                                   b"TRIVMM  ", b"TRIVMM MP   ", 0, 0, len(entries),
                                   LAPIC_ADDRESS, 0, 0))  # fmt: skip
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", table_address, 1, 4, 0, 0))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(header) + body
