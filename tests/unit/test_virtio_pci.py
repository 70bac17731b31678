"""virtio-pci (trivmm/devices/virtio/pci.py) without KVM: a guest that drives it the way Linux's
virtio_pci_modern does -- capabilities found by walking configuration space, features, a
queue, MSI-X or INTx or no interrupt at all, a virtio-rng backend running on trio and on
asyncio -- then resets, BAR moves, the PCI_CFG window, and a hostile guest.

What a default run tries: 25 tests (parametrized cases counted; the three that run the
virtio-rng backend do so on trio and on asyncio), ``test_a_hostile_guest_never_breaks_the_transport``
among them (200 examples of up to 80 accesses: BAR registers of every width at every offset,
configuration space, the PCI_CFG window, BAR moves, honest set-ups, interrupts). About 3 s.

The asyncio cases are expected failures, not run, while ``LoopCaller`` callbacks cannot use
anyio on asyncio (``_asyncio_loop_callbacks_can_use_anyio``): VirtioCore starts a device's
backend in one, so on asyncio no backend starts once the VM's service is running (virtio-mmio
included). They run, and pass, as soon as that is fixed.
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Iterator, Sequence

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.virtio_driver import Driver, Layout
from trivmm._threads import LoopCaller
from trivmm.boot.layout import pci_layout
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.devices.pci import MSIX_ENABLE, MSIX_FUNCTION_MASK, GsiRouter, PciRoot
from trivmm.devices.pci.function import COMMAND_INTX_DISABLE, COMMAND_MASTER, COMMAND_MEMORY, STATUS_INTERRUPT
from trivmm.devices.virtio.constants import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from trivmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    DeviceType,
    VirtioDevice,
)
from trivmm.devices.virtio.pci import (
    CAP_COMMON_CFG,
    CAP_DEVICE_CFG,
    CAP_ISR_CFG,
    CAP_NOTIFY_CFG,
    CAP_PCI_CFG,
    COMMON_CFG_LENGTH,
    DEVICE_CFG_LENGTH,
    DEVICE_CFG_OFFSET,
    ISR_CFG_OFFSET,
    ISR_CONFIG,
    ISR_QUEUE,
    NOTIFY_CFG_OFFSET,
    NOTIFY_OFF_MULTIPLIER,
    VIRTIO_MSI_NO_VECTOR,
    NotifyRegion,
    VirtioPci,
)
from trivmm.devices.virtio.rng import RngDevice
from trivmm.kvm.vm import IrqRoute, MsiRoute
from trivmm.memory import GuestMemory

LAYOUT = pci_layout(64 << 20)
CF8, CFC = 0xCF8, 0xCFC
RAM = 1 << 20
QUEUE_BASE = 0x10000
QUEUE_SIZE = 16
MSI_ADDRESS = 0xFEE0_0000
ALL_STATUS = (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK
              | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)  # fmt: skip


def _asyncio_loop_callbacks_can_use_anyio() -> bool:
    """Whether a ``LoopCaller`` callback can use anyio on asyncio. ``VirtioCore`` starts a
    backend in one (a CancelScope, TaskGroup.start_soon); in a bare ``call_soon_threadsafe``
    callback there is no current task, so anyio cannot tell its backend and raises."""

    async def probe() -> bool:
        result: list[bool] = []

        def callback() -> None:
            try:
                anyio.CancelScope()
                result.append(True)
            except Exception:
                result.append(False)

        caller = LoopCaller.current()
        thread = threading.Thread(target=caller.call_soon, args=(callback,))  # from a vCPU-like thread
        thread.start()
        thread.join()
        while not result:
            await anyio.sleep(0)
        return result[0]

    return anyio.run(probe, backend="asyncio")


BACKENDS = ["trio", pytest.param("asyncio", marks=pytest.mark.xfail(
    not _asyncio_loop_callbacks_can_use_anyio(), run=False,
    reason="VirtioCore starts backends in a LoopCaller callback, where anyio cannot tell it is on asyncio "
           "(trivmm/_threads.py: run asyncio callbacks with sniffio's current_async_library_cvar set)"))]  # fmt: skip

# struct virtio_pci_common_cfg offsets
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x00, 0x04, 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE_REG, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30


# --- fakes -------------------------------------------------------------------------------------
class FakeKvm:
    """A RoutingBackend: records the routing tables and irqfd bindings KVM would get."""

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


class Ioeventfds:
    """The VM's side of ``rebind_notify``: what KVM would have bound, checked like KVM would."""

    def __init__(self) -> None:
        self.bound: set[NotifyRegion] = set()
        self.calls: list[tuple[list[NotifyRegion], list[NotifyRegion]]] = []

    def __call__(self, unbind: list[NotifyRegion], bind: list[NotifyRegion]) -> None:
        self.calls.append((unbind, bind))
        for region in unbind:
            assert region in self.bound, f"deassigning {region}, which is not bound"
            self.bound.remove(region)
        for region in bind:
            assert region not in self.bound, f"assigning {region} twice"
            self.bound.add(region)


class Platform:
    """A PCI root on fresh buses, guest RAM, and a virtio-rng on virtio-pci in a slot."""

    def __init__(self, device: VirtioDevice | None = None) -> None:
        self.pio = AddressSpace("pio", PIO_LIMIT)
        self.mmio = AddressSpace("mmio", MMIO_LIMIT)
        self.lines: dict[int, bool] = {}
        self.line_calls: list[tuple[int, bool]] = []
        self.kvm = FakeKvm()
        self.router = GsiRouter(self.kvm)
        self.root = PciRoot(self.pio, self.mmio, LAYOUT, self._irq_line)
        self.memory = GuestMemory.from_ranges([(0, RAM)])
        self.ioeventfds = Ioeventfds()
        self.transport = VirtioPci(device or RngDevice(), self.memory, self.router, rebind_notify=self.ioeventfds)
        self.slot = self.root.add(self.transport)

    def _irq_line(self, gsi: int, level: bool) -> None:
        self.line_calls.append((gsi, level))
        self.lines[gsi] = level

    @property
    def line(self) -> bool:
        gsi = self.transport.intx_gsi
        assert gsi is not None
        return self.lines.get(gsi, False)

    def close(self) -> None:
        self.root.close()
        self.memory.close()


