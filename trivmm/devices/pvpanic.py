"""The pvpanic device (QEMU's ``pvpanic`` ISA device, PIO 0x505): a guest says it panicked.

The DSDT announces it as ``QEMU0001`` with this port in ``_CRS``; Linux's
``pvpanic-mmio`` driver (built in or a module in Debian's kernels) finds it there, reads
the events the device supports, and writes ``PANICKED`` from its panic notifier -- after
the panic message has gone to the console. That write ends the VM with its own reason
(``StopReason.PANIC``). ``CRASH_LOADED`` (a kdump kernel is about to take over) is
counted and the guest runs on, as QEMU does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import attrs

__all__ = ["PvPanic", "PvPanicState", "PVPANIC_PORT", "PVPANIC_HID", "PANICKED", "CRASH_LOADED"]

PVPANIC_PORT = 0x505
PVPANIC_HID = "QEMU0001"
PANICKED = 1 << 0
CRASH_LOADED = 1 << 1
_SUPPORTED = PANICKED | CRASH_LOADED
_log = logging.getLogger(__name__)


@attrs.frozen
class PvPanicState:
    """How often the guest said a crash kernel was loaded (PANICKED ends the VM)."""

    crash_loaded: int


class PvPanic:
    """One byte: reads return the supported events, writes report events."""

    def __init__(self, panicked: Callable[[], None]) -> None:
        self._panicked = panicked
        self._lock = threading.Lock()
        self.crash_loaded = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[0] = _SUPPORTED
        for i in range(1, len(data)):
            data[i] = 0

    def write(self, offset: int, data: memoryview) -> None:
        events = data[0]
        if events & PANICKED:
            _log.warning("the guest reported a kernel panic through pvpanic")
            self._panicked()
        elif events & CRASH_LOADED:
            with self._lock:
                self.crash_loaded += 1
                first = self.crash_loaded == 1
            if first:  # a guest may write this in a loop: say it once, count the rest
                _log.warning("the guest panicked and is starting its crash (kdump) kernel")

    # --- saved state --------------------------------------------------------------------
    def save(self) -> PvPanicState:
        with self._lock:
            return PvPanicState(self.crash_loaded)

    def restore(self, state: PvPanicState) -> None:
        if state.crash_loaded < 0:
            raise ValueError(f"saved pvpanic count {state.crash_loaded} is negative")
        with self._lock:
            self.crash_loaded = state.crash_loaded
