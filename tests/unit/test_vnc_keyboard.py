"""The i8042's keyboard and mouse, driven at the port level the way Linux's i8042, atkbd
and psmouse drivers drive them, and from the host side the way the VNC server does: probe
answers, scancode translation, IRQ 1 and IRQ 12 edges, bounded queues, saved state."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trivmm.devices.i8042 import (
    I8042,
    KEY_QUEUE_SIZE,
    PAUSE_KEY,
    SET1_TO_SET2,
    SET2_TO_SET1,
    I8042State,
)
from trivmm.migration.codec import decode_state, encode_state
from trivmm.vnc.keymap import KEYSYMS, keysym_to_code, xt_to_code

STATUS_OBF, STATUS_AUXDATA = 0x01, 0x20


class Port:
    """An i8042 with its two interrupt lines recorded."""

    def __init__(self) -> None:
        self.irq1: list[bool] = []
        self.irq12: list[bool] = []
        self.resets = 0
        self.dev = I8042(self._reset, self.irq1.append, self.irq12.append)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        data = bytearray(1)
        self.dev.read(4, memoryview(data))
        return data[0]

    def data(self) -> int:
        data = bytearray(1)
        self.dev.read(0, memoryview(data))
        return data[0]

    def command(self, value: int, *params: int) -> None:
        self.dev.write(4, memoryview(bytes([value])))
        for param in params:
            self.dev.write(0, memoryview(bytes([param])))

    def send(self, *values: int) -> None:
        for value in values:
            self.dev.write(0, memoryview(bytes([value])))

    def drain(self) -> list[tuple[int, bool]]:
        """Every waiting byte with whether it came from the AUX port, as i8042_interrupt reads them."""
        out = []
        while (status := self.status()) & STATUS_OBF:
            out.append((self.data(), bool(status & STATUS_AUXDATA)))
        return out

    def bytes(self) -> list[int]:
        return [value for value, _ in self.drain()]


def linux_controller_probe(port: Port) -> int:
    """What i8042_controller_check/selftest/init and i8042_check_aux do (drivers/input/serio/i8042.c)."""
    port.drain()
    port.command(0xAA)
    assert port.bytes() == [0x55]  # self test passed
    port.command(0x20)
    ctr = port.data()
    ctr = (ctr | 0x10) & ~0x01  # keyboard interface and interrupt off while setting up
    port.command(0x60, ctr)
    port.command(0xD3, 0x5A)  # AUX loopback: comes back as AUX data
    assert port.drain() == [(0x5A, True)]
    port.command(0x60, ctr | 0x20)  # toggle the AUX port: the CTR bit reads back
    port.command(0x20)
    assert port.data() & 0x20
    port.command(0x60, ctr & ~0x20)
    port.command(0x20)
    assert not port.data() & 0x20
    # The AUX IRQ test: the loopback byte raises IRQ 12 once AUXINT is on.
    port.command(0x60, (ctr & ~0x20) | 0x02)
    port.command(0xD3, 0xA5)
    assert port.irq12[-1] is True
    assert port.drain() == [(0xA5, True)]
    assert port.irq12[-1] is False
    # Multiplexer probe (i8042_set_mux_mode): a plain controller echoes 0xA4, so "no MUX".
    for value in (0xF0, 0x56, 0xA4):
        port.command(0xD3, value)
        assert port.drain() == [(value, True)]
    ctr = (ctr & ~0x30) | 0x03  # both ports on, both interrupts on (i8042_enable_*_port)
    port.command(0x60, ctr)
    return ctr


def atkbd_probe(port: Port) -> None:
    """atkbd_probe, atkbd_select_set (translated: set 2), LEDs, typematic rate, enable."""
    port.send(0xF2)
    assert port.bytes() == [0xFA, 0xAB, 0x41]  # MF2 keyboard, its ID translated as on a PC
    port.send(0xF5)
    assert port.bytes() == [0xFA]
    port.send(0xED, 0x00)
    assert port.bytes() == [0xFA, 0xFA]
    port.send(0xF3, 0x2B)
    assert port.bytes() == [0xFA, 0xFA]
    port.send(0xF4)
    assert port.bytes() == [0xFA]


def test_linux_probes_controller_keyboard_and_mouse_without_a_timeout() -> None:
    port = Port()
    linux_controller_probe(port)
    atkbd_probe(port)
    # psmouse_probe: get ID, reset-and-disable; then the IntelliMouse knock and enabling.
    port.command(0xD4, 0xF2)
    assert port.drain() == [(0xFA, True), (0x00, True)]
    port.command(0xD4, 0xFF)
    assert port.drain() == [(0xFA, True), (0xAA, True), (0x00, True)]
    for rate in (200, 100, 80):
        port.command(0xD4, 0xF3)
        port.command(0xD4, rate)
    port.command(0xD4, 0xF2)
    assert [v for v, _ in port.drain()][-1] == 0x03  # an IntelliMouse now: wheel packets
    port.command(0xD4, 0xE9)  # status request
    assert port.drain() == [(0xFA, True), (0x00, True), (0x02, True), (80, True)]
    port.command(0xD4, 0xE2)  # something a synaptics/trackpoint probe tries: not ours
    assert port.drain() == [(0xFE, True)]
    port.command(0xD4, 0xF4)
    assert port.drain() == [(0xFA, True)]
    assert port.resets == 0


def test_keys_arrive_as_translated_set_1_with_an_irq_1_edge_each() -> None:
    port = Port()
    ctr = linux_controller_probe(port)
    atkbd_probe(port)
    port.irq1.clear()
    for code, down in ((0x2A, True), (0x1E, True), (0x1E, False), (0x2A, False), (0xE048, True), (0xE048, False)):
        assert port.dev.key(code, down)
    received = []
    while port.status() & STATUS_OBF:
        assert port.irq1[-1] is True
        received.append(port.data())
    assert received == [0x2A, 0x1E, 0x9E, 0xAA, 0xE0, 0x48, 0xE0, 0xC8]
    assert port.irq1[-1] is False and port.irq1.count(True) == len(received)
    assert port.dev.key(PAUSE_KEY, True) and not port.dev.key(PAUSE_KEY, False)
    assert port.bytes() == [0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5]
    # Untranslated (i8042.direct): the keyboard's own set 2, with F0 break prefixes.
    port.command(0x60, ctr & ~0x40)
    port.dev.key(0x1E, True)
    port.dev.key(0x1E, False)
    port.dev.key(0xE048, True)
    port.dev.key(0xE048, False)
    assert not port.dev.key(0xE048, False)  # not down: no release
    assert port.bytes() == [0x1C, 0xF0, 0x1C, 0xE0, 0x75, 0xE0, 0xF0, 0x75]
    # ... and set 1 when the guest asks for it.
    port.send(0xF0, 0x01)
    assert port.bytes() == [0xFA, 0xFA]
    port.send(0xF0, 0x00)
    assert port.bytes() == [0xFA, 0xFA, 0x01]
    port.dev.key(0x1E, True)
    assert port.bytes() == [0x1E]


def test_keys_wait_while_the_keyboard_is_off_and_a_burst_is_not_lost() -> None:
    port = Port()
    assert port.dev.key(0x1E, True)  # power-on: scanning, interface on
    assert port.bytes() == [0x1E]
    port.send(0xF5)  # disabled: keys are not scanned
    port.bytes()
    assert not port.dev.key(0x1F, True)
    port.send(0xF4)
    port.bytes()
    # A burst larger than a PS/2 buffer arrives whole, a byte at a time as the guest reads.
    for _ in range(40):
        port.dev.key(0x10, True)
        port.dev.key(0x10, False)
    assert port.bytes() == [0x10, 0x90] * 40
    # The queue is bounded, and keeps room for the release of every key that is down: a
    # press that could not be released is refused (and counted), a release never is.
    typed = 0
    while port.dev.key(0x11, True) and port.dev.key(0x11, False):
        typed += 1
    assert port.dev.key(0x12, True) or True  # (may or may not fit: either way ...)
    assert port.dev.keys_dropped > 0
    assert all(port.dev.key(code, True) is False for code in range(0x13, 0x20))  # full: refused
    pressed = [code for code in (0x12,) if code in port.dev._held]
    assert all(port.dev.key(code, False) for code in pressed)  # ... but what is down comes up
    received = port.bytes()
    assert received == [0x11, 0x91] * typed + [0x12, 0x92] * len(pressed)
    assert typed * 4 + 4 >= KEY_QUEUE_SIZE - 2  # set 2 in the queue: a press 1 byte, a release 2


def test_the_mouse_reports_motion_buttons_and_the_wheel() -> None:
    port = Port()
    linux_controller_probe(port)
    assert not port.dev.pointer(5, 5, 0)  # not enabled yet: nothing
    for rate in (200, 100, 80):
        port.command(0xD4, 0xF3)
        port.command(0xD4, rate)
    port.command(0xD4, 0xF4)
    port.drain()
    assert port.dev.pointer(5, -3, 0b001)  # right 5, up 3, left button
    assert port.drain() == [(0x09, True), (5, True), (3, True), (0, True)]
    assert port.dev.pointer(-300, 0, 0b100, wheel=-1)  # a long move: two packets; right button
    packets = [v for v, _ in port.drain()]
    assert packets[:4] == [0x08 | 0x02 | 0x10, 1, 0, 0xFF]  # -255 then -45, wheel up (-1)
    assert packets[4:] == [0x08 | 0x02 | 0x10, (-45) & 0xFF, 0, 0]
    assert port.irq12.count(True) >= 2


@given(st.lists(st.tuples(st.sampled_from([0, 4]), st.integers(0, 255)), max_size=40),
       st.lists(st.tuples(st.sampled_from(sorted(set(KEYSYMS.values()))), st.booleans()), max_size=40))  # fmt: skip
def test_saved_state_round_trips_with_keys_in_flight(ops: list[tuple[int, int]], keys: list[tuple[int, bool]]) -> None:
    port = Port()
    for offset, value in ops:
        if value == 0xFE and offset == 4:
            continue  # (the reset command)
        port.dev.write(offset, memoryview(bytes([value])))
    for code, down in keys:
        port.dev.key(code, down)
    saved = port.dev.save()
    copy = Port()
    copy.dev.restore(decode_state(I8042State, encode_state(saved), "i8042"))
    assert copy.dev.save() == saved
    assert copy.drain() == port.drain()  # the same bytes, keys included, from the same source


def test_restore_refuses_states_that_are_not_the_models() -> None:
    port = Port()
    good = port.dev.save()
    for bad in (attrs.evolve(good, aux_output=b"\0" * 17),
                attrs.evolve(good, keyboard=attrs.evolve(good.keyboard, keys=b"\0" * (KEY_QUEUE_SIZE + 1))),
                attrs.evolve(good, keyboard=attrs.evolve(good.keyboard, scancode_set=3)),
                attrs.evolve(good, mouse=attrs.evolve(good.mouse, pending=0x42)),
                attrs.evolve(good, pending_command=0xD5)):  # fmt: skip
        with pytest.raises(ValueError):
            port.dev.restore(bad)
        assert port.dev.save() == good


def test_scancode_tables_and_keysyms() -> None:
    for set1 in range(1, 0x80):
        assert SET2_TO_SET1[SET1_TO_SET2[set1]] == set1
    assert keysym_to_code(ord("a")) == keysym_to_code(ord("A")) == 0x1E
    assert keysym_to_code(ord("!")) == 0x02 and keysym_to_code(ord("~")) == 0x29
    assert keysym_to_code(0xFF0D) == 0x1C and keysym_to_code(0xFFE4) == 0xE01D
    assert keysym_to_code(0x20AC) is None  # the euro sign: no key on a US keyboard
    assert xt_to_code(0x1E) == 0x1E and xt_to_code(0xC8) == 0xE048 and xt_to_code(0x100) is None
