"""OS threads owned by trio tasks, stopped by a kick rather than abandoned.

``run_in_owned_thread(fn, stop)`` runs ``fn`` on a thread and waits for it. If the
calling task is cancelled, ``stop()`` is called (from the event loop's thread) and the task
keeps waiting until ``fn`` returns: a vCPU thread is never left running behind a finished
task. Then the cancellation is raised as usual. An exception from ``fn`` is raised in the
task.

The kick itself is a real-time signal sent to the thread with ``pthread_kill``: it makes a
blocking KVM_RUN return EINTR. Its handler does nothing; what matters is that one is
installed (the default action would end the process), which only the main thread can do.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import TypeVar

import outcome
import trio

from trivmm.errors import VmError

__all__ = ["run_in_owned_thread", "KICK_SIGNAL", "ensure_kick_handler", "kick_thread"]

T = TypeVar("T")
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


async def run_in_owned_thread(fn: Callable[[], T], stop: Callable[[], None], name: str) -> T:
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    stopped = False

    def deliver(result: outcome.Outcome[T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def abort(raise_cancel: object) -> trio.lowlevel.Abort:
        nonlocal stopped
        if not stopped:
            stopped = True
            stop()
        return trio.lowlevel.Abort.FAILED  # we are rescheduled when fn returns

    trio.lowlevel.start_thread_soon(fn, deliver, name=name)
    value: T = await trio.lowlevel.wait_task_rescheduled(abort)
    if stopped:
        await trio.lowlevel.checkpoint()  # raises the pending Cancelled
    return value
