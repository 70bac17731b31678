from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trivmm.boot import layout
from trivmm.boot.acpi import AcpiTables
from trivmm.boot.bzimage import KernelImageError, SetupHeader, extract_vmlinux
from trivmm.boot.e820 import E820_RAM, memory_map
from trivmm.boot.elf import ElfImage
from trivmm.boot.loader import BootProtocol, load_kernel
from trivmm.boot.mptable import build_mptable
from trivmm.guest.builtin import builtin_guest
from trivmm.memory import GuestMemory


def fake_bzimage(payload: bytes = b"\x1f\x8b" + b"\0" * 30, setup_sects: int = 4, version: int = 0x020F,
                 xloadflags: int = 1, init_size: int = 0x400000) -> bytes:  # fmt: skip
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x66  # jump over the header, as real images do
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + b"\x90" * 0x100 + payload


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.from_ranges(layout.ram_ranges(64 << 20))
    yield mem
    mem.close()


def test_setup_header_parses() -> None:
    header = SetupHeader.parse(fake_bzimage())
    assert header.setup_size == 5 * 512 and header.version == 0x020F
    assert header.raw[0] == 4 and len(header.raw) == 0x202 + 0x66 - 0x1F1


@pytest.mark.parametrize(("image", "message"), [
    (b"\x7fELF" + b"\0" * 100, "too short"),
    (b"MZ" + b"\0" * 4000, "not a Linux bzImage"),
    (fake_bzimage(version=0x0206), "too old"),
    (fake_bzimage(xloadflags=0), "64-bit entry"),
    (fake_bzimage()[:-10], "truncated"),
])  # fmt: skip
def test_bad_bzimages_are_refused_with_a_reason(image: bytes, message: str) -> None:
    with pytest.raises(KernelImageError, match=message):
        SetupHeader.parse(image)


def test_extract_vmlinux_refuses_a_payload_that_is_not_elf() -> None:
    import gzip

    with pytest.raises(KernelImageError, match="not an ELF"):
        extract_vmlinux(fake_bzimage(gzip.compress(b"not elf at all")))


@settings(max_examples=200)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash_the_parsers(data: bytes) -> None:
    for parse in (SetupHeader.parse, ElfImage.parse):
        try:
            parse(data)
        except KernelImageError:
            pass


def test_builtin_guest_is_an_elf_with_a_pvh_note() -> None:
    image = ElfImage.parse(builtin_guest())
    assert image.pvh_entry == image.entry == 0x100000
    assert image.segments[0].paddr == 0x100000


def test_truncated_elf_is_refused() -> None:
    with pytest.raises(KernelImageError, match=r"past the end|runs past"):
        ElfImage.parse(builtin_guest()[:200])


def test_mptable_checksums_and_cpu_entries() -> None:
    table = build_mptable(3)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    (config_address,) = struct.unpack_from("<I", table, 4)
    config = table[config_address - layout.EBDA_START :]
    (length,) = struct.unpack_from("<H", config, 4)
    assert config[:4] == b"PCMP" and sum(config[:length]) % 256 == 0
    cpus = [config[44 + 20 * i : 44 + 20 * (i + 1)] for i in range(3)]
    assert [c[0] for c in cpus] == [0, 0, 0] and [c[1] for c in cpus] == [0, 1, 2]
    assert cpus[0][3] == 0x03 and cpus[1][3] == 0x01  # BSP flag on CPU 0 only
    with pytest.raises(ValueError):
        build_mptable(0)


def _tables(acpi: AcpiTables) -> dict[bytes, bytes]:
    return {blob[:4]: blob for _, blob in acpi.blobs[1:]}


