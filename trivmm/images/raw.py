"""Raw images: the file's bytes are the disk's bytes.

A read is one ``os.pread``, a write one ``os.pwrite`` (more only if the host returns short).
``discard`` punches a hole (``fallocate(FALLOC_FL_PUNCH_HOLE)``), so the range reads as
zeros afterwards; where the file system cannot punch holes it does nothing (a discard is a
hint). ``write_zeroes`` uses ``FALLOC_FL_ZERO_RANGE`` (or a punched hole with ``unmap``),
and writes zeros where neither is supported. A regular file's size is its size at open; a
block device's is where ``lseek(SEEK_END)`` lands.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from trivmm.images._base import DiskImage, ImageError, pread_exact, preadv_exact, pwrite_all
from trivmm.images.probe import PROBE_BYTES, probe_problem

__all__ = ["RawImage"]

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20  # bytes of zeros written per pwrite where fallocate cannot zero
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """Linux fallocate(2); False where the file (system) does not support ``mode``."""
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err))


class RawImage(DiskImage):
    """A raw file or block device. ``probed``: opened without ``format="raw"`` (see probe.py)."""

    format = "raw"

    def __init__(self, path: str, fd: int, *, size: int, readonly: bool, probed: bool) -> None:
        super().__init__(path, size=size, readonly=readonly)
        self._fd = fd
        self._probed = probed
        self._punch = True  # cleared once the file system says it cannot punch holes
        self._zero_range = True

    @classmethod
    def open(cls, path: str, *, readonly: bool, probed: bool) -> RawImage:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ImageError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise ImageError(f"{path}: cannot find the size: {exc.strerror or exc}") from exc
        return cls(path, fd, size=size, readonly=readonly, probed=probed)

    def _read(self, offset: int, length: int) -> bytes:
        return pread_exact(self._fd, length, offset)

    def _read_into(self, offset: int, buffers: Sequence[memoryview], length: int) -> None:
        preadv_exact(self._fd, buffers, offset)

    def _write(self, offset: int, data: memoryview) -> None:
        if self._probed and offset < PROBE_BYTES:
            self._check_first_sector(offset, data)
        pwrite_all(self._fd, data, offset)

    def _check_first_sector(self, offset: int, data: memoryview) -> None:
        head = bytearray(pread_exact(self._fd, min(PROBE_BYTES, self.size), 0))
        piece = data[: len(head) - offset]
        head[offset : offset + len(piece)] = piece
        problem = probe_problem(bytes(head))
        if problem is not None:
            raise self.error(f"write refused: it would make the image, opened as raw by probing, look like "
                             f"{problem} (open it with format='raw' to allow this)")  # fmt: skip

    def _discard(self, offset: int, length: int) -> None:
        if self._punch:
            self._punch = fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if unmap and self._punch:
            if fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                return
            self._punch = False
        if self._zero_range:
            if fallocate(self._fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length):
                return
            self._zero_range = False
        if self._punch:
            if fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                return
            self._punch = False
        zeros = bytes(min(length, _ZERO_CHUNK))
        done = 0
        while done < length:
            n = min(len(zeros), length - done)
            pwrite_all(self._fd, memoryview(zeros)[:n], offset + done)
            done += n

    def _flush(self) -> None:
        os.fdatasync(self._fd)

    def _close(self) -> None:
        os.close(self._fd)
