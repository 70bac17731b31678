"""virtio-vsock (virtio 1.2 section 5.10), with Firecracker's host side.

The guest gets AF_VSOCK stream sockets; the host end of each connection is an AF_UNIX
stream socket (Firecracker's "hybrid vsock", docs/vsock.md there):

* host to guest: the device listens on ``uds_path`` for the VM's lifetime. A host process
  connects there and writes ``CONNECT <port>\\n``; the device sends the guest an
  OP_REQUEST from (CID 2, a local port it allocates) to (guest CID, port). On the guest's
  OP_RESPONSE it writes ``OK <local port>\\n`` to the host process, then relays bytes both
  ways; an OP_RST (nobody listens) closes the host socket without a word.
* guest to host: the guest's OP_REQUEST to (CID 2, port P) is connected to the unix socket
  ``<uds_path>_<P>``; OP_RESPONSE if something accepts there, else OP_RST.

Packets are a 44-byte little-endian ``struct virtio_vsock_hdr`` and a payload. The guest
and the host are both untrusted, and every resource either can make the device hold is
bounded:

* Connections: at most ``max_connections`` (an OP_REQUEST beyond gets OP_RST, a host
  connection beyond is closed), plus at most ``max_handshakes`` host connections that have
  not yet sent their ``CONNECT`` line (which may be at most 64 bytes, and must come within
  ``handshake_timeout``).
* Guest to host bytes: per connection, a buffer of ``buf_alloc`` bytes, which is what the
  device advertises (``buf_alloc`` in every header, with ``fwd_cnt``: the bytes it has
  written to the host socket). When the host socket stops taking bytes the buffer fills,
  ``fwd_cnt`` stops moving, and the guest's credit runs out. A guest that sends past its
  credit (or any other rule of the connection) gets OP_RST and the connection is closed.
* Host to guest bytes: never buffered. The device reads from a host socket only when the
  guest has posted an rx buffer and has credit for the connection (the guest's
  ``buf_alloc - (tx_cnt - fwd_cnt)``), at most that much; otherwise the bytes wait in the
  kernel's socket buffer and the host's writes block.
* Replies the guest's packets cause (OP_RST to an unknown connection, ...) wait for rx
  buffers in a queue of ``reply_backlog``; while it is full the device stops taking tx
  packets (virtio 1.2 section 5.10.6.2: "additional resources ... exhausted").

Connection states: CONNECTING (the guest asked; the device is connecting the unix
socket), REQUESTED (the host asked; OP_REQUEST sent, waiting for the guest's answer, at
most ``request_timeout``), ESTABLISHED. Shutdowns are half-closes each way: the guest's
SHUTDOWN_F_SEND becomes ``shutdown(SHUT_WR)`` on the host socket once the buffered bytes
are written, its SHUTDOWN_F_RCV becomes ``shutdown(SHUT_RD)`` (the host's writes then
fail); the host's end of file becomes OP_SHUTDOWN with SHUTDOWN_F_SEND. When neither side
can send any more, the device sends OP_RST (which ends a connection cleanly in the
protocol) and closes the host socket. OP_RST from the guest closes the host socket at once.

Resets (``device.py``): connections belong to one activation; the backend's tasks own the
host sockets, so cancelling it closes them all. Every rx packet is written through
``Activation.complete``, so nothing reaches guest memory after a reset; and a backend that
finds its activation stale (a ``complete`` refused, or ``current`` false) ends itself
without waiting to be cancelled. The listening socket belongs to the device and outlives
activations: host connections made meanwhile wait in its backlog. ``close()`` closes and
removes it.

Snapshots. Host connections cannot move: their sockets belong to this host's processes.
So a quiesce (``device.py``) stops only the tasks that use the rings -- tx, rx, the event
queue's -- (rx buffers taken and not filled go back to the ring; nothing else is held at
their awaits), while the connections, their host sockets and the listening socket live on:
the source runs on with them. A restored device has none, and does what Firecracker does:
its first activation sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (waiting
for the driver's event buffer), on which the guest drops every connection (Linux also
reads its CID again) -- before it accepts host connections, which wait in the listening
socket's backlog until then. The device's section is its configuration space (the guest
CID: another is refused) and the next host-side port it would allocate.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from trivmm._unix_sockets import listen_unix_socket
from trivmm.devices.virtio.device import Activation, DeviceState, DeviceType, VirtioDevice
from trivmm.devices.virtio.queue import DescriptorChain, VirtqueueError
from trivmm.errors import ConfigError

__all__ = [
    "VsockDevice", "VsockConnection", "HEADER", "HEADER_SIZE", "HOST_CID", "TYPE_STREAM",
    "OP_REQUEST", "OP_RESPONSE", "OP_RST", "OP_SHUTDOWN", "OP_RW", "OP_CREDIT_UPDATE",
    "OP_CREDIT_REQUEST", "SHUTDOWN_RCV", "SHUTDOWN_SEND", "VIRTIO_VSOCK_F_STREAM",
    "RX_QUEUE", "TX_QUEUE", "EVENT_QUEUE", "MAX_PAYLOAD", "DEFAULT_BUF_ALLOC",
    "MAX_CONNECT_LINE", "LOCAL_PORT_BASE", "EVENT_TRANSPORT_RESET", "VsockState",
]  # fmt: skip

_log = logging.getLogger(__name__)

# struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV = 1  # the sender will receive no more
SHUTDOWN_SEND = 2  # the sender will send no more
VIRTIO_VSOCK_F_STREAM = 0
RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
EVENT_TRANSPORT_RESET = 0  # struct virtio_vsock_event { le32 id; }: VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
_EVENT = struct.Struct("<I")

MAX_PAYLOAD = 64 * 1024  # one packet's payload either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
DEFAULT_BUF_ALLOC = 256 * 1024  # guest-to-host bytes buffered per connection (Linux's default too)
MAX_CONNECT_LINE = 64  # "CONNECT <port>\n" from the host, newline included
LOCAL_PORT_BASE = 1 << 30  # the host-side ports of host-initiated connections start here
_U32 = 0xFFFF_FFFF
_BATCH = 64  # chains taken at once; packets between two checkpoints
_CONNECT = re.compile(rb"CONNECT ([0-9]{1,10})\n")
_SEND_CHUNK = MAX_PAYLOAD

# Connection states
CONNECTING = "connecting"  # guest-initiated: connecting to <uds_path>_<port>
REQUESTED = "requested"  # host-initiated: OP_REQUEST queued or sent, no answer yet
ESTABLISHED = "established"


@attrs.frozen
class VsockState(DeviceState):
    """The device's section: its configuration space (the guest CID) and the next host port."""

    next_port: int


