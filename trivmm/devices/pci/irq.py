"""Interrupts of PCI functions: KVM's GSI routing table (MSI routes for MSI-X vectors) and
the shared INTx lines.

**MSI routes.** Each MSI-X vector gets a GSI above the IOAPIC's 24 pins and an irqfd bound to
it; the GSI's route says which MSI message (address, data) KVM sends when the irqfd is
signalled, so a backend raises an interrupt with one eventfd write and no ioctl.
KVM_SET_GSI_ROUTING replaces the whole table, so ``GsiRouter`` owns it and re-emits KVM's
default routes with every update: exactly ``kvm_setup_default_irq_routing`` (Linux
arch/x86/kvm/irq_comm.c, now irq.c): for GSI 0..15 an IOAPIC route (pin = GSI) and a PIC
route (the master for 0..7, the slave for 8..15, pin GSI % 8; GSI 2 included), for 16..23
the IOAPIC route only. (QEMU leaves out the PIC route of GSI 2 in its own table; KVM's
default has it, and that is what trivmm's legacy devices have been relying on.)

**INTx.** PCI interrupt lines are level-triggered and shared: the ``_PRT`` swizzles 31 slots
onto four IOAPIC GSIs. KVM_IRQ_LINE keeps one level per line for all of userspace, so the
lines are ORed here (``IntxLines``): a GSI is high while any function asserts it.
Polarity: Linux programs a ``_PRT`` GSI with no link device as level, active-low
(drivers/acpi/pci_irq.c), and KVM's in-kernel IOAPIC ignores the polarity bit since Linux
3.16 ("kvm: x86: ignore ioapic polarity"): the VMM passes the logical level, 1 = asserted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Protocol

from trivmm.kvm.vm import (
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    MAX_IRQ_ROUTES,
    IrqchipRoute,
    IrqRoute,
    MsiRoute,
)

__all__ = ["GsiRouter", "MsiRouter", "RoutingBackend", "IntxLines", "GsiExhausted", "default_routes",
           "IOAPIC_PINS", "FIRST_MSI_GSI"]  # fmt: skip

IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS
_PIC_LINES = 16


class GsiExhausted(RuntimeError):
    """No GSI is left for another MSI-X vector."""


def default_routes() -> tuple[IrqchipRoute, ...]:
    """KVM's default x86 routing table (kvm_setup_default_irq_routing), in its order."""
    routes: list[IrqchipRoute] = []
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, IRQCHIP_IOAPIC, gsi))
        if gsi < _PIC_LINES:
            routes.append(IrqchipRoute(gsi, IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE, gsi % 8))
    return tuple(routes)


_DEFAULT_ROUTES = default_routes()


class RoutingBackend(Protocol):
    """What ``GsiRouter`` needs of a VM: ``trivmm.kvm.vm.Vm`` is one."""

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None: ...

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None: ...


class MsiRouter(Protocol):
    """What an MSI-X capability needs of the VM's router (``GsiRouter``)."""

    def allocate(self) -> int: ...

    def release(self, gsi: int) -> None: ...

    def set_msi_routes(self, routes: Mapping[int, tuple[int, int] | None]) -> None: ...

    def bind_irqfd(self, eventfd: int, gsi: int) -> None: ...

    def unbind_irqfd(self, eventfd: int, gsi: int) -> None: ...


