"""The PCI platform without KVM: configuration mechanism #1 and ECAM, BARs on the bus,
capabilities, MSI-X, the GSI routing table and INTx -- and a hostile guest driving all of it."""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trivmm.boot.layout import PciLayout, pci_layout
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.devices.pci import (
    MSIX_ENABLE,
    MSIX_FUNCTION_MASK,
    BarKind,
    GsiExhausted,
    GsiRouter,
    PciError,
    PciFunction,
    PciRoot,
    default_routes,
)
from trivmm.kvm.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IrqchipRoute, IrqRoute, MsiRoute

LAYOUT = pci_layout(128 << 20)
CF8, CFC = 0xCF8, 0xCFC


# --- fakes -------------------------------------------------------------------------------------
class Register:
    """A BAR handler: remembers what was written, reads back a pattern."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes((offset + i) & 0xFF for i in range(len(data)))

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, bytes(data)))


class FakeKvm:
    """A RoutingBackend: records the tables and irqfd bindings KVM would get."""

    def __init__(self) -> None:
        self.tables: list[list[IrqRoute]] = []
        self.irqfds: dict[int, int] = {}  # fd -> gsi
        self.fail = False

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None:
        if self.fail:
            raise OSError(22, "KVM_SET_GSI_ROUTING failed")
        self.tables.append(list(routes))

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        if deassign:
            assert self.irqfds.pop(eventfd) == gsi
        else:
            self.irqfds[eventfd] = gsi

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        table = self.tables[-1] if self.tables else list(default_routes())
        return {r.gsi: (r.address, r.data) for r in table if isinstance(r, MsiRoute)}


class Device(PciFunction):
    """An endpoint with one BAR of each kind, recording bar_moved."""

    def __init__(self, router: GsiRouter | None = None, *, msix_vectors: int = 0) -> None:
        super().__init__(0x1AF4, 0x1041, 0x020000, revision=1, subsystem_vendor_id=0x1AF4, subsystem_id=0x0001)
        self.io, self.mem32, self.mem64 = Register(), Register(), Register()
        self.add_bar(0, 0x20, BarKind.IO, self.io)
        self.add_bar(1, 0x1000, BarKind.MEM32, self.mem32)
        self.add_bar(2, 0x4000, BarKind.MEM64, self.mem64, prefetchable=True)
        self.moves: list[tuple[int, int | None, int | None]] = []
        if msix_vectors:
            assert router is not None
            self.add_msix(msix_vectors, router, table_bar=2, table_offset=0x2000, pba_bar=2, pba_offset=0x3000)

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        self.moves.append((index, old, new))


class Platform:
    """A root on fresh address spaces, with accessors a guest would use."""

    def __init__(self, layout: PciLayout = LAYOUT) -> None:
        self.pio = AddressSpace("pio", PIO_LIMIT)
        self.mmio = AddressSpace("mmio", MMIO_LIMIT)
        self.lines: dict[int, bool] = {}
        self.line_calls: list[tuple[int, bool]] = []
        self.kvm = FakeKvm()
        self.router = GsiRouter(self.kvm)
        self.layout = layout
        self.root = PciRoot(self.pio, self.mmio, layout, self._irq_line)

    def _irq_line(self, gsi: int, level: bool) -> None:
        self.line_calls.append((gsi, level))
        self.lines[gsi] = level

    # configuration mechanism #1
    def conf1_address(self, bus: int, dev: int, fn: int, reg: int, enable: bool = True) -> None:
        value = (enable << 31) | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xFC)
        self.pio.write(CF8, memoryview(struct.pack("<I", value)))

    def conf1_read(self, dev: int, reg: int, size: int, bus: int = 0, fn: int = 0) -> int:
        self.conf1_address(bus, dev, fn, reg)
        data = bytearray(size)
        self.pio.read(CFC + (reg & 3), memoryview(data))
        return int.from_bytes(data, "little")

    def conf1_write(self, dev: int, reg: int, size: int, value: int, bus: int = 0, fn: int = 0) -> None:
        self.conf1_address(bus, dev, fn, reg)
        self.pio.write(CFC + (reg & 3), memoryview(value.to_bytes(size, "little")))

    # ECAM
    def ecam_address(self, dev: int, reg: int, bus: int = 0, fn: int = 0) -> int:
        return self.layout.ecam_base + (bus << 20 | dev << 15 | fn << 12 | reg)

    def ecam_read(self, dev: int, reg: int, size: int, bus: int = 0, fn: int = 0) -> int:
        data = bytearray(size)
        self.mmio.read(self.ecam_address(dev, reg, bus, fn), memoryview(data))
        return int.from_bytes(data, "little")

    def ecam_write(self, dev: int, reg: int, size: int, value: int, bus: int = 0, fn: int = 0) -> None:
        self.mmio.write(self.ecam_address(dev, reg, bus, fn), memoryview(value.to_bytes(size, "little")))

    def mmio_read(self, address: int, size: int) -> int:
        data = bytearray(size)
        self.mmio.read(address, memoryview(data))
        return int.from_bytes(data, "little")

    def mmio_write(self, address: int, size: int, value: int) -> None:
        self.mmio.write(address, memoryview(value.to_bytes(size, "little")))

    def check_invariants(self) -> None:
        """Mapped BARs are in the bus exactly where they say, inside a window of their kind,
        and never overlap (the address space refuses overlaps; check anyway)."""
        seen: list[tuple[int, int, str]] = []
        for function in self.root.functions.values():
            for bar in function.declared_bars():
                if bar.mapped is None:
                    continue
                space = self.pio if bar.kind is BarKind.IO else self.mmio
                found = space.find(bar.mapped)
                assert found is not None and found.base == bar.mapped and found.size == bar.size
                assert any(base <= bar.mapped and bar.mapped + bar.size <= base + size
                           for base, size in self.root.windows[bar.kind])  # fmt: skip
                seen.append((bar.mapped, bar.mapped + bar.size, space.name))
        for i, (start, end, name) in enumerate(seen):
            for other_start, other_end, other_name in seen[i + 1 :]:
                assert name != other_name or end <= other_start or other_end <= start
        for space in (self.pio, self.mmio):
            ranges = space.ranges
            for a, b in itertools.pairwise(ranges):
                assert a.end <= b.base


@pytest.fixture
def platform() -> Platform:
    return Platform()


# --- configuration mechanisms ---------------------------------------------------------------------
def test_host_bridge_answers_on_both_mechanisms(platform: Platform) -> None:
    for read in (platform.conf1_read, platform.ecam_read):
        assert read(0, 0x00, 4) == 0x0D57_8086
        assert read(0, 0x08, 4) >> 8 == 0x060000  # class: host bridge
        assert read(0, 0x0E, 1) == 0x00  # header type 0, single function
        assert read(0, 0x3D, 1) == 0  # no interrupt pin


def test_conf1_and_ecam_agree_on_every_register_and_width(platform: Platform) -> None:
    slot = platform.root.add(Device())
    for reg in range(0, 256):
        for size in (1, 2, 4):
            if reg % size:
                continue
            assert platform.conf1_read(slot, reg, size) == platform.ecam_read(slot, reg, size), (reg, size)
    # a write through one mechanism is seen through the other, at byte and word offsets
    platform.conf1_write(slot, 0x3C, 1, 0x0B)
    assert platform.ecam_read(slot, 0x3C, 1) == 0x0B
    platform.ecam_write(slot, 0x0C, 2, 0x2010)  # cache line size + latency timer
    assert platform.conf1_read(slot, 0x0D, 1) == 0x20 and platform.conf1_read(slot, 0x0C, 1) == 0x10
    assert platform.conf1_read(slot, 0x0E, 2) == platform.ecam_read(slot, 0x0E, 2)


def test_conf1_address_register_and_its_enable_bit(platform: Platform) -> None:
    platform.pio.write(CF8, memoryview(struct.pack("<I", 0x8000_0003)))
    data = bytearray(4)
    platform.pio.read(CF8, memoryview(data))
    assert struct.unpack("<I", data)[0] == 0x8000_0000  # bits 1:0 read as zero (Linux's conf1 probe)
    assert platform.conf1_read(0, 0, 2) == 0x8086
    platform.conf1_address(0, 0, 0, 0, enable=False)
    data = bytearray(4)
    platform.pio.read(CFC, memoryview(data))
    assert data == b"\xff" * 4  # disabled: nothing answers
    platform.pio.write(CFC, memoryview(b"\0\0\0\0"))  # ignored
    for offset, size in ((0, 1), (1, 1), (2, 2), (3, 1)):  # not the address register
        data = bytearray(size)
        platform.pio.read(CF8 + offset, memoryview(data))
        assert data == b"\xff" * size
        platform.pio.write(CF8 + offset, memoryview(bytes(size)))
    data = bytearray(4)
    platform.pio.read(CF8, memoryview(data))
    assert struct.unpack("<I", data)[0] == 0  # only the disabled address written above


def test_sub_dword_data_port_accesses_reach_the_right_bytes(platform: Platform) -> None:
    slot = platform.root.add(Device())
    dword = platform.conf1_read(slot, 0x00, 4)
    for reg in range(4):
        assert platform.conf1_read(slot, reg, 1) == (dword >> (8 * reg)) & 0xFF
    assert platform.conf1_read(slot, 0x02, 2) == dword >> 16
    platform.conf1_address(0, slot, 0, 0x00)
    data = bytearray(2)
    platform.pio.read(CFC + 1, memoryview(data))  # a word at 0xCFD: bytes 1..2 of the register
    assert int.from_bytes(data, "little") == (dword >> 8) & 0xFFFF


def test_absent_functions_read_all_ones_and_ignore_writes(platform: Platform) -> None:
    platform.root.add(Device(), slot=3)
    absent = [(0, 5, 0), (0, 3, 1), (0, 0, 7), (1, 0, 0), (255, 31, 7)]
    for bus, dev, fn in absent:
        assert platform.conf1_read(dev, 0, 4, bus=bus, fn=fn) == 0xFFFF_FFFF
        assert platform.conf1_read(dev, 2, 2, bus=bus, fn=fn) == 0xFFFF
        platform.conf1_write(dev, 0x04, 2, 0x0007, bus=bus, fn=fn)
        if bus < LAYOUT.ecam_buses:
            assert platform.ecam_read(dev, 0, 4, bus=bus, fn=fn) == 0xFFFF_FFFF
            platform.ecam_write(dev, 0x10, 4, 0xFFFF_FFFF, bus=bus, fn=fn)
    # an ECAM bus beyond the MCFG's is not ours at all: the MMIO bus's all-ones
    data = bytearray(4)
    assert not platform.mmio.read(LAYOUT.ecam_base + LAYOUT.ecam_size, memoryview(data))
    assert data == b"\xff" * 4


def test_extended_and_odd_accesses(platform: Platform) -> None:
    slot = platform.root.add(Device())
    assert platform.ecam_read(slot, 0x100, 4) == 0  # a 256-byte function: extended space reads 0
    platform.ecam_write(slot, 0x100, 4, 0xFFFF_FFFF)
    qword = bytearray(8)
    platform.mmio.read(platform.ecam_address(slot, 0), memoryview(qword))
    assert qword == struct.pack("<II", platform.ecam_read(slot, 0, 4), platform.ecam_read(slot, 4, 4))
    # an unaligned DWORD is split into bytes, as the bus would
    expected = int.from_bytes(bytes(platform.ecam_read(slot, r, 1) for r in range(0x3B, 0x3F)), "little")
    assert platform.ecam_read(slot, 0x3B, 4) == expected
    platform.ecam_write(slot, 0x3B, 4, 0x44332211)  # 0x3C (interrupt line) takes 0x22, the rest is RO
    assert platform.ecam_read(slot, 0x3C, 1) == 0x22
    assert platform.ecam_read(slot, 0x3D, 1) == 1  # INTA, read-only


def test_header_fields_and_write_masks(platform: Platform) -> None:
    slot = platform.root.add(Device())
    read, write = platform.conf1_read, platform.conf1_write
    assert read(slot, 0x00, 4) == 0x1041_1AF4
    assert read(slot, 0x08, 4) == 0x0200_0001  # class 0x020000, revision 1
    assert read(slot, 0x2C, 4) == 0x0001_1AF4
    before = bytes(read(slot, r, 1) for r in range(0x40))
    for reg in (0x00, 0x08, 0x2C, 0x30, 0x34):
        write(slot, reg, 4, 0xFFFF_FFFF)
    after = bytes(read(slot, r, 1) for r in range(0x40))
    assert after == before  # read-only registers; no expansion ROM
    write(slot, 0x04, 2, 0xFFFF)
    assert read(slot, 0x04, 2) == 0x0547  # IO, MEM, master, parity, SERR, INTx disable
    write(slot, 0x06, 2, 0xFFFF)  # RW1C status bits: none set, none appear
    assert read(slot, 0x06, 2) == 0


# --- BARs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("index", "size", "kind", "low_bits"), [
    (0, 0x20, BarKind.IO, 0x1), (1, 0x1000, BarKind.MEM32, 0x0), (2, 0x4000, BarKind.MEM64, 0xC),
])  # fmt: skip
def test_bar_sizing_protocol(platform: Platform, index: int, size: int, kind: BarKind, low_bits: int) -> None:
    slot = platform.root.add(Device())
    reg = 0x10 + 4 * index
    platform.conf1_write(slot, 0x04, 2, 0)  # decoding off while sizing, as Linux does
    original = platform.conf1_read(slot, reg, 4)
    assert original & (0x3 if kind is BarKind.IO else 0xF) == low_bits
    platform.conf1_write(slot, reg, 4, 0xFFFF_FFFF)
    mask = 0xFFFF_FFFC if kind is BarKind.IO else 0xFFFF_FFF0
    assert platform.conf1_read(slot, reg, 4) == (~(size - 1) & mask) | low_bits
    if kind is BarKind.MEM64:
        platform.conf1_write(slot, reg + 4, 4, 0xFFFF_FFFF)
        assert platform.conf1_read(slot, reg + 4, 4) == 0xFFFF_FFFF  # a 16 KiB BAR: every upper bit
    platform.conf1_write(slot, reg, 4, original)
    assert platform.conf1_read(slot, reg, 4) == original


def test_huge_and_unimplemented_bars_size_correctly(platform: Platform) -> None:
    function = PciFunction(0x1234, 0x5678, 0xFF0000, interrupt_pin=0)
    function.add_bar(0, 8 << 30, BarKind.MEM64)  # 8 GiB: goes to the 64-bit window
    function.add_bar(3, 1 << 20, BarKind.MEM32, prefetchable=True)
    slot = platform.root.add(function)
    platform.conf1_write(slot, 0x10, 4, 0xFFFF_FFFF)
    platform.conf1_write(slot, 0x14, 4, 0xFFFF_FFFF)
    assert platform.conf1_read(slot, 0x10, 4) == 0x0000_0004  # 64-bit, not prefetchable
    assert platform.conf1_read(slot, 0x14, 4) == 0xFFFF_FFFE
    platform.conf1_write(slot, 0x1C, 4, 0xFFFF_FFFF)
    assert platform.conf1_read(slot, 0x1C, 4) == 0xFFF0_0008
    for reg in (0x18, 0x20, 0x24):  # unimplemented BARs read 0 and take nothing
        platform.conf1_write(slot, reg, 4, 0xFFFF_FFFF)
        assert platform.conf1_read(slot, reg, 4) == 0


def test_bar_declarations_are_checked() -> None:
    function = PciFunction(1, 2, 3)
    with pytest.raises(PciError):
        function.add_bar(0, 0x30, BarKind.MEM32)  # not a power of two
    with pytest.raises(PciError):
        function.add_bar(0, 0x200, BarKind.IO)  # I/O BARs are at most 256 bytes
    with pytest.raises(PciError):
        function.add_bar(5, 0x1000, BarKind.MEM64)  # no upper register
    with pytest.raises(PciError):
        function.add_bar(0, 0x10, BarKind.IO, prefetchable=True)
    function.add_bar(0, 0x1000, BarKind.MEM64)
    with pytest.raises(PciError):
        function.add_bar(1, 0x1000, BarKind.MEM32)  # the 64-bit BAR's upper half


def test_bars_are_preassigned_in_their_windows_and_decode(platform: Platform) -> None:
    a, b = Device(), Device()
    platform.root.add(a)
    platform.root.add(b)
    for device in (a, b):
        assert device.command & 0x3 == 0x3
        io, mem32, mem64 = (device.bar_address(i) for i in range(3))
        assert io is not None and LAYOUT.io_base <= io and io % 0x20 == 0
        assert mem32 is not None and mem32 % 0x1000 == 0
        assert mem64 is not None and mem64 % 0x4000 == 0
        assert platform.pio.find(io).device is device.io  # type: ignore[union-attr]
        assert platform.mmio.find(mem32).device is device.mem32  # type: ignore[union-attr]
        assert device.moves == [(0, None, io), (1, None, mem32), (2, None, mem64)]
        data = bytearray(2)
        platform.mmio.read(mem32 + 0x10, memoryview(data))
        assert data == bytes([0x10, 0x11])  # the handler sees offsets from the BAR's start
    platform.check_invariants()


def test_a_guest_move_remaps_the_bar_and_tells_the_device(platform: Platform) -> None:
    device = Device()
    slot = platform.root.add(device)
    old = device.bar_address(1)
    assert old is not None
    device.moves.clear()
    new = LAYOUT.mmio32_base + 0x100_0000
    platform.conf1_write(slot, 0x14, 4, new)
    assert device.bar_address(1) == new and device.moves == [(1, old, new)]
    assert platform.mmio.find(old) is None and platform.mmio.find(new).device is device.mem32  # type: ignore[union-attr]
    # a 64-bit BAR moved above 4 GiB in two halves: mapped after each write where it fits
    device.moves.clear()
    high = LAYOUT.mmio64_base + 0x4000
    platform.conf1_write(slot, 0x18, 4, high & 0xFFFF_FFFF)
    platform.conf1_write(slot, 0x1C, 4, high >> 32)
    assert device.bar_address(2) == high
    assert device.moves[-1][2] == high
    # and the IO BAR, by byte writes
    platform.conf1_write(slot, 0x11, 1, 0x20)  # 0x2000 | flags
    assert device.bar_address(0) == 0x2000 and platform.pio.find(0x2000).device is device.io  # type: ignore[union-attr]
    platform.check_invariants()


def test_command_register_gates_decoding(platform: Platform) -> None:
    device = Device()
    slot = platform.root.add(device)
    io, mem = device.bar_address(0), device.bar_address(1)
    assert io is not None and mem is not None
    device.moves.clear()
    platform.conf1_write(slot, 0x04, 2, 0x0001)  # IO only
    assert device.bar_address(0) == io and device.bar_address(1) is None and device.bar_address(2) is None
    assert platform.mmio.find(mem) is None
    platform.conf1_write(slot, 0x04, 2, 0x0002)  # memory only
    assert device.bar_address(0) is None and platform.pio.find(io) is None and device.bar_address(1) == mem
    # a move while decoding is off maps nothing until decoding comes back
    platform.conf1_write(slot, 0x04, 2, 0)
    platform.conf1_write(slot, 0x14, 4, LAYOUT.mmio32_base + 0x20_0000)
    assert device.bar_address(1) is None
    platform.conf1_write(slot, 0x04, 2, 0x0003)
    assert device.bar_address(1) == LAYOUT.mmio32_base + 0x20_0000
    assert (1, None, LAYOUT.mmio32_base + 0x20_0000) in device.moves
    platform.check_invariants()


def test_overlapping_and_out_of_window_bars_are_tolerated(platform: Platform, caplog: pytest.LogCaptureFixture) -> None:
    a, b = Device(), Device()
    slot_a, slot_b = platform.root.add(a), platform.root.add(b)
    b_mem = b.bar_address(1)
    assert b_mem is not None
    a.moves.clear()
    old = a.bar_address(1)
    platform.conf1_write(slot_a, 0x14, 4, b_mem)  # onto b's BAR
    assert a.bar_address(1) is None and a.moves == [(1, old, None)]
    assert platform.mmio.find(b_mem).device is b.mem32  # type: ignore[union-attr]
    assert platform.root.refused == 1 and "not decoded" in caplog.text
    # b moves away: a gets the range it asked for
    platform.conf1_write(slot_b, 0x14, 4, b_mem + 0x10_0000)
    assert a.bar_address(1) == b_mem and b.bar_address(1) == b_mem + 0x10_0000
    # outside the windows: the ECAM, the IOAPIC, RAM, the top of the 64-bit window
    for address in (LAYOUT.ecam_base, 0xFEC0_0000, 0x10_0000, 0xFFFF_F000):
        platform.conf1_write(slot_a, 0x14, 4, address)
        assert a.bar_address(1) is None
    platform.conf1_write(slot_a, 0x18, 4, 0)
    platform.conf1_write(slot_a, 0x1C, 4, (LAYOUT.mmio64_base + LAYOUT.mmio64_size) >> 32)
    assert a.bar_address(2) is None
    platform.conf1_write(slot_a, 0x10, 4, 0x3F8)  # the UART's ports are outside the I/O window
    assert a.bar_address(0) is None
    platform.conf1_write(slot_a, 0x10, 4, 0xFFFF_FFFF)  # sizing with decoding on
    assert a.bar_address(0) is None
    platform.check_invariants()


def test_a_bar_never_lands_on_another_device_of_the_bus(platform: Platform) -> None:
    class Squatter:
        def read(self, offset: int, data: memoryview) -> None:
            data[:] = bytes(len(data))

        def write(self, offset: int, data: memoryview) -> None:
            pass

    platform.mmio.insert(LAYOUT.mmio32_base, 0x1000, Squatter())  # something the VMM put in the window
    device = Device()
    slot = platform.root.add(device)
    assert device.bar_address(1) != LAYOUT.mmio32_base  # the allocator steps around it
    platform.conf1_write(slot, 0x14, 4, LAYOUT.mmio32_base)
    assert device.bar_address(1) is None
    platform.check_invariants()


def test_windows_and_slots_run_out_cleanly() -> None:
    platform = Platform()
    big = PciFunction(1, 2, 3)
    big.add_bar(0, 1 << 31, BarKind.MEM32)  # larger than the 512 MiB 32-bit window
    with pytest.raises(PciError, match="no room"):
        platform.root.add(big)
    assert big.root is None
    for _ in range(31):
        platform.root.add(PciFunction(1, 2, 3))
    with pytest.raises(PciError, match="slots"):
        platform.root.add(PciFunction(1, 2, 3))
    with pytest.raises(PciError):
        Platform().root.add(PciFunction(1, 2, 3), slot=0)  # the host bridge's


# --- capabilities ----------------------------------------------------------------------------------
def walk_capabilities(platform: Platform, slot: int) -> list[tuple[int, int]]:
    assert platform.conf1_read(slot, 0x06, 2) & 0x10  # Capabilities List
    found, offset = [], platform.conf1_read(slot, 0x34, 1)
    while offset:
        assert offset >= 0x40 and offset % 4 == 0 and len(found) < 48
        found.append((platform.conf1_read(slot, offset, 1), offset))
        offset = platform.conf1_read(slot, offset + 1, 1)
    return found


def test_capability_list_walks(platform: Platform) -> None:
    device = Device(platform.router, msix_vectors=3)
    common = device.add_vendor_capability(bytes([1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0x38, 0, 0]))
    notify = device.add_vendor_capability(bytes([2, 2, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 0, 0, 4, 0, 0, 0]))
    window = device.add_vendor_capability(bytes(13), writable=b"\x00\x00\xff\x00\x00" + b"\xff" * 8)
    slot = platform.root.add(device)
    caps = walk_capabilities(platform, slot)
    assert caps == [(0x11, device.msix_offset), (0x09, common), (0x09, notify), (0x09, window)]
    assert platform.conf1_read(slot, common + 2, 1) == 16  # cap_len counts id, next and itself
    assert platform.conf1_read(slot, notify + 2, 1) == 20
    assert platform.conf1_read(slot, common + 3, 1) == 1
    platform.conf1_write(slot, common + 3, 1, 0x77)  # read-only by default
    assert platform.conf1_read(slot, common + 3, 1) == 1
    platform.conf1_write(slot, window + 5, 1, 0x04)  # virtio's PCI_CFG bar field: writable
    platform.conf1_write(slot, window + 8, 4, 0x12345678)
    assert platform.conf1_read(slot, window + 5, 1) == 4 and platform.conf1_read(slot, window + 8, 4) == 0x12345678
    platform.conf1_write(slot, window + 3, 1, 0x77)
    assert platform.conf1_read(slot, window + 3, 1) == 0
    # MSI-X capability: table size N-1, BIR/offsets
    control = platform.conf1_read(slot, device.msix_offset + 2, 2)  # type: ignore[operator]
    assert control == 2
    assert platform.conf1_read(slot, device.msix_offset + 4, 4) == 0x2000 | 2  # type: ignore[operator]
    assert platform.conf1_read(slot, device.msix_offset + 8, 4) == 0x3000 | 2  # type: ignore[operator]


def test_a_function_without_capabilities_says_so(platform: Platform) -> None:
    slot = platform.root.add(Device())
    assert not platform.conf1_read(slot, 0x06, 2) & 0x10 and platform.conf1_read(slot, 0x34, 1) == 0


def test_capabilities_must_fit() -> None:
    function = PciFunction(1, 2, 3)
    function.add_vendor_capability(bytes(180))
    with pytest.raises(PciError, match="fit"):
        function.add_vendor_capability(bytes(20))


# --- MSI-X --------------------------------------------------------------------------------------------
class Msix:
    """A device with MSI-X on a platform, and the guest's view of its table."""

    def __init__(self, vectors: int = 4) -> None:
        self.platform = Platform()
        self.device = Device(self.platform.router, msix_vectors=vectors)
        self.slot = self.platform.root.add(self.device)
        self.msix = self.device.msix
        assert self.msix is not None
        bar = self.device.bar_address(2)
        assert bar is not None
        self.table = bar + 0x2000
        self.pba = bar + 0x3000
        self.control = self.device.msix_offset + 2  # type: ignore[operator]

    def set_control(self, value: int) -> None:
        self.platform.conf1_write(self.slot, self.control, 2, value)

    def program(self, vector: int, address: int, data: int, *, masked: bool) -> None:
        entry = self.table + 16 * vector
        self.platform.mmio_write(entry, 8, address)
        self.platform.mmio_write(entry + 8, 4, data)
        self.platform.mmio_write(entry + 12, 4, int(masked))

    def unmask(self, vector: int, masked: bool = False) -> None:
        self.platform.mmio_write(self.table + 16 * vector + 12, 4, int(masked))

    def fired(self, vector: int) -> int:
        assert self.msix is not None
        return self.msix.eventfd(vector).take()

    def pba_bits(self) -> int:
        return self.platform.mmio_read(self.pba, 8)


