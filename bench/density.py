"""Density: how fast one trivmm process creates tiny VMs, how many it holds, what each costs.

    python -m bench.density                 (also the last part of `python -m bench`)
    python -m bench.density --no-qemu       without the QEMU processes
    python -m bench.density --no-install    use QEMU if it is there, do not apt-get it

All in one process under trio, after `import trivmm` and one VM run to power-off (warm), with
the built-in guest (`trivmm.VmConfig()`: a PVH ELF that prints a greeting and its command
line on the UART and powers off through ACPI PM1a at 0x604), 16 MiB of guest RAM:

1. Creation latency, for N = 1, 10, 100 VMs in flight: `trivmm.VM(config)` construction
   (N = 1: one at a time, each closed untimed; N > 1: a probe task builds and closes 25
   extra VMs, one every 20 ms, beside the N in flight, after the rate window), the enter of
   `trivmm.open_vm(config)` (built and `run()` started) and the first console byte (the
   guest's code has run). Median and p90.
2. Creation rate: N workers in an anyio task group, each in a loop opening a VM with
   `open_vm`, reading its console, waiting for its power-off and leaving the block (the VM
   fd closed on a worker thread). After 1 s uncounted (all N going), the VMs that powered
   off and were released in the next few seconds, per second, and the process's CPU (user,
   system) per VM over that window. Every VM must end with StopReason.POWER_OFF.
3. Memory per extra VM, N alive at once, two states: "built" (`trivmm.VM(config)`, not run)
   and "paused" (`open_vm` entered and `vm.pause()` at once: the vCPU thread parked, mostly
   before its first guest instruction). The process's Rss (/proc/self/smaps_rollup) with the
   N VMs minus before, minus the guest RAM pages resident (mincore(2) over every
   `vm.memory` region: the loader's writes and the guest's), over N. Beside it, the growth
   of the host's kernel memory over N (/proc/meminfo SUnreclaim + VmallocUsed + KernelStack
   + PageTables): KVM's own structures, which Rss does not show (the whole host's, so other
   work on the machine moves it).
4. Many VMs at once: `--many` (1000) `trivmm.VM` objects built and held, not run: whether the
   host allows it (or the exact error and count where it stops), fds, time, memory; then all
   closed (on worker threads).
5. The same guest per VM as separate processes, sequentially (one untimed run first, then
   medians): wall time from spawn to exit, CPU, and the process's maximum Rss, from GNU
   time (`/usr/bin/time -f "%U %S %M"`; installed from Debian's `time` if missing):
   `python -m trivmm run --memory 16M`; QEMU `-M pc` (SeaBIOS, the ELF entered by PVH
   through QEMU's pvh.bin option ROM) with `-global PIIX4_PM.s4_val=5`, because QEMU's PM1a
   control at 0x604 powers off only for SLP_TYP 0 (its DSDT's \\_S5) and takes other values
   as S4 only when they equal s4_val; and QEMU `-M microvm` (qboot firmware, no ACPI PM),
   where `-device isa-debug-exit` at 0x604 ends QEMU at the same write (exit status 1).
   QEMU comes from Debian's qemu-system-x86 (installed here unless --no-install); KVM first,
   TCG when KVM does not work (the table says which). A separate process's max Rss includes
   the interpreter's or QEMU's shared text; the in-process figure is Rss added per VM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import anyio
import trio

import trivmm
from trivmm.guest.builtin import BUILTIN_GREETING

ROOT = Path(__file__).resolve().parents[1]
MEMORY = "16M"
SIZES = (1, 10, 100)
MANY = 1000
RATE_SECONDS = 3.0
LATENCY_SAMPLES = 40
RAMP_SECONDS = 1.0  # each rate measurement's uncounted start (N VMs getting going)
PROBE_SAMPLES = 25  # constructions timed beside N > 1 VMs in flight
PROBE_INTERVAL = 0.02  # seconds between them
CLOSE_THREADS = 8  # worker threads closing the --many VMs
PROCESS_TIMEOUT = 120.0  # seconds one separate VM process may take (QEMU pc via TCG is slow)
GNU_TIME = "/usr/bin/time"
KERNEL_FIELDS = ("SUnreclaim", "VmallocUsed", "KernelStack", "PageTables")  # /proc/meminfo
PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


# --- measuring ------------------------------------------------------------------------------
def _kib_fields(path: str, names: Sequence[str]) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in names:
                out[key] = int(rest.split()[0])
    return out


def rss_kib() -> int:
    """This process's resident memory (KiB)."""
    return _kib_fields("/proc/self/smaps_rollup", ("Rss",))["Rss"]


