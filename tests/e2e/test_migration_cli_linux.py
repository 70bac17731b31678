"""The small Linux guest moved twice between two "hosts" by the CLI (issue 6: ``python -m
trivmm migrate`` moves a running Debian-built guest between two namespaces with its console
and disk continuing, with and without shared storage).

Two network namespaces joined by a veth pair (tests/netns.py); three trivmm processes, each
``python -m trivmm run`` with the guest's console on its stdout:

1. the source, booted in namespace A with an ext4 image IMG on virtio-blk and a control
   socket S1 (one vCPU: with two, boots of this kernel stalled here for minutes at a
   clocksource switch under load; tests/e2e/test_migration_linux.py migrates two);
2. hop 1, shared storage: a destination in namespace B (``run --incoming tcp:B:PORT
   --disk IMG --api-sock S2``, the same image path), and ``migrate S1 tcp:B:PORT`` from A;
3. hop 2, no shared storage: a destination back in A (``run --incoming tcp:A:PORT2 --disk
   IMG2``, IMG2 a fresh sparse file of IMG's size), and ``migrate S2 tcp:A:PORT2
   --copy-storage`` from B.

One boot. The guest mounts its disk, writes a file, and prints a counter line about every
0.5 s (``read -t 0.5`` on its serial port, which forks nothing) until a line ``STOP``
comes in on the serial port: the test types it into the last process's stdin once that
process's console shows the count going on. The guest then writes a second file, reads the
first back, unmounts and powers off.

Checked: both ``migrate`` runs exit 0 and each source then exits 0 (``migrate`` quits it);
the three consoles one after another count 1, 2, 3, ... with no number lost or repeated;
the guest read the first file back on the last host and its command ended with status 0;
the last process exits 0; and after power-off the host finds both files in IMG2 (the
copied disk), while IMG (left behind) has only the first.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import prerequisite_missing
from tests.e2e.test_linux_boot import _guest
from tests.e2e.test_migration_linux import _counts
from tests.e2e.test_virtio_linux import _debugfs_cat, _ext4
from tests.netns import ENV, NamespacePair, start_trivmm, two_namespaces
from trivmm.guest.build import ensure_debian_packages

pytestmark = pytest.mark.e2e
MIGRATE_AT = 6  # counter lines shown on a host before the guest is moved on from it
STOP_AFTER = 4  # counter lines shown on the last host before the host says STOP
MAX_COUNT = 1500  # the guest's own limit (about 12 min): the script ends even if STOP never comes
BOOT_TIMEOUT = 840  # to the counter: 3-5 min on an idle host, 10 min and more when the 2 cores are shared
HOP_TIMEOUT = 180  # a migration command, or a host's first counter lines (the guest is slow after a hop)
PORT_B, PORT_A = 4444, 4445

# Run by the test initramfs's /init between TRIVMM-CMD-BEGIN and TRIVMM-CMD-END (its stdin
# is /dev/null: the loop reads the serial port itself).
GUEST_SCRIPT = f"""\
mkdir -p /m && mount -t ext4 /dev/vda /m || exit 1
echo "written on the first host" > /m/before.txt && sync
i=0
while [ $i -lt {MAX_COUNT} ]; do
  i=$((i+1)); echo "COUNT $i"
  if read -t 0.5 line; then case "$line" in *STOP*) break ;; esac; fi
done </dev/ttyS0
echo "stopped at $i"
echo "written on the last host after $i" > /m/after.txt
echo "read back: $(cat /m/before.txt) / $(cat /m/after.txt)"
sync && umount /m && echo UNMOUNTED
"""
MIGRATED = re.compile(rb"trivmm: migrated to \S+: ([0-9.]+) MiB in (\d+) ms, (\d+) round\(s\), downtime (\d+) ms")


def _wait(condition: Callable[[], bool], procs: list[subprocess.Popen[bytes]], what: str, timeout: float) -> float:
    """Wait for ``condition`` while every process in ``procs`` runs; the seconds it took."""
    started = time.monotonic()
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"{what}: a process ended ({proc.args!r}: {proc.returncode})"
        assert time.monotonic() - started < timeout, f"timed out ({timeout} s) waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def _migrate(namespace: str, source_api: Path, uri: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m trivmm migrate SOURCE_API URI ...`` run in ``namespace``."""
    return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-m", "trivmm", "migrate",
                           str(source_api), uri, *extra], env=ENV, capture_output=True, stdin=subprocess.DEVNULL,
                          timeout=HOP_TIMEOUT)  # fmt: skip


