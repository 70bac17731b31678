"""The split virtqueue (trivmm/devices/virtio/queue.py): every rule a driver can break, an
honest driver and a hostile one.

What a default run tries: 74 unit tests (parametrized cases counted),
``test_vring_need_event_matches_the_spec`` (200 examples), ``TestHonestDriver`` (40 examples of
up to 60 steps: a model driver, tests/unit/virtio_driver.py, against the queue; 150 to 600
chains popped and completed per run, queue sizes 1 to 256, indices started near 65535) and
``TestHostileDriver`` (50 examples of up to 50 steps: arbitrary bytes over the rings and
descriptors between and during pops, near-valid chains with fields set to anything; about 600
pops per run). About 13 s of CPU in all, imports included, on this project's 2-core machines:
15 to 25 s of wall time there, depending on load.
"""

from __future__ import annotations

import re
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.unit.virtio_driver import MAX_BUFFER, MAX_BUFFERS, Driver, Layout, Request
from trivmm.devices.virtio import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    DescriptorChain,
    QueueState,
    SplitQueue,
    VirtqueueError,
    vring_need_event,
)
from trivmm.devices.virtio import queue as queue_module
from trivmm.devices.virtio.constants import AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING, USED_FLAGS, USED_IDX, USED_RING
from trivmm.memory import GuestMemory, MemoryRegion

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")
# Guest RAM for the unit tests: two regions with a hole between them, small enough that
# "outside RAM" is everywhere.
LOW_END = 0x10000
HIGH = 0x20000
HIGH_END = 0x21000
RAM = [(0, LOW_END), (HIGH, HIGH_END - HIGH)]
SIZE = 8


class CountingMemory(GuestMemory):
    """Guest memory that counts the VMM's accesses (every read and write goes through
    ``view``), can refuse more than ``budget`` of them, and can call ``on_access`` before each
    one: a driver that rewrites the rings while the device reads them."""

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        super().__init__(regions)
        self.accesses = 0
        self.budget: int | None = None
        self.on_access: Callable[[int], None] | None = None
        self.addresses: list[int] = []  # of the last ``record`` accesses
        self.record = 0
        self._in_hook = False
        _LIVE_MEMORIES.add(self)

    def view(self, gpa: int, length: int, *, write: bool = False) -> memoryview:
        if not self._in_hook:
            self.accesses += 1
            if self.record:
                self.addresses = [*self.addresses[-self.record + 1 :], gpa]
            if self.budget is not None and self.accesses > self.budget:
                raise AssertionError(f"more than {self.budget} guest-memory accesses in one call")
            if self.on_access is not None:
                self._in_hook = True
                try:
                    self.on_access(self.accesses)
                finally:
                    self._in_hook = False
        return super().view(gpa, length, write=write)

    # The queue reads and writes its rings through views resolved once (``resolve``), with
    # the struct objects of trivmm.devices.virtio.queue; ``_count_ring_accesses`` below
    # routes those through ``access`` too.
    def access(self, buffer: object, offset: int, size: int, write: bool) -> bool:
        """Count an access the queue makes through a resolved view (``offset`` in bytes) or a
        u16 word view (``offset`` in words), if it is one of ours."""
        for region, view, words in zip(self.regions, self._views, self._words[2], strict=False):  # none once closed
            if buffer is view or buffer is words:
                at = offset if buffer is view else 2 * offset
                self.view(region.guest_base + at, size, write=write)
                return True
        return False

    # GuestMemory's scalar accessors skip ``view`` for speed: count them as accesses too.
    def read_u16(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 2), "little")

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 8), "little")

    def write_u16(self, gpa: int, value: int) -> None:
        self.view(gpa, 2, write=True)[:] = value.to_bytes(2, "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4, write=True)[:] = value.to_bytes(4, "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8, write=True)[:] = value.to_bytes(8, "little")

    def count(self) -> _Counter:
        return _Counter(self)


class _CountingStruct:
    """A ``struct.Struct`` whose accesses into a ``CountingMemory``'s views are counted (and
    hooked) as that memory's accesses, before they happen."""

    def __init__(self, inner: struct.Struct) -> None:
        self.inner = inner
        self.size = inner.size

    def unpack_from(self, buffer: Any, offset: int = 0) -> tuple[Any, ...]:
        for memory in list(_LIVE_MEMORIES):
            if memory.access(buffer, offset, self.size, False):
                break
        return self.inner.unpack_from(buffer, offset)

    def pack_into(self, buffer: Any, offset: int, *values: Any) -> None:
        for memory in list(_LIVE_MEMORIES):
            if memory.access(buffer, offset, self.size, True):
                break
        self.inner.pack_into(buffer, offset, *values)


_LIVE_MEMORIES: weakref.WeakSet[CountingMemory] = weakref.WeakSet()


def _counted_load_u16(words: memoryview, index: int) -> int:
    for memory in list(_LIVE_MEMORIES):
        if memory.access(words, index, 2, False):
            break
    return int(words[index])


def _counted_store_u16(words: memoryview, index: int, value: int) -> None:
    for memory in list(_LIVE_MEMORIES):
        if memory.access(words, index, 2, True):
            break
    words[index] = value


