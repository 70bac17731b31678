"""``VM``: one guest -- memory, devices, vCPU threads -- run as a structured task, under
trio or asyncio alike (the async code is written on anyio).

    async with trivmm.open_vm(trivmm.VmConfig(kernel="vmlinux", vcpus=2)) as vm:
        line = await vm.console.receive()       # guest output; vm.console.send() types
        result = await vm.wait()                # the guest powered off, reset or panicked

or, owning the task yourself:

    with trivmm.VM(config, console_output=sys.stdout.buffer.write) as vm:
        result = await vm.run()

Building happens in the constructor (synchronous, fails fast on bad input and frees what it
took); ``run()`` owns the vCPU threads and the device tasks and returns a ``VmExit``, or
raises ``VmError``. Cancelling ``run()`` stops every vCPU before it returns; ``close()``
(or leaving the ``with`` block) releases fds and memory, stopping vCPU threads that still
run first: no thread ever runs on unmapped memory or closed fds. ``open_vm`` does all of
it: started on enter, torn down on exit (the guest stopped if it still runs), an error of
the VM raised out of the ``async with`` as a task group would.

Console output never blocks a vCPU: the UART appends to a bounded buffer
(``trivmm.console``) and a task delivers it -- to a stream, or to a callable run on a
worker thread -- or, with no ``console_output``, it waits for ``vm.console.receive()``.
When the VM ends, for whatever reason (a failure or a cancellation included), what is still
buffered is delivered before ``run()`` returns or raises, within ``CONSOLE_FLUSH_TIMEOUT``;
bytes that could not be delivered are counted in ``VmExit.console_dropped``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from trivmm._groups import leaf_exceptions
from trivmm._threads import LoopCaller, ensure_kick_handler, run_in_owned_thread
from trivmm.boot.acpi import SCI_IRQ
from trivmm.boot.layout import VIRTIO_MMIO_BASE, VIRTIO_MMIO_GSIS, VIRTIO_MMIO_SLOT, PciLayout, pci_layout, ram_ranges
from trivmm.boot.loader import BootEntry, check_kernel, load_kernel
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.config import VmConfig
from trivmm.console import (
    CONSOLE_BUFFER_LIMIT,
    ConsoleBuffer,
    ConsoleInput,
    ConsoleOutput,
    ConsoleStream,
    console_delivery,
    console_receiver,
    feed_serial,
)
from trivmm.cpu.quirks import vcpu_hooks
from trivmm.cpu.setup import configure_vcpu, set_entry_state, vcpu_cpuid
from trivmm.cpu.templates import CpuTemplate, get_template
from trivmm.devices.acpi_pm import ACPI_PM_PORT, ACPI_PM_SIZE, AcpiPm
from trivmm.devices.display import Display
from trivmm.devices.i8042 import I8042, I8042_DATA_PORT, KEYBOARD_IRQ, MOUSE_IRQ
from trivmm.devices.pci import GsiRouter, PciRoot
from trivmm.devices.pvpanic import PVPANIC_PORT, PvPanic
from trivmm.devices.rtc import RTC_PORT, CmosRtc
from trivmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from trivmm.devices.virtio.device import VirtioDevice
from trivmm.devices.virtio.mmio import MMIO_SIZE, NOTIFY_OFFSET, VirtioMmio
from trivmm.devices.virtio.net import NetDevice
from trivmm.devices.virtio.pci import NotifyRegion, VirtioPci
from trivmm.devices.virtio.rng import RngDevice
from trivmm.devices.virtio.vsock import VsockDevice
from trivmm.errors import ConfigError, TrivmmError, VmError
from trivmm.eventfd import EventFd
from trivmm.kvm import Kvm, KvmError
from trivmm.kvm.constants import Cap
from trivmm.kvm.vcpu import Vcpu
from trivmm.kvm.vm import Vm
from trivmm.memory import GuestMemory
from trivmm.vcpu import StopReason, VcpuRunner

if TYPE_CHECKING:
    from trivmm.migration import Migration, MigrationInfo, SnapshotInfo, SnapshotSource, SnapshotTarget
    from trivmm.migration.migrate import ProgressCallback

__all__ = ["VM", "VmExit", "open_vm", "ConsoleOutput", "ConsoleInput", "CONSOLE_BUFFER_LIMIT",
           "CONSOLE_FLUSH_TIMEOUT"]  # fmt: skip

CONSOLE_FLUSH_TIMEOUT = 5.0  # seconds the end of a VM waits for its console to take the rest
MAX_PCI_DEVICES = 31  # slots 1..31 of bus 0 (the host bridge is slot 0)
VCPU_STOP_TIMEOUT = 10.0  # seconds close() waits for running vCPU threads to stop
_log = logging.getLogger(__name__)
_QUIRK_REFRESH_FAST = 0.25
_QUIRK_REFRESH_SLOW = 2.0


@attrs.frozen
class VmExit:
    """How a VM ended: the guest powered off, reset, halted or panicked, or the host stopped
    it; with the number of exits its vCPUs took and the console bytes that were dropped."""

    reason: StopReason
    exits: int
    console_dropped: int = 0


class VM:
    """A virtual machine on /dev/kvm. See the module docstring."""

    def __init__(self, config: VmConfig, *, console_output: ConsoleOutput = None, console_input: ConsoleInput = None,
                 kvm_path: str = "/dev/kvm", incoming: bool = False) -> None:  # fmt: skip
        self.config = config
        try:
            self.template: CpuTemplate = get_template(config.cpu_template)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # incoming: the guest's state comes from a snapshot or migration stream
        # (trivmm.migration), which clears this once applied; no kernel is loaded.
        self.incoming = incoming
        kernel = initrd = None
        if not incoming:
            kernel = config.read_kernel()
            check_kernel(kernel)  # bad input is reported as such, before any KVM resource is taken
            initrd = config.read_initrd()
        try:
            self._console_delivery = console_delivery(console_output)
            self._console_receive = console_receiver(console_input)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        self._console_buffer = ConsoleBuffer()
        # Lifecycle: vCPU threads register here before they touch KVM; close() refuses new
        # ones and stops (and waits for) those that run.
        self._lifecycle = threading.Lock()
        self._closed = False
        self._vcpu_threads_done: dict[int, threading.Event] = {}
        self._stop_lock = threading.Lock()
        self._stop_reason: StopReason | None = None
        self._caller: LoopCaller | None = None
        self._paused: set[int] = set()
        self._pause_done: anyio.Event | None = None
        self.snapshotting = False  # VM.snapshot() under way (a migration then refuses to start)
        # run() parks every vCPU before its first instruction (a guest restored from a source
        # that was paused stays paused, as QEMU's destination does): resume() lets it go.
        self.start_paused = False
        self._ran = False
        self._finished: anyio.Event | None = None
        self._outcome: VmExit | BaseException | None = None
        self._services: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.kvm = Kvm.shared(kvm_path)  # the process's /dev/kvm fd: not ours to close
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self.runners: list[VcpuRunner] = []
        self.virtio_mmio: list[VirtioMmio] = []
        self.virtio_pci: list[VirtioPci] = []
        self.pci: PciRoot | None = None  # the PCI host bridge, when a device is on PCI
        self.virtio_devices: list[VirtioDevice] = []  # closed by close(), after their backends
        self.display: Display | None = None  # the framebuffer (config.display): its own KVM slot
        self.i8042: I8042 | None = None  # the keyboard controller: PS/2 keyboard and mouse input
        self._eventfds: list[EventFd] = []  # interrupt eventfds bound as irqfds
        try:
            self._build(kernel, initrd, self._console_buffer)
        except BaseException:
            self.close()
            raise
        self.console = ConsoleStream(None if self._console_delivery else self._console_buffer, self.serial,
                                     self._accepts_input)  # fmt: skip

    # --- construction -------------------------------------------------------------------
    def _build(self, kernel: bytes | None, initrd: bytes | None, sink: Callable[[bytes], None]) -> None:
        config = self.config
        if config.vcpus > self.kvm.max_vcpus:
            raise ConfigError(f"host KVM allows at most {self.kvm.max_vcpus} vCPUs")
        self.vm = vm = self.kvm.create_vm()
        self.memory = memory = GuestMemory.from_ranges(ram_ranges(config.memory))
        for slot, region in enumerate(memory):
            vm.set_user_memory_region(slot, region.guest_base, region.size, region.host_address)
        if config.display is not None:  # a slot of its own, dirty-logged (trivmm.devices.display)
            self.display = Display(*config.display)
            self.display.attach(vm)
        vm.setup_x86_platform()

        self.pio = AddressSpace("pio", PIO_LIMIT)
        self.mmio = AddressSpace("mmio", MMIO_LIMIT)
        self.serial = Serial(sink, functools.partial(self._irq_line, COM1_IRQ))
        self.pio.insert(COM1_PORT, 8, self.serial)
        self.i8042 = I8042(self._reset, functools.partial(self._irq_line, KEYBOARD_IRQ),
                           functools.partial(self._irq_line, MOUSE_IRQ))  # fmt: skip
        self.pio.insert(I8042_DATA_PORT, 5, self.i8042)
        self.pio.insert(RTC_PORT, 2, CmosRtc())
        # The ACPI PM block's SCI (the power button's interrupt) is ISA IRQ 9, level.
        self.acpi_pm = AcpiPm(self._power_off, self._reset, functools.partial(self._irq_line, SCI_IRQ))
        self.pio.insert(ACPI_PM_PORT, ACPI_PM_SIZE, self.acpi_pm)
        self.pio.insert(PVPANIC_PORT, 1, PvPanic(self._panicked))

        devices = self._virtio_devices()
        mmio_devices: tuple[tuple[int, int, int], ...] = ()
        pci: PciLayout | None = None
        if devices and config.transport == "mmio":
            mmio_devices = self._attach_virtio_mmio(devices)
        elif devices:
            pci = self._attach_virtio_pci(devices)
        self.boot: BootEntry | None = None
        if kernel is not None:
            self.boot = load_kernel(memory, kernel, initrd=initrd, cmdline=self.cmdline, vcpus=config.vcpus,
                                    protocol=config.boot_protocol, pci=pci, virtio_mmio=mmio_devices,
                                    screen=self.display.screen_info() if self.display else None)  # fmt: skip
        supported = self.kvm.supported_cpuid()
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            configure_vcpu(vcpu, vcpu_cpuid(supported, self.template, index, config.vcpus))
            if index == 0 and self.boot is not None:
                set_entry_state(vcpu, self.boot)
            self.runners.append(VcpuRunner(vcpu, memory, self.pio, self.mmio, self._guest_stopped,
                                           self._paused_changed, vcpu_hooks(self.template, vcpu, memory)))  # fmt: skip

    def _virtio_devices(self) -> list[VirtioDevice]:
        """The virtio devices the configuration asks for, in a fixed order."""
        from trivmm.devices.virtio.block import BlockDevice
        from trivmm.images import open_image
        from trivmm.net import Tap, parse_mac

        devices = self.virtio_devices
        for disk in self.config.disks:  # first: /dev/vda is the first --disk
            readonly = disk.readonly or _is_vmdk(disk.path, disk.format)  # trivmm reads vmdk, never writes it
            image = open_image(disk.path, format=disk.format, readonly=readonly)  # ImageError names it
            try:
                devices.append(BlockDevice(image, serial=disk.serial, readonly=readonly))
            except BaseException:
                image.close()
                raise
        if self.config.rng:
            devices.append(RngDevice())
        for nic in self.config.net:
            devices.append(NetDevice(Tap.open(nic.tap), parse_mac(nic.mac) if nic.mac else None))
        if self.config.vsock is not None:  # binds and listens on the socket now: a ConfigError if it is taken
            devices.append(VsockDevice(self.config.vsock.cid, self.config.vsock.uds))
        return devices

    def _attach_virtio_mmio(self, devices: list[VirtioDevice]) -> tuple[tuple[int, int, int], ...]:
        """Each device on its virtio-mmio transport: a register slot on the MMIO bus, an
        ioeventfd per queue on QueueNotify (datamatch: the queue index), an irqfd on its own
        GSI, its backend service. Returns (base, size, gsi) of each, for the DSDT."""
        if len(devices) > len(VIRTIO_MMIO_GSIS):
            raise ConfigError(f"at most {len(VIRTIO_MMIO_GSIS)} virtio-mmio devices, not {len(devices)}")
        vm, memory = self.vm, self.memory
        assert vm is not None and memory is not None
        placed = []
        for index, device in enumerate(devices):
            base, gsi = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SLOT, VIRTIO_MMIO_GSIS[index]
            interrupt = EventFd()
            self._eventfds.append(interrupt)
            vm.irqfd(interrupt.fd, gsi)
            transport = VirtioMmio(device, memory, interrupt)
            self.virtio_mmio.append(transport)
            self.mmio.insert(base, MMIO_SIZE, transport)
            for queue, notifier in enumerate(transport.core.notifiers):
                vm.ioeventfd(notifier.fd, base + NOTIFY_OFFSET, 4, datamatch=queue)
            self._services.append(transport.core.service)
            placed.append((base, MMIO_SIZE, gsi))
        return tuple(placed)

    def _attach_virtio_pci(self, devices: list[VirtioDevice]) -> PciLayout:
        """A PCI host bridge (config mechanism #1 and ECAM) with each device on its own slot:
        BAR 0 pre-assigned (the guest may move it: the notify ioeventfds follow), MSI-X
        vectors routed through KVM's GSI table to irqfds, INTx as the fallback."""
        vm, memory = self.vm, self.memory
        assert vm is not None and memory is not None
        layout = pci_layout(self.config.memory)
        self.pci = root = PciRoot(self.pio, self.mmio, layout, self._irq_line)
        router = GsiRouter(vm)
        length = 0 if self.kvm.check_extension(Cap.IOEVENTFD_ANY_LENGTH) > 0 else 2
        if len(devices) > MAX_PCI_DEVICES:
            raise ConfigError(f"at most {MAX_PCI_DEVICES} virtio devices on PCI, not {len(devices)}")
        for device in devices:
            transport = VirtioPci(device, memory, router, ioeventfd_length=length)
            transport.rebind_notify = functools.partial(self._rebind_notify, transport)
            try:
                root.add(transport)
            except BaseException:
                transport.close()  # its MSI-X GSIs, irqfds and eventfds: not on the bus yet
                raise
            self.virtio_pci.append(transport)
            self._services.append(transport.core.service)
        return layout

    def _rebind_notify(self, transport: VirtioPci, unbind: list[NotifyRegion], bind: list[NotifyRegion]) -> None:
        """Move a virtio-pci device's notify ioeventfds with its BAR (a vCPU thread, when the
        guest re-assigns BARs)."""
        vm = self.vm
        if vm is None:
            return
        notifiers = transport.core.notifiers
        failed: list[str] = []
        for deassign, regions in ((True, unbind), (False, bind)):
            for region in regions:  # each on its own: one failure does not strand the others
                try:
                    vm.ioeventfd(notifiers[region.queue].fd, region.address, region.length,
                                 datamatch=region.datamatch, deassign=deassign)  # fmt: skip
                except OSError as exc:
                    failed.append(f"{region.address:#x}: {exc}")
        if failed:  # notifications then reach the transport's register model instead
            raise OSError(f"notify ioeventfds not moved: {'; '.join(failed)}")

    def add_service(self, service: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``service()`` as a task of the VM while its vCPUs run (a device backend
        awaiting its eventfds): started by ``run()``, cancelled when the vCPUs have stopped.
        An exception from it fails the VM."""
        if self._ran:
            raise VmError("services are added before the VM runs")
        self._services.append(service)

    @property
    def cmdline(self) -> str:
        # With a display, kernel messages go to its console too (tty0 first: the serial
        # port, named last, stays /dev/console).
        display = "console=tty0" if self.config.display is not None else ""
        parts = [display, self.config.cmdline_base, *self.template.linux_cmdline, self.config.append]
        return " ".join(p for p in parts if p)

    def _irq_line(self, irq: int, level: bool) -> None:
        # Under the lifecycle lock: a device reached by a host-side task (the console input
        # pump) after close() must not use a closed VM fd. Once closed, levels go nowhere.
        with self._lifecycle:
            if self.vm is not None:
                self.vm.irq_line(irq, level)

    # --- stopping (guest-initiated on vCPU threads; host-initiated by stop()) ----------
    def _guest_stopped(self, reason: StopReason) -> None:
        with self._stop_lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        for runner in self.runners:
            runner.request_stop()

    def _power_off(self) -> None:
        self._guest_stopped(StopReason.POWER_OFF)

    def _reset(self) -> None:
        self._guest_stopped(StopReason.RESET)

    def _panicked(self) -> None:
        self._guest_stopped(StopReason.PANIC)

    def powerdown(self) -> bool:
        """Press the guest's ACPI power button (QEMU's ``system_powerdown``) and return at
        once: whether the guest listens (it enabled the button's event).

        A guest with ACPI and someone listening (Linux's ``button`` driver and systemd-logind
        or acpid) shuts down and powers off; ``wait()`` tells when. A guest without ACPI, or
        one that ignores the button, runs on: follow with ``stop()`` after a grace period --
        at once when this returned False."""
        if self._stop_reason is not None:
            raise VmError("the VM has already stopped; there is no power button to press")
        return self.acpi_pm.press_power_button()

    async def stop(self) -> VmExit:
        """Stop the guest where it is (as pulling the plug) and wait for ``run()`` to end;
        return how it ended (``StopReason.STOPPED``, unless the guest got there first)."""
        self._guest_stopped(StopReason.STOPPED)
        return await self.wait()

    async def wait(self) -> VmExit:
        """Wait for the VM started by ``run()`` (or ``open_vm``) to end; return its
        ``VmExit`` or raise its error."""
        if not self._ran:
            raise VmError("the VM is not running: start it with run() or open_vm()")
        await self._finished_event().wait()
        outcome = self._outcome
        if isinstance(outcome, (TrivmmError, KvmError)):
            raise outcome  # the same error run() raised, as a future's result() does
        if isinstance(outcome, BaseException):
            raise VmError(f"the VM's run() ended with {type(outcome).__name__}") from None
        assert outcome is not None
        return outcome

    def _finished_event(self) -> anyio.Event:
        if self._finished is None:
            self._finished = anyio.Event()
        return self._finished

    # --- running ------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> VmExit:
        """Run until the guest powers off, resets, halts or panics, or ``stop()``; raise
        ``VmError`` on failure. The console's last output is delivered in every case (see
        the module docstring). ``task_group.start(vm.run)`` returns once it runs."""
        if self._ran:
            raise VmError("a VM runs once; build a new VM to boot again")
        if self.vm is None:
            raise VmError("VM is closed")
        if self.incoming:
            raise VmError("the VM waits for its state: restore it with trivmm.migration.restore_vm()")
        ensure_kick_handler()
        self._ran = True
        finished = self._finished_event()
        self._caller = LoopCaller.current()
        if self.start_paused:
            # The threads park as they start, before any ioctl on their vCPU: the guest is
            # paused from here on, not only once each thread has said so. (Otherwise a
            # snapshot, a migration or QMP's status taken meanwhile sees a running guest --
            # and the first two resume it after; QMP's cont does nothing.)
            self._pause_done = anyio.Event()
            for runner in self.runners:
                runner.request_pause()
            self._paused = set(range(len(self.runners)))
            self._pause_done.set()
        task_status.started()
        try:
            result = await self._run_with_console()
        except BaseException as exc:
            self._outcome = exc
            raise
        else:
            self._outcome = result
            return result
        finally:
            finished.set()

    async def _run_with_console(self) -> VmExit:
        # The console task runs in a shielded scope of its own: neither a failing vCPU nor
        # the caller's cancellation cuts it off; it ends when the buffer is closed and empty,
        # or at the flush deadline set once the guest has stopped.
        console_scope = anyio.CancelScope(shield=True)
        try:
            async with anyio.create_task_group() as console:
                if self._console_delivery is not None:
                    console.start_soon(self._deliver_console, self._console_delivery, console_scope)
                try:
                    await self._run_guest()
                finally:
                    self._console_buffer.close()
                    console_scope.deadline = anyio.current_time() + CONSOLE_FLUSH_TIMEOUT
        except BaseExceptionGroup as group:
            raise _collapse(group) from None
        exits = sum(r.exits for r in self.runners)
        if self._stop_reason is None:
            raise VmError("the VM was closed while it was running")
        return VmExit(self._stop_reason, exits, self._console_buffer.dropped)

    async def _deliver_console(self, deliver: Callable[[bytes], Awaitable[None]], scope: anyio.CancelScope) -> None:
        """Console output to the user's sink. A sink that breaks or stalls past the flush
        deadline loses output (counted), never the VM."""
        buffer = self._console_buffer
        with scope:
            try:
                await buffer.drain_to(deliver)
            except Exception as exc:  # a closed pipe, a closed file, a buggy callable
                _log.warning("console output stopped: %s: %s", type(exc).__name__, exc)
                buffer.discard(f"the console sink failed: {exc}", for_good=True)
        if scope.cancelled_caught:
            buffer.discard(f"the console sink took more than {CONSOLE_FLUSH_TIMEOUT} s for the rest")

    async def _run_guest(self) -> None:
        """The vCPU threads and the service tasks, until every vCPU has stopped."""
        async with anyio.create_task_group() as services:
            if self._console_receive is not None:
                services.start_soon(self._pump_console_input, self._console_receive)
            if any(r.hooks.wants_refresh for r in self.runners):
                services.start_soon(self._refresh_quirk_hooks)
            for service in self._services:
                services.start_soon(service)
            async with anyio.create_task_group() as vcpu_tasks:
                for runner in self.runners:
                    name = f"trivmm-vcpu{runner.index}"
                    thread = functools.partial(self._vcpu_thread, runner)
                    vcpu_tasks.start_soon(run_in_owned_thread, thread, runner.request_stop, name)
            services.cancel_scope.cancel()

    def _vcpu_thread(self, runner: VcpuRunner) -> None:
        """A vCPU thread's body: registered with the lifecycle lock, so ``close()`` either
        sees it (and stops it before freeing anything) or it never starts."""
        with self._lifecycle:
            if self._closed:
                raise VmError("the VM was closed before its vCPUs started")
            done = self._vcpu_threads_done[runner.index] = threading.Event()
        try:
            runner.run()
        finally:
            done.set()

    def _accepts_input(self) -> bool:
        """Whether the guest may still read serial input: it runs, or has yet to start."""
        return not self._closed and not (self._finished is not None and self._finished.is_set())

    async def _pump_console_input(self, receive: Callable[[], Awaitable[bytes]]) -> None:
        """Host -> guest serial input. End of input, or a broken input, ends the pump only:
        the guest runs on without a keyboard."""
        while True:
            try:
                data = await receive()
            except Exception as exc:  # a closed or broken stream (anyio's, trio's, an OSError)
                _log.info("console input ended: %s: %s", type(exc).__name__, exc)
                return
            if not data:
                return
            try:
                await feed_serial(self.serial, data, self._accepts_input)
            except anyio.BrokenResourceError:
                return

    async def _refresh_quirk_hooks(self) -> None:
        """Periodically have each vCPU refresh its host-quirk hooks (``VcpuHooks.refresh``):
        often while some are unsettled, rarely after, so that moved guest state is followed."""
        while True:
            for runner in self.runners:
                runner.request_refresh()
            settled = all(r.hooks.settled for r in self.runners)
            await anyio.sleep(_QUIRK_REFRESH_SLOW if settled else _QUIRK_REFRESH_FAST)

    # --- pause and resume -----------------------------------------------------------------
    def _paused_changed(self, index: int, paused: bool) -> None:
        if self._caller is not None:
            self._caller.call_soon(self._note_paused, index, paused)

    def _note_paused(self, index: int, paused: bool) -> None:
        if paused:
            self._paused.add(index)
        else:
            self._paused.discard(index)
        if self._pause_done is not None and len(self._paused) == len(self.runners):
            self._pause_done.set()

    async def pause(self) -> None:
        """Stop every vCPU at an instruction boundary; return once all are parked."""
        if not self._ran or self._finished_event().is_set():
            raise VmError("only a running VM can be paused")
        done = self._pause_done
        if done is None:  # else a pause is under way (or done): wait for that same one
            self._pause_done = done = anyio.Event()
            for runner in self.runners:
                runner.request_pause()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                async def ended() -> None:
                    await self._finished_event().wait()
                    scope.cancel()
                tg.start_soon(ended)
                await done.wait()
                tg.cancel_scope.cancel()
        if not done.is_set():
            raise VmError("the VM ended before it could be paused")

    async def resume(self) -> None:
        """Let paused vCPUs run on (``paused`` is False from here on)."""
        self._pause_done = None
        for runner in self.runners:
            runner.request_resume()
        self._paused.clear()  # their own "running again" notes, still on their way, agree
        await anyio.lowlevel.checkpoint()

    @property
    def paused(self) -> bool:
        return bool(self.runners) and len(self._paused) == len(self.runners)

    # --- snapshot and restore (trivmm.migration) -------------------------------------------
    async def snapshot(self, target: SnapshotTarget, *, resume: bool = True) -> SnapshotInfo:
        """Write the VM's complete state to ``target`` (a path, or an anyio byte stream),
        the vCPUs paused meanwhile; a guest that was running runs on (``resume=False``:
        it stays paused). ``MigrationError`` when it cannot be saved (docs/migration.md)."""
        from trivmm.errors import MigrationError
        from trivmm.migration import snapshot_vm

        # One transfer of the guest's state at a time: two would quiesce, capture and resume
        # the devices under each other.
        if self.snapshotting or ("migration" in self.__dict__ and self.migration.in_progress):
            raise MigrationError("a snapshot or migration of this VM is already in progress")
        self.snapshotting = True
        try:
            return await snapshot_vm(self, target, resume=resume)
        finally:
            self.snapshotting = False

    @classmethod
    async def restore(cls, source: SnapshotSource, config: VmConfig | None = None, *,
                      console_output: ConsoleOutput = None, console_input: ConsoleInput = None,
                      kvm_path: str = "/dev/kvm", verify_memory: bool = False,
                      map_memory: bool = True) -> VM:  # fmt: skip
        """A VM built from a snapshot file or stream, ready to ``run()`` on where the source
        stopped; ``config`` (None: the snapshot's) must match the source's shape. A snapshot
        file's memory is mapped copy-on-write, read as the guest touches it (keep the file
        unchanged while the VM lives: see docs/migration.md); ``verify_memory`` checks its
        checksums first; ``map_memory=False`` copies it into the VM's own memory instead."""
        from trivmm.migration import restore_vm

        return await restore_vm(source, config, console_output=console_output, console_input=console_input,
                                kvm_path=kvm_path, verify_memory=verify_memory, map_memory=map_memory)  # fmt: skip

    # --- migration (trivmm.migration, docs/migration.md) ----------------------------------
    @functools.cached_property
    def migration(self) -> Migration:
        """The VM's migration engine: ``query()``, ``cancel()``, ``parameters``, ``resume()``
        after a migration; the QMP server's ``MigrationControl``."""
        from trivmm.migration import Migration

        return Migration(self)

    async def migrate(self, uri: str, *, cold: bool = False, downtime_ms: int | None = None,
                      max_bandwidth: int | None = None, progress: ProgressCallback | None = None,
                      copy_storage: bool = False) -> MigrationInfo:  # fmt: skip
        """Migrate the running guest to ``uri`` (``tcp:HOST:PORT`` or ``unix:PATH``, where a
        destination waits; ``file:PATH``, a snapshot): hot (pre-copy) unless ``cold``.
        ``copy_storage``: the writable disks' contents go too (the destination's own images).
        Returns the outcome once the destination runs the guest; this VM then stays paused
        ("postmigrate"). ``MigrationError`` if it fails: this VM then runs on as before."""
        return await self.migration.run(uri, cold=cold, downtime_ms=downtime_ms, max_bandwidth=max_bandwidth,
                                        progress=progress, copy_storage=copy_storage)  # fmt: skip

    # --- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Release fds and memory. vCPU threads still running are stopped first; one that
        does not stop within ``VCPU_STOP_TIMEOUT`` makes this raise ``VmError`` and keep
        everything mapped (leaked rather than pulled from under a thread)."""
        with self._lifecycle:
            if self._closed and self.vm is None:
                return
            self._closed = True
            running = [index for index, done in self._vcpu_threads_done.items() if not done.is_set()]
        if running:
            _log.info("closing a running VM: stopping vCPUs %s first", running)
            for runner in self.runners:
                runner.request_stop()
            for index in running:
                if not self._vcpu_threads_done[index].wait(VCPU_STOP_TIMEOUT):
                    raise VmError(f"vCPU {index} did not stop within {VCPU_STOP_TIMEOUT} s; "
                                  "the VM's memory and fds are kept")  # fmt: skip
        for transport in self.virtio_mmio:
            transport.core.close()
        self.virtio_mmio = []
        if self.pci is not None:
            self.pci.close()  # the functions' MSI-X irqfds and eventfds, while the VM fd is open
            self.pci = None
        self.virtio_pci = []
        for eventfd in self._eventfds:
            eventfd.close()
        self._eventfds = []
        for device in self.virtio_devices:
            device.close()
        self.virtio_devices = []
        for runner in self.runners:
            runner.close_vcpu()
        for vcpu in self.vcpus:
            vcpu.close()  # those without a runner (a build that failed half-way)
        self.vcpus = []
        if self.display is not None:
            self.display.close()  # detached before the VM fd closes; a VNC server now sees black
        with self._lifecycle:
            if self.vm is not None:
                self.vm.close()
                self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_vmdk(path: Path, format: str | None) -> bool:
    """Whether the disk at ``path`` is (or probes as) a vmdk image."""
    from trivmm.images.probe import PROBE_BYTES, probe_format

    if format is not None:
        return format == "vmdk"
    try:
        with open(path, "rb") as image:
            return probe_format(image.read(PROBE_BYTES)) == "vmdk"
    except OSError:
        return False  # open_image says what is wrong with it


def _collapse(group: BaseExceptionGroup) -> BaseException:
    """One error for the caller out of a task group's: a cancellation when that is all
    there is; the one error when there is one; else Ctrl-C first, then trivmm's own errors,
    then KVM's; else the group."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves = leaf_exceptions(group)
    errors = [exc for exc in leaves if not isinstance(exc, cancelled)]
    if not errors:
        return leaves[0]
    if len(errors) == 1:
        errors[0].__context__ = group
        return errors[0]
    for kind in (KeyboardInterrupt, TrivmmError, KvmError):
        for exc in errors:
            if isinstance(exc, kind):
                exc.__context__ = group
                return exc
    return group


@contextlib.asynccontextmanager
async def open_vm(config: VmConfig | None = None, *, console_output: ConsoleOutput = None,
                  console_input: ConsoleInput = None, kvm_path: str = "/dev/kvm",
                  restore_from: SnapshotSource | None = None) -> AsyncIterator[VM]:  # fmt: skip
    """A running VM as a structured task: built and started on enter, torn down on exit.

        async with trivmm.open_vm(config) as vm:
            print(await vm.console.receive())
            result = await vm.wait()

    Leaving the block stops a guest that still runs (``StopReason.STOPPED``) and releases
    every thread, fd and byte of guest memory before the ``async with`` ends. A VM that
    fails cancels the block and its error is raised from the ``async with``; cancelling the
    caller's scope tears the VM down the same way. Works under trio and asyncio.

    ``restore_from`` (a snapshot file or stream) runs the guest on from a snapshot instead
    of booting it (``config``: None for the snapshot's own; see ``VM.restore``).
    """
    # Building takes a few KVM ioctls that wait in the host kernel (memory slots, irqchip:
    # milliseconds on a nested host): on a worker thread, so the loop and other VMs go on and
    # many VMs can be built at once. Shielded: a VM built is a VM closed below.
    if restore_from is not None:
        vm = await VM.restore(restore_from, config, console_output=console_output, console_input=console_input,
                              kvm_path=kvm_path)  # fmt: skip
    else:
        build = functools.partial(VM, VmConfig() if config is None else config, console_output=console_output,
                                  console_input=console_input, kvm_path=kvm_path)  # fmt: skip
        with anyio.CancelScope(shield=True):
            vm = await anyio.to_thread.run_sync(build)
    try:
        async with anyio.create_task_group() as task_group:
            await task_group.start(vm.run)
            try:
                yield vm
            finally:
                vm._guest_stopped(StopReason.STOPPED)  # no-op when the guest already ended
    except BaseExceptionGroup as group:
        raise _collapse(group) from None
    finally:
        # Tearing a VM down in the host kernel takes milliseconds (more on a nested host):
        # on a worker thread, so that other VMs and the service's tasks go on meanwhile.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(vm.close)
