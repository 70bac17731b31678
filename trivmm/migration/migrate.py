"""Migration of a running VM to another trivmm (the source side): hot (pre-copy) or cold,
over ``tcp:`` or ``unix:`` sockets, or into a ``file:`` (a snapshot).

Hot migration, as QEMU's pre-copy::

    setup    connect; refuse a VM with state that cannot be saved; CONFIG; dirty logging on
             (with virtio devices: a brief pause and quiesce around it, so that no device
             write begun before it can land unseen)
    active   round 0: every page (zero pages as zero runs, costing nothing) while the guest
             runs; then rounds of the pages dirtied since the previous sync (KVM's dirty
             log merged with the VMM's own writes), flagged RESEND, until what is left fits
             ``bandwidth x downtime limit`` or ``max_rounds`` is reached. Auto-converge:
             once two syncs in a row find the guest dirtying more than half of what the
             link carried meanwhile, the vCPUs are throttled (20 %, then +10 % a round
             while it goes on, at most 99 %)
    device   pause the vCPUs, quiesce the devices, send the last dirty pages (and every
             page the VMM wrote during the migration), the vCPU/platform/device state, END
    hand-over  READY from the destination, GO from here, RUNNING from there
             (trivmm.migration.transport); then the source stays paused in "postmigrate"
             (as QEMU's does: its memory is intact; ``Migration.resume()`` or QMP ``cont``
             runs it again -- only do that if the destination does not run the guest)

Cold migration pauses first and streams everything once (stream version 1, as a snapshot).
``file:`` is always cold: a snapshot written atomically, after which the source stays
paused. Until GO is sent, any failure -- the connection cut, the destination refusing or
gone, a cancellation -- leaves the source as it was: dirty logging off, throttle off,
devices and vCPUs resumed (if the migration paused them), the connection closed, and a
``MigrationError`` that says why.

The vCPU throttle is a sleep in each vCPU thread (``VcpuRunner.request_throttle``): every
``THROTTLE_PERIOD`` the engine kicks each vCPU, which sleeps ``percent`` of the period
outside the guest. Pausing the VM instead would race with a user's own ``stop``/``cont``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs

from trivmm.errors import MigrationError, TrivmmError
from trivmm.kvm import KvmError
from trivmm.memory import MemoryRegion
from trivmm.migration.codec import encode_state
from trivmm.migration.devices import Quiescent, vm_devices
from trivmm.migration.dirty import DirtyLog, dirty_runs
from trivmm.migration.snapshot import (
    SavedConfig,
    _capture,
    _refuse_unsaveable,
    _state_sections,
    saved_regions,
    snapshot_vm,
)
from trivmm.migration.storage import StorageCopy
from trivmm.migration.stream import (
    HOT_VERSION,
    PAGE_SIZE,
    VERSION,
    ByteSink,
    MemoryRun,
    SectionKind,
    StreamWriter,
    describe_io_error,
    page_runs,
)
from trivmm.migration.transport import Ack, AckDecoder, AckKind, MigrationUri, connect, encode_ack, parse_uri

if TYPE_CHECKING:
    from trivmm.vm import VM

__all__ = ["Migration", "MigrationInfo", "MigrationParameters", "ProgressCallback", "THROTTLE_PERIOD",
           "ACTIVE_STATUSES"]  # fmt: skip

THROTTLE_PERIOD = 0.02  # seconds: each vCPU sleeps ``percent`` of every period while throttled
ACTIVE_STATUSES = frozenset({"setup", "active", "device", "cancelling"})
_WINDOW_PAGES = 4096  # pages read and scanned per worker-thread call (16 MiB)
_DISK_WINDOW = 16 << 20  # disk bytes read and scanned per worker-thread call
_PROGRESS_INTERVAL = 0.1  # seconds between progress callbacks within a round
_BANDWIDTH_SAMPLE = 256 << 10  # a round that sent less does not change the bandwidth estimate
_log = logging.getLogger(__name__)

ProgressCallback = Callable[["MigrationInfo"], object]
Emit = Callable[[str, Mapping[str, Any] | None], None]


@attrs.define
class MigrationParameters:
    """How migrations run: QEMU's ``downtime-limit`` (ms) and ``max-bandwidth`` (bytes/s,
    0: no limit), the round limit, auto-converge -- its trigger (dirtied bytes as a
    percentage of those sent meanwhile) and throttle steps (percent of each vCPU's time) --
    and how long the hand-over waits for the destination."""

    downtime_limit_ms: int = 300
    max_bandwidth: int = 0
    max_rounds: int = 30
    auto_converge: bool = True
    throttle_trigger: int = 50
    throttle_initial: int = 20
    throttle_increment: int = 10
    throttle_max: int = 99
    confirm_timeout: float = 60.0


@attrs.frozen
class MigrationInfo:
    """A migration's progress, or its outcome (what ``vm.migrate()`` returns; QMP's
    query-migrate is ``to_qmp()``). Times in seconds; ``rounds`` counts passes over memory
    (round 0, the dirty rounds, the final stop-and-copy pass); ``remaining`` is the bytes
    of pages known dirty and not yet sent; ``dirty_pages_rate`` pages per second in the last
    round; ``bandwidth`` the measured stream rate (bytes/s); ``throttle`` the vCPU throttle
    in percent; ``converged``: the last pass fit the downtime limit (False: the round limit
    forced the switch-over)."""

    status: str = "none"
    uri: str = ""
    cold: bool = False
    rounds: int = 0
    total_time: float = 0.0
    setup_time: float = 0.0
    downtime: float | None = None
    expected_downtime: float | None = None
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    dirty_pages_rate: float = 0.0
    bandwidth: float = 0.0
    throttle: int = 0
    converged: bool | None = None
    error: str | None = None
    disk_total: int = 0
    disk_transferred: int = 0
    disk_remaining: int = 0

    def to_qmp(self) -> dict[str, Any]:
        """QEMU's MigrationInfo ({} before any migration)."""
        if self.status == "none":
            return {}
        ms = round
        out: dict[str, Any] = {"status": self.status, "total-time": ms(self.total_time * 1000),
                               "setup-time": ms(self.setup_time * 1000)}  # fmt: skip
        if self.status == "completed" and self.downtime is not None:
            out["downtime"] = ms(self.downtime * 1000)
        elif self.expected_downtime is not None and self.status in ACTIVE_STATUSES:
            out["expected-downtime"] = ms(self.expected_downtime * 1000)
        out["ram"] = {
            "transferred": self.transferred, "remaining": self.remaining, "total": self.total,
            "duplicate": self.zero_pages, "skipped": 0, "normal": self.normal_pages,
            "normal-bytes": self.normal_pages * PAGE_SIZE, "dirty-pages-rate": round(self.dirty_pages_rate),
            "mbps": round(self.bandwidth * 8 / 1e6, 3), "dirty-sync-count": self.rounds, "page-size": PAGE_SIZE,
        }  # fmt: skip
        if self.disk_total:  # --copy-storage: QEMU's block migration figures
            out["disk"] = {"transferred": self.disk_transferred, "remaining": self.disk_remaining,
                           "total": self.disk_total}  # fmt: skip
        if self.throttle:
            out["cpu-throttle-percentage"] = self.throttle
        if self.error is not None and self.status == "failed":
            out["error-desc"] = self.error
        return out


