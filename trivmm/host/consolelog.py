"""A VM's console output on disk, bounded: the newest bytes are kept, the oldest dropped."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ConsoleLog", "CONSOLE_LOG_LIMIT"]

CONSOLE_LOG_LIMIT = 1 << 20  # bytes on disk, at most (a little more while a write lands)


class ConsoleLog:
    """Appends to ``path`` (0600); once it holds more than ``limit`` bytes it is rewritten
    (atomically, by a rename) to its newest ``limit // 2`` bytes, so appends stay cheap."""

    def __init__(self, path: Path, limit: int = CONSOLE_LOG_LIMIT) -> None:
        if limit < 2:
            raise ValueError("a console log needs a limit of 2 bytes or more")
        self.path = path
        self.limit = limit
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size
        if self.size > limit:
            self._truncate()

    def write(self, data: bytes) -> None:
        if self._fd < 0:
            return
        if len(data) > self.limit:
            data = data[-self.limit :]
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        if self.size > self.limit:
            self._truncate()

    def _truncate(self) -> None:
        keep = tail(self.path, self.limit // 2)
        scratch = self.path.with_name(self.path.name + ".new")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, keep)
        finally:
            os.close(fd)
        os.replace(scratch, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.size = len(keep)

    def tail(self, size: int) -> bytes:
        return tail(self.path, size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of the file at ``path`` (b"" if there is none)."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - size))
            return file.read(size)
    except FileNotFoundError:
        return b""
