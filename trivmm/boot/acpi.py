"""ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT}, written at ``ACPI_START``.

The FADT describes PIIX4-like fixed hardware at PIO 0x600 (``trivmm.devices.acpi_pm``):
PM1a event and control blocks, a reset register and a fixed-feature power button (its SCI
is IRQ 9), no SMI command port (the platform is born in ACPI mode). The DSDT holds
``\\_S5`` = {5, 5, 0, 0}, which is what a kernel needs to power off through PM1a control,
and the devices a guest finds only through ACPI: the pvpanic device (``\\_SB.PEVT``,
``QEMU0001``, its port in ``_CRS``). The MADT lists one enabled local APIC per vCPU and the
IOAPIC; ISA IRQs map to GSIs one-to-one (no overrides), as KVM routes them.

With a ``PciLayout`` (a VM with PCI), the XSDT also lists an MCFG (the ECAM of segment 0,
buses 0..ecam_buses-1), and the DSDT grows a PCI Express root bridge and a motherboard
resource device (the tables without PCI are unchanged, byte for byte):

    \\_SB.PCI0  _HID PNP0A08, _CID PNP0A03, _SEG 0, _BBN 0, _UID 0
               _CRS: the bus range of the MCFG; IO 0xCF8..0xCFF (consumed); the I/O,
                     32-bit and 64-bit memory windows BARs are assigned from
               _PRT: INTA..INTD of slots 1..31, swizzled onto the layout's IOAPIC GSIs
                     (no link devices: Linux makes them level, active-low; KVM's IOAPIC
                     ignores polarity, so the VMM raises a line with level 1)
    \\_SB.MBRD  _HID PNP0C02, _CRS: the ECAM (PCI Firmware 3.3, 4.1.2: Linux uses MCFG only
               when a motherboard resource reserves it)

No ``_OSC``: Linux then keeps the platform's control of PCIe features (hotplug, AER, PME),
none of which trivmm has, and turns ASPM off; MSI and MSI-X do not depend on it.
"""

from __future__ import annotations

import functools
import struct

from trivmm.boot.layout import ACPI_START, BIOS_START, HIMEM_START, IOAPIC_ADDRESS, LAPIC_ADDRESS, PciLayout
from trivmm.boot.mptable import ioapic_id
from trivmm.devices.acpi_pm import (
    ACPI_PM_PORT,
    PM1_CONTROL_OFFSET,
    PM1_EVENT_OFFSET,
    RESET_OFFSET,
    RESET_VALUE,
    S5_SLEEP_TYPE,
)
from trivmm.devices.pvpanic import PVPANIC_HID, PVPANIC_PORT

__all__ = ["AcpiTables", "SCI_IRQ", "acpi_tables", "aml_package_length"]

SCI_IRQ = 9
_OEM_ID = b"TRIVMM"
_OEM_TABLE_ID = b"TRIVMMVM"
_CREATOR_ID = b"TVMM"
_FADT_SIZE = 276
_FADT_REVISION = 6
_GAS_SYSTEM_IO = 1
_ACCESS_BYTE, _ACCESS_WORD, _ACCESS_DWORD = 1, 2, 3
_FADT_WBINVD = 1 << 0
_FADT_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button (flag clear: a fixed power button, PM1 bit 8)
_FADT_RESET_REG_SUP = 1 << 10
_IAPC_LEGACY_DEVICES = 1 << 0
_IAPC_8042 = 1 << 1
_MADT_PCAT_COMPAT = 1


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = struct.pack("<4sIBB6s8sI4sI", signature, 36 + len(body), revision, 0,
                         _OEM_ID, _OEM_TABLE_ID, 1, _CREATOR_ID, 1)  # fmt: skip
    table = bytearray(header + body)
    table[9] = _checksum(bytes(table))
    return bytes(table)


def _gas(address: int, bit_width: int, access_size: int) -> bytes:
    return struct.pack("<BBBBQ", _GAS_SYSTEM_IO, bit_width, 0, access_size, address)


