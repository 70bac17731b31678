"""virtio-vsock (trivmm/devices/virtio/vsock.py) without KVM, under trio and asyncio.

The test plays the guest: guest RAM, three split virtqueues and an ``Activation`` built by
hand, and a model driver (``Guest``, ``GuestConn``) that speaks the vsock protocol over the
rings as Linux's virtio_transport does -- rx buffers of a 44-byte header and 4 KiB of
payload, tx packets of a header and a payload, credit updates when half its buffer was
consumed. The host side is real unix sockets in ``tmp_path``. Every packet the guest gets
is checked as it arrives: well-formed, addressed to the guest, and (for data) within the
credit the guest advertised.

Hypothesis: ``test_random_guest_packets`` runs 30 examples per event loop (60 in all), each
a fresh device fed 1 to 8 arbitrary packets.
"""

from __future__ import annotations

import functools
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trivmm.devices.virtio.constants import (
    AVAIL_IDX,
    AVAIL_RING,
    USED_IDX,
    USED_RING,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    used_ring_size,
)
from trivmm.devices.virtio.device import Activation, DeviceType
from trivmm.devices.virtio.queue import SplitQueue
from trivmm.devices.virtio.vsock import LOCAL_PORT_BASE, VsockDevice
from trivmm.errors import ConfigError
from trivmm.eventfd import EventFd
from trivmm.memory import GuestMemory

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])

# The wire format, written out here independently of the device's module.
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = 44
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
RCV, SEND = 1, 2
STREAM = 1
HOST = 2
CID = 3
RX, TX, EVENT = 0, 1, 2

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
SLOT = 8192  # bytes of guest RAM each descriptor of a test ring owns
RAM_SIZE = 4 << 20


@attrs.frozen
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    data: bytes = b""

    @classmethod
    def parse(cls, raw: bytes) -> Packet:
        src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = HDR.unpack(raw[:HDR_SIZE])
        return cls(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt, raw[HDR_SIZE:])


class Ring:
    """The driver's side of one split virtqueue (no event index): each descriptor owns the
    ``SLOT`` bytes at ``data + index * SLOT``. Its device side, ``queue``, is ready."""

    def __init__(self, memory: GuestMemory, base: int, size: int) -> None:
        self.memory, self.size = memory, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + avail_ring_size(size) + 3) & ~3
        self.data = (self.used + used_ring_size(size) + 0xFFF) & ~0xFFF
        self.end = self.data + size * SLOT
        self.free = list(range(size))
        self.outstanding: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
        self.avail_idx = self.last_used = 0
        self.queue = SplitQueue(memory, max_size=size)
        self.queue.size = size
        self.queue.desc_addr, self.queue.avail_addr, self.queue.used_addr = self.desc, self.avail, self.used
        self.queue.set_ready(True)

    def add(self, readable: Sequence[bytes], writable: Sequence[int]) -> int:
        """A chain of ``readable`` buffers (their bytes) then ``writable`` ones (their sizes)."""
        count = len(readable) + len(writable)
        descriptors = [self.free.pop() for _ in range(count)]
        parts: list[tuple[int, int, bool]] = []
        contents: list[bytes | int] = [*readable, *writable]
        for index, content in zip(descriptors, contents, strict=True):
            addr = self.data + index * SLOT
            if isinstance(content, bytes):
                assert len(content) <= SLOT
                self.memory.write(addr, content)
                parts.append((addr, len(content), False))
            else:
                assert content <= SLOT
                parts.append((addr, content, True))
        return self._publish(descriptors, parts)

    def add_raw(self, parts: Sequence[tuple[int, int, bool]]) -> int:
        """A chain of (address, length, device-writable) descriptors, anywhere."""
        return self._publish([self.free.pop() for _ in parts], list(parts))

    def _publish(self, descriptors: list[int], parts: list[tuple[int, int, bool]]) -> int:
        for i, (index, (addr, length, writable)) in enumerate(zip(descriptors, parts, strict=True)):
            more = i + 1 < len(parts)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if more else 0)
            self.memory.write(self.desc + 16 * index, DESC.pack(addr, length, flags, descriptors[i + 1] if more else 0))
        head = descriptors[0]
        self.memory.write_u16(self.avail + AVAIL_RING + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + AVAIL_IDX, self.avail_idx)
        self.outstanding[head] = (descriptors, [(a, n) for a, n, w in parts if w])
        return head

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + USED_IDX)

    def take_used(self) -> list[tuple[int, bytes]]:
        """(length written, the bytes written) of each chain the device returned."""
        done = []
        used = self.used_idx()
        while self.last_used != used:
            slot = self.last_used % self.size
            head, written = USED_ELEM.unpack(self.memory.read(self.used + USED_RING + 8 * slot, 8))
            descriptors, writable = self.outstanding.pop(head)
            assert written <= sum(n for _, n in writable)
            data = b"".join(self.memory.read(a, n) for a, n in writable)[:written]
            self.free.extend(descriptors)
            done.append((written, data))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return done