def kernel_kib() -> int:
    """The host's unreclaimable kernel memory (KiB) where KVM's allocations land: slab
    (VM and vCPU structures, memslot metadata), vmalloc (the VM structure), kernel stacks
    (the in-kernel PIT's thread), page tables."""
    return sum(_kib_fields("/proc/meminfo", KERNEL_FIELDS).values())


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def resident_bytes(address: int, size: int) -> int:
    """Bytes of ``[address, address + size)`` resident in memory (mincore(2))."""
    pages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return sum(b & 1 for b in bytes(vec)) * PAGE


def guest_resident_bytes(vms: Sequence[trivmm.VM]) -> int:
    """Guest RAM the loader or the guest has touched, over ``vms``."""
    return sum(resident_bytes(r.host_address, r.size) for vm in vms if vm.memory is not None for r in vm.memory)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclasses.dataclass
class Latency:
    """Seconds per VM: construction, open_vm enter, first console byte."""

    construct: list[float] = dataclasses.field(default_factory=list)
    enter: list[float] = dataclasses.field(default_factory=list)
    first_byte: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RateResult:
    concurrency: int
    completed: int
    seconds: float
    failures: list[str]
    latency: Latency
    user_seconds: float = 0.0  # the process's CPU over the counted window
    system_seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class MemoryResult:
    state: str  # "built" or "paused"
    n: int
    rss_delta_kib: int
    guest_resident_kib: int
    kernel_delta_kib: int
    fds_per_vm: float
    paused: int = 0  # VMs that pause() parked ("paused" state)

    @property
    def extra_kib_per_vm(self) -> float:
        return (self.rss_delta_kib - self.guest_resident_kib) / self.n

    @property
    def guest_kib_per_vm(self) -> float:
        return self.guest_resident_kib / self.n

    @property
    def kernel_kib_per_vm(self) -> float:
        return self.kernel_delta_kib / self.n


@dataclasses.dataclass
class ManyResult:
    wanted: int
    built: int
    error: str | None
    build_seconds: float
    close_seconds: float
    fd_limit: int
    memory: MemoryResult


@dataclasses.dataclass
class ProcessResult:
    label: str
    walls: list[float]
    max_rss_kib: list[int]
    cpus: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    note: str = ""


def _config(memory: str) -> trivmm.VmConfig:
    return trivmm.VmConfig(memory=memory)


async def _one_vm(config: trivmm.VmConfig, latency: Latency | None) -> trivmm.VmExit:
    """Open a VM, read its first console bytes, wait for it to end, release it."""
    start = time.perf_counter()
    async with trivmm.open_vm(config) as vm:
        entered = time.perf_counter()
        with contextlib.suppress(anyio.EndOfStream):
            await vm.console.receive()
        first = time.perf_counter()
        result = await vm.wait()
    if latency is not None:
        latency.enter.append(entered - start)
        latency.first_byte.append(first - start)
    return result


async def warm_up(config: trivmm.VmConfig) -> None:
    """One VM built, run to power-off and released: imports, caches, first-use costs paid."""
    result = await _one_vm(config, None)
    if result.reason is not trivmm.StopReason.POWER_OFF:
        raise SystemExit(f"density: the warm-up VM ended with {result}, not a power-off")


async def measure_latency(config: trivmm.VmConfig, samples: int = LATENCY_SAMPLES) -> tuple[Latency, list[str]]:
    """Sequential (one VM at a time): ``samples`` constructions (each closed, untimed) and
    ``samples`` open_vm cycles. Returns the latencies and the failures (VMs that did not
    power off)."""
    latency = Latency()
    failures: list[str] = []
    for _ in range(samples):
        start = time.perf_counter()
        vm = trivmm.VM(config)
        latency.construct.append(time.perf_counter() - start)
        await anyio.to_thread.run_sync(vm.close)
    for _ in range(samples):
        result = await _one_vm(config, latency)
        if result.reason is not trivmm.StopReason.POWER_OFF:
            failures.append(str(result))
    return latency, failures


