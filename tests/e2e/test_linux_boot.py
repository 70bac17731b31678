"""Boot Debian-built Linux guests (``python -m trivmm guest build``) to their init's marker.

Slow on a host that emulates guest kernel code (about a minute for the small kernel); each
boot here is worth its time. Guests that were not built skip these tests, or fail them in
strict mode (CI, or scripts/test without --fast: see tests/conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

import trivmm
from tests.conftest import prerequisite_missing
from trivmm import VM, StopReason, VmConfig
from trivmm.boot.layout import ram_ranges
from trivmm.boot.loader import BootProtocol, load_kernel
from trivmm.guest.build import INIT_MARKER, default_cache_dir
from trivmm.memory import GuestMemory

pytestmark = pytest.mark.e2e
SMALL_BOOT_TIMEOUT = 600  # about 160 s here on 2026-11-27 (nested host; see docs/benchmarks.md)
STOCK_BOOT_TIMEOUT = 60 * 60  # 13-19 min on an idle 2-core host; far longer when it is shared


def _guest(kind: str) -> Path:
    """The directory of the built guest ``kind``; one not built is a missing prerequisite."""
    directory = default_cache_dir() / kind
    missing = [name for name in ("vmlinux", "bzImage", "initramfs.cpio") if not (directory / name).exists()]
    if missing:
        prerequisite_missing("guests", f"{kind} guest not built ({', '.join(missing)} missing in {directory}): "
                                       "run `python -m trivmm guest build`")  # fmt: skip
    return directory


def test_small_bzimage_boots_by_pvh_to_init_with_two_cpus_through_the_cli() -> None:
    """The bzImage under --boot-protocol auto: trivmm unpacks its payload and enters the
    vmlinux inside by PVH, so the guest's own decompressor never runs."""
    small = _guest("small")
    memory = GuestMemory.from_ranges(ram_ranges(128 << 20))
    try:
        entry = load_kernel(memory, (small / "bzImage").read_bytes())  # what the CLI below will do
    finally:
        memory.close()
    assert entry.protocol is BootProtocol.PVH and entry.unpacked == "lz4", entry
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "trivmm", "run", "--kernel", str(small / "bzImage"),
         "--initrd", str(small / "initramfs.cpio"), "--vcpus", "2", "--memory", "128M"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=SMALL_BOOT_TIMEOUT,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    console = result.stdout.decode(errors="replace")
    assert result.returncode == 0, (result.stderr.decode(errors="replace"), console[-3000:])
    assert f"{INIT_MARKER} cpus=2" in console, console[-3000:]
    assert "smp: Brought up 1 node, 2 CPUs" in console
    print(f"small bzImage (unpacked, PVH, 2 vCPUs): marker and clean end in {elapsed:.1f} s")


async def test_small_kernel_by_the_64_bit_entry_and_a_panic_that_ends_the_vm() -> None:
    """One boot, two checks: the 64-bit entry reaches init; then init exits on request, the
    kernel panics, and its pvpanic driver (found through the DSDT) ends the VM."""
    small = _guest("small")
    output = bytearray()
    config = VmConfig(kernel=small / "vmlinux", initrd=small / "initramfs.cpio", boot_protocol="linux64",
                      append="trivmm.panic")  # fmt: skip
    with VM(config, console_output=output.extend) as vm, trio.fail_after(SMALL_BOOT_TIMEOUT):
        result = await vm.run()
    console = output.decode(errors="replace")
    assert f"{INIT_MARKER} cpus=1" in console, console[-3000:]
    assert re.search(r"Command line: .*console=ttyS0", console)
    assert result.reason is StopReason.PANIC, console[-3000:]
    assert "Kernel panic - not syncing: Attempted to kill init!" in console


async def test_small_bzimage_by_the_linux_boot_protocol() -> None:
    """linux64 asked for: the bzImage as it is, unpacked by its own decompressor in the guest."""
    small = _guest("small")
    output = bytearray()
    config = VmConfig(kernel=small / "bzImage", initrd=small / "initramfs.cpio", boot_protocol="linux64")
    with VM(config, console_output=output.extend) as vm, trio.fail_after(SMALL_BOOT_TIMEOUT):
        result = await vm.run()
    console = output.decode(errors="replace")
    assert result.reason in (StopReason.RESET, StopReason.POWER_OFF)
    assert f"{INIT_MARKER} cpus=1" in console, console[-3000:]


