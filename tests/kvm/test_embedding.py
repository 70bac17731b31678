"""The public embedding API under trio and under asyncio alike: ``open_vm`` as a structured
task, the console as a byte stream both ways, stop/wait, errors out of the ``async with``,
teardown on cancellation, and 100 VMs at once in one process.

Each test is a plain function that runs its body with ``anyio.run`` on the backend it is
parametrized with, so the same code is exercised on both event loops.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

import trivmm
from tests.kvm.guests import assemble
from tests.kvm.test_tiny_guests import Log, Registers
from trivmm import StopReason, VmConfig, VmError
from trivmm.devices.acpi_pm import ACPI_PM_PORT
from trivmm.kvm import Kvm

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils"),
              pytest.mark.parametrize("backend", ["trio", "asyncio"])]  # fmt: skip
GREETING = b"Hello from the trivmm built-in guest! cmdline: "


def run_on(backend: str, fn: Callable[[], Awaitable[None]]) -> None:
    anyio.run(fn, backend=backend)


class Resources:
    """What a process holds that a VM takes: fds, vCPU threads, guest RAM mappings."""

    def __init__(self) -> None:
        Kvm.shared()  # the process's /dev/kvm fd, opened by the first VM, is not a VM's
        self.fds = len(os.listdir("/proc/self/fd"))
        self.threads = _vcpu_threads()
        self.guest_ram: list[int] = []  # host addresses of the VMs' RAM regions

    def note(self, vm: trivmm.VM) -> None:
        assert vm.memory is not None
        self.guest_ram += [region.host_address for region in vm.memory]

    def assert_released(self) -> None:
        assert _vcpu_threads() == self.threads == 0
        assert len(os.listdir("/proc/self/fd")) <= self.fds
        mapped = _mapping_starts()
        assert not [hex(a) for a in self.guest_ram if a in mapped]


def _vcpu_threads() -> int:
    return sum(t.name.startswith("trivmm-vcpu") for t in threading.enumerate())


def _mapping_starts() -> set[int]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {int(line.split("-", 1)[0], 16) for line in lines}


async def read_console(vm: trivmm.VM) -> bytes:
    out = bytearray()
    while True:
        try:
            out += await vm.console.receive()
        except anyio.EndOfStream:
            return bytes(out)


def test_open_vm_runs_a_guest_and_streams_its_console(backend: str) -> None:
    async def main() -> None:
        resources = Resources()
        with anyio.fail_after(30):
            async with trivmm.open_vm(VmConfig(append="embedded")) as vm:
                resources.note(vm)
                console = await read_console(vm)  # ends when the guest has powered off
                result = await vm.wait()
        assert result.reason is StopReason.POWER_OFF and result.exits > 0
        assert vm.cmdline.endswith(" embedded")
        assert console == GREETING + vm.cmdline.encode() + b"\r\n"
        assert vm.memory is None and vm.vm is None
        resources.assert_released()

    run_on(backend, main)


def test_console_send_types_into_the_guest(backend: str, tmp_path: Path) -> None:
    elf = assemble("serial_echo", tmp_path)
    text = b"typed through vm.console.send, longer than the 64-byte receive FIFO of a 16550A\n"

    async def main() -> None:
        log = Log()
        with anyio.fail_after(30):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                vm.pio.insert(0x510, 4, log)
                await vm.console.send(text)
                result = await vm.wait()
        assert result.reason is StopReason.POWER_OFF
        assert bytes(log.values) == text

    run_on(backend, main)


def test_console_send_after_the_guest_ended_is_refused_not_hung(backend: str) -> None:
    async def main() -> None:
        with anyio.fail_after(30):
            async with trivmm.open_vm(VmConfig()) as vm:
                await vm.wait()
                with pytest.raises(anyio.BrokenResourceError, match="the guest has stopped"):
                    await vm.console.send(b"x" * 200)  # more than the UART's FIFO holds

    run_on(backend, main)


def test_leaving_the_block_stops_a_running_guest(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)

    async def main() -> None:
        resources = Resources()
        with anyio.fail_after(30):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                resources.note(vm)
                await _wait_for(lambda: vm.memory is not None and vm.memory.read_u32(0x4000) > 1000)
                await vm.pause()
                assert vm.paused
                await vm.resume()
                # Overlapping pauses (a user's stop during a snapshot's) both return, once
                # every vCPU is parked; one resume lets the guest run on.
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(vm.pause)
                assert vm.paused
                memory = vm.memory
                assert memory is not None
                count = memory.read_u32(0x4000)
                await anyio.sleep(0.05)
                assert memory.read_u32(0x4000) == count
                await vm.resume()
                await _wait_for(lambda: memory.read_u32(0x4000) != count)
            assert (await vm.wait()).reason is StopReason.STOPPED
        resources.assert_released()

        async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
            result = await vm.stop()
        assert result.reason is StopReason.STOPPED

    run_on(backend, main)


def test_cancelling_the_callers_scope_tears_the_vm_down(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)

    async def main() -> None:
        resources = Resources()
        with anyio.move_on_after(30) as outer:
            async with anyio.create_task_group() as tg:

                async def service() -> None:
                    async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                        resources.note(vm)
                        memory = vm.memory
                        assert memory is not None
                        await _wait_for(lambda: memory.read_u32(0x4000) > 1000)
                        tg.cancel_scope.cancel()  # the caller gives up while the guest spins
                        await anyio.sleep(30)

                tg.start_soon(service)
        assert not outer.cancel_called
        resources.assert_released()

    run_on(backend, main)


def test_a_failing_vm_raises_its_error_out_of_the_block(backend: str) -> None:
    class BrokenPowerOff(Registers):
        def write(self, offset: int, data: memoryview) -> None:
            raise RuntimeError("power-off register model bug")

    async def main() -> None:
        resources = Resources()
        body_cancelled = False
        with pytest.raises(VmError, match="power-off register model bug"), anyio.fail_after(30):
            async with trivmm.open_vm(VmConfig()) as vm:
                resources.note(vm)
                vm.pio.remove(ACPI_PM_PORT)
                vm.pio.insert(ACPI_PM_PORT, 8, BrokenPowerOff(8))
                try:
                    await anyio.sleep(30)
                except anyio.get_cancelled_exc_class():
                    body_cancelled = True
                    raise
        assert body_cancelled
        resources.assert_released()

    run_on(backend, main)


def test_an_error_in_the_block_propagates_as_itself(backend: str, tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)

    async def main() -> None:
        resources = Resources()
        with pytest.raises(KeyError, match="the service's own bug"):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                resources.note(vm)
                raise KeyError("the service's own bug")
        resources.assert_released()

    run_on(backend, main)


def test_a_hundred_vms_at_once_each_with_its_own_console(backend: str) -> None:
    count = 100

    async def one(index: int, consoles: dict[int, bytes], exits: dict[int, StopReason], resources: Resources) -> None:
        async with trivmm.open_vm(VmConfig(memory="16M", append=f"vm-{index:03d}")) as vm:
            resources.note(vm)
            assert vm.cmdline.endswith(f" vm-{index:03d}")
            consoles[index] = await read_console(vm)
            consoles[index] = consoles[index].replace(vm.cmdline.encode(), f"<cmdline {index:03d}>".encode())
            exits[index] = (await vm.wait()).reason

    async def main() -> None:
        resources = Resources()
        consoles: dict[int, bytes] = {}
        exits: dict[int, StopReason] = {}
        peak_threads = 0

        async def watch_threads() -> None:
            nonlocal peak_threads
            while True:
                peak_threads = max(peak_threads, _vcpu_threads())
                await anyio.sleep(0.001)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as watcher:
                watcher.start_soon(watch_threads)
                async with anyio.create_task_group() as tg:
                    for index in range(count):
                        tg.start_soon(one, index, consoles, exits, resources)
                watcher.cancel_scope.cancel()
        assert exits == {i: StopReason.POWER_OFF for i in range(count)}
        for index, console in consoles.items():  # no cross-talk: each VM printed its own line
            assert console == GREETING + f"<cmdline {index:03d}>\r\n".encode()
        assert peak_threads > 1  # they really ran at the same time
        assert len(resources.guest_ram) >= count
        resources.assert_released()

    run_on(backend, main)


def test_a_hundred_vms_alive_and_running_at_the_same_time(backend: str, tmp_path: Path) -> None:
    """100 guests spinning at CPL3 (no exits), each left running until all 100 have run, then
    paused together, resumed and stopped by leaving their blocks."""
    elf = assemble("cpl3_loop", tmp_path)
    count = 100

    async def main() -> None:
        resources = Resources()
        all_running = anyio.Event()
        running = 0
        results: list[StopReason] = []

        async def one() -> None:
            nonlocal running
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as vm:
                resources.note(vm)
                memory = vm.memory
                assert memory is not None
                await _wait_for(lambda: memory.read_u32(0x4000) > 0, timeout=60)
                running += 1
                if running == count:
                    all_running.set()
                await all_running.wait()
                await vm.pause()
                frozen = memory.read_u32(0x4000)
                await anyio.sleep(0.05)
                assert memory.read_u32(0x4000) == frozen
                await vm.resume()
            results.append((await vm.wait()).reason)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(one)
                await all_running.wait()
                assert _vcpu_threads() == count
        assert results == [StopReason.STOPPED] * count
        resources.assert_released()

    run_on(backend, main)


def test_a_spinning_guest_starves_neither_the_loop_nor_other_vms(backend: str, tmp_path: Path) -> None:
    """A vCPU in KVM_RUN does not hold the GIL: with a guest spinning at CPL3 (no exits),
    Python code on the loop's thread and other VMs' consoles go on."""
    elf = assemble("cpl3_loop", tmp_path)

    async def main() -> None:
        with anyio.fail_after(60):
            async with trivmm.open_vm(VmConfig(kernel=elf, memory="16M")) as spinner:
                memory = spinner.memory
                assert memory is not None
                await _wait_for(lambda: memory.read_u32(0x4000) > 1000)
                started = time.monotonic()
                total = 0
                for i in range(2_000_000):  # pure Python, needs the GIL throughout
                    total += i
                assert time.monotonic() - started < 10
                outputs: list[bytes] = []

                async def hello(index: int) -> None:
                    async with trivmm.open_vm(VmConfig(memory="16M", append=f"beside-{index}")) as vm:
                        output = await read_console(vm)
                        outputs.append(output.replace(vm.cmdline.encode(), f"<cmdline {index}>".encode()))

                async with anyio.create_task_group() as tg:
                    for index in range(10):
                        tg.start_soon(hello, index)
                assert sorted(outputs) == sorted(GREETING + f"<cmdline {i}>\r\n".encode() for i in range(10))
                assert memory.read_u32(0x4000) > 1000  # still spinning all along

    run_on(backend, main)


async def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)
