"""``Vm``: one KVM virtual machine fd — memory slots, irqchip, PIT, eventfds, dirty log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from trivmm.kvm._ffi import ffi
from trivmm.kvm._ioctl import ULONG, FdObject
from trivmm.kvm.constants import (
    IOEVENTFD_FLAG_DATAMATCH,
    IOEVENTFD_FLAG_DEASSIGN,
    IOEVENTFD_FLAG_PIO,
    IRQ_ROUTING_IRQCHIP,
    IRQ_ROUTING_MSI,
    IRQFD_FLAG_DEASSIGN,
    Cap,
)

if TYPE_CHECKING:
    from trivmm.kvm.system import Kvm
    from trivmm.kvm.vcpu import Vcpu

__all__ = ["Vm", "IrqchipRoute", "MsiRoute", "IrqRoute", "IRQCHIP_PIC_MASTER", "IRQCHIP_PIC_SLAVE",
           "IRQCHIP_IOAPIC", "MAX_IRQ_ROUTES"]  # fmt: skip

# struct kvm_irq_routing_irqchip.irqchip (<linux/kvm.h>: KVM_IRQCHIP_*)
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2
MAX_IRQ_ROUTES = 4096  # x86 KVM_MAX_IRQ_ROUTES: GSIs are 0..4095


@attrs.frozen
class IrqchipRoute:
    """A GSI wired to a pin of an in-kernel interrupt controller (``IRQCHIP_*``)."""

    gsi: int
    irqchip: int
    pin: int


@attrs.frozen
class MsiRoute:
    """A GSI that sends the MSI message (``address``, ``data``) when raised."""

    gsi: int
    address: int
    data: int


IrqRoute = IrqchipRoute | MsiRoute

# Intel VMX needs three pages for the real-mode TSS and one for the identity map, at
# addresses no guest RAM uses; these are the ones QEMU and Firecracker pick.
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000
# KVM_CREATE_PIT2 flag: model port 0x61's speaker bits in the kernel too.
_PIT_SPEAKER_DUMMY = 1


class Vm(FdObject):
    """A VM fd. Policy (layout, devices) lives in ``trivmm.vm``; this is the raw API."""

    __slots__ = ("kvm",)

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm

    # --- memory -------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None:  # fmt: skip
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": size, "userspace_addr": userspace_addr,
        })  # fmt: skip
        self.ioctl("KVM_SET_USER_MEMORY_REGION", region)

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's bitmap of pages written since the last call."""
        nwords = (npages + 63) // 64
        bitmap = ffi.new("uint64_t[]", max(nwords, 1))
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        self.ioctl("KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap, nwords * 8))

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes, num_pages: int | None = None) -> None:
        """KVM_CLEAR_DIRTY_LOG (needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): re-protect
        the pages set in ``bitmap``. ``num_pages`` (default: the bitmap's bits) must be a
        multiple of 64 unless it reaches the slot's end, and ``first_page`` a multiple of 64."""
        buf = ffi.from_buffer(bitmap)
        log = ffi.new("struct kvm_clear_dirty_log *", {
            "slot": slot, "num_pages": len(bitmap) * 8 if num_pages is None else num_pages,
            "first_page": first_page, "dirty_bitmap": buf,
        })  # fmt: skip
        self.ioctl("KVM_CLEAR_DIRTY_LOG", log)

    def enable_cap(self, cap: Cap, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (e.g. MANUAL_DIRTY_LOG_PROTECT2 with its option bits)."""
        self.ioctl("KVM_ENABLE_CAP", ffi.new("struct kvm_enable_cap *", {
            "cap": cap, "flags": flags, "args": [*args, 0, 0, 0, 0][:4],
        }))  # fmt: skip

    # --- platform -----------------------------------------------------------------------
    def setup_x86_platform(self) -> None:
        """TSS and identity-map pages, in-kernel PIC+IOAPIC+LAPIC, in-kernel PIT."""
        self.kvm.require(Cap.SET_TSS_ADDR, Cap.IRQCHIP, Cap.PIT2)
        self.ioctl("KVM_SET_TSS_ADDR", ULONG(TSS_ADDRESS))
        if self.kvm.check_extension(Cap.SET_IDENTITY_MAP_ADDR):
            self.ioctl("KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", IDENTITY_MAP_ADDRESS))
        self.ioctl("KVM_CREATE_IRQCHIP")
        self.ioctl("KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": _PIT_SPEAKER_DUMMY}))

    def irq_line(self, irq: int, level: bool) -> None:
        self.ioctl("KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": int(level)}))

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        """Let a write to ``eventfd`` raise (edge) interrupt ``gsi`` without a VMM round trip."""
        self.kvm.require(Cap.IRQFD)
        flags = IRQFD_FLAG_DEASSIGN if deassign else 0
        self.ioctl("KVM_IRQFD", ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": flags}))

    def ioeventfd(self, eventfd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:  # fmt: skip
        """Let a guest write to ``addr`` signal ``eventfd`` instead of exiting to the VMM."""
        self.kvm.require(Cap.IOEVENTFD)
        flags = (IOEVENTFD_FLAG_PIO if pio else 0) | (IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= IOEVENTFD_FLAG_DATAMATCH
        self.ioctl("KVM_IOEVENTFD", ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": eventfd, "flags": flags,
        }))  # fmt: skip

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None:
        """KVM_SET_GSI_ROUTING: make ``routes`` the VM's whole GSI routing table. It replaces
        the table, KVM's default routes (GSIs 0..23 to the PIC and IOAPIC) included: a
        caller that adds MSI routes passes the defaults too."""
        self.kvm.require(Cap.IRQ_ROUTING)
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": max(len(routes), 1)})
        for index, route in enumerate(routes):
            entry = table.entries[index]
            entry.gsi = route.gsi
            if isinstance(route, MsiRoute):
                entry.type = IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
            else:
                entry.type = IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
        self.ioctl("KVM_SET_GSI_ROUTING", table)

    def signal_msi(self, address: int, data: int) -> int:
        msi = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFF_FFFF,
                                           "address_hi": address >> 32, "data": data})  # fmt: skip
        return self.ioctl("KVM_SIGNAL_MSI", msi)

    # --- saved state ---------------------------------------------------------------------
    def get_irqchip(self, chip_id: int) -> Any:
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        self.ioctl("KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: Any) -> None:
        self.ioctl("KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> Any:
        state = ffi.new("struct kvm_pit_state2 *")
        self.ioctl("KVM_GET_PIT2", state)
        return state

    def set_pit2(self, state: Any) -> None:
        self.ioctl("KVM_SET_PIT2", state)

    def get_clock(self) -> Any:
        clock = ffi.new("struct kvm_clock_data *")
        self.ioctl("KVM_GET_CLOCK", clock)
        return clock

    def set_clock(self, clock: Any) -> None:
        self.ioctl("KVM_SET_CLOCK", clock)

    # --- vCPUs ---------------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        from trivmm.kvm.vcpu import Vcpu

        fd = self.ioctl("KVM_CREATE_VCPU", ULONG(index))
        return Vcpu(self, index, fd)
