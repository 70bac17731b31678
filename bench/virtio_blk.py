"""virtio-blk read rate from a guest, against the host's own reads of the same file.

    python -m bench.virtio_blk                  (also a part of `python -m bench`)
    python -m bench.virtio_blk --rounds 3 --disk-mib 64 --seq-count 4096 --rand-count 8192

The guest is bench/guests/blk_reader.S, under 2 KiB of x86-64 entered by the 64-bit boot
protocol, with one virtio-blk disk on virtio-mmio (``VmConfig(transport="mmio",
disks=[DiskConfig(path, "raw", readonly=True)])``), 64 MiB of RAM and one vCPU, run in this
process under trio through the public API (``trivmm.open_vm``). It initialises the device at
CPL0 (a few dozen MMIO exits), then drops to CPL3 -- native speed on the project's nested
host, where CPL0 code is emulated -- and keeps ``--depth`` requests in flight (128 by
default; each request's header, data and status descriptors in an indirect table, as Linux
lays a block request out, or with ``--no-indirect`` in the ring's own table, up to 64): it
polls the used ring, checks each completed request (status OK; the first u64 of the buffer
and of its last 512-byte sector are the sector numbers asked for: the disk file starts every
sector with its own number), re-submits, and notifies the queue (a 32-bit QueueNotify write,
which KVM serves through the VM's ioeventfd: no exit to the VMM) only when the device asked
for it (VIRTIO_F_RING_EVENT_IDX). ``used_event`` is kept far away, so the device raises no
interrupts. Two workloads: 64 KiB sequential reads (walking the disk, wrapping) and 4 KiB
random reads (4 KiB-aligned offsets from a xorshift64 PRNG the guest runs at CPL3). The
guest also sums the sectors it asked for; the benchmark checks the sum against the offsets
the host reads.

The disk is a raw file of ``--disk-mib`` MiB in a temporary directory (``--dir``, default
the system's), read once beforehand, so every read here, the guest's and the host's, is a
page-cache read. The host's reference is this process reading the same file with
``os.pread``, one thread, the same request size, the same offsets in the same order and
the same number of requests (the offsets are computed beforehand; the timed loop is only
the preads).

What is timed, in a guest run: the guest sets READY in its results block (guest RAM at
0x5000) once its rings and buffers are set up (every data page touched once: a page's first
touch costs a shadow-paging fault on the nested host), and spins at CPL3; a thread of this
benchmark (``blk-bench-timer``, polling guest RAM every ``POLL_INTERVAL``) takes the
process's CPU figures and the clock and sets GO; the guest submits its first requests. When
the guest has checked its last request it sets FINISHED; the timer thread reads the clock
and the CPU figures again (it sees FINISHED at most ``POLL_INTERVAL`` late, while the VMM
is idle) and sets ACK; the guest then powers off. Rates are requests (and bytes) over that
span.

The VMM's CPU time over the span is the process's CPU time (``getrusage``: every thread,
those that ended included) less that of the vCPU thread (``trivmm-vcpu0``, from
/proc/self/task/*/schedstat: the guest's own time -- it spins at CPL3 while it polls -- and
the ioeventfd notifications it takes in the host kernel) and of the timer thread. That is
the event loop (ring parsing, batch completion) and the worker threads (the preads and the
copies into guest memory); ``VMM CPU per request`` divides it by the requests done, and is
what predicts the VMM's cost on real hardware, where the guest's own time would differ.

Rounds: in each, the two workloads, each as a guest run and a host run, the order
alternating from round to round. Ratios are per round (guest rate over the host rate of the
same round), reported as median and range over rounds; so are rates and CPU per request.
Nothing is asserted about timing: the figures are printed beside their targets.

``used.idx reads caught mid-store`` counts the guest's reads of used.idx that claimed more
new entries than it had requests outstanding, which it ignores and polls again: trivmm
stores ring fields with ``struct.pack_into``, which zeroes the field before it stores the
value, so a driver polling from another CPU can read 0 in between (blk_reader.S says more).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import trio

import trivmm
from trivmm.memory import GuestMemory

ROOT = Path(__file__).resolve().parents[1]
TEST_GUESTS = ROOT / "tests/kvm/guests"  # common.inc, long64.inc and the linker script of the tiny guests
READER = Path(__file__).parent / "guests/blk_reader.S"
SECTOR = 512
MEMORY = "64M"  # the guest's RAM: code, rings and up to 256 x 128 KiB of buffers from 4 MiB (blk_reader.S)
QUEUE_SIZE = 256  # the guest's queue: the device's maximum
MAX_DEPTH = {False: QUEUE_SIZE // 4, True: QUEUE_SIZE}  # by indirect: four ring descriptors per slot, or one
MAX_REQUEST_BYTES = 128 * 1024  # the device's SIZE_MAX, one data descriptor per request
MAX_COUNT = 65535  # requests per run: the guest relies on the 16-bit ring indices not wrapping (blk_reader.S)
DEPTH = 128
INDIRECT = True
DISK_MIB = 256
SEQ_COUNT = 16384  # 1 GiB of 64 KiB reads
RAND_COUNT = 16384
ROUNDS = 5
SEED = 0x2545F491  # the guest's xorshift64 seed (any non-zero value)
POLL_INTERVAL = 0.001  # seconds between the timer thread's looks at guest RAM
RUN_TIMEOUT = 120.0  # seconds a guest run may take before it counts as hung
TIMER_THREAD = "blk-bench-timer"
VCPU_THREAD_PREFIX = "trivmm-vcpu"  # trivmm/vm.py names its vCPU threads so (pthread_setname_np)
TARGET_RATIO = 0.5  # 64 KiB sequential: guest rate / host rate
TARGET_VMM_US = 15.0  # 4 KiB: VMM CPU per request

# The results block (blk_reader.S): u64 words in guest RAM.
RESULTS = 0x5000
FIELDS = {"ready": 0x00, "go": 0x08, "finished": 0x10, "ack": 0x18, "done": 0x20, "errors": 0x28,
          "mismatches": 0x30, "kicks": 0x38, "spins": 0x40, "fail": 0x48, "fault": 0x50, "fault_rip": 0x58,
          "fault_cr2": 0x60, "fault_error": 0x68, "bad_expected": 0x70, "bad_seen": 0x78, "passes": 0x80,
          "torn": 0x88, "sector_sum": 0x90}  # fmt: skip
FAULT_GP = 0x10D  # the #GP of the guest's final `hlt` at CPL3: the normal end
FAIL_REASONS = {1: "no virtio-mmio magic at 0xF000_0000", 2: "not virtio-mmio version 2", 3: "not a block device",
                4: "VIRTIO_F_VERSION_1 not offered", 5: "VIRTIO_F_RING_EVENT_IDX not offered",
                6: "FEATURES_OK refused", 7: "the disk is smaller than the guest was told",
                8: "queue 0 is smaller than 256", 9: "queue 0 did not become ready",
                10: "DEVICE_NEEDS_RESET after DRIVER_OK", 11: "a used entry named no request of the guest",
                12: "VIRTIO_F_INDIRECT_DESC not offered"}  # fmt: skip


class BenchError(RuntimeError):
    """A run that did not do what it should (the guest failed, hung, or read wrong data)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """``count`` reads of ``request_bytes``, sequential or at random aligned offsets."""

    name: str
    request_bytes: int
    random: bool
    count: int

    def __post_init__(self) -> None:
        if not (SECTOR <= self.request_bytes <= MAX_REQUEST_BYTES and self.request_bytes % SECTOR == 0):
            raise ValueError(f"request size {self.request_bytes}: a multiple of {SECTOR} up to {MAX_REQUEST_BYTES}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"request count {self.count}: 1 to {MAX_COUNT}")

    def blocks(self, disk_bytes: int) -> int:
        """Requests that fit the disk end to end (a power of two: the guest masks)."""
        blocks = disk_bytes // self.request_bytes
        if blocks < 1 or blocks & (blocks - 1) or blocks >= 1 << 31:
            raise ValueError(f"a disk of {disk_bytes} bytes is not a power-of-two number of {self.request_bytes}-byte "
                             f"requests")  # fmt: skip
        return blocks


def default_workloads(seq_count: int = SEQ_COUNT, rand_count: int = RAND_COUNT) -> tuple[Workload, Workload]:
    return (Workload("64 KiB sequential", 64 * 1024, False, seq_count),
            Workload("4 KiB random", 4 * 1024, True, rand_count))  # fmt: skip


# --- the guest, the disk, the offsets -------------------------------------------------------------
def assemble_reader(out_dir: Path, workload: Workload, *, disk_bytes: int, depth: int = DEPTH,
                    indirect: bool = INDIRECT, seed: int = SEED) -> Path:  # fmt: skip
    """bench/guests/blk_reader.S as an ELF in ``out_dir``, for ``workload`` over a disk of
    ``disk_bytes``, ``depth`` requests in flight, each in an indirect table or not."""
    if not 1 <= depth <= MAX_DEPTH[indirect]:
        raise ValueError(f"depth {depth}: 1 to {MAX_DEPTH[indirect]}" + ("" if indirect else " without indirect"))
    if not 0 < seed < 1 << 64:
        raise ValueError("the seed must be a non-zero u64")
    symbols = {"COUNT": workload.count, "DEPTH": depth, "REQUEST_SECTORS": workload.request_bytes // SECTOR,
               "BLOCKS_MASK": workload.blocks(disk_bytes) - 1, "RANDOM": int(workload.random), "SEED": seed,
               "INDIRECT": int(indirect)}  # fmt: skip
    name = "blk_reader_" + "_".join(f"{value:x}" for value in symbols.values())
    obj, elf = out_dir / f"{name}.o", out_dir / f"{name}.elf"
    defsyms = [arg for sym, value in symbols.items() for arg in ("--defsym", f"{sym}={value}")]
    subprocess.run(["as", "--64", "-I", str(TEST_GUESTS), *defsyms, "-o", str(obj), str(READER)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(TEST_GUESTS / "guest.ld"), "-n", "--build-id=none",
                    "--no-warn-rwx-segments", "-o", str(elf), str(obj)], check=True)  # fmt: skip
    return elf


def write_disk(path: Path, size: int, *, numbered: bool = True) -> None:
    """A raw disk of ``size`` bytes whose every 512-byte sector starts with its own number
    (u64, little-endian), the rest zeros; all zeros unless ``numbered``."""
    chunk = 1 << 20
    assert sys.byteorder == "little", "an x86-64 benchmark"
    if size % chunk:
        raise ValueError("the disk size must be a multiple of 1 MiB")
    per_chunk = chunk // SECTOR
    with open(path, "wb") as f:
        for first in range(0, size // SECTOR, per_chunk):
            words = array.array("Q", bytes(chunk))
            if numbered:
                words[:: SECTOR // 8] = array.array("Q", range(first, first + per_chunk))
            f.write(words.tobytes())


def warm(path: Path) -> None:
    """Read the whole file once, so that what follows reads the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def _xorshift64(x: int) -> int:
    mask = (1 << 64) - 1
    x ^= (x << 13) & mask
    x ^= x >> 7
    x ^= (x << 17) & mask
    return x


def request_offsets(workload: Workload, disk_bytes: int, seed: int = SEED) -> list[int]:
    """The byte offsets the guest reads, in the order it submits them (blk_reader.S)."""
    blocks = workload.blocks(disk_bytes)
    size = workload.request_bytes
    if not workload.random:
        return [(k % blocks) * size for k in range(workload.count)]
    offsets, state = [], seed
    for _ in range(workload.count):
        state = _xorshift64(state)
        offsets.append((state & (blocks - 1)) * size)
    return offsets


def sector_sum(offsets: Sequence[int]) -> int:
    """What the guest's SECTOR_SUM must be after submitting reads at ``offsets``."""
    return sum(offsets) // SECTOR % (1 << 64)


def host_read(path: Path, request_bytes: int, offsets: Sequence[int]) -> float:
    """Seconds for this thread to ``os.pread`` ``request_bytes`` at each of ``offsets`` in turn."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pread = os.pread
        start = time.perf_counter()
        for offset in offsets:
            pread(fd, request_bytes, offset)
        return time.perf_counter() - start
    finally:
        os.close(fd)


# --- CPU accounting -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    """The process's CPU seconds (all threads, ended ones included), and per live thread
    (tid: name, seconds)."""

    process: float
    threads: dict[int, tuple[str, float]]

    @classmethod
    def take(cls) -> CpuSnapshot:
        threads: dict[int, tuple[str, float]] = {}
        for name in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                with open(f"/proc/self/task/{name}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/self/task/{name}/schedstat") as f:
                    threads[int(name)] = (comm, int(f.read().split()[0]) * 1e-9)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(usage.ru_utime + usage.ru_stime, threads)


@dataclasses.dataclass(frozen=True)
class CpuSpan:
    """CPU seconds over a span: the VMM's (the process less the vCPU and timer threads), the
    vCPU threads', and of the VMM's, the event loop's (the main thread)."""

    vmm: float
    vcpu: float
    loop: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, timer_tid: int) -> CpuSpan:
        def delta(tid: int) -> float:
            if tid not in after.threads:
                return 0.0
            return after.threads[tid][1] - before.threads.get(tid, ("", 0.0))[1]

        vcpu = sum(delta(tid) for tid, (name, _) in after.threads.items() if name.startswith(VCPU_THREAD_PREFIX))
        vmm = after.process - before.process - vcpu - delta(timer_tid)
        return cls(vmm=vmm, vcpu=vcpu, loop=delta(os.getpid()))


class _Timer(threading.Thread):
    """Waits for the guest's READY, takes the start figures and sets GO; waits for FINISHED,
    takes the end figures and sets ACK (the guest then powers off)."""

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(name=TIMER_THREAD, daemon=True)
        self.memory = memory
        self.stop = threading.Event()  # the VM ended (or the run failed): give up waiting
        self.start_figures: tuple[float, CpuSnapshot] | None = None
        self.end_figures: tuple[float, CpuSnapshot] | None = None
        self.tid = 0

    def _wait_for(self, field: str) -> bool:
        address = RESULTS + FIELDS[field]
        while not self.memory.read_u64(address):
            if self.stop.wait(POLL_INTERVAL):
                return False
        return True

    def run(self) -> None:
        self.tid = threading.get_native_id()
        with contextlib.suppress(OSError), open(f"/proc/self/task/{self.tid}/comm", "w") as f:
            f.write(TIMER_THREAD[:15])  # the OS thread's name, as trivmm names its threads (top -H)
        if not self._wait_for("ready"):
            return
        cpu = CpuSnapshot.take()
        self.start_figures = (time.perf_counter(), cpu)
        self.memory.write_u64(RESULTS + FIELDS["go"], 1)
        if not self._wait_for("finished"):
            return
        wall = time.perf_counter()
        self.end_figures = (wall, CpuSnapshot.take())
        self.memory.write_u64(RESULTS + FIELDS["ack"], 1)


# --- one guest run --------------------------------------------------------------------------------
@dataclasses.dataclass
class GuestRun:
    """What one guest run did (the results block, the device's counters) and cost."""

    workload: Workload
    results: dict[str, int]
    reason: str
    expected_sector_sum: int | None = None  # what SECTOR_SUM must be (None: not checked)
    seconds: float = math.nan
    cpu: CpuSpan | None = None
    device_completed: int = 0
    device_errors: int = 0
    device_status: int = 0
    exits: int = 0  # the vCPU's exits to the VMM in the whole run (set-up included)

    @property
    def done(self) -> int:
        return self.results["done"]

    @property
    def iops(self) -> float:
        return self.done / self.seconds

    @property
    def bytes_per_second(self) -> float:
        return self.iops * self.workload.request_bytes

    def per_request(self, seconds: float) -> float:
        return seconds / self.done

    def problem(self) -> str | None:
        """Why this run's figures cannot be trusted, or None."""
        r = self.results
        if r["fail"]:
            return f"the guest gave up: {FAIL_REASONS.get(r['fail'], r['fail'])} (results {r})"
        if r["fault"] != FAULT_GP or not r["finished"]:
            return (f"the guest ended early: fault {r['fault']:#x} at RIP {r['fault_rip']:#x}, CR2 "
                    f"{r['fault_cr2']:#x}, finished {r['finished']}, VM exit {self.reason} (results {r})")  # fmt: skip
        if r["done"] != self.workload.count:
            return f"{r['done']} requests done of {self.workload.count}"
        if self.expected_sector_sum is not None and r["sector_sum"] != self.expected_sector_sum:
            return (f"the guest asked for other sectors than the host reads (sum {r['sector_sum']:#x}, expected "
                    f"{self.expected_sector_sum:#x})")  # fmt: skip
        if r["errors"] or self.device_errors:
            return f"{r['errors']} requests completed with an error status (device: {self.device_errors})"
        if r["mismatches"]:
            return (f"{r['mismatches']} requests read the wrong data (first: sector {r['bad_expected']} expected, "
                    f"{r['bad_seen']:#x} found)")  # fmt: skip
        if self.cpu is None or not self.seconds > 0:
            return "the run was not timed"
        return None


async def run_guest(elf: Path, disk: Path, workload: Workload, *, offsets: Sequence[int] | None = None,
                    timeout: float = RUN_TIMEOUT) -> GuestRun:  # fmt: skip
    """Run the reader guest ``elf`` (built for ``workload``) over ``disk`` once, in this
    process; the caller checks ``problem()``, which compares the sectors the guest asked for
    with ``offsets`` when given."""
    config = trivmm.VmConfig(kernel=elf, memory=MEMORY, transport="mmio",
                             disks=[trivmm.DiskConfig(disk, "raw", readonly=True)])  # fmt: skip
    async with trivmm.open_vm(config) as vm:
        memory = vm.memory
        assert memory is not None
        timer = _Timer(memory)
        timer.start()
        try:
            with anyio.move_on_after(timeout) as scope:
                result = await vm.wait()
        finally:
            timer.stop.set()
            timer.join(1.0)  # at most POLL_INTERVAL away from seeing stop
        results = {name: memory.read_u64(RESULTS + offset) for name, offset in FIELDS.items()}
        transport = vm.virtio_mmio[0]
        completed, errors = getattr(transport.device, "completed", 0), getattr(transport.device, "errors", 0)
        status = transport.core.status
    if scope.cancelled_caught:
        raise BenchError(f"{workload.name}: the guest did not finish within {timeout:.0f} s (device status "
                         f"{status:#x}, {completed} requests completed; results {results})")  # fmt: skip
    run = GuestRun(workload, results, result.reason.value, None if offsets is None else sector_sum(offsets),
                   device_completed=completed, device_errors=errors, device_status=status,
                   exits=result.exits)  # fmt: skip
    if timer.start_figures is not None and timer.end_figures is not None:
        (wall0, cpu0), (wall1, cpu1) = timer.start_figures, timer.end_figures
        run.seconds = wall1 - wall0
        run.cpu = CpuSpan.between(cpu0, cpu1, timer.tid)
    return run


# --- rounds and the report ------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    rounds: int = ROUNDS
    disk_mib: int = DISK_MIB
    depth: int = DEPTH
    indirect: bool = INDIRECT
    seq_count: int = SEQ_COUNT
    rand_count: int = RAND_COUNT
    directory: Path | None = None


@dataclasses.dataclass
class Measurement:
    """One workload in one round: the guest's run and the host's seconds for the same reads."""

    guest: GuestRun
    host_seconds: float

    @property
    def host_bytes_per_second(self) -> float:
        return self.guest.workload.count * self.guest.workload.request_bytes / self.host_seconds

    @property
    def ratio(self) -> float:
        return self.guest.bytes_per_second / self.host_bytes_per_second


@dataclasses.dataclass
class Report:
    options: Options
    workloads: tuple[Workload, ...]
    disk_bytes: int
    filesystem: str
    rounds: list[dict[str, Measurement]] = dataclasses.field(default_factory=list)
    load_average: float = math.nan
    started: str = ""
    elapsed: float = math.nan

    def series(self, workload: Workload) -> list[Measurement]:
        return [round_[workload.name] for round_ in self.rounds]

    def print(self) -> None:
        o = self.options
        layout = "indirect descriptors" if o.indirect else "direct descriptors"
        print(f"virtio-blk from a guest (bench/guests/blk_reader.S): virtio-mmio, 1 vCPU polling the used ring at "
              f"CPL3, {o.depth} requests in flight ({layout}), in this process under trio")  # fmt: skip
        print(f"  started {self.started}, {len(self.rounds)} rounds in {self.elapsed:.1f} s, {os.cpu_count()} CPUs, "
              f"load average {self.load_average:.2f} at the end")  # fmt: skip
        print(f"  disk: a raw file of {self.disk_bytes >> 20} MiB ({self.filesystem}), read once before: "
              f"page-cache reads throughout")  # fmt: skip
        print("  host: os.pread in this process, 1 thread, the same size, offsets, order and count (page cache)")
        print("  per run; median [min..max] over rounds (ratios per round):")
        for workload in self.workloads:
            series = self.series(workload)
            runs = [m.guest for m in series]
            spans = [(r.cpu, r) for r in runs if r.cpu is not None]
            print(f"  {workload.name} reads, {workload.count} per run")
            _line("guest", [r.bytes_per_second / 1e6 for r in runs], "MB/s")
            _line("guest", [r.iops for r in runs], "IOPS", fmt=".0f")
            _line("host (os.pread, page cache)", [m.host_bytes_per_second / 1e6 for m in series], "MB/s")
            ratio_target = "" if workload.random else f"(target >= {TARGET_RATIO})"
            _line("guest / host", [m.ratio for m in series], "x", ratio_target, fmt=".3f")
            cpu_target = f"(target <= {TARGET_VMM_US:g} for 4 KiB)" if workload.request_bytes == 4096 else ""
            _line("VMM CPU per request", [c.vmm / r.done * 1e6 for c, r in spans], "us", cpu_target, fmt=".2f")
            _line("  of which the event loop's thread", [c.loop / r.done * 1e6 for c, r in spans], "us", fmt=".2f")
            _line("VMM CPU, cores busy", [c.vmm / r.seconds for c, r in spans], "", fmt=".2f")
            _line("vCPU thread CPU per request (guest)", [c.vcpu / r.done * 1e6 for c, r in spans], "us", fmt=".2f")
            _line("notifications per request", [r.results["kicks"] / r.done for r in runs], "", fmt=".4f")
            _line("requests per pass over the used ring", [r.done / max(1, r.results["passes"]) for r in runs], "")
            _line("used.idx reads caught mid-store", [float(r.results["torn"]) for r in runs], "", fmt=".0f")
            _line("exits to the VMM in the whole run", [float(r.exits) for r in runs], "", "(set-up, power-off)",
                  fmt=".0f")  # fmt: skip
        print("  VMM CPU: the process's CPU time over the timed span less the vCPU thread's and the benchmark's timer")
        print("  thread's. Every request checked by the guest: status OK, its first and last sector's numbers right.")


def _line(label: str, values: Sequence[float], unit: str, note: str = "", fmt: str = ".1f") -> None:
    ordered = sorted(values)
    text = f"{statistics.median(ordered):{fmt}} [{ordered[0]:{fmt}}..{ordered[-1]:{fmt}}]"
    print(f"    {label:<40} {text:>30} {unit:<4} {note}".rstrip())


async def run_blk(opts: Options, workloads: Sequence[Workload] | None = None) -> Report:
    """The benchmark: a disk, the guests, ``opts.rounds`` rounds. Raises ``BenchError`` if a
    guest run fails or reads wrong data."""
    started = time.time()
    workloads = tuple(workloads or default_workloads(opts.seq_count, opts.rand_count))
    disk_bytes = opts.disk_mib << 20
    with tempfile.TemporaryDirectory(prefix="trivmm-blk-bench-", dir=opts.directory) as tmp_name:
        tmp = Path(tmp_name)
        disk = tmp / "disk.raw"
        write_disk(disk, disk_bytes)
        warm(disk)
        report = Report(opts, workloads, disk_bytes, _filesystem(tmp),
                        started=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)))  # fmt: skip
        elves = {w.name: assemble_reader(tmp, w, disk_bytes=disk_bytes, depth=opts.depth, indirect=opts.indirect)
                 for w in workloads}  # fmt: skip
        offsets = {w.name: request_offsets(w, disk_bytes) for w in workloads}
        for index in range(opts.rounds):
            measured: dict[str, Measurement] = {}
            for workload in workloads:
                host_first = index % 2 == 1
                host = host_read(disk, workload.request_bytes, offsets[workload.name]) if host_first else math.nan
                guest = await run_guest(elves[workload.name], disk, workload, offsets=offsets[workload.name])
                problem = guest.problem()
                if problem is not None:
                    raise BenchError(f"{workload.name}, round {index + 1}: {problem}")
                if not host_first:
                    host = host_read(disk, workload.request_bytes, offsets[workload.name])
                measured[workload.name] = Measurement(guest, host)
            report.rounds.append(measured)
    report.load_average = os.getloadavg()[0]
    report.elapsed = time.time() - started
    return report


