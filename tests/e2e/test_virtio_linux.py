"""The small Linux guest with virtio devices, one boot per transport (PCI under trio, MMIO
under asyncio), each boot serving every check: an ext4 disk made by ``mke2fs -d`` read and
written (raw, then qcow2 that ``qemu-img check`` finds clean), a read-only vmdk made by
``qemu-img convert``, random bytes from virtio-rng, a TCP round trip to the host over a tap,
and vsock round trips both ways. The guest's script goes on its command line
(``trivmm.cmd=``, run by the test initramfs's /init); the host checks the images after the
guest has powered off.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

import trivmm
from tests.conftest import prerequisite_missing
from tests.e2e.test_linux_boot import SMALL_BOOT_TIMEOUT, _guest
from trivmm import DiskConfig, NetConfig, StopReason, VmConfig, VsockConfig
from trivmm.guest.build import ensure_debian_packages

pytestmark = pytest.mark.e2e
HOST_IP, GUEST_IP, TCP_PORT = "10.77.{n}.1", "10.77.{n}.2", 5555
GUEST_CID, HOST_VSOCK_PORT, GUEST_VSOCK_PORT = 3, 6000, 7000

# The guest's side, run by /init between TRIVMM-CMD-BEGIN and TRIVMM-CMD-END. Disks are found
# by their serial numbers (virtio-blk's GET_ID, in sysfs), not by probe order.
GUEST_SCRIPT = """\
dev() {{ for d in /sys/block/vd*; do [ "$(cat $d/serial)" = $1 ] && echo /dev/${{d##*/}}; done; }}
mkdir -p /m
for s in raw qcow2; do
  mount -t ext4 $(dev $s) /m && cat /m/hello.txt && echo "$s written by the guest" > /m/out.txt && umount /m
done
mount -t ext4 -o ro,noload $(dev vmdk) /m && cat /m/hello.txt && umount /m
echo "rng: $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n')"
ip addr add {guest_ip}/24 dev eth0 && ip link set eth0 up
ping -c 2 -W 10 {host_ip} | grep -c "bytes from" | sed "s/^/icmp: /"
echo "tcp: $(echo hello-over-tap | nc -w 30 {host_ip} {port})"
vsock_helper listen {guest_port} &
echo "vsock: $(vsock_helper connect 2 {host_port} hello-over-vsock)"
wait
"""


def _tools() -> None:
    try:
        ensure_debian_packages(["e2fsprogs", "qemu-utils"])
    except Exception as exc:
        prerequisite_missing("disk tools", f"e2fsprogs and qemu-utils could not be installed: {exc}")
    if not os.path.exists("/dev/net/tun") or os.geteuid() != 0 or shutil.which("ip") is None:
        prerequisite_missing("tap", "making a tap needs root, /dev/net/tun and iproute2's ip")


def _ext4(path: Path, text: str) -> None:
    tree = path.parent / f"{path.name}.tree"
    tree.mkdir()
    (tree / "hello.txt").write_text(text)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path), "16M"], check=True)


def _debugfs_cat(image: Path, name: str) -> str:
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, text=True, check=True)
    return result.stdout


def _images(tmp_path: Path) -> dict[str, Path]:
    raw, qcow2, vmdk = tmp_path / "disk.raw", tmp_path / "disk.qcow2", tmp_path / "ro.vmdk"
    _ext4(raw, "a raw image from the host\n")
    base = tmp_path / "base.raw"
    _ext4(base, "a qcow2 image from the host\n")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base), str(qcow2)], check=True)
    flat = tmp_path / "for-vmdk.raw"
    _ext4(flat, "a vmdk image from the host\n")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(flat), str(vmdk)], check=True)
    return {"raw": raw, "qcow2": qcow2, "vmdk": vmdk}


class Boot:
    """What one boot saw: its exit and console, and what the host's servers received."""

    def __init__(self) -> None:
        self.console = bytearray()
        self.tcp: list[bytes] = []
        self.vsock_in: list[bytes] = []  # the guest's connection to <uds>_<port>
        self.vsock_out = b""  # what came back on the host's CONNECT to the guest
        self.result: trivmm.VmExit | None = None


async def _echo_upper(stream: anyio.abc.ByteStream, received: list[bytes]) -> None:
    async with stream:
        data = b""
        with anyio.move_on_after(30):
            while b"\n" not in data and not data.endswith(b"vsock"):
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
        received.append(data)
        await stream.send(data.upper())


async def _connect_to_guest(uds: Path, boot: Boot) -> None:
    """Firecracker's convention: CONNECT <port>, OK <host port>, then the bytes."""
    async with await anyio.connect_unix(uds) as stream:
        await stream.send(f"CONNECT {GUEST_VSOCK_PORT}\n".encode())
        reply = b""
        while b"\n" not in reply:
            reply += await stream.receive()
        assert reply.startswith(b"OK "), reply
        await stream.send(b"ping-from-host")
        await stream.send_eof()
        data = reply.split(b"\n", 1)[1]
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
        boot.vsock_out = data


async def _boot(config: VmConfig, tap: str, subnet: int, uds: Path) -> Boot:
    boot = Boot()
    try:
        await _run(boot, config, tap, subnet, uds)
    finally:
        print(boot.console.decode(errors="replace")[-6000:])  # shown when the test fails
    return boot


async def _run(boot: Boot, config: VmConfig, tap: str, subnet: int, uds: Path) -> None:
    host_ip = HOST_IP.format(n=subnet)
    with anyio.fail_after(SMALL_BOOT_TIMEOUT):
        async with trivmm.open_vm(config) as vm:
            subprocess.run(["ip", "addr", "add", f"{host_ip}/24", "dev", tap], check=True)
            subprocess.run(["ip", "link", "set", tap, "up"], check=True)
            tcp = await anyio.create_tcp_listener(local_host=host_ip, local_port=TCP_PORT)
            unix = await anyio.create_unix_listener(f"{uds}_{HOST_VSOCK_PORT}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(tcp.serve, lambda stream: _echo_upper(stream, boot.tcp))
                tg.start_soon(unix.serve, lambda stream: _echo_upper(stream, boot.vsock_in))
                connected = False
                async for chunk in vm.console:
                    boot.console += chunk
                    if not connected and f"LISTENING {GUEST_VSOCK_PORT}".encode() in boot.console:
                        connected = True
                        tg.start_soon(_connect_to_guest, uds, boot)
                tg.cancel_scope.cancel()
            boot.result = await vm.wait()
            for device in vm.virtio_devices:  # what the NIC saw, for a failure's report
                for counter in ("stats", "rx_drops", "tx_drops", "rx_bad_buffers"):
                    value = getattr(device, counter, None)
                    print(device.name, counter, getattr(value, "by_reason", value))
            print(Path(f"/sys/class/net/{tap}/statistics/rx_packets").read_text().strip(), "host rx packets,",
                  Path(f"/sys/class/net/{tap}/statistics/tx_packets").read_text().strip(), "host tx packets")


@pytest.mark.parametrize(("transport", "backend"), [("pci", "trio"), ("mmio", "asyncio")])
def test_small_guest_uses_disks_rng_and_network(transport: str, backend: str, tmp_path: Path) -> None:
    small = _guest("small")
    _tools()
    images = _images(tmp_path)
    subnet = 1 if transport == "pci" else 2
    tap = f"tvm{transport}{os.getpid() % 10000}"
    script = GUEST_SCRIPT.format(guest_ip=GUEST_IP.format(n=subnet), host_ip=HOST_IP.format(n=subnet), port=TCP_PORT,
                                 guest_port=GUEST_VSOCK_PORT, host_port=HOST_VSOCK_PORT)
    command = base64.urlsafe_b64encode(script.encode()).decode().rstrip("=")
    uds = tmp_path / "vsock.sock"
    config = VmConfig(
        kernel=small / "vmlinux", initrd=small / "initramfs.cpio", memory="128M", transport=transport,
        append=f"trivmm.cmd={command}", rng=True, net=[NetConfig(tap=tap)],
        disks=[DiskConfig(images["raw"], "raw", serial="raw"), DiskConfig(images["qcow2"], serial="qcow2"),
               DiskConfig(images["vmdk"], serial="vmdk", readonly=True)],
        vsock=VsockConfig(GUEST_CID, uds),
    )  # fmt: skip
    boot = anyio.run(_boot, config, tap, subnet, uds, backend=backend)
    result, console = boot.result, boot.console.decode(errors="replace")
    assert result is not None

    assert result.reason in (StopReason.POWER_OFF, StopReason.RESET), console[-3000:]
    output = console.split("TRIVMM-CMD-BEGIN", 1)[-1]
    assert "TRIVMM-CMD-END rc=0" in output, console[-4000:]
    for text in ("a raw image from the host", "a qcow2 image from the host", "a vmdk image from the host"):
        assert text in output, output
    rng = next(line for line in output.splitlines() if line.startswith("rng: "))
    assert len(rng) == len("rng: ") + 32 and len(set(rng[5:])) > 4, rng
    assert "icmp: 2" in output, output  # two pings answered by the host, over the tap
    assert boot.tcp == [b"hello-over-tap\n"] and "tcp: HELLO-OVER-TAP" in output, output
    assert boot.vsock_in == [b"hello-over-vsock"] and "vsock: HELLO-OVER-VSOCK" in output, output  # guest -> host
    assert boot.vsock_out == b"PING-FROM-HOST", (boot.vsock_out, output)  # host -> guest

    # After power-off, the host reads what the guest wrote; qemu-img agrees the qcow2 is sound.
    assert _debugfs_cat(images["raw"], "out.txt") == "raw written by the guest\n"
    check = subprocess.run(["qemu-img", "check", str(images["qcow2"])], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    flat = tmp_path / "qcow2-after.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(images["qcow2"]), str(flat)], check=True)
    assert _debugfs_cat(flat, "out.txt") == "qcow2 written by the guest\n"
