"""The QMP control socket without a VM (trivmm/qmp): message framing and decoding, request
and argument checks, the socket file's rules, and a server with no VM attached -- status,
negotiation, errors, the migration hooks, events to many clients, and clients that misbehave
-- under trio and asyncio. tests/kvm/test_qmp.py drives it with a running VM."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trivmm.errors import ConfigError
from trivmm.qmp import MAX_MESSAGE, MIGRATION_UNAVAILABLE, QmpError, QmpServer
from trivmm.qmp.protocol import (
    Frame,
    MessageSplitter,
    MessageTooLong,
    Param,
    check_arguments,
    decode_message,
    event_message,
    parse_request,
)

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])


# --- framing ---------------------------------------------------------------------------------
def texts(frames: list[Frame]) -> list[bytes]:
    return [frame.text for frame in frames]


def test_messages_are_json_values_however_they_are_split() -> None:
    splitter = MessageSplitter()
    assert texts(splitter.feed(b'{"execute": "stop"}\n{"exe')) == [b'{"execute": "stop"}']
    assert texts(splitter.feed(b'cute": "c}{"}')) == [b'{"execute": "c}{"}']  # braces in strings
    assert texts(splitter.feed(b'{"a":\n  [1,\n   {"b": "\\"}"}]\n}')) == [b'{"a":\n  [1,\n   {"b": "\\"}"}]\n}']
    assert texts(splitter.feed(b'{"x": "\\')) == []  # an escape split across reads
    assert texts(splitter.feed(b'""}')) == [b'{"x": "\\""}']
    assert texts(splitter.feed(b"   \n\t\r\n")) == []


def test_garbage_ends_at_its_line_or_at_the_next_value() -> None:
    splitter = MessageSplitter()
    assert texts(splitter.feed(b'nope\nnull {"a": 1}] 5\n')) == [b"nope", b"null", b'{"a": 1}', b"]", b"5"]
    frames = splitter.feed(b'{"execute": "unterminated\n{"execute": "ok"}')
    assert frames[0].error is not None and "unterminated string" in frames[0].error
    assert frames[1] == Frame(b'{"execute": "ok"}')


def test_size_and_depth_are_bounded() -> None:
    splitter = MessageSplitter(limit=100, max_depth=4)
    (frame,) = splitter.feed(b"[[[[[1]]]]]")
    assert frame.error is not None and "nesting" in frame.error
    assert splitter.feed(b"[[[[1]]]]") == [Frame(b"[[[[1]]]]")]
    with pytest.raises(MessageTooLong) as caught:
        splitter.feed(b'{"ok": 1}{"x": "' + b"a" * 200)
    assert texts(caught.value.frames) == [b'{"ok": 1}']
    with pytest.raises(MessageTooLong):
        MessageSplitter(limit=100).feed(b'{"x": "' + b"a" * 200 + b'"}')  # whole, but too long


@given(st.lists(st.sampled_from([b'{"execute": "a"}', b'["x", {"y": "}"}]', b'"s\\"t"', b" ", b"\n"]), max_size=20),
       st.integers(min_value=1, max_value=7))  # fmt: skip
def test_any_split_gives_the_same_messages(parts: list[bytes], step: int) -> None:
    data = b"".join(parts)
    whole = MessageSplitter().feed(data)
    splitter = MessageSplitter()
    pieces = [frame for i in range(0, len(data), step) for frame in splitter.feed(data[i : i + step])]
    assert pieces == whole
    assert all(json.loads(frame.text) is not None for frame in whole)


# --- decoding and checks ------------------------------------------------------------------
@pytest.mark.parametrize("text", [b"{", b"{'a': 1}", b'{"a": NaN}', b"\xff", b"1" * 5000, b"nope",
                                  b'{"execute": "stop", "id": 1e999}'])  # fmt: skip
def test_what_is_not_json_is_a_parse_error(text: bytes) -> None:
    with pytest.raises(QmpError, match=r"^JSON parse error, ") as caught:
        decode_message(Frame(text))
    assert caught.value.error_class == "GenericError"


@pytest.mark.parametrize(
    ("message", "desc"),
    [
        ([1], "QMP input must be a JSON object"),
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
        ({"execute": 1}, "QMP input member 'execute' must be a string"),
        ({"execute": "stop", "arguments": []}, "QMP input member 'arguments' must be an object"),
        ({"execute": "stop", "extra": 1}, "QMP input member 'extra' is unexpected"),
        ({"exec-oob": "stop"}, "QMP input member 'exec-oob' is unexpected"),
    ],
)
def test_requests_are_checked_as_qemu_does(message: Any, desc: str) -> None:
    with pytest.raises(QmpError, match=desc):
        parse_request(message)


def test_arguments_are_checked_by_name_type_and_presence() -> None:
    params = {"uri": Param(str, required=True), "detach": Param(bool), "limit": Param(int, minimum=0)}
    check_arguments({"uri": "unix:/x", "detach": True, "limit": 0}, params)
    for arguments, desc in [
        ({}, "Parameter 'uri' is missing"),
        ({"uri": "x", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
        ({"uri": "x", "detach": 1}, "Invalid parameter type for 'detach', expected: boolean"),
        ({"uri": "x", "limit": True}, "Invalid parameter type for 'limit', expected: integer"),
        ({"uri": "x", "limit": 1.5}, "Invalid parameter type for 'limit', expected: integer"),
        ({"uri": "x", "limit": -1}, "Parameter 'limit' expects a value of at least 0"),
    ]:
        with pytest.raises(QmpError, match=desc):
            check_arguments(arguments, params)


def test_event_timestamps() -> None:
    assert event_message("STOP", now=12.5) == {"event": "STOP", "timestamp": {"seconds": 12, "microseconds": 500000}}
    message = event_message("MIGRATION", {"status": "active"})
    assert message["data"] == {"status": "active"} and message["timestamp"]["seconds"] > 1_600_000_000


# --- the socket file -------------------------------------------------------------------------
def test_the_socket_is_private_and_made_safely(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with QmpServer(None, path):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        with pytest.raises(ConfigError, match="is in use"):
            QmpServer(None, path)
    assert not path.exists()  # removed when closed

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: replaced
    with QmpServer(None, path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        QmpServer(None, path)
    assert path.read_text() == "not a socket"
    with pytest.raises(ConfigError, match="cannot listen"):
        QmpServer(None, tmp_path / "no-such-dir" / "qmp.sock")


# --- a server with no VM ---------------------------------------------------------------------
class RawClient:
    """A QMP client on a plain socket: what a hostile or careless client can send."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""
        self.events: list[dict[str, Any]] = []  # events that came while a reply was awaited

    @classmethod
    async def connect(cls, path: Path | str, *, negotiate: bool = True) -> RawClient:
        client = cls(await anyio.connect_unix(path))
        greeting = await client.receive()
        assert set(greeting["QMP"]) == {"version", "capabilities"}, greeting
        if negotiate:
            assert await client.execute("qmp_capabilities") == {"return": {}}
        return client

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def receive(self) -> dict[str, Any]:
        with anyio.fail_after(10):
            while b"\n" not in self._buffer:
                self._buffer += await self.stream.receive()
        line, self._buffer = self._buffer.split(b"\n", 1)
        assert line.isascii()
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def reply(self) -> dict[str, Any]:
        """The next message that is not an event (events meanwhile are kept for ``event()``)."""
        while "event" in (message := await self.receive()):
            self.events.append(message)
        return message

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        await self.send_raw(json.dumps(request).encode() + b"\n")
        return await self.reply()

    async def event(self, name: str) -> dict[str, Any]:
        """The next event, which must be ``name``."""
        message = self.events.pop(0) if self.events else await self.receive()
        assert message.get("event") == name, f"waiting for {name}, got {message}"
        assert set(message["timestamp"]) == {"seconds", "microseconds"}
        return message

    async def closed(self) -> bool:
        """Whether the server closes the connection (what it still sends is skipped)."""
        with anyio.fail_after(10):
            try:
                while await self.stream.receive():
                    pass
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def error(desc: str, error_class: str = "GenericError", **extra: Any) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}, **extra}