# The stock kernel's side of its boot: the virtio-pci disk (found with no command-line help:
# the PCI root bridge in the DSDT, the device on the bus, virtio_pci and virtio_blk loaded
# from the initramfs) is read and written.
STOCK_DISK_SCRIPT = """\
d=$(for b in /sys/block/vd*; do [ "$(cat $b/serial)" = stockdisk ] && echo /dev/${b##*/}; done)
echo "disk: $d"
mkdir -p /m && mount -t ext4 $d /m && cat /m/hello.txt && echo "written by the stock kernel" > /m/out.txt
umount /m
"""


@pytest.mark.stock
def test_stock_cloud_kernel_reaches_init_and_uses_a_virtio_pci_disk(tmp_path: Path) -> None:
    """One boot of the stock Debian cloud kernel (long here: see README): init with two
    vCPUs, then an ext4 disk on virtio-pci read and written."""
    import base64

    from tests.e2e.test_virtio_linux import _debugfs_cat, _ext4, _tools
    from trivmm import DiskConfig

    stock = _guest("stock")
    _tools()
    disk = tmp_path / "stock.raw"
    _ext4(disk, "a disk from the host\n")
    command = base64.urlsafe_b64encode(STOCK_DISK_SCRIPT.encode()).decode().rstrip("=")
    config = VmConfig(kernel=stock / "vmlinux", initrd=stock / "initramfs.cpio", vcpus=2, memory="256M",
                      append=f"trivmm.cmd={command}", transport="pci",
                      disks=[DiskConfig(disk, "raw", serial="stockdisk")])  # fmt: skip
    output = bytearray()
    log = tmp_path / "console.log"  # followed live (tail -f) on a long boot

    def keep(data: bytes) -> None:
        output.extend(data)
        with log.open("ab") as file:
            file.write(data)

    async def boot() -> trivmm.VmExit:
        with VM(config, console_output=keep) as vm, trio.fail_after(STOCK_BOOT_TIMEOUT):
            return await vm.run()

    started = time.monotonic()
    try:
        result = trio.run(boot)
    finally:
        print(output.decode(errors="replace")[-6000:])  # shown when the boot fails or times out
    console = output.decode(errors="replace")
    print(f"stock kernel: init, disk and power-off in {time.monotonic() - started:.0f} s")
    assert result.reason is StopReason.POWER_OFF, console[-3000:]
    assert f"{INIT_MARKER} cpus=2" in console, console[-3000:]
    cmd = console.split("TRIVMM-CMD-BEGIN", 1)[-1]
    assert "TRIVMM-CMD-END rc=0" in cmd and "a disk from the host" in cmd, console[-4000:]
    assert re.search(r"disk: /dev/vd[a-z]", cmd), cmd
    assert _debugfs_cat(disk, "out.txt") == "written by the stock kernel\n"


def test_busybox_shell_on_the_serial_console_through_the_cli() -> None:
    """stdin -> UART receive interrupts -> Linux's 8250 driver -> a shell, and back."""
    import threading

    small = _guest("small")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trivmm", "run", "--kernel", str(small / "vmlinux"),
         "--initrd", str(small / "initramfs.cpio"), "--append", "trivmm.shell"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    console = bytearray()
    stdout = proc.stdout

    def read_console() -> None:
        while chunk := stdout.read1(4096):  # type: ignore[attr-defined]  # a BufferedReader
            console.extend(chunk)

    reader = threading.Thread(target=read_console)
    reader.start()

    def wait_for(text: bytes, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while text not in console:
            assert time.monotonic() < deadline, f"no {text!r} on the console: {bytes(console[-2000:])!r}"
            time.sleep(0.2)

    try:
        wait_for(b"/ # ", SMALL_BOOT_TIMEOUT)
        proc.stdin.write(b"echo SHELL-$((6*7))-WORKS\n")
        proc.stdin.flush()
        wait_for(b"SHELL-42-WORKS", 60)  # the shell evaluated what we typed
        proc.stdin.write(b"exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
        reader.join(timeout=10)