async def measure_rate(config: trivmm.VmConfig, concurrency: int, seconds: float = RATE_SECONDS,
                       probe_samples: int | None = None, ramp: float = RAMP_SECONDS) -> RateResult:  # fmt: skip
    """``concurrency`` workers open, run to power-off and release VMs without pause, in
    three phases: ``ramp`` seconds not counted (all N get going); ``seconds`` counted (VMs
    that powered off and were released in it, their open_vm latencies, the process's CPU);
    then, for N > 1 (or ``probe_samples`` given), a probe task times the construction of
    ``probe_samples`` extra VMs (built, closed, never run), one every ``PROBE_INTERVAL``,
    while the workers go on. Then no new VM starts and those in flight end."""
    if probe_samples is None:
        probe_samples = PROBE_SAMPLES if concurrency > 1 else 0
    latency = Latency()
    failures: list[str] = []
    completed = 0
    counting = False
    stop = False

    async def worker() -> None:
        nonlocal completed
        while not stop:
            sample = Latency()
            try:
                result = await _one_vm(config, sample)
            except (trivmm.TrivmmError, OSError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if result.reason is not trivmm.StopReason.POWER_OFF:
                failures.append(str(result))
            elif counting:
                completed += 1
                latency.enter += sample.enter
                latency.first_byte += sample.first_byte

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
        await anyio.sleep(ramp)
        counting = True
        cpu0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await anyio.sleep(seconds)
        counting = False
        cpu1, elapsed = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        for _ in range(probe_samples):
            t0 = time.perf_counter()
            vm = trivmm.VM(config)
            latency.construct.append(time.perf_counter() - t0)
            await anyio.to_thread.run_sync(vm.close)
            await anyio.sleep(PROBE_INTERVAL)
        stop = True
    return RateResult(concurrency, completed, elapsed, failures, latency,
                      cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime)  # fmt: skip


def _settle() -> tuple[int, int, int]:
    """(Rss KiB, host kernel memory KiB, fds) after a collection and with malloc's free memory
    given back, so that what VMs built next allocate shows in Rss rather than reusing
    pages freed by earlier ones."""
    gc.collect()
    with contextlib.suppress(AttributeError):  # glibc only
        _libc.malloc_trim(0)
    return rss_kib(), kernel_kib(), fd_count()


async def measure_memory(config: trivmm.VmConfig, n: int, state: str) -> MemoryResult:
    """Rss and host kernel memory with ``n`` VMs alive (``state``: "built" or "paused"), against
    before; guest RAM resident counted apart (the module docstring says how)."""
    rss0, kernel0, fds0 = _settle()
    async with contextlib.AsyncExitStack() as stack:
        vms: list[trivmm.VM] = []
        paused = 0
        for _ in range(n):
            if state == "built":
                vm = stack.enter_context(trivmm.VM(config))
            elif state == "paused":
                vm = await stack.enter_async_context(trivmm.open_vm(config))
                with contextlib.suppress(trivmm.VmError):  # a guest that powered off first
                    await vm.pause()
                    paused += 1
            else:
                raise ValueError(f"unknown state {state!r}")
            vms.append(vm)
        rss1, kernel1, fds1 = _settle()
        guest = guest_resident_bytes(vms) // 1024
        del vms
    return MemoryResult(state, n, rss1 - rss0, guest, kernel1 - kernel0, (fds1 - fds0) / n, paused)


async def _close_vm(vm: trivmm.VM, limiter: anyio.CapacityLimiter) -> None:
    await anyio.to_thread.run_sync(vm.close, limiter=limiter)


def _raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit);
    return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def measure_many(config: trivmm.VmConfig, n: int = MANY) -> ManyResult:
    """Build ``n`` VMs (not run) and hold them all; stop at the first refusal and say why.
    Then close them all on worker threads."""
    fd_limit = _raise_fd_limit(fd_count() + 8 * n + 64)
    rss0, kernel0, fds0 = _settle()
    vms: list[trivmm.VM] = []
    error = None
    start = time.perf_counter()
    try:
        for _ in range(n):
            vms.append(trivmm.VM(config))
    except (trivmm.TrivmmError, OSError, MemoryError) as exc:
        error = f"{type(exc).__name__}: {exc} (after {len(vms)} VMs)"
    build_seconds = time.perf_counter() - start
    rss1, kernel1, fds1 = _settle()
    built = len(vms)
    guest = guest_resident_bytes(vms) // 1024
    memory = MemoryResult("built", max(built, 1), rss1 - rss0, guest, kernel1 - kernel0, (fds1 - fds0) / max(built, 1))
    start = time.perf_counter()
    limiter = anyio.CapacityLimiter(CLOSE_THREADS)
    async with anyio.create_task_group() as tg:
        for vm in vms:
            tg.start_soon(_close_vm, vm, limiter)
    vms.clear()
    close_seconds = time.perf_counter() - start
    return ManyResult(n, built, error, build_seconds, close_seconds, fd_limit, memory)


