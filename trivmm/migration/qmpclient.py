"""A small QMP client for the CLI's ``migrate`` and ``snapshot`` verbs: connect to a
``run --api-sock`` socket, negotiate, run commands one at a time, keep the events that
arrive meanwhile. (The tests drive the server with the ``qemu.qmp`` package; the CLI does
not depend on it.)"""

from __future__ import annotations

import json
import os
from typing import Any

import anyio
import anyio.abc

from trivmm.errors import ConfigError, TrivmmError
from trivmm.migration.stream import describe_io_error

__all__ = ["QmpClient", "QmpCommandError", "MAX_LINE"]

MAX_LINE = 1 << 20


class QmpCommandError(TrivmmError):
    """The server answered a command with an error (its ``desc``)."""


class QmpClient:
    """One QMP connection. ``await QmpClient.connect(path)``; ``execute(command, args)``
    returns the command's ``return`` value or raises ``QmpCommandError``; ``events`` holds
    what arrived meanwhile (oldest first)."""

    def __init__(self, stream: anyio.abc.ByteStream, path: str) -> None:
        self._stream = stream
        self.path = path
        self._buffer = bytearray()
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 10.0) -> QmpClient:
        """Connect and negotiate capabilities; ``ConfigError`` when nothing answers at ``path``."""
        path = os.fspath(path)
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_unix(path)
        except TimeoutError:
            raise ConfigError(f"the control socket {path} does not answer") from None
        except OSError as exc:
            raise ConfigError(f"cannot connect to the control socket {path}: {exc.strerror or exc}") from None
        client = cls(stream, path)
        try:
            with anyio.fail_after(timeout):
                greeting = await client._message()
                if "QMP" not in greeting:
                    raise ConfigError(f"{path} is not a QMP socket (it said {str(greeting)[:80]})")
                await client.execute("qmp_capabilities")
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        try:
            await self._stream.send(json.dumps(request).encode() + b"\n")
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise TrivmmError(f"the control socket {self.path} closed ({describe_io_error(exc)})") from None
        while True:
            message = await self._message()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") != self._next_id:
                continue
            if "error" in message:
                raise QmpCommandError(str(message["error"].get("desc", message["error"])))
            return message.get("return")

    async def _message(self) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    raise TrivmmError(f"the control socket {self.path} sent something that is not JSON") from None
                if isinstance(message, dict):
                    return message
                continue
            if len(self._buffer) > MAX_LINE:
                raise TrivmmError(f"the control socket {self.path} sent a message over {MAX_LINE} bytes")
            try:
                data = await self._stream.receive(65536)
            except anyio.EndOfStream:
                raise TrivmmError(f"the control socket {self.path} closed the connection") from None
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise TrivmmError(f"the control socket {self.path} broke ({describe_io_error(exc)})") from None
            self._buffer += data

    async def aclose(self) -> None:
        await anyio.aclose_forcefully(self._stream)
