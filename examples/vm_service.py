"""A small HTTP service that runs each request's shell command in a fresh VM.

This module is the service itself -- a Starlette app, which runs on anyio and therefore
under asyncio and under trio alike -- and what both server scripts share (settings, the
listening socket). ``asyncio_service.py`` serves it with uvicorn on asyncio,
``trio_service.py`` with hypercorn's trio worker. See README.md here.

    POST /run {"command": "uname -a"}
        -> 200 {"output": "...", "rc": 0, "exit": "poweroff", "seconds": 2.3}
    GET /healthz
        -> 200 {"status": "ok", "async_library": "trio", "vms_running": 0, ...}

Each request gets its own VM (``trivmm.open_vm``), booted with the service's settings and
the command on the kernel command line as ``trivmm.cmd=<base64url of the command>``:

* with ``--kernel`` (and ``--initrd``, trivmm's test initramfs: ``python3 -m trivmm guest
  build``), the guest's /init runs the command with busybox sh and prints its output between
  ``TRIVMM-CMD-BEGIN`` and ``TRIVMM-CMD-END rc=<status>`` (trivmm/guest/init.sh); ``output``
  is that text and ``rc`` that status;
* with no kernel, the VM is trivmm's built-in guest, a few hundred bytes that print their
  kernel command line and power off: the stand-in that makes this example runnable in
  milliseconds, anywhere /dev/kvm is. It runs nothing: ``output`` is the command as the guest
  echoed it back (decoded from its command line), and ``rc`` is null.

``exit`` is how the VM ended (``trivmm.StopReason``'s value: ``poweroff``, ``reset``,
``panic``, ...), ``seconds`` how long the VM ran. Errors are JSON ``{"error": "..."}``: 400
for a body that is not ``{"command": "<non-empty string>"}`` or a command too long for the
kernel command line, 504 when the request takes longer than ``--timeout`` (its VM is
stopped), 500 when the VM fails or the guest ends without reporting the command. At most
``--max-vms`` VMs run at once; further requests wait for a slot (within their timeout).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.abc
import sniffio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import trivmm

__all__ = ["Settings", "VmService", "prepare", "LINUX_CMDLINE_MAX"]

LINUX_CMDLINE_MAX = 2047  # x86 Linux keeps COMMAND_LINE_SIZE (2048) bytes of it, its NUL included
MAX_BODY = 64 << 10  # bytes of request body read
MAX_CONSOLE = 1 << 20  # bytes of a VM's console kept (the rest is read and dropped)
CONSOLE_TAIL = 2000  # characters of console shown with a 500 for a guest that did not report
TEARDOWN_WAIT = 15.0  # seconds the shutdown waits for cancelled requests' VMs to be torn down
CMD_PARAMETER = "trivmm.cmd="
_REPORTED = re.compile(rb"TRIVMM-CMD-BEGIN\r?\n(.*?)TRIVMM-CMD-END rc=(\d+)", re.DOTALL)
_ECHOED = re.compile(rb"\btrivmm\.cmd=([A-Za-z0-9_-]*)")
_ENV = "TRIVMM_SERVICE_"
log = logging.getLogger("trivmm-service")


@dataclass(frozen=True)
class Settings:
    """The service's settings: command-line flags, defaulting to TRIVMM_SERVICE_* variables."""

    kernel: Path | None = None
    initrd: Path | None = None
    memory: str = "128M"
    append: str = "quiet"
    timeout: float = 60.0
    max_vms: int = 4
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_grace: float = 5.0

    def vm_config(self, append: str | None = None) -> trivmm.VmConfig:
        return trivmm.VmConfig(kernel=self.kernel, initrd=self.initrd, memory=self.memory,
                               append=self.append if append is None else append)  # fmt: skip


