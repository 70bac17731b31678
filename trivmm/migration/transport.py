"""Where a migration goes: URIs, connections, and the hand-over messages.

URIs (QEMU's spelling): ``tcp:HOST:PORT`` (``tcp:[::1]:PORT`` for IPv6; port 0 on a
listener picks a free one), ``unix:PATH``, ``file:PATH`` (a snapshot file: written by the
source, read by the destination). The source connects; the destination listens and takes
one connection at a time.

After the stream's END section, the two sides hand the guest over on the same connection
with small framed messages (docs/migration.md, "The hand-over")::

    0  8  magic b"TRIVMMAK"
    8  1  kind: 1 READY (destination: everything applied, ready to run)
                2 REFUSED (destination: the stream was refused; the reason follows)
                3 GO (source: the guest is yours; mine stays paused)
                4 RUNNING (destination: the guest runs here)
    9  1  reserved (0)
   10  2  reason length N (at most 1024; only REFUSED has one)
   12  N  reason, UTF-8
 12+N  4  CRC-32 of the bytes before it

The destination never runs a guest before GO, and the source never gives its guest up
before READY: a connection cut anywhere before GO leaves the guest with the source. A cut
between GO and RUNNING leaves the source paused, not knowing whether the destination runs
(the one window two hosts cannot close; the source says so and does not resume by itself).
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
import zlib
from typing import cast

import anyio
import anyio.abc
import attrs

from trivmm._unix_sockets import make_room_for_socket
from trivmm.errors import MigrationError

__all__ = ["MigrationUri", "parse_uri", "connect", "Listener", "listen_on", "AckKind", "Ack", "AckDecoder",
           "encode_ack", "MAX_REASON", "CONNECT_TIMEOUT"]  # fmt: skip

ACK_MAGIC = b"TRIVMMAK"
MAX_REASON = 1024
CONNECT_TIMEOUT = 10.0
_ACK = struct.Struct("<8sBBH")
_CRC = struct.Struct("<I")
_SOCKET_MODE = 0o600


@attrs.frozen
class MigrationUri:
    """A parsed URI: ``scheme`` is ``tcp``, ``unix`` or ``file``; ``host``/``port`` for
    tcp, ``path`` for the others."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"

    def absolute(self) -> MigrationUri:
        """The same URI with a relative path made absolute (for another process)."""
        if self.scheme == "tcp":
            return self
        return attrs.evolve(self, path=os.path.abspath(self.path))