@pytest.fixture(autouse=True)
def _count_ring_accesses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ring access of the queue counted and hooked, as ``view`` accesses are."""
    for name in ("_DESC", "_USED_ELEM"):
        monkeypatch.setattr(queue_module, name, _CountingStruct(getattr(queue_module, name)))
    monkeypatch.setattr(queue_module, "_load_u16", _counted_load_u16)
    monkeypatch.setattr(queue_module, "_store_u16", _counted_store_u16)


@attrs.define
class _Counter:
    memory: CountingMemory
    start: int = 0
    used: int = 0

    def __enter__(self) -> _Counter:
        self.start = self.memory.accesses
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = self.memory.accesses - self.start


@attrs.define(eq=False)
class Rig:
    """A queue of ``SIZE`` over small RAM, and helpers to write what a driver writes."""

    memory: CountingMemory
    queue: SplitQueue
    layout: Layout

    @classmethod
    def make(cls, size: int = SIZE, *, event_idx: bool = False, **limits: int) -> Rig:
        memory = CountingMemory(MemoryRegion.allocate(base, length) for base, length in RAM)
        layout = Layout.packed(size)
        queue = SplitQueue(memory, max_size=256, **limits)
        rig = cls(memory, queue, layout)
        rig.configure(event_idx=event_idx)
        return rig

    def configure(self, *, event_idx: bool = False) -> None:
        q, lay = self.queue, self.layout
        q.size, q.desc_addr, q.avail_addr, q.used_addr = lay.size, lay.desc_addr, lay.avail_addr, lay.used_addr
        q.event_idx = event_idx
        q.set_ready(True)

    def desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0, *,
             table: int | None = None) -> None:  # fmt: skip
        base = self.layout.desc_addr if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr, length, flags, next_index))

    def offer(self, *heads: int) -> None:
        idx = self.memory.read_u16(self.layout.avail_addr + AVAIL_IDX)
        for head in heads:
            self.memory.write_u16(self.layout.avail_addr + AVAIL_RING + 2 * (idx % self.layout.size), head)
            idx = (idx + 1) & 0xFFFF
        self.memory.write_u16(self.layout.avail_addr + AVAIL_IDX, idx)

    def pop_error(self) -> str:
        with pytest.raises(VirtqueueError) as info:
            self.queue.pop()
        assert self.queue.broken == str(info.value)
        return str(info.value)

    def used(self) -> list[tuple[int, int]]:
        idx = self.memory.read_u16(self.layout.used_addr + USED_IDX)
        base = self.layout.used_addr + USED_RING
        return [struct.unpack("<II", self.memory.read(base + 8 * (i % self.layout.size), 8)) for i in range(idx)]


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(size: int = SIZE, *, event_idx: bool = False, **limits: int) -> Rig:
        made.append(Rig.make(size, event_idx=event_idx, **limits))
        return made[-1]

    yield make
    for r in made:
        r.memory.close()


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig()


BUF = 0x4000  # a free data area in the low region


# --- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("max_size", [0, 3, 48, 65536])
def test_max_size_is_a_power_of_two_up_to_32768(max_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        SplitQueue(GuestMemory.from_ranges([(0, 0x1000)]), max_size=max_size)


def test_power_on_values() -> None:
    q = SplitQueue(GuestMemory.from_ranges([(0, 0x1000)]), max_size=64)
    assert (q.size, q.desc_addr, q.avail_addr, q.used_addr, q.event_idx, q.ready) == (64, 0, 0, 0, False, False)
    assert (q.next_avail, q.next_used, q.broken) == (0, 0, None)
    assert q.save() == QueueState(64, 0, 0, 0, False, False, 0, 0, 0)


@pytest.mark.parametrize("size", [0, 3, 12, 512])
def test_ready_checks_the_size(rig: Rig, size: int) -> None:
    rig.queue.set_ready(False)
    rig.queue.size = size
    with pytest.raises(VirtqueueError, match=f"queue size {size} is not a power of two from 1 to 256"):
        rig.queue.set_ready(True)
    assert not rig.queue.ready and rig.queue.broken is None


@pytest.mark.parametrize(("field", "addr", "message"), [
    ("desc_addr", 0x1008, "descriptor table address 0x1008 is not 16-byte aligned"),
    ("avail_addr", 0x2001, "available ring address 0x2001 is not 2-byte aligned"),
    ("used_addr", 0x3002, "used ring address 0x3002 is not 4-byte aligned"),
    ("desc_addr", -16, "descriptor table address -0x10 is not a 64-bit address"),
    ("desc_addr", LOW_END, r"descriptor table \(0x10000\+0x80\) is not inside guest RAM"),  # the hole
    ("desc_addr", LOW_END - 0x40, r"descriptor table \(0xffc0\+0x80\) is not inside guest RAM"),  # straddles
    ("avail_addr", HIGH_END - 0x10, r"available ring \(0x20ff0\+0x16\) is not inside guest RAM"),  # past the end
    ("used_addr", 2**64 - 0x20, r"used ring \(0xffffffffffffffe0\+0x46\) is not inside guest RAM"),  # wraps
    ("used_addr", 2**64, "used ring address 0x10000000000000000 is not a 64-bit address"),
])  # fmt: skip
def test_ready_checks_each_ring(rig: Rig, field: str, addr: int, message: str) -> None:
    rig.queue.set_ready(False)
    setattr(rig.queue, field, addr)
    with pytest.raises(VirtqueueError, match=message):
        rig.queue.set_ready(True)
    assert not rig.queue.ready
    assert rig.queue.pop() is None  # a queue that is not ready has nothing to offer


def test_configuration_is_frozen_while_ready(rig: Rig) -> None:
    for field, value in [("size", 4), ("desc_addr", 0x8000), ("event_idx", True)]:
        with pytest.raises(VirtqueueError, match=f"changed the queue's {field} while the queue is ready"):
            setattr(rig.queue, field, value)
    rig.queue.size = SIZE  # rewriting the same value is harmless
    rig.queue.set_ready(False)
    rig.queue.size = 4
    assert rig.queue.size == 4


# --- honest chains ------------------------------------------------------------------------
def test_a_direct_chain_readable_then_writable(rig: Rig) -> None:
    rig.memory.write(BUF, b"header")
    rig.memory.write(HIGH, b"body")
    rig.desc(3, BUF, 6, NEXT, 5)
    rig.desc(5, HIGH, 4, NEXT, 0)
    rig.desc(0, BUF + 0x100, 16, WRITE | NEXT, 7)
    rig.desc(7, BUF + 0x200, 1, WRITE)
    rig.offer(3)
    chain = rig.queue.pop()
    assert chain == DescriptorChain(rig.memory, 3, ((BUF, 6), (HIGH, 4)), ((BUF + 0x100, 16), (BUF + 0x200, 1)), 10, 17)
    assert chain.read() == b"headerbody" and chain.read(8) == b"headerbo"
    assert [bytes(v) for v in chain.readable_views()] == [b"header", b"body"]
    rig.memory.take_vmm_dirty(rig.memory.regions[0])
    assert chain.write(b"x" * 20) == 17
    assert chain.write(b"yz", offset=15) == 2
    assert rig.memory.read(BUF + 0x100, 16) == b"x" * 15 + b"y" and rig.memory.read(BUF + 0x200, 1) == b"z"
    assert rig.memory.take_vmm_dirty(rig.memory.regions[0])[BUF // 0x1000]  # device writes are recorded
    assert [len(v) for v in chain.writable_views()] == [16, 1]
    assert rig.queue.pop() is None


def test_chains_come_in_ring_order_and_avail_idx_is_read_once_per_batch(rig: Rig) -> None:
    for head in range(SIZE):
        rig.desc(head, BUF + 0x10 * head, 0x10)
    rig.offer(5, 1, 7)
    rig.memory.record = 100
    assert [c.head for c in rig.queue] == [5, 1, 7]
    # once for the batch of three, once more to find the ring empty
    assert rig.memory.addresses.count(rig.layout.avail_addr + AVAIL_IDX) == 2


def test_a_chain_as_long_as_the_queue_is_fine(rig: Rig) -> None:
    for i in range(SIZE):
        rig.desc(i, BUF + i, 1, NEXT if i + 1 < SIZE else 0, i + 1)
    rig.offer(0)
    with rig.memory.count() as c:
        chain = rig.queue.pop()
    assert chain is not None and len(chain.readable) == SIZE
    assert c.used <= SIZE + 3


def test_zero_length_descriptors_are_valid_and_carry_nothing(rig: Rig) -> None:
    rig.desc(0, BUF, 0, NEXT, 1)
    rig.desc(1, BUF, 4, NEXT, 2)
    rig.desc(2, LOW_END, 0, WRITE | NEXT, 3)  # the end of a region: an empty range inside RAM
    rig.desc(3, BUF + 8, 2, WRITE)
    rig.offer(0)
    chain = rig.queue.pop()
    assert chain is not None
    assert (chain.readable, chain.writable) == (((BUF, 4),), ((BUF + 8, 2),))
    assert (chain.readable_len, chain.writable_len) == (4, 2)


def test_indirect_tables(rig: Rig) -> None:
    table = 0x8000
    rig.desc(0, BUF, 2, 0, 0, table=table)  # readable, its own chain ends here...
    rig.desc(0, BUF, 2, NEXT, 2, table=table)
    rig.desc(2, BUF + 2, 3, WRITE | NEXT, 1, table=table)
    rig.desc(1, BUF + 5, 4, WRITE, 0, table=table)
    rig.desc(4, table, 3 * 16, INDIRECT | WRITE)  # WRITE on the table's descriptor is ignored
    rig.offer(4)
    chain = rig.queue.pop()
    assert chain is not None
    assert (chain.head, chain.readable, chain.writable) == (4, ((BUF, 2),), ((BUF + 2, 3), (BUF + 5, 4)))


def test_direct_descriptors_then_one_indirect(rig: Rig) -> None:
    table = HIGH
    rig.desc(6, BUF, 1, NEXT, 2)
    rig.desc(2, BUF + 1, 1, NEXT, 4)
    rig.desc(4, table, 16, INDIRECT)
    rig.desc(0, BUF + 2, 5, WRITE, 0, table=table)
    rig.desc(1, BUF + 3, 5, WRITE, 0, table=table)  # outside the table's 16 bytes: never read
    rig.offer(6)
    chain = rig.queue.pop()
    assert chain is not None
    assert (chain.readable_len, chain.writable) == (2, ((BUF + 2, 5),))


# --- what a hostile driver gets -----------------------------------------------------------
def test_avail_idx_moving_further_than_the_queue_is_an_error(rig: Rig) -> None:
    rig.memory.write_u16(rig.layout.avail_addr + AVAIL_IDX, SIZE + 1)
    assert "avail.idx jumped from 0 to 9: 9 new entries in a queue of 8" in rig.pop_error()


def test_avail_idx_going_backwards_is_an_error(rig: Rig) -> None:
    for head in range(SIZE):
        rig.desc(head, BUF, 1)
    rig.offer(0, 1)
    assert [c.head for c in rig.queue] == [0, 1]
    rig.memory.write_u16(rig.layout.avail_addr + AVAIL_IDX, 1)
    assert "avail.idx jumped from 2 to 1: 65535 new entries" in rig.pop_error()


def test_a_head_past_the_table_is_an_error(rig: Rig) -> None:
    rig.offer(SIZE)
    assert rig.pop_error() == "avail ring entry 0 names descriptor 8, past the end of the 8-entry descriptor table"


def test_next_past_the_table_is_an_error(rig: Rig) -> None:
    rig.desc(0, BUF, 1, NEXT, SIZE)
    rig.offer(0)
    assert "descriptor 0 of the descriptor table (chain at head 0) chains to 8, past the end" in rig.pop_error()


@pytest.mark.parametrize("links", [[(0, 0)], [(0, 1), (1, 0)], [(0, 1), (1, 2), (2, 3), (3, 1)]])
def test_a_loop_is_an_error_after_a_bounded_walk(rig: Rig, links: list[tuple[int, int]]) -> None:
    for index, nxt in links:
        rig.desc(index, BUF, 1, NEXT, nxt)
    rig.offer(0)
    with rig.memory.count() as c:
        message = rig.pop_error()
    assert "visits more descriptors than the 8-entry descriptor table holds: a loop" in message
    assert c.used <= SIZE + 3  # avail.idx, the ring entry, SIZE descriptors


def test_a_readable_descriptor_after_a_writable_one_is_an_error(rig: Rig) -> None:
    rig.desc(0, BUF, 1, WRITE | NEXT, 1)
    rig.desc(1, BUF, 1, 0)
    rig.offer(0)
    assert "descriptor 1 of the descriptor table (chain at head 0) is device-readable but follows" in rig.pop_error()


def test_an_empty_writable_descriptor_still_orders_the_chain(rig: Rig) -> None:
    rig.desc(0, BUF, 0, WRITE | NEXT, 1)
    rig.desc(1, BUF, 1, 0)
    rig.offer(0)
    assert "device-readable but follows a device-writable one" in rig.pop_error()


@pytest.mark.parametrize(("addr", "length", "problem"), [
    (LOW_END, 1, "is not inside guest RAM"),  # the hole
    (LOW_END - 1, 2, "is not inside guest RAM"),  # straddles into the hole
    (HIGH - 1, 2, "is not inside guest RAM"),  # straddles out of the hole
    (HIGH_END - 4, 8, "is not inside guest RAM"),  # past the end of RAM
    (HIGH_END + 1, 0, "is not inside guest RAM"),  # even an empty buffer must point at RAM
    (2**64 - 1, 2, "wraps past 2**64"),
    (2**64 - 0x1000, 0xFFFF_FFFF, "wraps past 2**64"),
    (0, 0xFFFF_FFFF, "is not inside guest RAM"),  # an absurd size
])  # fmt: skip
def test_buffers_outside_ram_are_errors(rig: Rig, addr: int, length: int, problem: str) -> None:
    rig.desc(2, BUF, 1, NEXT, 1)
    rig.desc(1, addr, length, WRITE)
    rig.offer(2)
    where = "descriptor 1 of the descriptor table (chain at head 2)"
    assert rig.pop_error() == f"{where} describes {addr:#x}+{length:#x}, which {problem}"


def test_a_chain_longer_than_the_cap_is_an_error(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_chain_bytes=0x10000)
    rig.desc(0, 0, 0x8000, NEXT, 1)
    rig.desc(1, 0, 0x8000, WRITE | NEXT, 2)  # buffers may overlap; their total still counts
    rig.desc(2, 0, 1, WRITE)
    rig.offer(0)
    assert "the chain at head 0 is longer than 65536 bytes" in rig.pop_error()


def test_nested_indirect_tables_are_errors(rig: Rig) -> None:
    rig.desc(0, 0x9000, 16, INDIRECT, 0, table=0x8000)
    rig.desc(0, 0x8000, 16, INDIRECT)
    rig.offer(0)
    assert "descriptor 0 of the indirect table at 0x8000 (chain at head 0) is itself indirect" in rig.pop_error()


def test_indirect_with_next_is_an_error(rig: Rig) -> None:
    rig.desc(0, 0x8000, 16, INDIRECT | NEXT, 1)
    rig.offer(0)
    assert "descriptor 0 (chain at head 0) has both INDIRECT and NEXT set" in rig.pop_error()


@pytest.mark.parametrize("length", [0, 8, 24, 0xFFFF_FFF0 + 1])
def test_indirect_table_lengths_must_be_multiples_of_16(rig: Rig, length: int) -> None:
    rig.desc(0, 0x8000, length & 0xFFFF_FFFF, INDIRECT)
    rig.offer(0)
    assert "not a non-zero multiple of 16" in rig.pop_error()


def test_indirect_tables_are_bounded(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_indirect=4)
    rig.desc(0, 0x8000, 5 * 16, INDIRECT)
    rig.offer(0)
    assert "an indirect table of 5 entries, more than the 4 allowed" in rig.pop_error()


@pytest.mark.parametrize("addr", [LOW_END - 16, HIGH_END, 2**64 - 16])
def test_indirect_tables_outside_ram_are_errors(rig: Rig, addr: int) -> None:
    rig.desc(0, addr, 32, INDIRECT)
    rig.offer(0)
    assert f"points to an indirect table at {addr:#x}+0x20, which is not inside guest RAM" in rig.pop_error()


def test_an_indirect_loop_is_an_error_after_a_bounded_walk(rig: Rig) -> None:
    for i in range(16):
        rig.desc(i, BUF, 1, NEXT, (i + 1) % 16, table=0x8000)
    rig.desc(0, 0x8000, 16 * 16, INDIRECT)
    rig.offer(0)
    with rig.memory.count() as c:
        message = rig.pop_error()
    assert "visits more descriptors than the 16-entry indirect table at 0x8000 holds: a loop" in message
    assert c.used <= 16 + 4


def test_next_past_an_indirect_table_is_an_error(rig: Rig) -> None:
    rig.desc(0, BUF, 1, NEXT, 2, table=0x8000)
    rig.desc(0, 0x8000, 32, INDIRECT)
    rig.offer(0)
    assert (
        "descriptor 0 of the indirect table at 0x8000 (chain at head 0) chains to 2, past the end of the 2-entry table"
        in rig.pop_error()
    )


def test_a_broken_queue_refuses_work_until_reset(rig: Rig) -> None:
    rig.offer(SIZE)
    first = rig.pop_error()
    q = rig.queue
    for call in (q.pop, q.needs_notification, q.enable_notification, q.disable_notification,
                 lambda: q.add_used(0, 0), lambda: q.set_ready(True)):  # fmt: skip
        with pytest.raises(VirtqueueError, match="the queue is broken until it is reset: avail ring entry 0"):
            call()
    assert q.broken == first
    q.reset()
    _same_as_power_on(q)
    rig.desc(1, BUF, 4)
    rig.memory.write_u16(rig.layout.avail_addr + AVAIL_IDX, 0)  # the driver re-initializes its rings
    rig.configure()
    rig.offer(1)
    chain = q.pop()
    assert chain is not None and chain.head == 1


def _same_as_power_on(q: SplitQueue) -> None:
    fresh = SplitQueue(q.memory, max_size=q.max_size, max_indirect=q.max_indirect, max_chain_bytes=q.max_chain_bytes)
    assert attrs.asdict(q, recurse=False) == attrs.asdict(fresh, recurse=False)


def test_reset_restores_every_field(rig: Rig) -> None:
    rig.queue.set_ready(False)
    rig.queue.event_idx = True
    rig.queue.set_ready(True)
    rig.desc(0, BUF, 4, WRITE)
    rig.offer(0)
    chain = rig.queue.pop()
    assert chain is not None
    rig.queue.add_used(chain.head, 4)
    rig.queue.disable_notification()
    assert rig.queue.needs_notification()
    rig.queue.reset()
    _same_as_power_on(rig.queue)


# --- the used ring and notifications ------------------------------------------------------
def test_add_used_writes_the_element_then_the_index(rig: Rig) -> None:
    for head in (2, 6):
        rig.desc(head, BUF, 16, WRITE)
    rig.offer(2, 6)
    a, b = rig.queue.pop(), rig.queue.pop()
    assert a is not None and b is not None
    writes: list[int] = []
    rig.memory.on_access = writes.append
    rig.queue.add_used(b.head, 5)
    rig.memory.on_access = None
    assert len(writes) == 2  # the element, then used.idx
    rig.queue.add_used(a.head, 0)
    assert rig.used() == [(6, 5), (2, 0)] and rig.queue.next_used == 2
    with pytest.raises(RuntimeError, match="more chains used than popped"):
        rig.queue.add_used(2, 0)


@pytest.mark.parametrize(("head", "written"), [(-1, 0), (SIZE, 0), (0, -1), (0, 2**32)])
def test_add_used_refuses_impossible_values(rig: Rig, head: int, written: int) -> None:
    with pytest.raises(ValueError):
        rig.queue.add_used(head, written)


def test_add_used_on_a_queue_that_is_not_ready(rig: Rig) -> None:
    rig.queue.set_ready(False)
    with pytest.raises(RuntimeError, match="not ready"):
        rig.queue.add_used(0, 0)


def _complete_one(rig: Rig, head: int = 0) -> None:
    rig.desc(head, BUF, 1, WRITE)
    rig.offer(head)
    chain = rig.queue.pop()
    assert chain is not None
    rig.queue.add_used(chain.head, 1)


def test_no_interrupt_flag_without_event_idx(rig: Rig) -> None:
    assert not rig.queue.needs_notification()  # nothing used yet
    _complete_one(rig)
    assert rig.queue.needs_notification()
    assert not rig.queue.needs_notification()  # nothing new since
    rig.memory.write_u16(rig.layout.avail_addr + AVAIL_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT)
    _complete_one(rig)
    assert not rig.queue.needs_notification()
    rig.memory.write_u16(rig.layout.avail_addr + AVAIL_FLAGS, 0)
    _complete_one(rig)
    assert rig.queue.needs_notification()


def test_used_event_with_event_idx(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(event_idx=True)
    used_event = rig.layout.avail_addr + AVAIL_RING + 2 * SIZE
    rig.memory.write_u16(used_event, 2)
    rig.memory.write_u16(rig.layout.avail_addr + AVAIL_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX
    results = []
    for _ in range(4):  # used ring entries 0, 1, 2, 3
        _complete_one(rig)
        results.append(rig.queue.needs_notification())
    assert results == [False, False, True, False]
    rig.memory.write_u16(used_event, 5)
    for _ in range(3):  # entries 4, 5, 6 in one batch: 5 is among them
        _complete_one(rig)
    assert rig.queue.needs_notification()
    # The spec's example: used_event 0 notifies after the 1st buffer, and again after the 65537th
    # (used ring index 0 once more).
    rig.memory.write_u16(used_event, 0)
    for start in (0, 0xFFFE):
        rig.queue.restore(attrs.evolve(rig.queue.save(), next_avail=start, next_used=start, signalled_used=start))
        rig.memory.write_u16(rig.layout.avail_addr + AVAIL_IDX, start)
        results = []
        for _ in range(3):
            _complete_one(rig)
            results.append(rig.queue.needs_notification())
        assert results == ([True, False, False] if start == 0 else [False, False, True])
    # A restored queue that does not know its last check notifies at the next one.
    rig.queue.restore(attrs.evolve(rig.queue.save(), signalled_used=None))
    _complete_one(rig)
    assert rig.queue.needs_notification()


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
@settings(max_examples=200)
def test_vring_need_event_matches_the_spec(event: int, old: int, added: int) -> None:
    new = (old + added) & 0xFFFF
    # The spec: notify if one of the entries written since the last check, old .. old+added-1
    # (mod 2**16), is used_event.
    assert vring_need_event(event, new, old) == ((event - old) % 0x10000 in range(added))


def test_disable_and_enable_without_event_idx(rig: Rig) -> None:
    flags = rig.layout.used_addr + USED_FLAGS
    rig.queue.disable_notification()
    assert rig.memory.read_u16(flags) == VIRTQ_USED_F_NO_NOTIFY
    assert rig.queue.enable_notification() is False
    assert rig.memory.read_u16(flags) == 0
    rig.queue.disable_notification()
    rig.desc(0, BUF, 1)
    rig.offer(0)
    assert rig.queue.enable_notification() is True  # arrived while disabled: go round again
    assert rig.queue.pop() is not None and rig.queue.enable_notification() is False


def test_disable_and_enable_with_event_idx(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(event_idx=True)
    avail_event = rig.layout.used_addr + USED_RING + 8 * SIZE
    for head in range(4):
        rig.desc(head, BUF, 1)
    rig.offer(0, 1)
    rig.queue.pop()
    assert rig.memory.read_u16(avail_event) == 1  # while enabled, it follows the device
    rig.queue.disable_notification()
    rig.queue.pop()
    assert rig.memory.read_u16(avail_event) == 1  # disabled: left behind
    assert rig.memory.read_u16(rig.layout.used_addr + USED_FLAGS) == 0  # flags stay 0 with EVENT_IDX
    rig.offer(2)
    assert rig.queue.enable_notification() is True
    assert rig.memory.read_u16(avail_event) == 2
    rig.queue.pop()
    assert rig.queue.enable_notification() is False and rig.memory.read_u16(avail_event) == 3


# --- saved state --------------------------------------------------------------------------
def test_save_and_restore_across_the_16_bit_wrap(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(event_idx=True)
    driver = Driver(rig.memory, rig.layout, event_idx=True)
    driver.initialize(start=0xFFFE)
    state = attrs.evolve(rig.queue.save(), next_avail=0xFFFE, next_used=0xFFFE, signalled_used=0xFFFE)
    rig.queue.restore(state)
    assert rig.queue.save() == state
    heads = [driver.add([bytes([i])], [2]).head for i in range(4)]
    driver.publish()
    for chain in rig.queue:
        chain.write(b"ok")
        rig.queue.add_used(chain.head, 2)
    assert [(r.head, n, data) for r, n, data in driver.collect()] == [(h, 2, b"ok") for h in heads]
    assert rig.queue.next_avail == rig.queue.next_used == driver.last_used == 2
    copy = SplitQueue(rig.memory, max_size=256)
    copy.restore(rig.queue.save())
    assert copy.save() == rig.queue.save()


@pytest.mark.parametrize(("change", "error"), [
    ({"next_avail": 0x10000}, ValueError),
    ({"next_used": -1}, ValueError),
    ({"signalled_used": 0x10000}, ValueError),
    ({"next_avail": 9}, ValueError),  # 9 outstanding in a queue of 8
    ({"used_addr": HIGH_END}, VirtqueueError),
    ({"size": 6}, VirtqueueError),
])  # fmt: skip
def test_restore_checks_the_state(rig: Rig, change: dict[str, int], error: type[Exception]) -> None:
    state = attrs.evolve(rig.queue.save(), **change)
    with pytest.raises(error):
        rig.queue.restore(state)
    assert not rig.queue.ready


# --- an honest driver ---------------------------------------------------------------------
SIZES = st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256])
STARTS = st.one_of(st.just(0), st.integers(0xFFF8, 0xFFFF), st.integers(0, 0xFFFF))
# One chain: readable buffers (their bytes), writable ones (their sizes), indirect?, how many
# buffers go before the indirect table.
chain_specs = st.tuples(st.lists(st.binary(max_size=MAX_BUFFER), max_size=MAX_BUFFERS // 2),
                        st.lists(st.integers(0, MAX_BUFFER), max_size=MAX_BUFFERS // 2),
                        st.booleans(), st.integers(0, 3))  # fmt: skip


class HonestDriver(RuleBasedStateMachine):
    """A model driver against the queue: every chain comes back exactly once, with the bytes
    the device wrote; the used ring stays consistent; notifications follow a simple model of
    the spec's rules, and no wake-up is lost when the device follows the drain loop."""

    @initialize(size=SIZES, start=STARTS, event_idx=st.booleans())
    def start(self, size: int, start: int, event_idx: bool) -> None:
        self.layout = Layout.packed(size)
        self.memory = GuestMemory.from_ranges([(0, (self.layout.end + 0xFFF) & ~0xFFF)])
        self.guest = Driver(self.memory, self.layout, event_idx)
        self.guest.initialize(start)
        self.queue = SplitQueue(self.memory, max_size=256, max_indirect=MAX_BUFFERS)
        lay = self.layout
        self.queue.restore(QueueState(size, lay.desc_addr, lay.avail_addr, lay.used_addr, True, event_idx,
                                      start, start, None))  # fmt: skip
        self.event_idx = event_idx
        self.start_index = start
        self.published: deque[int] = deque()  # heads the device has yet to pop, in ring order
        self.popped: dict[int, DescriptorChain] = {}
        self.written: dict[int, bytes] = {}  # by head: what the device wrote, until collected
        self.pops = self.completions = 0
        self.signalled: int | None = None  # the model of the device's last notification check
        self.notify_enabled = True
        self.device_asleep = False  # the device found the ring empty with notifications on

    def teardown(self) -> None:
        if hasattr(self, "memory"):
            self.drain()
            self.memory.close()

    def drain(self) -> None:
        self.publish()
        while self.published:
            self.pop_one()
        for head in list(self.popped):
            self.complete(head, b"")
        self.collect()
        assert not self.guest.requests, "some chains were never completed"
        assert len(self.guest.free) == self.layout.size

    # --- the driver ---------------------------------------------------------------------
    # Few, broad rules: Hypothesis turns a random share of the rules off in each example
    # (swarm testing), and an example without the driver or without the device does nothing.
    @rule(chains=st.lists(chain_specs, max_size=4), publish=st.booleans(), collect=st.booleans(),
          used_event=st.none() | st.integers(0, 0xFFFF) | st.integers(-2, 3).map(lambda n: ("near", n)),
          no_interrupt=st.none() | st.booleans())  # fmt: skip
    def driver(self, chains: list[tuple[list[bytes], list[int], bool, int]], publish: bool, collect: bool,
               used_event: int | tuple[str, int] | None, no_interrupt: bool | None) -> None:  # fmt: skip
        """Make a few chains (collecting used ones first if descriptors are short), maybe
        publish them, maybe collect used ones; maybe move used_event or flip NO_INTERRUPT."""
        for readable, writable, indirect, prefix in chains:
            writable = writable if readable or writable else [MAX_BUFFER]
            buffers = len(readable) + len(writable)
            if not self.guest.can_add(buffers, indirect, prefix):
                self.collect()
                if not self.guest.can_add(buffers, indirect, prefix):
                    break
            self.guest.add(readable, writable, indirect=indirect, prefix=prefix)
        if publish:
            self.publish()
        if collect:
            self.collect()
        if isinstance(used_event, tuple):
            self.guest.set_used_event(self.guest.last_used + used_event[1])
        elif used_event is not None:
            self.guest.set_used_event(used_event)
        if no_interrupt is not None:
            self.guest.set_no_interrupt(no_interrupt)

    def publish(self) -> None:
        heads, kick = self.guest.publish()
        self.published.extend(heads)
        if heads and self.device_asleep:
            assert kick, "the driver did not notify a device that is waiting for it"
            self.device_asleep = False
            event("publish: woke the device")

    def collect(self) -> None:
        for request, length, data in self.guest.collect():
            assert request.head not in self.popped  # completed, not just taken
            assert data == self.written.pop(request.head)[:length]
            assert length == len(data)

    # --- the device ---------------------------------------------------------------------
    @rule(pops=st.integers(0, 6), completions=st.lists(st.integers(0, 255), max_size=6),
          data=st.binary(max_size=MAX_BUFFERS * MAX_BUFFER), check=st.booleans())  # fmt: skip
    def device(self, pops: int, completions: list[int], data: bytes, check: bool) -> None:
        """Take a few chains, complete a few (in any order), maybe check for a notification."""
        for _ in range(pops):
            if not self.pop_one():
                break
        for choice in completions:
            if not self.popped:
                break
            head = list(self.popped)[choice % len(self.popped)]
            self.complete(head, data[choice % 7 :])
        if check:
            self.device_check_notification()

    def pop_one(self) -> bool:
        chain = self.queue.pop()
        if chain is None:
            assert not self.published
            if self.notify_enabled:
                self.device_asleep = True
            return False
        self.pops += 1
        expected = self.published.popleft()
        request: Request = self.guest.requests[expected]
        assert chain.head == expected
        assert list(chain.readable) == request.readable and list(chain.writable) == request.writable
        assert chain.read() == request.data
        self.popped[chain.head] = chain
        event(f"pop: {'indirect' if request.indirect else 'direct'} chain, queue of {self.layout.size}")
        if self.queue.next_avail == 0:
            event("pop: next_avail wrapped to 0")
        return True

    def complete(self, head: int, data: bytes) -> None:
        chain = self.popped.pop(head)
        written = chain.write(data)
        assert written == min(len(data), chain.writable_len)
        self.queue.add_used(head, written)
        self.written[head] = data[:written]
        self.completions += 1

    def device_check_notification(self) -> None:
        new, old = self.queue.next_used, self.signalled
        self.signalled = new
        if new == old:
            expected = False
        elif not self.event_idx:
            expected = not self.guest.no_interrupt()
        elif old is None:
            expected = True
        else:  # one of the used-ring entries written since the last check is used_event
            expected = any((old + k) & 0xFFFF == self.guest.used_event() for k in range((new - old) & 0xFFFF))
        assert self.queue.needs_notification() == expected
        event(f"notification: {'event_idx' if self.event_idx else 'flags'} {expected}")

    @rule(enable=st.booleans())
    def device_notifications(self, enable: bool) -> None:
        """Turn available-buffer notifications off (to poll) or back on (to sleep if idle)."""
        if not enable:
            self.queue.disable_notification()
            self.notify_enabled = self.device_asleep = False
            return
        more = self.queue.enable_notification()
        self.notify_enabled = True
        assert more == bool(self.published)
        self.device_asleep = not more

    @rule()
    def migrate(self) -> None:
        state = self.queue.save()
        self.queue = SplitQueue(self.memory, max_size=256, max_indirect=MAX_BUFFERS)
        self.queue.restore(state)
        assert self.queue.save() == state
        self.notify_enabled = True  # a restored queue wants notifications, and says so in the ring

    # --- invariants ---------------------------------------------------------------------
    @invariant()
    def indices_agree(self) -> None:
        if not hasattr(self, "queue"):
            return
        assert self.guest.used_idx() == self.queue.next_used == (self.start_index + self.completions) & 0xFFFF
        assert self.queue.next_avail == (self.start_index + self.pops) & 0xFFFF
        in_flight = sum(len(r.descriptors) for r in self.guest.requests.values())
        assert in_flight + len(self.guest.free) == self.layout.size

    @invariant()
    def device_side_notification_fields(self) -> None:
        if not hasattr(self, "queue"):
            return
        flags = self.memory.read_u16(self.layout.used_addr + USED_FLAGS)
        if self.event_idx:
            assert flags == 0
            if self.notify_enabled:
                assert self.memory.read_u16(self.layout.avail_event_addr) == self.queue.next_avail
        else:
            assert flags == (0 if self.notify_enabled else VIRTQ_USED_F_NO_NOTIFY)