def test_msix_table_starts_masked_and_takes_any_width() -> None:
    m = Msix(vectors=4)
    p = m.platform
    for vector in range(4):
        assert p.mmio_read(m.table + 16 * vector + 12, 4) == 1
        assert p.mmio_read(m.table + 16 * vector, 8) == 0
    p.mmio_write(m.table + 16, 8, 0x0000_0001_FEE0_1003)  # a QWORD: address with bits 1:0 set
    assert p.mmio_read(m.table + 16, 4) == 0xFEE0_1000  # bits 1:0 are read-only zero
    assert p.mmio_read(m.table + 20, 4) == 1
    p.mmio_write(m.table + 16 + 8, 8, 0xFFFF_FFFF_0000_4041)  # data + vector control in one QWORD
    assert p.mmio_read(m.table + 16 + 8, 4) == 0x4041
    assert p.mmio_read(m.table + 16 + 12, 4) == 1  # only the mask bit is writable
    p.mmio_write(m.table + 16 + 9, 1, 0x77)  # a byte in the middle of data
    assert p.mmio_read(m.table + 16 + 8, 4) == 0x7741
    p.mmio_write(m.pba, 8, 0xFFFF_FFFF_FFFF_FFFF)  # the PBA is read-only
    assert m.pba_bits() == 0
    # the rest of the BAR is the device's own
    bar = m.device.bar_address(2)
    assert bar is not None
    p.mmio_write(bar + 0x10, 4, 0xAB)
    assert m.device.mem64.writes == [(0x10, b"\xab\0\0\0")]
    # an access straddling the table's end belongs to nobody
    assert p.mmio_read(m.table + 16 * 4 - 4, 8) == 0xFFFF_FFFF_FFFF_FFFF


