"""Hot migration over loopback TCP and snapshot restore, trivmm and QEMU side by side.

    python -m bench.migration                 (also a part of `python -m bench`; --migration-only)
    python -m bench.migration --no-qemu       trivmm only
    python -m bench.migration --memory-mib 256 --restore-mib 128 --rate-mib 16

The guest is bench/guests/paced_writer.S, a PVH ELF that both trivmm and QEMU's microvm boot
as a kernel: it writes one word into every 4 KiB page from 8 MiB to the end of its RAM (so
that all of it holds data), sets a flag, and then, at CPL3, dirties one page every TICKS TSC
ticks, cycling over the same range, counting pages in a 64-bit counter at 0x18000. TICKS
comes from the TSC frequency KVM reports (KVM_GET_TSC_KHZ) and the rate asked for
(--rate-mib, 16 MiB/s: 4096 pages a second); the rate each guest achieves is measured (the
counter over one second, read from guest RAM; QEMU's through HMP `xp`) and printed.

1. trivmm: a source VM (`trivmm.open_vm`, --memory-mib, 1 vCPU) migrated hot over TCP on
   127.0.0.1 to `trivmm.migration.listen("tcp:127.0.0.1:0")` in the same process
   (`vm.migrate(uri, downtime_ms=--downtime-ms)`, no bandwidth limit) once the guest has
   touched all its RAM; the figures are the engine's `MigrationInfo`: total time, setup
   time, downtime (pause to the destination's RUNNING), stream bytes, rounds. The
   destination's counter must move on from the source's final value.
2. QEMU (Debian's qemu-system-x86, installed through trivmm.guest.build unless --no-install):
   `qemu-system-x86_64 -M microvm,acpi=off -accel kvm -m <same> -kernel paced_writer.elf`, and
   a second one with `-incoming tcp:127.0.0.1:PORT`; driven by `qemu.qmp`:
   `migrate-set-parameters` (downtime-limit as for trivmm, max-bandwidth 1 TiB/s: QEMU's
   default is 32 MiB/s), `migrate`, `query-migrate` polled every 10 ms until completed; the
   figures are query-migrate's total-time, setup-time, downtime, ram.transferred and
   dirty-sync-count.
3. Loopback: the stream rate of each (bytes sent / (total time - setup time)) divided by
   the rate of a plain socket sender and receiver (two threads, 1 MiB sends) moving the same
   number of bytes over 127.0.0.1, measured right after that migration in the same run.
4. Restore: a --restore-mib guest, past its touching phase, snapshotted to a file (paused;
   `vm.snapshot(path, resume=False)`); then the time from `trivmm.VM.restore(path)` to the
   guest's counter moving (the restored VM's `run()` started; guest RAM polled) and to
   `VM.restore` returning ("VM ready"), and the snapshot's size on disk (trivmm's file maps
   its memory copy-on-write, so the restore reads only its sections; zero pages are holes
   in the file; the guest's first touches fault pages in from the file). The counter moves once
   every 1/rate seconds (244 us at 16 MiB/s), which bounds the figure's resolution.
   Beside it, QEMU: the same guest saved by a live migration to `exec:cat > FILE`, then a
   new QEMU process with `-incoming "exec:cat FILE"`: from its spawn to query-status
   "running" ("VM ready") and to the counter moving (QEMU's own start-up included).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

import trivmm
from trivmm.migration import MigrationInfo, listen

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "bench" / "guests" / "paced_writer.S"
TEST_GUESTS = ROOT / "tests" / "kvm" / "guests"
COUNTER = 0x18000
PHASE = 0x18008
BUF = 0x800000
PAGE = 4096
LAG = 64  # pages behind before the guest paces from now
TOUCH_TIMEOUT = 120.0  # seconds for a guest to touch all its RAM (first touches: ~6 us a page here)
RATE_WINDOW = 1.0  # seconds over which a guest's dirty rate is measured
QEMU_TIMEOUT = 120.0
TARGET_RATIO = 0.8
TARGET_DOWNTIME = 0.030
TARGET_RESTORE = 0.010


class BenchError(Exception):
    pass


def tsc_khz() -> int:
    """The guest TSC frequency KVM gives a new VM (KVM_GET_TSC_KHZ)."""
    with trivmm.VM(trivmm.VmConfig(memory="16M")) as vm:
        return vm.vcpus[0].get_tsc_khz()


def assemble_guest(out_dir: Path, memory_mib: int, rate_mib: float, khz: int) -> Path:
    """bench/guests/paced_writer.S for a guest of ``memory_mib`` dirtying ``rate_mib`` MiB/s."""
    if memory_mib < 16:
        raise BenchError("the guest needs at least 16 MiB")
    ticks = max(1, round(khz * 1000 * PAGE / (rate_mib * 2**20)))
    name = f"paced_writer_{memory_mib}_{ticks}"
    obj, elf = out_dir / f"{name}.o", out_dir / f"{name}.elf"
    symbols = {"MEM_END": memory_mib << 20, "TICKS": ticks, "LAG": LAG}
    defsyms = [arg for sym, value in symbols.items() for arg in ("--defsym", f"{sym}={value}")]
    subprocess.run(["as", "--64", "-I", str(TEST_GUESTS), *defsyms, "-o", str(obj), str(GUEST)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(TEST_GUESTS / "guest.ld"), "-n", "--build-id=none",
                    "--no-warn-rwx-segments", "-o", str(elf), str(obj)], check=True)  # fmt: skip
    return elf


def loopback_rate(nbytes: int, chunk: int = 1 << 20) -> float:
    """Bytes per second of a plain TCP sender and receiver (threads) moving ``nbytes`` over
    127.0.0.1, from connect to the receiver's last byte."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            buf = bytearray(chunk)
            while received[0] < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                received[0] += n

    thread = threading.Thread(target=receive)
    thread.start()
    data = memoryview(os.urandom(chunk))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sender:
        left = nbytes
        while left > 0:
            sender.sendall(data[: min(left, chunk)])
            left -= min(left, chunk)
        thread.join()
        elapsed = time.perf_counter() - start
    server.close()
    if received[0] != nbytes:
        raise BenchError(f"loopback: {received[0]} of {nbytes} bytes arrived")
    return nbytes / elapsed


