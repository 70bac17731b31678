from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trivmm.devices.serial import FIFO_SIZE, Serial

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)


class Uart:
    def __init__(self) -> None:
        self.out = bytearray()
        self.levels: list[bool] = []
        self.dev = Serial(self.out.extend, self.levels.append)

    def read(self, offset: int) -> int:
        buf = bytearray(1)
        self.dev.read(offset, memoryview(buf))
        return buf[0]

    def write(self, offset: int, value: int) -> None:
        self.dev.write(offset, memoryview(bytes([value])))

    @property
    def line(self) -> bool:
        return bool(self.levels) and self.levels[-1]


def test_transmit_goes_to_the_host_and_thr_is_always_empty() -> None:
    u = Uart()
    for ch in b"hi\n":
        assert u.read(LSR) & 0x60 == 0x60
        u.write(THR, ch)
    assert bytes(u.out) == b"hi\n"


def test_divisor_latch_does_not_transmit() -> None:
    u = Uart()
    u.write(LCR, 0x80)
    u.write(THR, 0x01)
    u.write(IER, 0x00)
    assert u.read(THR) == 0x01
    u.write(LCR, 0x03)
    assert u.out == b""


def test_thre_interrupt_on_enable_and_ack_by_iir_read() -> None:
    u = Uart()
    u.write(IER, 0x02)
    assert u.line
    assert u.read(IIR) & 0x0F == 0x02
    assert not u.line
    assert u.read(IIR) & 0x0F == 0x01
    u.write(THR, ord("x"))  # transmitting makes THR empty again: interrupt
    assert u.line


def test_received_data_raises_rx_interrupt_until_read() -> None:
    u = Uart()
    u.write(IER, 0x01)
    assert u.dev.enqueue_input(b"ab") == 2
    assert u.line and u.read(IIR) & 0x0F == 0x04
    assert u.read(LSR) & 0x01
    assert u.read(THR) == ord("a")
    assert u.read(THR) == ord("b")
    assert not u.read(LSR) & 0x01
    assert not u.line


def test_input_beyond_the_fifo_is_refused_not_lost_silently() -> None:
    u = Uart()
    assert u.dev.enqueue_input(bytes(FIFO_SIZE + 10)) == FIFO_SIZE
    assert u.dev.enqueue_input(b"x") == 0


def test_loopback_echoes_and_mirrors_modem_lines() -> None:
    u = Uart()
    u.write(MCR, 0x10 | 0x0A)  # loop, RTS, OUT2
    assert u.read(MSR) & 0xF0 == 0x90  # CTS (from RTS) and DCD (from OUT2): Linux's probe
    u.write(THR, 0x42)
    assert u.out == b""
    assert u.read(THR) == 0x42


def test_fifo_enabled_shows_in_iir() -> None:
    u = Uart()
    u.write(IIR, 0x01)
    assert u.read(IIR) & 0xC0 == 0xC0


def test_save_restore_round_trip() -> None:
    u = Uart()
    u.write(IER, 0x03)
    u.write(SCR, 0x77)
    u.dev.enqueue_input(b"pending")
    state = u.dev.save()
    v = Uart()
    v.dev.restore(state)
    assert v.dev.save() == state
    assert v.read(SCR) == 0x77 and v.read(THR) == ord("p")
    assert v.line


class UartMachine(RuleBasedStateMachine):
    """Random register traffic: the model never raises and its invariants hold."""

    def __init__(self) -> None:
        super().__init__()
        self.u = Uart()

    @rule(offset=st.integers(0, 7), value=st.integers(0, 255))
    def write(self, offset: int, value: int) -> None:
        self.u.write(offset, value)

    @rule(offset=st.integers(0, 7))
    def read(self, offset: int) -> None:
        assert 0 <= self.u.read(offset) <= 255

    @rule(data=st.binary(max_size=80))
    def type_in(self, data: bytes) -> None:
        self.u.dev.enqueue_input(data)

    @invariant()
    def line_matches_iir(self) -> None:
        state = self.u.dev.save()
        pending = (state.ier & 1 and state.rx) or (state.ier & 2 and state.thre_pending)
        assert self.u.line == bool(pending)
        assert len(state.rx) <= FIFO_SIZE

    @invariant()
    def line_changes_are_edges(self) -> None:
        levels = self.u.levels
        assert all(a != b for a, b in itertools.pairwise(levels))


TestUartMachine = UartMachine.TestCase


@given(st.binary(max_size=300))
def test_everything_written_outside_loopback_reaches_the_host(data: bytes) -> None:
    u = Uart()
    for b in data:
        u.write(THR, b)
    assert bytes(u.out) == data
