"""KVM mechanics with tiny guests (tests/kvm/guests/*.S): one mechanism each."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.kvm.guests import assemble
from trivmm import VM, StopReason, VmConfig, VmError
from trivmm.cpu.templates import detect_host_template

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
NESTED_HOST = detect_host_template().name == "nested-pvm"


class Log:
    """PIO 0x510: records every value the guest writes."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.lock = threading.Lock()

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        with self.lock:
            self.values.append(int.from_bytes(data, "little"))


class Registers:
    """A scratch device: reads return what was written, in little-endian bytes."""

    def __init__(self, size: int, initial: bytes = b"") -> None:
        self.bytes = bytearray(initial.ljust(size, b"\0"))
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = self.bytes[offset : offset + len(data)]

    def write(self, offset: int, data: memoryview) -> None:
        self.writes.append((offset, bytes(data)))
        self.bytes[offset : offset + len(data)] = data


def make_vm(tmp_path: Path, guest: str, *, vcpus: int = 1, protocol: str = "auto",
            symbols: dict[str, int] | None = None) -> tuple[VM, Log]:  # fmt: skip
    elf = assemble(guest, tmp_path, symbols=symbols)
    vm = VM(VmConfig(kernel=elf, memory="16M", vcpus=vcpus, boot_protocol=protocol))
    log = Log()
    vm.pio.insert(0x510, 4, log)
    return vm, log


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("trivmm-vcpu")}


async def test_pio_and_mmio_reach_devices_with_offsets_and_widths(tmp_path: Path) -> None:
    vm, log = make_vm(tmp_path, "pio_mmio")
    pio = Registers(8)
    mmio = Registers(16, struct.pack("<II", 0, 0x600DF00D))
    vm.pio.insert(0x520, 8, pio)
    vm.mmio.insert(0xD000_0000, 16, mmio)
    with vm:
        result = await vm.run()
    assert result.reason is StopReason.POWER_OFF
    assert pio.writes[:3] == [(0, b"\x11"), (2, b"\x33\x22"), (4, b"\x77\x66\x55\x44")]
    assert pio.writes[3:] == [(6, b"a"), (6, b"b"), (6, b"c"), (6, b"d")]  # rep outsb
    assert mmio.writes == [(0, b"\xbe\xba\xfe\xca")]
    assert log.values == [0x11, 0x44556677, 0xFFFFFFFF, 0x600DF00D, 0x600D]


async def test_two_vcpus_boot_the_ap_by_init_sipi(tmp_path: Path) -> None:
    vm, log = make_vm(tmp_path, "smp", vcpus=2)
    with vm, trio.fail_after(30):
        result = await vm.run()
    assert result.reason is StopReason.POWER_OFF
    assert log.values == [1, 0xB5B5]  # the AP's APIC id, then the BSP saw it run
    assert not _threads()


async def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_pause_resume_and_prompt_cancellation(tmp_path: Path) -> None:
    vm, log = make_vm(tmp_path, "cpl3_loop")
    with vm:
        counter = lambda: vm.memory.read_u32(0x4000)  # noqa: E731
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.run)
            await _wait_for(lambda: counter() > 1000)
            await vm.pause()
            assert vm.paused
            frozen = counter()
            await trio.sleep(0.2)
            assert counter() == frozen
            await vm.resume()
            await _wait_for(lambda: counter() > frozen)
            assert not vm.paused
            started = time.monotonic()
            nursery.cancel_scope.cancel()
        assert time.monotonic() - started < 2.0
        assert log.values == [0x3333]
        assert not _threads()
        fds = set(os.listdir("/proc/self/fd"))
    assert len(set(os.listdir("/proc/self/fd"))) < len(fds)  # close() released the VM's fds


async def test_cancel_while_paused_stops_the_vcpu(tmp_path: Path) -> None:
    vm, _ = make_vm(tmp_path, "cpl3_loop")
    with vm:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.run)
            await _wait_for(lambda: vm.memory.read_u32(0x4000) > 0)
            await vm.pause()
            nursery.cancel_scope.cancel()
    assert not _threads()


