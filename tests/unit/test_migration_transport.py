"""The migration pieces that need no KVM: stream version 2 (RESEND runs) and the rules the
destination applies to them, URIs, the hand-over messages, dirty-page bitmaps, the VMM's
dirty record under concurrent marking, query-migrate's shape, and the CLI's rates."""

from __future__ import annotations

import itertools
import struct
import threading

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trivmm.cli import _parse_rate
from trivmm.errors import ConfigError, MigrationError
from trivmm.memory import GuestMemory
from trivmm.migration.dirty import dirty_runs, marks_to_bits
from trivmm.migration.migrate import MigrationInfo
from trivmm.migration.snapshot import _MemoryReceiver
from trivmm.migration.stream import (
    HOT_VERSION,
    MAGIC,
    PAGE_SIZE,
    VERSION,
    MemoryRun,
    SectionKind,
    decode_run,
    decode_stream,
    encode_header,
    encode_run,
    encode_section,
)
from trivmm.migration.transport import MAX_REASON, AckDecoder, AckKind, MigrationUri, encode_ack, parse_uri

# --- stream version 2 ----------------------------------------------------------------------------


def test_resend_runs_round_trip_in_version_2_only() -> None:
    data = bytes(range(256)) * 16
    for run in (MemoryRun(0, 5, 1, data, resend=True), MemoryRun(1, 7, 300, resend=True), MemoryRun(0, 0, 1, data)):
        assert decode_run(encode_run(run), HOT_VERSION) == run
    with pytest.raises(MigrationError, match="unknown flags 0x2"):
        decode_run(encode_run(MemoryRun(0, 5, 1, data, resend=True)), VERSION)
    with pytest.raises(MigrationError, match="unknown flags 0x4"):
        decode_run(struct.pack("<IIQI", 0, 4, 0, 1), HOT_VERSION)


def test_a_version_2_stream_decodes_and_version_4_is_refused() -> None:
    stream = encode_header(HOT_VERSION) + encode_section(0, SectionKind.CONFIG, "config", b"{}")
    stream += encode_section(1, SectionKind.MEMORY, "", encode_run(MemoryRun(0, 0, 2, resend=True)))
    stream += encode_section(2, SectionKind.END, "", b"")
    assert [s.kind for s in decode_stream(stream)] == [SectionKind.CONFIG, SectionKind.MEMORY, SectionKind.END]
    with pytest.raises(MigrationError, match="version 4 is not supported"):
        decode_stream(struct.pack("<8sII", MAGIC, 4, 0) + stream[16:])


def test_the_destination_takes_resends_only_over_pages_already_sent() -> None:
    memory = GuestMemory.from_ranges([(0, 16 * PAGE_SIZE), (1 << 20, 8 * PAGE_SIZE)])

    async def main() -> None:
        receiver = _MemoryReceiver(list(memory))  # its slots, as saved_regions gives them
        first = MemoryRun(0, 0, 4, b"\x01" * 4 * PAGE_SIZE)
        receiver.check(first)
        await receiver.write(first)
        with pytest.raises(MigrationError, match="only pages below 4 were sent"):
            receiver.check(MemoryRun(0, 2, 3, resend=True))
        again = MemoryRun(0, 1, 2, b"\x02" * 2 * PAGE_SIZE, resend=True)
        receiver.check(again)
        await receiver.write(again)
        with pytest.raises(MigrationError, match="where page 4 was due"):  # a first-pass run still goes in order
            receiver.check(MemoryRun(0, 5, 1))
        zero = MemoryRun(0, 0, 4, resend=True)  # a page rewritten to zeros
        receiver.check(zero)
        await receiver.write(zero)
        rest = MemoryRun(0, 4, 12)
        receiver.check(rest)
        await receiver.write(rest)
        with pytest.raises(MigrationError, match="slot 1: 0 of 8 pages"):
            receiver.check_complete()
        with pytest.raises(MigrationError, match="slot 2"):
            receiver.check(MemoryRun(2, 0, 1, resend=True))

    try:
        anyio.run(main)
        assert memory.read(0, 4 * PAGE_SIZE) == bytes(4 * PAGE_SIZE)
    finally:
        memory.close()


# --- URIs ------------------------------------------------------------------------------------------


def test_uris() -> None:
    assert parse_uri("tcp:127.0.0.1:4444") == MigrationUri("tcp", host="127.0.0.1", port=4444)
    assert parse_uri("tcp:example.org:0") == MigrationUri("tcp", host="example.org", port=0)
    assert parse_uri("tcp:[::1]:5") == MigrationUri("tcp", host="::1", port=5)
    assert str(parse_uri("tcp:[::1]:5")) == "tcp:[::1]:5"
    assert parse_uri("unix:/run/a.sock") == MigrationUri("unix", path="/run/a.sock")
    assert parse_uri("file:x:y") == MigrationUri("file", path="x:y")
    assert parse_uri("unix:rel.sock").absolute().path.endswith("/rel.sock")
    for bad in ("tcp:host", "tcp::1", "tcp:host:99999", "tcp:[nothex]:1", "tcp:[::1]", "exec:cat", "unix:", "file:",
                "nothing"):  # fmt: skip
        with pytest.raises(MigrationError, match="bad migration URI"):
            parse_uri(bad)


