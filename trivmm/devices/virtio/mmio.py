"""virtio-mmio, version 2 (virtio 1.2 section 4.2.2): a device's registers in one page of
guest-physical address space, the microVM transport.

Registers are 32-bit (other widths are ignored / read as zero, as the spec allows a
device to); the device's configuration space from offset 0x100 takes any width. A queue
notification (``QueueNotify``, offset 0x50) normally never reaches this model: the VM binds
an ioeventfd per queue there with the queue index as datamatch, so the guest's write
signals the backend's eventfd inside KVM. The interrupt is a GSI raised through an irqfd
(edge-triggered, announced so in the ACPI DSDT), with ``InterruptStatus`` saying why.

Saved state (``MmioState``): the core's (``VirtioCore``) and ``InterruptStatus``. The
ioeventfds and the irqfd are the VM's, bound when it is built; a restored status that the
driver has not acknowledged is raised again (an edge lost on the way is worse than a
spurious one).
"""

from __future__ import annotations

import struct
import threading

import attrs

from trivmm.devices.virtio.device import STATUS_DRIVER_OK, VirtioDevice, pack_state, unpack_state
from trivmm.devices.virtio.transport import CoreState, VirtioCore
from trivmm.eventfd import EventFd
from trivmm.memory import GuestMemory

__all__ = ["VirtioMmio", "MmioState", "MMIO_SIZE", "NOTIFY_OFFSET", "MAGIC", "VENDOR_ID"]

MMIO_SIZE = 0x200  # registers and config space (mapped in a 4 KiB slot)
MAGIC = 0x7472_6976  # "virt"
VERSION = 2
VENDOR_ID = 0x4D56_5254  # "TRVM"
NOTIFY_OFFSET = 0x50
CONFIG_OFFSET = 0x100
INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2
_U32 = struct.Struct("<I")
_QUEUE_FIELD_AT = {0x80: "desc_lo", 0x84: "desc_hi", 0x90: "avail_lo", 0x94: "avail_hi",
                   0xA0: "used_lo", 0xA4: "used_hi"}  # fmt: skip


@attrs.frozen
class MmioState:
    """A virtio-mmio transport's registers: the core's, and ``InterruptStatus``."""

    core: CoreState
    interrupt_status: int


class VirtioMmio:
    """One virtio device on the MMIO bus (a ``BusDevice``: offsets within its page)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, interrupt: EventFd) -> None:
        self.core = VirtioCore(device, memory, self._raise)
        self._interrupt = interrupt
        self._isr_lock = threading.Lock()
        self.interrupt_status = 0

    @property
    def device(self) -> VirtioDevice:
        return self.core.device

    def _raise(self, queue: int | None) -> None:
        if queue is not None and not self.core.status & STATUS_DRIVER_OK:
            return  # a completion that raced a reset: no notification for a reset device
        with self._isr_lock:
            self.interrupt_status |= INTERRUPT_CONFIG_CHANGE if queue is None else INTERRUPT_USED_BUFFER
        self._interrupt.signal()  # the irqfd's edge

    # --- BusDevice ------------------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        if offset >= CONFIG_OFFSET:
            self.device.read_config(offset - CONFIG_OFFSET, data)
            return
        if len(data) != 4 or offset % 4:
            data[:] = bytes(len(data))
            return
        _U32.pack_into(data, 0, self._register(offset))

    def _register(self, offset: int) -> int:
        core = self.core
        queue = core.queue
        if offset == 0x000:
            return MAGIC
        if offset == 0x004:
            return VERSION
        if offset == 0x008:
            return self.device.device_type
        if offset == 0x00C:
            return VENDOR_ID
        if offset == 0x010:
            return core.device_features_word()
        if offset == 0x034:
            return queue.max_size if queue is not None else 0
        if offset == 0x044:
            return int(queue is not None and queue.ready)
        if offset == 0x060:
            return self.interrupt_status
        if offset == 0x070:
            return core.status
        if offset in _QUEUE_FIELD_AT:
            return core.read_queue_field(_QUEUE_FIELD_AT[offset])
        if offset in (0x0B0, 0x0B4):  # SHMLen: no shared memory regions (-1)
            return 0xFFFF_FFFF
        if offset == 0x0FC:
            return core.config_generation
        return 0

    def write(self, offset: int, data: memoryview) -> None:
        if offset >= CONFIG_OFFSET:
            self.device.write_config(offset - CONFIG_OFFSET, data)
            return
        if len(data) != 4 or offset % 4:
            return
        (value,) = _U32.unpack_from(data)
        core = self.core
        if offset == 0x014:
            core.device_features_sel = value
        elif offset == 0x020:
            core.write_driver_features(value)
        elif offset == 0x024:
            core.driver_features_sel = value
        elif offset == 0x030:
            core.queue_sel = value
        elif offset == 0x038:
            core.write_queue_size(value)
        elif offset == 0x044:
            core.write_queue_ready(value)
        elif offset == NOTIFY_OFFSET:
            core.notify(value & 0xFFFF)  # reached the VMM: no ioeventfd matched (or none bound)
        elif offset == 0x064:
            with self._isr_lock:
                self.interrupt_status &= ~value
        elif offset == 0x070:
            core.write_status(value)
            if value & 0xFF == 0:
                with self._isr_lock:
                    self.interrupt_status = 0
        elif offset in _QUEUE_FIELD_AT:
            core.write_queue_field(_QUEUE_FIELD_AT[offset], value)

    # --- saved state ---------------------------------------------------------------------------
    def save(self) -> MmioState:
        core = self.core.save()
        with self._isr_lock:
            return MmioState(core, self.interrupt_status)

    def restore(self, state: MmioState) -> None:
        """Take ``state`` (``VirtioCore.restore``); ``ValueError``, the device left reset,
        for anything wrong."""
        self._reset()
        if state.interrupt_status & ~(INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE) or state.interrupt_status < 0:
            raise ValueError(f"{self.device.name}: saved InterruptStatus {state.interrupt_status:#x} has bits it "
                             "cannot have")  # fmt: skip
        with self._isr_lock:
            self.interrupt_status = state.interrupt_status
        try:
            self.core.restore(state.core)  # raises again what a running device may have had in flight
        except ValueError:
            self._reset()
            raise
        if state.interrupt_status and not self.core.status & STATUS_DRIVER_OK:
            self._interrupt.signal()

    def _reset(self) -> None:
        self.core.reset()
        with self._isr_lock:
            self.interrupt_status = 0

    def save_state(self) -> bytes:
        """The transport's section of a snapshot (``StateProvider``); after ``quiesce``."""
        return pack_state(self.save())

    def restore_state(self, data: bytes) -> None:
        try:
            state = unpack_state(MmioState, data, f"{self.device.name} virtio-mmio state")
        except ValueError:
            self._reset()
            raise
        self.restore(state)
