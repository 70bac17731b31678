"""OS threads owned by async tasks, and calls from those threads back into the event loop.

trivmm's async code is written once, on anyio, and runs under trio and under asyncio. Two
things anyio does not spell the way a VMM needs them live here:

* ``LoopCaller`` -- a *non-blocking* "call this soon on the event loop" for threads that
  must never wait for the loop (a vCPU thread that just put console output in a buffer,
  under a device lock). ``anyio.from_thread.run_sync`` waits for the call to finish, so
  we use the backend's own primitive: trio's ``TrioToken.run_sync_soon``, asyncio's
  ``loop.call_soon_threadsafe``. A call made after the loop has finished is dropped.

* ``run_in_owned_thread(fn, stop, name)`` -- runs ``fn`` on a new thread and waits for it.
  If the calling task is cancelled, ``stop()`` is called (on the event loop's thread) and
  the task keeps waiting, shielded, until ``fn`` returns: a vCPU thread is never left
  running behind a finished task. Then the cancellation goes on as usual. An exception
  from ``fn`` is raised in the task (it wins over a cancellation that arrived meanwhile).

The kick that stops a vCPU is a real-time signal sent to its thread with ``pthread_kill``:
it makes a blocking KVM_RUN return EINTR. Its handler does nothing; what matters is that one
is installed (the default action would end the process), which only the main thread can do.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import sniffio

from trivmm.errors import VmError

__all__ = ["run_in_owned_thread", "LoopCaller", "KICK_SIGNAL", "ensure_kick_handler", "kick_thread"]

T = TypeVar("T")
_log = logging.getLogger(__name__)
KICK_SIGNAL = signal.SIGRTMIN


def _ignore_kick(signum: int, frame: object) -> None:
    pass


def ensure_kick_handler() -> None:
    """Install the no-op handler for ``KICK_SIGNAL`` if none is; refuse if we cannot."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise VmError(
            "trivmm stops vCPUs with a signal (SIGRTMIN) and needs a handler for it; "
            "call trivmm.install_signal_handler() once from the main thread first"
        )
    signal.signal(KICK_SIGNAL, _ignore_kick)


def kick_thread(ident: int) -> None:
    try:
        signal.pthread_kill(ident, KICK_SIGNAL)
    except ProcessLookupError:  # the thread is already gone
        pass


_libc = ctypes.CDLL(None)
_libc.pthread_self.restype = ctypes.c_ulong
_libc.pthread_setname_np.argtypes = [ctypes.c_ulong, ctypes.c_char_p]


def _name_os_thread(name: str) -> None:
    """Name the calling OS thread (``top -H``, ``/proc/PID/task/*/comm``; 15 bytes max)."""
    _libc.pthread_setname_np(_libc.pthread_self(), name.encode()[:15])


def _guarded(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    """A callback's exception is logged: on trio it would end the whole run (every VM on
    the loop), on asyncio it would only reach the loop's exception handler."""
    try:
        fn(*args)
    except Exception:
        _log.exception("a call from a vCPU or worker thread into the event loop failed")


def _as_asyncio(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    token = sniffio.current_async_library_cvar.set("asyncio")
    try:
        _guarded(fn, args)
    finally:
        sniffio.current_async_library_cvar.reset(token)


class LoopCaller:
    """Schedules calls on one event loop from any thread, without waiting for them."""

    __slots__ = ("_call_soon",)

    def __init__(self, call_soon: Callable[..., object]) -> None:
        self._call_soon = call_soon

    @classmethod
    def current(cls) -> LoopCaller:
        """The caller for the event loop running in this thread (trio or asyncio)."""
        native = anyio.lowlevel.current_token().native_token
        run_sync_soon = getattr(native, "run_sync_soon", None)  # trio.lowlevel.TrioToken
        if run_sync_soon is not None:
            return cls(lambda fn, *args: run_sync_soon(_guarded, fn, args))
        call_soon_threadsafe = native.call_soon_threadsafe  # type: ignore[attr-defined]  # asyncio loop

        def call_soon(fn: Callable[..., object], *args: Any) -> None:
            # A callback on asyncio runs outside any task, where anyio cannot tell which
            # event loop it is on (trio's callbacks carry it). Say so, for the callback's
            # anyio calls (a cancel scope, a task group's start_soon).
            call_soon_threadsafe(_as_asyncio, fn, args)

        return cls(call_soon)

    def call_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop's thread soon; a finished loop drops the call."""
        try:
            self._call_soon(fn, *args)
        except RuntimeError:  # trio.RunFinishedError, or asyncio's "Event loop is closed"
            pass


class _Outcome(Generic[T]):
    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: T | None = None
        self.error: BaseException | None = None

    def unwrap(self) -> T:
        if self.error is not None:
            error, self.error = self.error, None  # no reference cycle through the traceback
            raise error
        return self.value  # type: ignore[return-value]


async def run_in_owned_thread(fn: Callable[[], T], stop: Callable[[], None], name: str) -> T:
    done = anyio.Event()
    caller = LoopCaller.current()
    result: _Outcome[T] = _Outcome()

    def body() -> None:
        try:
            _name_os_thread(name)
            result.value = fn()
        except BaseException as exc:
            result.error = exc
        finally:
            caller.call_soon(done.set)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        stop()
        with anyio.CancelScope(shield=True):
            await done.wait()
        thread.join()  # it has only its return left: no thread outlives its task
        if result.error is None:
            raise
    thread.join()
    return result.unwrap()