@attrs.define
class _Progress:
    """The running migration's numbers (mutable; ``Migration.query()`` freezes them)."""

    uri: str
    cold: bool
    total: int
    started: float
    status: str = "setup"
    setup_time: float = 0.0
    ended: float | None = None
    rounds: int = 0
    downtime: float | None = None
    expected_downtime: float | None = None
    remaining_pages: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    dirty_pages_rate: float = 0.0
    bandwidth: float = 0.0
    throttle: int = 0
    converged: bool | None = None
    error: str | None = None
    disk_total: int = 0
    disk_transferred: int = 0
    disk_remaining: int = 0


class _Link:
    """The connection as the stream's sink: counts bytes, measures how fast they go, and
    keeps to ``max_bandwidth`` (read on every send: a change applies at once)."""

    def __init__(self, stream: ByteSink, parameters: MigrationParameters) -> None:
        self._stream = stream
        self._parameters = parameters
        self.sent = 0
        self._limit = 0
        self._base_time = 0.0
        self._base_sent = 0

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)
        self.sent += len(item)
        limit = self._parameters.max_bandwidth
        if limit <= 0:
            self._limit = 0
            return
        now = time.monotonic()
        if limit != self._limit:
            self._limit, self._base_time, self._base_sent = limit, now, self.sent - len(item)
        delay = self._base_time + (self.sent - self._base_sent) / limit - now
        if delay > 0:
            await anyio.sleep(delay)
        elif delay < -1.0:  # idle for a while (a sync, a scan): no burst to make up for it
            self._base_time, self._base_sent = now, self.sent


