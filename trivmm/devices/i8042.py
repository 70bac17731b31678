"""Just enough of an i8042 keyboard controller (PIO 0x60/0x64) for Linux to probe and reset.

The guest's reboot path writes 0xFE (pulse reset line) to the command port; that ends the
VM with "reset". A keyboard that acknowledges commands is modelled so that a kernel's atkbd
probe finishes at once instead of waiting out its timeouts; no key is ever pressed.

The bytes waiting for the guest sit in a FIFO of ``OUTPUT_FIFO_SIZE`` bytes (a PS/2
keyboard buffers 16): a guest that sends commands without reading the answers loses the
answers that do not fit (counted in ``dropped``, logged), never the VMM's memory. The
interrupt line changes under the device's lock, so two vCPUs cannot apply their edges out
of order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import attrs

from trivmm.devices.fifo import ByteFifo, DropCounter

__all__ = ["I8042", "I8042State", "I8042_DATA_PORT", "I8042_COMMAND_PORT", "KEYBOARD_IRQ", "OUTPUT_FIFO_SIZE"]

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # the device spans 0x60..0x64; offsets 1..3 are unused
KEYBOARD_IRQ = 1
OUTPUT_FIFO_SIZE = 16
_log = logging.getLogger(__name__)

_STATUS_OBF = 0x01
_STATUS_SYS = 0x04
_STATUS_CMD = 0x08
_STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the keylock switch

_CTR_KBD_INT = 0x01
_CTR_SYS = 0x04
_CTR_KBD_DISABLE = 0x10
_CTR_AUX_DISABLE = 0x20
_CTR_XLATE = 0x40

_CMD_READ_CTR = 0x20
_CMD_WRITE_CTR = 0x60
_CMD_AUX_DISABLE = 0xA7
_CMD_AUX_ENABLE = 0xA8
_CMD_SELF_TEST = 0xAA
_CMD_KBD_TEST = 0xAB
_CMD_KBD_DISABLE = 0xAD
_CMD_KBD_ENABLE = 0xAE
_CMD_READ_OUTPUT_PORT = 0xD0
_CMD_WRITE_OUTPUT_PORT = 0xD1
_CMD_RESET_CPU = 0xFE

_KBD_ACK = 0xFA
_KBD_RESET = 0xFF
_KBD_GET_ID = 0xF2


_COMMANDS_WITH_DATA = (0, 0x60, 0xD1)  # none pending, _CMD_WRITE_CTR, _CMD_WRITE_OUTPUT_PORT


@attrs.frozen
class I8042State:
    """The controller's registers, the bytes waiting for the guest, and the IRQ 1 level."""

    ctr: int
    status: int
    output: bytes
    pending_command: int
    line: bool


class I8042:
    """The controller at 0x60 (offset 0) and 0x64 (offset 4)."""

    def __init__(self, reset: Callable[[], None], irq: Callable[[bool], None]) -> None:
        self._reset = reset
        self._irq = irq
        self._lock = threading.Lock()
        self._ctr = _CTR_KBD_INT | _CTR_SYS | _CTR_AUX_DISABLE | _CTR_XLATE
        self._status = _STATUS_SYS | _STATUS_UNLOCKED
        self._out = ByteFifo(OUTPUT_FIFO_SIZE, DropCounter(_log, "i8042 output FIFO"))
        self._pending_command = 0
        self._line = False

    @property
    def dropped(self) -> int:
        """Answer bytes lost because the guest did not read them and the FIFO was full."""
        with self._lock:
            return self._out.dropped

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            if offset == 0:
                byte = self._out.pop()
                value = 0 if byte is None else byte
                # Each byte read ends its interrupt; the next byte, if any, raises a new edge.
                self._set_line(False)
                if self._out and self._ctr & _CTR_KBD_INT:
                    self._set_line(True)
            elif offset == 4:
                value = self._status | (_STATUS_OBF if self._out else 0)
            else:
                value = 0xFF
        data[0] = value
        for i in range(1, len(data)):
            data[i] = 0

    def write(self, offset: int, data: memoryview) -> None:
        value = data[0]
        reset = False
        with self._lock:
            if offset == 4:
                self._status |= _STATUS_CMD
                reset = self._command(value)
            elif offset == 0:
                self._status &= ~_STATUS_CMD
                self._data(value)
            if not reset and self._out and self._ctr & _CTR_KBD_INT:
                self._set_line(True)
        if reset:
            self._reset()

    def _set_line(self, level: bool) -> None:
        """Change the interrupt line (called with the lock held); no call when unchanged."""
        if level != self._line:
            self._line = level
            self._irq(level)

    def _command(self, command: int) -> bool:
        self._pending_command = 0
        if command == _CMD_READ_CTR:
            self._answer(self._ctr)
        elif command in (_CMD_WRITE_CTR, _CMD_WRITE_OUTPUT_PORT):
            self._pending_command = command
        elif command == _CMD_AUX_DISABLE:
            self._ctr |= _CTR_AUX_DISABLE
        elif command == _CMD_AUX_ENABLE:
            self._ctr &= ~_CTR_AUX_DISABLE
        elif command == _CMD_SELF_TEST:
            self._answer(0x55)
        elif command == _CMD_KBD_TEST:
            self._answer(0x00)
        elif command == _CMD_KBD_DISABLE:
            self._ctr |= _CTR_KBD_DISABLE
        elif command == _CMD_KBD_ENABLE:
            self._ctr &= ~_CTR_KBD_DISABLE
        elif command == _CMD_READ_OUTPUT_PORT:
            self._answer(0x01)  # reset line high: not in reset
        elif command == _CMD_RESET_CPU:
            return True
        return False

    def _data(self, value: int) -> None:
        pending, self._pending_command = self._pending_command, 0
        if pending == _CMD_WRITE_CTR:
            self._ctr = value
        elif pending == _CMD_WRITE_OUTPUT_PORT:
            pass  # A20 and the reset line: nothing to model
        elif value == _KBD_RESET:
            self._answer(_KBD_ACK, 0xAA)  # ACK, self-test passed
        elif value == _KBD_GET_ID:
            self._answer(_KBD_ACK, 0xAB, 0x83)  # MF2 keyboard
        else:
            self._answer(_KBD_ACK)

    def _answer(self, *values: int) -> None:
        self._out.push(bytes(values), "the guest sent commands without reading their answers")

    # --- saved state --------------------------------------------------------------------
    def save(self) -> I8042State:
        with self._lock:
            return I8042State(self._ctr, self._status, self._out.peek_all(), self._pending_command, self._line)

    def restore(self, state: I8042State) -> None:
        """Take ``state`` (``ValueError`` if it could not come from this model; then nothing
        changes). A raised line is raised again (KVM does not keep line levels)."""
        if len(state.output) > OUTPUT_FIFO_SIZE:
            raise ValueError(f"saved i8042 output holds {len(state.output)} bytes, more than {OUTPUT_FIFO_SIZE}")
        if state.pending_command not in _COMMANDS_WITH_DATA:
            raise ValueError(f"saved i8042 pending command {state.pending_command:#x} takes no data byte")
        if not (0 <= state.ctr <= 0xFF and 0 <= state.status <= 0xFF):
            raise ValueError("saved i8042 registers are not bytes")
        with self._lock:
            self._ctr, self._status, self._pending_command = state.ctr, state.status, state.pending_command
            self._out.clear()
            self._out.push(state.output)
            self._set_line(state.line)
