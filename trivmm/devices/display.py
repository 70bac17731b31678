"""A per-VM display: a linear XRGB8888 framebuffer in a KVM memory slot of its own.

The guest sees plain memory at ``FRAMEBUFFER_BASE`` (in the MMIO gap, outside PCI's
windows: ``trivmm.boot.layout``), announced to Linux through the zero page's
``screen_info`` as an EFI GOP framebuffer (``Display.screen_info``): efifb or simpledrm
drives it and fbcon draws on it, with no driver of trivmm's. Its stores never exit to the
VMM.

Change tracking is KVM's dirty log, on this slot only (``KVM_MEM_LOG_DIRTY_PAGES``):

    display.collect()  -> the pages written since the last call (one KVM_GET_DIRTY_LOG);
                          None when nothing was: no byte of the framebuffer is read
    display.scan(...)  -> those pages' rows compared with a shadow copy of the last scan;
                          what changed, as rectangles, goes to every watcher's ``Damage``

so a consumer that polls (the VNC server, at its refresh rate, only while a client wants an
update) costs one ioctl a tick on an idle screen. ``scans`` and ``polls`` count both.
Writes the VMM makes itself (``write``) are not in KVM's log; they are recorded beside it.

The slot is separate from guest RAM's (``DISPLAY_SLOT``), so RAM dirty logging for
migration neither sees nor disturbs it. One VM-wide setting touches every slot: with
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled (migration does), ``KVM_GET_DIRTY_LOG`` no
longer re-arms what it returns. So ``collect`` always follows a non-empty read with
``KVM_CLEAR_DIRTY_LOG`` of exactly the pages it read: needed in that mode, harmless without
it (a write racing between the two ioctls lands on a page that is scanned after both), and
no coordination with whoever switches the mode.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

from trivmm.boot.layout import FRAMEBUFFER_BASE, FRAMEBUFFER_LIMIT
from trivmm.boot.screen_info import ScreenInfo
from trivmm.kvm.constants import MEM_LOG_DIRTY_PAGES
from trivmm.memory import MemoryRegion

if TYPE_CHECKING:
    from trivmm.kvm.vm import Vm

__all__ = ["Display", "Rect", "Damage", "DISPLAY_SLOT", "BYTES_PER_PIXEL", "MIN_SIDE", "MAX_SIDE",
           "MAX_FRAMEBUFFER", "MAX_DAMAGE_RECTS", "parse_display"]  # fmt: skip

DISPLAY_SLOT = 256  # the framebuffer's KVM memory slot: far from RAM's 0, 1, ...
BYTES_PER_PIXEL = 4  # XRGB8888: blue in byte 0, green 1, red 2, byte 3 unused
MIN_SIDE = 16
MAX_SIDE = 8192
MAX_FRAMEBUFFER = FRAMEBUFFER_LIMIT - FRAMEBUFFER_BASE  # 128 MiB
MAX_DAMAGE_RECTS = 32  # rectangles one watcher keeps apart; more are merged
_PAGE = 4096
_SLOT_ALIGN = 64 * _PAGE  # whole u64 words of dirty bitmap: KVM_CLEAR_DIRTY_LOG takes whole words
_TILE = 64 * BYTES_PER_PIXEL  # the step in which a changed row's left and right ends are found
_log = logging.getLogger(__name__)


def parse_display(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768), checked (``ValueError`` says why not)."""
    width, sep, height = text.strip().lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"bad display size {text!r} (use WIDTHxHEIGHT, e.g. 1024x768)")
    size = (int(width), int(height))
    check_display(size)
    return size


def check_display(size: tuple[int, int]) -> None:
    width, height = size
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"display {width}x{height}: each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
    if width * height * BYTES_PER_PIXEL > MAX_FRAMEBUFFER:
        raise ValueError(f"display {width}x{height} needs more than {MAX_FRAMEBUFFER >> 20} MiB of framebuffer")