@attrs.frozen
class VsockConnection:
    """What ``VsockDevice.connections()`` tells about one connection."""

    host_port: int
    guest_port: int
    state: str
    buffered: int  # guest-to-host bytes waiting for the host socket
    fwd_cnt: int
    guest_credit: int  # bytes the device may still send the guest


class _Wakeup:
    """A level-triggered wakeup for one waiting task (the loop's thread only): ``set()``
    before ``wait()`` makes the wait return at once. The waiter re-checks its state after
    each wait."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()


class _Conn:
    """One connection: (CID 2, ``local_port``) on the host's side, (guest CID, ``peer_port``)."""

    def __init__(self, local_port: int, peer_port: int, sock: socket.socket | None, state: str,
                 buf_alloc: int) -> None:  # fmt: skip
        self.local_port = local_port
        self.peer_port = peer_port
        self.sock = sock
        self.state = state
        self.closed = False
        self.scope = anyio.CancelScope()
        # guest -> host: our receive buffer, and the credit we advertise
        self.buf_alloc = buf_alloc
        self.txbuf = bytearray()  # received from the guest, not yet written to the host socket
        self.prefix = b""  # "OK <port>\n", written to the host before any guest byte
        self.fwd_cnt = 0  # bytes written to the host socket (free-running, u32)
        self.rx_cnt = 0  # bytes received from the guest (free-running, u32)
        self.last_fwd_sent = 0  # fwd_cnt in the last header sent to the guest
        # host -> guest: the guest's credit
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0  # bytes sent to the guest (free-running, u32)
        self.host_readable = False  # the host socket was seen readable and not yet drained
        # shutdowns
        self.guest_shut = 0  # SHUTDOWN_* flags the guest sent
        self.host_eof = False  # the host will send no more
        self.host_write_shut = False  # we did shutdown(SHUT_WR) on the host socket
        # control packets owed to the guest
        self.send_request = False
        self.send_response = False
        self.send_shutdown = 0
        self.credit_update = False
        self.rx_wake = _Wakeup()  # the host-reading task: state or credit changed
        self.tx_wake = _Wakeup()  # the host-writing task: bytes or a shutdown to pass on

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def peer_free(self) -> int:
        """The guest's free receive space: its ``buf_alloc - (tx_cnt - fwd_cnt)``, never less
        than 0 (a guest whose fwd_cnt runs ahead of what it was sent gets nothing)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def can_send_data(self) -> bool:
        return self.state == ESTABLISHED and not self.host_eof and not self.guest_shut & SHUTDOWN_RCV

    def wants_host_read(self) -> bool:
        return self.can_send_data() and not self.host_readable and self.peer_free() > 0


class VsockDevice(VirtioDevice):
    """virtio-vsock for a guest of CID ``guest_cid`` (3 .. 2**32-2), its host side on the
    unix socket ``uds_path``, which is bound here (a stale socket file there is replaced; a
    live one, or any other file, is a ``ConfigError``)."""

    device_type = DeviceType.VSOCK
    queue_sizes = (256, 256, 256)
    device_features = 1 << VIRTIO_VSOCK_F_STREAM
    name = "virtio-vsock"
    state_type = VsockState

    def __init__(self, guest_cid: int, uds_path: str | os.PathLike[str], *,
                 buf_alloc: int = DEFAULT_BUF_ALLOC, max_connections: int = 1024, max_handshakes: int = 64,
                 reply_backlog: int = 256, request_timeout: float = 10.0, handshake_timeout: float = 10.0,
                 connect_timeout: float = 2.0) -> None:  # fmt: skip
        super().__init__()
        if not 3 <= guest_cid < _U32:
            raise ConfigError(f"a vsock guest CID must be 3 to {_U32 - 1}, not {guest_cid}")
        if not 1 <= buf_alloc <= _U32 or max_connections < 1 or max_handshakes < 1 or reply_backlog < 1:
            raise ValueError("buf_alloc, max_connections, max_handshakes and reply_backlog must be positive")
        self.guest_cid = guest_cid
        self.uds_path = os.fspath(uds_path)
        self.buf_alloc = buf_alloc
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.reply_backlog = reply_backlog
        self.request_timeout = request_timeout
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.config = bytearray(struct.pack("<Q", guest_cid))
        self.stats: collections.Counter[str] = collections.Counter()
        self._next_port = LOCAL_PORT_BASE
        self._session: _Session | None = None
        self._listener: socket.socket | None = None
        self._listener_id: tuple[int, int] | None = None
        self._transport_reset_due = False  # restored: tell the driver its connections are gone
        self._paused: _Session | None = None  # the session whose ring tasks a quiesce stopped
        self._listen()

    # --- the listening socket (the VM's lifetime) ------------------------------------------
    def _listen(self) -> None:
        # 0600 before listen(): nobody else connects to the guest's ports
        self._listener, self._listener_id = listen_unix_socket(self.uds_path, "vsock", backlog=128, nonblocking=True)

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours). Call it when no
        backend runs (the VM closes devices after its services ended)."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            anyio.notify_closing(listener)
        except RuntimeError:  # no event loop in this thread: nobody can be waiting
            pass
        listener.close()
        try:
            st = os.stat(self.uds_path)
            if (st.st_dev, st.st_ino) == self._listener_id:
                os.unlink(self.uds_path)
        except OSError:
            pass

    # --- lifecycle and snapshots ---------------------------------------------------------------
    def reset_state(self) -> None:
        self._transport_reset_due = False  # a new driver has no connections to drop

    def restored(self, running: bool) -> None:
        self._transport_reset_due = running

    async def quiesce_backend(self, active: Activation, stop: Callable[[], Awaitable[None]]) -> None:
        """Only the ring tasks stop: the connections, on host sockets, live on."""
        session = self._session
        if session is None or session.active is not active or session.tg is None:
            await stop()  # not started yet: it has taken nothing
            return
        self._paused = session
        await session.stop_queues()

    def resume_backend(self, active: Activation, start: Callable[[], None]) -> None:
        session, self._paused = self._paused, None
        if session is not None and session is self._session and session.tg is not None:
            session.start_queues()
        elif session is None:
            start()
        # else: the paused session ended meanwhile (a reset): nothing to resume

    def save(self) -> VsockState:
        with self.lock:
            return VsockState(self.device_type, bytes(self.config), self._next_port)

    def restore(self, state: DeviceState) -> None:
        super().restore(state)
        if not isinstance(state, VsockState):
            raise ValueError(f"{self.name}: a saved state without the next host port")
        if not LOCAL_PORT_BASE <= state.next_port < _U32:
            raise ValueError(f"{self.name}: saved next host port {state.next_port} is not "
                             f"{LOCAL_PORT_BASE}..{_U32 - 1}")  # fmt: skip
        self._next_port = state.next_port

    # --- the backend -------------------------------------------------------------------------
    async def serve(self, active: Activation) -> None:
        if self._listener is None:
            raise RuntimeError("the vsock device was closed")
        session = _Session(self, active, self._listener)
        self._session = session
        try:
            async with anyio.create_task_group() as tg:
                session.tg = tg
                session.start_queues()
                with self.lock:
                    reset_due = self._transport_reset_due and active.current
                if not reset_due:  # else once the guest has heard of the reset
                    session.start_accepting()
        finally:
            session.close_all()
            if self._session is session:
                self._session = None

    def connections(self) -> list[VsockConnection]:
        """The connections of the running activation (for tests and debugging)."""
        session = self._session
        if session is None:
            return []
        return [VsockConnection(c.local_port, c.peer_port, c.state, len(c.txbuf), c.fwd_cnt, c.peer_free())
                for c in session.conns.values()]  # fmt: skip

    def allocate_port(self, taken: dict[tuple[int, int], _Conn], peer_port: int) -> int:
        """A host-side port for a host-initiated connection to ``peer_port``: the next one
        from ``LOCAL_PORT_BASE`` up that no connection to that guest port uses."""
        while True:
            port = self._next_port
            self._next_port = port + 1 if port + 1 < _U32 else LOCAL_PORT_BASE
            if (port, peer_port) not in taken:
                return port


class _Session:
    """The device's state for one activation: its connections, and the tasks that serve them."""

    def __init__(self, device: VsockDevice, active: Activation, listener: socket.socket) -> None:
        self.device = device
        self.active = active
        self.listener = listener
        self.tg: anyio.abc.TaskGroup | None = None
        self.conns: dict[tuple[int, int], _Conn] = {}
        self.ready: dict[_Conn, None] = {}  # connections with something for the guest, in order
        self.replies: deque[bytes] = deque()  # headers for the guest outside any connection (RSTs)
        self.sockets: set[socket.socket] = set()  # every host socket open in this session
        self.handshakes = 0
        self.rx_work = _Wakeup()  # the rx task: something for the guest
        self.tx_room = _Wakeup()  # the tx task: the reply backlog has room again
        self.stats = device.stats
        self.accepting = False
        # The ring tasks run in a scope of their own, which a quiesce cancels.
        self.queues_scope = anyio.CancelScope()
        self.queues_done = anyio.Event()

    # --- the ring tasks ----------------------------------------------------------------------
    def start_queues(self) -> None:
        """Start the tasks that use the rings: tx, rx, and the transport reset if one is due."""
        assert self.tg is not None
        self.queues_scope, self.queues_done = anyio.CancelScope(), anyio.Event()
        self.tg.start_soon(self.run_queues, self.queues_scope, self.queues_done)

    async def stop_queues(self) -> None:
        """Stop them at their awaits (rx chains not filled are in ``active.held``)."""
        self.queues_scope.cancel()
        await self.queues_done.wait()

    async def run_queues(self, scope: anyio.CancelScope, done: anyio.Event) -> None:
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.serve_tx)
                    tg.start_soon(self.serve_rx)
                    with self.device.lock:
                        reset_due = self.device._transport_reset_due
                    if reset_due:
                        tg.start_soon(self.send_transport_reset)
        finally:
            done.set()

    def start_accepting(self) -> None:
        if not self.accepting:
            self.accepting = True
            assert self.tg is not None
            self.tg.start_soon(self.accept_host)

    async def send_transport_reset(self) -> None:
        """VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the driver's first event buffer; then host
        connections are accepted."""
        active = self.active
        while not (chains := active.take_chains(EVENT_QUEUE, 1)):
            if not active.current:
                self.stop()
                return
            await active.wait_notified(EVENT_QUEUE)
        (chain,) = chains
        if chain.writable_len < _EVENT.size:
            self.stats["event_buffer_too_small"] += 1
        if not active.complete(EVENT_QUEUE, chain, _EVENT.pack(EVENT_TRANSPORT_RESET)):
            self.stop()
            return
        with self.device.lock:
            self.device._transport_reset_due = False
        self.stats["transport_resets"] += 1
        self.start_accepting()

    # --- helpers ---------------------------------------------------------------------------
    def stop(self) -> None:
        """The activation is stale (the device was reset): end this backend."""
        if self.tg is not None:
            self.tg.cancel_scope.cancel()

    def close_all(self) -> None:
        """After the tasks are gone: close what a task that never ran left open."""
        for sock in list(self.sockets):
            self.close_socket(sock)
        self.conns.clear()
        self.ready.clear()

    def close_socket(self, sock: socket.socket) -> None:
        self.sockets.discard(sock)
        sock.close()

    def header(self, conn: _Conn, op: int, flags: int = 0, length: int = 0) -> bytes:
        """A header for ``conn``, with our current credit (which the guest now knows)."""
        conn.last_fwd_sent = conn.fwd_cnt
        conn.credit_update = False
        return HEADER.pack(HOST_CID, self.device.guest_cid, conn.local_port, conn.peer_port, length,
                           TYPE_STREAM, op, flags, conn.buf_alloc, conn.fwd_cnt)  # fmt: skip

    def reply_rst(self, src_cid: int, dst_cid: int, src_port: int, dst_port: int, type_: int) -> None:
        """OP_RST in answer to a guest packet that belongs to no connection."""
        self.stats["rst_sent"] += 1
        self.replies.append(HEADER.pack(dst_cid, src_cid, dst_port, src_port, 0, type_, OP_RST, 0, 0, 0))
        self.rx_work.set()

    def mark_ready(self, conn: _Conn) -> None:
        if not conn.closed:
            self.ready[conn] = None
            self.rx_work.set()

    def kill(self, conn: _Conn, reason: str, *, rst: bool = True) -> None:
        """End ``conn``: forget it, owe the guest an OP_RST (unless it sent one), and cancel
        its task, which closes the host socket."""
        if conn.closed:
            return
        _log.debug("vsock %d<->%d: closed: %s", conn.local_port, conn.peer_port, reason)
        conn.closed = True
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self.ready.pop(conn, None)
        if rst:
            self.stats["rst_sent"] += 1
            self.replies.append(self.header(conn, OP_RST))
            self.rx_work.set()
        conn.scope.cancel()

    def maybe_finish(self, conn: _Conn) -> None:
        """Neither side can send any more: end the connection with OP_RST."""
        if (conn.state == ESTABLISHED and conn.guest_shut & SHUTDOWN_SEND and not conn.txbuf
                and not conn.prefix and (conn.host_eof or conn.guest_shut & SHUTDOWN_RCV)):  # fmt: skip
            self.stats["closed"] += 1
            self.kill(conn, "both sides shut down")

    def credit_changed(self, conn: _Conn) -> None:
        if conn.can_send_data() and conn.peer_free() > 0:
            if conn.host_readable:
                self.mark_ready(conn)
            else:
                conn.rx_wake.set()

    def rx_pending(self, conn: _Conn) -> bool:
        return not conn.closed and bool(
            conn.send_request or conn.send_response or conn.send_shutdown or conn.credit_update
            or (conn.host_readable and conn.can_send_data() and conn.peer_free() > 0))  # fmt: skip

    # --- the tx queue: the guest's packets -----------------------------------------------------
    async def serve_tx(self) -> None:
        active = self.active
        while True:
            room = self.device.reply_backlog - len(self.replies)
            if room <= 0:  # the guest does not take our replies: stop taking its packets
                self.stats["tx_throttled"] += 1
                await self.tx_room.wait()
                continue
            chains = active.take_chains(TX_QUEUE, min(room, _BATCH))
            if not chains:
                if not active.current:
                    self.stop()
                    return
                await active.wait_notified(TX_QUEUE)
                continue
            for chain in chains:
                if not active.current:  # reset: the buffers are the driver's again
                    self.stop()
                    return
                self.handle_tx(chain)
            if not self.give_back(TX_QUEUE, chains):
                self.stop()
                return
            self.notify(TX_QUEUE)
            await anyio.lowlevel.checkpoint()

    def handle_tx(self, chain: DescriptorChain) -> None:
        """One packet from the guest (its bytes are copied out before the chain goes back)."""
        stats = self.stats
        stats["tx_packets"] += 1
        if chain.readable_len < HEADER_SIZE:
            stats["tx_dropped_short"] += 1
            return
        raw = chain.read(HEADER_SIZE)
        src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = HEADER.unpack(raw)
        if src_cid != self.device.guest_cid:
            stats["tx_dropped_src_cid"] += 1  # a forged source: no answer to anyone
            return
        key = (dst_port, src_port)
        conn = self.conns.get(key) if dst_cid == HOST_CID and type_ == TYPE_STREAM else None
        if op == OP_RST:  # never answered
            if conn is not None:
                self.kill(conn, "reset by the guest", rst=False)
            return
        if dst_cid != HOST_CID or type_ != TYPE_STREAM:
            stats["tx_bad_address_or_type"] += 1
            self.reply_rst(src_cid, dst_cid, src_port, dst_port, type_)
            return
        if length > MAX_PAYLOAD or length > chain.readable_len - HEADER_SIZE:
            stats["tx_bad_length"] += 1
            if conn is not None:
                self.kill(conn, f"a packet claims {length} payload bytes in a {chain.readable_len}-byte buffer")
            else:
                self.reply_rst(src_cid, dst_cid, src_port, dst_port, type_)
            return
        if conn is None:
            if op == OP_REQUEST:
                self.guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            else:
                stats["tx_unknown_connection"] += 1
                self.reply_rst(src_cid, dst_cid, src_port, dst_port, type_)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt  # every packet carries them
        if op == OP_RW and conn.state == ESTABLISHED and not conn.guest_shut & SHUTDOWN_SEND:
            if len(conn.txbuf) + length > conn.buf_alloc:
                stats["tx_credit_exceeded"] += 1
                self.kill(conn, f"the guest sent {length} bytes with {conn.buf_alloc - len(conn.txbuf)} of credit")
                return
            if length:
                conn.txbuf += memoryview(chain.read(HEADER_SIZE + length))[HEADER_SIZE:]
                conn.rx_cnt = (conn.rx_cnt + length) & _U32
                conn.tx_wake.set()
                self.offer_credit(conn)
        elif op == OP_SHUTDOWN and conn.state == ESTABLISHED:
            flags &= SHUTDOWN_RCV | SHUTDOWN_SEND
            new = flags & ~conn.guest_shut
            conn.guest_shut |= flags
            if new & SHUTDOWN_RCV and conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RD)  # the host's writes now fail
                except OSError:
                    pass
            if new & SHUTDOWN_SEND:
                conn.tx_wake.set()
            self.maybe_finish(conn)
            if conn.closed:
                return
        elif op == OP_RESPONSE and conn.state == REQUESTED:
            conn.state = ESTABLISHED
            conn.prefix = f"OK {conn.local_port}\n".encode()
            conn.tx_wake.set()
            conn.rx_wake.set()
        elif op == OP_CREDIT_REQUEST and conn.state == ESTABLISHED:
            conn.credit_update = True
            self.mark_ready(conn)
        elif op != OP_CREDIT_UPDATE or conn.state != ESTABLISHED:
            stats["tx_protocol_error"] += 1
            self.kill(conn, f"op {op} in state {conn.state}")
            return
        self.credit_changed(conn)

    def guest_connect(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        """The guest's OP_REQUEST to (CID 2, ``host_port``): connect to ``<uds_path>_<host_port>``."""
        if len(self.conns) >= self.device.max_connections:
            self.stats["refused_too_many"] += 1
            self.reply_rst(self.device.guest_cid, HOST_CID, guest_port, host_port, TYPE_STREAM)
            return
        conn = _Conn(host_port, guest_port, None, CONNECTING, self.device.buf_alloc)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[conn.key] = conn
        assert self.tg is not None
        self.tg.start_soon(self.run_guest_initiated, conn)

    # --- the rx queue: packets for the guest ---------------------------------------------------
    async def serve_rx(self) -> None:
        active = self.active
        chains = active.held[RX_QUEUE]  # taken, not yet used: a quiesce gives them back
        budget = _BATCH  # packets before the next notification check and yield
        while True:
            if not self.replies and not self.ready:
                self.notify(RX_QUEUE)
                budget = _BATCH
                await self.rx_work.wait()
                continue
            if not chains:
                chains.extend(active.take_chains(RX_QUEUE, _BATCH))
                if not chains:
                    self.notify(RX_QUEUE)
                    budget = _BATCH
                    if not active.current:
                        self.stop()
                        return
                    await active.wait_notified(RX_QUEUE)
                    continue
            if not budget:  # a long run of packets: interrupt, and let the other tasks run
                self.notify(RX_QUEUE)
                budget = _BATCH
                await anyio.lowlevel.checkpoint()
            chain = chains[0]
            room = chain.writable_len - HEADER_SIZE
            packet = self.next_packet(min(room, MAX_PAYLOAD)) if room >= 0 else None
            if packet is None:
                if not self.replies and not self.ready:
                    continue  # nothing after all (a host socket had no bytes)
                # What is owed does not fit this buffer (no room for a header, or for one
                # payload byte): give it back empty.
                self.stats["rx_buffer_too_small"] += 1
                packet = b""
            chains.popleft()
            budget -= 1
            if not self.deliver(chain, packet):
                self.stop()
                return
            if len(self.replies) < self.device.reply_backlog:
                self.tx_room.set()

    # --- the rings (under the device lock, only while the activation is current) ---------------
    def deliver(self, chain: DescriptorChain, packet: bytes) -> bool:
        """Write ``packet`` into an rx ``chain`` and return it to the driver (no interrupt:
        see ``notify``). False when the device was reset or the guest broke the queue."""
        active = self.active
        with self.device.lock:
            if not active.current:
                return False
            try:
                active.queues[RX_QUEUE].add_used(chain.head, chain.write(packet) if packet else 0)
                return True
            except VirtqueueError as exc:
                reason = str(exc)
        active.broken(f"queue {RX_QUEUE}: {reason}")
        return False

    def give_back(self, index: int, chains: list[DescriptorChain]) -> bool:
        """Return ``chains`` with nothing written (no interrupt: see ``notify``)."""
        active = self.active
        with self.device.lock:
            if not active.current:
                return False
            try:
                for chain in chains:
                    active.queues[index].add_used(chain.head, 0)
                return True
            except VirtqueueError as exc:
                reason = str(exc)
        active.broken(f"queue {index}: {reason}")
        return False

    def notify(self, index: int) -> None:
        """Interrupt the driver if it wants to hear of the chains used since the last check
        (once per batch, and before the task waits)."""
        self.active.notify_used(index)

    def next_packet(self, room: int) -> bytes | None:
        """The next packet for the guest with at most ``room`` payload bytes: replies first,
        then the ready connections in turn (one packet each)."""
        if self.replies:
            return self.replies.popleft()
        for conn in list(self.ready):
            self.ready.pop(conn, None)
            packet = None if conn.closed else self.conn_packet(conn, room)
            if self.rx_pending(conn):
                self.ready[conn] = None  # to the back of the line
            if packet is not None:
                return packet
            if self.replies:
                return self.replies.popleft()
        return None

    def conn_packet(self, conn: _Conn, room: int) -> bytes | None:
        """``conn``'s next packet, in the order the guest must see them."""
        if conn.send_request:
            conn.send_request = False
            return self.header(conn, OP_REQUEST)
        if conn.send_response:
            conn.send_response = False
            return self.header(conn, OP_RESPONSE)
        if conn.host_readable and conn.can_send_data() and room > 0:
            want = min(room, conn.peer_free())
            if want > 0:
                assert conn.sock is not None
                try:
                    data = conn.sock.recv(want)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError as exc:
                    self.kill(conn, f"reading the host socket: {exc.strerror or exc}")
                    return None
                if data is None or (data and len(data) < want):
                    conn.host_readable = False  # drained: the reading task waits again
                    conn.rx_wake.set()
                if data:
                    conn.tx_cnt = (conn.tx_cnt + len(data)) & _U32
                    self.stats["rx_bytes"] += len(data)
                    return self.header(conn, OP_RW, length=len(data)) + data
                if data == b"":  # the host will send no more
                    conn.host_readable = False
                    conn.host_eof = True
                    conn.send_shutdown |= SHUTDOWN_SEND
                    self.maybe_finish(conn)
                    if conn.closed:
                        return None
        if conn.send_shutdown:
            flags, conn.send_shutdown = conn.send_shutdown, 0
            return self.header(conn, OP_SHUTDOWN, flags)
        if conn.credit_update:
            return self.header(conn, OP_CREDIT_UPDATE)
        return None

    # --- the host sockets ------------------------------------------------------------------------
    async def accept_host(self) -> None:
        """Host processes connecting to ``uds_path``."""
        listener = self.listener
        while True:
            try:
                await anyio.wait_readable(listener)
            except anyio.BusyResourceError:  # the last activation's task is still on its way out
                await anyio.sleep(0.01)
                continue
            except anyio.ClosedResourceError:  # the device was closed under a running backend
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # out of fds, most likely: try again a little later
                _log.warning("vsock: accepting a host connection on %s failed: %s", self.device.uds_path, exc)
                await anyio.sleep(0.1)
                continue
            sock.setblocking(False)
            if self.handshakes >= self.device.max_handshakes or len(self.conns) >= self.device.max_connections:
                self.stats["host_refused_too_many"] += 1
                sock.close()
                continue
            self.sockets.add(sock)
            self.handshakes += 1
            assert self.tg is not None
            self.tg.start_soon(self.run_host_initiated, sock)

    async def read_connect_line(self, sock: socket.socket) -> int | None:
        """The port of the host's ``CONNECT <port>\\n``; None if it is anything else. Reads
        exactly the line: what the host sends after it is for the guest."""
        line = b""
        while True:
            await anyio.wait_readable(sock)
            try:
                peek = sock.recv(MAX_CONNECT_LINE - len(line), socket.MSG_PEEK)
                if not peek:
                    return None
                newline = peek.find(b"\n")
                line += sock.recv(newline + 1 if newline >= 0 else len(peek))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return None
            if line.endswith(b"\n"):
                break
            if len(line) >= MAX_CONNECT_LINE:
                return None
        match = _CONNECT.fullmatch(line)
        if match is None or int(match.group(1)) > _U32:
            return None
        return int(match.group(1))

    async def run_host_initiated(self, sock: socket.socket) -> None:
        counted = True
        try:
            port = None
            with anyio.move_on_after(self.device.handshake_timeout):
                port = await self.read_connect_line(sock)
            self.handshakes -= 1
            counted = False
            if port is None:
                self.stats["host_bad_connect"] += 1
                return
            if len(self.conns) >= self.device.max_connections:
                self.stats["host_refused_too_many"] += 1
                return
            local = self.device.allocate_port(self.conns, port)
            conn = _Conn(local, port, sock, REQUESTED, self.device.buf_alloc)
            conn.send_request = True
            self.conns[conn.key] = conn
            self.mark_ready(conn)
            with conn.scope:
                await self.run_conn(conn)
        finally:
            if counted:
                self.handshakes -= 1
            self.close_socket(sock)

    async def run_guest_initiated(self, conn: _Conn) -> None:
        with conn.scope:
            try:
                path = f"{self.device.uds_path}_{conn.local_port}"
                conn.sock = await self.connect_host(path)
                if conn.sock is None:
                    self.stats["refused_no_listener"] += 1
                    self.kill(conn, f"nothing accepts on {path}")
                    return
                conn.state = ESTABLISHED
                conn.send_response = True
                self.mark_ready(conn)
                await self.run_conn(conn)
            finally:
                if conn.sock is not None:
                    self.close_socket(conn.sock)

    async def connect_host(self, path: str) -> socket.socket | None:
        """A socket connected to ``path``, or None if nothing accepts there in time."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sockets.add(sock)
        try:
            with anyio.move_on_after(self.device.connect_timeout):
                while True:
                    try:
                        sock.connect(path)
                        return sock
                    except (BlockingIOError, InterruptedError):  # the listener's backlog is full
                        await anyio.sleep(0.01)
        except OSError as exc:
            _log.debug("vsock: connecting to %s: %s", path, exc)
        except BaseException:
            self.close_socket(sock)
            raise
        self.close_socket(sock)
        return None

    async def run_conn(self, conn: _Conn) -> None:
        """A live connection's tasks, until it is killed (its scope cancelled)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.host_to_guest, conn)
            tg.start_soon(self.guest_to_host, conn)
            if conn.state == REQUESTED:
                tg.start_soon(self.request_timer, conn)

    async def request_timer(self, conn: _Conn) -> None:
        await anyio.sleep(self.device.request_timeout)
        if conn.state == REQUESTED:
            self.stats["request_timeout"] += 1
            self.kill(conn, "the guest did not answer the request in time")

    async def host_to_guest(self, conn: _Conn) -> None:
        """Wait for the host socket to have bytes while the guest can take some; the rx
        task reads them."""
        assert conn.sock is not None
        try:
            while True:
                if conn.wants_host_read():
                    await anyio.wait_readable(conn.sock)
                    conn.host_readable = True
                    self.mark_ready(conn)
                else:
                    await conn.rx_wake.wait()
        except OSError as exc:  # not expected: the socket stays open while this task runs
            self.kill(conn, f"waiting on the host socket: {exc}")

    async def guest_to_host(self, conn: _Conn) -> None:
        """Write the guest's bytes to the host socket as fast as it takes them."""
        try:
            await self._guest_to_host(conn)
        except OSError as exc:  # not expected: the socket stays open while this task runs
            self.kill(conn, f"waiting on the host socket: {exc}")

    async def _guest_to_host(self, conn: _Conn) -> None:
        sock = conn.sock
        assert sock is not None
        while True:
            if conn.prefix or conn.txbuf:
                await anyio.wait_writable(sock)
                if not self.active.current:
                    self.stop()
                    return
                data = conn.prefix or conn.txbuf
                try:
                    sent = sock.send(data[:_SEND_CHUNK], socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self.kill(conn, f"writing the host socket: {exc.strerror or exc}")
                    return
                if conn.prefix:
                    conn.prefix = conn.prefix[sent:]
                else:
                    del conn.txbuf[:sent]
                    conn.fwd_cnt = (conn.fwd_cnt + sent) & _U32
                    self.stats["tx_bytes"] += sent
                    self.forwarded(conn)
            elif conn.guest_shut & SHUTDOWN_SEND and not conn.host_write_shut:
                conn.host_write_shut = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.maybe_finish(conn)
            else:
                await conn.tx_wake.wait()

    def forwarded(self, conn: _Conn) -> None:
        self.offer_credit(conn)
        self.maybe_finish(conn)

    def offer_credit(self, conn: _Conn) -> None:
        """Owe the guest an OP_CREDIT_UPDATE when bytes it sent went to the host since the
        last header told it, and either a good amount did (a quarter of ``buf_alloc``, at
        most 64 KiB) or the credit the guest knows of is running low (it may be waiting for
        it). Called when bytes go to the host and when the guest sends some."""
        unacked = (conn.fwd_cnt - conn.last_fwd_sent) & _U32
        if not unacked:
            return
        known_free = conn.buf_alloc - ((conn.rx_cnt - conn.last_fwd_sent) & _U32)
        step = min(MAX_PAYLOAD, conn.buf_alloc // 4 or 1)
        if unacked >= step or known_free < step:
            conn.credit_update = True
            self.mark_ready(conn)
