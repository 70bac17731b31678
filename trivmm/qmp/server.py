"""A QMP control socket for a running ``trivmm.VM``: QEMU's machine protocol
(docs/interop/qmp-spec.rst) on a unix socket, for QEMU's tools and the ``qemu.qmp``
client. docs/qmp.md lists the commands and events and what differs from QEMU.

    server = QmpServer(vm, "/run/vm.qmp")         # binds now (mode 0600): ConfigError if it cannot
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)              # clients may connect from here on
        result = await vm.run()                   # or vm.wait() for a VM started elsewhere
    # serve() ends by itself once the VM has ended and SHUTDOWN has reached the clients

The server is a task beside ``vm.run()`` on the same event loop (trio or asyncio; the code
is anyio), one task pair (reader, writer) per client. It uses the VM's public API only:
``pause()``, ``resume()``, ``stop()``, ``wait()``, ``paused``, and ``add_service`` to learn
when the VM starts. Hostile input is bounded: a message is at most ``MAX_MESSAGE`` bytes
(a longer one gets an error and the connection is closed), at most ``max_clients`` clients
at once, and a client that does not read its events is dropped rather than buffered.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from trivmm._unix_sockets import listen_unix_socket
from trivmm.devices.acpi_pm import ACPI_PM_PORT, RESET_OFFSET, RESET_VALUE, AcpiPm
from trivmm.errors import TrivmmError, VmError
from trivmm.kvm import KvmError
from trivmm.qmp.protocol import (
    COMMAND_NOT_FOUND,
    Frame,
    MessageSplitter,
    MessageTooLong,
    Param,
    QmpError,
    check_arguments,
    decode_message,
    encode,
    error_response,
    event_message,
    parse_request,
    response,
)
from trivmm.vcpu import StopReason

if TYPE_CHECKING:
    from trivmm.vm import VM, VmExit

__all__ = ["QmpServer", "MigrationControl", "MAX_CLIENTS", "FLUSH_TIMEOUT", "MIGRATE_PARAMS", "MIGRATE_SET_PARAMS",
           "MIGRATION_UNAVAILABLE"]  # fmt: skip

MAX_CLIENTS = 64  # connections at once; one more is told so and closed
FLUSH_TIMEOUT = 2.0  # seconds a closing client gets to take what is queued for it (SHUTDOWN)
OUTBOX_LIMIT = 256  # messages queued for one client; events past that drop the client
RECEIVE_SIZE = 65536
MIGRATION_UNAVAILABLE = "migration is not available in this build yet"
# Arguments the server checks before a MigrationControl sees them (add a name here to accept it).
MIGRATE_PARAMS: dict[str, Param] = {"uri": Param(str, required=True), "detach": Param(bool), "resume": Param(bool),
                                    "blk": Param(bool), "copy-storage": Param(bool)}  # copy-storage: trivmm's own
# QEMU's bounds: downtime-limit up to 2000 s; max-bandwidth up to a 64-bit byte rate.
MIGRATE_SET_PARAMS: dict[str, Param] = {"downtime-limit": Param(int, minimum=0, maximum=2_000_000),
                                        "max-bandwidth": Param(int, minimum=0, maximum=(1 << 63) - 1)}  # fmt: skip
_log = logging.getLogger(__name__)


class MigrationControl(Protocol):
    """What the server asks of the migration engine for ``migrate``, ``migrate_cancel``,
    ``query-migrate`` and ``migrate-set-parameters``. Each runs in the asking client's
    task and should return promptly (``migrate`` once the migration has *started*: run
    the migration itself in a task of your own). Raise ``QmpError`` (or a ``TrivmmError``,
    or ``ValueError``) to fail the command with that text. Report progress with
    ``QmpServer.emit_migration(status)`` (the MIGRATION event) and ``emit_event`` (e.g.
    STOP/RESUME around a switch-over that pauses the VM, MIGRATION_PASS).

    Optional: ``run_state() -> str | None``; a string ("inmigrate", "finish-migrate",
    "postmigrate", ...) is what ``query-status`` reports meanwhile, None: the VM's own state.
    """

    async def migrate(self, uri: str, arguments: Mapping[str, Any]) -> None:
        """Start migrating to ``uri`` (``tcp:HOST:PORT``, ``unix:PATH``, ``file:PATH``);
        ``arguments`` are the command's, checked against ``MIGRATE_PARAMS``."""
        ...

    async def migrate_cancel(self) -> None:
        """Cancel the migration in progress (none: nothing to do)."""
        ...

    async def query_migrate(self) -> Mapping[str, Any]:
        """QEMU's MigrationInfo: ``status``, ``total-time``, ``downtime``, ``setup-time``,
        ``ram`` (``transferred``, ``remaining``, ``total``, ``dirty-pages-rate``...); {} if
        no migration has run."""
        ...

    async def set_parameters(self, parameters: Mapping[str, Any]) -> None:
        """Apply ``migrate-set-parameters`` (checked against ``MIGRATE_SET_PARAMS``:
        ``downtime-limit`` in ms, ``max-bandwidth`` in bytes/s)."""
        ...


