"""virtio-net without KVM and without root: the test plays the guest's driver on rings in a
``GuestMemory`` while ``NetDevice.serve`` runs under trio and asyncio, and the tap is one end
of an AF_UNIX SOCK_SEQPACKET socket pair -- one datagram per frame, vnet header first, as a
tap fd reads and writes them. (tests/kvm/test_tap.py runs the same device over a real tap.)"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable

import anyio
import pytest

import trivmm.net.tap
from tests.unit.virtio_driver import Layout
from trivmm.devices.virtio.constants import (
    AVAIL_IDX,
    AVAIL_RING,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from trivmm.devices.virtio.device import VIRTIO_F_VERSION_1, Activation, DeviceType
from trivmm.devices.virtio.net import (
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    HDR_SIZE,
    MAX_FRAME,
    OFFLOAD_FEATURES,
    RX,
    TX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    NetDevice,
)
from trivmm.devices.virtio.queue import SplitQueue, vring_need_event
from trivmm.errors import ConfigError
from trivmm.eventfd import EventFd
from trivmm.memory import GuestMemory
from trivmm.net import format_mac, parse_mac, random_mac
from trivmm.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, Tap

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
BASE_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
MRG = BASE_FEATURES | 1 << VIRTIO_NET_F_MRG_RXBUF
GUEST_MAC = bytes.fromhex("020000000001")
HOST_MAC = bytes.fromhex("020000000002")
FILL = 0xAA  # what rx buffers hold before the device writes them


def frame(payload: bytes | int, dst: bytes = GUEST_MAC, src: bytes = HOST_MAC, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame (ethertype 0x88B5: local experimental) with ``payload`` (or that many
    bytes of a counting pattern)."""
    body = bytes(i & 0xFF for i in range(payload)) if isinstance(payload, int) else payload
    return dst + src + struct.pack(">H", ethertype) + body


def vnet_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
             csum_offset: int = 0, num_buffers: int = 0) -> bytes:  # fmt: skip
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


class NetRing:
    """The driver's side of one queue: chains of buffers of any size (a bump allocator in a
    data area of its own), published with Linux's notification rules, read back from the
    used ring."""

    def __init__(self, memory: GuestMemory, base: int, data: tuple[int, int], size: int, event_idx: bool) -> None:
        self.memory, self.layout, self.event_idx = memory, Layout.packed(size, base), event_idx
        assert self.layout.data_addr <= data[0]
        self.queue = SplitQueue(memory, max_size=size)
        self.queue.desc_addr, self.queue.avail_addr = self.layout.desc_addr, self.layout.avail_addr
        self.queue.used_addr, self.queue.event_idx = self.layout.used_addr, event_idx
        self.queue.size = size
        self.queue.set_ready(True)
        self.free = list(range(size))
        self.cursor, self.data_end = data[0], data[0] + data[1]
        self.avail_idx = self.last_used = 0
        self.pending = 0
        self.chains: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}  # head -> descriptors, writable

    def _alloc(self, length: int) -> int:
        addr = self.cursor
        self.cursor += (length + 15) & ~15
        assert self.cursor <= self.data_end, "the test's data area is full"
        return addr

    def add(self, readable: Iterable[bytes] = (), writable: Iterable[int] = ()) -> int:
        """A chain of ``readable`` buffers (their bytes) then ``writable`` ones (their sizes,
        filled with FILL); returns its head. Not visible to the device until ``publish``."""
        entries = []
        for data in readable:
            addr = self._alloc(len(data))
            self.memory.write(addr, data)
            entries.append((addr, len(data), 0))
        writable_buffers = []
        for length in writable:
            addr = self._alloc(length)
            self.memory.fill(addr, length, FILL)
            entries.append((addr, length, VIRTQ_DESC_F_WRITE))
            writable_buffers.append((addr, length))
        descriptors = [self.free.pop() for _ in entries]
        for i, (addr, length, flags) in enumerate(entries):
            more = i + 1 < len(entries)
            self.memory.write(self.layout.desc_addr + 16 * descriptors[i],
                              DESC.pack(addr, length, flags | (VIRTQ_DESC_F_NEXT if more else 0),
                                        descriptors[i + 1] if more else 0))  # fmt: skip
        slot = (self.avail_idx + self.pending) % self.layout.size
        self.memory.write_u16(self.layout.avail_addr + AVAIL_RING + 2 * slot, descriptors[0])
        self.pending += 1
        self.chains[descriptors[0]] = (descriptors, writable_buffers)
        return descriptors[0]

    def publish(self) -> bool:
        """Expose the chains added; whether the driver notifies (as Linux decides)."""
        old = self.avail_idx
        self.avail_idx, self.pending = (old + self.pending) & 0xFFFF, 0
        self.memory.write_u16(self.layout.avail_addr + AVAIL_IDX, self.avail_idx)
        if self.avail_idx == old:
            return False
        if self.event_idx:
            return vring_need_event(self.memory.read_u16(self.layout.avail_event_addr), self.avail_idx, old)
        return not self.memory.read_u16(self.layout.used_addr + USED_FLAGS) & VIRTQ_USED_F_NO_NOTIFY

    def used_idx(self) -> int:
        return self.memory.read_u16(self.layout.used_addr + USED_IDX)

    def collect(self) -> list[tuple[int, int, bytes]]:
        """Every used entry since the last call: (head, length written, those bytes)."""
        done = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.layout.size
            head, length = USED_ELEM.unpack(self.memory.read(self.layout.used_addr + USED_RING + 8 * slot, 8))
            descriptors, writable = self.chains.pop(head)
            assert length <= sum(n for _, n in writable)
            data = b"".join(self.memory.read(addr, n) for addr, n in writable)
            self.free.extend(descriptors)
            done.append((head, length, data[:length]))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return done


