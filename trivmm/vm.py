"""``VM``: one guest — memory, devices, vCPU threads — owned by a trio nursery.

    with trivmm.VM(trivmm.VmConfig(kernel="vmlinux", vcpus=2), console_output=sys.stdout.buffer.write) as vm:
        result = await vm.run()        # returns when the guest powers off or resets

Building happens in the constructor (synchronous, fails fast on bad input and frees what it
took); ``run()`` owns the vCPU threads and the device tasks and returns a ``VmExit``, or
raises ``VmError``. Cancelling ``run()`` stops every vCPU before it returns; ``close()``
(or leaving the ``with`` block) releases fds and memory.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import attrs
import trio

from trivmm._threads import ensure_kick_handler, run_in_owned_thread
from trivmm.boot.layout import ram_ranges
from trivmm.boot.loader import BootEntry, check_kernel, load_kernel
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.config import VmConfig
from trivmm.cpu.setup import configure_vcpu, set_entry_state, vcpu_cpuid
from trivmm.cpu.templates import CpuTemplate, get_template
from trivmm.devices.acpi_pm import ACPI_PM_PORT, ACPI_PM_SIZE, AcpiPm
from trivmm.devices.i8042 import I8042, I8042_DATA_PORT, KEYBOARD_IRQ
from trivmm.devices.rtc import RTC_PORT, CmosRtc
from trivmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from trivmm.errors import ConfigError, TrivmmError, VmError
from trivmm.kvm import Kvm, KvmError
from trivmm.kvm.vcpu import Vcpu
from trivmm.kvm.vm import Vm
from trivmm.memory import GuestMemory
from trivmm.vcpu import Quirks, StopReason, VcpuRunner

__all__ = ["VM", "VmExit", "ConsoleOutput"]

ConsoleOutput = Callable[[bytes], None] | trio.abc.SendStream | None
_QUIRK_REFRESH_FAST = 0.25
_QUIRK_REFRESH_SLOW = 2.0


@attrs.frozen
class VmExit:
    """How a VM ended: the guest powered off, reset or halted; with exit counts."""

    reason: StopReason
    exits: int


class _ConsoleBuffer:
    """A serial sink for a trio stream: the vCPU thread appends, a task drains."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self._lock = threading.Lock()
        self._data = bytearray()
        self._limit = limit
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = trio.Event()
        self._closing = False
        self.dropped = 0

    def __call__(self, data: bytes) -> None:
        with self._lock:
            was_empty = not self._data
            room = self._limit - len(self._data)
            self._data += data[:room]
            self.dropped += max(0, len(data) - room)
        if was_empty and self._token is not None:
            self._token.run_sync_soon(self._ready.set)

    def close(self) -> None:
        """No more output is coming: ``drain_to`` returns once the buffer is empty."""
        self._closing = True
        self._ready.set()

    async def drain_to(self, stream: trio.abc.SendStream) -> None:
        self._token = trio.lowlevel.current_trio_token()
        while True:
            with self._lock:
                chunk = bytes(self._data)
                self._data.clear()
                if not chunk and not self._closing:
                    self._ready = trio.Event()
            if chunk:
                await stream.send_all(chunk)
            elif self._closing:
                return
            else:
                await self._ready.wait()


