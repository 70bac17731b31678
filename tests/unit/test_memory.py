from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trivmm.boot.layout import MMIO_GAP_END, MMIO_GAP_START, ram_ranges
from trivmm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.from_ranges([(0, 16 * PAGE_SIZE), (0x100000, 4 * PAGE_SIZE)])
    yield mem
    mem.close()


def test_round_trip_and_views_share_memory(memory: GuestMemory) -> None:
    memory.write(0x100, b"hello")
    assert memory.read(0x100, 5) == b"hello"
    view = memory.view(0x100, 5, write=True)
    view[0:1] = b"J"
    assert memory.read(0x100, 5) == b"Jello"
    memory.write_u64(0x100008, 0x1122334455667788)
    assert memory.read_u32(0x10000C) == 0x11223344
    assert memory.read_u16(0x100008) == 0x7788


@pytest.mark.parametrize(("gpa", "length"), [
    (16 * PAGE_SIZE - 2, 4),  # runs past the first region
    (16 * PAGE_SIZE, 1),  # the hole
    (0x100000 + 4 * PAGE_SIZE, 1),  # past the end
    (-1, 1),
    (0, -1),
    ((1 << 64) - 1, 2),  # wraps
    (1 << 64, 0),
])  # fmt: skip
def test_out_of_bounds_accesses_raise(memory: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        memory.view(gpa, length)
    assert not memory.contains(gpa, length)


def test_vmm_writes_mark_pages_dirty(memory: GuestMemory) -> None:
    low = memory.regions[0]
    memory.take_vmm_dirty(low)
    memory.write(PAGE_SIZE - 1, b"ab")  # straddles pages 0 and 1
    memory.read(5 * PAGE_SIZE, 8)  # reads do not dirty
    dirty = memory.take_vmm_dirty(low)
    assert [i for i, d in enumerate(dirty) if d] == [0, 1]
    assert not any(memory.take_vmm_dirty(low))


def test_overlapping_regions_are_rejected() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory.from_ranges([(0, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)])


def test_ram_layout_skips_the_mmio_gap() -> None:
    assert ram_ranges(128 << 20) == [(0, 128 << 20)]
    assert ram_ranges(4 << 30) == [(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]
    with pytest.raises(ValueError):
        ram_ranges(1 << 20)


@given(st.integers(-(1 << 65), 1 << 65), st.integers(-10, 1 << 22))
def test_every_access_is_in_bounds_or_refused(gpa: int, length: int) -> None:
    mem = GuestMemory.from_ranges([(0x1000, 8 * PAGE_SIZE)])
    try:
        inside = 0x1000 <= gpa and length >= 0 and gpa + length <= 0x1000 + 8 * PAGE_SIZE
        if inside:
            assert len(mem.view(gpa, length)) == length
        else:
            with pytest.raises(GuestMemoryError):
                mem.view(gpa, length)
    finally:
        mem.close()
