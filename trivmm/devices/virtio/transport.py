"""``VirtioCore``: what the PCI and MMIO transports share -- feature negotiation, the status
state machine, queue configuration, activation and reset -- over one ``VirtioDevice``.

A transport maps its registers onto these methods (on vCPU threads) and supplies how an
interrupt reaches the driver. The device's backend runs in the VM's event loop: the core's
``service()`` is a VM task (``VM.add_service``) that starts ``device.serve(activation)``
when the driver sets DRIVER_OK and cancels it at reset. Calls from the vCPU thread into the
loop go through a ``LoopCaller``: they never wait for the loop.

The ordering rules of resets and in-flight requests are in ``trivmm.devices.virtio.device``.

Saved state (``CoreState``, part of each transport's section): the status, the feature and
queue selectors, the driver's features, the configuration generation and each queue's
``QueueState``. ``quiesce()`` comes first (the device module's docstring): the backend is
stopped with no chain held, so the state is a pure read and ``save()`` refuses a device
whose backend still runs. ``restore()`` resets the device, checks and takes the state --
every number range-checked, the features (once FEATURES_OK is set) a subset of what this
device offers with VERSION_1, queues through ``SplitQueue.restore`` (size, alignment, rings
inside guest RAM) -- tells the device of the features (``negotiated``: net's tap offloads),
and, for a status with DRIVER_OK and neither FAILED nor DEVICE_NEEDS_RESET, activates the
backend as the driver's DRIVER_OK write does (the same ``Activation`` and LoopCaller path:
before the VM's service runs, it waits for it). A restored status without DRIVER_OK leaves
the device waiting for its driver. Anything wrong is a ``ValueError``, the device left reset.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import anyio
import anyio.abc
import attrs

from trivmm._threads import LoopCaller
from trivmm.devices.virtio.constants import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC
from trivmm.devices.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    Activation,
    VirtioDevice,
)
from trivmm.devices.virtio.queue import QueueState, SplitQueue, VirtqueueError
from trivmm.eventfd import EventFd
from trivmm.memory import GuestMemory

__all__ = ["VirtioCore", "CoreState", "QUEUE_FIELDS"]

_log = logging.getLogger(__name__)
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64_LIMIT = 1 << 64
_STATUS_BITS = 0x01 | 0x02 | 0x04 | 0x08 | STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED
# Queue fields a transport's registers set: the SplitQueue attribute and its 32-bit half.
QUEUE_FIELDS = {
    "desc_lo": ("desc_addr", 0), "desc_hi": ("desc_addr", 32),
    "avail_lo": ("avail_addr", 0), "avail_hi": ("avail_addr", 32),
    "used_lo": ("used_addr", 0), "used_hi": ("used_addr", 32),
}  # fmt: skip


@attrs.frozen
class CoreState:
    """The transport-independent registers of a device, and its queues."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    config_generation: int
    queues: tuple[QueueState, ...]


class _Backend:
    """A running backend: its activation, the scope that cancels it, and when it ended."""

    __slots__ = ("activation", "done", "scope")

    def __init__(self, activation: Activation) -> None:
        self.activation = activation
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()