def test_msix_disabled_falls_back_to_intx() -> None:
    m = Msix()
    assert m.msix is not None
    assert m.msix.notify(0) is False
    m.device.notify(0)  # the function's helper takes INTx
    gsi = m.device.intx_gsi
    assert gsi is not None and m.platform.lines[gsi] is True


def test_msix_pending_bits_and_unmask_delivery() -> None:
    m = Msix(vectors=4)
    assert m.msix is not None
    kvm = m.platform.kvm
    m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)  # Linux: enable with the function masked
    m.program(1, 0xFEE0_0000, 0x4041, masked=True)
    assert m.msix.notify(1) is True  # masked: pending
    assert m.fired(1) == 0 and m.pba_bits() == 0b10 and m.msix.pending(1)
    assert kvm.msi_routes() == {}  # nothing routed yet
    m.set_control(MSIX_ENABLE)  # function unmasked; the vector still masked
    assert m.fired(1) == 0 and m.pba_bits() == 0b10
    m.unmask(1)  # now it fires: route first, then the irqfd
    gsi = m.msix.gsi(1)
    assert kvm.msi_routes() == {gsi: (0xFEE0_0000, 0x4041)}
    assert kvm.irqfds[m.msix.eventfd(1).fd] == gsi
    assert m.fired(1) == 1 and m.pba_bits() == 0
    assert m.msix.notify(1) and m.fired(1) == 1  # live: straight to the irqfd, no routing push
    pushes = m.platform.router.pushes
    for _ in range(10):
        m.msix.notify(1)
    assert m.fired(1) == 10 and m.platform.router.pushes == pushes
    # the function mask holds everything back; unmasking the function releases it
    m.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK)
    m.msix.notify(1)
    assert m.fired(1) == 0 and m.pba_bits() == 0b10
    m.set_control(MSIX_ENABLE)
    assert m.fired(1) == 1 and m.pba_bits() == 0
    # a vector nobody unmasked stays pending and unrouted
    m.msix.notify(3)
    assert m.pba_bits() == 0b1000 and m.msix.gsi(3) not in kvm.msi_routes()
    # vectors that do not exist are dropped, counted
    assert m.msix.notify(4) is True and m.msix.notify(0xFFFF) is True and m.msix.dropped == 2


