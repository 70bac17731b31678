"""The display's cost: CPU of the VNC server for an idle and a busy screen, side by side.

    python -m bench.display                 (also part of `python -m bench`)
    python -m bench.display --rounds 3 --seconds 3 --size 1024x768

A tiny guest (tests/kvm/guests/display.S) draws a pattern into a WIDTHxHEIGHT framebuffer
at CPL3 and then either halts (idle: the screen never changes again) or redraws the whole
screen for ever (busy: every pixel changes on every pass). A `trivmm.vnc.VncServer` in this
process serves it on a unix socket; the client is another process (`--client`, below: a
blocking raw-socket RFB client that asks for an incremental update as soon as it has read
the last one, Raw encoding), so its CPU is not counted. Three cases, alternating in every
round, each in a VM of its own:

1. idle screen, no client connected;
2. idle screen, a client waiting for a change the whole time: the refresher polls KVM's
   dirty log, at 30 a second for the first second without a change, then 5 a second
   (the server's default ``idle_refresh_rate``);
3. the same at 30 a second throughout (``idle_refresh_rate=30``);
4. busy screen, the same client (every poll finds the screen redrawn: scan, encode, send).

"VNC server CPU" is the CPU time, over a window of ``--seconds`` (after the client's first
update and 1.5 s more), of every thread of this process except the vCPU threads (/proc/self/task/*/schedstat,
ns resolution; a thread that ends within the window is not counted: only anyio's idle
worker threads do), the event loop (trio) with the server, the refresher and the VM's other
tasks, and the worker threads that scan and encode. Printed per second of wall time (1000
ms/s is one core), with the display's polls and scans and the updates the client got.
Medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import statistics
import struct
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
from trivmm.devices.display import parse_display

ROOT = Path(__file__).resolve().parents[1]
DONE = 0x4000  # the guest's counter: 1 once drawn (idle), passes (busy)
# (name, busy guest, a client, the server's idle poll rate)
CASES = (("idle, no client", False, False, 5), ("idle, client waiting", False, True, 5),
         ("idle, waiting, 30/s", False, True, 30), ("busy, client waiting", True, True, 5))  # fmt: skip


@dataclasses.dataclass
class Figures:
    cpu_ms: float  # VNC server CPU per second of wall time
    polls: float
    scans: float
    updates: float
    mbytes: float


def _thread_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds run so far by each live thread of this process, but those in ``exclude``."""
    times = {}
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid in exclude:
            continue
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                times[tid] = int(f.read().split()[0]) * 1e-9
    return times


