"""The guest's serial console on the host side: a bounded output buffer, its delivery to
the user's sink, and ``ConsoleStream``, the console as an async byte stream both ways.

Output path: the UART (on a vCPU thread, under its lock) appends to ``ConsoleBuffer``,
which never blocks: past ``CONSOLE_BUFFER_LIMIT`` bytes the *oldest* are dropped and
counted, so the most recent output -- the panic message a user needs -- survives a stalled
reader. The buffer turning non-empty wakes its reader through a ``LoopCaller`` (a
non-blocking call into the event loop). The reader is either the VM's delivery task (when
the VM was given a ``console_output``) or whoever calls ``ConsoleStream.receive``.

Input path: ``ConsoleStream.send`` (or the VM's pump of a ``console_input`` stream) feeds the
UART's receive FIFO, waiting while the guest has not drained it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import anyio.abc
import anyio.lowlevel

from trivmm._threads import LoopCaller
from trivmm.devices.fifo import DropCounter

if TYPE_CHECKING:
    from trivmm.devices.serial import Serial

__all__ = ["ConsoleBuffer", "ConsoleStream", "ConsoleOutput", "ConsoleInput", "CONSOLE_BUFFER_LIMIT",
           "console_delivery", "console_receiver", "INPUT_RETRY_INTERVAL"]  # fmt: skip

CONSOLE_BUFFER_LIMIT = 1 << 20  # bytes of console output held while the reader lags
INPUT_RETRY_INTERVAL = 0.005  # seconds between tries to feed a full UART receive FIFO
_log = logging.getLogger(__name__)


@runtime_checkable
class _TrioSendStream(Protocol):  # trio.abc.SendStream, without importing trio
    async def send_all(self, data: bytes) -> None: ...


@runtime_checkable
class _TrioReceiveStream(Protocol):  # trio.abc.ReceiveStream
    async def receive_some(self, max_bytes: int | None = ...) -> bytes: ...


# Where guest output goes: a callable taking bytes (run on a worker thread, so it may
# block), an anyio ByteSendStream, a trio SendStream -- or None: kept for ``vm.console``.
ConsoleOutput = Callable[[bytes], Any] | anyio.abc.ByteSendStream | _TrioSendStream | None
# What feeds the guest's serial input: an anyio ByteReceiveStream or a trio ReceiveStream.
ConsoleInput = anyio.abc.ByteReceiveStream | _TrioReceiveStream | None


class ConsoleBuffer:
    """Guest console output on its way from the vCPU threads to one reader (see the module
    docstring). Appending never blocks; ``receive`` waits for output or the end."""

    def __init__(self, limit: int = CONSOLE_BUFFER_LIMIT) -> None:
        self._lock = threading.Lock()
        self._data = bytearray()
        self._limit = limit
        self._caller: LoopCaller | None = None
        self._ready: anyio.Event | None = None
        self._closing = False
        self._sink_failed = False
        self._drops = DropCounter(_log, "console output")

    @property
    def dropped(self) -> int:
        """Bytes of guest output dropped so far."""
        return self._drops.dropped

    @property
    def closed(self) -> bool:
        return self._closing

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __call__(self, data: bytes) -> None:
        """Append guest output (any thread; never blocks)."""
        with self._lock:
            if self._sink_failed:
                self._drops.add(len(data), "the console sink failed")
                return
            self._data += data
            excess = len(self._data) - self._limit
            if excess > 0:
                del self._data[:excess]
                self._drops.add(excess, "the console reader is not keeping up")
            ready, caller = self._ready, self._caller
            self._ready = None  # one wake-up per wait, however many appends come meanwhile
        if ready is not None and caller is not None:
            caller.call_soon(ready.set)  # a reader waits: wake it

    def close(self) -> None:
        """No more output is coming: ``receive`` returns the rest, then ``b""``.
        Called on the event loop's thread."""
        self._closing = True
        if self._ready is not None:
            self._ready.set()

    def discard(self, reason: str, *, for_good: bool = False) -> None:
        """Drop (and count) what is buffered: the sink is out of time, or -- ``for_good``
        -- gone, and what comes later is dropped too."""
        with self._lock:
            self._drops.add(len(self._data), reason)
            self._data.clear()
            self._sink_failed = self._sink_failed or for_good

    async def receive(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of output, waiting for some; ``b""`` once closed and empty.
        One reader at a time."""
        if self._caller is None:
            self._caller = LoopCaller.current()
        while True:
            with self._lock:
                if self._data:
                    size = len(self._data) if max_bytes is None else min(max_bytes, len(self._data))
                    chunk = bytes(self._data[:size])
                    del self._data[:size]
                    return chunk
                if self._closing:
                    return b""
                ready = self._ready = anyio.Event()
            await ready.wait()

    async def drain_to(self, deliver: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand output to ``deliver`` until closed and empty."""
        while chunk := await self.receive():
            await deliver(chunk)


def console_delivery(output: ConsoleOutput) -> Callable[[bytes], Awaitable[None]] | None:
    """How the VM's console task hands output to the user's sink: a stream's send, or the
    callable on a worker thread of the VM's own (a blocking write stalls that thread,
    never a vCPU, the event loop, or another VM's console)."""
    if output is None:
        return None
    if isinstance(output, anyio.abc.ByteSendStream):
        return output.send
    if isinstance(output, _TrioSendStream):
        return output.send_all
    if not callable(output):
        raise TypeError("console_output must be a callable taking bytes, an anyio ByteSendStream "
                        "or a trio SendStream")  # fmt: skip
    write = output
    limiter = anyio.CapacityLimiter(1)

    async def deliver(chunk: bytes) -> None:
        await anyio.to_thread.run_sync(write, chunk, abandon_on_cancel=True, limiter=limiter)

    return deliver


def console_receiver(stream: ConsoleInput) -> Callable[[], Awaitable[bytes]] | None:
    """``receive()`` for the host -> guest pump: ``b""`` at end of input."""
    if stream is None:
        return None
    if isinstance(stream, anyio.abc.ByteReceiveStream):
        receive = stream.receive

        async def receive_anyio() -> bytes:
            try:
                return await receive(4096)
            except anyio.EndOfStream:
                return b""

        return receive_anyio
    if isinstance(stream, _TrioReceiveStream):
        receive_some = stream.receive_some

        async def receive_trio() -> bytes:
            return await receive_some(4096)

        return receive_trio
    raise TypeError("console_input must be an anyio ByteReceiveStream or a trio ReceiveStream")


async def feed_serial(serial: Serial, data: bytes, is_open: Callable[[], bool]) -> None:
    """Put all of ``data`` in the UART's receive FIFO, waiting while the guest drains it;
    ``anyio.BrokenResourceError`` once the guest can no longer take it."""
    view = memoryview(data)
    while view:
        if not is_open():
            raise anyio.BrokenResourceError("the guest has stopped: it takes no more input")
        taken = serial.enqueue_input(bytes(view))
        view = view[taken:]
        if view:
            await anyio.sleep(INPUT_RETRY_INTERVAL)  # the guest drains its FIFO on interrupts


class ConsoleStream(anyio.abc.ByteStream):
    """A VM's serial console as an anyio byte stream: ``receive()`` is guest output,
    ``send()`` is typed into the guest. ``receive`` serves a VM without ``console_output``
    (the output is held for it, bounded); after the VM ends it returns what is left, then
    raises ``anyio.EndOfStream``."""

    def __init__(self, buffer: ConsoleBuffer | None, serial: Serial, is_open: Callable[[], bool]) -> None:
        self._buffer = buffer
        self._serial = serial
        self._is_open = is_open
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._buffer is None:
            raise anyio.BrokenResourceError("this VM's console output goes to its console_output")
        data = await self._buffer.receive(max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        await feed_serial(self._serial, bytes(item), self._is_open)

    async def send_eof(self) -> None:
        """A UART has no end of input; nothing to do."""

    async def aclose(self) -> None:
        self._closed = True
        await anyio.lowlevel.checkpoint()