@pytest.fixture
def platform() -> Iterator[Platform]:
    p = Platform()
    yield p
    p.close()


class Guest:
    """The guest's side, as Linux's virtio_pci_modern drives a device: configuration space
    through mechanism #1 (or ECAM), the structures through BAR 0 on the MMIO bus."""

    def __init__(self, platform: Platform, *, ecam: bool = False) -> None:
        self.p = platform
        self.slot = platform.slot
        self.ecam = ecam
        self.caps: dict[int, dict[str, int]] = {}
        self.msix_cap = 0
        self.msix_table = 0
        self.msix_vectors = 0
        self.find_capabilities()

    # configuration space
    def cfg_read(self, reg: int, size: int) -> int:
        data = bytearray(size)
        if self.ecam:
            self.p.mmio.read(LAYOUT.ecam_base + (self.slot << 15 | reg), memoryview(data))
        else:
            self.p.pio.write(CF8, memoryview(struct.pack("<I", 1 << 31 | self.slot << 11 | reg & 0xFC)))
            self.p.pio.read(CFC + (reg & 3), memoryview(data))
        return int.from_bytes(data, "little")

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        data = memoryview(value.to_bytes(size, "little"))
        if self.ecam:
            self.p.mmio.write(LAYOUT.ecam_base + (self.slot << 15 | reg), data)
        else:
            self.p.pio.write(CF8, memoryview(struct.pack("<I", 1 << 31 | self.slot << 11 | reg & 0xFC)))
            self.p.pio.write(CFC + (reg & 3), data)

    def find_capabilities(self) -> None:
        assert self.cfg_read(0x06, 2) & 0x10  # capabilities list
        at = self.cfg_read(0x34, 1)
        seen = 0
        while at:
            seen += 1
            assert seen < 48, "the capability list loops"
            cap_id, nxt = self.cfg_read(at, 1), self.cfg_read(at + 1, 1)
            if cap_id == 0x09:
                cfg_type = self.cfg_read(at + 3, 1)
                cap = {"at": at, "len": self.cfg_read(at + 2, 1), "bar": self.cfg_read(at + 4, 1),
                       "offset": self.cfg_read(at + 8, 4), "length": self.cfg_read(at + 12, 4)}  # fmt: skip
                if cfg_type == CAP_NOTIFY_CFG:
                    cap["multiplier"] = self.cfg_read(at + 16, 4)
                self.caps.setdefault(cfg_type, cap)  # the first of each type, as Linux takes
            elif cap_id == 0x11:
                self.msix_cap = at
                self.msix_vectors = (self.cfg_read(at + 2, 2) & 0x7FF) + 1
                table = self.cfg_read(at + 4, 4)
                assert table & 7 == 0  # BIR 0
                self.msix_table = table & ~7
            at = nxt

    @property
    def bar0(self) -> int:
        low = self.cfg_read(0x10, 4)
        assert low & 0xF == 0x4  # memory, 64-bit, not prefetchable
        return (low & ~0xF) | self.cfg_read(0x14, 4) << 32

    # BAR 0 through the MMIO bus
    def read(self, offset: int, size: int) -> int:
        data = bytearray(size)
        assert self.p.mmio.read(self.bar0 + offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        assert self.p.mmio.write(self.bar0 + offset, memoryview(value.to_bytes(size, "little")))

    def common_read(self, field: int, size: int) -> int:
        return self.read(self.caps[CAP_COMMON_CFG]["offset"] + field, size)

    def common_write(self, field: int, size: int, value: int) -> None:
        self.write(self.caps[CAP_COMMON_CFG]["offset"] + field, size, value)

    def read_isr(self) -> int:
        return self.read(self.caps[CAP_ISR_CFG]["offset"], 1)

    # what virtio_pci_modern does
    def enable_msix(self) -> None:
        """pci_alloc_irq_vectors: MSI-X on, masked, program the table, unmask."""
        control = self.msix_cap + 2
        self.cfg_write(control, 2, MSIX_ENABLE | MSIX_FUNCTION_MASK)
        for vector in range(self.msix_vectors):
            entry = self.msix_table + 16 * vector
            self.write(entry, 4, MSI_ADDRESS)
            self.write(entry + 4, 4, 0)
            self.write(entry + 8, 4, 0x40 + vector)
            self.write(entry + 12, 4, 0)  # unmasked
        self.cfg_write(control, 2, MSIX_ENABLE)

    def reset(self) -> None:
        self.common_write(DEVICE_STATUS, 1, 0)
        assert self.common_read(DEVICE_STATUS, 1) == 0

    def negotiate(self, wanted: int) -> int:
        self.reset()
        self.common_write(DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE)
        self.common_write(DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = 0
        for select in (0, 1):
            self.common_write(DEVICE_FEATURE_SELECT, 4, select)
            offered |= self.common_read(DEVICE_FEATURE, 4) << (32 * select)
        features = offered & wanted
        for select in (0, 1):
            self.common_write(DRIVER_FEATURE_SELECT, 4, select)
            self.common_write(DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFF_FFFF)
        status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        self.common_write(DEVICE_STATUS, 1, status)
        assert self.common_read(DEVICE_STATUS, 1) == status
        return features

    def set_config_vector(self, vector: int) -> int:
        self.common_write(CONFIG_MSIX_VECTOR, 2, vector)
        return self.common_read(CONFIG_MSIX_VECTOR, 2)

    def setup_queue(self, index: int, layout: Layout, vector: int) -> int:
        """vp_modern setup_vq: select, size, vector, the three addresses, enable. Returns
        the queue's notify offset in BAR 0."""
        self.common_write(QUEUE_SELECT, 2, index)
        assert self.common_read(QUEUE_SIZE_REG, 2) >= layout.size
        assert self.common_read(QUEUE_ENABLE, 2) == 0
        self.common_write(QUEUE_SIZE_REG, 2, layout.size)
        notify_off = self.common_read(QUEUE_NOTIFY_OFF, 2)
        for field, addr in ((QUEUE_DESC, layout.desc_addr), (QUEUE_DRIVER, layout.avail_addr),
                            (QUEUE_DEVICE, layout.used_addr)):  # fmt: skip
            self.common_write(field, 4, addr & 0xFFFF_FFFF)  # vp_iowrite64_twopart
            self.common_write(field + 4, 4, addr >> 32)
        self.common_write(QUEUE_MSIX_VECTOR, 2, vector)
        assert self.common_read(QUEUE_MSIX_VECTOR, 2) == vector
        self.common_write(QUEUE_ENABLE, 2, 1)
        assert self.common_read(QUEUE_ENABLE, 2) == 1
        notify = self.caps[CAP_NOTIFY_CFG]
        return notify["offset"] + notify_off * notify["multiplier"]

    def driver_ok(self) -> None:
        status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        self.common_write(DEVICE_STATUS, 1, status)
        assert self.common_read(DEVICE_STATUS, 1) == status


WANTED = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << VIRTIO_F_INDIRECT_DESC


def bring_up(guest: Guest, *, msix: bool, queue_vector: int = 1) -> tuple[Driver, int]:
    """Everything a driver does before its first request; returns the ring and its notify offset."""
    guest.cfg_write(0x04, 2, guest.cfg_read(0x04, 2) | COMMAND_MASTER)
    if msix:
        guest.enable_msix()
    features = guest.negotiate(WANTED)
    assert features == WANTED
    if msix:
        assert guest.set_config_vector(0) == 0
    layout = Layout.packed(QUEUE_SIZE, QUEUE_BASE)
    driver = Driver(guest.p.memory, layout, event_idx=True)
    driver.initialize()
    notify = guest.setup_queue(0, layout, queue_vector if msix else VIRTIO_MSI_NO_VECTOR)
    guest.driver_ok()
    return driver, notify


async def request_entropy(guest: Guest, driver: Driver, notify: int, sizes: list[int]) -> list[bytes]:
    """Post one chain of device-writable buffers, kick through the notify address from a
    worker thread (a vCPU's MMIO exit), wait for the used ring."""
    before = driver.used_idx()
    driver.add([], sizes)
    _, kick = driver.publish()
    assert kick
    await anyio.to_thread.run_sync(guest.write, notify, 2, 0)  # vp_notify: iowrite16(queue index)
    with anyio.fail_after(10):
        while driver.used_idx() == before:
            await anyio.sleep(0.001)
    done = [data for _, _, data in driver.collect()]
    driver.set_used_event(driver.last_used)  # re-armed, as virtqueue_get_buf does
    return done


def run_with_service(backend: str, platform: Platform, body: object) -> None:
    """Run ``body()`` (async) beside the transport's service, as the VM runs it."""

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(platform.transport.core.service)
            await body()  # type: ignore[operator]
            tg.cancel_scope.cancel()

    anyio.run(main, backend=backend)


# --- identity and layout ----------------------------------------------------------------------
@pytest.mark.parametrize("ecam", [False, True])
def test_identity_and_capabilities_as_a_driver_finds_them(platform: Platform, ecam: bool) -> None:
    guest = Guest(platform, ecam=ecam)
    transport = platform.transport
    assert guest.cfg_read(0x00, 2) == 0x1AF4
    assert guest.cfg_read(0x02, 2) == 0x1040 + DeviceType.ENTROPY
    assert guest.cfg_read(0x08, 1) == 1  # revision 1: non-transitional
    assert guest.cfg_read(0x08, 4) >> 8 == 0x00FF00  # QEMU's virtio-rng: "unclassified [00ff]"
    assert guest.cfg_read(0x0E, 1) == 0
    assert guest.cfg_read(0x2C, 2) == 0x1AF4 and guest.cfg_read(0x2E, 2) >= 0x40
    assert guest.cfg_read(0x3D, 1) == 1  # INTA
    assert set(guest.caps) == {CAP_COMMON_CFG, CAP_NOTIFY_CFG, CAP_ISR_CFG, CAP_DEVICE_CFG, CAP_PCI_CFG}
    for cap in guest.caps.values():
        assert cap["bar"] == 0
    common, notify = guest.caps[CAP_COMMON_CFG], guest.caps[CAP_NOTIFY_CFG]
    isr, device, window = guest.caps[CAP_ISR_CFG], guest.caps[CAP_DEVICE_CFG], guest.caps[CAP_PCI_CFG]
    assert (common["offset"], common["length"], common["len"]) == (0, COMMON_CFG_LENGTH, 16)
    assert common["length"] >= 56  # Linux's minimum: sizeof(struct virtio_pci_common_cfg)
    assert (notify["offset"], notify["length"], notify["multiplier"], notify["len"]) == (NOTIFY_CFG_OFFSET, 4, 4, 20)
    assert (isr["offset"], isr["length"]) == (ISR_CFG_OFFSET, 1)
    assert (device["offset"], device["length"]) == (DEVICE_CFG_OFFSET, DEVICE_CFG_LENGTH)
    assert window["len"] == 20  # struct virtio_pci_cfg_cap
    assert guest.msix_vectors == 2 and guest.msix_table == transport.msix_table_offset
    # BAR 0: 64-bit memory, not prefetchable, its size by the sizing protocol, inside the window
    assert transport.bar_size == 0x8000
    base = guest.bar0
    assert base == transport.bar_address(0) and base % transport.bar_size == 0
    command = guest.cfg_read(0x04, 2)
    guest.cfg_write(0x04, 2, command & ~COMMAND_MEMORY)
    guest.cfg_write(0x10, 4, 0xFFFF_FFFF)
    guest.cfg_write(0x14, 4, 0xFFFF_FFFF)
    assert guest.cfg_read(0x10, 4) == (~(transport.bar_size - 1) & 0xFFFF_FFF0) | 0x4
    assert guest.cfg_read(0x14, 4) == 0xFFFF_FFFF
    guest.cfg_write(0x10, 4, base & 0xFFFF_FFFF)
    guest.cfg_write(0x14, 4, base >> 32)
    guest.cfg_write(0x04, 2, command)
    # every structure lies in the BAR, none overlaps another
    spans = sorted([(c["offset"], c["offset"] + c["length"]) for t, c in guest.caps.items() if t != CAP_PCI_CFG]
                   + [(transport.msix_table_offset, transport.msix_table_offset + 16 * 2),
                      (transport.msix_pba_offset, transport.msix_pba_offset + 8)])  # fmt: skip
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert spans[-1][1] <= transport.bar_size
    assert guest.common_read(NUM_QUEUES, 2) == 1


class _Typed(VirtioDevice):
    def __init__(self, device_type: int, queues: int) -> None:
        super().__init__()
        self.device_type = device_type
        self.queue_sizes = (64,) * queues


@pytest.mark.parametrize(("device_type", "queues", "class_code"), [
    (DeviceType.BLOCK, 1, 0x010000), (DeviceType.NET, 3, 0x020000), (DeviceType.VSOCK, 3, 0x078000),
    (DeviceType.ENTROPY, 1, 0x00FF00), (DeviceType.NET, 300, 0x020000),
])  # fmt: skip
def test_ids_class_codes_and_layout_scale_with_the_device(device_type: int, queues: int, class_code: int) -> None:
    p = Platform(_Typed(device_type, queues))
    try:
        guest = Guest(p)
        t = p.transport
        assert guest.cfg_read(0x02, 2) == 0x1040 + device_type
        assert guest.cfg_read(0x08, 4) >> 8 == class_code
        assert guest.msix_vectors == queues + 1
        notify = guest.caps[CAP_NOTIFY_CFG]
        assert notify["length"] >= (queues - 1) * notify["multiplier"] + 2  # the spec's bound
        assert notify["offset"] + notify["length"] <= t.msix_table_offset
        assert t.msix_table_offset + 16 * (queues + 1) <= t.msix_pba_offset
        assert t.msix_pba_offset + (queues + 64) // 64 * 8 <= t.bar_size
        assert t.bar_size & (t.bar_size - 1) == 0
        base = t.bar_address(0)
        assert base is not None
        assert [r.address for r in t.notify_regions()] == [
            base + NOTIFY_CFG_OFFSET + NOTIFY_OFF_MULTIPLIER * q for q in range(queues)]  # fmt: skip
        for q in (0, queues - 1):
            guest.common_write(QUEUE_SELECT, 2, q)
            assert guest.common_read(QUEUE_NOTIFY_OFF, 2) == q
            assert guest.common_read(QUEUE_SIZE_REG, 2) == 64
        guest.common_write(QUEUE_SELECT, 2, queues)
        assert guest.common_read(QUEUE_SIZE_REG, 2) == 0  # no such queue
        assert guest.common_read(QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    finally:
        p.close()


# --- a driver at work: MSI-X, INTx, polling -------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_over_msix(platform: Platform, backend: str) -> None:
    guest = Guest(platform)
    transport = platform.transport
    msix = transport.msix
    assert msix is not None

    async def body() -> None:
        driver, notify = await anyio.to_thread.run_sync(lambda: bring_up(guest, msix=True))
        assert notify == NOTIFY_CFG_OFFSET  # queue 0's own slot
        for sizes in ([32], [48, 16, 7]):
            (data,) = await request_entropy(guest, driver, notify, sizes)
            assert len(data) == sum(sizes) and data != bytes(len(data))
        with anyio.fail_after(5):
            while msix.delivered < 2:
                await anyio.sleep(0.001)

    run_with_service(backend, platform, body)
    assert msix.eventfd(1).take() == 2  # the queue's vector, signalled through its irqfd
    assert msix.eventfd(0).take() == 0  # nothing on the configuration vector
    assert platform.kvm.msi_routes()[msix.gsi(1)] == (MSI_ADDRESS, 0x41)
    assert platform.kvm.irqfds[msix.eventfd(1).fd] == msix.gsi(1)
    assert transport.isr == 0 and not platform.line_calls  # MSI-X: no ISR, no INTx
    assert transport.core.status & STATUS_DRIVER_OK


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_over_intx(platform: Platform, backend: str) -> None:
    guest = Guest(platform)
    transport = platform.transport

    async def body() -> None:
        driver, notify = await anyio.to_thread.run_sync(lambda: bring_up(guest, msix=False))
        (data,) = await request_entropy(guest, driver, notify, [40])
        assert len(data) == 40
        with anyio.fail_after(5):
            while not platform.line:
                await anyio.sleep(0.001)

    run_with_service(backend, platform, body)
    assert guest.cfg_read(0x06, 2) & STATUS_INTERRUPT
    assert transport.isr == ISR_QUEUE
    assert guest.read_isr() == ISR_QUEUE  # returns the bits, clears them, lowers the pin
    assert not platform.line and not guest.cfg_read(0x06, 2) & STATUS_INTERRUPT
    assert guest.read_isr() == 0
    gsi = transport.intx_gsi
    assert platform.line_calls == [(gsi, True), (gsi, False)]
    assert transport.msix is not None and transport.msix.delivered == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_vector_means_no_interrupt_and_the_ring_still_moves(platform: Platform, backend: str) -> None:
    guest = Guest(platform)
    transport = platform.transport
    msix = transport.msix
    assert msix is not None

    async def body() -> None:
        polling = lambda: bring_up(guest, msix=True, queue_vector=VIRTIO_MSI_NO_VECTOR)  # noqa: E731
        driver, notify = await anyio.to_thread.run_sync(polling)
        for _ in range(3):
            (data,) = await request_entropy(guest, driver, notify, [16])
            assert len(data) == 16

    run_with_service(backend, platform, body)
    assert msix.delivered == 0 and msix.dropped == 0
    assert not any(msix.pending(v) for v in range(msix.vectors))
    assert msix.eventfd(0).take() == 0 and msix.eventfd(1).take() == 0
    assert transport.isr == 0 and not platform.line_calls


def test_configuration_interrupts(platform: Platform) -> None:
    guest = Guest(platform)
    transport, msix = platform.transport, platform.transport.msix
    assert msix is not None
    bring_up(guest, msix=False)
    transport.core.config_changed()  # INTx: ISR bit 1, pin up
    assert platform.line and transport.isr == ISR_CONFIG
    assert guest.read_isr() == ISR_CONFIG and not platform.line
    guest.enable_msix()
    assert guest.set_config_vector(1) == 1
    transport.core.config_changed()  # MSI-X: the configuration vector; the ISR bit is still set (spec)
    assert msix.eventfd(1).take() == 1 and not platform.line
    assert transport.isr == ISR_CONFIG
    assert guest.set_config_vector(VIRTIO_MSI_NO_VECTOR) == VIRTIO_MSI_NO_VECTOR
    transport.core.config_changed()
    assert msix.eventfd(0).take() == msix.eventfd(1).take() == 0
    assert guest.common_read(CONFIG_GENERATION, 1) == 3


def test_a_broken_queue_tells_the_driver(platform: Platform) -> None:
    """DEVICE_NEEDS_RESET raises the configuration interrupt (from a vCPU thread, under the
    device lock: the transport must not take it again)."""
    guest = Guest(platform)
    bring_up(guest, msix=True)
    msix = platform.transport.msix
    assert msix is not None
    guest.common_write(QUEUE_SELECT, 2, 0)
    guest.reset()
    guest.enable_msix()
    guest.negotiate(WANTED)
    assert guest.set_config_vector(0) == 0
    guest.common_write(QUEUE_DESC, 4, RAM - 16)  # the table runs past RAM: refused at enable
    guest.driver_ok()
    guest.common_write(QUEUE_ENABLE, 2, 1)
    assert guest.common_read(DEVICE_STATUS, 1) & STATUS_DEVICE_NEEDS_RESET
    assert guest.common_read(QUEUE_ENABLE, 2) == 0
    assert msix.eventfd(0).take() == 1


# --- registers ----------------------------------------------------------------------------------
def test_vectors_beyond_the_table_read_back_no_vector(platform: Platform) -> None:
    guest = Guest(platform)
    for vector, expect in ((0, 0), (1, 1), (2, VIRTIO_MSI_NO_VECTOR), (0x7FF, VIRTIO_MSI_NO_VECTOR),
                           (VIRTIO_MSI_NO_VECTOR, VIRTIO_MSI_NO_VECTOR)):  # fmt: skip
        assert guest.set_config_vector(vector) == expect
        guest.common_write(QUEUE_MSIX_VECTOR, 2, vector)
        assert guest.common_read(QUEUE_MSIX_VECTOR, 2) == expect
    guest.common_write(QUEUE_SELECT, 2, 5)  # no such queue: nothing to map
    guest.common_write(QUEUE_MSIX_VECTOR, 2, 0)
    assert guest.common_read(QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR


def test_odd_widths_take_the_bytes_they_cover(platform: Platform) -> None:
    guest = Guest(platform)
    core = platform.transport.core
    # 64-bit fields: two halves, or one 8-byte access
    guest.common_write(QUEUE_DESC, 8, 0x1234_5678_9ABC_DEF0)
    assert guest.common_read(QUEUE_DESC, 4) == 0x9ABC_DEF0 and guest.common_read(QUEUE_DESC + 4, 4) == 0x1234_5678
    assert guest.common_read(QUEUE_DESC, 8) == 0x1234_5678_9ABC_DEF0
    guest.common_write(QUEUE_DEVICE + 4, 4, 0x42)
    assert core.queues[0].used_addr == 0x42 << 32
    # a byte of a 16-bit field: the other byte keeps its value
    guest.common_write(QUEUE_SIZE_REG, 1, 0x80)  # 256 -> 0x0180: not a power of two, ignored
    assert guest.common_read(QUEUE_SIZE_REG, 2) == 256
    guest.common_write(QUEUE_SIZE_REG + 1, 1, 0)  # 256 -> 0: ignored
    assert guest.common_read(QUEUE_SIZE_REG, 2) == 256
    guest.common_write(QUEUE_SIZE_REG, 2, 64)
    assert guest.common_read(QUEUE_SIZE_REG + 1, 1) == 0 and guest.common_read(QUEUE_SIZE_REG, 1) == 64
    for bad in (0, 3, 512, 0xFFFF):
        guest.common_write(QUEUE_SIZE_REG, 2, bad)
        assert guest.common_read(QUEUE_SIZE_REG, 2) == 64
    # a wide read assembles every field it covers
    guest.common_write(DEVICE_FEATURE_SELECT, 4, 1)
    assert guest.common_read(DEVICE_FEATURE, 4) == 1  # VERSION_1 is bit 32
    word = guest.common_read(0x10, 8)  # config vector, num_queues, status, generation, queue_select
    assert word == VIRTIO_MSI_NO_VECTOR | 1 << 16
    # a byte of the driver-feature word
    guest.common_write(DRIVER_FEATURE_SELECT, 4, 0)
    guest.common_write(DRIVER_FEATURE + 3, 1, 0x30)  # bits 28, 29
    assert core.driver_features == 0x3000_0000
    # read-only fields ignore writes; unclaimed bytes read zero
    guest.common_write(NUM_QUEUES, 2, 7)
    guest.common_write(DEVICE_FEATURE, 4, 0)
    assert guest.common_read(NUM_QUEUES, 2) == 1 and guest.common_read(DEVICE_FEATURE, 4) == 1
    assert guest.read(0x40, 4) == 0 and guest.read(0x800, 8) == 0
    assert guest.read(NOTIFY_CFG_OFFSET, 2) == 0
    # an access straddling two structures' pages reads all-ones and writes nothing
    assert guest.read(ISR_CFG_OFFSET - 2, 4) == 0xFFFF_FFFF


def test_reserved_status_bits_are_not_taken(platform: Platform) -> None:
    guest = Guest(platform)
    guest.common_write(DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE | 0x30)
    assert guest.common_read(DEVICE_STATUS, 1) == STATUS_ACKNOWLEDGE
    guest.common_write(DEVICE_STATUS, 1, 0x10)  # only reserved bits: not a reset, not taken
    assert guest.common_read(DEVICE_STATUS, 1) == STATUS_ACKNOWLEDGE
    guest.common_write(DEVICE_STATUS, 1, STATUS_DEVICE_NEEDS_RESET | STATUS_ACKNOWLEDGE)  # the device's bit
    assert guest.common_read(DEVICE_STATUS, 1) == STATUS_ACKNOWLEDGE


def test_notify_writes_that_reach_the_model(platform: Platform) -> None:
    guest = Guest(platform)
    notifier = platform.transport.core.notifiers[0]
    for size, value in ((2, 0), (4, 0), (1, 7), (2, 0xFFFF)):  # the slot names the queue, not the value
        guest.write(NOTIFY_CFG_OFFSET, size, value)
        assert notifier.take() == 1
    guest.write(NOTIFY_CFG_OFFSET + 4, 2, 0)  # past the last queue's slot
    guest.write(NOTIFY_CFG_OFFSET - 4, 4, 0)  # not the notify region
    assert notifier.take() == 0


def test_reset_really_resets(platform: Platform) -> None:
    guest = Guest(platform)
    transport, core = platform.transport, platform.transport.core
    bring_up(guest, msix=False)
    guest.common_write(QUEUE_SELECT, 2, 0)
    transport.core.config_changed()
    assert platform.line and transport.isr
    guest.enable_msix()
    assert guest.set_config_vector(1) == 1
    guest.common_write(QUEUE_MSIX_VECTOR, 2, 0)
    guest.common_write(DEVICE_FEATURE_SELECT, 4, 1)
    guest.cfg_write(guest.msix_cap + 2, 2, 0)  # MSI-X off again: INTx, whose line is up
    assert platform.line
    guest.common_write(DEVICE_STATUS, 1, 0)
    assert guest.common_read(DEVICE_STATUS, 1) == 0
    assert guest.common_read(CONFIG_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert guest.common_read(QUEUE_MSIX_VECTOR, 2) == VIRTIO_MSI_NO_VECTOR
    assert guest.common_read(QUEUE_SIZE_REG, 2) == 256 and guest.common_read(QUEUE_ENABLE, 2) == 0
    for field in (QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE):
        assert guest.common_read(field, 8) == 0
    assert guest.common_read(DEVICE_FEATURE_SELECT, 4) == 0 and core.driver_features == 0
    assert transport.isr == 0 and not platform.line and guest.read_isr() == 0
    assert not guest.cfg_read(0x06, 2) & STATUS_INTERRUPT
    # a request that finishes after the reset interrupts nobody
    transport._raise(0)
    assert transport.isr == 0 and not platform.line
    # and the device comes up again from scratch
    bring_up(guest, msix=True)
    assert guest.common_read(DEVICE_STATUS, 1) & STATUS_DRIVER_OK


# --- the BAR moves, the ioeventfds follow ----------------------------------------------------------
def test_notify_ioeventfds_follow_the_bar(platform: Platform) -> None:
    guest = Guest(platform)
    transport, fds = platform.transport, platform.ioeventfds
    base = transport.bar_address(0)
    assert base is not None
    first = [NotifyRegion(base + NOTIFY_CFG_OFFSET, 0, 0, None)]
    assert transport.notify_regions() == first
    assert fds.calls == [([], first)] and fds.bound == set(first)  # bound by PciRoot.add
    # Linux sizing the BAR: decoding off (unbind), all-ones, the address back, decoding on (bind)
    command = guest.cfg_read(0x04, 2)
    guest.cfg_write(0x04, 2, command & ~COMMAND_MEMORY)
    assert transport.notify_regions() == [] and fds.bound == set()
    guest.cfg_write(0x10, 4, 0xFFFF_FFFF)
    guest.cfg_write(0x10, 4, base & 0xFFFF_FFFF)
    guest.cfg_write(0x04, 2, command)
    assert fds.bound == set(first)
    # the guest moves the BAR: the old region goes, the new one comes, in one call
    new = LAYOUT.mmio32_base + 0x10_0000
    calls = len(fds.calls)
    guest.cfg_write(0x10, 4, new)
    moved = [NotifyRegion(new + NOTIFY_CFG_OFFSET, 0, 0, None)]
    assert fds.calls[calls:] == [(first, moved)]
    assert transport.notify_regions() == moved and fds.bound == set(moved)
    guest.write(NOTIFY_CFG_OFFSET, 2, 0)  # the model path at the new address
    assert transport.core.notifiers[0].take() == 1
    # a 64-bit BAR in the 64-bit window, via its upper half
    high = LAYOUT.mmio64_base
    guest.cfg_write(0x04, 2, command & ~COMMAND_MEMORY)
    guest.cfg_write(0x10, 4, high & 0xFFFF_FFFF)
    guest.cfg_write(0x14, 4, high >> 32)
    guest.cfg_write(0x04, 2, command)
    assert transport.notify_regions() == [NotifyRegion(high + NOTIFY_CFG_OFFSET, 0, 0, None)]
    assert fds.bound == set(transport.notify_regions())


def test_a_failing_rebind_is_survived(platform: Platform, caplog: pytest.LogCaptureFixture) -> None:
    guest = Guest(platform)

    def refuse(unbind: list[NotifyRegion], bind: list[NotifyRegion]) -> None:
        raise OSError(17, "File exists")

    platform.transport.rebind_notify = refuse
    guest.cfg_write(0x10, 4, LAYOUT.mmio32_base + 0x20_0000)
    assert "notify ioeventfds" in caplog.text
    guest.write(NOTIFY_CFG_OFFSET, 2, 0)  # notifications still arrive, through the model
    assert platform.transport.core.notifiers[0].take() == 1


def test_ioeventfd_length_two_for_older_hosts() -> None:
    memory = GuestMemory.from_ranges([(0, RAM)])
    transport = VirtioPci(RngDevice(), memory, GsiRouter(FakeKvm()), ioeventfd_length=2)
    try:
        assert transport._regions_at(0x1000_0000) == [NotifyRegion(0x1000_0000 + NOTIFY_CFG_OFFSET, 2, 0, None)]
        with pytest.raises(ValueError):
            VirtioPci(RngDevice(), memory, GsiRouter(FakeKvm()), ioeventfd_length=4)
    finally:
        transport.close()
        memory.close()


# --- the PCI_CFG window ---------------------------------------------------------------------------
def window(guest: Guest, offset: int, length: int, bar: int = 0) -> int:
    cap = guest.caps[CAP_PCI_CFG]["at"]
    guest.cfg_write(cap + 4, 1, bar)
    guest.cfg_write(cap + 8, 4, offset)
    guest.cfg_write(cap + 12, 4, length)
    return cap + 16


def test_pci_cfg_window_reaches_the_structures_without_the_bar(platform: Platform) -> None:
    guest = Guest(platform)
    transport = platform.transport
    guest.cfg_write(0x04, 2, 0)  # no decoding at all: only the window reaches the device
    assert transport.bar_address(0) is None
    data = window(guest, DEVICE_FEATURE, 4)
    assert guest.cfg_read(data, 4) == transport.core.device_features_word()
    data = window(guest, DEVICE_STATUS, 1)
    guest.cfg_write(data, 1, STATUS_ACKNOWLEDGE)
    assert transport.core.status == STATUS_ACKNOWLEDGE
    assert guest.cfg_read(data, 1) == STATUS_ACKNOWLEDGE
    data = window(guest, QUEUE_SIZE_REG, 2)
    guest.cfg_write(data, 2, 32)
    assert transport.core.queues[0].size == 32 and guest.cfg_read(data, 2) == 32
    # reading ISR through the window has the read's side effect
    transport.core.config_changed()
    assert transport.isr == ISR_CONFIG
    data = window(guest, ISR_CFG_OFFSET, 1)
    assert guest.cfg_read(data, 1) == ISR_CONFIG and transport.isr == 0 and not platform.line
    # notify through the window
    data = window(guest, NOTIFY_CFG_OFFSET, 2)
    guest.cfg_write(data, 2, 0)
    assert transport.core.notifiers[0].take() == 1
    # the window's fields read back what was written; bad windows do nothing
    cap = guest.caps[CAP_PCI_CFG]["at"]
    assert guest.cfg_read(cap + 8, 4) == NOTIFY_CFG_OFFSET and guest.cfg_read(cap + 12, 4) == 2
    for bar, offset, length in ((1, 0, 4), (0, 0, 3), (0, 0, 8), (0, transport.bar_size - 2, 4), (0, 1 << 31, 4)):
        data = window(guest, offset, length, bar)
        guest.cfg_write(data, 4, 0)
        guest.cfg_read(data, 4)
    assert transport.core.status == STATUS_ACKNOWLEDGE
    # the capability's identity is read-only
    assert guest.cfg_read(cap + 3, 1) == CAP_PCI_CFG
    guest.cfg_write(cap + 3, 1, 1)
    assert guest.cfg_read(cap + 3, 1) == CAP_PCI_CFG


# --- a hostile guest ------------------------------------------------------------------------------
_BAR_SIZE = 0x8000
_MSIX_TABLE, _MSIX_PBA = 0x4000, 0x5000
_BAR_SPOTS = sorted({*range(0, 0x44), *(s + d for s in (ISR_CFG_OFFSET, DEVICE_CFG_OFFSET, NOTIFY_CFG_OFFSET,
                                                       _MSIX_TABLE, _MSIX_PBA) for d in (-4, -2, -1, 0, 1, 2, 4)),
                     0x3004, _MSIX_TABLE + 0x10, _MSIX_TABLE + 0x1C, _BAR_SIZE - 8})  # fmt: skip
_CFG_SPOTS = [0x04, 0x06, 0x10, 0x14, 0x3C, *range(0x40, 0xA8)]
_VALUES = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 1, 2, 0x0F, 0x40, 0x80, 0xFF, 0x8000, 0xC000, 0xFFFF, 0xFFFF_FFFF, QUEUE_BASE,
                     STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                     STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK]),
)  # fmt: skip
_BAR_OFFSET = st.one_of(st.sampled_from(_BAR_SPOTS), st.integers(0, _BAR_SIZE - 1))
_WINDOW_LENGTH = st.sampled_from([1, 2, 4, 4, 3, 8])
_CFG_OFFSET = st.one_of(st.sampled_from(_CFG_SPOTS), st.integers(0, 0xFF))
_OPS = st.one_of(
    st.tuples(st.just("bar_read"), _BAR_OFFSET, st.sampled_from([1, 2, 4, 8])),
    st.tuples(st.just("bar_write"), _BAR_OFFSET, st.sampled_from([1, 2, 4, 8]), _VALUES),
    st.tuples(st.just("cfg_read"), _CFG_OFFSET, st.sampled_from([1, 2, 4])),
    st.tuples(st.just("cfg_write"), _CFG_OFFSET, st.sampled_from([1, 2, 4]), _VALUES),
    st.tuples(st.just("bus_write"), _BAR_OFFSET, st.sampled_from([1, 2, 4, 8]), _VALUES),
    st.tuples(st.just("window"), st.sampled_from([0, 1]), _BAR_OFFSET, _WINDOW_LENGTH, st.booleans(), _VALUES),
    st.tuples(st.just("interrupt"), st.sampled_from([None, 0, 0, 1])),
    st.tuples(st.just("interrupt"), st.sampled_from([None, 0])),  # twice: after "honest", often
    st.tuples(st.just("honest"), st.booleans()),
    st.tuples(st.just("honest"), st.just(True)),
    st.tuples(st.just("move"), st.sampled_from(["decode off", "decode on", "size", "elsewhere", "64-bit", "clash"])),
    st.tuples(st.just("break"), st.sampled_from([RAM - 16, 3, 1 << 40])),
    st.tuples(st.just("reset")),
)


def _check_invariants(p: Platform, identity: bytes, cap_bytes: bytes) -> None:
    t, core = p.transport, p.transport.core
    status = core.status
    assert status & ~ALL_STATUS == 0
    if status & STATUS_DRIVER_OK:
        assert status & STATUS_FEATURES_OK
    if status & STATUS_FEATURES_OK:
        assert core.driver_features & ~core.offered == 0 and core.driver_features >> VIRTIO_F_VERSION_1 & 1
    for queue in core.queues:
        assert queue.size and queue.size & (queue.size - 1) == 0 and queue.size <= queue.max_size
    size = t._common_get(QUEUE_SIZE_REG)
    assert size == 0 or (size & (size - 1) == 0 and size <= 256)
    for vector in (t.config_vector, *(t.queue_vector(q) for q in range(t.num_queues))):
        assert vector == VIRTIO_MSI_NO_VECTOR or vector < t.msix_vectors
    isr = t.isr
    assert isr & ~(ISR_QUEUE | ISR_CONFIG) == 0
    if t.read_config(0x06, 2) & STATUS_INTERRUPT:
        assert isr, "INTx asserted with nothing in ISR"
    if p.line:
        assert isr and not t.command & COMMAND_INTX_DISABLE
    assert t._common_get(NUM_QUEUES) == 1
    # identity and the capabilities' read-only bytes (PCI_CFG's bar/offset/length/data excepted)
    assert t.config[0x00:0x04] == identity[0x00:0x04] and t.config[0x08:0x0C] == identity[0x08:0x0C]
    assert bytes(t.config[0x2C:0x30]) == identity[0x2C:0x30] and t.config[0x34] == identity[0x34]
    now = bytearray(t.config[0x40:0x100])
    before = bytearray(cap_bytes)
    for i in range(len(now)):
        if t.wmask[0x40 + i]:
            now[i] = before[i] = 0
    assert now == before
    # the VM's ioeventfds are where the BAR is
    assert p.ioeventfds.bound == set(t.notify_regions())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OPS, min_size=1, max_size=80))
