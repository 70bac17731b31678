"""Benchmarks, each a ratio or difference measured side by side in one run.

    python -m bench                 exit cost and start-up (about a minute), virtio-blk, density
    python -m bench --linux         also boot the small Debian-built guest to its init marker
    python -m bench --blk-only      only bench/virtio_blk.py (python -m bench.virtio_blk)
    python -m bench --density-only  only bench/density.py (python -m bench.density)
    python -m bench --display-only  only bench/display.py (python -m bench.display)
    python -m bench --migration-only  only bench/migration.py (python -m bench.migration)

1. PIO exit cost, one 32-bit `out` loop answered three ways, alternating in every round:
   - the C floor: ../shared/tools/kvm_exit_floor.c (compiled on the fly), a C loop that
     answers each exit with the next KVM_RUN (its own copy of the loop, in real mode);
   - the Python floor: bench/pyfloor.py, the cheapest exit loop CPython can run (one cffi
     KVM_RUN and one struct unpack per exit, nothing else), in a process of its own;
   - trivmm through its CLI, `python -m trivmm run --kernel <guest>`, the guest hammering
     port 0x70, the CMOS RTC index register that trivmm's own RTC model claims.
   Each way gets the same number of exits per round (--exits, default 61440).
   How the two Python processes are timed without their start-up: they run the same guest
   (bench/guests/exit_marks.S: the loop, with one byte written to the serial port every
   exits/3 exits, endlessly), which trivmm copies to stdout and the Python floor writes
   itself. Both start before the first round and are stopped (SIGSTOP) at their first byte.
   In a round each is continued (SIGCONT) three times, in turn, the other one stopped: from
   the first byte after a continue to the next one is one timed slice, every exit of it run
   without a stop in between; then it is stopped again, and bytes still in the pipe are
   dropped. Wall time per exit is the slice's span over its exits; process CPU per exit
   is the change over the same span of the run time of all the process's threads
   (/proc/PID/task/*/schedstat). What the bytes add: one serial exit per slice in both
   (counted), a pipe write, and trivmm's UART and console path once per ~0.2 s.
   Each round also runs the C floor, and trivmm's run loop through the Python API (in
   this process, a null device on port 0x12: the figure earlier versions of this
   benchmark printed). Ratios are taken per round (the host's exit cost drifts from second
   to second; a round's runs are seconds apart) and reported as median and range over
   rounds. The C floor shows what the host's exit costs, the Python floor what any CPython
   VMM pays on top, and trivmm CLI / Python floor what trivmm's own exit path costs. This
   machine is shared: the wall ratio moves with other load (a busy neighbour inflates the
   process with more code per exit more), the CPU ratio somewhat less.
2. Start-up: process start to the first serial byte of `python -m trivmm run` (built-in
   guest), against a process that only imports trio, cffi and attrs; medians of several.
3. (--linux) the small guest (PVH, 2 vCPUs) from process start to its init marker.
4. virtio-blk from a tiny guest polling at CPL3: 64 KiB sequential and 4 KiB random reads
   against the host's own reads of the same file, and the VMM's CPU per request
   (bench/virtio_blk.py, whose docstring says how).
5. Density: tiny VMs per second, per MiB, per process (bench/density.py).
6. Display: the VNC server's CPU for an idle and a busy screen (bench/display.py).
7. Migration: a 1 GiB guest dirtying 16 MiB/s migrated hot over loopback TCP, against the
   loopback's own rate and QEMU's migration of the same guest; a 512 MiB snapshot's restore
   (bench/migration.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench import density, display, migration, virtio_blk

ROOT = Path(__file__).resolve().parents[1]
FLOOR_SOURCE = Path(os.environ.get("TRIVMM_EXIT_FLOOR_C", ROOT.parent / "shared/tools/kvm_exit_floor.c"))
TEST_GUESTS = ROOT / "tests/kvm/guests"  # common.inc and the linker script of the tiny guests
MARKS_GUEST = Path(__file__).parent / "guests/exit_marks.S"
RTC_INDEX_PORT = 0x70  # trivmm's CMOS RTC claims it (trivmm/devices/rtc.py)
NULL_PORT = 0x12  # the API path's port, as in kvm_exit_floor.c
SLICES = 3  # slices per process per round, each from one mark to the next
MAX_EXITS = 65535  # what kvm_exit_floor.c takes (its guest counts in CX)
MARK_TIMEOUT = 30.0  # seconds without a mark before a process counts as hung
ENDLESS = 1_000_000  # marks in the guest the Python floor and the CLI run (hours of exits)


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds the live threads of ``pid`` have run (ns resolution, unlike rusage)."""
    total = 0
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            with open(f"{task_dir}/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total * 1e-9


def assemble_marks_guest(out_dir: Path, port: int, per_mark: int, marks: int) -> Path:
    """bench/guests/exit_marks.S as an ELF in ``out_dir``: ``marks`` times ``per_mark`` exits
    (the last of each a serial byte), the others to ``port``."""
    name = f"exit_marks_{port:#x}_{per_mark}_{marks}"
    obj, elf = out_dir / f"{name}.o", out_dir / f"{name}.elf"
    symbols = {"EXIT_PORT": port, "COUNT": per_mark - 1, "MARKS": marks}
    defsyms = [arg for sym, value in symbols.items() for arg in ("--defsym", f"{sym}={value}")]
    subprocess.run(["as", "--64", "-I", str(TEST_GUESTS), *defsyms, "-o", str(obj), str(MARKS_GUEST)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(TEST_GUESTS / "guest.ld"), "-n", "--build-id=none",
                    "--no-warn-rwx-segments", "-o", str(elf), str(obj)], check=True)  # fmt: skip
    return elf


def run_floor(binary: Path, exits: int) -> tuple[float, float]:
    """(wall seconds per exit as the floor reports it, process CPU seconds per exit)."""
    proc = subprocess.Popen([str(binary), str(exits)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"kvm_exit_floor failed: {out}")
    match = re.search(r"floor_us_per_exit ([\d.]+)", out)
    assert match, out
    return float(match.group(1)) * 1e-6, _cpu_seconds(usage) / exits


class NullPort:
    """A device that reads as zeros and ignores writes."""

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        pass


def run_trivmm(guest: Path, exits: int) -> tuple[float, float]:
    """(wall seconds per exit, process CPU seconds per exit) of trivmm's run loop, through
    the Python API in this process, with a ``NullPort`` on the guest's port."""
    from trivmm import VM, VmConfig

    async def main() -> tuple[float, float]:
        with VM(VmConfig(kernel=guest, memory="16M")) as vm:
            vm.pio.insert(NULL_PORT, 1, NullPort())
            cpu0, wall0 = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)), time.perf_counter()
            result = await vm.run()
            wall, cpu = time.perf_counter() - wall0, _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - cpu0
        assert result.exits >= exits, result
        return wall / exits, cpu / exits

    return trio.run(main)


