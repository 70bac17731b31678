"""A writer for the "newc" cpio archives Linux unpacks as an initramfs.

The format (Documentation/driver-api/early-userspace/buffer-format.rst): each
member is a 110-byte ASCII header of 13 hex fields after the magic ``070701``,
the NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes. The
archive ends with a member named ``TRAILER!!!``. We write it ourselves so that
building a test guest needs no ``cpio`` binary and the result is byte-for-byte
reproducible (fixed mtimes, inode numbers in order).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable

import attrs

__all__ = ["CpioEntry", "write_newc"]

_MAGIC = b"070701"


@attrs.frozen
class CpioEntry:
    """One archive member: a directory, a regular file, a symlink or a device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _member(ino: int, entry: CpioEntry) -> bytes:
    name = entry.name.lstrip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )  # fmt: skip
    header = _MAGIC + b"".join(b"%08X" % f for f in fields)
    return header + name + _pad4(len(header) + len(name)) + entry.data + _pad4(len(entry.data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Return a complete, uncompressed newc archive of ``entries`` (in order)."""
    out = bytearray()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        if not entry.name.strip("/"):
            raise ValueError("cpio member with an empty name")
        out += _member(ino, entry)
    out += _member(ino + 1, CpioEntry("TRAILER!!!", 0))
    return bytes(out)