def parse_settings(argv: Sequence[str] | None, server: str) -> Settings:
    env = os.environ
    default = Settings()
    # (argparse converts string defaults with the flag's type: a bad variable is reported as a bad flag)
    parser = argparse.ArgumentParser(description=f"Run shell commands in fresh trivmm VMs over HTTP ({server}). "
                                     "Each flag defaults to the TRIVMM_SERVICE_<FLAG> variable, e.g. "
                                     "TRIVMM_SERVICE_KERNEL.")  # fmt: skip
    parser.add_argument("--kernel", type=Path, default=env.get(_ENV + "KERNEL"),
                        help="a Linux kernel (bzImage or vmlinux); default: trivmm's built-in guest, which "
                             "echoes the command instead of running it")  # fmt: skip
    parser.add_argument("--initrd", type=Path, default=env.get(_ENV + "INITRD"),
                        help="its initramfs: trivmm's test initramfs runs trivmm.cmd= "
                             "(python3 -m trivmm guest build)")  # fmt: skip
    parser.add_argument("--memory", default=env.get(_ENV + "MEMORY", default.memory),
                        help=f"guest RAM per VM (default {default.memory})")  # fmt: skip
    parser.add_argument("--append", default=env.get(_ENV + "APPEND", default.append),
                        help=f"kernel command line before trivmm.cmd= (default {default.append!r}: kernel "
                             "messages stay out of the command's output)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=env.get(_ENV + "TIMEOUT", str(default.timeout)),
                        help=f"seconds a request may take, waiting for a VM slot included; then 504 "
                             f"(default {default.timeout:g}; a Linux boot on a nested host takes minutes)")  # fmt: skip
    parser.add_argument("--max-vms", type=int, default=env.get(_ENV + "MAX_VMS", str(default.max_vms)),
                        help=f"VMs running at once (default {default.max_vms})")  # fmt: skip
    parser.add_argument("--host", default=env.get(_ENV + "HOST", default.host),
                        help=f"address to listen on (default {default.host})")  # fmt: skip
    parser.add_argument("--port", type=int, default=env.get(_ENV + "PORT", str(default.port)),
                        help=f"port to listen on; 0 picks a free one (default {default.port})")  # fmt: skip
    parser.add_argument("--shutdown-grace", type=float,
                        default=env.get(_ENV + "SHUTDOWN_GRACE", str(default.shutdown_grace)),
                        help="seconds requests in flight get to finish on SIGINT/SIGTERM before they are "
                             f"cancelled and their VMs stopped (default {default.shutdown_grace:g})")  # fmt: skip
    args = parser.parse_args(argv)
    if args.max_vms < 1 or args.timeout <= 0 or args.shutdown_grace < 0:
        parser.error("--max-vms must be at least 1, --timeout above 0, --shutdown-grace at least 0")
    settings = replace(default, **vars(args))
    try:
        settings.vm_config()
    except trivmm.ConfigError as exc:
        parser.error(str(exc))
    return settings


class BadRequest(Exception):
    """What is wrong with a request, for its 400 response."""


