"""virtio-pci, modern only (virtio 1.2 section 4.1): a virtio device as a PCI function, the
transport any guest finds without being told where to look.

**Identity.** Vendor 0x1AF4, device 0x1040 + the virtio device type, revision 1 (a
non-transitional device: no legacy I/O BAR, so no legacy driver binds to it), subsystem
0x1AF4:0x0040 (the spec asks non-transitional devices for a subsystem ID of 0x40 or more),
class codes as QEMU gives them (block: 0x0100 mass storage/SCSI, net: 0x0200 Ethernet,
vsock: 0x0780 other communication, everything else 0x00FF "unclassified"), INTA.

**BAR 0**, one 64-bit, non-prefetchable memory BAR holding every structure, each in its own
4 KiB page as QEMU and Cloud Hypervisor lay them out (the MSI-X structures apart from the
other registers, as the PCI spec recommends)::

    0x0000  common configuration   (struct virtio_pci_common_cfg; capability length 0x40)
    0x1000  ISR status             (1 byte: read returns and clears it)
    0x2000  device configuration   (the device's config space; capability length 0x1000)
    0x3000  notifications          (4 bytes per queue: queue q at 0x3000 + 4 * q)
    then    MSI-X table            (num_queues + 1 vectors, next page)
    then    MSI-X PBA              (next page)

rounded up to a power of two (32 KiB for up to 255 queues). Non-prefetchable because reading
ISR has a side effect (PCI forbids prefetchable BARs with read side effects; QEMU marks its
modern BAR prefetchable, Cloud Hypervisor does not). Accesses a structure does not claim read
zero and write nothing; an access straddling two pages reads all-ones and writes nothing.

**Capabilities** (vendor-specific, ID 0x09; struct virtio_pci_cap: cfg_type, bar, id,
offset, length), in this order: COMMON_CFG, NOTIFY_CFG (with notify_off_multiplier 4),
ISR_CFG, DEVICE_CFG, PCI_CFG, then MSI-X. PCI_CFG is the configuration-space window the spec
requires of every device: the driver writes ``bar``, ``offset`` and ``length`` (1, 2 or 4)
into the capability, and each access to its ``pci_cfg_data`` is performed on the BAR at that
offset -- whether or not the BAR is decoded -- with its side effects (reading ISR through it
clears ISR). A window that names another BAR, another length or bytes past the BAR's end
does nothing.

**Notifications.** notify_off_multiplier 4 and ``queue_notify_off`` = the queue index give
every queue its own notify address, so the VM binds one ioeventfd per queue *without
datamatch*, and by default with length 0 ("any length", KVM_CAP_IOEVENTFD_ANY_LENGTH, Linux
4.1+): KVM then registers it on its fast-MMIO bus and completes the guest's write from the
EPT-misconfiguration exit without decoding the instruction -- what QEMU does for modern
virtio-pci. A single notify address (multiplier 0) would need datamatch on the queue index,
which rules out the fast path and makes KVM compare every write's value. Cloud Hypervisor
and Firecracker use multiplier 4 too. A notification that reaches this model (no ioeventfd
bound yet, or a write width the binding does not cover) is ``core.notify(queue)`` of the
queue whose slot was written; the value is ignored, as the ioeventfd ignores it.

The ioeventfds follow BAR 0: ``notify_regions()`` is where they belong now, and on every move
(``bar_moved``: the guest reprogrammed the BAR or switched memory decoding) the
``rebind_notify(unbind, bind)`` callback gets the regions to deassign and those to assign.
PciRoot.add maps the BAR, so with the callback set before ``root.add`` the first binding
happens there too.

**Interrupts.** MSI-X has ``num_queues + 1`` vectors; ``config_msix_vector`` and each
queue's ``queue_msix_vector`` pick the vector of an event, VIRTIO_MSI_NO_VECTOR (0xFFFF,
the power-on value, and what a vector beyond the table reads back as) none: with MSI-X
enabled such an event raises nothing (a polling driver). With MSI-X disabled the event sets
its ISR bit (1: a queue, 2: the configuration) and asserts INTx; reading ISR returns the bits,
clears them and deasserts the pin. The configuration bit is set for every configuration
interrupt, MSI-X or not, as the spec says; the queue bit only on the INTx path. A queue
interrupt while the driver has no DRIVER_OK (a request finishing after a reset) is dropped.
A reset (status 0) unmaps every vector and clears ISR, lowering the pin.

**Width rules.** Drivers use each field's natural width; any other access is taken as the
bytes it covers: a read assembles the bytes of every field it overlaps, a write updates the
bytes it covers of each field (the rest keep their current value) and applies the fields in
ascending order. 64-bit fields are two 32-bit halves (8-byte accesses cover both). Read-only
fields ignore writes. Nothing a guest writes raises.

**Threads and locks.** BAR accesses run on vCPU threads; configuration accesses (the
PCI_CFG window included) on vCPU threads under the PCI root's lock; interrupts come from
the backend's loop thread or, for DEVICE_NEEDS_RESET, from a vCPU thread under the device
lock. Lock order: root lock, then the device lock, then this transport's lock (vectors and
ISR), then the function's INTx and MSI-X locks.

**Saved state** (``PciTransportState``): the core's (``VirtioCore``), the configuration and
queue MSI-X vectors, ISR, the INTx level asked for, the MSI-X table and PBA. Configuration
space -- BARs, command, the MSI-X control word, the PCI_CFG window -- is the PCI root's
(``PciRootState``), restored before this (the registry's order), so the BAR is in place, its
notify ioeventfds moved there, and MSI-X enabled or not when the table is written: writing
it routes every deliverable vector (``GsiRouter``: KVM's table; the irqfds were bound when
the function was built), and a pending bit fires or stays pending as the vector's mask
says. (A pending bit of a function whose MSI-X is disabled is not carried: no interrupt
can come of it until the driver enables MSI-X, and then one is raised anew.)

**Wiring it into a VM**::

    transport = VirtioPci(device, memory, gsi_router)
    transport.rebind_notify = rebind   # KVM_IOEVENTFD deassign each of unbind, assign each of bind,
                                       # fd: transport.core.notifiers[region.queue].fd
    pci_root.add(transport)            # BAR 0 assigned and decoded -> bar_moved -> rebind([], regions)
    vm.add_service(transport.core.service)
    ... pci_root.close() at teardown closes the transport (MSI-X irqfds and GSIs, the eventfds).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import attrs

from trivmm.devices.pci.function import STATUS, STATUS_INTERRUPT, BarKind, PciError, PciFunction
from trivmm.devices.pci.irq import MsiRouter
from trivmm.devices.pci.msix import MSIX_MAX_VECTORS
from trivmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    DeviceType,
    VirtioDevice,
    pack_state,
    unpack_state,
)
from trivmm.devices.virtio.transport import CoreState, VirtioCore
from trivmm.memory import GuestMemory

__all__ = ["VirtioPci", "PciTransportState", "NotifyRegion", "RebindNotify", "VIRTIO_PCI_VENDOR_ID",
           "VIRTIO_PCI_DEVICE_ID_BASE", "VIRTIO_PCI_SUBSYSTEM_ID", "VIRTIO_PCI_REVISION", "VIRTIO_MSI_NO_VECTOR",
           "CAP_COMMON_CFG", "CAP_NOTIFY_CFG", "CAP_ISR_CFG", "CAP_DEVICE_CFG", "CAP_PCI_CFG", "COMMON_CFG_OFFSET",
           "COMMON_CFG_LENGTH", "ISR_CFG_OFFSET", "DEVICE_CFG_OFFSET", "DEVICE_CFG_LENGTH", "NOTIFY_CFG_OFFSET",
           "NOTIFY_OFF_MULTIPLIER", "ISR_QUEUE", "ISR_CONFIG", "class_code"]  # fmt: skip

_log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040  # + the virtio device type
VIRTIO_PCI_SUBSYSTEM_ID = 0x0040  # "non-transitional devices SHOULD have a subsystem ID of 0x40 or higher"
VIRTIO_PCI_REVISION = 1  # non-transitional
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# struct virtio_pci_cap cfg_type values
CAP_COMMON_CFG, CAP_NOTIFY_CFG, CAP_ISR_CFG, CAP_DEVICE_CFG, CAP_PCI_CFG = 1, 2, 3, 4, 5

_PAGE = 0x1000
COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_LENGTH = 0x40  # virtio 1.2's struct, with queue_notify_data, queue_reset and the admin queue fields
ISR_CFG_OFFSET = 0x1000
DEVICE_CFG_OFFSET = 0x2000
DEVICE_CFG_LENGTH = 0x1000
NOTIFY_CFG_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4
ISR_QUEUE, ISR_CONFIG = 0x1, 0x2

_STATUS_BITS = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK
                | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)  # fmt: skip
_U32 = 0xFFFF_FFFF

# Class codes (base << 16 | sub << 8 | prog-if) as QEMU's virtio-*-pci devices have them.
_CLASS_CODES = {
    DeviceType.BLOCK: 0x010000,  # PCI_CLASS_STORAGE_SCSI
    DeviceType.NET: 0x020000,  # PCI_CLASS_NETWORK_ETHERNET
    DeviceType.VSOCK: 0x078000,  # PCI_CLASS_COMMUNICATION_OTHER
}
_CLASS_OTHER = 0x00FF00  # PCI_CLASS_OTHERS (0x00FF): lspci's "Unclassified device [00ff]"

# struct virtio_pci_common_cfg: (offset, size) of each field, 64-bit fields as two halves.
_DEVICE_FEATURE_SELECT, _DEVICE_FEATURE, _DRIVER_FEATURE_SELECT, _DRIVER_FEATURE = 0x00, 0x04, 0x08, 0x0C
_CONFIG_MSIX_VECTOR, _NUM_QUEUES, _DEVICE_STATUS, _CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
_QUEUE_SELECT, _QUEUE_SIZE, _QUEUE_MSIX_VECTOR, _QUEUE_ENABLE, _QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
_QUEUE_NOTIFY_DATA, _QUEUE_RESET, _ADMIN_QUEUE_INDEX, _ADMIN_QUEUE_NUM = 0x38, 0x3A, 0x3C, 0x3E
_QUEUE_ADDRESS_FIELDS = {0x20: "desc_lo", 0x24: "desc_hi", 0x28: "avail_lo", 0x2C: "avail_hi",
                         0x30: "used_lo", 0x34: "used_hi"}  # fmt: skip
_COMMON_FIELDS: tuple[tuple[int, int], ...] = (
    (_DEVICE_FEATURE_SELECT, 4), (_DEVICE_FEATURE, 4), (_DRIVER_FEATURE_SELECT, 4), (_DRIVER_FEATURE, 4),
    (_CONFIG_MSIX_VECTOR, 2), (_NUM_QUEUES, 2), (_DEVICE_STATUS, 1), (_CONFIG_GENERATION, 1),
    (_QUEUE_SELECT, 2), (_QUEUE_SIZE, 2), (_QUEUE_MSIX_VECTOR, 2), (_QUEUE_ENABLE, 2), (_QUEUE_NOTIFY_OFF, 2),
    *((offset, 4) for offset in _QUEUE_ADDRESS_FIELDS),
    (_QUEUE_NOTIFY_DATA, 2), (_QUEUE_RESET, 2), (_ADMIN_QUEUE_INDEX, 2), (_ADMIN_QUEUE_NUM, 2),
)  # fmt: skip
_COMMON_WRITABLE = frozenset({_DEVICE_FEATURE_SELECT, _DRIVER_FEATURE_SELECT, _DRIVER_FEATURE, _CONFIG_MSIX_VECTOR,
                              _DEVICE_STATUS, _QUEUE_SELECT, _QUEUE_SIZE, _QUEUE_MSIX_VECTOR, _QUEUE_ENABLE,
                              *_QUEUE_ADDRESS_FIELDS})  # fmt: skip

# struct virtio_pci_cap after cap_vndr, cap_next and cap_len: the payload add_vendor_capability takes.
_CAP_BAR, _CAP_OFFSET, _CAP_LENGTH, _CAP_EXTRA = 4, 8, 12, 16  # offsets from the capability's start


@attrs.frozen
class PciTransportState:
    """What a virtio-pci function keeps beyond its configuration space (the root's)."""

    core: CoreState
    config_vector: int
    queue_vectors: tuple[int, ...]
    isr: int
    intx: bool  # the INTx level the function asks for
    msix_table: bytes
    msix_pending: int  # the PBA, bit per vector


class NotifyRegion(NamedTuple):
    """One ioeventfd the VM binds: a guest write to ``address`` (``length`` bytes; 0: any
    length) signals ``core.notifiers[queue]``; ``datamatch`` None: any value."""

    address: int
    length: int
    queue: int
    datamatch: int | None


RebindNotify = Callable[[list[NotifyRegion], list[NotifyRegion]], None]


def class_code(device_type: int) -> int:
    """The 24-bit PCI class code of a virtio device of ``device_type`` (QEMU's choices)."""
    return _CLASS_CODES.get(device_type, _CLASS_OTHER)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _cap_payload(cfg_type: int, bar: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap from cfg_type on (add_vendor_capability adds vndr, next, len)."""
    return bytes([cfg_type, bar, 0, 0, 0]) + offset.to_bytes(4, "little") + length.to_bytes(4, "little") + extra


class _Bar0:
    """BAR 0's registers outside the MSI-X structures (a ``BusDevice``)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: VirtioPci) -> None:
        self._owner = owner

    def read(self, offset: int, data: memoryview) -> None:
        self._owner._bar_read(offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        self._owner._bar_write(offset, data)


class VirtioPci(PciFunction):
    """One virtio device on the PCI bus (see the module docstring). ``router`` gives the
    MSI-X vectors their GSIs and irqfds; ``rebind_notify(unbind, bind)`` (set it before
    ``PciRoot.add``, which maps BAR 0) moves the VM's ioeventfds with BAR 0; ``ioeventfd_length`` is the
    length in the regions it gets: 0 (any width, KVM's fast MMIO path) or 2 (the 16-bit
    write drivers make, for a host without KVM_CAP_IOEVENTFD_ANY_LENGTH)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, router: MsiRouter, *,
                 rebind_notify: RebindNotify | None = None, ioeventfd_length: int = 0) -> None:  # fmt: skip
        if ioeventfd_length not in (0, 2):
            raise PciError(f"a notify ioeventfd is 0 (any) or 2 bytes long, not {ioeventfd_length}")
        super().__init__(VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_DEVICE_ID_BASE + device.device_type,
                         class_code(device.device_type), revision=VIRTIO_PCI_REVISION,
                         subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID, subsystem_id=VIRTIO_PCI_SUBSYSTEM_ID,
                         interrupt_pin=1)  # fmt: skip
        self.core = VirtioCore(device, memory, self._raise)
        self.rebind_notify = rebind_notify
        self.ioeventfd_length = ioeventfd_length
        self.num_queues = num_queues = len(self.core.queues)
        if num_queues > 0xFFFF:
            raise PciError(f"virtio-pci selects queues with 16 bits: {num_queues} queues are too many")
        self.msix_vectors = vectors = min(num_queues + 1, MSIX_MAX_VECTORS)
        self.notify_length = NOTIFY_OFF_MULTIPLIER * max(num_queues, 1)
        self.msix_table_offset = NOTIFY_CFG_OFFSET + _align(self.notify_length, _PAGE)
        self.msix_pba_offset = self.msix_table_offset + _align(16 * vectors, _PAGE)
        end = self.msix_pba_offset + _align((vectors + 63) // 64 * 8, _PAGE)
        self.bar_size = 1 << (end - 1).bit_length()

        self._lock = threading.Lock()  # the vectors and ISR
        self._config_vector = VIRTIO_MSI_NO_VECTOR
        self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * num_queues
        self._isr = 0

        self.add_bar(0, self.bar_size, BarKind.MEM64, _Bar0(self), prefetchable=False)
        self.add_vendor_capability(_cap_payload(CAP_COMMON_CFG, 0, COMMON_CFG_OFFSET, COMMON_CFG_LENGTH))
        self.add_vendor_capability(_cap_payload(CAP_NOTIFY_CFG, 0, NOTIFY_CFG_OFFSET, self.notify_length,
                                                NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little")))  # fmt: skip
        self.add_vendor_capability(_cap_payload(CAP_ISR_CFG, 0, ISR_CFG_OFFSET, 1))
        self.add_vendor_capability(_cap_payload(CAP_DEVICE_CFG, 0, DEVICE_CFG_OFFSET, DEVICE_CFG_LENGTH))
        # PCI_CFG: bar, offset, length and pci_cfg_data are the driver's to write.
        writable = bytes([0x00, 0xFF, 0x00, 0x00, 0x00]) + b"\xff" * 12
        self.pci_cfg_offset = self.add_vendor_capability(_cap_payload(CAP_PCI_CFG, 0, 0, 0, bytes(4)),
                                                         writable=writable)  # fmt: skip
        self.add_msix(vectors, router, table_bar=0, table_offset=self.msix_table_offset, pba_bar=0,
                      pba_offset=self.msix_pba_offset)  # fmt: skip

    def __repr__(self) -> str:
        return f"<VirtioPci {self.core.device.name} slot {self.slot}>"

    @property
    def device(self) -> VirtioDevice:
        return self.core.device

    # --- what the VM and tests look at ----------------------------------------------------------
    @property
    def isr(self) -> int:
        """ISR status, without the read side effect."""
        with self._lock:
            return self._isr

    @property
    def config_vector(self) -> int:
        with self._lock:
            return self._config_vector

    def queue_vector(self, index: int) -> int:
        with self._lock:
            return self._queue_vectors[index] if 0 <= index < self.num_queues else VIRTIO_MSI_NO_VECTOR

    def notify_regions(self) -> list[NotifyRegion]:
        """The ioeventfds that belong at BAR 0's current address (none while it is off the bus)."""
        return self._regions_at(self.bar_address(0))

    def _regions_at(self, base: int | None) -> list[NotifyRegion]:
        if base is None:
            return []
        first = base + NOTIFY_CFG_OFFSET
        return [NotifyRegion(first + NOTIFY_OFF_MULTIPLIER * queue, self.ioeventfd_length, queue, None)
                for queue in range(self.num_queues)]  # fmt: skip

    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR 0 moved (under the root's lock): the VM moves the notify ioeventfds."""
        callback = self.rebind_notify
        if index != 0 or callback is None:
            return
        try:
            callback(self._regions_at(old), self._regions_at(new))
        except OSError as exc:  # notifications still reach the model, only slower
            _log.warning("%r: moving the notify ioeventfds from %s to %s failed: %s", self,
                         None if old is None else hex(old), None if new is None else hex(new), exc)  # fmt: skip

    def close(self) -> None:
        super().close()
        self.core.close()

    # --- interrupts (any thread) --------------------------------------------------------------
    def _raise(self, queue: int | None) -> None:
        """VirtioCore's interrupt: a used-buffer notification of ``queue``, or (None) a
        configuration change."""
        if queue is not None and (not 0 <= queue < self.num_queues or not self.core.status & STATUS_DRIVER_OK):
            return  # a stale completion after a reset, or no such queue
        with self._lock:
            if queue is None:
                self._isr |= ISR_CONFIG  # set before any configuration interrupt, MSI-X or not
                vector = self._config_vector
            else:
                vector = self._queue_vectors[queue]
        msix = self.msix
        if msix is not None and msix.enabled and (vector == VIRTIO_MSI_NO_VECTOR or msix.notify(vector)):
            return  # delivered, left pending behind a mask, or unmapped: no interrupt
        with self._lock:  # MSI-X disabled: ISR and INTx, under the lock that ISR reads take
            self._isr |= ISR_CONFIG if queue is None else ISR_QUEUE
            self.set_intx(True)

    def _read_isr(self) -> int:
        with self._lock:
            value, self._isr = self._isr, 0
            self.set_intx(False)
        return value

    def _reset_transport(self) -> None:
        """After the core's reset: every event unmapped, ISR clear, the pin low."""
        with self._lock:
            self._config_vector = VIRTIO_MSI_NO_VECTOR
            self._queue_vectors = [VIRTIO_MSI_NO_VECTOR] * self.num_queues
            self._isr = 0
            self.set_intx(False)

    # --- saved state ----------------------------------------------------------------------------
    def save(self) -> PciTransportState:
        core = self.core.save()
        msix = self.msix
        assert msix is not None
        table = bytearray(msix.table_size)
        msix.table_read(0, memoryview(table))
        pba = bytearray(msix.pba_size)
        msix.pba_read(0, memoryview(pba))
        with self._lock:
            config_vector, queue_vectors, isr = self._config_vector, tuple(self._queue_vectors), self._isr
        intx = bool(PciFunction.read_config(self, STATUS, 2) & STATUS_INTERRUPT)
        return PciTransportState(core, config_vector, queue_vectors, isr, intx, bytes(table),
                                 int.from_bytes(pba, "little"))  # fmt: skip

    def check(self, state: PciTransportState) -> None:
        """``ValueError`` for what this function cannot take (the core's part: its own check)."""
        msix = self.msix
        assert msix is not None
        vectors = [("config_vector", state.config_vector)]
        if len(state.queue_vectors) != self.num_queues:
            raise ValueError(f"{self!r}: {len(state.queue_vectors)} saved queue vectors, not {self.num_queues}")
        vectors += [(f"queue {index}'s vector", vector) for index, vector in enumerate(state.queue_vectors)]
        for what, vector in vectors:
            if not (0 <= vector < self.msix_vectors or vector == VIRTIO_MSI_NO_VECTOR):
                raise ValueError(f"{self!r}: saved {what} {vector} is neither one of the {self.msix_vectors} MSI-X "
                                 f"vectors nor VIRTIO_MSI_NO_VECTOR")  # fmt: skip
        if state.isr & ~(ISR_QUEUE | ISR_CONFIG) or state.isr < 0:
            raise ValueError(f"{self!r}: saved ISR {state.isr:#x} has bits it cannot have")
        if len(state.msix_table) != msix.table_size:
            raise ValueError(f"{self!r}: saved MSI-X table of {len(state.msix_table)} bytes, not {msix.table_size}")
        for vector in range(msix.vectors):
            entry = state.msix_table[16 * vector : 16 * vector + 16]
            # Message Address bits 1:0 and Vector Control bits 31:1 are read-only zero.
            if entry[0] & 0x3 or entry[12] & ~0x1 or any(entry[13:16]):
                raise ValueError(f"{self!r}: saved MSI-X entry {vector} has read-only bits set")
        if not 0 <= state.msix_pending < 1 << msix.vectors:
            raise ValueError(f"{self!r}: saved MSI-X pending bits {state.msix_pending:#x} name vectors past "
                             f"the {msix.vectors} there are")  # fmt: skip

    def restore(self, state: PciTransportState) -> None:
        """Take ``state`` after the PCI root's; ``ValueError``, the device left reset (the
        MSI-X table as it was), for anything wrong."""
        self._reset_device()
        self.check(state)
        msix = self.msix
        assert msix is not None
        with self._lock:
            self._config_vector, self._queue_vectors = state.config_vector, list(state.queue_vectors)
            self._isr = state.isr
        msix.table_write(0, memoryview(state.msix_table))  # routes the deliverable vectors
        for vector in range(msix.vectors):
            if state.msix_pending >> vector & 1:
                msix.notify(vector)  # pending again behind its mask, or delivered
        self.set_intx(state.intx)
        try:
            self.core.restore(state.core)  # raises again what a running device may have had in flight
        except ValueError:
            self._reset_device()
            raise

    def _reset_device(self) -> None:
        self.core.reset()
        self._reset_transport()

    def save_state(self) -> bytes:
        """The function's section of a snapshot (``StateProvider``); after ``quiesce``."""
        return pack_state(self.save())

    def restore_state(self, data: bytes) -> None:
        try:
            state = unpack_state(PciTransportState, data, f"{self.device.name} virtio-pci state")
        except ValueError:
            self._reset_device()
            raise
        self.restore(state)

    # --- BAR 0 (vCPU threads) -----------------------------------------------------------------
    def _bar_read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        page = offset & ~(_PAGE - 1)
        if size == 0 or (offset + size - 1) & ~(_PAGE - 1) != page:
            data[:] = b"\xff" * size
            return
        within = offset - page
        if page == COMMON_CFG_OFFSET:
            data[:] = self._common_read(within, size)
        elif page == ISR_CFG_OFFSET:
            value = self._read_isr() if within == 0 else 0
            data[:] = value.to_bytes(size, "little")
        elif page == DEVICE_CFG_OFFSET:
            self.device.read_config(within, data)
        else:  # notify slots read zero, as does the rest
            data[:] = bytes(size)

    def _bar_write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        page = offset & ~(_PAGE - 1)
        if size == 0 or (offset + size - 1) & ~(_PAGE - 1) != page:
            return
        within = offset - page
        if page == COMMON_CFG_OFFSET:
            self._common_write(within, bytes(data))
        elif page == DEVICE_CFG_OFFSET:
            self.device.write_config(within, data)
        elif NOTIFY_CFG_OFFSET <= offset < NOTIFY_CFG_OFFSET + NOTIFY_OFF_MULTIPLIER * self.num_queues:
            # No ioeventfd took it: the queue is the slot's, whatever the value (as KVM's would).
            self.core.notify((offset - NOTIFY_CFG_OFFSET) // NOTIFY_OFF_MULTIPLIER)

    # --- the common configuration structure -----------------------------------------------------
    def _common_read(self, offset: int, size: int) -> bytes:
        out = bytearray(size)
        end = offset + size
        for start, length in _COMMON_FIELDS:
            if start < end and offset < start + length:
                raw = self._common_get(start).to_bytes(length, "little")
                lo, hi = max(start, offset), min(start + length, end)
                out[lo - offset : hi - offset] = raw[lo - start : hi - start]
        return bytes(out)

    def _common_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        for start, length in _COMMON_FIELDS:
            if start < end and offset < start + length and start in _COMMON_WRITABLE:
                lo, hi = max(start, offset), min(start + length, end)
                if lo == start and hi == start + length:
                    value = int.from_bytes(data[lo - offset : hi - offset], "little")
                else:  # a partial write: the field's other bytes keep their value
                    raw = bytearray(self._common_get(start).to_bytes(length, "little"))
                    raw[lo - start : hi - start] = data[lo - offset : hi - offset]
                    value = int.from_bytes(raw, "little")
                self._common_set(start, value)

    def _common_get(self, field: int) -> int:
        core = self.core
        if field == _DEVICE_FEATURE_SELECT:
            return core.device_features_sel & _U32
        if field == _DEVICE_FEATURE:
            return core.device_features_word()
        if field == _DRIVER_FEATURE_SELECT:
            return core.driver_features_sel & _U32
        if field == _DRIVER_FEATURE:
            return core.driver_features_word()
        if field == _CONFIG_MSIX_VECTOR:
            return self.config_vector
        if field == _NUM_QUEUES:
            return self.num_queues
        if field == _DEVICE_STATUS:
            return core.status & 0xFF
        if field == _CONFIG_GENERATION:
            return core.config_generation & 0xFF
        selected = core.queue_sel & 0xFFFF
        queue = core.queue
        if field == _QUEUE_SELECT:
            return selected
        if field == _QUEUE_SIZE:
            return queue.size & 0xFFFF if queue is not None else 0
        if field == _QUEUE_MSIX_VECTOR:
            return self.queue_vector(selected)
        if field == _QUEUE_ENABLE:
            return int(queue is not None and queue.ready)
        if field in (_QUEUE_NOTIFY_OFF, _QUEUE_NOTIFY_DATA):
            return selected if queue is not None else 0
        if field in _QUEUE_ADDRESS_FIELDS:
            return core.read_queue_field(_QUEUE_ADDRESS_FIELDS[field])
        return 0  # queue_reset (VIRTIO_F_RING_RESET not offered), the admin queue fields

    def _common_set(self, field: int, value: int) -> None:
        core = self.core
        if field == _DEVICE_FEATURE_SELECT:
            core.device_features_sel = value & _U32
        elif field == _DRIVER_FEATURE_SELECT:
            core.driver_features_sel = value & _U32
        elif field == _DRIVER_FEATURE:
            core.write_driver_features(value)
        elif field == _CONFIG_MSIX_VECTOR:
            with self._lock:
                self._config_vector = value if value < self.msix_vectors else VIRTIO_MSI_NO_VECTOR
        elif field == _DEVICE_STATUS:
            self._write_status(value)
        elif field == _QUEUE_SELECT:
            core.queue_sel = value & 0xFFFF
        elif field == _QUEUE_SIZE:
            queue = core.queue
            # Only a power of two up to the maximum: the device presents 0 or a power of two.
            if queue is not None and value and not value & (value - 1) and value <= queue.max_size:
                core.write_queue_size(value)
            else:
                _log.debug("%r: ignored queue size %d for queue %d", self, value, core.queue_sel)
        elif field == _QUEUE_MSIX_VECTOR:
            selected = core.queue_sel
            with self._lock:
                if selected < self.num_queues:
                    self._queue_vectors[selected] = value if value < self.msix_vectors else VIRTIO_MSI_NO_VECTOR
        elif field == _QUEUE_ENABLE:
            core.write_queue_ready(value)
        elif field in _QUEUE_ADDRESS_FIELDS:
            core.write_queue_field(_QUEUE_ADDRESS_FIELDS[field], value)

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.core.write_status(0)
            self._reset_transport()
            return
        if not value & _STATUS_BITS:
            _log.debug("%r: ignored a status write of reserved bits only (%#x)", self, value)
            return
        self.core.write_status(value & _STATUS_BITS)

    # --- configuration space: the PCI_CFG window (under the root's lock) --------------------------
    def read_config(self, offset: int, size: int) -> int:
        data = self.pci_cfg_offset + _CAP_EXTRA
        if offset < data + 4 and data < offset + size:
            window = self._window()
            if window is not None:
                at, length = window
                buffer = bytearray(length)
                self.bar_device(0).read(at, memoryview(buffer))
                self.config[data : data + length] = buffer
        return super().read_config(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        super().write_config(offset, size, value)
        data = self.pci_cfg_offset + _CAP_EXTRA
        if offset < data + 4 and data < offset + size:
            window = self._window()
            if window is not None:
                at, length = window
                self.bar_device(0).write(at, memoryview(bytes(self.config[data : data + length])))

    def _window(self) -> tuple[int, int] | None:
        """(offset, length) of the BAR 0 access the PCI_CFG capability describes, or None."""
        cap = self.pci_cfg_offset
        bar = self.config[cap + _CAP_BAR]
        at = self._get(cap + _CAP_OFFSET, 4)
        length = self._get(cap + _CAP_LENGTH, 4)
        if bar != 0 or length not in (1, 2, 4) or at + length > self.bar_size:
            return None
        return at, length
