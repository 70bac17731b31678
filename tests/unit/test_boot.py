from __future__ import annotations

import gzip
import lzma
import struct
import tracemalloc
from collections.abc import Callable

import attrs
import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from trivmm.boot import bzimage, layout
from trivmm.boot.acpi import AcpiTables
from trivmm.boot.bzimage import KernelImageError, SetupHeader, extract_vmlinux
from trivmm.boot.e820 import E820_RAM, memory_map
from trivmm.boot.elf import ElfImage
from trivmm.boot.loader import BootProtocol, load_kernel
from trivmm.boot.mptable import build_mptable
from trivmm.guest.builtin import builtin_guest
from trivmm.memory import GuestMemory


def fake_bzimage(payload: bytes = b"\x1f\x8b" + b"\0" * 30, setup_sects: int = 4, version: int = 0x020F,
                 xloadflags: int = 1, init_size: int = 0x400000) -> bytes:  # fmt: skip
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x66  # jump over the header, as real images do
    struct.pack_into("<I", setup, 0x202, 0x53726448)
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    struct.pack_into("<Q", setup, 0x258, 0x1000000)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + b"\x90" * 0x100 + payload


LZ4_LEGACY_MAGIC = struct.pack("<I", 0x184C2102)


def lz4_legacy(body: bytes, block: int = 8 << 20) -> bytes:
    """An LZ4 legacy frame as `lz4 -l` writes it (Linux's LZ4 payloads): the magic, then per
    ``block`` bytes of ``body`` its compressed length (LE32) and the raw LZ4 block."""
    out = [LZ4_LEGACY_MAGIC]
    for start in range(0, len(body), block):
        packed = lz4.block.compress(body[start : start + block], store_size=False)
        out += [struct.pack("<I", len(packed)), packed]
    return b"".join(out)


def with_size(stream: bytes, body: bytes) -> bytes:
    """A payload as the kernel's build makes it: the stream, then the unpacked size (LE32)."""
    return stream + struct.pack("<I", len(body) & 0xFFFF_FFFF)


def pvh_note(entry: int) -> bytes:
    """A Xen ELF note with the 32-bit PVH entry point."""
    return struct.pack("<III4sI", 4, 4, 18, b"Xen\0", entry)


def fake_elf(loads: tuple[tuple[int, int, int, int], ...] = ((0, 0x100000, 64, 64),), notes: bytes = b"",
             note_copies: int = 1, body: bytes = b"\x90" * 64, entry: int = 0x100000) -> bytes:  # fmt: skip
    """An ELF64 executable: a PT_LOAD per (offset into ``body``, paddr, filesz, memsz), then
    ``note_copies`` PT_NOTEs over ``notes`` (none if it is empty); the file ends with ``body``."""
    count = len(loads) + (note_copies if notes else 0)
    notes_start = 64 + count * 56
    body_start = notes_start + len(notes)
    headers = b"".join(struct.pack("<IIQQQQQQ", 1, 7, body_start + offset, paddr, paddr, filesz, memsz, 0x1000)
                       for offset, paddr, filesz, memsz in loads)  # fmt: skip
    if notes:
        headers += struct.pack("<IIQQQQQQ", 4, 4, notes_start, 0, 0, len(notes), len(notes), 4) * note_copies
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01", 2, 62, 1, entry, 64, 0, 0, 64, 56, count, 0, 0, 0)
    return header + headers + notes + body


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.from_ranges(layout.ram_ranges(64 << 20))
    yield mem
    mem.close()


def test_setup_header_parses() -> None:
    header = SetupHeader.parse(fake_bzimage())
    assert header.setup_size == 5 * 512 and header.version == 0x020F
    assert header.raw[0] == 4 and len(header.raw) == 0x202 + 0x66 - 0x1F1


@pytest.mark.parametrize(("image", "message"), [
    (b"\x7fELF" + b"\0" * 100, "too short"),
    (b"MZ" + b"\0" * 4000, "not a Linux bzImage"),
    (fake_bzimage(version=0x0206), "too old"),
    (fake_bzimage(xloadflags=0), "64-bit entry"),
    (fake_bzimage()[:-10], "truncated"),
])  # fmt: skip
def test_bad_bzimages_are_refused_with_a_reason(image: bytes, message: str) -> None:
    with pytest.raises(KernelImageError, match=message):
        SetupHeader.parse(image)


