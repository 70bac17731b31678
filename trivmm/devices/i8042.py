"""An i8042 keyboard controller (PIO 0x60/0x64) with a PS/2 keyboard and mouse behind it.

What a guest sees, as on a PC:

* the controller: status and command registers at 0x64, the data port at 0x60, the
  controller configuration byte (CTR), self tests, the AUX loopback and the "write to AUX
  device" commands Linux's i8042 driver uses to probe, and 0xFE (pulse the reset line),
  which ends the VM with "reset";
* a PS/2 keyboard on the first port (IRQ 1) that answers what atkbd sends at probe
  (reset, get ID, LEDs, typematic rate, scancode set, enable/disable) and types what the
  host presses (``key``): scancode set 2, translated to set 1 by the controller while the
  CTR's translation bit is on (as firmware leaves it and Linux keeps it), set 1 if the
  guest asks for it;
* a PS/2 mouse on the AUX port (IRQ 12): a standard three-button mouse that becomes an
  IntelliMouse with a wheel after the usual sample-rate knock (200, 100, 80), in stream
  mode; ``pointer`` feeds it relative motion.

Bounds: the bytes waiting for the guest in each port sit in a FIFO of ``OUTPUT_FIFO_SIZE``
bytes (a PS/2 device buffers 16): a guest that sends commands without reading the answers
loses the answers that do not fit (counted in ``dropped``, logged). Host key presses wait in
a FIFO of ``KEY_QUEUE_SIZE`` bytes and move to the controller one byte at a time, as the
guest reads them, so a burst of typing (a VNC client pasting) is not lost to the 16-byte
buffer; what does not fit there is dropped and counted (``keys_dropped``), a press before
its release. Interrupt lines change under the device's lock, so two vCPUs (or a vCPU and a
host-side typist) cannot apply their edges out of order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import attrs

from trivmm.devices.fifo import ByteFifo, DropCounter

__all__ = ["I8042", "I8042State", "KeyboardState", "MouseState", "I8042_DATA_PORT", "I8042_COMMAND_PORT",
           "KEYBOARD_IRQ", "MOUSE_IRQ", "OUTPUT_FIFO_SIZE", "KEY_QUEUE_SIZE", "SET1_TO_SET2", "SET2_TO_SET1",
           "PAUSE_KEY"]  # fmt: skip

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # the device spans 0x60..0x64; offsets 1..3 are unused
KEYBOARD_IRQ = 1
MOUSE_IRQ = 12
OUTPUT_FIFO_SIZE = 16
KEY_QUEUE_SIZE = 256
PAUSE_KEY = 0xE11D  # ``key()``'s code for Pause (set 1: E1 1D 45 E1 9D C5, make only)
_MAX_HELD = 16  # keys down at once (a PC keyboard rolls over at far fewer)
_log = logging.getLogger(__name__)

_STATUS_OBF = 0x01
_STATUS_SYS = 0x04
_STATUS_CMD = 0x08
_STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the keylock switch
_STATUS_AUXDATA = 0x20  # the byte in the output buffer came from the AUX port

_CTR_KBD_INT = 0x01
_CTR_AUX_INT = 0x02
_CTR_SYS = 0x04
_CTR_KBD_DISABLE = 0x10
_CTR_AUX_DISABLE = 0x20
_CTR_XLATE = 0x40

_CMD_READ_CTR = 0x20
_CMD_WRITE_CTR = 0x60
_CMD_AUX_DISABLE = 0xA7
_CMD_AUX_ENABLE = 0xA8
_CMD_AUX_TEST = 0xA9
_CMD_SELF_TEST = 0xAA
_CMD_KBD_TEST = 0xAB
_CMD_KBD_DISABLE = 0xAD
_CMD_KBD_ENABLE = 0xAE
_CMD_READ_OUTPUT_PORT = 0xD0
_CMD_WRITE_OUTPUT_PORT = 0xD1
_CMD_KBD_LOOP = 0xD2  # next data byte: into the output buffer as if the keyboard sent it
_CMD_AUX_LOOP = 0xD3  # next data byte: into the output buffer as if the mouse sent it
_CMD_AUX_SEND = 0xD4  # next data byte: to the mouse
_CMD_RESET_CPU = 0xFE

# Controller commands whose next data-port byte is their parameter (0: none pending).
_COMMANDS_WITH_DATA = (0, _CMD_WRITE_CTR, _CMD_WRITE_OUTPUT_PORT, _CMD_KBD_LOOP, _CMD_AUX_LOOP, _CMD_AUX_SEND)

_ACK = 0xFA
_RESEND = 0xFE
_BAT_OK = 0xAA

_KBD_SET_LEDS = 0xED
_KBD_ECHO = 0xEE
_KBD_SCANCODE_SET = 0xF0
_KBD_GET_ID = 0xF2
_KBD_TYPEMATIC = 0xF3
_KBD_ENABLE = 0xF4
_KBD_DISABLE = 0xF5  # and restore defaults
_KBD_DEFAULTS = 0xF6
_KBD_RESEND = 0xFE
_KBD_RESET = 0xFF
_KBD_WITH_PARAMETER = (0, _KBD_SET_LEDS, _KBD_SCANCODE_SET, _KBD_TYPEMATIC)

_MOUSE_SET_SCALING_1_1 = 0xE6
_MOUSE_SET_SCALING_2_1 = 0xE7
_MOUSE_SET_RESOLUTION = 0xE8
_MOUSE_STATUS = 0xE9
_MOUSE_STREAM_MODE = 0xEA
_MOUSE_READ_DATA = 0xEB
_MOUSE_RESET_WRAP = 0xEC
_MOUSE_WRAP_MODE = 0xEE
_MOUSE_REMOTE_MODE = 0xF0
_MOUSE_GET_ID = 0xF2
_MOUSE_SAMPLE_RATE = 0xF3
_MOUSE_ENABLE = 0xF4
_MOUSE_DISABLE = 0xF5
_MOUSE_DEFAULTS = 0xF6
_MOUSE_RESET = 0xFF
_MOUSE_WITH_PARAMETER = (0, _MOUSE_SET_RESOLUTION, _MOUSE_SAMPLE_RATE)
_INTELLIMOUSE_KNOCK = (200, 100, 80)
_MOUSE_ID, _INTELLIMOUSE_ID = 0x00, 0x03

# Scancode set 1 (index: the make code) -> set 2, as the keyboard sends them; the 8042's
# translation is the inverse. F7 is 0x83 in set 2, beyond the table's 7-bit index space.
SET1_TO_SET2 = bytes([
    0x00, 0x76, 0x16, 0x1E, 0x26, 0x25, 0x2E, 0x36, 0x3D, 0x3E, 0x46, 0x45, 0x4E, 0x55, 0x66, 0x0D,
    0x15, 0x1D, 0x24, 0x2D, 0x2C, 0x35, 0x3C, 0x43, 0x44, 0x4D, 0x54, 0x5B, 0x5A, 0x14, 0x1C, 0x1B,
    0x23, 0x2B, 0x34, 0x33, 0x3B, 0x42, 0x4B, 0x4C, 0x52, 0x0E, 0x12, 0x5D, 0x1A, 0x22, 0x21, 0x2A,
    0x32, 0x31, 0x3A, 0x41, 0x49, 0x4A, 0x59, 0x7C, 0x11, 0x29, 0x58, 0x05, 0x06, 0x04, 0x0C, 0x03,
    0x0B, 0x83, 0x0A, 0x01, 0x09, 0x77, 0x7E, 0x6C, 0x75, 0x7D, 0x7B, 0x6B, 0x73, 0x74, 0x79, 0x69,
    0x72, 0x7A, 0x70, 0x71, 0x7F, 0x60, 0x61, 0x78, 0x07, 0x0F, 0x17, 0x1F, 0x27, 0x2F, 0x37, 0x3F,
    0x47, 0x4F, 0x56, 0x5E, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40, 0x48, 0x50, 0x57, 0x6F,
    0x13, 0x19, 0x39, 0x51, 0x53, 0x5C, 0x5F, 0x62, 0x63, 0x64, 0x65, 0x67, 0x68, 0x6A, 0x6D, 0x6E,
])  # fmt: skip


def _translation() -> bytes:
    table = bytearray(range(256))  # bytes at and above 0x80 (prefixes, answers) pass unchanged
    table[0] = 0xFF  # a set-2 "key detection error" is set 1's
    for set1, set2 in enumerate(SET1_TO_SET2):
        if set1:
            table[set2] = set1
    table[0x02] = 0x41  # the old F7 code some keyboards send
    return bytes(table)


SET2_TO_SET1 = _translation()  # the 8042's translation (CTR bit 6), byte by byte


@attrs.frozen
class KeyboardState:
    """The PS/2 keyboard: scanning on or off, scancode set, the command awaiting its
    parameter, the LEDs, and a set-2 break prefix the controller has translated away."""

    scanning: bool = True
    scancode_set: int = 2
    pending: int = 0
    leds: int = 0
    break_prefix: bool = False
    keys: bytes = b""  # pressed keys' bytes not yet in the controller's output buffer
    held: tuple[int, ...] = ()  # keys the host pressed and has not released (``I8042.key`` codes)


@attrs.frozen
class MouseState:
    """The PS/2 mouse: reporting, remote mode, rate, resolution, scaling, the command
    awaiting its parameter, the last sample rates (the IntelliMouse knock), the wheel,
    and the button state last reported."""

    reporting: bool = False
    remote: bool = False
    sample_rate: int = 100
    resolution: int = 2
    scaling_2_1: bool = False
    pending: int = 0
    rates: tuple[int, ...] = ()
    wheel: bool = False
    buttons: int = 0


@attrs.frozen
class I8042State:
    """The controller's registers, the bytes waiting for the guest in each port, the IRQ 1
    and IRQ 12 levels, and the two devices."""

    ctr: int
    status: int
    output: bytes
    pending_command: int
    line: bool
    aux_output: bytes = b""
    aux_line: bool = False
    keyboard: KeyboardState = KeyboardState()
    mouse: MouseState = MouseState()


class I8042:
    """The controller at 0x60 (offset 0) and 0x64 (offset 4). ``irq`` drives IRQ 1,
    ``aux_irq`` (if given) IRQ 12; ``reset`` is called for the reset command."""

    def __init__(self, reset: Callable[[], None], irq: Callable[[bool], None],
                 aux_irq: Callable[[bool], None] | None = None) -> None:  # fmt: skip
        self._reset = reset
        self._irq = irq
        self._aux_irq = aux_irq
        self._lock = threading.Lock()
        self._ctr = _CTR_KBD_INT | _CTR_SYS | _CTR_AUX_DISABLE | _CTR_XLATE
        self._status = _STATUS_SYS | _STATUS_UNLOCKED
        self._out = ByteFifo(OUTPUT_FIFO_SIZE, DropCounter(_log, "i8042 output FIFO"))
        self._aux = ByteFifo(OUTPUT_FIFO_SIZE, DropCounter(_log, "i8042 AUX output FIFO"))
        self._key_drops = DropCounter(_log, "i8042 key queue")
        self._keys = ByteFifo(KEY_QUEUE_SIZE, self._key_drops)
        self._pending_command = 0
        self._line = False
        self._aux_line = False
        self._kbd = KeyboardState()
        self._mouse = MouseState()
        self._motion = [0, 0, 0]  # host motion not yet reported: dx, dy (up is positive), wheel
        self._held: set[int] = set()  # keys down (host side), whose releases have room kept

    @property
    def dropped(self) -> int:
        """Answer bytes lost because the guest did not read them and a FIFO was full."""
        with self._lock:
            return self._out.dropped + self._aux.dropped

    @property
    def keys_dropped(self) -> int:
        """Key bytes the host pressed that were lost: the guest did not read them in time."""
        with self._lock:
            return self._keys.dropped

    # --- the guest's side -------------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            if offset == 0:
                byte = self._out.pop()
                if byte is None:
                    byte = self._aux.pop()
                value = 0 if byte is None else byte
                self._feed_keys()
                self._feed_motion()
                # Each byte read ends its interrupt; the next byte, if any, raises a new edge.
                self._set_lines(False, False)
                self._update_lines()
            elif offset == 4:
                value = self._status
                if self._out:
                    value |= _STATUS_OBF
                elif self._aux:
                    value |= _STATUS_OBF | _STATUS_AUXDATA
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
            if not reset:
                self._feed_keys()
                self._update_lines()
        if reset:
            self._reset()

    def _update_lines(self) -> None:
        """Raise the line of the port whose byte is next, if its interrupt is enabled."""
        self._set_lines(bool(self._out) and bool(self._ctr & _CTR_KBD_INT),
                        not self._out and bool(self._aux) and bool(self._ctr & _CTR_AUX_INT))  # fmt: skip

    def _set_lines(self, keyboard: bool, aux: bool) -> None:
        """Change the interrupt lines (with the lock held); no call when unchanged."""
        if keyboard != self._line:
            self._line = keyboard
            self._irq(keyboard)
        if aux != self._aux_line:
            self._aux_line = aux
            if self._aux_irq is not None:
                self._aux_irq(aux)

    def _command(self, command: int) -> bool:
        self._pending_command = 0
        if command == _CMD_READ_CTR:
            self._answer(self._ctr)
        elif command in _COMMANDS_WITH_DATA:
            self._pending_command = command
        elif command == _CMD_AUX_DISABLE:
            self._ctr |= _CTR_AUX_DISABLE
        elif command == _CMD_AUX_ENABLE:
            self._ctr &= ~_CTR_AUX_DISABLE
        elif command == _CMD_AUX_TEST:
            self._answer(0x00)  # no clock or data line stuck
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
        elif pending == _CMD_KBD_LOOP:
            self._answer(value)
        elif pending == _CMD_AUX_LOOP:
            self._aux_answer(value)
        elif pending == _CMD_AUX_SEND:
            self._mouse_command(value)
        else:
            self._keyboard_command(value)

    def _answer(self, *values: int) -> None:
        self._out.push(bytes(values), "the guest sent commands without reading their answers")

    def _aux_answer(self, *values: int) -> None:
        self._aux.push(bytes(values), "the guest sent mouse commands without reading their answers")

    # --- the keyboard -----------------------------------------------------------------------
    def _keyboard_answer(self, *values: int) -> None:
        """Bytes from the keyboard: translated to set 1 by the controller while the CTR says so."""
        if self._ctr & _CTR_XLATE:
            values = tuple(SET2_TO_SET1[v] for v in values)
        self._answer(*values)

    def _keyboard_command(self, value: int) -> None:
        kbd = self._kbd
        pending = kbd.pending
        if pending == _KBD_SET_LEDS:
            self._kbd = attrs.evolve(kbd, pending=0, leds=value & 0x07)
            self._keyboard_answer(_ACK)
        elif pending == _KBD_TYPEMATIC:
            self._kbd = attrs.evolve(kbd, pending=0)
            self._keyboard_answer(_ACK)
        elif pending == _KBD_SCANCODE_SET:
            self._kbd = attrs.evolve(kbd, pending=0)
            if value == 0:
                self._keyboard_answer(_ACK, kbd.scancode_set)  # 1 or 2 (0x43, 0x41 once translated)
            elif value in (1, 2):
                self._kbd = attrs.evolve(self._kbd, scancode_set=value, keys=b"")
                self._clear_keys()
                self._keyboard_answer(_ACK)
            else:
                self._keyboard_answer(_RESEND)  # set 3 is not offered
        elif value in (_KBD_SET_LEDS, _KBD_TYPEMATIC, _KBD_SCANCODE_SET):
            self._kbd = attrs.evolve(kbd, pending=value)
            self._keyboard_answer(_ACK)
        elif value == _KBD_ECHO:
            self._keyboard_answer(_KBD_ECHO)
        elif value == _KBD_GET_ID:
            self._keyboard_answer(_ACK, 0xAB, 0x83)  # MF2 keyboard (0xAB 0x41 once translated)
        elif value == _KBD_ENABLE:
            self._clear_keys()
            self._kbd = attrs.evolve(kbd, scanning=True)
            self._keyboard_answer(_ACK)
        elif value in (_KBD_DISABLE, _KBD_DEFAULTS):
            self._clear_keys()
            self._kbd = attrs.evolve(kbd, scanning=kbd.scanning and value == _KBD_DEFAULTS, leds=0)
            self._keyboard_answer(_ACK)
        elif value == _KBD_RESET:
            self._clear_keys()
            self._kbd = KeyboardState()
            self._keyboard_answer(_ACK, _BAT_OK)
        elif 0xF7 <= value <= 0xFD:  # set-3 key modes: accepted, meaningless in set 2
            self._keyboard_answer(_ACK)
        elif value == _KBD_RESEND:
            self._keyboard_answer(_ACK)
        else:
            self._keyboard_answer(_RESEND)

    def _clear_keys(self) -> None:
        """The keyboard's buffer emptied (reset, enable, disable, a new set): nothing is down."""
        self._keys.clear()
        self._held.clear()

    def _feed_keys(self) -> None:
        """Move the next pressed key's byte into the output buffer when it is empty (the
        keyboard clocks a byte out once the controller has room) and the interface is on."""
        if self._out or self._aux or not self._keys or self._ctr & _CTR_KBD_DISABLE:
            return
        translate = bool(self._ctr & _CTR_XLATE)
        while (byte := self._keys.pop()) is not None:
            if translate:
                if byte == 0xF0:  # set 2's break prefix: translated into bit 7 of the next code
                    self._kbd = attrs.evolve(self._kbd, break_prefix=True)
                    continue
                if byte not in (0xE0, 0xE1):  # prefixes pass unchanged
                    byte = SET2_TO_SET1[byte] | (0x80 if self._kbd.break_prefix else 0)
                    self._kbd = attrs.evolve(self._kbd, break_prefix=False)
            self._out.push(bytes([byte]))
            return

    # --- the mouse ----------------------------------------------------------------------------
    def _mouse_command(self, value: int) -> None:
        mouse = self._mouse
        if mouse.pending == _MOUSE_SAMPLE_RATE:
            rates = (*mouse.rates, value)[-3:]
            self._mouse = attrs.evolve(mouse, pending=0, sample_rate=value, rates=rates,
                                       wheel=mouse.wheel or rates == _INTELLIMOUSE_KNOCK)  # fmt: skip
            self._aux_answer(_ACK)
        elif mouse.pending == _MOUSE_SET_RESOLUTION:
            self._mouse = attrs.evolve(mouse, pending=0, resolution=value & 0x03)
            self._aux_answer(_ACK)
        elif value in (_MOUSE_SAMPLE_RATE, _MOUSE_SET_RESOLUTION):
            self._mouse = attrs.evolve(mouse, pending=value)
            self._aux_answer(_ACK)
        elif value == _MOUSE_RESET:
            self._mouse = MouseState()
            self._motion = [0, 0, 0]
            self._aux.clear()
            self._aux_answer(_ACK, _BAT_OK, _MOUSE_ID)
        elif value == _MOUSE_GET_ID:
            self._aux_answer(_ACK, _INTELLIMOUSE_ID if mouse.wheel else _MOUSE_ID)
        elif value == _MOUSE_STATUS:
            status = (0x40 if mouse.remote else 0) | (0x20 if mouse.reporting else 0) | \
                     (0x10 if mouse.scaling_2_1 else 0) | _mouse_buttons(mouse.buttons)  # fmt: skip
            self._aux_answer(_ACK, status, mouse.resolution, mouse.sample_rate)
        elif value in (_MOUSE_ENABLE, _MOUSE_DISABLE, _MOUSE_DEFAULTS):
            self._motion = [0, 0, 0]
            if value == _MOUSE_ENABLE:
                self._mouse = attrs.evolve(mouse, reporting=True)
            else:
                self._mouse = attrs.evolve(MouseState(), wheel=mouse.wheel, buttons=mouse.buttons)
            self._aux_answer(_ACK)
        elif value == _MOUSE_READ_DATA:
            self._aux_answer(_ACK)
            self._aux_answer(*self._packet())
        elif value in (_MOUSE_STREAM_MODE, _MOUSE_REMOTE_MODE):
            self._motion = [0, 0, 0]
            self._mouse = attrs.evolve(mouse, remote=value == _MOUSE_REMOTE_MODE)
            self._aux_answer(_ACK)
        elif value in (_MOUSE_SET_SCALING_1_1, _MOUSE_SET_SCALING_2_1):
            self._mouse = attrs.evolve(mouse, scaling_2_1=value == _MOUSE_SET_SCALING_2_1)
            self._aux_answer(_ACK)
        elif value in (_MOUSE_WRAP_MODE, _MOUSE_RESET_WRAP):  # echo mode: not modelled, acknowledged
            self._aux_answer(_ACK)
        else:
            self._aux_answer(_RESEND)

    def _feed_motion(self) -> None:
        """Motion the AUX buffer had no room for goes out once the guest has read it empty."""
        mouse = self._mouse
        if not self._aux and any(self._motion) and mouse.reporting and not mouse.remote:
            self._aux_answer(*self._packet())

    def _packet(self) -> bytes:
        """One movement packet from the motion not yet reported (at most 255 a packet)."""
        dx, dy, dz = (max(-255, min(255, v)) for v in self._motion)
        dz = max(-8, min(7, dz))
        self._motion = [self._motion[0] - dx, self._motion[1] - dy, self._motion[2] - dz]
        buttons = self._mouse.buttons
        first = 0x08 | _mouse_buttons(buttons) | (0x10 if dx < 0 else 0) | (0x20 if dy < 0 else 0)
        packet = bytes([first, dx & 0xFF, dy & 0xFF])
        if self._mouse.wheel:
            packet += bytes([dz & 0xFF])  # IntelliMouse: a signed byte (negative: up)
        return packet

    # --- the host's side --------------------------------------------------------------------
    def key(self, code: int, down: bool) -> bool:
        """Press (``down``) or release the key whose scancode set 1 make code is ``code``:
        0x01..0x7F, ``0xE000 | c`` for an E0-prefixed key, ``PAUSE_KEY``. Returns False
        if it was dropped: the keyboard is disabled or the guest has not read what came
        before. Thread-safe; called on the host side (the VNC server)."""
        with self._lock:
            sequence = _scancodes(code, down, self._kbd.scancode_set)
            if len(self._held) >= _MAX_HELD and down and code not in self._held:
                return False
            if not sequence or not self._kbd.scanning or self._ctr & _CTR_KBD_DISABLE:
                return False
            # Room is kept for the release of every key that is down: a key the guest saw go
            # down always comes up. A release of a key whose press was dropped is dropped too.
            held = self._held
            if down:
                reserved = sum(len(_scancodes(c, False, self._kbd.scancode_set)) for c in held | {code})
                if self._keys.room < len(sequence) + reserved:
                    self._key_drops.add(len(sequence), "the guest did not read the keys typed before")
                    return False
                if code != PAUSE_KEY:
                    held.add(code)
            elif code in held:
                held.discard(code)
            else:
                return False
            self._keys.push(sequence)
            self._feed_keys()
            self._update_lines()
        return True

    def pointer(self, dx: int, dy: int, buttons: int, wheel: int = 0) -> bool:
        """Move the mouse by ``dx`` (right) and ``dy`` (down) with ``buttons`` held (bit 0
        left, 1 middle, 2 right) and the wheel by ``wheel`` notches (negative: up). Returns
        False if the guest has not enabled the mouse or its buffer is full."""
        with self._lock:
            mouse = self._mouse
            if not mouse.reporting or mouse.remote or self._ctr & _CTR_AUX_DISABLE:
                return False
            self._motion[0] = max(-4096, min(4096, self._motion[0] + dx))
            self._motion[1] = max(-4096, min(4096, self._motion[1] - dy))  # PS/2: up is positive
            self._motion[2] = max(-64, min(64, self._motion[2] + (wheel if mouse.wheel else 0)))
            changed = buttons & 0x07 != mouse.buttons
            self._mouse = attrs.evolve(mouse, buttons=buttons & 0x07)
            sent = False
            while (changed or any(self._motion)) and self._aux.room >= 4:
                self._aux_answer(*self._packet())
                changed, sent = False, True
            self._update_lines()
        return sent

    # --- saved state --------------------------------------------------------------------------
    def save(self) -> I8042State:
        with self._lock:
            keyboard = attrs.evolve(self._kbd, keys=self._keys.peek_all(), held=tuple(sorted(self._held)))
            return I8042State(self._ctr, self._status, self._out.peek_all(), self._pending_command, self._line,
                              self._aux.peek_all(), self._aux_line, keyboard, self._mouse)  # fmt: skip

    def restore(self, state: I8042State) -> None:
        """Take ``state`` (``ValueError`` if it could not come from this model; then nothing
        changes). A raised line is raised again (KVM does not keep line levels)."""
        if len(state.output) > OUTPUT_FIFO_SIZE:
            raise ValueError(f"saved i8042 output holds {len(state.output)} bytes, more than {OUTPUT_FIFO_SIZE}")
        if len(state.aux_output) > OUTPUT_FIFO_SIZE:
            raise ValueError(f"saved i8042 AUX output holds {len(state.aux_output)} bytes, more than "
                             f"{OUTPUT_FIFO_SIZE}")  # fmt: skip
        if state.pending_command not in _COMMANDS_WITH_DATA:
            raise ValueError(f"saved i8042 pending command {state.pending_command:#x} takes no data byte")
        if not (0 <= state.ctr <= 0xFF and 0 <= state.status <= 0xFF):
            raise ValueError("saved i8042 registers are not bytes")
        kbd, mouse = state.keyboard, state.mouse
        if len(kbd.keys) > KEY_QUEUE_SIZE or kbd.scancode_set not in (1, 2) or kbd.pending not in _KBD_WITH_PARAMETER \
                or not 0 <= kbd.leds <= 7 or len(kbd.held) > len(set(kbd.held)) \
                or not all(_scancodes(code, False, 2) for code in kbd.held):  # fmt: skip
            raise ValueError("saved i8042 keyboard state is not this model's")
        if mouse.pending not in _MOUSE_WITH_PARAMETER or not 0 <= mouse.sample_rate <= 0xFF \
                or not 0 <= mouse.resolution <= 3 or not 0 <= mouse.buttons <= 7 or len(mouse.rates) > 3 \
                or not all(0 <= rate <= 0xFF for rate in mouse.rates):  # fmt: skip
            raise ValueError("saved i8042 mouse state is not this model's")
        with self._lock:
            self._ctr, self._status, self._pending_command = state.ctr, state.status, state.pending_command
            self._out.clear()
            self._out.push(state.output)
            self._aux.clear()
            self._aux.push(state.aux_output)
            self._clear_keys()
            self._keys.push(kbd.keys)
            self._held = set(kbd.held)
            self._kbd = attrs.evolve(kbd, keys=b"", held=())
            self._mouse = mouse
            self._motion = [0, 0, 0]
            self._set_lines(state.line, state.aux_line)


def _mouse_buttons(buttons: int) -> int:
    """RFB/trivmm button bits (left 1, middle 2, right 4) -> a PS/2 packet's (left 1, right 2, middle 4)."""
    return (buttons & 1) | (2 if buttons & 4 else 0) | (4 if buttons & 2 else 0)


def _scancodes(code: int, down: bool, scancode_set: int) -> bytes:
    """The bytes a keyboard in ``scancode_set`` sends for ``code`` (see ``I8042.key``);
    empty for a code it does not have."""
    if code == PAUSE_KEY:
        if not down:
            return b""  # Pause has no break code
        return b"\xe1\x1d\x45\xe1\x9d\xc5" if scancode_set == 1 else b"\xe1\x14\x77\xe1\xf0\x14\xf0\x77"
    prefix = b""
    if code >> 8 == 0xE0:
        prefix, code = b"\xe0", code & 0xFF
    elif code >> 8:
        return b""
    if not 0 < code < 0x80:
        return b""
    if scancode_set == 1:
        return prefix + bytes([code | (0 if down else 0x80)])
    return prefix + (b"" if down else b"\xf0") + bytes([SET1_TO_SET2[code]])