@attrs.frozen
class _AfterReply:
    """A command's result, and what to do once the reply is on its way (``quit``)."""

    value: Any
    then: Callable[[], Awaitable[None]]


@attrs.frozen
class _Command:
    params: Mapping[str, Param] | None  # None: any arguments (the handler checks them)
    handler: Callable[[_Client, dict[str, Any]], Awaitable[Any]]


class _Client:
    """One connection: a reader task (requests, one at a time) and a writer task (the
    outbox, in order: the greeting, replies and events)."""

    def __init__(self, stream: anyio.abc.SocketStream, number: int) -> None:
        self.stream = stream
        self.number = number
        self.negotiated = False
        self.dead = False
        self.outbox: MemoryObjectSendStream[tuple[bytes | None, anyio.Event | None]]
        self.inbox: MemoryObjectReceiveStream[tuple[bytes | None, anyio.Event | None]]
        self.outbox, self.inbox = anyio.create_memory_object_stream(OUTBOX_LIMIT)
        self.write_scope = anyio.CancelScope()

    def post(self, data: bytes | None) -> None:
        """Queue an event (None: close after what is queued) without waiting; a client
        that lets its outbox fill up is dropped."""
        try:
            self.outbox.send_nowait((data, None))
        except anyio.WouldBlock:
            self.kill("it does not read what it is sent")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # leaving already

    async def send(self, data: bytes) -> None:
        """Queue a reply and wait until it is written (or the client is gone): one reply
        in flight per client bounds what a client that does not read costs."""
        done = anyio.Event()
        try:
            await self.outbox.send((data, done))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        await done.wait()

    def kill(self, reason: str) -> None:
        if not self.dead:
            _log.info("QMP client %d dropped: %s", self.number, reason)
        self.dead = True
        self.write_scope.cancel()


