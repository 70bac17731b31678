"""The display device without KVM: change tracking (pages -> rows -> rectangles against a
shadow), bounded damage, its announcement in the zero page (``screen_info``), and how a
display picks the boot protocol; the configuration's checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_boot import fake_bzimage, fake_elf, pvh_note, with_size
from trivmm.boot import layout
from trivmm.boot.loader import BootProtocol, load_kernel
from trivmm.boot.screen_info import VIDEO_CAPABILITY_64BIT_BASE, VIDEO_TYPE_EFI, ScreenInfo
from trivmm.config import VmConfig
from trivmm.devices.display import MAX_DAMAGE_RECTS, Damage, Display, Rect, _changed_columns, parse_display
from trivmm.errors import ConfigError
from trivmm.memory import GuestMemory


@pytest.fixture
def display() -> Display:
    screen = Display(100, 60)
    yield screen
    screen.close()


def test_host_writes_are_found_as_the_rectangles_that_changed(display: Display) -> None:
    assert display.refresh() == [] and display.scans == 0  # nothing written: nothing read
    damage = display.watch()
    display.write((7 * 100 + 10) * 4, b"\x01\x02\x03\x00" * 3)  # row 7, x 10..12
    display.write((8 * 100 + 11) * 4, b"\x04\x05\x06\x00")  # row 8, x 11
    display.write((40 * 100) * 4, b"\x00" * 400)  # row 40: written, but unchanged
    assert display.refresh() == [Rect(10, 7, 3, 2)]
    assert display.scans == 1 and damage.take() == [Rect(10, 7, 3, 2)]
    assert display.refresh() == [] and display.scans == 1
    display.write(0, bytes(range(256)) * 10)  # rows 0..6: a changed prefix
    assert display.refresh() == [Rect(0, 0, 100, 7)]  # a run of changed rows: one rectangle
    assert display.read(Rect(0, 0, 2, 1)) == bytes(range(8))
    assert damage.take() == [Rect(0, 0, 100, 7)]
    display.unwatch(damage)
    display.write(0, b"\xff" * 4)
    display.refresh()
    assert not damage


@given(st.integers(1, 300), st.lists(st.tuples(st.integers(0, 299), st.integers(0, 3), st.integers(1, 255)),
                                     min_size=1, max_size=6))  # fmt: skip
def test_changed_columns_are_exact(width: int, changes: list[tuple[int, int, int]]) -> None:
    stride = width * 4
    shadow = bytearray(stride)
    row = bytearray(stride)
    changed = set()
    for pixel, byte, value in changes:
        if pixel < width:
            row[pixel * 4 + byte] = value
            changed.add(pixel)
    if not changed:
        return
    assert _changed_columns(bytes(row), shadow, 0, stride) == (min(changed), max(changed) + 1)


def test_damage_merges_and_stays_bounded() -> None:
    damage = Damage(Rect(0, 0, 1000, 1000))
    for y in range(10):
        damage.add(Rect(0, y, 80, 1))  # fbcon's rows of one text line
    assert damage.take() == [Rect(0, 0, 80, 10)]
    for i in range(200):  # scattered dots
        damage.add(Rect((i * 37) % 990, (i * 91) % 990, 2, 2))
    rects = damage.take()
    assert 1 <= len(rects) <= MAX_DAMAGE_RECTS
    damage.add(Rect(990, 990, 50, 50))  # clipped to the screen
    assert damage.take() == [Rect(990, 990, 10, 10)]
    damage.add(Rect(5, 5, 1, 1))
    damage.add_all()
    assert damage.take() == [Rect(0, 0, 1000, 1000)]


def test_sizes_and_the_slot() -> None:
    assert parse_display("1024x768") == (1024, 768) and parse_display(" 640X480 ") == (640, 480)
    for bad in ("1024", "0x0", "8x8", "9000x100", "8192x8192", "axb"):
        with pytest.raises(ValueError):
            parse_display(bad)
    screen = Display(1024, 768)
    try:
        assert screen.size == 3 << 20 and screen.size % (64 * 4096) == 0  # whole words of dirty bitmap
        assert screen.base == layout.FRAMEBUFFER_BASE and screen.base + screen.size <= layout.FRAMEBUFFER_LIMIT
        assert layout.FRAMEBUFFER_BASE >= layout.PCI_ECAM_BASE + (256 << 20)  # beyond every ECAM bus
        assert layout.FRAMEBUFFER_LIMIT <= layout.IOAPIC_ADDRESS
    finally:
        screen.close()
    assert screen.closed and screen.read(Rect(0, 0, 1, 1)) == bytes(4) and screen.collect() is None


def test_screen_info_is_linuxs_struct() -> None:
    info = ScreenInfo(base=0xF400_0000, size=3 << 20, width=1024, height=768, stride=4096).pack()
    assert len(info) == 0x40
    assert info[0x0F] == VIDEO_TYPE_EFI
    assert struct.unpack_from("<HHHIIHH", info, 0x12)[:5] == (1024, 768, 32, 0xF400_0000, 3 << 20)
    assert struct.unpack_from("<H", info, 0x24)[0] == 4096  # lfb_linelength
    assert tuple(info[0x26:0x2E]) == (8, 16, 8, 8, 8, 0, 8, 24)  # red, green, blue, reserved: size, position
    high = ScreenInfo(base=0x1_2000_0000, size=4096, width=16, height=16, stride=64).pack()
    assert struct.unpack_from("<I", high, 0x18)[0] == 0x2000_0000 and struct.unpack_from("<I", high, 0x3A)[0] == 1
    assert struct.unpack_from("<I", high, 0x36)[0] & VIDEO_CAPABILITY_64BIT_BASE
    with pytest.raises(ValueError):
        ScreenInfo(base=0xF400_0000, size=4096, width=1024, height=768, stride=4096)  # too small


LINUX_NOTE = struct.pack("<III6s2xI", 6, 4, 1, b"Linux\0", 0)


@pytest.mark.parametrize(("notes", "protocol", "expected"), [
    (pvh_note(0x100000) + LINUX_NOTE, "auto", BootProtocol.LINUX64),  # Linux: by linux64, screen_info in hand
    (pvh_note(0x100000), "auto", BootProtocol.PVH),  # not Linux: as without a display
    (pvh_note(0x100000) + LINUX_NOTE, "linux64", BootProtocol.LINUX64),
    (b"", "auto", BootProtocol.LINUX64),
])  # fmt: skip
def test_a_display_is_announced_in_the_zero_page(notes: bytes, protocol: str, expected: BootProtocol) -> None:
    memory = GuestMemory.from_ranges(layout.ram_ranges(64 << 20))
    try:
        screen = ScreenInfo(base=0xF400_0000, size=3 << 20, width=1024, height=768, stride=4096)
        entry = load_kernel(memory, fake_elf(notes=notes), protocol=protocol, screen=screen)
        assert entry.protocol is expected
        if expected is BootProtocol.LINUX64:
            assert memory.read(layout.ZERO_PAGE, 0x40) == screen.pack()
        plain = load_kernel(memory, fake_elf(notes=notes), protocol=protocol)  # no display: as before
        assert plain.protocol is (BootProtocol.PVH if notes and protocol == "auto" else BootProtocol.LINUX64)
        if plain.protocol is BootProtocol.LINUX64:
            assert memory.read(layout.ZERO_PAGE, 0x40) == bytes(0x40)
    finally:
        memory.close()


def test_a_bzimage_with_a_display_is_unpacked_and_entered_by_linux64() -> None:
    import gzip

    vmlinux = fake_elf(notes=pvh_note(0x100000) + LINUX_NOTE)
    image = fake_bzimage(with_size(gzip.compress(vmlinux), vmlinux))
    memory = GuestMemory.from_ranges(layout.ram_ranges(64 << 20))
    try:
        screen = ScreenInfo(base=0xF400_0000, size=1 << 20, width=320, height=200, stride=1280)
        entry = load_kernel(memory, image, screen=screen)
        assert (entry.protocol, entry.unpacked, entry.rip) == (BootProtocol.LINUX64, "gzip", 0x100000)
        assert memory.read(layout.ZERO_PAGE, 0x40) == screen.pack()
        assert load_kernel(memory, image).protocol is BootProtocol.PVH  # without a display: PVH, as before
    finally:
        memory.close()


def test_the_configuration() -> None:
    assert VmConfig(display="800x600").display == (800, 600)
    assert VmConfig(display=(640, 480)).display == (640, 480)
    assert VmConfig().display is None
    for bad in ("800", (640,), ("a", "b"), "5x5"):
        with pytest.raises(ConfigError):
            VmConfig(display=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="PVH has none"):
        VmConfig(display="800x600", boot_protocol="pvh")
