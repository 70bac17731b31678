"""The virtio device model, independent of its transport (PCI or MMIO).

A ``VirtioDevice`` says what it is (device id, feature bits, queue sizes, its config space)
and serves its queues in ``serve(active)``: an async backend that runs, as a task of the VM,
from the moment the driver sets DRIVER_OK until the device is reset. The transport
(``trivmm.devices.virtio.transport``) owns the registers the driver programs on vCPU
threads, the queues, the notification eventfds and the interrupts.

Resets and in-flight work -- the subtle part. A driver resets a device by writing 0 to its
status, on a vCPU thread, and may reuse its buffers as soon as it reads 0 back. A backend's
request may be half-way through a disk read on a worker thread at that moment. So:

* every queue access (``pop``, ``add_used``) and every write into guest buffers happens
  under the device's ``lock`` and only while ``active.current`` (the activation's generation
  is still the device's): a reset bumps the generation under the same lock before it
  clears the queues, so whatever a stale request finishes afterwards is dropped, not
  written into memory the driver has taken back;
* the backend's task is cancelled (through the event loop) after the reset; it does not
  need to be gone for the reset to complete.

A guest that breaks a queue's rules (``VirtqueueError``) gets DEVICE_NEEDS_RESET and a
configuration-change interrupt, with the reason logged; the VM runs on.

Snapshots: in-flight work again. With the vCPUs paused, a backend may still hold chains
(a blk batch on a worker thread, rx buffers taken and not yet filled). ``quiesce()``
(``VirtioCore.quiesce``) stops the backend at its awaits -- by default by cancelling it,
without a reset: the activation stays current -- after letting work under way finish
(blk's batches complete: statuses written, chains used), then gives back what it took and
did not use: each queue is rewound (``SplitQueue.unpop``) by the chains its workers keep in
``active.held[index]``. A backend keeps there, at each of its awaits, every chain it took
and has not used, in the order they were popped (they are the last ones popped). Then no
chain is held by the VMM and ``save_state`` is a pure read; ``resume_after_snapshot()``
starts the backend again with the same activation, and it takes the rewound chains anew.
The device-level section (``save_state``) holds what the device shows the driver beyond
the transport: its type and configuration space (checked, or taken, on restore).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import anyio
import anyio.lowlevel
import attrs

from trivmm.devices.virtio.queue import DescriptorChain, SplitQueue, VirtqueueError

if TYPE_CHECKING:
    from trivmm.devices.virtio.transport import VirtioCore
    from trivmm.eventfd import EventFd

__all__ = ["VirtioDevice", "Activation", "DeviceType", "DeviceState", "VIRTIO_F_VERSION_1", "STATUS_ACKNOWLEDGE",
           "STATUS_DRIVER", "STATUS_DRIVER_OK", "STATUS_FEATURES_OK", "STATUS_DEVICE_NEEDS_RESET",
           "STATUS_FAILED", "pack_state", "unpack_state"]  # fmt: skip

_log = logging.getLogger(__name__)

VIRTIO_F_VERSION_1 = 32  # modern device: little-endian, no legacy interface
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128


S = TypeVar("S")


def pack_state(state: Any) -> bytes:
    """A frozen attrs state object as a state section's bytes (``trivmm.migration.codec``)."""
    from trivmm.migration.codec import encode_state

    return encode_state(state)


def unpack_state(cls: type[S], data: bytes, what: str) -> S:
    """``cls`` from a state section's untrusted bytes, every field's type checked; anything
    else is a ``ValueError`` naming ``what`` (never another exception)."""
    from trivmm.errors import MigrationError
    from trivmm.migration.codec import decode_state

    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{what}: a state section is bytes, not {type(data).__name__}")
    try:
        return decode_state(cls, bytes(data), what)
    except MigrationError as exc:
        raise ValueError(str(exc)) from None


@attrs.frozen
class DeviceState:
    """What a device shows its driver beyond the transport: its type and configuration space."""

    device_type: int
    config: bytes


class DeviceType:
    """virtio device ids (spec section 5)."""

    NET = 1
    BLOCK = 2
    ENTROPY = 4
    VSOCK = 19