def test_msix_route_follows_the_entry() -> None:
    m = Msix(vectors=2)
    assert m.msix is not None
    kvm = m.platform.kvm
    m.set_control(MSIX_ENABLE)
    m.program(0, 0xFEE0_0000, 0x30, masked=False)
    gsi = m.msix.gsi(0)
    assert kvm.msi_routes()[gsi] == (0xFEE0_0000, 0x30)
    m.platform.mmio_write(m.table + 8, 4, 0x31)  # rewritten while live: re-routed at once
    assert kvm.msi_routes()[gsi] == (0xFEE0_0000, 0x31)
    m.unmask(0, masked=True)
    m.platform.mmio_write(m.table + 8, 4, 0x32)  # while masked: the route waits for the unmask
    assert kvm.msi_routes()[gsi] == (0xFEE0_0000, 0x31)
    m.unmask(0)
    assert kvm.msi_routes()[gsi] == (0xFEE0_0000, 0x32)
    # every table KVM got carries KVM's default routes first
    for table in kvm.tables:
        assert tuple(table[:40]) == default_routes()


def test_msix_enable_turns_intx_off() -> None:
    m = Msix()
    gsi = m.device.intx_gsi
    assert gsi is not None
    m.device.set_intx(True)
    assert m.platform.lines[gsi] is True
    m.set_control(MSIX_ENABLE)
    assert m.platform.lines[gsi] is False
    m.set_control(0)
    assert m.platform.lines[gsi] is True