# AML opcodes (ACPI 6.5, chapter 20).
_AML_NAME, _AML_SCOPE, _AML_BUFFER, _AML_BYTE, _AML_STRING = 0x08, 0x10, 0x11, 0x0A, 0x0D
_AML_ZERO, _AML_ONE, _AML_WORD, _AML_DWORD, _AML_QWORD, _AML_PACKAGE = 0x00, 0x01, 0x0B, 0x0C, 0x0E, 0x12
_AML_DEVICE = b"\x5b\x82"
_AML_ROOT = b"\\"
# Resource descriptors (ACPI 6.5, 6.4): small I/O port, 16-bit decode; end tag.
_RES_IO, _RES_IO_DECODE16, _RES_END = 0x47, 0x01, 0x79
# Large resource descriptors: 32-bit fixed memory, DWORD/WORD/QWORD address spaces.
_RES_MEMORY32_FIXED, _RES_DWORD_SPACE, _RES_WORD_SPACE, _RES_QWORD_SPACE = 0x86, 0x87, 0x88, 0x8A
_SPACE_MEMORY, _SPACE_IO, _SPACE_BUS = 0, 1, 2
_SPACE_PRODUCER_FIXED = 0x0C  # general flags: ResourceProducer, MinFixed, MaxFixed, PosDecode
_IO_ENTIRE_RANGE = 0x03
_MEMORY_READ_WRITE, _MEMORY_CACHEABLE = 0x01, 0x02
_PCI_SLOTS = 32
_PCI_PINS = 4


def aml_package_length(body_length: int) -> bytes:
    """The PkgLength encoding for a package whose contents after PkgLength are
    ``body_length`` bytes (the encoded length counts its own bytes too)."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_length} bytes is too large")


def _aml_name(name: bytes, value: bytes) -> bytes:
    return bytes([_AML_NAME]) + name + value


def _aml_string(text: str) -> bytes:
    return bytes([_AML_STRING]) + text.encode("ascii") + b"\0"


def _aml_buffer(data: bytes) -> bytes:
    size = bytes([_AML_BYTE, len(data)]) if len(data) < 0x100 else _aml_integer(len(data))
    return bytes([_AML_BUFFER]) + aml_package_length(len(size) + len(data)) + size + data


def _aml_device(name: bytes, body: bytes) -> bytes:
    return _AML_DEVICE + aml_package_length(len(name) + len(body)) + name + body


def _aml_scope(path: bytes, body: bytes) -> bytes:
    return bytes([_AML_SCOPE]) + aml_package_length(len(path) + len(body)) + path + body


def _io_resources(port: int, length: int) -> bytes:
    """A ResourceTemplate with one fixed I/O range."""
    io = bytes([_RES_IO, _RES_IO_DECODE16]) + struct.pack("<HHBB", port, port, 1, length)
    return io + bytes([_RES_END, 0])


def _aml_integer(value: int) -> bytes:
    """The shortest AML encoding of the integer ``value`` (ZeroOp, OneOp, Byte..QWordConst)."""
    if value in (0, 1):
        return bytes([_AML_ZERO if value == 0 else _AML_ONE])
    for prefix, size in ((_AML_BYTE, 1), (_AML_WORD, 2), (_AML_DWORD, 4), (_AML_QWORD, 8)):
        if 0 <= value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"{value} is not an AML integer")


def _aml_eisa_id(text: str) -> bytes:
    """EisaId("PNP0A08"): three letters in 5 bits each, then four hex digits, as a DWORD."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    if len(text) != 7 or not all(1 <= c <= 26 for c in letters):
        raise ValueError(f"not an EISA ID: {text!r}")
    packed = ((letters[0] << 10) | (letters[1] << 5) | letters[2]).to_bytes(2, "big") + bytes.fromhex(text[3:])
    return bytes([_AML_DWORD]) + packed


def _aml_package(elements: list[bytes]) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([_AML_PACKAGE]) + aml_package_length(len(body)) + body


def _res_address_space(tag: int, fmt: str, space: int, type_flags: int, first: int, last: int) -> bytes:
    """A WORD/DWORD/QWORD address space descriptor: a window the bridge produces."""
    body = struct.pack("<BBB" + fmt * 5, space, _SPACE_PRODUCER_FIXED, type_flags, 0, first, last, 0,
                       last - first + 1)  # fmt: skip
    return struct.pack("<BH", tag, len(body)) + body