class FakeTap(Tap):
    """One end of a SOCK_SEQPACKET pair; ``host`` is the other (the kernel's side)."""

    def __init__(self, refuse_offload: bool = False) -> None:
        ours, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.host.setblocking(False)
        super().__init__(ours.detach(), "fake0")
        self.refuse_offload = refuse_offload
        self.offloads: list[int] = []

    def set_offload(self, flags: int) -> None:
        if self.refuse_offload:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.offload = flags
        self.offloads.append(flags)

    def send(self, *frames: bytes, header: bytes = vnet_hdr(num_buffers=0x5A5A)) -> None:
        """The host sends frames (the kernel leaves num_buffers as it finds it: garbage here)."""
        for data in frames:
            self.host.send(header + data)

    async def receive(self) -> bytes:
        with anyio.fail_after(5):
            while True:
                try:
                    return self.host.recv(1 << 18)
                except BlockingIOError:
                    await anyio.wait_readable(self.host)

    def nothing_sent(self) -> bool:
        try:
            self.host.recv(1 << 18)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        super().close()
        self.host.close()


class Bench:
    """A device, its two rings and an activation, as the transport would set them up."""

    def __init__(self, device: NetDevice, features: int = MRG, *, size: int = 16, event_idx: bool = False) -> None:
        self.device = device
        self.memory = GuestMemory.from_ranges([(0, 40 << 20)])
        self.rx = NetRing(self.memory, 0x1000, (4 << 20, 16 << 20), size, event_idx)
        self.tx = NetRing(self.memory, 0x10000, (20 << 20, 16 << 20), size, event_idx)
        with device.lock:
            device.negotiated(features)
        self.notifiers = [EventFd(), EventFd()]
        self.interrupts: list[int] = []
        self.broken: list[str] = []
        self.active = Activation(device, device.generation, [self.rx.queue, self.tx.queue], self.notifiers,
                                 self.interrupts.append, self.broken.append)  # fmt: skip

    def kick(self, index: int) -> None:
        """Publish what was added to queue ``index``; notify the device if the driver would."""
        if (self.rx, self.tx)[index].publish():
            self.notifiers[index].signal()

    def reset(self) -> None:
        """What the transport's reset does first: a new generation, under the lock."""
        with self.device.lock:
            self.device.generation += 1
            self.device.reset_state()

    def run(self, backend: str, scenario: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.device.serve, self.active)
                    await scenario()
                    tg.cancel_scope.cancel()

        try:
            anyio.run(main, backend=backend)
        finally:
            for notifier in self.notifiers:
                notifier.close()
            self.device.close()


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


async def settle() -> None:
    """Give the backend time to do whatever it would wrongly do."""
    await anyio.sleep(0.05)