def test_a_routing_failure_leaves_the_vector_pending() -> None:
    m = Msix(vectors=1)
    assert m.msix is not None
    m.platform.kvm.fail = True
    m.set_control(MSIX_ENABLE)
    m.program(0, 0xFEE0_0000, 0x40, masked=False)
    assert m.msix.notify(0) and m.fired(0) == 0 and m.msix.pending(0)
    m.platform.kvm.fail = False
    m.msix.notify(0)  # tries the route again
    assert m.fired(0) == 1 and not m.msix.pending(0)


def test_msix_close_gives_everything_back() -> None:
    m = Msix(vectors=3)
    assert m.msix is not None
    m.set_control(MSIX_ENABLE)
    m.program(0, 0xFEE0_0000, 0x40, masked=False)
    kvm = m.platform.kvm
    assert len(kvm.irqfds) == 3 and kvm.msi_routes()
    m.platform.root.close()
    assert kvm.irqfds == {} and kvm.msi_routes() == {}
    assert m.msix.notify(0) is True  # a late backend notification is harmless
    assert m.platform.pio.ranges == () and m.platform.mmio.ranges == ()


def test_msix_layout_is_checked(platform: Platform) -> None:
    device = Device()
    with pytest.raises(PciError):
        device.add_msix(4, platform.router, table_bar=0, table_offset=0, pba_bar=0, pba_offset=0x10)  # I/O BAR
    with pytest.raises(PciError):
        device.add_msix(4, platform.router, table_bar=1, table_offset=0xFF8, pba_bar=1, pba_offset=0)
    with pytest.raises(PciError):
        device.add_msix(4, platform.router, table_bar=1, table_offset=0, pba_bar=1, pba_offset=0x20)  # overlap
    assert platform.kvm.irqfds == {}  # nothing leaked by the refusals