def run_server(backend: str, server: QmpServer, body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                await body()
                tg.cancel_scope.cancel()

    with server:
        anyio.run(main, backend=backend)


@BACKENDS
def test_negotiation_commands_and_errors(backend: str, tmp_path: Path) -> None:
    server = QmpServer(None, tmp_path / "qmp.sock")

    async def body() -> None:
        client = await RawClient.connect(server.path, negotiate=False)
        expecting = error("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        assert await client.execute("query-status", id=7) == {**expecting, "id": 7}
        assert await client.execute("qmp_capabilities", {"enable": ["oob"]}) == error("Capability 'oob' not available")
        assert await client.execute("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
        assert await client.execute("qmp_capabilities") == error(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound")  # fmt: skip
        status = {"status": "prelaunch", "running": False, "singlestep": False}
        assert await client.execute("query-status", id={"any": ["json"]}) == {"return": status,
                                                                               "id": {"any": ["json"]}}  # fmt: skip
        names = {entry["name"] for entry in (await client.execute("query-commands"))["return"]}
        assert names == {"qmp_capabilities", "query-status", "stop", "cont", "system_powerdown", "system_reset",
                         "quit", "query-commands", "query-version", "migrate", "migrate_cancel", "query-migrate",
                         "migrate-set-parameters"}  # fmt: skip
        version = (await client.execute("query-version"))["return"]
        assert set(version["qemu"]) == {"major", "minor", "micro"} and version["package"].startswith("trivmm ")

        assert await client.execute("no-such-command", id=1) == error(
            "The command no-such-command has not been found", "CommandNotFound", id=1)  # fmt: skip
        assert await client.execute("stop", {"now": True}) == error("Parameter 'now' is unexpected")
        assert await client.execute("stop") == error("the VM is not running yet (status: prelaunch)")
        assert await client.execute("system_powerdown") == error("the VM is not running yet (status: prelaunch)")
        for command, arguments in [("migrate", {"uri": "unix:/x"}), ("migrate_cancel", {}), ("query-migrate", {}),
                                   ("migrate-set-parameters", {"downtime-limit": 30})]:  # fmt: skip
            assert await client.execute(command, arguments) == error(MIGRATION_UNAVAILABLE)
        assert await client.execute("migrate", {}) == error("Parameter 'uri' is missing")

        # Malformed input: an error each, and the connection goes on.
        await client.send_raw(b'{"execute": }\nnope\n[1]\n{"execute": "x", "id": 3, "extra": 1}\n')
        assert (await client.reply())["error"]["desc"].startswith("JSON parse error, ")
        assert (await client.reply())["error"]["desc"].startswith("JSON parse error, ")
        assert await client.reply() == error("QMP input must be a JSON object")
        assert await client.reply() == error("QMP input member 'extra' is unexpected", id=3)
        await client.send_raw(json.dumps({"execute": "query-status", "id": 9}, indent=4).encode())  # no newline
        assert await client.reply() == {"return": status, "id": 9}
        await client.aclose()

    run_server(backend, server, body)


class FakeMigration:
    """A MigrationControl that records what it is asked and reports through the server."""

    def __init__(self) -> None:
        self.server: QmpServer | None = None
        self.calls: list[tuple[str, Any]] = []

    async def migrate(self, uri: str, arguments: Mapping[str, Any]) -> None:
        if not uri.startswith(("tcp:", "unix:", "file:")):
            raise QmpError(f"unknown migration protocol: {uri}")
        self.calls.append(("migrate", dict(arguments)))
        assert self.server is not None
        self.server.emit_migration("setup")

    async def migrate_cancel(self) -> None:
        self.calls.append(("cancel", None))
        raise RuntimeError("a bug in the migration code")

    async def query_migrate(self) -> Mapping[str, Any]:
        return {"status": "active", "ram": {"transferred": 4096, "remaining": 0, "total": 4096}}

    async def set_parameters(self, parameters: Mapping[str, Any]) -> None:
        self.calls.append(("parameters", dict(parameters)))

    def run_state(self) -> str | None:
        return "inmigrate"


@BACKENDS
def test_migration_commands_reach_the_control_and_its_events_the_clients(backend: str, tmp_path: Path) -> None:
    migration = FakeMigration()
    server = migration.server = QmpServer(None, tmp_path / "qmp.sock", migration=migration)

    async def body() -> None:
        client = await RawClient.connect(server.path)
        assert (await client.execute("query-status"))["return"]["status"] == "inmigrate"
        assert await client.execute("migrate", {"uri": "tcp:10.0.0.2:4444", "detach": True}, id=1) == {
            "return": {}, "id": 1}  # fmt: skip
        assert (await client.event("MIGRATION"))["data"] == {"status": "setup"}
        assert await client.execute("migrate", {"uri": "exec:cat"}) == error("unknown migration protocol: exec:cat")
        assert (await client.execute("query-migrate"))["return"]["ram"]["transferred"] == 4096
        assert await client.execute("migrate-set-parameters", {"downtime-limit": 30, "max-bandwidth": 1 << 30}) == {
            "return": {}}  # fmt: skip
        assert await client.execute("migrate-set-parameters", {"downtime-limit": -1}) == error(
            "Parameter 'downtime-limit' expects a value of at least 0")  # fmt: skip
        assert await client.execute("migrate-set-parameters", {"downtime-limit": 10**400}) == error(
            "Parameter 'downtime-limit' expects a value of at most 2000000")  # fmt: skip
        cancelled = await client.execute("migrate_cancel")  # the control's bug: that command fails, nothing else
        assert cancelled == error("internal error: RuntimeError: a bug in the migration code")
        assert (await client.execute("query-status"))["return"]["status"] == "inmigrate"
        server.emit_migration("completed")
        assert (await client.event("MIGRATION"))["data"] == {"status": "completed"}
        await client.aclose()

    run_server(backend, server, body)
    assert migration.calls == [("migrate", {"uri": "tcp:10.0.0.2:4444", "detach": True}),
                               ("parameters", {"downtime-limit": 30, "max-bandwidth": 1 << 30}),
                               ("cancel", None)]  # fmt: skip


@BACKENDS
def test_quit_without_a_vm_ends_the_server(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"

    async def main() -> None:
        with QmpServer(None, path) as server, anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve)
                client = await RawClient.connect(path)
                watcher = await RawClient.connect(path)
                assert await client.execute("quit") == {"return": {}}
                for each in (client, watcher):
                    shutdown = await each.event("SHUTDOWN")
                    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
                    assert await each.closed()
            # serve() returned by itself, and took its socket file with it
            assert not path.exists()

    anyio.run(main, backend=backend)


@BACKENDS
def test_many_clients_and_clients_that_misbehave(backend: str, tmp_path: Path) -> None:
    server = QmpServer(None, tmp_path / "qmp.sock", max_clients=24)

    async def body() -> None:
        clients = [await RawClient.connect(server.path) for _ in range(20)]
        unnegotiated = await RawClient.connect(server.path, negotiate=False)
        server.emit_event("STOP")
        for client in clients:
            assert set(await client.event("STOP")) == {"event", "timestamp"}  # no data: none is sent
        assert await unnegotiated.execute("qmp_capabilities") == {"return": {}}  # no event before it

        # Too many at once: the next one is told so and closed; the others go on.
        extra = [await RawClient.connect(server.path) for _ in range(3)]
        refused = RawClient(await anyio.connect_unix(server.path))
        assert await refused.receive() == error("too many QMP clients (at most 24)")
        assert await refused.closed()
        for client in extra:
            await client.aclose()

        # A message past the size bound: an error, and that connection is closed.
        big = clients.pop()
        await big.send_raw(b'{"execute": "query-status"}{"execute": "' + b"a" * (MAX_MESSAGE + 10))
        assert (await big.reply())["return"]["status"] == "prelaunch"  # what came before it is answered
        assert (await big.reply())["error"]["desc"].startswith("JSON parse error, a message is longer than")
        assert await big.closed()

        # Gone mid-request, mid-message, mid-reply: nothing else notices.
        for data in [b'{"execute": "query-commands"}\n' * 50, b'{"execute": "query-st', b"\xff\xfe"]:
            leaver = await RawClient.connect(server.path)
            await leaver.send_raw(data)
            await leaver.aclose()
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(server.path)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
        raw.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-commands"}\n')
        raw.close()

        # A client that never reads its events is dropped; one that reads gets them all.
        reader, sleeper = clients[:2]
        for client in clients[2:]:
            await client.aclose()
        received: list[int] = []

        async def read_events() -> None:
            while len(received) < 5000:
                message = await reader.receive()
                received.append(message["data"]["n"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_events)
            for n in range(5000):
                server.emit_event("TICK", {"n": n})
                await anyio.sleep(0)
        assert received == list(range(5000))
        assert await sleeper.closed()
        assert (await reader.execute("query-status"))["return"]["status"] == "prelaunch"

    run_server(backend, server, body)
