"""Hostile register traffic against every legacy device model: bounded memory, no escaping
exception, and interrupt lines that never lose an edge between threads."""

from __future__ import annotations

import sys
import threading
import time
import tracemalloc
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from trivmm.bus import AddressSpace
from trivmm.console import ConsoleBuffer
from trivmm.devices.acpi_pm import ACPI_PM_SIZE, AcpiPm
from trivmm.devices.i8042 import I8042, OUTPUT_FIFO_SIZE
from trivmm.devices.pvpanic import PvPanic
from trivmm.devices.rtc import CmosRtc
from trivmm.devices.serial import FIFO_SIZE, Serial

BASE = 0x100
CONSOLE_LIMIT = 256

# One access: (read?, offset from the device's base -- a little past its end too --, width, value)
accesses = st.lists(
    st.tuples(st.booleans(), st.integers(0, 9), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1)),
    max_size=300,
)


class Events:
    """Records what a device asks of the VM: resets, power-offs, panics, interrupt levels."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.levels: list[bool] = []

    def power_off(self) -> None:
        self.calls.append("off")

    def reset(self) -> None:
        self.calls.append("reset")

    def panic(self) -> None:
        self.calls.append("panic")


def _drive(device: object, size: int, ops: list[tuple[bool, int, int, int]]) -> None:
    """Every access through a bus, as a vCPU would make it; nothing may raise."""
    bus = AddressSpace("pio", 1 << 16)
    bus.insert(BASE, size, device)  # type: ignore[arg-type]
    for is_read, offset, width, value in ops:
        data = memoryview(bytearray(value.to_bytes(8, "little")[:width]))
        if is_read:
            bus.read(BASE + offset, data)
        else:
            bus.write(BASE + offset, data)


@settings(max_examples=150)
@given(accesses)
def test_uart_under_hostile_registers(ops: list[tuple[bool, int, int, int]]) -> None:
    events = Events()
    console = ConsoleBuffer(limit=CONSOLE_LIMIT)
    uart = Serial(console, events.levels.append)
    _drive(uart, 8, ops)
    uart.enqueue_input(b"k" * 1000)  # the host side cannot overfill it either
    assert len(uart.save().rx) <= FIFO_SIZE
    assert len(console) <= CONSOLE_LIMIT
    assert all(a != b for a, b in zip(events.levels, events.levels[1:], strict=False))  # edges only


@settings(max_examples=150)
@given(accesses)
def test_i8042_under_hostile_registers(ops: list[tuple[bool, int, int, int]]) -> None:
    events = Events()
    kbd = I8042(events.reset, events.levels.append)
    _drive(kbd, 5, ops)
    assert len(kbd._out) <= OUTPUT_FIFO_SIZE
    assert set(events.calls) <= {"reset"}


@settings(max_examples=150)
@given(accesses)
def test_rtc_acpi_pm_and_pvpanic_under_hostile_registers(ops: list[tuple[bool, int, int, int]]) -> None:
    events = Events()
    rtc, pm, panic = CmosRtc(clock=lambda: 0.0), AcpiPm(events.power_off, events.reset), PvPanic(events.panic)
    _drive(rtc, 2, ops)
    _drive(pm, ACPI_PM_SIZE, ops)
    _drive(panic, 1, ops)
    assert 0 <= rtc._index < 128 and len(rtc._cmos) == 128
    assert len(pm._regs) == ACPI_PM_SIZE
    assert set(events.calls) <= {"off", "reset", "panic"}


def test_an_i8042_command_flood_costs_bounded_memory() -> None:
    kbd = I8042(lambda: None, lambda level: None)
    read_ctr = memoryview(b"\x20")
    kbd.write(4, read_ctr)  # warm up: the FIFO and its counters exist
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200_000):  # "read the CTR" again and again, never reading the answer
            kbd.write(4, read_ctr)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kbd._out) == OUTPUT_FIFO_SIZE
    assert kbd.dropped == 200_001 - OUTPUT_FIFO_SIZE
    # (The warnings the drops log are captured by pytest: a few KiB.) An unbounded queue
    # grew by about 1.7 MB here.
    assert grown < 64 * 1024, grown


def test_console_buffer_keeps_the_newest_bytes_and_counts_the_rest() -> None:
    buffer = ConsoleBuffer(limit=1000)
    for i in range(3000):
        buffer(bytes([i & 0xFF]))
    assert len(buffer) == 1000 and buffer.dropped == 2000
    assert bytes(buffer._data) == bytes(i & 0xFF for i in range(2000, 3000))


class Irqchip:
    """A level-triggered input that lags: applying a level takes a moment (as an ioctl does),
    which is when an unsynchronised caller can be overtaken by another thread."""

    def __init__(self) -> None:
        self.level = False

    def set_level(self, level: bool) -> None:
        time.sleep(0)  # let another thread run between deciding the level and applying it
        self.level = level


def test_uart_interrupt_line_never_loses_an_edge_between_threads() -> None:
    """Two vCPU threads hammer the UART while the console pump feeds it; whenever they all
    stop, the irqchip's line must equal "an interrupt is pending" -- or the guest, waiting
    for an edge that never comes, hangs its console."""
    chip = Irqchip()
    uart = Serial(lambda data: None, chip.set_level)

    def reg(offset: int, value: int | None = None) -> int:
        buf = bytearray([value or 0])
        if value is None:
            uart.read(offset, memoryview(buf))
        else:
            uart.write(offset, memoryview(buf))
        return buf[0]

    def vcpu(seed: int, rounds: int) -> None:
        for i in range(rounds):
            step = (i + seed) % 4
            if step == 0:
                reg(1, 0x03)  # IER: RX and THRE interrupts
            elif step == 1:
                reg(0, 0x41)  # transmit: THRE pending again
            elif step == 2:
                reg(2)  # IIR: acknowledges THRE
            else:
                reg(0)  # RBR: takes a received byte

    def pump(rounds: int) -> None:
        for _ in range(rounds):
            uart.enqueue_input(b"ab")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython can: races show at once
    try:
        _hammer(uart, chip, vcpu, pump)
    finally:
        sys.setswitchinterval(interval)


def _hammer(uart: Serial, chip: Irqchip, vcpu: Callable[[int, int], None], pump: Callable[[int], None]) -> None:
    for trial in range(40):
        threads = [threading.Thread(target=vcpu, args=(trial, 400)),
                   threading.Thread(target=vcpu, args=(trial + 1, 400)),
                   threading.Thread(target=pump, args=(300,))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with uart._lock:
            pending = uart._pending()
        assert chip.level == pending, f"trial {trial}: line {chip.level}, interrupt pending {pending}"
