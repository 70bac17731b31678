"""A 16550A UART register model (COM1: PIO 0x3f8, IRQ 4).

Transmission is instantaneous (THR is always empty), so the model needs no timers: the
THRE interrupt is pending from the moment the guest writes THR or enables it in IER until
the guest reads IIR reporting it. Received bytes queue in a 64-byte FIFO fed by the host.
Loopback (MCR bit 4) is modelled, since Linux's 8250 driver tests it while probing.

The interrupt line is level-modelled: ``irq(level)`` is called whenever "an interrupt is
pending" changes, and the VMM turns that into KVM_IRQ_LINE edges on the in-kernel irqchip.

Register accesses arrive on vCPU threads and input on the event loop's thread, so all state
sits behind one lock -- and so do the calls to ``irq`` and to the output sink. Deciding a
level under the lock but applying it after releasing it would let two threads apply their
levels in the opposite order, leaving the line low with an interrupt pending: a lost edge,
and a console that hangs. Both callbacks must therefore be quick and must not call back
into the UART (KVM_IRQ_LINE and the VM's non-blocking console buffer are).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import attrs

from trivmm.devices.fifo import ByteFifo, DropCounter

__all__ = ["Serial", "SerialState", "COM1_PORT", "COM1_IRQ"]

COM1_PORT = 0x3F8
COM1_IRQ = 4
FIFO_SIZE = 64
_log = logging.getLogger(__name__)

# Register offsets (DLAB clear / set)
_DATA, _IER, _IIR_FCR, _LCR, _MCR, _LSR, _MSR, _SCR = range(8)

_IER_RDI = 0x01  # received data available
_IER_THRI = 0x02  # transmitter holding register empty
_IER_MASK = 0x0F

_IIR_NONE = 0x01
_IIR_THRI = 0x02
_IIR_RDI = 0x04
_IIR_FIFO_ENABLED = 0xC0

_FCR_ENABLE = 0x01
_FCR_CLEAR_RX = 0x02

_LCR_DLAB = 0x80

_MCR_DTR, _MCR_RTS, _MCR_OUT1, _MCR_OUT2, _MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
_MCR_MASK = 0x1F

_LSR_DR = 0x01
_LSR_THRE = 0x20
_LSR_TEMT = 0x40

_MSR_CTS, _MSR_DSR, _MSR_RI, _MSR_DCD = 0x10, 0x20, 0x40, 0x80
_MSR_DEFAULT = _MSR_DCD | _MSR_DSR | _MSR_CTS  # a cable with the other end ready


@attrs.frozen
class SerialState:
    """Everything needed to recreate the UART on another host."""

    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    dll: int
    dlm: int
    thre_pending: bool
    rx: bytes


class Serial:
    """16550A model. ``output`` receives transmitted bytes; ``irq`` the line level."""

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[bool], None]) -> None:
        self._output = output
        self._irq = irq
        self._lock = threading.Lock()
        self._rx = ByteFifo(FIFO_SIZE, DropCounter(_log, "UART receive FIFO"))
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = _MCR_OUT2
        self._scr = 0
        self._fcr = 0
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0
        self._thre_pending = False
        self._line = False

    # --- register model (vCPU threads) ---------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            value = self._read_register(offset)
            self._update_line()
        data[0] = value
        for i in range(1, len(data)):
            data[i] = 0

    def write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            out = self._write_register(offset, data[0])
            if out is not None:
                self._output(out)
            self._update_line()

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & _LCR_DLAB
        if offset == _DATA:
            if dlab:
                return self._dll
            return self._rx.pop() or 0
        if offset == _IER:
            return self._dlm if dlab else self._ier
        if offset == _IIR_FCR:
            iir = self._interrupt_id()
            if iir == _IIR_THRI:
                self._thre_pending = False  # reading IIR acknowledges THRE
            return iir | (_IIR_FIFO_ENABLED if self._fcr & _FCR_ENABLE else 0)
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _LSR:
            return _LSR_THRE | _LSR_TEMT | (_LSR_DR if self._rx else 0)
        if offset == _MSR:
            return self._modem_status()
        return self._scr  # _SCR

    def _write_register(self, offset: int, value: int) -> bytes | None:
        dlab = self._lcr & _LCR_DLAB
        if offset == _DATA:
            if dlab:
                self._dll = value
                return None
            self._thre_pending = True  # sent at once: the holding register is empty again
            if self._mcr & _MCR_LOOP:
                self._rx.push(bytes([value]), "loopback byte with the receive FIFO full")
                return None
            return bytes([value])
        if offset == _IER:
            if dlab:
                self._dlm = value
            else:
                if value & _IER_THRI and not self._ier & _IER_THRI:
                    self._thre_pending = True  # enabling THRI with an empty THR interrupts
                self._ier = value & _IER_MASK
        elif offset == _IIR_FCR:
            if value & _FCR_CLEAR_RX:
                self._rx.clear()
            self._fcr = value & (_FCR_ENABLE | 0xC0)
        elif offset == _LCR:
            self._lcr = value
        elif offset == _MCR:
            self._mcr = value & _MCR_MASK
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR are read-only
        return None

    def _modem_status(self) -> int:
        if not self._mcr & _MCR_LOOP:
            return _MSR_DEFAULT
        m = self._mcr
        return ((_MSR_CTS if m & _MCR_RTS else 0) | (_MSR_DSR if m & _MCR_DTR else 0)
                | (_MSR_RI if m & _MCR_OUT1 else 0) | (_MSR_DCD if m & _MCR_OUT2 else 0))  # fmt: skip

    def _interrupt_id(self) -> int:
        if self._ier & _IER_RDI and self._rx:
            return _IIR_RDI
        if self._ier & _IER_THRI and self._thre_pending:
            return _IIR_THRI
        return _IIR_NONE

    def _pending(self) -> bool:
        return self._interrupt_id() != _IIR_NONE

    def _update_line(self) -> None:
        """Bring the interrupt line to the pending state. Called with the lock held."""
        level = self._pending()
        if level != self._line:
            self._line = level
            self._irq(level)

    # --- host side ----------------------------------------------------------------------
    def enqueue_input(self, data: bytes | bytearray) -> int:
        """Queue what fits of ``data`` (typed by the host) in the receive FIFO; return how
        much did. Nothing is dropped: the caller keeps the rest and offers it again."""
        with self._lock:
            taken = self._rx.push(data[: self._rx.room])
            self._update_line()
        return taken

    @property
    def rx_room(self) -> int:
        with self._lock:
            return self._rx.room

    @property
    def dropped(self) -> int:
        """Bytes the guest's loopback writes lost to a full receive FIFO."""
        with self._lock:
            return self._rx.dropped

    # --- saved state --------------------------------------------------------------------
    def save(self) -> SerialState:
        with self._lock:
            return SerialState(self._ier, self._lcr, self._mcr, self._scr, self._fcr,
                               self._dll, self._dlm, self._thre_pending, self._rx.peek_all())  # fmt: skip

    def restore(self, state: SerialState) -> None:
        if len(state.rx) > FIFO_SIZE:
            raise ValueError(f"saved UART FIFO holds {len(state.rx)} bytes, more than {FIFO_SIZE}")
        with self._lock:
            self._ier, self._lcr, self._mcr = state.ier & _IER_MASK, state.lcr & 0xFF, state.mcr & _MCR_MASK
            self._scr, self._fcr = state.scr & 0xFF, state.fcr & (_FCR_ENABLE | 0xC0)
            self._dll, self._dlm = state.dll & 0xFF, state.dlm & 0xFF
            self._thre_pending = state.thre_pending
            self._rx.clear()
            self._rx.push(state.rx)
            self._update_line()