@dataclasses.dataclass
class Span:
    """Wall and CPU seconds over a number of exits."""

    wall: float = 0.0
    cpu: float = 0.0
    exits: int = 0

    def __add__(self, other: Span) -> Span:
        return Span(self.wall + other.wall, self.cpu + other.cpu, self.exits + other.exits)

    def per_exit(self) -> tuple[float, float]:
        return self.wall / self.exits, self.cpu / self.exits


class MarkedProcess:
    """A process whose guest writes a byte to stdout every ``per_mark`` exits, run and timed
    in slices between SIGSTOPs (the module docstring says how)."""

    def __init__(self, name: str, argv: list[str], per_mark: int) -> None:
        self.name = name
        self.per_mark = per_mark
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._read()  # start-up done, the loop running
        self._stop()

    def _read(self) -> tuple[int, float, float]:
        """Wait for marks: (how many came in this read, wall clock, process CPU then)."""
        if not select.select([self._fd], [], [], MARK_TIMEOUT)[0]:
            raise SystemExit(f"{self.name}: no exit mark for {MARK_TIMEOUT:.0f} s")
        data = os.read(self._fd, 4096)
        wall = time.perf_counter()
        if not data:
            raise SystemExit(f"{self.name} ended early (exit status {self.proc.wait()})")
        return len(data), wall, _process_cpu(self.proc.pid)

    def _stop(self) -> None:
        """SIGSTOP, wait until every thread has stopped, and drop the marks still in the pipe."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + MARK_TIMEOUT
        while not _all_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} does not stop")
            time.sleep(0.0005)
        while select.select([self._fd], [], [], 0)[0] and os.read(self._fd, 4096):
            pass

    def run_slice(self) -> Span:
        """Continue the process from one mark to the next, and stop it again."""
        os.kill(self.proc.pid, signal.SIGCONT)
        try:
            _, wall0, cpu0 = self._read()  # the first mark since the continue starts the clock
            marks, wall1, cpu1 = self._read()
            return Span(wall1 - wall0, cpu1 - cpu0, marks * self.per_mark)
        finally:
            self._stop()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is in the stopped state (T in /proc/PID/task/*/stat)."""
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        with contextlib.suppress(OSError), open(f"{task_dir}/{tid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] not in ("T", "t"):
                return False
    return True


LABELS = {"c": "C floor (kvm_exit_floor.c, real mode)", "py": "Python floor (bench/pyfloor.py)",
          "cli": "trivmm CLI -> CMOS RTC, port 0x70", "api": "trivmm API -> null device, port 0x12"}  # fmt: skip


def measure_exits(per_mark: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per round and way (LABELS' keys), (wall, CPU) seconds per exit, over SLICES * per_mark
    exits each."""
    if not FLOOR_SOURCE.exists():
        raise SystemExit(f"no {FLOOR_SOURCE}: set TRIVMM_EXIT_FLOOR_C")
    n = SLICES * per_mark
    results: dict[str, list[tuple[float, float]]] = {key: [] for key in LABELS}
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        floor_binary = tmp / "kvm_exit_floor"
        subprocess.run([shutil.which("cc") or "gcc", "-O2", "-o", str(floor_binary), str(FLOOR_SOURCE)], check=True)
        endless = str(assemble_marks_guest(tmp, RTC_INDEX_PORT, per_mark, ENDLESS))
        api_guest = assemble_marks_guest(tmp, NULL_PORT, per_mark, SLICES)
        run_trivmm(assemble_marks_guest(tmp, NULL_PORT, 1000, 1), 1000)  # warm-up: imports, page faults
        argv = [sys.executable, "-m", "bench.pyfloor", endless, str(ENDLESS), str(per_mark)]
        pyfloor = MarkedProcess("python floor", argv, per_mark)
        stack.callback(pyfloor.close)
        cli = MarkedProcess("trivmm CLI", [sys.executable, "-m", "trivmm", "run", "--kernel", endless], per_mark)
        stack.callback(cli.close)
        for _ in range(rounds):
            results["c"].append(run_floor(floor_binary, n))
            spans = {"py": Span(), "cli": Span()}
            for i in range(SLICES):  # py, cli, cli, py, py, cli...: neither always goes first
                for key, proc in ((("py", pyfloor), ("cli", cli)) if i % 2 == 0 else (("cli", cli), ("py", pyfloor))):
                    spans[key] += proc.run_slice()
            results["py"].append(spans["py"].per_exit())
            results["cli"].append(spans["cli"].per_exit())
            results["api"].append(run_trivmm(api_guest, n))
    return results


def _summary(values: list[float]) -> str:
    ordered = sorted(v * 1e6 for v in values)
    return f"{statistics.median(ordered):6.2f} [{ordered[0]:6.2f}..{ordered[-1]:6.2f}]"


def _ratio_line(label: str, num: list[float], den: list[float], note: str = "") -> str:
    ratios = sorted(a / b for a, b in zip(num, den, strict=True))
    return f"    {label:<28} median {statistics.median(ratios):5.3f}  range {ratios[0]:.3f}..{ratios[-1]:.3f}{note}"


def bench_exits(exits: int, rounds: int) -> None:
    per_mark = min(exits, MAX_EXITS) // SLICES
    n = SLICES * per_mark
    results = measure_exits(per_mark, rounds)
    walls = {key: [wall for wall, _ in rows] for key, rows in results.items()}
    cpus = {key: [cpu for _, cpu in rows] for key, rows in results.items()}
    print(f"PIO exit, {n} exits per way per round x {rounds} rounds; per exit, median [min..max] over rounds")
    print("                                               wall us/exit             process CPU us/exit")
    for key, label in LABELS.items():
        print(f"  {label:<40} {_summary(walls[key])}   {_summary(cpus[key])}")
    for kind, table in (("wall", walls), ("process CPU", cpus)):
        print(f"  ratios per round ({kind}):")
        target = "   (target <= 1.10)" if kind == "wall" else ""
        print(_ratio_line("trivmm CLI / Python floor", table["cli"], table["py"], target))
        print(_ratio_line("Python floor / C floor", table["py"], table["c"]))
        print(_ratio_line("trivmm API / C floor", table["api"], table["c"]))
    extra = sorted((a - c) * 1e6 for a, c in zip(cpus["api"], cpus["c"], strict=True))
    print(f"  trivmm API CPU beyond the C floor's, per round  median {statistics.median(extra):5.2f} us/exit  "
          f"range {extra[0]:.2f}..{extra[-1]:.2f}")


def _first_byte_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"{argv} failed")
    return elapsed


def _exit_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    return time.perf_counter() - start


def bench_startup(rounds: int) -> None:
    imports = [sys.executable, "-c", "import trio, cffi, attrs"]
    trivmm_run = [sys.executable, "-m", "trivmm", "run"]
    baseline, first_byte = [], []
    _exit_seconds(imports)  # warm the page cache
    for _ in range(rounds):
        baseline.append(_exit_seconds(imports))
        first_byte.append(_first_byte_seconds(trivmm_run))
    b, f = statistics.median(baseline), statistics.median(first_byte)
    print(f"Start-up, {rounds} rounds (medians)")
    print(f"  python -c 'import trio, cffi, attrs' (to exit)        {b * 1e3:6.1f} ms")
    print(f"  python -m trivmm run (start to first serial byte)     {f * 1e3:6.1f} ms")
    print(f"  difference                                            {(f - b) * 1e3:+6.1f} ms   (target <= +60)")


def bench_linux(vcpus: int) -> None:
    from trivmm.guest.build import INIT_MARKER, default_cache_dir

    small = default_cache_dir() / "small"
    if not (small / "vmlinux").exists():
        raise SystemExit(f"no small guest in {small}: run `python -m trivmm guest build --small-only`")
    argv = [sys.executable, "-m", "trivmm", "run", "--kernel", str(small / "vmlinux"),
            "--initrd", str(small / "initramfs.cpio"), "--vcpus", str(vcpus)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    marker_at = None
    for line in proc.stdout:
        if INIT_MARKER.encode() in line and marker_at is None:
            marker_at = time.perf_counter() - start
            print(f"  guest says: {line.decode(errors='replace').strip()}")
    total = time.perf_counter() - start
    status = proc.wait()
    print(f"Linux boot: small Debian-built kernel, PVH, {vcpus} vCPUs, 128 MiB")
    print(f"  process start to init marker   {marker_at:.1f} s   (target <= 60 s on the nested host)"
          if marker_at is not None else "  init marker never seen")
    print(f"  process start to VM end        {total:.1f} s   (exit status {status})")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--exits", type=int, default=61440,
                        help=f"exits per way per round, rounded down to a multiple of {SLICES}, at most "
                             f"{MAX_EXITS} (default 61440)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--linux", action="store_true", help="also time the small Linux guest's boot")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--density-only", action="store_true", help="only bench/density.py (python -m bench.density)")
    only.add_argument("--blk-only", action="store_true", help="only bench/virtio_blk.py (python -m bench.virtio_blk)")
    only.add_argument("--display-only", action="store_true", help="only bench/display.py (python -m bench.display)")
    only.add_argument("--migration-only", action="store_true",
                      help="only bench/migration.py (python -m bench.migration)")  # fmt: skip
    args = parser.parse_args()
    if args.display_only:
        display.main([])
        return
    if args.migration_only:
        migration.main([])
        return
    print(f"trivmm benchmarks on {os.uname().nodename}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if not (args.density_only or args.blk_only):
        bench_exits(args.exits, args.rounds)
        bench_startup(max(args.rounds, 7))
    if args.linux:
        bench_linux(vcpus=2)
    if not args.density_only:
        virtio_blk.main([])  # virtio-blk from a guest polling at CPL3 (bench/virtio_blk.py)
    if not args.blk_only:
        density.main([])  # tiny VMs per second, per process, per MiB (bench/density.py)
    if not (args.density_only or args.blk_only):
        display.main([])  # the VNC server's CPU, idle and busy screen (bench/display.py)
        migration.main([])  # hot migration and restore, QEMU beside it (bench/migration.py)


if __name__ == "__main__":
    main()
