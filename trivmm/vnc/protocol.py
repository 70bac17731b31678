"""RFB (the VNC protocol, RFC 6143, version 3.8) pieces the server needs: message layouts,
pixel formats and their conversion, and the rectangle encodings (Raw, Zlib, ZRLE).

Pixels come from the display as XRGB8888 (``NATIVE_FORMAT``: 32 bits, little-endian,
red at bit 16). A client may ask for any true-colour format of 8, 16 or 32 bits a pixel:
32-bit formats with 8-bit channels on byte boundaries (what clients use: noVNC, TigerVNC,
vncdotool) are a byte shuffle done by slice assignment; other true-colour formats go
through per-channel tables, pixel by pixel (slower; documented in docs/display.md).
Colour-map formats are refused (``UnsupportedFormat``).
"""

from __future__ import annotations

import array
import struct
import sys
import zlib

import attrs

__all__ = ["PixelFormat", "NATIVE_FORMAT", "UnsupportedFormat", "convert", "Encoding", "encode_rect",
           "ZlibStream", "VERSION_3_3", "VERSION_3_7", "VERSION_3_8", "parse_version", "SecurityType",
           "ClientMessage", "CLIENT_MESSAGE_SIZES", "rect_header", "update_header"]  # fmt: skip

VERSION_3_3, VERSION_3_7, VERSION_3_8 = (3, 3), (3, 7), (3, 8)
_PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
_RECT = struct.Struct(">HHHHi")
_UPDATE = struct.Struct(">BxH")
_U32 = struct.Struct(">I")


class SecurityType:
    INVALID = 0
    NONE = 1
    VNC_AUTH = 2


class ClientMessage:
    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    FRAMEBUFFER_UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6
    QEMU = 255  # QEMU's client messages: subtype 0 is the extended key event


# Bytes after the type byte of each fixed-size message; SetEncodings and ClientCutText have a
# fixed part given here and a counted tail.
CLIENT_MESSAGE_SIZES = {
    ClientMessage.SET_PIXEL_FORMAT: 19,
    ClientMessage.SET_ENCODINGS: 3,
    ClientMessage.FRAMEBUFFER_UPDATE_REQUEST: 9,
    ClientMessage.KEY_EVENT: 7,
    ClientMessage.POINTER_EVENT: 5,
    ClientMessage.CLIENT_CUT_TEXT: 7,
    ClientMessage.QEMU: 1,
}
QEMU_EXTENDED_KEY_EVENT = 0  # subtype; 10 more bytes: u16 down, u32 keysym, u32 XT keycode


class Encoding:
    RAW = 0
    ZLIB = 6
    ZRLE = 16
    DESKTOP_SIZE = -223
    QEMU_EXTENDED_KEY_EVENT = -258


class UnsupportedFormat(ValueError):
    """A pixel format the server does not convert to (a colour map, an odd depth)."""


def parse_version(line: bytes) -> tuple[int, int]:
    """The client's ``RFB xxx.yyy\\n`` -> the version the server speaks with it: 3.8 and
    later as 3.8, 3.7 as 3.7, anything else as 3.3 (RFC 6143, 7.1.1); ``ValueError`` if it
    is not a version line at all."""
    if len(line) != 12 or line[:4] != b"RFB " or line[7:8] != b"." or line[11:] != b"\n" \
            or not line[4:7].isdigit() or not line[8:11].isdigit():  # fmt: skip
        raise ValueError(f"not an RFB version line: {line[:12]!r}")
    major, minor = int(line[4:7]), int(line[8:11])
    if major != 3:
        raise ValueError(f"RFB version {major}.{minor} is not 3.x")
    if minor >= 8:
        return VERSION_3_8
    return VERSION_3_7 if minor == 7 else VERSION_3_3


