from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trivmm.bus import PIO_LIMIT, AddressSpace, BusError


class Recorder:
    def __init__(self, fill: int = 0x5A) -> None:
        self.fill = fill
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        self.reads.append((offset, len(data)))
        data[:] = bytes([self.fill]) * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, bytes(data)))


def test_devices_see_offsets() -> None:
    space = AddressSpace("pio", PIO_LIMIT)
    dev = Recorder()
    space.insert(0x3F8, 8, dev)
    buf = bytearray(1)
    assert space.read(0x3FD, memoryview(buf))
    assert space.write(0x3F8, memoryview(b"A"))
    assert dev.reads == [(5, 1)]
    assert dev.writes == [(0, b"A")]
    assert buf == b"\x5a"


def test_unclaimed_reads_all_ones_and_ignores_writes() -> None:
    space = AddressSpace("pio", PIO_LIMIT)
    buf = bytearray(4)
    assert not space.read(0x80, memoryview(buf))
    assert buf == b"\xff\xff\xff\xff"
    assert not space.write(0x80, memoryview(b"\x01"))


def test_access_crossing_the_end_of_a_range_is_refused() -> None:
    space = AddressSpace("mmio", 1 << 64)
    dev = Recorder()
    space.insert(0x1000, 4, dev)
    buf = bytearray(4)
    assert not space.read(0x1002, memoryview(buf))
    assert buf == b"\xff" * 4
    assert not space.write(0x1003, memoryview(b"\x01\x02"))
    assert dev.reads == [] and dev.writes == []


@pytest.mark.parametrize(("base", "size"), [(0x10, 0), (0x10, -1), (-1, 4), (0xFFFF, 2), (0x10000, 1)])
def test_bad_ranges_are_rejected(base: int, size: int) -> None:
    with pytest.raises(BusError):
        AddressSpace("pio", PIO_LIMIT).insert(base, size, Recorder())


def test_overlaps_are_rejected_and_neighbours_accepted() -> None:
    space = AddressSpace("pio", PIO_LIMIT)
    space.insert(0x60, 5, Recorder())
    for base, size in [(0x60, 1), (0x5F, 2), (0x64, 1), (0x50, 0x100)]:
        with pytest.raises(BusError):
            space.insert(base, size, Recorder())
    space.insert(0x65, 1, Recorder())
    space.insert(0x5F, 1, Recorder())
    assert [r.base for r in space.ranges] == [0x5F, 0x60, 0x65]


def test_remove_frees_the_range() -> None:
    space = AddressSpace("pio", PIO_LIMIT)
    dev = Recorder()
    space.insert(0x70, 2, dev)
    assert space.find(0x71) is not None
    assert space.remove(0x70) is dev
    assert space.find(0x71) is None
    with pytest.raises(BusError):
        space.remove(0x70)


@given(st.lists(st.tuples(st.integers(0, PIO_LIMIT - 1), st.integers(1, 64)), max_size=40),
       st.lists(st.integers(0, PIO_LIMIT - 1), max_size=50))  # fmt: skip
def test_dispatch_agrees_with_a_naive_model(ranges: list[tuple[int, int]], probes: list[int]) -> None:
    space = AddressSpace("pio", PIO_LIMIT)
    accepted: list[tuple[int, int, Recorder]] = []
    for base, size in ranges:
        overlaps = any(b < base + size and base < b + s for b, s, _ in accepted)
        out_of_range = base + size > PIO_LIMIT
        dev = Recorder()
        if overlaps or out_of_range:
            with pytest.raises(BusError):
                space.insert(base, size, dev)
        else:
            space.insert(base, size, dev)
            accepted.append((base, size, dev))
    for address in probes:
        owner = next(((b, d) for b, s, d in accepted if b <= address < b + s), None)
        found = space.find(address)
        if owner is None:
            assert found is None
        else:
            assert found is not None and found.base == owner[0] and found.device is owner[1]