def test_extract_vmlinux_refuses_a_payload_that_is_not_elf() -> None:
    with pytest.raises(KernelImageError, match="not an ELF"):
        extract_vmlinux(fake_bzimage(gzip.compress(b"not elf at all")))


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_extract_vmlinux_takes_the_stream_before_the_kernel_s_size_word(compress: Callable[[bytes], bytes]) -> None:
    # Linux's build appends the unpacked size (4 bytes) to the compressed stream.
    assert extract_vmlinux(fake_bzimage(compress(b"\x7fELF...") + struct.pack("<I", 7))) == b"\x7fELF..."


@pytest.mark.parametrize(("payload", "message"), [
    (gzip.compress(b"\x7fELF" * 100)[:-9], "gzip payload is cut short"),
    (b"\x1f\x8b" + b"\0" * 30, "gzip payload is corrupt"),
    (lzma.compress(b"\x7fELF" * 100)[:-9], "xz payload is cut short"),
    (lzma.compress(b"\x7fELF")[:6] + b"\xff" + lzma.compress(b"\x7fELF")[7:], "xz payload is corrupt"),
], ids=["gzip-cut", "gzip-corrupt", "xz-cut", "xz-corrupt"])  # fmt: skip
def test_extract_vmlinux_refuses_a_broken_payload(payload: bytes, message: str) -> None:
    with pytest.raises(KernelImageError, match=message):
        extract_vmlinux(fake_bzimage(payload))


def test_extract_vmlinux_refuses_to_unpack_a_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bzimage, "MAX_VMLINUX_SIZE", 1 << 20)
    for compress in (gzip.compress, lzma.compress):
        with pytest.raises(KernelImageError, match="unpacks to more than 1 MiB"):
            extract_vmlinux(fake_bzimage(compress(b"\x7fELF" + bytes(2 << 20))))


@settings(max_examples=50)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash_the_parsers(data: bytes) -> None:
    for parse in (SetupHeader.parse, ElfImage.parse):
        try:
            parse(data)
        except KernelImageError:
            pass


# --- structurally valid images with hostile fields -------------------------------------------
# Guest RAM for the fuzzers: 8 MiB low, and optionally a 1 MiB region at 4 GiB behind a hole.
FUZZ_RAM_LAYOUTS = ([(0, 8 << 20)], [(0, 8 << 20), (1 << 32, 1 << 20)])
FUZZ_EDGES = (0, 1, 0xFF, 0xFFFF, 0xFFFFF, layout.HIMEM_START, 0x1000000, (8 << 20) - 0x1000, 8 << 20,
              layout.MMIO_GAP_START, 0xFFFF_FFFF, 1 << 32, (1 << 32) + 0xFF000, 1 << 63, (1 << 64) - 0x1000,
              (1 << 64) - 1)  # fmt: skip
ALLOCATION_SLACK = 4 << 20  # what the loader may allocate beyond copies of its inputs
# ... and beyond that, to unpack a bzImage's payload: the xz decoder's dictionary (8 MiB in
# the fuzzers' streams, lzma.compress's default) and the few bytes they unpack to.
UNPACK_SLACK = 9 << 20
# Strategies built once: making them inside the composites below is most of the fuzzers' time.
_EIGHTHS = st.integers(0, 7)
_INDEX = {n: st.integers(0, n - 1) for n in range(1, 5)}
_EDGES = {bits: st.sampled_from(sorted({v & ((1 << bits) - 1) for v in FUZZ_EDGES})) for bits in (8, 16, 32, 64)}
_ANY = {bits: st.integers(0, (1 << bits) - 1) for bits in (8, 16, 32, 64)}
_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD, _PT_NOTE = 1, 4


class FuzzGuestMemory(GuestMemory):
    """Guest RAM that fails the test when asked to fill more than all of RAM: the loader must
    refuse such a request before anything allocates it."""

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        assert 0 <= length <= self.size, f"loader asked to fill {length:#x} bytes of {self.size:#x}"
        super().fill(gpa, length, byte)


