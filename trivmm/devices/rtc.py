"""A read-mostly MC146818 CMOS RTC (PIO 0x70 index, 0x71 data) that tells the host's time.

Time is reported in BCD, 24-hour mode, and the update-in-progress bit is never set, so a
guest's "wait for UIP to clear" loop ends at once. CMOS bytes other than the clock read as
stored (the guest may write them); nothing is persisted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import attrs

__all__ = ["CmosRtc", "RtcState", "RTC_PORT", "CMOS_SIZE"]

RTC_PORT = 0x70
CMOS_SIZE = 128

_SECONDS, _MINUTES, _HOURS, _WEEKDAY, _DAY, _MONTH, _YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
_REG_A, _REG_B, _REG_C, _REG_D = 0x0A, 0x0B, 0x0C, 0x0D
_CENTURY = 0x32
_REG_B_24H = 0x02
_REG_D_VALID = 0x80
_INDEX_MASK = 0x7F  # bit 7 of what is written to the index port masks NMIs; it is no index bit


@attrs.frozen
class RtcState:
    """The selected CMOS index and the 128 CMOS bytes (the clock itself is the host's)."""

    index: int
    cmos: bytes


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class CmosRtc:
    """Offset 0 selects a CMOS byte; offset 1 reads or writes it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[_REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate
        self._cmos[_REG_B] = _REG_B_24H
        self._cmos[_REG_D] = _REG_D_VALID

    def _clock_byte(self, index: int) -> int | None:
        t = time.gmtime(self._clock())
        fields = {_SECONDS: t.tm_sec, _MINUTES: t.tm_min, _HOURS: t.tm_hour,
                  _WEEKDAY: (t.tm_wday + 1) % 7 + 1, _DAY: t.tm_mday, _MONTH: t.tm_mon,
                  _YEAR: t.tm_year % 100, _CENTURY: t.tm_year // 100}  # fmt: skip
        value = fields.get(index)
        return None if value is None else _bcd(value)

    def read(self, offset: int, data: memoryview) -> None:
        index = self._index
        if offset == 0:
            value = index
        else:
            with self._lock:
                clock = self._clock_byte(index)
                value = clock if clock is not None else self._cmos[index]
                if index == _REG_C:
                    self._cmos[_REG_C] = 0  # reading C acknowledges interrupt flags
        data[:] = value.to_bytes(len(data), "little")

    def write(self, offset: int, data: memoryview) -> None:
        if offset == 0:
            # Every CMOS access starts here, so this is the port a guest hammers: one store
            # and no lock (data-port accesses read the index once).
            self._index = data[0] & _INDEX_MASK
            return
        index = self._index
        with self._lock:
            if index not in (_REG_C, _REG_D) and self._clock_byte(index) is None:
                self._cmos[index] = data[0]

    # --- saved state --------------------------------------------------------------------
    def save(self) -> RtcState:
        with self._lock:
            return RtcState(self._index, bytes(self._cmos))

    def restore(self, state: RtcState) -> None:
        """Take ``state``; the clock goes on telling the host's time, as a PC's RTC does
        across a suspend."""
        if len(state.cmos) != CMOS_SIZE or not 0 <= state.index <= _INDEX_MASK:
            raise ValueError(f"saved CMOS state is {len(state.cmos)} bytes at index {state.index}")
        with self._lock:
            self._index = state.index
            self._cmos[:] = state.cmos