@dataclasses.dataclass
class Outcome:
    """One migration's figures (seconds, bytes)."""

    label: str
    total_time: float = 0.0
    setup_time: float = 0.0
    downtime: float | None = None
    transferred: int = 0
    rounds: int = 0
    dirty_rate: float = 0.0  # bytes per second the guest dirtied, measured before the migration
    loopback: float = 0.0  # bytes per second, plain TCP, same byte count, same run
    continued: bool = False  # the destination's counter moved on from the source's
    note: str = ""
    error: str | None = None

    @property
    def stream_rate(self) -> float:
        return self.transferred / max(self.total_time - self.setup_time, 1e-9)

    @property
    def ratio(self) -> float:
        return self.stream_rate / self.loopback if self.loopback else 0.0


@dataclasses.dataclass
class RestoreOutcome:
    label: str
    memory_mib: int
    snapshot_bytes: int = 0
    restore_call: float = 0.0  # VM.restore(path) returned
    to_running: float = 0.0  # ... to the counter moving
    error: str | None = None


# --- trivmm --------------------------------------------------------------------------------
def _counter(vm: trivmm.VM) -> int:
    assert vm.memory is not None
    return vm.memory.read_u64(COUNTER)


async def _wait_touched(read_phase: Any, timeout: float = TOUCH_TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while await read_phase() != 1:
            await anyio.sleep(0.02)


async def _rate(read_counter: Any, window: float = RATE_WINDOW) -> float:
    """Bytes per second the guest dirties (pages counted over ``window``)."""
    c0, t0 = await read_counter(), time.perf_counter()
    await anyio.sleep(window)
    c1, t1 = await read_counter(), time.perf_counter()
    return (c1 - c0) * PAGE / (t1 - t0)


async def migrate_trivmm(elf: Path, memory_mib: int, downtime_ms: int) -> Outcome:
    out = Outcome(f"trivmm -> trivmm, {memory_mib} MiB")
    config = trivmm.VmConfig(kernel=elf, memory=f"{memory_mib}M")
    holder: list[trivmm.VM] = []
    ready = anyio.Event()

    async def destination(listener: trivmm.migration.IncomingListener) -> None:
        vm = await listener.accept()
        holder.append(vm)
        ready.set()
        with vm:
            await vm.run()

    async with listen("tcp:127.0.0.1:0") as listener, trivmm.open_vm(config) as source:
        assert source.memory is not None
        memory = source.memory

        async def phase() -> int:
            return memory.read_u64(PHASE)

        async def count() -> int:
            return _counter(source)

        await _wait_touched(phase)
        out.dirty_rate = await _rate(count)
        async with anyio.create_task_group() as tg:
            tg.start_soon(destination, listener)
            try:
                info: MigrationInfo = await source.migrate(listener.uri, downtime_ms=downtime_ms)
            except BaseException:
                tg.cancel_scope.cancel()  # the destination may still wait in accept()
                raise
            final = _counter(source)
            with anyio.fail_after(10):
                await ready.wait()
                while _counter(holder[0]) <= final:
                    await anyio.sleep(0.001)
            out.continued = True
            await holder[0].stop()
        out.total_time, out.setup_time, out.downtime = info.total_time, info.setup_time, info.downtime
        out.transferred, out.rounds = info.transferred, info.rounds
        out.note = f"{info.normal_pages} pages sent, {info.zero_pages} zero; converged {info.converged}"
    out.loopback = await anyio.to_thread.run_sync(loopback_rate, out.transferred)
    return out


async def restore_trivmm(elf: Path, memory_mib: int, directory: Path) -> RestoreOutcome:
    out = RestoreOutcome("trivmm: VM.restore(path), run()", memory_mib)
    path = directory / f"paced_{memory_mib}.snap"
    async with trivmm.open_vm(trivmm.VmConfig(kernel=elf, memory=f"{memory_mib}M")) as vm:
        assert vm.memory is not None
        memory = vm.memory

        async def phase() -> int:
            return memory.read_u64(PHASE)

        await _wait_touched(phase)
        await anyio.sleep(0.1)
        await vm.snapshot(path, resume=False)
        await vm.stop()
    out.snapshot_bytes = path.stat().st_blocks * 512  # on disk: a version 3 file keeps zero pages as holes
    start = time.perf_counter()
    restored = await trivmm.VM.restore(path)
    out.restore_call = time.perf_counter() - start
    with restored:
        before = _counter(restored)
        async with anyio.create_task_group() as tg:
            tg.start_soon(restored.run)
            with anyio.fail_after(10):
                while _counter(restored) == before:
                    await anyio.sleep(0)
            out.to_running = time.perf_counter() - start
            await restored.stop()
    path.unlink()
    return out


# --- QEMU ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qemu_argv(qemu: str, elf: Path, memory_mib: int, qmp: Path) -> list[str]:
    return [qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-m", f"{memory_mib}M", "-display", "none",
            "-no-reboot", "-nodefaults", "-serial", "none", "-kernel", str(elf),
            "-qmp", f"unix:{qmp},server=on,wait=off"]  # fmt: skip


async def _qmp_connect(path: Path, proc: subprocess.Popen[bytes]) -> Any:
    from qemu.qmp import QMPClient

    client = QMPClient(path.name)
    with anyio.fail_after(30):
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise BenchError(f"QEMU exited with status {proc.returncode}: {err}")
            if path.exists():
                with contextlib.suppress(OSError):
                    await client.connect(str(path))
                    return client
            await anyio.sleep(0.05)


async def _xp(client: Any, address: int) -> int:
    text = await client.execute("human-monitor-command", {"command-line": f"xp /1gx {address:#x}"})
    match = re.search(r":\s*(0x[0-9a-fA-F]+)", text)
    if match is None:
        raise BenchError(f"QEMU's xp said: {text!r}")
    return int(match.group(1), 16)


async def migrate_qemu(qemu: str, elf: Path, memory_mib: int, downtime_ms: int, directory: Path) -> Outcome:
    out = Outcome(f"QEMU -> QEMU (microvm, kvm), {memory_mib} MiB")
    port = _free_port()
    src_sock, dst_sock = directory / "qemu-src.qmp", directory / "qemu-dst.qmp"
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[Any] = []
    try:
        dst_argv = [*qemu_argv(qemu, elf, memory_mib, dst_sock), "-incoming", f"tcp:127.0.0.1:{port}"]
        for argv in (dst_argv, qemu_argv(qemu, elf, memory_mib, src_sock)):
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE))  # fmt: skip
        dst = await _qmp_connect(dst_sock, procs[0])
        clients.append(dst)
        src = await _qmp_connect(src_sock, procs[1])
        clients.append(src)

        async def phase() -> int:
            return await _xp(src, PHASE)

        async def count() -> int:
            return await _xp(src, COUNTER)

        await _wait_touched(phase)
        out.dirty_rate = await _rate(count)
        await src.execute("migrate-set-parameters", {"downtime-limit": downtime_ms, "max-bandwidth": 1 << 40})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await _wait_migrated(src)
        final = await _xp(src, COUNTER)
        with anyio.fail_after(10):
            while (await dst.execute("query-status"))["status"] != "running" or await _xp(dst, COUNTER) <= final:
                await anyio.sleep(0.01)
        out.continued = True
        out.total_time = info["total-time"] / 1000
        out.setup_time = info.get("setup-time", 0) / 1000
        out.downtime = info["downtime"] / 1000 if "downtime" in info else None
        ram = info.get("ram", {})
        out.transferred, out.rounds = ram.get("transferred", 0), ram.get("dirty-sync-count", 0)
        out.note = f"{ram.get('normal', 0)} pages sent, {ram.get('duplicate', 0)} zero (duplicate)"
    finally:
        await _close_qemus(clients, procs)
    out.loopback = await anyio.to_thread.run_sync(loopback_rate, out.transferred)
    return out