# --- the GSI routing table --------------------------------------------------------------------------
def test_default_routes_are_kvms() -> None:
    routes = default_routes()
    assert len(routes) == 16 * 2 + 8
    for gsi in range(24):
        mine = [r for r in routes if r.gsi == gsi]
        expected = [IrqchipRoute(gsi, IRQCHIP_IOAPIC, gsi)]
        if gsi < 16:
            expected.append(IrqchipRoute(gsi, IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE, gsi % 8))
        assert mine == expected
    assert IrqchipRoute(2, IRQCHIP_PIC_MASTER, 2) in routes  # KVM's default has it (QEMU's table does not)


def test_gsi_allocation_and_release() -> None:
    kvm = FakeKvm()
    router = GsiRouter(kvm, limit=28)
    gsis = [router.allocate() for _ in range(4)]
    assert gsis == [24, 25, 26, 27]
    with pytest.raises(GsiExhausted):
        router.allocate()
    router.set_msi_routes({25: (0xFEE0_0000, 0x41), 27: (0xFEE0_1000, 0x42)})
    assert kvm.tables[-1][40:] == [MsiRoute(25, 0xFEE0_0000, 0x41), MsiRoute(27, 0xFEE0_1000, 0x42)]
    assert router.table() == tuple(kvm.tables[-1])
    pushes = router.pushes
    router.set_msi_routes({25: (0xFEE0_0000, 0x41)})  # no change, no ioctl
    assert router.pushes == pushes
    router.release(25)  # drops its route
    assert kvm.msi_routes() == {27: (0xFEE0_1000, 0x42)}
    assert router.allocate() == 25
    with pytest.raises(ValueError):
        router.set_msi_routes({30: (0, 0)})  # never allocated
    with pytest.raises(ValueError):
        GsiRouter(kvm, first_gsi=16)
    assert GsiRouter(kvm)._limit == 24 + 4096 - 40  # KVM's MAX_IRQ_ROUTES entries in all


def test_a_refused_table_keeps_the_old_one() -> None:
    kvm = FakeKvm()
    router = GsiRouter(kvm)
    gsi = router.allocate()
    router.set_msi_routes({gsi: (0xFEE0_0000, 1)})
    kvm.fail = True
    with pytest.raises(OSError):
        router.set_msi_routes({gsi: (0xFEE0_0000, 2)})
    assert router.msi_route(gsi) == (0xFEE0_0000, 1)


# --- INTx -----------------------------------------------------------------------------------------------
def test_intx_swizzle_and_interrupt_line(platform: Platform) -> None:
    assert [LAYOUT.intx_gsi(slot, 1) for slot in range(1, 6)] == [17, 18, 19, 16, 17]
    assert [LAYOUT.intx_gsi(3, pin) for pin in range(1, 5)] == [19, 16, 17, 18]
    device = Device()
    slot = platform.root.add(device, slot=3)
    assert device.intx_gsi == 19 and platform.conf1_read(slot, 0x3C, 1) == 19


