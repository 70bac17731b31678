"""An address space (PIO or MMIO) of non-overlapping ranges, each served by one device.

Registration is strict: an empty range, one that runs past the space's limit, and one that
overlaps another are refused. Dispatch is forgiving, as hardware is: an address nobody
claims reads as all-ones and swallows writes, and so does an access that starts inside a
range but runs past its end (the device is never asked to handle bytes it does not own).
Devices see offsets from the start of their range, never absolute addresses.

Dispatch runs on vCPU threads, once per exit, so it is kept lean: a bisect over range
starts, with the last hit cached (a guest tends to hammer one device).
"""

from __future__ import annotations

import bisect
import threading
from typing import Protocol

import attrs

__all__ = ["AddressSpace", "BusDevice", "BusRange", "BusError", "PIO_LIMIT", "MMIO_LIMIT"]

PIO_LIMIT = 1 << 16
MMIO_LIMIT = 1 << 64


class BusError(ValueError):
    """A registration the address space refuses."""


class BusDevice(Protocol):
    """What a device offers the bus. Both run on a vCPU thread: no blocking, no awaits."""

    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` (1, 2, 4 or 8 bytes) with the register value at ``offset``.

        ``data`` is a view into KVM's run page, valid only during the call."""

    def write(self, offset: int, data: memoryview) -> None:
        """Take the bytes in ``data`` written at ``offset``."""


@attrs.frozen
class BusRange:
    base: int
    size: int
    device: BusDevice = attrs.field(eq=False)
    end: int = attrs.field(init=False, eq=False)

    @end.default
    def _end(self) -> int:
        return self.base + self.size


class AddressSpace:
    """A PIO or MMIO address space. ``read``/``write`` return whether a device took it."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._last: BusRange | None = None
        self._lock = threading.Lock()  # registration only; dispatch reads immutable lists
        # Bumped by every insert/remove, so a dispatcher that caches a range (the vCPU
        # loop does, for the port it last hit) knows when its cache is stale.
        self.generation = 0

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name}: {len(self._ranges)} ranges>"

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return tuple(self._ranges)

    def insert(self, base: int, size: int, device: BusDevice) -> BusRange:
        if size <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        if base < 0 or base + size > self.limit:
            raise BusError(f"{self.name}: range {base:#x}+{size:#x} is outside 0..{self.limit:#x}")
        new = BusRange(base, size, device)
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            for neighbour in self._ranges[max(i - 1, 0) : i + 1]:
                if neighbour.base < new.end and base < neighbour.end:
                    raise BusError(f"{self.name}: range {base:#x}+{size:#x} overlaps "
                                   f"{neighbour.base:#x}+{neighbour.size:#x}")  # fmt: skip
            # Build new lists and swap them in: a vCPU thread dispatching concurrently sees
            # either the old or the new table, never a half-updated one.
            self._ranges = [*self._ranges[:i], new, *self._ranges[i:]]
            self._bases = [r.base for r in self._ranges]
            self.generation += 1
        return new

    def remove(self, base: int) -> BusDevice:
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise BusError(f"{self.name}: no range starts at {base:#x}")
            removed = self._ranges[i]
            self._ranges = self._ranges[:i] + self._ranges[i + 1 :]
            self._bases = [r.base for r in self._ranges]
            self._last = None
            self.generation += 1
        return removed.device

    def find(self, address: int) -> BusRange | None:
        last = self._last
        if last is not None and last.base <= address < last.end:
            return last
        bases = self._bases
        i = bisect.bisect_right(bases, address) - 1
        if i >= 0:
            candidate = self._ranges[i]
            if address < candidate.end:
                self._last = candidate
                return candidate
        return None

    def read(self, address: int, data: memoryview) -> bool:
        r = self._last
        if r is None or not r.base <= address < r.end:
            r = self.find(address)
        if r is not None and address + len(data) <= r.end:
            r.device.read(address - r.base, data)
            return True
        data[:] = b"\xff" * len(data)
        return False

    def write(self, address: int, data: memoryview) -> bool:
        r = self._last
        if r is None or not r.base <= address < r.end:
            r = self.find(address)
        if r is not None and address + len(data) <= r.end:
            r.device.write(address - r.base, data)
            return True
        return False
