"""A virtio-blk driver over a split virtqueue in ``GuestMemory``, for tests: the guest's side.

``Ring`` is the queue part (ideas from tests/unit/virtio_driver.py, sized for disk requests):
a free list of descriptors, chains made of any buffers -- direct, or all in one indirect
table -- each chain's buffers laid out in a fixed slot of the data area indexed by its head,
or at addresses the caller gives (a hostile driver's overlapping buffers). ``Rig`` puts a
``BlockDevice``, its queue, the notification and interrupt eventfds and an ``Activation``
together; ``blk_buffers`` lays out a request (header, data, status) cut into descriptors
wherever a test wants.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Sequence

import anyio
import attrs

from trivmm.devices.virtio.block import HEADER, SEGMENT, BlockDevice
from trivmm.devices.virtio.constants import (
    AVAIL_IDX,
    AVAIL_RING,
    DESC_SIZE,
    USED_IDX,
    USED_RING,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from trivmm.devices.virtio.device import Activation
from trivmm.devices.virtio.queue import SplitQueue
from trivmm.eventfd import EventFd
from trivmm.memory import GuestMemory

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
RING_BASE = 0x1000
MAX_TABLE = 256  # entries of an indirect table a slot has room for


@attrs.frozen
class Buf:
    """One descriptor: ``content`` (bytes: device-readable; int: a device-writable size) at
    ``addr`` (None: laid out in the chain's slot)."""

    content: bytes | int
    addr: int | None = None

    @property
    def writable(self) -> bool:
        return isinstance(self.content, int)

    @property
    def length(self) -> int:
        return self.content if isinstance(self.content, int) else len(self.content)


@attrs.define
class Request:
    head: int
    descriptors: list[int]
    writable: list[tuple[int, int]]  # (gpa, len) of the device-writable buffers, in order
    tag: object = None  # what the test wants back with the completion

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)


@attrs.define
class Completion:
    request: Request
    used_len: int
    writable: bytes  # the whole device-writable area after completion

    @property
    def status(self) -> int:
        return self.writable[-1]

    @property
    def data(self) -> bytes:
        """What precedes the status byte."""
        return self.writable[:-1]


def blk_buffers(readable: bytes, writable: int, rcuts: Sequence[int] = (), wcuts: Sequence[int] = ()) -> list[Buf]:
    """The device-readable bytes cut at offsets ``rcuts``, then ``writable`` device-writable
    bytes cut at ``wcuts``: one descriptor per piece (empty pieces dropped)."""
    bufs: list[Buf] = []
    start = 0
    for cut in [*sorted(c for c in rcuts if 0 < c < len(readable)), len(readable)]:
        if cut > start:
            bufs.append(Buf(readable[start:cut]))
        start = cut
    start = 0
    for cut in [*sorted(c for c in wcuts if 0 < c < writable), writable]:
        if cut > start:
            bufs.append(Buf(cut - start))
        start = cut
    return bufs


def header(kind: int, sector: int = 0, reserved: int = 0) -> bytes:
    return HEADER.pack(kind, reserved, sector)


def segments(*items: tuple[int, int, int]) -> bytes:
    """DISCARD/WRITE_ZEROES data: (sector, num_sectors, flags) each."""
    return b"".join(SEGMENT.pack(*item) for item in items)


@attrs.define(eq=False)
class Ring:
    memory: GuestMemory
    size: int
    slot_size: int
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = attrs.Factory(list)
    pending: int = 0
    requests: dict[int, Request] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.free = list(range(self.size))

    # --- layout ----------------------------------------------------------------------------
    @property
    def desc_addr(self) -> int:
        return RING_BASE

    @property
    def avail_addr(self) -> int:
        return self.desc_addr + desc_table_size(self.size)

    @property
    def used_addr(self) -> int:
        return (self.avail_addr + avail_ring_size(self.size) + 3) & ~3

    @property
    def data_addr(self) -> int:
        return (self.used_addr + used_ring_size(self.size) + 0xFFF) & ~0xFFF

    @property
    def end(self) -> int:
        return self.data_addr + self.size * self.slot_size

    @staticmethod
    def memory_needed(size: int, slot_size: int) -> int:
        ring = Ring.__new__(Ring)
        object.__setattr__(ring, "size", size)
        return (ring.data_addr + size * slot_size + 0xFFFF) & ~0xFFFF

    def configure(self, queue: SplitQueue) -> None:
        self.memory.fill(self.desc_addr, self.data_addr - self.desc_addr)
        queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = (
            self.size, self.desc_addr, self.avail_addr, self.used_addr)  # fmt: skip
        queue.set_ready(True)

    # --- making chains ---------------------------------------------------------------------
    def add(self, bufs: Sequence[Buf], *, indirect: bool = False, tag: object = None) -> Request:
        """Make a chain of ``bufs`` and put it in the avail ring (not yet published)."""
        assert bufs, "a chain needs a descriptor"
        count = 1 if indirect else len(bufs)
        assert len(self.free) >= count, "ring full"
        assert not indirect or len(bufs) <= MAX_TABLE
        descriptors = [self.free.pop() for _ in range(count)]
        head = descriptors[0]
        slot = self.data_addr + head * self.slot_size
        cursor = slot + (MAX_TABLE * DESC_SIZE if indirect else 0)
        entries: list[tuple[int, int, int]] = []
        writable: list[tuple[int, int]] = []
        for buf in bufs:
            addr = buf.addr
            if addr is None:
                addr = cursor
                cursor += buf.length
                assert cursor <= slot + self.slot_size, "the chain does not fit its slot"
                if not buf.writable:
                    assert isinstance(buf.content, bytes)
                    self.memory.write(addr, buf.content)
            if buf.writable:
                writable.append((addr, buf.length))
            entries.append((addr, buf.length, VIRTQ_DESC_F_WRITE if buf.writable else 0))
        if indirect:
            for i, (addr, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                link = VIRTQ_DESC_F_NEXT if more else 0
                self.memory.write(slot + DESC_SIZE * i, DESC.pack(addr, length, flags | link, i + 1 if more else 0))
            entries = [(slot, DESC_SIZE * len(entries), VIRTQ_DESC_F_INDIRECT)]
        for i, (addr, length, flags) in enumerate(entries):
            more = i + 1 < len(entries)
            self.memory.write(self.desc_addr + DESC_SIZE * descriptors[i],
                              DESC.pack(addr, length, flags | (VIRTQ_DESC_F_NEXT if more else 0),
                                        descriptors[i + 1] if more else 0))  # fmt: skip
        ring_slot = (self.avail_idx + self.pending) % self.size
        self.memory.write_u16(self.avail_addr + AVAIL_RING + 2 * ring_slot, head)
        self.pending += 1
        request = Request(head, descriptors, writable, tag)
        self.requests[head] = request
        return request

    def publish(self) -> int:
        """Expose the chains added since the last publish; return how many."""
        count, self.pending = self.pending, 0
        self.avail_idx = (self.avail_idx + count) & 0xFFFF
        self.memory.write_u16(self.avail_addr + AVAIL_IDX, self.avail_idx)
        return count

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    # --- used buffers ----------------------------------------------------------------------
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + USED_IDX)

    def collect(self) -> list[Completion]:
        """Every new used entry; a head used twice, or never made, is a KeyError."""
        done = []
        used = self.used_idx()
        while self.last_used != used:
            slot = self.last_used % self.size
            head, length = USED_ELEM.unpack(self.memory.read(self.used_addr + USED_RING + 8 * slot, 8))
            request = self.requests.pop(head)
            assert length <= request.writable_len, (length, request)
            data = b"".join(self.memory.read(gpa, n) for gpa, n in request.writable)
            self.free.extend(request.descriptors)
            done.append(Completion(request, length, data))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return done