def test_intx_is_level_shared_and_gated(platform: Platform) -> None:
    a, b = Device(), Device()
    slot_a = platform.root.add(a, slot=1)
    platform.root.add(b, slot=5)  # the same GSI as slot 1
    gsi = a.intx_gsi
    assert gsi == b.intx_gsi == 17
    a.set_intx(True)
    b.set_intx(True)
    assert platform.line_calls == [(17, True)]  # one edge for the shared line
    assert platform.conf1_read(slot_a, 0x06, 2) & 0x08  # Interrupt Status
    a.set_intx(False)
    assert platform.lines[17] is True  # b still asserts it
    b.set_intx(False)
    assert platform.line_calls == [(17, True), (17, False)]
    assert not platform.conf1_read(slot_a, 0x06, 2) & 0x08
    # INTx Disable holds the line low; Interrupt Status still shows the request
    platform.conf1_write(slot_a, 0x04, 2, a.command | 0x400)
    a.set_intx(True)
    assert platform.lines[17] is False and platform.conf1_read(slot_a, 0x06, 2) & 0x08
    platform.conf1_write(slot_a, 0x04, 2, a.command & ~0x400)
    assert platform.lines[17] is True


# --- a hostile guest --------------------------------------------------------------------------------------
_SIZES = st.sampled_from([1, 2, 4])
_VALUES = st.one_of(st.just(0xFFFF_FFFF_FFFF_FFFF), st.just(0), st.integers(0, (1 << 64) - 1),
                    st.sampled_from([LAYOUT.mmio32_base, LAYOUT.mmio32_base + 0x4000, LAYOUT.ecam_base,
                                     LAYOUT.mmio64_base, 0x1000, 0x2000, 0xFEC0_0000, 0x7]))  # fmt: skip
