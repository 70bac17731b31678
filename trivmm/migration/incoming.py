"""The destination of a migration: listen, take one stream, build the VM it brings.

    async with trivmm.migration.listen("tcp:127.0.0.1:4444") as listener:
        vm = await listener.accept()        # restored, handed over (GO received), not yet running
    with vm:
        await vm.run()                      # RUNNING goes back to the source as it starts

``accept()`` reads the stream into a VM built with ``incoming=True`` (``restore_vm``),
answers READY once every section is applied, and waits for the source's GO; only then is
the VM returned, with a service that tells the source RUNNING when ``run()`` starts. Any
failure -- a bad or cut stream, a destination that does not fit, a source that goes away
before GO -- closes the VM being built, tells the source why (REFUSED) where the connection
still works, and raises ``MigrationError`` (or the ``ConfigError`` of a device the
destination cannot open); the listener can then ``accept()`` the next attempt.
``receive_vm(uri)`` does one attempt for any URI, ``file:`` included (a snapshot: no
hand-over).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from trivmm.config import VmConfig
from trivmm.errors import MigrationError
from trivmm.migration.snapshot import restore_vm
from trivmm.migration.stream import describe_io_error
from trivmm.migration.transport import AckDecoder, AckKind, Listener, MigrationUri, encode_ack, listen_on, parse_uri

if TYPE_CHECKING:
    from trivmm.console import ConsoleInput, ConsoleOutput
    from trivmm.vm import VM

__all__ = ["IncomingListener", "listen", "receive_vm", "HANDOVER_TIMEOUT", "INACTIVITY_TIMEOUT"]

HANDOVER_TIMEOUT = 60.0  # seconds the destination waits for GO after READY
INACTIVITY_TIMEOUT = 60.0  # seconds a receive of the incoming stream may wait for bytes
_REFUSAL_LINGER = 1.0  # seconds a refusing destination waits for the source to hang up
_log = logging.getLogger(__name__)


class IncomingListener:
    """A destination listening at ``uri`` (the port it got, for ``tcp:...:0``)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self.attempts = 0

    @property
    def uri(self) -> str:
        return str(self._listener.uri)

    async def accept(self, config: VmConfig | None = None, *, console_output: ConsoleOutput = None,
                     console_input: ConsoleInput = None, kvm_path: str = "/dev/kvm",
                     adapt: Callable[[VmConfig], VmConfig] | None = None) -> VM:  # fmt: skip
        """The VM the next incoming migration brings (see the module docstring); ``config``
        and ``adapt`` as for ``restore_vm``."""
        stream = await self._listener.accept()
        self.attempts += 1
        vm: VM | None = None
        try:
            # The stream may stall (a peer that sends a few bytes and nothing more): a receive
            # that waits longer than INACTIVITY_TIMEOUT ends this attempt, and the listener is
            # free for the next.
            vm = await restore_vm(_Patient(stream), config, console_output=console_output, console_input=console_input,
                                  kvm_path=kvm_path, adapt=_own_host_devices(adapt))  # fmt: skip
            await _send(stream, encode_ack(AckKind.READY))
            await _expect_go(stream)
            vm.add_service(functools.partial(_confirm_running, stream))
            return vm
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if vm is not None:
                    await anyio.to_thread.run_sync(vm.close)
                await _refuse(stream, exc)
            raise

    async def aclose(self) -> None:
        await self._listener.aclose()


@contextlib.asynccontextmanager
async def listen(uri: str) -> AsyncIterator[IncomingListener]:
    """Listen for migrations at ``uri`` (``tcp:HOST:PORT`` or ``unix:PATH``) while the
    block runs; the socket (and a unix socket's file) is gone after it."""
    target = parse_uri(uri)
    if target.scheme == "file":
        raise MigrationError(f"cannot listen on {uri}: a file is read, not listened on (receive_vm reads it)")
    listener = IncomingListener(await listen_on(target))
    try:
        yield listener
    finally:
        with anyio.CancelScope(shield=True):
            await listener.aclose()


