"""The control socket against well-behaved and hostile clients: garbage, oversize frames,
idle and vanishing peers, a console client that disconnects mid-stream."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.host.test_manager import tiny_guest_test
from tests.kvm.guests import assemble
from trivmm.host import HostError, serve
from trivmm.host import control as control_module
from trivmm.host.control import MAX_REQUEST, encode_frame, peer_allowed
from trivmm.host.service import ServiceInfo
from trivmm.host.verbs import ControlClient, RemoteError, ServiceUnavailable


@pytest.fixture
async def service(state_dir: Path) -> AsyncIterator[ServiceInfo]:
    async with anyio.create_task_group() as tg:
        info = await tg.start(lambda task_status: serve(state_dir, None, task_status=task_status, out=io.StringIO()))
        yield info
        tg.cancel_scope.cancel()


async def read_frame(stream: anyio.abc.ByteReceiveStream) -> dict[str, Any]:
    data = b""
    with anyio.fail_after(10):
        while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
            data += await stream.receive()
    (size,) = struct.unpack(">I", data[:4])
    assert len(data) == 4 + size, "nothing may follow an answer"
    answer = json.loads(data[4:])
    assert isinstance(answer, dict)
    return answer


async def ask(stream: anyio.abc.ByteStream, request: dict[str, Any]) -> dict[str, Any]:
    await stream.send(encode_frame(request))
    return await read_frame(stream)


async def closed_by_peer(stream: anyio.abc.ByteStream) -> bool:
    with anyio.fail_after(10):
        try:
            while await stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            return True
    return False


async def test_the_socket_is_private_and_answers_requests(service: ServiceInfo) -> None:
    assert stat.S_IMODE(os.lstat(service.control_socket).st_mode) == 0o600
    async with await anyio.connect_unix(service.control_socket) as stream:
        assert (await ask(stream, {"op": "ping"}))["result"]["pid"] == os.getpid()
        answer = await ask(stream, {"op": "define", "name": "hello", "run_args": []})
        assert answer["ok"] and answer["result"]["state"] == "stopped"
        assert (await ask(stream, {"op": "list"}))["result"][0]["name"] == "hello"
        answer = await ask(stream, {"op": "start", "name": "nope"})
        assert answer == {"ok": False, "kind": "unknown-vm", "error": "no VM named 'nope' is defined"}
        answer = await ask(stream, {"op": "define", "name": "bad", "run_args": ["--vcpus", "x"]})
        assert answer["kind"] == "invalid" and "invalid int value" in answer["error"]
        answer = await ask(stream, {"op": "define", "name": "bad", "run_args": "--vcpus 2"})
        assert answer["kind"] == "invalid"
        answer = await ask(stream, {"op": "frobnicate"})
        assert answer["kind"] == "protocol" and "unknown request" in answer["error"]
        answer = await ask(stream, {"op": "snapshot", "name": "hello", "path": "relative.snap"})
        assert answer["kind"] == "invalid"
        assert (await ask(stream, {"op": "info", "name": "hello"}))["result"]["run_args"] == []


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a size of 1.1 GiB
    struct.pack(">I", MAX_REQUEST + 1) + b"{}",
    struct.pack(">I", 5) + b"\xff\xfe{}}",
    struct.pack(">I", 2) + b"[]",
    encode_frame({"op": "console"}),  # no name
])  # fmt: skip
async def test_garbage_gets_an_error_and_the_service_goes_on(service: ServiceInfo, garbage: bytes) -> None:
    async with await anyio.connect_unix(service.control_socket) as stream:
        await stream.send(garbage)
        answer = await read_frame(stream)
        assert not answer["ok"] and answer["kind"] in ("protocol", "invalid"), answer
    async with await anyio.connect_unix(service.control_socket) as stream:
        assert (await ask(stream, {"op": "ping"}))["ok"]


async def test_vanishing_idle_and_surplus_clients_do_not_hold_the_service(
        service: ServiceInfo, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    async with await anyio.connect_unix(service.control_socket) as stream:
        await stream.send(struct.pack(">I", 100) + b'{"op": "pi')  # half a request, then gone
    monkeypatch.setattr(control_module, "REQUEST_TIMEOUT", 0.2)
    idle = await anyio.connect_unix(service.control_socket)
    assert await closed_by_peer(idle)  # no request within the timeout: closed
    await idle.aclose()
    monkeypatch.setattr(control_module, "REQUEST_TIMEOUT", 60)
    monkeypatch.setattr(control_module, "MAX_CONNECTIONS", 2)
    held = [await anyio.connect_unix(service.control_socket) for _ in range(2)]
    for stream in held:
        assert (await ask(stream, {"op": "ping"}))["ok"]
    surplus = await anyio.connect_unix(service.control_socket)
    assert await closed_by_peer(surplus)
    await surplus.aclose()
    for stream in held:
        await stream.aclose()
    await anyio.sleep(0.1)
    async with await anyio.connect_unix(service.control_socket) as stream:
        assert (await ask(stream, {"op": "ping"}))["ok"]


def test_only_the_same_user_or_root_may_connect() -> None:
    assert peer_allowed(1000, 1000) and peer_allowed(0, 1000) and peer_allowed(0, 0)
    assert not peer_allowed(1001, 1000) and not peer_allowed(1000, 0)


async def test_one_service_per_state_directory(service: ServiceInfo) -> None:
    with pytest.raises(HostError, match="another trivmm service uses the state directory"):
        await serve(service.state_dir, None, out=io.StringIO())


async def test_the_client_names_a_missing_service_and_the_service_errors(service: ServiceInfo,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    with pytest.raises(ServiceUnavailable, match=r"no trivmm service at .*/trivmm.sock: start it with `python -m "
                       r"trivmm serve --state-dir"):  # fmt: skip
        ControlClient(tmp_path)

    def client_side() -> None:
        with ControlClient(service.state_dir) as client:
            with pytest.raises(RemoteError) as raised:
                client.request("start", name="nope")
            assert (raised.value.kind, raised.value.exit_status) == ("unknown-vm", 2)
            assert client.request("ping")["protocol"] == 1

    await anyio.to_thread.run_sync(client_side)


@tiny_guest_test
async def test_a_console_client_that_vanishes_mid_stream_leaves_the_vm_and_service_running(
        service: ServiceInfo, tmp_path: Path) -> None:  # fmt: skip
    counter = assemble("serial_counter", tmp_path)
    async with await anyio.connect_unix(service.control_socket) as control:
        run_args = ["--kernel", str(counter), "--memory", "16M"]
        assert (await ask(control, {"op": "define", "name": "count", "run_args": run_args}))["ok"]
        assert (await ask(control, {"op": "start", "name": "count"}))["result"]["state"] == "running"
        for _ in range(3):
            console = await anyio.connect_unix(service.control_socket)
            await console.send(encode_frame({"op": "console", "name": "count"}) + b"typed with the request\n")
            received = b""
            with anyio.fail_after(10):
                while received.count(b"\n") < 5:
                    received += await console.receive()
            (size,) = struct.unpack(">I", received[:4])
            assert json.loads(received[4 : 4 + size])["ok"] is True  # then the console's raw bytes
            await console.aclose()  # gone without a word, the guest still printing
        answer = await ask(control, {"op": "info", "name": "count"})
        assert answer["result"]["state"] == "running"
        answer = await ask(control, {"op": "console", "name": "nope"})
        assert answer["kind"] == "unknown-vm"
    async with await anyio.connect_unix(service.control_socket) as control:
        assert (await ask(control, {"op": "stop", "name": "count", "force": True}))["result"]["state"] == "stopped"
        answer = await ask(control, {"op": "console", "name": "count"})
        assert answer["kind"] == "conflict" and "start it to attach" in answer["error"]


@tiny_guest_test
async def test_a_console_client_that_never_reads_holds_up_neither_the_guest_nor_the_service(
        service: ServiceInfo, tmp_path: Path) -> None:  # fmt: skip
    counter = assemble("serial_counter", tmp_path)
    log = service.state_dir / "vms" / "count" / "console.log"
    async with await anyio.connect_unix(service.control_socket) as control:
        run_args = ["--kernel", str(counter), "--memory", "16M"]
        assert (await ask(control, {"op": "define", "name": "count", "run_args": run_args}))["ok"]
        assert (await ask(control, {"op": "start", "name": "count"}))["ok"]
        async with await anyio.connect_unix(service.control_socket) as stalled:
            await stalled.send(encode_frame({"op": "console", "name": "count"}))
            await anyio.sleep(1)  # its socket buffers fill up: it reads nothing
            size = log.stat().st_size
            for _ in range(5):
                with anyio.fail_after(2):
                    assert (await ask(control, {"op": "ping"}))["ok"]
                await anyio.sleep(0.2)
            assert log.stat().st_size > size  # the guest printed on meanwhile
        answer = await ask(control, {"op": "stop", "name": "count", "force": True})
        assert answer["result"]["state"] == "stopped"
