"""A HostManager stand-in for the web console's tests that need no KVM: VMs are rows in a
dict, "running" means nothing runs, the console echoes what is typed, and the display is
an optional unix socket the test serves."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectSendStream

from trivmm.host.model import HostEvent, UnknownVm, VmState, VmStateConflict, VmSummary, check_vm_name


@attrs.define(eq=False)
class FakeConsole:
    history: bytes
    _output: anyio.abc.ObjectReceiveStream[bytes]
    _echo: anyio.abc.ObjectSendStream[bytes]

    async def receive(self) -> bytes:
        try:
            return await self._output.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise anyio.EndOfStream from None

    async def send(self, data: bytes) -> None:
        await self._echo.send(b"echo:" + data)


@attrs.define(eq=False)
class FakeManager:
    vms: dict[str, VmSummary] = attrs.field(factory=dict)
    display_path: Path | None = None
    typed: list[bytes] = attrs.field(factory=list)
    _subscribers: list[MemoryObjectSendStream[HostEvent]] = attrs.field(factory=list)
    _consoles: list[MemoryObjectSendStream[bytes]] = attrs.field(factory=list)

    def _publish(self, name: str, kind: str, state: VmState | None) -> None:
        event = HostEvent(time.time(), name, kind, state, "")
        for stream in self._subscribers:
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                stream.send_nowait(event)

    async def define(self, name: str, run_args: Sequence[str], *, autostart: bool = False) -> VmSummary:
        check_vm_name(name)
        if name in self.vms:
            raise VmStateConflict(f"a VM named {name!r} exists already")
        display = (640, 480) if "--display" in run_args else None
        self.vms[name] = VmSummary(name, VmState.STOPPED, 1, 64 << 20, display, autostart, None)
        self._publish(name, "defined", VmState.STOPPED)
        return self.vms[name]

    async def undefine(self, name: str) -> None:
        if self.info(name).state.active:
            raise VmStateConflict(f"VM {name!r} is running: stop it first")
        del self.vms[name]
        self._publish(name, "undefined", None)

    def list(self) -> list[VmSummary]:
        return [self.vms[name] for name in sorted(self.vms)]

    def info(self, name: str) -> VmSummary:
        try:
            return self.vms[name]
        except KeyError:
            raise UnknownVm(f"no VM named {name!r}") from None

    def _set(self, name: str, state: VmState, last_exit: str | None = None) -> VmSummary:
        self.vms[name] = attrs.evolve(self.info(name), state=state, last_exit=last_exit)
        self._publish(name, "state", state)
        return self.vms[name]

    async def start(self, name: str) -> VmSummary:
        if self.info(name).state.active:
            raise VmStateConflict(f"VM {name!r} is running already")
        return self._set(name, VmState.RUNNING)

    async def stop(self, name: str, *, force: bool = False) -> VmSummary:
        if not self.info(name).state.active:
            raise VmStateConflict(f"VM {name!r} is not running")
        for stream in self._consoles:
            stream.close()
        return self._set(name, VmState.STOPPED, "forced off" if force else "powered off")

    async def reset(self, name: str) -> VmSummary:
        return self.info(name)

    async def pause(self, name: str) -> VmSummary:
        return self._set(name, VmState.PAUSED)

    async def resume(self, name: str) -> VmSummary:
        return self._set(name, VmState.RUNNING)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[HostEvent]]:
        send, receive = anyio.create_memory_object_stream[HostEvent](100)
        self._subscribers.append(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.remove(send)

    @contextlib.asynccontextmanager
    async def console(self, name: str) -> AsyncIterator[FakeConsole]:
        if not self.info(name).state.active:
            raise VmStateConflict(f"VM {name!r} is stopped: start it to attach to its console")
        send, receive = anyio.create_memory_object_stream[bytes](100)
        self._consoles.append(send)
        try:
            async with receive:
                yield FakeConsole(b"hello from " + name.encode() + b"\r\n", receive, send)
        finally:
            self._consoles.remove(send)

    def display_socket(self, name: str) -> Path | None:
        return self.display_path if self.info(name).state.active else None