def test_a_hostile_guest_never_breaks_the_transport(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    p = Platform()
    try:
        t = p.transport
        assert (t.bar_size, t.msix_table_offset, t.msix_pba_offset) == (_BAR_SIZE, _MSIX_TABLE, _MSIX_PBA)
        identity, cap_bytes = bytes(t.config[:0x40]), bytes(t.config[0x40:0x100])
        bar = t.bar_device(0)
        for op in ops:
            kind = op[0]
            if kind == "bar_read":
                _, offset, width = op
                bar.read(min(offset, _BAR_SIZE - width), memoryview(bytearray(width)))
            elif kind == "bar_write":
                _, offset, width, value = op
                offset = min(offset, _BAR_SIZE - width)
                bar.write(offset, memoryview((value & ((1 << 8 * width) - 1)).to_bytes(width, "little")))
                if offset <= DEVICE_STATUS < offset + width and not (value >> 8 * (DEVICE_STATUS - offset)) & 0xFF:
                    assert t._common_get(DEVICE_STATUS) == 0  # a reset reads back 0 at once
                    assert t.isr == 0 and t.config_vector == VIRTIO_MSI_NO_VECTOR
                    assert not any(q.ready for q in t.core.queues)
            elif kind == "cfg_read":
                _, offset, width = op
                p.root.config_read(0, p.slot, 0, offset, width)
            elif kind == "cfg_write":
                _, offset, width, value = op
                p.root.config_write(0, p.slot, 0, offset, width, value & ((1 << 8 * width) - 1))
            elif kind == "bus_write":
                _, offset, width, value = op
                base = t.bar_address(0)
                if base is not None:
                    offset = min(offset, _BAR_SIZE - width)
                    p.mmio.write(base + offset, memoryview((value & ((1 << 8 * width) - 1)).to_bytes(width, "little")))
            elif kind == "window":  # the PCI_CFG capability, as a driver without the BAR would use it
                _, which, offset, length, write, value = op
                cap = t.pci_cfg_offset
                for reg, size, field in ((cap + 4, 1, which), (cap + 8, 4, offset), (cap + 12, 4, length)):
                    p.root.config_write(0, p.slot, 0, reg, size, field)
                if write:
                    p.root.config_write(0, p.slot, 0, cap + 16, 4, value & 0xFFFF_FFFF)
                else:
                    p.root.config_read(0, p.slot, 0, cap + 16, 4)
            elif kind == "interrupt":
                if op[1] is None:
                    t.core.config_changed()
                else:
                    t._raise(op[1])
            elif kind == "honest":
                if t.bar_address(0) is not None and t.bar_address(0) == Guest(p).bar0:
                    bring_up(Guest(p), msix=op[1])
                    assert t.core.status & STATUS_DRIVER_OK
            elif kind == "move":  # the BAR as Linux sizes and reassigns it, or somewhere it cannot be
                command, where = t.command, op[1]
                writes = {"decode off": [(0x04, 2, command & ~COMMAND_MEMORY)],
                          "decode on": [(0x04, 2, command | COMMAND_MEMORY)],
                          "size": [(0x10, 4, 0xFFFF_FFFF), (0x14, 4, 0xFFFF_FFFF)],
                          "elsewhere": [(0x10, 4, LAYOUT.mmio32_base + 0x40_0000), (0x14, 4, 0)],
                          "64-bit": [(0x10, 4, LAYOUT.mmio64_base & 0xFFFF_FFFF), (0x14, 4, LAYOUT.mmio64_base >> 32)],
                          "clash": [(0x10, 4, LAYOUT.ecam_base), (0x14, 4, 0)]}[where]  # fmt: skip
                for reg, size, value in writes:
                    p.root.config_write(0, p.slot, 0, reg, size, value)
            elif kind == "break":  # a queue the device refuses: DEVICE_NEEDS_RESET
                for field, size, value in ((QUEUE_SELECT, 2, 0), (QUEUE_DESC, 8, op[1]), (QUEUE_ENABLE, 2, 1)):
                    bar.write(field, memoryview(value.to_bytes(size, "little")))
            elif kind == "reset":
                bar.write(DEVICE_STATUS, memoryview(b"\x00"))
                assert t.core.status == 0 and t.isr == 0
            _check_invariants(p, identity, cap_bytes)
        msix = t.msix
        assert msix is not None
        for reached, what in ((t.core.status & STATUS_DRIVER_OK, "DRIVER_OK"),
                              (t.core.status & STATUS_DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET"),
                              (msix.enabled, "MSI-X enabled"), (msix.delivered, "an MSI-X interrupt delivered"),
                              (any(c[0] for c in p.ioeventfds.calls), "the BAR moved or went off the bus"),
                              (any(level for _, level in p.line_calls), "INTx asserted")):  # fmt: skip
            if reached:
                event(what)
    finally:
        p.close()
