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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from trivmm.devices.virtio.queue import DescriptorChain, SplitQueue, VirtqueueError

if TYPE_CHECKING:
    from trivmm.eventfd import EventFd

__all__ = ["VirtioDevice", "Activation", "DeviceType", "VIRTIO_F_VERSION_1", "STATUS_ACKNOWLEDGE",
           "STATUS_DRIVER", "STATUS_DRIVER_OK", "STATUS_FEATURES_OK", "STATUS_DEVICE_NEEDS_RESET",
           "STATUS_FAILED"]  # fmt: skip

_log = logging.getLogger(__name__)

VIRTIO_F_VERSION_1 = 32  # modern device: little-endian, no legacy interface
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128


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

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0  # bumped by every reset, under ``lock``
        self.config = bytearray()  # the device-specific configuration space

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
        """One request; devices that use the default ``serve_queue`` override this."""
        raise NotImplementedError
