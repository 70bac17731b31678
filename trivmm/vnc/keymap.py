"""X keysyms (what an RFB KeyEvent carries) -> PC scancodes (set 1 make codes, ``0xE0xx``
for E0-prefixed keys: what ``trivmm.devices.i8042.I8042.key`` takes), for a US keyboard.

A VNC client sends the keysym of the character a key produced with the modifiers it has
already sent (Shift down, then "A"), so a shifted character maps to its unshifted key:
the guest sees Shift and the key, as from a real keyboard. Clients that know the physical
key send QEMU's extended key event instead, whose XT code needs no table (``xt_to_code``).
"""

from __future__ import annotations

from trivmm.devices.i8042 import PAUSE_KEY

__all__ = ["KEYSYMS", "keysym_to_code", "xt_to_code"]


def _rows() -> dict[int, int]:
    keys: dict[int, int] = {}
    for first, plain, shifted in ((0x02, "1234567890-=", "!@#$%^&*()_+"),
                                  (0x10, "qwertyuiop[]", "QWERTYUIOP{}"),
                                  (0x1E, "asdfghjkl;'`", 'ASDFGHJKL:"~'),
                                  (0x2B, "\\zxcvbnm,./", "|ZXCVBNM<>?")):  # fmt: skip
        for offset, (a, b) in enumerate(zip(plain, shifted, strict=True)):
            keys[ord(a)] = keys[ord(b)] = first + offset
    keys[ord(" ")] = 0x39
    return keys


KEYSYMS: dict[int, int] = {
    **_rows(),
    0xFF08: 0x0E,  # BackSpace
    0xFF09: 0x0F,  # Tab
    0xFE20: 0x0F,  # ISO_Left_Tab (Shift+Tab)
    0xFF0D: 0x1C,  # Return
    0xFF1B: 0x01,  # Escape
    0xFFFF: 0xE053,  # Delete
    0xFF50: 0xE047,  # Home
    0xFF51: 0xE04B,  # Left
    0xFF52: 0xE048,  # Up
    0xFF53: 0xE04D,  # Right
    0xFF54: 0xE050,  # Down
    0xFF55: 0xE049,  # Page_Up
    0xFF56: 0xE051,  # Page_Down
    0xFF57: 0xE04F,  # End
    0xFF63: 0xE052,  # Insert
    0xFF67: 0xE05D,  # Menu
    0xFF61: 0xE037,  # Print
    0xFF13: PAUSE_KEY,  # Pause
    0xFF14: 0x46,  # Scroll_Lock
    0xFF15: 0x54,  # Sys_Req
    0xFF7F: 0x45,  # Num_Lock
    0xFF8D: 0xE01C,  # KP_Enter
    0xFF95: 0x47, 0xFF96: 0x4B, 0xFF97: 0x48, 0xFF98: 0x4D, 0xFF99: 0x50,  # KP_Home, Left, Up, Right, Down
    0xFF9A: 0x49, 0xFF9B: 0x51, 0xFF9C: 0x4F, 0xFF9D: 0x4C, 0xFF9E: 0x52, 0xFF9F: 0x53,  # KP_Prior ... KP_Delete
    0xFFAA: 0x37,  # KP_Multiply
    0xFFAB: 0x4E,  # KP_Add
    0xFFAD: 0x4A,  # KP_Subtract
    0xFFAE: 0x53,  # KP_Decimal
    0xFFAF: 0xE035,  # KP_Divide
    **{0xFFB0 + digit: code for digit, code in enumerate((0x52, 0x4F, 0x50, 0x51, 0x4B, 0x4C, 0x4D, 0x47, 0x48, 0x49))},
    **{0xFFBE + n: 0x3B + n for n in range(10)},  # F1..F10
    0xFFC8: 0x57,  # F11
    0xFFC9: 0x58,  # F12
    0xFFE1: 0x2A,  # Shift_L
    0xFFE2: 0x36,  # Shift_R
    0xFFE3: 0x1D,  # Control_L
    0xFFE4: 0xE01D,  # Control_R
    0xFFE5: 0x3A,  # Caps_Lock
    0xFFE7: 0xE05B,  # Meta_L
    0xFFE8: 0xE05C,  # Meta_R
    0xFFE9: 0x38,  # Alt_L
    0xFFEA: 0xE038,  # Alt_R
    0xFE03: 0xE038,  # ISO_Level3_Shift (AltGr)
    0xFFEB: 0xE05B,  # Super_L
    0xFFEC: 0xE05C,  # Super_R
}  # fmt: skip


def keysym_to_code(keysym: int) -> int | None:
    """The key that types ``keysym`` on a US keyboard, or None."""
    return KEYSYMS.get(keysym)


def xt_to_code(keycode: int) -> int | None:
    """A QEMU extended key event's XT keycode (0x80 set: E0-prefixed) -> a ``key()`` code."""
    if 0 < keycode < 0x80:
        return keycode
    if keycode == 0xC6:  # QEMU's number for Pause
        return PAUSE_KEY
    if 0x80 < keycode < 0x100:
        return 0xE000 | keycode & 0x7F
    return None
