"""virtio-net over a real tap (no KVM, but root: CAP_NET_ADMIN and /dev/net/tun).

The test plays the guest's driver as tests/unit/test_virtio_net.py does, with the device's
wire a tap the kernel routes for: an address on the host's side, a UDP socket, and the
guest's side of ARP and UDP built by hand. Skipped (failed in strict mode) through
``prerequisite_missing("tap", ...)`` where no tap can be created.
"""

from __future__ import annotations

import functools
import os
import random
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import anyio
import pytest

from tests.conftest import prerequisite_missing
from tests.unit.test_virtio_net import GUEST_MAC, MRG, Bench, until, vnet_hdr
from trivmm.devices.virtio.net import (
    HDR_F_NEEDS_CSUM,
    HDR_SIZE,
    OFFLOAD_FEATURES,
    RX,
    TX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    NetDevice,
)
from trivmm.errors import ConfigError
from trivmm.net.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, Tap


@functools.cache
def _tap_problem() -> str | None:
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist (modprobe tun)"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not on PATH"
    try:
        Tap.open().close()
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.fixture(autouse=True)
def tap_prerequisite() -> None:
    problem = _tap_problem()
    if problem is not None:
        prerequisite_missing("tap", problem)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def link_address(name: str) -> bytes:
    return bytes.fromhex(Path(f"/sys/class/net/{name}/address").read_text().strip().replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp(op: int, src_mac: bytes, src_ip: bytes, dst_mac: bytes, dst_ip: bytes) -> bytes:
    eth = (dst_mac if op == 2 else b"\xff" * 6) + src_mac + b"\x08\x06"
    return eth + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, src_mac, src_ip, dst_mac, dst_ip)


def udp_frame(src_mac: bytes, dst_mac: bytes, src: tuple[bytes, int], dst: tuple[bytes, int], payload: bytes,
              *, partial: bool = False) -> bytes:  # fmt: skip
    """An Ethernet/IPv4/UDP frame. ``partial``: the UDP checksum field holds the pseudo-header
    sum only, for the host to finish (NEEDS_CSUM, csum_start 34, csum_offset 6)."""
    length = 8 + len(payload)
    udp_checksum = 0
    if partial:
        pseudo = src[0] + dst[0] + struct.pack("!BBH", 0, 17, length)
        udp_checksum = ~checksum(pseudo) & 0xFFFF
    udp = struct.pack("!HHHH", src[1], dst[1], length, udp_checksum) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 1, 0x4000, 64, 17, 0, src[0], dst[0])
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return dst_mac + src_mac + b"\x08\x00" + header + udp


def test_open_creates_attaches_and_explains() -> None:
    with Tap.open() as tap:
        assert re.fullmatch(r"trivmm\d+", tap.name), tap.name
        flags = int(Path(f"/sys/class/net/{tap.name}/tun_flags").read_text(), 16)
        assert flags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) == IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        assert tap.read_frame() is None  # nothing yet, and it does not block
        with pytest.raises(ConfigError, match=f"tap {tap.name}: it is in use"):
            Tap.open(tap.name)
        name = tap.name
    assert not Path(f"/sys/class/net/{name}").exists()  # created here: gone with the fd

    with pytest.raises(ConfigError, match="tap lo: an interface of that name exists and is not a tap"):
        Tap.open("lo")
    for bad in ("a/b", "x" * 16, "", "with space"):
        with pytest.raises(ConfigError, match="bad tap name"):
            Tap.open(bad)

    # An existing (persistent) tap: attached to, and left in place.
    name = f"trivmmt{random.randrange(10**6)}"
    ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        with Tap.open(name) as tap:
            assert tap.name == name
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            tap.set_offload(0)
        assert Path(f"/sys/class/net/{name}").exists()
        with Tap.open(name):  # and attached to again
            pass
    finally:
        ip("link", "del", name)


