"""``EventFd``: a Linux eventfd a device backend awaits through the event loop's epoll.

The fast paths between a guest and a device backend never touch a vCPU thread or Python
on the guest's side: KVM signals an eventfd when the guest writes a notify register
(ioeventfd), and raises an interrupt when the backend signals one (irqfd). A backend is a
task that awaits its eventfds here -- ``anyio.wait_readable`` is epoll on trio and on
asyncio's selector loop -- and reads the counter without blocking.

Closing an fd a task may be waiting on goes through ``anyio.notify_closing`` first, so the
waiter gets ``ClosedResourceError`` rather than a wait on a recycled fd number.
"""

from __future__ import annotations

import os

import anyio
import anyio.lowlevel

__all__ = ["EventFd", "close_watched_fd"]


def close_watched_fd(fd: int) -> None:
    """Close ``fd``, which a task may be awaiting (``anyio.wait_readable``/``wait_writable``):
    that task gets ``anyio.ClosedResourceError`` rather than a wait on a recycled fd number.
    Called on the event loop's thread, or where no task can be waiting."""
    try:
        anyio.notify_closing(fd)
    except RuntimeError:  # no event loop in this thread: nobody can be waiting
        pass
    os.close(fd)


class EventFd:
    """A non-blocking, close-on-exec eventfd counter."""

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise anyio.ClosedResourceError
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def signal(self, count: int = 1) -> None:
        """Add ``count`` to the counter (what KVM does for an ioeventfd; what a backend does
        to raise an irqfd's interrupt). Any thread."""
        os.eventfd_write(self.fd, count)

    def take(self) -> int:
        """The counter's value, reset to zero; 0 when nothing was signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    async def wait(self) -> int:
        """Wait until signalled; return the counter's value (signals since the last take)."""
        while True:
            count = self.take()
            if count:
                await anyio.lowlevel.checkpoint()  # a wait is a checkpoint, signalled or not
                return count
            await anyio.wait_readable(self.fd)

    def close(self) -> None:
        """Close the fd; a task waiting on it gets ``anyio.ClosedResourceError``. Called on
        the event loop's thread (or when no task can be waiting)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close_watched_fd(fd)

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
