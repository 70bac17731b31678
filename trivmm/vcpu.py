"""The vCPU run loop: one OS thread per vCPU, exits dispatched right there.

A PIO or MMIO exit goes straight from KVM_RUN to the bus and the device's register model,
on this thread, without a round trip through the event loop: that keeps a register access
close to the cost of the exit itself. Everything else the loop meets is rarer and handled
in ``_handle_exit``.

Host quirks are not this loop's business: the CPU template's ``VcpuHooks``
(``trivmm.cpu.hooks``) get the exits a host KVM leaves to the VMM (emulation failures, debug
exits) and a refresh, and say whether they handled them. With no hooks (stock KVM), an
emulation failure stops the VM naming RIP and the instruction's bytes.

Control (pause, resume, stop, hook refresh) is a request flag plus a kick: the requester
sets ``kvm_run.immediate_exit`` and signals the thread, so a vCPU inside KVM_RUN leaves it
with EINTR and one about to enter returns at once; the loop looks at the flag before every
KVM_RUN. Pausing parks the thread on a condition variable until resumed or stopped.
"""

from __future__ import annotations

import enum
import errno
import struct
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

from trivmm._threads import kick_thread
from trivmm.bus import AddressSpace
from trivmm.cpu.hooks import UnhandledInstruction, VcpuHooks, failed_instruction
from trivmm.errors import VcpuError
from trivmm.kvm._ffi import IOCTLS, ffi, ioctl_fixed
from trivmm.kvm.constants import ExitReason, InternalError, SystemEvent
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemory

__all__ = ["VcpuRunner", "StopReason"]

_KVM_RUN = IOCTLS["KVM_RUN"]
_EXIT_IO, _EXIT_MMIO = int(ExitReason.IO), int(ExitReason.MMIO)
# struct kvm_run from offset 8: exit_reason, then (at 32) the io exit's direction, size,
# port, count and data_offset -- one unpack per exit instead of several cffi reads.
_RUN_EXIT_IO = struct.Struct("<I20xBBHIQ")
_RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write at offset 32
_MMIO_DATA_OFFSET = 40
_HOOK_REFRESH_INTERVAL = 0.001  # at exits, while the hooks are unsettled
_HOOK_REFRESH_AT_EXITS_FOR = 0.25  # ...and only this long after the loop starts (the VM's period)


class StopReason(enum.Enum):
    """Why a guest ended: it powered off, reset, halted, or reported a kernel panic; or the
    host stopped it (``VM.stop()``, or leaving ``open_vm``'s block while it ran)."""

    POWER_OFF = "poweroff"
    RESET = "reset"
    HALT = "halt"
    PANIC = "panic"
    STOPPED = "stopped"


class _Request(enum.Enum):
    PAUSE = 1
    STOP = 2


