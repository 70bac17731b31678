"""``VM``: one guest — memory, devices, vCPU threads — owned by a trio nursery.

    with trivmm.VM(trivmm.VmConfig(kernel="vmlinux", vcpus=2), console_output=sys.stdout.buffer.write) as vm:
        result = await vm.run()        # returns when the guest powers off or resets

Building happens in the constructor (synchronous, fails fast on bad input and frees what it
took); ``run()`` owns the vCPU threads and the device tasks and returns a ``VmExit``, or
raises ``VmError``. Cancelling ``run()`` stops every vCPU before it returns; ``close()``
(or leaving the ``with`` block) releases fds and memory, stopping vCPU threads that still
run first: no thread ever runs on unmapped memory or closed fds.

Console output never blocks a vCPU: the UART appends to a bounded buffer (``_ConsoleBuffer``)
and a task delivers it -- to a trio stream, or to a callable run on a worker thread. When the
VM ends, for whatever reason (a failure or a cancellation included), what is still buffered
is delivered before ``run()`` returns or raises, within ``CONSOLE_FLUSH_TIMEOUT``; bytes that
could not be delivered are counted in ``VmExit.console_dropped``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Awaitable, Callable

import attrs
import trio

from trivmm._threads import ensure_kick_handler, run_in_owned_thread
from trivmm.boot.layout import ram_ranges
from trivmm.boot.loader import BootEntry, check_kernel, load_kernel
from trivmm.bus import MMIO_LIMIT, PIO_LIMIT, AddressSpace
from trivmm.config import VmConfig
from trivmm.cpu.quirks import vcpu_hooks
from trivmm.cpu.setup import configure_vcpu, set_entry_state, vcpu_cpuid
from trivmm.cpu.templates import CpuTemplate, get_template
from trivmm.devices.acpi_pm import ACPI_PM_PORT, ACPI_PM_SIZE, AcpiPm
from trivmm.devices.fifo import DropCounter
from trivmm.devices.i8042 import I8042, I8042_DATA_PORT, KEYBOARD_IRQ
from trivmm.devices.pvpanic import PVPANIC_PORT, PvPanic
from trivmm.devices.rtc import RTC_PORT, CmosRtc
from trivmm.devices.serial import COM1_IRQ, COM1_PORT, Serial
from trivmm.errors import ConfigError, TrivmmError, VmError
from trivmm.kvm import Kvm, KvmError
from trivmm.kvm.vcpu import Vcpu
from trivmm.kvm.vm import Vm
from trivmm.memory import GuestMemory
from trivmm.vcpu import StopReason, VcpuRunner

__all__ = ["VM", "VmExit", "ConsoleOutput", "CONSOLE_BUFFER_LIMIT", "CONSOLE_FLUSH_TIMEOUT"]

ConsoleOutput = Callable[[bytes], None] | trio.abc.SendStream | None
CONSOLE_BUFFER_LIMIT = 1 << 20  # bytes of console output held while the sink lags
CONSOLE_FLUSH_TIMEOUT = 5.0  # seconds the end of a VM waits for its console to take the rest
VCPU_STOP_TIMEOUT = 10.0  # seconds close() waits for running vCPU threads to stop
_log = logging.getLogger(__name__)
_QUIRK_REFRESH_FAST = 0.25
_QUIRK_REFRESH_SLOW = 2.0


@attrs.frozen
class VmExit:
    """How a VM ended: the guest powered off, reset, halted or panicked; with the number of
    exits its vCPUs took and the console bytes that could not be delivered."""

    reason: StopReason
    exits: int
    console_dropped: int = 0


class _ConsoleBuffer:
    """Guest console output on its way from the vCPU threads to a delivering task.

    Appending never blocks (the UART calls it on a vCPU thread, under its lock). The buffer
    holds at most ``limit`` bytes: past that the *oldest* bytes are dropped and counted, so
    the most recent output -- the panic message a user needs -- is what survives a stalled
    sink. The delivering task wakes through the trio token when the buffer turns non-empty.
    """

    def __init__(self, limit: int = CONSOLE_BUFFER_LIMIT) -> None:
        self._lock = threading.Lock()
        self._data = bytearray()
        self._limit = limit
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = trio.Event()
        self._closing = False
        self._sink_failed = False
        self._drops = DropCounter(_log, "console output")

    @property
    def dropped(self) -> int:
        """Bytes of guest output dropped so far."""
        return self._drops.dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __call__(self, data: bytes) -> None:
        with self._lock:
            if self._sink_failed:
                self._drops.add(len(data), "the console sink failed")
                return
            was_empty = not self._data
            self._data += data
            excess = len(self._data) - self._limit
            if excess > 0:
                del self._data[:excess]
                self._drops.add(excess, "the console sink is not keeping up")
            token = self._token if was_empty else None
        if token is not None:
            token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._ready.set()

    def close(self) -> None:
        """No more output is coming: ``drain_to`` returns once the buffer is empty."""
        self._closing = True
        self._ready.set()

    def discard(self, reason: str, *, for_good: bool = False) -> None:
        """Drop (and count) what is buffered: the sink is out of time, or -- ``for_good``
        -- gone, and what comes later is dropped too."""
        with self._lock:
            self._drops.add(len(self._data), reason)
            self._data.clear()
            self._sink_failed = self._sink_failed or for_good

    async def drain_to(self, deliver: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand buffered output to ``deliver`` until ``close()`` and empty."""
        self._token = trio.lowlevel.current_trio_token()
        while True:
            with self._lock:
                chunk = bytes(self._data)
                self._data.clear()
                if not chunk and not self._closing:
                    self._ready = trio.Event()
            if chunk:
                await deliver(chunk)
            elif self._closing:
                return
            else:
                await self._ready.wait()