class Activation:
    """What a backend gets while the driver has the device running: the queues, a way to
    wait for the driver's notifications, and a way to interrupt the driver."""

    def __init__(self, device: VirtioDevice, generation: int, queues: list[SplitQueue],
                 notifiers: list[EventFd], interrupt: Callable[[int], None],
                 broken: Callable[[str], None]) -> None:  # fmt: skip
        self.device = device
        self.generation = generation
        self.queues = queues
        # Per queue: the chains the backend took and has not used, in pop order (the last
        # ones popped), kept here at each of its awaits so that a quiesce can give them back.
        self.held: list[deque[DescriptorChain]] = [deque() for _ in queues]
        self._notifiers = notifiers
        self._interrupt = interrupt
        self._broken = broken

    @property
    def current(self) -> bool:
        """Whether the device has not been reset since this activation (read under lock)."""
        return self.device.generation == self.generation

    async def wait_notified(self, index: int) -> None:
        """Wait for the driver to notify queue ``index`` (an ioeventfd, or the transport's
        own signal when the write reached the VMM)."""
        await self._notifiers[index].wait()

    def interrupt(self, index: int) -> None:
        """Send the used-buffer notification of queue ``index``."""
        self._interrupt(index)

    def take_chains(self, index: int, limit: int = 64) -> list[DescriptorChain]:
        """Up to ``limit`` available chains of queue ``index`` (under the device lock); an
        empty list when there are none, the device was reset, or the guest broke the queue."""
        chains: list[DescriptorChain] = []
        with self.device.lock:
            if not self.current:
                return chains
            queue = self.queues[index]
            try:
                while len(chains) < limit and (chain := queue.pop()) is not None:
                    chains.append(chain)
            except VirtqueueError as exc:
                self._broken(f"queue {index}: {exc}")
        return chains

    def complete(self, index: int, chain: DescriptorChain, data: bytes | None = None, *,
                 written: int | None = None, status: bytes = b"") -> bool:  # fmt: skip
        """Finish ``chain``: write ``data`` then ``status`` into its device-writable buffers,
        return it to the driver, and interrupt if the driver wants it. Does nothing (and
        returns False) when the device was reset since the chain was taken."""
        with self.device.lock:
            if not self.current:
                return False
            queue = self.queues[index]
            try:
                done = 0
                if data:
                    done = chain.write(data)
                if status:
                    done += chain.write(status, done if written is None else written)
                queue.add_used(chain.head, done if written is None else written + len(status))
                notify = queue.needs_notification()
            except VirtqueueError as exc:
                self._broken(f"queue {index}: {exc}")
                return False
        if notify:
            self.interrupt(index)
        return True

    def notify_used(self, index: int) -> None:
        """Interrupt the driver if it wants to hear of the chains of queue ``index`` used
        since the last check (event-idx or NO_INTERRUPT); nothing after a reset. A backend
        calls it once per batch and before it waits."""
        with self.device.lock:
            if not self.current:
                return
            try:
                notify = self.queues[index].needs_notification()
            except VirtqueueError as exc:
                reason = str(exc)
            else:
                reason = ""
        if reason:
            self.broken(f"queue {index}: {reason}")
        elif notify:
            self.interrupt(index)

    def broken(self, reason: str) -> None:
        """The guest broke the device's rules: DEVICE_NEEDS_RESET, with ``reason`` logged."""
        with self.device.lock:
            if self.current:
                self._broken(reason)


