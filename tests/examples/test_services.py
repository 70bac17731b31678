"""The example services (examples/asyncio_service.py on uvicorn, examples/trio_service.py on
hypercorn's trio worker), each started as a subprocess and called over HTTP.

With no ``--kernel`` a service boots trivmm's built-in guest, which echoes the command from its
kernel command line: milliseconds per VM. A tiny guest that spins for ever
(tests/kvm/guests/cpl3_loop.S) stands in for a command that never ends. The Linux guest,
which really runs the command, is tests/examples/test_linux_command.py (e2e).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.examples.service import Service
from tests.kvm.guests import assemble
from trivmm.guest.builtin import builtin_guest

pytestmark = pytest.mark.kvm
KINDS = ["asyncio", "trio"]
MAX_VMS = 4
CONCURRENT_REQUESTS = 20
CLEAN_SHUTDOWN = "shut down: 0 VMs running, 0 vCPU threads left"
UVICORN_CANCEL = "Task cancelled, timeout graceful shutdown exceeded"
# Quotes, backslashes, tabs, a newline, non-ASCII, shell syntax: all must come back as sent.
COMMAND = "uname -s; echo $((6*7)) 'single' \"double\" `tick` \\ tab\there\nünïcödé € # $HOME"


@pytest.fixture(scope="module", params=KINDS)
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One service per kind with the built-in guest, shared by this module's tests."""
    kind: str = request.param
    started = Service(kind, tmp_path_factory.mktemp(f"{kind}-service"), "--max-vms", str(MAX_VMS))
    yield started
    started.kill()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start a service of its own for one test; killed afterwards if the test did not stop it."""
    started: list[Service] = []

    def start_service(kind: str, *args: str) -> Service:
        started.append(Service(kind, tmp_path, *args))
        return started[-1]

    yield start_service
    for each in started:
        each.kill()


def test_healthz_says_which_event_loop_serves(service: Service) -> None:
    health = service.health()
    assert health["status"] == "ok"
    assert health["async_library"] == service.kind  # sniffio.current_async_library() in the app
    assert health["guest"] == "builtin" and health["max_vms"] == MAX_VMS


def test_run_echoes_the_command_through_the_builtin_guest(service: Service) -> None:
    response = service.run({"command": COMMAND})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output"] == COMMAND  # decoded from the command line the guest printed
    assert body["rc"] is None  # the built-in guest runs nothing
    assert body["exit"] == "poweroff"
    assert 0 < body["seconds"] < 10


def test_concurrent_requests_each_get_their_own_output(service: Service) -> None:
    commands = [f"echo request {index:02d}; {'x' * index}" for index in range(CONCURRENT_REQUESTS)]
    responses: dict[int, httpx.Response] = {}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as client, anyio.create_task_group() as tg:
            for index, command in enumerate(commands):

                async def one(index: int = index, command: str = command) -> None:
                    responses[index] = await client.post("/run", json={"command": command})

                tg.start_soon(one)

    served_before = service.health()["served"]
    started = time.monotonic()
    anyio.run(main)
    elapsed = time.monotonic() - started
    for index, command in enumerate(commands):
        assert responses[index].status_code == 200, responses[index].text
        assert responses[index].json()["output"] == command
    health = service.health()
    assert health["served"] == served_before + CONCURRENT_REQUESTS
    assert health["vms_running"] == 0
    assert 1 <= health["vms_peak"] <= MAX_VMS  # the capacity limiter held
    print(f"{service.kind}: {CONCURRENT_REQUESTS} requests in {elapsed:.2f} s, "
          f"at most {health['vms_peak']} VMs at once")  # fmt: skip


def test_bad_requests_are_400s_that_say_why(service: Service) -> None:
    fits = service.health()["max_command_bytes"]
    cases = [
        (b"not json", "the body is not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"cmd": "ls"}', "expected a JSON object"),
        (b'{"command": 42}', '"command" must be a non-empty string'),
        (b'{"command": "  "}', '"command" must be a non-empty string'),
        (b'{"command": "\\ud800"}', '"command" is not valid Unicode'),
        (json.dumps({"command": "x" * (fits + 1)}).encode(), "command too long for the kernel command line"),
        (b" " * (64 << 10) + b"{}", "request body over 65536 bytes"),
    ]
    for content, reason in cases:
        response = service.client.post("/run", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, (content[:50], response.text)
        assert reason in response.json()["error"], (content[:50], response.text)
    assert service.client.get("/run").status_code == 405
    longest = "x" * fits  # the limit is exact: this one still fits
    response = service.run({"command": longest})
    assert response.status_code == 200 and response.json()["output"] == longest


@pytest.fixture
def spinner(tmp_path: Path, binutils: None) -> Path:
    """A guest that never ends: a command that does not finish."""
    return assemble("cpl3_loop", tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_a_request_past_its_timeout_is_a_504_and_its_vm_is_stopped(
    kind: str, start: Callable[..., Service], spinner: Path
) -> None:
    service = start(kind, "--kernel", str(spinner), "--memory", "16M", "--timeout", "1")
    started = time.monotonic()
    response = service.run({"command": "never ends"})
    assert response.status_code == 504, response.text
    assert response.json()["error"] == "the request took longer than the timeout (1 s): its VM was stopped"
    assert time.monotonic() - started < 5
    assert service.health()["vms_running"] == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_signal_stops_the_vm_in_flight_and_the_service_exits_cleanly(
    kind: str, signum: int, start: Callable[..., Service], spinner: Path
) -> None:
    """With a VM running, the signal ends the service: past --shutdown-grace its request is
    cancelled and the VM torn down, and the process exits 0 with no vCPU thread left (the
    service logs the count once its server has stopped)."""
    service = start(kind, "--kernel", str(spinner), "--memory", "16M", "--shutdown-grace", "0.5")
    in_flight: list[object] = []

    def request() -> None:
        try:
            in_flight.append(httpx.post(f"{service.url}/run", json={"command": "never ends"}, timeout=60))
        except httpx.HTTPError as exc:  # the server closed the connection as it went down
            in_flight.append(exc)

    thread = threading.Thread(target=request)
    thread.start()
    deadline = time.monotonic() + 10
    while service.health()["vms_running"] != 1:
        assert time.monotonic() < deadline, "the request's VM did not start"
        time.sleep(0.02)
    started = time.monotonic()
    status = service.stop(signum)
    elapsed = time.monotonic() - started
    thread.join(30)
    assert status == 0, service.log
    assert CLEAN_SHUTDOWN in service.log, service.log
    # uvicorn logs the request it cancels at the end of the grace period, with its traceback; nothing else may
    assert service.log.count("Traceback") == service.log.count(f"CancelledError: {UVICORN_CANCEL}"), service.log
    assert in_flight and not (isinstance(in_flight[0], httpx.Response) and in_flight[0].status_code == 200)
    assert elapsed < 10, f"the shutdown took {elapsed:.1f} s"
    print(f"{kind}, {signal.Signals(signum).name}: exited 0 in {elapsed:.2f} s; the request got {in_flight[0]!r}")


def test_a_vm_error_is_a_500_with_its_text(start: Callable[..., Service], tmp_path: Path) -> None:
    """A kernel that does not report the command, then one that is gone: 500s saying so; a
    service that cannot build a VM at all does not start."""
    kernel = tmp_path / "hello.elf"
    kernel.write_bytes(builtin_guest())  # boots, but runs no trivmm.cmd=
    service = start("asyncio", "--kernel", str(kernel), "--memory", "16M")
    response = service.run({"command": "true"})
    assert response.status_code == 500, response.text
    body = response.json()
    assert "the guest ended (poweroff) without reporting the command" in body["error"]
    assert "trivmm guest build" in body["error"] and "Hello from the trivmm built-in guest!" in body["console"]
    kernel.unlink()
    response = service.run({"command": "true"})
    assert response.status_code == 500, response.text
    assert "the VM failed: ConfigError: cannot read kernel" in response.json()["error"]
    assert service.stop(signal.SIGTERM) == 0
    assert CLEAN_SHUTDOWN in service.log

    with pytest.raises(AssertionError, match=r"(?s)exited with 1:\n.*cannot build a VM with these settings: "
                                             r"cannot read kernel"):  # fmt: skip
        start("trio", "--kernel", str(kernel))
