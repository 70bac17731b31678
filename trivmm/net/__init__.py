"""Host-side networking for guests: tap devices, and MAC addresses."""

from __future__ import annotations

import os
import re

from trivmm.errors import ConfigError
from trivmm.net.tap import VNET_HDR_SIZE, Tap

__all__ = ["Tap", "VNET_HDR_SIZE", "parse_mac", "format_mac", "random_mac"]

_MAC = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes. A guest's own address must be unicast (the low bit
    of the first octet clear) and not all zeros; ``ConfigError`` otherwise."""
    if not _MAC.match(text.strip()):
        raise ConfigError(f"bad MAC address {text!r} (six hex octets separated by colons, e.g. 02:00:00:00:00:01)")
    mac = bytes(int(octet, 16) for octet in text.strip().split(":"))
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text} is a multicast address: a NIC needs a unicast one")
    if not any(mac):
        raise ConfigError("MAC address 00:00:00:00:00:00 is not a usable address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in mac)


def random_mac() -> bytes:
    """A random locally-administered unicast address: 02:xx:xx:xx:xx:xx."""
    return b"\x02" + os.urandom(5)