class VirtioCore:
    """The transport-independent registers of one virtio device (see the module docstring).

    ``interrupt(queue_index)`` delivers a used-buffer notification, ``interrupt(None)`` a
    configuration change; both are the transport's, called from any thread.
    """

    def __init__(self, device: VirtioDevice, memory: GuestMemory, interrupt: Callable[[int | None], None]) -> None:
        self.device = device
        self.memory = memory
        self._interrupt = interrupt
        self.queues = [SplitQueue(memory, max_size=size) for size in device.queue_sizes]
        self.notifiers = [EventFd() for _ in device.queue_sizes]
        self.offered = device.device_features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC \
            | 1 << VIRTIO_F_EVENT_IDX  # fmt: skip
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.status = 0
        self.queue_sel = 0
        self.config_generation = 0
        # The loop side: set by service(); activations that come before it wait here.
        self._caller: LoopCaller | None = None
        self._pending: Activation | None = None
        self._loop_lock = threading.Lock()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._backends: dict[int, _Backend] = {}  # generation -> its backend
        # Snapshots (the loop's thread only): whether quiesce() holds the backend, the
        # activation it stopped, and one whose start came meanwhile.
        self._quiescing = False
        self._quiesced: Activation | None = None
        self._deferred: Activation | None = None
        device.core = self

    # --- registers (vCPU threads) ---------------------------------------------------------
    @property
    def lock(self) -> threading.Lock:
        return self.device.lock

    def device_features_word(self) -> int:
        """The 32 feature bits selected by ``device_features_sel`` (0 beyond bit 63)."""
        sel = self.device_features_sel
        return (self.offered >> (32 * sel)) & _U32 if sel < 2 else 0

    def write_driver_features(self, value: int) -> None:
        with self.lock:
            if self.status & STATUS_FEATURES_OK or self.driver_features_sel > 1:
                return  # fixed once FEATURES_OK is set
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(_U32 << shift)) | (value & _U32) << shift

    def driver_features_word(self) -> int:
        sel = self.driver_features_sel
        return (self.driver_features >> (32 * sel)) & _U32 if sel < 2 else 0

    def write_status(self, value: int) -> None:
        """The driver's status write: 0 resets; FEATURES_OK is taken only for a feature set
        the device offered (with VERSION_1); DRIVER_OK starts the backend."""
        if value & 0xFF == 0:
            self.reset()
            return
        value &= _STATUS_BITS  # reserved bits are not stored
        activation = None
        with self.lock:
            old = self.status
            if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
                features = self.driver_features
                if features & ~self.offered or not features >> VIRTIO_F_VERSION_1 & 1:
                    _log.debug("%s: the driver asked for features %#x of %#x offered: refused",
                               self.device.name, features, self.offered)  # fmt: skip
                    value &= ~STATUS_FEATURES_OK
                else:
                    event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
                    for queue in self.queues:
                        if not queue.ready:
                            queue.event_idx = event_idx
                    self.device.negotiated(features)
            if value & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
                value &= ~STATUS_DRIVER_OK  # DRIVER_OK without FEATURES_OK: not taken
            # A driver never clears a status bit (only a reset does), and NEEDS_RESET is the
            # device's to set: bits the driver drops are kept, so DRIVER_OK cannot be withdrawn
            # from under a running backend.
            self.status = (value & ~STATUS_DEVICE_NEEDS_RESET) | old
            if self.status & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK and not self.status & STATUS_FAILED:
                activation = Activation(self.device, self.device.generation, self.queues, self.notifiers,
                                        self._interrupt, self._broken)  # fmt: skip
        if activation is not None:
            self._activate(activation)

    def reset(self) -> None:
        """Back to power-on. In-flight requests of the old activation are dropped (see
        ``device.py``); the backend is cancelled through the loop."""
        with self.lock:
            generation = self.device.generation
            self.device.generation = generation + 1
            for queue in self.queues:
                queue.reset()
            self.device.reset_state()
            self.status = 0
            self.driver_features = 0
            self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
        for notifier in self.notifiers:
            notifier.take()
        self._call_on_loop(self._cancel_backend, generation)

    @property
    def queue(self) -> SplitQueue | None:
        """The queue ``queue_sel`` selects, or None past the last."""
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def write_queue_size(self, value: int) -> None:
        with self.lock:  # ready is checked under the lock: another vCPU may be enabling it
            queue = self.queue
            if queue is None or queue.ready:
                return
            queue.size = value & 0xFFFF  # checked (power of two, <= max) when enabled

    def write_queue_field(self, field: str, value: int) -> None:
        """One 32-bit half of a ring address (``QUEUE_FIELDS``); ignored while enabled (the
        spec forbids it)."""
        name, shift = QUEUE_FIELDS[field]
        with self.lock:
            queue = self.queue
            if queue is None or queue.ready:
                return
            old = getattr(queue, name)
            setattr(queue, name, (old & ~(_U32 << shift)) | (value & _U32) << shift)

    def read_queue_field(self, field: str) -> int:
        queue = self.queue
        if queue is None:
            return 0
        name, shift = QUEUE_FIELDS[field]
        return (getattr(queue, name) >> shift) & _U32

    def write_queue_ready(self, value: int) -> None:
        """Enable the selected queue (its configuration checked); a bad one breaks the device."""
        with self.lock:
            queue = self.queue
            if queue is None or not value & 1 or queue.ready:
                return  # disabling a queue is not allowed in virtio 1.x: reset the device instead
            try:
                queue.set_ready(True)
            except VirtqueueError as exc:
                self._broken(f"queue {self.queue_sel}: {exc}")

    def notify(self, index: int) -> None:
        """A queue notification that reached the VMM (no ioeventfd took it)."""
        if 0 <= index < len(self.notifiers):
            self.notifiers[index].signal()

    def config_changed(self) -> None:
        """The device changed its configuration space: new generation, and tell the driver."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._interrupt(None)

    def _broken(self, reason: str) -> None:
        """Under the device lock: the guest broke a rule; DEVICE_NEEDS_RESET and a config
        interrupt (if the driver is running), the VM lives on."""
        already = self.status & STATUS_DEVICE_NEEDS_RESET
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if not already:  # once per breakage: a guest repeating it cannot flood the log
            _log.warning("%s: device needs reset: %s", self.device.name, reason)
            self._call_on_loop(self._cancel_backend, self.device.generation)
            if self.status & STATUS_DRIVER_OK:
                self._interrupt(None)

    # --- the loop side -------------------------------------------------------------------------
    async def service(self) -> None:
        """The VM task that runs this device's backend activations (``VM.add_service``)."""
        try:
            async with anyio.create_task_group() as task_group:
                with self._loop_lock:
                    self._caller = LoopCaller.current()
                    self._task_group = task_group
                    pending, self._pending = self._pending, None
                if pending is not None:
                    self._start_backend(pending)
                await anyio.sleep_forever()
        finally:
            with self._loop_lock:
                self._caller = None
                self._task_group = None

    def close(self) -> None:
        for notifier in self.notifiers:
            notifier.close()

    def _activate(self, activation: Activation) -> None:
        with self._loop_lock:
            if self._caller is None:
                self._pending = activation  # the service starts it
                return
            caller = self._caller
        caller.call_soon(self._start_backend, activation)

    def _call_on_loop(self, fn: Callable[..., object], *args: object) -> None:
        with self._loop_lock:
            caller = self._caller
            if caller is None:
                if self._pending is not None and not self._pending.current:
                    self._pending = None
                return
        caller.call_soon(fn, *args)

    def _start_backend(self, activation: Activation) -> None:
        if self._quiescing:  # a DRIVER_OK that reached the loop during a snapshot: after it
            self._deferred = activation
            return
        with self.lock:
            startable = activation.current and not self.status & STATUS_DEVICE_NEEDS_RESET
        if not startable or self._task_group is None or activation.generation in self._backends:
            return
        backend = _Backend(activation)
        self._backends[activation.generation] = backend
        self._task_group.start_soon(self._run_backend, backend)

    async def _run_backend(self, backend: _Backend) -> None:
        activation = backend.activation
        try:
            with backend.scope:
                try:
                    await self.device.serve(activation)
                except Exception as exc:  # a device bug: this device stops, the VM lives on
                    _log.exception("%s: backend failed", self.device.name)
                    activation.broken(f"backend failed: {type(exc).__name__}: {exc}")
        finally:
            if self._backends.get(activation.generation) is backend:
                del self._backends[activation.generation]
            backend.done.set()

    def _cancel_backend(self, generation: int) -> None:
        backend = self._backends.pop(generation, None)
        if backend is not None:
            backend.scope.cancel()

    # --- snapshots (the event loop) --------------------------------------------------------------
    async def quiesce(self) -> None:
        """Stop the backend with no chain held (``trivmm.devices.virtio.device``): after the
        vCPUs are paused, before ``save``. Work under way finishes (blk's batches complete);
        chains taken and not used are given back; the activation stays current. Until
        ``resume_after_snapshot`` no backend starts."""
        if self._quiescing:
            return
        self._quiescing = True
        backend = self._backends.get(self.device.generation)
        if backend is None:
            return  # not running: nothing taken (an activation not started yet waits for resume)
        active = backend.activation
        self._quiesced = active

        async def stop() -> None:
            backend.scope.cancel()
            await backend.done.wait()

        await self.device.quiesce_backend(active, stop)
        with self.lock:
            if active.current and not self.status & STATUS_DEVICE_NEEDS_RESET:
                self.device.return_held(active)
            for held in active.held:
                held.clear()
        for index in range(len(active.queues)):
            active.notify_used(index)  # for chains the stop completed (blk's batches)

    def resume_after_snapshot(self) -> None:
        """The backend takes chains again (the source VM runs on). Only after ``quiesce``."""
        if not self._quiescing:
            return
        self._quiescing = False
        active, self._quiesced = self._quiesced, None
        deferred, self._deferred = self._deferred, None
        if active is not None:
            self.device.resume_backend(active, functools.partial(self._start_backend, active))
        if deferred is not None:
            self._start_backend(deferred)

    @property
    def quiesced(self) -> bool:
        return self._quiescing

    # --- saved state --------------------------------------------------------------------------------
    def save(self) -> CoreState:
        """A pure read; ``RuntimeError`` while the backend runs unquiesced (it may hold chains)."""
        with self.lock:
            if self.device.generation in self._backends and not self._quiescing:
                raise RuntimeError(f"{self.device.name}: saved while its backend runs: quiesce() first")
            return CoreState(self.status, self.device_features_sel, self.driver_features_sel, self.driver_features,
                             self.queue_sel, self.config_generation,
                             tuple(queue.save() for queue in self.queues))  # fmt: skip

    def check(self, state: CoreState) -> None:
        """``ValueError`` for a state this device cannot take (checks without the queues' own)."""
        name = self.device.name
        for field, limit in (("device_features_sel", _U32), ("driver_features_sel", _U32), ("queue_sel", _U32),
                             ("config_generation", 0xFF), ("driver_features", (1 << 64) - 1)):  # fmt: skip
            value = getattr(state, field)
            if not 0 <= value <= limit:
                raise ValueError(f"{name}: saved {field} {value} is not 0..{limit:#x}")
        status = state.status
        if status & ~_STATUS_BITS or not 0 <= status <= 0xFF:
            raise ValueError(f"{name}: saved status {status:#x} has bits no status has")
        if status & STATUS_FEATURES_OK:
            features = state.driver_features
            if features & ~self.offered:
                raise ValueError(f"{name}: the driver's saved features {features:#x} include "
                                 f"{features & ~self.offered:#x}, which this device does not offer "
                                 f"({self.offered:#x})")  # fmt: skip
            if not features >> VIRTIO_F_VERSION_1 & 1:
                raise ValueError(f"{name}: saved features {features:#x} lack VIRTIO_F_VERSION_1")
        elif status & STATUS_DRIVER_OK:
            raise ValueError(f"{name}: saved status {status:#x} has DRIVER_OK without FEATURES_OK")
        if len(state.queues) != len(self.queues):
            raise ValueError(f"{name}: {len(state.queues)} saved queues, not {len(self.queues)}")
        for index, queue in enumerate(state.queues):
            where = f"{name}: saved queue {index}"
            if not 0 <= queue.size <= _U16:
                raise ValueError(f"{where}: size {queue.size} is not 16-bit")
            for field in ("desc_addr", "avail_addr", "used_addr"):
                if not 0 <= getattr(queue, field) < _U64_LIMIT:
                    raise ValueError(f"{where}: {field} {getattr(queue, field):#x} is not a 64-bit address")
            if not queue.ready and (queue.next_avail or queue.next_used or queue.signalled_used):
                raise ValueError(f"{where}: a queue not enabled has indices ({queue.next_avail}, {queue.next_used}, "
                                 f"{queue.signalled_used}): only reset ones")  # fmt: skip

    def restore(self, state: CoreState) -> None:
        """Reset, then take ``state`` (the module docstring); ``ValueError`` and the device
        left reset for anything wrong. On the VM's restore thread, before the vCPUs run."""
        self.reset()
        try:
            self.check(state)
            with self.lock:
                self._restore_locked(state)
        except (ValueError, VirtqueueError) as exc:
            self.reset()
            raise ValueError(str(exc)) from None
        activation = None
        with self.lock:
            status = self.status
            running = bool(status & STATUS_DRIVER_OK and not status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET))
            self.device.restored(running)
            if running:
                activation = Activation(self.device, self.device.generation, self.queues, self.notifiers,
                                        self._interrupt, self._broken)  # fmt: skip
        if activation is not None:
            self._activate(activation)
        self.redeliver()

    def _restore_locked(self, state: CoreState) -> None:
        for index, (queue, queue_state) in enumerate(zip(self.queues, state.queues, strict=True)):
            try:
                queue.restore(queue_state)
            except (ValueError, VirtqueueError) as exc:
                raise ValueError(f"{self.device.name}: saved queue {index}: {exc}") from None
        self.driver_features = state.driver_features
        self.device_features_sel = state.device_features_sel
        self.driver_features_sel = state.driver_features_sel
        self.queue_sel = state.queue_sel
        self.config_generation = state.config_generation
        self.status = state.status
        if state.status & STATUS_FEATURES_OK:
            self.device.negotiated(state.driver_features)

    def redeliver(self) -> None:
        """After a restore: interrupt the driver once per enabled queue of a running device
        (and once for the configuration of one that needs a reset). An interrupt raised just
        before the snapshot may not have reached the saved interrupt controller (KVM injects
        an IOAPIC irqfd from a work queue); a driver takes a spurious one as nothing to do, a
        lost one would leave it waiting for ever."""
        status = self.status
        if not status & STATUS_DRIVER_OK or status & STATUS_FAILED:
            return
        if status & STATUS_DEVICE_NEEDS_RESET:
            self._interrupt(None)
            return
        for index, queue in enumerate(self.queues):
            if queue.ready:
                self._interrupt(index)