class Guest:
    """The guest's driver: rings, rx buffers kept posted, packets checked and routed to
    their ``GuestConn`` (or left in ``inbox``)."""

    def __init__(self, device: VsockDevice, *, ring_size: int = 64, rx_buffers: int = 32, rx_size: int = 4096) -> None:
        self.device = device
        self.memory = GuestMemory.from_ranges([(0, RAM_SIZE)])
        self.rx = Ring(self.memory, 0x1000, ring_size)
        self.tx = Ring(self.memory, self.rx.end, ring_size)
        self.event = Ring(self.memory, self.tx.end, 8)
        assert self.event.end <= RAM_SIZE
        self.notifiers = [EventFd() for _ in range(3)]
        self.broken: list[str] = []
        self.interrupts = 0
        self.activation = Activation(device, device.generation, [self.rx.queue, self.tx.queue, self.event.queue],
                                     self.notifiers, self._interrupt, self.broken.append)  # fmt: skip
        self.rx_size = rx_size
        self.refill = True
        self.empty_rx = 0  # rx buffers the device gave back empty
        self.inbox: list[Packet] = []
        self.conns: dict[tuple[int, int], GuestConn] = {}  # by (guest port, host port)
        self.rx_bytes: dict[tuple[int, int], int] = {}
        self.credit_limit: dict[tuple[int, int], int] = {}  # the most fwd_cnt + buf_alloc advertised
        self.post_rx(rx_buffers)
        for _ in range(4):
            self.event.add([], [4])

    def _interrupt(self, index: int) -> None:
        self.interrupts += 1

    def all_signalled(self) -> bool:
        """Whether the device checked for a notification after the last chain it used, on
        the rx and tx queues (it interrupts in batches: never leaving a used chain unsignalled
        while it waits)."""
        states = [self.rx.queue.save(), self.tx.queue.save()]
        return all(state.signalled_used == state.next_used for state in states)

    def close(self) -> None:
        for notifier in self.notifiers:
            notifier.close()
        self.memory.close()

    def post_rx(self, count: int, writable: Sequence[int] | None = None) -> None:
        for _ in range(count):
            self.rx.add([], list(writable) if writable is not None else [HDR_SIZE, self.rx_size])
        if count:
            self.notifiers[RX].signal()

    # --- sending -------------------------------------------------------------------------------
    def send_nowait(self, *, op: int, src_port: int, dst_port: int, data: bytes = b"", flags: int = 0,
                    buf_alloc: int = 0, fwd_cnt: int = 0, src_cid: int = CID, dst_cid: int = HOST,
                    type_: int = STREAM, length: int | None = None) -> None:  # fmt: skip
        self.reclaim_tx()
        header = HDR.pack(src_cid, dst_cid, src_port, dst_port, len(data) if length is None else length, type_, op,
                          flags, buf_alloc, fwd_cnt)  # fmt: skip
        self.tx.add([header, data] if data else [header], [])
        if src_cid == CID and dst_cid == HOST and type_ == STREAM:
            key = (src_port, dst_port)
            self.credit_limit[key] = max(self.credit_limit.get(key, 0), fwd_cnt + buf_alloc)
        self.notifiers[TX].signal()

    async def send(self, **fields: Any) -> None:
        await self.until(lambda: len(self.tx.free) >= 2)
        self.send_nowait(**fields)

    def reclaim_tx(self) -> None:
        for written, _ in self.tx.take_used():
            assert written == 0

    # --- receiving -----------------------------------------------------------------------------
    def poll(self) -> None:
        self.reclaim_tx()
        done = self.rx.take_used()
        for written, data in done:
            if written == 0:
                self.empty_rx += 1
                continue
            assert written >= HDR_SIZE, written
            packet = Packet.parse(data)
            assert written == HDR_SIZE + packet.len, packet
            assert packet.dst_cid == CID, packet
            if packet.op != RST:
                assert packet.src_cid == HOST and packet.type == STREAM, packet
            key = (packet.dst_port, packet.src_port)
            if packet.op == RW:
                self.rx_bytes[key] = self.rx_bytes.get(key, 0) + packet.len
                assert self.rx_bytes[key] <= self.credit_limit.get(key, 0), "the device sent more than its credit"
            conn = self.conns.get(key)
            if conn is not None:
                conn.on_packet(packet)
            else:
                self.inbox.append(packet)
        if self.refill and done:
            self.post_rx(len(done))
        for conn in list(self.conns.values()):
            conn.flush_credit()

    async def until(self, condition: Callable[[], object], timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while True:
                self.poll()
                if condition():
                    return
                await anyio.sleep(0.002)

    async def settle(self, duration: float = 0.05) -> None:
        with anyio.move_on_after(duration):
            while True:
                self.poll()
                await anyio.sleep(0.002)

    async def expect(self, op: int | None = None, **fields: int) -> Packet:
        """Wait for a packet (not for a GuestConn) with ``op`` and these field values."""
        found: list[Packet] = []

        def match() -> bool:
            for i, packet in enumerate(self.inbox):
                if (op is None or packet.op == op) and all(getattr(packet, k) == v for k, v in fields.items()):
                    found.append(self.inbox.pop(i))
                    return True
            return False

        await self.until(match)
        return found[0]

    def connect(self, guest_port: int, host_port: int, **kwargs: Any) -> GuestConn:
        """Ask the host for a connection (OP_REQUEST)."""
        conn = GuestConn(self, guest_port, host_port, **kwargs)
        conn.send_op(REQUEST)
        return conn

    def accept(self, request: Packet, **kwargs: Any) -> GuestConn:
        """Answer the device's OP_REQUEST with OP_RESPONSE."""
        assert request.op == REQUEST and request.src_cid == HOST
        conn = GuestConn(self, request.dst_port, request.src_port, **kwargs)
        conn.on_packet(request)
        conn.send_op(RESPONSE)
        return conn


class GuestConn:
    """One guest socket: its credit both ways, what it received, the control packets seen."""

    def __init__(self, guest: Guest, guest_port: int, host_port: int, *, buf_alloc: int = 64 * 1024,
                 auto_consume: bool = True) -> None:  # fmt: skip
        self.guest, self.guest_port, self.host_port = guest, guest_port, host_port
        self.buf_alloc = buf_alloc
        self.auto_consume = auto_consume
        self.fwd_cnt = self.last_fwd_sent = 0
        self.peer_buf_alloc = self.peer_fwd_cnt = self.tx_cnt = 0
        self.received = bytearray()
        self.ops: list[int] = []
        self.shutdown = 0
        self.reset = False
        self.owe_update = False
        guest.conns[(guest_port, host_port)] = self

    def on_packet(self, packet: Packet) -> None:
        self.ops.append(packet.op)
        self.peer_buf_alloc, self.peer_fwd_cnt = packet.buf_alloc, packet.fwd_cnt
        if packet.op == RW:
            self.received += packet.data
            if self.auto_consume:
                self.consume(packet.len)
        elif packet.op == SHUTDOWN:
            self.shutdown |= packet.flags
        elif packet.op == RST:
            self.reset = True

    def consume(self, count: int) -> None:
        """The application read ``count`` bytes: tell the device once half the buffer is free."""
        self.fwd_cnt += count
        if self.fwd_cnt - self.last_fwd_sent >= self.buf_alloc // 2:
            self.owe_update = True

    def flush_credit(self) -> None:
        if self.owe_update and len(self.guest.tx.free) >= 2 and not self.reset:
            self.owe_update = False
            self.send_op(CREDIT_UPDATE)

    def send_op(self, op: int, flags: int = 0, data: bytes = b"") -> None:
        self.guest.send_nowait(op=op, src_port=self.guest_port, dst_port=self.host_port, data=data, flags=flags,
                               buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt)  # fmt: skip
        self.last_fwd_sent = self.fwd_cnt
        if op == RW:
            self.tx_cnt += len(data)

    def credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    async def write(self, data: bytes, chunk: int = 4096) -> None:
        """Send ``data`` as the credit the device grants allows (never beyond it)."""
        view = memoryview(data)
        while view:
            await self.guest.until(lambda: (self.credit() > 0 and len(self.guest.tx.free) >= 2) or self.reset)
            assert not self.reset
            count = min(self.credit(), chunk, len(view))
            self.send_op(RW, data=bytes(view[:count]))
            view = view[count:]

    async def wait_op(self, op: int, timeout: float = 10.0) -> None:
        await self.guest.until(lambda: op in self.ops, timeout)

    async def read_exact(self, count: int, timeout: float = 10.0) -> bytes:
        await self.guest.until(lambda: len(self.received) >= count, timeout)
        return bytes(self.received[:count])


# --- the host's side ---------------------------------------------------------------------------
async def host_connect(uds: str, port: int) -> anyio.abc.SocketStream:
    stream = await anyio.connect_unix(uds)
    await stream.send(b"CONNECT %d\n" % port)
    return stream


async def read_line(stream: anyio.abc.ByteReceiveStream) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        line += await stream.receive(1)
    return line


async def recv_exact(stream: anyio.abc.ByteReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        data += await stream.receive(count - len(data))
    return bytes(data)


async def recv_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    data = bytearray()
    try:
        while True:
            data += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return bytes(data)


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(size))


Body = Callable[[VsockDevice, Guest], Awaitable[None]]


def run(backend: str, uds: str, body: Body, *, guest_options: dict[str, Any] | None = None, **options: Any) -> None:
    """A device on ``uds`` serving a fresh guest while ``body`` runs; then cancelled."""

    async def main() -> None:
        device = VsockDevice(CID, uds, **options)
        guest = Guest(device, **(guest_options or {}))
        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(device.serve, guest.activation)
                    await body(device, guest)
                    tg.cancel_scope.cancel()
        finally:
            device.close()
            guest.close()
        assert not guest.broken

    anyio.run(main, backend=backend)


@pytest.fixture
def uds(tmp_path: Path) -> str:
    return str(tmp_path / "v.sock")


# --- the device ------------------------------------------------------------------------------
def test_device_identity_and_listener(tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    device = VsockDevice(CID, path)
    assert device.device_type == DeviceType.VSOCK == 19 and len(device.queue_sizes) == 3
    assert device.device_features == 1  # VIRTIO_VSOCK_F_STREAM
    config = memoryview(bytearray(12))
    device.read_config(0, config)
    assert bytes(config) == struct.pack("<Q", CID) + bytes(4)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with pytest.raises(ConfigError, match="in use"):
        VsockDevice(4, path)  # someone listens there
    device.close()
    assert not path.exists()
    device.close()  # twice is fine

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on: replaced
    stale.close()
    VsockDevice(CID, path).close()

    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        VsockDevice(CID, path)
    with pytest.raises(ConfigError, match="cannot listen"):
        VsockDevice(CID, tmp_path / ("x" * 120))
    with pytest.raises(ConfigError, match="cannot listen"):
        VsockDevice(CID, tmp_path / "missing" / "v.sock")
    for cid in (0, 1, 2, 0xFFFF_FFFF, 1 << 32):
        with pytest.raises(ConfigError, match="CID"):
            VsockDevice(cid, tmp_path / "other.sock")


# --- host-initiated connections ---------------------------------------------------------------
@BACKENDS
def test_host_connects_to_the_guest(backend: str, uds: str) -> None:
    """CONNECT, OP_REQUEST, OP_RESPONSE, OK; bytes both ways; the host's half-close; the
    guest's close; everything gone."""

    async def body(device: VsockDevice, guest: Guest) -> None:
        host = await anyio.connect_unix(uds)
        await host.send(b"CONNECT 1234\nsent with the line")  # bytes after the line are the guest's
        request = await guest.expect(REQUEST, dst_port=1234)
        assert request.src_port >= LOCAL_PORT_BASE and request.len == 0
        assert request.buf_alloc == device.buf_alloc and request.fwd_cnt == 0
        conn = guest.accept(request)
        assert await read_line(host) == b"OK %d\n" % request.src_port
        assert await conn.read_exact(17) == b"sent with the line"[:17]
        [info] = device.connections()
        assert (info.host_port, info.guest_port, info.state) == (request.src_port, 1234, "established")

        up, down = pattern(300_000, 1), pattern(200_000, 2)
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.write, up)
            assert await recv_exact(host, len(up)) == up
        conn.received.clear()
        await host.send(down)
        assert await conn.read_exact(len(down)) == down

        await host.send_eof()  # the host sends no more: the guest hears SHUTDOWN_F_SEND
        await conn.wait_op(SHUTDOWN)
        assert conn.shutdown == SEND and not conn.reset
        await conn.write(b"still open the other way")
        assert await recv_exact(host, 24) == b"still open the other way"
        conn.send_op(SHUTDOWN, RCV | SEND)  # the guest closes: OP_RST ends it, the host sees EOF
        await conn.wait_op(RST)
        assert await recv_all(host) == b""
        assert device.connections() == []
        await guest.settle()
        assert guest.all_signalled() and guest.interrupts > 0

    run(backend, uds, body)


@BACKENDS
def test_guest_refuses_or_ignores_a_host_connection(backend: str, uds: str) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        host = await host_connect(uds, 80)
        request = await guest.expect(REQUEST, dst_port=80)
        guest.send_nowait(op=RST, src_port=80, dst_port=request.src_port)  # nobody listens on 80
        assert await recv_all(host) == b""  # closed, no OK
        assert device.connections() == []

        host = await host_connect(uds, 81)
        request = await guest.expect(REQUEST, dst_port=81)
        # No answer: after request_timeout the device gives up, tells the guest and the host.
        reset = await guest.expect(RST, dst_port=81, src_port=request.src_port)
        assert reset.src_cid == HOST
        assert await recv_all(host) == b""
        assert device.connections() == [] and device.stats["request_timeout"] == 1

    run(backend, uds, body, request_timeout=0.5)


@BACKENDS
def test_bad_connect_lines_close_the_host_socket(backend: str, uds: str) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        for line in (b"CONNECT 12" + b"7" * 60, b"CONNECT abc\n", b"CONNECT 99999999999\n", b"CONNECT 4294967296\n",
                     b"connect 5\n", b"CONNECT  5\n", b"CONNECT 5 \n", b"\n", b"CONNECT -1\n",
                     b"CONNECT 5\r\n"):  # fmt: skip
            host = await anyio.connect_unix(uds)
            await host.send(line)
            assert await recv_all(host) == b"", line
        host = await anyio.connect_unix(uds)  # says nothing: closed after handshake_timeout
        assert await recv_all(host) == b""
        host = await anyio.connect_unix(uds)
        await host.aclose()
        await guest.until(lambda: device.stats["host_bad_connect"] == 12)
        good = await host_connect(uds, 4294967295)
        request = await guest.expect(REQUEST)
        assert request.dst_port == 4294967295 and guest.inbox == []  # no request for the bad ones
        guest.accept(request)
        assert (await read_line(good)).startswith(b"OK ")

    run(backend, uds, body, handshake_timeout=1.0)


# --- guest-initiated connections ----------------------------------------------------------------
@BACKENDS
def test_guest_connects_to_the_host(backend: str, uds: str) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        async with await anyio.create_unix_listener(f"{uds}_5000") as listener:
            conn = guest.connect(1025, 5000)
            host = await listener.accept()
            await conn.wait_op(RESPONSE)
            assert conn.peer_buf_alloc == device.buf_alloc and conn.peer_fwd_cnt == 0
            up, down = pattern(200_000, 3), pattern(150_000, 4)
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.write, up)
                assert await recv_exact(host, len(up)) == up
            await host.send(down)
            assert await conn.read_exact(len(down)) == down

            conn.send_op(SHUTDOWN, SEND)  # the guest's half-close: the host reads EOF...
            assert await recv_all(host) == b""
            await host.send(b"but may still write")  # ...and still writes
            conn.received.clear()
            assert await conn.read_exact(19) == b"but may still write"
            await host.send_eof()  # neither side sends any more: OP_RST, gone
            await conn.wait_op(RST)
            assert SHUTDOWN not in conn.ops and device.connections() == []
            assert device.stats["closed"] == 1
            await guest.settle()
            assert guest.all_signalled()

    run(backend, uds, body)


