"""virtio-blk (trivmm/devices/virtio/block.py) against a model driver, no KVM.

Each test builds guest memory, a ``SplitQueue`` over it, the notification and interrupt
eventfds and an ``Activation`` (tests/unit/blk_driver.py), and runs ``device.serve`` in an
anyio task group under trio and under asyncio (every loop test is parametrized by backend).
Disks are raw files, qcow2 images made by qemu-img (``qemu-img check`` clean and ``qemu-img
compare`` equal to a model after the writes), or ``MemImage`` (a ``DiskImage`` over a
bytearray that can fail or block a request on purpose).

What a default run tries: 157 unit-test cases (parametrized cases counted; every loop test
under trio and under asyncio) and two state machines per backend. ``test_honest_driver``: 20
examples of up to 15 steps, each step a group of 1 to 8 random reads, writes, flushes,
discards, write-zeroes and GET_IDs (disjoint sectors, published in two parts, in random
descriptor layouts: split headers, scattered data, status sharing a descriptor, indirect
tables) against a bytearray model, on raw and qcow2 disks (``qemu-img check`` and the model
compared at the end); every request completed exactly once; about 800 requests per backend.
``test_hostile_driver``: 20 examples of up to 20 steps, the honest groups mixed with groups of
malformed requests (no header, unknown types, misaligned or out-of-range data, bad segments
and flags, too many descriptors, random headers), each with the statuses it may get, and
the device serving honest requests after them; a few hundred malformed requests per
backend. ``TRIVMM_BLK_EXAMPLES=N`` runs N examples of each (150 passed, in 2 minutes). About
20 s in all on this project's 2-core machines. ``TRIVMM_BLK_BENCH=1`` also runs
``test_throughput``: 64 KiB sequential reads against the host's ``pread`` of the same file,
and the VMM's CPU time per 4 KiB read.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.from_thread
import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.conftest import prerequisite_missing
from tests.unit.blk_driver import Buf, Completion, Rig, blk_buffers, header, segments
from tests.unit.images_helpers import as_raw, assert_clean, assert_same, qemu_img
from trivmm.devices.virtio.block import (
    BATCH_REQUESTS,
    BATCHES_IN_FLIGHT,
    CONFIG,
    ID_BYTES,
    MAX_DISCARD_SEG,
    MAX_REQUEST_BYTES,
    MAX_WRITE_ZEROES_SEG,
    SEG_MAX,
    SIZE_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlockDevice,
)
from trivmm.devices.virtio.device import DeviceType
from trivmm.devices.virtio.queue import DescriptorChain
from trivmm.errors import ConfigError
from trivmm.images import DiskImage, ImageError, open_image

KIB, MIB = 1 << 10, 1 << 20
SECTOR = 512
OK, IOERR, UNSUPP = VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP
IN, OUT, FLUSH, GET_ID = VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID
DISCARD, WZ = VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES
KNOWN_TYPES = {IN, OUT, FLUSH, GET_ID, DISCARD, WZ}
EXAMPLES = int(os.environ.get("TRIVMM_BLK_EXAMPLES", "20"))

Spec = tuple[list[Buf], bool, object]  # what Rig.submit takes: buffers, indirect, tag


@pytest.fixture(params=["trio", "asyncio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _install_qemu() -> str | None:
    """Why qemu-img is missing after trying to install Debian's qemu-utils, or None."""
    if shutil.which("qemu-img") is None:
        from trivmm.guest.build import ensure_debian_packages

        try:
            ensure_debian_packages(["qemu-utils"])
        except Exception as exc:
            return f"cannot install Debian's qemu-utils: {exc}"
    return None if shutil.which("qemu-img") else "Debian's qemu-utils is not installed (needs root and apt)"


@pytest.fixture(scope="session")
def qemu() -> None:
    """qemu-img (Debian's qemu-utils), installed if missing."""
    problem = _install_qemu()
    if problem is not None:
        prerequisite_missing("qemu-img", problem)


