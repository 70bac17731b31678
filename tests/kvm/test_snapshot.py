"""Snapshot and restore with tiny guests, under trio and asyncio: a guest spinning at CPL3
runs on from its snapshot in a new VM (its counter, registers and memory continue); a
guest printing on the serial port resumes its output mid-line; corrupt snapshots,
mismatching destinations and VMs with devices that cannot be saved are refused with
``MigrationError``, and leave no fd, thread or guest mapping behind. (Virtio devices'
state is tested with the devices.)"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

import trivmm
from tests.kvm.guests import assemble
from tests.kvm.test_embedding import Resources, _vcpu_threads
from trivmm import VM, MigrationError, StopReason, VmConfig
from trivmm.cpu.quirks import QuirkHooks
from trivmm.kvm import Kvm
from trivmm.kvm._ffi import ffi
from trivmm.migration.state import decode_vcpu
from trivmm.migration.stream import SectionKind, decode_stream

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils"),
              pytest.mark.parametrize("backend", ["trio", "asyncio"])]  # fmt: skip
COUNTER = 0x4000


@pytest.fixture(autouse=True)
def _shared_kvm_fd() -> None:
    """The process's /dev/kvm fd, opened by the first VM and kept, is open before any
    test counts fds."""
    Kvm.shared()


class Log:
    """PIO 0x510: records every value the guest writes (a device snapshots cannot save)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        self.values.append(int.from_bytes(data, "little"))


