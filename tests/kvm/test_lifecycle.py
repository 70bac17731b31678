"""The VM's lifecycle with tiny guests: close() on a running VM, a console sink that stalls
or lags, the last console output of a failing VM, and a guest panic."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.kvm.guests import assemble
from tests.kvm.test_tiny_guests import Log, _threads, _wait_for
from trivmm import VM, StopReason, VmConfig, VmError
from trivmm import vm as vm_module
from trivmm.devices.acpi_pm import ACPI_PM_PORT

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]


async def _run_noting_failure(vm: VM, failures: list[VmError]) -> None:
    try:
        await vm.run()
    except VmError as exc:
        failures.append(exc)


async def test_close_on_a_running_vm_stops_its_vcpus_first(tmp_path: Path) -> None:
    elf = assemble("cpl3_loop", tmp_path)
    vm = VM(VmConfig(kernel=elf, memory="16M"))
    memory = vm.memory
    assert memory is not None
    failures: list[VmError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_noting_failure, vm, failures)
        await _wait_for(lambda: memory.read_u32(0x4000) > 1000)
        vm.close()  # from the event loop's thread, while the vCPU spins at CPL3
        assert not _threads()  # stopped before anything was freed
        assert vm.memory is None and vm.vcpus == []
    assert [str(f) for f in failures] == ["the VM was closed while it was running"]
    vm.close()  # idempotent


async def test_close_from_another_thread_with_host_input_still_coming(tmp_path: Path) -> None:
    """The console-input pump is a task that may still feed the UART after close():
    that must not reach a closed VM fd (nor unmapped run pages through a kick)."""
    elf = assemble("cpl3_loop", tmp_path)
    send, receive = trio.testing.memory_stream_one_way_pair()
    vm = VM(VmConfig(kernel=elf, memory="16M"), console_input=receive)
    memory = vm.memory
    assert memory is not None
    failures: list[VmError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_noting_failure, vm, failures)
        await send.send_all(b"typed while running\n")
        await _wait_for(lambda: memory.read_u32(0x4000) > 1000)
        await trio.to_thread.run_sync(vm.close)
        vm.serial.enqueue_input(b"typed after close\n")  # what the pump may still do
        assert vm.vm is None and not _threads()
    assert [str(f) for f in failures] == ["the VM was closed while it was running"]


async def test_a_stalled_console_sink_never_stops_the_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_module, "CONSOLE_FLUSH_TIMEOUT", 0.5)
    release = threading.Event()
    taken: list[bytes] = []

    def stalled_stdout(data: bytes) -> None:  # e.g. a terminal nobody reads
        taken.append(data)
        release.wait(30)

    try:
        with VM(VmConfig(append="x" * 200), console_output=stalled_stdout) as vm, trio.fail_after(10):
            started = time.monotonic()
            result = await vm.run()
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert result.reason is StopReason.POWER_OFF  # the guest ran to its end regardless
    assert elapsed < 5
    delivered = sum(len(chunk) for chunk in taken)
    assert delivered > 0 and result.console_dropped > 0
    assert delivered + result.console_dropped >= 200  # every byte is delivered or counted


async def test_the_last_console_output_of_a_failing_vm_is_delivered(tmp_path: Path) -> None:
    received = bytearray()

    class SlowStream(trio.abc.SendStream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await trio.sleep(0.05)  # lags behind the guest
            received.extend(data)

        async def wait_send_all_might_not_block(self) -> None:
            pass

        async def aclose(self) -> None:
            pass

    class BrokenPowerOff:
        def read(self, offset: int, data: memoryview) -> None:
            data[:] = bytes(len(data))

        def write(self, offset: int, data: memoryview) -> None:
            raise RuntimeError("power-off register model bug")

    with VM(VmConfig(append="last-words"), console_output=SlowStream()) as vm:
        vm.pio.remove(ACPI_PM_PORT)
        vm.pio.insert(ACPI_PM_PORT, 8, BrokenPowerOff())
        with pytest.raises(VmError, match="power-off register model bug"), trio.fail_after(10):
            await vm.run()
    assert received.startswith(b"Hello from the trivmm built-in guest!")
    assert b"last-words" in received  # printed just before the failing write


async def test_a_guest_panic_ends_the_vm_with_its_reason(tmp_path: Path) -> None:
    elf = assemble("panic", tmp_path)
    console = bytearray()
    with VM(VmConfig(kernel=elf, memory="16M"), console_output=console.extend) as vm, trio.fail_after(10):
        log = Log()
        vm.pio.insert(0x510, 4, log)
        result = await vm.run()
    assert result.reason is StopReason.PANIC
    assert log.values == [0b11]  # PANICKED | CRASH_LOADED offered; nothing ran after the report
    assert console == b"Kernel panic - not syncing: tiny guest\n"


def test_the_cli_exits_3_on_a_guest_panic(tmp_path: Path) -> None:
    elf = assemble("panic", tmp_path)
    result = subprocess.run([sys.executable, "-m", "trivmm", "run", "--kernel", str(elf), "--memory", "16M"],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"Kernel panic - not syncing: tiny guest\n"
    assert b"guest kernel panicked" in result.stderr
