"""bench/virtio_blk.py at tiny sizes, so that the virtio-blk benchmark cannot rot: its guest
(bench/guests/blk_reader.S) drives the disk over virtio-mmio from CPL3 and every request must
come back OK with the sectors asked for; a disk of the wrong data must be caught; and the
report must hold sane numbers. Nothing here asserts a rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import virtio_blk

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
DISK_BYTES = 8 << 20  # 128 requests of 64 KiB: the sequential run below wraps twice


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
async def test_every_request_comes_back_with_its_sectors(tmp_path: Path, indirect: bool) -> None:
    disk = tmp_path / "disk.raw"
    virtio_blk.write_disk(disk, DISK_BYTES)
    depth = 100 if indirect else 64  # with indirect tables: more requests than one device batch
    for workload in virtio_blk.default_workloads(seq_count=300, rand_count=700):
        elf = virtio_blk.assemble_reader(tmp_path, workload, disk_bytes=DISK_BYTES, depth=depth, indirect=indirect)
        offsets = virtio_blk.request_offsets(workload, DISK_BYTES)
        run = await virtio_blk.run_guest(elf, disk, workload, offsets=offsets, timeout=30)
        results = run.results
        assert run.problem() is None, run.problem()
        assert results["done"] == workload.count == run.device_completed
        assert results["errors"] == results["mismatches"] == results["fail"] == run.device_errors == 0
        assert results["sector_sum"] == virtio_blk.sector_sum(offsets)
        assert results["finished"] == 1 and results["fault"] == virtio_blk.FAULT_GP and run.reason == "poweroff"
        assert 1 <= results["kicks"] <= workload.count  # EVENT_IDX: the device asked for some
        assert run.cpu is not None and run.seconds > 0
        assert run.cpu.vmm > 0 and run.cpu.vcpu > 0 and 0 <= run.cpu.loop <= run.cpu.vmm * 1.05 + 1e-3


async def test_notifications_take_no_exit_to_the_vmm(tmp_path: Path) -> None:
    """The guest's QueueNotify writes are KVM ioeventfds: the VMM sees the set-up's exits
    and the power-off, whatever the number of notifications."""
    disk = tmp_path / "disk.raw"
    virtio_blk.write_disk(disk, DISK_BYTES)
    workload = virtio_blk.Workload("4 KiB random", 4096, True, 400)
    elf = virtio_blk.assemble_reader(tmp_path, workload, disk_bytes=DISK_BYTES, depth=2)
    run = await virtio_blk.run_guest(elf, disk, workload, timeout=30)
    assert run.problem() is None, run.problem()
    assert run.results["kicks"] >= 100 and run.exits < 50, (run.results["kicks"], run.exits)


async def test_wrong_data_is_caught(tmp_path: Path) -> None:
    disk = tmp_path / "zeros.raw"
    virtio_blk.write_disk(disk, DISK_BYTES, numbered=False)
    workload = virtio_blk.Workload("4 KiB random", 4096, True, 200)
    elf = virtio_blk.assemble_reader(tmp_path, workload, disk_bytes=DISK_BYTES, depth=16)
    run = await virtio_blk.run_guest(elf, disk, workload, timeout=30)
    assert run.results["done"] == 200 and run.results["errors"] == 0
    assert run.results["mismatches"] == 200  # every request: sector 0 alone starts with its number, 0
    assert run.results["bad_seen"] == 0
    problem = run.problem()
    assert problem is not None and "wrong data" in problem


def test_the_host_reads_what_the_guest_asks_for() -> None:
    seq, rand = virtio_blk.default_workloads(seq_count=10, rand_count=1000)
    assert virtio_blk.request_offsets(seq, 4 << 20) == [(k % 64) * 65536 for k in range(10)]
    offsets = virtio_blk.request_offsets(rand, 4 << 20)
    assert all(offset % 4096 == 0 and 0 <= offset < 4 << 20 for offset in offsets)
    assert len(set(offsets)) > 550  # spread over the 1024 blocks (about 638 distinct expected)
    with pytest.raises(ValueError, match="power-of-two"):
        virtio_blk.request_offsets(rand, 3 << 20)
    with pytest.raises(ValueError, match="request count"):
        virtio_blk.Workload("too many", 4096, True, 1 << 16)  # the guest's 16-bit ring indices would wrap


async def test_the_report_holds_sane_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opts = virtio_blk.Options(rounds=2, disk_mib=8, depth=32, seq_count=200, rand_count=400, directory=tmp_path)
    report = await virtio_blk.run_blk(opts)
    assert [w.name for w in report.workloads] == ["64 KiB sequential", "4 KiB random"]
    assert len(report.rounds) == 2
    for workload in report.workloads:
        for measurement in report.series(workload):
            guest = measurement.guest
            assert guest.problem() is None and guest.cpu is not None
            for value in (guest.bytes_per_second, guest.iops, measurement.host_bytes_per_second, measurement.ratio,
                          guest.cpu.vmm, guest.cpu.vcpu):  # fmt: skip
                assert math.isfinite(value) and value > 0
            assert guest.iops * workload.request_bytes == pytest.approx(guest.bytes_per_second)
    assert math.isfinite(report.elapsed) and report.load_average >= 0
    assert not list(tmp_path.iterdir())  # the disk and the guests went with their temporary directory

    report.print()
    out = capsys.readouterr().out
    for text in ("64 KiB sequential reads, 200 per run", "4 KiB random reads, 400 per run", "guest / host",
                 "(target >= 0.5)", "VMM CPU per request", "(target <= 15 for 4 KiB)", "os.pread"):  # fmt: skip
        assert text in out, out