class _Replies:
    """What the destination says on the connection: hand-over messages, or a refusal or
    the connection's end at any time (``problem``, which calls ``on_problem``)."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, on_problem: Callable[[], None]) -> None:
        self._stream = stream
        self._on_problem = on_problem
        self._acks: list[Ack] = []
        self._arrived = anyio.Event()
        self.problem: str | None = None

    async def read(self) -> None:
        decoder = AckDecoder()
        while True:
            try:
                data = await self._stream.receive(4096)
            except anyio.EndOfStream:
                return self._fail("the destination closed the connection")
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                return self._fail(f"the connection to the destination broke ({describe_io_error(exc)})")
            try:
                acks = decoder.feed(data)
            except MigrationError as exc:
                return self._fail(f"the destination answered nonsense: {exc}")
            for ack in acks:
                if ack.kind is AckKind.REFUSED:
                    return self._fail(f"the destination refused the migration: {ack.reason}")
                self._acks.append(ack)
            self._wake()

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
            self._on_problem()
        self._wake()

    def _wake(self) -> None:
        arrived, self._arrived = self._arrived, anyio.Event()
        arrived.set()

    async def expect(self, kind: AckKind, timeout: float) -> None:
        """Wait for ``kind``; ``MigrationError`` for anything else, a problem, or a timeout."""
        with anyio.move_on_after(timeout):
            while True:
                if self._acks:
                    ack = self._acks.pop(0)
                    if ack.kind is not kind:
                        raise MigrationError(f"the destination sent {ack.kind.name} where {kind.name} was due")
                    return
                if self.problem is not None:
                    raise MigrationError(self.problem)
                await self._arrived.wait()
        raise MigrationError(f"the destination did not send {kind.name} within {timeout:g} s")


class Migration:
    """The migration engine of one VM (``vm.migration``): ``run()`` migrates it, ``query()``
    tells how it goes, ``cancel()`` stops it. It is also the QMP server's
    ``MigrationControl`` (``migrate``, ``migrate_cancel``, ``query_migrate``,
    ``set_parameters``, ``run_state``): for those, ``serve()`` must run beside the VM (it
    runs QMP-started migrations as its tasks); ``emit(name, data)`` sends QMP events
    (MIGRATION, MIGRATION_PASS, STOP, RESUME)."""

    def __init__(self, vm: VM, *, emit: Emit | None = None, parameters: MigrationParameters | None = None) -> None:
        self.vm = vm
        self.emit = emit
        self.parameters = parameters if parameters is not None else MigrationParameters()
        self._progress: _Progress | None = None
        self._scope: anyio.CancelScope | None = None
        self._cancel_requested = False
        self._task_group: anyio.abc.TaskGroup | None = None
        self._postmigrate = False  # the guest was handed over (or may have been): paused here
        self._held: list[Quiescent] = []  # devices kept quiesced while in postmigrate
        self._link: _Link | None = None
        self._callback: ProgressCallback | None = None
        self._last_callback = 0.0
        self._postmigrate_changed: anyio.Event | None = None

    # --- state -------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return "none" if self._progress is None else self._progress.status

    @property
    def in_progress(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def query(self) -> MigrationInfo:
        """The current (or last) migration's numbers."""
        p = self._progress
        if p is None:
            return MigrationInfo(total=self._memory_size())
        end = p.ended if p.ended is not None else time.monotonic()
        return MigrationInfo(
            status=p.status, uri=p.uri, cold=p.cold, rounds=p.rounds, total_time=end - p.started,
            setup_time=p.setup_time, downtime=p.downtime, expected_downtime=p.expected_downtime,
            transferred=self._link.sent if self._link is not None else 0, remaining=p.remaining_pages * PAGE_SIZE,
            total=p.total, normal_pages=p.normal_pages, zero_pages=p.zero_pages, dirty_pages_rate=p.dirty_pages_rate,
            bandwidth=p.bandwidth, throttle=p.throttle, converged=p.converged, error=p.error,
            disk_total=p.disk_total, disk_transferred=p.disk_transferred, disk_remaining=p.disk_remaining,
        )  # fmt: skip

    def run_state(self) -> str | None:
        """What QMP's query-status says meanwhile: "finish-migrate" while the guest is
        paused for the switch-over, "postmigrate" while it stays paused after it; None:
        the VM's own state."""
        if self.in_progress and self.vm.paused:  # the switch-over, or a cold or file: migration
            return "finish-migrate"
        if self._postmigrate and self.vm.paused:
            return "postmigrate"
        return None

    def _memory_size(self) -> int:
        memory = self.vm.memory
        return 0 if memory is None else memory.size

    # --- the QMP side ----------------------------------------------------------------------------
    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run QMP-started migrations (``migrate``) as tasks of this, and give a guest
        resumed in "postmigrate" (QMP ``cont``) its devices back. Runs until cancelled:
        ``vm.add_service(migration.serve)`` ties it to the VM's run."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            task_status.started()
            try:
                while True:
                    self._postmigrate_changed = anyio.Event()
                    if self._postmigrate and self._held:
                        while self.vm.paused and self._postmigrate:
                            await anyio.sleep(0.05)
                        self._release_held()
                        self._postmigrate = False
                        continue
                    await self._postmigrate_changed.wait()
            finally:
                self._task_group = None

    async def migrate(self, uri: str, arguments: Mapping[str, Any]) -> None:
        """QMP ``migrate``: start migrating to ``uri`` and return (a paused VM migrates
        cold: QEMU's way to ask for it is ``stop`` first)."""
        if self._task_group is None:
            raise MigrationError("the VM is not running (the migration service has not started)")
        self._check_can_start()
        target = parse_uri(uri)
        # QEMU's (deprecated) ``blk``, or trivmm's own ``copy-storage``: both mean --copy-storage
        copy_storage = bool(arguments.get("blk")) or bool(arguments.get("copy-storage"))
        if copy_storage and target.scheme == "file":
            raise MigrationError("copy-storage needs a destination (tcp: or unix:), not a file")
        started = anyio.Event()

        async def run() -> None:
            try:
                await self.run(str(target), cold=self.vm.paused, copy_storage=copy_storage, _started=started)
            except TrivmmError as exc:  # reported by query-migrate and the MIGRATION event
                _log.info("migration to %s failed: %s", uri, exc)
            finally:
                started.set()

        self._task_group.start_soon(run)
        await started.wait()

    async def migrate_cancel(self) -> None:
        self.cancel()

    async def query_migrate(self) -> Mapping[str, Any]:
        return self.query().to_qmp()

    async def set_parameters(self, parameters: Mapping[str, Any]) -> None:
        if "downtime-limit" in parameters:
            self.parameters.downtime_limit_ms = int(parameters["downtime-limit"])
        if "max-bandwidth" in parameters:
            self.parameters.max_bandwidth = int(parameters["max-bandwidth"])

    # --- control ---------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancel the migration in progress (before the hand-over: the source runs on as it
        was); nothing happens if none is."""
        if self._scope is not None and self.in_progress:
            self._cancel_requested = True
            self._set_status("cancelling")
            self._scope.cancel()

    async def resume(self) -> None:
        """Leave "postmigrate": the devices work again and the vCPUs run. Only for a guest
        that does not run on the destination (two running copies corrupt shared disks)."""
        self._release_held()
        self._postmigrate = False
        if self.vm.paused:
            await self.vm.resume()
            self._emit("RESUME")

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for provider in reversed(held):
            provider.resume_after_snapshot()

    def _check_can_start(self) -> None:
        if self.in_progress or self.vm.snapshotting:
            raise MigrationError("a snapshot or migration of this VM is already in progress")
        if self._postmigrate and self._held and self.vm.paused:
            raise MigrationError("this guest was handed over to another trivmm and stays paused here; resume it "
                                 "here first (cont) -- only if the destination does not run it")  # fmt: skip
        vm = self.vm
        if vm.vm is None or vm.memory is None:
            raise MigrationError("the VM is closed")
        if not vm._ran or vm._finished_event().is_set():
            raise MigrationError("only a running VM can be migrated")

    # --- the migration -----------------------------------------------------------------------------
    async def run(self, uri: str, *, cold: bool = False, downtime_ms: int | None = None,
                  max_bandwidth: int | None = None, progress: ProgressCallback | None = None,
                  copy_storage: bool = False, _started: anyio.Event | None = None) -> MigrationInfo:  # fmt: skip
        """Migrate the VM to ``uri`` (``tcp:HOST:PORT``, ``unix:PATH``: a destination
        waiting with ``run --incoming``; ``file:PATH``: a snapshot, always cold). Hot
        unless ``cold``; ``downtime_ms`` and ``max_bandwidth`` (bytes/s) override the
        parameters for this run; ``progress(info)`` is called as it goes; ``copy_storage``:
        the writable disks' contents go too (docs/migration.md, "Copying storage"). Returns the
        outcome (status "completed"); the source then stays paused ("postmigrate").
        ``MigrationError`` when it fails or is cancelled: the source then runs on as before."""
        target = parse_uri(uri)
        self._check_can_start()
        if copy_storage and target.scheme == "file":
            raise MigrationError("copy-storage needs a destination (tcp: or unix:), not a file")
        parameters = attrs.evolve(self.parameters)
        if downtime_ms is not None:
            parameters.downtime_limit_ms = downtime_ms
        if max_bandwidth is not None:
            parameters.max_bandwidth = max_bandwidth
        cold = cold or target.scheme == "file"
        self._progress = _Progress(str(target), cold, self._memory_size(), time.monotonic())
        self._link = None
        self._callback = progress
        self._cancel_requested = False
        self._release_held()
        self._postmigrate = False
        self._emit_status()
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                if _started is not None:
                    _started.set()
                if target.scheme == "file":
                    await self._to_file(target)
                else:
                    await _Run(self, target, parameters, copy_storage).run()
            if scope.cancelled_caught or self._cancel_requested:
                raise MigrationError("the migration was cancelled")
        except BaseException as exc:
            self._finish_failed(exc)
            raise
        finally:
            self._scope = None
        self._progress.ended = time.monotonic()
        self._progress.remaining_pages = 0
        self._set_status("completed")
        return self.query()

    def _finish_failed(self, exc: BaseException) -> None:
        p = self._progress
        assert p is not None
        p.ended = time.monotonic()
        p.throttle = 0
        if self._cancel_requested or isinstance(exc, anyio.get_cancelled_exc_class()):
            p.error = "cancelled"
            self._set_status("cancelled")
            return
        p.error = str(exc) if isinstance(exc, TrivmmError | KvmError) else f"{type(exc).__name__}: {exc}"
        self._set_status("failed")

    async def _to_file(self, target: MigrationUri) -> None:
        """``file:``: a snapshot (pause, write atomically); the guest stays paused and its
        devices work (nothing else runs this guest until the file is restored)."""
        p = self._progress
        assert p is not None
        p.rounds = 1
        was_paused = self.vm.paused
        self._set_status("active")
        paused_at = time.monotonic()
        try:
            info = await snapshot_vm(self.vm, target.path, resume=False)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if not was_paused and self.vm.paused and self.vm.vm is not None:  # failed after the write
                    await self.vm.resume()
            raise
        if not was_paused:
            self._emit("STOP")
        p.normal_pages, p.zero_pages = info.pages - info.zero_pages, info.zero_pages
        p.downtime = time.monotonic() - paused_at
        p.bandwidth = info.size / max(p.downtime, 1e-6)
        self._link = _Link(_NullSink(), self.parameters)
        self._link.sent = info.size
        self._postmigrate = True

    # --- reporting ------------------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        assert self._progress is not None
        if self._progress.status != status:
            self._progress.status = status
            self._emit_status()

    def _emit_status(self) -> None:
        assert self._progress is not None
        self._emit("MIGRATION", {"status": self._progress.status})
        self._report(force=True)
        if self._postmigrate_changed is not None:
            self._postmigrate_changed.set()

    def _emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        if self.emit is not None:
            try:
                self.emit(name, data)
            except Exception:  # a broken event sink is not the migration's failure
                _log.exception("emitting %s failed", name)

    def _report(self, *, force: bool = False) -> None:
        """The progress callback, at most every ``_PROGRESS_INTERVAL`` unless ``force``."""
        if self._callback is None:
            return
        now = time.monotonic()
        if force or now - self._last_callback >= _PROGRESS_INTERVAL:
            self._last_callback = now
            self._callback(self.query())


class _NullSink:
    async def send(self, item: bytes) -> None:  # pragma: no cover - never sent to
        raise AssertionError


class _Run:
    """One migration over a socket (hot or cold): see the module docstring."""

    def __init__(self, engine: Migration, target: MigrationUri, parameters: MigrationParameters,
                 copy_storage: bool = False) -> None:  # fmt: skip
        self.engine = engine
        self.vm = engine.vm
        self.target = target
        self.parameters = parameters
        progress = engine._progress
        assert progress is not None
        self.progress = progress
        assert self.vm.memory is not None and self.vm.vm is not None
        # RAM's slots, then the framebuffer's if any. Only RAM is dirty-logged for the
        # migration (the display consumes its own slot's log for screen updates), so the
        # framebuffer goes whole in round 0 and again whole at stop-and-copy (_extra_bits).
        self.regions = saved_regions(self.vm)
        self.ram_slots = len(self.vm.memory.regions)
        self._extra_bytes = sum(region.size for region in self.regions[self.ram_slots :])
        self.dirty: DirtyLog | None = None
        self.was_paused = self.vm.paused
        self.paused_by_us = False
        self.quiesced: list[Quiescent] = []
        self.handed_over = False  # GO sent: the guest may run there from here on
        self.paused_at = 0.0
        self.quiescent: list[Quiescent] = []
        self.throttle_scope: anyio.CancelScope | None = None
        self.storage = StorageCopy(self.vm) if copy_storage else None
        if self.storage is not None:
            progress.disk_total = progress.disk_remaining = self.storage.total

    async def run(self) -> None:
        devices = vm_devices(self.vm)
        _refuse_unsaveable(devices)  # before anything is paused or sent
        names = _state_sections(self.vm, devices)
        self.quiescent = [p for p in devices.providers.values() if isinstance(p, Quiescent)]
        stream = await connect(self.target)
        try:
            link = self.engine._link = _Link(stream, self.parameters)
            cold_stream = self.progress.cold and self.storage is None  # DISK sections need version 2
            writer = StreamWriter(link, version=VERSION if cold_stream else HOT_VERSION)
            failure: Exception | None = None  # raised after the task group (not as a group)
            async with anyio.create_task_group() as tg:
                sending = anyio.CancelScope()
                replies = _Replies(stream, sending.cancel)
                tg.start_soon(replies.read)
                try:
                    with sending:
                        await writer.header()
                        saved = SavedConfig.of(self.vm, names, running=not self.was_paused)
                        await writer.section(SectionKind.CONFIG, "config", encode_state(saved))
                        if self.progress.cold:
                            await self._cold(writer, devices)
                        else:
                            await self._hot(writer, devices, tg)
                        await writer.end()
                        await replies.expect(AckKind.READY, self.parameters.confirm_timeout)
                        await link.send(encode_ack(AckKind.GO))
                        self.handed_over = True
                    if not self.handed_over:
                        raise MigrationError(replies.problem or "the migration stopped before the hand-over")
                    await self._confirmed(replies)
                except Exception as exc:
                    failure = exc
                finally:
                    tg.cancel_scope.cancel()
            if failure is not None:
                raise failure
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._undo()
                await anyio.aclose_forcefully(stream)
            raise
        with anyio.CancelScope(shield=True):
            await self._stop_logging()
            await anyio.aclose_forcefully(stream)
        self.engine._held = self.quiesced  # quiesced until the guest is resumed here, if ever
        self.engine._postmigrate = True

    async def _confirmed(self, replies: _Replies) -> None:
        """After GO: wait (shielded: a cancel cannot interrupt the hand-over) for RUNNING."""
        with anyio.CancelScope(shield=True):
            try:
                await replies.expect(AckKind.RUNNING, self.parameters.confirm_timeout)
            except MigrationError as exc:
                self.engine._held = self.quiesced
                self.engine._postmigrate = True
                self.quiesced = []
                await self._stop_logging()
                raise MigrationError(f"the guest was handed over but the destination did not confirm that it runs "
                                     f"it ({exc}); the guest stays paused here and may be running there: resume "
                                     "it here only if it does not") from None  # fmt: skip
        self.progress.downtime = time.monotonic() - self.paused_at

    # --- cold -------------------------------------------------------------------------------------
    async def _cold(self, writer: StreamWriter, devices: Any) -> None:
        await self._pause_and_quiesce()
        self.engine._set_status("device")
        await self._send_state(writer, devices)
        self.progress.remaining_pages = sum(r.pages for r in self.regions)
        self.progress.rounds = 1
        await self._send_ranges(writer, [(slot, 0, r.pages) for slot, r in enumerate(self.regions)], resend=False)
        if self.storage is not None:
            await self._send_disk(writer, self.storage.everything(), resend=False)

    # --- hot --------------------------------------------------------------------------------------
    async def _hot(self, writer: StreamWriter, devices: Any, tg: anyio.abc.TaskGroup) -> None:
        progress, parameters = self.progress, self.parameters
        await self._start_logging()
        progress.setup_time = time.monotonic() - progress.started
        self.engine._set_status("active")
        # round 0: everything, while the guest runs
        progress.remaining_pages = sum(r.pages for r in self.regions)
        progress.rounds = 1
        round_start, sent_before = time.monotonic(), self._sent()
        await self._send_ranges(writer, [(slot, 0, r.pages) for slot, r in enumerate(self.regions)], resend=False)
        storage = self.storage
        if storage is not None:
            await self._send_disk(writer, storage.everything(), resend=False)
        self._measure(self._sent() - sent_before, time.monotonic() - round_start)
        synced_at = round_start
        written: list[tuple[int, int, int]] = []  # disk extents written since the last pass
        high = 0  # syncs in a row that found the guest dirtying faster than the trigger
        while True:
            assert self.dirty is not None
            bits = await anyio.to_thread.run_sync(self.dirty.sync)
            now = time.monotonic()
            dirty_pages = sum(b.bit_count() for b in bits)
            progress.dirty_pages_rate = dirty_pages / max(now - synced_at, 1e-6)
            synced_at = now
            progress.remaining_pages = dirty_pages
            if storage is not None:
                written = storage.written()
                progress.disk_remaining = sum(length for _, _, length in written)
            # The framebuffer, if any, goes whole at stop-and-copy: it counts against the downtime.
            remaining = dirty_pages * PAGE_SIZE + progress.disk_remaining + self._extra_bytes
            allowed = progress.bandwidth * parameters.downtime_limit_ms / 1000
            progress.expected_downtime = remaining / progress.bandwidth if progress.bandwidth else None
            self.engine._emit("MIGRATION_PASS", {"pass": progress.rounds})
            self.engine._report(force=True)
            if remaining <= allowed or progress.rounds >= parameters.max_rounds:
                progress.converged = remaining <= allowed
                break
            # Auto-converge, as QEMU's: a guest that dirtied more than throttle_trigger % of
            # what the link carried meanwhile, twice running, is throttled (and more each
            # round that it still does). Where the guest rewrites its whole working set
            # every round, its measured dirty rate cannot exceed the link's: hence the
            # threshold below 100 %.
            sent_meanwhile = self._sent() - sent_before
            if remaining * 100 > sent_meanwhile * parameters.throttle_trigger:
                high += 1
                if parameters.auto_converge and high >= 2:
                    self._raise_throttle(tg)
            else:
                high = 0
            progress.rounds += 1
            round_start, sent_before = now, self._sent()
            await self._send_bits(writer, bits + self._extra_bits(final=False))
            if storage is not None:
                await self._send_disk(writer, written, resend=True)
            self._measure(self._sent() - sent_before, time.monotonic() - round_start)
        # stop and copy
        await self._stop_throttle()
        await self._pause_and_quiesce()
        self.engine._set_status("device")
        progress.rounds += 1
        last = await anyio.to_thread.run_sync(self.dirty.sync)
        # what the converging sync found, what was dirtied since, every page the VMM wrote
        bits = [b | more | written for b, more, written in zip(bits, last, self.dirty.vmm_written, strict=True)]
        bits += self._extra_bits(final=True)
        progress.remaining_pages = sum(b.bit_count() for b in bits)
        await self._send_bits(writer, bits)
        if storage is not None:  # what the converging sync found, and what was written since (quiesced now)
            await self._send_disk(writer, written + storage.written(), resend=True)
        await self._send_state(writer, devices)

    def _extra_bits(self, *, final: bool) -> list[int]:
        """Dirty bits for the slots after RAM's (the framebuffer): none during the rounds,
        every page at stop-and-copy."""
        return [(1 << region.pages) - 1 if final else 0 for region in self.regions[self.ram_slots :]]

    def _sent(self) -> int:
        link = self.engine._link
        return 0 if link is None else link.sent

    def _measure(self, sent: int, seconds: float) -> None:
        """The bandwidth estimate: the rate of the last round that sent enough to tell."""
        if seconds > 0 and (sent >= _BANDWIDTH_SAMPLE or not self.progress.bandwidth):
            self.progress.bandwidth = sent / seconds

    def _raise_throttle(self, tg: anyio.abc.TaskGroup) -> None:
        p, parameters = self.progress, self.parameters
        if p.throttle == 0:
            p.throttle = parameters.throttle_initial
        else:
            p.throttle = min(parameters.throttle_max, p.throttle + parameters.throttle_increment)
        _log.info("migration: the guest dirties %.0f pages/s, more than the link carries: vCPUs throttled to %d %%",
                  p.dirty_pages_rate, p.throttle)  # fmt: skip
        if self.throttle_scope is None:
            self.throttle_scope = anyio.CancelScope()
            tg.start_soon(self._throttle, self.throttle_scope)

    async def _throttle(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                share = self.progress.throttle / 100
                for runner in self.vm.runners:
                    runner.request_throttle(THROTTLE_PERIOD * share)
                await anyio.sleep(THROTTLE_PERIOD)

    async def _stop_throttle(self) -> None:
        if self.throttle_scope is not None:
            self.throttle_scope.cancel()
            self.throttle_scope = None

    # --- pages ------------------------------------------------------------------------------------
    async def _send_bits(self, writer: StreamWriter, bits: list[int]) -> None:
        ranges = [(slot, first, count) for slot, (region, b) in enumerate(zip(self.regions, bits, strict=True))
                  for first, count in dirty_runs(b, region.pages)]  # fmt: skip
        await self._send_ranges(writer, ranges, resend=True)

    async def _send_ranges(self, writer: StreamWriter, ranges: list[tuple[int, int, int]], *, resend: bool) -> None:
        """Pages (slot, first, count), read and scanned a window at a time on a worker
        thread (zero pages become zero runs), then sent."""
        window: list[tuple[int, int, int]] = []
        size = 0
        for slot, first, count in ranges:
            while count:
                take = min(count, _WINDOW_PAGES - size)
                window.append((slot, first, take))
                size, first, count = size + take, first + take, count - take
                if size == _WINDOW_PAGES:
                    await self._send_window(writer, window, resend)
                    window, size = [], 0
        if window:
            await self._send_window(writer, window, resend)

    async def _send_window(self, writer: StreamWriter, window: list[tuple[int, int, int]], resend: bool) -> None:
        runs = await anyio.to_thread.run_sync(_scan, self.regions, window, resend)
        progress = self.progress
        for run in runs:
            await writer.run(run)
            if run.data is None:
                progress.zero_pages += run.pages
            else:
                progress.normal_pages += run.pages
            progress.remaining_pages = max(0, progress.remaining_pages - run.pages)
        self.engine._report()

    async def _send_disk(self, writer: StreamWriter, extents: list[tuple[int, int, int]], *, resend: bool) -> None:
        """Disk extents (disk, offset, length), read a window at a time on a worker thread
        (zero stretches become zero runs), then sent."""
        storage, progress = self.storage, self.progress
        assert storage is not None
        if resend:
            progress.disk_remaining = sum(length for _, _, length in extents)
        for disk, offset, length in extents:
            while length:
                take = min(length, _DISK_WINDOW)
                read = functools.partial(storage.read, disk, offset, take, resend=resend)
                for run in await anyio.to_thread.run_sync(read):
                    await writer.disk_run(run)
                    progress.disk_transferred += run.length
                    progress.disk_remaining = max(0, progress.disk_remaining - run.length)
                offset, length = offset + take, length - take
                self.engine._report()

    # --- pause, state, undo ------------------------------------------------------------------------
    async def _pause_and_quiesce(self) -> None:
        vm = self.vm
        if not vm.paused:
            self.paused_by_us = True  # before the wait: a pause cancelled half-way is undone too
            try:
                await vm.pause()
            except TrivmmError as exc:
                raise MigrationError(f"the guest stopped during the migration ({exc})") from None
            self.engine._emit("STOP")
        self.paused_at = time.monotonic()
        for provider in self.quiescent:
            self.quiesced.append(provider)  # resumed even if its quiesce fails half-way
            await provider.quiesce()

    async def _send_state(self, writer: StreamWriter, devices: Any) -> None:
        states = await anyio.to_thread.run_sync(_capture, self.vm, devices)
        for name, payload in states:
            try:
                await writer.section(SectionKind.STATE, name, payload)
            except ValueError as exc:
                raise MigrationError(f"the VM's state does not fit the stream: {exc}") from None

    async def _start_logging(self) -> None:
        """Dirty logging on. With devices that write guest memory, they are quiesced
        around it (the vCPUs paused for a moment) so that no write begun before is missed."""
        vm = self.vm
        assert vm.vm is not None and vm.memory is not None
        self.dirty = DirtyLog(vm.kvm, vm.vm, vm.memory)
        if self.quiescent:
            await self._pause_and_quiesce()
        try:
            await anyio.to_thread.run_sync(self.dirty.start)
            if self.storage is not None:
                self.storage.start_tracking()
        finally:
            await self._resume_guest()

    async def _stop_logging(self) -> None:
        if self.storage is not None:
            self.storage.stop_tracking()
        if self.dirty is not None and self.dirty.active:
            await anyio.to_thread.run_sync(self.dirty.stop)

    async def _resume_guest(self) -> None:
        for provider in reversed(self.quiesced):
            provider.resume_after_snapshot()
        self.quiesced = []
        if self.paused_by_us:
            self.paused_by_us = False
            if self.vm.vm is not None:
                await self.vm.resume()
                self.engine._emit("RESUME")

    async def _undo(self) -> None:
        """After a failure before GO: the source as it was (dirty logging and throttle off,
        devices and vCPUs resumed if we paused them)."""
        await self._stop_throttle()
        try:
            await self._stop_logging()
        finally:
            if not self.handed_over:
                await self._resume_guest()


def _scan(regions: list[MemoryRegion], window: list[tuple[int, int, int]], resend: bool) -> list[MemoryRun]:
    """The runs carrying ``window``'s pages (on a worker thread: reads guest memory)."""
    runs: list[MemoryRun] = []
    for slot, first, count in window:
        runs.extend(page_runs(regions[slot].mapping, slot, first, count, resend=resend))
    return runs
