"""What every disk image format shares: the error, the request checks, the lock, the file IO.

``DiskImage`` does the part of a request that does not depend on the format -- the range
check, the read-only check, the closed check, the lock, turning an ``OSError`` into an
``ImageError`` -- and calls the subclass's ``_read``/``_write``/... with the lock held. A
request is therefore atomic with respect to every other request on the same image, which is
what the qcow2 metadata needs, and costs one uncontended lock for raw.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from types import TracebackType

from trivmm.errors import ConfigError

__all__ = ["ImageError", "DiskImage", "Buffer", "pread_exact", "preadv_exact", "pwrite_all"]

Buffer = bytes | bytearray | memoryview
_IOV_MAX = 1024  # preadv's limit on buffers per call


class ImageError(ConfigError):
    """A disk image that cannot be used, or a request it cannot serve; one line naming the file."""


class DiskImage:
    """A disk image of ``size`` bytes, served by synchronous, thread-safe requests.

    Every request raises ``ImageError`` when it cannot be served: past the end, read-only,
    closed, an IO error of the host, or image metadata found corrupt while serving it. The
    virtio-blk device turns that into VIRTIO_BLK_S_IOERR.
    """

    format = "?"

    def __init__(self, path: str, *, size: int, readonly: bool) -> None:
        self.path = path
        self.size = size
        self.readonly = readonly
        self.discard_granularity = 512  # discard acts on whole, aligned units of this size only
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.path!r} {self.size} bytes {mode}>"

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    # --- the requests ----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the disk from ``offset``."""
        self._check_range(offset, length)
        with self._lock:
            self._check_open()
            if length == 0:
                return b""
            try:
                return self._read(offset, length)
            except OSError as exc:
                raise self._os_error("read", exc) from exc

    def read_into(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` (writable byte views, in order) with the disk from ``offset``:
        a scatter read, straight into guest memory where the format allows (raw: one
        ``preadv``); otherwise ``read`` and copy."""
        length = sum(len(buffer) for buffer in buffers)
        self._check_range(offset, length)
        with self._lock:
            self._check_open()
            if length == 0:
                return
            try:
                self._read_into(offset, buffers, length)
            except OSError as exc:
                raise self._os_error("read", exc) from exc

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``."""
        length = memoryview(data).nbytes
        self._check_range(offset, length)
        with self._lock:
            self._check_writable("write")
            if length:
                try:
                    self._write(offset, memoryview(data).cast("B"))
                except OSError as exc:
                    raise self._os_error("write", exc) from exc

    def discard(self, offset: int, length: int) -> None:
        """Tell the image the range is no longer needed. What it reads afterwards is up to the
        format (virtio-blk leaves it unspecified); each subclass says what it does."""
        self._check_range(offset, length)
        with self._lock:
            self._check_writable("discard")
            if length:
                try:
                    self._discard(offset, length)
                except OSError as exc:
                    raise self._os_error("discard", exc) from exc

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make the range read as zeros. ``unmap`` (virtio-blk's flag) allows freeing the
        storage; each subclass says whether it keeps it without."""
        self._check_range(offset, length)
        with self._lock:
            self._check_writable("write zeroes")
            if length:
                try:
                    self._write_zeroes(offset, length, unmap)
                except OSError as exc:
                    raise self._os_error("write zeroes", exc) from exc

    def flush(self) -> None:
        """Make every completed write durable (fdatasync of each file written)."""
        with self._lock:
            self._check_open()
            if not self.readonly:
                try:
                    self._flush()
                except OSError as exc:
                    raise self._os_error("flush", exc) from exc

    def close(self) -> None:
        """Flush what was written and close the files; idempotent. Requests afterwards fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self.readonly:
                    self._flush()
            except OSError as exc:
                raise self._os_error("flush on close", exc) from exc
            finally:
                self._close()

    # --- for subclasses --------------------------------------------------------------------
    def _read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def _read_into(self, offset: int, buffers: Sequence[memoryview], length: int) -> None:
        """The default scatter read: ``_read``, then copies."""
        data = memoryview(self._read(offset, length))
        at = 0
        for buffer in buffers:
            buffer[:] = data[at : at + len(buffer)]
            at += len(buffer)

    def _write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def _discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def error(self, message: str) -> ImageError:
        """An ``ImageError`` about this image: ``"<path>: <message>"``."""
        return ImageError(f"{self.path}: {message}")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.error(f"request for {length} bytes at offset {offset} is outside the disk "
                             f"({self.size} bytes)")  # fmt: skip

    def _check_open(self) -> None:
        if self._closed:
            raise self.error("image is closed")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.readonly:
            raise self.error(f"{what} refused: the image is open read-only")

    def _os_error(self, what: str, exc: OSError) -> ImageError:
        reason = exc.strerror or str(exc)
        return self.error(f"{what} failed: {reason}")


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``; bytes past the end of the file read as zeros.

    One ``os.pread`` in the common case; a short read (end of file, or a signal) tries again
    for the rest, and only a read that returns nothing ends it with zeros."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def preadv_exact(fd: int, buffers: Sequence[memoryview], offset: int) -> None:
    """Fill ``buffers`` from ``offset`` with ``os.preadv``; bytes past the end of the file read
    as zeros. A short read (a signal, the end of the file) goes on from where it stopped, and
    only a read that returns nothing ends it with zeros."""
    pending = list(buffers)
    while pending:
        done = os.preadv(fd, pending[:_IOV_MAX], offset)
        offset += done
        if not done:
            for buffer in pending:
                buffer[:] = bytes(len(buffer))
            return
        while pending and done >= len(pending[0]):
            done -= len(pending[0])
            pending.pop(0)
        if done:
            pending[0] = pending[0][done:]


def pwrite_all(fd: int, data: Buffer, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less)."""
    view = memoryview(data).cast("B")
    done = os.pwrite(fd, view, offset)
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(0, "the host wrote nothing")
        done += n