# --- separate processes -----------------------------------------------------------------
def run_process(argv: list[str], expect_status: int, expect_output: bytes,
                timeout: float = PROCESS_TIMEOUT) -> tuple[float, int, float]:  # fmt: skip
    """Run ``argv`` to its end: (wall seconds from spawn to exit, its max Rss in KiB, its
    CPU seconds, user and system; NaN without GNU time).
    Raises RuntimeError unless it exits with ``expect_status`` having printed
    ``expect_output``.

    The max Rss comes from GNU time (``/usr/bin/time -f %M``), which forks the command
    from its own small process: a process forked from this one and exec'd would report
    this process's Rss high-water mark (Linux carries it across exec into ru_maxrss).
    Without GNU time, /proc/PID/status VmHWM is sampled every millisecond instead."""
    gnu_time = Path(GNU_TIME)
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path, rss_path = (Path(tmp) / name for name in ("out", "err", "rss"))
        prefix = [GNU_TIME, "-f", "%U %S %M", "-o", str(rss_path)] if gnu_time.exists() else []
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT)
            hwm, cpu = 0, math.nan
            try:
                while proc.poll() is None:
                    if time.perf_counter() - start > timeout:
                        raise RuntimeError(f"no exit within {timeout:.0f} s")
                    if not prefix:  # the latest: before exec, a vfork child shows this process's
                        hwm = _vm_hwm_kib(proc.pid) or hwm
                    time.sleep(0.001)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            wall = time.perf_counter() - start
        output, errors = out_path.read_bytes(), err_path.read_bytes()
        if prefix:  # GNU time writes "Command exited with non-zero status N" first, then ours
            fields = rss_path.read_text().splitlines()[-1].split()
            user, system, hwm = float(fields[0]), float(fields[1]), int(fields[2])
            cpu = user + system
    if proc.returncode != expect_status or expect_output not in output:
        tail = (errors or output).decode(errors="replace").strip().splitlines()[-2:]
        raise RuntimeError(f"exit status {proc.returncode} (expected {expect_status}), greeting "
                           f"{'seen' if expect_output in output else 'missing'}: {' | '.join(tail)}")  # fmt: skip
    return wall, hwm, cpu


def _vm_hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError, KeyError):
        return _kib_fields(f"/proc/{pid}/status", ("VmHWM",))["VmHWM"]
    return 0


def measure_process(label: str, argv: list[str], expect_status: int, runs: int) -> ProcessResult:
    """``runs`` sequential runs of ``argv`` (after one untimed run that warms the page cache
    and checks that it works)."""
    result = ProcessResult(label, [], [])
    try:
        run_process(argv, expect_status, BUILTIN_GREETING)
        for _ in range(runs):
            wall, maxrss, cpu = run_process(argv, expect_status, BUILTIN_GREETING)
            result.walls.append(wall)
            result.max_rss_kib.append(maxrss)
            result.cpus.append(cpu)
    except (RuntimeError, OSError) as exc:
        result.error = str(exc)
    return result


def ensure_qemu(install: bool) -> tuple[str | None, str]:
    """The path of qemu-system-x86_64 (installed from Debian's qemu-system-x86, with its
    firmware packages seabios and qemu-system-data as dependencies, when ``install``), or
    None and why not."""
    path = shutil.which("qemu-system-x86_64")
    if path is None and install:
        try:
            from trivmm.guest.build import ensure_debian_packages

            ensure_debian_packages(["qemu-system-x86"])
        except Exception as exc:  # no apt, not root, no network: say so and go on
            return None, f"installing qemu-system-x86 failed: {type(exc).__name__}: {exc}"
        path = shutil.which("qemu-system-x86_64")
    if path is None:
        return None, "qemu-system-x86_64 is not installed" + ("" if install else " (--no-install)")
    return path, ""