def _filesystem(path: Path) -> str:
    """The file system type of ``path`` (from /proc/self/mounts: the longest mount point above it)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) >= len(best):  # fmt: skip
                best, kind = parts[1], parts[2]
    return f"{kind} at {best or '?'}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.virtio_blk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--disk-mib", type=int, default=DISK_MIB, help="the disk's size: a power of two, >= 1")
    depths = f"1..{MAX_DEPTH[True]}, 1..{MAX_DEPTH[False]} with --no-indirect"
    parser.add_argument("--depth", type=int, default=DEPTH, help=f"requests in flight ({depths})")
    parser.add_argument("--no-indirect", dest="indirect", action="store_false",
                        help="a request's descriptors in the ring's own table, not in an indirect table")  # fmt: skip
    parser.add_argument("--seq-count", type=int, default=SEQ_COUNT, help="64 KiB sequential reads per run")
    parser.add_argument("--rand-count", type=int, default=RAND_COUNT, help="4 KiB random reads per run")
    parser.add_argument("--dir", type=Path, default=None, help="where the disk file goes (default: the system's "
                        "temporary directory)")  # fmt: skip
    args = parser.parse_args(argv)
    opts = Options(rounds=args.rounds, disk_mib=args.disk_mib, depth=args.depth, indirect=args.indirect,
                   seq_count=args.seq_count,
                   rand_count=args.rand_count, directory=args.dir)  # fmt: skip
    try:
        report = trio.run(run_blk, opts)
    except (BenchError, ValueError) as exc:
        raise SystemExit(f"bench.virtio_blk: {exc}") from None
    report.print()


if __name__ == "__main__":
    main()
