"""bench/migration.py at tiny sizes, so that the migration benchmark cannot rot: its guest
(bench/guests/paced_writer.S, PVH, long mode, CPL3) touches its RAM and then dirties pages,
trivmm migrates it hot over loopback TCP and restores a snapshot of it, QEMU (where it is
installed) migrates the same ELF, and the report holds consistent numbers. Nothing here
asserts a rate or a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from bench import migration

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
MIB = 24  # the guest dirties 8 MiB..MIB: 4096 pages touched, all sent in round 0


@pytest.fixture(scope="module")
def khz() -> int:
    return migration.tsc_khz()


def _consistent(out: migration.Outcome) -> None:
    assert out.error is None and out.continued
    assert out.rounds >= 2  # round 0 and the final one at least
    assert out.downtime is not None and 0 < out.downtime < out.total_time
    assert 0 <= out.setup_time < out.total_time
    assert out.transferred >= (MIB - 8) << 20  # every touched page, at least once
    assert out.dirty_rate > 0 and out.loopback > 0
    assert out.stream_rate > 0 and out.ratio == pytest.approx(out.stream_rate / out.loopback)


async def test_trivmm_migration_and_restore_report_consistent_numbers(
    tmp_path: Path, khz: int, capsys: pytest.CaptureFixture[str]
) -> None:
    elf = migration.assemble_guest(tmp_path, MIB, 16, khz)
    out = await migration.migrate_trivmm(elf, MIB, downtime_ms=30)
    _consistent(out)
    restore = await migration.restore_trivmm(elf, MIB, tmp_path)
    assert restore.error is None and restore.snapshot_bytes >= (MIB - 8) << 20
    assert 0 < restore.restore_call <= restore.to_running
    assert not list(tmp_path.glob("*.snap"))
    report = migration.Report(migration.Options(memory_mib=MIB, restore_mib=MIB, qemu=False), "now", khz, [out],
                              [restore], ["QEMU: not measured (--no-qemu)"])  # fmt: skip
    report.print()
    text = capsys.readouterr().out
    for expected in (f"trivmm -> trivmm, {MIB} MiB", "destination ran on from the source's counter: yes",
                     "(target >= 0.8)", "(target <= 30 ms)", f"Restore of a {MIB} MiB guest",
                     "(target <= 10 ms)"):  # fmt: skip
        assert expected in text, text


def test_qemu_migrates_the_same_guest(tmp_path: Path, khz: int) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("no qemu-system-x86_64 (python -m bench.migration installs Debian's qemu-system-x86)")
    elf = migration.assemble_guest(tmp_path, MIB, 16, khz)
    out = anyio.run(migration.migrate_qemu, qemu, elf, MIB, 30, tmp_path, backend="asyncio")  # qemu.qmp: asyncio
    _consistent(out)
    restore = anyio.run(migration.restore_qemu, qemu, elf, MIB, tmp_path, backend="asyncio")
    assert restore.error is None and restore.snapshot_bytes >= (MIB - 8) << 20
    assert 0 < restore.restore_call <= restore.to_running
