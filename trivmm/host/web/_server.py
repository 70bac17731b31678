"""``serve_web``: the web console's app served by hypercorn on the running event loop
(hypercorn.trio under trio, hypercorn.asyncio under asyncio)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import hypercorn.config
import sniffio

from trivmm.host.model import HostError
from trivmm.host.web._app import WebConsole
from trivmm.host.web._auth import load_or_create_token

if TYPE_CHECKING:
    from trivmm.host.manager import HostManager

__all__ = ["serve_web"]

_log = logging.getLogger("trivmm.host.web")


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HostError(f"cannot listen on {host}:{port}: {exc.strerror}.") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HostError(f"cannot listen on {host}:{port}: {exc.strerror}.") from exc
    return sock


def _config(sock: socket.socket) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the listening socket from here
    config.accesslog = None
    config.errorlog = _log
    config.graceful_timeout = 1.0
    config.websocket_max_message_size = 1 << 20
    config.include_server_header = False
    return config


async def serve_web(manager: HostManager, host: str, port: int, state_dir: Path, *,
                    task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Serve the web console for ``manager`` on ``host:port`` until cancelled. The log-in
    token is read from (or first written to) ``state_dir/web-token``, mode 0600.
    ``task_status.started(port)`` reports the port once the socket listens (0 picks one)."""
    token = load_or_create_token(state_dir)
    app = WebConsole(manager, token).app()
    sock = _listen(host, port)
    actual_port: int = sock.getsockname()[1]
    try:
        config = _config(sock)
    except BaseException:
        sock.close()
        raise
    serve = _hypercorn_serve(sniffio.current_async_library())
    stop = anyio.Event()

    async def run() -> None:
        # shielded: hypercorn (asyncio's above all) does not take being cancelled well; it is
        # stopped through its shutdown trigger instead, and gives requests graceful_timeout
        with anyio.CancelScope(shield=True):
            await serve(app, config, shutdown_trigger=stop.wait)

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        task_status.started(actual_port)
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()


def _hypercorn_serve(library: str) -> Callable[..., Awaitable[None]]:
    if library == "trio":
        import hypercorn.trio

        return hypercorn.trio.serve  # type: ignore[no-any-return]
    import hypercorn.asyncio

    return hypercorn.asyncio.serve  # type: ignore[no-any-return]