def _pci_resources(pci: PciLayout) -> bytes:
    """PCI0._CRS: bus numbers, the configuration ports it consumes, and its windows."""
    io = bytes([_RES_IO, _RES_IO_DECODE16]) + struct.pack("<HHBB", 0xCF8, 0xCF8, 1, 8)
    return b"".join([
        _res_address_space(_RES_WORD_SPACE, "H", _SPACE_BUS, 0, 0, pci.ecam_buses - 1),
        io,
        _res_address_space(_RES_WORD_SPACE, "H", _SPACE_IO, _IO_ENTIRE_RANGE, pci.io_base,
                           pci.io_base + pci.io_size - 1),
        _res_address_space(_RES_DWORD_SPACE, "I", _SPACE_MEMORY, _MEMORY_READ_WRITE, pci.mmio32_base,
                           pci.mmio32_base + pci.mmio32_size - 1),
        _res_address_space(_RES_QWORD_SPACE, "Q", _SPACE_MEMORY, _MEMORY_READ_WRITE | _MEMORY_CACHEABLE,
                           pci.mmio64_base, pci.mmio64_base + pci.mmio64_size - 1),
        bytes([_RES_END, 0]),
    ])  # fmt: skip


def _pci_routing(pci: PciLayout) -> bytes:
    """PCI0._PRT: Package { address (slot << 16 | 0xFFFF: any function), pin (0 = INTA),
    source (Zero: no link device), source index (the GSI) } for every slot but the bridge's."""
    entries = []
    for slot in range(1, _PCI_SLOTS):
        for pin in range(_PCI_PINS):
            gsi = pci.intx_gsi(slot, pin + 1)
            fields = [_aml_integer(slot << 16 | 0xFFFF), _aml_integer(pin), _aml_integer(0), _aml_integer(gsi)]
            entries.append(_aml_package(fields))
    return _aml_package(entries)


def _aml_pci(pci: PciLayout) -> bytes:
    root = b"".join([
        _aml_name(b"_HID", _aml_eisa_id("PNP0A08")),
        _aml_name(b"_CID", _aml_eisa_id("PNP0A03")),
        _aml_name(b"_SEG", _aml_integer(0)),
        _aml_name(b"_BBN", _aml_integer(0)),
        _aml_name(b"_UID", _aml_integer(0)),
        _aml_name(b"_CRS", _aml_buffer(_pci_resources(pci))),
        _aml_name(b"_PRT", _pci_routing(pci)),
    ])  # fmt: skip
    ecam = struct.pack("<BHBII", _RES_MEMORY32_FIXED, 9, _MEMORY_READ_WRITE, pci.ecam_base, pci.ecam_size)
    board = _aml_name(b"_HID", _aml_eisa_id("PNP0C02")) + _aml_name(b"_CRS", _aml_buffer(ecam + bytes([_RES_END, 0])))
    return _aml_scope(_AML_ROOT + b"_SB_", _aml_device(b"PCI0", root) + _aml_device(b"MBRD", board))


# Extended interrupt descriptor flags: ResourceConsumer, edge-triggered, active-high, exclusive.
_RES_EXTENDED_IRQ, _IRQ_CONSUMER_EDGE = 0x89, 0x03
VIRTIO_MMIO_HID = "LNRO0005"


def _aml_virtio_mmio(devices: tuple[tuple[int, int, int], ...]) -> bytes:
    """One ``LNRO0005`` device per virtio-mmio transport: (base, size, gsi) -> its
    registers in ``_CRS`` and its edge-triggered interrupt (the VMM raises it by irqfd)."""
    body = b""
    for index, (base, size, gsi) in enumerate(devices):
        resources = struct.pack("<BHBII", _RES_MEMORY32_FIXED, 9, _MEMORY_READ_WRITE, base, size)
        resources += struct.pack("<BHBBI", _RES_EXTENDED_IRQ, 6, _IRQ_CONSUMER_EDGE, 1, gsi)
        device = _aml_name(b"_HID", _aml_string(VIRTIO_MMIO_HID)) + _aml_name(b"_UID", _aml_integer(index))
        device += _aml_name(b"_CRS", _aml_buffer(resources + bytes([_RES_END, 0])))
        body += _aml_device(f"VR{index:02X}".encode(), device)
    return _aml_scope(_AML_ROOT + b"_SB_", body) if body else b""


def _mcfg(pci: PciLayout) -> bytes:
    """MCFG: one allocation, segment 0, buses 0..ecam_buses-1, after 8 reserved bytes."""
    return _table(b"MCFG", 1, bytes(8) + struct.pack("<QHBB4x", pci.ecam_base, 0, 0, pci.ecam_buses - 1))


def _aml_pvpanic() -> bytes:
    body = _aml_name(b"_HID", _aml_string(PVPANIC_HID))
    body += _aml_name(b"_CRS", _aml_buffer(_io_resources(PVPANIC_PORT, 1)))
    return _aml_scope(_AML_ROOT + b"_SB_", _aml_device(b"PEVT", body))