def hostile(draw: st.DrawFn, bits: int, *typical: int, calm: bool = False) -> int:
    """An unsigned ``bits``-wide field: mostly one of ``typical``, else an edge value or anything;
    the first of ``typical`` (the honest value) when ``calm``."""
    mask = (1 << bits) - 1
    if calm:
        return typical[0] & mask
    pick = draw(_EIGHTHS)
    if typical and pick < 5:
        return typical[draw(_INDEX[len(typical)])] & mask
    return draw(_EDGES[bits] if pick < 7 else _ANY[bits])


class Gates:
    """The header fields that gate everything a parser reads after them: at most one is broken
    per image (none, most of the time), so that most images get past them to the hostile fields."""

    def __init__(self, draw: st.DrawFn, names: tuple[str, ...]) -> None:
        self.draw = draw
        self.broken = draw(st.sampled_from((None,) * 3 * len(names) + names))

    def field(self, name: str, valid: int, *invalid: int) -> int:
        return invalid[self.draw(_INDEX[len(invalid)])] if self.broken == name else valid


_COMPRESS = (gzip.compress, lzma.compress, lambda body: with_size(lz4_legacy(body), body),
             lambda body: with_size(zstandard.ZstdCompressor().compress(body), body), bytes)  # fmt: skip


@st.composite
def compressed_payloads(draw: st.DrawFn) -> bytes:
    """A gzip, xz, LZ4 (legacy frame) or zstd stream of an ELF-looking or junk body, possibly
    cut short or corrupted; or junk."""
    body = (b"\x7fELF", b"junk", b"")[draw(_INDEX[3])] + draw(st.binary(max_size=64))
    data = _COMPRESS[draw(st.integers(0, len(_COMPRESS) - 1))](body)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


_BZIMAGE_GATES = ("boot flag", "magic", "version", "loadflags", "xloadflags", "cut")


@st.composite
def hostile_bzimages(draw: st.DrawFn) -> bytes:
    """A bzImage with a well-formed setup header whose fields are chosen to hurt: setup_sects,
    payload offset and length, init_size, pref_address, limits; or one gating field broken."""
    gates = Gates(draw, _BZIMAGE_GATES)
    calm = draw(_EIGHTHS) < 6  # the payload's place and size as the file has them
    setup_sects = hostile(draw, 8, 4, 0, 30)
    setup_size = ((setup_sects or 4) + 1) * 512
    gap = draw(st.integers(0, 0x300))  # between the setup code and the payload
    payload = draw(compressed_payloads())
    image = bytearray(setup_size + gap + len(payload))
    image[setup_size + gap :] = payload
    image[0x1F1] = setup_sects
    struct.pack_into("<H", image, 0x1FE, gates.field("boot flag", 0xAA55, 0x55AA, 0))
    image[0x200] = 0xEB
    image[0x201] = hostile(draw, 8, 0x66, 0x6A)  # where the jump over the header lands
    struct.pack_into("<I", image, 0x202, gates.field("magic", 0x5372_6448, 0x4864_7253))  # "HdrS"
    struct.pack_into("<H", image, 0x206, gates.field("version", draw(st.sampled_from([0x020C, 0x020F, 0xFFFF])),
                                                     0x0206, 0x020B))  # fmt: skip
    image[0x211] = gates.field("loadflags", 0x01, 0x00, 0x80)
    struct.pack_into("<I", image, 0x22C, hostile(draw, 32, 0x7FFF_FFFF, 0x37FF_FFFF))  # initrd_addr_max
    struct.pack_into("<I", image, 0x230, hostile(draw, 32, 0x20_0000))  # kernel_alignment
    image[0x234] = hostile(draw, 8, 1)  # relocatable_kernel
    struct.pack_into("<H", image, 0x236, gates.field("xloadflags", 0x01, 0x00, 0x7E))
    struct.pack_into("<I", image, 0x238, hostile(draw, 32, 2047, 255))  # cmdline_size
    struct.pack_into("<I", image, 0x248, hostile(draw, 32, gap, calm=calm))  # payload_offset
    struct.pack_into("<I", image, 0x24C, hostile(draw, 32, len(payload), calm=calm))  # payload_length
    struct.pack_into("<Q", image, 0x258, hostile(draw, 64, 0x10_0000, 0x20_0000))  # pref_address
    struct.pack_into("<I", image, 0x260, hostile(draw, 32, 0x40_0000, 6 << 20))  # init_size
    cut = gates.field("cut", 0, draw(st.integers(1, len(image))))
    return bytes(image[: len(image) - cut])