@attrs.define(eq=False)
class Rig:
    """A device, its queue over guest memory, a driver ring, and the eventfds between them."""

    device: BlockDevice
    memory: GuestMemory
    queue: SplitQueue
    ring: Ring
    notifier: EventFd = attrs.Factory(EventFd)
    irq: EventFd = attrs.Factory(EventFd)
    broken: list[str] = attrs.Factory(list)
    interrupts: int = 0
    active: Activation = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.active = self.activation()

    @classmethod
    def make(cls, device: BlockDevice, *, size: int = 64, slot_size: int = 16 * 1024, extra: int = 0) -> Rig:
        """``extra`` bytes of guest RAM after the slots (for buffers a test places itself)."""
        memory = GuestMemory.from_ranges([(0, (Ring.memory_needed(size, slot_size) + extra + 0xFFFF) & ~0xFFFF)])
        queue = SplitQueue(memory, max_size=device.queue_sizes[0])
        ring = Ring(memory, size, slot_size)
        ring.configure(queue)
        return cls(device, memory, queue, ring)

    def activation(self) -> Activation:
        """An activation at the device's current generation (what DRIVER_OK makes)."""
        return Activation(self.device, self.device.generation, [self.queue], [self.notifier], self._interrupt,
                          self.broken.append)  # fmt: skip

    def _interrupt(self, index: int) -> None:
        assert index == 0
        self.interrupts += 1
        self.irq.signal()

    def reset(self) -> None:
        """What the transport does when the driver writes 0 to the status (the ring is set up
        again by ``restart``)."""
        with self.device.lock:
            self.device.generation += 1
            self.queue.reset()
            self.device.reset_state()
        self.notifier.take()

    def restart(self) -> None:
        """The driver sets the queue up again after a reset, and DRIVER_OK: a new activation."""
        self.ring = Ring(self.memory, self.ring.size, self.ring.slot_size)
        self.ring.configure(self.queue)
        self.active = self.activation()

    @property
    def scratch(self) -> int:
        """The first byte of guest RAM after the slots."""
        return self.ring.end

    def close(self) -> None:
        self.notifier.close()
        self.irq.close()
        self.memory.close()

    def submit(self, requests: Sequence[tuple[Sequence[Buf], bool, object]]) -> list[Request]:
        """Add (bufs, indirect, tag) chains, publish them and notify the device."""
        made = [self.ring.add(bufs, indirect=indirect, tag=tag) for bufs, indirect, tag in requests]
        self.ring.publish()
        self.notifier.signal()
        return made

    async def wait(self, count: int, timeout: float = 10.0) -> list[Completion]:
        """Wait (on the event loop that serves the device) for ``count`` completions."""
        done: list[Completion] = []
        with anyio.fail_after(timeout):
            while True:
                done += self.ring.collect()
                if len(done) >= count:
                    return done
                with anyio.move_on_after(0.02):  # an interrupt the driver suppressed is not awaited
                    await self.irq.wait()

    def wait_sync(self, count: int, timeout: float = 10.0) -> list[Completion]:
        """Wait (from a thread other than the device's event loop) for ``count`` completions."""
        done: list[Completion] = []
        deadline = time.monotonic() + timeout
        while True:
            done += self.ring.collect()
            if len(done) >= count:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(done)} of {count} requests completed; in flight: {self.ring.in_flight}")
            select.select([self.irq.fd], [], [], min(left, 0.02))
            self.irq.take()
