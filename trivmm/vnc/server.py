"""A VNC (RFB 3.8) server for a VM's display: the screen to any VNC client, its keys and
pointer to the VM's PS/2 keyboard and mouse.

    server = VncServer(vm.display, vm.i8042, "127.0.0.1:5900")   # binds now: ConfigError if it cannot
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)                             # clients may connect from here on
        result = await vm.run()
        tg.cancel_scope.cancel()

One task per client (a reader and a writer), and one refresher for the server. RFB is
pull-based: a client asks for an update (FramebufferUpdateRequest) and the server answers
once something in it changed. The refresher polls the display's dirty log
(``Display.collect``: one KVM_GET_DIRTY_LOG) at ``refresh_rate`` only while some client has
asked and has nothing pending; pages that changed are scanned (on a worker thread) into
rectangles that every client's ``Damage`` collects, and each waiting client is sent the
rectangles of its damage (Raw, Zlib or ZRLE, in the client's pixel format). An idle screen
therefore costs one ioctl a refresh tick while a client watches, and nothing otherwise.

Security type None only, so the listening socket is a unix socket (mode 0600) or TCP on a
loopback address; another address is refused unless ``allow_remote``. Hostile clients are
bounded: ``max_clients`` at once (and ``MAX_HANDSHAKES`` more still in their handshake, which
has ``HANDSHAKE_TIMEOUT`` to finish), message sizes (``MAX_ENCODINGS``, ``MAX_CUT_TEXT``)
and rate (``MESSAGE_RATE``), one update in flight per client (a client that does not read
stalls its own writer, never the server, and is dropped after ``SEND_TIMEOUT``), and at most
one update a refresh tick per client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import attrs

from trivmm._unix_sockets import listen_unix_socket
from trivmm.devices.display import BYTES_PER_PIXEL, Damage, Display, Rect
from trivmm.errors import ConfigError
from trivmm.vnc.keymap import keysym_to_code, xt_to_code
from trivmm.vnc.protocol import (
    CLIENT_MESSAGE_SIZES,
    NATIVE_FORMAT,
    QEMU_EXTENDED_KEY_EVENT,
    VERSION_3_3,
    VERSION_3_8,
    ClientMessage,
    Encoding,
    PixelFormat,
    SecurityType,
    UnsupportedFormat,
    ZlibStream,
    encode_rect,
    parse_version,
    rect_header,
    update_header,
)

if TYPE_CHECKING:
    from trivmm.devices.i8042 import I8042

__all__ = ["VncServer", "VncEndpoint", "MAX_CLIENTS", "HANDSHAKE_TIMEOUT", "SEND_TIMEOUT", "MAX_ENCODINGS",
           "MAX_CUT_TEXT", "MESSAGE_RATE", "DEFAULT_REFRESH_RATE"]  # fmt: skip

MAX_CLIENTS = 16
MAX_HANDSHAKES = 16  # connections still in their handshake; past that (plus the clients) closed at once
HANDSHAKE_TIMEOUT = 10.0  # seconds from connect to the end of ClientInit
SEND_TIMEOUT = 30.0  # seconds one update may take to go out before its client is dropped
MAX_ENCODINGS = 256  # in one SetEncodings
MAX_CUT_TEXT = 1 << 20  # bytes of ClientCutText (ignored, but read); a longer one closes the connection
MESSAGE_RATE = 4000  # client messages a second; past that the reader waits (the socket backs up)
DEFAULT_REFRESH_RATE = 30  # polls and updates a second, at most
DEFAULT_IDLE_REFRESH_RATE = 5  # polls a second once the screen has been still for IDLE_AFTER
IDLE_AFTER = 1.0  # seconds without a change before polling slows down; input speeds it up again
OFFLOAD_BYTES = 128 << 10  # updates larger than this are encoded on a worker thread
_RECEIVE_SIZE = 65536
_RATE_WINDOW = 0.1
_ENCODINGS = (Encoding.ZRLE, Encoding.ZLIB, Encoding.RAW)  # what a client may pick, by its own order
_log = logging.getLogger(__name__)


class _ClientGone(Exception):
    """The client closed the connection, broke the protocol or was too slow."""


@attrs.frozen
class VncEndpoint:
    """Where the server listens: a unix socket ``path``, or TCP ``host``:``port`` (port 0:
    any free one). ``allow_remote``: a non-loopback TCP address is accepted."""

    path: str | None = None
    host: str | None = None
    port: int = 0
    allow_remote: bool = False

    @classmethod
    def parse(cls, text: str) -> VncEndpoint:
        """``unix:PATH``, ``HOST:PORT`` or ``[V6ADDR]:PORT``, optionally followed by
        ``,allow-remote=on`` (the CLI's ``--vnc``)."""
        spec, allow = text, False
        for suffix in (",allow-remote=on", ",allow-remote=yes", ",allow-remote=true"):
            if spec.endswith(suffix):
                spec, allow = spec[: -len(suffix)], True
        if spec.startswith("unix:"):
            if not spec[5:]:
                raise ConfigError(f"bad --vnc {text!r}: an empty socket path")
            return cls(path=spec[5:])
        host, sep, port = spec.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"bad --vnc {text!r} (use unix:PATH or HOST:PORT, e.g. 127.0.0.1:5900)")
        return cls(host=host, port=int(port), allow_remote=allow)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


