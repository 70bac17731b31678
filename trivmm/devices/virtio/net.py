"""virtio-net (virtio 1.2 section 5.1) over a host tap device.

Two queues: receiveq (0) and transmitq (1); no control queue, no multiqueue. Every frame
on either queue is preceded by the 12-byte ``virtio_net_hdr_v1`` of a VERSION_1 device,
and the tap (``trivmm.net.tap``) speaks that same header, so a frame moves between a ring
and the tap in one ``readv``/``writev`` plus one copy into guest memory.

Features offered, and why:

* MAC (5): the address in the config space, the user's or a random locally-administered one;
* STATUS (16): the link is always up (the tap has carrier while we hold it open);
* MRG_RXBUF (15): the driver may post buffers smaller than a frame and the device merges as
  many as a frame needs, writing their count in ``num_buffers``. Linux then posts
  page-sized buffers instead of one 64 KiB "big packet" chain per frame, and no frame is
  too long for the guest's buffers (the fallback without it: one chain per frame, and a
  frame longer than the chain is dropped and counted). Off with ``mergeable=False``.
* with ``offload=True`` (off by default): CSUM, HOST_TSO4/6 and HOST_ECN (the guest sends
  frames with partial checksums and TSO super-frames: the host kernel finishes them, tun
  accepts such headers always) and GUEST_CSUM, GUEST_TSO4/6 and GUEST_ECN (the guest
  accepts them: TUNSETOFFLOAD enables exactly what it accepted, at FEATURES_OK). Offered
  only where the tap takes TUNSETOFFLOAD, so each is really done by someone.

Without the offloads the header is all zeros both ways (``num_buffers`` aside): a guest
frame whose header asks for a checksum or segmentation that was not negotiated is dropped,
and so is a frame from the tap that would need one (possible only for frames queued before
the guest turned an offload off); a DATA_VALID hint is cleared.

Dropped, counted (``rx_drops``/``tx_drops``, logged at the 1st, 2nd, 4th, ... drop) and
never a device reset: the contents of a chain are the guest's business, like a bad frame on
a wire -- a tx chain shorter than the header or than an Ethernet header, a frame longer than
``MAX_FRAME``, a header asking for an offload not negotiated, a frame the tap refuses (EIO
while the host's interface is down). An rx chain with fewer than 12 device-writable bytes
cannot hold even the header: it is returned unused (length 0, which Linux drops as a short
packet) and counted in ``rx_bad_buffers``. Breaking the ring itself (``VirtqueueError``)
is what sets DEVICE_NEEDS_RESET, as for every device.

Flow control: with no rx buffers posted, the backend stops reading the tap and waits for the
driver's rx notification: frames wait in the tap's queue (where the host kernel applies its
own limit), none is dropped here. Interrupts are batched: a queue's notification check
runs once per batch (before the backend waits, and every ``BATCH`` frames).

Resets follow ``device.py``: guest memory is written and chains are returned only under the
device lock while the activation is current; a tx frame is not sent once the device has
been reset (its buffers are the driver's again).

Snapshots (``device.py``): a quiesce cancels the backend. The tx task holds chains only
while the tap is full (the frames sent so far are returned first): those, and the rx
buffers taken and not filled (``active.held``), go back to the ring. An rx buffer taken
before one that went back unused (too short for the header) cannot be rewound past that
used one: it is returned empty instead (a driver drops it as a short frame; only a driver
posting such buffers meets this). A frame read from the tap and waiting for rx buffers is
dropped (``rx_drops``, "snapshot"), as a full NIC would. The device's section is its
configuration space; the MAC in it is taken on restore (the guest knows it, and a
destination configured without one made up another). The tap is the destination's (from
its configuration); the offloads the guest accepted are set on it again when the transport
restores the features (``negotiated``).
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import attrs

from trivmm.devices.virtio.device import Activation, DeviceState, DeviceType, VirtioDevice
from trivmm.devices.virtio.queue import DescriptorChain, VirtqueueError
from trivmm.net import random_mac
from trivmm.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_SIZE, Tap

__all__ = [
    "NetDevice", "NetStats", "FrameDrops", "RX", "TX", "HDR_SIZE", "MAX_FRAME", "BATCH",
    "VIRTIO_NET_F_CSUM", "VIRTIO_NET_F_GUEST_CSUM", "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO6", "VIRTIO_NET_F_GUEST_ECN", "VIRTIO_NET_F_HOST_TSO4", "VIRTIO_NET_F_HOST_TSO6",
    "VIRTIO_NET_F_HOST_ECN", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_NET_F_STATUS", "VIRTIO_NET_S_LINK_UP",
    "HDR_F_NEEDS_CSUM", "HDR_F_DATA_VALID", "GSO_NONE", "GSO_TCPV4", "GSO_UDP", "GSO_TCPV6", "GSO_ECN",
    "OFFLOAD_FEATURES",
]  # fmt: skip

_log = logging.getLogger(__name__)

RX, TX = 0, 1  # receiveq1, transmitq1
QUEUE_SIZE = 256
HDR_SIZE = VNET_HDR_SIZE  # struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers
ETH_HLEN = 14
MAX_FRAME = 65550  # the longest frame either way (a 64 KiB TSO frame with its Ethernet header, VLAN tag)
BATCH = 64  # frames (rx) or chains (tx) between notification checks and yields to the loop
IOV_MAX = 1024  # writev's limit on parts

# Feature bits (section 5.1.3).
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1

OFFLOAD_FEATURES = sum(1 << bit for bit in (
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN,
))  # fmt: skip

# The header's flags and gso_type (section 5.1.6).
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80
_NUM_BUFFERS = struct.Struct("<H")
_NUM_BUFFERS_OFFSET = 10
_ZERO_HDR = bytes(HDR_SIZE)


def _has(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


class FrameDrops:
    """Frames dropped in one direction, by reason; logged when the total reaches 1, 2, 4, 8 ..."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self.by_reason: collections.Counter[str] = collections.Counter()

    def add(self, reason: str, detail: str = "") -> None:
        self.by_reason[reason] += 1
        self.total += 1
        if self.total & (self.total - 1) == 0:
            _log.warning("%s: dropped %d frame(s) so far (the latest: %s)", self.what, self.total,
                         f"{reason}: {detail}" if detail else reason)  # fmt: skip


