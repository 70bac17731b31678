"""A small RFB client for the VNC tests: raw sockets, each message by hand, so a test can
also be a hostile client. Decodes Raw, Zlib and ZRLE (raw tiles: what trivmm sends)."""

from __future__ import annotations

import struct
import zlib

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from trivmm.vnc.protocol import Encoding, PixelFormat

__all__ = ["RfbClient", "Rectangle", "connect_raw"]

Rectangle = tuple[int, int, int, int, int, bytes]  # x, y, width, height, encoding, pixels (decoded)


async def connect_raw(address: str | tuple[str, int]) -> anyio.abc.SocketStream:
    if isinstance(address, str):
        return await anyio.connect_unix(address)
    return await anyio.connect_tcp(*address)


class RfbClient:
    """One connection, past ServerInit: ``width``, ``height``, ``format``, ``name``."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.format = PixelFormat()
        self.width = self.height = 0
        self.name = b""
        self.version = b""
        self._inflaters: dict[int, zlib._Decompress] = {}

    @classmethod
    async def connect(cls, address: str | tuple[str, int], *, version: bytes = b"RFB 003.008\n") -> RfbClient:
        client = cls(await connect_raw(address))
        await client.handshake(version)
        return client

    async def handshake(self, version: bytes = b"RFB 003.008\n") -> None:
        self.version = await self.read(12)
        assert self.version == b"RFB 003.008\n", self.version
        await self.send(version)
        if version in (b"RFB 003.003\n",):
            (security,) = struct.unpack(">I", await self.read(4))
            assert security == 1, security
        else:
            (count,) = await self.read(1)
            types = await self.read(count)
            assert types == b"\x01", types
            await self.send(b"\x01")
            if version != b"RFB 003.007\n":  # 3.8 and later: a SecurityResult for None too
                assert await self.read(4) == b"\0\0\0\0"
        await self.send(b"\x01")  # ClientInit: shared
        self.width, self.height = struct.unpack(">HH", await self.read(4))
        self.format = PixelFormat.unpack(await self.read(16))
        (length,) = struct.unpack(">I", await self.read(4))
        self.name = await self.read(length)

    async def read(self, size: int) -> bytes:
        return await self.reader.receive_exactly(size)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def aclose(self) -> None:
        await self.stream.aclose()

    # --- client messages --------------------------------------------------------------------
    async def set_pixel_format(self, fmt: PixelFormat) -> None:
        await self.send(b"\x00\x00\x00\x00" + fmt.pack())
        self.format = fmt

    async def set_encodings(self, encodings: list[int]) -> None:
        await self.send(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))

    async def request(self, incremental: bool = False, rect: tuple[int, int, int, int] | None = None) -> None:
        x, y, w, h = rect or (0, 0, self.width, self.height)
        await self.send(struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h))

    async def key(self, keysym: int, down: bool) -> None:
        await self.send(struct.pack(">BBxxI", 4, int(down), keysym))

    async def pointer(self, mask: int, x: int, y: int) -> None:
        await self.send(struct.pack(">BBHH", 5, mask, x, y))

    # --- server messages --------------------------------------------------------------------
    async def read_update(self) -> list[Rectangle]:
        """The next FramebufferUpdate, its rectangles decoded (pixels in the client's format)."""
        kind = await self.read(1)
        assert kind == b"\x00", kind
        (count,) = struct.unpack(">xH", await self.read(3))
        rects: list[Rectangle] = []
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await self.read(12))
            rects.append((x, y, w, h, encoding, await self._pixels(w, h, encoding)))
        return rects

    async def _pixels(self, width: int, height: int, encoding: int) -> bytes:
        bpp = self.format.bytes_per_pixel
        if encoding == Encoding.RAW:
            return await self.read(width * height * bpp)
        if encoding in (Encoding.ZLIB, Encoding.ZRLE):
            (length,) = struct.unpack(">I", await self.read(4))
            inflater = self._inflaters.setdefault(encoding, zlib.decompressobj())
            data = inflater.decompress(await self.read(length))
            return data if encoding == Encoding.ZLIB else self._zrle_tiles(data, width, height)
        if encoding == Encoding.QEMU_EXTENDED_KEY_EVENT:
            return b""
        raise AssertionError(f"unexpected encoding {encoding}")

    def _zrle_tiles(self, data: bytes, width: int, height: int) -> bytes:
        """Raw-subencoded ZRLE tiles back into rows of full pixels."""
        fmt = self.format
        bpp = fmt.bytes_per_pixel
        cpixel, pad_at = bpp, None
        if bpp == 4 and fmt.depth <= 24:
            used = fmt.red_max << fmt.red_shift | fmt.green_max << fmt.green_shift | fmt.blue_max << fmt.blue_shift
            if used < 1 << 24:
                cpixel, pad_at = 3, 0 if fmt.big_endian else 3
            elif not used & 0xFF:
                cpixel, pad_at = 3, 3 if fmt.big_endian else 0
        out = bytearray(width * height * bpp)
        at = 0
        for top in range(0, height, 64):
            rows = min(64, height - top)
            for left in range(0, width, 64):
                columns = min(64, width - left)
                assert data[at] == 0, f"subencoding {data[at]}"
                at += 1
                for row in range(rows):
                    for column in range(columns):
                        pixel = data[at : at + cpixel]
                        at += cpixel
                        if pad_at is not None:
                            pixel = pixel[:pad_at] + b"\0" + pixel[pad_at:]
                        offset = ((top + row) * width + left + column) * bpp
                        out[offset : offset + bpp] = pixel
        assert at == len(data)
        return bytes(out)

    async def closed(self) -> bool:
        """Whether the server closes the connection (reads until it does)."""
        try:
            while True:
                await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return True