@BACKENDS
def test_guest_connection_refused(backend: str, uds: str, tmp_path: Path) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        nobody = guest.connect(1026, 6000)  # no socket there
        await nobody.wait_op(RST)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(f"{uds}_6001")  # a socket file nobody listens on
        try:
            refused = guest.connect(1027, 6001)
            await refused.wait_op(RST)
        finally:
            stale.close()
        (tmp_path / "v.sock_6002").write_text("a file")
        not_a_socket = guest.connect(1028, 6002)
        await not_a_socket.wait_op(RST)
        assert nobody.ops == refused.ops == not_a_socket.ops == [RST]
        assert device.stats["refused_no_listener"] == 3 and device.connections() == []
        # The guest may ask again, and a listener that appears is found.
        async with await anyio.create_unix_listener(f"{uds}_6000") as listener:
            again = guest.connect(1026, 6000)
            await listener.accept()
            await again.wait_op(RESPONSE)

    run(backend, uds, body)


# --- credit ----------------------------------------------------------------------------------------
@BACKENDS
def test_the_device_respects_the_guests_credit(backend: str, uds: str) -> None:
    """A guest with 1000 bytes of buffer that reads nothing gets 1000 bytes, then nothing
    until it says it consumed some (OP_CREDIT_UPDATE)."""

    async def body(device: VsockDevice, guest: Guest) -> None:
        host = await host_connect(uds, 7)
        request = await guest.expect(REQUEST)
        conn = guest.accept(request, buf_alloc=1000, auto_consume=False)
        assert (await read_line(host)).startswith(b"OK")
        data = pattern(50_000, 5)
        await host.send(data)
        await conn.read_exact(1000)
        await guest.settle(0.2)
        assert len(conn.received) == 1000  # and Guest.poll checked every packet against the credit
        conn.consume(1000)
        conn.send_op(CREDIT_UPDATE)
        await conn.read_exact(2000)
        await guest.settle(0.1)
        assert len(conn.received) == 2000
        conn.send_op(CREDIT_REQUEST)  # asks for our credit: answered, still no data
        await guest.until(lambda: conn.ops.count(CREDIT_UPDATE) == 1)
        assert len(conn.received) == 2000
        conn.buf_alloc, conn.auto_consume = 8192, True
        conn.consume(1000)
        conn.send_op(CREDIT_UPDATE)
        assert await conn.read_exact(len(data)) == data
        assert all(op in (RW, CREDIT_UPDATE, REQUEST) for op in conn.ops)

    run(backend, uds, body)