class GsiRouter:
    """A VM's GSI routing table: KVM's defaults plus one MSI route per allocated GSI that has
    a message. Thread-safe: vCPU threads (MSI-X table writes) and the loop's thread (device
    set-up and teardown) call it; each change is one KVM_SET_GSI_ROUTING, made under the
    router's lock so that tables reach KVM in the order they were decided."""

    def __init__(self, backend: RoutingBackend, *, first_gsi: int = FIRST_MSI_GSI,
                 limit: int | None = None) -> None:  # fmt: skip
        if first_gsi < IOAPIC_PINS:
            raise ValueError(f"MSI GSIs start above the IOAPIC's pins (>= {IOAPIC_PINS}), not at {first_gsi}")
        # KVM takes at most MAX_IRQ_ROUTES entries, GSIs below MAX_IRQ_ROUTES: with the
        # 40 default entries, that leaves room for this many MSI routes.
        most = first_gsi + MAX_IRQ_ROUTES - len(_DEFAULT_ROUTES)
        self._limit = most if limit is None else min(limit, most)
        self._backend = backend
        self._lock = threading.Lock()
        self._next = first_gsi  # GSIs >= this were never handed out
        self._free: list[int] = []  # released GSIs, handed out again first (lowest first)
        self._allocated: set[int] = set()
        self._msi: dict[int, tuple[int, int]] = {}
        self.pushes = 0  # KVM_SET_GSI_ROUTING calls made

    def allocate(self) -> int:
        """A GSI for one MSI vector (no route yet: an irqfd on it raises nothing)."""
        with self._lock:
            if self._free:
                self._free.sort()
                gsi = self._free.pop(0)
            elif self._next < self._limit:
                gsi = self._next
                self._next += 1
            else:
                raise GsiExhausted(f"all {self._limit - FIRST_MSI_GSI} MSI GSIs are in use")
            self._allocated.add(gsi)
            return gsi

    def release(self, gsi: int) -> None:
        """Give ``gsi`` back, dropping its route (its irqfd must be unbound already)."""
        with self._lock:
            if gsi not in self._allocated:
                raise ValueError(f"GSI {gsi} was not allocated here")
            if gsi in self._msi:
                self._push({**self._msi, gsi: None})
            self._allocated.discard(gsi)
            self._free.append(gsi)

    def set_msi_routes(self, routes: Mapping[int, tuple[int, int] | None]) -> None:
        """Set (``(address, data)``) or drop (``None``) the MSI routes of allocated GSIs, in
        one table update; nothing is sent to KVM when nothing changes."""
        with self._lock:
            for gsi in routes:
                if gsi not in self._allocated:
                    raise ValueError(f"GSI {gsi} was not allocated here")
            self._push({**self._msi, **routes})

    def _push(self, wanted: Mapping[int, tuple[int, int] | None]) -> None:
        new = {gsi: msg for gsi, msg in wanted.items() if msg is not None}
        if new == self._msi:
            return
        self._backend.set_gsi_routing(self._table(new))  # raises: the old table stays
        self._msi = new
        self.pushes += 1

    @staticmethod
    def _table(msi: Mapping[int, tuple[int, int]]) -> list[IrqRoute]:
        routes: list[IrqRoute] = list(_DEFAULT_ROUTES)
        routes.extend(MsiRoute(gsi, address, data) for gsi, (address, data) in sorted(msi.items()))
        return routes

    def table(self) -> tuple[IrqRoute, ...]:
        """The table KVM has now (as last pushed; KVM's default before any push)."""
        with self._lock:
            return tuple(self._table(self._msi))

    def msi_route(self, gsi: int) -> tuple[int, int] | None:
        with self._lock:
            return self._msi.get(gsi)

    def bind_irqfd(self, eventfd: int, gsi: int) -> None:
        self._backend.irqfd(eventfd, gsi)

    def unbind_irqfd(self, eventfd: int, gsi: int) -> None:
        self._backend.irqfd(eventfd, gsi, deassign=True)


class IntxLines:
    """Shared level-triggered lines: ``set(gsi, source, level)`` records one source's level
    and calls ``irq_line(gsi, any source high)`` when the OR changes -- under this object's
    lock, so two threads cannot apply their levels in the opposite order (the UART's rule,
    docs/architecture.md). ``irq_line`` must be quick and must not call back in."""

    def __init__(self, irq_line: Callable[[int, bool], None]) -> None:
        self._irq_line = irq_line
        self._lock = threading.Lock()
        self._high: dict[int, set[Hashable]] = {}

    def set(self, gsi: int, source: Hashable, level: bool) -> None:
        with self._lock:
            sources = self._high.setdefault(gsi, set())
            before = bool(sources)
            if level:
                sources.add(source)
            else:
                sources.discard(source)
            if bool(sources) != before:
                self._irq_line(gsi, not before)

    def level(self, gsi: int) -> bool:
        with self._lock:
            return bool(self._high.get(gsi))
