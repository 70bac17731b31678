"""The DSDT's device objects, byte for byte, and the AML package-length encoding."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import prerequisite_missing
from trivmm.boot.acpi import AcpiTables, aml_package_length
from trivmm.devices.pvpanic import PVPANIC_HID, PVPANIC_PORT


def _dsdt() -> bytes:
    return next(blob for _, blob in AcpiTables(2).blobs if blob[:4] == b"DSDT")


def _decode_package_length(data: bytes) -> tuple[int, int]:
    """(encoded total, bytes used) -- the inverse of aml_package_length, from the spec."""
    extra = data[0] >> 6
    if extra == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@given(st.integers(0, (1 << 28) - 5))
def test_package_length_round_trips(body: int) -> None:
    encoded = aml_package_length(body)
    total, used = _decode_package_length(encoded)
    assert used == len(encoded) and total == body + used  # the length counts its own bytes


def test_package_length_refuses_what_aml_cannot_say() -> None:
    with pytest.raises(ValueError, match="too large"):
        aml_package_length(1 << 28)


def test_dsdt_declares_the_pvpanic_device_with_its_port() -> None:
    dsdt = _dsdt()
    assert sum(dsdt) & 0xFF == 0  # table checksum
    scope = dsdt.index(b"\x10")  # ScopeOp (\_SB)
    total, used = _decode_package_length(dsdt[scope + 1 :])
    assert dsdt[scope + 1 + used : scope + 1 + used + 5] == b"\\_SB_"
    assert scope + 1 + total == len(dsdt)  # the scope runs to the end of the table
    device = dsdt.index(b"\x5b\x82", scope)  # DeviceOp
    assert dsdt[device + 2 + _decode_package_length(dsdt[device + 2 :])[1] :].startswith(b"PEVT")
    assert b"\x08_HID\x0d" + PVPANIC_HID.encode() + b"\x00" in dsdt
    io = bytes([0x47, 0x01]) + PVPANIC_PORT.to_bytes(2, "little") * 2 + b"\x01\x01"
    assert b"\x08_CRS\x11" in dsdt and io + b"\x79\x00" in dsdt


def test_iasl_disassembles_the_dsdt(tmp_path: Path) -> None:
    """ACPICA's own disassembler (what Linux's interpreter is built from) reads our AML as
    we meant it. scripts/test installs it (Debian's acpica-tools)."""
    if shutil.which("iasl") is None:
        prerequisite_missing("iasl", "ACPICA's iasl is not installed (Debian package acpica-tools)")
    (tmp_path / "dsdt.aml").write_bytes(_dsdt())
    subprocess.run(["iasl", "-d", str(tmp_path / "dsdt.aml")], capture_output=True, check=True)
    source = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "QEMU0001")' in source
    assert "IO (Decode16,\n                    0x0505," in source
    assert "Name (_S5, Package (0x04)" in source


def test_iasl_reads_the_virtio_mmio_devices(tmp_path: Path) -> None:
    """Each virtio-mmio transport is an LNRO0005 device (what Linux's virtio_mmio driver
    binds to from ACPI) with its register window and its edge-triggered GSI."""
    if shutil.which("iasl") is None:
        prerequisite_missing("iasl", "ACPICA's iasl is not installed (Debian package acpica-tools)")
    tables = AcpiTables(1, virtio_mmio=((0xF000_0000, 0x200, 20), (0xF000_1000, 0x200, 21)))
    dsdt = next(blob for _, blob in tables.blobs if blob[:4] == b"DSDT")
    assert sum(dsdt) & 0xFF == 0
    (tmp_path / "dsdt.aml").write_bytes(dsdt)
    subprocess.run(["iasl", "-d", str(tmp_path / "dsdt.aml")], capture_output=True, check=True)
    source = " ".join((tmp_path / "dsdt.dsl").read_text().split())
    assert source.count('Name (_HID, "LNRO0005")') == 2
    assert "Memory32Fixed (ReadWrite, 0xF0001000, // Address Base 0x00000200, // Address Length" in source
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000015, }" in source
    # Re-assembling what iasl printed gives no errors: the AML is well-formed.
    result = subprocess.run(["iasl", "-p", str(tmp_path / "again"), str(tmp_path / "dsdt.dsl")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