HonestDriver.TestCase.settings = settings(
    max_examples=40, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestHonestDriver = HonestDriver.TestCase


# --- a hostile driver ---------------------------------------------------------------------
HOSTILE_RAM = [(0, 0x4000), (0x8000, 0x1000)]  # a hole from 0x4000 to 0x8000, nothing past 0x9000
HOSTILE_MAX_INDIRECT = 16
HOSTILE_MAX_CHAIN = 0x10000
TABLES = [0x2000, 0x3F00, 0x8000, 0x8FE0]  # where the hostile driver builds indirect tables
addresses = st.one_of(
    st.sampled_from([0, 0x1000, 0x2000, 0x3FF0, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0x8FF0, 0x8FFF, 0x9000,
                     2**63, 2**64 - 16, 2**64 - 1]),
    st.integers(0, 0x9100),
    st.integers(0, 2**64 - 1),
)  # fmt: skip
lengths = st.one_of(st.sampled_from([0, 1, 15, 16, 32, 48, 0x100, 0x1000, 0x4000, 0xFFFF_FFF0, 0xFFFF_FFFF]),
                    st.integers(0, 2**32 - 1))  # fmt: skip
flag_values = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
indices = st.one_of(st.integers(0, 20), st.integers(0, 0xFFFF))


def _write(name: str, **arguments: st.SearchStrategy[object]) -> st.SearchStrategy[tuple[str, dict[str, object]]]:
    return st.fixed_dictionaries(arguments).map(lambda drawn: (name, drawn))


moves = st.lists(st.tuples(st.integers(0, 0x300), st.binary(min_size=1, max_size=16)), max_size=6)
mutations = st.lists(st.tuples(st.integers(0, 19), st.sampled_from(["addr", "len", "flags", "next"]),
                               st.one_of(st.integers(0, 20), addresses)), max_size=2)  # fmt: skip
hostile_writes = st.one_of(
    _write("write_descriptor", index=st.integers(0, 15), addr=addresses, length=lengths, flags=flag_values,
           nxt=indices),
    _write("write_table_entry", table=st.sampled_from(TABLES), index=st.integers(0, 17), addr=addresses,
           length=lengths, flags=flag_values, nxt=indices),
    _write("scribble", offset=st.integers(0, 0x300), data=st.binary(min_size=1, max_size=32)),
    _write("set_avail_idx", value=st.one_of(st.integers(0, 18), st.integers(0, 0xFFFF)), relative=st.booleans()),
    _write("set_avail_entry", slot=st.integers(0, 15), head=indices),
    _write("honest_chain", readable=st.integers(0, 3), writable=st.integers(0, 3), indirect=st.booleans()),
)  # fmt: skip


def _outcome(result: object) -> str:
    """What a pop gave, for ``--hypothesis-show-statistics``: the error without its numbers."""
    if isinstance(result, VirtqueueError):
        return "error: " + re.sub(r"\b(0x[0-9a-f]+|\d+)\b", "N", str(result).split(": ")[-1])
    if isinstance(result, DescriptorChain):
        return f"a chain of {len(result.readable) + len(result.writable)} buffers"
    return repr(result)


class HostileDriver(RuleBasedStateMachine):
    """A driver that writes anything anywhere in its rings, between pops and during them.
    ``pop()`` returns a chain inside RAM that obeys the rules or raises ``VirtqueueError``;
    nothing else, within a counted number of guest-memory accesses; and after ``reset()`` an
    honest driver gets a working queue again."""

    @initialize(size=st.sampled_from([1, 2, 4, 8, 16]), event_idx=st.booleans())
    def start(self, size: int, event_idx: bool) -> None:
        self.memory = CountingMemory(MemoryRegion.allocate(base, length) for base, length in HOSTILE_RAM)
        self.layout = Layout.packed(size)
        self.queue = SplitQueue(self.memory, max_size=16, max_indirect=HOSTILE_MAX_INDIRECT,
                                max_chain_bytes=HOSTILE_MAX_CHAIN)  # fmt: skip
        self.event_idx = event_idx
        self.honest_setup()

    def teardown(self) -> None:
        if hasattr(self, "memory"):
            self.memory.close()

    def honest_setup(self) -> None:
        self.queue.reset()
        self.guest = Driver(self.memory, self.layout, self.event_idx)
        self.guest.initialize()
        q, lay = self.queue, self.layout
        q.size, q.desc_addr, q.avail_addr, q.used_addr = lay.size, lay.desc_addr, lay.avail_addr, lay.used_addr
        q.event_idx = self.event_idx
        q.set_ready(True)
        self.popped: list[DescriptorChain] = []

    def bound(self) -> int:
        """Guest-memory accesses one call may make: avail.idx, a ring entry, a full walk of the
        descriptor table and of one indirect table, avail_event."""
        return 3 + self.queue.size + HOSTILE_MAX_INDIRECT

    def guarded(self, call: Callable[[], object]) -> object:
        """Run ``call`` within the access bound: it returns, or raises VirtqueueError."""
        broken_before = self.queue.broken
        self.memory.budget = self.memory.accesses + self.bound()
        try:
            result = call()
        except VirtqueueError as exc:
            assert self.queue.broken is not None
            if broken_before is not None:
                assert self.queue.broken == broken_before and broken_before in str(exc)
            return exc
        finally:
            self.memory.budget = None
            self.memory.on_access = None
        assert broken_before is None, "a broken queue did work"
        return result

    # --- what the driver writes ---------------------------------------------------------
    @rule(ops=st.lists(hostile_writes, min_size=1, max_size=4))
    def driver_writes(self, ops: list[tuple[str, dict[str, object]]]) -> None:
        """A few writes by the driver (one rule for all keeps Hypothesis's cost per write low)."""
        for name, arguments in ops:
            getattr(self, name)(**arguments)

    def write_descriptor(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        index %= self.layout.size
        self.memory.write(self.layout.desc_addr + 16 * index, DESC.pack(addr, length, flags, nxt))

    def write_table_entry(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        gpa = table + 16 * index
        if self.memory.contains(gpa, 16):
            self.memory.write(gpa, DESC.pack(addr, length, flags, nxt))

    def scribble(self, offset: int, data: bytes) -> None:
        self.memory.write(self.layout.desc_addr + offset, data)  # descriptors and both rings

    def set_avail_idx(self, value: int, relative: bool) -> None:
        idx = (self.queue.next_avail + value) & 0xFFFF if relative else value
        self.memory.write_u16(self.layout.avail_addr + AVAIL_IDX, idx)

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.memory.write_u16(self.layout.avail_addr + AVAIL_RING + 2 * (slot % self.layout.size), head)

    @rule(head=st.integers(0, 15), count=st.integers(1, 20), writable_from=st.integers(0, 20), indirect=st.booleans(),
          table=st.sampled_from(TABLES), loop_to=st.none() | st.integers(0, 19), mutations=mutations, moves=moves,
          recover=st.booleans())  # fmt: skip
    def plausible_chain(self, head: int, count: int, writable_from: int, indirect: bool, table: int,
                        loop_to: int | None, mutations: list[tuple[int, str, int]], moves: list[tuple[int, bytes]],
                        recover: bool) -> None:  # fmt: skip
        """Offer a chain that is nearly right -- a direct one (next = index + 1, wrapping) or one
        indirect table, buffers readable then writable -- perhaps with its last descriptor
        linked back into it, and a field or two set to anything; and pop it."""
        size = self.layout.size
        head %= size
        slots: list[int] = []  # where each descriptor goes
        if indirect:
            self.memory.write(self.layout.desc_addr + 16 * head, DESC.pack(table, 16 * count, INDIRECT, 0))
            slots = [table + 16 * i for i in range(count) if self.memory.contains(table + 16 * i, 16)]
            links = list(range(1, len(slots) + 1))
        else:
            indices = [(head + i) % size for i in range(min(count, size))]
            slots = [self.layout.desc_addr + 16 * i for i in indices]
            links = [*indices[1:], 0]
        fields: list[list[int]] = []
        for i, link in enumerate(links):
            flags = (WRITE if i >= writable_from else 0) | (NEXT if i + 1 < len(links) else 0)
            fields.append([0x3000 + 32 * i, 32, flags, link if i + 1 < len(links) else 0])
        if loop_to is not None and fields:
            fields[-1][2] |= NEXT
            fields[-1][3] = links[loop_to % len(links)] - 1 if indirect else (head + loop_to % len(links)) % size
        for which, name, value in mutations:
            if fields:
                field = ["addr", "len", "flags", "next"].index(name)
                fields[which % len(fields)][field] = value & (2**64 - 1, 2**32 - 1, 0xFFFF, 0xFFFF)[field]
        for gpa, (addr, length, flags, link) in zip(slots, fields, strict=True):
            self.memory.write(gpa, DESC.pack(addr, length, flags, link))
        idx = self.memory.read_u16(self.layout.avail_addr + AVAIL_IDX)
        self.memory.write_u16(self.layout.avail_addr + AVAIL_RING + 2 * (idx % size), head)
        self.memory.write_u16(self.layout.avail_addr + AVAIL_IDX, (idx + 1) & 0xFFFF)
        self.pop(1, recover, moves)

    def honest_chain(self, readable: int, writable: int, indirect: bool) -> None:
        """Sometimes the hostile driver makes a valid chain (on top of whatever it wrote)."""
        if readable + writable and self.guest.can_add(readable + writable, indirect, 0):
            self.guest.add([b"r" * 8] * readable, [8] * writable, indirect=indirect)
            self.guest.publish()

    # --- what the device does -----------------------------------------------------------
    @rule(count=st.integers(1, 4), recover=st.booleans(), moves=moves)
    def pop(self, count: int, recover: bool, moves: list[tuple[int, bytes]]) -> None:
        """Pop a few chains while the driver rewrites the rings under the device, at the
        device's first accesses to guest memory; perhaps reset a queue that broke."""
        pending = list(moves)

        def move(_: int) -> None:
            if pending:
                offset, data = pending.pop(0)
                self.memory.write(self.layout.desc_addr + offset, data)

        for _ in range(count):
            self.memory.on_access = move
            result = self.guarded(self.queue.pop)
            event(f"pop: {_outcome(result)}")
            if not isinstance(result, DescriptorChain):
                break
            self.check_chain(result)
            self.popped.append(result)
        if recover and self.queue.broken is not None:
            self.honest_setup()

    def check_chain(self, chain: DescriptorChain) -> None:
        assert 0 <= chain.head < self.queue.size
        for gpa, length in chain.readable + chain.writable:
            assert length > 0 and self.memory.contains(gpa, length)
        assert chain.readable_len == sum(n for _, n in chain.readable)
        assert chain.writable_len == sum(n for _, n in chain.writable)
        assert chain.readable_len + chain.writable_len <= HOSTILE_MAX_CHAIN
        assert len(chain.readable) + len(chain.writable) <= self.queue.size + HOSTILE_MAX_INDIRECT
        chain.read(64)
        chain.write(b"w" * 8)

    @rule(written=st.integers(0, 16))
    def complete(self, written: int) -> None:
        if not self.popped:
            return
        chain = self.popped.pop(0)
        self.guarded(lambda: self.queue.add_used(chain.head, min(written, chain.writable_len)))

    @rule()
    def notifications(self) -> None:
        for call in (self.queue.needs_notification, self.queue.disable_notification, self.queue.enable_notification):
            self.guarded(call)

    @rule(indirect=st.booleans())
    def reset_then_honest(self, indirect: bool) -> None:
        """After a reset the queue works for an honest driver, however it was left."""
        self.honest_setup()
        self.guest.add([b"ok"], [4], indirect=indirect or self.queue.size == 1)
        self.guest.publish()
        chain = self.queue.pop()
        assert chain is not None and chain.read() == b"ok" and chain.writable_len == 4
        chain.write(b"done")
        self.queue.add_used(chain.head, 4)
        assert [(n, data) for _, n, data in self.guest.collect()] == [(4, b"done")]

    @rule(size=st.integers(0, 32), desc=addresses, avail=addresses, used=addresses, pops=st.integers(0, 3))
    def configure_anything(self, size: int, desc: int, avail: int, used: int, pops: int) -> None:
        """A queue is enabled only with its rings aligned and inside RAM; whatever they hold
        then, pops are as safe as ever. Then back to the usual layout."""
        q = self.queue
        q.reset()
        q.size, q.desc_addr, q.avail_addr, q.used_addr = size, desc & ~15, avail & ~1, used & ~3
        try:
            q.set_ready(True)
        except VirtqueueError:
            assert not q.ready and q.pop() is None
        else:
            assert self.memory.contains(q.desc_addr, 16 * size)
            assert self.memory.contains(q.avail_addr, 6 + 2 * size)
            assert self.memory.contains(q.used_addr, 6 + 8 * size)
            for _ in range(pops):
                result = self.guarded(q.pop)
                if isinstance(result, DescriptorChain):
                    self.check_chain(result)
        self.honest_setup()


HostileDriver.TestCase.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestHostileDriver = HostileDriver.TestCase


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_guest_that_keeps_its_ring_full_does_not_keep_the_event_loop(backend: str) -> None:
    """A guest can make chains available as fast as a device takes them (no notifications
    needed). A backend whose handler never awaits must still let the event loop run: other
    VMs, consoles and cancellation share it."""
    from trivmm.devices.virtio.device import Activation, VirtioDevice

    class Greedy(VirtioDevice):
        queue_sizes = (8,)
        handled = 0

        async def handle(self, active: Activation, index: int, chain: object) -> None:
            self.handled += 1  # a device model that never awaits (as virtio-rng)

    class EndlessActivation:
        def take_chains(self, index: int, limit: int = 64) -> list[object]:
            return [object()] * limit  # the guest's ring is never empty

    async def main() -> None:
        device = Greedy()
        ticks = 0
        started = time.monotonic()
        with anyio.move_on_after(0.2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(device.serve_queue, EndlessActivation(), 0)

                async def tick() -> None:
                    nonlocal ticks
                    while True:
                        await anyio.sleep(0.01)
                        ticks += 1

                tg.start_soon(tick)
        assert time.monotonic() - started < 1.5  # the deadline was honoured
        assert ticks >= 3 and device.handled > 0

    anyio.run(main, backend=backend)
