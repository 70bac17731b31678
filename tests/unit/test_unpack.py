"""A bzImage's payload unpacked in process (gzip, xz, LZ4 legacy, zstd), and a bzImage whose
vmlinux has a PVH note entered by PVH without its own decompressor."""

from __future__ import annotations

import gzip
import lzma
import random
import struct
import zlib
from collections.abc import Callable

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_boot import LZ4_LEGACY_MAGIC, fake_bzimage, fake_elf, lz4_legacy, pvh_note, with_size
from trivmm.boot import bzimage, layout
from trivmm.boot.bzimage import KernelImageError, extract_vmlinux, payload_compression
from trivmm.boot.loader import BootProtocol, load_kernel
from trivmm.memory import GuestMemory

LZ4_BLOCK = 8 << 20  # what Linux's unlz4 takes a legacy block to unpack to


def zstd_frame(body: bytes, *, checksum: bool = True, content_size: bool = False) -> bytes:
    """A zstd frame as `zstd -22 --ultra` from a pipe writes one: checksum, no content size."""
    return zstandard.ZstdCompressor(level=3, write_checksum=checksum, write_content_size=content_size).compress(body)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "xz": lambda body: lzma.compress(body, check=lzma.CHECK_CRC32),
    "lz4": lz4_legacy,
    "zstd": zstd_frame,
}


def payload(kind: str, body: bytes) -> bytes:
    return with_size(COMPRESSORS[kind](body), body)