_OPS = st.one_of(
    st.tuples(st.just("conf1_address"), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just("conf1_data"), st.integers(0, 3), _SIZES, st.booleans(), _VALUES),
    st.tuples(st.just("cf8_other"), st.integers(0, 3), st.sampled_from([1, 2]), st.booleans(), _VALUES),
    st.tuples(st.just("ecam"), st.integers(0, 3), st.sampled_from([0, 1, 2, 3, 31]), st.integers(0, 0xFFF),
              st.sampled_from([1, 2, 4, 8]), st.booleans(), _VALUES),
    st.tuples(st.just("config"), st.sampled_from([1, 2]), st.sampled_from([0x04, 0x10, 0x14, 0x18, 0x1C, 0x3C, 0x40,
                                                                            0x42, 0x44]),
              _SIZES, _VALUES),
    st.tuples(st.just("bar"), st.integers(0, 2), st.integers(0, 0x3FFF), st.sampled_from([1, 2, 4, 8]),
              st.booleans(), _VALUES),
    st.tuples(st.just("msix_control"), st.integers(0, 1),
              st.one_of(st.sampled_from([0, MSIX_ENABLE, MSIX_ENABLE | MSIX_FUNCTION_MASK]), st.integers(0, 0xFFFF))),
    st.tuples(st.just("table"), st.integers(0, 1), st.integers(0, 3), st.sampled_from([0, 4, 8, 12, 0, 8, 3, 13]),
              st.sampled_from([4, 8, 4, 1, 2]), st.one_of(st.sampled_from([0, 1, 0xFEE0_0000]), _VALUES)),
    st.tuples(st.just("table"), st.integers(0, 1), st.integers(0, 2), st.just(12), st.just(4), st.sampled_from([0, 1])),
    st.tuples(st.just("msix_control"), st.integers(0, 1), st.just(MSIX_ENABLE)),
    st.tuples(st.just("move"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 63), st.booleans()),
    st.tuples(st.just("notify"), st.integers(0, 2), st.integers(-1, 4)),
    st.tuples(st.just("notify"), st.integers(0, 1), st.integers(0, 2)),
    st.tuples(st.just("intx"), st.integers(0, 2), st.booleans()),
)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OPS, min_size=5, max_size=80))
def test_a_hostile_guest_never_breaks_the_bus(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    p = Platform()
    devices = [Device(p.router, msix_vectors=3), Device(p.router, msix_vectors=1), Device()]
    slots = [p.root.add(d) for d in devices]
    # start where a driver leaves it: device 0 with MSI-X on, vectors 0 and 1 programmed and unmasked
    bar = devices[0].bar_address(2)
    assert bar is not None
    for vector in (0, 1):
        p.mmio_write(bar + 0x2000 + 16 * vector, 8, 0xFEE0_0000)
        p.mmio_write(bar + 0x2000 + 16 * vector + 8, 8, 0x40 + vector)
    p.conf1_write(slots[0], devices[0].msix_offset + 2, 2, MSIX_ENABLE)  # type: ignore[operator]
    for op in ops:
        kind = op[0]
        if kind == "conf1_address":
            p.pio.write(CF8, memoryview(op[1].to_bytes(4, "little")))
        elif kind == "conf1_data":
            _, offset, size, write, value = op
            if offset + size > 4:
                size = 1
            data = bytearray(value.to_bytes(8, "little")[:size])
            (p.pio.write if write else p.pio.read)(CFC + offset, memoryview(data))
        elif kind == "cf8_other":
            _, offset, size, write, value = op
            data = bytearray(value.to_bytes(8, "little")[:size])
            (p.pio.write if write else p.pio.read)(CF8 + offset, memoryview(data))
        elif kind == "ecam":
            _, bus, dev, reg, size, write, value = op
            address = p.layout.ecam_base + (bus << 20 | dev << 15 | reg)
            data = bytearray(value.to_bytes(8, "little")[:size])
            (p.mmio.write if write else p.mmio.read)(address, memoryview(data))
        elif kind == "config":
            _, which, reg, size, value = op
            p.conf1_write(slots[which], reg - reg % size, size, value & ((1 << (8 * size)) - 1))
        elif kind == "bar":
            _, which, offset, size, write, value = op
            base = devices[which].bar_address(2)
            if base is not None:
                data = bytearray(value.to_bytes(8, "little")[:size])
                (p.mmio.write if write else p.mmio.read)(base + offset, memoryview(data))
        elif kind == "msix_control":
            _, which, value = op
            p.conf1_write(slots[which], devices[which].msix_offset + 2, 2, value)  # type: ignore[operator]
        elif kind == "table":
            _, which, vector, field, size, value = op
            base = devices[which].bar_address(2)
            if base is not None:
                data = bytearray(value.to_bytes(8, "little")[:size])
                p.mmio.write(base + 0x2000 + 16 * vector + field, memoryview(data))
        elif kind == "move":  # onto another BAR, or a window's edge: overlaps and near misses
            _, which, index, pick, high_half_first = op
            targets = sorted({b.mapped for d in devices for b in d.declared_bars() if b.mapped is not None}
                             | {LAYOUT.io_base, LAYOUT.mmio32_base, LAYOUT.mmio64_base,
                                LAYOUT.mmio32_base + LAYOUT.mmio32_size - 0x1000})  # fmt: skip
            target = targets[pick % len(targets)]
            reg = 0x10 + 4 * index
            halves = [(reg, target & 0xFFFF_FFFF)] + ([(reg + 4, target >> 32)] if index == 2 else [])
            for register, value in reversed(halves) if high_half_first else halves:
                p.conf1_write(slots[which], register, 4, value)
        elif kind == "notify":
            devices[op[1]].notify(op[2])
        else:
            devices[op[1]].set_intx(op[2])
        p.check_invariants()
        for device in devices:  # a deliverable vector is routed to its entry's message and never left pending
            msix = device.msix
            if msix is not None:
                for vector in range(msix.vectors):
                    assert p.kvm.irqfds[msix.eventfd(vector).fd] == msix.gsi(vector)
                    if msix.enabled and not msix.function_masked and not msix.masked(vector):
                        assert p.kvm.msi_routes()[msix.gsi(vector)] == msix.message(vector)
                        assert not msix.pending(vector)
        for table in p.kvm.tables:
            assert tuple(table[:40]) == default_routes()
    # the shared INTx lines end where the functions' states say
    for gsi in set(LAYOUT.intx_gsis):
        expected = any(d._intx_applied for d in devices if d.intx_gsi == gsi)
        assert p.lines.get(gsi, False) == expected
    p.root.close()
    assert p.kvm.irqfds == {} and p.pio.ranges == () and p.mmio.ranges == ()


def test_pci_layout_puts_the_64_bit_window_above_ram() -> None:
    assert pci_layout(128 << 20).mmio64_base == 4 << 30
    assert pci_layout(3 << 30).mmio64_base == 4 << 30
    assert pci_layout((4 << 30) + 4096).mmio64_base == 6 << 30  # RAM to 5 GiB + 4 KiB, next GiB up
    layout = pci_layout(1 << 40)
    assert layout.mmio64_base >= (1 << 40) + (1 << 30)
    assert LAYOUT.mmio32_base + LAYOUT.mmio32_size <= LAYOUT.ecam_base
    assert LAYOUT.ecam_base + LAYOUT.ecam_size <= 0xFEC0_0000
    with pytest.raises(ValueError):
        LAYOUT.intx_gsi(1, 0)


def test_msix_and_intx_hold_up_under_threads() -> None:
    """A backend notifying while vCPUs toggle masks: nothing raises, nothing is lost for good
    (a vector left unmasked is not pending), and a shared INTx line ends at the OR."""
    m = Msix(vectors=2)
    assert m.msix is not None
    msix = m.msix
    m.set_control(MSIX_ENABLE)
    m.program(0, 0xFEE0_0000, 0x40, masked=True)
    other = Device()
    m.platform.root.add(other, slot=m.slot + 4)  # the same INTx GSI
    errors: list[BaseException] = []

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        return run

    def backend() -> None:
        for i in range(3000):
            msix.notify(0)
            other.set_intx(i % 2 == 0)

    def vcpu() -> None:
        for i in range(300):
            m.unmask(0, masked=i % 2 == 0)
            m.device.set_intx(i % 3 == 0)
        m.unmask(0)

    threads = [threading.Thread(target=guarded(backend)), threading.Thread(target=guarded(vcpu))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    msix.notify(0)
    assert not msix.pending(0) and msix.delivered >= 1
    assert m.fired(0) == msix.delivered
    gsi = other.intx_gsi
    assert gsi == m.device.intx_gsi
    m.device.set_intx(False)
    other.set_intx(True)
    assert m.platform.lines[gsi] is True
    other.set_intx(False)
    assert m.platform.lines[gsi] is False


def test_set_gsi_routing_packs_struct_kvm_irq_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    from trivmm.kvm._ffi import ffi
    from trivmm.kvm.constants import IRQ_ROUTING_IRQCHIP, IRQ_ROUTING_MSI
    from trivmm.kvm.vm import Vm

    class System:
        def require(self, *caps: object) -> None:
            pass

    seen: list[bytes] = []

    def ioctl(self: Vm, request: str, arg: object = None) -> int:
        assert request == "KVM_SET_GSI_ROUTING"
        nr = ffi.cast("struct kvm_irq_routing *", arg).nr
        seen.append(bytes(ffi.buffer(arg, 8 + 48 * nr)))
        return 0

    monkeypatch.setattr(Vm, "ioctl", ioctl)
    vm = Vm(System(), -1)  # type: ignore[arg-type]
    vm.set_gsi_routing([IrqchipRoute(9, IRQCHIP_PIC_SLAVE, 1), MsiRoute(30, 0x1_FEE0_1004, 0x4041)])
    (raw,) = seen
    assert struct.unpack_from("<II", raw) == (2, 0)
    assert struct.unpack_from("<IIII II", raw, 8) == (9, IRQ_ROUTING_IRQCHIP, 0, 0, IRQCHIP_PIC_SLAVE, 1)
    assert struct.unpack_from("<IIII IIII", raw, 56) == (30, IRQ_ROUTING_MSI, 0, 0, 0xFEE0_1004, 1, 0x4041, 0)
    vm.set_gsi_routing([])  # an empty table is a table too
    assert struct.unpack_from("<I", seen[1])[0] == 0