@st.composite
def hostile_notes(draw: st.DrawFn) -> bytes:
    """ELF notes, Xen PVH entry notes among them, whose name and descriptor sizes may lie."""
    notes = b""
    for _ in range((1, 0, 2, 3)[draw(_INDEX[4])]):
        calm = draw(_EIGHTHS) < 6
        name = (b"Xen\0", b"Xen", b"GNU\0", b"")[draw(_INDEX[4])]
        entry = hostile(draw, 64, 0x10_0000, calm=calm)
        desc = (struct.pack("<I", entry & 0xFFFF_FFFF), struct.pack("<Q", entry), draw(st.binary(max_size=12)))[
            draw(_INDEX[3])]  # fmt: skip
        n_type = (18, 1, 0xFFFF_FFFF)[draw(_INDEX[3])]  # XEN_ELFNOTE_PHYS32_ENTRY, or another
        header = struct.pack("<III", hostile(draw, 32, len(name), calm=calm),
                             hostile(draw, 32, len(desc), 4, 8, calm=calm), n_type)  # fmt: skip
        notes += header + name.ljust(-len(name) % 4 + len(name), b"\0") + desc.ljust(-len(desc) % 4 + len(desc), b"\0")
    return notes


_ELF_GATES = ("class", "data", "type", "machine", "phoff", "phentsize", "phnum", "cut")


@st.composite
def hostile_elfs(draw: st.DrawFn) -> bytes:
    """An ELF64 executable (header, program headers, PT_LOAD and PT_NOTE segments) whose
    offsets, sizes, counts and addresses are chosen to hurt: past the file, past RAM, into the
    MMIO hole, wrapping at 2**64, overlapping, filesz > memsz; or one gating field broken."""
    gates = Gates(draw, _ELF_GATES)
    notes = draw(hostile_notes())
    data = draw(st.binary(min_size=1, max_size=256))
    extra = [(_PT_LOAD, _PT_NOTE, 0x6474_E551)[draw(_INDEX[3])] for _ in range(draw(_INDEX[3]))]  # or PT_GNU_STACK
    count = 2 + len(extra)
    notes_start = 64 + count * _PHDR.size
    data_start = notes_start + len(notes)
    headers = b""
    for p_type in (_PT_LOAD, _PT_NOTE, *extra):
        calm = draw(_EIGHTHS) < 6  # where the segment lies in the file, as built
        if p_type == _PT_NOTE:
            offset, filesz = notes_start, len(notes)
        else:
            offset = data_start + draw(st.integers(0, len(data)))
            filesz = data_start + len(data) - offset
        offset = hostile(draw, 64, offset, calm=calm)
        filesz = hostile(draw, 64, filesz, filesz - 1, filesz + 1, calm=calm)
        placed, sized = draw(_EIGHTHS) < 6, draw(_EIGHTHS) < 6  # in guest RAM, as a kernel would be
        paddr = hostile(draw, 64, 0x10_0000 * (1 + draw(_INDEX[4])), (8 << 20) - 0x1000, 1 << 32, calm=placed)
        memsz = hostile(draw, 64, filesz + 0x1000 * draw(_INDEX[4]), filesz, 1 << 20, 8 << 20, calm=sized)
        headers += _PHDR.pack(p_type, 7, offset, paddr, paddr, filesz, memsz, 0x1000)
    ident = b"\x7fELF" + bytes([gates.field("class", 2, 1, 0), gates.field("data", 1, 2, 0), 1])
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, gates.field("type", 2, 3, 1), gates.field("machine", 62, 3),
                         1, hostile(draw, 64, 0x10_0000),
                         gates.field("phoff", 64, 0, len(data) + data_start, (1 << 64) - 8), 0, 0, 64,
                         gates.field("phentsize", _PHDR.size, 32, 0xFFFF),
                         gates.field("phnum", count, 0, count + 1, 0xFFFF), 0, 0, 0)  # fmt: skip
    image = header + headers + notes + data
    cut = gates.field("cut", 0, draw(st.integers(1, len(image))))
    return image[: len(image) - cut]


@attrs.frozen
class BootInputs:
    """What ``load_kernel`` is given beside the kernel."""

    initrd: bytes | None
    cmdline: str
    vcpus: int
    protocol: str


