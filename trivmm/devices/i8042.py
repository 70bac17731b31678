"""Just enough of an i8042 keyboard controller (PIO 0x60/0x64) for Linux to probe and reset.

The guest's reboot path writes 0xFE (pulse reset line) to the command port; that ends the
VM with "reset". A keyboard that acknowledges commands is modelled so that a kernel's atkbd
probe finishes at once instead of waiting out its timeouts; no key is ever pressed.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

__all__ = ["I8042", "I8042_DATA_PORT", "I8042_COMMAND_PORT", "KEYBOARD_IRQ"]

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # the device spans 0x60..0x64; offsets 1..3 are unused
KEYBOARD_IRQ = 1

_STATUS_OBF = 0x01
_STATUS_SYS = 0x04
_STATUS_CMD = 0x08

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


class I8042:
    """The controller at 0x60 (offset 0) and 0x64 (offset 4)."""

    def __init__(self, reset: Callable[[], None], irq: Callable[[bool], None]) -> None:
        self._reset = reset
        self._irq = irq
        self._lock = threading.Lock()
        self._ctr = _CTR_KBD_INT | _CTR_SYS | _CTR_AUX_DISABLE | _CTR_XLATE
        self._status = _STATUS_SYS
        self._out: collections.deque[int] = collections.deque()
        self._pending_command = 0

    def read(self, offset: int, data: memoryview) -> None:
        raise_irq = False
        with self._lock:
            if offset == 0:
                value = self._out.popleft() if self._out else 0
                raise_irq = bool(self._out) and bool(self._ctr & _CTR_KBD_INT)
            elif offset == 4:
                value = self._status | (_STATUS_OBF if self._out else 0)
            else:
                value = 0xFF
        data[:] = bytes([value]) + b"\0" * (len(data) - 1)
        self._irq(False)
        if raise_irq:
            self._irq(True)

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
            notify = bool(self._out) and bool(self._ctr & _CTR_KBD_INT)
        if reset:
            self._reset()
        elif notify:
            self._irq(True)

    def _command(self, command: int) -> bool:
        self._pending_command = 0
        if command == _CMD_READ_CTR:
            self._out.append(self._ctr)
        elif command in (_CMD_WRITE_CTR, _CMD_WRITE_OUTPUT_PORT):
            self._pending_command = command
        elif command == _CMD_AUX_DISABLE:
            self._ctr |= _CTR_AUX_DISABLE
        elif command == _CMD_AUX_ENABLE:
            self._ctr &= ~_CTR_AUX_DISABLE
        elif command == _CMD_SELF_TEST:
            self._out.append(0x55)
        elif command == _CMD_KBD_TEST:
            self._out.append(0x00)
        elif command == _CMD_KBD_DISABLE:
            self._ctr |= _CTR_KBD_DISABLE
        elif command == _CMD_KBD_ENABLE:
            self._ctr &= ~_CTR_KBD_DISABLE
        elif command == _CMD_READ_OUTPUT_PORT:
            self._out.append(0x01)  # reset line high: not in reset
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
            self._out.extend((_KBD_ACK, 0xAA))  # ACK, self-test passed
        elif value == _KBD_GET_ID:
            self._out.extend((_KBD_ACK, 0xAB, 0x83))  # MF2 keyboard
        else:
            self._out.append(_KBD_ACK)
