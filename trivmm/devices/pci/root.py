"""The PCI host bridge: bus 0, its configuration mechanisms, and the BARs on the bus.

* **Configuration mechanism #1** (PIO 0xCF8..0xCFF): a DWORD write to 0xCF8 latches the
  address (bit 31 enable, bus 23:16, device 15:11, function 10:8, register 7:2); accesses
  of 1, 2 or 4 bytes at 0xCFC + n reach register ``(address & 0xFC) + n``. Byte and word
  accesses to 0xCF8..0xCFB are not the address register (on a PIIX, 0xCF9 is the reset
  control register, which trivmm does not model): they read all-ones and write nothing.
* **ECAM** (``PciLayout.ecam_base``, 1 MiB per bus): function ``f`` of device ``d`` on bus
  ``b`` at ``b << 20 | d << 15 | f << 12``, its 4 KiB of configuration space; QWORD accesses
  are two DWORDs. Both mechanisms reach the same registers under one lock.
* Device 0 is the host bridge; devices plug into slots 1..31 as function 0. Any other
  function, bus or slot reads all-ones and ignores writes (a master abort).
* **BARs** are pre-assigned from the layout's windows (naturally aligned, largest first; a
  64-bit BAR in the 32-bit window while it has room, then the 64-bit one), with decoding
  enabled, as firmware leaves them. A BAR is on the bus while the command register decodes
  its space and its address lies wholly inside a window of its kind; a guest that moves it
  moves the bus range. An address that overlaps another range, or leaves the windows, is
  tolerated: the BAR is off the bus (logged, rate-limited) until a later write or a freed
  range lets it in. Mapped BARs therefore never overlap and never leave their windows.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import attrs

from trivmm.boot.layout import PciLayout
from trivmm.bus import AddressSpace, BusError
from trivmm.devices.pci.function import (
    COMMAND,
    COMMAND_IO,
    COMMAND_MEMORY,
    INTERRUPT_PIN,
    Bar,
    BarKind,
    PciError,
    PciFunction,
)
from trivmm.devices.pci.irq import IntxLines

__all__ = ["PciRoot", "PciRootState", "PciSlotState", "HostBridge", "PciConfigIo", "PciEcam",
           "CONFIG_ADDRESS_PORT", "CONFIG_PORTS", "HOST_BRIDGE_VENDOR", "HOST_BRIDGE_DEVICE", "MAX_SLOTS"]  # fmt: skip

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS = 8  # 0xCF8 address, 0xCFC..0xCFF data
# Intel's vendor ID with the device ID Cloud Hypervisor gave its virtual host bridge
# (edk2's CloudHv platform keys on it): no Linux quirk matches 8086:0d57, and conf1's
# sanity check (pci_sanity_check) accepts a bus with a host bridge of class 0x0600.
HOST_BRIDGE_VENDOR = 0x8086
HOST_BRIDGE_DEVICE = 0x0D57
HOST_BRIDGE_CLASS = 0x060000
MAX_SLOTS = 32
_ENABLE = 1 << 31
_log = logging.getLogger(__name__)


class HostBridge(PciFunction):
    """Device 0: the host bridge (class 0x0600). No BARs, no interrupt."""

    def __init__(self) -> None:
        super().__init__(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, HOST_BRIDGE_CLASS, interrupt_pin=0)


class PciConfigIo:
    """Configuration mechanism #1 at PIO 0xCF8 (8 ports)."""

    __slots__ = ("_root", "address")

    def __init__(self, root: PciRoot) -> None:
        self._root = root
        self.address = 0

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            data[:] = self.address.to_bytes(4, "little")
            return
        address = self.address
        if offset < 4 or not address & _ENABLE:
            data[:] = b"\xff" * size
            return
        value = self._root.config_read((address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7,
                                       (address & 0xFC) + offset - 4, size)  # fmt: skip
        data[:] = value.to_bytes(size, "little")

    def write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            self.address = int.from_bytes(data, "little") & 0xFFFF_FFFC
            return
        address = self.address
        if offset < 4 or not address & _ENABLE:
            return
        self._root.config_write((address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7,
                                (address & 0xFC) + offset - 4, size, int.from_bytes(data, "little"))  # fmt: skip


class PciEcam:
    """ECAM: memory-mapped configuration space, 4 KiB per function."""

    __slots__ = ("_root",)

    def __init__(self, root: PciRoot) -> None:
        self._root = root

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size == 8:
            self.read(offset, data[:4])
            self.read(offset + 4, data[4:])
            return
        value = self._root.config_read(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7,
                                       offset & 0xFFF, size)  # fmt: skip
        data[:] = value.to_bytes(size, "little")

    def write(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size == 8:
            self.write(offset, data[:4])
            self.write(offset + 4, data[4:])
            return
        self._root.config_write(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF, size,
                                int.from_bytes(data, "little"))  # fmt: skip


@attrs.frozen
class PciSlotState:
    """One plugged-in function's configuration space."""

    slot: int
    config: bytes


@attrs.frozen
class PciRootState:
    """The configuration-address latch (0xCF8) and every function's configuration space."""

    address: int
    slots: tuple[PciSlotState, ...]


class PciRoot:
    """Bus 0 of segment 0 behind a host bridge. Claims PIO 0xCF8..0xCFF in ``pio`` and the
    ECAM in ``mmio`` now; BARs go into ``pio``/``mmio`` as they decode. ``irq_line(gsi,
    level)`` is the VM's interrupt line (``VM._irq_line``): INTx lines, ORed over the
    functions sharing a GSI, reach it."""

    def __init__(self, pio: AddressSpace, mmio: AddressSpace, layout: PciLayout,
                 irq_line: Callable[[int, bool], None], *, host_bridge: PciFunction | None = None) -> None:  # fmt: skip
        self.pio = pio
        self.mmio = mmio
        self.layout = layout
        self.intx = IntxLines(irq_line)
        self._lock = threading.Lock()
        self._functions: dict[int, PciFunction] = {}
        io = (layout.io_base, layout.io_size)
        mmio32 = (layout.mmio32_base, layout.mmio32_size)
        mmio64 = (layout.mmio64_base, layout.mmio64_size)
        self.windows: dict[BarKind, tuple[tuple[int, int], ...]] = {
            BarKind.IO: (io,), BarKind.MEM32: (mmio32,), BarKind.MEM64: (mmio32, mmio64)}  # fmt: skip
        self._cursors = {base: base for base, _ in (io, mmio32, mmio64)}
        self.refused = 0  # BAR placements the bus refused (overlap or outside the windows)
        self.config_io = PciConfigIo(self)
        self.ecam = PciEcam(self)
        pio.insert(CONFIG_ADDRESS_PORT, CONFIG_PORTS, self.config_io)
        try:
            mmio.insert(layout.ecam_base, layout.ecam_size, self.ecam)
        except BusError:
            pio.remove(CONFIG_ADDRESS_PORT)
            raise
        self.add(host_bridge if host_bridge is not None else HostBridge(), slot=0)

    # --- plugging in --------------------------------------------------------------------------
    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Plug ``function`` in as function 0 of ``slot`` (the first free of 1..31 when
        None): assign its BARs, enable its decoding, wire its INTx pin. Returns the slot."""
        with self._lock:
            if function.root is not None:
                raise PciError(f"{function!r} is plugged in already")
            if slot is None:
                slot = next((s for s in range(1, MAX_SLOTS) if s not in self._functions), None)
                if slot is None:
                    raise PciError(f"all {MAX_SLOTS - 1} PCI slots are taken")
            elif not 0 <= slot < MAX_SLOTS or slot in self._functions:
                raise PciError(f"PCI slot {slot} is taken or does not exist")
            bars = sorted(function.declared_bars(), key=lambda bar: (-bar.size, bar.index))
            cursors = dict(self._cursors)
            try:
                for bar in bars:
                    function.set_bar_address(bar.index, self._allocate(bar, cursors))
            except PciError:
                for bar in bars:
                    function.set_bar_address(bar.index, 0)
                raise
            self._cursors = cursors
            decode = 0
            for bar in bars:
                decode |= COMMAND_IO if bar.kind is BarKind.IO else COMMAND_MEMORY
            pin = function.read_config(INTERRUPT_PIN, 1)
            gsi = self.layout.intx_gsi(slot, pin) if pin and slot else None
            line = None if gsi is None else functools.partial(self.intx.set, gsi, slot)
            function.attach(self, slot, gsi, line)
            self._functions[slot] = function
            if decode:
                function.write_config(COMMAND, 2, function.command | decode)  # maps the BARs
            function.refresh_intx()  # a level asserted before it was plugged in
            return slot

    def _allocate(self, bar: Bar, cursors: dict[int, int]) -> int:
        space = self._space(bar)
        for base, size in self.windows[bar.kind]:
            at, end = cursors[base], base + size
            while True:
                at = (at + bar.size - 1) // bar.size * bar.size
                if at + bar.size > end:
                    break
                clash = next((r for r in space.ranges if r.base < at + bar.size and at < r.end), None)
                if clash is None:
                    cursors[base] = at + bar.size
                    return at
                at = clash.end
        raise PciError(f"no room left in the PCI windows for a {bar.size:#x}-byte {bar.kind.value} BAR")

    def function(self, slot: int) -> PciFunction | None:
        return self._functions.get(slot)

    @property
    def functions(self) -> dict[int, PciFunction]:
        return dict(self._functions)

    # --- configuration accesses -------------------------------------------------------------
    def config_read(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        """A configuration read (any mechanism): all-ones for an absent function."""
        with self._lock:
            target = self._functions.get(device) if bus == 0 and function == 0 else None
            if target is None:
                return (1 << (8 * size)) - 1
            if size in (1, 2, 4) and offset % size == 0:
                return target.read_config(offset, size)
            value = 0  # unaligned or odd-sized: byte by byte, as a bus would split it
            for i in range(size):
                value |= target.read_config(offset + i, 1) << (8 * i)
            return value

    def config_write(self, bus: int, device: int, function: int, offset: int, size: int, value: int) -> None:
        """A configuration write (any mechanism): ignored for an absent function."""
        with self._lock:
            target = self._functions.get(device) if bus == 0 and function == 0 else None
            if target is None:
                return
            if size in (1, 2, 4) and offset % size == 0:
                target.write_config(offset, size, value)
            else:
                for i in range(size):
                    target.write_config(offset + i, 1, (value >> (8 * i)) & 0xFF)

    # --- BARs on the bus (under self._lock) ---------------------------------------------------
    def update_bars(self, function: PciFunction) -> None:
        """Bring ``function``'s BARs on the bus in line with its command register and BAR
        registers; after a BAR left a range, retry BARs that were refused for overlap."""
        freed = False
        for bar in function.declared_bars():
            freed |= self._place(function, bar, self._wanted(function, bar, log=True), log=True)
        if freed:
            for other in self._functions.values():
                for bar in other.declared_bars():
                    if bar.mapped is None:
                        wanted = self._wanted(other, bar, log=False)
                        if wanted is not None:
                            self._place(other, bar, wanted, log=False)

    def _space(self, bar: Bar) -> AddressSpace:
        return self.pio if bar.kind is BarKind.IO else self.mmio

    def _wanted(self, function: PciFunction, bar: Bar, *, log: bool) -> int | None:
        """Where ``bar`` should decode now, or None."""
        decode = COMMAND_IO if bar.kind is BarKind.IO else COMMAND_MEMORY
        if not function.command & decode:
            return None
        address = function.programmed_address(bar.index)
        for base, size in self.windows[bar.kind]:
            if base <= address and address + bar.size <= base + size:
                return address
        if log and address and address != bar.mapped:
            self._refuse("%r BAR%d at %#x is outside the host bridge's %s windows: not decoded",
                         function, bar.index, address, bar.kind.value)  # fmt: skip
        return None

    def _place(self, function: PciFunction, bar: Bar, wanted: int | None, *, log: bool) -> bool:
        """Move ``bar`` to ``wanted`` (None: off the bus); tell the function. Returns
        whether a range was freed."""
        old = bar.mapped
        if old == wanted:
            return False
        space = self._space(bar)
        if old is not None:
            space.remove(old)
            bar.mapped = None
        if wanted is not None:
            try:
                space.insert(wanted, bar.size, function.bar_device(bar.index))
                bar.mapped = wanted
            except BusError as exc:
                if log:
                    self._refuse("%r BAR%d not decoded: %s", function, bar.index, exc)
        if bar.mapped != old:
            function.bar_moved(bar.index, old, bar.mapped)
        return old is not None

    def _refuse(self, message: str, *args: object) -> None:
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th, ... : a hostile guest cannot flood the log
            _log.warning(message + " (%d such so far)", *args, self.refused)

    # --- saved state ----------------------------------------------------------------------------
    def save(self) -> PciRootState:
        """The bus's configuration state. (What a function keeps beyond its configuration
        space -- a virtio transport's registers, MSI-X tables -- is the function's to save.)"""
        with self._lock:
            functions = sorted(self._functions.items())
            slots = tuple(PciSlotState(slot, function.save_config()) for slot, function in functions)
            return PciRootState(self.config_io.address, slots)

    def restore(self, state: PciRootState) -> None:
        """Take ``state``: the same slots must be plugged in here (``ValueError`` otherwise,
        before anything changes). BARs move onto the bus as the saved registers say."""
        with self._lock:
            saved = {slot.slot: slot.config for slot in state.slots}
            if len(saved) != len(state.slots) or set(saved) != set(self._functions):
                raise ValueError(f"saved PCI slots {sorted(saved)} are not this bus's {sorted(self._functions)}")
            if not 0 <= state.address <= 0xFFFF_FFFF or state.address & 0x3:
                raise ValueError(f"saved PCI configuration address {state.address:#x} is not a register address")
            for slot, config in saved.items():
                self._functions[slot].check_config(config)
            for slot, config in sorted(saved.items()):
                self._functions[slot].restore_config(config)
            self.config_io.address = state.address

    # --- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Take every BAR and the configuration mechanisms off the bus; close the functions
        (their MSI-X irqfds, GSIs and eventfds)."""
        with self._lock:
            for function in self._functions.values():
                for bar in function.declared_bars():
                    if bar.mapped is not None:
                        self._space(bar).remove(bar.mapped)
                        bar.mapped = None
                function.close()
            self._functions.clear()
            for space, base in ((self.pio, CONFIG_ADDRESS_PORT), (self.mmio, self.layout.ecam_base)):
                try:
                    space.remove(base)
                except BusError:
                    pass
