"""HostManager: every VM of the host, run in this process through trivmm's public API.

A VM's definition is ``python -m trivmm run``'s options (parsed by run's own parser). While
it runs, a ``trivmm.VM`` runs in a task of the manager's task group; its console output goes
to a bounded log on disk (STATE/vms/NAME/console.log) and to attached consoles; a VM with a
display gets a VNC server on STATE/vms/NAME/vnc.sock. Every operation on one VM holds that
VM's lock, so a start and a stop of one VM never interleave; a forced stop signals the VM
first and then waits its turn. States and events are recorded in the store (SQLite) as they
happen, so a service that is killed finds its definitions on its next start.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import functools
import logging
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio
import anyio.abc
import attrs

from trivmm._groups import first_error
from trivmm.errors import ConfigError, TrivmmError
from trivmm.host.consolelog import CONSOLE_LOG_LIMIT, ConsoleLog, tail
from trivmm.host.model import (
    HostError,
    HostEvent,
    InvalidDefinition,
    UnknownVm,
    VmDefinition,
    VmState,
    VmStateConflict,
    VmSummary,
    check_vm_name,
)
from trivmm.host.store import Store

if TYPE_CHECKING:
    from trivmm.config import VmConfig
    from trivmm.vm import VM, VmExit
    from trivmm.vnc import VncServer

__all__ = ["HostManager", "ConsoleAttachment", "default_state_dir", "make_state_dir", "vm_config", "CONSOLE_HISTORY",
           "SUBSCRIBER_BUFFER", "ATTACHMENT_BUFFER", "RESET_LIMIT", "STOP_GRACE"]  # fmt: skip

CONSOLE_HISTORY = 64 << 10  # bytes of the console log an attaching console gets first
SUBSCRIBER_BUFFER = 1000  # events a subscriber may lag behind before the oldest are dropped
ATTACHMENT_BUFFER = 1024  # console chunks an attached console may lag behind (oldest dropped)
STOP_GRACE = 30.0  # seconds a guest gets to power off after its power button, by default
RESET_LIMIT = (5, 60.0)  # a guest that resets more often than this (times, seconds) is not booted again
STATE_DB = "trivmm.db"
# run's options the service provides itself, or that do not fit a VM it keeps
_REFUSED_OPTIONS = {"incoming": "--incoming", "vnc": "--vnc", "api_sock": "--api-sock"}

T = TypeVar("T")
_log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    """/var/lib/trivmm for root; else $XDG_STATE_HOME/trivmm, or ~/.local/state/trivmm."""
    if os.geteuid() == 0:
        return Path("/var/lib/trivmm")
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "trivmm"
    return Path.home() / ".local" / "state" / "trivmm"


def make_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` (mode 0700) if it is absent, and refuse one that someone else
    could have planted or may change: not a directory, not owned by this user, or writable
    by its group or others (a ``/tmp/vms`` another user made first could hold their
    ``web-token``, or VM definitions with autostart). ``HostError`` saying which."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(state_dir)
    except OSError as exc:
        raise HostError(f"cannot make the state directory {state_dir}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise HostError(f"the state directory {state_dir} is not a directory")
    if st.st_uid != os.geteuid():
        raise HostError(f"the state directory {state_dir} belongs to uid {st.st_uid}, not to this user "
                        f"({os.geteuid()}): use a directory of your own")  # fmt: skip
    if st.st_mode & 0o022:
        raise HostError(f"the state directory {state_dir} can be written by others (mode "
                        f"{stat.S_IMODE(st.st_mode):o}): chmod 700 it, or use another")  # fmt: skip


def vm_config(run_args: Sequence[str]) -> VmConfig:
    """The ``VmConfig`` of a VM definition's run options; ``InvalidDefinition`` with run's
    own message for bad ones, and for the options the service does not take."""
    from trivmm.cli import parse_run_args, vm_config_from_args

    if isinstance(run_args, str) or not all(isinstance(arg, str) for arg in run_args):
        raise InvalidDefinition("a VM's run options are a list of strings")
    try:
        args = parse_run_args(run_args)
        for attribute, option in _REFUSED_OPTIONS.items():
            if getattr(args, attribute) is not None:
                raise InvalidDefinition(f"{option} is not for a VM of the host service (its display gets a VNC "
                                        "socket of its own; migrate and snapshot it with `vm migrate` and "
                                        "`vm snapshot`)")  # fmt: skip
        return vm_config_from_args(args)
    except ConfigError as exc:
        raise InvalidDefinition(f"bad run options: {exc}") from None


def _check_inputs(config: VmConfig) -> None:
    """``HostError`` for a kernel or initrd that is not a regular file, or a disk that is
    neither a regular file nor a block device: reading a FIFO blocks the build's worker
    thread for good (the start cannot be cancelled, stopped or outlived by the service)
    and /dev/zero never ends. A path that is absent is left to the build to report."""
    inputs = [("kernel", config.kernel, False), ("initrd", config.initrd, False)]
    inputs += [("disk", disk.path, True) for disk in config.disks]
    for what, path, block_ok in inputs:
        if path is None:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or (block_ok and stat.S_ISBLK(mode))):
            kind = "a file or block device" if block_ok else "a regular file"
            raise InvalidDefinition(f"the {what} {path} is not {kind}")


class _BoundedQueue(Generic[T]):
    """A queue for one reader that never blocks its writer: when full, the oldest item goes."""

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[T] = collections.deque(maxlen=limit)
        self._ready = anyio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        if self._closed:
            return
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> T:
        """The next item; ``anyio.EndOfStream`` once closed and empty."""
        while not self._items:
            if self._closed:
                raise anyio.EndOfStream
            await self._ready.wait()
            if not self._items and not self._closed:
                self._ready = anyio.Event()
        return self._items.popleft()


@attrs.define(eq=False)
class _Vm:
    """One VM of the host: its definition, state and, while it runs, its VMM."""

    definition: VmDefinition
    config: VmConfig
    state: VmState
    last_exit: str | None
    lock: anyio.Lock = attrs.field(factory=anyio.Lock)
    vm: VM | None = None
    ended: anyio.Event | None = None  # set once the VM's task has cleaned up
    log: ConsoleLog | None = None
    attachments: set[_BoundedQueue[bytes]] = attrs.field(factory=set)
    vnc_path: Path | None = None  # while a VNC server listens there
    stop_detail: str | None = None  # why the host stopped it, once it has asked
    resets: list[float] = attrs.field(factory=list)
    undefined: bool = False


class _ConsoleFanout(anyio.abc.ByteSendStream):
    """A running VM's console_output: to the log on disk and to each attached console."""

    def __init__(self, entry: _Vm) -> None:
        self._entry = entry

    async def send(self, item: bytes) -> None:
        entry = self._entry
        if entry.log is not None:
            try:
                entry.log.write(item)
            except OSError:  # a full disk loses console history, never the VM
                entry.log.close()
                entry.log = None
        for queue in list(entry.attachments):
            queue.put(bytes(item))
        await anyio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


