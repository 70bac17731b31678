"""An honest virtio driver for a split virtqueue in ``GuestMemory``: the guest's side, for tests.

It keeps a free list of descriptors, builds direct chains, indirect chains and chains of a
few direct descriptors ending in an indirect one, publishes them in batches, decides
whether to notify the device as Linux's virtio_ring does, and reads the used ring back.
Each chain owns one fixed slot of the data area (indexed by its head: heads of chains in
flight are distinct), holding its indirect table, if any, then its buffers.
"""

from __future__ import annotations

import struct

import attrs

from trivmm.devices.virtio.constants import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_SIZE,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from trivmm.devices.virtio.queue import vring_need_event
from trivmm.memory import GuestMemory

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
MAX_BUFFERS = 8  # per chain
MAX_BUFFER = 48  # bytes per buffer
SLOT_SIZE = MAX_BUFFERS * DESC_SIZE + MAX_BUFFERS * MAX_BUFFER  # an indirect table, then the buffers


@attrs.define
class Layout:
    """Where the rings and the data slots of a queue of ``size`` live."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    data_addr: int

    @classmethod
    def packed(cls, size: int, base: int = 0x1000) -> Layout:
        desc = base
        avail = desc + desc_table_size(size)
        used = (avail + avail_ring_size(size) + 3) & ~3
        data = (used + used_ring_size(size) + 0xFFF) & ~0xFFF
        return cls(size, desc, avail, used, data)

    @property
    def end(self) -> int:
        return self.data_addr + self.size * SLOT_SIZE

    @property
    def used_event_addr(self) -> int:
        return self.avail_addr + AVAIL_RING + 2 * self.size

    @property
    def avail_event_addr(self) -> int:
        return self.used_addr + USED_RING + 8 * self.size


@attrs.define
class Request:
    """One chain the driver made: what the device should see, and what it may overwrite."""

    head: int
    descriptors: list[int]  # descriptor-table entries it holds
    readable: list[tuple[int, int]]  # (gpa, len) of non-empty device-readable buffers
    writable: list[tuple[int, int]]
    data: bytes  # the readable bytes, in order
    indirect: bool

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)


@attrs.define(eq=False)
class Driver:
    memory: GuestMemory
    layout: Layout
    event_idx: bool
    avail_idx: int = 0  # as published
    last_used: int = 0  # used entries consumed
    free: list[int] = attrs.Factory(list)
    pending: list[int] = attrs.Factory(list)  # heads in the ring, not yet published
    requests: dict[int, Request] = attrs.Factory(dict)  # by head: made and not yet collected
    kicks: int = 0

    def __attrs_post_init__(self) -> None:
        self.free = list(range(self.layout.size))

    def initialize(self, start: int = 0) -> None:
        """Zero the rings (the used ring too: the driver allocates it) at index ``start``."""
        lay = self.layout
        for addr, length in ((lay.desc_addr, desc_table_size(lay.size)), (lay.avail_addr, avail_ring_size(lay.size)),
                             (lay.used_addr, used_ring_size(lay.size))):  # fmt: skip
            self.memory.fill(addr, length)
        self.avail_idx = self.last_used = start
        self.memory.write_u16(lay.avail_addr + AVAIL_IDX, start)
        self.memory.write_u16(lay.used_addr + USED_IDX, start)
        self.memory.write_u16(lay.used_event_addr, start)
        self.memory.write_u16(lay.avail_event_addr, start)  # as the device left it before a migration

    # --- making chains -------------------------------------------------------------------
    def can_add(self, buffers: int, indirect: bool, prefix: int) -> bool:
        need = prefix + 1 if indirect else buffers
        return len(self.free) >= need

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False, prefix: int = 0) -> Request:
        """Make a chain of the ``readable`` buffers (their contents) then ``writable`` ones (their
        sizes); with ``indirect``, the buffers after the first ``prefix`` go in an indirect table."""
        buffers: list[tuple[bytes | int, bool]] = [(data, False) for data in readable] + [(n, True) for n in writable]
        assert 1 <= len(buffers) <= MAX_BUFFERS
        prefix = min(prefix, len(buffers) - 1) if indirect else 0
        direct_count = prefix + 1 if indirect else len(buffers)
        descriptors = [self.free.pop() for _ in range(direct_count)]
        head = descriptors[0]
        slot = self.layout.data_addr + head * SLOT_SIZE
        cursor = slot + MAX_BUFFERS * DESC_SIZE
        entries: list[tuple[int, int, int]] = []  # (addr, len, WRITE or 0)
        request = Request(head, descriptors, [], [], b"", indirect)
        for content, is_write in buffers:
            length = content if isinstance(content, int) else len(content)
            if isinstance(content, bytes):
                self.memory.write(cursor, content)
                request.data += content
            if length:
                (request.writable if is_write else request.readable).append((cursor, length))
            entries.append((cursor, length, VIRTQ_DESC_F_WRITE if is_write else 0))
            cursor += MAX_BUFFER
        table = self.layout.desc_addr
        if indirect:
            inner = entries[prefix:]
            for i, (addr, length, flags) in enumerate(inner):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(inner) else 0
                self.memory.write(slot + DESC_SIZE * i, DESC.pack(addr, length, flags | more, i + 1 if more else 0))
            entries = [*entries[:prefix], (slot, DESC_SIZE * len(inner), VIRTQ_DESC_F_INDIRECT)]
        for i, (addr, length, flags) in enumerate(entries):
            more = i + 1 < len(entries)
            flags |= VIRTQ_DESC_F_NEXT if more else 0
            nxt = descriptors[i + 1] if more else 0
            self.memory.write(table + DESC_SIZE * descriptors[i], DESC.pack(addr, length, flags, nxt))
        ring_slot = (self.avail_idx + len(self.pending)) % self.layout.size
        self.memory.write_u16(self.layout.avail_addr + AVAIL_RING + 2 * ring_slot, head)
        self.pending.append(head)
        self.requests[head] = request
        return request

    def publish(self) -> tuple[list[int], bool]:
        """Expose the pending chains (bump avail.idx); return them and whether the driver
        notifies the device (its flags or avail_event say so)."""
        heads, self.pending = self.pending, []
        old = self.avail_idx
        self.avail_idx = (old + len(heads)) & 0xFFFF
        self.memory.write_u16(self.layout.avail_addr + AVAIL_IDX, self.avail_idx)
        if not heads:
            return heads, False
        if self.event_idx:
            kick = vring_need_event(self.memory.read_u16(self.layout.avail_event_addr), self.avail_idx, old)
        else:
            kick = not self.memory.read_u16(self.layout.used_addr + USED_FLAGS) & VIRTQ_USED_F_NO_NOTIFY
        self.kicks += kick
        return heads, kick

    # --- used buffers --------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.memory.read_u16(self.layout.used_addr + USED_IDX)

    def collect(self) -> list[tuple[Request, int, bytes]]:
        """Take every used entry: (its request, the length the device wrote, those bytes);
        the request's descriptors go back on the free list."""
        done = []
        used = self.used_idx()
        while self.last_used != used:
            slot = self.last_used % self.layout.size
            head, length = USED_ELEM.unpack(self.memory.read(self.layout.used_addr + USED_RING + 8 * slot, 8))
            request = self.requests.pop(head)  # KeyError: a head used twice, or never made
            assert length <= request.writable_len, (length, request)
            data = b"".join(self.memory.read(gpa, n) for gpa, n in request.writable)[:length]
            self.free.extend(request.descriptors)
            done.append((request, length, data))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return done

    # --- used-buffer notification suppression --------------------------------------------
    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.layout.used_event_addr, value & 0xFFFF)

    def used_event(self) -> int:
        return self.memory.read_u16(self.layout.used_event_addr)

    def set_no_interrupt(self, on: bool) -> None:
        self.memory.write_u16(self.layout.avail_addr + AVAIL_FLAGS, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def no_interrupt(self) -> bool:
        return bool(self.memory.read_u16(self.layout.avail_addr + AVAIL_FLAGS) & VIRTQ_AVAIL_F_NO_INTERRUPT)
