"""``python -m trivmm serve``: the manager, the control socket and the web console together."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import TextIO

import anyio
import anyio.abc
import attrs

from trivmm.errors import ConfigError
from trivmm.host.control import SOCKET_NAME, ControlServer
from trivmm.host.manager import HostManager, make_state_dir
from trivmm.host.model import HostError

__all__ = ["serve", "ServiceInfo", "DEFAULT_LISTEN", "parse_listen", "LOCK_NAME"]

DEFAULT_LISTEN = ("127.0.0.1", 8006)
LOCK_NAME = "trivmm.lock"


@attrs.frozen
class ServiceInfo:
    """Where a running service can be reached (``task_status.started()``'s value)."""

    state_dir: Path
    control_socket: Path
    web_url: str | None
    web_token_file: Path | None


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[V6ADDR]:PORT``) or ``none``; ``ConfigError`` otherwise."""
    if text.strip().lower() == "none":
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"bad --listen {text!r} (use HOST:PORT, e.g. 127.0.0.1:8006, or none)")
    return host, int(port)


def _lock_state_dir(state_dir: Path) -> int:
    """An exclusive lock on STATE/trivmm.lock, held for the service's life (the kernel drops
    it when the process dies, however it dies)."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostError(f"another trivmm service uses the state directory {state_dir}") from None
    return fd


async def serve(state_dir: Path, listen: tuple[str, int] | None, *,
                task_status: anyio.abc.TaskStatus[ServiceInfo] = anyio.TASK_STATUS_IGNORED,
                out: TextIO | None = None) -> None:  # fmt: skip
    """Run the host service on ``state_dir`` until cancelled: its VMs, the control socket
    STATE/trivmm.sock and, unless ``listen`` is None, the web console on (host, port). Where it
    listens is printed to ``out`` (default stdout) and passed to ``task_status.started()``.
    On the way out every running VM is stopped ("service stopped")."""
    out = sys.stdout if out is None else out
    state_dir = Path(state_dir).absolute()
    try:
        make_state_dir(state_dir)  # before the lock file: a directory others may write is refused
    except HostError as exc:
        raise ConfigError(str(exc)) from None  # bad input (exit status 2), as before
    lock = _lock_state_dir(state_dir)
    try:
        async with HostManager.open(state_dir) as manager, anyio.create_task_group() as tg:
            control = ControlServer(manager, state_dir / SOCKET_NAME)
            await tg.start(control.serve)
            print(f"trivmm: host service on {state_dir}: {len(manager.list())} VM(s) defined", file=out)
            print(f"trivmm: control socket {control.path}", file=out)
            web_url = token_file = None
            if listen is not None:
                try:
                    from trivmm.host.web import serve_web
                except ImportError:
                    print("trivmm: the web console is not available in this trivmm", file=out)
                else:
                    host, port = listen
                    actual = await tg.start(serve_web, manager, host, port, state_dir)
                    shown = f"[{host}]" if ":" in host else host
                    web_url, token_file = f"http://{shown}:{actual}/", state_dir / "web-token"
                    print(f"trivmm: web console {web_url} (login token in {token_file})", file=out)
            out.flush()
            task_status.started(ServiceInfo(state_dir, control.path, web_url, token_file))
            await anyio.sleep_forever()
    finally:
        os.close(lock)