# --- configuration -------------------------------------------------------------------------------
def test_identity_features_and_config() -> None:
    tap = FakeTap()
    device = NetDevice(tap, GUEST_MAC)
    assert device.device_type == DeviceType.NET == 1 and device.queue_sizes == (256, 256)
    assert device.device_features == 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF
    data = bytearray(12)
    device.read_config(0, memoryview(data))
    assert data == GUEST_MAC + struct.pack("<H", VIRTIO_NET_S_LINK_UP) + bytes(4)  # no MQ, no MTU: zeros
    device.write_config(0, memoryview(bytearray(6)))  # the MAC is read-only
    device.read_config(0, memoryview(data))
    assert data[:6] == GUEST_MAC
    assert not NetDevice(FakeTap(), mergeable=False).device_features & 1 << VIRTIO_NET_F_MRG_RXBUF
    # No offloads unless asked: the tap is left with none.
    assert tap.offloads == [] and not device.device_features & OFFLOAD_FEATURES


def test_random_mac_is_local_unicast() -> None:
    macs = {NetDevice(FakeTap()).mac for _ in range(8)}
    assert len(macs) == 8
    for mac in macs:
        assert len(mac) == 6 and mac[0] == 0x02  # locally administered, unicast
    assert random_mac()[0] == 0x02


def test_mac_parsing() -> None:
    assert parse_mac("52:54:00:AB:cd:01") == bytes.fromhex("525400abcd01")
    assert format_mac(bytes.fromhex("525400abcd01")) == "52:54:00:ab:cd:01"
    for bad in ("52:54:00:ab:cd", "52-54-00-ab-cd-01", "52:54:00:ab:cd:0g", "01:00:5e:00:00:01",
                "00:00:00:00:00:00", ""):  # fmt: skip
        with pytest.raises(ConfigError):
            parse_mac(bad)
    with pytest.raises(ValueError):
        NetDevice(FakeTap(), bytes.fromhex("010203040506"))