class VirtioDevice:
    """Base of the device models. Subclasses set ``device_type``, ``queue_sizes``,
    ``device_features`` and ``config``, and implement ``serve``."""

    device_type: int = 0
    queue_sizes: tuple[int, ...] = ()
    device_features: int = 0  # device-specific bits; the transport adds VERSION_1 and the ring features
    name = "virtio"
    state_type: ClassVar[type[DeviceState]] = DeviceState

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0  # bumped by every reset, under ``lock``
        self.config = bytearray()  # the device-specific configuration space
        self.core: VirtioCore | None = None  # the transport's core, set by it (quiesce goes through it)

    # --- configuration space (vCPU threads) ------------------------------------------------
    def read_config(self, offset: int, data: memoryview) -> None:
        """Bytes of the configuration space; beyond its end, zeros."""
        chunk = self.config[offset : offset + len(data)] if offset >= 0 else b""
        data[: len(chunk)] = chunk
        data[len(chunk) :] = bytes(len(data) - len(chunk))

    def write_config(self, offset: int, data: memoryview) -> None:
        """The driver writes configuration space: ignored unless a device allows it."""
        _log.debug("%s: ignored a %d-byte config write at %#x", self.name, len(data), offset)

    # --- lifecycle -------------------------------------------------------------------------
    def negotiated(self, features: int) -> None:
        """The driver accepted ``features`` (FEATURES_OK): a device may note what it needs."""

    def reset_state(self) -> None:
        """Device-specific state back to power-on (under ``lock``, on a vCPU thread)."""

    def close(self) -> None:
        """Release host resources (a tap, an image, sockets) once the VM has stopped."""

    # --- snapshots ----------------------------------------------------------------------------
    async def quiesce(self) -> None:
        """Before a snapshot, on the event loop, with the vCPUs paused: stop the backend with
        no chain held (see the module docstring). Then ``save_state`` of the device and its
        transport are pure reads; ``resume_after_snapshot()`` when the VM runs on."""
        if self.core is not None:
            await self.core.quiesce()

    def resume_after_snapshot(self) -> None:
        """After a snapshot (or a failed one), on the event loop: the backend takes chains
        again. Nothing happens unless ``quiesce`` ran."""
        if self.core is not None:
            self.core.resume_after_snapshot()

    async def quiesce_backend(self, active: Activation, stop: Callable[[], Awaitable[None]]) -> None:
        """Stop the backend of ``active`` taking chains, its work under way done, every chain
        it took and did not use in ``active.held``. The default: ``stop()``, which cancels
        the whole backend (not a reset: ``active`` stays current) and waits for it to end."""
        await stop()

    def resume_backend(self, active: Activation, start: Callable[[], None]) -> None:
        """Undo ``quiesce_backend``; ``start()`` starts the backend anew on ``active``."""
        start()

    def return_held(self, active: Activation) -> None:
        """Under the lock, once the backend is stopped: give back what it held, each queue
        rewound by its ``held`` chains (``SplitQueue.unpop``)."""
        for index, held in enumerate(active.held):
            if held:
                active.queues[index].unpop(len(held))
                held.clear()

    def restored(self, running: bool) -> None:
        """The transport's state was restored (under the lock); ``running``: the driver had
        set DRIVER_OK, and the backend starts again."""

    def save(self) -> DeviceState:
        with self.lock:
            return DeviceState(self.device_type, bytes(self.config))

    def restore(self, state: DeviceState) -> None:
        """Check that ``state`` is this device's (``ValueError`` otherwise, nothing changed)."""
        if state.device_type != self.device_type:
            raise ValueError(f"{self.name}: the saved state is a type {state.device_type} virtio device's, "
                             f"not type {self.device_type}")  # fmt: skip
        if state.config != bytes(self.config):
            raise ValueError(f"{self.name}: the saved configuration space ({_hex(state.config)}) is not this "
                             f"device's ({_hex(self.config)})")  # fmt: skip

    def save_state(self) -> bytes:
        """The device's section of a snapshot (``trivmm.migration.devices.StateProvider``)."""
        return pack_state(self.save())

    def restore_state(self, data: bytes) -> None:
        """Take a section ``save_state`` wrote, from an untrusted stream: ``ValueError`` for
        anything this device cannot take."""
        self.restore(unpack_state(self.state_type, data, f"{self.name} state"))

    async def serve(self, active: Activation) -> None:
        """The backend: serve the queues until cancelled (the device was reset or the VM
        stopped). The default serves each queue with ``handle``."""
        async with anyio.create_task_group() as tg:
            for index in range(len(self.queue_sizes)):
                tg.start_soon(self.serve_queue, active, index)

    async def serve_queue(self, active: Activation, index: int) -> None:
        """Wait for notifications of queue ``index``; ``handle`` each chain taken."""
        while True:
            chains = active.take_chains(index)
            if not chains:
                await active.wait_notified(index)
                continue
            for chain in chains:
                await self.handle(active, index, chain)
            # A guest that keeps its ring full must not keep the event loop to itself
            # (handle() may never await): yield after every batch.
            await anyio.lowlevel.checkpoint()

    async def handle(self, active: Activation, index: int, chain: DescriptorChain) -> None:
        """One request; devices that use the default ``serve_queue`` override this. It must
        complete ``chain`` without awaiting (rng's never awaits): then ``serve_queue`` holds
        no chain at any of its awaits, and a quiesce, which cancels it there, has nothing to
        give back. A device whose requests wait for IO serves its queues itself, keeping
        what it holds in ``active.held`` (blk, net, vsock)."""
        raise NotImplementedError


def _hex(data: bytes | bytearray) -> str:
    text = bytes(data).hex()
    return text if len(text) <= 48 else f"{text[:48]}... ({len(data)} bytes)"
