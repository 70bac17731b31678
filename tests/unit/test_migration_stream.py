"""The migration stream (trivmm/migration/stream.py) without KVM: round trips through the
sans-I/O decoder and the async reader and writer, and corrupted, truncated and hostile
streams, which must give ``MigrationError`` and nothing else."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trivmm.errors import MigrationError
from trivmm.migration.stream import (
    MAGIC,
    MAPPED_VERSION,
    MAX_NAME,
    MAX_RUN_PAGES,
    PAGE_SIZE,
    PAYLOAD_LIMITS,
    VERSION,
    FileSink,
    FileSource,
    MemoryMapEntry,
    MemoryRun,
    SectionKind,
    StreamDecoder,
    StreamReader,
    StreamWriter,
    decode_memory_map,
    decode_run,
    decode_stream,
    encode_header,
    encode_memory_map,
    encode_run,
    encode_section,
    image_checksum,
    page_runs,
)

names = st.from_regex(r"[A-Za-z0-9._:/-]{0,64}", fullmatch=True)
payloads = st.binary(max_size=2048)


class ListSink:
    """A ``ByteSink`` that keeps what it is sent."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def send(self, item: bytes) -> None:
        self.data += item


class ChunkSource:
    """A ``ByteSource`` handing out ``data`` in chunks of the given sizes (then the rest)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data = data
        self.sizes = list(sizes)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self.data:
            raise anyio.EndOfStream
        size = min(self.sizes.pop(0) if self.sizes else len(self.data), max_bytes)
        chunk, self.data = self.data[: max(size, 1)], self.data[max(size, 1) :]
        return chunk


def stream_of(sections: list[tuple[SectionKind, str, bytes]]) -> bytes:
    out = encode_header()
    for sequence, (kind, name, payload) in enumerate(sections):
        out += encode_section(sequence, kind, name, payload)
    return out + encode_section(len(sections), SectionKind.END, "", b"")


state_sections = st.lists(st.tuples(st.just(SectionKind.STATE), names, payloads), max_size=8)
memory_runs = st.builds(
    lambda slot, first, pages, zero, seed: MemoryRun(slot, first, pages,
                                                     None if zero else bytes([seed]) * (pages * PAGE_SIZE)),
    st.integers(0, 3), st.integers(0, 1 << 40), st.integers(1, 3), st.booleans(), st.integers(0, 255),
)  # fmt: skip


@given(state_sections, st.lists(memory_runs, max_size=3), st.lists(st.integers(1, 5000), max_size=20))
@settings(max_examples=60, deadline=None)
def test_round_trip_through_writer_and_reader(sections: list[tuple[SectionKind, str, bytes]],
                                              runs: list[MemoryRun], chunks: list[int]) -> None:  # fmt: skip
    async def main() -> None:
        sink = ListSink()
        writer = StreamWriter(sink)
        await writer.header()
        await writer.section(SectionKind.CONFIG, "config", b"{}")
        for kind, name, payload in sections:
            await writer.section(kind, name, payload)
        for run in runs:
            await writer.run(run)
        await writer.end()
        assert writer.bytes_written == len(sink.data)

        reader = StreamReader(ChunkSource(bytes(sink.data), chunks))
        got = []
        while (section := await reader.section()).kind is not SectionKind.END:
            got.append(section)
        await reader.expect_end_of_input()
        assert reader.version == 1
        assert [(s.kind, s.name, s.payload) for s in got[1 : 1 + len(sections)]] == sections
        assert [decode_run(s.payload) for s in got[1 + len(sections) :]] == runs
        assert [s.sequence for s in got] == list(range(len(got)))
        assert decode_stream(bytes(sink.data))[:-1] == got

    anyio.run(main)


def small_stream() -> bytes:
    """A stream with one of everything: config, state, a zero run and a data page, end."""
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    return stream_of([(SectionKind.CONFIG, "config", b'{"a":1}'), (SectionKind.STATE, "vcpu/0", b"\x01\x02\x03"),
                      (SectionKind.MEMORY, "", encode_run(MemoryRun(0, 0, 7))),
                      (SectionKind.MEMORY, "", encode_run(MemoryRun(0, 7, 1, page)))])  # fmt: skip


SMALL = small_stream()


def test_the_small_stream_decodes() -> None:
    kinds = [s.kind for s in decode_stream(SMALL)]
    assert kinds == [SectionKind.CONFIG, SectionKind.STATE, SectionKind.MEMORY, SectionKind.MEMORY, SectionKind.END]


def _accepted(data: bytes) -> bool:
    try:
        decode_stream(data)
    except MigrationError:
        return False
    return True


def test_the_stream_cut_at_every_byte_is_a_migration_error() -> None:
    assert [position for position in range(len(SMALL)) if _accepted(SMALL[:position])] == []


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_byte_flipped_is_a_migration_error(mask: int) -> None:
    accepted = []
    for position in range(len(SMALL)):
        data = bytearray(SMALL)
        data[position] ^= mask
        if _accepted(bytes(data)):
            accepted.append(position)
    assert accepted == []


@given(st.integers(0, len(SMALL) - 1), st.integers(1, 255))
@settings(max_examples=300, deadline=None)
def test_any_flipped_byte_is_a_migration_error(position: int, mask: int) -> None:
    data = bytearray(SMALL)
    data[position] ^= mask
    with pytest.raises(MigrationError):
        decode_stream(bytes(data))


@given(st.binary(max_size=300), st.integers(0, len(SMALL)))
@settings(max_examples=300, deadline=None)
def test_garbage_is_a_migration_error_never_another_exception(garbage: bytes, at: int) -> None:
    for data in (garbage, SMALL[:at] + garbage, encode_header() + garbage):
        try:
            decode_stream(data)
        except MigrationError:
            pass


@given(st.integers(0, len(SMALL)), st.integers(1, 255))
@settings(max_examples=60, deadline=None)
def test_the_async_reader_reports_the_same_errors(position: int, mask: int) -> None:
    data = bytearray(SMALL)
    if position < len(data):
        data[position] ^= mask
    else:
        data += b"\x00"  # trailing bytes after the end section

    async def main() -> None:
        reader = StreamReader(ChunkSource(bytes(data), [7, 300, 1]))
        while (await reader.section()).kind is not SectionKind.END:
            pass
        await reader.expect_end_of_input()

    with pytest.raises(MigrationError):
        anyio.run(main)


def test_a_hostile_length_is_refused_before_its_bytes_arrive() -> None:
    for kind in SectionKind:
        decoder = StreamDecoder()
        decoder.feed(encode_header() + struct.pack("<IBBHI", 0, kind, 0, 0, PAYLOAD_LIMITS[kind] + 1))
        with pytest.raises(MigrationError, match="over its limit"):
            decoder.next_section()
    decoder = StreamDecoder()
    decoder.feed(encode_header() + struct.pack("<IBBHI", 0, SectionKind.STATE, MAX_NAME + 1, 0, 0))
    with pytest.raises(MigrationError, match="longer than"):
        decoder.next_section()


def test_header_errors_say_what_is_wrong() -> None:
    with pytest.raises(MigrationError, match="bad magic"):
        decode_stream(b"NOTASNAP" + SMALL[8:])
    with pytest.raises(MigrationError, match="bad magic"):
        decode_stream(b"X")
    with pytest.raises(MigrationError, match="version 4 is not supported"):
        decode_stream(struct.pack("<8sII", MAGIC, 4, 0) + SMALL[16:])
    with pytest.raises(MigrationError, match="unknown flags"):
        decode_stream(struct.pack("<8sII", MAGIC, 1, 4) + SMALL[16:])
    with pytest.raises(MigrationError, match="before its header"):
        decode_stream(b"")


def _raw_section(sequence: int, kind: int, name: bytes, payload: bytes, reserved: int = 0) -> bytes:
    head = struct.pack("<IBBHI", sequence, kind, len(name), reserved, len(payload)) + name
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def test_well_checksummed_but_wrong_sections_are_refused() -> None:
    header = encode_header()
    end = _raw_section(1, SectionKind.END, b"", b"")
    cases = {
        "unknown section kind 9": _raw_section(0, 9, b"", b""),
        "reserved header bits": _raw_section(0, SectionKind.STATE, b"x", b"", reserved=1),
        "sequence number 5 out of order": _raw_section(5, SectionKind.STATE, b"x", b""),
        "bad section name": _raw_section(0, SectionKind.STATE, b"a b", b""),
    }
    for message, section in cases.items():
        with pytest.raises(MigrationError, match=message):
            decode_stream(header + section + end)
    with pytest.raises(MigrationError, match="data after the stream's end"):
        decode_stream(header + _raw_section(0, SectionKind.END, b"", b"") + b"\x00")
    lost = header + _raw_section(0, SectionKind.STATE, b"a", b"") + _raw_section(2, SectionKind.END, b"", b"")
    with pytest.raises(MigrationError, match="a section was lost"):
        decode_stream(lost)


def test_section_encoding_refuses_what_a_reader_would() -> None:
    with pytest.raises(ValueError):
        encode_section(0, SectionKind.STATE, "x" * (MAX_NAME + 1), b"")
    with pytest.raises(ValueError):
        encode_section(0, SectionKind.STATE, "bad name", b"")
    with pytest.raises(ValueError):
        encode_section(0, SectionKind.END, "", b"x")


# --- memory runs ------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 700)), min_size=1, max_size=6), st.integers(0, 255))
@settings(max_examples=40, deadline=None)
def test_page_runs_cover_memory_exactly_with_zero_runs_empty(layout: list[tuple[bool, int]], seed: int) -> None:
    memory = bytearray()
    for zero, pages in layout:
        memory += bytes(pages * PAGE_SIZE) if zero else bytes([seed | 1]) * (pages * PAGE_SIZE)
    runs = list(page_runs(bytes(memory), slot=2))
    rebuilt = bytearray()
    for run in runs:
        assert run.slot == 2 and run.first_page == len(rebuilt) // PAGE_SIZE and run.pages > 0
        if run.data is None:
            rebuilt += bytes(run.pages * PAGE_SIZE)
        else:
            assert run.pages <= MAX_RUN_PAGES and run.data != bytes(len(run.data))
            rebuilt += run.data
        assert decode_run(encode_run(run)) == run
    assert rebuilt == memory
    for a, b in itertools.pairwise(runs):  # zero runs are never split
        assert not (a.data is None and b.data is None)


def test_page_runs_of_part_of_a_slot() -> None:
    memory = bytes(PAGE_SIZE) * 3 + b"\x01" * PAGE_SIZE + bytes(PAGE_SIZE)
    assert list(page_runs(memory, 0, 2, 2)) == [MemoryRun(0, 2, 1), MemoryRun(0, 3, 1, b"\x01" * PAGE_SIZE)]


def test_a_run_of_zero_pages_costs_a_few_bytes() -> None:
    section = encode_section(0, SectionKind.MEMORY, "", encode_run(MemoryRun(0, 0, 1 << 20)))  # 4 GiB of zeros
    assert len(section) <= 40


@given(st.binary(max_size=64))
def test_run_decoding_refuses_bad_runs(payload: bytes) -> None:
    try:
        run = decode_run(payload)
    except MigrationError:
        return
    assert run.pages > 0 and (run.data is None or len(run.data) == run.pages * PAGE_SIZE)


def test_run_decoding_errors() -> None:
    header = struct.Struct("<IIQI")
    with pytest.raises(MigrationError, match="no pages"):
        decode_run(header.pack(0, 1, 0, 0))
    with pytest.raises(MigrationError, match="unknown flags"):
        decode_run(header.pack(0, 2, 0, 1))
    with pytest.raises(MigrationError, match="carries data"):
        decode_run(header.pack(0, 1, 0, 1) + b"x")
    with pytest.raises(MigrationError, match="carries 1 bytes"):
        decode_run(header.pack(0, 0, 0, 1) + b"x")
    with pytest.raises(MigrationError, match="shorter"):
        decode_run(b"\x00" * 8)


# --- files ----------------------------------------------------------------------------------------


def test_file_sink_and_source_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "stream"

    async def main() -> None:
        with open(path, "wb") as file:
            sink = FileSink(file)
            writer = StreamWriter(sink)
            await writer.header()
            await writer.section(SectionKind.CONFIG, "config", b"x" * 1000)
            await writer.run(MemoryRun(0, 0, MAX_RUN_PAGES, b"\x05" * (MAX_RUN_PAGES * PAGE_SIZE)))
            await writer.end()
            await sink.flush(sync=True)
        with open(path, "rb") as file:
            reader = StreamReader(FileSource(file))
            kinds = []
            while (section := await reader.section()).kind is not SectionKind.END:
                kinds.append(section.kind)
            await reader.expect_end_of_input()
        assert kinds == [SectionKind.CONFIG, SectionKind.MEMORY]

    anyio.run(main)
    assert [s.kind for s in decode_stream(path.read_bytes())] == [SectionKind.CONFIG, SectionKind.MEMORY,
                                                                  SectionKind.END]  # fmt: skip


# --- version 3: snapshot files with mapped memory images -----------------------------------------


def _mapped_file(entries: list[MemoryMapEntry], images: bytes = b"") -> bytes:
    data = encode_header(MAPPED_VERSION) + encode_section(0, SectionKind.CONFIG, "config", b"{}")
    data += encode_section(1, SectionKind.MEMORY_MAP, "", encode_memory_map(entries))
    return data + encode_section(2, SectionKind.END, "", b"") + images


def test_a_version_3_file_carries_a_memory_map_and_its_images_after_end() -> None:
    entries = [MemoryMapEntry(0, 4096, 2, 0x1234), MemoryMapEntry(1, 3 * 4096, 1, 0)]
    sections = decode_stream(_mapped_file(entries, b"\x55" * 3 * 4096))  # images after END are not sections
    assert [s.kind for s in sections] == [SectionKind.CONFIG, SectionKind.MEMORY_MAP, SectionKind.END]
    assert decode_memory_map(sections[1].payload) == entries


def test_memory_map_and_memory_runs_do_not_mix_across_versions() -> None:
    run = encode_section(1, SectionKind.MEMORY, "", encode_run(MemoryRun(0, 0, 1)))
    v3 = encode_header(MAPPED_VERSION) + encode_section(0, SectionKind.CONFIG, "config", b"{}") + run
    with pytest.raises(MigrationError, match="a MEMORY section in a version 3 stream"):
        decode_stream(v3)
    memory_map = encode_section(1, SectionKind.MEMORY_MAP, "", encode_memory_map([MemoryMapEntry(0, 4096, 1, 0)]))
    v1 = encode_header(VERSION) + encode_section(0, SectionKind.CONFIG, "config", b"{}") + memory_map
    with pytest.raises(MigrationError, match="a MEMORY_MAP section in a version 1 stream"):
        decode_stream(v1)


@pytest.mark.parametrize(("payload", "message"), [
    (b"", "not whole"),
    (b"\x00" * 31, "not whole"),
    (struct.pack("<IIQQII", 0, 1, 4096, 1, 0, 0), "unknown flags"),
    (struct.pack("<IIQQII", 0, 0, 4096, 1, 0, 7), "unknown flags"),
    (struct.pack("<IIQQII", 0, 0, 4097, 1, 0, 0), "not page-aligned"),
    (struct.pack("<IIQQII", 0, 0, 4096, 0, 0, 0), "empty"),
])  # fmt: skip
def test_bad_memory_map_entries_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        decode_memory_map(payload)


def test_the_image_checksum_covers_data_and_where_it_lies_not_zero_pages() -> None:
    image = bytearray(8 * PAGE_SIZE)
    image[2 * PAGE_SIZE] = 1
    moved = bytearray(8 * PAGE_SIZE)
    moved[3 * PAGE_SIZE] = 1
    one = image_checksum(page_runs(bytes(image), 0))
    assert one != image_checksum(page_runs(bytes(moved), 0))  # the same bytes one page further
    in_windows = image_checksum(page_runs(bytes(image), 0, 4, 4), image_checksum(page_runs(bytes(image), 0, 0, 4)))
    assert in_windows == one
    assert image_checksum(page_runs(bytes(8 * PAGE_SIZE), 0)) == 0