def parse_uri(uri: str) -> MigrationUri:
    """``MigrationError`` with what is wrong for a URI trivmm cannot use."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in ("tcp", "unix", "file"):
        raise MigrationError(f"bad migration URI {uri!r}: use tcp:HOST:PORT, unix:PATH or file:PATH")
    if scheme in ("unix", "file"):
        if not rest or "\0" in rest:
            raise MigrationError(f"bad migration URI {uri!r}: {scheme}: needs a path")
        return MigrationUri(scheme, path=rest)
    if rest.startswith("["):
        host, close, tail = rest[1:].partition("]")
        if not close or not tail.startswith(":"):
            raise MigrationError(f"bad migration URI {uri!r}: use tcp:[ADDRESS]:PORT for IPv6")
        port_text = tail[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MigrationError(f"bad migration URI {uri!r}: {host!r} is not an IPv6 address") from None
    else:
        host, _, port_text = rest.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise MigrationError(f"bad migration URI {uri!r}: use tcp:HOST:PORT with a port 0..65535")
    return MigrationUri("tcp", host=host, port=int(port_text))


async def connect(uri: MigrationUri, timeout: float = CONNECT_TIMEOUT) -> anyio.abc.SocketStream:
    """A connection to a destination listening at ``uri`` (tcp or unix)."""
    try:
        with anyio.fail_after(timeout):
            if uri.scheme == "tcp":
                if uri.port == 0:
                    raise MigrationError(f"cannot connect to {uri}: port 0")
                return await anyio.connect_tcp(uri.host, uri.port)
            return await anyio.connect_unix(uri.path)
    except TimeoutError:
        raise MigrationError(f"cannot connect to {uri}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise MigrationError(f"cannot connect to {uri}: {exc.strerror or exc}") from None


class Listener:
    """A destination's listening socket (tcp or unix): ``uri`` is where it listens (a tcp
    port 0 replaced by the port it got); ``accept()`` takes the next connection."""

    def __init__(self, listener: anyio.abc.SocketListener, uri: MigrationUri) -> None:
        self._listener = listener
        self.uri = uri
        self._owns: tuple[int, int] | None = None  # the unix socket file (st_dev, st_ino) to remove

    async def accept(self) -> anyio.abc.SocketStream:
        try:
            return await self._listener.accept()
        except OSError as exc:
            raise MigrationError(f"accepting a migration on {self.uri} failed: {exc.strerror or exc}") from None

    async def aclose(self) -> None:
        await self._listener.aclose()
        if self._owns is not None:
            try:
                st = os.lstat(self.uri.path)
                if (st.st_dev, st.st_ino) == self._owns:
                    os.unlink(self.uri.path)
            except OSError:
                pass
            self._owns = None


async def listen_on(uri: MigrationUri) -> Listener:
    """Listen at ``uri`` (tcp, or unix: mode 0600, a stale socket file replaced)."""
    try:
        if uri.scheme == "tcp":
            tcp = await anyio.create_tcp_listener(local_host=uri.host, local_port=uri.port)
            port = tcp.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
            if len(tcp.listeners) > 1:  # a host name with several addresses: the first one
                for extra in tcp.listeners[1:]:
                    await extra.aclose()
            return Listener(cast(anyio.abc.SocketListener, tcp.listeners[0]), attrs.evolve(uri, port=port))
        make_room_for_socket(uri.path, "migration socket")
        unix = await anyio.create_unix_listener(uri.path, mode=_SOCKET_MODE)
        listener = Listener(cast(anyio.abc.SocketListener, unix), uri)
        st = os.lstat(uri.path)
        listener._owns = (st.st_dev, st.st_ino)
        return listener
    except OSError as exc:
        raise MigrationError(f"cannot listen on {uri}: {exc.strerror or exc}") from None


# --- the hand-over messages -------------------------------------------------------------------


class AckKind(enum.IntEnum):
    READY = 1
    REFUSED = 2
    GO = 3
    RUNNING = 4


@attrs.frozen
class Ack:
    kind: AckKind
    reason: str = ""


def encode_ack(kind: AckKind, reason: str = "") -> bytes:
    raw = reason.encode("utf-8", errors="replace")[:MAX_REASON]
    head = _ACK.pack(ACK_MAGIC, kind, 0, len(raw)) + raw
    return head + _CRC.pack(zlib.crc32(head))


class AckDecoder:
    """Hand-over messages from a byte stream; ``MigrationError`` for anything else."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Ack]:
        self._buffer += data
        out = []
        while len(self._buffer) >= _ACK.size:
            magic, kind, reserved, length = _ACK.unpack_from(self._buffer)
            if magic != ACK_MAGIC or reserved or length > MAX_REASON:
                raise MigrationError("the other side sent something that is not a hand-over message")
            total = _ACK.size + length + _CRC.size
            if len(self._buffer) < total:
                break
            frame = bytes(self._buffer[:total])
            del self._buffer[:total]
            if zlib.crc32(frame[: total - _CRC.size]) != _CRC.unpack_from(frame, total - _CRC.size)[0]:
                raise MigrationError("a hand-over message with a bad checksum")
            try:
                ack_kind = AckKind(kind)
            except ValueError:
                raise MigrationError(f"an unknown hand-over message (kind {kind})") from None
            out.append(Ack(ack_kind, frame[_ACK.size : _ACK.size + length].decode("utf-8", errors="replace")))
        return out