class QmpServer:
    """A QMP server on the unix socket ``path`` for ``vm`` (None: attach one later with
    ``attach()``; until then ``query-status`` says "prelaunch"). The socket is created in
    the constructor, mode 0600: a stale socket file at ``path`` is replaced; anything else
    there (a live socket, a file) is a ``ConfigError``. ``serve()`` runs it."""

    def __init__(self, vm: VM | None, path: str | os.PathLike[str], *, migration: MigrationControl | None = None,
                 max_clients: int = MAX_CLIENTS) -> None:  # fmt: skip
        self.path = os.fspath(path)
        self.migration = migration  # may be set later, before clients ask for it
        self.max_clients = max_clients
        self.vm: VM | None = None
        self._sock: socket.socket | None
        self._sock, self._sock_id = listen_unix_socket(self.path, "QMP socket")
        self._clients: set[_Client] = set()
        self._count = 0
        self._serving = False
        self._started_vm: VM | None = None  # the VM once its run() has started
        self._changed: anyio.Event | None = None
        self._quit = False
        self._host_cause: str | None = None  # why the host ends the VM: QEMU's ShutdownCause
        self._end_state: str | None = None  # set once the VM has ended
        self._state_lock: anyio.Lock | None = None
        self._commands: dict[str, _Command] = {
            "qmp_capabilities": _Command({"enable": Param(list)}, self._qmp_capabilities),
            "query-status": _Command({}, self._query_status),
            "stop": _Command({}, self._stop),
            "cont": _Command({}, self._cont),
            "system_powerdown": _Command({}, self._system_powerdown),
            "system_reset": _Command({}, self._system_reset),
            "quit": _Command({}, self._quit_command),
            "query-commands": _Command({}, self._query_commands),
            "query-version": _Command({}, self._query_version),
            "migrate": _Command(MIGRATE_PARAMS, self._migrate),
            "migrate_cancel": _Command({}, self._migrate_cancel),
            "query-migrate": _Command({}, self._query_migrate),
            "migrate-set-parameters": _Command(MIGRATE_SET_PARAMS, self._migrate_set_parameters),
        }
        if vm is not None:
            self.attach(vm)

    # --- the VM --------------------------------------------------------------------------
    def attach(self, vm: VM) -> None:
        """Serve ``vm`` (before or after its ``run()`` started)."""
        if self.vm is not None:
            raise RuntimeError("this QMP server already serves a VM")
        self.vm = vm
        try:
            vm.add_service(functools.partial(self._vm_started, vm))  # run() starts it: "the VM runs"
        except VmError:  # its run() has started already
            self._started_vm = vm
        self._poke()

    async def _vm_started(self, vm: VM) -> None:
        self._started_vm = vm
        self._poke()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # --- events --------------------------------------------------------------------------
    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send event ``name`` (with ``data``, if any, and a timestamp) to every client past
        capabilities negotiation. Call it on the server's event loop (from a thread:
        ``anyio.from_thread.run_sync``)."""
        message = encode(event_message(name, data))
        for client in list(self._clients):
            if client.negotiated:
                client.post(message)

    def emit_migration(self, status: str) -> None:
        """The MIGRATION event: ``{"status": status}`` (QEMU's MigrationStatus: "setup",
        "active", "completed", "failed", "cancelling", "cancelled", ...)."""
        self.emit_event("MIGRATION", {"status": status})

    # --- serving -------------------------------------------------------------------------
    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until the VM has ended (or ``quit`` with no VM running), then send
        SHUTDOWN, give each client ``FLUSH_TIMEOUT`` to take it, close, and return; the
        socket file is removed. ``task_group.start(server.serve)`` returns once it listens."""
        if self._serving or self._sock is None:
            raise RuntimeError("a QMP server serves once")
        self._serving = True
        self._state_lock = anyio.Lock()
        sock, self._sock = self._sock, None
        listener = await anyio.abc.SocketListener.from_socket(sock)
        try:
            async with anyio.create_task_group() as clients:
                accepting = anyio.CancelScope()
                clients.start_soon(self._accept, listener, clients, accepting)
                task_status.started()
                await self._until_ended()
                accepting.cancel()
                for client in list(self._clients):
                    client.post(None)  # after SHUTDOWN, close
                clients.cancel_scope.deadline = anyio.current_time() + FLUSH_TIMEOUT
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            self._remove_socket_file()

    async def _accept(self, listener: anyio.abc.SocketListener, clients: anyio.abc.TaskGroup,
                      scope: anyio.CancelScope) -> None:  # fmt: skip
        with scope:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.ClosedResourceError:
                    return
                except OSError as exc:  # out of fds, say: wait a little rather than spin
                    _log.warning("QMP socket %s: accept failed: %s", self.path, exc)
                    await anyio.sleep(0.1)
                    continue
                if len(self._clients) >= self.max_clients:
                    await self._refuse(stream)
                    continue
                self._count += 1
                client = _Client(stream, self._count)
                self._clients.add(client)
                clients.start_soon(self._serve_client, client)

    async def _refuse(self, stream: anyio.abc.SocketStream) -> None:
        error = QmpError(f"too many QMP clients (at most {self.max_clients})")
        with anyio.move_on_after(0.1):
            try:
                await stream.send(encode(error_response(error)))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
        await anyio.aclose_forcefully(stream)

    async def _serve_client(self, client: _Client) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, client)
                try:
                    await client.send(encode(self._greeting()))
                    await self._read(client)
                finally:
                    self._clients.discard(client)
                    client.outbox.close()  # the writer sends what is queued, then closes
                    deadline = anyio.current_time() + FLUSH_TIMEOUT
                    client.write_scope.deadline = min(client.write_scope.deadline, deadline)
        except Exception:  # a bug of ours: that client's problem only
            _log.exception("QMP client %d failed", client.number)
            await anyio.aclose_forcefully(client.stream)

    async def _write(self, client: _Client) -> None:
        with client.write_scope:
            try:
                async for first in client.inbox:
                    batch = [first]  # what else is queued goes in the same write
                    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                        while batch[-1][0] is not None and len(batch) < OUTBOX_LIMIT:
                            batch.append(client.inbox.receive_nowait())
                    try:
                        payload = b"".join(data for data, _ in batch if data is not None)
                        if payload:
                            await client.stream.send(payload)
                    finally:
                        for _, done in batch:
                            if done is not None:
                                done.set()
                    if batch[-1][0] is None:
                        break
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away: its reader finds out too
        client.dead = True
        await anyio.aclose_forcefully(client.stream)  # the reader's receive() ends
        async for _data, done in client.inbox:  # replies from here on go nowhere
            if done is not None:
                done.set()

    async def _read(self, client: _Client) -> None:
        splitter = MessageSplitter()
        while not client.dead:
            try:
                data = await client.stream.receive(RECEIVE_SIZE)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                return
            try:
                frames = splitter.feed(data)
            except MessageTooLong as exc:
                for frame in exc.frames:
                    await self._handle(client, frame)
                error = QmpError(f"JSON parse error, {exc}: closing the connection")
                await client.send(encode(error_response(error)))
                return
            for frame in frames:
                await self._handle(client, frame)
                if client.dead:
                    return

    async def _handle(self, client: _Client, frame: Frame) -> None:
        """One message: decoded, checked, dispatched; the reply (or error) sent."""
        request_id: Any = None
        has_id = False
        after: Callable[[], Awaitable[None]] | None = None
        try:
            message = decode_message(frame)
            if isinstance(message, dict) and "id" in message:
                request_id, has_id = message["id"], True
            request = parse_request(message)
            if not client.negotiated and request.command != "qmp_capabilities":
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", COMMAND_NOT_FOUND)
            command = self._commands.get(request.command)
            if command is None:
                raise QmpError(f"The command {request.command} has not been found", COMMAND_NOT_FOUND)
            if command.params is not None:
                check_arguments(request.arguments, command.params)
            value = await command.handler(client, request.arguments)
            if isinstance(value, _AfterReply):
                value, after = value.value, value.then
            reply = response(value, request)
        except QmpError as error:
            reply = error_response(error, request_id, has_id)
        except (TrivmmError, KvmError, ValueError) as exc:
            reply = error_response(QmpError(str(exc)), request_id, has_id)
        except Exception as exc:  # a bug (ours, or a MigrationControl's): that command fails, nothing else
            _log.exception("QMP command failed")
            reply = error_response(QmpError(f"internal error: {type(exc).__name__}: {exc}"), request_id, has_id)
        await client.send(encode(reply))
        if after is not None:
            await after()

    # --- the VM's end ------------------------------------------------------------------------
    async def _until_ended(self) -> None:
        """Wait until the VM has ended (or ``quit`` came with no VM running); send SHUTDOWN."""
        outcome: VmExit | Exception | None = None
        while True:
            vm = self._started_vm
            if vm is not None:
                try:
                    outcome = await vm.wait()
                except Exception as exc:  # the VM failed: run() raised it
                    outcome = exc
                break
            if self._quit:
                break
            self._changed = anyio.Event()
            await self._changed.wait()
        guest, reason = self._shutdown_cause(outcome)
        self._end_state = "internal-error" if isinstance(outcome, Exception) else "shutdown"
        if reason == "guest-panic":
            self.emit_event("GUEST_PANICKED", {"action": "poweroff"})
        self.emit_event("SHUTDOWN", {"guest": guest, "reason": reason})

    def _shutdown_cause(self, outcome: VmExit | Exception | None) -> tuple[bool, str]:
        """SHUTDOWN's ``guest`` and ``reason`` (QEMU's ShutdownCause) for how the VM ended."""
        cause = self._host_cause
        if outcome is None:
            return False, cause or "host-qmp-quit"
        if isinstance(outcome, Exception):
            return False, "host-error"
        reason = outcome.reason
        if reason is StopReason.RESET:
            return (False, cause) if cause == "host-qmp-system-reset" else (True, "guest-reset")
        if reason is StopReason.PANIC:
            return True, "guest-panic"
        if reason in (StopReason.POWER_OFF, StopReason.HALT):
            return True, "guest-shutdown"
        return False, cause if cause == "host-qmp-quit" else "host-signal"  # STOPPED: vm.stop(), open_vm's end

    # --- commands ----------------------------------------------------------------------------
    def _greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": _version(), "capabilities": []}}

    def _run_state(self) -> str:
        if self._end_state is not None:
            return self._end_state
        run_state = getattr(self.migration, "run_state", None)
        state = run_state() if callable(run_state) else None
        if isinstance(state, str):
            return state
        vm = self.vm
        if vm is None:
            return "prelaunch"
        if getattr(vm, "incoming", False):
            return "inmigrate"
        if self._started_vm is not vm:
            return "prelaunch"
        return "paused" if vm.paused else "running"

    def _live_vm(self) -> VM:
        """The VM, running or paused; ``QmpError`` otherwise."""
        vm = self.vm
        if self._end_state is not None:
            raise QmpError("the VM has shut down")
        if vm is None or self._started_vm is not vm:
            raise QmpError(f"the VM is not running yet (status: {self._run_state()})")
        return vm

    async def _qmp_capabilities(self, client: _Client, arguments: dict[str, Any]) -> Any:
        if client.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored", COMMAND_NOT_FOUND)
        for capability in arguments.get("enable", []):
            if not isinstance(capability, str):
                raise QmpError("Invalid parameter type for 'enable', expected: array of strings")
            raise QmpError(f"Capability '{capability}' not available")
        client.negotiated = True
        return {}

    async def _query_status(self, client: _Client, arguments: dict[str, Any]) -> Any:
        status = self._run_state()
        return {"status": status, "singlestep": False, "running": status == "running"}

    def _refuse_during_migration(self, command: str) -> None:
        """stop and cont are refused while a migration or snapshot runs: it pauses and
        resumes the guest itself (a cont in its switch-over would let the source run on
        after the hand-over, a stop would be undone by its resume)."""
        if getattr(self.migration, "in_progress", False):
            raise QmpError(f"'{command}' is refused while a migration is in progress (migrate_cancel first)")

    async def _stop(self, client: _Client, arguments: dict[str, Any]) -> Any:
        vm = self._live_vm()
        self._refuse_during_migration("stop")
        assert self._state_lock is not None
        async with self._state_lock:
            if not vm.paused:
                await vm.pause()  # returns once every vCPU is parked
                self.emit_event("STOP")
        return {}

    async def _cont(self, client: _Client, arguments: dict[str, Any]) -> Any:
        vm = self._live_vm()
        self._refuse_during_migration("cont")
        state = self._run_state()
        if state not in ("running", "paused", "postmigrate"):
            raise QmpError(f"the VM cannot be resumed in state '{state}'")
        assert self._state_lock is not None
        async with self._state_lock:
            if vm.paused:
                await vm.resume()
                self.emit_event("RESUME")
        return {}

    async def _system_powerdown(self, client: _Client, arguments: dict[str, Any]) -> Any:
        # The ACPI power button, pressed; the guest decides (QEMU's POWERDOWN event says it was
        # pressed, SHUTDOWN follows if the guest powers off).
        vm = self._live_vm()
        try:
            vm.powerdown()
        except TrivmmError as error:
            raise QmpError(str(error)) from None
        self.emit_event("POWERDOWN")
        return {}

    async def _system_reset(self, client: _Client, arguments: dict[str, Any]) -> Any:
        vm = self._live_vm()
        found = vm.pio.find(ACPI_PM_PORT)
        if found is None or not isinstance(found.device, AcpiPm):
            raise QmpError("this VM has no ACPI reset register")
        # The platform's reset, as the guest would press it: trivmm ends the VM at a reset
        # (StopReason.RESET), as QEMU does with -no-reboot.
        self._host_cause = "host-qmp-system-reset"
        vm.pio.write(ACPI_PM_PORT + RESET_OFFSET, memoryview(bytearray([RESET_VALUE])))
        return {}

    async def _quit_command(self, client: _Client, arguments: dict[str, Any]) -> Any:
        self._host_cause = "host-qmp-quit"
        return _AfterReply({}, self._quit_now)

    async def _quit_now(self) -> None:
        vm = self.vm
        if vm is not None and self._end_state is None:
            try:
                await vm.stop()  # STOPPED; waits for run() to end
            except TrivmmError:  # not started yet (it stops at once if it starts), or it failed
                pass
        self._quit = True
        self._poke()

    async def _query_commands(self, client: _Client, arguments: dict[str, Any]) -> Any:
        return [{"name": name} for name in self._commands]

    async def _query_version(self, client: _Client, arguments: dict[str, Any]) -> Any:
        return _version()

    def _migration(self) -> MigrationControl:
        if self.migration is None:
            raise QmpError(MIGRATION_UNAVAILABLE)
        return self.migration

    async def _migrate(self, client: _Client, arguments: dict[str, Any]) -> Any:
        await self._migration().migrate(arguments["uri"], arguments)
        return {}

    async def _migrate_cancel(self, client: _Client, arguments: dict[str, Any]) -> Any:
        await self._migration().migrate_cancel()
        return {}

    async def _query_migrate(self, client: _Client, arguments: dict[str, Any]) -> Any:
        return dict(await self._migration().query_migrate())

    async def _migrate_set_parameters(self, client: _Client, arguments: dict[str, Any]) -> Any:
        await self._migration().set_parameters(arguments)
        return {}

    # --- the socket ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket and remove its file, if ``serve()`` never ran (it does both)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._sock_id:  # still ours, not one made since
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> QmpServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@functools.cache
def _version() -> dict[str, Any]:
    """QEMU's VersionInfo, with trivmm's version (docs/qmp.md)."""
    try:
        text = importlib.metadata.version("trivmm")
    except importlib.metadata.PackageNotFoundError:
        text = "0.0.0"
    parts = [int(p) if p.isdigit() else 0 for p in [*text.split("."), "0", "0"][:3]]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]}, "package": f"trivmm {text}"}


