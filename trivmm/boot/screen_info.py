"""``struct screen_info`` (the first 64 bytes of the Linux zero page, ``boot_params``):
how a boot loader tells Linux about a linear framebuffer it set up.

trivmm announces its display (``trivmm.devices.display``) the way an EFI boot loader
announces the GOP framebuffer: ``orig_video_isVGA = VIDEO_TYPE_EFI``, the framebuffer's
base, size, geometry and pixel layout. Linux's sysfb then registers an ``efi-framebuffer``
platform device (or a ``simple-framebuffer`` where ``CONFIG_SYSFB_SIMPLEFB`` is set) for
efifb or simpledrm to drive, and fbcon draws its console there. Only the 64-bit boot
protocol carries a zero page: PVH's ``hvm_start_info`` has no screen_info.

Layout: ``include/uapi/linux/screen_info.h`` (packed).
"""

from __future__ import annotations

import struct

import attrs

__all__ = ["ScreenInfo", "SCREEN_INFO_SIZE", "VIDEO_TYPE_EFI", "VIDEO_CAPABILITY_64BIT_BASE",
           "VIDEO_CAPABILITY_SKIP_QUIRKS"]  # fmt: skip

SCREEN_INFO_SIZE = 0x40
VIDEO_TYPE_EFI = 0x70  # EFI graphic mode
VIDEO_CAPABILITY_SKIP_QUIRKS = 1 << 0  # no DMI-based efifb quirks (they are for real machines)
VIDEO_CAPABILITY_64BIT_BASE = 1 << 1  # ext_lfb_base holds bits 63:32 of the base

_OFFSETS = {  # field: (offset, struct format)
    "orig_video_isVGA": (0x0F, "<B"),
    "lfb_width": (0x12, "<H"),
    "lfb_height": (0x14, "<H"),
    "lfb_depth": (0x16, "<H"),
    "lfb_base": (0x18, "<I"),
    "lfb_size": (0x1C, "<I"),
    "lfb_linelength": (0x24, "<H"),
    "red_size": (0x26, "<B"),
    "red_pos": (0x27, "<B"),
    "green_size": (0x28, "<B"),
    "green_pos": (0x29, "<B"),
    "blue_size": (0x2A, "<B"),
    "blue_pos": (0x2B, "<B"),
    "rsvd_size": (0x2C, "<B"),
    "rsvd_pos": (0x2D, "<B"),
    "pages": (0x32, "<H"),
    "capabilities": (0x36, "<I"),
    "ext_lfb_base": (0x3A, "<I"),
}


def _u16(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 < value <= 0xFFFF:
        raise ValueError(f"screen_info {attribute.name} must be 1..65535, not {value}")


@attrs.frozen
class ScreenInfo:
    """A linear true-colour framebuffer at ``base`` (``size`` bytes, a page multiple),
    ``width`` x ``height`` pixels of ``depth`` bits, ``stride`` bytes a line. The channel
    layout defaults to XRGB8888 (blue in the lowest byte), what trivmm's display uses."""

    base: int
    size: int
    width: int = attrs.field(validator=_u16)
    height: int = attrs.field(validator=_u16)
    stride: int = attrs.field(validator=_u16)
    depth: int = 32
    red: tuple[int, int] = (8, 16)  # (size, position) in bits
    green: tuple[int, int] = (8, 8)
    blue: tuple[int, int] = (8, 0)
    reserved: tuple[int, int] = (8, 24)

    def __attrs_post_init__(self) -> None:
        if not 0 < self.base < 1 << 64 or self.base % 4096:
            raise ValueError(f"framebuffer base {self.base:#x} is not a page-aligned address")
        if not 0 < self.size <= 0xFFFF_FFFF or self.size < self.stride * self.height:
            raise ValueError(f"framebuffer size {self.size:#x} does not hold {self.height} lines of {self.stride}")

    def pack(self) -> bytes:
        """The 64 bytes of ``struct screen_info`` (offset 0 of the zero page)."""
        capabilities = VIDEO_CAPABILITY_SKIP_QUIRKS
        if self.base >> 32:
            capabilities |= VIDEO_CAPABILITY_64BIT_BASE
        values = {
            "orig_video_isVGA": VIDEO_TYPE_EFI, "lfb_width": self.width, "lfb_height": self.height,
            "lfb_depth": self.depth, "lfb_base": self.base & 0xFFFF_FFFF, "lfb_size": self.size,
            "lfb_linelength": self.stride, "red_size": self.red[0], "red_pos": self.red[1],
            "green_size": self.green[0], "green_pos": self.green[1], "blue_size": self.blue[0],
            "blue_pos": self.blue[1], "rsvd_size": self.reserved[0], "rsvd_pos": self.reserved[1],
            "pages": 1, "capabilities": capabilities, "ext_lfb_base": self.base >> 32,
        }  # fmt: skip
        page = bytearray(SCREEN_INFO_SIZE)
        for name, value in values.items():
            offset, fmt = _OFFSETS[name]
            struct.pack_into(fmt, page, offset, value)
        return bytes(page)