boot_inputs = st.builds(
    BootInputs,
    initrd=st.one_of(st.none(), st.binary(max_size=64), st.sampled_from([1 << 20, 7 << 20, 9 << 20]).map(bytes)),
    cmdline=st.one_of(st.text(max_size=40), st.sampled_from([255, 2047, 2048, 0xFFFF, 0x10000]).map("a".__mul__)),
    vcpus=st.integers(1, 4),
    protocol=st.sampled_from(["auto", "auto", "linux64", "pvh"]),
)


def check_load(kernel: bytes, ram: list[tuple[int, int]], inputs: BootInputs) -> None:
    """``load_kernel`` either refuses with a KernelImageError or loads consistently; either way it
    allocates no more than copies of its inputs and raises nothing else."""
    memory = FuzzGuestMemory.from_ranges(ram)
    try:
        tracemalloc.start()
        try:
            entry = load_kernel(memory, kernel, initrd=inputs.initrd, cmdline=inputs.cmdline, vcpus=inputs.vcpus,
                                protocol=inputs.protocol)  # fmt: skip
        except KernelImageError as exc:
            event(f"refused: {' '.join(str(exc).split()[:3])}")  # --hypothesis-show-statistics
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            budget = 2 * len(kernel) + len(inputs.initrd or b"") + ALLOCATION_SLACK
            if kernel[:4] != b"\x7fELF" and inputs.protocol != "linux64":
                budget += UNPACK_SLACK
            assert peak <= budget, f"the loader allocated {peak} bytes for a {len(kernel)}-byte kernel"
        event(f"loaded by {entry.protocol.value}")
        cmdline = inputs.cmdline.encode() + b"\0"
        assert memory.read(layout.CMDLINE, len(cmdline)) == cmdline  # nothing loaded over it
        if inputs.initrd:
            assert entry.initrd is not None
            address, size = entry.initrd
            assert size == len(inputs.initrd) and address >= entry.kernel_end
            assert memory.read(address, size) == inputs.initrd
    finally:
        memory.close()


FUZZ_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PLAIN_BOOT = BootInputs(initrd=None, cmdline="", vcpus=1, protocol="auto")
SMALL_RAM = FUZZ_RAM_LAYOUTS[0]


@FUZZ_SETTINGS
@given(hostile_bzimages(), st.sampled_from(FUZZ_RAM_LAYOUTS), boot_inputs)
# Regressions: extract_vmlinux let EOFError (found by this fuzzer), BadGzipFile and LZMAError escape.
@example(fake_bzimage(gzip.compress(b"\x7fELF")[:-6]), SMALL_RAM, PLAIN_BOOT)
@example(fake_bzimage(b"\x1f\x8b" + b"\0" * 30), SMALL_RAM, PLAIN_BOOT)
@example(fake_bzimage(lzma.compress(b"\x7fELF")[:6] + b"\xff" + lzma.compress(b"\x7fELF")[7:]), SMALL_RAM, PLAIN_BOOT)
def test_hostile_bzimages_are_refused_or_loaded_within_bounds(kernel: bytes, ram: list[tuple[int, int]],
                                                              inputs: BootInputs) -> None:  # fmt: skip
    try:
        header = SetupHeader.parse(kernel)
    except KernelImageError:
        pass
    else:
        assert header.setup_size + header.payload_offset + header.payload_length <= len(kernel)
        assert header.version >= 0x020C and len(header.raw) <= 0x202 + 0xFF - 0x1F1
    try:
        vmlinux = extract_vmlinux(kernel)
    except KernelImageError:
        pass
    else:
        assert vmlinux[:4] == b"\x7fELF"
    check_load(kernel, ram, inputs)


@FUZZ_SETTINGS
@given(hostile_elfs(), st.sampled_from(FUZZ_RAM_LAYOUTS), boot_inputs)
# Regressions found by this fuzzer: a huge memsz reached GuestMemory.fill, which allocates its zeros
# before it checks bounds (OverflowError; MemoryError for 1 TiB); a bss inside RAM was zeroed from
# one buffer as large as the bss.
@example(fake_elf(((0, 0x100000, 16, (1 << 64) - 1),)), SMALL_RAM, PLAIN_BOOT)
@example(fake_elf(((0, 0x100000, 16, 1 << 40),)), SMALL_RAM, PLAIN_BOOT)
@example(fake_elf(((0, 0x100000, 16, 6 << 20),)), SMALL_RAM, PLAIN_BOOT)
def test_hostile_elfs_are_refused_or_loaded_within_bounds(kernel: bytes, ram: list[tuple[int, int]],
                                                          inputs: BootInputs) -> None:  # fmt: skip
    try:
        image = ElfImage.parse(kernel)
    except KernelImageError:
        pass
    else:
        assert image.segments and all(len(s.data) <= s.memsz for s in image.segments)
        assert sum(len(s.data) for s in image.segments) <= len(kernel)
    check_load(kernel, ram, inputs)


