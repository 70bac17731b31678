"""Making room for a unix socket the VMM listens on (vsock, QMP, VNC, a migration)."""

from __future__ import annotations

import os
import socket
import stat

from trivmm.errors import ConfigError

__all__ = ["make_room_for_socket"]


def make_room_for_socket(path: str, what: str) -> None:
    """Nothing at ``path``, or a socket nobody listens on (removed: a file left behind by a
    process that is gone); anything else is a ``ConfigError`` naming ``what`` and the path,
    and is left as it is."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{what}: cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what}: {path} exists and is not a socket (not replaced)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except BlockingIOError:
        pass  # a full backlog: someone listens
    except OSError as exc:
        raise ConfigError(f"{what}: cannot use {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"{what}: {path} is in use: another process listens there")
