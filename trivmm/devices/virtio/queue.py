"""The device side of a virtio 1.x split virtqueue (virtio v1.2, section 2.7), hostile-proof.

Everything in a virtqueue is written by the guest and may change under the device at any
moment: the rings, the descriptors, the buffers. So the queue reads each descriptor exactly
once, into Python integers, and checks that copy; it never reads a field twice and trusts
the second value. Every rule a driver can break is a ``VirtqueueError`` whose message says
what the driver did, after which the queue is *broken*: it refuses all work until
``reset()``, and the device sets DEVICE_NEEDS_RESET (as QEMU's ``virtio_error`` does).

What a guest can make one ``pop()`` cost is bounded. A chain walks at most ``size``
descriptors of the descriptor table, and at most the entries of one indirect table (whose
length is itself capped by ``max_indirect``), so a loop or an over-long chain is an error
after a counted number of reads, never a hang. Buffer addresses are checked against guest
RAM with checked arithmetic (``addr + len`` past 2**64 is an error, not a wrap), and a
chain's total length is capped by ``max_chain_bytes`` (the spec's 2**32 by default).

Memory ordering. The driver publishes descriptors and ring entries before the ``idx`` that
exposes them (with a barrier); the device reads ``avail.idx`` first and the entries after,
and x86 does not reorder loads with loads. Likewise the device writes a used element
before ``used.idx``, and x86 keeps stores in order. What x86 does reorder is a store with a
later load, and two places need exactly that order (the Dekker pattern both sides of a
notification follow): storing ``used.idx`` then loading ``used_event``/``avail.flags`` in
``needs_notification``, and storing ``avail_event``/``used.flags`` then loading
``avail.idx`` in ``enable_notification``. Those go through ``_full_barrier``. The indices and
flags themselves are loaded and stored as whole 16-bit words (``GuestMemory.words``), never
with ``struct``: its ``pack_into`` zeroes the destination before storing (a driver polling
``used.idx`` would see 0 for a moment: found by the CPL3 benchmark guest), and its ``"<H"``
unpacking reads byte by byte (a torn ``avail.idx``).

Not thread-safe: one owner (a device backend) drives a queue at a time; the transport
configures it while it is not ready.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

import attrs

from trivmm.devices.virtio.constants import (
    AVAIL_ALIGN,
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC_ALIGN,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ALIGN,
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
from trivmm.memory import GuestMemory

__all__ = [
    "SplitQueue", "DescriptorChain", "QueueState", "VirtqueueError", "vring_need_event",
    "MAX_INDIRECT", "MAX_CHAIN_BYTES",
]  # fmt: skip

MAX_INDIRECT = 1024  # entries in one indirect table (QEMU's limit on the buffers of one request)
MAX_CHAIN_BYTES = 1 << 32  # "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"
_U16_MASK = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_LIMIT = 1 << 64
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next


# The indices and flags both sides race on (avail.idx, used.idx, the event indices, the
# flags) are read and written as whole u16 words through GuestMemory.words(): one load or
# store each. (struct's pack_into zeroes the destination before storing, so a driver could
# read used.idx as 0 for a moment; "<H" unpacking reads byte by byte and could tear.)
def _load_u16(words: memoryview, index: int) -> int:
    return int(words[index])


def _store_u16(words: memoryview, index: int, value: int) -> None:
    words[index] = value


_USED_ELEM = struct.Struct("<II")  # id, len

Buffer = tuple[int, int]  # (guest-physical address, length)


class VirtqueueError(Exception):
    """The driver broke a virtqueue rule; the message says how. The queue is now broken."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx``: the spec's
    ``(u16)(new - event - 1) < (u16)(new - old)``, i.e. ``event`` is one of old .. new-1."""
    return (new_idx - event_idx - 1) & _U16_MASK < (new_idx - old_idx) & _U16_MASK


_FENCE = threading.Lock()


def _nothing() -> None:
    pass


def _full_barrier() -> None:
    """Order this thread's earlier stores before its later loads.

    CPython offers no fence, but taking and releasing a lock does: both are atomic
    read-modify-writes (a ``lock``-prefixed instruction on x86), and those are full barriers.
    """
    with _FENCE:
        pass


@attrs.frozen
class DescriptorChain:
    """One chain the driver made available: its head index, then its device-readable and its
    device-writable buffers in chain order, every one already checked to lie inside guest RAM.

    Zero-length descriptors are valid (the spec does not forbid them) but carry nothing, so
    they are left out of ``readable`` and ``writable``.
    """

    memory: GuestMemory = attrs.field(repr=False, eq=False)
    head: int
    readable: tuple[Buffer, ...]
    writable: tuple[Buffer, ...]
    readable_len: int
    writable_len: int

    def readable_views(self) -> list[memoryview]:
        return [self.memory.view(gpa, length) for gpa, length in self.readable]

    def writable_views(self) -> list[memoryview]:
        """Views of the device-writable buffers (their pages are marked written by the VMM)."""
        return [self.memory.view(gpa, length, write=True) for gpa, length in self.writable]

    def read(self, limit: int | None = None) -> bytes:
        """The device-readable bytes, gathered in order (the first ``limit`` of them)."""
        wanted = self.readable_len if limit is None else min(limit, self.readable_len)
        parts: list[bytes] = []
        for gpa, length in self.readable:
            if wanted <= 0:
                break
            take = min(length, wanted)
            parts.append(self.memory.read(gpa, take))
            wanted -= take
        return b"".join(parts)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` over the device-writable buffers from byte ``offset`` of them;
        return how many bytes fitted."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        source = memoryview(data).cast("B")
        done = 0
        for gpa, length in self.writable:
            if done == len(source):
                break
            if offset >= length:
                offset -= length
                continue
            take = min(length - offset, len(source) - done)
            self.memory.write(gpa + offset, source[done : done + take])
            done += take
            offset = 0
        return done


@attrs.frozen
class QueueState:
    """What a queue needs to carry on elsewhere (the rings themselves are in guest memory)."""

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    ready: bool
    event_idx: bool
    next_avail: int
    next_used: int
    signalled_used: int | None  # used.idx at the last notification check; None: unknown, notify


def _check_max_size(instance: SplitQueue, attribute: attrs.Attribute[int], value: int) -> None:
    if not (0 < value <= MAX_QUEUE_SIZE and value & (value - 1) == 0):
        raise ValueError(f"a virtqueue's maximum size must be a power of two up to {MAX_QUEUE_SIZE}, not {value}")


def _check_positive(instance: SplitQueue, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value}")


# on_setattr NO_OP: validators run at construction only, and no generated __setattr__ slows
# the per-request path (the configuration's own checks are the properties below).
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class SplitQueue:
    """The device side of one split virtqueue over ``memory``.

    The transport sets ``size``, the three ring addresses and ``event_idx`` (VIRTIO_F_EVENT_IDX
    negotiated), then ``set_ready(True)``, which checks them. A backend then takes chains with
    ``pop()`` (or iterates), completes each with ``add_used(head, written)``, and notifies the
    driver when ``needs_notification()`` says so. A backend that wants fewer notifications
    drains like this::

        while True:
            queue.disable_notification()
            for chain in queue: ...
            if not queue.enable_notification():   # re-checks avail.idx after re-enabling
                break

    Indirect descriptors are accepted whether or not VIRTIO_F_INDIRECT_DESC was negotiated:
    trivmm's devices offer it, and handling a table is as safe as refusing it.
    """

    memory: GuestMemory = attrs.field(repr=False)
    max_size: int = attrs.field(default=MAX_QUEUE_SIZE, kw_only=True, validator=_check_max_size)
    max_indirect: int = attrs.field(default=MAX_INDIRECT, kw_only=True, validator=_check_positive)
    max_chain_bytes: int = attrs.field(default=MAX_CHAIN_BYTES, kw_only=True, validator=_check_positive)

    # --- set by the transport (the properties below): power-on values; frozen while ready ---
    _size: int = attrs.field(init=False, default=0)  # reset(): max_size
    _desc_addr: int = attrs.field(init=False, default=0)
    _avail_addr: int = attrs.field(init=False, default=0)
    _used_addr: int = attrs.field(init=False, default=0)
    _event_idx: bool = attrs.field(init=False, default=False)

    # --- the device's own state: power-on values are the defaults (reset() restores them) ---
    _ready: bool = attrs.field(init=False, default=False)
    _next_avail: int = attrs.field(init=False, default=0)  # the next avail ring entry to take
    _next_used: int = attrs.field(init=False, default=0)  # the next used ring entry to write
    _avail_idx: int = attrs.field(init=False, default=0)  # avail.idx as last read (a batch's end)
    _signalled_used: int | None = attrs.field(init=False, default=0)  # used.idx at the last check
    _notify: bool = attrs.field(init=False, default=True)  # available-buffer notifications wanted
    _broken: str | None = attrs.field(init=False, default=None)
    # The rings, resolved once by set_ready (checked inside guest RAM there): a region's view
    # and each ring's offset in it, so that the per-request path does no address lookups.
    _desc_view: memoryview | None = attrs.field(init=False, default=None, repr=False)
    _desc_offset: int = attrs.field(init=False, default=0, repr=False)
    _avail_words: memoryview | None = attrs.field(init=False, default=None, repr=False)  # u16 words
    _avail_index: int = attrs.field(init=False, default=0, repr=False)  # of avail.flags
    _used_view: memoryview | None = attrs.field(init=False, default=None, repr=False)
    _used_offset: int = attrs.field(init=False, default=0, repr=False)
    _used_words: memoryview | None = attrs.field(init=False, default=None, repr=False)  # u16 words
    _used_index: int = attrs.field(init=False, default=0, repr=False)  # of used.flags
    _mark_used_ring: Callable[[], None] = attrs.field(init=False, default=_nothing, repr=False)

    def __attrs_post_init__(self) -> None:
        self.reset()

    # --- configuration -------------------------------------------------------------------
    # The transport forwards the driver's register writes here; the spec forbids changing
    # them while the queue is enabled, so a change then is a VirtqueueError.
    def _set_config(self, name: str, value: object) -> None:
        if self._ready and value != getattr(self, name):
            raise VirtqueueError(f"the driver changed the queue's {name.lstrip('_')} while the queue is ready")
        setattr(self, name, value)

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._set_config("_size", value)

    @property
    def desc_addr(self) -> int:
        return self._desc_addr

    @desc_addr.setter
    def desc_addr(self, value: int) -> None:
        self._set_config("_desc_addr", value)

    @property
    def avail_addr(self) -> int:
        return self._avail_addr

    @avail_addr.setter
    def avail_addr(self, value: int) -> None:
        self._set_config("_avail_addr", value)

    @property
    def used_addr(self) -> int:
        return self._used_addr

    @used_addr.setter
    def used_addr(self, value: int) -> None:
        self._set_config("_used_addr", value)

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        self._set_config("_event_idx", value)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def next_avail(self) -> int:
        return self._next_avail

    @property
    def next_used(self) -> int:
        return self._next_used

    @property
    def broken(self) -> str | None:
        """Why the queue stopped working (the first error), or None."""
        return self._broken

    def set_ready(self, ready: bool) -> None:
        """Enable the queue after checking its configuration, or disable it (keeping its
        position). A bad configuration raises ``VirtqueueError`` and leaves it disabled."""
        if not ready:
            self._ready = False
            return
        self._check_not_broken()
        size = self.size
        if not (0 < size <= self.max_size and size & (size - 1) == 0):
            raise VirtqueueError(f"queue size {size} is not a power of two from 1 to {self.max_size}")
        for what, addr, length, align in (
            ("descriptor table", self.desc_addr, desc_table_size(size), DESC_ALIGN),
            ("available ring", self.avail_addr, avail_ring_size(size), AVAIL_ALIGN),
            ("used ring", self.used_addr, used_ring_size(size), USED_ALIGN),
        ):
            if not 0 <= addr < _U64_LIMIT:
                raise VirtqueueError(f"the {what} address {addr:#x} is not a 64-bit address")
            if addr % align:
                raise VirtqueueError(f"the {what} address {addr:#x} is not {align}-byte aligned")
            if not self.memory.contains(addr, length):
                raise VirtqueueError(f"the {what} ({addr:#x}+{length:#x}) is not inside guest RAM")
        memory = self.memory
        self._desc_view, self._desc_offset = memory.resolve(self.desc_addr, desc_table_size(size))
        self._avail_words, self._avail_index = memory.words(self.avail_addr, 2)
        self._used_view, self._used_offset = memory.resolve(self.used_addr, used_ring_size(size))
        self._used_words, self._used_index = memory.words(self.used_addr, 2)
        self._mark_used_ring = memory.dirty_marker(self.used_addr, used_ring_size(size))
        self._avail_idx = self._next_avail  # read avail.idx afresh
        self._ready = True
        # Say in the ring whether we want notifications: after a restore (or a queue disabled and
        # enabled again) the ring may still hold what an earlier owner wrote, and a device that
        # waits for a notification the driver was told not to send waits forever.
        if self._notify:
            self.enable_notification()
        else:
            self.disable_notification()

    def reset(self) -> None:
        """Back to power-on: every field but the constructor's limits, the error included."""
        self._ready = False  # first: the configuration fields refuse changes while ready
        for field in attrs.fields(type(self)):
            if not field.init:
                setattr(self, field.name, field.default)
        self.size = self.max_size  # what a PCI transport's queue_size reads before the driver writes it

    # --- taking chains -------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """The next chain the driver made available, or None if there is none (or the queue is
        not ready). Raises ``VirtqueueError`` for a malformed ring or chain."""
        if self._broken is not None:
            self._check_not_broken()
        if not self._ready:
            return None
        avail, base = self._avail_words, self._avail_index
        assert avail is not None  # resolved by set_ready
        if self._next_avail == self._avail_idx:
            # Caught up with the last batch: read avail.idx again (once per batch).
            idx = _load_u16(avail, base + AVAIL_IDX // 2)
            pending = (idx - self._next_avail) & _U16_MASK
            if pending > self._size:
                self._fail(f"avail.idx jumped from {self._avail_idx} to {idx}: {pending} new entries "
                           f"in a queue of {self._size}")  # fmt: skip
            self._avail_idx = idx
            if not pending:
                return None
        slot = self._next_avail & (self._size - 1)
        head = _load_u16(avail, base + AVAIL_RING // 2 + slot)
        self._next_avail = (self._next_avail + 1) & _U16_MASK
        chain = self._walk(head, slot)
        if self._event_idx and self._notify:
            # Ask to be notified of the next entry the driver adds (QEMU does the same).
            self._store_used_u16(USED_RING + 8 * self._size, self._next_avail)
        return chain

    def __iter__(self) -> Iterator[DescriptorChain]:
        """Pop chains until none is available."""
        while (chain := self.pop()) is not None:
            yield chain

    def unpop(self, count: int) -> None:
        """Give back the ``count`` chains popped last, none of them used: the next pops read
        them from the ring again. A backend quiesced for a snapshot does this with the chains
        it took and did not serve, so that the VMM holds no chain when the queue is saved.

        Their avail-ring slots still name them. The driver writes the slot of entry ``i``
        (``i mod size``) only to add entry ``i``; entries ``next_avail - count`` onwards are
        all outstanding (given back here, or not popped yet), each holding a descriptor head
        of its own, so fewer than ``size + 1`` of them exist and the driver cannot have added
        the entry ``size`` past the first given back, the one that would reuse its slot. (A
        driver that rewrites them anyway gets what it wrote, checked as any chain is.)

        ``RuntimeError`` for more chains than are outstanding (popped and not used): the
        caller's bookkeeping is wrong. The queue cannot tell *which* chains were used, so the
        caller vouches that none of the last ``count`` was."""
        self._check_not_broken()
        if not self._ready:
            raise RuntimeError("unpop on a queue that is not ready")
        outstanding = (self._next_avail - self._next_used) & _U16_MASK
        if not 0 <= count <= outstanding:
            raise RuntimeError(f"unpop of {count} chains with {outstanding} outstanding: more than were popped "
                               "and not used")  # fmt: skip
        if not count:
            return
        self._next_avail = (self._next_avail - count) & _U16_MASK
        if self._event_idx and self._notify:
            # pop() asked to hear of the entry after the last one taken; they are to be taken again.
            self._store_used_u16(USED_RING + 8 * self._size, self._next_avail)

    @property
    def outstanding(self) -> int:
        """Chains popped and not yet used."""
        return (self._next_avail - self._next_used) & _U16_MASK

    def _walk(self, head: int, slot: int) -> DescriptorChain:
        """Follow the chain at ``head``; each descriptor is read once and checked."""
        memory = self.memory
        if head >= self.size:
            self._fail(f"avail ring entry {slot} names descriptor {head}, past the end of the "
                       f"{self.size}-entry descriptor table")  # fmt: skip
        entries, where = self._size, "descriptor table"
        view, table = self._desc_view, self._desc_offset  # resolved by set_ready
        assert view is not None
        contains = memory.contains
        indirect = False
        budget = entries  # descriptors this chain may still visit in this table: the TTL
        index = head
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        readable_len = writable_len = 0
        seen_writable = False
        while True:
            if not budget:
                self._fail(f"the chain at head {head} visits more descriptors than the {entries}-entry "
                           f"{where} holds: a loop")  # fmt: skip
            budget -= 1
            addr, length, flags, next_index = _DESC.unpack_from(view, table + DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    self._fail(f"descriptor {index} of the {where} (chain at head {head}) is itself "
                               f"indirect: nested indirect tables are not allowed")  # fmt: skip
                if flags & VIRTQ_DESC_F_NEXT:
                    self._fail(f"descriptor {index} (chain at head {head}) has both INDIRECT and NEXT set")
                if not length or length % DESC_SIZE:
                    self._fail(f"descriptor {index} (chain at head {head}) points to an indirect table of "
                               f"{length} bytes, not a non-zero multiple of {DESC_SIZE}")  # fmt: skip
                if length // DESC_SIZE > self.max_indirect:
                    self._fail(f"descriptor {index} (chain at head {head}) points to an indirect table of "
                               f"{length // DESC_SIZE} entries, more than the {self.max_indirect} allowed")  # fmt: skip
                if addr + length > _U64_LIMIT or not contains(addr, length):
                    self._fail(f"descriptor {index} (chain at head {head}) points to an indirect table at "
                               f"{addr:#x}+{length:#x}, which is not inside guest RAM")  # fmt: skip
                # The WRITE flag of this descriptor means nothing: the spec says to ignore it.
                view, table = memory.resolve(addr, length)
                entries, where = length // DESC_SIZE, f"indirect table at {addr:#x}"
                indirect = True
                budget = entries
                index = 0
                continue
            if addr + length > _U64_LIMIT:
                self._fail(f"descriptor {index} of the {where} (chain at head {head}) describes "
                           f"{addr:#x}+{length:#x}, which wraps past 2**64")  # fmt: skip
            if not contains(addr, length):
                self._fail(f"descriptor {index} of the {where} (chain at head {head}) describes "
                           f"{addr:#x}+{length:#x}, which is not inside guest RAM")  # fmt: skip
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                if length:
                    writable.append((addr, length))
                writable_len += length
            else:
                if seen_writable:
                    self._fail(f"descriptor {index} of the {where} (chain at head {head}) is device-readable "
                               f"but follows a device-writable one")  # fmt: skip
                if length:
                    readable.append((addr, length))
                readable_len += length
            if readable_len + writable_len > self.max_chain_bytes:
                self._fail(f"the chain at head {head} is longer than {self.max_chain_bytes} bytes")
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if next_index >= entries:
                self._fail(f"descriptor {index} of the {where} (chain at head {head}) chains to "
                           f"{next_index}, past the end of the {entries}-entry table")  # fmt: skip
            index = next_index
        return DescriptorChain(memory, head, tuple(readable), tuple(writable), readable_len, writable_len)

    # --- returning chains ----------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return the chain at ``head`` to the driver, ``written`` bytes written into its
        device-writable buffers: write the used element, then publish ``used.idx``."""
        self._check_not_broken()
        if not self._ready:
            raise RuntimeError("add_used on a queue that is not ready (reset or disabled since the pop?)")
        if not 0 <= head < self.size:
            raise ValueError(f"descriptor head {head} is outside a queue of {self.size}")
        if not 0 <= written <= _U32_MAX:
            raise ValueError(f"written length {written} does not fit the used element's 32 bits")
        if self._next_used == self._next_avail:
            raise RuntimeError("add_used with no chain outstanding: more chains used than popped")
        view, base = self._used_view, self._used_offset
        assert view is not None  # resolved by set_ready
        slot = self._next_used & (self._size - 1)
        _USED_ELEM.pack_into(view, base + USED_RING + 8 * slot, head, written)
        self._next_used = (self._next_used + 1) & _U16_MASK
        self._store_used_u16(USED_IDX, self._next_used)  # after the element: x86 keeps stores in order

    # --- notifications -------------------------------------------------------------------
    def needs_notification(self) -> bool:
        """Whether the driver wants a used-buffer notification for the chains used since the
        last call. Call it after ``add_used`` (once per batch is enough) and notify if True.

        Without EVENT_IDX: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT. With EVENT_IDX: if
        ``used_event`` is one of the used-ring indices written since the last call
        (``vring_need_event``), or if the last call is unknown (restored as None).
        """
        self._check_not_broken()
        if not self._ready:
            return False
        new, old = self._next_used, self._signalled_used
        self._signalled_used = new
        if new == old:
            return False  # nothing used since the last call
        _full_barrier()  # used.idx is stored before used_event / avail.flags are loaded
        avail, base = self._avail_words, self._avail_index
        assert avail is not None  # resolved by set_ready
        if not self._event_idx:
            return not _load_u16(avail, base + AVAIL_FLAGS // 2) & VIRTQ_AVAIL_F_NO_INTERRUPT
        if old is None:
            return True
        used_event = _load_u16(avail, base + AVAIL_RING // 2 + self._size)
        return vring_need_event(used_event, new, old)

    def disable_notification(self) -> None:
        """Ask the driver not to notify of new available buffers (a hint it may ignore)."""
        self._check_not_broken()
        if not self._ready:
            return
        self._notify = False
        if not self._event_idx:
            self._store_used_u16(USED_FLAGS, VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX, avail_event simply stops following next_avail: once the driver has
        # passed it, it does not notify again.

    def enable_notification(self) -> bool:
        """Ask the driver to notify of new available buffers again; return whether some are
        already available (they arrived while notifications were off: process them)."""
        self._check_not_broken()
        if not self._ready:
            return False
        self._notify = True
        if self._event_idx:
            self._store_used_u16(USED_RING + 8 * self._size, self._next_avail)
        else:
            self._store_used_u16(USED_FLAGS, 0)
        _full_barrier()  # the request is stored before avail.idx is loaded
        assert self._avail_words is not None  # resolved by set_ready
        return _load_u16(self._avail_words, self._avail_index + AVAIL_IDX // 2) != self._next_avail

    # --- saved state ---------------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(self.size, self.desc_addr, self.avail_addr, self.used_addr, self._ready,
                          self.event_idx, self._next_avail, self._next_used, self._signalled_used)  # fmt: skip

    def restore(self, state: QueueState) -> None:
        """Reset, then take ``state``. A ready state is checked as ``set_ready`` checks (a
        ``VirtqueueError``); out-of-range numbers are a ``ValueError``. On error the queue is
        left reset."""
        self.reset()
        for name in ("next_avail", "next_used"):
            if not 0 <= getattr(state, name) <= _U16_MASK:
                raise ValueError(f"saved {name} {getattr(state, name)} is not a 16-bit index")
        if state.signalled_used is not None and not 0 <= state.signalled_used <= _U16_MASK:
            raise ValueError(f"saved signalled_used {state.signalled_used} is not a 16-bit index")
        outstanding = (state.next_avail - state.next_used) & _U16_MASK
        if outstanding > state.size:
            raise ValueError(f"saved state has {outstanding} chains outstanding in a queue of {state.size}")
        self.size, self.event_idx = state.size, state.event_idx
        self.desc_addr, self.avail_addr, self.used_addr = state.desc_addr, state.avail_addr, state.used_addr
        self._next_avail, self._next_used = state.next_avail, state.next_used
        self._signalled_used = state.signalled_used
        if state.ready:
            try:
                self.set_ready(True)
            except VirtqueueError:
                self.reset()
                raise

    # --- helpers -------------------------------------------------------------------------
    def _store_used_u16(self, offset: int, value: int) -> None:
        """Store a u16 at ``offset`` of the used ring (flags, idx, avail_event)."""
        assert self._used_words is not None  # resolved by set_ready
        _store_u16(self._used_words, self._used_index + offset // 2, value)
        self._mark_used_ring()

    def _check_not_broken(self) -> None:
        if self._broken is not None:
            raise VirtqueueError(f"the queue is broken until it is reset: {self._broken}")

    def _fail(self, message: str) -> NoReturn:
        self._broken = message
        raise VirtqueueError(message)
