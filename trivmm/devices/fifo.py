"""Fixed-capacity byte FIFOs for everything a guest (or the host side) can feed a device.

A guest that writes faster than anything drains must not grow the VMM's memory: real
hardware has a FIFO of a fixed depth and loses what does not fit, and so do these. Every
loss is counted (``dropped``) and logged with its reason, the first time and then at each
power of two, so a flooding guest cannot flood the log either.

Not thread-safe by itself: a device keeps its FIFOs behind its own lock.
"""

from __future__ import annotations

import collections
import logging

__all__ = ["ByteFifo", "DropCounter"]


class DropCounter:
    """Counts dropped items and logs at the 1st, 2nd, 4th, 8th ... drop."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self.dropped = 0

    def add(self, count: int, reason: str) -> None:
        if count <= 0:
            return
        before = self.dropped
        self.dropped += count
        # Log when the total crosses a power of two: O(log n) lines for n drops.
        if before == 0 or before.bit_length() != self.dropped.bit_length():
            self._logger.warning("%s: dropped %d byte(s) so far (%s)", self._what, self.dropped, reason)


class ByteFifo:
    """A FIFO of at most ``capacity`` bytes; ``push`` keeps what fits and counts the rest."""

    def __init__(self, capacity: int, drops: DropCounter) -> None:
        if capacity <= 0:
            raise ValueError(f"FIFO capacity must be positive, not {capacity}")
        self.capacity = capacity
        self._items: collections.deque[int] = collections.deque()
        self._drops = drops

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def room(self) -> int:
        return self.capacity - len(self._items)

    @property
    def dropped(self) -> int:
        return self._drops.dropped

    def push(self, data: bytes | bytearray | memoryview, reason: str = "FIFO full") -> int:
        """Append what fits of ``data``; return how many bytes were taken."""
        taken = min(self.room, len(data))
        self._items.extend(data[:taken])
        self._drops.add(len(data) - taken, reason)
        return taken

    def pop(self) -> int | None:
        return self._items.popleft() if self._items else None

    def clear(self) -> None:
        self._items.clear()

    def peek_all(self) -> bytes:
        return bytes(self._items)