class VcpuRunner:
    """Runs one vCPU on the calling thread until stopped, the guest ends, or an error."""

    def __init__(
        self,
        vcpu: Vcpu,
        memory: GuestMemory,
        pio: AddressSpace,
        mmio: AddressSpace,
        guest_stopped: Callable[[StopReason], None],
        paused_changed: Callable[[int, bool], None],
        hooks: VcpuHooks | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index
        self._memory = memory
        self._pio = pio
        self._mmio = mmio
        self._guest_stopped = guest_stopped
        self._paused_changed = paused_changed
        self.hooks = hooks if hooks is not None else VcpuHooks()
        self._cond = threading.Condition()
        self._parked = False  # in _service_request's pause wait (under _cond)
        self._request: _Request | None = None
        self._refresh = False
        self._throttle = 0.0  # seconds to sleep outside the guest at the next kick (migration)
        # While the hooks are unsettled (e.g. a breakpoint they need is not armed yet),
        # refresh them at an exit too, at most once a millisecond and only on every 64th
        # exit: guest state they follow may change between two periodic refreshes, and a
        # refresh costs ioctls (every exit would double the cost of an exit).
        self._next_hook_refresh = 0.0
        self._ident: int | None = None
        self.exits = 0

    # --- control, from any thread ------------------------------------------------------
    def _kick(self) -> None:
        with self._cond:
            run = self.vcpu.run
            if run is not None:
                run.immediate_exit = 1
            if self._ident is not None:
                kick_thread(self._ident)

    def close_vcpu(self) -> None:
        """Close the vCPU fd and unmap its run page, under the lock a kick takes: a kick
        from another thread never writes to an unmapped page. The thread must be done."""
        with self._cond:
            self.vcpu.close()

    def request_stop(self) -> None:
        with self._cond:
            self._request = _Request.STOP
            self._cond.notify_all()
        self._kick()

    def request_pause(self) -> None:
        with self._cond:
            self._cond.notify_all()  # ends a throttle sleep (_sleep_throttled) at once
            if self._request is None:
                self._request = _Request.PAUSE
                if self._parked:
                    # Resumed, but not yet out of its wait when paused again: it stays parked
                    # and will not say so a second time -- say it for it.
                    self._paused_changed(self.index, True)
        self._kick()

    def request_resume(self) -> None:
        with self._cond:
            if self._request is _Request.PAUSE:
                self._request = None
                self._cond.notify_all()

    def request_refresh(self) -> None:
        """Ask the thread to refresh its host-quirk hooks (``VcpuHooks.refresh``)."""
        self._refresh = True
        self._kick()

    def request_throttle(self, seconds: float) -> None:
        """Have the thread sleep ``seconds`` outside the guest, now: a migration's
        auto-converge (trivmm.migration) slows a guest that dirties memory faster than the
        link carries it. A stop or pause request ends the sleep early."""
        self._throttle = seconds
        self._kick()

    def _sleep_throttled(self) -> None:
        with self._cond:
            deadline = monotonic() + self._throttle
            self._throttle = 0.0
            while self._request is None and (left := deadline - monotonic()) > 0:
                self._cond.wait(left)

    # --- the thread -------------------------------------------------------------------
    def run(self) -> None:
        with self._cond:
            self._ident = threading.get_ident()
        try:
            self._loop()
        except VcpuError:
            raise
        except Exception as exc:  # a device model or a hook failed: the VM's error
            detail = str(exc) if isinstance(exc, (UnhandledInstruction, OSError)) else f"{type(exc).__name__}: {exc}"
            raise VcpuError(self.index, detail) from exc
        finally:
            with self._cond:
                self._ident = None

    def _service_request(self) -> bool:
        """Handle a pending request; True means stop the loop."""
        with self._cond:
            if self._request is _Request.PAUSE:
                self._parked = True
                self._paused_changed(self.index, True)
                while self._request is _Request.PAUSE:
                    self._cond.wait()
                self._parked = False
                self._paused_changed(self.index, False)
            if self._request is _Request.STOP:
                return True
            self.vcpu.run.immediate_exit = 0
        return False

    def _loop(self) -> None:
        vcpu = self.vcpu
        run = vcpu.run
        page = vcpu.run_page
        view = memoryview(page)
        fd = vcpu.fd
        ioctl, null = ioctl_fixed, ffi.NULL
        pio = self._pio
        pio_read, pio_write = pio.read, pio.write
        unpack_exit = _RUN_EXIT_IO.unpack_from
        exits = 0
        # The PIO range this thread hit last, while the bus's table is unchanged: a guest
        # tends to hammer one device, and this skips a lookup and two calls per exit.
        hot_base = hot_end = -1
        hot_device: Any = None
        hot_generation = -1
        # KVM puts PIO data at a fixed offset in the run page: keep one view per access
        # size there rather than slicing a new memoryview on every exit.
        io_offset = -1
        io_views: list[memoryview] = []
        hooks = self.hooks
        # Refreshing at exits is for guests that change what hooks follow right at the
        # start (tiny test guests set LSTAR and make a system call at once). It costs ~0.3 us
        # per exit here (ioctls once a millisecond, the test on every exit), so a vCPU whose
        # hooks stay unsettled longer (a 32-bit guest, or Linux until it sets LSTAR, long
        # before its first system call) is left to the VM's periodic refresh.
        refresh_until = monotonic() + _HOOK_REFRESH_AT_EXITS_FOR
        refresh_at_exits = not hooks.settled
        # Requests are not polled here: every request comes with a kick, which leaves
        # immediate_exit set until the EINTR branch below clears it and then looks. A
        # request made after that look sets immediate_exit again, so the next KVM_RUN
        # returns at once.
        if self._request is not None and self._service_request():
            return
        try:
            while True:
                if ioctl(fd, _KVM_RUN, null) < 0:
                    err = ffi.errno
                    if err != errno.EINTR and err != errno.EAGAIN:
                        raise VcpuError(self.index, f"KVM_RUN failed: {errno.errorcode.get(err, err)}")
                    run.immediate_exit = 0
                    if self._request is not None and self._service_request():
                        return
                    if self._refresh:
                        self._refresh = False
                        hooks.refresh()
                        refresh_at_exits = not hooks.settled and monotonic() < refresh_until
                    if self._throttle:
                        self._sleep_throttled()  # a request made meanwhile kicked: the next KVM_RUN returns
                    continue
                exits += 1
                if refresh_at_exits and exits & 63 == 1 and monotonic() >= self._next_hook_refresh:
                    hooks.refresh()
                    now = monotonic()
                    refresh_at_exits = not hooks.settled and now < refresh_until
                    self._next_hook_refresh = now + _HOOK_REFRESH_INTERVAL
                reason, direction, size, port, count, offset = unpack_exit(page, 8)
                if reason == _EXIT_IO:
                    if count == 1:
                        if offset != io_offset:
                            io_offset = offset
                            io_views = [view[offset : offset + n] for n in range(9)]
                        data = io_views[size]
                        if hot_base <= port and port + size <= hot_end and hot_generation == pio.generation:
                            if direction:
                                hot_device.write(port - hot_base, data)
                            else:
                                hot_device.read(port - hot_base, data)
                            continue
                        if direction:
                            pio_write(port, data)
                        else:
                            pio_read(port, data)
                        hit = pio.find(port)
                        if hit is not None:
                            hot_base, hot_end, hot_device = hit.base, hit.end, hit.device
                            hot_generation = pio.generation
                    else:
                        access = pio_write if direction else pio_read
                        for i in range(count):
                            start = offset + i * size
                            access(port, view[start : start + size])
                    continue
                if reason == _EXIT_MMIO:
                    address, _, length, is_write = _RUN_MMIO.unpack_from(page, 32)
                    data = view[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + min(length, 8)]
                    if is_write:
                        self._mmio.write(address, data)
                    else:
                        self._mmio.read(address, data)
                    continue
                stop = self._handle_exit(reason)
                if stop is not None:
                    self._guest_stopped(stop)
                    return
        finally:
            self.exits += exits
            for held in io_views:
                held.release()
            view.release()

    def _handle_exit(self, reason: int) -> StopReason | None:
        run = self.vcpu.run
        if reason == ExitReason.HLT:
            return StopReason.HALT
        if reason == ExitReason.SHUTDOWN:
            return StopReason.RESET  # triple fault: a PC resets
        if reason == ExitReason.SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == SystemEvent.SHUTDOWN:
                return StopReason.POWER_OFF
            if kind == SystemEvent.RESET:
                return StopReason.RESET
            raise VcpuError(self.index, f"guest crashed (KVM system event {kind})")
        if reason == ExitReason.INTERNAL_ERROR:
            suberror = run.internal.suberror
            if suberror == InternalError.EMULATION:
                if self.hooks.on_emulation_failure(run):
                    return None
                rip, code = failed_instruction(self.vcpu, self._memory, run)
                raise UnhandledInstruction(self.index, rip, code, "no host-quirk hook of this CPU template emulates it")
            data = [hex(run.internal.data[i]) for i in range(min(run.internal.ndata, 16))]
            raise VcpuError(self.index, f"KVM internal error {suberror} (data {', '.join(data)})")
        if reason == ExitReason.DEBUG:
            if self.hooks.on_debug_exit(run):
                return None
            raise VcpuError(self.index, f"unexpected debug exit at {run.debug.arch.pc:#x}")
        if reason == ExitReason.FAIL_ENTRY:
            raise VcpuError(self.index, "KVM could not enter the guest (hardware entry failure "
                                        f"{run.fail_entry.hardware_entry_failure_reason:#x})")  # fmt: skip
        if reason == ExitReason.INTR:
            return None
        try:
            name = ExitReason(reason).name
        except ValueError:
            name = str(reason)
        raise VcpuError(self.index, f"unhandled KVM exit {name} at RIP {self.vcpu.get_regs().rip:#x}")
