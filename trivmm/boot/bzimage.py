"""The Linux x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).

``SetupHeader.parse`` validates a bzImage before a byte of it reaches guest memory: the
0xAA55 boot flag, the "HdrS" magic, a protocol version with a 64-bit entry (2.12+,
XLF_KERNEL_64), and a setup size and payload that lie inside the file. The header is
untrusted input: every failure is a ``KernelImageError`` that says what is wrong -- also
from ``extract_vmlinux`` for a payload that is corrupt, cut short or unpacks to more than
``MAX_VMLINUX_SIZE``.

``extract_vmlinux`` unpacks the payload in this process, whatever of Linux's formats the
kernel was built with that is still in use on x86 -- gzip, xz, LZ4 and zstd -- each streamed
with a bound on what it may produce, so a hostile payload costs at most ``MAX_VMLINUX_SIZE``
bytes of output (plus the decoder's own state: an xz dictionary within ``XZ_MEMORY_MAX``, a
zstd window within ``ZSTD_WINDOW_MAX``). The payload's
last 4 bytes are the unpacked size (the kernel's build appends it; for gzip it is the
trailer's ISIZE): gzip, xz and zstd streams end, and check themselves, on their own and
the word is ignored; LZ4's legacy frame has neither an end nor a checksum, so there the
word ends the stream and must match what it unpacked to, as in the kernel's own boot code.
"""

from __future__ import annotations

import lzma
import struct
import zlib

import attrs
import lz4.block
import zstandard

from trivmm.errors import ConfigError

__all__ = ["KernelImageError", "MAX_VMLINUX_SIZE", "SetupHeader", "extract_vmlinux", "payload_compression"]

# Offsets (in the file and in boot_params) of the setup header fields we use.
_SETUP_SECTS = 0x1F1
_BOOT_FLAG = 0x1FE
_HEADER_MAGIC = 0x202
_VERSION = 0x206
_LOADFLAGS = 0x211
_INITRD_ADDR_MAX = 0x22C
_KERNEL_ALIGNMENT = 0x230
_RELOCATABLE = 0x234
_XLOADFLAGS = 0x236
_CMDLINE_SIZE = 0x238
_PAYLOAD_OFFSET = 0x248
_PAYLOAD_LENGTH = 0x24C
_PREF_ADDRESS = 0x258
_INIT_SIZE = 0x260
_HDRS = 0x5372_6448  # "HdrS"
_LOADED_HIGH = 0x01
_XLF_KERNEL_64 = 0x01
_MIN_VERSION = 0x020C  # 2.12: xloadflags, 64-bit entry at +0x200
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib with gzip framing
MAX_VMLINUX_SIZE = 1 << 30  # an unpacked payload larger than this is refused, not unpacked
# Payload formats by magic, as Linux's compressed/ boot code knows them (lib/decompress.c).
_MAGICS = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),  # the LZ4 *legacy* frame: 0x184C2102
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzo", b"\x89LZO"),
    ("lzma", b"\x5d\x00\x00"),
)
# LZ4 legacy frame (lib/decompress_unlz4.c): the magic, then blocks, each a 4-byte LE
# compressed length and an LZ4 block that unpacks to at most 8 MiB (every block but the
# last to exactly that); a length word equal to the magic starts another frame, 0 ends it.
_LZ4_LEGACY_MAGIC = 0x184C_2102
_LZ4_BLOCK_MAX = 8 << 20
_LZ4_BLOCK_BOUND = _LZ4_BLOCK_MAX + _LZ4_BLOCK_MAX // 255 + 16  # LZ4_compressBound(8 MiB)
# One byte of an LZ4 block yields at most 255 bytes of output (a match-length extension
# byte); sizing each block's buffer by it keeps a tiny hostile block from costing 8 MiB.
_LZ4_MAX_RATIO = 255
# xz: Linux builds its payload with a 32 MiB dictionary (scripts/xz_wrap.sh), which the
# decoder allocates; a stream may declare up to 4 GiB, so the decoder's memory is capped.
XZ_MEMORY_MAX = 1 << 27
# zstd: Linux builds its payload with `zstd -22 --ultra` (a 128 MiB window, which a
# streaming decoder must hold); nothing may ask for more.
ZSTD_WINDOW_MAX = 1 << 27
_ZSTD_BLOCK_RLE = 1
_ZSTD_BLOCK_RESERVED = 3
_ZSTD_CHECKSUM_FLAG = 0x04
_READ_CHUNK = 1 << 20  # bytes of zstd output taken per read


class KernelImageError(ConfigError):
    """The kernel file is not a bootable image; the message says why."""