def _console_delivery(output: ConsoleOutput) -> Callable[[bytes], Awaitable[None]] | None:
    """How the console task hands output to the user's sink: a stream's ``send_all``, or
    the callable on a worker thread (so a blocking write stalls that thread, never a vCPU
    or the event loop)."""
    if output is None:
        return None
    if isinstance(output, trio.abc.SendStream):
        return output.send_all
    write = output

    async def deliver(chunk: bytes) -> None:
        await trio.to_thread.run_sync(write, chunk, abandon_on_cancel=True)

    return deliver


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
        if console_output is not None and not (callable(console_output)
                                               or isinstance(console_output, trio.abc.SendStream)):  # fmt: skip
            raise ConfigError("console_output must be a callable taking bytes or a trio SendStream")
        self._console_delivery = _console_delivery(console_output)
        self._console_buffer = _ConsoleBuffer()
        sink: Callable[[bytes], None] = self._console_buffer if self._console_delivery else _discard
        self._console_input = console_input
        # Lifecycle: vCPU threads register here before they touch KVM; close() refuses new
        # ones and stops (and waits for) those that run.
        self._lifecycle = threading.Lock()
        self._closed = False
        self._vcpu_threads_done: dict[int, threading.Event] = {}
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
        self.pio.insert(PVPANIC_PORT, 1, PvPanic(self._panicked))

        self.boot: BootEntry = load_kernel(memory, kernel, initrd=initrd, cmdline=self.cmdline,
                                           vcpus=config.vcpus, protocol=config.boot_protocol)  # fmt: skip
        supported = self.kvm.supported_cpuid()
        for index in range(config.vcpus):
            vcpu = vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            configure_vcpu(vcpu, vcpu_cpuid(supported, self.template, index, config.vcpus))
            if index == 0:
                set_entry_state(vcpu, self.boot)
            self.runners.append(VcpuRunner(vcpu, memory, self.pio, self.mmio, self._guest_stopped,
                                           self._paused_changed, vcpu_hooks(self.template, vcpu, memory)))  # fmt: skip

    @property
    def cmdline(self) -> str:
        parts = [self.config.cmdline_base, *self.template.linux_cmdline, self.config.append]
        return " ".join(p for p in parts if p)

    def _irq_line(self, irq: int, level: bool) -> None:
        # Under the lifecycle lock: a device reached by a host-side task (the console input
        # pump) after close() must not use a closed VM fd. Once closed, levels go nowhere.
        with self._lifecycle:
            if self.vm is not None:
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

    def _panicked(self) -> None:
        self._guest_stopped(StopReason.PANIC)

    # --- running ------------------------------------------------------------------------
    async def run(self) -> VmExit:
        """Run until the guest powers off, resets, halts or panics; raise ``VmError`` on
        failure. The console's last output is delivered in every case (see the module
        docstring)."""
        if self._ran:
            raise VmError("a VM runs once; build a new VM to boot again")
        if self.vm is None:
            raise VmError("VM is closed")
        ensure_kick_handler()
        self._ran = True
        self._token = trio.lowlevel.current_trio_token()
        # The console task runs in a shielded scope of its own: neither a failing vCPU nor
        # the caller's cancellation cuts it off; it ends when the buffer is closed and empty,
        # or at the flush deadline set once the guest has stopped.
        console_scope = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as console:
                if self._console_delivery is not None:
                    console.start_soon(self._deliver_console, self._console_delivery, console_scope)
                try:
                    await self._run_guest()
                finally:
                    self._console_buffer.close()
                    console_scope.deadline = trio.current_time() + CONSOLE_FLUSH_TIMEOUT
        except BaseExceptionGroup as group:
            raise _collapse(group) from None
        exits = sum(r.exits for r in self.runners)
        if self._stop_reason is None:
            raise VmError("the VM was closed while it was running")
        return VmExit(self._stop_reason, exits, self._console_buffer.dropped)

    async def _deliver_console(self, deliver: Callable[[bytes], Awaitable[None]], scope: trio.CancelScope) -> None:
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
        async with trio.open_nursery() as services:
            if self._console_input is not None:
                services.start_soon(self._pump_console_input, self._console_input)
            if any(r.hooks.wants_refresh for r in self.runners):
                services.start_soon(self._refresh_quirk_hooks)
            async with trio.open_nursery() as vcpu_tasks:
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
        """Periodically have each vCPU refresh its host-quirk hooks (``VcpuHooks.refresh``):
        often while some are unsettled, rarely after, so that moved guest state is followed."""
        while True:
            for runner in self.runners:
                runner.request_refresh()
            settled = all(r.hooks.settled for r in self.runners)
            await trio.sleep(_QUIRK_REFRESH_SLOW if settled else _QUIRK_REFRESH_FAST)

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
        for runner in self.runners:
            runner.close_vcpu()
        for vcpu in self.vcpus:
            vcpu.close()  # those without a runner (a build that failed half-way)
        self.vcpus = []
        with self._lifecycle:
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


def _discard(data: bytes) -> None:
    """A console sink for a VM nobody listens to."""


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