async def receive_vm(uri: str | MigrationUri, config: VmConfig | None = None, *, console_output: ConsoleOutput = None,
                     console_input: ConsoleInput = None, kvm_path: str = "/dev/kvm",
                     adapt: Callable[[VmConfig], VmConfig] | None = None) -> VM:  # fmt: skip
    """One incoming migration at ``uri``: ``file:PATH`` restores the snapshot there; ``tcp:``
    and ``unix:`` listen, take one connection and hand its VM over (``accept``)."""
    target = parse_uri(uri) if isinstance(uri, str) else uri
    if target.scheme == "file":
        return await restore_vm(target.path, config, console_output=console_output, console_input=console_input,
                                kvm_path=kvm_path, adapt=adapt)  # fmt: skip
    async with listen(str(target)) as listener:
        return await listener.accept(config, console_output=console_output, console_input=console_input,
                                     kvm_path=kvm_path, adapt=adapt)  # fmt: skip


class _Patient:
    """The incoming stream's receive side, with an inactivity limit."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        with anyio.move_on_after(INACTIVITY_TIMEOUT):
            return await self._stream.receive(max_bytes)
        raise MigrationError(f"the source sent nothing for {INACTIVITY_TIMEOUT:g} s")


def _own_host_devices(adapt: Callable[[VmConfig], VmConfig] | None) -> Callable[[VmConfig], VmConfig]:
    """``adapt``, then a check that the destination names its own host devices.

    The stream of a network peer is untrusted, and its configuration names host resources:
    disk image paths (opened read-write), taps, the vsock socket path. Taken from the stream,
    they would let whoever reaches the listener choose which host files the VMM opens. So
    a destination that is given no config must replace every one the stream names (``adapt``:
    the CLI's ``--disk``/``--net``/``--vsock``); a snapshot file the user restores (``file:``,
    ``restore_vm``) is the user's own and keeps them."""

    def adapted(saved: VmConfig) -> VmConfig:
        config = adapt(saved) if adapt is not None else saved
        named = [f"{what} {', '.join(map(str, items))}" for what, items, mine in (
            ("disks", [d.path for d in saved.disks], config.disks is saved.disks and saved.disks),
            ("taps", [n.tap for n in saved.net], config.net is saved.net and saved.net),
            ("vsock", [saved.vsock.uds] if saved.vsock else [], config.vsock is saved.vsock and saved.vsock),
        ) if mine]  # fmt: skip
        if named:
            raise MigrationError("the incoming stream names host devices the destination did not give ("
                                 + "; ".join(named) + "): a destination opens only its own "
                                 "(run --incoming ... --disk/--net/--vsock; accept(config=...))")  # fmt: skip
        return config

    return adapted


async def _send(stream: anyio.abc.ByteSendStream, data: bytes) -> None:
    try:
        await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        raise MigrationError(f"the connection to the source broke ({describe_io_error(exc)})") from None


async def _expect_go(stream: anyio.abc.ByteStream) -> None:
    decoder = AckDecoder()
    with anyio.move_on_after(HANDOVER_TIMEOUT):
        while True:
            try:
                data = await stream.receive(4096)
            except anyio.EndOfStream:
                raise MigrationError("the source went away before it handed the guest over") from None
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise MigrationError(f"the connection to the source broke before the hand-over "
                                     f"({describe_io_error(exc)})") from None  # fmt: skip
            for ack in decoder.feed(data):
                if ack.kind is AckKind.GO:
                    return
                raise MigrationError(f"the source sent {ack.kind.name} where GO was due")
    raise MigrationError(f"the source did not hand the guest over within {HANDOVER_TIMEOUT:g} s")


async def _refuse(stream: anyio.abc.ByteStream, exc: BaseException) -> None:
    """Tell the source why (best effort), stop sending, let it hang up first (so that it
    reads the reason rather than a reset), and close."""
    reason = str(exc) if isinstance(exc, Exception) else "the destination was stopped"
    with anyio.move_on_after(_REFUSAL_LINGER):
        try:
            await stream.send(encode_ack(AckKind.REFUSED, reason))
            await stream.send_eof()
            while await stream.receive(1 << 16):
                pass
        except Exception:  # the connection is already gone: nothing to tell
            pass
    await anyio.aclose_forcefully(stream)


async def _confirm_running(stream: anyio.abc.ByteStream) -> None:
    """The VM's service: RUNNING to the source as the guest starts, then hang up."""
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + 5.0
        try:
            await stream.send(encode_ack(AckKind.RUNNING))
            await stream.send_eof()
        except Exception as exc:
            _log.warning("could not tell the source that the guest runs here: %s", exc)
        await anyio.aclose_forcefully(stream)