@BACKENDS
def test_a_host_that_stops_reading_stops_the_guests_credit(backend: str, uds: str) -> None:
    """The host reads nothing: the device's buffer fills to buf_alloc and no more, the guest's
    credit reaches 0 and stays there; then the host reads, the credit comes back, and every
    byte arrives in order."""
    buf_alloc = 16384

    async def body(device: VsockDevice, guest: Guest) -> None:
        async with await anyio.create_unix_listener(f"{uds}_5001") as listener:
            conn = guest.connect(1030, 5001)
            host = await listener.accept()
            await conn.wait_op(RESPONSE)
            data = pattern(1_000_000, 6)
            sent = 0
            while True:  # write while the device grants credit
                await guest.settle(0.05)
                if conn.credit() <= 0:
                    await guest.settle(0.3)
                    if conn.credit() <= 0:
                        break
                count = min(conn.credit(), 4096)
                if len(guest.tx.free) >= 2:
                    conn.send_op(RW, data=data[sent : sent + count])
                    sent += count
            [info] = device.connections()
            assert info.buffered == buf_alloc  # full, and not a byte more
            assert sent < len(data) and conn.credit() == 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.write, data[sent:])
                assert await recv_exact(host, len(data)) == data
            assert device.connections()[0].buffered == 0

    run(backend, uds, body, buf_alloc=buf_alloc)


