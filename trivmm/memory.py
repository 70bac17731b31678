"""Guest physical memory: private mmap regions, every access bounds-checked.

A guest-physical address (GPA) is untrusted: it comes from descriptors, registers and
boot structures the guest controls. ``GuestMemory`` resolves ``(gpa, length)`` to one
region with checked arithmetic -- negative values, ``gpa + length`` past the region's end
or past 2**64, and ranges that straddle two regions are all ``GuestMemoryError``. Views
are zero-copy ``memoryview`` slices of the mapping.

Writes made by the VMM itself (device backends, the loader) do not appear in KVM's dirty
log, so each region keeps its own per-page record of what the VMM wrote
(``take_vmm_dirty``), for whoever needs to know every written page (migration will).

This module knows nothing of KVM: a region's ``host_address`` is what a hypervisor needs to
map it, taken with ctypes.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator

import attrs

__all__ = ["GuestMemory", "MemoryRegion", "GuestMemoryError", "PAGE_SIZE"]

PAGE_SIZE = 4096
_U64_LIMIT = 1 << 64
_MARKED = re.compile(rb"[^\x00]+")  # runs of pages marked in a vmm_dirty record
# Scalars go through native-order word views (see GuestMemory.__init__); guest memory is
# little-endian, and so must the host be.
assert sys.byteorder == "little", "trivmm runs on little-endian (x86-64) hosts"


class GuestMemoryError(ValueError):
    """A guest-physical access outside guest RAM (or across two regions)."""


@attrs.define(eq=False)
class MemoryRegion:
    """One contiguous piece of guest RAM: an anonymous private mapping, or (a restored
    snapshot) a private, copy-on-write mapping of the snapshot file (``map_file_private``)."""

    guest_base: int
    size: int
    mapping: mmap.mmap = attrs.field(repr=False)
    host_address: int = attrs.field(repr=False)
    vmm_dirty: bytearray = attrs.field(repr=False)  # one byte per page: written by the VMM

    @classmethod
    def allocate(cls, guest_base: int, size: int) -> MemoryRegion:
        if size <= 0 or size % PAGE_SIZE or guest_base % PAGE_SIZE:
            raise GuestMemoryError(f"region {guest_base:#x}+{size:#x} is not page-aligned and non-empty")
        if guest_base + size > _U64_LIMIT:
            raise GuestMemoryError(f"region {guest_base:#x}+{size:#x} overflows the address space")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(guest_base, size, mapping, _mapping_address(mapping), bytearray(size // PAGE_SIZE))

    def map_file_private(self, fd: int, file_offset: int) -> None:
        """Back the whole region by ``fd`` from ``file_offset`` on, copy-on-write
        (``MAP_PRIVATE | MAP_FIXED`` over the region's own addresses): pages are read from
        the file when first touched, and a write copies the page, never changing the file.
        This is how a snapshot is restored lazily. The file must be at least
        ``file_offset + size`` bytes (a page past its end faults with SIGBUS) and must not be
        changed in place while the region lives (untouched pages show the file's contents).
        The region's address is unchanged, so KVM's slot and every view stay valid."""
        if file_offset < 0 or file_offset % PAGE_SIZE:
            raise GuestMemoryError(f"file offset {file_offset:#x} is not page-aligned")
        if os.fstat(fd).st_size < file_offset + self.size:
            raise GuestMemoryError(f"the file is shorter than {file_offset + self.size} bytes")
        flags = mmap.MAP_PRIVATE | _MAP_FIXED | getattr(mmap, "MAP_NORESERVE", 0)
        result = _libc.mmap(self.host_address, self.size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, file_offset)
        if result in (None, _MAP_FAILED) or result != self.host_address:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mmap of the file over guest memory failed: {os.strerror(errno)}")

    @property
    def guest_end(self) -> int:
        return self.guest_base + self.size

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE


_MAP_FIXED = 0x10  # <sys/mman.h> on Linux (Python's mmap module does not export it)
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def _mapping_address(mapping: mmap.mmap) -> int:
    """The host virtual address of ``mapping``'s first byte (the buffer export ends at once)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


class GuestMemory:
    """The guest's RAM: non-overlapping regions sorted by guest address."""

    def __init__(self, regions: Iterable[MemoryRegion]) -> None:
        self.regions: list[MemoryRegion] = sorted(regions, key=lambda r: r.guest_base)
        for a, b in itertools.pairwise(self.regions):
            if a.guest_end > b.guest_base:
                raise GuestMemoryError(f"regions at {a.guest_base:#x} and {b.guest_base:#x} overlap")
        self._views = [memoryview(r.mapping) for r in self.regions]
        # The same memory as arrays of u16/u32/u64, for scalar accesses the guest may race
        # with (a virtqueue's indices): an aligned item read or assignment is one load or
        # store of its full width. ``struct`` is not: ``pack_into`` zeroes its destination
        # before it stores the value, and ``"<H"``-style unpacking reads byte by byte, so a
        # vCPU can see a transient 0 and the VMM a torn value.
        self._words: dict[int, list[memoryview]] = {
            2: [view.cast("H") for view in self._views],
            4: [view.cast("I") for view in self._views],
            8: [view.cast("Q") for view in self._views],
        }
        # (base, end) of each region as plain ints: _locate runs several times per device
        # request, and attribute and property lookups were most of its cost.
        self._bounds = tuple((r.guest_base, r.guest_base + r.size) for r in self.regions)

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> GuestMemory:
        """Allocate one region per ``(guest_base, size)``."""
        return cls(MemoryRegion.allocate(base, size) for base, size in ranges)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self.regions)

    def close(self) -> None:
        for words in self._words.values():
            for view in words:
                view.release()
            words.clear()
        for view in self._views:
            view.release()
        self._views = []
        self._bounds = ()  # a late access is a GuestMemoryError ("not RAM"), not an IndexError
        for region in self.regions:
            try:
                region.mapping.close()
            except BufferError:  # an exported view is still alive; the GC unmaps it later
                pass

    # --- address resolution --------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        """Return (region index, offset) for ``[gpa, gpa+length)``, or raise."""
        # Device requests resolve several ranges each: one comparison chain per region,
        # and the error path (rare) says what was wrong.
        end = gpa + length
        i = 0
        for base, limit in self._bounds:
            if base <= gpa and end <= limit and length >= 0 and (gpa < limit or not length):
                return i, gpa - base
            i += 1
        raise GuestMemoryError(self._what_is_wrong(gpa, length))

    def _what_is_wrong(self, gpa: int, length: int) -> str:
        end = gpa + length
        if gpa < 0 or length < 0 or end > _U64_LIMIT:
            return f"invalid guest range {gpa:#x}+{length:#x}"
        for base, limit in self._bounds:
            if base <= gpa < limit:
                return f"guest range {gpa:#x}+{length:#x} runs past RAM at {limit:#x}"
        return f"guest address {gpa:#x} is not RAM"

    def contains(self, gpa: int, length: int = 1) -> bool:
        end = gpa + length
        for base, limit in self._bounds:
            if base <= gpa and end <= limit and length >= 0 and (gpa < limit or not length):
                return True
        return False

    def resolve(self, gpa: int, length: int) -> tuple[memoryview, int]:
        """The region's whole view and the offset of ``gpa`` in it, for a range checked to lie
        inside one region: for a caller that reads a structure at many offsets (a virtqueue's
        rings), checking once. Holding the returned view exports nothing; it stops working
        (``ValueError``) once the memory is closed. Writes through it are not marked dirty:
        the caller marks them (``mark_written``)."""
        i, offset = self._locate(gpa, length)
        return self._views[i], offset

    def dirty_marker(self, gpa: int, length: int) -> Callable[[], None]:
        """A function that records ``[gpa, gpa+length)`` as written by the VMM, checked once:
        for a structure the VMM writes again and again (a virtqueue's used ring)."""
        i, offset = self._locate(gpa, length)
        dirty = self.regions[i].vmm_dirty
        first, stop = offset // PAGE_SIZE, (offset + max(length, 1) - 1) // PAGE_SIZE + 1
        pages = slice(first, stop)
        ones = b"\x01" * (stop - first)

        def mark() -> None:
            dirty[pages] = ones

        return mark

    def mark_written(self, gpa: int, length: int) -> None:
        """Record that the VMM wrote ``[gpa, gpa+length)`` through a ``resolve``d view."""
        i, offset = self._locate(gpa, length)
        self._mark(i, offset, length)

    def view(self, gpa: int, length: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of ``[gpa, gpa+length)``; ``write=True`` marks the pages dirty."""
        i, offset = self._locate(gpa, length)
        if write:
            self._mark(i, offset, length)
        return self._views[i][offset : offset + length]

    def _mark(self, i: int, offset: int, length: int) -> None:
        if length:
            dirty = self.regions[i].vmm_dirty
            first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
            dirty[first : last + 1] = b"\x01" * (last - first + 1)

    # --- copies ------------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data), write=True)[:] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        view = self.view(gpa, length, write=True)  # bounds first: a bad length allocates nothing
        chunk = bytes([byte]) * min(length, 1 << 20)
        for start in range(0, length, len(chunk) or 1):
            end = min(start + len(chunk), length)
            view[start:end] = chunk[: end - start]

    def read_u16(self, gpa: int) -> int:
        return self._load(2, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._load(4, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._load(8, gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._store(2, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._store(4, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._store(8, gpa, value)

    def _load(self, size: int, gpa: int) -> int:
        """A little-endian scalar; one load of its width when ``gpa`` is aligned to it."""
        i, offset = self._locate(gpa, size)
        if offset % size:  # unaligned: no single access exists anyway
            return int.from_bytes(self._views[i][offset : offset + size], "little")
        return int(self._words[size][i][offset // size])

    def _store(self, size: int, gpa: int, value: int) -> None:
        """Store a little-endian scalar (one store of its width when aligned), marked dirty."""
        i, offset = self._locate(gpa, size)
        dirty = self.regions[i].vmm_dirty
        dirty[offset // PAGE_SIZE] = 1
        dirty[(offset + size - 1) // PAGE_SIZE] = 1
        if offset % size:
            self._views[i][offset : offset + size] = value.to_bytes(size, "little")
        else:
            self._words[size][i][offset // size] = value

    def words(self, gpa: int, size: int) -> tuple[memoryview, int]:
        """The region's view as an array of ``size``-byte words (2, 4 or 8) and the index of
        the word at ``gpa``, which must be aligned to ``size``: for a caller that reads and
        writes the same scalars again and again (a virtqueue's indices), each access one
        load or store of the word. Writes through it are not marked dirty (``dirty_marker``)."""
        i, offset = self._locate(gpa, size)
        if offset % size:
            raise GuestMemoryError(f"guest address {gpa:#x} is not aligned to {size} bytes")
        return self._words[size][i], offset // size

    # --- the VMM's own dirty log ---------------------------------------------------------
    def take_vmm_dirty(self, region: MemoryRegion) -> bytes:
        """Return and clear the per-page bytes of pages the VMM wrote in ``region``. Other
        threads mark pages meanwhile: only the pages in the returned copy are cleared (a
        slice at a time), so a page marked while this runs is in the result or still marked."""
        dirty = region.vmm_dirty
        snapshot = bytes(dirty)
        for run in _MARKED.finditer(snapshot):
            dirty[run.start() : run.end()] = bytes(run.end() - run.start())
        return snapshot