# --- the hand-over ---------------------------------------------------------------------------------


@given(st.lists(st.sampled_from(list(AckKind))), st.text(max_size=50), st.integers(1, 40))
def test_hand_over_messages_survive_any_split(kinds: list[AckKind], reason: str, chunk: int) -> None:
    wire = b"".join(encode_ack(kind, reason if kind is AckKind.REFUSED else "") for kind in kinds)
    decoder = AckDecoder()
    got = []
    for at in range(0, len(wire), chunk):
        got += decoder.feed(wire[at : at + chunk])
    assert [a.kind for a in got] == kinds
    assert all(a.reason == reason for a in got if a.kind is AckKind.REFUSED)


def test_hand_over_messages_are_checked() -> None:
    good = encode_ack(AckKind.READY)
    for bad, why in ((b"X" + good[1:], "not a hand-over message"), (good[:-1] + b"\x00", "bad checksum"),
                     (good[:8] + b"\x09" + good[9:], "checksum")):  # fmt: skip
        with pytest.raises(MigrationError, match=why):
            AckDecoder().feed(bad)
    assert len(encode_ack(AckKind.REFUSED, "x" * 5000)) == 12 + MAX_REASON + 4  # long reasons are cut


# --- dirty pages --------------------------------------------------------------------------------------


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_dirty_bitmaps_and_runs(marks: list[bool]) -> None:
    bits = marks_to_bits(bytes(marks))
    assert [bool(bits >> page & 1) for page in range(len(marks))] == marks
    runs = list(dirty_runs(bits, len(marks)))
    covered = [False] * len(marks)
    for first, count in runs:
        assert count > 0 and not any(covered[first : first + count])
        covered[first : first + count] = [True] * count
    assert covered == marks
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs))  # maximal, in order


def test_taking_the_vmm_dirty_record_never_loses_a_mark() -> None:
    """Pages marked by another thread while the record is taken are in the result or still
    marked (take_vmm_dirty clears only what it returns)."""
    memory = GuestMemory.from_ranges([(0, 4096 * PAGE_SIZE)])
    region = memory.regions[0]
    stop = threading.Event()
    marked: list[int] = []

    def marker() -> None:
        page = 0
        while not stop.is_set():
            memory.mark_written(page * PAGE_SIZE, 1)
            marked.append(page)
            page = (page + 37) % 4096

    thread = threading.Thread(target=marker)
    thread.start()
    seen = 0
    try:
        for _ in range(200):
            seen |= marks_to_bits(memory.take_vmm_dirty(region))
    finally:
        stop.set()
        thread.join()
        seen |= marks_to_bits(memory.take_vmm_dirty(region))
        memory.close()
    assert all(seen >> page & 1 for page in set(marked))


# --- progress ---------------------------------------------------------------------------------------


def test_query_migrate_has_qemus_fields() -> None:
    assert MigrationInfo().to_qmp() == {}
    active = MigrationInfo(status="active", rounds=3, total_time=1.5, setup_time=0.01, expected_downtime=0.02,
                           transferred=10, remaining=4096, total=1 << 20, normal_pages=2, zero_pages=250,
                           dirty_pages_rate=123.4, bandwidth=1e6, throttle=40).to_qmp()  # fmt: skip
    assert active["status"] == "active" and active["total-time"] == 1500 and active["expected-downtime"] == 20
    assert active["cpu-throttle-percentage"] == 40 and "downtime" not in active
    assert active["ram"] == {"transferred": 10, "remaining": 4096, "total": 1 << 20, "duplicate": 250, "skipped": 0,
                             "normal": 2, "normal-bytes": 8192, "dirty-pages-rate": 123, "mbps": 8.0,
                             "dirty-sync-count": 3, "page-size": 4096}  # fmt: skip
    done = MigrationInfo(status="completed", downtime=0.0123, total_time=2).to_qmp()
    assert done["downtime"] == 12 and "expected-downtime" not in done and "cpu-throttle-percentage" not in done
    assert MigrationInfo(status="failed", error="why").to_qmp()["error-desc"] == "why"


def test_cli_rates() -> None:
    assert _parse_rate("100M") == 100 << 20
    assert _parse_rate("1.5G/s") == 3 << 29
    assert _parse_rate("2048") == 2048
    assert _parse_rate("64KiB/s") == 64 << 10
    with pytest.raises(ConfigError, match="bad rate"):
        _parse_rate("fast")