class _Reader:
    """Exact-size reads from a stream through one bounded buffer (a message at a time)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            try:
                chunk = await self._stream.receive(_RECEIVE_SIZE)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                raise _ClientGone("the client closed the connection") from None
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def skip(self, size: int) -> None:
        while size:
            step = min(size, _RECEIVE_SIZE)
            await self.read(step)
            size -= step


class _Client:
    """One connection's state: its pixel format and encodings, what it asked for, its
    damage, its pointer."""

    def __init__(self, stream: anyio.abc.SocketStream, number: int, damage: Damage) -> None:
        self.stream = stream
        self.number = number
        self.damage = damage
        self.outside = Damage(damage.screen)  # changes outside the region it last asked for
        self.format = NATIVE_FORMAT
        self.encoding = Encoding.RAW
        self.streams: dict[int, ZlibStream] = {}
        self.requested = False  # an update request is outstanding
        self.full = False  # ... a non-incremental one: the display is refreshed before it is answered
        self.region = damage.screen
        self.ack_extended_keys = False  # send the QEMU extended-key pseudo-rectangle once
        self.extended_keys = False
        self.pointer: tuple[int, int] | None = None
        self.buttons = 0
        self.last_update = -1e9
        self.updates = 0
        self.sent = 0  # bytes of updates
        self.wake = anyio.Event()

    def poke(self) -> None:
        self.wake.set()

    @property
    def ready(self) -> bool:
        return self.ack_extended_keys or (self.requested and bool(self.damage))

    @property
    def waiting(self) -> bool:
        """Asked for an update and has nothing to be sent: the refresher should look."""
        return self.requested and not self.damage


class VncServer:
    """A VNC server for ``display`` at ``endpoint`` (``VncEndpoint`` or its text form),
    feeding keys and pointer to ``keyboard`` (None: input is ignored). The socket is bound
    in the constructor (``ConfigError`` if it cannot be); ``serve()`` runs it."""

    def __init__(self, display: Display, keyboard: I8042 | None, endpoint: VncEndpoint | str, *,
                 name: str = "trivmm", refresh_rate: float = DEFAULT_REFRESH_RATE,
                 idle_refresh_rate: float = DEFAULT_IDLE_REFRESH_RATE, max_clients: int = MAX_CLIENTS,
                 allow_remote: bool = False) -> None:  # fmt: skip
        if isinstance(endpoint, str):
            endpoint = VncEndpoint.parse(endpoint)
        if not 0 < refresh_rate <= 1000 or not 0 < idle_refresh_rate <= refresh_rate:
            raise ConfigError(f"VNC refresh rates {refresh_rate}, {idle_refresh_rate} (idle) are not "
                              "0 < idle <= refresh <= 1000 per second")  # fmt: skip
        self.display = display
        self.keyboard = keyboard
        self.endpoint = endpoint
        self.name = name.encode("utf-8", "replace")[:256]
        self.interval = 1.0 / refresh_rate
        self.idle_interval = 1.0 / idle_refresh_rate
        self._quiet_polls = 0  # polls in a row that found nothing changed
        self._refresh_failed = False
        self._idle_after = max(1, round(refresh_rate * IDLE_AFTER))
        self.max_clients = max_clients
        self._clients: set[_Client] = set()
        self._connections = 0  # open: in the handshake or serving
        self._count = 0
        self._refresh_wanted = anyio.Event()
        self._serving = False
        self._socket_id: tuple[int, int] | None = None
        if endpoint.path is not None:
            self._sock: socket.socket | None = self._listen_unix(endpoint.path)
        else:
            self._sock = self._listen_tcp(endpoint, allow_remote or endpoint.allow_remote)
        self.address: str | tuple[str, int] = self._sock.getsockname()
        if endpoint.path is None:  # the port it got (port 0: any free one)
            self.endpoint = attrs.evolve(endpoint, port=self._sock.getsockname()[1])

    @property
    def clients(self) -> int:
        return len(self._clients)

    # --- sockets ----------------------------------------------------------------------------
    def _listen_unix(self, path: str) -> socket.socket:
        """A listening unix socket at ``path``, mode 0600 before anyone can connect; a
        stale socket there is replaced, anything else refused."""
        sock, self._socket_id = listen_unix_socket(path, "VNC socket")
        return sock

    def _listen_tcp(self, endpoint: VncEndpoint, allow_remote: bool) -> socket.socket:
        assert endpoint.host is not None
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"VNC: cannot resolve {endpoint.host}: {exc.strerror or exc}") from None
        family, _, _, _, address = infos[0]
        if not allow_remote:
            for info in infos:
                if not ipaddress.ip_address(info[4][0]).is_loopback:
                    raise ConfigError(f"VNC: {endpoint.host} is not a loopback address, and the VNC server has no "
                                      "password: listen on 127.0.0.1 or a unix socket (or allow it explicitly: "
                                      "allow-remote=on)")  # fmt: skip
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"VNC: cannot listen on {endpoint}: {exc.strerror or exc}") from None
        return sock

    def close(self) -> None:
        """Close the listening socket if ``serve()`` never took it (and remove its file)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        path = self.endpoint.path
        if path is None or self._socket_id is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == self._socket_id:  # ours, not a successor's
                os.unlink(path)

    def __enter__(self) -> VncServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- serving ----------------------------------------------------------------------------
    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; ``task_group.start(server.serve)`` returns once it
        listens. On the way out every client is closed and a unix socket file removed."""
        if self._serving or self._sock is None:
            raise RuntimeError("a VNC server serves once")
        self._serving = True
        sock, self._sock = self._sock, None
        listener = await anyio.abc.SocketListener.from_socket(sock)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._refresher)
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except anyio.ClosedResourceError:
                        return
                    except OSError as exc:  # out of fds, say: wait a little rather than spin
                        _log.warning("VNC %s: accept failed: %s", self.endpoint, exc)
                        await anyio.sleep(0.1)
                        continue
                    self._count += 1
                    if self._connections >= self.max_clients + MAX_HANDSHAKES:  # a connection flood
                        _log.info("VNC client %d refused: %d connections open", self._count, self._connections)
                        await anyio.aclose_forcefully(stream)
                        continue
                    self._connections += 1
                    tg.start_soon(self._serve_client, stream, self._count)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._remove_socket_file()

    async def _serve_client(self, stream: anyio.abc.SocketStream, number: int) -> None:
        client: _Client | None = None
        try:
            reader = _Reader(stream)
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                refuse = f"too many VNC clients (at most {self.max_clients})" \
                    if len(self._clients) >= self.max_clients else None  # fmt: skip
                await self._handshake(stream, reader, refuse)
            client = _Client(stream, number, self.display.watch())
            self._clients.add(client)
            _log.info("VNC client %d connected to %s", number, self.endpoint)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._writer, client, tg.cancel_scope)
                try:
                    await self._read_messages(client, reader)
                except _ClientGone as exc:
                    _log.info("VNC client %d: %s", number, exc)
                tg.cancel_scope.cancel()
        except _ClientGone as exc:
            _log.info("VNC client %d: %s", number, exc)
        except TimeoutError:
            _log.info("VNC client %d: no handshake within %s s", number, HANDSHAKE_TIMEOUT)
        except Exception:  # a bug of ours: that client's problem only
            _log.exception("VNC client %d failed", number)
        finally:
            self._connections -= 1
            if client is not None:
                self._clients.discard(client)
                self.display.unwatch(client.damage)
            await anyio.aclose_forcefully(stream)

    # --- handshake ------------------------------------------------------------------------------
    async def _handshake(self, stream: anyio.abc.SocketStream, reader: _Reader, refuse: str | None) -> None:
        await _send(stream, b"RFB 003.008\n")
        try:
            version = parse_version(await reader.read(12))
        except ValueError as exc:
            raise _ClientGone(str(exc)) from None
        if refuse is not None:
            reason = refuse.encode()
            if version == VERSION_3_3:
                await _send(stream, struct.pack(">I", SecurityType.INVALID) + struct.pack(">I", len(reason)) + reason)
            else:
                await _send(stream, b"\x00" + struct.pack(">I", len(reason)) + reason)
            raise _ClientGone(refuse)
        if version == VERSION_3_3:
            await _send(stream, struct.pack(">I", SecurityType.NONE))
        else:
            await _send(stream, bytes([1, SecurityType.NONE]))
            (chosen,) = await reader.read(1)
            if chosen != SecurityType.NONE:
                if version == VERSION_3_8:
                    reason = b"security type None is the only one offered"
                    await _send(stream, struct.pack(">II", 1, len(reason)) + reason)
                raise _ClientGone(f"asked for security type {chosen}, not None")
            if version == VERSION_3_8:
                await _send(stream, struct.pack(">I", 0))  # SecurityResult: OK
        await reader.read(1)  # ClientInit: the shared flag (every client shares the screen)
        display = self.display
        await _send(stream, struct.pack(">HH", display.width, display.height) + NATIVE_FORMAT.pack()
                    + struct.pack(">I", len(self.name)) + self.name)  # fmt: skip

    # --- client to server -------------------------------------------------------------------------
    async def _read_messages(self, client: _Client, reader: _Reader) -> None:
        window_end, budget = 0.0, 0
        while True:
            (kind,) = await reader.read(1)
            size = CLIENT_MESSAGE_SIZES.get(kind)
            if size is None:
                raise _ClientGone(f"unknown message type {kind}")
            body = await reader.read(size)
            now = anyio.current_time()
            if now >= window_end:
                window_end, budget = now + _RATE_WINDOW, int(MESSAGE_RATE * _RATE_WINDOW)
            budget -= 1
            if budget < 0:  # a flood: read no more until the window ends (TCP pushes back)
                await anyio.sleep(window_end - now)
            await self._message(client, reader, kind, body)

    async def _message(self, client: _Client, reader: _Reader, kind: int, body: bytes) -> None:
        if kind == ClientMessage.SET_PIXEL_FORMAT:
            fmt = PixelFormat.unpack(body[3:19])
            try:
                fmt.check()
            except UnsupportedFormat as exc:
                raise _ClientGone(f"SetPixelFormat refused: {exc}") from None
            client.format = fmt
            client.damage.add_all()  # what it has is in the old format
        elif kind == ClientMessage.SET_ENCODINGS:
            (count,) = struct.unpack_from(">xH", body)
            if count > MAX_ENCODINGS:
                raise _ClientGone(f"SetEncodings with {count} encodings (at most {MAX_ENCODINGS})")
            encodings = struct.unpack(f">{count}i", await reader.read(4 * count))
            client.encoding = next((e for e in encodings if e in _ENCODINGS), Encoding.RAW)
            if Encoding.QEMU_EXTENDED_KEY_EVENT in encodings and not client.extended_keys:
                client.extended_keys = client.ack_extended_keys = True
                client.poke()
        elif kind == ClientMessage.FRAMEBUFFER_UPDATE_REQUEST:
            incremental, x, y, width, height = struct.unpack(">BHHHH", body)
            region = Rect(x, y, width, height).intersect(self.display.screen)
            if region is None:
                return  # nothing of the screen: nothing to send
            client.region = region
            for rect in client.outside.take():  # what it did not ask for before: maybe now
                client.damage.add(rect)
            if not incremental:
                client.damage.add(region)
                client.full = True
            client.requested = True
            client.poke()
            if client.waiting:
                self._refresh_wanted.set()
        elif kind == ClientMessage.KEY_EVENT:
            down, keysym = struct.unpack(">B2xI", body)
            self._key(keysym_to_code(keysym), bool(down))
            self._wake_refresher()
        elif kind == ClientMessage.POINTER_EVENT:
            mask, x, y = struct.unpack(">BHH", body)
            self._pointer(client, mask, x, y)
            self._wake_refresher()
        elif kind == ClientMessage.CLIENT_CUT_TEXT:
            (length,) = struct.unpack(">3xi", body)
            length = abs(length)  # negative: the extended clipboard format, as long
            if length > MAX_CUT_TEXT:
                raise _ClientGone(f"ClientCutText of {length} bytes (at most {MAX_CUT_TEXT})")
            await reader.skip(length)
        elif kind == ClientMessage.QEMU:
            if body[0] != QEMU_EXTENDED_KEY_EVENT:
                raise _ClientGone(f"QEMU client message subtype {body[0]} is not supported")
            down, keysym, keycode = struct.unpack(">HII", await reader.read(10))
            code = xt_to_code(keycode) if keycode else None
            self._key(code if code is not None else keysym_to_code(keysym), bool(down))
            self._wake_refresher()

    def _key(self, code: int | None, down: bool) -> None:
        if code is not None and self.keyboard is not None:
            self.keyboard.key(code, down)

    def _pointer(self, client: _Client, mask: int, x: int, y: int) -> None:
        """Absolute RFB pointer -> relative PS/2 motion; buttons 4 and 5 are the wheel."""
        # Wheel notches as PS/2 counts them: up (button 4) is -1, down (button 5) +1.
        wheel = (1 if mask & 0x10 and not client.buttons & 0x10 else 0) - \
                (1 if mask & 0x08 and not client.buttons & 0x08 else 0)  # fmt: skip
        dx = dy = 0
        if client.pointer is not None:
            dx, dy = x - client.pointer[0], y - client.pointer[1]
        client.pointer, client.buttons = (x, y), mask
        if self.keyboard is not None:
            self.keyboard.pointer(dx, dy, mask & 0x07, wheel)

    # --- server to client -------------------------------------------------------------------------
    async def _refresher(self) -> None:
        """Poll the display while some client waits for a change; nothing otherwise. After
        ``IDLE_AFTER`` without a change, at the idle rate (on this project's nested host
        every loop wake-up costs ~0.5 ms of CPU, the ioctl ~5 us); a client's input or a
        change found brings the full rate back at once."""
        while True:
            if not any(client.waiting for client in self._clients):
                self._refresh_wanted = anyio.Event()
                await self._refresh_wanted.wait()
                continue
            try:
                changed = await self._refresh()
            except Exception as exc:  # the VM's fd gone wrong, say: the screen stays as it is
                if not self._refresh_failed:
                    _log.warning("VNC %s: the display cannot be polled any more: %s", self.endpoint, exc)
                self._refresh_failed = True
                changed = False
            self._quiet_polls = 0 if changed else self._quiet_polls + 1
            for client in self._clients:
                if client.ready:
                    client.poke()
            if self._quiet_polls < self._idle_after:
                await anyio.sleep(self.interval)
                continue
            self._refresh_wanted = anyio.Event()
            with anyio.move_on_after(self.idle_interval):
                await self._refresh_wanted.wait()  # input: poll now, at the full rate again

    async def _refresh(self) -> bool:
        """The display's dirty pages scanned: what changed goes to every client's damage.
        Returns whether something was written."""
        display = self.display
        dirty = display.collect()
        if dirty is None:
            return False
        if dirty.pages * 4096 > OFFLOAD_BYTES:
            await anyio.to_thread.run_sync(display.scan, dirty)
        else:
            display.scan(dirty)
        return True

    def _wake_refresher(self) -> None:
        """Input from a client: the screen is likely to change soon; poll at the full rate."""
        self._quiet_polls = 0
        self._refresh_wanted.set()

    async def _writer(self, client: _Client, scope: anyio.CancelScope) -> None:
        try:
            while True:
                if not client.ready:
                    client.wake = anyio.Event()
                    if not client.ready:
                        await client.wake.wait()
                    continue
                await anyio.sleep_until(client.last_update + self.interval)
                update = await self._update(client)
                if update is None:
                    continue
                with anyio.fail_after(SEND_TIMEOUT):
                    await _send(client.stream, update)
                client.last_update = anyio.current_time()
                client.updates += 1
                client.sent += len(update)
        except TimeoutError:
            _log.info("VNC client %d dropped: it did not take an update in %s s", client.number, SEND_TIMEOUT)
        except _ClientGone as exc:
            _log.info("VNC client %d: %s", client.number, exc)
        scope.cancel()

    async def _update(self, client: _Client) -> bytes | None:
        """The next FramebufferUpdate for ``client``: its damage inside what it asked for
        (the rest stays for later), and the extended-key acknowledgement when due."""
        pieces: list[bytes] = []
        count = 0
        if client.ack_extended_keys:
            client.ack_extended_keys = False
            screen = self.display.screen
            pieces.append(rect_header(0, 0, screen.width, screen.height, Encoding.QEMU_EXTENDED_KEY_EVENT))
            count += 1
        rects: list[Rect] = []
        if client.requested:
            if client.full:
                # Pages written before now are sent in full anyway: scan them, so that the
                # shadow is current and the next incremental request gets only newer changes.
                client.full = False
                await self._refresh()
            for rect in client.damage.take():
                inside = rect.intersect(client.region)
                if inside != rect:
                    client.outside.add(rect)  # (all of it: simpler, and sent again at most once)
                if inside is not None:
                    rects.append(inside)
        if not rects and not count:
            return None
        if rects:
            client.requested = False
        fmt, encoding, streams = client.format, client.encoding, client.streams
        display = self.display

        def build() -> list[bytes]:
            out = []
            for rect in rects:
                pixels = display.read(rect)
                out.append(rect_header(rect.x, rect.y, rect.width, rect.height, encoding))
                out.append(encode_rect(pixels, rect.width, rect.height, fmt, encoding, streams))
            return out

        if sum(r.area for r in rects) * BYTES_PER_PIXEL > OFFLOAD_BYTES:
            pieces += await anyio.to_thread.run_sync(build)
        else:
            pieces += build()
        return update_header(count + len(rects)) + b"".join(pieces)

    # --- for tests and statistics -----------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Clients now, the updates (and bytes) sent to them, and the display's polls and scans."""
        return {"clients": len(self._clients), "updates": sum(c.updates for c in self._clients),
                "bytes": sum(c.sent for c in self._clients), "polls": self.display.polls,
                "scans": self.display.scans}  # fmt: skip


async def _send(stream: anyio.abc.SocketStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        raise _ClientGone("the client went away") from None


