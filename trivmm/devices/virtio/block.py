"""virtio-blk (virtio 1.2 section 5.2): a disk backed by an opened ``DiskImage`` (trivmm.images).

One request queue (up to 256 entries). A request is a descriptor chain: a 16-byte
device-readable header (``type`` u32, ``reserved`` u32, ``sector`` u64), the data, and a
1-byte device-writable status -- the chain's *last* device-writable byte. The header may
span descriptors (it is gathered), and data may share a descriptor with the header or the
status: only byte offsets matter.

=================  =============================================================================
request            what the device does (status OK unless a row below says otherwise)
=================  =============================================================================
IN (0)             read ``writable_len - 1`` bytes at ``sector`` into the writable buffers;
                   used length = data + 1. Extra device-readable bytes after the header are
                   ignored (as QEMU does).
OUT (1)            write the device-readable bytes after the header at ``sector``; used length
                   1. Extra writable bytes before the status are left alone. Read-only disk:
                   IOERR, nothing written (the spec's MUST).
FLUSH (4)          ``image.flush()`` (fdatasync): every write completed before the flush was
                   submitted is durable when it completes. ``sector`` and any data are ignored.
GET_ID (8)         the serial, NUL-padded to 20 bytes, cut to the data buffer (the spec's is
                   20 bytes; QEMU's cut too); all NULs without a serial.
DISCARD (11)       segments of 16 bytes (sector u64, num_sectors u32, flags u32) after the
                   header; each range ``image.discard``-ed. Any flag set (UNMAP included):
                   UNSUPP (the spec's MUST). Not offered (read-only disk): UNSUPP.
WRITE_ZEROES (13)  the same segments; ``image.write_zeroes(unmap=flags & 1)``; other flags:
                   UNSUPP. Not offered (read-only disk): UNSUPP.
anything else      UNSUPP (GET_LIFETIME, SECURE_ERASE, zoned and legacy SCSI/BARRIER types).
=================  =============================================================================

IOERR, with the status written and the chain returned (used length 1), for a request the
driver got wrong: no 16-byte header; IN/OUT data not a multiple of 512 bytes, more than
``MAX_REQUEST_BYTES`` (``SEG_MAX`` x ``SIZE_MAX``), or in more than ``SEG_MAX`` descriptors
besides header and status; a range past ``capacity`` (Python integers: ``sector * 512`` cannot
wrap); DISCARD/WRITE_ZEROES data empty or not a multiple of 16, more than 32 segments, a
segment past ``capacity``, more than ``MAX_DISCARD_SECTORS`` in all; and any ``ImageError``
(a host IO error, qcow2 metadata found corrupt). These are the driver's or the host's
errors, not queue-level ones: the device serves on.

A chain with no device-writable byte cannot be answered -- there is nowhere to put a status,
and returning it with a used length of 0 would leave the driver reading whatever its status
buffer held as the result. That is DEVICE_NEEDS_RESET (``active.broken``), as QEMU's
``virtio_error`` for a request without headers. Queue-level violations (``VirtqueueError``)
break the device through ``Activation`` as for every device.

Used length: the bytes the device wrote. A successful IN: data + 1 (data then status,
contiguous, as every driver lays them out); GET_ID: the id bytes + 1; anything else: 1. The
status is always the last writable byte, so a chain with writable bytes before the status
that the device does not fill (an OUT with a writable data buffer, a failed IN, a GET_ID
buffer over 20 bytes) reports bytes that are not a prefix of its buffers -- as Firecracker and
cloud-hypervisor report them; Linux's driver does not read the used length of a block
request.

Bounds. ``SIZE_MAX`` (128 KiB per segment) and ``SEG_MAX`` (126 segments) are offered, so an
honest driver's block layer never builds a request over ``MAX_REQUEST_BYTES`` (15.75 MiB):
without VIRTIO_BLK_F_SIZE_MAX, Linux's segments are unbounded and a guest raising
``max_sectors_kb`` would get IOERR where it should have got a split request. 126 is QEMU's
historical value: a request with its header and status fits a 128-entry ring without
indirect descriptors. The device works on at most ``BATCHES_IN_FLIGHT`` batches of at most
``BATCH_REQUESTS`` requests and ``BATCH_BYTES`` of data each (a larger request goes alone),
so the data a guest can make the VMM hold is about 2 x 15.75 MiB at worst. DISCARD and
WRITE_ZEROES are bounded by ``MAX_DISCARD_SECTORS`` (128 MiB, in at most 32 segments): a
qcow2 discard is Python work per cluster, and a raw write-zeroes where ``fallocate`` cannot
zero writes the zeros.

Threads, batches and resets. ``serve`` takes every available chain and parses a batch on
the event loop (the header read once, OUT data copied out of guest memory); the batch's
file IO runs in ring order on a worker thread (``anyio.to_thread.run_sync`` through a
per-device ``CapacityLimiter`` of ``IO_THREADS``; the image has its own lock), and the event
loop completes the batch under the device lock: statuses written, used entries added, one
notification check and at most one interrupt per batch. While a batch's IO runs, the next
batch is parsed and dispatched (``BATCHES_IN_FLIGHT``). Adjacent reads next to each other in
a batch are one ``image.read`` (up to ``MERGE_BYTES``). FLUSH covers every write *completed*
before it, which is what the spec asks: a write the driver has seen completed reached the
image before its completion was written.

Reads go straight into the guest's buffers: one scatter read (``DiskImage.read_into``; a
raw image's is one ``preadv``) per run of adjacent IN requests of a batch, no copy in
between -- the data path of a sequential reader is the host kernel's copy from its page
cache and nothing else. Those buffers are written without the device lock (a read may
take milliseconds), so the reset rule of ``device.py`` takes one more step here: a read
starts only while the activation is current (checked under the lock), and a reset waits,
on its vCPU thread, for reads under way to finish (``reset_state``: the drain QEMU's reset
does) before the driver can see status 0 and take its buffers back. The status and the used
entry come at completion, on the event loop, under the lock: a reset in between leaves the
buffers written while the device still owned them and returns nothing to the driver. A
batch whose IO is on the worker thread when the device is reset stops there and is dropped
(``dropped`` counts it): no status, no used entry. The task waits for its worker thread
rather than abandoning it, so no IO of this device outlives ``serve``.

Parsing reads guest memory without the device lock and checks ``active.current`` under the
lock once the batch is parsed: the generation only grows, and only under the lock, so
"current now" means "current all through the parse" -- OUT data was copied from buffers the
device still owned, and nothing is written to the image from buffers a reset handed back to
the driver. This is the guarantee of copying under the lock, without holding the lock (and
a vCPU on the transport's registers) through a 15 MiB copy.

Snapshots. A batch, once dispatched, runs to its completion in a shielded scope: when a
quiesce (``VirtioDevice.quiesce``) cancels the backend, the loop that takes chains stops at
its await, and every batch in flight finishes its IO and completes normally -- statuses
written, chains used, the interrupt raised -- before the backend has stopped. Chains taken
and not yet in a batch (``active.held[0]``) are given back to the ring. (A reset still
drops a batch: ``_execute`` and ``_complete`` see the stale activation.) The device's
section is its configuration space: a destination whose disk has another capacity, or is
read-only where the source's was not, refuses it. While a migration copies the disk
(``--copy-storage``), ``written`` is a ``WriteTracker``: the worker thread marks the
chunks each OUT, DISCARD and WRITE_ZEROES touched, after its IO (trivmm.migration.storage).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Sequence

import anyio

from trivmm.devices.virtio.device import Activation, DeviceState, DeviceType, VirtioDevice
from trivmm.devices.virtio.queue import DescriptorChain, VirtqueueError
from trivmm.errors import ConfigError
from trivmm.images import DiskImage, ImageError
from trivmm.memory import GuestMemory

__all__ = [
    "BlockDevice", "block_config",
    "VIRTIO_BLK_F_SIZE_MAX", "VIRTIO_BLK_F_SEG_MAX", "VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_BLK_SIZE",
    "VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_DISCARD", "VIRTIO_BLK_F_WRITE_ZEROES",
    "VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_OUT", "VIRTIO_BLK_T_FLUSH", "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_DISCARD", "VIRTIO_BLK_T_WRITE_ZEROES", "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_UNSUPP",
    "SECTOR_SIZE", "ID_BYTES", "QUEUE_SIZE", "SEG_MAX", "SIZE_MAX", "MAX_REQUEST_BYTES",
    "MAX_DISCARD_SECTORS", "MAX_DISCARD_SEG", "MAX_WRITE_ZEROES_SECTORS", "MAX_WRITE_ZEROES_SEG",
    "BATCH_REQUESTS", "BATCH_BYTES", "BATCHES_IN_FLIGHT", "IO_THREADS",
    "HEADER", "SEGMENT", "CONFIG", "WriteTracker", "TRACK_CHUNK",
]  # fmt: skip

_log = logging.getLogger(__name__)

# --- feature bits (5.2.3) ---------------------------------------------------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# --- requests (5.2.6) -------------------------------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512  # the protocol's unit, whatever blk_size says
ID_BYTES = 20
HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags: struct virtio_blk_discard_write_zeroes
# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (60 bytes): capacity@0,
# size_max@8, seg_max@12, geometry (cylinders@16, heads@18, sectors@19), blk_size@20, topology
# (physical_block_exp@24, alignment_offset@25, min_io_size@26, opt_io_size@28), writeback@32,
# unused0@33, num_queues@34, max_discard_sectors@36, max_discard_seg@40,
# discard_sector_alignment@44, max_write_zeroes_sectors@48, max_write_zeroes_seg@52,
# write_zeroes_may_unmap@56, unused1@57..59. Reads past it are zeros (the secure-erase and
# zoned fields of features not offered).
CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x")

# --- bounds (see the module docstring) ------------------------------------------------------------
QUEUE_SIZE = 256
SEG_MAX = 126
SIZE_MAX = 128 * 1024
MAX_REQUEST_BYTES = SEG_MAX * SIZE_MAX
MAX_DISCARD_SECTORS = MAX_WRITE_ZEROES_SECTORS = (128 << 20) // SECTOR_SIZE
MAX_DISCARD_SEG = MAX_WRITE_ZEROES_SEG = 32
BATCH_REQUESTS = 64
BATCH_BYTES = 4 << 20
BATCHES_IN_FLIGHT = 2
MERGE_BYTES = BATCH_BYTES  # adjacent reads in one batch: one scatter read
MERGE_BUFFERS = 1024  # ... of at most this many guest buffers (preadv's IOV_MAX)
IO_THREADS = 2

TRACK_CHUNK = 64 << 10  # the granularity of a WriteTracker (bytes)

_STATUS = (b"\x00", b"\x01", b"\x02")
_WRITES = frozenset({VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES})
_DONE = -1  # a request whose status (and reply) the parse decided: no IO


class WriteTracker:
    """The chunks of ``TRACK_CHUNK`` bytes a disk's writes (OUT, DISCARD, WRITE_ZEROES)
    have touched since the last ``take()``: what a migration with ``--copy-storage`` sends
    again. Marked by the worker thread once the write is done; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: set[int] = set()

    def mark(self, offset: int, length: int) -> None:
        if length > 0:
            chunks = range(offset // TRACK_CHUNK, (offset + length - 1) // TRACK_CHUNK + 1)
            with self._lock:
                self._chunks.update(chunks)

    def take(self) -> list[int]:
        """The chunks written since the last call, in order; the record starts afresh."""
        with self._lock:
            chunks, self._chunks = self._chunks, set()
        return sorted(chunks)


class _Request:
    """One parsed request: what the worker thread does and what the completion writes."""

    __slots__ = ("chain", "extents", "kind", "length", "offset", "payload", "reason", "reply", "status", "status_at",
                 "written")  # fmt: skip

    def __init__(self, chain: DescriptorChain, kind: int, status_at: int, offset: int = 0, length: int = 0) -> None:
        self.chain = chain
        self.kind = kind
        self.status_at = status_at  # offset of the status byte in the writable buffers
        self.offset = offset  # bytes, on the disk
        self.length = length  # bytes of data
        self.payload: bytes | None = None  # OUT: the data, copied from guest memory
        self.extents: list[tuple[int, int, bool]] = []  # DISCARD/WRITE_ZEROES: (offset, length, unmap)
        self.reply: bytes | None = None  # GET_ID: what goes in the writable buffers before the status
        self.written = 0  # IN: bytes of data delivered into the writable buffers
        self.status = VIRTIO_BLK_S_IOERR
        self.reason = ""  # why the status is not OK, for the log


def block_config(*, capacity: int, discard: bool, write_zeroes: bool, discard_alignment: int) -> bytearray:
    """The configuration space (``CONFIG``) of a disk of ``capacity`` 512-byte sectors."""
    return bytearray(CONFIG.pack(
        capacity, SIZE_MAX, SEG_MAX,
        0, 0, 0,  # geometry: not offered
        SECTOR_SIZE,
        0, 0, 0, 0,  # topology: not offered
        0, 0,  # writeback (VIRTIO_BLK_F_CONFIG_WCE not offered), unused0
        1,  # num_queues (VIRTIO_BLK_F_MQ not offered: one queue)
        MAX_DISCARD_SECTORS if discard else 0, MAX_DISCARD_SEG if discard else 0,
        discard_alignment if discard else 0,
        MAX_WRITE_ZEROES_SECTORS if write_zeroes else 0, MAX_WRITE_ZEROES_SEG if write_zeroes else 0,
        1 if write_zeroes else 0,  # write_zeroes_may_unmap: raw punches holes, qcow2 frees clusters
    ))  # fmt: skip


class BlockDevice(VirtioDevice):
    """A virtio block device over ``image``, an opened ``DiskImage`` the device owns from
    now on: ``close()`` (the VM's, once every backend has stopped) closes it. ``serial``
    (ASCII, up to 20 bytes) answers GET_ID; ``readonly`` forces a read-only disk over a
    read-write image."""

    device_type = DeviceType.BLOCK
    queue_sizes = (QUEUE_SIZE,)
    name = "virtio-blk"

    def __init__(self, image: DiskImage, *, serial: str | None = None, readonly: bool = False) -> None:
        super().__init__()
        self.image = image
        self.readonly = readonly or image.readonly
        ident = b"" if serial is None else serial.encode("ascii", errors="replace")
        if serial is not None and (not serial.isascii() or len(ident) > ID_BYTES):
            raise ConfigError(f"virtio-blk serial {serial!r} is not ASCII of at most {ID_BYTES} bytes")
        self.serial = serial
        self._id = ident.ljust(ID_BYTES, b"\x00")
        self.capacity = image.size // SECTOR_SIZE  # a partial last sector is not addressable
        self._size = self.capacity * SECTOR_SIZE
        features = 1 << VIRTIO_BLK_F_SIZE_MAX | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE \
            | 1 << VIRTIO_BLK_F_FLUSH  # fmt: skip
        if self.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES
        self.device_features = features
        granularity = max(SECTOR_SIZE, image.discard_granularity)
        self.config = block_config(capacity=self.capacity, discard=not self.readonly,
                                   write_zeroes=not self.readonly,
                                   discard_alignment=granularity // SECTOR_SIZE)  # fmt: skip
        self._limiter = anyio.CapacityLimiter(IO_THREADS)
        self._drained = threading.Condition(threading.Lock())  # reads into guest memory: see reset_state
        self._reads_in_guest = 0
        # Counters (the event loop's thread writes them): requests completed, by status; and
        # completions dropped because the device was reset while their IO ran.
        self.completed = 0
        self.ioerr = 0
        self.unsupp = 0
        self.dropped = 0
        # Set by a migration that copies this disk (migration.storage): writes are marked.
        self.written: WriteTracker | None = None

    @property
    def errors(self) -> int:
        return self.ioerr + self.unsupp

    def restore(self, state: DeviceState) -> None:
        if state.device_type == self.device_type and len(state.config) == CONFIG.size == len(self.config):
            (capacity,) = struct.unpack_from("<Q", state.config)
            if capacity != self.capacity:
                raise ValueError(f"{self.name}: the disk has {self.capacity} sectors here, {capacity} in the snapshot")
        super().restore(state)

    def close(self) -> None:
        """Close the image, its last flush included. A failure is logged, not raised: the
        VM closes its other devices and its memory after this one."""
        try:
            self.image.close()
        except ImageError as exc:
            _log.error("%s: closing the image failed: %s", self.name, exc)

    # --- the backend -----------------------------------------------------------------------
    async def serve(self, active: Activation) -> None:
        """Take every available chain; parse, run and complete them in batches (see the
        module docstring), up to ``BATCHES_IN_FLIGHT`` at once."""
        slots = anyio.Semaphore(BATCHES_IN_FLIGHT)
        pending = active.held[0]  # taken, not yet in a batch: a quiesce gives them back
        async with anyio.create_task_group() as task_group:
            while True:
                if not pending:
                    chains = active.take_chains(0, QUEUE_SIZE)
                    if not chains:
                        await active.wait_notified(0)
                        continue
                    pending.extend(chains)
                await slots.acquire()
                batch, broken = self._parse_batch(pending)
                with self.lock:
                    current = active.current
                if not current:  # reset while parsing: nothing of it may reach the image
                    slots.release()
                    await anyio.sleep_forever()  # the transport cancels this task
                if any(request.kind != _DONE for request in batch):
                    task_group.start_soon(self._run_batch, active, batch, slots)
                else:
                    try:
                        self._complete(active, batch)
                    finally:
                        slots.release()
                if broken is not None:
                    active.broken(broken)
                    await anyio.sleep_forever()  # batches in flight finish; the transport cancels us

    async def _run_batch(self, active: Activation, batch: list[_Request], slots: anyio.Semaphore) -> None:
        # Shielded: cancelling the backend (a quiesce, the VM stopping) lets the batch complete;
        # after a reset its IO stops early and the completion is dropped.
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._execute, active, batch, limiter=self._limiter)
                self._complete(active, batch)
            finally:
                slots.release()

    def _parse_batch(self, pending: deque[DescriptorChain]) -> tuple[list[_Request], str | None]:
        """Parse chains off ``pending`` into a batch of at most ``BATCH_REQUESTS`` requests and
        ``BATCH_BYTES`` of data (or one larger request); stop at a chain with no status byte
        and return why it breaks the device."""
        batch: list[_Request] = []
        data = 0
        while pending and len(batch) < BATCH_REQUESTS:
            chain = pending[0]
            size = _data_size(chain)
            if batch and data + size > BATCH_BYTES:
                break
            pending.popleft()
            request = self._parse(chain)
            if request is None:
                return batch, (f"a request (chain at head {chain.head}) has no device-writable byte "
                               f"for its status")  # fmt: skip
            batch.append(request)
            data += size
        return batch, None

    def _parse(self, chain: DescriptorChain) -> _Request | None:
        """The request ``chain`` carries, checked; None if it has no status byte. Reads guest
        memory (the header, OUT data, segments) once."""
        writable = chain.writable_len
        if not writable:
            return None
        status_at = writable - 1
        readable = chain.readable_len
        if readable < HEADER.size:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR, f"no {HEADER.size}-byte header ({readable} bytes)")
        gpa, size = chain.readable[0]
        if size >= HEADER.size:  # the usual layout: the header in a descriptor of its own
            kind, _reserved, sector = HEADER.unpack_from(*chain.memory.resolve(gpa, HEADER.size))
        else:
            kind, _reserved, sector = HEADER.unpack(chain.read(HEADER.size))
        if kind == VIRTIO_BLK_T_IN:
            return self._parse_rw(chain, kind, sector, status_at, status_at)
        if kind == VIRTIO_BLK_T_OUT:
            if self.readonly:
                return _failed(chain, status_at, VIRTIO_BLK_S_IOERR, "a write to a read-only disk")
            return self._parse_rw(chain, kind, sector, readable - HEADER.size, status_at)
        if kind == VIRTIO_BLK_T_FLUSH:
            return _Request(chain, kind, status_at)
        if kind == VIRTIO_BLK_T_GET_ID:
            request = _Request(chain, _DONE, status_at)
            request.reply = self._id[:status_at]
            request.status = VIRTIO_BLK_S_OK
            return request
        if kind == VIRTIO_BLK_T_DISCARD or kind == VIRTIO_BLK_T_WRITE_ZEROES:
            return self._parse_segments(chain, kind, status_at)
        return _failed(chain, status_at, VIRTIO_BLK_S_UNSUPP, f"request type {kind:#x} is not supported")

    def _parse_rw(self, chain: DescriptorChain, kind: int, sector: int, length: int, status_at: int) -> _Request:
        what = "read" if kind == VIRTIO_BLK_T_IN else "write"
        if length % SECTOR_SIZE:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR,
                           f"a {what} of {length} bytes, not a multiple of {SECTOR_SIZE}")  # fmt: skip
        if length > MAX_REQUEST_BYTES:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR,
                           f"a {what} of {length} bytes, more than {MAX_REQUEST_BYTES}")  # fmt: skip
        if len(chain.readable) + len(chain.writable) > SEG_MAX + 2:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR,
                           f"a {what} in {len(chain.readable) + len(chain.writable)} descriptors, more than "
                           f"seg_max ({SEG_MAX}) + 2")  # fmt: skip
        offset = sector * SECTOR_SIZE
        if offset + length > self._size:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR,
                           f"a {what} of {length} bytes at sector {sector}, past the end of the disk "
                           f"({self.capacity} sectors)")  # fmt: skip
        request = _Request(chain, kind, status_at, offset, length)
        if kind == VIRTIO_BLK_T_OUT and length:
            request.payload = _gather(chain, HEADER.size)
        return request

    def _parse_segments(self, chain: DescriptorChain, kind: int, status_at: int) -> _Request:
        discard = kind == VIRTIO_BLK_T_DISCARD
        what = "discard" if discard else "write zeroes"
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.device_features >> feature & 1:
            return _failed(chain, status_at, VIRTIO_BLK_S_UNSUPP, f"{what} on a disk that does not offer it")
        length = chain.readable_len - HEADER.size
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        if not length or length % SEGMENT.size or length // SEGMENT.size > max_seg:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR,
                           f"{what} data of {length} bytes, not 1 to {max_seg} segments of {SEGMENT.size}")  # fmt: skip
        segments = list(SEGMENT.iter_unpack(_gather(chain, HEADER.size)))
        allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        for _sector, _count, flags in segments:
            if flags & ~allowed:  # the spec's MUST: UNSUPP for unknown flags, and UNMAP on a discard
                return _failed(chain, status_at, VIRTIO_BLK_S_UNSUPP, f"{what} with flags {flags:#x}")
        request = _Request(chain, kind, status_at)
        total = 0
        for sector, count, flags in segments:
            offset, size = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if offset + size > self._size:
                return _failed(chain, status_at, VIRTIO_BLK_S_IOERR,
                               f"{what} of {count} sectors at sector {sector}, past the end of the disk "
                               f"({self.capacity} sectors)")  # fmt: skip
            total += count
            request.extents.append((offset, size, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
        limit = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        if total > limit:
            return _failed(chain, status_at, VIRTIO_BLK_S_IOERR, f"{what} of {total} sectors, more than {limit}")
        return request

    def _execute(self, active: Activation, batch: Sequence[_Request]) -> None:
        """The batch's file IO, in ring order (a worker thread). Reads go straight into the
        guest's buffers (``_read_into_guest``)."""
        image = self.image
        count = len(batch)
        index = 0
        while index < count:
            if not active.current:
                # Reset since the batch was taken: the driver may already be writing the same
                # sectors through a new activation; a stale write landing after them would
                # undo theirs. (Reads would be dropped anyway.)
                return
            request = batch[index]
            index += 1
            kind = request.kind
            if kind == _DONE:
                continue
            if kind == VIRTIO_BLK_T_IN:
                # Reads of adjacent ranges, next to each other in the ring: one read for all.
                end = request.offset + request.length
                run = index
                buffers = len(request.chain.writable)
                while run < count and batch[run].kind == VIRTIO_BLK_T_IN and batch[run].offset == end \
                        and end + batch[run].length - request.offset <= MERGE_BYTES \
                        and buffers + len(batch[run].chain.writable) <= MERGE_BUFFERS:  # fmt: skip
                    end += batch[run].length
                    buffers += len(batch[run].chain.writable)
                    run += 1
                if run > index and self._read_into_guest(active, batch[index - 1 : run], request.offset):
                    index = run
                    continue
            try:
                if kind == VIRTIO_BLK_T_IN:
                    if not self._read_into_guest(active, (request,), request.offset, single=True):
                        return  # reset: nothing more of this batch
                elif kind == VIRTIO_BLK_T_OUT:
                    if request.payload is not None:
                        image.write(request.offset, request.payload)
                        request.payload = None
                elif kind == VIRTIO_BLK_T_FLUSH:
                    image.flush()
                elif kind == VIRTIO_BLK_T_DISCARD:
                    for offset, length, _unmap in request.extents:
                        image.discard(offset, length)
                else:
                    for offset, length, unmap in request.extents:
                        image.write_zeroes(offset, length, unmap=unmap)
                request.status = VIRTIO_BLK_S_OK
            except ImageError as exc:
                request.status, request.reason = VIRTIO_BLK_S_IOERR, str(exc)
            except Exception as exc:  # a bug of the image code: this request fails, loudly
                _log.exception("%s: request failed in %r", self.name, image)
                request.status, request.reason = VIRTIO_BLK_S_IOERR, repr(exc)
            written = self.written
            if written is not None and kind in _WRITES:  # after the write: a copy that read the range
                if kind == VIRTIO_BLK_T_OUT:  # before is sent again; one that reads it after, at worst twice
                    written.mark(request.offset, request.length)
                else:
                    for offset, length, _unmap in request.extents:
                        written.mark(offset, length)

    def _read_into_guest(self, active: Activation, run: Sequence[_Request], start: int, *,
                         single: bool = False) -> bool:  # fmt: skip
        """Read adjacent IN requests' data straight into their buffers (one scatter read) and
        mark them OK. False when it did not happen: the device was reset (nothing read), or --
        for a merged run -- the read failed, so that each is read alone and only the failing
        ones fail; a single request's failure raises ``ImageError``.

        The buffers are written without the device lock (a read may take milliseconds), so a
        reset must not hand them back to the driver while the read runs: a read starts only
        while the activation is current, counted in ``_reads_in_guest``, and ``reset_state``
        waits for that count to drop to zero -- the drain QEMU's reset does for in-flight
        requests."""
        views: list[memoryview] = []
        view = self._memory_view
        for request in run:
            left = request.length
            for gpa, size in request.chain.writable:
                if left <= 0:
                    break
                take = min(size, left)
                views.append(view(request.chain.memory, gpa, take))
                left -= take
        with self.lock:
            if not active.current:
                return False
            with self._drained:
                self._reads_in_guest += 1
        try:
            self.image.read_into(start, views)
        except Exception:
            if single:
                raise
            return False
        finally:
            views.clear()
            with self._drained:
                self._reads_in_guest -= 1
                if not self._reads_in_guest:
                    self._drained.notify_all()
        for request in run:
            request.written = request.length
            request.status = VIRTIO_BLK_S_OK
        return True

    @staticmethod
    def _memory_view(memory: GuestMemory, gpa: int, length: int) -> memoryview:
        return memory.view(gpa, length, write=True)

    def reset_state(self) -> None:
        """A reset waits for reads into guest buffers that are under way (``_read_into_guest``):
        once it returns, the device touches none of the driver's buffers."""
        with self._drained:
            while self._reads_in_guest:
                self._drained.wait()

    def _complete(self, active: Activation, batch: Sequence[_Request]) -> None:
        """Write the statuses (and GET_ID replies), return the chains, and interrupt at most
        once -- or drop the batch if the device was reset since it was taken.
        (``Activation.complete`` does one chain and checks for an interrupt each time; see
        the module docstring.)"""
        broken = None
        notify = False
        with self.lock:
            if not active.current:
                self.dropped += len(batch)
                return
            queue = active.queues[0]
            try:
                for request in batch:
                    chain = request.chain
                    written = request.written + (chain.write(request.reply) if request.reply else 0)
                    # The status is the last writable byte: the end of the last writable buffer.
                    gpa, size = chain.writable[-1]
                    chain.memory.write(gpa + size - 1, _STATUS[request.status])
                    queue.add_used(chain.head, written + 1)
                notify = queue.needs_notification()
            except VirtqueueError as exc:
                broken = f"queue 0: {exc}"
        if broken is not None:
            active.broken(broken)
            return
        if notify:
            active.interrupt(0)
        for request in batch:
            self.completed += 1
            if request.status != VIRTIO_BLK_S_OK:
                self._count_error(request)

    def _count_error(self, request: _Request) -> None:
        """Count a failed request; log the 1st, 2nd, 4th, 8th ... so a guest cannot flood the log."""
        if request.status == VIRTIO_BLK_S_UNSUPP:
            self.unsupp += 1
        else:
            self.ioerr += 1
        total = self.ioerr + self.unsupp
        if total & (total - 1) == 0:
            name = "UNSUPP" if request.status == VIRTIO_BLK_S_UNSUPP else "IOERR"
            _log.warning("%s: %s for %s (%d failed requests so far)", self.name, name, request.reason, total)


def _failed(chain: DescriptorChain, status_at: int, status: int, reason: str) -> _Request:
    request = _Request(chain, _DONE, status_at)
    request.status = status
    request.reason = reason
    return request


def _data_size(chain: DescriptorChain) -> int:
    """The data a chain would make the device hold (0 if it is too large to be served)."""
    size = max(chain.readable_len - HEADER.size, chain.writable_len - 1)
    return size if size <= MAX_REQUEST_BYTES else 0


def _gather(chain: DescriptorChain, skip: int) -> bytes:
    """A copy of the chain's device-readable bytes after the first ``skip``."""
    memory = chain.memory
    parts = []
    for gpa, length in chain.readable:
        if skip >= length:
            skip -= length
            continue
        parts.append(memory.view(gpa + skip, length - skip))
        skip = 0
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