def _error(status: int, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def vcpu_threads() -> int:
    """vCPU threads alive in this process (trivmm names them ``trivmm-vcpuN``)."""
    return sum(thread.name.startswith("trivmm-vcpu") for thread in threading.enumerate())


class VmService:
    """The Starlette app's state and endpoints. ``base_cmdline`` is the kernel command line a
    VM of these settings gets before ``trivmm.cmd=`` (``VM.cmdline``, from ``prepare``)."""

    def __init__(self, settings: Settings, base_cmdline: str) -> None:
        self.settings = settings
        self.base_cmdline = base_cmdline
        self.builtin = settings.kernel is None
        self.running = 0  # VMs now
        self.peak = 0  # most VMs at once so far
        self.served = 0  # requests answered 200
        self._limiter: anyio.CapacityLimiter | None = None

    def app(self) -> Starlette:
        routes = [Route("/healthz", self.healthz, methods=["GET"]), Route("/run", self.run, methods=["POST"])]
        return Starlette(routes=routes, lifespan=self.lifespan)

    @property
    def max_command(self) -> int:
        """The longest command (UTF-8 bytes) that fits on the kernel command line."""
        room = LINUX_CMDLINE_MAX - len(self.base_cmdline.encode()) - len(" " + CMD_PARAMETER)
        return max(0, room) * 3 // 4

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._limiter = anyio.CapacityLimiter(self.settings.max_vms)
        guest = "the built-in guest (commands are echoed)" if self.builtin else f"kernel {self.settings.kernel}"
        log.info("ready on %s: %s, up to %d VMs at once, %g s per request, commands up to %d bytes",
                 sniffio.current_async_library(), guest, self.settings.max_vms, self.settings.timeout,
                 self.max_command)  # fmt: skip
        try:
            yield
        finally:
            # The server has stopped taking requests and cancelled those past its grace
            # period; their VMs are torn down by open_vm, on worker threads: wait for that.
            with anyio.CancelScope(shield=True), anyio.move_on_after(TEARDOWN_WAIT):
                while self.running:
                    await anyio.sleep(0.05)
            log.info("shut down: %d VMs running, %d vCPU threads left", self.running, vcpu_threads())

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "async_library": sniffio.current_async_library(),
                             "guest": "builtin" if self.builtin else "linux", "vms_running": self.running,
                             "vms_peak": self.peak, "max_vms": self.settings.max_vms, "served": self.served,
                             "max_command_bytes": self.max_command})  # fmt: skip

    async def run(self, request: Request) -> JSONResponse:
        try:
            command = _command(await _read_json(request))
            append = self._append(command)
        except BadRequest as exc:
            return _error(400, str(exc))
        config = self.settings.vm_config(append)
        timeout = self.settings.timeout
        assert self._limiter is not None, "the app runs without its lifespan"
        started: float | None = None
        try:
            with anyio.fail_after(timeout):
                async with self._limiter:
                    started = time.monotonic()
                    console, result = await self._run_vm(config)
        except TimeoutError:
            what = "its VM was stopped" if started is not None else f"all {self.settings.max_vms} VM slots stayed busy"
            return _error(504, f"the request took longer than the timeout ({timeout:g} s): {what}")
        except trivmm.TrivmmError as exc:
            log.warning("VM failed: %s: %s", type(exc).__name__, exc)
            return _error(500, f"the VM failed: {type(exc).__name__}: {exc}")
        seconds = round(time.monotonic() - started, 3)
        reported = self._reported(console)
        if reported is None:
            tail = console.decode(errors="replace")[-CONSOLE_TAIL:]
            hint = "" if self.builtin else " (is --initrd trivmm's test initramfs? python3 -m trivmm guest build)"
            return _error(500, f"the guest ended ({result.reason.value}) without reporting the command{hint}",
                          exit=result.reason.value, console=tail)  # fmt: skip
        output, rc = reported
        self.served += 1
        return JSONResponse({"output": output, "rc": rc, "exit": result.reason.value, "seconds": seconds})

    def _append(self, command: str) -> str:
        try:
            encoded = _b64url(command.encode())
        except UnicodeEncodeError:
            raise BadRequest('"command" is not valid Unicode') from None
        append = " ".join(part for part in (self.settings.append, CMD_PARAMETER + encoded) if part)
        length = len(f"{self.base_cmdline} {CMD_PARAMETER}{encoded}".encode())
        if length > LINUX_CMDLINE_MAX:
            raise BadRequest(f"command too long for the kernel command line: {len(command.encode())} bytes "
                             f"make it {length} bytes, over the {LINUX_CMDLINE_MAX} Linux takes; "
                             f"commands up to {self.max_command} bytes fit")  # fmt: skip
        return append

    async def _run_vm(self, config: trivmm.VmConfig) -> tuple[bytes, trivmm.VmExit]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            async with trivmm.open_vm(config) as vm:
                console = await _read_console(vm.console)
                return console, await vm.wait()
        finally:
            self.running -= 1

    def _reported(self, console: bytes) -> tuple[str, int | None] | None:
        """(output, rc) as the guest reported them, or None if it did not."""
        if self.builtin:
            echoed = _ECHOED.search(console)
            return None if echoed is None else (_unb64url(echoed[1]).decode(errors="replace"), None)
        found = _REPORTED.search(console)
        if found is None:
            return None
        return found[1].replace(b"\r\n", b"\n").decode(errors="replace"), int(found[2])


async def _read_json(request: Request) -> object:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None


def _command(body: object) -> str:
    if not isinstance(body, dict) or "command" not in body:
        raise BadRequest('expected a JSON object {"command": "<shell command>"}')
    command = body["command"]
    if not isinstance(command, str) or not command.strip():
        raise BadRequest('"command" must be a non-empty string')
    return command


async def _read_console(console: anyio.abc.ByteReceiveStream) -> bytes:
    """The VM's console output until it ends: the first ``MAX_CONSOLE`` bytes."""
    out = bytearray()
    while True:
        try:
            chunk = await console.receive()
        except anyio.EndOfStream:
            return bytes(out)
        out += chunk[: MAX_CONSOLE - len(out)]


def _probe_cmdline(settings: Settings) -> str:
    """Build (not run) a VM of these settings: bad input or an unusable /dev/kvm fails here,
    at start-up, not on the first request. Returns the VM's kernel command line."""
    with trivmm.VM(settings.vm_config()) as vm:
        return vm.cmdline


def prepare(argv: Sequence[str] | None, server: str) -> tuple[Settings, Starlette, socket.socket]:
    """What both server scripts do first: settings from ``argv``, logging, trivmm's signal
    handler (from the main thread), a check of the VM settings, the app, and a listening
    socket, announced on stdout as ``... listening on http://HOST:PORT``."""
    settings = parse_settings(argv, server)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    trivmm.install_signal_handler()
    try:
        base_cmdline = _probe_cmdline(settings)
    except trivmm.TrivmmError as exc:
        raise SystemExit(f"trivmm-service: cannot build a VM with these settings: {exc}") from None
    app = VmService(settings, base_cmdline).app()
    sock = socket.create_server((settings.host, settings.port), backlog=128)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"trivmm-service ({server}) listening on http://{host}:{port}", flush=True)
    return settings, app, sock
