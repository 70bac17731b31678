"""The one place trivmm calls ``ioctl(2)``, and the errors it raises."""

from __future__ import annotations

import errno
import os
from typing import Any

from trivmm.errors import TrivmmError
from trivmm.kvm._ffi import IOCTLS, ffi, libc
from trivmm.kvm.constants import Cap

__all__ = ["KvmError", "KvmUnavailable", "MissingCapability", "FdObject", "ULONG"]


class KvmError(TrivmmError, OSError):
    """An ioctl on a KVM file descriptor failed; the message names the ioctl (an
    ``OSError`` with its errno, and one of trivmm's own errors)."""

    def __init__(self, request: str, err: int, detail: str = "") -> None:
        message = f"{request} failed: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, message)
        self.request = request


class KvmUnavailable(KvmError):
    """``/dev/kvm`` is missing, not accessible, or speaks another API version."""


class MissingCapability(KvmError):
    """The host's KVM lacks a capability trivmm needs; the message names it."""

    def __init__(self, cap: Cap) -> None:
        super().__init__("KVM_CHECK_EXTENSION", errno.ENOTSUP, f"host KVM lacks KVM_CAP_{cap.name}")
        self.cap = cap


def ULONG(value: int) -> Any:
    """An integer ioctl argument: cffi's variadic ``ioctl`` takes only cdata."""
    return ffi.cast("unsigned long", value)


_NULL = ULONG(0)


class FdObject:
    """Base of ``Kvm``, ``Vm`` and ``Vcpu``: owns one fd and issues ioctls on it."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ioctl(self, request: str, arg: Any = _NULL) -> int:
        """Issue ``request`` (a KVM_* name) with a cdata ``arg``; return the result >= 0."""
        rc: int = libc.ioctl(self.fd, IOCTLS[request], arg)
        if rc < 0:
            raise KvmError(request, ffi.errno)
        return rc

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