def qemu_variants(qemu: str, kernel: Path, cmdline: str, memory: str) -> list[tuple[str, str, list[str], int]]:
    """(machine, label, argv with ``{accel}`` to fill in, expected exit status) for each QEMU
    machine."""
    common = ["-accel", "{accel}", "-m", memory, "-display", "none", "-no-reboot", "-nodefaults",
              "-serial", "stdio", "-kernel", str(kernel), "-append", cmdline]  # fmt: skip
    return [
        # SLP_TYP 5 at PM1a_CNT 0x604 (SeaBIOS puts PIIX4 PM at 0x600): QEMU powers off only for
        # SLP_TYP 0, or takes it as S4 (and shuts down) when it equals s4_val.
        ("pc", "QEMU -M pc (SeaBIOS)", [qemu, "-M", "pc", *common, "-global", "PIIX4_PM.s4_val=5"], 0),
        # No ACPI PM: isa-debug-exit at 0x604 exits with (0x3400 << 1 | 1) & 0xff = 1.
        ("microvm", "QEMU -M microvm (qboot)", [qemu, "-M", "microvm,acpi=off", *common,
                                                "-device", "isa-debug-exit,iobase=0x604,iosize=2"], 1),
    ]  # fmt: skip


def measure_qemu(qemu: str, kernel: Path, cmdline: str, memory: str, runs: dict[str, int]) -> list[ProcessResult]:
    results = []
    for machine, label, template, status in qemu_variants(qemu, kernel, cmdline, memory):
        tried = []
        for accel in ("kvm", "tcg"):
            argv = [arg.replace("{accel}", accel) for arg in template]
            result = measure_process(f"{label}, {accel}", argv, status, runs.get(machine, 3))
            if result.error is None:
                if tried:
                    result.note = f"KVM failed: {tried[0]}"
                break
            tried.append(result.error)
        else:
            result.label = label
            result.error = " / ".join(f"{a}: {e}" for a, e in zip(("kvm", "tcg"), tried, strict=True))
        results.append(result)
    return results


# --- the report ------------------------------------------------------------------------------
def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1e3:.2f} / {quantile(values, 0.9) * 1e3:.2f}"