@BACKENDS
def test_a_guest_that_ignores_credit_is_reset(backend: str, uds: str) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        async with await anyio.create_unix_listener(f"{uds}_5002") as listener:
            conn = guest.connect(1031, 5002)
            host = await listener.accept()
            await conn.wait_op(RESPONSE)
            chunk = pattern(4096, 7)
            for _ in range(2000):  # ~8 MB, far more than the host socket and the device hold
                await guest.until(lambda: len(guest.tx.free) >= 2 or conn.reset)
                if conn.reset:
                    break
                conn.send_op(RW, data=chunk)
                assert all(c.buffered <= 8192 for c in device.connections())
            assert conn.reset and device.stats["tx_credit_exceeded"] == 1
            assert device.connections() == []
            received = await recv_all(host)  # what got through (whole packets, maybe none), then the end
            assert received == chunk * (len(received) // 4096)

    run(backend, uds, body, buf_alloc=8192)


# --- limits -------------------------------------------------------------------------------------
@BACKENDS
def test_connection_limits(backend: str, uds: str) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        async with await anyio.create_unix_listener(f"{uds}_9") as listener:
            conns = [guest.connect(2000 + i, 9) for i in range(6)]  # a flood of requests: 4 taken
            hosts = [await listener.accept() for _ in range(4)]
            await guest.until(lambda: all(c.ops for c in conns))
            assert [c.ops for c in conns] == [[RESPONSE]] * 4 + [[RST]] * 2
            assert device.stats["refused_too_many"] == 2
            extra = await anyio.connect_unix(uds)  # the host side counts too: closed at once
            assert await recv_all(extra) == b""
            for i, conn in enumerate(conns[:4]):
                conn.send_op(RW, data=b"%d" % i)
            by_conn = {int(await recv_exact(host, 1)): host for host in hosts}  # accepted in any order
            conns[0].send_op(RST)  # one closes: room for another
            assert await recv_all(by_conn[0]) == b""
            await guest.until(lambda: len(device.connections()) == 3)
            late = guest.connect(2010, 9)
            await listener.accept()
            await late.wait_op(RESPONSE)

    run(backend, uds, body, max_connections=4)


@BACKENDS
def test_host_handshake_limit(backend: str, uds: str) -> None:
    async def body(device: VsockDevice, guest: Guest) -> None:
        silent = [await anyio.connect_unix(uds) for _ in range(2)]  # never say CONNECT
        await guest.settle(0.1)
        third = await anyio.connect_unix(uds)
        assert await recv_all(third) == b""  # over the limit: closed at once
        assert device.stats["host_refused_too_many"] == 1
        for stream in silent:
            await stream.aclose()
        await guest.until(lambda: device.stats["host_bad_connect"] == 2)  # their handshakes ended
        ok = await host_connect(uds, 3)
        guest.accept(await guest.expect(REQUEST))
        assert (await read_line(ok)).startswith(b"OK")

    run(backend, uds, body, max_handshakes=2)


@BACKENDS
def test_replies_wait_for_rx_buffers_and_stop_tx(backend: str, uds: str) -> None:
    """A guest that sends packets needing OP_RST but posts no rx buffers: the device takes
    ``reply_backlog`` of them and then stops taking tx buffers until rx buffers come."""

    async def body(device: VsockDevice, guest: Guest) -> None:
        for port in range(40):
            guest.send_nowait(op=RW, src_port=3000 + port, dst_port=77, data=b"x")  # unknown connections
        await guest.settle(0.2)
        assert guest.tx.used_idx() == 8 and guest.inbox == []
        assert device.stats["tx_throttled"] >= 1
        guest.post_rx(32)
        await guest.until(lambda: len(guest.inbox) == 40)
        assert sorted(p.dst_port for p in guest.inbox) == list(range(3000, 3040))
        assert all(p.op == RST and p.src_port == 77 for p in guest.inbox)
        await guest.settle()
        assert guest.all_signalled()

    run(backend, uds, body, reply_backlog=8, guest_options={"rx_buffers": 0, "ring_size": 128})


@BACKENDS
def test_rx_buffers_too_small(backend: str, uds: str) -> None:
    """Buffers that cannot hold a header, or a header and one payload byte when data is
    owed, are given back empty; the data waits for a real buffer."""

    async def body(device: VsockDevice, guest: Guest) -> None:
        guest.refill = False
        guest.post_rx(3, [20])
        host = await host_connect(uds, 11)
        await guest.until(lambda: guest.empty_rx == 3)
        guest.post_rx(1)
        request = await guest.expect(REQUEST)
        conn = guest.accept(request)
        await read_line(host)
        await host.send(b"data")
        await guest.settle(0.05)
        guest.post_rx(2, [HDR_SIZE])  # room for a header only
        await guest.until(lambda: guest.empty_rx == 5)
        guest.post_rx(1)
        assert await conn.read_exact(4) == b"data"
        assert device.stats["rx_buffer_too_small"] == 5

    run(backend, uds, body, guest_options={"rx_buffers": 0})


# --- hostile guests -------------------------------------------------------------------------------
@BACKENDS
def test_hostile_headers(backend: str, uds: str) -> None:
    """Each bad packet is dropped or answered with OP_RST, nothing else; the device serves on."""

    async def body(device: VsockDevice, guest: Guest) -> None:
        marker = iter(range(50_000, 60_000))

        async def answers(send: Callable[[], None]) -> list[Packet]:
            """What the guest gets for ``send()``'s packets: everything before the RST that
            answers a marker packet sent after them."""
            send()
            port = next(marker)
            guest.send_nowait(op=CREDIT_REQUEST, src_port=port, dst_port=1)
            await guest.expect(RST, dst_port=port)
            got, guest.inbox = guest.inbox, []
            return got

        def rst_for(port: int, answer: list[Packet], type_: int = STREAM) -> bool:
            return [(p.op, p.dst_port, p.type) for p in answer] == [(RST, port, type_)]

        def raw(parts: list[tuple[int, int, bool]]) -> Callable[[], None]:
            def send() -> None:
                guest.tx.add_raw(parts)
                guest.notifiers[TX].signal()

            return send

        base = guest.event.end  # free guest RAM for hand-made buffers
        guest.memory.write(base, HDR.pack(CID, HOST, 100, 1, 0, STREAM, REQUEST, 0, 0, 0))
        assert await answers(raw([(base, 10, False)])) == []  # shorter than a header
        assert await answers(raw([(base, 64, True)])) == []  # nothing to read at all
        assert await answers(lambda: guest.send_nowait(op=REQUEST, src_port=101, dst_port=1, src_cid=4)) == []
        assert await answers(lambda: guest.send_nowait(op=REQUEST, src_port=102, dst_port=1,
                                                       src_cid=1 << 32 | CID)) == []  # fmt: skip
        answer = await answers(lambda: guest.send_nowait(op=REQUEST, src_port=103, dst_port=1, dst_cid=5))
        assert rst_for(103, answer) and answer[0].src_cid == 5  # as if from CID 5: nobody there
        answer = await answers(lambda: guest.send_nowait(op=REQUEST, src_port=104, dst_port=1, type_=2))
        assert rst_for(104, answer, 2)  # unknown type: RST (spec 5.10.6.3)
        for i, op in enumerate((0, 8, 0xFFFF, RW, RESPONSE, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST)):
            answer = await answers(functools.partial(guest.send_nowait, op=op, src_port=110 + i, dst_port=1))
            assert rst_for(110 + i, answer), op
        assert await answers(lambda: guest.send_nowait(op=RST, src_port=120, dst_port=1)) == []  # never answered
        answer = await answers(lambda: guest.send_nowait(op=RW, src_port=121, dst_port=1, data=b"0123456789",
                                                         length=60000))  # fmt: skip
        assert rst_for(121, answer)
        answer = await answers(lambda: guest.send_nowait(op=RW, src_port=122, dst_port=1, length=0xFFFF_FFFF))
        assert rst_for(122, answer)
        # A 2 MiB buffer with a length past one packet's 64 KiB: refused without reading it.
        guest.memory.write(base, HDR.pack(CID, HOST, 123, 1, 65537, STREAM, RW, 0, 0, 0))
        assert rst_for(123, await answers(raw([(base, HDR_SIZE, False), (0, 2 << 20, False)])))
        # The header split over many small buffers is fine.
        header = HDR.pack(CID, HOST, 124, 1, 0, STREAM, RW, 0, 0, 0)

        def split_header() -> None:
            guest.tx.add([header[i : i + 4] for i in range(0, HDR_SIZE, 4)], [])
            guest.notifiers[TX].signal()

        assert rst_for(124, await answers(split_header))

        # Rule breaking on a live connection: OP_RST, and the host socket is closed.
        async with await anyio.create_unix_listener(f"{uds}_1") as listener:
            for i, (op, flags) in enumerate(((REQUEST, 0), (RESPONSE, 0), (0x99, 0))):
                conn = guest.connect(130 + i, 1)
                host = await listener.accept()
                await conn.wait_op(RESPONSE)
                conn.send_op(op, flags)
                await conn.wait_op(RST)
                assert await recv_all(host) == b""
            conn = guest.connect(140, 1)
            host = await listener.accept()
            await conn.wait_op(RESPONSE)
            conn.send_op(SHUTDOWN, SEND)
            conn.send_op(RW, data=b"after my own shutdown")
            await conn.wait_op(RST)
            assert await recv_all(host) == b""
            # And after all that, a connection works.
            conn = guest.connect(141, 1)
            host = await listener.accept()
            await conn.wait_op(RESPONSE)
            await conn.write(b"hello")
            assert await recv_exact(host, 5) == b"hello"
        assert device.stats["tx_dropped_short"] == 2 and device.stats["tx_dropped_src_cid"] == 2
        await guest.settle()
        assert guest.all_signalled()

    run(backend, uds, body)


U32 = st.integers(0, 0xFFFF_FFFF)
PACKETS = st.lists(
    st.tuples(
        st.sampled_from([CID, CID, CID, 4, 1 << 32 | CID]),  # src_cid
        st.sampled_from([HOST, HOST, HOST, CID, 0, 0xFFFF_FFFF]),  # dst_cid
        st.one_of(st.integers(100, 103), U32.filter(lambda p: p != 0xFFFF_FFF0)),  # src_port
        st.one_of(st.just(7), st.just(8), U32),  # dst_port: 7 listens on the host
        st.one_of(st.just(None), st.sampled_from([0, 1, 44, 4096, 65536, 65537, 0xFFFF_FFFF]), U32),  # len
        st.sampled_from([STREAM, STREAM, STREAM, 0, 2, 0xFFFF]),  # type
        st.one_of(st.integers(0, 8), st.just(0xFFFF)),  # op
        U32,  # flags
        U32,  # buf_alloc
        U32,  # fwd_cnt
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=8,
)
_hypothesis_run = iter(range(1 << 30))


@BACKENDS
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets=PACKETS)
def test_random_guest_packets(backend: str, tmp_path: Path, packets: list[tuple[Any, ...]]) -> None:
    """Arbitrary packets: every answer is well-formed (Guest.poll checks), the rings stay
    intact, every tx buffer is taken, and the device still connects a guest afterwards."""
    uds = str(tmp_path / f"h{next(_hypothesis_run)}.sock")

    async def body(device: VsockDevice, guest: Guest) -> None:
        async with await anyio.create_unix_listener(f"{uds}_7") as listener:
            async with anyio.create_task_group() as tg:

                async def accept_all() -> None:
                    while True:
                        stream = await listener.accept()
                        tg.start_soon(recv_all, stream)

                tg.start_soon(accept_all)
                for src_cid, dst_cid, sport, dport, length, type_, op, flags, buf_alloc, fwd_cnt, data in packets:
                    await guest.send(op=op, src_port=sport, dst_port=dport, data=data, flags=flags,
                                     buf_alloc=buf_alloc, fwd_cnt=fwd_cnt, src_cid=src_cid, dst_cid=dst_cid,
                                     type_=type_, length=length)  # fmt: skip
                await guest.until(lambda: guest.tx.used_idx() == guest.tx.avail_idx)
                conn = guest.connect(0xFFFF_FFF0, 7)
                await conn.wait_op(RESPONSE)
                tg.cancel_scope.cancel()
        assert all(p.op in (RST, RESPONSE, RW, SHUTDOWN, CREDIT_UPDATE) for p in guest.inbox)

    run(backend, uds, body, buf_alloc=4096)


# --- resets ------------------------------------------------------------------------------------------
async def _two_connections(uds: str, guest: Guest) -> tuple[list[anyio.abc.SocketStream], anyio.abc.SocketListener]:
    """A host-initiated and a guest-initiated connection, established, data flowing."""
    first = await host_connect(uds, 21)
    conn = guest.accept(await guest.expect(REQUEST, dst_port=21))
    await read_line(first)
    listener = await anyio.create_unix_listener(f"{uds}_22")
    other = guest.connect(1040, 22)
    second = await listener.accept()
    await other.wait_op(RESPONSE)
    await first.send(b"ping")
    await conn.read_exact(4)
    return [first, second], listener


@BACKENDS
def test_reset_mid_connection(backend: str, uds: str) -> None:
    """The transport's reset bumps the generation under the lock: the backend finds out by
    itself (here when host bytes arrive), writes nothing more into guest memory, closes every
    host socket and ends. A new activation serves new connections on the same socket."""

    async def main() -> None:
        device = VsockDevice(CID, uds)
        guest = Guest(device)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(device.serve, guest.activation)
                hosts, listener = await _two_connections(uds, guest)
                guest.poll()
                with device.lock:
                    device.generation += 1
                before = guest.memory.read(0, RAM_SIZE)
                await hosts[0].send(b"after the reset")
                for host in hosts:
                    assert await recv_all(host) == b""
                # serve() ended on its own: the task group finishes without being cancelled
            assert guest.memory.read(0, RAM_SIZE) == before
            assert device.connections() == []
            await listener.aclose()

            fresh = Guest(device)
            async with anyio.create_task_group() as tg:
                tg.start_soon(device.serve, fresh.activation)
                host = await host_connect(uds, 23)
                conn = fresh.accept(await fresh.expect(REQUEST, dst_port=23))
                assert (await read_line(host)).startswith(b"OK")
                await host.send(b"new")
                assert await conn.read_exact(3) == b"new"
                tg.cancel_scope.cancel()
        device.close()
        guest.close()
        fresh.close()
        assert not guest.broken and not fresh.broken

    anyio.run(main, backend=backend)


@BACKENDS
def test_reset_then_cancelled(backend: str, uds: str) -> None:
    """As the transport does it: bump the generation, then cancel the backend; all host
    sockets close and nothing more reaches guest memory."""

    async def main() -> None:
        device = VsockDevice(CID, uds)
        guest = Guest(device)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def backend_task() -> None:
                    with scope:
                        await device.serve(guest.activation)

                tg.start_soon(backend_task)
                hosts, listener = await _two_connections(uds, guest)
                guest.poll()
                with device.lock:
                    device.generation += 1
                before = guest.memory.read(0, RAM_SIZE)
                scope.cancel()
                for host in hosts:
                    assert await recv_all(host) == b""
            assert guest.memory.read(0, RAM_SIZE) == before
            await listener.aclose()
        device.close()
        guest.close()

    anyio.run(main, backend=backend)
