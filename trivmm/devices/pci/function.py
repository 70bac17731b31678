"""A PCI endpoint function: its type-0 configuration header, BARs, capability list, MSI-X
and INTx.

Configuration space is a byte array with two masks beside it: the bits the guest may write
(``wmask``) and the bits a 1 clears (``w1cmask``); every other bit is read-only. The header
(PCI Local Bus 3.0, 6.1):

    0x00 vendor, device (RO)       0x04 command: IO, memory, bus master, parity, SERR,
                                        INTx disable writable; status: RW1C error bits,
                                        capabilities list (RO), interrupt status (RO, live)
    0x08 revision, class (RO)      0x0C cache line size, latency timer (RW), header type 0
    0x10..0x27 BAR0..5             0x2C subsystem vendor, subsystem (RO)
    0x30 expansion ROM: none (0)   0x34 capabilities pointer (RO)
    0x3C interrupt line (RW), interrupt pin (RO)

A BAR's writable bits are its address bits above its size, so the sizing protocol falls out
of the mask: write all-ones, read back ``~(size - 1)`` with the type bits (IO: bit 0; memory:
bits 2:1 = 00 for 32-bit, 10 for 64-bit, bit 3 prefetchable); a 64-bit BAR's upper half is
the next register. Unimplemented BARs read zero.

The ``PciRoot`` a function is plugged into maps each BAR on the bus while the command
register decodes its space and its address lies in a host-bridge window, and moves it when
the guest reprograms it; the function hears of it through ``bar_moved``. Configuration
accesses reach a function only through its root, under the root's lock.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from trivmm.bus import BusDevice
from trivmm.devices.pci.irq import MsiRouter
from trivmm.devices.pci.msix import MSIX_CAP_ID, MsixCapability

if TYPE_CHECKING:
    from trivmm.devices.pci.root import PciRoot

__all__ = ["PciFunction", "Bar", "BarKind", "PciError", "CONFIG_SIZE", "EXTENDED_CONFIG_SIZE",
           "VENDOR_ID", "DEVICE_ID", "COMMAND", "STATUS", "REVISION_ID", "CLASS_CODE", "CACHE_LINE_SIZE",
           "LATENCY_TIMER", "HEADER_TYPE", "BAR0", "SUBSYSTEM_VENDOR_ID", "SUBSYSTEM_ID", "ROM_ADDRESS",
           "CAPABILITY_LIST", "INTERRUPT_LINE", "INTERRUPT_PIN", "COMMAND_IO", "COMMAND_MEMORY",
           "COMMAND_MASTER", "COMMAND_INTX_DISABLE", "STATUS_INTERRUPT", "STATUS_CAP_LIST",
           "CAP_ID_VENDOR"]  # fmt: skip

CONFIG_SIZE = 256
EXTENDED_CONFIG_SIZE = 4096
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_CODE, CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0D, 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, ROM_ADDRESS, CAPABILITY_LIST = 0x2C, 0x2E, 0x30, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER = 0x001, 0x002, 0x004
COMMAND_PARITY, COMMAND_SERR, COMMAND_INTX_DISABLE = 0x040, 0x100, 0x400
_COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE
STATUS_INTERRUPT, STATUS_CAP_LIST = 0x008, 0x010
_STATUS_RW1C = 0xF900  # parity error, SERR, master/target aborts, master data parity error
CAP_ID_VENDOR = 0x09
_FIRST_CAPABILITY = 0x40
_BAR_COUNT = 6
_BAR_IO, _BAR_MEM64, _BAR_PREFETCH = 0x1, 0x4, 0x8


class PciError(ValueError):
    """A PCI set-up the VMM asked for that cannot be (a bad BAR, a full slot or window)."""


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"  # takes two BAR registers


class Bar:
    """One BAR: what it decodes and, once plugged in, where the bus has it (``mapped``)."""

    __slots__ = ("handler", "index", "kind", "mapped", "prefetchable", "size")

    def __init__(self, index: int, kind: BarKind, size: int, handler: BusDevice | None, prefetchable: bool) -> None:
        self.index = index
        self.kind = kind
        self.size = size
        self.handler = handler
        self.prefetchable = prefetchable
        self.mapped: int | None = None

    def __repr__(self) -> str:
        where = "unmapped" if self.mapped is None else f"at {self.mapped:#x}"
        return f"<Bar{self.index} {self.kind.value} {self.size:#x} {where}>"


class _SplitBar:
    """A BAR's bus device when MSI-X structures live in it: the table and PBA go to the
    capability, the rest to the device's handler (reads zero where it has none). An access
    straddling a structure's edge reads all-ones and writes nothing."""

    __slots__ = ("_inner", "_regions")

    def __init__(self, inner: BusDevice | None,
                 regions: list[tuple[int, int, Callable[[int, memoryview], None],
                                     Callable[[int, memoryview], None]]]) -> None:  # fmt: skip
        self._inner = inner
        self._regions = regions

    def read(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        for start, stop, read, _ in self._regions:
            if start <= offset and end <= stop:
                read(offset - start, data)
                return
            if offset < stop and start < end:
                data[:] = b"\xff" * len(data)
                return
        if self._inner is not None:
            self._inner.read(offset, data)
        else:
            data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        for start, stop, _, write in self._regions:
            if start <= offset and end <= stop:
                write(offset - start, data)
                return
            if offset < stop and start < end:
                return
        if self._inner is not None:
            self._inner.write(offset, data)


class PciFunction:
    """Function 0 of a PCI device, with a type-0 header. Set it up (``add_bar``,
    ``add_capability``, ``add_vendor_capability``, ``add_msix``), then plug it into a
    ``PciRoot``, which gives it a slot, BAR addresses and its INTx GSI.

    Subclasses (a virtio-pci transport) override ``bar_moved`` to follow their BARs (e.g.
    to move ioeventfds), and may override ``read_config``/``write_config`` for registers
    with side effects, calling the base class for the rest. ``class_code`` is the 24-bit
    (base class << 16 | subclass << 8 | programming interface); ``interrupt_pin`` 1..4 for
    INTA..INTD, 0 for none."""

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 1,
                 config_size: int = CONFIG_SIZE) -> None:  # fmt: skip
        if config_size not in (CONFIG_SIZE, EXTENDED_CONFIG_SIZE):
            raise PciError(f"configuration space is {CONFIG_SIZE} or {EXTENDED_CONFIG_SIZE} bytes, not {config_size}")
        if not 0 <= interrupt_pin <= 4:
            raise PciError(f"interrupt pin must be 0 (none) or 1..4 (INTA..INTD), not {interrupt_pin}")
        self.config = bytearray(config_size)
        self.wmask = bytearray(config_size)
        self.w1cmask = bytearray(config_size)
        self._put(VENDOR_ID, 2, vendor_id)
        self._put(DEVICE_ID, 2, device_id)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_CODE, 3, class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._put(COMMAND, 2, _COMMAND_WRITABLE, self.wmask)
        self._put(STATUS, 2, _STATUS_RW1C, self.w1cmask)
        for register in (CACHE_LINE_SIZE, LATENCY_TIMER, INTERRUPT_LINE):
            self.wmask[register] = 0xFF
        self.bars: list[Bar | None] = [None] * _BAR_COUNT
        self.msix: MsixCapability | None = None
        self.msix_offset: int | None = None
        self._capabilities: list[tuple[int, int]] = []  # (id, offset), in list order
        self._next_capability = _FIRST_CAPABILITY
        self._bar_devices: dict[int, BusDevice] = {}
        self.root: PciRoot | None = None
        self.slot: int | None = None
        self.intx_gsi: int | None = None
        self._intx_line: Callable[[bool], None] | None = None
        self._intx_lock = threading.Lock()
        self._intx_requested = False
        self._intx_applied = False

    def __repr__(self) -> str:
        ids = f"{self._get(VENDOR_ID, 2):04x}:{self._get(DEVICE_ID, 2):04x}"
        return f"<{type(self).__name__} {ids} slot {self.slot}>"

    # --- set-up, before the function is plugged in -------------------------------------------
    def add_bar(self, index: int, size: int, kind: BarKind, handler: BusDevice | None = None, *,
                prefetchable: bool = False) -> Bar:  # fmt: skip
        """Declare BAR ``index`` (a 64-bit BAR also takes ``index + 1``): ``size`` bytes, a
        power of two (IO 4..256, memory >= 16), served by ``handler`` at offsets from the
        BAR's start."""
        self._not_plugged("BARs")
        registers = 2 if kind is BarKind.MEM64 else 1
        if not 0 <= index <= _BAR_COUNT - registers:
            raise PciError(f"BAR index {index} is out of range for a {kind.value} BAR")
        if any(self._bar_owning(i) is not None for i in range(index, index + registers)):
            raise PciError(f"BAR register {index} (or its upper half) is taken")
        if size <= 0 or size & (size - 1):
            raise PciError(f"BAR size {size:#x} is not a power of two")
        limits = {BarKind.IO: (4, 256), BarKind.MEM32: (16, 1 << 31), BarKind.MEM64: (16, 1 << 63)}[kind]
        if not limits[0] <= size <= limits[1]:
            raise PciError(f"a {kind.value} BAR is {limits[0]:#x}..{limits[1]:#x} bytes, not {size:#x}")
        if prefetchable and kind is BarKind.IO:
            raise PciError("an I/O BAR cannot be prefetchable")
        bar = Bar(index, kind, size, handler, prefetchable)
        self.bars[index] = bar
        register = BAR0 + 4 * index
        if kind is BarKind.IO:
            self._put(register, 4, _BAR_IO)
            self._put(register, 4, ~(size - 1) & 0xFFFF_FFFC, self.wmask)
        else:
            flags = (_BAR_MEM64 if kind is BarKind.MEM64 else 0) | (_BAR_PREFETCH if prefetchable else 0)
            self._put(register, 4, flags)
            self._put(register, 4, ~(size - 1) & 0xFFFF_FFF0, self.wmask)
            if kind is BarKind.MEM64:
                self._put(register + 4, 4, (~(size - 1) >> 32) & 0xFFFF_FFFF, self.wmask)
        return bar

    def add_capability(self, cap_id: int, body: bytes, *, writable: bytes | None = None) -> int:
        """Append a capability to the list: ``body`` is what follows its ID and next-pointer
        bytes, ``writable`` (as long as ``body``) the bits of it the guest may write. Returns
        the capability's offset in configuration space."""
        self._not_plugged("capabilities")
        if writable is not None and len(writable) != len(body):
            raise PciError("a capability's write mask must be as long as its body")
        offset = self._next_capability
        end = offset + 2 + len(body)
        if end > CONFIG_SIZE:
            raise PciError(f"capabilities do not fit below {CONFIG_SIZE:#x} ({end:#x} needed)")
        self.config[offset] = cap_id & 0xFF
        self.config[offset + 2 : end] = body
        if writable is not None:
            self.wmask[offset + 2 : end] = writable
        if self._capabilities:
            self.config[self._capabilities[-1][1] + 1] = offset
        else:
            self.config[CAPABILITY_LIST] = offset
            self._put(STATUS, 2, self._get(STATUS, 2) | STATUS_CAP_LIST)
        self._capabilities.append((cap_id, offset))
        self._next_capability = (end + 3) & ~3
        return offset

    def add_vendor_capability(self, payload: bytes, *, writable: bytes | None = None) -> int:
        """A vendor-specific capability (ID 0x09, as virtio-pci's): its length byte (which
        counts the ID, next and length bytes) then ``payload``; ``writable`` covers
        ``payload``. Returns its offset."""
        body = bytes([len(payload) + 3]) + payload
        mask = None if writable is None else b"\x00" + writable
        return self.add_capability(CAP_ID_VENDOR, body, writable=mask)

    def add_msix(self, vectors: int, router: MsiRouter, *, table_bar: int, table_offset: int,
                 pba_bar: int, pba_offset: int) -> MsixCapability:  # fmt: skip
        """An MSI-X capability with ``vectors`` vectors, its table and PBA at the given
        offsets of BARs declared already. The GSIs and irqfds are taken from ``router`` now."""
        self._not_plugged("MSI-X")
        if self.msix is not None:
            raise PciError("the function has MSI-X already")
        for what, index, offset, size in (("table", table_bar, table_offset, vectors * 16),
                                          ("PBA", pba_bar, pba_offset, (vectors + 63) // 64 * 8)):  # fmt: skip
            bar = self.bars[index] if 0 <= index < _BAR_COUNT else None
            if bar is None or bar.kind is BarKind.IO:
                raise PciError(f"the MSI-X {what} needs memory BAR {index}, which is not declared")
            if offset < 0 or offset + size > bar.size:
                raise PciError(f"the MSI-X {what} ({size:#x} bytes at {offset:#x}) does not fit BAR {index}")
        try:
            msix = MsixCapability(vectors, router, table_bar=table_bar, table_offset=table_offset,
                                  pba_bar=pba_bar, pba_offset=pba_offset)  # fmt: skip
        except ValueError as exc:
            raise PciError(str(exc)) from None
        body = (vectors - 1).to_bytes(2, "little") + (table_offset | table_bar).to_bytes(4, "little") \
            + (pba_offset | pba_bar).to_bytes(4, "little")  # fmt: skip
        writable = b"\x00\xc0" + bytes(8)  # message control: Enable, Function Mask
        try:
            self.msix_offset = self.add_capability(MSIX_CAP_ID, body, writable=writable)
        except PciError:
            msix.close()
            raise
        self.msix = msix
        return msix

    def _not_plugged(self, what: str) -> None:
        if self.root is not None:
            raise PciError(f"{what} are set up before the function is plugged in")

    def _bar_owning(self, register: int) -> Bar | None:
        """The BAR whose register ``register`` is (the lower or the upper half)."""
        bar = self.bars[register]
        if bar is None and register > 0:
            lower = self.bars[register - 1]
            if lower is not None and lower.kind is BarKind.MEM64:
                return lower
        return bar

    # --- what the root uses -------------------------------------------------------------------
    def declared_bars(self) -> list[Bar]:
        return [bar for bar in self.bars if bar is not None]

    def programmed_address(self, index: int) -> int:
        """The address BAR ``index``'s register(s) hold now."""
        register = BAR0 + 4 * index
        low = self._get(register, 4)
        bar = self.bars[index]
        if bar is None:
            return 0
        if bar.kind is BarKind.IO:
            return low & 0xFFFF_FFFC
        address = low & 0xFFFF_FFF0
        if bar.kind is BarKind.MEM64:
            address |= self._get(register + 4, 4) << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        """Program BAR ``index`` as firmware would (the root's allocator). Not mapped by this."""
        bar = self.bars[index]
        if bar is None or address % bar.size:
            raise PciError(f"BAR {index} cannot take address {address:#x}")
        if bar.kind is not BarKind.MEM64 and address >> 32:
            raise PciError(f"a 32-bit BAR cannot take address {address:#x}")
        register = BAR0 + 4 * index
        low_flags = self._get(register, 4) & (0x3 if bar.kind is BarKind.IO else 0xF)
        self._put(register, 4, (address & 0xFFFF_FFFF) | low_flags)
        if bar.kind is BarKind.MEM64:
            self._put(register + 4, 4, address >> 32)

    def bar_device(self, index: int) -> BusDevice:
        """What the bus calls for BAR ``index``: its handler, or the MSI-X split of it."""
        device = self._bar_devices.get(index)
        if device is None:
            bar = self.bars[index]
            assert bar is not None
            regions: list[tuple[int, int, Callable[[int, memoryview], None], Callable[[int, memoryview], None]]] = []
            msix = self.msix
            if msix is not None and msix.table_bar == index:
                regions.append((msix.table_offset, msix.table_offset + msix.table_size, msix.table_read,
                                msix.table_write))  # fmt: skip
            if msix is not None and msix.pba_bar == index:
                regions.append((msix.pba_offset, msix.pba_offset + msix.pba_size, msix.pba_read, msix.pba_write))
            if regions:
                device = _SplitBar(bar.handler, regions)
            elif bar.handler is not None:
                device = bar.handler
            else:
                device = _SplitBar(None, [])
            self._bar_devices[index] = device
        return device

    def attach(self, root: PciRoot, slot: int, intx_gsi: int | None, intx_line: Callable[[bool], None] | None) -> None:
        """Called by ``PciRoot.add``."""
        self.root, self.slot, self.intx_gsi, self._intx_line = root, slot, intx_gsi, intx_line
        if intx_gsi is not None:
            self._put(INTERRUPT_LINE, 1, intx_gsi & 0xFF)  # as firmware leaves it

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    # --- configuration accesses (the root calls these, under its lock) -------------------------
    def read_config(self, offset: int, size: int) -> int:
        """The ``size``-byte (1, 2 or 4), naturally aligned register at ``offset``. Beyond
        the function's configuration space (a 256-byte function seen through ECAM) reads 0."""
        end = min(offset + size, len(self.config))
        value = int.from_bytes(self.config[offset:end], "little") if offset < end else 0
        if offset <= STATUS < offset + size:
            with self._intx_lock:
                requested = self._intx_requested
            shift = 8 * (STATUS - offset)
            value = (value & ~(STATUS_INTERRUPT << shift)) | ((STATUS_INTERRUPT if requested else 0) << shift)
        return value

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Write ``value`` through the masks, then act on what changed."""
        config, wmask, w1c = self.config, self.wmask, self.w1cmask
        end = min(offset + size, len(config))
        for at in range(offset, end):
            byte = (value >> (8 * (at - offset))) & 0xFF
            config[at] = ((config[at] & ~wmask[at]) | (byte & wmask[at])) & ~(byte & w1c[at])
        if offset < end:
            self._config_written(offset, end)

    def _config_written(self, start: int, end: int) -> None:
        def touches(register: int, length: int) -> bool:
            return start < register + length and register < end

        command = touches(COMMAND, 2)
        if (command or touches(BAR0, 4 * _BAR_COUNT)) and self.root is not None:
            self.root.update_bars(self)
        msix = self.msix
        if msix is not None and self.msix_offset is not None and touches(self.msix_offset + 2, 2):
            msix.control_written(self._get(self.msix_offset + 2, 2))
            self.refresh_intx()
        elif command:
            self.refresh_intx()

    # --- interrupts -----------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """Assert (True) or deassert the function's INTx pin (any thread). The line moves
        only while the command register's INTx Disable is clear and MSI-X is off; the
        status register's Interrupt Status follows ``level`` regardless."""
        with self._intx_lock:
            self._intx_requested = level
            self._apply_intx()

    def notify(self, vector: int) -> None:
        """Raise ``vector`` through MSI-X when enabled, else assert INTx (which the device
        deasserts with ``set_intx(False)`` when the guest acknowledges)."""
        msix = self.msix
        if msix is None or not msix.notify(vector):
            self.set_intx(True)

    def refresh_intx(self) -> None:
        with self._intx_lock:
            self._apply_intx()

    def _apply_intx(self) -> None:
        """Under ``_intx_lock``: bring the line to what the state asks."""
        msix = self.msix
        level = (self._intx_requested and not self.command & COMMAND_INTX_DISABLE
                 and not (msix is not None and msix.enabled))  # fmt: skip
        if level != self._intx_applied and self._intx_line is not None:
            self._intx_line(level)
            self._intx_applied = level

    # --- hooks and teardown -----------------------------------------------------------------------
    def bar_moved(self, index: int, old: int | None, new: int | None) -> None:
        """BAR ``index`` stopped decoding at ``old`` and/or started at ``new`` (None: not
        on the bus). Called on a vCPU thread under the root's lock (or in ``PciRoot.add``):
        quick, and no configuration accesses from here."""

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now (None: not on the bus)."""
        bar = self.bars[index]
        return None if bar is None else bar.mapped

    def close(self) -> None:
        if self.msix is not None:
            self.msix.close()

    # --- saved state (the root calls these, under its lock) -------------------------------------
    def save_config(self) -> bytes:
        """The configuration space's bytes (live bits such as Interrupt Status are not in it)."""
        return bytes(self.config)

    def check_config(self, config: bytes) -> None:
        """``ValueError`` unless ``config`` could be this function's configuration space."""
        if len(config) != len(self.config):
            raise ValueError(f"{self!r}: saved configuration space is {len(config)} bytes, not {len(self.config)}")
        for at, (saved, current) in enumerate(zip(config, self.config, strict=True)):
            if (saved ^ current) & ~(self.wmask[at] | self.w1cmask[at]):
                raise ValueError(f"{self!r}: saved configuration byte {at:#x} ({saved:#04x}) differs from "
                                 f"this function's read-only bits ({current:#04x})")  # fmt: skip

    def restore_config(self, config: bytes) -> None:
        """Take saved configuration bytes, then act on them as on a guest's write (BARs onto
        the bus, MSI-X control, INTx). ``ValueError`` -- and nothing changed -- when they
        cannot be this function's: another size, or read-only bits that differ."""
        self.check_config(config)
        self.config[:] = config
        self._config_written(0, len(self.config))
        self.refresh_intx()

    # --- bytes ----------------------------------------------------------------------------------
    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def _put(self, offset: int, size: int, value: int, array: bytearray | None = None) -> None:
        target = self.config if array is None else array
        target[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