def test_writes_to_a_tap_that_is_down_fail_with_eio() -> None:
    with Tap.open() as tap:
        with pytest.raises(OSError) as info:
            tap.write_frame([bytes(HDR_SIZE), bytes(60)])
        assert info.value.errno == 5  # EIO: the host has not brought the link up


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_frames_both_ways_through_the_host_kernel(backend: str, offload: bool) -> None:
    tap = Tap.open()
    device = NetDevice(tap, GUEST_MAC, offload=offload)
    assert bool(device.device_features & OFFLOAD_FEATURES) == offload
    features = MRG
    if offload:
        features |= (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4
                     | 1 << VIRTIO_NET_F_GUEST_TSO6)  # fmt: skip
    bench = Bench(device, features, size=64)
    assert tap.offload == (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offload else 0)
    subnet = random.randrange(256)
    host_ip, guest_ip = bytes([198, 18, subnet, 1]), bytes([198, 18, subnet, 2])
    disable_ipv6 = Path(f"/proc/sys/net/ipv6/conf/{tap.name}/disable_ipv6")
    if disable_ipv6.exists():
        disable_ipv6.write_text("1")  # no router solicitations in the way
    ip("addr", "add", f"{socket.inet_ntoa(host_ip)}/24", "dev", tap.name)
    ip("link", "set", tap.name, "up")
    tap_mac = link_address(tap.name)
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind((socket.inet_ntoa(host_ip), 0))
    host.setblocking(False)
    host_port = host.getsockname()[1]

    def post(count: int) -> None:
        for _ in range(count):
            bench.rx.add([], [2048])
        bench.kick(RX)

    async def receive(match: bytes) -> tuple[bytes, bytes]:
        """The next frame to the guest that contains ``match``: (its header, the frame)."""
        while True:
            await until(lambda: bench.rx.used_idx() != bench.rx.last_used)
            for _, _, data in bench.rx.collect():
                post(1)
                if match in data:
                    return data[:HDR_SIZE], data[HDR_SIZE:]

    async def scenario() -> None:
        post(32)
        # The host speaks first: it must resolve the guest's address.
        host.sendto(b"ping from the host", (socket.inet_ntoa(guest_ip), 4000))
        _, request = await receive(b"\x08\x06\x00\x01\x08\x00\x06\x04\x00\x01" + tap_mac + host_ip)
        assert request[:6] == b"\xff" * 6 and request[6:12] == tap_mac and request[-4:] == guest_ip
        bench.tx.add([bytes(HDR_SIZE) + arp(2, GUEST_MAC, guest_ip, tap_mac, host_ip)])
        bench.kick(TX)
        header, datagram = await receive(b"ping from the host")
        assert datagram[:6] == GUEST_MAC and datagram[12:14] == b"\x08\x00" and datagram[30:34] == guest_ip
        assert struct.unpack("!H", datagram[36:38])[0] == 4000
        if offload:  # the kernel may leave the UDP checksum to the guest, which accepted that
            assert header in (vnet_hdr(num_buffers=1), vnet_hdr(flags=HDR_F_NEEDS_CSUM, csum_start=34,
                                                                 csum_offset=6, num_buffers=1))  # fmt: skip
        else:
            assert header == vnet_hdr(num_buffers=1)

        # The guest answers, over UDP; with CSUM it leaves the checksum to the host.
        reply = udp_frame(GUEST_MAC, tap_mac, (guest_ip, 4000), (host_ip, host_port), b"pong from the guest",
                          partial=offload)  # fmt: skip
        tx_header = vnet_hdr(flags=HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6) if offload else bytes(HDR_SIZE)
        bench.tx.add([tx_header, reply])
        bench.kick(TX)
        with anyio.fail_after(5):
            await anyio.wait_readable(host)
        data, source = host.recvfrom(2048)
        assert data == b"pong from the guest" and source == (socket.inet_ntoa(guest_ip), 4000)
        await until(lambda: bench.tx.used_idx() == 2)
        assert device.stats.tx_frames == 2 and device.stats.rx_frames >= 2
        assert device.tx_drops.total == 0 and device.rx_drops.total == 0 and not bench.broken

    try:
        bench.run(backend, scenario)  # closes the device, and so the tap
    finally:
        host.close()
    assert not Path(f"/sys/class/net/{tap.name}").exists()