def _kib(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _row(label: str, cells: Sequence[str], note: str = "") -> None:
    print(f"  {label:<48}" + "".join(f"{c:>20}" for c in cells) + (f"   {note}" if note else ""))


def print_density(sizes: Sequence[int], sequential: Latency, rates: dict[int, RateResult],
                  memories: dict[tuple[str, int], MemoryResult]) -> None:  # fmt: skip
    print("1-3. N tiny VMs in flight (built-in guest; latencies: median / p90 in ms)")
    _row("", [f"N={n}" for n in sizes])
    latencies = {n: sequential if n == 1 else rates[n].latency for n in sizes}
    _row("trivmm.VM(config) construction", [_ms(latencies[n].construct) for n in sizes], "(target <= 1 ms)")
    _row("  its minimum (ms)", [f"{min(latencies[n].construct) * 1e3:.2f}" if latencies[n].construct else "-"
                                for n in sizes])  # fmt: skip
    _row("open_vm(config) enter (built, run() started)", [_ms(latencies[n].enter) for n in sizes])
    _row("open_vm(config) to first console byte", [_ms(latencies[n].first_byte) for n in sizes])
    _row("VMs powered off + released per second", [f"{rates[n].per_second:.1f}" for n in sizes], "(target >= 300/s)")
    _row("  (VMs in the counted window)", [f"{rates[n].completed} in {rates[n].seconds:.1f} s" for n in sizes])
    _row("  process CPU per VM, user + system (ms)", [_cpu(rates[n]) for n in sizes])
    _row("  failures (not a power-off, or an error)", [str(len(rates[n].failures)) for n in sizes])
    for state in ("built", "paused"):
        ms = [memories[(state, n)] for n in sizes]
        what = "built, not run" if state == "built" else "open_vm + pause()"
        _row(f"Rss per extra VM beyond guest RAM, {what}", [_kib(m.extra_kib_per_vm) for m in ms], "KiB (target <= 64)")
        _row("  guest RAM resident per VM", [_kib(m.guest_kib_per_vm) for m in ms], "KiB")
        _row("  host kernel memory per VM (not in Rss)", [_kib(m.kernel_kib_per_vm) for m in ms],
             "KiB (whole host: noisy)")  # fmt: skip
        _row("  fds per VM", [f"{m.fds_per_vm:.1f}" for m in ms])
    paused = [memories[("paused", n)] for n in sizes]
    _row("  VMs parked by pause() (rest powered off first)", [f"{m.paused}/{m.n}" for m in paused])
    for n in sizes:
        for failure in sorted(set(rates[n].failures))[:3]:
            print(f"  N={n} failure: {failure}")


def _cpu(rate: RateResult) -> str:
    if not rate.completed:
        return "-"
    return f"{rate.user_seconds / rate.completed * 1e3:.1f} + {rate.system_seconds / rate.completed * 1e3:.1f}"


def print_many(many: ManyResult) -> None:
    m = many.memory
    ok = "yes" if many.built == many.wanted else f"NO: {many.error}"
    print(f"4. {many.wanted} VMs built (not run) and held at once in this process: {ok}")
    per = many.build_seconds / max(many.built, 1)
    print(f"  built {many.built} in {many.build_seconds:.2f} s ({per * 1e3:.2f} ms per VM); "
          f"fds {m.fds_per_vm:.1f} per VM (RLIMIT_NOFILE soft limit {many.fd_limit})")  # fmt: skip
    print(f"  Rss +{m.rss_delta_kib / 1024:.1f} MiB: {m.extra_kib_per_vm:.0f} KiB per VM beyond guest RAM, "
          f"{m.guest_kib_per_vm:.0f} KiB guest RAM resident per VM")  # fmt: skip
    print(f"  host kernel memory +{m.kernel_delta_kib / 1024:.1f} MiB: {m.kernel_kib_per_vm:.0f} KiB per VM, not in "
          "Rss (KVM's structures; the whole host's: noisy)")  # fmt: skip
    print(f"  all closed in {many.close_seconds:.2f} s ({CLOSE_THREADS} worker threads)")


def print_side_by_side(rates: dict[int, RateResult], memories: dict[tuple[str, int], MemoryResult],
                       processes: list[ProcessResult], notes: list[str]) -> None:  # fmt: skip
    sizes = sorted(rates)
    largest = max(n for state, n in memories if state == "paused")
    mem = memories[("paused", largest)]
    in_process_kib = mem.extra_kib_per_vm + mem.guest_kib_per_vm
    print("5. Per VM, side by side (the same guest; processes: sequential, medians)")
    print(f"  {'':<46}{'wall per VM':>12}{'CPU per VM':>12}{'memory per VM':>15}{'wall':>8}{'memory':>8}")
    rows: list[tuple[str, float, float, float]] = []
    for n in sizes:
        r = rates[n]
        wall = 1 / r.per_second if r.per_second else math.nan
        cpu = (r.user_seconds + r.system_seconds) / r.completed if r.completed else math.nan
        rows.append((f"trivmm in process, N={n} in flight (1/rate)", wall, cpu, in_process_kib))
    for p in processes:
        if p.error is None:
            rows.append((f"{p.label}", statistics.median(p.walls), statistics.median(p.cpus),
                         float(statistics.median(p.max_rss_kib))))  # fmt: skip
    base_wall = rows[0][1]
    for label, wall, cpu, kib in rows:
        size = f"{kib:.0f} KiB" if kib < 1024 else f"{kib / 1024:.1f} MiB"
        print(f"  {label:<46}{_dur(wall):>12}{_dur(cpu):>12}{size:>15}{wall / base_wall:>7.1f}x"
              f"{kib / in_process_kib:>7.0f}x")  # fmt: skip
    print("  (ratios to the first row; in-process memory per VM: Rss beyond guest RAM plus guest RAM resident,")
    print(f"  N={largest} paused; a process's: its max Rss, shared libraries included; processes: "
          f"{', '.join(f'{len(p.walls)} runs' for p in processes if p.error is None)})")  # fmt: skip
    for p in processes:
        if p.error is not None:
            print(f"  {p.label}: not measured: {p.error}")
        elif p.note:
            print(f"  {p.label}: {p.note}")
    for note in notes:
        print(f"  {note}")


def _dur(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- the run ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    memory: str = MEMORY
    sizes: tuple[int, ...] = SIZES
    many: int = MANY
    seconds: float = RATE_SECONDS
    ramp: float = RAMP_SECONDS
    probe_samples: int = PROBE_SAMPLES
    samples: int = LATENCY_SAMPLES
    qemu: bool = True
    install: bool = True
    process_runs: int = 5
    qemu_pc_runs: int = 3


@dataclasses.dataclass
class DensityReport:
    opts: Options
    sequential: Latency
    rates: dict[int, RateResult]
    memories: dict[tuple[str, int], MemoryResult]
    many: ManyResult | None
    processes: list[ProcessResult]
    notes: list[str]

    def print(self) -> None:
        opts = self.opts
        print(f"Density: trivmm built-in guest, {opts.memory} guest RAM, 1 vCPU, in one process under trio; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
        print_density(opts.sizes, self.sequential, self.rates, self.memories)
        if self.many is not None:
            print_many(self.many)
        print_side_by_side(self.rates, self.memories, self.processes, self.notes)


async def run_density(opts: Options) -> DensityReport:
    """Everything the module docstring lists, in one process; printed by the report."""
    config = _config(opts.memory)
    await warm_up(config)
    memories: dict[tuple[str, int], MemoryResult] = {}
    for state in ("built", "paused"):  # first: no thread stacks or heap left by earlier VMs to reuse
        for n in opts.sizes:
            memories[(state, n)] = await measure_memory(config, n, state)
    many = await measure_many(config, opts.many) if opts.many else None
    sequential, sequential_failures = await measure_latency(config, opts.samples)
    rates = {n: await measure_rate(config, n, opts.seconds, opts.probe_samples if n > 1 else 0, opts.ramp)
             for n in sorted({1, *opts.sizes})}  # fmt: skip
    rates[1].failures += sequential_failures

    with trivmm.VM(config) as vm:
        cmdline = vm.cmdline
    notes = []
    if not Path(GNU_TIME).exists() and opts.install:
        with contextlib.suppress(Exception):  # without it, VmHWM is sampled instead
            from trivmm.guest.build import ensure_debian_packages

            ensure_debian_packages(["time"])
    if not Path(GNU_TIME).exists():
        notes.append(f"no {GNU_TIME}: a process's max Rss is its VmHWM sampled every ms, its CPU is not known")
    processes = []
    if opts.process_runs > 0:
        processes.append(measure_process("python -m trivmm run (a process per VM)",
                                         [sys.executable, "-m", "trivmm", "run", "--memory", opts.memory], 0,
                                         opts.process_runs))  # fmt: skip
    if opts.qemu and opts.process_runs > 0:
        qemu, why = ensure_qemu(opts.install)
        if qemu is None:
            notes.append(f"QEMU: not measured: {why}")
        else:
            with resources.as_file(resources.files("trivmm.guest.builtin").joinpath("hello.elf")) as kernel:
                processes += measure_qemu(qemu, kernel, cmdline, opts.memory,
                                          {"pc": opts.qemu_pc_runs, "microvm": opts.process_runs})  # fmt: skip
    elif not opts.qemu:
        notes.append("QEMU: not measured (--no-qemu)")
    return DensityReport(opts, sequential, rates, memories, many, processes, notes)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.density", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--memory", default=MEMORY, help=f"guest RAM per VM (default {MEMORY})")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="VMs in flight, comma-separated (default 1,10,100)")  # fmt: skip
    parser.add_argument("--many", type=int, default=MANY, help=f"VMs built at once (default {MANY}; 0: skip)")
    parser.add_argument("--seconds", type=float, default=RATE_SECONDS, help="each rate measurement's length")
    parser.add_argument("--no-qemu", action="store_true", help="do not run QEMU")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install qemu-system-x86 (or time)")
    args = parser.parse_args(argv)
    sizes = tuple(sorted({int(s) for s in args.sizes.split(",")}))
    opts = Options(memory=args.memory, sizes=sizes, many=args.many, seconds=args.seconds,
                   qemu=not args.no_qemu, install=not args.no_install)  # fmt: skip
    trio.run(run_density, opts).print()


if __name__ == "__main__":
    main()