@attrs.frozen
class SetupHeader:
    """The fields of a validated bzImage setup header that a loader needs."""

    version: int
    setup_size: int  # bytes of real-mode setup before the protected-mode kernel
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    raw: bytes  # the header bytes from 0x1f1 to its end, to copy into the zero page

    @classmethod
    def parse(cls, image: bytes) -> SetupHeader:
        if len(image) < 0x264 + 4:
            raise KernelImageError(f"file too short for a bzImage ({len(image)} bytes)")
        (boot_flag,) = struct.unpack_from("<H", image, _BOOT_FLAG)
        (magic,) = struct.unpack_from("<I", image, _HEADER_MAGIC)
        if boot_flag != 0xAA55 or magic != _HDRS:
            raise KernelImageError("not a Linux bzImage (no 0xAA55 boot flag / 'HdrS' magic)")
        (version,) = struct.unpack_from("<H", image, _VERSION)
        if version < _MIN_VERSION:
            raise KernelImageError(f"boot protocol {version >> 8}.{version & 0xFF} is too old (need 2.12+)")
        setup_sects = image[_SETUP_SECTS] or 4
        setup_size = (setup_sects + 1) * 512
        if setup_size >= len(image):
            raise KernelImageError(f"setup ({setup_size} bytes) does not fit the {len(image)}-byte file")
        (xloadflags,) = struct.unpack_from("<H", image, _XLOADFLAGS)
        if not xloadflags & _XLF_KERNEL_64:
            raise KernelImageError("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
        loadflags = image[_LOADFLAGS]
        if not loadflags & _LOADED_HIGH:
            raise KernelImageError("kernel does not load at 1 MiB (LOADED_HIGH clear): zImage is unsupported")
        payload_offset, payload_length = struct.unpack_from("<II", image, _PAYLOAD_OFFSET)
        if setup_size + payload_offset + payload_length > len(image):
            raise KernelImageError("compressed payload runs past the end of the file (truncated image?)")
        header_end = 0x202 + image[0x201]  # the jump at 0x200 skips the header
        (init_size,) = struct.unpack_from("<I", image, _INIT_SIZE)
        return cls(
            version=version,
            setup_size=setup_size,
            loadflags=loadflags,
            initrd_addr_max=struct.unpack_from("<I", image, _INITRD_ADDR_MAX)[0],
            kernel_alignment=struct.unpack_from("<I", image, _KERNEL_ALIGNMENT)[0],
            relocatable=bool(image[_RELOCATABLE]),
            xloadflags=xloadflags,
            cmdline_size=struct.unpack_from("<I", image, _CMDLINE_SIZE)[0],
            payload_offset=payload_offset,
            payload_length=payload_length,
            pref_address=struct.unpack_from("<Q", image, _PREF_ADDRESS)[0],
            init_size=init_size,
            raw=bytes(image[_SETUP_SECTS:header_end]),
        )


def payload_compression(image: bytes) -> str:
    """The name of the compression of a bzImage's payload ("gzip", "xz", "lz4", "zstd",
    "bzip2", "lzo", "lzma"); ``KernelImageError`` for an image that is not a bzImage or a
    payload of none of these."""
    header = SetupHeader.parse(image)
    start = header.setup_size + header.payload_offset
    return _compression(image[start : start + 8])


def _compression(head: bytes) -> str:
    for name, magic in _MAGICS:
        if head.startswith(magic):
            return name
    raise KernelImageError(f"unknown payload compression (magic {head[:4].hex()})")


def _unpack_gzip_xz(kind: str, payload: memoryview) -> bytes:
    """Unpack one gzip or xz stream (the kernel appends its size after it), at most
    ``MAX_VMLINUX_SIZE`` bytes of it."""
    unpacker: zlib._Decompress | lzma.LZMADecompressor
    if kind == "gzip":
        unpacker = zlib.decompressobj(_GZIP_WBITS)
    else:
        unpacker = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMORY_MAX)
    try:
        data = unpacker.decompress(payload, MAX_VMLINUX_SIZE + 1)
    except (zlib.error, lzma.LZMAError) as exc:
        raise KernelImageError(f"{kind} payload is corrupt: {exc}") from None
    if len(data) > MAX_VMLINUX_SIZE:
        raise _too_large(kind)
    if not unpacker.eof:
        raise KernelImageError(f"{kind} payload is cut short (truncated image?)")
    return data


def _too_large(kind: str) -> KernelImageError:
    return KernelImageError(f"{kind} payload unpacks to more than {MAX_VMLINUX_SIZE >> 20} MiB")