def _aml_s5() -> bytes:
    # Name (_S5, Package (4) { 5, 5, 0, 0 })
    elements = bytes([0x0A, S5_SLEEP_TYPE, 0x0A, S5_SLEEP_TYPE, 0x00, 0x00])
    package = bytes([0x12, 2 + len(elements), 4]) + elements
    return b"\x08_S5_" + package


def _fadt(dsdt_address: int) -> bytes:
    body = bytearray(_FADT_SIZE - 36)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    pm1a_evt = ACPI_PM_PORT + PM1_EVENT_OFFSET
    pm1a_cnt = ACPI_PM_PORT + PM1_CONTROL_OFFSET
    put(40, "<I", dsdt_address)
    put(46, "<H", SCI_IRQ)
    put(56, "<I", pm1a_evt)
    put(64, "<I", pm1a_cnt)
    put(88, "<BB", 4, 2)  # PM1_EVT_LEN, PM1_CNT_LEN
    put(96, "<HH", 0x65, 0x3E9)  # C2/C3 latencies above the limits: no C2/C3
    put(109, "<H", _IAPC_LEGACY_DEVICES | _IAPC_8042)
    put(112, "<I", _FADT_WBINVD | _FADT_SLP_BUTTON | _FADT_RESET_REG_SUP)
    put(116, "<12s", _gas(ACPI_PM_PORT + RESET_OFFSET, 8, _ACCESS_BYTE))
    put(128, "<B", RESET_VALUE)
    put(131, "<B", 5)  # FADT minor version: 6.5
    put(140, "<Q", dsdt_address)
    put(148, "<12s", _gas(pm1a_evt, 32, _ACCESS_WORD))
    put(172, "<12s", _gas(pm1a_cnt, 16, _ACCESS_WORD))
    return _table(b"FACP", _FADT_REVISION, bytes(body))


def _madt(vcpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_ADDRESS, _MADT_PCAT_COMPAT)
    for cpu in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, ioapic_id(vcpus), 0, IOAPIC_ADDRESS, 0)
    return _table(b"APIC", 5, body)


class AcpiTables:
    """The tables laid out from ``address``; ``rsdp_address`` is what boot_params carries.
    ``blobs`` is a tuple of (address, bytes): the object is not changed after it is built,
    so ``acpi_tables`` can hand the same one to every VM."""

    __slots__ = ("blobs", "rsdp_address")

    def __init__(self, vcpus: int, address: int = ACPI_START, pci: PciLayout | None = None,
                 virtio_mmio: tuple[tuple[int, int, int], ...] = ()) -> None:  # fmt: skip
        if not 1 <= vcpus <= 255:
            raise ValueError(f"the MADT describes 1..255 CPUs here, not {vcpus}")
        self.rsdp_address = address
        blobs: list[tuple[int, bytes]] = []
        cursor = address + 36  # after the RSDP

        def place(blob: bytes) -> int:
            nonlocal cursor
            at = (cursor + 15) & ~15
            blobs.append((at, blob))
            cursor = at + len(blob)
            return at

        devices = _aml_s5() + _aml_pvpanic() + (_aml_pci(pci) if pci else b"") + _aml_virtio_mmio(virtio_mmio)
        dsdt = place(_table(b"DSDT", 2, devices))
        fadt = place(_fadt(dsdt))
        madt = place(_madt(vcpus))
        entries = [fadt, madt] + ([place(_mcfg(pci))] if pci else [])
        xsdt = place(_table(b"XSDT", 1, struct.pack(f"<{len(entries)}Q", *entries)))
        rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, _OEM_ID, 2, 0, 36, xsdt, 0))
        rsdp[8] = _checksum(bytes(rsdp[:20]))
        rsdp[32] = _checksum(bytes(rsdp))
        self.blobs: tuple[tuple[int, bytes], ...] = ((address, bytes(rsdp)), *blobs)
        if cursor > HIMEM_START or (address < BIOS_START and cursor > BIOS_START):
            raise ValueError("ACPI tables do not fit their area")

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):
            raise AttributeError(f"AcpiTables is immutable (its {name} is set)")
        object.__setattr__(self, name, value)


@functools.lru_cache(maxsize=32)
def acpi_tables(vcpus: int, address: int = ACPI_START, pci: PciLayout | None = None,
                virtio_mmio: tuple[tuple[int, int, int], ...] = ()) -> AcpiTables:  # fmt: skip
    """``AcpiTables(...)``, built once per process for each combination."""
    return AcpiTables(vcpus, address, pci, virtio_mmio)