@attrs.define(eq=False)
class ConsoleAttachment:
    """A console attached to a running VM: ``history`` (the log's tail at attach time),
    ``receive()`` for what the guest writes next (``anyio.EndOfStream`` when the VM stops),
    ``send()`` to type into its serial port (``anyio.BrokenResourceError`` once it stopped)."""

    history: bytes
    _queue: _BoundedQueue[bytes]
    _vm: VM
    _ended: anyio.Event

    async def receive(self) -> bytes:
        return await self._queue.get()

    async def send(self, data: bytes) -> None:
        if self._ended.is_set():
            raise anyio.BrokenResourceError("the VM has stopped")
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await self._ended.wait()
                    scope.cancel()

                tg.start_soon(watch)
                await self._vm.console.send(data)
                tg.cancel_scope.cancel()
        if scope.cancelled_caught:
            raise anyio.BrokenResourceError("the VM has stopped")

    @property
    def dropped(self) -> int:
        """Console chunks this attachment lost because it did not keep up."""
        return self._queue.dropped


@attrs.define(eq=False)
class HostManager:
    """Every VM of one host (one per service). Make it with ``HostManager.open(state_dir)``."""

    state_dir: Path
    store: Store
    _task_group: anyio.abc.TaskGroup
    _vms: dict[str, _Vm] = attrs.field(factory=dict)
    _subscribers: set[_BoundedQueue[HostEvent]] = attrs.field(factory=set)
    _closing: bool = False

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, state_dir: Path) -> AsyncIterator[HostManager]:
        """The manager of the VMs kept in ``state_dir`` (created, mode 0700): reconciles the
        recorded states with the fact that no VM runs yet (those recorded as running are
        stopped, "service restarted"), starts the autostart VMs, and on exit stops every VM."""
        state_dir = Path(state_dir).absolute()
        make_state_dir(state_dir)
        (state_dir / "vms").mkdir(mode=0o700, exist_ok=True)
        store = Store(state_dir / STATE_DB)
        try:
            async with anyio.create_task_group() as tg:
                manager = cls(state_dir, store, tg)
                manager._reconcile()
                try:
                    yield manager
                finally:
                    with anyio.CancelScope(shield=True):
                        await manager._shut_down()
                    tg.cancel_scope.cancel()
        finally:
            store.close()

    def _reconcile(self) -> None:
        for stored in self.store.vms():
            definition = stored.definition
            problem = None
            try:
                config = vm_config(definition.run_args)
            except InvalidDefinition as exc:  # an option this trivmm lacks: listed, refuses to start
                from trivmm.config import VmConfig

                config, problem = VmConfig(), str(exc)
            state, last_exit = stored.state, stored.last_exit
            if state.active:
                self.store.set_state(definition.name, VmState.STOPPED, "service restarted",
                                     last_exit="service restarted")  # fmt: skip
                self._publish(HostEvent(time.time(), definition.name, "state", VmState.STOPPED, "service restarted"))
                state, last_exit = VmState.STOPPED, "service restarted"
            if problem is not None:
                last_exit = f"error: {problem}"
            self._vms[definition.name] = _Vm(definition, config, state, last_exit)
            if definition.autostart:
                self._task_group.start_soon(self._autostart, definition.name)

    async def _autostart(self, name: str) -> None:
        try:
            await self.start(name)
        except HostError:
            pass  # recorded as the VM's state and event

    async def _shut_down(self) -> None:
        self._closing = True
        async with anyio.create_task_group() as tg:
            for name, entry in self._vms.items():
                if entry.state.active:
                    tg.start_soon(functools.partial(self._stop_quietly, name))

    async def _stop_quietly(self, name: str) -> None:
        with contextlib.suppress(HostError):
            await self.stop(name, force=True, detail="service stopped")

    # --- definitions -----------------------------------------------------------------------
    async def define(self, name: str, run_args: Sequence[str], *, autostart: bool = False) -> VmSummary:
        """Define a VM; ``InvalidDefinition`` (a ``HostError``) for a bad name or options,
        ``VmStateConflict`` if the name is taken."""
        check_vm_name(name)
        config = vm_config(run_args)
        if name in self._vms:
            raise VmStateConflict(f"a VM named {name!r} is already defined")
        definition = VmDefinition(name, run_args, bool(autostart))
        self._publish(self.store.define(definition))
        directory = self.state_dir / "vms" / name
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / "console.log").unlink(missing_ok=True)  # an older VM's of the same name
        self._vms[name] = _Vm(definition, config, VmState.STOPPED, None)
        await anyio.lowlevel.checkpoint()
        return self.info(name)

    async def undefine(self, name: str) -> None:
        """Forget a stopped VM (its console log goes too); ``VmStateConflict`` while it runs."""
        entry = self._entry(name)
        async with entry.lock:
            if entry.state.active:
                raise VmStateConflict(f"VM {name!r} is {entry.state.value}: stop it before undefining it")
            entry.undefined = True
            del self._vms[name]
            self._publish(self.store.undefine(name))
            directory = self.state_dir / "vms" / name
            for leftover in ("console.log", "console.log.new", "vnc.sock"):
                (directory / leftover).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                directory.rmdir()

    def list(self) -> builtins.list[VmSummary]:
        """Every VM, sorted by name."""
        return [self._summary(entry) for _, entry in sorted(self._vms.items())]

    def info(self, name: str) -> VmSummary:
        return self._summary(self._entry(name))

    def definition(self, name: str) -> VmDefinition:
        return self._entry(name).definition

    def console_log(self, name: str) -> Path:
        """Where the VM's console output is kept (bounded, the newest bytes)."""
        self._entry(name)
        return self.state_dir / "vms" / name / "console.log"

    def events(self, name: str | None = None, *, limit: int = 100) -> builtins.list[HostEvent]:
        """The newest recorded events (of VM ``name``), oldest first."""
        if name is not None:
            self._entry(name)
        return self.store.events(name, limit=limit)

    def display_socket(self, name: str) -> Path | None:
        """The VM's VNC (RFB 3.8) unix socket while it runs with a display, else None."""
        return self._entry(name).vnc_path

    def _entry(self, name: str) -> _Vm:
        try:
            return self._vms[name]
        except (KeyError, TypeError):
            raise UnknownVm(f"no VM named {name!r} is defined") from None

    @staticmethod
    def _summary(entry: _Vm) -> VmSummary:
        config = entry.config
        return VmSummary(entry.definition.name, entry.state, config.vcpus, config.memory, config.display,
                         entry.definition.autostart, entry.last_exit)  # fmt: skip

    # --- events ----------------------------------------------------------------------------
    def _publish(self, event: HostEvent) -> None:
        for queue in list(self._subscribers):
            queue.put(event)

    def _set_state(self, entry: _Vm, state: VmState, detail: str = "", *, last_exit: str | None = None) -> None:
        entry.state = state
        if last_exit is not None:
            entry.last_exit = last_exit
        if entry.undefined:
            return
        name = entry.definition.name
        try:
            event = self.store.set_state(name, state, detail, last_exit=last_exit)
        except sqlite3.Error as exc:  # a full disk, an I/O error: the record is lost, never the VMs
            _log.error("cannot record VM %s as %s in %s: %s", name, state.value, self.store.path, exc)
            event = HostEvent(time.time(), name, "state", state, detail)
        self._publish(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[HostEvent]]:
        """``async with manager.subscribe() as events: async for event in events: ...``: the
        events from now on. A subscriber that lags more than ``SUBSCRIBER_BUFFER`` events
        behind loses the oldest; it never holds a VM up."""
        queue: _BoundedQueue[HostEvent] = _BoundedQueue(SUBSCRIBER_BUFFER)
        self._subscribers.add(queue)

        async def events() -> AsyncIterator[HostEvent]:
            while True:
                try:
                    yield await queue.get()
                except anyio.EndOfStream:
                    return

        try:
            yield events()
        finally:
            self._subscribers.discard(queue)
            queue.close()

    # --- the console -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def console(self, name: str) -> AsyncIterator[ConsoleAttachment]:
        """A console on the running VM ``name`` (``VmStateConflict`` when it does not run)."""
        entry = self._entry(name)
        vm, ended = entry.vm, entry.ended
        if vm is None or ended is None or ended.is_set() or not entry.state.active:
            raise VmStateConflict(f"VM {name!r} is {entry.state.value}: start it to attach to its console")
        queue: _BoundedQueue[bytes] = _BoundedQueue(ATTACHMENT_BUFFER)
        history = tail(self.state_dir / "vms" / name / "console.log", CONSOLE_HISTORY)
        entry.attachments.add(queue)
        try:
            yield ConsoleAttachment(history, queue, vm, ended)
        finally:
            entry.attachments.discard(queue)
            queue.close()

    # --- running ---------------------------------------------------------------------------
    async def start(self, name: str) -> VmSummary:
        """Boot the VM; returns once its vCPUs run. ``VmStateConflict`` when it runs already,
        ``HostError`` when it cannot be built (a kernel that is gone, ...)."""
        entry = self._entry(name)
        async with entry.lock:
            await self._start_locked(entry)
        return self._summary(entry)

    async def _start_locked(self, entry: _Vm) -> None:
        name = entry.definition.name
        if entry.undefined:
            raise UnknownVm(f"no VM named {name!r} is defined")
        if entry.state.active:
            raise VmStateConflict(f"VM {name!r} is already {entry.state.value}")
        if self._closing:
            raise HostError("the host service is shutting down")
        try:
            config = vm_config(entry.definition.run_args)
        except InvalidDefinition as exc:
            self._set_state(entry, VmState.CRASHED, str(exc), last_exit=f"error: {exc}")
            raise
        try:
            _check_inputs(config)
        except InvalidDefinition as exc:
            self._set_state(entry, VmState.CRASHED, f"start failed: {exc}", last_exit=f"error: {exc}")
            raise InvalidDefinition(f"VM {name!r} could not start: {exc}") from None
        entry.config = config
        self._set_state(entry, VmState.STARTING)
        directory = self.state_dir / "vms" / name
        directory.mkdir(mode=0o700, exist_ok=True)
        entry.stop_detail = None
        entry.log = ConsoleLog(directory / "console.log", CONSOLE_LOG_LIMIT)
        entry.ended = anyio.Event()
        try:
            vm, vnc = await self._build(entry, config, directory)
            await self._task_group.start(self._run, entry, vm, vnc)
        except Exception as exc:
            self._after_failed_start(entry, exc)
            raise HostError(f"VM {name!r} could not start: {exc}") from None
        except BaseException as exc:
            self._after_failed_start(entry, exc)
            raise

    def _after_failed_start(self, entry: _Vm, exc: BaseException) -> None:
        if entry.log is not None:
            entry.log.close()
            entry.log = None
        assert entry.ended is not None
        entry.ended.set()
        if entry.state is VmState.STARTING:  # _run() had not taken over
            self._set_state(entry, VmState.CRASHED, f"start failed: {exc}", last_exit=f"error: {exc}")

    async def _build(self, entry: _Vm, config: VmConfig, directory: Path) -> tuple[VM, VncServer | None]:
        """The VM (built on a worker thread: KVM ioctls wait in the host kernel) and, for a
        display, its VNC server bound on STATE/vms/NAME/vnc.sock."""
        from trivmm.kvm import KvmError
        from trivmm.vm import VM

        build = functools.partial(VM, config, console_output=_ConsoleFanout(entry))
        with anyio.CancelScope(shield=True):
            try:
                vm = await anyio.to_thread.run_sync(build)
            except (TrivmmError, KvmError) as exc:
                raise HostError(str(exc)) from None
        if vm.display is None:
            return vm, None
        from trivmm.vnc import VncServer

        try:
            vnc = VncServer(vm.display, vm.i8042, f"unix:{directory / 'vnc.sock'}", name=entry.definition.name)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(vm.close)
            raise
        return vm, vnc

    async def _run(self, entry: _Vm, vm: VM, vnc: VncServer | None, *,
                   task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
        """The VM's task: runs it (and its VNC server) until it ends, then records how."""
        from trivmm.kvm import KvmError

        outcome: VmExit | BaseException | None = None
        started = False
        try:
            async with anyio.create_task_group() as tg:
                if vnc is not None:
                    await tg.start(vnc.serve)
                    entry.vnc_path = self.state_dir / "vms" / entry.definition.name / "vnc.sock"
                await tg.start(vm.run)
                entry.vm = vm
                self._set_state(entry, VmState.RUNNING, "started")
                started = True
                task_status.started()
                try:
                    outcome = await vm.wait()
                except (TrivmmError, KvmError) as exc:
                    outcome = exc
                tg.cancel_scope.cancel()  # the VNC server
        except BaseExceptionGroup as group:
            if outcome is None:
                outcome = first_error(group)
        except BaseException as exc:
            if outcome is None:
                outcome = exc
        finally:
            with anyio.CancelScope(shield=True):
                await self._after_run(entry, vm, vnc, outcome)
        if isinstance(outcome, BaseException) and not started:
            raise outcome  # to start(): the VM never ran
        if isinstance(outcome, anyio.get_cancelled_exc_class()):
            raise outcome

    async def _after_run(self, entry: _Vm, vm: VM, vnc: VncServer | None,
                         outcome: VmExit | BaseException | None) -> None:  # fmt: skip
        from trivmm.vcpu import StopReason

        entry.vnc_path = None
        if vnc is not None:
            vnc.close()
        try:
            await anyio.to_thread.run_sync(vm.close)
        except TrivmmError as exc:  # a vCPU that would not stop: its memory stays mapped
            outcome = exc
        entry.vm = None
        if entry.log is not None:
            entry.log.close()
            entry.log = None
        for queue in list(entry.attachments):
            queue.close()
        reboot = False
        if isinstance(outcome, BaseException) and not isinstance(outcome, anyio.get_cancelled_exc_class()):
            self._set_state(entry, VmState.CRASHED, f"the VM failed: {outcome}", last_exit=f"error: {outcome}")
        elif outcome is None or isinstance(outcome, BaseException):
            detail = entry.stop_detail or "service stopped"
            self._set_state(entry, VmState.STOPPED, detail, last_exit=detail)
        elif outcome.reason is StopReason.PANIC:
            self._set_state(entry, VmState.CRASHED, "the guest kernel panicked", last_exit="guest panicked")
        elif outcome.reason is StopReason.STOPPED:
            detail = entry.stop_detail or "stopped"
            self._set_state(entry, VmState.STOPPED, detail, last_exit=detail)
        elif outcome.reason is StopReason.RESET and entry.stop_detail is None:
            now = time.monotonic()
            entry.resets = [t for t in entry.resets if now - t < RESET_LIMIT[1]] + [now]
            if len(entry.resets) > RESET_LIMIT[0]:
                self._set_state(entry, VmState.CRASHED, "the guest reset too often: not booted again",
                                last_exit="reset loop")  # fmt: skip
            else:
                self._set_state(entry, VmState.STOPPED, "the guest reset: booting it again", last_exit="guest reset")
                reboot = True
        else:
            detail = {StopReason.POWER_OFF: "powered off", StopReason.HALT: "halted",
                      StopReason.RESET: "guest reset"}.get(outcome.reason, outcome.reason.name.lower())  # fmt: skip
            self._set_state(entry, VmState.STOPPED, f"the guest {detail}" if detail != "guest reset" else detail,
                            last_exit=detail)  # fmt: skip
        assert entry.ended is not None
        entry.ended.set()
        if reboot and not self._closing:
            self._task_group.start_soon(self._autostart, entry.definition.name)

    async def stop(self, name: str, *, force: bool = False, timeout: float = STOP_GRACE,
                   detail: str | None = None) -> VmSummary:  # fmt: skip
        """Stop the VM; return once it has stopped. Graceful (the default): press its ACPI
        power button and give the guest ``timeout`` seconds to power off (a Linux guest with
        the button driver and someone to act on it, systemd-logind or acpid, shuts down);
        one that does not is then stopped where it is. A graceful stop waits for an operation
        under way on the VM (a start, a snapshot, a migration) first. ``force``: stop the guest
        where it is, at once, cutting such an operation short."""
        entry = self._entry(name)
        signalled = False
        if force and entry.vm is not None:
            entry.stop_detail = detail or "forced off"
            self._task_group.start_soon(_stop_vm, entry.vm)  # now, not after an operation under way
            signalled = True
        async with entry.lock:
            if signalled and not entry.state.active:
                pass  # it has stopped already
            elif force:
                await self._stop_locked(entry, detail or "forced off")
            else:
                await self._stop_locked(entry, detail or "stopped", grace=max(0.0, timeout))
        return self._summary(entry)

    async def _stop_locked(self, entry: _Vm, detail: str, *, grace: float | None = None) -> None:
        """Stop the VM (``grace``: seconds the guest gets after its power button is pressed)."""
        from trivmm.errors import VmError

        name = entry.definition.name
        vm, ended = entry.vm, entry.ended
        if not entry.state.active or vm is None or ended is None:
            if ended is not None and not ended.is_set():
                await ended.wait()  # a forced stop got there first: wait for its end
                return
            raise VmStateConflict(f"VM {name!r} is not running ({entry.state.value})")
        if grace is not None:
            entry.stop_detail = detail  # the guest's own power-off or reset is recorded as such
            self._set_state(entry, VmState.STOPPING, "power button pressed")
            listens = False
            with contextlib.suppress(VmError):
                listens = vm.powerdown()
            if listens:  # else no ACPI, or no driver for the button: nothing to wait for
                with anyio.move_on_after(grace):
                    await ended.wait()
            if ended.is_set():
                return
            if entry.stop_detail == detail and listens:  # not forced meanwhile
                entry.stop_detail = f"forced off: the guest did not power off within {grace:g} s of its power button"
            elif entry.stop_detail == detail:
                entry.stop_detail = "forced off: the guest does not listen to its power button (no ACPI driver for it)"
        elif entry.stop_detail is None:
            entry.stop_detail = detail
        self._set_state(entry, VmState.STOPPING, entry.stop_detail)
        await _stop_vm(vm)
        await ended.wait()

    async def reset(self, name: str) -> VmSummary:
        """A cold reset: the VM is stopped and booted again (a fresh VMM, the same definition)."""
        entry = self._entry(name)
        async with entry.lock:
            await self._stop_locked(entry, "reset")
            await self._start_locked(entry)
        return self._summary(entry)

    async def pause(self, name: str) -> VmSummary:
        """Park every vCPU (the VM keeps its memory and devices); ``resume`` lets them go on."""
        entry = self._entry(name)
        async with entry.lock:
            vm = self._running(entry, VmState.RUNNING, "paused")
            try:
                await vm.pause()
            except TrivmmError as exc:
                raise HostError(f"VM {name!r} could not be paused: {exc}") from None
            self._set_state(entry, VmState.PAUSED, "paused")
        return self._summary(entry)

    async def resume(self, name: str) -> VmSummary:
        entry = self._entry(name)
        async with entry.lock:
            vm = self._running(entry, VmState.PAUSED, "resumed")
            await vm.resume()
            self._set_state(entry, VmState.RUNNING, "resumed")
        return self._summary(entry)

    def _running(self, entry: _Vm, wanted: VmState, what: str) -> VM:
        if entry.state is not wanted or entry.vm is None:
            if entry.state.active and entry.vm is not None:
                raise VmStateConflict(f"VM {entry.definition.name!r} is {entry.state.value}: it cannot be {what}")
            raise VmStateConflict(f"VM {entry.definition.name!r} is not running ({entry.state.value})")
        return entry.vm

    async def snapshot(self, name: str, path: Path) -> VmSummary:
        """Write the running (or paused) VM's complete state to ``path`` (``run --incoming
        file:PATH`` restores it); the VM goes on as it was."""
        entry = self._entry(name)
        async with entry.lock:
            vm = self._active_vm(entry)
            try:
                await vm.snapshot(Path(path))
            except TrivmmError as exc:
                raise HostError(f"the snapshot of VM {name!r} failed: {exc}") from None
            self.store.log(HostEvent(time.time(), name, "snapshot", entry.state, str(path)))
        return self._summary(entry)

    async def migrate(self, name: str, uri: str) -> VmSummary:
        """Migrate the VM to ``uri`` (a ``run --incoming`` destination: tcp:HOST:PORT or
        unix:PATH, or file:PATH); once the destination runs it, this VM is stopped
        ("migrated to URI"). ``HostError`` when it fails: the VM then runs on here."""
        entry = self._entry(name)
        async with entry.lock:
            vm = self._active_vm(entry)
            try:
                await vm.migrate(uri)
            except TrivmmError as exc:
                raise HostError(f"the migration of VM {name!r} failed: {exc}") from None
            await self._stop_locked(entry, f"migrated to {uri}")
        return self._summary(entry)

    def _active_vm(self, entry: _Vm) -> VM:
        if entry.state not in (VmState.RUNNING, VmState.PAUSED) or entry.vm is None:
            raise VmStateConflict(f"VM {entry.definition.name!r} is not running ({entry.state.value})")
        return entry.vm


async def _stop_vm(vm: VM) -> None:
    """``vm.stop()``; how the VM ended is its task's to record."""
    from trivmm.kvm import KvmError

    with contextlib.suppress(TrivmmError, KvmError):
        await vm.stop()



