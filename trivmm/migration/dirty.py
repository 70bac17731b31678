"""Dirty-page tracking for hot migration: KVM's dirty log on every RAM slot, merged with
the pages the VMM itself wrote (``GuestMemory.take_vmm_dirty``).

``DirtyLog.start()`` sets ``KVM_MEM_LOG_DIRTY_PAGES`` on each slot (KVM write-protects the
slot; the first guest write to a page after each sync marks it). Where the host has
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` it is enabled first: ``KVM_GET_DIRTY_LOG`` then only
reads the bitmap and ``KVM_CLEAR_DIRTY_LOG`` re-protects just the pages found dirty
(without it, GET reads, clears and re-protects the whole slot in one call). ``sync()``
returns, per slot, the pages written since the previous sync as an int bitmap (bit N =
page N of the slot). ``stop()`` clears the flag on every slot again; it is safe to call
twice, and after a failed ``start()``.

Why the pages must be read *after* the sync that reports them: a page written after the
sync is marked again and found by the next one; so the stream ends consistent once the
last sync happens with the vCPUs paused and the devices quiesced.

The VMM's own writes have a hazard KVM's do not: a device marks a page when it takes a
buffer, and may write it a little later (a disk read into a guest buffer). Take the mark,
send the page, and the write may land after the page was read, with no new mark. So every
page the VMM marked during the migration (``vmm_written``) is sent once more in the final,
quiesced round, when no device write is in flight.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

from trivmm.kvm import Kvm, KvmError
from trivmm.kvm.constants import MEM_LOG_DIRTY_PAGES, Cap
from trivmm.kvm.vm import Vm
from trivmm.memory import GuestMemory

__all__ = ["DirtyLog", "dirty_runs", "marks_to_bits"]

_MANUAL_PROTECT_ENABLE = 1  # KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
_ONES = re.compile("1+")
_TO_DIGITS = bytes(0x30 if value == 0 else 0x31 for value in range(256))  # a mark byte -> "0" / "1"
_log = logging.getLogger(__name__)


def marks_to_bits(marks: bytes) -> int:
    """A per-page byte record (``vmm_dirty``: nonzero = marked) as an int bitmap."""
    if not marks:
        return 0
    return int(marks[::-1].translate(_TO_DIGITS), 2)


def dirty_runs(bits: int, pages: int) -> Iterator[tuple[int, int]]:
    """(first page, page count) of each run of set bits in a slot's bitmap, in order."""
    if not bits:
        return
    digits = format(bits, f"0{pages}b")[::-1]
    for match in _ONES.finditer(digits):
        yield match.start(), match.end() - match.start()


class DirtyLog:
    """KVM dirty logging on every slot of ``vm``'s ``memory``, plus the VMM's own writes."""

    def __init__(self, kvm: Kvm, vm: Vm, memory: GuestMemory) -> None:
        self._kvm = kvm
        self._vm = vm
        self._memory = memory
        self._regions = list(memory)
        self.manual = False  # KVM_CLEAR_DIRTY_LOG in use
        self.active = False
        self._logging: list[int] = []  # slots whose flag is set
        self.vmm_written = [0] * len(self._regions)  # every page the VMM marked since start()
        self.syncs = 0

    def start(self) -> None:
        """Turn logging on (on a worker thread: ioctls). The VMM's marks made so far are
        dropped: the first pass sends every page after this."""
        if self._kvm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) & _MANUAL_PROTECT_ENABLE:
            try:
                self._vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, _MANUAL_PROTECT_ENABLE)
                self.manual = True
            except KvmError as exc:
                _log.info("KVM_CLEAR_DIRTY_LOG not used: %s", exc)
        self.active = True
        try:
            for slot, region in enumerate(self._regions):
                self._vm.set_user_memory_region(slot, region.guest_base, region.size, region.host_address,
                                                MEM_LOG_DIRTY_PAGES)  # fmt: skip
                self._logging.append(slot)
        except BaseException:
            self.stop()
            raise
        for region in self._regions:
            self._memory.take_vmm_dirty(region)

    def sync(self) -> list[int]:
        """Per slot, the pages written since the previous sync (or ``start``): KVM's log
        (fetched and re-armed) merged with the VMM's marks (taken)."""
        out = []
        for slot, region in enumerate(self._regions):
            pages = region.pages
            bitmap = self._vm.get_dirty_log(slot, pages)
            bits = int.from_bytes(bitmap, "little") & ((1 << pages) - 1)
            if self.manual and bits:
                self._vm.clear_dirty_log(slot, 0, bitmap, pages)
            marked = marks_to_bits(self._memory.take_vmm_dirty(region))
            self.vmm_written[slot] |= marked
            out.append(bits | marked)
        self.syncs += 1
        return out

    def stop(self) -> None:
        """Turn logging off on every slot where it is on (best effort: a slot that KVM
        refuses is logged; the others are still turned off)."""
        while self._logging:
            slot = self._logging.pop()
            region = self._regions[slot]
            try:
                self._vm.set_user_memory_region(slot, region.guest_base, region.size, region.host_address, 0)
            except KvmError as exc:
                _log.warning("dirty logging could not be turned off on slot %d: %s", slot, exc)
        if self.manual:
            self.manual = False
            try:
                self._vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 0)
            except KvmError as exc:
                _log.info("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 left on: %s", exc)
        self.active = False
