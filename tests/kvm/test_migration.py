"""Hot and cold migration between two trivmm VMs in one process (and, through the CLI,
between processes), with a tiny guest that dirties memory at CPL3 (guests/dirty_writer.S:
a counter, and each iteration's value written into the next page of a 4 MiB buffer).

What is checked: at the hand-over the destination's memory and registers equal the paused
source's, byte for byte; the destination counts on from there and its buffer pages hold
the values the counter says they must (a page lost in pre-copy would hold an older one);
the source reports "completed" and stays paused ("postmigrate") with dirty logging off;
progress numbers make sense; auto-converge throttles a guest that outruns a bandwidth
limit; cold and file migrations; and the faults: a connection cut at many offsets (both
ways), a destination that refuses or is not there, a full disk: the source runs on, with
its memory intact and dirty logging off, the destination has released everything, and a
retry succeeds. The CLI test runs ``run --api-sock``, ``run --incoming`` and ``migrate``
as processes with a guest printing a line counter: the destination's console continues
the source's, no line lost or repeated."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

import trivmm
from tests import netns as hosts
from tests.kvm.guests import assemble
from tests.kvm.test_embedding import Resources, _vcpu_threads
from tests.netns import ENV, start_trivmm
from trivmm import VM, MigrationError, VmConfig
from trivmm.kvm import Kvm
from trivmm.migration import MigrationInfo, listen, receive_vm
from trivmm.migration.stream import SectionKind

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
COUNTER = 0x4000
BUF = 0x400000
PAGES = 1024
MEMORY = 16 << 20
SLOW = 300_000  # spin between two pages: a few thousand pages a second here
FAST = 30_000  # ten times that: more than a few MiB/s


@pytest.fixture(autouse=True)
def _shared_kvm_fd() -> None:
    Kvm.shared()


def writer(tmp_path: Path, spin: int, **devices: Any) -> VmConfig:
    """dirty_writer.S spinning ``spin`` times between pages (``devices``: e.g. a virtio-rng,
    whose quiesce the migration goes through; the guest never drives it)."""
    elf = assemble("dirty_writer", tmp_path, symbols={"SPIN": spin, "PAGES": PAGES})
    return VmConfig(kernel=elf, memory="16M", **devices)


def counter(vm: VM) -> int:
    assert vm.memory is not None
    return vm.memory.read_u32(COUNTER)


def stale_pages(vm: VM) -> list[int]:
    """Buffer pages that do not hold what the counter says (the guest must be paused)."""
    assert vm.memory is not None
    now = counter(vm)
    bad = []
    for value in range(max(1, now - PAGES + 1), now):
        if vm.memory.read_u32(BUF + (value - 1) % PAGES * 4096) != value:
            bad.append(value)
    if now and vm.memory.read_u32(BUF + (now - 1) % PAGES * 4096) not in (now, max(now - PAGES, 0)):
        bad.append(now)
    return bad


def dirty_logging_on(vm: VM) -> bool:
    """Asks KVM: KVM_GET_DIRTY_LOG fails with ENOENT on a slot that does not log."""
    assert vm.vm is not None and vm.memory is not None
    try:
        vm.vm.get_dirty_log(0, vm.memory.regions[0].pages)
    except OSError as exc:
        assert exc.errno == errno.ENOENT
        return False
    return True


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def keeps_counting(vm: VM, by: int = 200) -> None:
    start = counter(vm)
    await wait_for(lambda: counter(vm) > start + by)


class Destination:
    """An in-process destination: takes one migration from ``listener``, compares what it
    received with the (paused) source before it runs, then runs the guest until ``stop``."""

    def __init__(self, listener: trivmm.migration.IncomingListener, source: VM | None = None,
                 config: VmConfig | None = None) -> None:  # fmt: skip
        self.listener = listener
        self.source = source
        self.config = config
        self.vm: VM | None = None
        self.error: BaseException | None = None
        self.same_memory: bool | None = None
        self.same_registers: bool | None = None
        self.resources: list[int] = []

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            vm = await self.listener.accept(self.config)
        except (MigrationError, trivmm.ConfigError) as exc:
            self.error = exc
            return
        self.vm = vm
        with vm:
            assert vm.memory is not None
            self.resources = [region.host_address for region in vm.memory]
            source = self.source
            if source is not None and source.memory is not None:
                self.same_memory = source.memory.read(0, MEMORY) == vm.memory.read(0, MEMORY)
                self.same_registers = bytes(trivmm.kvm._ffi.ffi.buffer(source.vcpus[0].get_regs())) == bytes(
                    trivmm.kvm._ffi.ffi.buffer(vm.vcpus[0].get_regs())
                )
            await vm.run()


def run_on(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


@BACKENDS
def test_hot_migration_over_unix_continues_exactly_where_the_source_stopped(backend: str, tmp_path: Path) -> None:
    config = writer(tmp_path, SLOW, rng=True)  # virtio-pci: quiesced at the start and for the switch-over
    reports: list[MigrationInfo] = []

    async def main() -> None:
        resources = Resources()
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
            resources.note(source)
            await wait_for(lambda: counter(source) > PAGES)  # the buffer is full of values
            destination = Destination(listener, source)
            async with anyio.create_task_group() as tg:
                await tg.start(destination.serve)
                # A downtime limit of 1 ms: pre-copy needs dirty rounds before it fits.
                info = await source.migrate(listener.uri, downtime_ms=1, progress=reports.append)
                final = counter(source)
                assert source.paused and source.migration.run_state() == "postmigrate"
                assert not dirty_logging_on(source)
                vm = destination.vm
                assert vm is not None and destination.same_memory and destination.same_registers
                resources.note(vm)
                await keeps_counting(vm)
                assert counter(vm) > final and counter(source) == final
                await vm.pause()
                assert stale_pages(vm) == []
                await vm.stop()
        assert info.status == "completed" and info.uri == listener.uri and not info.cold
        assert info.rounds >= 3, info  # round 0, at least one round of dirty pages, the final one
        assert info.total == MEMORY and info.remaining == 0 and info.error is None
        assert 0 < info.downtime < info.total_time and 0 < info.setup_time < info.total_time  # type: ignore[operator]
        assert info.normal_pages >= PAGES and info.zero_pages > 2000  # most of the 16 MiB is zero: free
        assert info.transferred >= info.normal_pages * 4096
        assert info.bandwidth > 0 and info.converged
        statuses = [r.status for r in reports]
        assert statuses[0] == "setup" and statuses[-1] == "completed"
        assert {"active", "device"} <= set(statuses) and "failed" not in statuses
        transferred = [r.transferred for r in reports]
        assert transferred == sorted(transferred)
        assert any(r.dirty_pages_rate > 0 for r in reports if r.status == "active")
        assert info.to_qmp()["ram"]["dirty-sync-count"] == info.rounds
        resources.assert_released()

    run_on(backend, main)


@BACKENDS
def test_hot_migration_over_tcp_throttles_a_guest_that_outruns_the_link(backend: str, tmp_path: Path) -> None:
    """A guest dirtying far more than 8 MiB/s through a link limited to that: auto-converge
    throttles its vCPU until what is left fits the downtime limit."""
    config = writer(tmp_path, FAST)
    reports: list[MigrationInfo] = []

    async def main() -> None:
        async with listen("tcp:127.0.0.1:0") as listener, trivmm.open_vm(config) as source:
            assert re.fullmatch(r"tcp:127\.0\.0\.1:[1-9][0-9]*", listener.uri)
            await wait_for(lambda: counter(source) > PAGES)
            source.migration.parameters.throttle_initial = 60  # fewer rounds to get there
            source.migration.parameters.throttle_increment = 20
            destination = Destination(listener, source)
            async with anyio.create_task_group() as tg:
                await tg.start(destination.serve)
                started = time.monotonic()
                info = await source.migrate(listener.uri, max_bandwidth=8 << 20, downtime_ms=200,
                                            progress=reports.append)  # fmt: skip
                took = time.monotonic() - started
                vm = destination.vm
                assert vm is not None and destination.same_memory and destination.same_registers
                await keeps_counting(vm)
                await vm.pause()
                assert stale_pages(vm) == []
                await vm.stop()
        assert info.status == "completed" and info.converged
        assert max(r.throttle for r in reports) >= 60
        assert any("cpu-throttle-percentage" in r.to_qmp() for r in reports)
        assert info.throttle == 0 or info.throttle >= 60  # reported as it ended
        assert info.transferred / took < 12 << 20  # the limit held (with the final burst)

    run_on(backend, main)


@BACKENDS
def test_cold_and_file_migrations(backend: str, tmp_path: Path) -> None:
    config = writer(tmp_path, SLOW, rng=True, transport="mmio")
    snapshot = tmp_path / "guest.snap"

    async def main() -> None:
        resources = Resources()
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener:
            async with trivmm.open_vm(config) as source:
                resources.note(source)
                await wait_for(lambda: counter(source) > PAGES)
                destination = Destination(listener, source)
                async with anyio.create_task_group() as tg:
                    await tg.start(destination.serve)
                    info = await source.migrate(listener.uri, cold=True)
                    vm = destination.vm
                    assert vm is not None and destination.same_memory
                    await keeps_counting(vm)
                    await vm.stop()
                assert info.status == "completed" and info.cold and info.rounds == 1 and source.paused
                # the source may take its guest back (its destination is gone) and run on
                await source.migration.resume()
                await keeps_counting(source)
                assert source.migration.run_state() is None

                info = await source.migrate(f"file:{snapshot}")  # a snapshot: always cold
                assert info.status == "completed" and info.cold and source.paused
                assert 0 < info.transferred <= snapshot.stat().st_size  # a sparse file: zero pages are holes
                frozen = counter(source)
        vm = await receive_vm(f"file:{snapshot}")
        with vm:
            resources.note(vm)
            assert counter(vm) == frozen
            async with anyio.create_task_group() as tg:
                await tg.start(vm.run)
                await keeps_counting(vm)
                await vm.pause()
                assert stale_pages(vm) == []
                await vm.stop()
        resources.assert_released()

    run_on(backend, main)


class CuttingProxy:
    """Forwards one unix connection to ``target`` and cuts it -- both ways closed -- at a
    point of the stream: ``offset`` bytes in, or ``delta`` bytes into the first section
    ``at`` = (kind, resend) that it sees (it parses the sections' frames as they pass), or
    once ``backward`` bytes came back from the destination."""

    def __init__(self, path: Path, target: str, *, offset: int | None = None,
                 at: tuple[SectionKind, bool] | None = None, delta: int = 0,
                 backward: int | None = None) -> None:  # fmt: skip
        self.path = path
        self.target = target.removeprefix("unix:")
        self.offset, self.at, self.delta, self.backward = offset, at, delta, backward
        self.seen = bytearray()  # every byte from the source so far
        self._next_section = 16  # after the stream's header
        self.cut = False

    def _cut_offset(self) -> int | None:
        if self.offset is not None:
            return self.offset
        seen = self.seen
        while self.at is not None and len(seen) >= self._next_section + 12:
            start = self._next_section
            kind, name_length = seen[start + 4], seen[start + 5]
            length = int.from_bytes(seen[start + 8 : start + 12], "little")
            flags_at = start + 12 + name_length + 4
            if kind == SectionKind.MEMORY and len(seen) < flags_at + 4:
                return None
            resend = kind == SectionKind.MEMORY and bool(int.from_bytes(seen[flags_at : flags_at + 4], "little") & 2)
            if (kind, resend) == self.at:
                return start + self.delta
            self._next_section = start + 12 + name_length + length + 4
        return None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_unix_listener(self.path)
        async with listener:
            task_status.started()
            near = await listener.accept()
        far = await anyio.connect_unix(self.target)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._forward, near, far, tg.cancel_scope)
            tg.start_soon(self._backward, far, near, tg.cancel_scope)
        await anyio.aclose_forcefully(near)
        await anyio.aclose_forcefully(far)
        self.path.unlink(missing_ok=True)

    async def _forward(self, near: anyio.abc.SocketStream, far: anyio.abc.SocketStream,
                       scope: anyio.CancelScope) -> None:  # fmt: skip
        sent = 0
        while True:
            try:
                self.seen += await near.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                break
            cut = self._cut_offset()
            upto = len(self.seen) if cut is None else min(cut, len(self.seen))
            if self.cut:  # cut on the way back (_backward): nothing more goes through
                break
            try:
                if upto > sent:
                    await far.send(bytes(self.seen[sent:upto]))
            except (anyio.BrokenResourceError, OSError):
                break
            sent = max(sent, upto)
            if cut is not None and sent >= cut:
                self.cut = True
                break
        scope.cancel()

    async def _backward(self, far: anyio.abc.SocketStream, near: anyio.abc.SocketStream,
                        scope: anyio.CancelScope) -> None:  # fmt: skip
        passed = 0
        while True:
            try:
                data = await far.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                break
            if self.backward is not None and passed + len(data) >= self.backward:
                data = data[: self.backward - passed]
                self.cut = True
            try:
                if data:
                    await near.send(data)
            except (anyio.BrokenResourceError, OSError):
                break
            passed += len(data)
            if self.cut:
                break
        scope.cancel()


def test_faults_lose_nothing_and_a_retry_succeeds(tmp_path: Path) -> None:
    """The connection cut at many offsets of a hot stream (and after it, before the
    hand-over), a destination that refuses, one that is not there: each time the source
    runs on (resumed, dirty logging off, memory consistent), the destination has released
    its VM, and the error says what happened. Then a migration succeeds."""
    config = writer(tmp_path, SLOW)
    memory, state, end = SectionKind.MEMORY, SectionKind.STATE, SectionKind.END
    cuts: list[dict[str, Any]] = [
        *(dict(offset=n) for n in (0, 7, 16, 30, 4_000)),  # the header, the CONFIG section
        dict(at=(memory, False), delta=3), dict(at=(memory, False), delta=100_000),  # round 0
        dict(at=(memory, True), delta=30), dict(at=(memory, True), delta=4_200),  # a dirty round
        dict(at=(state, False), delta=50),  # the vCPU state: the guest is paused
        dict(at=(end, False), delta=0),  # right before END
        dict(backward=0),  # after END: READY lost on its way (test_a_hand_over_that_is_not_confirmed... goes on)
    ]

    async def main() -> None:
        resources = Resources()
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
            resources.note(source)
            await wait_for(lambda: counter(source) > PAGES)
            fds = len(os.listdir("/proc/self/fd"))
            ram_mappings = _mappings_of(MEMORY)  # the source's RAM among them

            async def attempt(uri: str, destination: Destination | None = None, proxy: CuttingProxy | None = None,
                              downtime_ms: int | None = None) -> str:  # fmt: skip
                async with anyio.create_task_group() as tg:
                    if destination is not None:
                        await tg.start(destination.serve)
                    if proxy is not None:
                        await tg.start(proxy.serve)
                    with pytest.raises(MigrationError) as failed:
                        await source.migrate(uri, downtime_ms=downtime_ms)  # 1 ms: dirty rounds before the end
                    tg.cancel_scope.deadline = anyio.current_time() + 10  # the destination gives up by itself
                message = str(failed.value)
                assert source.migration.status == "failed" and source.migration.query().error == message
                assert not source.paused and not dirty_logging_on(source), message
                await keeps_counting(source)
                if destination is not None:
                    assert destination.vm is None and isinstance(destination.error, MigrationError), message
                assert _vcpu_threads() == 1 and _kvm_mappings() == 1, message  # the source's only
                assert _mappings_of(MEMORY) <= ram_mappings, message
                assert len(os.listdir("/proc/self/fd")) <= fds + 1, message  # + the listener's accepted socket, at most
                return message

            for cut in cuts:
                proxy = CuttingProxy(tmp_path / "proxy.sock", listener.uri, **cut)
                message = await attempt(f"unix:{proxy.path}", Destination(listener), proxy, downtime_ms=1)
                assert proxy.cut, cut
                assert re.fullmatch(r"the destination closed the connection|the connection to the destination broke "
                                    r"\(.+\)|writing the stream failed: .+", message), (cut, message)  # fmt: skip

            refusing = Destination(listener, config=VmConfig(kernel=config.kernel, memory="32M"))
            message = await attempt(listener.uri, refusing)
            assert "the destination refused the migration: the snapshot does not fit this VM: memory 32 MiB here, " \
                   "16 MiB in the snapshot" in message, message  # fmt: skip
            message = await attempt(f"unix:{tmp_path / 'nobody.sock'}")
            assert message.startswith("cannot connect to unix:"), message

            await source.pause()
            assert stale_pages(source) == []  # the source's memory is what its guest made it
            await source.resume()

            destination = Destination(listener, source)
            async with anyio.create_task_group() as tg:
                await tg.start(destination.serve)
                info = await source.migrate(listener.uri)
                assert info.status == "completed" and destination.same_memory and destination.same_registers
                vm = destination.vm
                assert vm is not None
                await keeps_counting(vm)
                await vm.stop()
        resources.assert_released()

    run_on("trio", main)


def test_a_hand_over_that_is_not_confirmed_leaves_the_source_paused(tmp_path: Path) -> None:
    """The one window two hosts cannot close: the connection cut after the destination's
    READY, so that neither side knows what the other did with GO. The source does not run
    its guest by itself (it may run there); the destination, which got no GO, does not."""
    config = writer(tmp_path, SLOW)

    async def main() -> None:
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > 100)
            destination = Destination(listener)
            proxy = CuttingProxy(tmp_path / "proxy.sock", listener.uri, backward=16)  # READY passes, then the cut
            async with anyio.create_task_group() as tg:
                await tg.start(destination.serve)
                await tg.start(proxy.serve)
                with pytest.raises(MigrationError, match=r"did not confirm .* stays paused here"):
                    await source.migrate(f"unix:{proxy.path}")
            assert destination.vm is None and "before it handed the guest over" in str(destination.error)
            assert source.paused and source.migration.run_state() == "postmigrate" and not dirty_logging_on(source)
            await source.migration.resume()  # the operator knows the destination does not run it
            await keeps_counting(source)

    run_on("trio", main)


def test_a_snapshot_to_a_full_disk_fails_and_the_guest_runs_on(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (a full disk)")
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        config = writer(tmp_path, SLOW)

        async def main() -> None:
            async with trivmm.open_vm(config) as source:
                await wait_for(lambda: counter(source) > PAGES)
                with pytest.raises(MigrationError, match="No space left on device"):
                    await source.migrate(f"file:{full / 'guest.snap'}")
                assert list(full.iterdir()) == []  # no partial file
                assert not source.paused and source.migration.status == "failed"
                await keeps_counting(source)
                info = await source.migrate(f"file:{tmp_path / 'guest.snap'}")
                assert info.status == "completed"

        run_on("trio", main)
    finally:
        subprocess.run(["umount", str(full)], check=False)


def _kvm_mappings() -> int:
    """vCPU run pages mapped in this process."""
    return sum("kvm-vcpu" in line for line in Path("/proc/self/maps").read_text().splitlines())


def _mappings_of(size: int) -> int:
    count = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        count += end - start == size
    return count


# --- through the CLI ------------------------------------------------------------------------------


def _start(command: list[str], tmp_path: Path, name: str, netns: str | None = None) -> subprocess.Popen[bytes]:
    """``python -m trivmm COMMAND`` in ``tmp_path`` (in network namespace ``netns``), its
    stdout and stderr in NAME.out/.err."""
    return start_trivmm(command, tmp_path, name, netns)


def _wait(condition: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{what}: the process ended ({proc.returncode})"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_cli_migrates_a_guest_between_processes(tmp_path: Path) -> None:
    """``run --api-sock`` (a guest printing a line counter), ``run --incoming unix:...``,
    ``migrate SRC DST``: exit 0, the source is quit (exit 0), the destination's console
    continues the count with no line lost or repeated."""
    elf = assemble("serial_counter", tmp_path)
    api, incoming, dst_api = tmp_path / "src.qmp", tmp_path / "in.sock", tmp_path / "dst.qmp"
    source = _start(["run", "--kernel", str(elf), "--memory", "16M", "--api-sock", str(api)], tmp_path, "src")
    destination = _start(["run", "--incoming", "unix:in.sock", "--api-sock", str(dst_api)], tmp_path, "dst")
    try:
        _wait(lambda: api.exists() and (tmp_path / "src.out").read_bytes().count(b"\n") > 20, source, "the source")
        # (the socket exists a moment before the destination says so on stderr)
        _wait(lambda: incoming.exists() and b"waiting for a migration on unix:" in (tmp_path / "dst.err").read_bytes(),
              destination, "the destination")  # fmt: skip
        migrate = subprocess.run([sys.executable, "-m", "trivmm", "migrate", str(api), "unix:in.sock",
                                  "--downtime-ms", "50"], cwd=tmp_path, env=ENV, capture_output=True,
                                 timeout=120)  # fmt: skip
        assert migrate.returncode == 0, migrate.stderr.decode()
        assert re.search(rb"trivmm: migrated to unix:\S+in\.sock: [0-9.]+ MiB in \d+ ms, \d+ round\(s\), downtime "
                         rb"\d+ ms", migrate.stderr), migrate.stderr  # fmt: skip
        assert source.wait(timeout=30) == 0  # quit once the destination ran the guest
        before = (tmp_path / "src.out").read_bytes()
        _wait(lambda: (tmp_path / "dst.out").read_bytes().count(b"\n") > 30, destination, "the destination's output")
        assert b"the guest runs here" in (tmp_path / "dst.err").read_bytes()

        async def quit_destination() -> str:
            from trivmm.migration.qmpclient import QmpClient

            client = await QmpClient.connect(dst_api)
            try:
                status = (await client.execute("query-status"))["status"]
                await client.execute("quit")
            finally:
                await client.aclose()
            return str(status)

        assert anyio.run(quit_destination) == "running"
        assert destination.wait(timeout=30) == 0
        output = before + (tmp_path / "dst.out").read_bytes()
        lines = output.split(b"\n")[:-1]
        assert lines == [f"{n:08x}".encode() for n in range(1, len(lines) + 1)], output[-300:]
    finally:
        for proc in (source, destination):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    bad = subprocess.run([sys.executable, "-m", "trivmm", "migrate", str(api), "ftp:somewhere"], env=ENV,
                         capture_output=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and b"bad migration URI 'ftp:somewhere'" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "trivmm", "snapshot", str(tmp_path / "none.qmp"), "x.snap"],
                             env=ENV, capture_output=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and b"cannot connect to the control socket" in missing.stderr


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair (tests/netns.py): the names and the
    second one's address."""
    with hosts.two_namespaces() as pair:
        yield pair.a, pair.b, pair.address_b


def test_the_cli_migrates_between_two_network_namespaces(tmp_path: Path, two_namespaces: tuple[str, str, str]) -> None:
    """"Two hosts": the source runs in one namespace, the destination listens on the other
    end of a veth pair in the other (unreachable from the source's loopback); ``migrate``
    moves the guest across, hot, and the destination's console continues the count."""
    a, b, address = two_namespaces
    elf = assemble("serial_counter", tmp_path)
    api = tmp_path / "src.qmp"
    source = _start(["run", "--kernel", str(elf), "--memory", "16M", "--api-sock", str(api)], tmp_path, "src",
                    netns=a)  # fmt: skip
    destination = _start(["run", "--incoming", f"tcp:{address}:4444"], tmp_path, "dst", netns=b)
    try:
        _wait(lambda: api.exists() and (tmp_path / "src.out").read_bytes().count(b"\n") > 20, source, "the source")
        _wait(lambda: b"waiting for a migration" in (tmp_path / "dst.err").read_bytes(), destination, "the destination")
        migrate = subprocess.run([sys.executable, "-m", "trivmm", "migrate", str(api), f"tcp:{address}:4444"],
                                 cwd=tmp_path, env=ENV, capture_output=True, timeout=120)  # fmt: skip
        assert migrate.returncode == 0, migrate.stderr.decode()
        assert source.wait(timeout=30) == 0
        before = (tmp_path / "src.out").read_bytes()
        _wait(lambda: (tmp_path / "dst.out").read_bytes().count(b"\n") > 20, destination, "the destination's output")
        destination.terminate()
        destination.wait(timeout=30)
        output = before + (tmp_path / "dst.out").read_bytes()
        lines = output.split(b"\n")[:-1]
        assert lines == [f"{n:08x}".encode() for n in range(1, len(lines) + 1)], output[-300:]
    finally:
        for proc in (source, destination):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_network_peer_cannot_choose_the_destinations_host_files(tmp_path: Path) -> None:
    """The stream's configuration names the source's disk: a destination given none of its
    own refuses it (a network peer must not pick which host files the VMM opens read-write);
    a destination that names its disk takes the guest."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    config = writer(tmp_path, SLOW, disks=(trivmm.DiskConfig(disk, "raw"),))

    async def main() -> None:
        async with listen(f"unix:{tmp_path / 'in.sock'}") as listener, trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > 10)
            refusing = Destination(listener, source)
            async with anyio.create_task_group() as tg:
                await tg.start(refusing.serve)
                with pytest.raises(MigrationError, match="names host devices"):
                    await source.migrate(listener.uri, cold=True)
            assert isinstance(refusing.error, MigrationError) and str(disk) in str(refusing.error)
            await keeps_counting(source)  # the source runs on
            accepting = Destination(listener, source, config)
            async with anyio.create_task_group() as tg:
                await tg.start(accepting.serve)
                info = await source.migrate(listener.uri, cold=True)
                assert info.status == "completed" and accepting.vm is not None
                await keeps_counting(accepting.vm)
                await accepting.vm.stop()

    run_on("trio", main)


def test_a_stalled_peer_does_not_hold_the_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that sends a few bytes and then nothing: the attempt ends after the inactivity
    limit with a clear error, and the listener takes the next (real) migration."""
    import trivmm.migration.incoming as incoming

    monkeypatch.setattr(incoming, "INACTIVITY_TIMEOUT", 0.5)
    config = writer(tmp_path, SLOW)

    async def main() -> None:
        sock = tmp_path / "in.sock"
        async with listen(f"unix:{sock}") as listener:
            stalled = Destination(listener)
            async with anyio.create_task_group() as tg:
                await tg.start(stalled.serve)
                async with await anyio.connect_unix(sock) as peer:
                    await peer.send(b"TRIVMM")
                    with anyio.fail_after(10):
                        while stalled.error is None:
                            await anyio.sleep(0.05)
            assert isinstance(stalled.error, MigrationError) and "sent nothing for 0.5 s" in str(stalled.error)
            async with trivmm.open_vm(config) as source:
                await wait_for(lambda: counter(source) > 10)
                destination = Destination(listener, source)
                async with anyio.create_task_group() as tg:
                    await tg.start(destination.serve)
                    info = await source.migrate(listener.uri, cold=True)
                    assert info.status == "completed" and destination.vm is not None
                    await destination.vm.stop()

    run_on("trio", main)
