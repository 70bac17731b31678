"""``--copy-storage`` without KVM: virtio-blk's write tracking driven by the unit rig
(tests/unit/blk_driver.py), the DISK section's encoding and its checks (hostile lengths,
flags, offsets), and the destination's ``DiskReceiver`` against a VM's disks."""

from __future__ import annotations

import struct
import types
from pathlib import Path

import anyio
import pytest

from tests.unit.blk_driver import Rig
from tests.unit.test_virtio_block import (
    DISCARD,
    MIB,
    OK,
    SECTOR,
    WZ,
    pattern,
    raw_disk,
    read_req,
    roundtrip,
    run,
    segments,
    simple_req,
    write_req,
)
from trivmm.config import DiskConfig
from trivmm.devices.virtio.block import TRACK_CHUNK, BlockDevice, WriteTracker
from trivmm.errors import MigrationError
from trivmm.images import open_image
from trivmm.migration.storage import DiskReceiver
from trivmm.migration.stream import (
    HOT_VERSION,
    MAX_DISK_RUN_BYTES,
    VERSION,
    DiskRun,
    SectionKind,
    StreamDecoder,
    decode_disk_run,
    disk_run_parts,
    encode_header,
    encode_section,
)

RUN = struct.Struct("<IIQI")  # disk, flags, offset, length: docs/migration.md