async def restore_qemu(qemu: str, elf: Path, memory_mib: int, directory: Path) -> RestoreOutcome:
    """QEMU's restore of a running guest saved to a file: the source migrated to
    ``exec:cat > FILE`` (live: it then stops), a new QEMU started with ``-incoming exec:cat
    FILE``; the time from that process's spawn to the restored guest's counter moving (QEMU's
    start-up included: it has no in-process restore)."""
    out = RestoreOutcome("QEMU: new process, -incoming exec:cat", memory_mib)
    path = directory / f"qemu_{memory_mib}.state"
    src_sock, dst_sock = directory / "qemu-save.qmp", directory / "qemu-restore.qmp"
    procs: list[subprocess.Popen[bytes]] = []
    clients: list[Any] = []
    try:
        procs.append(subprocess.Popen(qemu_argv(qemu, elf, memory_mib, src_sock), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
        src = await _qmp_connect(src_sock, procs[-1])
        clients.append(src)

        async def phase() -> int:
            return await _xp(src, PHASE)

        await _wait_touched(phase)
        await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        await src.execute("migrate", {"uri": f"exec:cat > {path}"})
        await _wait_migrated(src)
        out.snapshot_bytes = path.stat().st_blocks * 512
        start = time.perf_counter()
        procs.append(subprocess.Popen([*qemu_argv(qemu, elf, memory_mib, dst_sock), "-incoming", f"exec:cat {path}"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))  # fmt: skip
        dst = await _qmp_connect(dst_sock, procs[-1])
        clients.append(dst)
        with anyio.fail_after(QEMU_TIMEOUT):
            while (await dst.execute("query-status"))["status"] != "running":
                await anyio.sleep(0.001)
            out.restore_call = time.perf_counter() - start
            before = await _xp(dst, COUNTER)
            while await _xp(dst, COUNTER) == before:
                await anyio.sleep(0.001)
        out.to_running = time.perf_counter() - start
    finally:
        await _close_qemus(clients, procs)
        path.unlink(missing_ok=True)
    return out


async def _wait_migrated(client: Any) -> dict[str, Any]:
    with anyio.fail_after(QEMU_TIMEOUT):
        while True:
            info: dict[str, Any] = await client.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            await anyio.sleep(0.01)
    if info["status"] != "completed":
        raise BenchError(f"QEMU's migration ended {info['status']}: {info.get('error-desc', '')}")
    return info


async def _close_qemus(clients: list[Any], procs: list[subprocess.Popen[bytes]]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.execute("quit")
        with contextlib.suppress(Exception):
            await client.disconnect()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the report ------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    memory_mib: int = 1024
    restore_mib: int = 512
    rate_mib: float = 16.0
    downtime_ms: int = 30
    qemu: bool = True
    install: bool = True


@dataclasses.dataclass
class Report:
    opts: Options
    started: str
    khz: int
    outcomes: list[Outcome]
    restores: list[RestoreOutcome]
    notes: list[str]
    seconds: float = 0.0

    def print(self) -> None:
        o = self.opts
        print(f"Migration (bench/guests/paced_writer.S: {o.memory_mib} MiB guest, 1 vCPU, touching all its RAM, "
              f"then dirtying {o.rate_mib:g} MiB/s at CPL3, paced by the TSC at {self.khz} kHz), "
              f"hot over TCP on 127.0.0.1, downtime limit {o.downtime_ms} ms")  # fmt: skip
        print(f"  started {self.started}, {self.seconds:.1f} s, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
        print("                                         total    setup  downtime      bytes sent  rounds   "
              "stream MB/s  loopback MB/s  ratio  dirtied MiB/s")  # fmt: skip
        for r in self.outcomes:
            if r.error is not None:
                print(f"  {r.label:<37} not measured: {r.error}")
                continue
            down = f"{r.downtime * 1e3:6.1f} ms" if r.downtime is not None else "     n/a"
            print(f"  {r.label:<37} {r.total_time:6.2f} s {r.setup_time * 1e3:5.0f} ms {down} {r.transferred:15,d}"
                  f"  {r.rounds:6d}  {r.stream_rate / 1e6:12.1f}  {r.loopback / 1e6:13.1f}  {r.ratio:5.2f}"
                  f"  {r.dirty_rate / 2**20:13.2f}")  # fmt: skip
            print(f"    {r.note}; destination ran on from the source's counter: {'yes' if r.continued else 'no'}")
        ok = [r for r in self.outcomes if r.error is None]
        ours = next((r for r in ok if r.label.startswith("trivmm")), None)
        theirs = next((r for r in ok if r.label.startswith("QEMU")), None)
        if ours is not None:
            print("  targets:")
            print(f"    trivmm stream rate / loopback      {ours.ratio:5.2f}    (target >= {TARGET_RATIO}): "
                  f"{_verdict(ours.ratio >= TARGET_RATIO)}")  # fmt: skip
            ms = ours.downtime * 1e3 if ours.downtime is not None else float("nan")
            print(f"    trivmm downtime                    {ms:5.1f} ms (target <= {TARGET_DOWNTIME * 1e3:.0f} ms): "
                  f"{_verdict(ms <= TARGET_DOWNTIME * 1e3)}")  # fmt: skip
            if theirs is not None and theirs.downtime is not None:
                print(f"    QEMU downtime, same run            {theirs.downtime * 1e3:5.1f} ms (trivmm's no worse): "
                      f"{_verdict(ms <= theirs.downtime * 1e3)}")  # fmt: skip
        if self.restores:
            print(f"Restore of a {self.restores[0].memory_mib} MiB guest from a file (the same guest, past its "
                  f"touching phase)")  # fmt: skip
            print("                                              disk bytes  VM ready    counter moving")
        for rs in self.restores:
            if rs.error is not None:
                print(f"  {rs.label:<40} not measured: {rs.error}")
                continue
            target = ""
            if rs.label.startswith("trivmm"):
                target = f"   (target <= {TARGET_RESTORE * 1e3:.0f} ms): {_verdict(rs.to_running <= TARGET_RESTORE)}"
            print(f"  {rs.label:<40} {rs.snapshot_bytes:13,d} {rs.restore_call * 1e3:8.1f} ms "
                  f"{rs.to_running * 1e3:8.1f} ms{target}")  # fmt: skip
        for note in self.notes:
            print(f"  {note}")


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


async def run_migration(opts: Options) -> Report:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()) + f" (load average {os.getloadavg()[0]:.2f})"
    t0 = time.perf_counter()
    khz = await anyio.to_thread.run_sync(tsc_khz)
    outcomes: list[Outcome] = []
    notes: list[str] = []
    restores: list[RestoreOutcome] = []
    qemu: str | None = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        elf = assemble_guest(tmp, opts.memory_mib, opts.rate_mib, khz)
        outcomes.append(await migrate_trivmm(elf, opts.memory_mib, opts.downtime_ms))
        if opts.qemu:
            from bench.density import ensure_qemu

            qemu, why = ensure_qemu(opts.install)
            if qemu is None:
                outcomes.append(Outcome("QEMU", error=why))
            else:
                try:
                    outcomes.append(await migrate_qemu(qemu, elf, opts.memory_mib, opts.downtime_ms, tmp))
                except (BenchError, TimeoutError, OSError) as exc:
                    outcomes.append(Outcome("QEMU", error=f"{type(exc).__name__}: {exc}"))
        else:
            notes.append("QEMU: not measured (--no-qemu)")
        if opts.restore_mib > 0:
            relf = assemble_guest(tmp, opts.restore_mib, opts.rate_mib, khz)
            restores.append(await restore_trivmm(relf, opts.restore_mib, tmp))
            if qemu is not None:
                try:
                    restores.append(await restore_qemu(qemu, relf, opts.restore_mib, tmp))
                except (BenchError, TimeoutError, OSError) as exc:
                    restores.append(RestoreOutcome("QEMU", opts.restore_mib, error=f"{type(exc).__name__}: {exc}"))
    return Report(opts, started, khz, outcomes, restores, notes, time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--memory-mib", type=int, default=1024, help="the migrated guest's RAM (default 1024)")
    parser.add_argument("--restore-mib", type=int, default=512, help="the restored guest's RAM (0: no restore)")
    parser.add_argument("--rate-mib", type=float, default=16.0, help="MiB/s the guest dirties (default 16)")
    parser.add_argument("--downtime-ms", type=int, default=30, help="downtime limit for both (default 30)")
    parser.add_argument("--no-qemu", action="store_true", help="do not run QEMU")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install qemu-system-x86")
    args = parser.parse_args(argv)
    opts = Options(memory_mib=args.memory_mib, restore_mib=args.restore_mib, rate_mib=args.rate_mib,
                   downtime_ms=args.downtime_ms, qemu=not args.no_qemu, install=not args.no_install)  # fmt: skip
    try:
        report = anyio.run(run_migration, opts, backend="asyncio")  # qemu.qmp is asyncio's
    except (BenchError, trivmm.MigrationError) as exc:
        raise SystemExit(f"bench.migration: {exc}") from None
    report.print()


if __name__ == "__main__":
    main()