def test_builtin_guest_is_an_elf_with_a_pvh_note() -> None:
    image = ElfImage.parse(builtin_guest())
    assert image.pvh_entry == image.entry == 0x100000
    assert image.segments[0].paddr == 0x100000


@pytest.mark.parametrize(("kernel", "message"), [
    (fake_elf(tuple((0, 0x100000 + 0x1000 * i, 64, 64) for i in range(100))), "loadable segments overlap"),
    (fake_elf(notes=pvh_note(0x100000) + struct.pack("<III4s", 4, 4096, 1, b"GNU\0") + bytes(4096), note_copies=100),
     "note segments overlap"),
    (fake_elf(notes=struct.pack("<III4sQ", 4, 8, 18, b"Xen\0", 1 << 32)), "not a 32-bit address"),
    (fake_elf(((0, 0x100000, 64, 7 << 20), (0, 0x200000, 0, 2 << 20))), "need 0x900000 bytes together"),
    (fake_elf(((0, 0x100000, 64, 8 << 20),)), "does not fit"),
    (fake_elf(((0, 0xC000_0000, 64, 64),)), "does not fit"),
    (fake_elf(((0, 0x80000, 64, 64),)), "below 1 MiB"),
], ids=["overlapping-loads", "overlapping-notes", "pvh-entry-above-4g", "memsz-total", "memsz-past-ram",
        "in-mmio-hole", "below-1m"])  # fmt: skip
def test_hostile_elf_segments_are_refused_before_loading(kernel: bytes, message: str) -> None:
    memory = FuzzGuestMemory.from_ranges(SMALL_RAM)
    try:
        with pytest.raises(KernelImageError, match=message):
            load_kernel(memory, kernel)
        assert b"\x01" not in memory.take_vmm_dirty(memory.regions[0])[layout.HIMEM_START >> 12 :], "loaded a part"
    finally:
        memory.close()


def test_an_elf_bss_is_zeroed(memory: GuestMemory) -> None:
    memory.fill(0x100000, 3 << 20, 0xAA)
    load_kernel(memory, fake_elf(((0, 0x100000, 64, (2 << 20) + 5),)))
    assert memory.read(0x100000, 64) == b"\x90" * 64
    assert memory.read(0x100040, (2 << 20) + 5 - 64) == bytes((2 << 20) + 5 - 64)
    assert memory.read(0x100000 + (2 << 20) + 5, 1) == b"\xaa"


def test_truncated_elf_is_refused() -> None:
    with pytest.raises(KernelImageError, match=r"past the end|runs past"):
        ElfImage.parse(builtin_guest()[:200])


def test_mptable_checksums_and_cpu_entries() -> None:
    table = build_mptable(3)
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    (config_address,) = struct.unpack_from("<I", table, 4)
    config = table[config_address - layout.EBDA_START :]
    (length,) = struct.unpack_from("<H", config, 4)
    assert config[:4] == b"PCMP" and sum(config[:length]) % 256 == 0
    cpus = [config[44 + 20 * i : 44 + 20 * (i + 1)] for i in range(3)]
    assert [c[0] for c in cpus] == [0, 0, 0] and [c[1] for c in cpus] == [0, 1, 2]
    assert cpus[0][3] == 0x03 and cpus[1][3] == 0x01  # BSP flag on CPU 0 only
    with pytest.raises(ValueError):
        build_mptable(0)


def _tables(acpi: AcpiTables) -> dict[bytes, bytes]:
    return {blob[:4]: blob for _, blob in acpi.blobs[1:]}