def run_on(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


def counter(vm: VM) -> int:
    assert vm.memory is not None
    return vm.memory.read_u32(COUNTER)


def raw(value: object) -> bytes:
    return bytes(ffi.buffer(value))


def test_a_spinning_guest_runs_on_from_its_snapshot(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    path = tmp_path / "spin.snap"

    async def main() -> None:
        resources = Resources()
        with anyio.fail_after(60):
            async with trivmm.open_vm(config) as source:
                resources.note(source)
                await wait_for(lambda: counter(source) > 100_000)
                before = counter(source)
                info = await source.snapshot(path)  # taken while the guest runs; it runs on after
                assert not source.paused
                after = counter(source)
                await wait_for(lambda: counter(source) > after + 100_000)
            assert (await source.wait()).reason is StopReason.STOPPED
        assert info.pages == 4096 and info.zero_pages > 4000
        assert info.size < 128 << 10  # 16 MiB of guest, almost all of it zero pages
        # A version 3 file: the slot images take their whole size, the zero pages are holes.
        assert path.stat().st_size > 16 << 20 and path.stat().st_blocks * 512 < 256 << 10

        sections = {s.name: s for s in decode_stream(path.read_bytes()) if s.kind is SectionKind.STATE}
        saved = decode_vcpu(sections["vcpu/0"].payload, "vcpu/0")
        async with anyio.create_task_group() as tg:
            vm = await VM.restore(path)  # built, state applied, not running yet
            with vm:
                resources.note(vm)
                vcpu = vm.vcpus[0]
                assert raw(vcpu.get_regs()) == saved.regs
                assert raw(vcpu.get_sregs()) == saved.sregs
                assert raw(vcpu.get_debugregs()) == saved.debugregs
                assert vcpu.get_mp_state() == saved.mp_state
                restored = counter(vm)
                assert restored >= before
                with anyio.fail_after(30):
                    await tg.start(vm.run)
                    await wait_for(lambda: counter(vm) > restored + 100_000)  # it keeps counting
                    assert (await vm.stop()).reason is StopReason.STOPPED
        resources.assert_released()

    run_on(backend, main)


def test_a_paused_snapshot_restores_exactly_through_open_vm(backend: str, tmp_path: Path) -> None:
    """``resume=False`` leaves the source paused: the destination starts at its very
    counter value, registers and memory (two vCPUs: the second never started), and a
    stream works as well as a file."""
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M", vcpus=2)

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        async def send(self, item: bytes) -> None:
            self.data += item

    class Source:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def receive(self, max_bytes: int = 65536) -> bytes:
            if not self.data:
                raise anyio.EndOfStream
            chunk, self.data = self.data[:4093], self.data[4093:]  # odd chunks: sections straddle them
            return chunk

    async def main() -> None:
        resources = Resources()
        sink = Sink()
        with anyio.fail_after(60):
            async with trivmm.open_vm(config) as source:
                resources.note(source)
                await wait_for(lambda: counter(source) > 1000)
                await source.snapshot(sink, resume=False)
                assert source.paused
                frozen = counter(source)
                regs = [raw(vcpu.get_regs()) for vcpu in source.vcpus]
                mp_states = [vcpu.get_mp_state() for vcpu in source.vcpus]
                assert source.memory is not None
                ram = source.memory.read(0, 2 << 20)
                await anyio.sleep(0.05)
                assert counter(source) == frozen
            vm = await VM.restore(Source(bytes(sink.data)), config)
            with vm:
                resources.note(vm)
                assert counter(vm) == frozen and [raw(vcpu.get_regs()) for vcpu in vm.vcpus] == regs
                assert [vcpu.get_mp_state() for vcpu in vm.vcpus] == mp_states
                assert vm.memory is not None and vm.memory.read(0, 2 << 20) == ram
            async with trivmm.open_vm(config, restore_from=Source(bytes(sink.data))) as vm:
                resources.note(vm)
                await wait_for(lambda: counter(vm) > frozen + 1000)
        resources.assert_released()

    run_on(backend, main)


LINE = re.compile(rb"[0-9a-f]{8}\n")


def test_serial_output_resumes_after_restore(backend: str, tmp_path: Path) -> None:
    """A guest printing a line counter is snapshotted while it prints (paused there); the
    restored guest's console continues the sequence where the source's stopped, even in
    the middle of a line: no byte lost or repeated."""
    elf = assemble("serial_counter", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    path = tmp_path / "serial.snap"

    async def read_until(vm: VM, out: bytearray, lines: int) -> None:
        with anyio.fail_after(30):
            while out.count(b"\n") < lines:
                out += await vm.console.receive()

    async def drain(vm: VM, out: bytearray) -> None:
        while True:
            with anyio.move_on_after(0.3):
                out += await vm.console.receive()
                continue
            return

    async def main() -> None:
        before, after = bytearray(), bytearray()
        async with trivmm.open_vm(config) as source:
            await read_until(source, before, 30)
            await source.snapshot(path, resume=False)
            await drain(source, before)  # all it printed before the pause
        async with trivmm.open_vm(config, restore_from=path) as vm:
            await read_until(vm, after, 30)
            result = await vm.stop()
        assert result.console_dropped == 0
        output = bytes(before + after)
        lines = output.split(b"\n")[:-1]
        assert lines == [f"{n:08x}".encode() for n in range(1, len(lines) + 1)], output[-200:]
        assert len(lines) >= 60

    run_on(backend, main)


@pytest.mark.parametrize("form", ["file", "stream"])
def test_corrupt_snapshots_are_refused_and_release_everything(backend: str, form: str, tmp_path: Path) -> None:
    """Cuts and flipped bits all over a snapshot: a file (version 3, memory mapped) and a
    stream (version 1, memory in sections). A file's memory images are mapped unread, so a
    bit flipped inside one is found only with ``verify_memory`` -- which the file form uses
    for every case here; one more case shows a lazy restore takes that file."""
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    good = tmp_path / "good.snap"

    async def main() -> None:
        async with trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > 1000)
            if form == "file":
                await source.snapshot(good, resume=False)
            else:
                chunks: list[bytes] = []
                await source.snapshot(_ListSink(chunks), resume=False)
                good.write_bytes(b"".join(chunks))
        data = good.read_bytes()
        starts = _section_starts(data)
        page = data.index(b"\x0f\x01\x15")  # guest code (lgdt) inside a memory run: a data byte
        cuts = sorted({0, 4, 15, 16, 20, *(s + 13 for s in starts), page, len(data) - 1})
        flips = sorted({2, 9, 13, *(s + off for s in starts for off in (0, 4, 8, 14)), page, len(data) - 2})
        cases = [(f"cut at {at}", data[:at]) for at in cuts]
        cases += [(f"flip at {at}", data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]) for at in flips]
        cases.append(("trailing byte", data + b"\x00"))
        resources = Resources()
        fds = len(os.listdir("/proc/self/fd"))
        ram_sized = _mappings_of(16 << 20)
        for name, bad in cases:
            path = tmp_path / "bad.snap"
            path.write_bytes(bad)
            with pytest.raises(MigrationError):
                with await VM.restore(path, verify_memory=form == "file"):
                    pytest.fail(f"{name}: a corrupt snapshot was restored")
            assert _vcpu_threads() == 0, name
            assert len(os.listdir("/proc/self/fd")) <= fds, name
            assert _kvm_mappings() == 0, name
            assert _mappings_of(16 << 20) <= ram_sized, name  # the guest RAM of the VM being built
        if form == "file":  # unverified, a flipped page is what the guest finds there
            path.write_bytes(data[:page] + bytes([data[page] ^ 0x10]) + data[page + 1 :])
            with await VM.restore(path):
                pass
        resources.assert_released()
        async with trivmm.open_vm(restore_from=good) as vm:  # the good one still works
            await wait_for(lambda: counter(vm) > 2000)

    run_on(backend, main)


class _ListSink:
    """A ByteSink that keeps what it is sent."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def send(self, item: bytes) -> None:
        self.chunks.append(bytes(item))


def _section_starts(data: bytes) -> list[int]:
    """Offsets of every section of a good stream (after the 16-byte header), up to its END
    (a version 3 file's memory images follow)."""
    starts, at = [], 16
    while at < len(data):
        starts.append(at)
        kind, name_length, length = data[at + 4], data[at + 5], int.from_bytes(data[at + 8 : at + 12], "little")
        at += 12 + name_length + length + 4
        if kind == SectionKind.END:
            break
    return starts


def _mappings_of(size: int) -> int:
    """Mappings of exactly ``size`` bytes (a 16 MiB guest's RAM is one)."""
    count = 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        count += end - start == size
    return count


def _kvm_mappings() -> int:
    """vCPU run pages still mapped (a VM that was not closed keeps them)."""
    return sum("kvm-vcpu" in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_mismatching_destinations_and_unsaveable_vms_are_refused(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    path = tmp_path / "spin.snap"

    async def main() -> None:
        resources = Resources()
        async with trivmm.open_vm(config) as source:
            resources.note(source)
            await wait_for(lambda: counter(source) > 1000)
            await source.snapshot(path)
        mismatches = [(VmConfig(kernel=elf, memory="32M"), "memory 32 MiB here, 16 MiB in the snapshot"),
                      (VmConfig(kernel=elf, memory="16M", vcpus=2), "vcpus 2 here, 1 in the snapshot")]  # fmt: skip
        for other, message in mismatches:
            with pytest.raises(MigrationError, match=message):
                await VM.restore(path, other)
        with pytest.raises(MigrationError, match="cannot read the snapshot"):
            await VM.restore(tmp_path / "missing.snap")
        with pytest.raises(trivmm.VmError, match="waits for its state"):
            with VM(config, incoming=True) as vm:
                await vm.run()

        # A VM with a device the registry cannot save is refused before the guest is paused.
        async with trivmm.open_vm(config) as vm:
            resources.note(vm)
            vm.pio.insert(0x510, 4, Log())
            await wait_for(lambda: counter(vm) > 1000)
            with pytest.raises(MigrationError, match="pio:0x510: Log at pio:0x510 has no saved state"):
                await vm.snapshot(tmp_path / "custom.snap")
            assert not vm.paused and not (tmp_path / "custom.snap").exists()
            running = counter(vm)
            await wait_for(lambda: counter(vm) > running + 1000)
        assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
        resources.assert_released()

    run_on(backend, main)


def test_a_guest_restored_before_its_syscall_still_makes_it(backend: str, tmp_path: Path) -> None:
    """syscall.S sets LSTAR and its #PF gate, spins ~1e9 TSC cycles at CPL3, then SYSCALLs.
    Snapshotted during the spin (the SYSCALL completer armed, on the nested host), the
    restored guest finishes the spin on its restored TSC and enters its kernel at CPL0:
    the host-quirk layer's state and the time-stamp counter came along."""
    elf = assemble("syscall", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    path = tmp_path / "syscall.snap"

    async def main() -> None:
        resources = Resources()
        with anyio.fail_after(30):
            async with trivmm.open_vm(config) as source:
                resources.note(source)
                hooks = source.runners[0].hooks
                await wait_for(lambda: hooks.settled, timeout=5)  # armed (nested host), or nothing to arm
                await source.snapshot(path, resume=False)
                armed = hooks.syscalls.armed_at if isinstance(hooks, QuirkHooks) and hooks.syscalls else None
                assert armed is not None or not isinstance(hooks, QuirkHooks)
            vm = await VM.restore(path)
            with vm:
                resources.note(vm)
                restored_hooks = vm.runners[0].hooks
                if isinstance(restored_hooks, QuirkHooks) and restored_hooks.syscalls is not None:
                    assert restored_hooks.syscalls.armed_at == armed
                log = Log()
                vm.pio.insert(0x510, 4, log)  # after the restore: the snapshot refuses devices it cannot save
                result = await vm.run()
                counts = restored_hooks.counts()
        assert result.reason is StopReason.POWER_OFF
        assert log.values == [0x5C, 0, 0x2A]  # SYSCALL entered at CPL0 with RDI intact; no page fault
        if armed is not None:
            assert counts["syscalls completed"] == 1
        resources.assert_released()

    run_on(backend, main)


def test_a_snapshot_file_is_mapped_copy_on_write_and_may_be_replaced_under_the_vm(backend: str,
                                                                                 tmp_path: Path) -> None:
    """Restore from a file maps its memory image (the file appears in /proc/self/maps at the
    guest RAM's address); the guest's writes never reach the file; a new snapshot written to
    the same path (renamed into place) leaves the VM that maps the old one running on."""
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    path = tmp_path / "spin.snap"

    async def main() -> None:
        async with trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > 1000)
            await source.snapshot(path, resume=False)
        original = path.read_bytes()
        inode = path.stat().st_ino
        vm = await VM.restore(path)
        with vm:
            assert vm.memory is not None
            address = vm.memory.regions[0].host_address
            assert _mapped_file_at(address) == (str(path), inode)
            frozen = counter(vm)
            async with anyio.create_task_group() as tg:
                await tg.start(vm.run)
                await wait_for(lambda: counter(vm) > frozen + 100_000)
                assert path.read_bytes() == original  # the counter moved in the guest's copy only
                await vm.snapshot(path, resume=False)  # over the file the VM maps: a new one renamed in
                assert path.stat().st_ino != inode
                again = counter(vm)
                await vm.resume()
                await wait_for(lambda: counter(vm) > again + 100_000)
                await vm.stop()
        async with trivmm.open_vm(restore_from=path) as newer:  # the newer snapshot works too
            assert counter(newer) == again
            await wait_for(lambda: counter(newer) > again + 100_000)

    run_on(backend, main)


def _mapped_file_at(address: int) -> tuple[str, int] | None:
    """The file (path, inode) mapped at ``address`` in this process, if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            return (fields[5].strip(), int(fields[4])) if len(fields) == 6 and fields[4] != "0" else None
    return None


def test_a_guest_that_was_paused_comes_back_paused(backend: str, tmp_path: Path) -> None:
    """The run state travels (CONFIG's ``running``, as QEMU's global state): a snapshot of
    a paused VM restores into a VM whose run() parks every vCPU before it runs; a snapshot
    taken while it ran restores running, even with ``resume=False``."""
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    paused_snap, running_snap = tmp_path / "paused.snap", tmp_path / "running.snap"

    async def main() -> None:
        async with trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > 1000)
            await source.snapshot(running_snap, resume=False)  # it ran when the snapshot began
            await source.snapshot(paused_snap)  # paused by the one before: stays paused
            assert source.paused
            frozen = counter(source)
        vm = await VM.restore(paused_snap)
        with vm:
            assert vm.start_paused
            async with anyio.create_task_group() as tg:
                await tg.start(vm.run)
                await wait_for(lambda: vm.paused)
                await anyio.sleep(0.2)
                assert counter(vm) == frozen, "the guest ran before it was resumed"
                await vm.resume()
                await wait_for(lambda: counter(vm) > frozen + 100_000)
                await vm.stop()
        async with trivmm.open_vm(restore_from=running_snap) as vm:
            assert not vm.start_paused
            await wait_for(lambda: counter(vm) > frozen + 100_000)

    run_on(backend, main)


def test_a_guest_restored_paused_counts_as_paused_before_its_threads_park(backend: str, tmp_path: Path) -> None:
    """A restored guest whose source was paused is paused from the moment run() starts,
    not only once every vCPU thread has parked: a snapshot taken at once keeps it paused
    (it used to see a running guest, and resume it after), and ``resume`` still lets it go."""
    elf = assemble("cpl3_loop", tmp_path)
    config = VmConfig(kernel=elf, memory="16M")
    paused_snap = tmp_path / "paused.snap"

    async def main() -> None:
        async with trivmm.open_vm(config) as source:
            await wait_for(lambda: counter(source) > 1000)
            await source.pause()
            await source.snapshot(paused_snap)
            frozen = counter(source)
        vm = await VM.restore(paused_snap)
        with vm:
            async with anyio.create_task_group() as tg:
                await tg.start(vm.run)
                assert vm.paused, "a guest restored paused reads as running before its threads park"
                info = await vm.snapshot(tmp_path / "again.snap")
                assert info.pages > 0
                assert vm.paused
                await anyio.sleep(0.2)
                assert counter(vm) == frozen, "the snapshot resumed a guest that was restored paused"
                await vm.resume()
                await wait_for(lambda: counter(vm) > frozen + 100_000)
                await vm.stop()

    run_on(backend, main)


def test_map_memory_off_copies_the_images_and_the_file_may_go(backend: str, tmp_path: Path) -> None:
    """``VM.restore(path, map_memory=False)``: the images are read into the VM's own memory
    (holes skipped), so the file may be truncated or removed while the guest runs."""
    elf = assemble("cpl3_loop", tmp_path)
    path = tmp_path / "spin.snap"

    async def main() -> None:
        async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as source:
            await wait_for(lambda: counter(source) > 1000)
            await source.snapshot(path, resume=False)
            frozen = counter(source)
        vm = await VM.restore(path, map_memory=False)
        with vm:
            assert vm.memory is not None
            assert _mapped_file_at(vm.memory.regions[0].host_address) is None
            assert counter(vm) == frozen
            os.truncate(path, 0)  # a mapped VM would die of SIGBUS at its next touch of the file
            async with anyio.create_task_group() as tg:
                await tg.start(vm.run)
                await wait_for(lambda: counter(vm) > frozen + 100_000)
                await vm.stop()

    run_on(backend, main)
