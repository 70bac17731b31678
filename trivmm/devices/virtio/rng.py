"""virtio-rng (virtio 1.2 section 5.4): entropy from the host's random source.

One queue of device-writable buffers, filled from ``os.urandom`` (the kernel's CSPRNG, which
never blocks once seeded). A request is capped at ``MAX_REQUEST`` bytes: a guest asking for
gigabytes gets what the cap allows, as the spec lets a device return fewer bytes.
"""

from __future__ import annotations

import os

from trivmm.devices.virtio.device import Activation, DeviceType, VirtioDevice
from trivmm.devices.virtio.queue import DescriptorChain

__all__ = ["RngDevice", "MAX_REQUEST"]

MAX_REQUEST = 64 * 1024


class RngDevice(VirtioDevice):
    device_type = DeviceType.ENTROPY
    queue_sizes = (256,)
    name = "virtio-rng"

    async def handle(self, active: Activation, index: int, chain: DescriptorChain) -> None:
        size = min(chain.writable_len, MAX_REQUEST)
        active.complete(index, chain, os.urandom(size) if size else b"")
