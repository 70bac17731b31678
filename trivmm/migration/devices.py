"""The device registry: which of a VM's devices carry state, under which stable id.

A device joins a snapshot through a ``StateProvider`` -- ``save_state() -> bytes`` and
``restore_state(bytes)`` -- under a stable id; its section is ``device/<id>``. Devices whose
state is a frozen attrs class with ``save()``/``restore()`` beside their code (the platform
devices: ``SerialState``, ``I8042State``...) are wrapped by ``AttrsState``, which encodes
the class as JSON (``trivmm.migration.codec``). A virtio device or transport joins by
implementing ``save_state``/``restore_state`` itself; until then ``vm_devices`` lists it in
``refused`` and a snapshot of that VM is refused with the reason, before the guest is
paused. So is any other device on the VM's buses that the registry does not know. A
provider that is also ``Quiescent`` is quiesced before its state is saved.

Ids: ``serial0``, ``i8042``, ``rtc``, ``acpi-pm``, ``pvpanic``, ``pci-root``;
``virtio<N>`` for the Nth virtio device (``VM.virtio_devices``), ``virtio-mmio<N>`` and
``virtio-pci<N>`` for its transport. The order of ``DeviceSet.providers`` is the order
state is applied in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from trivmm.devices.acpi_pm import ACPI_PM_PORT, AcpiPm, AcpiPmState
from trivmm.devices.i8042 import I8042, I8042_DATA_PORT, I8042State
from trivmm.devices.pci.root import PciRootState
from trivmm.devices.pvpanic import PVPANIC_PORT, PvPanic, PvPanicState
from trivmm.devices.rtc import RTC_PORT, CmosRtc, RtcState
from trivmm.devices.serial import SerialState
from trivmm.migration.codec import decode_state, encode_state

if TYPE_CHECKING:
    from trivmm.vm import VM

__all__ = ["StateProvider", "Quiescent", "AttrsState", "DeviceSet", "vm_devices", "DEVICE_PREFIX"]

DEVICE_PREFIX = "device/"


@runtime_checkable
class StateProvider(Protocol):
    """A device's part in a snapshot. ``restore_state`` gets what ``save_state`` returned
    (possibly on another host, from an untrusted stream): it checks it and raises
    ``ValueError`` (or ``MigrationError``) for what it cannot take."""

    def save_state(self) -> bytes: ...

    def restore_state(self, data: bytes) -> None: ...


@runtime_checkable
class Quiescent(Protocol):
    """A provider whose backend works beside the vCPUs (a virtio device): ``quiesce()`` runs
    on the event loop once the vCPUs are paused and before ``save_state`` -- it stops the
    backend with no work in flight, so that saving is a pure read -- and
    ``resume_after_snapshot()`` runs when the snapshot is done or has failed."""

    async def quiesce(self) -> None: ...

    def resume_after_snapshot(self) -> None: ...


@attrs.frozen
class AttrsState:
    """A ``StateProvider`` for a device with ``save() -> S`` and ``restore(S)``, ``S`` a
    frozen attrs class (checked field by field on the way in)."""

    device: Any
    state_type: type
    id: str

    def save_state(self) -> bytes:
        return encode_state(self.device.save())

    def restore_state(self, data: bytes) -> None:
        self.device.restore(decode_state(self.state_type, data, f"{DEVICE_PREFIX}{self.id}"))


@attrs.frozen
class DeviceSet:
    """A VM's stateful devices by stable id, and those that cannot be saved (id -> why)."""

    providers: dict[str, StateProvider]
    refused: dict[str, str]

    def section_names(self) -> list[str]:
        return [DEVICE_PREFIX + name for name in self.providers]


_PLATFORM = (  # (id, port, model, state class) of the devices VM builds on its PIO bus
    ("i8042", I8042_DATA_PORT, I8042, I8042State),
    ("rtc", RTC_PORT, CmosRtc, RtcState),
    ("acpi-pm", ACPI_PM_PORT, AcpiPm, AcpiPmState),
    ("pvpanic", PVPANIC_PORT, PvPanic, PvPanicState),
)


def vm_devices(vm: VM) -> DeviceSet:
    """The registry for ``vm``: its platform devices, PCI root and virtio devices, and
    everything else found on its buses (refused: the registry does not know its state)."""
    providers: dict[str, StateProvider] = {}
    refused: dict[str, str] = {}
    owned: set[int] = set()  # ids of the bus devices accounted for

    providers["serial0"] = AttrsState(vm.serial, SerialState, "serial0")
    owned.add(id(vm.serial))
    for name, port, model, state_type in _PLATFORM:
        hit = vm.pio.find(port)
        if hit is not None and hit.base == port and isinstance(hit.device, model):
            providers[name] = AttrsState(hit.device, state_type, name)
            owned.add(id(hit.device))
    if vm.pci is not None:
        providers["pci-root"] = AttrsState(vm.pci, PciRootState, "pci-root")
        owned.update((id(vm.pci.config_io), id(vm.pci.ecam)))
        for function in vm.pci.functions.values():
            owned.update(id(function.bar_device(bar.index)) for bar in function.declared_bars())
    for index, device in enumerate(vm.virtio_devices):
        _add_virtio(providers, refused, f"virtio{index}", device, f"{device.name} device")
    for index, transport in enumerate(vm.virtio_mmio):
        owned.add(id(transport))
        _add_virtio(providers, refused, f"virtio-mmio{index}", transport, "virtio-mmio transport")
    for index, function in enumerate(vm.virtio_pci):
        _add_virtio(providers, refused, f"virtio-pci{index}", function, "virtio-pci transport")
    # A display's framebuffer travels as a memory slot (snapshot.saved_regions), not here.
    for space in (vm.pio, vm.mmio):
        for bus_range in space.ranges:
            if id(bus_range.device) not in owned:
                name = f"{space.name}:{bus_range.base:#x}"
                refused[name] = f"{type(bus_range.device).__name__} at {name} has no saved state"
    return DeviceSet(providers, refused)


def _add_virtio(providers: dict[str, StateProvider], refused: dict[str, str], name: str, device: object,
                what: str) -> None:  # fmt: skip
    if isinstance(device, StateProvider):
        providers[name] = device
    else:
        refused[name] = f"the {what} cannot be saved yet"
