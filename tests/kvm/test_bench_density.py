"""bench/density.py at tiny sizes, so that the density benchmark cannot rot: every part of
it runs (no QEMU) and what it measures is checked to be there and sane."""

from __future__ import annotations

import math
import os
import sys

import pytest

from bench import density
from trivmm.guest.builtin import BUILTIN_GREETING
from trivmm.kvm import Kvm

pytestmark = [pytest.mark.kvm]


async def test_density_at_tiny_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    Kvm.shared()  # the process's /dev/kvm fd, which outlives every VM by design
    fds = density.fd_count()
    opts = density.Options(sizes=(1, 2), many=3, seconds=0.5, ramp=0.1, probe_samples=2, samples=2,
                           qemu=False, install=False, process_runs=0)  # fmt: skip
    report = await density.run_density(opts)

    seq = report.sequential
    assert len(seq.construct) == len(seq.enter) == len(seq.first_byte) == 2
    assert all(0 < t < 10 for t in seq.construct + seq.enter)
    assert all(f >= e for e, f in zip(seq.enter, seq.first_byte, strict=True))  # the guest ran after the enter
    assert sorted(report.rates) == [1, 2]
    for n, rate in report.rates.items():
        assert rate.failures == [], n  # every VM powered off
        assert rate.completed >= 1 and rate.per_second > 0 and rate.seconds > 0
        assert rate.user_seconds + rate.system_seconds > 0
        assert len(rate.latency.enter) == rate.completed
    assert len(report.rates[2].latency.construct) == 2  # the probe beside 2 in flight
    assert report.rates[1].latency.construct == []

    assert sorted(report.memories) == [("built", 1), ("built", 2), ("paused", 1), ("paused", 2)]
    for (state, n), memory in report.memories.items():
        assert memory.state == state and memory.n == n
        assert memory.guest_resident_kib >= 4  # the loader wrote the kernel into guest RAM
        assert memory.fds_per_vm >= 2  # the VM, its vCPU (and the run page's mapping)
        assert all(math.isfinite(v) for v in (memory.extra_kib_per_vm, memory.kernel_kib_per_vm))
        assert 0 <= memory.paused <= n and (memory.paused == 0) == (state == "built")

    many = report.many
    assert many is not None
    assert (many.built, many.wanted, many.error) == (3, 3, None)
    assert many.memory.fds_per_vm >= 2 and many.build_seconds > 0 and many.close_seconds > 0
    assert report.processes == []
    assert density.fd_count() <= fds  # every VM's fds closed again (the GC may close others)

    report.print()
    out = capsys.readouterr().out
    for text in ("VMs powered off + released per second", "Rss per extra VM beyond guest RAM",
                 "3 VMs built (not run) and held at once in this process: yes", "trivmm in process, N=2"):  # fmt: skip
        assert text in out, out


GREETER = f"import sys, time; sys.stdout.buffer.write({BUILTIN_GREETING!r}); time.sleep(0.2); sys.exit(3)"


@pytest.mark.parametrize("gnu_time", [True, False])
def test_run_process_measures_a_child(gnu_time: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if gnu_time and not os.path.exists(density.GNU_TIME):
        pytest.skip(f"no {density.GNU_TIME}")
    if not gnu_time:
        monkeypatch.setattr(density, "GNU_TIME", "/nonexistent/time")
    wall, max_rss, cpu = density.run_process([sys.executable, "-c", GREETER], 3, BUILTIN_GREETING)
    assert 0.2 <= wall < 30
    # A bare interpreter's Rss: MiBs, but under this process's high-water mark, which a child
    # forked from this process reports as its ru_maxrss after exec if measured naively.
    own_hwm = density._kib_fields("/proc/self/status", ("VmHWM",))["VmHWM"]
    assert 1024 < max_rss < own_hwm
    assert cpu >= 0 if gnu_time else math.isnan(cpu)
    with pytest.raises(RuntimeError, match="exit status 3 \\(expected 0\\)"):
        density.run_process([sys.executable, "-c", GREETER], 0, BUILTIN_GREETING)
