"""The ACPI fixed-feature power button (trivmm.devices.acpi_pm): PWRBTN_STS, PWRBTN_EN and the
SCI line they drive; the FADT announces the button (PWR_BUTTON flag clear)."""

from __future__ import annotations

import struct

from trivmm.boot.acpi import acpi_tables
from trivmm.devices.acpi_pm import PM1_CONTROL_OFFSET, PM1_EVENT_OFFSET, POWER_OFF_VALUE, PWRBTN_STS, AcpiPm


def _pm() -> tuple[AcpiPm, list[bool]]:
    levels: list[bool] = []
    return AcpiPm(lambda: None, lambda: None, levels.append), levels


def _write16(pm: AcpiPm, offset: int, value: int) -> None:
    pm.write(offset, memoryview(bytearray(struct.pack("<H", value))))


def _read16(pm: AcpiPm, offset: int) -> int:
    data = bytearray(2)
    pm.read(offset, memoryview(data))
    return int.from_bytes(data, "little")


def test_a_press_sets_the_status_and_raises_the_sci_only_when_enabled() -> None:
    pm, levels = _pm()
    pm.press_power_button()
    assert _read16(pm, PM1_EVENT_OFFSET) & PWRBTN_STS
    assert levels == []  # not enabled: the status is set, the line stays low
    _write16(pm, PM1_EVENT_OFFSET + 2, PWRBTN_STS)  # the guest enables it: the pending press fires
    assert levels == [True]
    pm.press_power_button()  # pressed again while pending: the line is high already
    assert levels == [True]
    _write16(pm, PM1_EVENT_OFFSET, PWRBTN_STS)  # write one to clear
    assert _read16(pm, PM1_EVENT_OFFSET) & PWRBTN_STS == 0
    assert levels == [True, False]
    pm.press_power_button()
    assert levels == [True, False, True]
    _write16(pm, PM1_EVENT_OFFSET + 2, 0)  # disabled: the line drops, the status stays
    assert levels == [True, False, True, False]
    assert _read16(pm, PM1_EVENT_OFFSET) & PWRBTN_STS


def test_writing_zero_to_the_status_clears_nothing() -> None:
    pm, levels = _pm()
    _write16(pm, PM1_EVENT_OFFSET + 2, PWRBTN_STS)
    pm.press_power_button()
    _write16(pm, PM1_EVENT_OFFSET, 0)
    assert _read16(pm, PM1_EVENT_OFFSET) & PWRBTN_STS and levels == [True]


def test_restore_raises_a_pending_sci_again() -> None:
    source, _ = _pm()
    _write16(source, PM1_EVENT_OFFSET + 2, PWRBTN_STS)
    source.press_power_button()
    target, levels = _pm()
    target.restore(source.save())
    assert levels == [True]  # KVM's irqchip state does not carry KVM_IRQ_LINE's level
    _write16(target, PM1_EVENT_OFFSET, PWRBTN_STS)  # the destination's guest handles the event
    assert levels == [True, False]
    quiet, levels = _pm()
    quiet.restore(_pm()[0].save())
    assert levels == []


def test_the_fadt_announces_a_fixed_power_button() -> None:
    blobs = dict((blob[:4], blob) for _, blob in acpi_tables(1).blobs)
    flags = struct.unpack_from("<I", blobs[b"FACP"], 112)[0]
    assert not flags & (1 << 4), "PWR_BUTTON set: the FADT says there is no fixed power button"
    assert flags & (1 << 5)  # no fixed sleep button
    assert struct.unpack_from("<H", blobs[b"FACP"], 46)[0] == 9  # SCI_INT


def test_a_dword_across_enable_and_control_acts_on_both_registers() -> None:
    """A 32-bit write at offset 2 covers PM1 enable and PM1 control: the control half is a
    control write (S5 + SLP_EN powers off, SLP_EN reads back clear, SCI_EN stays set), not
    raw bytes stored past the control register's rules."""
    powered_off: list[bool] = []
    levels: list[bool] = []
    pm = AcpiPm(lambda: powered_off.append(True), lambda: None, levels.append)
    pm.write(PM1_EVENT_OFFSET + 2, memoryview(bytearray(struct.pack("<HH", PWRBTN_STS, POWER_OFF_VALUE))))
    assert powered_off == [True]
    assert _read16(pm, PM1_CONTROL_OFFSET) == (POWER_OFF_VALUE & ~0x2000) | 0x0001
    assert _read16(pm, PM1_EVENT_OFFSET + 2) == PWRBTN_STS
    pm.press_power_button()
    assert levels == [True]
