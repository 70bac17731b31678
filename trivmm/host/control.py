"""The service's control socket: framed JSON requests and responses on a unix socket.

A frame is a 4-byte big-endian length and that many bytes of one UTF-8 JSON object. A
client sends a request ``{"op": OP, ...}`` and gets ``{"ok": true, "result": ...}`` or
``{"ok": false, "kind": KIND, "error": SENTENCE}`` (KIND: ``unknown-vm``, ``conflict``,
``invalid``, ``failure``, ``protocol``); a connection may carry one request after another.
After ``{"op": "console"}`` is answered ok, the connection carries raw bytes: the console's
recent history and then the guest's output one way, keyboard input the other, until the VM
stops (the service closes it) or the client closes it (it has detached).

The socket is mode 0600 and a peer whose uid (SO_PEERCRED) is neither the service's nor
root is refused; a request is at most ``MAX_REQUEST`` bytes and must arrive within
``REQUEST_TIMEOUT`` seconds of the previous answer; at most ``MAX_CONNECTIONS`` at a time.
Anything else -- garbage, a frame too large, a peer that vanishes -- ends that connection
only. See docs/host.md.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from trivmm._unix_sockets import listen_unix_socket
from trivmm.host.manager import STOP_GRACE, HostManager
from trivmm.host.model import HostError, InvalidDefinition, UnknownVm, VmStateConflict, VmSummary

__all__ = ["ControlServer", "ProtocolError", "encode_frame", "summary_to_json", "peer_allowed", "MAX_REQUEST",
           "MAX_RESPONSE", "REQUEST_TIMEOUT", "MAX_CONNECTIONS", "SOCKET_NAME"]  # fmt: skip

_log = logging.getLogger(__name__)

SOCKET_NAME = "trivmm.sock"
MAX_REQUEST = 64 << 10
MAX_RESPONSE = 16 << 20
REQUEST_TIMEOUT = 300.0
MAX_CONNECTIONS = 64
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that breaks the protocol: the connection is answered once and closed."""


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode())
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("a request must be one UTF-8 JSON object") from None
    if not isinstance(message, dict):
        raise ProtocolError("a request must be one UTF-8 JSON object")
    return message


def summary_to_json(summary: VmSummary) -> dict[str, Any]:
    return {"name": summary.name, "state": summary.state.value, "vcpus": summary.vcpus, "memory": summary.memory,
            "display": list(summary.display) if summary.display else None, "autostart": summary.autostart,
            "last_exit": summary.last_exit}  # fmt: skip


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """Whether a peer with ``peer_uid`` may use the service of ``own_uid``: the same user, or root."""
    return peer_uid in (own_uid, 0)


def _peer_uid(stream: anyio.abc.SocketStream) -> int:
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class _Reader:
    """Frames off a stream, with whatever came after the last one kept (console input)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self.buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        while len(self.buffer) < size:
            try:
                chunk = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                if self.buffer:
                    raise ProtocolError("the connection ended inside a request") from None
                return False
            self.buffer += chunk
        return True

    async def frame(self, limit: int) -> bytes | None:
        """The next frame's body, or None at a clean end of the stream."""
        if not await self._fill(_HEADER.size):
            return None
        (size,) = _HEADER.unpack_from(self.buffer)
        if size > limit:
            raise ProtocolError(f"a request is at most {limit} bytes (this one says {size})")
        if not await self._fill(_HEADER.size + size):
            raise ProtocolError("the connection ended inside a request")
        body = bytes(self.buffer[_HEADER.size : _HEADER.size + size])
        del self.buffer[: _HEADER.size + size]
        return body


def _kind(exc: HostError) -> str:
    if isinstance(exc, UnknownVm):
        return "unknown-vm"
    if isinstance(exc, VmStateConflict):
        return "conflict"
    if isinstance(exc, InvalidDefinition):
        return "invalid"
    return "failure"