@pytest.fixture(params=["trio", "asyncio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_writes_discards_and_zeroes_are_tracked_reads_and_flushes_are_not(tmp_path: Path, backend: str) -> None:
    image = open_image(raw_disk(tmp_path / "d.raw", pattern(1, 4 * MIB)))
    device = BlockDevice(image)
    chunk = TRACK_CHUNK // SECTOR  # sectors per chunk

    async def body(rig: Rig) -> None:
        (write,) = await roundtrip(rig, write_req(3, b"x" * SECTOR))
        assert write.status == OK and device.written is None  # no copy active: nothing recorded
        device.written = WriteTracker()
        done = await roundtrip(
            rig, read_req(10 * chunk, 8), simple_req(4, 0),  # a read and a flush: not writes
            write_req(chunk - 1, b"y" * 2 * SECTOR),  # straddles chunks 0 and 1
            simple_req(WZ, data=segments((5 * chunk, 1, 0))),
            simple_req(DISCARD, data=segments((7 * chunk + 3, chunk, 0))),  # chunks 7 and 8
        )  # fmt: skip
        assert [c.status for c in done] == [OK] * 5
        assert device.written.take() == [0, 1, 5, 7, 8]
        assert device.written.take() == []  # taken: the record starts afresh
        await roundtrip(rig, write_req(40 * chunk, b"z" * SECTOR))
        assert device.written.take() == [40]

    run(backend, device, body, size=16, slot_size=64 * 1024)
    image.close()


def test_the_tracker_marks_every_chunk_a_range_touches() -> None:
    tracker = WriteTracker()
    tracker.mark(TRACK_CHUNK - 1, 2)
    tracker.mark(10 * TRACK_CHUNK, 3 * TRACK_CHUNK)
    tracker.mark(99 * TRACK_CHUNK, 0)
    assert tracker.take() == [0, 1, 10, 11, 12]


# --- the stream ----------------------------------------------------------------------------------
def disk_section(payload: bytes, *, version: int = HOT_VERSION) -> bytes:
    return encode_header(version) + encode_section(0, SectionKind.DISK, "", payload)


@pytest.mark.parametrize("run", [DiskRun(0, 0, 4096, b"a" * 4096), DiskRun(3, 1 << 40, 1 << 31, resend=True),
                                 DiskRun(1, 512, MAX_DISK_RUN_BYTES, bytes(MAX_DISK_RUN_BYTES), True)])  # fmt: skip
def test_disk_runs_round_trip(run: DiskRun) -> None:
    decoder = StreamDecoder()
    decoder.feed(disk_section(b"".join(disk_run_parts(run))))
    section = decoder.next_section()
    assert section is not None and section.kind is SectionKind.DISK
    assert decode_disk_run(section.payload) == run


@pytest.mark.parametrize(("payload", "error"), [
    (b"\x00" * 19, "shorter than its 20-byte header"),
    (b"", "shorter"),
    (b"".join(disk_run_parts(DiskRun(0, 0, 512, b"a" * 512)))[:-1], "carries 511 bytes"),
    (RUN.pack(0, 4, 0, 512), "unknown flags 0x4"),
    (RUN.pack(0, 1, 100, 512), "not whole 512-byte sectors"),
    (RUN.pack(0, 1, 0, 0), "not whole"),  # no bytes at all
    (RUN.pack(0, 1, 0, 1000), "not whole"),
    (b"".join(disk_run_parts(DiskRun(0, 0, 512))) + b"a" * 512, "a zero disk section carries data"),
])  # fmt: skip
def test_hostile_disk_runs_are_refused(payload: bytes, error: str) -> None:
    with pytest.raises(MigrationError, match=error):
        decode_disk_run(payload)


def test_disk_sections_need_version_2_and_keep_their_limit() -> None:
    payload = b"".join(disk_run_parts(DiskRun(0, 0, 512, b"a" * 512)))
    decoder = StreamDecoder()
    decoder.feed(disk_section(payload, version=VERSION))
    with pytest.raises(MigrationError, match="a DISK section in a version 1 stream"):
        decoder.next_section()
    # A length over the limit is refused from the frame alone, before its bytes are awaited.
    oversized = encode_section(0, SectionKind.DISK, "", payload)
    frame = bytearray(oversized[:12])
    frame[8:12] = (MAX_DISK_RUN_BYTES + 21).to_bytes(4, "little")
    decoder = StreamDecoder()
    decoder.feed(encode_header(HOT_VERSION) + bytes(frame))
    with pytest.raises(MigrationError, match="over its limit"):
        decoder.next_section()
    with pytest.raises(ValueError, match="at most"):
        encode_section(0, SectionKind.DISK, "", bytes(MAX_DISK_RUN_BYTES + 21))


# --- the destination ---------------------------------------------------------------------------
def fake_vm(devices: list[BlockDevice], paths: list[Path]) -> object:
    return types.SimpleNamespace(virtio_devices=devices, config=types.SimpleNamespace(
        disks=[DiskConfig(path) for path in paths]))  # fmt: skip


def test_the_receiver_checks_each_run_and_writes_it(tmp_path: Path) -> None:
    size = 2 * MIB
    paths = [raw_disk(tmp_path / "a.raw", bytes(size)), raw_disk(tmp_path / "ro.raw", bytes(size))]
    devices = [BlockDevice(open_image(paths[0])), BlockDevice(open_image(paths[1], readonly=True))]
    receiver = DiskReceiver(fake_vm(devices, paths), ["/elsewhere/a.raw", "/elsewhere/ro.raw"])  # type: ignore[arg-type]
    content = pattern(2, size)

    def refused(run: DiskRun, error: str) -> None:
        with pytest.raises(MigrationError, match=error):
            receiver.check(run)

    async def main() -> None:
        refused(DiskRun(2, 0, 512), "disk run for disk 2; this VM has 2 disks")
        refused(DiskRun(1, 0, 512), "read-only here")
        refused(DiskRun(0, 512, 512), "at offset 512 of disk 0, where 0 was due")
        refused(DiskRun(0, 0, 512, resend=True), "only those below 0 were sent")
        for offset in range(0, size - MIB, MIB):
            run = DiskRun(0, offset, MIB, content[offset : offset + MIB])
            receiver.check(run)
            await receiver.write(run)
        refused(DiskRun(0, MIB, 2 * MIB), "runs past disk 0's 2097152 bytes here")
        with pytest.raises(MigrationError, match=r"disk 0: 1048576 of 2097152 bytes"):
            await receiver.finish()
        last = DiskRun(0, MIB, MIB)  # zero
        receiver.check(last)
        await receiver.write(last)
        again = DiskRun(0, 4096, 512, b"R" * 512, resend=True)
        receiver.check(again)
        await receiver.write(again)
        await receiver.finish()

    anyio.run(main)
    for device in devices:
        device.close()
    expected = content[:4096] + b"R" * 512 + content[4096 + 512 : MIB] + bytes(MIB)
    assert paths[0].read_bytes() == expected


def test_the_receiver_refuses_to_copy_into_the_source_image(tmp_path: Path) -> None:
    path = raw_disk(tmp_path / "shared.raw", bytes(MIB))
    device = BlockDevice(open_image(path))
    receiver = DiskReceiver(fake_vm([device], [path]), [str(path)])  # type: ignore[arg-type]
    with pytest.raises(MigrationError, match="into the source's own image"):
        receiver.check(DiskRun(0, 0, 512))
    anyio.run(receiver.finish)  # no copy: nothing to complete
    device.close()