def test_tap_open_errors_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user sees when no tap can be had (the root-only cases: tests/kvm/test_tap.py)."""
    monkeypatch.setattr(trivmm.net.tap, "TUN_DEVICE", "/nonexistent/tun")
    with pytest.raises(ConfigError, match=r"^cannot open tap guest0: /nonexistent/tun: No such file or directory$"):
        Tap.open("guest0")
    monkeypatch.setattr(trivmm.net.tap, "TUN_DEVICE", os.devnull)
    with pytest.raises(ConfigError, match=r"^cannot open a new tap: /dev/null is not a tun device"):
        Tap.open()
    for bad in ("a/b", "x" * 16, "", "with space", "a:b", ".."):
        with pytest.raises(ConfigError, match="bad tap name"):
            Tap.open(bad)


def test_offloads_offered_and_set_as_negotiated() -> None:
    tap = FakeTap()
    device = NetDevice(tap, offload=True)
    assert device.device_features & OFFLOAD_FEATURES == OFFLOAD_FEATURES
    assert tap.offload == 0  # probed, then off until the guest accepts some
    with device.lock:
        device.negotiated(MRG | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)
    assert tap.offload == TUN_F_CSUM | TUN_F_TSO4
    with device.lock:
        device.negotiated(MRG | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4
                          | 1 << VIRTIO_NET_F_GUEST_TSO6 | 1 << VIRTIO_NET_F_GUEST_ECN)  # fmt: skip
    assert tap.offload == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    with device.lock:
        device.negotiated(MRG | 1 << VIRTIO_NET_F_GUEST_TSO4)  # TSO without GUEST_CSUM: nothing
    assert tap.offload == 0
    with device.lock:
        device.negotiated(MRG | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4)  # the guest's sends: no ioctl
    assert tap.offload == 0
    # A tap that refuses TUNSETOFFLOAD: no offload is offered (none could be done).
    assert not NetDevice(FakeTap(refuse_offload=True), offload=True).device_features & OFFLOAD_FEATURES


# --- transmit ------------------------------------------------------------------------------------
@BACKENDS
def test_tx_frames_reach_the_tap(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))
    frames = [frame(b"hello"), frame(1500), frame(46)]

    async def scenario() -> None:
        # One frame with its header and data in one buffer; one with the header split across
        # two buffers and the frame across three; one with the header alone first.
        bench.tx.add([bytes(HDR_SIZE) + frames[0]])
        bench.tx.add([bytes(5), bytes(7) + frames[1][:10], frames[1][10:700], frames[1][700:]])
        bench.tx.add([bytes(HDR_SIZE), frames[2]])
        bench.kick(TX)
        for expected in frames:
            assert await tap.receive() == bytes(HDR_SIZE) + expected
        await until(lambda: bench.tx.used_idx() == 3)
        assert [length for _, length, _ in bench.tx.collect()] == [0, 0, 0]
        assert bench.interrupts == [TX]  # one interrupt for the batch
        assert bench.device.stats.tx_frames == 3 and bench.device.stats.tx_bytes == sum(map(len, frames))
        assert bench.device.tx_drops.total == 0 and not bench.broken

    bench.run(backend, scenario)


@BACKENDS
def test_tx_waits_when_the_tap_is_full_and_sends_nothing_after_a_reset(backend: str) -> None:
    class FullTap(FakeTap):
        def __init__(self) -> None:
            super().__init__()
            self.full = True
            self.waiting = False
            self.room: anyio.Event | None = None

        def write_frame(self, parts: object) -> bool:
            return False if self.full else super().write_frame(parts)  # type: ignore[arg-type]

        async def wait_writable(self) -> None:
            self.waiting = True
            assert self.room is not None
            await self.room.wait()

    tap = FullTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))

    async def scenario() -> None:
        tap.room = anyio.Event()
        bench.tx.add([bytes(HDR_SIZE) + frame(100)])
        bench.kick(TX)
        await until(lambda: tap.waiting)
        assert tap.nothing_sent() and bench.tx.used_idx() == 0
        bench.reset()  # the driver takes its buffers back while the frame waits for room
        tap.full = False
        tap.room.set()
        await settle()
        assert tap.nothing_sent() and bench.tx.used_idx() == 0 and bench.device.stats.tx_frames == 0

    bench.run(backend, scenario)


@BACKENDS
def test_tx_malformed_and_oversize_frames_are_dropped_not_fatal(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))
    good = frame(64)

    async def scenario() -> None:
        bench.tx.add([], [64])  # writable only: no header
        bench.tx.add([bytes(8)])  # shorter than the header
        bench.tx.add([bytes(HDR_SIZE) + bytes(10)])  # shorter than an Ethernet header
        bench.tx.add([bytes(HDR_SIZE), bytes(MAX_FRAME + 1)])  # too long
        bench.tx.add([vnet_hdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6) + good])  # CSUM not negotiated
        bench.tx.add([vnet_hdr(gso_type=GSO_TCPV4, gso_size=1448) + good])  # HOST_TSO4 not negotiated
        bench.tx.add([bytes(HDR_SIZE), good], [16])  # a writable tail is ignored
        bench.tx.add([bytes(HDR_SIZE), bytes(MAX_FRAME - len(good)) + good])  # the longest frame allowed
        bench.kick(TX)
        assert await tap.receive() == bytes(HDR_SIZE) + good
        assert await tap.receive() == bytes(HDR_SIZE) + bytes(MAX_FRAME - len(good)) + good
        await until(lambda: bench.tx.used_idx() == 8)
        assert [length for _, length, _ in bench.tx.collect()] == [0] * 8  # every chain returned
        drops = bench.device.tx_drops
        assert drops.total == 6 and dict(drops.by_reason) == {"short": 3, "too-long": 1, "offload": 2}
        assert not bench.broken and tap.nothing_sent()

    bench.run(backend, scenario)


@BACKENDS
def test_tx_offload_headers_pass_when_negotiated(backend: str) -> None:
    tap = FakeTap()
    device = NetDevice(tap, GUEST_MAC, offload=True)
    bench = Bench(device, MRG | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4)
    csum = vnet_hdr(flags=HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID, csum_start=34, csum_offset=6, num_buffers=7)
    tso = vnet_hdr(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=54, gso_size=1448, csum_start=34,
                   csum_offset=16)  # fmt: skip

    async def scenario() -> None:
        bench.tx.add([csum + frame(100)])
        bench.tx.add([tso + frame(3000)])
        bench.tx.add([vnet_hdr(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV6) + frame(100)])  # no HOST_TSO6
        bench.tx.add([vnet_hdr(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV4 | GSO_ECN) + frame(100)])  # no HOST_ECN
        bench.kick(TX)
        # DATA_VALID (not for tx) and num_buffers are cleared; the rest passes as the guest wrote it.
        assert await tap.receive() == vnet_hdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6) + frame(100)
        assert await tap.receive() == tso + frame(3000)
        await until(lambda: bench.tx.used_idx() == 4)
        assert dict(device.tx_drops.by_reason) == {"offload": 2} and tap.nothing_sent()

    bench.run(backend, scenario)


@BACKENDS
def test_tx_tap_errors_are_counted(backend: str) -> None:
    class DownTap(FakeTap):
        def write_frame(self, parts: object) -> bool:
            raise OSError(errno.EIO, "Input/output error")

    tap = DownTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))

    async def scenario() -> None:
        for _ in range(3):
            bench.tx.add([bytes(HDR_SIZE) + frame(50)])
        bench.kick(TX)
        await until(lambda: bench.tx.used_idx() == 3)
        assert dict(bench.device.tx_drops.by_reason) == {"tap-error": 3} and not bench.broken

    bench.run(backend, scenario)


# --- receive -------------------------------------------------------------------------------------
@BACKENDS
@pytest.mark.parametrize("features", [MRG, BASE_FEATURES], ids=["mergeable", "one-chain"])
def test_rx_frames_reach_guest_buffers(backend: str, features: int) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), features)
    frames = [frame(b"x" * 50), frame(1500), frame(46)]

    async def scenario() -> None:
        for _ in range(4):
            bench.rx.add([], [HDR_SIZE + 1518])  # Linux's "small buffers" size
        bench.kick(RX)
        # DATA_VALID from the kernel: cleared (GUEST_CSUM not negotiated): the header is zero.
        tap.send(*frames, header=vnet_hdr(flags=HDR_F_DATA_VALID, num_buffers=0x5A5A))
        await until(lambda: bench.rx.used_idx() == 3)
        done = bench.rx.collect()
        assert [data for _, _, data in done] == [vnet_hdr(num_buffers=1) + f for f in frames]
        assert [length for _, length, _ in done] == [HDR_SIZE + len(f) for f in frames]
        stats = bench.device.stats
        assert stats.rx_frames == 3 and stats.rx_bytes == sum(map(len, frames))
        assert bench.interrupts == [RX]  # the three frames came in one batch
        assert bench.device.rx_drops.total == 0 and not bench.broken

    bench.run(backend, scenario)


@BACKENDS
def test_rx_without_buffers_leaves_frames_in_the_tap(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), BASE_FEATURES)
    frames = [frame(i * 10) for i in range(1, 21)]

    async def scenario() -> None:
        tap.send(*frames)
        await settle()
        assert bench.device.stats.rx_frames == 0 and bench.device.rx_drops.total == 0
        received: list[bytes] = []
        for batch in (3, 5, 12):  # the driver posts a few buffers at a time
            for _ in range(batch):
                bench.rx.add([], [2048])
            bench.kick(RX)
            expected = len(received) + batch
            await until(lambda: bench.rx.used_idx() == expected)  # noqa: B023
            await settle()
            received += [data[HDR_SIZE:] for _, _, data in bench.rx.collect()]
            assert len(received) == expected  # exactly one frame per buffer, no more
        assert received == frames  # none lost, in order
        assert bench.device.rx_drops.total == 0

    bench.run(backend, scenario)


@BACKENDS
def test_rx_merges_buffers_for_a_long_frame(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), MRG)
    long = frame(1500)  # 1514 bytes + 12: three 512-byte buffers
    after = frame(20)

    async def scenario() -> None:
        bench.rx.add([], [512])
        bench.rx.add([], [512])
        bench.kick(RX)
        tap.send(long, after)
        await settle()
        assert bench.rx.used_idx() == 0  # held until the driver posts enough buffers: not dropped
        bench.rx.add([], [256, 256])  # a chain of two buffers
        bench.rx.add([], [512])
        bench.kick(RX)
        await until(lambda: bench.rx.used_idx() == 4)
        done = bench.rx.collect()
        assert [length for _, length, _ in done] == [512, 512, 502, HDR_SIZE + len(after)]
        data = b"".join(part for _, _, part in done[:3])
        assert data == vnet_hdr(num_buffers=3) + long
        assert done[3][2] == vnet_hdr(num_buffers=1) + after
        assert bench.device.rx_drops.total == 0 and not bench.broken

    bench.run(backend, scenario)


@BACKENDS
def test_rx_oversize_frames_are_dropped_and_counted(backend: str, caplog: pytest.LogCaptureFixture) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), BASE_FEATURES)

    async def scenario() -> None:
        bench.rx.add([], [HDR_SIZE + 1518])
        bench.kick(RX)
        # Longer than the chain (no merging negotiated), longer than any frame may be, then one that fits.
        tap.send(frame(1600), frame(1600), frame(MAX_FRAME + 100), frame(100))
        await until(lambda: bench.rx.used_idx() == 1)
        [(_, _, data)] = bench.rx.collect()
        assert data == vnet_hdr(num_buffers=1) + frame(100)  # the chain waited for a frame that fits
        drops = bench.device.rx_drops
        assert drops.total == 3 and dict(drops.by_reason) == {"no-room": 2, "too-long": 1}

    with caplog.at_level(logging.WARNING, "trivmm.devices.virtio.net"):
        bench.run(backend, scenario)
    # Logged at the 1st and 2nd drop, not the 3rd.
    logged = [r.getMessage().split(" (")[0] for r in caplog.records]
    assert logged == [f"virtio-net fake0 rx: dropped {n} frame(s) so far" for n in (1, 2)]


@BACKENDS
def test_rx_mergeable_frame_longer_than_the_whole_ring_is_dropped(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), MRG, size=4)

    async def scenario() -> None:
        for _ in range(4):
            bench.rx.add([], [256])  # 1 KiB in all: never enough for 1500 bytes
        bench.kick(RX)
        tap.send(frame(1500), frame(100))
        await until(lambda: bench.rx.used_idx() == 1)
        [(_, _, data)] = bench.rx.collect()
        assert data == vnet_hdr(num_buffers=1) + frame(100)
        assert dict(bench.device.rx_drops.by_reason) == {"no-room": 1}

    bench.run(backend, scenario)


@BACKENDS
def test_rx_buffers_too_short_for_the_header_are_returned_unused(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), MRG)

    async def scenario() -> None:
        bench.rx.add([bytes(100)])  # device-readable only
        bench.rx.add([], [8])  # shorter than the header
        bench.rx.add([bytes(4)], [2048])  # a readable head: ignored, the writable part is used
        bench.kick(RX)
        await until(lambda: bench.rx.used_idx() == 2)
        assert [length for _, length, _ in bench.rx.collect()] == [0, 0]
        tap.send(frame(60))
        await until(lambda: bench.rx.used_idx() == 3)
        [(_, length, data)] = bench.rx.collect()
        assert data == vnet_hdr(num_buffers=1) + frame(60) and length == HDR_SIZE + len(frame(60))
        assert bench.device.rx_bad_buffers == 2 and not bench.broken

    bench.run(backend, scenario)


@BACKENDS
def test_rx_short_frames_from_the_tap_are_dropped(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))

    async def scenario() -> None:
        bench.rx.add([], [2048])
        bench.kick(RX)
        tap.host.send(bytes(5))  # not even a header
        tap.send(bytes(10))  # a header and less than an Ethernet header
        tap.send(frame(0))
        await until(lambda: bench.rx.used_idx() == 1)
        assert dict(bench.device.rx_drops.by_reason) == {"short": 2}

    bench.run(backend, scenario)


@BACKENDS
def test_rx_offload_headers(backend: str) -> None:
    tap = FakeTap()
    device = NetDevice(tap, GUEST_MAC, offload=True)
    partial = vnet_hdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    tso4 = vnet_hdr(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=66, gso_size=1448, csum_start=34,
                    csum_offset=16)  # fmt: skip
    tso6 = vnet_hdr(flags=HDR_F_NEEDS_CSUM, gso_type=GSO_TCPV6, hdr_len=86, gso_size=1428, csum_start=54,
                    csum_offset=16)  # fmt: skip
    bench = Bench(device, MRG | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4)

    async def scenario() -> None:
        for _ in range(8):
            bench.rx.add([], [4096])
        bench.kick(RX)
        tap.send(frame(100), header=partial)
        tap.send(frame(6000), header=tso4)
        tap.send(frame(6000), header=tso6)  # GUEST_TSO6 not accepted: dropped
        tap.send(frame(100), header=vnet_hdr(flags=HDR_F_DATA_VALID | 4))  # unknown flag bits cleared
        await until(lambda: bench.rx.used_idx() == 4)
        done = bench.rx.collect()
        assert done[0][2] == partial[:10] + b"\1\0" + frame(100)
        assert b"".join(data for _, _, data in done[1:3]) == tso4[:10] + b"\2\0" + frame(6000)
        assert done[3][2] == vnet_hdr(flags=HDR_F_DATA_VALID, num_buffers=1) + frame(100)
        assert dict(device.rx_drops.by_reason) == {"offload": 1}

    bench.run(backend, scenario)


@BACKENDS
def test_rx_without_guest_csum_drops_partial_checksums(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC, offload=True), MRG)  # offered, not accepted

    async def scenario() -> None:
        bench.rx.add([], [2048])
        bench.kick(RX)
        tap.send(frame(100), header=vnet_hdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
        tap.send(frame(100), header=vnet_hdr(gso_type=GSO_TCPV4, gso_size=1448))
        tap.send(frame(100), header=vnet_hdr(flags=HDR_F_DATA_VALID, hdr_len=3, csum_start=9))
        await until(lambda: bench.rx.used_idx() == 1)
        [(_, _, data)] = bench.rx.collect()
        assert data == vnet_hdr(num_buffers=1) + frame(100)  # the header entirely zero
        assert dict(bench.device.rx_drops.by_reason) == {"offload": 2}

    bench.run(backend, scenario)


@BACKENDS
@pytest.mark.parametrize("event_idx", [False, True])
def test_rx_interrupts_are_batched_and_respect_suppression(backend: str, event_idx: bool) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), MRG, size=64, event_idx=event_idx)

    async def scenario() -> None:
        tap.send(*[frame(100)] * 40)
        for _ in range(64):
            bench.rx.add([], [2048])
        bench.kick(RX)
        await until(lambda: bench.rx.used_idx() == 40)
        await settle()
        assert bench.interrupts == [RX]
        # The driver turns interrupts off (NAPI polling): frames arrive, no interrupt.
        if event_idx:
            bench.memory.write_u16(bench.rx.layout.used_event_addr, (bench.rx.used_idx() - 1) & 0xFFFF)
        else:
            bench.memory.write_u16(bench.rx.layout.avail_addr, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
        tap.send(*[frame(100)] * 5)
        await until(lambda: bench.rx.used_idx() == 45)
        await settle()
        assert bench.interrupts == [RX]

    bench.run(backend, scenario)


# --- resets and broken rings -----------------------------------------------------------------------
@BACKENDS
def test_reset_mid_traffic_writes_nothing_after(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC), MRG)

    async def scenario() -> None:
        for _ in range(6):
            bench.rx.add([], [2048])
        bench.kick(RX)
        tap.send(frame(100), frame(200))
        await until(lambda: bench.rx.used_idx() == 2)
        bench.reset()
        bench.tx.add([bytes(HDR_SIZE) + frame(100)])  # the driver's own writes come before the snapshot
        bench.kick(TX)
        before = bench.memory.read(0, 40 << 20)
        tap.send(frame(300), frame(400))
        await settle()
        assert bench.memory.read(0, 40 << 20) == before  # not one byte of guest memory
        assert tap.nothing_sent() and bench.interrupts == [RX]
        assert bench.device.features == 0  # reset_state

    bench.run(backend, scenario)


@BACKENDS
def test_a_broken_ring_needs_reset(backend: str) -> None:
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))

    async def scenario() -> None:
        head = bench.tx.add([bytes(HDR_SIZE) + frame(60)])
        # The driver points the descriptor outside guest RAM: a ring violation, not a bad frame.
        bench.memory.write(bench.tx.layout.desc_addr + 16 * head, DESC.pack(1 << 40, 74, 0, 0))
        bench.kick(TX)
        await until(lambda: bool(bench.broken))
        assert "queue 1" in bench.broken[0] and "not inside guest RAM" in bench.broken[0]
        assert tap.nothing_sent()

    bench.run(backend, scenario)


@BACKENDS
def test_tap_closed_under_the_backend(backend: str) -> None:
    """The VM closes the tap after cancelling the backend; if it went the other way round the
    waiting task gets ClosedResourceError (a backend failure the transport reports)."""
    tap = FakeTap()
    bench = Bench(NetDevice(tap, GUEST_MAC))

    async def main() -> None:
        bench.rx.add([], [2048])
        bench.kick(RX)
        caught: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(bench.device.serve, bench.active)
                await settle()
                tap.close()
        except BaseException as exc:  # an ExceptionGroup (nested) on either loop
            caught = exc
        while isinstance(caught, BaseExceptionGroup) and len(caught.exceptions) == 1:
            caught = caught.exceptions[0]
        assert isinstance(caught, anyio.ClosedResourceError), repr(caught)

    try:
        anyio.run(main, backend=backend)
    finally:
        for notifier in bench.notifiers:
            notifier.close()
