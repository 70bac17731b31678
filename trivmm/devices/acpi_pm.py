"""ACPI fixed-hardware power management registers (PIO 0x600..0x606), PIIX4-like.

The FADT points at them: PM1a event block (offset 0: status, 2: enable), PM1a control
(offset 4, 16 bits) and the reset register (offset 6). Writing SLP_EN together with the
sleep type of \\_S5 (the DSDT declares 5) powers the VM off; writing the reset value resets
it. SCI_EN reads as set (the platform is always in ACPI mode; the FADT has no SMI command
port). Tiny guests use the same registers, so one path ends every VM.

The fixed-feature power button (``press_power_button``, QMP's ``system_powerdown``) sets
PWRBTN_STS; the SCI (IRQ 9, level) is asserted while any status bit is set whose enable bit
is set, as on PIIX4, and drops when the guest clears the status (write one to clear) or the
enable. What the guest does with the event is its own business: Linux's ``button`` driver
turns it into KEY_POWER, and user space (systemd-logind, acpid) powers off.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import attrs

__all__ = ["AcpiPm", "AcpiPmState", "ACPI_PM_PORT", "ACPI_PM_SIZE", "PM1_EVENT_OFFSET", "PM1_CONTROL_OFFSET",
           "RESET_OFFSET", "RESET_VALUE", "S5_SLEEP_TYPE", "POWER_OFF_VALUE", "PWRBTN_STS"]  # fmt: skip

ACPI_PM_PORT = 0x600
ACPI_PM_SIZE = 8
PM1_EVENT_OFFSET = 0  # 2 bytes status + 2 bytes enable
PM1_CONTROL_OFFSET = 4  # 2 bytes
RESET_OFFSET = 6
RESET_VALUE = 0x01
S5_SLEEP_TYPE = 5
_SCI_EN = 0x0001
PWRBTN_STS = 0x0100  # PM1 status bit 8 (and PWRBTN_EN, the same bit of the enable register)
_SLP_TYP_SHIFT = 10
_SLP_TYP_MASK = 0x1C00
_SLP_EN = 0x2000
POWER_OFF_VALUE = (S5_SLEEP_TYPE << _SLP_TYP_SHIFT) | _SLP_EN


@attrs.frozen
class AcpiPmState:
    """The 8 register bytes: PM1a status, enable, control, and the reset register."""

    registers: bytes


class AcpiPm:
    def __init__(self, power_off: Callable[[], None], reset: Callable[[], None],
                 sci: Callable[[bool], None] | None = None) -> None:  # fmt: skip
        self._power_off = power_off
        self._reset = reset
        self._sci = sci  # drives the SCI line (level: True while asserted)
        self._sci_level = False
        self._sci_lock = threading.Lock()
        self._lock = threading.Lock()
        self._regs = bytearray(ACPI_PM_SIZE)  # status, enable, control, reset
        struct.pack_into("<H", self._regs, PM1_CONTROL_OFFSET, _SCI_EN)

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            value = self._regs[offset : offset + len(data)]
        data[:] = value if offset != RESET_OFFSET else bytes(len(data))

    def press_power_button(self) -> bool:
        """A press of the fixed-feature power button: PWRBTN_STS set, the SCI raised if
        enabled. Returns whether the guest enabled the event (PWRBTN_EN): one that did not
        (no ACPI, or no driver for the button) will never see the press."""
        with self._lock:
            self._regs[1] |= PWRBTN_STS >> 8
            (enable,) = struct.unpack_from("<H", self._regs, PM1_EVENT_OFFSET + 2)
        self._update_sci()
        return bool(enable & PWRBTN_STS)

    def _sci_wanted(self) -> bool:
        status, enable = struct.unpack_from("<HH", self._regs, PM1_EVENT_OFFSET)
        return bool(status & enable)

    def _update_sci(self) -> None:
        # The line follows the registers. Its own lock orders the changes (a vCPU's write and
        # the host's button press may race); the register lock is not held while the line's
        # callback takes KVM's irqchip ioctl.
        if self._sci is None:
            return
        with self._sci_lock:
            with self._lock:
                level = self._sci_wanted()
            if level != self._sci_level:
                self._sci_level = level
                self._sci(level)

    def write(self, offset: int, data: memoryview) -> None:
        if offset < PM1_CONTROL_OFFSET < offset + len(data):
            # One access across the event block and PM1 control (a dword at 2): each part
            # by its own register's rules, or the control half would skip them.
            split = PM1_CONTROL_OFFSET - offset
            self.write(offset, data[:split])
            self.write(PM1_CONTROL_OFFSET, data[split:])
            return
        if offset < PM1_CONTROL_OFFSET:  # the event block: status (write one to clear), enable
            with self._lock:
                for i in range(len(data)):
                    if offset + i < 2:
                        self._regs[offset + i] &= ~data[i] & 0xFF
                    else:
                        self._regs[offset + i] = data[i]
            self._update_sci()
            return
        with self._lock:
            if offset == RESET_OFFSET:
                reset = data[0] == RESET_VALUE
            else:
                reset = False
                self._regs[offset : offset + len(data)] = data
                self._regs[PM1_CONTROL_OFFSET] |= _SCI_EN
            (control,) = struct.unpack_from("<H", self._regs, PM1_CONTROL_OFFSET)
            power_off = bool(control & _SLP_EN) and (control & _SLP_TYP_MASK) >> _SLP_TYP_SHIFT == S5_SLEEP_TYPE
            if control & _SLP_EN:
                struct.pack_into("<H", self._regs, PM1_CONTROL_OFFSET, control & ~_SLP_EN)
        if power_off:
            self._power_off()
        elif reset:
            self._reset()

    # --- saved state --------------------------------------------------------------------
    def save(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(bytes(self._regs))

    def restore(self, state: AcpiPmState) -> None:
        if len(state.registers) != ACPI_PM_SIZE:
            raise ValueError(f"saved ACPI PM registers are {len(state.registers)} bytes, not {ACPI_PM_SIZE}")
        with self._lock:
            self._regs[:] = state.registers
            self._regs[PM1_CONTROL_OFFSET] |= _SCI_EN  # always in ACPI mode, as a write leaves it
            level = self._sci_wanted()
        # KVM's irqchip state does not carry the level of a line driven by KVM_IRQ_LINE:
        # raise it again, as the other devices do (a level line raised twice is harmless).
        self._sci_level = False
        if level:
            self._update_sci()
