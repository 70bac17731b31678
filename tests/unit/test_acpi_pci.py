"""ACPI for PCI: the MCFG, the XSDT that lists it, and the DSDT's root bridge and
motherboard resources -- byte checks here, and ACPICA's iasl reading (and recompiling) them."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import prerequisite_missing
from trivmm.boot.acpi import AcpiTables, acpi_tables
from trivmm.boot.layout import PciLayout, pci_layout

LAYOUT = pci_layout(128 << 20)


def _tables(acpi: AcpiTables) -> dict[bytes, tuple[int, bytes]]:
    return {blob[:4]: (address, blob) for address, blob in acpi.blobs[1:]}


def _iasl() -> str:
    path = shutil.which("iasl")
    if path is None:
        prerequisite_missing("iasl", "ACPICA's iasl is not installed (Debian package acpica-tools)")
    return path


def test_without_pci_there_is_no_mcfg_and_no_root_bridge() -> None:
    tables = _tables(AcpiTables(2))
    assert b"MCFG" not in tables
    xsdt = tables[b"XSDT"][1]
    assert len(xsdt) == 36 + 16  # FACP and APIC only
    assert b"PCI0" not in tables[b"DSDT"][1] and b"MBRD" not in tables[b"DSDT"][1]


def test_mcfg_is_listed_checksummed_and_describes_the_ecam() -> None:
    acpi = AcpiTables(2, pci=LAYOUT)
    tables = _tables(acpi)
    for _, table in tables.values():
        assert sum(table) & 0xFF == 0 and struct.unpack_from("<I", table, 4)[0] == len(table)
    rsdp = acpi.blobs[0][1]
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    xsdt = tables[b"XSDT"][1]
    entries = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert entries == (tables[b"FACP"][0], tables[b"APIC"][0], tables[b"MCFG"][0])
    mcfg = tables[b"MCFG"][1]
    assert len(mcfg) == 36 + 8 + 16 and mcfg[8] == 1  # revision 1
    assert mcfg[36:44] == bytes(8)
    base, segment, first_bus, last_bus = struct.unpack_from("<QHBB", mcfg, 44)
    assert (base, segment, first_bus, last_bus) == (0xE000_0000, 0, 0, 0)
    assert mcfg[56:60] == bytes(4)
    # the other tables are those of a VM without PCI (only the DSDT, XSDT and RSDP differ)
    plain = _tables(AcpiTables(2))
    assert plain[b"APIC"][1] == tables[b"APIC"][1]


def test_tables_are_cached_per_layout() -> None:
    assert acpi_tables(2, pci=LAYOUT) is acpi_tables(2, pci=pci_layout(128 << 20))
    assert acpi_tables(2, pci=LAYOUT) is not acpi_tables(2)
    assert acpi_tables(2, pci=LAYOUT) is not acpi_tables(2, pci=pci_layout(8 << 30))


def test_dsdt_carries_the_root_bridge_windows_in_bytes() -> None:
    dsdt = _tables(AcpiTables(2, pci=LAYOUT))[b"DSDT"][1]
    assert dsdt.count(b"\x5b\x82") == 3  # PEVT, PCI0, MBRD
    assert b"_HID\x0c\x41\xd0\x0a\x08" in dsdt  # EisaId("PNP0A08")
    assert b"_CID\x0c\x41\xd0\x0a\x03" in dsdt  # EisaId("PNP0A03")
    assert b"_HID\x0c\x41\xd0\x0c\x02" in dsdt  # EisaId("PNP0C02")
    mem32 = struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x01, 0, 0xC000_0000, 0xDFFF_FFFF, 0, 0x2000_0000)
    assert mem32 in dsdt
    assert struct.pack("<BHBII", 0x86, 9, 1, 0xE000_0000, 1 << 20) in dsdt


def _disassemble(tmp_path: Path, blob: bytes, name: str) -> str:
    (tmp_path / f"{name}.aml").write_bytes(blob)
    subprocess.run([_iasl(), "-d", str(tmp_path / f"{name}.aml")], capture_output=True, check=True, cwd=tmp_path)
    return (tmp_path / f"{name}.dsl").read_text()


def _prt(source: str) -> list[tuple[int, int, int, int]]:
    """(address, pin, source, GSI) of every _PRT entry iasl printed."""
    body = source[source.index("Name (_PRT") :]
    body = body[: body.index("})")]
    words = {"Zero": 0, "One": 1}
    entries = []
    for match in re.finditer(r"Package \(0x04\)\s*\{([^}]*)\}", body):
        fields = [f.strip() for f in match.group(1).split(",") if f.strip()]
        a, b, c, d = (words[f] if f in words else int(f, 16) for f in fields)
        entries.append((a, b, c, d))
    return entries


@pytest.mark.parametrize("layout", [LAYOUT, pci_layout(24 << 30)], ids=["128M", "24G"])
def test_iasl_reads_the_root_bridge(tmp_path: Path, layout: PciLayout) -> None:
    dsdt = _tables(AcpiTables(4, pci=layout))[b"DSDT"][1]
    source = _disassemble(tmp_path, dsdt, "dsdt")
    assert "Device (PCI0)" in source and "Device (MBRD)" in source and "Device (PEVT)" in source
    assert 'Name (_HID, EisaId ("PNP0A08")' in source and 'Name (_CID, EisaId ("PNP0A03")' in source
    for name in ("_SEG", "_BBN", "_UID"):
        assert f"Name ({name}, Zero)" in source
    crs = source[source.index("Device (PCI0)") : source.index("Name (_PRT")]

    def window(kind: str) -> tuple[int, int, int]:
        block = crs[crs.index(kind) :]
        numbers = re.findall(r"(0x[0-9A-F]+),\s*// (Range Minimum|Range Maximum|Length)", block)[:3]
        low, high, length = (int(n, 16) for n, _ in numbers)
        return low, high, length

    assert window("WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode") == (0, 0, 1)
    assert "IO (Decode16,\n                    0x0CF8,             // Range Minimum" in crs
    assert "0x08,               // Length" in crs
    assert window("WordIO (ResourceProducer") == (0x1000, 0xFFFF, 0xF000)
    assert window("DWordMemory (ResourceProducer") == (0xC000_0000, 0xDFFF_FFFF, 0x2000_0000)
    assert window("QWordMemory (ResourceProducer") == (
        layout.mmio64_base, layout.mmio64_base + layout.mmio64_size - 1, layout.mmio64_size)
    board = source[source.index("Device (MBRD)") :]
    assert 'EisaId ("PNP0C02")' in board and "Memory32Fixed (ReadWrite,\n                    0xE0000000," in board
    assert "0x00100000,         // Address Length" in board
    entries = _prt(source)
    assert len(entries) == 31 * 4
    expected = [((slot << 16) | 0xFFFF, pin, 0, layout.intx_gsi(slot, pin + 1))
                for slot in range(1, 32) for pin in range(4)]  # fmt: skip
    assert entries == expected
    assert {gsi for *_, gsi in entries} == {16, 17, 18, 19}
    # and iasl compiles its own disassembly back without a complaint
    result = subprocess.run([_iasl(), "-tc", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 Errors, 0 Warnings, 0 Remarks" in result.stdout


def test_iasl_reads_the_mcfg(tmp_path: Path) -> None:
    mcfg = _tables(AcpiTables(2, pci=LAYOUT))[b"MCFG"][1]
    source = _disassemble(tmp_path, mcfg, "mcfg")
    assert re.search(r"Base Address : 00000000E0000000", source)
    assert re.search(r"Segment Group Number : 0000", source)
    assert re.search(r"Start Bus Number : 00", source) and re.search(r"End Bus Number : 00", source)
