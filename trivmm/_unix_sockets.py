"""The unix sockets the VMM listens on (vsock, QMP, VNC, a migration): room made, mode 0600."""

from __future__ import annotations

import os
import socket
import stat

from trivmm.errors import ConfigError

__all__ = ["make_room_for_socket", "listen_unix_socket"]


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


def listen_unix_socket(path: str, what: str, *, backlog: int = 16,
                       nonblocking: bool = False) -> tuple[socket.socket, tuple[int, int]]:  # fmt: skip
    """A listening unix socket at ``path`` (room made as ``make_room_for_socket`` does), mode
    0600 before anyone can connect: it is chmod-ed between bind() and listen(), and a
    connect before listen() is refused. Returns the socket and the file's (st_dev, st_ino),
    so that its owner removes only its own file. ``ConfigError`` naming ``what`` otherwise;
    a file it bound is removed again."""
    make_room_for_socket(path, what)
    kind = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | (socket.SOCK_NONBLOCK if nonblocking else 0)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(path)
        try:
            os.chmod(path, 0o600)
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} was replaced while it was being set up")
            sock.listen(backlog)
        except BaseException:
            os.unlink(path)
            raise
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{what}: cannot listen on {path}: {exc.strerror or exc}") from None
    return sock, (st.st_dev, st.st_ino)