@attrs.frozen
class PixelFormat:
    """RFB's PIXEL_FORMAT: bits per pixel, depth, byte order, true colour, and each
    channel's maximum and shift."""

    bits_per_pixel: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> PixelFormat:
        bpp, depth, big, true_colour, rmax, gmax, bmax, rshift, gshift, bshift = _PIXEL_FORMAT.unpack(data)
        return cls(bpp, depth, bool(big), bool(true_colour), rmax, gmax, bmax, rshift, gshift, bshift)

    def pack(self) -> bytes:
        return _PIXEL_FORMAT.pack(self.bits_per_pixel, self.depth, int(self.big_endian), int(self.true_colour),
                                  self.red_max, self.green_max, self.blue_max, self.red_shift, self.green_shift,
                                  self.blue_shift)  # fmt: skip

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def check(self) -> None:
        """``UnsupportedFormat`` unless pixels can be converted to this format."""
        if not self.true_colour:
            raise UnsupportedFormat("colour-map pixel formats are not supported (ask for true colour)")
        if self.bits_per_pixel not in (8, 16, 32):
            raise UnsupportedFormat(f"{self.bits_per_pixel} bits per pixel is not 8, 16 or 32")
        for name in ("red", "green", "blue"):
            top, shift = getattr(self, f"{name}_max"), getattr(self, f"{name}_shift")
            if top == 0 or top & (top + 1) or top.bit_length() + shift > self.bits_per_pixel:
                raise UnsupportedFormat(f"{name} max {top} << {shift} does not fit {self.bits_per_pixel} bits")

    def byte_positions(self) -> tuple[int, int, int] | None:
        """Where red, green and blue sit in each 4-byte pixel, if this is a 32-bit format
        with 8-bit channels on byte boundaries (the fast path); else None."""
        if self.bits_per_pixel != 32 or (self.red_max, self.green_max, self.blue_max) != (255, 255, 255):
            return None
        shifts = (self.red_shift, self.green_shift, self.blue_shift)
        if any(shift % 8 or shift > 24 for shift in shifts) or len(set(shifts)) != 3:
            return None
        return tuple((3 - s // 8) if self.big_endian else s // 8 for s in shifts)  # type: ignore[return-value]


NATIVE_FORMAT = PixelFormat()  # the display's XRGB8888
_NATIVE_POSITIONS = (2, 1, 0)  # red, green, blue byte of a native pixel


def convert(pixels: bytes, target: PixelFormat) -> bytes:
    """``pixels`` (native XRGB8888) in ``target``'s format (``check()``-ed before)."""
    if target == NATIVE_FORMAT:
        return pixels
    positions = target.byte_positions()
    if positions is not None:
        out = bytearray(len(pixels))
        for dst, src in zip(positions, _NATIVE_POSITIONS, strict=True):
            out[dst::4] = pixels[src::4]
        return bytes(out)
    return _convert_slow(pixels, target)


def _convert_slow(pixels: bytes, target: PixelFormat) -> bytes:
    """Any true-colour format: each channel scaled through a 256-entry table."""
    tables = [[(v * top + 127) // 255 << shift for v in range(256)] for top, shift in (
        (target.red_max, target.red_shift), (target.green_max, target.green_shift),
        (target.blue_max, target.blue_shift))]  # fmt: skip
    red, green, blue = tables
    values = [red[r] | green[g] | blue[b] for b, g, r in zip(pixels[0::4], pixels[1::4], pixels[2::4], strict=True)]
    if target.bits_per_pixel == 8:
        return bytes(values)
    out = array.array("H" if target.bits_per_pixel == 16 else "I", values)
    if target.big_endian != (sys.byteorder == "big"):
        out.byteswap()
    return out.tobytes()


def update_header(rects: int) -> bytes:
    """A FramebufferUpdate message's header, announcing ``rects`` rectangles."""
    return _UPDATE.pack(0, rects)


def rect_header(x: int, y: int, width: int, height: int, encoding: int) -> bytes:
    return _RECT.pack(x, y, width, height, encoding)


class ZlibStream:
    """One connection's zlib stream (the Zlib and ZRLE encodings each keep one for the
    connection's life: the client inflates with one z_stream)."""

    def __init__(self, level: int = 1) -> None:
        self._compressor = zlib.compressobj(level)

    def compress(self, data: bytes) -> bytes:
        return self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)


def encode_rect(pixels: bytes, width: int, height: int, fmt: PixelFormat, encoding: int,
                streams: dict[int, ZlibStream]) -> bytes:  # fmt: skip
    """One rectangle's data (after its header) in ``encoding``; ``pixels`` are native."""
    if encoding == Encoding.ZRLE:
        return _zrle(pixels, width, height, fmt, streams.setdefault(Encoding.ZRLE, ZlibStream()))
    data = convert(pixels, fmt)
    if encoding == Encoding.ZLIB:
        packed = streams.setdefault(Encoding.ZLIB, ZlibStream()).compress(data)
        return _U32.pack(len(packed)) + packed
    return data


_ZRLE_TILE = 64


def _zrle(pixels: bytes, width: int, height: int, fmt: PixelFormat, stream: ZlibStream) -> bytes:
    """ZRLE: 64x64 tiles, each sent raw (subencoding 0) in compact pixels (CPIXEL: three
    bytes for a 32-bit true-colour format whose channels fit in 24 bits), all deflated."""
    data = convert(pixels, fmt)
    bpp = fmt.bytes_per_pixel
    drop = None  # which byte of each 32-bit pixel a CPIXEL leaves out
    if bpp == 4 and fmt.depth <= 24:
        used = max(fmt.red_max << fmt.red_shift, fmt.green_max << fmt.green_shift, fmt.blue_max << fmt.blue_shift)
        if used < 1 << 24:
            drop = 0 if fmt.big_endian else 3
        elif not (fmt.red_max << fmt.red_shift | fmt.green_max << fmt.green_shift
                  | fmt.blue_max << fmt.blue_shift) & 0xFF:  # fmt: skip
            drop = 3 if fmt.big_endian else 0
    row_bytes = width * bpp
    out: list[bytes] = []
    for top in range(0, height, _ZRLE_TILE):
        rows = min(_ZRLE_TILE, height - top)
        for left in range(0, width, _ZRLE_TILE):
            columns = min(_ZRLE_TILE, width - left)
            start, span = top * row_bytes + left * bpp, columns * bpp
            tile = b"".join(data[at : at + span] for at in range(start, start + rows * row_bytes, row_bytes))
            if drop is not None:
                tile = _drop_byte(tile, drop)
            out.append(b"\x00")
            out.append(tile)
    packed = stream.compress(b"".join(out))
    return _U32.pack(len(packed)) + packed


def _drop_byte(tile: bytes, drop: int) -> bytes:
    """Each 4-byte pixel of ``tile`` without its byte ``drop`` (a CPIXEL)."""
    out = bytearray(len(tile) // 4 * 3)
    kept = [i for i in range(4) if i != drop]
    for dst, src in enumerate(kept):
        out[dst::3] = tile[src::4]
    return bytes(out)
