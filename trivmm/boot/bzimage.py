"""The Linux x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).

``SetupHeader.parse`` validates a bzImage before a byte of it reaches guest memory: the
0xAA55 boot flag, the "HdrS" magic, a protocol version with a 64-bit entry (2.12+,
XLF_KERNEL_64), and a setup size and payload that lie inside the file. The header is
untrusted input: every failure is a ``KernelImageError`` that says what is wrong -- also
from ``extract_vmlinux`` for a payload that is corrupt, cut short or unpacks to more than
``MAX_VMLINUX_SIZE``.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib

import attrs

from trivmm.errors import ConfigError

__all__ = ["KernelImageError", "MAX_VMLINUX_SIZE", "SetupHeader", "extract_vmlinux"]

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


def _decompress_with(tool: str, data: bytes) -> bytes:
    if shutil.which(tool) is None:
        raise KernelImageError(f"payload needs the '{tool}' program to unpack (Debian package {tool})")
    proc = subprocess.run([tool, "-dc"], input=data, capture_output=True)
    # lz4/zstd stop at the payload's end but may complain about the trailing size word.
    if not proc.stdout:
        raise KernelImageError(f"{tool} could not unpack the payload: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _unpack_in_process(kind: str, payload: bytes) -> bytes:
    """Unpack one gzip or xz stream (the kernel appends its size after it), at most
    ``MAX_VMLINUX_SIZE`` bytes of it."""
    unpacker = zlib.decompressobj(_GZIP_WBITS) if kind == "gzip" else lzma.LZMADecompressor()
    try:
        data = unpacker.decompress(payload, MAX_VMLINUX_SIZE + 1)
    except (zlib.error, lzma.LZMAError) as exc:
        raise KernelImageError(f"{kind} payload is corrupt: {exc}") from None
    if len(data) > MAX_VMLINUX_SIZE:
        raise KernelImageError(f"{kind} payload unpacks to more than {MAX_VMLINUX_SIZE >> 20} MiB")
    if not unpacker.eof:
        raise KernelImageError(f"{kind} payload is cut short (truncated image?)")
    return data


def extract_vmlinux(image: bytes) -> bytes:
    """Return the uncompressed vmlinux ELF inside a bzImage (gzip, xz, lz4 or zstd)."""
    header = SetupHeader.parse(image)
    start = header.setup_size + header.payload_offset
    payload = image[start : start + header.payload_length]
    if payload[:2] == b"\x1f\x8b":
        data = _unpack_in_process("gzip", payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        data = _unpack_in_process("xz", payload)
    elif payload[:4] == b"\x02\x21\x4c\x18":
        data = _decompress_with("lz4", payload)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        data = _decompress_with("zstd", payload)
    else:
        raise KernelImageError(f"unknown payload compression (magic {payload[:4].hex()})")
    if data[:4] != b"\x7fELF":
        raise KernelImageError("unpacked payload is not an ELF file")
    return data