@attrs.define
class NetStats:
    """Frames and bytes (headers not counted) that went through, either way."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0


class NetDevice(VirtioDevice):
    """A virtio-net NIC whose wire is ``tap`` (the device owns it from now on: ``close()``)."""

    device_type = DeviceType.NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    name = "virtio-net"

    def __init__(self, tap: Tap, mac: bytes | None = None, *, offload: bool = False, mergeable: bool = True) -> None:
        super().__init__()
        if mac is not None and (len(mac) != 6 or mac[0] & 1):
            raise ValueError(f"a NIC's MAC address is 6 bytes, unicast: not {bytes(mac).hex(':')}")
        self.tap = tap
        self.mac = random_mac() if mac is None else bytes(mac)
        self.name = f"virtio-net {tap.name}"
        features = 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
        if mergeable:
            features |= 1 << VIRTIO_NET_F_MRG_RXBUF
        if offload and self._tap_offloads():
            features |= OFFLOAD_FEATURES
        self.device_features = features
        # struct virtio_net_config: mac[6], status; max_virtqueue_pairs and mtu exist only with
        # MQ and MTU (not offered): reads beyond the end are zeros.
        self.config = bytearray(self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP))
        self.features = 0  # what the driver accepted (FEATURES_OK); 0 after a reset
        self.stats = NetStats()
        self.rx_drops = FrameDrops(f"{self.name} rx")
        self.tx_drops = FrameDrops(f"{self.name} tx")
        self.rx_bad_buffers = 0  # rx chains returned unused: too short for the header
        # Snapshots (the loop's thread): the newest rx chain taken before one returned unused
        # (a quiesce cannot rewind it), and the size of a frame waiting for rx buffers.
        self._rx_pin: DescriptorChain | None = None
        self._rx_waiting = 0

    def _tap_offloads(self) -> bool:
        """Whether the tap takes every TUNSETOFFLOAD flag the offload features may need."""
        try:
            self.tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
            self.tap.set_offload(0)
        except OSError as exc:
            _log.info("%s: the tap refuses offloads (%s): not offered", self.name, exc.strerror)
            return False
        return True

    @staticmethod
    def tun_offload(features: int) -> int:
        """The TUN_F_* flags for the features a driver accepted: what the guest can receive."""
        if not _has(features, VIRTIO_NET_F_GUEST_CSUM):
            return 0
        flags = TUN_F_CSUM
        if _has(features, VIRTIO_NET_F_GUEST_TSO4):
            flags |= TUN_F_TSO4
        if _has(features, VIRTIO_NET_F_GUEST_TSO6):
            flags |= TUN_F_TSO6
        if flags & (TUN_F_TSO4 | TUN_F_TSO6) and _has(features, VIRTIO_NET_F_GUEST_ECN):
            flags |= TUN_F_TSO_ECN
        return flags

    # --- lifecycle (vCPU threads, under the lock) --------------------------------------------
    def negotiated(self, features: int) -> None:
        self.features = features
        wanted = self.tun_offload(features)
        if wanted != self.tap.offload:
            try:
                self.tap.set_offload(wanted)
            except OSError as exc:
                # Harmless: the guest only gets fewer offloaded frames than it accepted, and rx
                # drops whatever it did not accept.
                _log.warning("%s: TUNSETOFFLOAD %#x failed: %s", self.name, wanted, exc.strerror)

    def reset_state(self) -> None:
        self.features = 0

    def close(self) -> None:
        self.tap.close()

    # --- snapshots ------------------------------------------------------------------------------
    async def quiesce_backend(self, active: Activation, stop: Callable[[], Awaitable[None]]) -> None:
        await stop()
        if self._rx_waiting:
            self.rx_drops.add("snapshot", f"a {self._rx_waiting - HDR_SIZE}-byte frame waiting for rx buffers")
            self._rx_waiting = 0

    def return_held(self, active: Activation) -> None:
        """Rx chains taken before one that went back unused go back empty; the rest rewind."""
        held = active.held[RX]
        pin, self._rx_pin = self._rx_pin, None
        if pin is not None and any(chain is pin for chain in held):
            queue = active.queues[RX]
            while held:
                chain = held.popleft()
                queue.add_used(chain.head, 0)
                if chain is pin:
                    break
        super().return_held(active)

    def restore(self, state: DeviceState) -> None:
        """The saved MAC is taken; the rest of the configuration must be this device's."""
        saved = state.config
        mac = saved[:6] if len(saved) == len(self.config) and not saved[0] & 1 else None
        if mac is not None:
            state = attrs.evolve(state, config=bytes(self.config[:6]) + saved[6:])
        super().restore(state)
        if mac is not None and mac != self.mac:
            _log.info("%s: takes the MAC %s of the snapshot (was %s)", self.name, mac.hex(":"), self.mac.hex(":"))
            with self.lock:
                self.mac = mac
                self.config[:6] = mac

    # --- the backend ---------------------------------------------------------------------------
    async def serve(self, active: Activation) -> None:
        with self.lock:
            features = self.features
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._receive, active, features)
            tg.start_soon(self._transmit, active, features)

    # --- transmit ---------------------------------------------------------------------------
    async def _transmit(self, active: Activation, features: int) -> None:
        while True:
            chains = active.take_chains(TX, BATCH)
            if not chains:
                self._notify(active, TX)
                await active.wait_notified(TX)
                continue
            done: list[DescriptorChain] = []
            for chain in chains:
                if not active.current:
                    return  # reset: the buffers are the driver's again (and this task is cancelled)
                parts = self._tx_frame(chain, features)
                while parts is not None and active.current:
                    try:
                        if self.tap.write_frame(parts):
                            self.stats.tx_frames += 1
                            self.stats.tx_bytes += chain.readable_len - HDR_SIZE
                            break
                    except OSError as exc:
                        self.tx_drops.add("tap-error", f"{self.tap.name}: {exc.strerror}")
                        break
                    # The tap is full: give back what was sent, then wait for room.
                    self._return(active, TX, done)
                    self._notify(active, TX)
                    done = []
                    held = active.held[TX]  # this chain and the rest: a quiesce gives them back
                    held.extend(chains[next(i for i, c in enumerate(chains) if c is chain) :])
                    await self.tap.wait_writable()
                    held.clear()
                done.append(chain)
            self._return(active, TX, done)
            self._notify(active, TX)
            await anyio.lowlevel.checkpoint()

    def _tx_frame(self, chain: DescriptorChain, features: int) -> list[bytes | memoryview] | None:
        """The parts to write to the tap for ``chain`` (a checked header of our own, then
        views of the frame in guest memory), or None when the frame is dropped."""
        length = chain.readable_len - HDR_SIZE
        if length < ETH_HLEN:
            self.tx_drops.add("short", f"a chain of {chain.readable_len} readable bytes "
                              f"({len(chain.writable)} writable buffers)")  # fmt: skip
            return None
        if length > MAX_FRAME:
            self.tx_drops.add("too-long", f"a {length}-byte frame")
            return None
        header = self._tx_header(chain.read(HDR_SIZE), features)
        if header is None:
            return None
        parts: list[bytes | memoryview] = [header]
        skip = HDR_SIZE
        for gpa, size in chain.readable:
            if skip >= size:
                skip -= size
                continue
            parts.append(chain.memory.view(gpa + skip, size - skip))
            skip = 0
        if len(parts) > IOV_MAX:
            parts = [header, b"".join(parts[1:])]
        return parts

    def _tx_header(self, raw: bytes, features: int) -> bytes | None:
        """The header the kernel gets: the guest's, checked against what was negotiated (a
        copy: the guest cannot change it after the check), ``num_buffers`` zero."""
        flags, gso_type = raw[0], raw[1]
        if flags & HDR_F_NEEDS_CSUM and not _has(features, VIRTIO_NET_F_CSUM):
            self.tx_drops.add("offload", "NEEDS_CSUM without VIRTIO_NET_F_CSUM")
            return None
        allowed = {GSO_NONE}
        if _has(features, VIRTIO_NET_F_HOST_TSO4):
            allowed.add(GSO_TCPV4)
        if _has(features, VIRTIO_NET_F_HOST_TSO6):
            allowed.add(GSO_TCPV6)
        if gso_type & ~GSO_ECN not in allowed or (gso_type & GSO_ECN and not _has(features, VIRTIO_NET_F_HOST_ECN)):
            self.tx_drops.add("offload", f"gso_type {gso_type:#x} not negotiated")
            return None
        if not flags & HDR_F_NEEDS_CSUM and gso_type == GSO_NONE:
            return _ZERO_HDR
        return bytes([flags & HDR_F_NEEDS_CSUM]) + raw[1:10] + b"\0\0"

    # --- receive ----------------------------------------------------------------------------
    async def _receive(self, active: Activation, features: int) -> None:
        mergeable = _has(features, VIRTIO_NET_F_MRG_RXBUF)
        ring_size = active.queues[RX].size
        buffer = bytearray(HDR_SIZE + MAX_FRAME + 1)  # one byte more: a longer frame fills it
        view = memoryview(buffer)
        chains = active.held[RX]  # taken, not yet used
        self._rx_pin, self._rx_waiting = None, 0
        size = 0  # the frame read from the tap and not yet placed (header included), or 0
        budget = BATCH  # frames read from the tap before the next notification check and yield
        while True:
            if not size:
                if not chains and not self._refill(active, chains):
                    # No buffers: leave the frames in the tap until the driver posts some.
                    self._notify(active, RX)
                    budget = BATCH
                    await active.wait_notified(RX)
                    continue
                if not budget:  # a flood (delivered or dropped): interrupt, and let other tasks run
                    self._notify(active, RX)
                    budget = BATCH
                    await anyio.lowlevel.checkpoint()
                length = self.tap.read_into(buffer)
                if length is None:
                    self._notify(active, RX)
                    budget = BATCH
                    await self.tap.wait_readable()
                    continue
                budget -= 1
                size = self._rx_accept(view, length, features)
                if not size:
                    continue
            # Place the frame: one chain, or (merging) as many as it needs.
            count = self._chains_for(chains, size, mergeable)
            while not count and mergeable and self._refill(active, chains):
                count = self._chains_for(chains, size, mergeable)
            if not count:
                if mergeable and len(chains) < ring_size:
                    self._notify(active, RX)  # the driver may be waiting for used buffers to refill
                    budget = BATCH
                    self._rx_waiting = size  # what a quiesce now drops
                    await active.wait_notified(RX)
                    self._rx_waiting = 0
                    continue
                room = sum(chain.writable_len for chain in chains) if mergeable else chains[0].writable_len
                self.rx_drops.add("no-room", f"a {size - HDR_SIZE}-byte frame, {room} bytes of rx buffers")
                size = 0
                continue
            use = [chains.popleft() for _ in range(count)]
            if self._deliver(active, use, view[:size]):
                self.stats.rx_frames += 1
                self.stats.rx_bytes += size - HDR_SIZE
            size = 0

    def _rx_accept(self, view: memoryview, length: int, features: int) -> int:
        """Check the frame the tap gave (``length`` bytes of ``view``, header first) and put
        the header in the form the guest accepted; its length, or 0 when it is dropped."""
        if length > HDR_SIZE + MAX_FRAME:
            self.rx_drops.add("too-long", f"a frame of more than {MAX_FRAME} bytes from {self.tap.name}")
            return 0
        if length < HDR_SIZE + ETH_HLEN:
            self.rx_drops.add("short", f"{length} bytes from {self.tap.name}")
            return 0
        flags, gso_type = view[0], view[1]
        guest_csum = _has(features, VIRTIO_NET_F_GUEST_CSUM)
        allowed = {GSO_NONE}
        if _has(features, VIRTIO_NET_F_GUEST_TSO4):
            allowed.add(GSO_TCPV4)
        if _has(features, VIRTIO_NET_F_GUEST_TSO6):
            allowed.add(GSO_TCPV6)
        if gso_type & ~GSO_ECN not in allowed or (gso_type & GSO_ECN and not _has(features, VIRTIO_NET_F_GUEST_ECN)):
            self.rx_drops.add("offload", f"gso_type {gso_type:#x} the guest did not accept")
            return 0
        if flags & HDR_F_NEEDS_CSUM and not guest_csum:
            self.rx_drops.add("offload", "a partial checksum the guest did not accept")
            return 0
        if guest_csum:
            view[0] = flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID)
        else:
            view[:_NUM_BUFFERS_OFFSET] = _ZERO_HDR[:_NUM_BUFFERS_OFFSET]  # flags 0 (section 5.1.6.4.1)
        return length

    @staticmethod
    def _chains_for(chains: collections.deque[DescriptorChain], size: int, mergeable: bool) -> int:
        """How many of ``chains`` (from the first) hold ``size`` bytes; 0 when they do not."""
        if not chains:
            return 0
        if not mergeable:
            return 1 if chains[0].writable_len >= size else 0
        room = 0
        for count, chain in enumerate(chains, 1):
            room += chain.writable_len
            if room >= size:
                return count
        return 0

    def _refill(self, active: Activation, chains: collections.deque[DescriptorChain]) -> bool:
        """Take the rx chains the driver posted; whether any usable one came. A chain that
        cannot hold the header goes straight back, unused."""
        # Bounded (a whole ring's worth, and one more batch): a driver may post bad chains as
        # fast as they come back; what it posts after this pass comes with a notification.
        for _ in range(active.queues[RX].size // BATCH + 2):
            taken = active.take_chains(RX, BATCH)
            if not taken:
                break
            bad = [chain for chain in taken if chain.writable_len < HDR_SIZE]
            if bad:
                self.rx_bad_buffers += len(bad)
                if self.rx_bad_buffers & (self.rx_bad_buffers - 1) == 0:
                    _log.warning("%s: %d rx buffer(s) too short for the %d-byte header so far: returned unused",
                                 self.name, self.rx_bad_buffers, HDR_SIZE)  # fmt: skip
                self._return(active, RX, bad)
                # A used chain now follows those taken before it: a quiesce cannot rewind them.
                last_bad = max(i for i, chain in enumerate(taken) if chain.writable_len < HDR_SIZE)
                before = [chain for chain in taken[:last_bad] if chain.writable_len >= HDR_SIZE]
                self._rx_pin = before[-1] if before else chains[-1] if chains else None
            good = [chain for chain in taken if chain.writable_len >= HDR_SIZE]
            if good:
                chains.extend(good)
                return True
        return False

    def _deliver(self, active: Activation, use: list[DescriptorChain], frame: memoryview) -> bool:
        """Write ``frame`` (header first) across ``use`` and return them to the driver, under the
        lock and only while the activation is current."""
        _NUM_BUFFERS.pack_into(frame, _NUM_BUFFERS_OFFSET, len(use))
        with self.lock:
            if not active.current:
                return False
            queue = active.queues[RX]
            try:
                offset = 0
                for chain in use:
                    written = chain.write(frame[offset : offset + chain.writable_len])
                    queue.add_used(chain.head, written)
                    offset += written
                return True
            except VirtqueueError as exc:
                reason = str(exc)
        active.broken(f"queue {RX}: {reason}")
        return False

    # --- both -----------------------------------------------------------------------------------
    def _return(self, active: Activation, index: int, chains: list[DescriptorChain]) -> None:
        """Give ``chains`` back with nothing written (no interrupt: see ``_notify``)."""
        if not chains:
            return
        with self.lock:
            if not active.current:
                return
            try:
                for chain in chains:
                    active.queues[index].add_used(chain.head, 0)
                return
            except VirtqueueError as exc:
                reason = str(exc)
        active.broken(f"queue {index}: {reason}")

    def _notify(self, active: Activation, index: int) -> None:
        """Interrupt the driver if it wants to hear of the chains used since the last check:
        once per batch."""
        active.notify_used(index)