def test_acpi_tables_are_consistent() -> None:
    acpi = AcpiTables(2)
    rsdp = acpi.blobs[0][1]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    tables = _tables(acpi)
    for table in tables.values():
        assert struct.unpack_from("<I", table, 4)[0] == len(table)
        assert sum(table) % 256 == 0
    addresses = {blob[:4]: addr for addr, blob in acpi.blobs[1:]}
    (xsdt_address,) = struct.unpack_from("<Q", rsdp, 24)
    assert xsdt_address == addresses[b"XSDT"]
    entries = struct.unpack_from("<QQ", tables[b"XSDT"], 36)
    assert set(entries) == {addresses[b"FACP"], addresses[b"APIC"]}
    assert struct.unpack_from("<Q", tables[b"FACP"], 140)[0] == addresses[b"DSDT"]
    assert b"_S5_" in tables[b"DSDT"]
    madt = tables[b"APIC"]
    entries_seen, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries_seen.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    assert [e[3] for kind, e in entries_seen if kind == 0] == [0, 1]  # one LAPIC per vCPU
    assert [kind for kind, _ in entries_seen].count(1) == 1  # one IOAPIC


def test_memory_map_reserves_the_bios_areas() -> None:
    e820 = memory_map(layout.ram_ranges(4 << 30))
    ram = [(e.address, e.size) for e in e820 if e.type == E820_RAM]
    assert ram[0] == (0, layout.EBDA_START)
    assert (layout.HIMEM_START, layout.MMIO_GAP_START - layout.HIMEM_START) in ram
    assert ram[-1][0] == layout.MMIO_GAP_END


def test_bzimage_load_fills_the_zero_page(memory: GuestMemory) -> None:
    initrd = b"INITRD" * 1000
    entry = load_kernel(memory, fake_bzimage(), initrd=initrd, cmdline="console=ttyS0", vcpus=2)
    assert entry.protocol is BootProtocol.LINUX64 and entry.rip == 0x100200
    zp = layout.ZERO_PAGE
    assert memory.read(zp + 0x1F1, 1) == b"\x04" and memory.read_u16(zp + 0x1FE) == 0xAA55
    assert memory.read_u32(zp + 0x228) == layout.CMDLINE
    assert memory.read(layout.CMDLINE, 14) == b"console=ttyS0\0"
    address, size = memory.read_u32(zp + 0x218), memory.read_u32(zp + 0x21C)
    assert size == len(initrd) and memory.read(address, size) == initrd
    assert address % 4096 == 0 and address >= entry.kernel_end
    assert memory.read(zp + 0x1E8, 1)[0] == len(memory_map([(0, 64 << 20)]))
    assert memory.read_u64(zp + 0x070) == layout.ACPI_START


def test_builtin_guest_loads_by_pvh(memory: GuestMemory) -> None:
    entry = load_kernel(memory, builtin_guest(), cmdline="x=1")
    assert entry.protocol is BootProtocol.PVH and entry.boot_info == layout.PVH_START_INFO
    magic, version, _, modules, _, cmdline, rsdp, memmap, count = struct.unpack(
        "<IIIIQQQQI", memory.read(layout.PVH_START_INFO, 52))
    assert (magic, version, modules) == (0x336EC578, 1, 0)
    assert memory.read(cmdline, 4) == b"x=1\0" and rsdp == layout.ACPI_START
    assert memory.read_u32(memmap + 16) == E820_RAM and count >= 3


def test_linux64_entry_for_an_elf_when_asked(memory: GuestMemory) -> None:
    entry = load_kernel(memory, builtin_guest(), protocol="linux64")
    assert entry.protocol is BootProtocol.LINUX64 and entry.boot_info == layout.ZERO_PAGE
    assert memory.read_u64(layout.PML4) & ~0xFFF == layout.PDPT


def test_pvh_on_a_bzimage_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="PVH"):
        load_kernel(memory, fake_bzimage(), protocol="pvh")


def test_oversized_inputs_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="initrd"):
        load_kernel(memory, fake_bzimage(), initrd=b"x" * (60 << 20))
    with pytest.raises(KernelImageError, match="command line"):
        load_kernel(memory, fake_bzimage(), cmdline="a" * 5000)
    with pytest.raises(KernelImageError, match="unpack"):
        load_kernel(memory, fake_bzimage(init_size=80 << 20))
    with pytest.raises(KernelImageError, match="NUL"):
        load_kernel(memory, fake_bzimage(), cmdline="a\0b")