def vmlinux_like(size: int, seed: int = 1) -> bytes:
    """``size`` bytes that start like an ELF and compress like code: a random 4 KiB pattern
    repeated, with a counter so that no two pages are the same."""
    pattern = random.Random(seed).randbytes(4096)
    pages = b"".join(struct.pack("<I", i) + pattern[4:] for i in range(size // 4096 + 1))
    return (b"\x7fELF" + pages)[:size]


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.from_ranges(layout.ram_ranges(64 << 20))
    yield mem
    mem.close()


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(bzimage, "MAX_VMLINUX_SIZE", 1 << 20)
    return 1 << 20


# --- each format round-trips -------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_each_compression_round_trips(kind: str) -> None:
    body = vmlinux_like(300_001)
    image = fake_bzimage(payload(kind, body))
    assert payload_compression(image) == kind
    assert extract_vmlinux(image) == body


def test_lz4_several_blocks_the_last_one_short() -> None:
    body = vmlinux_like(LZ4_BLOCK + 12_345)  # two blocks, as a real kernel's (16 MiB: three)
    stream = lz4_legacy(body)
    assert stream.count(LZ4_LEGACY_MAGIC) == 1 and len(stream) < len(body) // 4
    assert extract_vmlinux(fake_bzimage(with_size(stream, body))) == body


def test_lz4_blocks_at_the_highest_ratio_unpack() -> None:
    """8 MiB of zeros packs to ~32 KiB: the most an LZ4 block unpacks to per byte (~255)."""
    body = b"\x7fELF" + bytes(LZ4_BLOCK + 100)
    assert extract_vmlinux(fake_bzimage(payload("lz4", body))) == body


def test_lz4_concatenated_frames_and_a_zero_end_mark() -> None:
    body = vmlinux_like(100_000)
    two_frames = lz4_legacy(body[:60_000]) + lz4_legacy(body[60_000:])
    assert extract_vmlinux(fake_bzimage(with_size(two_frames, body))) == body
    end_marked = lz4_legacy(body) + bytes(4)  # blocks, a zero length word, then the size
    assert extract_vmlinux(fake_bzimage(with_size(end_marked, body))) == body


@pytest.mark.parametrize(("checksum", "content_size"), [(False, False), (True, True)])
def test_zstd_frames_with_and_without_checksum_and_content_size(checksum: bool, content_size: bool) -> None:
    body = vmlinux_like(200_000)
    frame = zstd_frame(body, checksum=checksum, content_size=content_size)
    assert extract_vmlinux(fake_bzimage(with_size(frame, body))) == body


@pytest.mark.parametrize(("head", "name"), [(b"BZh91AY&SY", "bzip2"), (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
                                            (b"\x5d\x00\x00\x80\x00", "lzma")])  # fmt: skip
def test_formats_it_does_not_unpack_are_named(head: bytes, name: str) -> None:
    image = fake_bzimage(head + bytes(64))
    assert payload_compression(image) == name
    with pytest.raises(KernelImageError, match=f"{name} payloads are not supported"):
        extract_vmlinux(image)


# --- hostile payloads ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(COMPRESSORS))
@pytest.mark.parametrize("keep", [0.5, 0.9, -1], ids=["half", "most", "all-but-one-byte"])
def test_a_stream_cut_short_is_refused(kind: str, keep: float) -> None:
    body = vmlinux_like(LZ4_BLOCK + 1000 if kind == "lz4" else 200_000)
    stream = COMPRESSORS[kind](body)
    cut = stream[:-1] if keep == -1 else stream[: int(len(stream) * keep)]
    with pytest.raises(KernelImageError, match=rf"{kind} payload is (cut short|corrupt)"):
        extract_vmlinux(fake_bzimage(with_size(cut, body)))  # the size word survives, as a cut image's may not


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_a_payload_cut_anywhere_is_refused(kind: str) -> None:
    body = vmlinux_like(20_000)
    whole = payload(kind, body)
    stream_end = len(whole) - 4
    for length in range(0, stream_end, max(1, stream_end // 40)):
        with pytest.raises(KernelImageError):
            extract_vmlinux(fake_bzimage(whole[:length]))


def test_lz4_missing_its_last_block_is_refused_by_the_size_word() -> None:
    """A legacy frame has no end mark: cut at a block's end, only the size word tells."""
    body = vmlinux_like(LZ4_BLOCK + 1000)
    stream = lz4_legacy(body)
    (first,) = struct.unpack_from("<I", stream, 4)
    cut = stream[: 8 + first]  # the magic and the first block
    with pytest.raises(KernelImageError, match=rf"cut short or corrupt: it unpacks to {LZ4_BLOCK} bytes, "
                                               rf"its size word says {len(body)}"):  # fmt: skip
        extract_vmlinux(fake_bzimage(with_size(cut, body)))


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])  # the formats with a checksum
def test_a_bit_flip_in_a_checked_stream_is_refused(kind: str) -> None:
    body = vmlinux_like(100_000)
    data = bytearray(payload(kind, body))
    for at in (len(data) // 2, len(data) - 10):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        with pytest.raises(KernelImageError, match=f"{kind} payload is (corrupt|cut short)"):
            extract_vmlinux(fake_bzimage(bytes(flipped)))


def test_lz4_flipped_length_and_size_words_are_refused() -> None:
    body = vmlinux_like(50_000)
    data = payload("lz4", body)
    for at, message in ((4, "cut short|corrupt"), (5, "cut short|corrupt"), (len(data) - 4, "size word says")):
        flipped = bytearray(data)
        flipped[at] ^= 0x01
        with pytest.raises(KernelImageError, match=message):
            extract_vmlinux(fake_bzimage(bytes(flipped)))


def test_lz4_block_claiming_2_gib_is_refused() -> None:
    data = LZ4_LEGACY_MAGIC + struct.pack("<I", 2 << 30) + bytes(100) + struct.pack("<I", 1000)
    with pytest.raises(KernelImageError, match=r"lz4 payload is corrupt: a block at offset 4 claims 2147483648 bytes"):
        extract_vmlinux(fake_bzimage(data))


def test_lz4_block_that_unpacks_past_8_mib_is_refused() -> None:
    """A legacy block holds at most 8 MiB; one that holds more is refused, not unpacked."""
    body = b"\x7fELF" + bytes((9 << 20) - 4)
    data = lz4_legacy(body, block=len(body))  # one block of 9 MiB
    with pytest.raises(KernelImageError, match="lz4 payload is corrupt: the block at offset 4"):
        extract_vmlinux(fake_bzimage(with_size(data, body)))


def test_lz4_blocks_unpacking_past_their_size_word_are_refused() -> None:
    body = vmlinux_like(100_000)
    data = lz4_legacy(body) + struct.pack("<I", 99_999)
    with pytest.raises(KernelImageError, match="more than the 99999 bytes its size word says"):
        extract_vmlinux(fake_bzimage(data))


def test_zstd_frame_asking_for_a_window_over_128_mib_is_refused() -> None:
    frame = bytearray(zstd_frame(vmlinux_like(10_000), checksum=False))
    assert not frame[4] & 0x20  # no single-segment flag: a window descriptor follows
    frame[5] = 18 << 3  # window log 10 + 18: 256 MiB
    with pytest.raises(KernelImageError, match="zstd payload is corrupt"):
        extract_vmlinux(fake_bzimage(with_size(bytes(frame), b"x" * 10_000)))


def test_xz_stream_asking_for_a_dictionary_over_the_cap_is_refused() -> None:
    """A stream's LZMA2 dictionary is what its decoder allocates; 4 GiB is refused."""
    stream = bytearray(lzma.compress(vmlinux_like(10_000), check=lzma.CHECK_CRC32, preset=0))
    header_size = (stream[12] + 1) * 4  # the block header after the 12-byte stream header
    header = stream[12 : 12 + header_size]
    at = header.index(b"\x21\x01") + 2  # the LZMA2 filter: id, properties size, dictionary size
    header[at] = 40  # 4 GiB - 1
    header[-4:] = struct.pack("<I", zlib.crc32(header[:-4]))
    stream[12 : 12 + header_size] = header
    with pytest.raises(KernelImageError, match=r"xz payload is corrupt: .*[Mm]emory"):
        extract_vmlinux(fake_bzimage(bytes(stream)))


def test_zstd_reserved_block_type_is_refused() -> None:
    frame = bytearray(zstd_frame(vmlinux_like(10_000), checksum=False))
    header = zstandard.frame_header_size(bytes(frame))
    frame[header] |= 0b110  # block type 3
    with pytest.raises(KernelImageError, match="reserved block type"):
        extract_vmlinux(fake_bzimage(bytes(frame) + bytes(4)))


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_output_past_the_limit_is_refused(kind: str, small_limit: int) -> None:
    body = b"\x7fELF" + bytes(2 << 20)
    with pytest.raises(KernelImageError, match="unpacks to more than 1 MiB"):
        extract_vmlinux(fake_bzimage(payload(kind, body)))


def test_lz4_past_the_limit_by_its_size_word_is_refused_before_unpacking(small_limit: int) -> None:
    data = LZ4_LEGACY_MAGIC + struct.pack("<I", 0xFFFF) + b"\xff" * 0xFFFF + struct.pack("<I", 2 << 20)
    with pytest.raises(KernelImageError, match="unpacks to more than 1 MiB"):
        extract_vmlinux(fake_bzimage(data))


@st.composite
def damaged_payloads(draw: st.DrawFn) -> bytes:
    """A payload of any of the four formats, cut, bit-flipped or with bytes overwritten."""
    body = b"\x7fELF" + draw(st.binary(max_size=200)) * draw(st.integers(1, 300))
    data = bytearray(payload(draw(st.sampled_from(list(COMPRESSORS))), body))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.integers(0, 2))
        if action == 0:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == 1:
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\0\0\0\0", b"\0\0\x80\0"]))
        else:
            del data[at:]
            if not data:
                break
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damaged_payloads())
def test_damaged_payloads_unpack_or_are_refused(data: bytes) -> None:
    try:
        vmlinux = extract_vmlinux(fake_bzimage(data))
    except KernelImageError:
        return
    assert vmlinux[:4] == b"\x7fELF" and len(vmlinux) <= bzimage.MAX_VMLINUX_SIZE


# --- loading a bzImage by PVH ------------------------------------------------------------------
PVH_ENTRY = 0x100000
BODY = b"\xf4" * 64  # the "kernel": HLT


def pvh_bzimage(kind: str = "lz4", *, note: bool = True) -> bytes:
    vmlinux = fake_elf(notes=pvh_note(PVH_ENTRY) if note else b"", body=BODY, entry=0x100000)
    return fake_bzimage(payload(kind, vmlinux))


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_bzimage_with_a_pvh_vmlinux_loads_by_pvh_under_auto(kind: str, memory: GuestMemory) -> None:
    initrd = b"INITRD" * 100
    entry = load_kernel(memory, pvh_bzimage(kind), initrd=initrd, cmdline="console=ttyS0", vcpus=2)
    assert entry.protocol is BootProtocol.PVH and entry.unpacked == kind
    assert entry.rip == PVH_ENTRY and entry.boot_info == layout.PVH_START_INFO
    assert memory.read(0x100000, len(BODY)) == BODY  # the vmlinux's segment, not the bzImage
    assert entry.kernel_end == 0x100000 + len(BODY)
    magic, _, _, modules, modlist, cmdline = struct.unpack("<IIIIQQ", memory.read(layout.PVH_START_INFO, 32))
    assert (magic, modules) == (0x336EC578, 1) and memory.read(cmdline, 14) == b"console=ttyS0\0"
    address, size = struct.unpack("<QQ", memory.read(modlist, 16))
    assert memory.read(address, size) == initrd and address >= entry.kernel_end


def test_same_bzimage_under_linux64_is_left_to_its_own_decompressor(memory: GuestMemory) -> None:
    kernel = pvh_bzimage()
    entry = load_kernel(memory, kernel, protocol="linux64")
    assert entry.protocol is BootProtocol.LINUX64 and entry.unpacked is None
    assert entry.rip == 0x100200 and entry.boot_info == layout.ZERO_PAGE
    setup_size = 5 * 512
    assert memory.read(0x100000, 64) == kernel[setup_size : setup_size + 64]  # the image, as it is
    assert memory.read_u16(layout.ZERO_PAGE + 0x1FE) == 0xAA55


def test_pvh_is_asked_for_a_bzimage(memory: GuestMemory) -> None:
    entry = load_kernel(memory, pvh_bzimage("zstd"), protocol="pvh")
    assert entry.protocol is BootProtocol.PVH and entry.unpacked == "zstd"


def test_bzimage_without_a_pvh_note(memory: GuestMemory) -> None:
    entry = load_kernel(memory, pvh_bzimage(note=False))
    assert entry.protocol is BootProtocol.LINUX64 and entry.unpacked is None and entry.rip == 0x100200
    with pytest.raises(KernelImageError, match="bzImage's vmlinux has no PVH entry note"):
        load_kernel(memory, pvh_bzimage(note=False), protocol="pvh")


@pytest.mark.parametrize(("payload_bytes", "reason"), [
    (payload("lz4", vmlinux_like(5000))[:-30], "lz4 payload is cut short"),
    (b"BZh9" + bytes(100), "bzip2 payloads are not supported"),
    (payload("gzip", b"not an ELF"), "unpacked payload is not an ELF file"),
], ids=["corrupt", "unsupported", "not-elf"])  # fmt: skip
def test_bzimage_whose_payload_cannot_be_unpacked(payload_bytes: bytes, reason: str, memory: GuestMemory) -> None:
    """auto boots it as before (the guest's decompressor has the last word); pvh says why not."""
    kernel = fake_bzimage(payload_bytes)
    entry = load_kernel(memory, kernel)
    assert entry.protocol is BootProtocol.LINUX64 and entry.unpacked is None
    with pytest.raises(KernelImageError, match=f"PVH entry into a bzImage needs its payload unpacked: {reason}"):
        load_kernel(memory, kernel, protocol="pvh")


def test_bzimage_s_command_line_limit_holds_for_its_vmlinux(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="command line is 3000 bytes; this kernel takes at most 2047"):
        load_kernel(memory, pvh_bzimage(), cmdline="a" * 3000)


def test_bzimage_s_vmlinux_that_does_not_fit_is_refused_before_loading(memory: GuestMemory) -> None:
    vmlinux = fake_elf(((0, 0x100000, 64, 80 << 20),), notes=pvh_note(PVH_ENTRY))
    with pytest.raises(KernelImageError, match="does not fit"):
        load_kernel(memory, fake_bzimage(payload("gzip", vmlinux)))