def _string(request: Mapping[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str):
        raise InvalidDefinition(f"the request needs {key!r} (a string)")
    return value


class ControlServer:
    """The control socket at ``path`` for ``manager``: bound in the constructor (a
    ``ConfigError`` if another process listens there), served by ``serve()``."""

    def __init__(self, manager: HostManager, path: Path) -> None:
        self.manager = manager
        self.path = path
        self._sock, self._socket_id = listen_unix_socket(str(path), "the control socket", backlog=64)
        self._connections = 0
        self._uid = os.geteuid()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients until cancelled; the socket file is removed on the way out."""
        listener = await anyio.abc.SocketListener.from_socket(self._sock)
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # out of fds, say: wait rather than spin
                        _log.warning("control socket: accept failed: %s", exc)
                        await anyio.sleep(0.1)
                        continue
                    if self._connections >= MAX_CONNECTIONS:
                        await anyio.aclose_forcefully(stream)
                        continue
                    self._connections += 1
                    tg.start_soon(self._serve_client, stream)
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(self.path)
            except OSError:
                pass

    async def _serve_client(self, stream: anyio.abc.SocketStream) -> None:
        try:
            async with stream:
                try:
                    await self._converse(stream)
                except ProtocolError as exc:  # answered once, then the connection is closed
                    with anyio.move_on_after(1):
                        await stream.send(encode_frame({"ok": False, "kind": "protocol", "error": str(exc)}))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away
        except Exception:  # a bug here ends this connection, never the service
            _log.exception("control socket: a request failed")
        finally:
            self._connections -= 1

    async def _converse(self, stream: anyio.abc.SocketStream) -> None:
        if not peer_allowed(_peer_uid(stream), self._uid):
            raise ProtocolError("permission denied: this trivmm service belongs to another user")
        reader = _Reader(stream)
        while True:
            body = None
            with anyio.move_on_after(REQUEST_TIMEOUT):
                body = await reader.frame(MAX_REQUEST)
            if body is None:  # the client closed (or kept quiet too long)
                return
            request = decode_body(body)
            if request.get("op") == "console":
                await self._console(stream, reader, request)
                return
            await stream.send(encode_frame(await self._answer(request)))

    async def _answer(self, request: Mapping[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = self._handlers().get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "kind": "protocol", "error": f"unknown request {op!r}"}
        try:
            return {"ok": True, "result": await handler(request)}
        except HostError as exc:
            return {"ok": False, "kind": _kind(exc), "error": str(exc)}

    def _handlers(self) -> dict[str, Callable[[Mapping[str, Any]], Awaitable[Any]]]:
        return {"ping": self._ping, "list": self._list, "info": self._info, "define": self._define,
                "undefine": self._undefine, "start": self._lifecycle, "stop": self._lifecycle,
                "reset": self._lifecycle, "pause": self._lifecycle, "resume": self._lifecycle,
                "snapshot": self._snapshot, "migrate": self._migrate, "events": self._events}  # fmt: skip

    async def _ping(self, request: Mapping[str, Any]) -> Any:
        return {"pid": os.getpid(), "protocol": 1}

    async def _list(self, request: Mapping[str, Any]) -> Any:
        return [summary_to_json(summary) for summary in self.manager.list()]

    async def _info(self, request: Mapping[str, Any]) -> Any:
        name = _string(request, "name")
        info = summary_to_json(self.manager.info(name))
        display = self.manager.display_socket(name)
        info.update(run_args=list(self.manager.definition(name).run_args),
                    console_log=str(self.manager.console_log(name)),
                    display_socket=str(display) if display else None)  # fmt: skip
        return info

    async def _define(self, request: Mapping[str, Any]) -> Any:
        run_args = request.get("run_args", [])
        if not isinstance(run_args, list):
            raise InvalidDefinition("the request's 'run_args' must be a list of strings")
        autostart = request.get("autostart", False)
        summary = await self.manager.define(_string(request, "name"), run_args, autostart=autostart is True)
        return summary_to_json(summary)

    async def _undefine(self, request: Mapping[str, Any]) -> Any:
        await self.manager.undefine(_string(request, "name"))
        return None

    async def _lifecycle(self, request: Mapping[str, Any]) -> Any:
        name, op = _string(request, "name"), request["op"]
        if op == "stop":
            timeout = request.get("timeout", STOP_GRACE)
            if not isinstance(timeout, (int, float)) or not 0 <= timeout <= 3600:
                raise InvalidDefinition("a stop's timeout is 0 to 3600 seconds")
            summary = await self.manager.stop(name, force=request.get("force") is True, timeout=float(timeout))
        else:
            summary = await getattr(self.manager, op)(name)
        return summary_to_json(summary)

    async def _snapshot(self, request: Mapping[str, Any]) -> Any:
        path = _string(request, "path")
        if not os.path.isabs(path):
            raise InvalidDefinition(f"the snapshot path must be absolute, not {path!r}")
        return summary_to_json(await self.manager.snapshot(_string(request, "name"), Path(path)))

    async def _migrate(self, request: Mapping[str, Any]) -> Any:
        return summary_to_json(await self.manager.migrate(_string(request, "name"), _string(request, "uri")))

    async def _events(self, request: Mapping[str, Any]) -> Any:
        name = request.get("name")
        limit = request.get("limit", 20)
        if (name is not None and not isinstance(name, str)) or not isinstance(limit, int) or not 0 < limit <= 1000:
            raise InvalidDefinition("'events' takes an optional VM name and a limit of 1 to 1000")
        return [{"time": e.time, "vm": e.vm, "kind": e.kind, "state": e.state.value if e.state else None,
                 "detail": e.detail} for e in self.manager.events(name, limit=limit)]  # fmt: skip

    async def _console(self, stream: anyio.abc.SocketStream, reader: _Reader, request: Mapping[str, Any]) -> None:
        """Attach: answer ok, then pump bytes both ways until the VM stops or the client leaves."""
        try:
            name = _string(request, "name")
            attachment_context = self.manager.console(name)
            attachment = await attachment_context.__aenter__()
        except HostError as exc:
            await stream.send(encode_frame({"ok": False, "kind": _kind(exc), "error": str(exc)}))
            return
        try:
            await stream.send(encode_frame({"ok": True, "result": {"history": len(attachment.history)}}))
            if attachment.history:
                await stream.send(attachment.history)
            pending = bytes(reader.buffer)  # input that came with the request
            reader.buffer.clear()

            async with anyio.create_task_group() as tg:
                async def output() -> None:
                    try:
                        while True:
                            await stream.send(await attachment.receive())
                    except anyio.EndOfStream:  # the VM stopped
                        pass
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass  # the client went away mid-stream
                    tg.cancel_scope.cancel()

                async def keyboard() -> None:
                    data = pending
                    try:
                        while True:
                            if data:
                                await attachment.send(data)
                            data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
                        pass  # the client detached, or the VM stopped
                    tg.cancel_scope.cancel()

                tg.start_soon(output)
                tg.start_soon(keyboard)
        finally:
            with anyio.CancelScope(shield=True):
                await attachment_context.__aexit__(None, None, None)