# --- disks -------------------------------------------------------------------------------------
class MemImage(DiskImage):
    """A disk in a bytearray. ``fail``: the operations that raise ``ImageError`` (and
    ``bad_sectors``: reads touching them fail); ``gate``: the operations in ``gated`` wait for
    it (``entered`` says one is waiting)."""

    format = "mem"

    def __init__(self, size: int, *, readonly: bool = False, granularity: int = SECTOR) -> None:
        super().__init__("mem", size=size, readonly=readonly)
        self.data = bytearray(size)
        self.discard_granularity = granularity
        self.fail: set[str] = set()
        self.bad_sectors: set[int] = set()
        self.gate: threading.Event | None = None
        self.gated = {"read", "write", "flush"}
        self.entered = threading.Event()
        self.calls: list[tuple[str, int, int]] = []
        self.threads: set[int] = set()

    def _note(self, what: str, offset: int, length: int) -> None:
        self.calls.append((what, offset, length))
        self.threads.add(threading.get_ident())
        if self.gate is not None and what in self.gated:
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        if what in self.fail:
            raise self.error(f"{what} failed on purpose")

    def _read(self, offset: int, length: int) -> bytes:
        self._note("read", offset, length)
        if any(offset // SECTOR <= s < (offset + length + SECTOR - 1) // SECTOR for s in self.bad_sectors):
            raise self.error("bad sector")
        return bytes(self.data[offset : offset + length])

    def _write(self, offset: int, data: memoryview) -> None:
        self._note("write", offset, len(data))
        self.data[offset : offset + len(data)] = data

    def _discard(self, offset: int, length: int) -> None:
        self._note("discard", offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._note("write_zeroes", offset, length)
        self.data[offset : offset + length] = bytes(length)

    def _flush(self) -> None:
        self._note("flush", 0, 0)

    def _close(self) -> None:
        pass


def raw_disk(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def qcow2_disk(path: Path, size: int, *, cluster: int = 64 * KIB) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, str(size))
    return path


# --- requests ----------------------------------------------------------------------------------
def read_req(sector: int, count: int, *, wcuts: tuple[int, ...] | None = None, indirect: bool = False,
             tag: object = None) -> Spec:  # fmt: skip
    """A read as Linux lays it out: header, data, status (each its own descriptor)."""
    length = count * SECTOR
    return blk_buffers(header(IN, sector), length + 1, [16], (length,) if wcuts is None else wcuts), indirect, tag


def write_req(sector: int, data: bytes, *, rcuts: tuple[int, ...] | None = None, indirect: bool = False,
              tag: object = None) -> Spec:  # fmt: skip
    return blk_buffers(header(OUT, sector) + data, 1, (16,) if rcuts is None else rcuts), indirect, tag


def simple_req(kind: int, sector: int = 0, data: bytes = b"", writable: int = 1, tag: object = None) -> Spec:
    return blk_buffers(header(kind, sector) + data, writable, [16], [writable - 1]), False, tag


def run(backend: str, device: BlockDevice, body: Callable[[Rig], Awaitable[None]], **rig_options: int) -> Rig:
    """Serve ``device`` in a task group while ``body`` drives it; return the rig afterwards."""
    rig = Rig.make(device, **rig_options)

    async def main() -> None:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(device.serve, rig.active)
            await body(rig)
            task_group.cancel_scope.cancel()

    try:
        anyio.run(main, backend=backend)
    finally:
        rig.close()
    return rig


async def roundtrip(rig: Rig, *specs: Spec) -> list[Completion]:
    """Submit ``specs`` together; their completions, in submission order."""
    made = rig.submit(specs)
    done = {c.request.head: c for c in await rig.wait(len(made))}
    return [done[request.head] for request in made]


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


# --- configuration -----------------------------------------------------------------------------
def config_fields(device: BlockDevice) -> dict[str, int]:
    names = (
        "capacity size_max seg_max cylinders heads sectors blk_size physical_block_exp alignment_offset "
        "min_io_size opt_io_size writeback unused0 num_queues max_discard_sectors max_discard_seg "
        "discard_sector_alignment max_write_zeroes_sectors max_write_zeroes_seg write_zeroes_may_unmap"
    ).split()
    return dict(zip(names, CONFIG.unpack(bytes(device.config)), strict=True))


def test_config_layout_is_the_spec_struct() -> None:
    """Offsets of struct virtio_blk_config, read through read_config as a driver would."""
    device = BlockDevice(MemImage(3 * MIB + 700, granularity=64 * KIB), serial="x")
    assert len(device.config) == 60
    read = {}
    for name, offset, fmt in [("capacity", 0, "<Q"), ("size_max", 8, "<I"), ("seg_max", 12, "<I"),
                              ("blk_size", 20, "<I"), ("writeback", 32, "<B"), ("num_queues", 34, "<H"),
                              ("max_discard_sectors", 36, "<I"), ("max_discard_seg", 40, "<I"),
                              ("discard_sector_alignment", 44, "<I"), ("max_write_zeroes_sectors", 48, "<I"),
                              ("max_write_zeroes_seg", 52, "<I"), ("write_zeroes_may_unmap", 56, "<B")]:  # fmt: skip
        buf = bytearray(struct.calcsize(fmt))
        device.read_config(offset, memoryview(buf))
        read[name] = struct.unpack(fmt, buf)[0]
    assert read == {
        "capacity": (3 * MIB + 700) // 512, "size_max": SIZE_MAX, "seg_max": SEG_MAX, "blk_size": 512,
        "writeback": 0, "num_queues": 1, "max_discard_sectors": 128 * MIB // 512,
        "max_discard_seg": MAX_DISCARD_SEG, "discard_sector_alignment": 128,
        "max_write_zeroes_sectors": 128 * MIB // 512, "max_write_zeroes_seg": MAX_WRITE_ZEROES_SEG,
        "write_zeroes_may_unmap": 1,
    }  # fmt: skip
    tail = bytearray(b"\xff" * 40)
    device.read_config(56, memoryview(tail))  # write_zeroes_may_unmap, unused1, then nothing: zeros
    assert tail == b"\x01" + bytes(39)
    assert device.device_type == DeviceType.BLOCK == 2 and device.queue_sizes == (256,)


@pytest.mark.parametrize(("image_ro", "forced"), [(False, False), (True, False), (False, True)])
def test_features_follow_read_only(image_ro: bool, forced: bool) -> None:
    device = BlockDevice(MemImage(MIB, readonly=image_ro), readonly=forced)
    common = {VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH}
    bits = {bit for bit in range(64) if device.device_features >> bit & 1}
    fields = config_fields(device)
    if image_ro or forced:
        assert device.readonly and bits == common | {VIRTIO_BLK_F_RO}
        assert fields["max_discard_sectors"] == fields["max_write_zeroes_sectors"] == 0
        assert fields["write_zeroes_may_unmap"] == 0
    else:
        assert not device.readonly and bits == common | {VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES}


@pytest.mark.parametrize("serial", ["é", "x" * 21, "serial-number-too-long"])
def test_serial_must_be_ascii_of_at_most_20_bytes(serial: str) -> None:
    with pytest.raises(ConfigError, match="serial"):
        BlockDevice(MemImage(MIB), serial=serial)


def test_qcow2_discard_alignment_is_the_cluster(tmp_path: Path, qemu: None) -> None:
    with open_image(qcow2_disk(tmp_path / "d.qcow2", 8 * MIB, cluster=16 * KIB)) as image:
        fields = config_fields(BlockDevice(image))
    assert fields["discard_sector_alignment"] == 32 and fields["capacity"] == 16384


def test_close_closes_the_image_and_logs_a_failed_flush(caplog: pytest.LogCaptureFixture) -> None:
    image = MemImage(MIB)
    BlockDevice(image).close()
    assert image.calls == [("flush", 0, 0)]
    with pytest.raises(ImageError, match="closed"):
        image.read(0, SECTOR)
    failing = MemImage(MIB)
    failing.fail = {"flush"}
    device = BlockDevice(failing)
    device.close()
    device.close()  # idempotent
    assert "closing the image failed: mem: flush failed on purpose" in caplog.text


# --- reads and writes --------------------------------------------------------------------------
def layouts(length: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Cut points for ``length`` bytes of data: whole, pages, odd pieces."""
    odd = tuple(sorted(rng.sample(range(1, length), min(5, length - 1)))) if length > 1 else ()
    return [(), tuple(range(4096, length, 4096)), odd]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_read_write_round_trip(tmp_path: Path, backend: str, fmt: str, qemu: None) -> None:
    size = 4 * MIB
    initial = pattern(1, size) if fmt == "raw" else bytes(size)
    path = raw_disk(tmp_path / "d.raw", initial) if fmt == "raw" else qcow2_disk(tmp_path / "d.qcow2", size)
    model = bytearray(initial)
    rng = random.Random(7)
    image = open_image(path)
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        for i, (sector, count) in enumerate([(0, 1), (7, 3), (100, 8), (8191 - 16, 16), (2040, 130), (3, 64)]):
            data = pattern(100 + i, count * SECTOR)
            cuts = layouts(len(data), rng)[i % 3]
            (done,) = await roundtrip(rig, write_req(sector, data, rcuts=(16, *(16 + c for c in cuts)),
                                                     indirect=i % 2 == 1))  # fmt: skip
            assert (done.status, done.used_len) == (OK, 1)
            model[sector * SECTOR : sector * SECTOR + len(data)] = data
            for wcuts in layouts(len(data), rng):
                (done,) = await roundtrip(rig, read_req(sector, count, wcuts=(*wcuts, len(data)), indirect=i % 2 == 0))
                assert (done.status, done.used_len) == (OK, len(data) + 1)
                assert done.data == model[sector * SECTOR : sector * SECTOR + len(data)]
        # Many at once, adjacent: the device reads them in one go and hands each its part.
        reads = [read_req(64 + 4 * i, 4, tag=i, indirect=True) for i in range(40)]
        for i, done in enumerate(await roundtrip(rig, *reads)):
            assert done.status == OK and done.data == model[(64 + 4 * i) * SECTOR : (68 + 4 * i) * SECTOR]
        (done,) = await roundtrip(rig, simple_req(FLUSH))
        assert done.status == OK

    run(backend, device, body, slot_size=80 * KIB)
    image.close()
    assert device.errors == 0
    if fmt == "qcow2":
        assert_clean(path)
        assert_same(path, bytes(model))
    else:
        assert path.read_bytes() == model


def test_the_last_partial_sector_is_not_addressable(backend: str) -> None:
    image = MemImage(10 * SECTOR + 100)
    image.data[:] = pattern(3, len(image.data))
    device = BlockDevice(image)
    assert device.capacity == 10

    async def body(rig: Rig) -> None:
        last, past, zero_at_end, zero_past = await roundtrip(
            rig, read_req(9, 1), read_req(10, 1), simple_req(IN, 10, writable=1), simple_req(IN, 11, writable=1)
        )
        assert last.status == OK and last.data == image.data[9 * SECTOR : 10 * SECTOR]
        assert (past.status, zero_at_end.status, zero_past.status) == (IOERR, OK, IOERR)

    run(backend, device, body)


def test_read_only_disk(tmp_path: Path, backend: str) -> None:
    path = raw_disk(tmp_path / "ro.raw", pattern(5, MIB))
    image = open_image(path, readonly=True)
    device = BlockDevice(image)
    assert device.device_features >> VIRTIO_BLK_F_RO & 1

    async def body(rig: Rig) -> None:
        out, read, flush, discard, zeroes, empty_out = await roundtrip(
            rig, write_req(0, b"\xee" * SECTOR), read_req(0, 2), simple_req(FLUSH),
            simple_req(DISCARD, data=segments((0, 8, 0))), simple_req(WZ, data=segments((0, 8, 0))),
            write_req(4, b""))  # fmt: skip
        assert (out.status, out.used_len) == (IOERR, 1)
        assert read.status == OK and read.data == pattern(5, MIB)[: 2 * SECTOR]
        assert flush.status == OK
        assert (discard.status, zeroes.status) == (UNSUPP, UNSUPP)  # not offered on a read-only disk
        assert empty_out.status == IOERR  # a write, even of nothing

    run(backend, device, body)
    image.close()
    assert path.read_bytes() == pattern(5, MIB)


def test_forced_read_only_over_a_writable_image(backend: str) -> None:
    image = MemImage(MIB)
    device = BlockDevice(image, readonly=True)

    async def body(rig: Rig) -> None:
        (done,) = await roundtrip(rig, write_req(0, b"\x01" * SECTOR))
        assert done.status == IOERR

    run(backend, device, body)
    assert not image.readonly and image.data == bytes(MIB) and not image.calls


# --- GET_ID, FLUSH, DISCARD, WRITE_ZEROES ---------------------------------------------------------
@pytest.mark.parametrize(("serial", "length", "reply"), [
    ("trivmm-0001", 20, b"trivmm-0001" + bytes(9)),
    ("a" * 20, 20, b"a" * 20),  # 20 bytes: no NUL terminator
    (None, 20, bytes(20)),
    ("trivmm-0001", 8, b"trivmm-0"),  # a short buffer gets what fits
    ("trivmm-0001", 0, b""),
    ("trivmm-0001", 32, b"trivmm-0001" + bytes(9)),  # a longer one: 20 bytes, the status at its end
])  # fmt: skip
def test_get_id(backend: str, serial: str | None, length: int, reply: bytes) -> None:
    device = BlockDevice(MemImage(MIB), serial=serial)

    async def body(rig: Rig) -> None:
        (done,) = await roundtrip(rig, simple_req(GET_ID, writable=length + 1))
        assert done.status == OK and done.used_len == len(reply) + 1
        assert done.data[: len(reply)] == reply

    run(backend, device, body)
    assert device.image.calls == []  # type: ignore[attr-defined]


def test_flush_reaches_the_image_and_its_failure_is_ioerr(backend: str) -> None:
    image = MemImage(MIB)
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        write, flush = await roundtrip(rig, write_req(2, b"\x07" * SECTOR), simple_req(FLUSH, sector=99))
        assert (write.status, flush.status) == (OK, OK)
        assert [call[0] for call in image.calls] == ["write", "flush"]  # one batch, in ring order
        image.fail = {"flush"}
        (flush,) = await roundtrip(rig, simple_req(FLUSH))
        assert (flush.status, flush.used_len) == (IOERR, 1)
        image.fail = set()
        (flush,) = await roundtrip(rig, simple_req(FLUSH))
        assert flush.status == OK

    run(backend, device, body)


def test_flush_covers_writes_completed_before_it(backend: str) -> None:
    """What the spec asks: a FLUSH sent after a write completed is done after that write."""
    image = MemImage(MIB)
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        for i in range(8):
            (write,) = await roundtrip(rig, write_req(i, bytes([i]) * SECTOR))
            assert write.status == OK
            (flush,) = await roundtrip(rig, simple_req(FLUSH))
            assert flush.status == OK and image.calls[-2:] == [("write", i * SECTOR, SECTOR), ("flush", 0, 0)]

    run(backend, device, body)


def test_discard_and_write_zeroes_on_raw(tmp_path: Path, backend: str) -> None:
    content = pattern(9, 2 * MIB)
    path = raw_disk(tmp_path / "d.raw", content)
    image = open_image(path)
    device = BlockDevice(image)
    model = bytearray(content)

    async def body(rig: Rig) -> None:
        zero, zero_unmap, discard = await roundtrip(
            rig, simple_req(WZ, data=segments((8, 8, 0), (100, 3, 0))),
            simple_req(WZ, data=segments((200, 64, 1))),
            simple_req(DISCARD, data=segments((1024, 1024, 0), (10, 1, 0))))  # fmt: skip
        assert (zero.status, zero_unmap.status, discard.status) == (OK, OK, OK)
        assert zero.used_len == 1
        for sector, count in [(8, 8), (100, 3), (200, 64)]:
            model[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
        (read,) = await roundtrip(rig, read_req(0, 264))
        unknown = range(10 * SECTOR, 11 * SECTOR)  # discarded: the spec leaves what it reads to the device
        assert read.status == OK
        assert read.data[: unknown.start] == model[: unknown.start]
        assert read.data[unknown.stop :] == model[unknown.stop : 264 * SECTOR]

    run(backend, device, body, size=16, slot_size=140 * KIB)
    image.close()
    data = path.read_bytes()
    assert data[: 10 * SECTOR] == model[: 10 * SECTOR] and data[11 * SECTOR : MIB // 2] == model[11 * SECTOR : MIB // 2]
    assert data[MIB // 2 : MIB] == bytes(MIB // 2)  # raw punches a hole, which reads as zeros
    assert data[MIB:] == model[MIB:]


def test_discard_and_write_zeroes_on_qcow2(tmp_path: Path, backend: str, qemu: None) -> None:
    path = qcow2_disk(tmp_path / "d.qcow2", 4 * MIB, cluster=4 * KIB)
    image = open_image(path)
    device = BlockDevice(image)
    model = bytearray(4 * MIB)

    async def body(rig: Rig) -> None:
        data = pattern(11, 2 * MIB)
        (done,) = await roundtrip(rig, write_req(0, data[: MIB // 2], indirect=True))
        assert done.status == OK
        model[: MIB // 2] = data[: MIB // 2]
        # Whole clusters (8 sectors): discarded clusters of a qcow2 without backing file read as zeros.
        discard, zeroes, partial = await roundtrip(
            rig, simple_req(DISCARD, data=segments((16, 16, 0), (64, 8, 0))),
            simple_req(WZ, data=segments((200, 24, 1), (300, 5, 0))),
            simple_req(WZ, data=segments((401, 2, 1))))  # fmt: skip
        assert (discard.status, zeroes.status, partial.status) == (OK, OK, OK)
        for sector, count in [(16, 16), (64, 8), (200, 24), (300, 5), (401, 2)]:
            model[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
        (read,) = await roundtrip(rig, read_req(0, 512))
        assert read.status == OK and read.data == model[: 512 * SECTOR]

    run(backend, device, body, size=16, slot_size=520 * KIB)
    image.close()
    assert_clean(path)
    assert_same(path, bytes(model))


@pytest.mark.parametrize(("kind", "data", "status"), [
    (DISCARD, segments((0, 8, 1)), UNSUPP),  # UNMAP on a discard: the spec's MUST
    (DISCARD, segments((0, 8, 0), (16, 8, 4)), UNSUPP),  # an unknown flag in any segment
    (WZ, segments((0, 8, 2)), UNSUPP),
    (WZ, segments((0, 8, 0x8000_0001)), UNSUPP),
    (DISCARD, b"", IOERR),  # no segment
    (WZ, segments((0, 8, 0))[:15], IOERR),  # not a multiple of 16 bytes
    (DISCARD, segments(*[(i, 1, 0) for i in range(MAX_DISCARD_SEG + 1)]), IOERR),
    (WZ, segments(*[(i, 1, 0) for i in range(MAX_WRITE_ZEROES_SEG + 1)]), IOERR),
    (DISCARD, segments((2047, 2, 0)), IOERR),  # past the end (2048 sectors)
    (WZ, segments((0, 1, 0), (2 ** 64 - 1, 1, 0)), IOERR),
    (WZ, segments((2048, 0, 0)), OK),  # nothing, at the end
    (DISCARD, segments(*[(i * 64, 64, 0) for i in range(MAX_DISCARD_SEG)]), OK),
])  # fmt: skip
def test_discard_and_write_zeroes_checks(backend: str, kind: int, data: bytes, status: int) -> None:
    image = MemImage(MIB)
    image.data[:] = b"\x55" * MIB
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        (done,) = await roundtrip(rig, simple_req(kind, data=data))
        assert (done.status, done.used_len) == (status, 1)

    run(backend, device, body)
    if status != OK:
        assert image.calls == [] and image.data == b"\x55" * MIB


# --- what the driver gets wrong ------------------------------------------------------------------
def _oversized(rig: Rig) -> Spec:
    """A read of more than MAX_REQUEST_BYTES in few descriptors that overlap each other."""
    half = MAX_REQUEST_BYTES // 2 + SECTOR
    return [Buf(header(IN, 0)), Buf(half, rig.scratch), Buf(half, rig.scratch), Buf(1)], False, None


def _too_many_descriptors(rig: Rig) -> Spec:
    data_pieces = SEG_MAX + 1
    return [Buf(header(IN, 0)), *[Buf(8) for _ in range(data_pieces - 1)], Buf(SECTOR * 2 - 8 * (data_pieces - 1)),
            Buf(1)], True, None  # fmt: skip


BAD_REQUESTS: dict[str, Callable[[Rig], Spec]] = {
    "no header": lambda rig: (blk_buffers(b"", 1), False, None),
    "15-byte header": lambda rig: (blk_buffers(header(IN, 0)[:15], 1), False, None),
    "read of 511 bytes": lambda rig: (blk_buffers(header(IN, 0), 512, [16], [511]), False, None),
    "read of 513 bytes": lambda rig: (blk_buffers(header(IN, 0), 514, [16], [513]), False, None),
    "write of 1000 bytes": lambda rig: write_req(0, b"\x01" * 1000),
    "read past the end": lambda rig: read_req(2047, 2),
    "read at the last sector + 1": lambda rig: read_req(2048, 1),
    "read at sector 2**64-1": lambda rig: read_req(2**64 - 1, 1),
    "write at sector 2**55": lambda rig: write_req(2**55, b"\x01" * SECTOR),
    "read of more than MAX_REQUEST_BYTES": _oversized,
    "read in more than seg_max descriptors": _too_many_descriptors,
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_ioerr_and_the_device_serves_on(backend: str, case: str) -> None:
    image = MemImage(MIB)
    image.data[:] = pattern(2, MIB)
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        bad, good = await roundtrip(rig, BAD_REQUESTS[case](rig), read_req(1, 1))
        assert (bad.status, bad.used_len) == (IOERR, 1)
        assert good.status == OK and good.data == image.data[SECTOR : 2 * SECTOR]

    rig = run(backend, device, body, extra=MAX_REQUEST_BYTES // 2 + SECTOR)
    assert rig.broken == [] and device.ioerr == 1
    assert [call[0] for call in image.calls] == ["read"]  # the bad one reached nothing
    assert image.data == pattern(2, MIB)


def test_the_limits_themselves_are_fine(backend: str) -> None:
    """Exactly MAX_REQUEST_BYTES, and exactly seg_max data descriptors."""
    image = MemImage(MAX_REQUEST_BYTES + MIB)
    image.data[:] = pattern(4, len(image.data))
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        whole, pieces = await roundtrip(
            rig, ([Buf(header(IN, 1)), Buf(MAX_REQUEST_BYTES, rig.scratch), Buf(1)], False, None),
            ([Buf(header(IN, 0)), *[Buf(SECTOR) for _ in range(SEG_MAX)], Buf(1)], True, None))  # fmt: skip
        assert whole.status == OK and whole.used_len == MAX_REQUEST_BYTES + 1
        assert rig.memory.read(rig.scratch, MAX_REQUEST_BYTES) == image.data[SECTOR : SECTOR + MAX_REQUEST_BYTES]
        assert pieces.status == OK and pieces.data == image.data[: SEG_MAX * SECTOR]

    run(backend, device, body, slot_size=SEG_MAX * SECTOR + 8 * KIB, extra=MAX_REQUEST_BYTES)


@pytest.mark.parametrize("kind", [2, 3, 5, 6, 7, 9, 10, 12, 14, 15, 16, 26, 0x8000_0000, 0x8000_0001, 2**32 - 1])
def test_unknown_request_types_are_unsupp(backend: str, kind: int) -> None:
    device = BlockDevice(MemImage(MIB))

    async def body(rig: Rig) -> None:
        (done,) = await roundtrip(rig, simple_req(kind, data=b"\x00" * SECTOR, writable=SECTOR + 1))
        assert (done.status, done.used_len) == (UNSUPP, 1)

    run(backend, device, body)
    assert device.unsupp == 1


HEADER_SPLITS = [(1,), (8,), (15,), (3, 9), tuple(range(1, 16)), (4, 8, 12)]


@pytest.mark.parametrize("cuts", HEADER_SPLITS)
@pytest.mark.parametrize("indirect", [False, True])
def test_a_header_split_across_descriptors(backend: str, cuts: tuple[int, ...], indirect: bool) -> None:
    image = MemImage(MIB)
    image.data[:] = pattern(6, MIB)
    device = BlockDevice(image)
    data = pattern(60, 2 * SECTOR)

    async def body(rig: Rig) -> None:
        # OUT: the header's pieces, then data in the same descriptor as the header's last bytes.
        write = blk_buffers(header(OUT, 20) + data, 1, cuts)
        read = blk_buffers(header(IN, 20, reserved=0xFFFF_FFFF), 2 * SECTOR + 1, cuts, [100])  # status with data
        get_id = blk_buffers(header(GET_ID), ID_BYTES + 1, cuts)
        w, r, i = await roundtrip(rig, (write, indirect, None), (read, indirect, None), (get_id, indirect, None))
        assert (w.status, w.used_len) == (OK, 1)
        assert (r.status, r.used_len, r.data) == (OK, 2 * SECTOR + 1, data)
        assert (i.status, i.data) == (OK, bytes(ID_BYTES))

    run(backend, device, body)


def test_lenient_layouts(backend: str) -> None:
    """What QEMU accepts too: bytes after an IN's header, writable bytes before an OUT's
    status, an OUT whose data is all writable (a write of nothing), a FLUSH with data."""
    image = MemImage(MIB)
    image.data[:] = pattern(8, MIB)
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        read, write, nothing, flush = await roundtrip(
            rig, (blk_buffers(header(IN, 1) + b"junk" * 10, SECTOR + 1, [16], [SECTOR]), False, None),
            (blk_buffers(header(OUT, 1) + b"\x09" * SECTOR, 64, [16], [10]), False, None),
            (blk_buffers(header(OUT, 1), SECTOR + 1, [16], [SECTOR]), False, None),
            simple_req(FLUSH, data=b"\x00" * 100, writable=50))  # fmt: skip
        assert (read.status, read.data) == (OK, pattern(8, MIB)[SECTOR : 2 * SECTOR])
        assert (write.status, write.used_len) == (OK, 1) and write.writable[:-1] == bytes(63)
        assert (nothing.status, nothing.used_len) == (OK, 1)
        assert (flush.status, flush.used_len) == (OK, 1)

    run(backend, device, body)
    assert image.data[SECTOR : 2 * SECTOR] == b"\x09" * SECTOR


def test_image_errors_are_ioerr_for_that_request_only(backend: str) -> None:
    image = MemImage(MIB)
    image.data[:] = pattern(10, MIB)
    image.bad_sectors = {13}
    device = BlockDevice(image)

    async def body(rig: Rig) -> None:
        # Adjacent reads are read together; the failure of the merged read falls back to one
        # read each, so only the request that holds the bad sector fails.
        done = await roundtrip(rig, *[read_req(s, 2, tag=s) for s in range(0, 24, 2)])
        for completion in done:
            sector = completion.request.tag
            assert isinstance(sector, int)
            if sector == 12:
                assert (completion.status, completion.used_len) == (IOERR, 1)
                assert completion.data == bytes(2 * SECTOR)  # nothing written
            else:
                assert completion.status == OK
                assert completion.data == image.data[sector * SECTOR : (sector + 2) * SECTOR]
        image.fail = {"write"}
        write, read = await roundtrip(rig, write_req(0, b"\x01" * SECTOR), read_req(0, 1))
        assert (write.status, read.status) == (IOERR, OK)

    run(backend, device, body)
    assert device.ioerr == 2


# --- threads, batches, resets ----------------------------------------------------------------
def test_file_io_runs_on_worker_threads_and_interrupts_once_per_batch(backend: str) -> None:
    image = MemImage(MIB)
    device = BlockDevice(image)
    specs = [write_req(i, bytes([i]) * SECTOR) for i in range(20)] + [read_req(i, 1) for i in range(20, 40)] \
        + [simple_req(FLUSH), simple_req(GET_ID, writable=21)]  # fmt: skip
    loop_thread = threading.get_ident()
    rig = Rig.make(device, size=256)

    async def main() -> None:
        rig.submit(specs)  # all available before the device looks: one batch
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(device.serve, rig.active)
            done = await rig.wait(len(specs))
            task_group.cancel_scope.cancel()
        assert [c.status for c in done] == [OK] * len(specs)

    try:
        anyio.run(main, backend=backend)
    finally:
        rig.close()
    assert rig.interrupts == 1
    assert image.threads and loop_thread not in image.threads


@pytest.mark.parametrize("kind", [IN, OUT, FLUSH])
def test_a_reset_while_the_io_runs_drops_the_request(backend: str, kind: int) -> None:
    """The device is reset while the request's IO is on the worker thread: afterwards nothing
    is written into guest memory and no used entry appears; the next activation works. A read
    goes straight into the guest's buffers, so the reset waits for it (the drain): the data
    may land before the reset returns, never after."""
    image = MemImage(MIB)
    image.data[:] = pattern(12, MIB)
    image.gate = threading.Event()
    device = BlockDevice(image)
    rig = Rig.make(device)
    spec = {IN: read_req(0, 8), OUT: write_req(0, b"\x01" * SECTOR, rcuts=(16, 100)), FLUSH: simple_req(FLUSH)}[kind]

    async def main() -> None:
        async with anyio.create_task_group() as task_group:
            scope = anyio.CancelScope()

            async def backend_task() -> None:
                with scope:
                    await device.serve(rig.active)

            task_group.start_soon(backend_task)
            (request,) = rig.submit([spec])
            for gpa, length in request.writable:
                rig.memory.fill(gpa, length, 0xAA)
            with anyio.fail_after(10):
                while not image.entered.is_set():
                    await anyio.sleep(0.001)
            assert image.gate is not None
            if kind == IN:
                opener = threading.Timer(0.3, image.gate.set)
                opener.start()
                started = time.monotonic()
                rig.reset()  # the transport's reset: generation bumped under the lock, queue reset
                assert time.monotonic() - started >= 0.25, "the reset did not wait for the read"
                opener.join()
                expected = [rig.memory.read(gpa, length) for gpa, length in request.writable]
            else:
                rig.reset()
                image.gate.set()
                expected = [b"\xaa" * length for _gpa, length in request.writable]
            with anyio.fail_after(10):
                while device.dropped == 0:
                    await anyio.sleep(0.001)
            assert [rig.memory.read(gpa, length) for gpa, length in request.writable] == expected
            assert rig.ring.used_idx() == 0 and rig.interrupts == 0
            scope.cancel()  # what the transport does after the reset
            # The driver sets the device up again: a new activation serves.
            image.gate = None
            rig.restart()
            task_group.start_soon(device.serve, rig.active)
            (done,) = await roundtrip(rig, read_req(3, 1))
            assert done.status == OK and done.data == image.data[3 * SECTOR : 4 * SECTOR]
            task_group.cancel_scope.cancel()

    try:
        anyio.run(main, backend=backend)
    finally:
        rig.close()
    assert device.dropped == 1 and rig.broken == []


def test_a_chain_without_a_status_byte_breaks_the_device(backend: str) -> None:
    """DEVICE_NEEDS_RESET: the chains before it complete, it and those after it do not; after
    the driver's reset the device serves again."""
    image = MemImage(MIB)
    device = BlockDevice(image)
    rig = Rig.make(device)

    async def main() -> None:
        async with anyio.create_task_group() as task_group:
            scope = anyio.CancelScope()

            async def backend_task() -> None:
                with scope:
                    await device.serve(rig.active)

            task_group.start_soon(backend_task)
            good, bad, _ = rig.submit([read_req(0, 1), (blk_buffers(header(IN, 0), 0), False, None), read_req(1, 1)])
            (done,) = await rig.wait(1)
            assert done.request is good and done.status == OK
            with anyio.fail_after(10):
                while not rig.broken:
                    await anyio.sleep(0.001)
            await anyio.sleep(0.05)
            assert rig.ring.collect() == []  # neither the bad chain nor the one after it
            assert rig.broken == [f"a request (chain at head {bad.head}) has no device-writable byte for its status"]
            scope.cancel()  # the transport cancels the backend of a broken device; the driver resets it
            rig.reset()
            rig.restart()
            task_group.start_soon(device.serve, rig.active)
            (done,) = await roundtrip(rig, read_req(1, 1))
            assert done.status == OK
            task_group.cancel_scope.cancel()

    try:
        anyio.run(main, backend=backend)
    finally:
        rig.close()
    assert len(rig.broken) == 1


def test_requests_in_flight_are_bounded(backend: str) -> None:
    """No more than BATCHES_IN_FLIGHT batches are taken up at once, whatever the ring holds:
    the rest stay descriptor chains, not data in the VMM's memory."""
    image = MemImage(MIB)
    image.gate = threading.Event()
    device = BlockDevice(image)
    parsed = []
    parse = device._parse

    def counting_parse(chain: DescriptorChain) -> object:
        parsed.append(chain.head)
        return parse(chain)

    device._parse = counting_parse  # type: ignore[assignment,method-assign]

    async def body(rig: Rig) -> None:
        rig.submit([read_req(i * 2, 1, indirect=True) for i in range(200)])
        with anyio.fail_after(10):
            while len(parsed) < BATCHES_IN_FLIGHT * BATCH_REQUESTS:
                await anyio.sleep(0.001)
        await anyio.sleep(0.1)
        assert len(parsed) == BATCHES_IN_FLIGHT * BATCH_REQUESTS and device.completed == 0
        assert image.gate is not None
        image.gate.set()
        done = await rig.wait(200)
        assert all(c.status == OK for c in done) and len(parsed) == 200

    run(backend, device, body, size=256)


# --- the state machines --------------------------------------------------------------------------
CAPACITY = 96  # sectors of the state machines' disks
QCOW2_CLUSTER = 4 * KIB
SERIAL = "hypothesis-0"
sectors = st.integers(0, CAPACITY - 1)


@attrs.frozen
class Op:
    """One honest request: its kind, where, how its descriptors are cut."""

    kind: int
    sector: int = 0
    count: int = 0
    seed: int = 0
    extents: tuple[tuple[int, int, int], ...] = ()
    rcuts: tuple[int, ...] = ()
    wcuts: tuple[int, ...] = ()
    indirect: bool = False
    status_apart: bool = True

    def touched(self) -> set[int]:
        if self.kind in (IN, OUT):
            return set(range(self.sector, self.sector + self.count))
        return {s for sector, count, _ in self.extents for s in range(sector, sector + count)}

    def spec(self) -> Spec:
        length = self.count * SECTOR
        if self.kind == IN:
            cuts = (*self.wcuts, length) if self.status_apart else self.wcuts
            return blk_buffers(header(IN, self.sector), length + 1, self.rcuts, cuts), self.indirect, self
        if self.kind == OUT:
            data = pattern(self.seed, length)
            return blk_buffers(header(OUT, self.sector) + data, 1, self.rcuts), self.indirect, self
        if self.kind in (DISCARD, WZ):
            return blk_buffers(header(self.kind) + segments(*self.extents), 1, self.rcuts), self.indirect, self
        if self.kind == GET_ID:
            return blk_buffers(header(GET_ID), self.count + 1, self.rcuts, self.wcuts), self.indirect, self
        return blk_buffers(header(FLUSH), 1, self.rcuts), self.indirect, self


header_cuts = st.sampled_from([(16,), (16,), (16,), (8, 16), (1, 2, 3, 16), (5,)])


@st.composite
def ops(draw: st.DrawFn) -> Op:
    kind = draw(st.sampled_from([IN, IN, OUT, OUT, FLUSH, DISCARD, WZ, GET_ID]))
    rcuts = draw(header_cuts)
    indirect = draw(st.booleans())
    if kind in (IN, OUT):
        sector = draw(sectors)
        count = draw(st.integers(0, min(16, CAPACITY - sector)))
        length = count * SECTOR
        pieces = tuple(draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4))) if length > 1 else ()
        if kind == OUT:
            return Op(OUT, sector, count, draw(st.integers(0, 2**32)), rcuts=(*rcuts, *(16 + p for p in pieces)),
                      indirect=indirect)  # fmt: skip
        return Op(IN, sector, count, rcuts=rcuts, wcuts=pieces, indirect=indirect, status_apart=draw(st.booleans()))
    if kind in (DISCARD, WZ):
        extents = []
        for _ in range(draw(st.integers(1, 4))):
            sector = draw(sectors)
            count = draw(st.integers(0, min(24, CAPACITY - sector)))
            flags = draw(st.sampled_from([0, 1])) if kind == WZ else 0
            extents.append((sector, count, flags))
        return Op(kind, extents=tuple(extents), rcuts=(*rcuts, *draw(st.sampled_from([(), (20,), (32, 48)]))),
                  indirect=indirect)  # fmt: skip
    if kind == GET_ID:
        return Op(GET_ID, count=draw(st.sampled_from([20, 20, 8, 0, 25])), rcuts=rcuts, indirect=indirect)
    return Op(FLUSH, rcuts=rcuts, indirect=indirect)


@attrs.frozen
class Bad:
    """A malformed request: its buffers and the statuses it may get."""

    what: str
    bufs: tuple[Buf, ...]
    statuses: frozenset[int]
    indirect: bool = False
    read: tuple[int, int] | None = None  # (sector, count) of a read that may succeed


@st.composite
def bad_requests(draw: st.DrawFn) -> Bad:
    case = draw(st.sampled_from(["no header", "unknown type", "misaligned read", "misaligned write", "past the end",
                                 "segments", "flags", "many descriptors", "random header", "empty write"]))  # fmt: skip
    indirect = draw(st.booleans())
    writable = draw(st.integers(1, 600))

    def bufs(readable: bytes, wsize: int = writable) -> tuple[Buf, ...]:
        cuts = draw(st.lists(st.integers(1, 64), max_size=3))
        wcuts = draw(st.lists(st.integers(1, 700), max_size=3))
        return tuple(blk_buffers(readable, wsize, cuts, wcuts))

    if case == "no header":
        return Bad(case, bufs(draw(st.binary(max_size=15))), frozenset({IOERR}), indirect)
    if case == "unknown type":
        kind = draw(st.integers(0, 2**32 - 1).filter(lambda k: k not in KNOWN_TYPES))
        return Bad(case, bufs(header(kind, draw(st.integers(0, 2**64 - 1))) + draw(st.binary(max_size=40))),
                   frozenset({UNSUPP}), indirect)  # fmt: skip
    if case == "misaligned read":
        length = draw(st.integers(1, 3000).filter(lambda n: n % SECTOR))
        return Bad(case, bufs(header(IN, draw(sectors)), length + 1), frozenset({IOERR}), indirect)
    if case == "misaligned write":
        length = draw(st.integers(1, 3000).filter(lambda n: n % SECTOR))
        return Bad(case, bufs(header(OUT, draw(sectors)) + b"\xbd" * length), frozenset({IOERR}), indirect)
    if case == "past the end":
        count = draw(st.integers(1, 4))
        sector = draw(st.one_of(st.integers(CAPACITY - count + 1, CAPACITY + 8), st.integers(CAPACITY, 2**64 - 1)))
        kind = draw(st.sampled_from([IN, OUT]))
        data = b"\xbd" * (count * SECTOR) if kind == OUT else b""
        return Bad(case, bufs(header(kind, sector) + data, count * SECTOR + 1 if kind == IN else writable),
                   frozenset({IOERR}), indirect)  # fmt: skip
    if case == "segments":
        kind = draw(st.sampled_from([DISCARD, WZ]))
        body = draw(st.one_of(st.binary(max_size=15), st.binary(min_size=17, max_size=47).filter(lambda b: len(b) % 16),
                              st.just(segments(*[(0, 1, 0)] * 33)),
                              st.just(segments((CAPACITY - 1, 2, 0))), st.just(segments((2**63, 1, 0)))))  # fmt: skip
        return Bad(case, bufs(header(kind) + body), frozenset({IOERR}), indirect)
    if case == "flags":
        kind = draw(st.sampled_from([DISCARD, WZ]))
        flags = draw(st.integers(1, 2**32 - 1).filter(lambda f: f & ~(0 if kind == DISCARD else 1)))
        return Bad(case, bufs(header(kind) + segments((0, 1, 0), (4, 4, flags))), frozenset({UNSUPP}), indirect)
    if case == "many descriptors":
        return Bad(case, (Buf(header(IN, 0)), *[Buf(4) for _ in range(SEG_MAX + 1)], Buf(SECTOR - 4 * (SEG_MAX + 1)),
                          Buf(1)), frozenset({IOERR}), True)  # fmt: skip
    if case == "random header":  # a type that writes nothing: what it gets follows from the fields
        kind = draw(st.sampled_from([IN, FLUSH, GET_ID, 3, 0xFFFF_FFFF]))
        sector = draw(st.one_of(sectors, st.integers(0, 2**64 - 1)))
        raw = struct.pack("<IIQ", kind, draw(st.integers(0, 2**32 - 1)), sector) + draw(st.binary(max_size=8))
        wsize = draw(st.sampled_from([writable, SECTOR + 1, 2 * SECTOR + 1]))
        if kind == IN:
            length = wsize - 1
            fits = length % SECTOR == 0 and sector * SECTOR + length <= CAPACITY * SECTOR
            statuses = frozenset({OK}) if fits else frozenset({IOERR})
            return Bad(case, bufs(raw, wsize), statuses, indirect, (sector, length // SECTOR) if fits else None)
        return Bad(case, bufs(raw, wsize), frozenset({OK} if kind in (FLUSH, GET_ID) else {UNSUPP}), indirect)
    # "empty write": an OUT with no device-readable data: a write of nothing
    return Bad(case, bufs(header(OUT, draw(sectors))), frozenset({OK}), indirect)


class BlkMachine(RuleBasedStateMachine):
    """A disk behind a device served on an event loop in another thread (a blocking portal),
    driven from the test's thread as a guest would, against a bytearray model."""

    backend = "trio"
    qcow2 = False

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()  # the temporary directory
        self.loop = contextlib.ExitStack()  # the event loop's thread (a blocking portal)
        self.known = [True] * CAPACITY  # False: discarded, what it reads is the device's choice
        self.model = bytearray(CAPACITY * SECTOR)
        self.completed = 0
        self.bad = 0

    @initialize(fmt=st.sampled_from(["raw", "qcow2"]), seed=st.integers(0, 1000))
    def setup(self, fmt: str, seed: int) -> None:
        self.fmt = fmt if self.qcow2 else "raw"
        self.dir = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="trivmm-blk-")))
        if self.fmt == "raw":
            self.model[:] = pattern(seed, len(self.model))
            self.path = raw_disk(self.dir / "d.raw", bytes(self.model))
        else:
            self.path = qcow2_disk(self.dir / "d.qcow2", CAPACITY * SECTOR, cluster=QCOW2_CLUSTER)
        self.image = open_image(self.path)
        self.device = BlockDevice(self.image, serial=SERIAL)
        self.rig = Rig.make(self.device, size=64, slot_size=24 * KIB)
        portal = self.loop.enter_context(anyio.from_thread.start_blocking_portal(self.backend))
        self.future = portal.start_task_soon(self.device.serve, self.rig.active)

    def teardown(self) -> None:
        try:
            if hasattr(self, "future"):
                self.future.cancel()
                self.loop.close()
                assert self.rig.ring.in_flight == 0
                self.image.close()
                if self.fmt == "qcow2":
                    assert_clean(self.path)
                    disk = as_raw(self.path, "qcow2")
                    for sector in range(CAPACITY):
                        if self.known[sector]:
                            assert disk[sector * SECTOR : (sector + 1) * SECTOR] == self.sector(sector), sector
        finally:
            self.loop.close()
            self.stack.close()
            if hasattr(self, "rig"):
                self.rig.close()

    def sector(self, sector: int) -> bytes:
        return bytes(self.model[sector * SECTOR : (sector + 1) * SECTOR])

    def check_read(self, sector: int, data: bytes) -> None:
        for i in range(len(data) // SECTOR):
            if self.known[sector + i]:
                assert data[i * SECTOR : (i + 1) * SECTOR] == self.sector(sector + i), f"sector {sector + i}"

    @rule(group=st.lists(ops(), min_size=1, max_size=8), split=st.integers(0, 8))
    def honest(self, group: list[Op], split: int) -> None:
        """Requests that touch disjoint sectors (reads may share), published in two parts."""
        chosen: list[Op] = []
        written: set[int] = set()
        read: set[int] = set()
        for op in group:
            touched = op.touched()
            writes = op.kind in (OUT, DISCARD, WZ)
            if touched & written or (writes and touched & read):
                continue
            if writes and len(touched) < sum(count for _, count, _ in op.extents):  # overlapping extents
                continue
            chosen.append(op)
            (written if writes else read).update(touched)
        made = self.rig.submit([op.spec() for op in chosen[:split]]) if chosen[:split] else []
        made += self.rig.submit([op.spec() for op in chosen[split:]]) if chosen[split:] else []
        done = self.rig.wait_sync(len(made))
        assert sorted(c.request.head for c in done) == sorted(r.head for r in made)  # each exactly once
        for completion in done:
            tag = completion.request.tag
            assert isinstance(tag, Op)
            assert completion.status == OK, (tag, completion.status)
            self.apply(tag, completion)
        self.completed += len(done)

    def apply(self, op: Op, completion: Completion) -> None:
        if op.kind == IN:
            assert completion.used_len == op.count * SECTOR + 1
            self.check_read(op.sector, completion.data)
        elif op.kind == OUT:
            self.model[op.sector * SECTOR : (op.sector + op.count) * SECTOR] = pattern(op.seed, op.count * SECTOR)
            for s in range(op.sector, op.sector + op.count):
                self.known[s] = True
        elif op.kind == WZ:
            for sector, count, _ in op.extents:
                self.model[sector * SECTOR : (sector + count) * SECTOR] = bytes(count * SECTOR)
                for s in range(sector, sector + count):
                    self.known[s] = True
        elif op.kind == DISCARD:
            for sector, count, _ in op.extents:
                for s in range(sector, sector + count):
                    self.known[s] = False
        elif op.kind == GET_ID:
            assert completion.data[: min(op.count, ID_BYTES)] == SERIAL.encode().ljust(ID_BYTES, b"\0")[: op.count]

    @invariant()
    def device_alive(self) -> None:
        if hasattr(self, "future"):
            assert not self.future.done(), self.future.exception() if self.future.done() else None
            assert self.rig.broken == []


class HostileMachine(BlkMachine):
    """The honest steps, and groups of malformed requests between them."""

    @rule(requests=st.lists(bad_requests(), min_size=1, max_size=5))
    def malformed(self, requests: list[Bad]) -> None:
        made = self.rig.submit([(list(bad.bufs), bad.indirect, bad) for bad in requests])
        done = self.rig.wait_sync(len(made))
        assert len(done) == len(made)
        for completion in done:
            bad = completion.request.tag
            assert isinstance(bad, Bad)
            assert completion.status in bad.statuses, (bad.what, completion.status, bad)
            if completion.status != OK:
                assert completion.used_len == 1
            elif bad.read is not None:
                self.check_read(bad.read[0], completion.data[: bad.read[1] * SECTOR])
        self.bad += len(done)


def _machine_settings(steps: int) -> settings:
    return settings(max_examples=EXAMPLES, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip


def _have_qcow2() -> bool:
    return _install_qemu() is None


def test_honest_driver(backend: str) -> None:
    machine = type("Honest", (BlkMachine,), {"backend": backend, "qcow2": _have_qcow2()})
    run_state_machine_as_test(machine, settings=_machine_settings(15))


def test_hostile_driver(backend: str) -> None:
    machine = type("Hostile", (HostileMachine,), {"backend": backend, "qcow2": _have_qcow2()})
    run_state_machine_as_test(machine, settings=_machine_settings(20))


# --- throughput (opt-in) ---------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("TRIVMM_BLK_BENCH"), reason="TRIVMM_BLK_BENCH=1 runs the benchmark")
def test_throughput(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "bench.raw"
    size = 128 * MIB
    with path.open("wb") as f:
        for i in range(size // MIB):
            f.write(pattern(i, MIB))
    for block, depth, total in [(64 * KIB, 128, 4000), (4 * KIB, 128, 20000)]:
        host = _host_rate(path, block)
        rate, cpu = _device_rate(backend, path, block, depth, total)
        print(f"\n{backend}: {block // KIB} KiB reads, {depth} in flight: {rate / 1e9:.2f} GB/s, host pread "
              f"{host / 1e9:.2f} GB/s ({rate / host:.2f}x); VMM CPU {cpu:.1f} us per request")  # fmt: skip


def _host_rate(path: Path, block: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        start = time.perf_counter()
        for offset in range(0, size, block):
            os.pread(fd, block, offset)
        return size / (time.perf_counter() - start)
    finally:
        os.close(fd)


def _device_rate(backend: str, path: Path, block: int, depth: int, total: int) -> tuple[float, float]:
    """Sequential reads of ``block`` bytes, ``depth`` in flight, by a driver that only rewrites
    each header's sector and the avail ring (its cost is small next to the device's)."""
    image = open_image(path, readonly=True)
    device = BlockDevice(image)
    rig = Rig.make(device, size=256, slot_size=block + 8 * KIB)
    ring, memory = rig.ring, rig.memory
    made = [ring.add(blk_buffers(header(IN, 0), block + 1, [16], [block]), indirect=True) for _ in range(depth)]
    ring.pending = 0
    headers = {r.head: ring.data_addr + r.head * ring.slot_size + 4096 for r in made}
    sectors_total, step = image.size // SECTOR, block // SECTOR
    state = {"sector": 0, "done": 0}

    def submit(heads: list[int]) -> None:
        for head in heads:
            memory.write(headers[head], header(IN, state["sector"]))
            state["sector"] = (state["sector"] + step) % sectors_total
            memory.write_u16(ring.avail_addr + 4 + 2 * (ring.avail_idx % ring.size), head)
            ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        memory.write_u16(ring.avail_addr + 2, ring.avail_idx)
        rig.notifier.signal()

    result: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(device.serve, rig.active)
            start, cpu = time.perf_counter(), time.process_time()
            submit(list(headers))
            while state["done"] < total:
                used = ring.used_idx()
                if used == ring.last_used:
                    await rig.irq.wait()
                    continue
                heads = []
                while ring.last_used != used:
                    heads.append(memory.read_u32(ring.used_addr + 4 + 8 * (ring.last_used % ring.size)))
                    ring.last_used = (ring.last_used + 1) & 0xFFFF
                state["done"] += len(heads)
                submit(heads)
            result[:] = [time.perf_counter() - start, time.process_time() - cpu]
            task_group.cancel_scope.cancel()

    try:
        anyio.run(main, backend=backend)
    finally:
        rig.close()
        image.close()
    assert device.errors == 0
    return state["done"] * block / result[0], result[1] / state["done"] * 1e6
