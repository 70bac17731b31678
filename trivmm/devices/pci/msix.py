"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability's message control word, the vector
table and the pending bit array, and delivery through KVM irqfds.

Each vector owns a GSI (from the VM's ``GsiRouter``) and an ``EventFd`` bound to it as an
irqfd. While a vector can fire -- MSI-X enabled, the function not masked, the vector not
masked -- its GSI is routed to the MSI message in its table entry, and ``notify(vector)``
is one eventfd write: KVM injects the interrupt without a VMM ioctl. Otherwise ``notify``
sets the vector's pending bit; the vector fires (and the bit clears) when it is unmasked.
Routes follow the table lazily: pushed when a vector becomes deliverable with a message KVM
does not have yet, or when the guest rewrites the entry of a deliverable vector; a masked
vector keeps its old route, unused.

The table takes accesses of any width at any offset (the spec asks drivers for aligned
DWORDs or QWORDs; a hostile guest gets defined behaviour anyway): Message Address bits 1:0
and Vector Control bits 31:1 are read-only zero, and the PBA is read-only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from trivmm.devices.pci.irq import MsiRouter
from trivmm.eventfd import EventFd

__all__ = ["MsixCapability", "MSIX_CAP_ID", "MSIX_MAX_VECTORS", "MSIX_ENABLE", "MSIX_FUNCTION_MASK"]

MSIX_CAP_ID = 0x11
MSIX_MAX_VECTORS = 2048
MSIX_ENABLE = 0x8000  # message control bits
MSIX_FUNCTION_MASK = 0x4000
_ENTRY_SIZE = 16
_VECTOR_CONTROL = 12
_MASKED = 0x01
# What the guest may write in each byte of a table entry.
_ENTRY_WRITABLE = bytes([0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                         0xFF, 0xFF, 0xFF, 0xFF, _MASKED, 0x00, 0x00, 0x00])  # fmt: skip
_log = logging.getLogger(__name__)


class MsixCapability:
    """The MSI-X state of one function: ``vectors`` table entries in BAR ``table_bar`` at
    ``table_offset``, the PBA in BAR ``pba_bar`` at ``pba_offset``. Build it with
    ``PciFunction.add_msix``, which places the capability in config space and routes the
    BAR accesses here. Thread-safe (vCPU threads write the table, a backend notifies)."""

    def __init__(self, vectors: int, router: MsiRouter, *, table_bar: int, table_offset: int,
                 pba_bar: int, pba_offset: int) -> None:  # fmt: skip
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X has 1..{MSIX_MAX_VECTORS} vectors, not {vectors}")
        for what, bar, offset in (("table", table_bar, table_offset), ("PBA", pba_bar, pba_offset)):
            if not 0 <= bar <= 5:
                raise ValueError(f"MSI-X {what} BAR must be 0..5, not {bar}")
            if offset < 0 or offset % 8 or offset >= 1 << 32:
                raise ValueError(f"MSI-X {what} offset {offset:#x} is not a QWORD-aligned 32-bit offset")
        self.vectors = vectors
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.table_size = vectors * _ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        if table_bar == pba_bar and table_offset < pba_offset + self.pba_size \
                and pba_offset < table_offset + self.table_size:  # fmt: skip
            raise ValueError("the MSI-X table and PBA overlap")
        self._lock = threading.Lock()
        self._router = router
        self._table = bytearray(self.table_size)
        for vector in range(vectors):
            self._table[vector * _ENTRY_SIZE + _VECTOR_CONTROL] = _MASKED
        self._pending = 0  # bit per vector
        self._enabled = False
        self._function_masked = False
        self._installed: list[tuple[int, int] | None] = [None] * vectors  # the route KVM has
        self._closed = False
        self.delivered = 0  # interrupts signalled
        self.dropped = 0  # notifications for vectors that do not exist
        self._gsis: list[int] = []
        self._eventfds: list[EventFd] = []
        try:
            for _ in range(vectors):
                gsi = router.allocate()
                self._gsis.append(gsi)
                eventfd = EventFd()
                self._eventfds.append(eventfd)
                router.bind_irqfd(eventfd.fd, gsi)
        except BaseException:
            self._release()
            raise

    # --- the message control word (config space, under the PCI root's lock) ----------------
    def control_written(self, control: int) -> None:
        """The guest wrote the capability's message control word (its Enable and Function
        Mask bits; the rest is read-only)."""
        with self._lock:
            was_live = self._enabled and not self._function_masked
            self._enabled = bool(control & MSIX_ENABLE)
            self._function_masked = bool(control & MSIX_FUNCTION_MASK)
            if self._enabled and not self._function_masked and not was_live:
                self._sync(range(self.vectors))

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    # --- the table and PBA (BAR accesses, vCPU threads) --------------------------------
    def table_read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            data[:] = self._table[offset : offset + len(data)]

    def table_write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            table = self._table
            for i, byte in enumerate(bytes(data)):
                at = offset + i
                writable = _ENTRY_WRITABLE[at % _ENTRY_SIZE]
                table[at] = (table[at] & ~writable) | (byte & writable)
            first = offset // _ENTRY_SIZE
            last = (offset + len(data) - 1) // _ENTRY_SIZE
            self._sync(range(first, last + 1))

    def pba_read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            pba = self._pending.to_bytes(self.pba_size, "little")
        data[:] = pba[offset : offset + len(data)]

    def pba_write(self, offset: int, data: memoryview) -> None:
        """The PBA is read-only: writes are ignored."""

    # --- the device side ----------------------------------------------------------------
    def notify(self, vector: int) -> bool:
        """Raise ``vector`` (any thread). Returns False when MSI-X is disabled -- the caller
        then uses INTx -- and True when MSI-X took it: delivered, left pending (masked), or
        dropped (no such vector, e.g. virtio's NO_VECTOR)."""
        with self._lock:
            if self._closed:
                return True
            if not self._enabled:
                return False
            if not 0 <= vector < self.vectors:
                self.dropped += 1
                return True
            if self._live(vector) and self._installed[vector] == self._message(vector):
                self._signal(vector)
            else:
                self._pending |= 1 << vector
                if self._live(vector):  # the route lags (a failed update): try again
                    self._sync((vector,))
            return True

    def masked(self, vector: int) -> bool:
        with self._lock:
            return bool(self._table[vector * _ENTRY_SIZE + _VECTOR_CONTROL] & _MASKED)

    def pending(self, vector: int) -> bool:
        with self._lock:
            return bool(self._pending >> vector & 1)

    def message(self, vector: int) -> tuple[int, int]:
        """The (address, data) in ``vector``'s table entry."""
        with self._lock:
            return self._message(vector)

    def gsi(self, vector: int) -> int:
        return self._gsis[vector]

    def eventfd(self, vector: int) -> EventFd:
        """The irqfd of ``vector``: signalling it bypasses masking and pending bits, so
        backends call ``notify`` instead."""
        return self._eventfds[vector]

    # --- internals (under self._lock) -----------------------------------------------------
    def _message(self, vector: int) -> tuple[int, int]:
        base = vector * _ENTRY_SIZE
        entry = self._table
        address = int.from_bytes(entry[base : base + 8], "little")
        return address, int.from_bytes(entry[base + 8 : base + 12], "little")

    def _live(self, vector: int) -> bool:
        return (self._enabled and not self._function_masked
                and not self._table[vector * _ENTRY_SIZE + _VECTOR_CONTROL] & _MASKED)  # fmt: skip

    def _signal(self, vector: int) -> None:
        self._eventfds[vector].signal()
        self.delivered += 1

    def _sync(self, vectors: Iterable[int]) -> None:
        """Push the routes of the deliverable vectors among ``vectors`` whose message KVM
        does not have, then fire those of them that are pending."""
        changes: dict[int, tuple[int, int] | None] = {}
        live = [v for v in vectors if v < self.vectors and self._live(v)]
        for vector in live:
            message = self._message(vector)
            if self._installed[vector] != message:
                changes[self._gsis[vector]] = message
        if changes:
            try:
                self._router.set_msi_routes(changes)
            except OSError as exc:  # KVM refused the table: those vectors wait, pending
                _log.warning("MSI-X: routing update failed, vectors stay pending: %s", exc)
                return
            for vector in live:
                self._installed[vector] = self._message(vector)
        for vector in live:
            if self._pending >> vector & 1:
                self._pending &= ~(1 << vector)
                self._signal(vector)

    # --- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Unbind the irqfds, drop the routes, give the GSIs back, close the eventfds."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def _release(self) -> None:
        for eventfd, gsi in zip(self._eventfds, self._gsis, strict=False):
            try:
                self._router.unbind_irqfd(eventfd.fd, gsi)
            except OSError as exc:
                _log.debug("MSI-X: unbinding irqfd of GSI %d: %s", gsi, exc)
        for gsi in self._gsis:
            try:
                self._router.release(gsi)
            except OSError as exc:
                _log.debug("MSI-X: releasing GSI %d: %s", gsi, exc)
        for eventfd in self._eventfds:
            eventfd.close()
        self._gsis, self._eventfds = [], []
