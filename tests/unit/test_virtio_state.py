"""Saved state of the virtio devices and transports (trivmm/devices/virtio), without KVM.

Each device runs honest traffic on a transport -- virtio-mmio, or virtio-pci behind a
``PciRoot`` with a fake KVM routing table -- driven through its registers by a model
driver whose rings live in a ``GuestMemory``. The device is quiesced (``quiesce()``: no
chain held by the VMM afterwards, which every test checks on every queue) and saved; then a
fresh device and transport over the same guest memory -- what a restored VM has -- take
the state on a worker thread (as ``restore_vm`` applies it), and the traffic goes on:
every request completes exactly once (a head used twice, or never made, fails the
driver's ``collect``) and the data matches.

* blk: writes then reads back against a model, on a raw image; batches held on a worker
  thread (a gated image) when the quiesce starts complete before it returns, the chains
  taken behind them are given back, and then served by the source resumed
  (``resume_after_snapshot``) or by the destination.
* net: frames both ways through a socket pair standing in for the tap; tx frames waiting
  for a full tap and rx buffers taken and not filled go back to the ring; the destination
  takes the MAC and sets the offloads on its own tap.
* vsock: a connection survives the source's quiesce and resume; the destination sends
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, answers the old connection with OP_RST and accepts
  new ones.
* rng, on both transports: MSI-X routes, vectors and interrupts as they were.
* a transport saved in each status that matters: no driver, features negotiated, running,
  DEVICE_NEEDS_RESET.
* hostile state (hypothesis): valid sections mutated field by field and byte by byte give
  ``ValueError`` (the transport then reset), never another exception. 120 + 40 examples
  for each of six sections.
* ``SplitQueue.unpop``.

Each traffic test runs on one loop and transport pair, trio with one and asyncio with the
other; rng runs on all four. About 10 s.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import socket
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.to_thread
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trivmm.devices.virtio.block as block_module
from trivmm.boot.layout import pci_layout
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.devices.pci import MSIX_ENABLE, MSIX_FUNCTION_MASK, GsiRouter, PciRoot
from trivmm.devices.pci.function import COMMAND_MASTER
from trivmm.devices.pci.root import PciRootState
from trivmm.devices.virtio.block import HEADER, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlockDevice
from trivmm.devices.virtio.constants import (
    AVAIL_IDX,
    AVAIL_RING,
    USED_IDX,
    USED_RING,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    used_ring_size,
)
from trivmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from trivmm.devices.virtio.mmio import INTERRUPT_CONFIG_CHANGE, MmioState, VirtioMmio
from trivmm.devices.virtio.net import (
    HDR_SIZE,
    RX,
    TX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    NetDevice,
)
from trivmm.devices.virtio.pci import ISR_CONFIG, NotifyRegion, PciTransportState, VirtioPci
from trivmm.devices.virtio.queue import SplitQueue
from trivmm.devices.virtio.rng import RngDevice
from trivmm.devices.virtio.transport import VirtioCore
from trivmm.devices.virtio.vsock import VsockDevice
from trivmm.eventfd import EventFd
from trivmm.images import DiskImage, open_image
from trivmm.kvm.vm import IrqRoute, MsiRoute
from trivmm.memory import GuestMemory
from trivmm.migration.codec import decode_state, encode_state
from trivmm.net.tap import Tap

RAM = 4 << 20
LAYOUT = pci_layout(64 << 20)
MSI_ADDRESS = 0xFEE0_0000
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
RUNNING = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
RING_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC
PAIRS = [("trio", "pci"), ("asyncio", "mmio")]  # (event loop, transport) of each traffic test


# --- the guest's side: rings ---------------------------------------------------------------------
class Ring:
    """The driver's side of a split virtqueue: each descriptor owns ``slot`` bytes at
    ``data + index * slot``; a chain is published as it is added."""

    def __init__(self, memory: GuestMemory, base: int, size: int, slot: int = 2048) -> None:
        self.memory, self.size, self.slot = memory, size, slot
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + avail_ring_size(size) + 3) & ~3
        self.data = (self.used + used_ring_size(size) + 0xFFF) & ~0xFFF
        self.end = self.data + size * slot
        assert self.end <= RAM
        memory.fill(base, self.data - base)
        self.free = list(range(size))
        self.outstanding: dict[int, tuple[list[int], list[tuple[int, int]], object]] = {}
        self.avail_idx = self.last_used = 0

    def add(self, readable: Sequence[bytes], writable: Sequence[int], tag: object = None) -> int:
        contents: list[bytes | int] = [*readable, *writable]
        assert len(self.free) >= len(contents), "ring full"
        descriptors = [self.free.pop() for _ in contents]
        for i, (index, content) in enumerate(zip(descriptors, contents, strict=True)):
            addr = self.data + index * self.slot
            length = content if isinstance(content, int) else len(content)
            assert length <= self.slot
            if isinstance(content, bytes):
                self.memory.write(addr, content)
            flags = (VIRTQ_DESC_F_WRITE if isinstance(content, int) else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < len(contents) else 0)  # fmt: skip
            nxt = descriptors[i + 1] if i + 1 < len(contents) else 0
            self.memory.write(self.desc + 16 * index, DESC.pack(addr, length, flags, nxt))
        head = descriptors[0]
        writable_buffers = [(self.data + index * self.slot, length)
                            for index, length in zip(descriptors[len(readable):], writable, strict=True)]  # fmt: skip
        self.memory.write_u16(self.avail + AVAIL_RING + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + AVAIL_IDX, self.avail_idx)
        self.outstanding[head] = (descriptors, writable_buffers, tag)
        return head

    def collect(self) -> list[tuple[object, int, bytes]]:
        """(tag, bytes written, those bytes) of each chain used since the last call."""
        done = []
        used = self.memory.read_u16(self.used + USED_IDX)
        while self.last_used != used:
            slot = self.last_used % self.size
            head, written = USED_ELEM.unpack(self.memory.read(self.used + USED_RING + 8 * slot, 8))
            descriptors, writable, tag = self.outstanding.pop(head)  # KeyError: used twice, or never made
            assert written <= sum(n for _, n in writable)
            data = b"".join(self.memory.read(a, n) for a, n in writable)[:written]
            self.free.extend(descriptors)
            done.append((tag, written, data))
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.memory.write_u16(self.avail + AVAIL_RING + 2 * self.size, self.last_used)  # used_event, re-armed
        return done


# --- transports, driven through their registers ---------------------------------------------------
@attrs.frozen
class Saved:
    """What a snapshot carries of one device: its section, its transport's, the PCI root's."""

    device: bytes
    transport: bytes
    root: bytes | None = None


class MmioBus:
    """A virtio-mmio transport and the driver's 32-bit register accesses."""

    kind = "mmio"

    def __init__(self, device: VirtioDevice, memory: GuestMemory) -> None:
        self.irq = EventFd()
        self.transport = VirtioMmio(device, memory, self.irq)

    @property
    def core(self) -> VirtioCore:
        return self.transport.core

    def reg(self, offset: int, value: int | None = None) -> int:
        data = bytearray(4) if value is None else bytearray(value.to_bytes(4, "little"))
        (self.transport.read if value is None else self.transport.write)(offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write_status(self, value: int) -> None:
        self.reg(0x70, value)

    def read_status(self) -> int:
        return self.reg(0x70)

    def device_features(self) -> int:
        offered = 0
        for select in (0, 1):
            self.reg(0x14, select)
            offered |= self.reg(0x10) << (32 * select)
        return offered

    def write_driver_features(self, features: int) -> None:
        for select in (0, 1):
            self.reg(0x24, select)
            self.reg(0x20, features >> (32 * select) & 0xFFFF_FFFF)

    def setup_queue(self, index: int, ring: Ring, vector: int = 0) -> None:
        self.reg(0x30, index)
        self.reg(0x38, ring.size)
        for offset, addr in ((0x80, ring.desc), (0x90, ring.avail), (0xA0, ring.used)):
            self.reg(offset, addr & 0xFFFF_FFFF)
            self.reg(offset + 4, addr >> 32)
        self.reg(0x44, 1)

    def interrupts_pending(self) -> int:
        return self.transport.interrupt_status

    def save(self) -> bytes:
        return self.transport.save_state()

    def restore(self, saved: Saved) -> None:
        self.transport.restore_state(saved.transport)

    def close(self) -> None:
        self.transport.core.close()
        self.irq.close()


class FakeKvm:
    """A RoutingBackend: the routing tables and irqfd bindings KVM would get."""

    def __init__(self) -> None:
        self.tables: list[list[IrqRoute]] = []
        self.irqfds: dict[int, int] = {}

    def set_gsi_routing(self, routes: Sequence[IrqRoute]) -> None:
        self.tables.append(list(routes))

    def irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        if deassign:
            assert self.irqfds.pop(eventfd) == gsi
        else:
            self.irqfds[eventfd] = gsi

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        return {r.gsi: (r.address, r.data) for r in (self.tables[-1] if self.tables else ()) if isinstance(r, MsiRoute)}


class PciBus:
    """A virtio-pci function behind a PCI root: configuration space through 0xCF8/0xCFC,
    the common configuration through BAR 0, MSI-X routed through a fake KVM."""

    kind = "pci"

    def __init__(self, device: VirtioDevice, memory: GuestMemory) -> None:
        self.pio = AddressSpace("pio", PIO_LIMIT)
        self.mmio = AddressSpace("mmio", MMIO_LIMIT)
        self.lines: dict[int, bool] = {}
        self.kvm = FakeKvm()
        self.root = PciRoot(self.pio, self.mmio, LAYOUT, self.lines.__setitem__)
        self.bound: set[NotifyRegion] = set()
        self.transport = VirtioPci(device, memory, GsiRouter(self.kvm), rebind_notify=self._rebind)
        self.slot = self.root.add(self.transport)

    def _rebind(self, unbind: list[NotifyRegion], bind: list[NotifyRegion]) -> None:
        self.bound.difference_update(unbind)
        self.bound.update(bind)

    @property
    def core(self) -> VirtioCore:
        return self.transport.core

    def cfg(self, reg: int, size: int, value: int | None = None) -> int:
        self.pio.write(0xCF8, memoryview(struct.pack("<I", 1 << 31 | self.slot << 11 | reg & 0xFC)))
        data = bytearray(size) if value is None else bytearray(value.to_bytes(size, "little"))
        (self.pio.read if value is None else self.pio.write)(0xCFC + (reg & 3), memoryview(data))
        return int.from_bytes(data, "little")

    def bar(self, offset: int, size: int, value: int | None = None) -> int:
        base = self.transport.bar_address(0)
        assert base is not None
        data = bytearray(size) if value is None else bytearray(value.to_bytes(size, "little"))
        (self.mmio.read if value is None else self.mmio.write)(base + offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write_status(self, value: int) -> None:
        self.bar(0x14, 1, value)

    def read_status(self) -> int:
        return self.bar(0x14, 1)

    def device_features(self) -> int:
        offered = 0
        for select in (0, 1):
            self.bar(0x00, 4, select)
            offered |= self.bar(0x04, 4) << (32 * select)
        return offered

    def write_driver_features(self, features: int) -> None:
        for select in (0, 1):
            self.bar(0x08, 4, select)
            self.bar(0x0C, 4, features >> (32 * select) & 0xFFFF_FFFF)

    def enable_msix(self) -> None:
        """As pci_alloc_irq_vectors: enabled and masked, the table, then unmasked; vector
        ``v`` sends data 0x40 + v. Configuration changes on vector 0."""
        self.cfg(0x04, 2, self.cfg(0x04, 2) | COMMAND_MASTER)
        assert self.transport.msix_offset is not None
        control = self.transport.msix_offset + 2
        self.cfg(control, 2, MSIX_ENABLE | MSIX_FUNCTION_MASK)
        for vector in range(self.transport.msix_vectors):
            entry = self.transport.msix_table_offset + 16 * vector
            self.bar(entry, 4, MSI_ADDRESS)
            self.bar(entry + 4, 4, 0)
            self.bar(entry + 8, 4, 0x40 + vector)
            self.bar(entry + 12, 4, 0)
        self.cfg(control, 2, MSIX_ENABLE)
        self.bar(0x10, 2, 0)

    def setup_queue(self, index: int, ring: Ring, vector: int = 0) -> None:
        """Queue ``index`` on MSI-X vector ``index + 1`` (when enabled)."""
        self.bar(0x16, 2, index)
        self.bar(0x18, 2, ring.size)
        for offset, addr in ((0x20, ring.desc), (0x28, ring.avail), (0x30, ring.used)):
            self.bar(offset, 4, addr & 0xFFFF_FFFF)
            self.bar(offset + 4, 4, addr >> 32)
        self.bar(0x1A, 2, index + 1)
        self.bar(0x1C, 2, 1)

    def interrupts_pending(self) -> int:
        return self.transport.isr

    def save(self) -> bytes:
        return self.transport.save_state()

    def restore(self, saved: Saved) -> None:
        assert saved.root is not None
        self.root.restore(decode_state(PciRootState, saved.root, "pci-root"))
        self.transport.restore_state(saved.transport)

    def close(self) -> None:
        self.root.close()


Bus = MmioBus | PciBus


def make_bus(kind: str, device: VirtioDevice, memory: GuestMemory) -> Bus:
    return MmioBus(device, memory) if kind == "mmio" else PciBus(device, memory)


def bring_up(bus: Bus, rings: Sequence[Ring], wanted: int, *, msix: bool = True, driver_ok: bool = True) -> int:
    """What a driver does before its first request; returns the features it took."""
    bus.write_status(0)
    if isinstance(bus, PciBus) and msix:
        bus.enable_msix()
    bus.write_status(STATUS_ACKNOWLEDGE)
    bus.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    features = bus.device_features() & wanted
    bus.write_driver_features(features)
    bus.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert bus.read_status() & STATUS_FEATURES_OK
    for index, ring in enumerate(rings):
        bus.setup_queue(index, ring)
    if driver_ok:
        bus.write_status(RUNNING)
        assert bus.read_status() == RUNNING
    return features


def snapshot(bus: Bus, device: VirtioDevice) -> Saved:
    """After ``quiesce``: the device's, the transport's and (PCI) the root's sections. No
    queue has a chain outstanding: the VMM holds none."""
    for index, queue in enumerate(bus.core.queues):
        assert not queue.ready or queue.outstanding == 0, f"queue {index}: {queue.outstanding} chains held"
    root = encode_state(bus.root.save()) if isinstance(bus, PciBus) else None
    return Saved(device.save_state(), bus.save(), root)


async def restore(bus: Bus, device: VirtioDevice, saved: Saved) -> None:
    """As ``restore_vm`` applies it: on a worker thread, the device's section first."""

    def apply() -> None:
        device.restore_state(saved.device)
        bus.restore(saved)

    await anyio.to_thread.run_sync(apply)


@contextlib.asynccontextmanager
async def serving(bus: Bus) -> AsyncIterator[None]:
    """The transport's service, as ``VM.run`` starts it, for the block's duration."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.core.service)
        yield
        tg.cancel_scope.cancel()


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.002)


async def settle(duration: float = 0.05) -> None:
    await anyio.sleep(duration)


def run(backend: str, main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(60):
            await main()

    anyio.run(bounded, backend=backend)


# --- SplitQueue.unpop ------------------------------------------------------------------------------
def test_unpop_gives_back_the_last_chains_popped_and_only_those() -> None:
    memory = GuestMemory.from_ranges([(0, RAM)])
    try:
        ring = Ring(memory, 0x1000, 8)
        queue = SplitQueue(memory, max_size=8)
        queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = 8, ring.desc, ring.avail, ring.used
        queue.event_idx = True
        queue.set_ready(True)
        heads = [ring.add([bytes([n]) * 4], [], tag=n) for n in range(4)]
        popped = [queue.pop() for _ in range(3)]
        assert [c.head for c in popped if c is not None] == heads[:3]
        assert memory.read_u16(ring.used + USED_RING + 8 * 8) == 3  # avail_event: the next one taken
        queue.add_used(heads[0], 0)
        with pytest.raises(RuntimeError, match="2 outstanding"):
            queue.unpop(3)  # one of the three was used
        queue.unpop(2)
        assert queue.next_avail == 1 and queue.outstanding == 0
        assert memory.read_u16(ring.used + USED_RING + 8 * 8) == 1  # ask for a notification from there
        again = [queue.pop() for _ in range(3)]
        assert [c.head for c in again if c is not None] == heads[1:]
        assert [c.read() for c in again if c is not None] == [bytes([n]) * 4 for n in (1, 2, 3)]
        assert queue.pop() is None
        queue.unpop(0)
        queue.reset()
        with pytest.raises(RuntimeError, match="not ready"):
            queue.unpop(1)
    finally:
        memory.close()


# --- blk --------------------------------------------------------------------------------------
class GatedImage:
    """A ``DiskImage`` whose writes and reads wait, on their worker thread, for ``gate``."""

    def __init__(self, image: DiskImage) -> None:
        self._image = image
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._image, name)

    def write(self, offset: int, data: bytes) -> None:
        self.entered.set()
        assert self.gate.wait(20)
        self._image.write(offset, data)

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        self.entered.set()
        assert self.gate.wait(20)
        self._image.read_into(offset, views)


SECTORS = 2048  # a 1 MiB disk
CHUNK = 1024  # bytes per request: two sectors


def pattern(seed: int, size: int = CHUNK) -> bytes:
    return bytes((seed * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(size))


class BlkDriver:
    """Writes and reads of ``CHUNK`` bytes, tagged, against a model of the disk."""

    def __init__(self, ring: Ring, bus: Bus) -> None:
        self.ring, self.bus = ring, bus
        self.model = bytearray(SECTORS * 512)
        self.completed: dict[object, int] = {}

    def write(self, sector: int, data: bytes) -> None:
        tag = ("w", sector, data)
        self.ring.add([HEADER.pack(VIRTIO_BLK_T_OUT, 0, sector), data], [1], tag)
        self.model[sector * 512 : sector * 512 + len(data)] = data

    def read(self, sector: int) -> None:
        self.ring.add([HEADER.pack(VIRTIO_BLK_T_IN, 0, sector)], [CHUNK, 1], ("r", sector))

    def kick(self) -> None:
        self.bus.core.notify(0)

    def take(self) -> list[tuple[object, int, bytes]]:
        done = self.ring.collect()
        for tag, written, data in done:
            assert data[-1] == 0, f"{tag}: status {data[-1]}"  # VIRTIO_BLK_S_OK
            self.completed[tag] = self.completed.get(tag, 0) + 1
            if isinstance(tag, tuple) and tag[0] == "r":
                sector = tag[1]
                assert isinstance(sector, int)
                assert written == CHUNK + 1 and data[:-1] == self.model[sector * 512 : sector * 512 + CHUNK]
        return done

    async def wait(self, count: int) -> list[tuple[object, int, bytes]]:
        done: list[tuple[object, int, bytes]] = []

        def enough() -> bool:
            done.extend(self.take())
            return len(done) >= count

        await until(enough)
        assert len(done) == count, done
        return done

    async def read_back(self, sectors: Sequence[int]) -> None:
        for sector in sectors:
            self.read(sector)
        self.kick()
        await self.wait(len(sectors))


async def quiesce_with_batches_in_flight(bus: Bus, device: BlockDevice, image: GatedImage, driver: BlkDriver,
                                         writes: Sequence[int], seed: int) -> None:  # fmt: skip
    """Writes at ``writes`` (sectors) while the image holds every IO at its gate; the
    quiesce waits for the two batches on worker threads, which complete; the rest of the
    chains go back to the ring."""
    image.gate.clear()
    image.entered.clear()
    for n, sector in enumerate(writes):
        driver.write(sector, pattern(seed + n))
    driver.kick()
    queue = bus.core.queues[0]
    await until(lambda: image.entered.is_set() and queue.next_avail == driver.ring.avail_idx)
    await settle()
    done = anyio.Event()

    async def quiesce() -> None:
        await device.quiesce()
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(quiesce)
        await settle(0.1)
        assert not done.is_set() and not driver.ring.collect(), "the quiesce did not wait for the batches"
        image.gate.set()
    completed = await driver.wait(4)  # the two batches of two (BATCH_REQUESTS) on worker threads
    assert {tag for tag, _, _ in completed} == {("w", s, pattern(seed + n)) for n, s in enumerate(writes[:4])}
    assert queue.outstanding == 0 and queue.next_avail == (driver.ring.avail_idx - (len(writes) - 4)) & 0xFFFF


@pytest.mark.parametrize(("backend", "kind"), PAIRS)
def test_blk_in_flight_batches_complete_before_the_save_and_the_rest_go_on(
        backend: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(block_module, "BATCH_REQUESTS", 2)
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(SECTORS * 512))
    memory = GuestMemory.from_ranges([(0, RAM)])
    image = GatedImage(open_image(path, format="raw"))
    source = BlockDevice(cast(DiskImage, image), serial="state")
    bus = make_bus(kind, source, memory)
    ring = Ring(memory, 0x1000, 64)
    driver = BlkDriver(ring, bus)

    async def main() -> None:
        async with serving(bus):
            bring_up(bus, [ring], RING_FEATURES | 1 << block_module.VIRTIO_BLK_F_FLUSH)
            for n in range(4):  # honest traffic
                driver.write(2 * n, pattern(n))
            driver.kick()
            await driver.wait(4)
            await driver.read_back([0, 2, 4, 6])
            # A snapshot with batches on worker threads; the source runs on after it.
            await quiesce_with_batches_in_flight(bus, source, image, driver, range(100, 116, 2), 10)
            snapshot(bus, source)
            source.resume_after_snapshot()
            await driver.wait(4)  # the four given back, served by the source
            await driver.read_back(range(100, 116, 2))
            # Again, and this time the destination serves the rest.
            await quiesce_with_batches_in_flight(bus, source, image, driver, range(200, 212, 2), 20)
            saved = snapshot(bus, source)
        bus.close()
        source.close()

        destination = BlockDevice(open_image(path, format="raw"), serial="state")
        dst_bus = make_bus(kind, destination, memory)
        await restore(dst_bus, destination, saved)
        assert dst_bus.read_status() == RUNNING
        driver.bus = dst_bus
        async with serving(dst_bus):
            await driver.wait(2)  # taken back from the ring: no notification needed
            await driver.read_back([0, 2, 4, 6, *range(100, 116, 2), *range(200, 212, 2)])
        dst_bus.close()
        destination.close()
        writes = {tag: count for tag, count in driver.completed.items() if isinstance(tag, tuple) and tag[0] == "w"}
        assert len(writes) == 4 + 8 + 6 and set(writes.values()) == {1}  # each write exactly once
        assert path.read_bytes() == bytes(driver.model)

    try:
        run(backend, main)
    finally:
        memory.close()


def test_blk_refuses_a_disk_of_another_size(tmp_path: Path) -> None:
    small, large = tmp_path / "small.raw", tmp_path / "large.raw"
    small.write_bytes(bytes(1 << 20))
    large.write_bytes(bytes(2 << 20))
    source, other = BlockDevice(open_image(small)), BlockDevice(open_image(large))
    try:
        with pytest.raises(ValueError, match="4096 sectors here, 2048 in the snapshot"):
            other.restore_state(source.save_state())
        readonly = BlockDevice(open_image(small), readonly=True)
        try:
            with pytest.raises(ValueError, match="configuration space"):
                readonly.restore_state(source.save_state())
        finally:
            readonly.close()
        with pytest.raises(ValueError, match="type 4 virtio device"):
            source.restore_state(RngDevice().save_state())
    finally:
        source.close()
        other.close()


# --- net ----------------------------------------------------------------------------------------
GUEST_MAC = bytes.fromhex("020000000001")
HOST_MAC = bytes.fromhex("020000000002")
NET_FEATURES = (RING_FEATURES | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MRG_RXBUF
                | 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM)  # fmt: skip


def frame(seed: int, size: int = 200) -> bytes:
    return GUEST_MAC + HOST_MAC + b"\x88\xb5" + pattern(seed, size)


class FakeTap(Tap):
    """One end of a SOCK_SEQPACKET pair (one datagram per frame, vnet header first, as a tap
    fd); ``host`` is the kernel's end. ``room``: frames it takes before it is full (None: no
    limit)."""

    def __init__(self, refuse_offload: bool = False) -> None:
        ours, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        self.host.setblocking(False)
        super().__init__(ours.detach(), "fake0")
        self.refuse_offload = refuse_offload
        self.room: int | None = None

    def set_offload(self, flags: int) -> None:
        if self.refuse_offload:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.offload = flags

    def write_frame(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        if self.room is not None:
            if not self.room:
                return False
            self.room -= 1
        return super().write_frame(parts)

    async def wait_writable(self) -> None:
        while self.room == 0:
            await anyio.sleep(0.002)
        await super().wait_writable()

    def send(self, *frames: bytes) -> None:
        for data in frames:
            self.host.send(bytes(HDR_SIZE) + data)

    def received(self) -> list[bytes]:
        frames = []
        while True:
            try:
                frames.append(self.host.recv(1 << 17))
            except BlockingIOError:
                return frames

    def close(self) -> None:
        super().close()
        self.host.close()


class NetDriver:
    """rx buffers of 2 KiB kept posted; tx frames with a zero header; everything counted."""

    def __init__(self, rx: Ring, tx: Ring, bus: Bus) -> None:
        self.rx, self.tx, self.bus = rx, tx, bus
        self.frames_in: list[bytes] = []
        self.sent: list[bytes] = []

    def post_rx(self, count: int) -> None:
        for _ in range(count):
            self.rx.add([], [2048])
        self.bus.core.notify(RX)

    def send(self, *frames: bytes) -> None:
        for data in frames:
            self.tx.add([bytes(HDR_SIZE) + data], [], data)
            self.sent.append(data)
        self.bus.core.notify(TX)

    def poll(self) -> None:
        for _, written, data in self.rx.collect():
            assert written > HDR_SIZE and struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
            self.frames_in.append(data[HDR_SIZE:])
        for tag, written, _ in self.tx.collect():
            assert written == 0 and tag is not None

    async def until(self, condition: Callable[[], object]) -> None:
        def check() -> object:
            self.poll()
            return condition()

        await until(check)


@pytest.mark.parametrize(("backend", "kind"), PAIRS)
def test_net_frames_both_ways_across_a_snapshot(backend: str, kind: str) -> None:
    memory = GuestMemory.from_ranges([(0, RAM)])
    tap = FakeTap()
    source = NetDevice(tap, GUEST_MAC, offload=True)
    bus = make_bus(kind, source, memory)
    rx, tx = Ring(memory, 0x1000, 16), Ring(memory, 0x20000, 16)
    driver = NetDriver(rx, tx, bus)
    host_got: list[bytes] = []

    def host_receive(from_tap: FakeTap) -> None:
        for data in from_tap.received():
            assert data[:HDR_SIZE] == bytes(HDR_SIZE)
            host_got.append(data[HDR_SIZE:])

    async def main() -> None:
        async with serving(bus):
            features = bring_up(bus, [rx, tx], NET_FEATURES)
            assert features == NET_FEATURES and tap.offload == NetDevice.tun_offload(features) != 0
            driver.post_rx(8)
            tap.send(frame(1), frame(2), frame(3))
            driver.send(frame(11), frame(12), frame(13))
            await driver.until(lambda: len(driver.frames_in) == 3 and not tx.outstanding)
            host_receive(tap)
            # The tap fills up: the tx task waits with frames taken; rx buffers are held unused.
            tap.room = 2
            driver.send(*(frame(20 + n) for n in range(6)))
            await until(lambda: bus.core.queues[TX].next_avail == tx.avail_idx and tap.room == 0)
            await settle()
            assert bus.core.queues[TX].outstanding == 4 and bus.core.queues[RX].outstanding == 5
            await source.quiesce()
            saved = snapshot(bus, source)
            driver.poll()
            assert len(tx.outstanding) == 4  # given back to the ring, not sent, not used
        host_receive(tap)
        assert host_got == [frame(11), frame(12), frame(13), frame(20), frame(21)]
        bus.close()
        source.close()

        dst_tap = FakeTap()
        destination = NetDevice(dst_tap, offload=True)  # no MAC configured: a random one, until the restore
        dst_bus = make_bus(kind, destination, memory)
        await restore(dst_bus, destination, saved)
        assert destination.mac == GUEST_MAC and bytes(destination.config[:6]) == GUEST_MAC
        assert dst_tap.offload == tap.offload  # the offloads the guest took, on the new tap
        driver.bus = dst_bus
        async with serving(dst_bus):
            await driver.until(lambda: not tx.outstanding)  # the four frames, sent from here
            dst_tap.send(frame(4), frame(5))
            await driver.until(lambda: len(driver.frames_in) == 5)
            driver.send(frame(30))
            await driver.until(lambda: not tx.outstanding)
            await settle()
        host_receive(dst_tap)
        assert host_got == driver.sent  # every frame once, in order
        assert driver.frames_in == [frame(n) for n in (1, 2, 3, 4, 5)]
        assert destination.stats.rx_frames == 2 and destination.stats.tx_frames == 5
        dst_bus.close()
        destination.close()

    try:
        run(backend, main)
    finally:
        memory.close()


def test_net_rx_buffers_taken_before_a_short_one_go_back_empty() -> None:
    """rx chains good, short (returned at once), good: the first cannot be rewound past the
    used short one, so the quiesce returns it empty; the last goes back to the ring and
    takes the next frame, on the destination."""
    memory = GuestMemory.from_ranges([(0, RAM)])
    tap = FakeTap()
    source = NetDevice(tap, GUEST_MAC)
    bus = make_bus("mmio", source, memory)
    rx, tx = Ring(memory, 0x1000, 16), Ring(memory, 0x20000, 16)

    async def main() -> None:
        async with serving(bus):
            bring_up(bus, [rx, tx], NET_FEATURES)
            rx.add([], [2048], "first")
            rx.add([], [8], "short")
            rx.add([], [2048], "last")
            bus.core.notify(RX)
            await until(lambda: source.rx_bad_buffers == 1)
            await settle()
            await source.quiesce()
            saved = snapshot(bus, source)
        assert [(tag, written) for tag, written, _ in rx.collect()] == [("short", 0), ("first", 0)]
        assert bus.core.queues[RX].next_avail == 2
        bus.close()
        source.close()
        dst_tap = FakeTap()
        destination = NetDevice(dst_tap)
        dst_bus = make_bus("mmio", destination, memory)
        await restore(dst_bus, destination, saved)
        async with serving(dst_bus):
            dst_tap.send(frame(7))
            await until(lambda: rx.memory.read_u16(rx.used + USED_IDX) == 3)
        ((tag, _, data),) = rx.collect()
        assert tag == "last" and data[HDR_SIZE:] == frame(7)
        dst_bus.close()
        destination.close()

    try:
        run("trio", main)
    finally:
        memory.close()


def test_net_refuses_features_its_tap_cannot_do() -> None:
    """The guest took offloads the destination's tap refuses: the transport's state is
    refused, and the device left reset."""
    memory = GuestMemory.from_ranges([(0, RAM)])
    source = NetDevice(FakeTap(), GUEST_MAC, offload=True)
    bus = make_bus("mmio", source, memory)
    destination = NetDevice(FakeTap(refuse_offload=True))
    dst_bus = make_bus("mmio", destination, memory)
    try:
        bring_up(bus, [Ring(memory, 0x1000, 16), Ring(memory, 0x20000, 16)], NET_FEATURES, driver_ok=False)
        with pytest.raises(ValueError, match="which this device does not offer"):
            dst_bus.restore(Saved(source.save_state(), bus.save()))
        assert dst_bus.read_status() == 0 and not any(q.ready for q in dst_bus.core.queues)
    finally:
        for b, d in ((bus, source), (dst_bus, destination)):
            b.close()
            d.close()
        memory.close()


# --- vsock ---------------------------------------------------------------------------------------
VSOCK_HDR = struct.Struct("<QQIIIHHIII")
CID, HOST = 3, 2
REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE = range(1, 7)


class VsockDriver:
    """Just enough of Linux's virtio_transport: rx buffers kept posted, packets parsed."""

    def __init__(self, rings: Sequence[Ring], bus: Bus) -> None:
        self.rx, self.tx, self.event = rings
        self.bus = bus
        self.packets: list[tuple[int, int, int, int, bytes]] = []  # op, src_port, dst_port, flags, data
        self.events: list[bytes] = []

    def post_rx(self, count: int) -> None:
        for _ in range(count):
            self.rx.add([], [VSOCK_HDR.size + 4096])
        self.bus.core.notify(0)

    def post_events(self, count: int) -> None:
        for _ in range(count):
            self.event.add([], [4])
        self.bus.core.notify(2)

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", fwd_cnt: int = 0) -> None:
        header = VSOCK_HDR.pack(CID, HOST, src_port, dst_port, len(data), 1, op, 0, 64 * 1024, fwd_cnt)
        self.tx.add([header + data], [])
        self.bus.core.notify(1)

    def poll(self) -> None:
        done = self.rx.collect()
        for _, written, data in done:
            assert written >= VSOCK_HDR.size
            _, dst_cid, src_port, dst_port, length, _, op, flags, _, _ = VSOCK_HDR.unpack_from(data)
            assert dst_cid == CID and written == VSOCK_HDR.size + length
            self.packets.append((op, src_port, dst_port, flags, data[VSOCK_HDR.size :]))
        if done:
            self.post_rx(len(done))
        for _, written, _ in self.tx.collect():
            assert written == 0
        self.events += [data for _, _, data in self.event.collect()]

    async def expect(self, op: int, **fields: int) -> tuple[int, int, int, int, bytes]:
        found: list[tuple[int, int, int, int, bytes]] = []
        names = ("op", "src_port", "dst_port", "flags")

        def match() -> bool:
            self.poll()
            for packet in self.packets:
                values = dict(zip(names, packet, strict=False))
                if packet[0] == op and all(values[k] == v for k, v in fields.items()):
                    self.packets.remove(packet)
                    found.append(packet)
                    return True
            return False

        await until(match)
        return found[0]


async def accept_one(listener: socket.socket) -> socket.socket:
    with anyio.fail_after(10):
        while True:
            await anyio.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            sock.setblocking(False)
            return sock


async def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    with anyio.fail_after(10):
        while len(data) < count:
            await anyio.wait_readable(sock)
            try:
                chunk = sock.recv(count - len(data))
            except BlockingIOError:
                continue
            assert chunk, "the connection closed"
            data += chunk
    return data


@pytest.mark.parametrize(("backend", "kind"), PAIRS)
def test_vsock_connections_live_on_at_the_source_and_are_reset_at_the_destination(
        backend: str, kind: str) -> None:  # fmt: skip
    workdir = tempfile.mkdtemp(prefix="trivmm-vsock-state-")  # unix socket paths must be short
    uds, dst_uds = os.path.join(workdir, "v.sock"), os.path.join(workdir, "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    listener.bind(f"{uds}_1234")
    listener.listen(4)
    memory = GuestMemory.from_ranges([(0, RAM)])
    source = VsockDevice(CID, uds)
    bus = make_bus(kind, source, memory)
    rings = [Ring(memory, 0x1000, 16, 8192), Ring(memory, 0x30000, 16, 8192), Ring(memory, 0x60000, 8, 64)]
    driver = VsockDriver(rings, bus)

    async def main() -> None:
        async with serving(bus):
            bring_up(bus, rings, RING_FEATURES | 1)
            driver.post_rx(8)
            driver.post_events(4)
            driver.send(REQUEST, 5000, 1234)
            host = await accept_one(listener)
            await driver.expect(RESPONSE, src_port=1234, dst_port=5000)
            driver.send(RW, 5000, 1234, b"ping")
            assert await recv_exact(host, 4) == b"ping"
            host.send(b"pong")
            assert (await driver.expect(RW, dst_port=5000))[4] == b"pong"
            # A snapshot the source runs on after: the connection and its host socket live on.
            await source.quiesce()
            snapshot(bus, source)
            host.send(b"while paused")  # waits in the socket: the rx task is stopped
            await settle()
            driver.poll()
            assert not [p for p in driver.packets if p[0] == RW]
            source.resume_after_snapshot()
            assert (await driver.expect(RW, dst_port=5000))[4] == b"while paused"
            driver.send(RW, 5000, 1234, b"after", fwd_cnt=16)
            assert await recv_exact(host, 5) == b"after"
            assert [c.state for c in source.connections()] == ["established"]
            # And the one the destination takes.
            await source.quiesce()
            saved = snapshot(bus, source)
            assert not driver.events
        bus.close()
        source.close()
        host.close()

        destination = VsockDevice(CID, dst_uds)
        dst_bus = make_bus(kind, destination, memory)
        await restore(dst_bus, destination, saved)
        driver.bus = dst_bus
        async with serving(dst_bus):
            await until(lambda: (driver.poll(), driver.events)[1])
            assert driver.events == [struct.pack("<I", 0)]  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
            assert destination.stats["transport_resets"] == 1 and not destination.connections()
            driver.send(RW, 5000, 1234, b"stale")  # a connection the guest has not dropped yet
            await driver.expect(RST, src_port=1234, dst_port=5000)
            stream = await anyio.connect_unix(dst_uds)  # host connections work again
            await stream.send(b"CONNECT 52\n")
            _, src_port, _, _, _ = await driver.expect(REQUEST, dst_port=52)
            driver.send(RESPONSE, 52, src_port)
            line = b""
            with anyio.fail_after(10):
                while not line.endswith(b"\n"):
                    line += await stream.receive(1)
            assert line == b"OK %d\n" % src_port
            await stream.aclose()
            await settle()
        assert len(driver.events) == 1
        dst_bus.close()
        destination.close()

    try:
        run(backend, main)
    finally:
        listener.close()
        memory.close()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)


def test_vsock_refuses_another_cid() -> None:
    workdir = tempfile.mkdtemp(prefix="trivmm-vsock-state-")
    a, b = VsockDevice(3, os.path.join(workdir, "a")), VsockDevice(4, os.path.join(workdir, "b"))
    try:
        with pytest.raises(ValueError, match="configuration space"):
            b.restore_state(a.save_state())
        state = json.loads(a.save_state())
        state["next_port"] = 5
        with pytest.raises(ValueError, match="next host port 5"):
            a.restore_state(json.dumps(state).encode())
    finally:
        a.close()
        b.close()
        os.rmdir(workdir)


# --- rng, and the transports' own state -----------------------------------------------------------
class RngDriver:
    def __init__(self, ring: Ring, bus: Bus) -> None:
        self.ring, self.bus = ring, bus
        self.served = 0

    async def request(self, sizes: Sequence[int] = (64, 32)) -> None:
        self.ring.add([], list(sizes), tag=self.served)
        self.bus.core.notify(0)
        done: list[tuple[object, int, bytes]] = []

        def check() -> bool:
            done.extend(self.ring.collect())
            return bool(done)

        await until(check)
        ((tag, written, data),) = done
        assert tag == self.served and written == sum(sizes) and data != bytes(written)
        self.served += 1

    async def unanswered(self) -> None:
        """A request the device does not serve (no backend runs)."""
        self.ring.add([], [16], tag="unanswered")
        self.bus.core.notify(0)
        await settle()
        assert not self.ring.collect()


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@pytest.mark.parametrize("kind", ["mmio", "pci"])
def test_rng_requests_interrupts_and_routes_across_a_snapshot(backend: str, kind: str) -> None:
    memory = GuestMemory.from_ranges([(0, RAM)])
    source = RngDevice()
    bus = make_bus(kind, source, memory)
    ring = Ring(memory, 0x1000, 8)
    driver = RngDriver(ring, bus)

    async def main() -> None:
        async with serving(bus):
            bring_up(bus, [ring], RING_FEATURES)
            for _ in range(3):
                await driver.request()
            await source.quiesce()
            saved = snapshot(bus, source)
        routes = bus.kvm.msi_routes() if isinstance(bus, PciBus) else {}
        bus.close()
        destination = RngDevice()
        dst_bus = make_bus(kind, destination, memory)
        await restore(dst_bus, destination, saved)
        if isinstance(dst_bus, PciBus):
            msix = dst_bus.transport.msix
            assert msix is not None and msix.enabled
            assert dst_bus.transport.config_vector == 0 and dst_bus.transport.queue_vector(0) == 1
            assert dst_bus.kvm.msi_routes() == routes == {msix.gsi(v): (MSI_ADDRESS, 0x40 + v) for v in (0, 1)}
            assert set(dst_bus.kvm.irqfds.values()) == {msix.gsi(0), msix.gsi(1)}
            assert dst_bus.bound == {r for r in dst_bus.transport.notify_regions()}  # notify ioeventfds at BAR 0
            fired = msix.eventfd(1).take()
            assert fired == 1  # the queue's interrupt, raised again (one lost before the save would hang it)
        else:
            assert dst_bus.irq.take() == 1 and dst_bus.interrupts_pending() == 1
        driver.bus = dst_bus
        async with serving(dst_bus):
            for _ in range(3):
                await driver.request()
        if isinstance(dst_bus, PciBus):
            msix = dst_bus.transport.msix
            assert msix is not None and msix.eventfd(1).take() >= 1
        dst_bus.close()

    try:
        run(backend, main)
    finally:
        memory.close()


def test_save_refuses_a_backend_that_runs_unquiesced() -> None:
    memory = GuestMemory.from_ranges([(0, RAM)])
    device = RngDevice()
    bus = make_bus("mmio", device, memory)
    ring = Ring(memory, 0x1000, 8)

    async def main() -> None:
        async with serving(bus):
            bring_up(bus, [ring], RING_FEATURES)
            await RngDriver(ring, bus).request()
            with pytest.raises(RuntimeError, match="quiesce"):
                bus.save()
            await device.quiesce()
            await device.quiesce()  # twice: nothing more to do
            bus.save()
            device.resume_after_snapshot()
            device.resume_after_snapshot()
            await RngDriver(ring, bus).request()

    try:
        run("trio", main)
    finally:
        bus.close()
        memory.close()


@pytest.mark.parametrize("kind", ["mmio", "pci"])
@pytest.mark.parametrize("status", ["no-driver", "features", "running", "needs-reset"])
def test_a_transport_saved_in_each_status(kind: str, status: str) -> None:
    """Saved, restored into a fresh device: the same registers and queues, a backend only
    where the driver had set DRIVER_OK, and a driver that carries on from there."""
    memory = GuestMemory.from_ranges([(0, RAM)])
    source = RngDevice()
    bus = make_bus(kind, source, memory)
    ring = Ring(memory, 0x1000, 8)
    driver = RngDriver(ring, bus)

    async def main() -> None:
        async with serving(bus):
            if status != "no-driver":
                bring_up(bus, [ring], RING_FEATURES, driver_ok=status != "features")
            if status in ("running", "needs-reset"):
                await driver.request()
            if status == "needs-reset":
                memory.write_u16(ring.avail + AVAIL_IDX, (ring.avail_idx + 100) & 0xFFFF)  # breaks the ring
                bus.core.notify(0)
                await until(lambda: bus.read_status() & STATUS_DEVICE_NEEDS_RESET)
                memory.write_u16(ring.avail + AVAIL_IDX, ring.avail_idx)
            await source.quiesce()
            saved = snapshot(bus, source)
        before = decode_state(MmioState if kind == "mmio" else PciTransportState, saved.transport, "transport")
        bus.close()
        destination = RngDevice()
        dst_bus = make_bus(kind, destination, memory)
        await restore(dst_bus, destination, saved)
        after = dst_bus.transport.save()
        assert after.core == before.core
        assert dst_bus.read_status() == bus.core.status
        driver.bus = dst_bus
        async with serving(dst_bus):
            if status == "no-driver":
                assert dst_bus.read_status() == 0 and not dst_bus.interrupts_pending()
                bring_up(dst_bus, [ring], RING_FEATURES)
            elif status == "features":
                await driver.unanswered()  # the driver has not said DRIVER_OK: no backend
                dst_bus.write_status(RUNNING)
                await until(lambda: ring.collect())  # the request it had made
            elif status == "needs-reset":
                assert dst_bus.read_status() & STATUS_DEVICE_NEEDS_RESET
                if isinstance(dst_bus, MmioBus):  # told again (the driver may not have heard)
                    assert dst_bus.interrupts_pending() & INTERRUPT_CONFIG_CHANGE
                else:
                    assert dst_bus.transport.isr & ISR_CONFIG
                await driver.unanswered()
                fresh = Ring(memory, 0x1000, 8)
                driver.ring = fresh
                bring_up(dst_bus, [fresh], RING_FEATURES)  # the driver resets the device
            await driver.request()
        dst_bus.close()

    try:
        run("trio", main)
    finally:
        memory.close()


# --- hostile state -----------------------------------------------------------------------------
_TARGETS: dict[str, tuple[Callable[[], Any], bytes]] = {}


def _valid_sections() -> dict[str, tuple[Callable[[], Any], bytes]]:
    """(what takes it, a valid section) for each kind of section: transports saved running
    with traffic behind them, and the device sections. Built once."""
    if _TARGETS:
        return _TARGETS
    memory = GuestMemory.from_ranges([(0, RAM)])  # kept for the module's life
    workdir = tempfile.mkdtemp(prefix="trivmm-vsock-state-")
    for kind in ("mmio", "pci"):
        device = RngDevice()
        bus = make_bus(kind, device, memory)
        ring = Ring(memory, 0x1000 if kind == "mmio" else 0x40000, 8)

        async def traffic(bus: Bus = bus, device: VirtioDevice = device, ring: Ring = ring) -> None:
            async with serving(bus):
                bring_up(bus, [ring], RING_FEATURES)
                for _ in range(5):
                    await RngDriver(ring, bus).request()
                await device.quiesce()

        anyio.run(traffic, backend="trio")
        target = make_bus(kind, RngDevice(), memory)
        _TARGETS[f"virtio-{kind}"] = (lambda target=target: target, bus.save())
    vsock = VsockDevice(CID, os.path.join(workdir, "v"))
    net = NetDevice(FakeTap(), GUEST_MAC)
    blk_path = os.path.join(workdir, "disk")
    Path(blk_path).write_bytes(bytes(1 << 16))
    blk = BlockDevice(open_image(blk_path))
    for name, device in (("vsock", vsock), ("net", net), ("blk", blk), ("rng", RngDevice())):
        _TARGETS[name] = (lambda device=device: device, device.save_state())
    return _TARGETS


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _paths(item, (*prefix, index))
    return paths


_BOUNDARIES = [0, 1, -1, 2, 3, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 1,
               1 << 64, 1 << 30, 0xFEE0_0000, 0x1000, 0x1001]  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from(_BOUNDARIES), st.integers(), st.booleans(), st.none(), st.text(max_size=3),
    st.builds(list), st.builds(dict), st.lists(st.sampled_from(_BOUNDARIES), max_size=3),
    st.binary(max_size=40).map(lambda b: {"$b": b.hex()}), st.just({"$b": "zz"}), st.floats(allow_nan=True),
)  # fmt: skip


