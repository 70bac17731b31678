from __future__ import annotations

import struct

from trivmm.devices.acpi_pm import PM1_CONTROL_OFFSET, POWER_OFF_VALUE, RESET_OFFSET, RESET_VALUE, AcpiPm
from trivmm.devices.i8042 import I8042
from trivmm.devices.rtc import CmosRtc


def _rd(dev: object, offset: int, size: int = 1) -> bytes:
    buf = bytearray(size)
    dev.read(offset, memoryview(buf))  # type: ignore[attr-defined]
    return bytes(buf)


def test_acpi_power_off_needs_s5_and_slp_en() -> None:
    events: list[str] = []
    pm = AcpiPm(lambda: events.append("off"), lambda: events.append("reset"))
    pm.write(PM1_CONTROL_OFFSET, memoryview(struct.pack("<H", 5 << 10)))  # type only
    pm.write(PM1_CONTROL_OFFSET, memoryview(struct.pack("<H", (3 << 10) | 0x2000)))  # S3: ignored
    assert events == []
    pm.write(PM1_CONTROL_OFFSET, memoryview(struct.pack("<H", POWER_OFF_VALUE)))
    assert events == ["off"]
    assert struct.unpack("<H", _rd(pm, PM1_CONTROL_OFFSET, 2))[0] & 1  # SCI_EN stays set


def test_acpi_reset_register() -> None:
    events: list[str] = []
    pm = AcpiPm(lambda: events.append("off"), lambda: events.append("reset"))
    pm.write(RESET_OFFSET, memoryview(b"\x02"))
    pm.write(RESET_OFFSET, memoryview(bytes([RESET_VALUE])))
    assert events == ["reset"]


def test_i8042_reset_command_and_ctr() -> None:
    resets: list[int] = []
    irqs: list[bool] = []
    kbd = I8042(lambda: resets.append(1), irqs.append)
    kbd.write(4, memoryview(b"\x20"))  # read CTR
    assert _rd(kbd, 4)[0] & 1  # output buffer full
    ctr = _rd(kbd, 0)[0]
    kbd.write(4, memoryview(b"\x60"))
    kbd.write(0, memoryview(bytes([ctr ^ 0x01])))  # write CTR: kbd interrupt off
    kbd.write(4, memoryview(b"\x20"))
    assert _rd(kbd, 0)[0] == ctr ^ 0x01
    kbd.write(0, memoryview(b"\xf2"))  # keyboard identify: ACK then id (0x83 translated to 0x41, as on a PC)
    assert [_rd(kbd, 0)[0] for _ in range(3)] == [0xFA, 0xAB, 0x41]
    assert resets == []
    kbd.write(4, memoryview(b"\xfe"))
    assert resets == [1]


def test_rtc_reports_bcd_time_and_no_update_in_progress() -> None:
    rtc = CmosRtc(clock=lambda: 1795703697.0)  # 2026-11-26T14:34:57Z
    values = {}
    for index in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0A, 0x0B, 0x0D):
        rtc.write(0, memoryview(bytes([index | 0x80])))  # NMI-disable bit is ignored
        values[index] = _rd(rtc, 1)[0]
    assert (values[0x04], values[0x02], values[0x00]) == (0x14, 0x34, 0x57)
    assert (values[0x07], values[0x08], values[0x09], values[0x32]) == (0x26, 0x11, 0x26, 0x20)
    assert not values[0x0A] & 0x80
    assert values[0x0B] & 0x02 and values[0x0D] & 0x80


def test_rtc_nvram_is_writable_but_clock_is_not() -> None:
    rtc = CmosRtc(clock=lambda: 0.0)
    for index, value in ((0x40, 0xAB), (0x00, 0x42)):
        rtc.write(0, memoryview(bytes([index])))
        rtc.write(1, memoryview(bytes([value])))
    rtc.write(0, memoryview(b"\x40"))
    assert _rd(rtc, 1) == b"\xab"
    rtc.write(0, memoryview(b"\x00"))
    assert _rd(rtc, 1) == b"\x00"
