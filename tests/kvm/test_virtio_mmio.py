"""virtio over MMIO inside a running VM, under trio and asyncio: the test plays the guest's
driver (registers through the VM's MMIO bus, rings in guest RAM) while a tiny guest spins,
and the device's backend runs as a task of the VM. (The guest-side ioeventfd path is what
a real guest takes; a register write from here reaches the transport's own notify path.)"""

from __future__ import annotations

import struct
from pathlib import Path

import anyio
import pytest

import trivmm
from tests.kvm.guests import assemble
from tests.unit.virtio_driver import Driver, Layout
from trivmm import VmConfig
from trivmm.boot.layout import VIRTIO_MMIO_BASE
from trivmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from trivmm.devices.virtio.mmio import MAGIC

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils"),
              pytest.mark.parametrize("backend", ["trio", "asyncio"])]  # fmt: skip
RING_BASE = 0x80_0000  # 8 MiB: above the tiny guest


class MmioDriver:
    """The guest driver's register accesses, through the VM's MMIO bus."""

    def __init__(self, vm: trivmm.VM, base: int = VIRTIO_MMIO_BASE) -> None:
        self.vm, self.base = vm, base

    def read(self, offset: int) -> int:
        data = memoryview(bytearray(4))
        self.vm.mmio.read(self.base + offset, data)
        return int(struct.unpack("<I", data)[0])

    def write(self, offset: int, value: int) -> None:
        self.vm.mmio.write(self.base + offset, memoryview(bytearray(struct.pack("<I", value))))

    def start(self, layout: Layout) -> None:
        assert self.read(0x000) == MAGIC and self.read(0x004) == 2 and self.read(0x008) == 4  # entropy
        self.write(0x070, 0)
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        self.write(0x014, 1)
        assert self.read(0x010) & 1 << (VIRTIO_F_VERSION_1 - 32)
        self.write(0x024, 1)
        self.write(0x020, 1 << (VIRTIO_F_VERSION_1 - 32))
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.read(0x070) & STATUS_FEATURES_OK
        self.write(0x030, 0)
        assert self.read(0x034) >= layout.size
        self.write(0x038, layout.size)
        for offset, address in ((0x80, layout.desc_addr), (0x90, layout.avail_addr), (0xA0, layout.used_addr)):
            self.write(offset, address & 0xFFFF_FFFF)
            self.write(offset + 4, address >> 32)
        self.write(0x044, 1)
        self.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)


def test_virtio_rng_over_mmio(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)

    async def main() -> None:
        with anyio.fail_after(30):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M", rng=True, transport="mmio")) as vm:
                memory = vm.memory
                assert memory is not None
                while memory.read_u32(0x4000) == 0:  # the guest is up and spinning
                    await anyio.sleep(0.001)
                layout = Layout.packed(8, RING_BASE)
                driver = Driver(memory, layout, event_idx=False)
                driver.initialize()
                registers = MmioDriver(vm)
                # From another thread, as a vCPU's exits are: the backend is started through
                # a call into the loop that carries no task of its own.
                await anyio.to_thread.run_sync(registers.start, layout)
                request = driver.add([], [48, 48])
                driver.publish()
                await anyio.to_thread.run_sync(registers.write, 0x050, 0)  # QueueNotify
                while driver.used_idx() == 0:
                    await anyio.sleep(0.001)
                [(done, written, data)] = driver.collect()
                assert done is request and written == 96 and len(set(data)) > 8  # random bytes
                assert registers.read(0x060) & 1  # InterruptStatus: used buffer
                registers.write(0x064, 1)
                assert registers.read(0x060) == 0

                registers.write(0x070, 0)  # reset: really resets
                assert registers.read(0x070) == 0 and registers.read(0x044) == 0
                transport = vm.virtio_mmio[0]
                assert transport.core.queues[0].next_avail == 0

                # A hostile driver: a ring outside guest RAM breaks the device, not the VM.
                registers.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
                registers.write(0x024, 1)
                registers.write(0x020, 1 << (VIRTIO_F_VERSION_1 - 32))
                registers.write(0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
                registers.write(0x038, 8)
                registers.write(0x080, 0xFFFF_F000)
                registers.write(0x084, 0xFF)
                registers.write(0x044, 1)
                assert registers.read(0x044) == 0
                assert registers.read(0x070) & STATUS_DEVICE_NEEDS_RESET
                counter = memory.read_u32(0x4000)
                while memory.read_u32(0x4000) == counter:  # the guest still runs
                    await anyio.sleep(0.001)

    anyio.run(main, backend=backend)