class VM:
    """A virtual machine on /dev/kvm. See the module docstring."""

    def __init__(self, config: VmConfig, *, console_output: ConsoleOutput = None,
                 console_input: trio.abc.ReceiveStream | None = None,
                 kvm_path: str = "/dev/kvm") -> None:  # fmt: skip
        self.config = config
        try:
            self.template: CpuTemplate = get_template(config.cpu_template)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        kernel = config.read_kernel()
        check_kernel(kernel)  # bad input is reported as such, before any KVM resource is taken
        initrd = config.read_initrd()
        self._console_stream: trio.abc.SendStream | None = None
        if console_output is None:
            sink: Callable[[bytes], None] = lambda data: None  # noqa: E731
        elif callable(console_output):
            sink = console_output
        else:
            self._console_stream = console_output
            sink = self._console_buffer = _ConsoleBuffer()
        self._console_input = console_input
        self._stop_lock = threading.Lock()
        self._stop_reason: StopReason | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._paused: set[int] = set()
        self._pause_done: trio.Event | None = None
        self._ran = False
        self.kvm = Kvm(kvm_path)
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self.runners: list[VcpuRunner] = []
        try:
            self._build(kernel, initrd, sink)
        except BaseException:
            self.close()
            raise

    # --- construction -------------------------------------------------------------------
    def _build(self, kernel: bytes, initrd: bytes | None, sink: Callable[[bytes], None]) -> None:
        config = self.config
        if config.vcpus > self.kvm.max_vcpus:
            raise ConfigError(f"host KVM allows at most {self.kvm.max_vcpus} vCPUs")
        self.vm = vm = self.kvm.create_vm()
        self.memory = memory = GuestMemory.from_ranges(ram_ranges(config.memory))
        for slot, region in enumerate(memory):
            vm.set_user_memory_region(slot, region.guest_base, region.size, region.host_address)
        vm.setup_x86_platform()

        self.pio = AddressSpace("pio", PIO_LIMIT)
        self.mmio = AddressSpace("mmio", MMIO_LIMIT)
        self.serial = Serial(sink, functools.partial(self._irq_line, COM1_IRQ))
        self.pio.insert(COM1_PORT, 8, self.serial)
        self.pio.insert(I8042_DATA_PORT, 5, I8042(self._reset, functools.partial(self._irq_line, KEYBOARD_IRQ)))
        self.pio.insert(RTC_PORT, 2, CmosRtc())
        self.pio.insert(ACPI_PM_PORT, ACPI_PM_SIZE, AcpiPm(self._power_off, self._reset))

        self.boot: BootEntry = load_kernel(memory, kernel, initrd=initrd, cmdline=self.cmdline,
                                           vcpus=config.vcpus, protocol=config.boot_protocol)  # fmt: skip
        supported = self.kvm.supported_cpuid()
        quirks = Quirks(emulation_fallback=True, complete_syscalls=self.template.complete_syscalls)
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            configure_vcpu(vcpu, vcpu_cpuid(supported, self.template, index, config.vcpus))
            if index == 0:
                set_entry_state(vcpu, self.boot)
            self.runners.append(VcpuRunner(vcpu, memory, self.pio, self.mmio, self._guest_stopped,
                                           self._paused_changed, quirks))  # fmt: skip

    @property
    def cmdline(self) -> str:
        parts = [self.config.cmdline_base, *self.template.linux_cmdline, self.config.append]
        return " ".join(p for p in parts if p)

    def _irq_line(self, irq: int, level: bool) -> None:
        assert self.vm is not None
        self.vm.irq_line(irq, level)

    # --- guest-initiated stop (vCPU threads) ---------------------------------------------
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

    # --- running ------------------------------------------------------------------------
    async def run(self) -> VmExit:
        """Run until the guest powers off, resets or halts; raise ``VmError`` on failure."""
        if self._ran:
            raise VmError("a VM runs once; build a new VM to boot again")
        if self.vm is None:
            raise VmError("VM is closed")
        self._ran = True
        ensure_kick_handler()
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as console:
                if self._console_stream is not None:
                    console.start_soon(self._console_buffer.drain_to, self._console_stream)
                async with trio.open_nursery() as services:
                    if self._console_input is not None:
                        services.start_soon(self._pump_console_input, self._console_input)
                    if any(r.syscalls is not None for r in self.runners):
                        services.start_soon(self._refresh_quirk_hooks)
                    async with trio.open_nursery() as vcpu_tasks:
                        for runner in self.runners:
                            name = f"trivmm-vcpu{runner.index}"
                            vcpu_tasks.start_soon(run_in_owned_thread, runner.run, runner.request_stop, name)
                    services.cancel_scope.cancel()
                if self._console_stream is not None:
                    self._console_buffer.close()  # the drain task sends what is left, then ends
        except BaseExceptionGroup as group:
            raise _collapse(group) from None
        assert self._stop_reason is not None
        return VmExit(self._stop_reason, sum(r.exits for r in self.runners))

    async def _pump_console_input(self, stream: trio.abc.ReceiveStream) -> None:
        """Host -> guest serial input. End of input, or a broken input, ends the pump only:
        the guest runs on without a keyboard."""
        while True:
            try:
                data = await stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            while data:
                taken = self.serial.enqueue_input(data)
                data = data[taken:]
                if data:
                    await trio.sleep(0.005)  # the guest drains its FIFO on interrupts

    async def _refresh_quirk_hooks(self) -> None:
        """Periodically let vCPUs (re)arm the SYSCALL breakpoint (see trivmm.cpu.fallback)."""
        while True:
            for runner in self.runners:
                runner.request_refresh()
            armed = all(r.syscalls is None or r.syscalls.armed_at is not None for r in self.runners)
            await trio.sleep(_QUIRK_REFRESH_SLOW if armed else _QUIRK_REFRESH_FAST)

    # --- pause and resume -----------------------------------------------------------------
    def _paused_changed(self, index: int, paused: bool) -> None:
        if self._token is not None:
            self._token.run_sync_soon(self._note_paused, index, paused)

    def _note_paused(self, index: int, paused: bool) -> None:
        if paused:
            self._paused.add(index)
        else:
            self._paused.discard(index)
        if self._pause_done is not None and len(self._paused) == len(self.runners):
            self._pause_done.set()

    async def pause(self) -> None:
        """Stop every vCPU at an instruction boundary; return once all are parked."""
        self._pause_done = trio.Event()
        for runner in self.runners:
            runner.request_pause()
        await self._pause_done.wait()

    async def resume(self) -> None:
        self._pause_done = None
        for runner in self.runners:
            runner.request_resume()

    @property
    def paused(self) -> bool:
        return len(self._paused) == len(self.runners)

    # --- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.kvm.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _collapse(group: BaseExceptionGroup) -> BaseException:
    """One error for the caller: Ctrl-C first, then trivmm's own errors, then KVM's."""
    leaves = _leaves(group)
    for kind in (KeyboardInterrupt, TrivmmError, KvmError):
        for exc in leaves:
            if isinstance(exc, kind):
                exc.__context__ = group
                return exc
    return group