def test_acpi_tables_are_consistent() -> None:
    acpi = AcpiTables(2)
    rsdp = acpi.blobs[0][1]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    tables = _tables(acpi)
    for table in tables.values():
        assert struct.unpack_from("<I", table, 4)[0] == len(table)
        assert sum(table) % 256 == 0
    addresses = {blob[:4]: addr for addr, blob in acpi.blobs[1:]}
    (xsdt_address,) = struct.unpack_from("<Q", rsdp, 24)
    assert xsdt_address == addresses[b"XSDT"]
    entries = struct.unpack_from("<QQ", tables[b"XSDT"], 36)
    assert set(entries) == {addresses[b"FACP"], addresses[b"APIC"]}
    assert struct.unpack_from("<Q", tables[b"FACP"], 140)[0] == addresses[b"DSDT"]
    assert b"_S5_" in tables[b"DSDT"]
    madt = tables[b"APIC"]
    entries_seen, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries_seen.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    assert [e[3] for kind, e in entries_seen if kind == 0] == [0, 1]  # one LAPIC per vCPU
    assert [kind for kind, _ in entries_seen].count(1) == 1  # one IOAPIC


def test_memory_map_reserves_the_bios_areas() -> None:
    e820 = memory_map(layout.ram_ranges(4 << 30))
    ram = [(e.address, e.size) for e in e820 if e.type == E820_RAM]
    assert ram[0] == (0, layout.EBDA_START)
    assert (layout.HIMEM_START, layout.MMIO_GAP_START - layout.HIMEM_START) in ram
    assert ram[-1][0] == layout.MMIO_GAP_END


def test_bzimage_load_fills_the_zero_page(memory: GuestMemory) -> None:
    initrd = b"INITRD" * 1000
    entry = load_kernel(memory, fake_bzimage(), initrd=initrd, cmdline="console=ttyS0", vcpus=2)
    assert entry.protocol is BootProtocol.LINUX64 and entry.rip == 0x100200
    zp = layout.ZERO_PAGE
    assert memory.read(zp + 0x1F1, 1) == b"\x04" and memory.read_u16(zp + 0x1FE) == 0xAA55
    assert memory.read_u32(zp + 0x228) == layout.CMDLINE
    assert memory.read(layout.CMDLINE, 14) == b"console=ttyS0\0"
    address, size = memory.read_u32(zp + 0x218), memory.read_u32(zp + 0x21C)
    assert size == len(initrd) and memory.read(address, size) == initrd
    assert address % 4096 == 0 and address >= entry.kernel_end
    assert memory.read(zp + 0x1E8, 1)[0] == len(memory_map([(0, 64 << 20)]))
    assert memory.read_u64(zp + 0x070) == layout.ACPI_START


def test_builtin_guest_loads_by_pvh(memory: GuestMemory) -> None:
    entry = load_kernel(memory, builtin_guest(), cmdline="x=1")
    assert entry.protocol is BootProtocol.PVH and entry.boot_info == layout.PVH_START_INFO
    magic, version, _, modules, _, cmdline, rsdp, memmap, count = struct.unpack(
        "<IIIIQQQQI", memory.read(layout.PVH_START_INFO, 52))
    assert (magic, version, modules) == (0x336EC578, 1, 0)
    assert memory.read(cmdline, 4) == b"x=1\0" and rsdp == layout.ACPI_START
    assert memory.read_u32(memmap + 16) == E820_RAM and count >= 3


def test_linux64_entry_for_an_elf_when_asked(memory: GuestMemory) -> None:
    entry = load_kernel(memory, builtin_guest(), protocol="linux64")
    assert entry.protocol is BootProtocol.LINUX64 and entry.boot_info == layout.ZERO_PAGE
    assert memory.read_u64(layout.PML4) & ~0xFFF == layout.PDPT


def test_pvh_on_a_bzimage_is_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="PVH"):
        load_kernel(memory, fake_bzimage(), protocol="pvh")


def test_oversized_inputs_are_refused(memory: GuestMemory) -> None:
    with pytest.raises(KernelImageError, match="initrd"):
        load_kernel(memory, fake_bzimage(), initrd=b"x" * (60 << 20))
    with pytest.raises(KernelImageError, match="command line"):
        load_kernel(memory, fake_bzimage(), cmdline="a" * 5000)
    with pytest.raises(KernelImageError, match="unpack"):
        load_kernel(memory, fake_bzimage(init_size=80 << 20))
    with pytest.raises(KernelImageError, match="NUL"):
        load_kernel(memory, fake_bzimage(), cmdline="a\0b")