def _cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU run between two ``_thread_cpu`` readings by the threads alive at the second (an
    idle worker thread that ended meanwhile had nothing to run)."""
    return sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items())


def assemble_guest(out_dir: Path, width: int, height: int, busy: bool) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.kvm.guests import assemble

    out = out_dir / ("busy" if busy else "idle")
    out.mkdir(exist_ok=True)
    return assemble("display", out, symbols={"width": width, "height": height, "busy": int(busy)})


async def run_case(elf: Path, size: tuple[int, int], client: bool, idle_rate: int, seconds: float,
                   workdir: Path) -> Figures:  # fmt: skip
    from trivmm.vnc import VncServer

    config = trivmm.VmConfig(kernel=elf, memory="16M", display=size)
    sock = workdir / "bench-vnc.sock"
    async with trivmm.open_vm(config) as vm:
        assert vm.display is not None and vm.memory is not None
        with anyio.fail_after(30):
            while vm.memory.read_u32(DONE) == 0:
                await anyio.sleep(0.01)
        vcpus = {t.native_id for t in threading.enumerate() if t.name.startswith("trivmm-vcpu") and t.native_id}
        with VncServer(vm.display, vm.i8042, f"unix:{sock}", idle_refresh_rate=idle_rate) as server:
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                process = None
                if client:
                    process = subprocess.Popen([sys.executable, "-m", "bench.display", "--client", str(sock)],
                                               cwd=ROOT)  # fmt: skip
                with anyio.fail_after(30):  # warm-up: the client has its first (full) update ...
                    while client and server.stats()["updates"] < 1:
                        await anyio.sleep(0.01)
                await anyio.sleep(1.5)  # ... and an idle screen's polling has slowed down
                before, cpu0, wall0 = server.stats(), _thread_cpu(vcpus), time.perf_counter()
                await anyio.sleep(seconds)
                after, cpu1, wall1 = server.stats(), _thread_cpu(vcpus), time.perf_counter()
                if process is not None:
                    process.kill()
                    await anyio.to_thread.run_sync(process.wait)
                tg.cancel_scope.cancel()
    wall = wall1 - wall0

    def rate(key: str) -> float:
        return (after[key] - before[key]) / wall

    return Figures(_cpu_between(cpu0, cpu1) * 1000 / wall, rate("polls"), rate("scans"), rate("updates"),
                   rate("bytes") / (1 << 20))  # fmt: skip


async def run_bench(rounds: int, seconds: float, size: tuple[int, int]) -> dict[str, list[Figures]]:
    results: dict[str, list[Figures]] = {case[0]: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-display-") as tmp:
        workdir = Path(tmp)
        idle = assemble_guest(workdir, *size, busy=False)
        busy = assemble_guest(workdir, *size, busy=True)
        for _ in range(rounds):
            for name, busy_guest, client, idle_rate in CASES:
                elf = busy if busy_guest else idle
                results[name].append(await run_case(elf, size, client, idle_rate, seconds, workdir))
    return results


def report(results: dict[str, list[Figures]], rounds: int, seconds: float, size: tuple[int, int]) -> None:
    print(f"Display {size[0]}x{size[1]}: VNC server CPU, {rounds} rounds x {seconds:.0f} s per case (medians; "
          "1000 ms/s = one core)")  # fmt: skip
    for case, figures in results.items():
        def median(field: str, figures: list[Figures] = figures) -> float:
            return statistics.median(getattr(f, field) for f in figures)

        cpus = [f.cpu_ms for f in figures]
        print(f"  {case:22s} CPU {median('cpu_ms'):7.1f} ms/s (range {min(cpus):.1f}..{max(cpus):.1f})   "
              f"polls {median('polls'):5.1f}/s   scans {median('scans'):5.1f}/s   "
              f"updates {median('updates'):5.1f}/s   {median('mbytes'):6.1f} MiB/s to the client")  # fmt: skip


# --- the client process ---------------------------------------------------------------------------
def client(path: str) -> None:
    """A VNC client that always wants the next change: connect (RFB 3.8, None), one full
    update, then incremental requests, each sent once the last update has been read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    stream = sock.makefile("rb")

    def read(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise SystemExit(0)
        return data

    read(12)
    sock.sendall(b"RFB 003.008\n")
    read(read(1)[0])
    sock.sendall(b"\x01")
    read(4)
    sock.sendall(b"\x01")
    width, height = struct.unpack(">HH", read(4))
    read(16)
    read(struct.unpack(">I", read(4))[0])
    sock.sendall(struct.pack(">BxHi", 2, 1, 0))  # Raw only
    incremental = 0
    while True:
        sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, width, height))
        incremental = 1
        assert read(1) == b"\x00"
        (rects,) = struct.unpack(">xH", read(3))
        for _ in range(rects):
            _, _, w, h, _ = struct.unpack(">HHHHi", read(12))
            read(w * h * 4)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.display", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per case")
    parser.add_argument("--size", default="1024x768", help="the display, WIDTHxHEIGHT")
    parser.add_argument("--client", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client(args.client)
        return
    size = parse_display(args.size)
    results = trio.run(run_bench, args.rounds, args.seconds, size)
    report(results, args.rounds, args.seconds, size)


if __name__ == "__main__":
    main()