@attrs.frozen
class Rect:
    """A rectangle of pixels: ``x``, ``y``, ``width``, ``height``."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height

    @property
    def area(self) -> int:
        return self.width * self.height

    def union(self, other: Rect) -> Rect:
        x, y = min(self.x, other.x), min(self.y, other.y)
        return Rect(x, y, max(self.right, other.right) - x, max(self.bottom, other.bottom) - y)

    def intersect(self, other: Rect) -> Rect | None:
        x, y = max(self.x, other.x), max(self.y, other.y)
        right, bottom = min(self.right, other.right), min(self.bottom, other.bottom)
        return Rect(x, y, right - x, bottom - y) if right > x and bottom > y else None

    def contains(self, other: Rect) -> bool:
        return self.x <= other.x and self.y <= other.y and other.right <= self.right and other.bottom <= self.bottom


class Damage:
    """What changed on a display since its owner last took it: a few rectangles, merged
    when they touch or are too many (``MAX_DAMAGE_RECTS``): bounded whatever the guest
    draws. Thread-safe: ``Display.scan`` may add from a worker thread."""

    def __init__(self, screen: Rect) -> None:
        self.screen = screen
        self._lock = threading.Lock()
        self._rects: list[Rect] = []

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._rects)

    def add(self, rect: Rect) -> None:
        clipped = rect.intersect(self.screen)
        if clipped is None:
            return
        with self._lock:
            self._add(clipped)

    def add_all(self) -> None:
        """The whole screen (a client asked for a full update, say)."""
        with self._lock:
            self._rects = [self.screen]

    def _add(self, rect: Rect) -> None:
        kept: list[Rect] = []
        for old in self._rects:
            if old.contains(rect):
                return
            # Merge what overlaps or touches vertically with the same columns (fbcon's
            # lines, scanned row by row): one rectangle instead of a stack of them.
            touching = old.intersect(Rect(rect.x - 1, rect.y - 1, rect.width + 2, rect.height + 2)) is not None
            if rect.contains(old) or (touching and _cheap_union(old, rect)):
                rect = rect.union(old)
            else:
                kept.append(old)
        kept.append(rect)
        if len(kept) > MAX_DAMAGE_RECTS:
            merged = kept[0]
            for other in kept[1:]:
                merged = merged.union(other)
            kept = [merged]
        self._rects = kept

    def take(self) -> list[Rect]:
        """The rectangles (top to bottom), and forget them."""
        with self._lock:
            rects, self._rects = self._rects, []
        return sorted(rects, key=lambda r: (r.y, r.x))


def _cheap_union(a: Rect, b: Rect) -> bool:
    """Whether sending the union of ``a`` and ``b`` costs at most a third more than both."""
    return a.union(b).area * 3 <= (a.area + b.area) * 4


@attrs.frozen
class DirtyPages:
    """Pages of the framebuffer written since the last ``collect``, as sorted (first, end) runs."""

    runs: tuple[tuple[int, int], ...]

    @property
    def pages(self) -> int:
        return sum(end - first for first, end in self.runs)


class Display:
    """A ``width`` x ``height`` XRGB8888 framebuffer at guest-physical ``base``: allocated
    here, mapped into a VM by ``attach``. See the module docstring."""

    def __init__(self, width: int, height: int, *, base: int = FRAMEBUFFER_BASE) -> None:
        check_display((width, height))
        self.width, self.height = width, height
        self.stride = width * BYTES_PER_PIXEL
        self.frame_bytes = self.stride * height
        self.size = -(-self.frame_bytes // _SLOT_ALIGN) * _SLOT_ALIGN
        if base % _PAGE:
            raise ValueError(f"framebuffer base {base:#x} is not page-aligned")
        self.base = base
        self.pages = self.size // _PAGE
        self.screen = Rect(0, 0, width, height)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self._mapping: mmap.mmap | None = mmap.mmap(-1, self.size, flags=flags,
                                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        anchor = ctypes.c_char.from_buffer(self._mapping)
        self.host_address = ctypes.addressof(anchor)
        del anchor
        self._shadow = bytearray(self.frame_bytes)  # the framebuffer as of the last scan
        self._lock = threading.Lock()  # the mapping, the shadow, the VM fd
        self._vm: Vm | None = None
        self.slot: int | None = None
        self._host_dirty = bytearray(self.pages)  # pages the VMM wrote (not in KVM's log)
        self._host_written = False
        self._watchers: list[Damage] = []
        self.polls = 0  # collect() calls (each one KVM_GET_DIRTY_LOG when attached)
        self.scans = 0  # scan() calls that read the framebuffer
        self.scanned_rows = 0

    # --- the VM -----------------------------------------------------------------------------
    def attach(self, vm: Vm, slot: int = DISPLAY_SLOT) -> None:
        """Map the framebuffer into ``vm`` at ``base``, dirty-logged, as memory slot ``slot``."""
        with self._lock:
            if self._mapping is None:
                raise ValueError("the display is closed")
            if self._vm is not None:
                raise ValueError("the display is attached to a VM already")
            vm.set_user_memory_region(slot, self.base, self.size, self.host_address, MEM_LOG_DIRTY_PAGES)
            self._vm, self.slot = vm, slot

    def detach(self) -> None:
        """Forget the VM (before its fd is closed): ``collect`` sees host writes only."""
        with self._lock:
            self._vm = None

    def screen_info(self) -> ScreenInfo:
        """The zero page's announcement of this framebuffer (``trivmm.boot.screen_info``)."""
        return ScreenInfo(base=self.base, size=self.size, width=self.width, height=self.height, stride=self.stride)

    # --- watchers ---------------------------------------------------------------------------
    def watch(self) -> Damage:
        """A new ``Damage`` that every later ``scan`` adds to (until ``unwatch``)."""
        damage = Damage(self.screen)
        with self._lock:
            self._watchers.append(damage)
        return damage

    def unwatch(self, damage: Damage) -> None:
        with self._lock:
            if damage in self._watchers:
                self._watchers.remove(damage)

    # --- change tracking ---------------------------------------------------------------------
    def collect(self) -> DirtyPages | None:
        """The pages written since the last call -- by the guest (KVM's dirty log) or the
        VMM (``write``) -- or None if none: then nothing else was done."""
        with self._lock:
            self.polls += 1
            bitmap = b""
            if self._vm is not None and self.slot is not None:
                bitmap = self._vm.get_dirty_log(self.slot, self.pages)
                if bitmap.count(0) != len(bitmap):  # re-arm what was read (see the module docstring)
                    self._vm.clear_dirty_log(self.slot, 0, bitmap)
            host, self._host_written = self._host_written, False
            marks: bytes | bytearray = b""
            if host:
                marks, self._host_dirty = self._host_dirty, bytearray(self.pages)
        guest_dirty = bool(bitmap) and bitmap.count(0) != len(bitmap)
        if not guest_dirty and not host:
            return None
        pages: set[int] = set()
        if guest_dirty:
            for index, byte in enumerate(bitmap):
                if byte:
                    pages.update(index * 8 + bit for bit in range(8) if byte >> bit & 1)
        if host:
            pages.update(index for index, mark in enumerate(marks) if mark)
        return DirtyPages(tuple(_runs(sorted(pages))))

    def scan(self, dirty: DirtyPages) -> list[Rect]:
        """Compare the rows of ``dirty`` pages with the last scan's; return what changed
        (row runs, each with the columns that changed in it) and add it to every watcher."""
        rects: list[Rect] = []
        with self._lock:
            if self._mapping is None:
                return rects
            self.scans += 1
            frame, shadow, stride = self._mapping, self._shadow, self.stride
            for first, end in dirty.runs:
                top = first * _PAGE // stride
                bottom = min(self.height, -(-end * _PAGE // stride))
                run: Rect | None = None
                for y in range(top, bottom):
                    self.scanned_rows += 1
                    start = y * stride
                    row = frame[start : start + stride]
                    if row == shadow[start : start + stride]:
                        if run is not None:
                            rects.append(run)
                            run = None
                        continue
                    left, right = _changed_columns(row, shadow, start, stride)
                    shadow[start : start + stride] = row
                    line = Rect(left, y, right - left, 1)
                    run = line if run is None else run.union(line)
                if run is not None:
                    rects.append(run)
            watchers = list(self._watchers)
        for damage in watchers:
            for rect in rects:
                damage.add(rect)
        return rects

    def refresh(self) -> list[Rect]:
        """``collect`` then, if anything was written, ``scan``."""
        dirty = self.collect()
        return [] if dirty is None else self.scan(dirty)

    # --- pixels -------------------------------------------------------------------------------
    def read(self, rect: Rect) -> bytes:
        """The pixels of ``rect`` (inside the screen), XRGB8888, rows top to bottom."""
        if not self.screen.contains(rect) or rect.width <= 0 or rect.height <= 0:
            raise ValueError(f"{rect} is not inside the {self.width}x{self.height} screen")
        stride, row = self.stride, rect.width * BYTES_PER_PIXEL
        with self._lock:
            frame = self._mapping
            if frame is None:
                return bytes(row * rect.height)
            start = rect.y * stride + rect.x * BYTES_PER_PIXEL
            if rect.width == self.width:
                return frame[start : start + row * rect.height]
            return b"".join(frame[at : at + row] for at in range(start, start + stride * rect.height, stride))

    def write(self, offset: int, data: bytes) -> None:
        """Store ``data`` at byte ``offset`` of the framebuffer from the host side (a test
        pattern, a splash), recorded for the next ``collect``."""
        if offset < 0 or offset + len(data) > self.frame_bytes:
            raise ValueError(f"{len(data)} bytes at {offset} do not fit the framebuffer")
        with self._lock:
            if self._mapping is None:
                raise ValueError("the display is closed")
            self._mapping[offset : offset + len(data)] = data
            for page in range(offset // _PAGE, -(-(offset + len(data)) // _PAGE)):
                self._host_dirty[page] = 1
            self._host_written = self._host_written or bool(data)

    # --- saved state (trivmm.migration: the framebuffer travels as one more memory slot) --------
    def memory_region(self) -> MemoryRegion:
        """The framebuffer as a ``MemoryRegion`` (the same pages, not a copy), for the
        snapshot and migration code, which carry it after guest RAM's slots."""
        with self._lock:
            if self._mapping is None:
                raise ValueError("the display is closed")
            return MemoryRegion(self.base, self.size, self._mapping, self.host_address, bytearray(self.pages))

    def invalidate(self) -> None:
        """Treat every page as written (its contents came from a snapshot or a migration,
        which KVM's dirty log did not see): the next ``collect`` reports the whole screen."""
        with self._lock:
            self._host_dirty = bytearray(b"\x01" * self.pages)
            self._host_written = True

    def close(self) -> None:
        """Forget the VM and unmap the framebuffer (after the VM's vCPUs have stopped)."""
        with self._lock:
            self._vm = None
            mapping, self._mapping = self._mapping, None
            self._watchers.clear()
        if mapping is not None:
            mapping.close()

    @property
    def closed(self) -> bool:
        return self._mapping is None


def _runs(pages: Iterable[int]) -> Iterable[tuple[int, int]]:
    first = end = -1
    for page in pages:
        if page == end:
            end += 1
            continue
        if first >= 0:
            yield first, end
        first, end = page, page + 1
    if first >= 0:
        yield first, end


def _changed_columns(row: bytes, shadow: bytearray, start: int, stride: int) -> tuple[int, int]:
    """The first and past-the-last changed pixel of a row known to differ: found a
    ``_TILE`` at a time, then to the pixel by bisection (slice compares are memcmp: a few
    dozen per row, not one per pixel)."""
    px = BYTES_PER_PIXEL
    if row[:px] != shadow[start : start + px] and row[-px:] != shadow[start + stride - px : start + stride]:
        return 0, stride // px  # the common case of a redrawn line: both ends changed
    left = 0
    while left < stride and row[left : left + _TILE] == shadow[start + left : start + left + _TILE]:
        left += _TILE
    # Bisect within the tile: the longest equal prefix, in whole pixels.
    low, high = left, min(left + _TILE, stride)
    while high - low > BYTES_PER_PIXEL:
        middle = low + (high - low) // 2 // BYTES_PER_PIXEL * BYTES_PER_PIXEL
        if row[low:middle] == shadow[start + low : start + middle]:
            low = middle
        else:
            high = middle
    left = low
    right = stride
    while right > left:
        step = max(left, right - _TILE)
        if row[step:right] != shadow[start + step : start + right]:
            break
        right = step
    low, high = max(left, right - _TILE), right  # the longest equal suffix of that tile
    while high - low > BYTES_PER_PIXEL:
        middle = low + (high - low) // 2 // BYTES_PER_PIXEL * BYTES_PER_PIXEL
        if row[middle:right] == shadow[start + middle : start + right]:
            high = middle
        else:
            low = middle
    right = high
    return left // BYTES_PER_PIXEL, right // BYTES_PER_PIXEL