class Hosts:
    """The three trivmm processes, their files, and what the test measured."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.times: dict[str, float] = {}
        self.hops: list[bytes] = []  # each migrate command's stderr

    def out(self, name: str) -> bytes:
        return (self.dir / f"{name}.out").read_bytes()

    def err(self, name: str) -> bytes:
        return (self.dir / f"{name}.err").read_bytes()

    def console(self) -> bytes:
        return b"".join(self.out(name) for name in ("src", "mid", "dst") if (self.dir / f"{name}.out").exists())

    def show(self) -> None:
        for name in self.procs:
            print(f"--- {name} console (tail) ---\n{self.out(name).decode(errors='replace')[-2500:]}")
            print(f"--- {name} stderr ---\n{self.err(name).decode(errors='replace')[-2500:]}")
        for n, hop in enumerate(self.hops, 1):
            print(f"--- migrate {n} stderr ---\n{hop.decode(errors='replace')[-2500:]}")
        print("times:", self.times)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _move_the_guest_twice(hosts: Hosts, pair: NamespacePair, small: Path, image: Path, copy: Path) -> None:
    command = base64.urlsafe_b64encode(GUEST_SCRIPT.encode()).decode().rstrip("=")
    s1, s2 = hosts.dir / "src.qmp", hosts.dir / "mid.qmp"
    started = time.monotonic()
    src = hosts.procs["src"] = start_trivmm(
        ["run", "--kernel", str(small / "bzImage"), "--initrd", str(small / "initramfs.cpio"), "--memory", "128M",
         "--append", f"printk.time=1 trivmm.cmd={command}", "--disk", f"{image},format=raw",
         "--api-sock", str(s1)], hosts.dir, "src", netns=pair.a)  # fmt: skip
    mid = hosts.procs["mid"] = start_trivmm(
        ["run", "--incoming", f"tcp:{pair.address_b}:{PORT_B}", "--disk", f"{image},format=raw",
         "--api-sock", str(s2)], hosts.dir, "mid", netns=pair.b)  # fmt: skip
    dst = hosts.procs["dst"] = start_trivmm(
        ["run", "--incoming", f"tcp:{pair.address_a}:{PORT_A}", "--disk", f"{copy},format=raw"], hosts.dir, "dst",
        netns=pair.a, stdin=subprocess.PIPE)  # fmt: skip
    everyone = [src, mid, dst]
    listening = b"waiting for a migration on tcp:"
    _wait(lambda: listening in hosts.err("mid") and listening in hosts.err("dst"), everyone, "the destinations", 60)
    hosts.times["boot"] = _wait(lambda: len(_counts(hosts.out("src"))) >= MIGRATE_AT and s1.exists(), everyone,
                                "the counter on the first host", BOOT_TIMEOUT)  # fmt: skip

    # Hop 1, shared storage: A -> B, the destination opens the same image.
    hop = _migrate(pair.a, s1, f"tcp:{pair.address_b}:{PORT_B}")
    hosts.hops.append(hop.stderr)
    assert hop.returncode == 0, hop.stderr.decode(errors="replace")
    assert src.wait(timeout=60) == 0  # migrate quits the source once the destination runs the guest
    assert b"the guest runs here" in hosts.err("mid")
    hosts.times["hop 1 done at"] = time.monotonic() - started
    on_first = len(_counts(hosts.out("src")))
    hosts.times["counting on B after"] = _wait(
        lambda: len(_counts(hosts.out("src") + hosts.out("mid"))) >= on_first + MIGRATE_AT, [mid, dst],
        "the counter on the second host", HOP_TIMEOUT)  # fmt: skip

    # Hop 2, no shared storage: B -> A, the disk's contents copied into a fresh image.
    hop = _migrate(pair.b, s2, f"tcp:{pair.address_a}:{PORT_A}", "--copy-storage")
    hosts.hops.append(hop.stderr)
    assert hop.returncode == 0, hop.stderr.decode(errors="replace")
    assert mid.wait(timeout=60) == 0
    assert b"the guest runs here" in hosts.err("dst")
    hosts.times["hop 2 done at"] = time.monotonic() - started
    on_two = len(_counts(hosts.out("src") + hosts.out("mid")))
    hosts.times["counting on A again after"] = _wait(
        lambda: len(_counts(hosts.console())) >= on_two + STOP_AFTER, [dst], "the counter on the last host",
        HOP_TIMEOUT)  # fmt: skip

    # The guest's serial port on the last host: STOP ends its loop; it writes, reads, powers off.
    assert dst.stdin is not None
    dst.stdin.write(b"STOP\n")
    dst.stdin.flush()
    assert dst.wait(timeout=HOP_TIMEOUT) == 0, "the last host's trivmm did not end cleanly"
    hosts.times["total"] = time.monotonic() - started


def test_the_cli_moves_a_linux_guest_between_namespaces_with_and_without_shared_storage(tmp_path: Path) -> None:
    small = _guest("small")
    try:
        ensure_debian_packages(["e2fsprogs"])
    except Exception as exc:
        prerequisite_missing("disk tools", f"e2fsprogs could not be installed: {exc}")
    image, copy = tmp_path / "disk.raw", tmp_path / "copy.raw"
    _ext4(image, "a raw image from the host\n")
    with open(copy, "wb") as empty:  # a fresh sparse image of the same size for the copy
        empty.truncate(image.stat().st_size)
    hosts = Hosts(tmp_path)
    with two_namespaces() as pair:
        try:
            _move_the_guest_twice(hosts, pair, small, image, copy)
        finally:  # shown when the test fails
            hosts.stop_all()
            hosts.show()
    for n, hop in enumerate(hosts.hops, 1):
        found = MIGRATED.search(hop)
        assert found, hop
        print(f"hop {n}: {found.group(1).decode()} MiB in {found.group(2).decode()} ms, "
              f"{found.group(3).decode()} round(s), downtime {found.group(4).decode()} ms")  # fmt: skip

    # The count goes on from host to host with nothing lost or repeated, on each of the three.
    console = hosts.console()
    counts = _counts(console)
    tail = console.decode(errors="replace")[-2000:]
    assert counts == list(range(1, len(counts) + 1)), (counts, tail)
    assert len(_counts(hosts.out("src"))) >= MIGRATE_AT and len(_counts(hosts.out("dst"))) >= STOP_AFTER - 1, tail
    assert _counts(hosts.out("mid")), "no counter line on the second host"

    # On the last host the guest wrote its disk (the copy), read the first file back and ended cleanly.
    last = hosts.out("dst").decode(errors="replace")
    assert f"stopped at {counts[-1]}" in last, last[-2000:]
    assert f"read back: written on the first host / written on the last host after {counts[-1]}" in last
    assert "UNMOUNTED" in last and "TRIVMM-CMD-END rc=0" in last, last[-2000:]

    # The host finds both files in the copied image; the image left behind never saw the second.
    assert _debugfs_cat(copy, "before.txt") == "written on the first host\n"
    assert _debugfs_cat(copy, "after.txt") == f"written on the last host after {counts[-1]}\n"
    assert _debugfs_cat(image, "before.txt") == "written on the first host\n"
    assert _debugfs_cat(image, "after.txt") == ""