async def test_a_device_error_stops_the_vm_with_an_error(tmp_path: Path) -> None:
    vm, _ = make_vm(tmp_path, "pio_mmio")

    class Broken(Registers):
        def write(self, offset: int, data: memoryview) -> None:
            raise RuntimeError("device model bug")

    vm.pio.insert(0x520, 8, Broken(8))
    with vm, pytest.raises(VmError, match="RuntimeError: device model bug"), trio.fail_after(10):
        await vm.run()
    assert not _threads()


async def test_int3_and_fwait_at_cpl0(tmp_path: Path) -> None:
    vm, log = make_vm(tmp_path, "int3")
    with vm:
        result = await vm.run()
        handled = vm.runners[0].hooks.counts()
    assert result.reason is StopReason.POWER_OFF
    assert log.values == [0x1111, 0xBBBB, 0x2222, 0x3333]
    if NESTED_HOST:  # the host could not run these; the VMM's fallback did
        assert handled.get("int3") == 1 and handled.get("fwait") == 1


async def test_an_instruction_nobody_can_emulate_stops_the_vm_naming_it(tmp_path: Path) -> None:
    vm, log = make_vm(tmp_path, "int3", symbols={"try_cmpxchg16b": 1})
    with vm:
        if not NESTED_HOST:  # real hardware runs it: the guest carries on
            assert (await vm.run()).reason is StopReason.POWER_OFF
            assert log.values[-1] == 0x4444
            return
        with pytest.raises(VmError) as info:
            await vm.run()
    message = str(info.value)
    assert "vCPU 0" in message and "RIP 0x" in message and "f0 48 0f c7" in message and "cmpxchg16b" in message


async def test_syscall_from_user_mode_enters_the_kernel(tmp_path: Path) -> None:
    vm, log = make_vm(tmp_path, "syscall")
    with vm, trio.fail_after(30):
        result = await vm.run()
        counts = vm.runners[0].hooks.counts()
    assert result.reason is StopReason.POWER_OFF
    assert log.values == [0x1111, 0x5C, 0, 0x2A]  # entry ran, at CPL0, with RDI intact
    if NESTED_HOST:
        assert counts.get("syscalls completed") == 1


async def test_console_to_a_trio_stream(tmp_path: Path) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    with VM(VmConfig(append="stream-test"), console_output=send) as vm:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm.run)
            seen = b""
            with trio.fail_after(10):
                while b"stream-test" not in seen:
                    seen += await receive.receive_some()
    assert seen.startswith(b"Hello from the trivmm built-in guest!")


async def test_console_input_from_a_trio_stream_reaches_the_guest(tmp_path: Path) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    elf = assemble("serial_echo", tmp_path)
    with VM(VmConfig(kernel=elf, memory="16M"), console_input=receive) as vm:
        log = Log()
        vm.pio.insert(0x510, 4, log)
        text = b"typed by the host, longer than the sixty-four byte receive FIFO of a 16550A UART\n"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send.send_all, text)
            with trio.fail_after(20):
                result = await vm.run()
    assert result.reason is StopReason.POWER_OFF
    assert bytes(log.values) == text


def test_ctrl_c_stops_the_cli_cleanly(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    elf = assemble("cpl3_loop", tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "trivmm", "run", "--kernel", str(elf), "--memory", "16M"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for_vcpu_thread(proc.pid)  # a guest spinning at CPL3: no exits of its own
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # seconds, not ms, when a CI run shares the host with Linux boots
    finally:
        proc.kill()  # a failed test leaves no guest spinning behind it
        proc.wait()
    assert proc.returncode == 130
    assert err.decode() == "trivmm: interrupted\n"


def _wait_for_vcpu_thread(pid: int, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` runs a vCPU thread (trivmm names its vCPU threads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
            try:
                if comm.read_text().startswith("trivmm-vcpu"):
                    return
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"process {pid} started no vCPU thread in {timeout} s")


def test_the_cli_gives_stdin_back_as_it_found_it(tmp_path: Path) -> None:
    """The CLI waits on stdin through epoll with O_NONBLOCK, a flag of the open file it
    shares with the shell: it must be cleared again at exit."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    try:
        assert os.get_blocking(read_end)
        result = subprocess.run([sys.executable, "-m", "trivmm", "run", "--memory", "16M"], stdin=read_end,
                                capture_output=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert os.get_blocking(read_end)  # the same open file the child had as fd 0
    finally:
        os.close(read_end)
        os.close(write_end)