def _unpack_lz4(payload: memoryview) -> bytes:
    """Unpack an LZ4 legacy frame as the kernel's own boot code does (lib/decompress_unlz4.c
    with arch/x86/boot/compressed/mkpiggy.c): the payload's last 4 bytes are the unpacked
    size, the blocks before them run to that word or to a zero length word, and what they
    unpack to must be exactly that size -- the frame has no end mark or checksum of its own,
    so this is what tells a payload cut at a block's end from a whole one."""
    end = len(payload) - 4
    if end < 4:
        raise KernelImageError("lz4 payload is cut short (truncated image?)")
    (expected,) = struct.unpack_from("<I", payload, end)
    if expected > MAX_VMLINUX_SIZE:
        raise _too_large("lz4")
    blocks: list[bytes] = []
    unpacked = 0
    pos = 4
    while pos < end:
        if end - pos < 4:
            raise KernelImageError(f"lz4 payload is corrupt: {end - pos} stray bytes at offset {pos}")
        (length,) = struct.unpack_from("<I", payload, pos)
        if length == _LZ4_LEGACY_MAGIC:  # another frame follows, as concatenated frames do
            pos += 4
            continue
        if length == 0:
            break
        if length > _LZ4_BLOCK_BOUND:
            raise KernelImageError(f"lz4 payload is corrupt: a block at offset {pos} claims {length} bytes "
                                   f"(at most {_LZ4_BLOCK_BOUND})")  # fmt: skip
        if length > end - pos - 4:
            raise KernelImageError("lz4 payload is cut short (truncated image?)")
        room = min(_LZ4_BLOCK_MAX, length * _LZ4_MAX_RATIO)
        try:
            block = lz4.block.decompress(payload[pos + 4 : pos + 4 + length], uncompressed_size=room)
        except lz4.block.LZ4BlockError as exc:
            raise KernelImageError(f"lz4 payload is corrupt: the block at offset {pos}: {exc}") from None
        unpacked += len(block)
        if unpacked > expected:
            raise KernelImageError(f"lz4 payload is corrupt: it unpacks to more than the {expected} bytes "
                                   "its size word says")  # fmt: skip
        blocks.append(block)
        pos += 4 + length
    if unpacked != expected:
        raise KernelImageError(f"lz4 payload is cut short or corrupt: it unpacks to {unpacked} bytes, "
                               f"its size word says {expected}")  # fmt: skip
    return b"".join(blocks)


def _zstd_frame_length(payload: memoryview) -> int:
    """The length of the zstd frame at the start of ``payload``, walked block by block
    (RFC 8878 section 3.1.1), so that a frame cut short is an error and the size word
    after it is not taken for a second frame."""
    try:
        pos = zstandard.frame_header_size(payload)
    except zstandard.ZstdError as exc:
        raise KernelImageError(f"zstd payload is corrupt: {exc}") from None
    checksum = payload[4] & _ZSTD_CHECKSUM_FLAG
    end = len(payload)
    last = False
    while not last:
        if end - pos < 3:
            raise KernelImageError("zstd payload is cut short (truncated image?)")
        header = payload[pos] | payload[pos + 1] << 8 | payload[pos + 2] << 16
        last, kind, size = bool(header & 1), (header >> 1) & 3, header >> 3
        if kind == _ZSTD_BLOCK_RESERVED:
            raise KernelImageError(f"zstd payload is corrupt: reserved block type at offset {pos}")
        pos += 3 + (1 if kind == _ZSTD_BLOCK_RLE else size)
    pos += 4 if checksum else 0
    if pos > end:
        raise KernelImageError("zstd payload is cut short (truncated image?)")
    return pos


def _unpack_zstd(payload: memoryview) -> bytes:
    """Unpack the one zstd frame of the payload, a bounded read at a time."""
    limit = MAX_VMLINUX_SIZE
    frame = payload[: _zstd_frame_length(payload)]
    chunks: list[bytes] = []
    total = 0
    try:
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_MAX)
        with decompressor.stream_reader(frame, read_across_frames=False) as reader:
            while chunk := reader.read(_READ_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise _too_large("zstd")
                chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise KernelImageError(f"zstd payload is corrupt: {exc}") from None
    return b"".join(chunks)


def extract_vmlinux(image: bytes) -> bytes:
    """Return the uncompressed vmlinux ELF inside a bzImage (gzip, xz, lz4 or zstd)."""
    header = SetupHeader.parse(image)
    start = header.setup_size + header.payload_offset
    payload = memoryview(image)[start : start + header.payload_length]
    kind = _compression(bytes(payload[:8]))
    if kind in ("gzip", "xz"):
        data = _unpack_gzip_xz(kind, payload)
    elif kind == "lz4":
        data = _unpack_lz4(payload)
    elif kind == "zstd":
        data = _unpack_zstd(payload)
    else:
        raise KernelImageError(f"{kind} payloads are not supported (gzip, xz, lz4 and zstd are)")
    if data[:4] != b"\x7fELF":
        raise KernelImageError("unpacked payload is not an ELF file")
    return data