def _restore_target(name: str) -> Callable[[bytes], None]:
    make, _ = _valid_sections()[name]
    target = make()
    return target.transport.restore_state if isinstance(target, MmioBus | PciBus) else target.restore_state


SECTION_NAMES = ["virtio-mmio", "virtio-pci", "vsock", "net", "blk", "rng"]


@pytest.mark.parametrize("name", SECTION_NAMES)
def test_the_valid_sections_restore(name: str) -> None:
    _, data = _valid_sections()[name]
    _restore_target(name)(data)


@pytest.mark.parametrize("name", SECTION_NAMES)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_fields_are_refused_with_a_value_error(name: str, data: st.DataObject) -> None:
    _, valid = _valid_sections()[name]
    document = json.loads(valid)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(_paths(document)), label="path")
        action = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]), label="action")
        if not path or action == "add":
            parent = document if not path else _get(document, path)
            if isinstance(parent, dict):
                parent[data.draw(st.text(max_size=5), label="key")] = copy.deepcopy(data.draw(_VALUES, label="value"))
            continue
        parent, key = _get(document, path[:-1]), path[-1]
        if action == "delete":
            del parent[key]
        else:
            parent[key] = copy.deepcopy(data.draw(_VALUES, label="value"))  # never a shared object
    _assert_value_error_or_taken(name, json.dumps(document).encode())


@pytest.mark.parametrize("name", SECTION_NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_bytes_are_refused_with_a_value_error(name: str, data: st.DataObject) -> None:
    _, valid = _valid_sections()[name]
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4), label="damages")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        kind = data.draw(st.sampled_from(["flip", "insert", "cut"]), label="kind")
        if kind == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255), label="mask")
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        else:
            del raw[at : at + data.draw(st.integers(1, 8), label="length")]
    _assert_value_error_or_taken(name, bytes(raw))


def _get(document: Any, path: Sequence[Any]) -> Any:
    for key in path:
        document = document[key]
    return document


def _assert_value_error_or_taken(name: str, data: bytes) -> None:
    make, _ = _valid_sections()[name]
    target = make()
    restore_state = target.transport.restore_state if isinstance(target, MmioBus | PciBus) else target.restore_state
    try:
        restore_state(data)
    except ValueError as exc:
        assert str(exc)
        if isinstance(target, MmioBus | PciBus):  # the device was left reset
            core = target.core
            assert core.status == 0 and core.driver_features == 0
            assert not any(queue.ready for queue in core.queues)
