"""Host-quirk hooks against tiny guests: what the guest sees must be what a CPU would do.

On the nested host (``nested-pvm``) these runs go through trivmm's fallback and SYSCALL
completion; on stock KVM (``host``) the CPU does the same work, and the same guest-visible
results are expected, except where a measured host limitation says otherwise.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from tests.kvm.guests import assemble
from trivmm import VM, StopReason, VmConfig, VmError
from trivmm.cpu.arch import Vector
from trivmm.cpu.fallback import inject_fault, reflect_debug_exception
from trivmm.cpu.paging import GuestFault, PageFault
from trivmm.cpu.templates import detect_host_template

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("binutils")]
NESTED_HOST = detect_host_template().name == "nested-pvm"


class Log:
    """PIO 0x510: records every value the guest writes."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        self.values.append(int.from_bytes(data, "little"))


def symbols(elf: Path) -> dict[str, int]:
    """Symbol name -> address, from ``nm``."""
    table = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in table.splitlines()) if len(parts) == 3}


async def run_guest(tmp_path: Path, guest: str) -> tuple[list[int], dict[str, int], dict[str, int]]:
    """Run ``guest`` to power-off; return its log, its symbols, and the hooks' counts."""
    elf = assemble(guest, tmp_path)
    with VM(VmConfig(kernel=elf, memory="16M")) as vm, trio.fail_after(30):
        log = Log()
        vm.pio.insert(0x510, 4, log)
        result = await vm.run()
        counts = vm.runners[0].hooks.counts()
    assert result.reason is StopReason.POWER_OFF
    return log.values, symbols(elf), counts


async def test_a_forged_jump_to_lstar_takes_its_page_fault(tmp_path: Path) -> None:
    """RCX/R11 forged and a jump to LSTAR: the guest's #PF handler runs, not the kernel
    entry; a real SYSCALL afterwards still enters the kernel at CPL0."""
    log, sym, counts = await run_guest(tmp_path, "forged_syscall")
    lstar = sym["syscall_entry"]
    user_fetch_from_supervisor_page = 0x5  # P | U (no NX, no SMEP in this guest)
    assert log == [
        0x1111,
        0xEEEE, user_fetch_from_supervisor_page, lstar, lstar,  # RCX not after 0f 05
        0xEEEE, user_fetch_from_supervisor_page, lstar, lstar,  # R11 claims IOPL 3
        0xEEEE, 0x5, lstar, sym["read_lstar"],  # a read of LSTAR's address
        0x5C, 0, 0x2A,  # the real SYSCALL: entry at CPL0 with RDI intact
    ]  # fmt: skip
    if NESTED_HOST:
        assert counts["syscalls completed"] == 1
        assert counts["syscalls refused"] == 2
        assert counts["page faults passed"] == 3


async def test_the_guests_own_debug_exceptions_reach_its_handler(tmp_path: Path) -> None:
    """With the VMM's SYSCALL breakpoint armed: a TF single step, ICEBP and a CPL0
    instruction breakpoint of the guest's own reach the guest's #DB handler with the DR6 a
    CPU reports. The guest's DR0 on a user-mode instruction fires on stock KVM only: the
    nested host never honours guest DR7 breakpoints at CPL3, with or without the VMM's
    breakpoint (measured; docs/host-quirks.md)."""
    log, sym, counts = await run_guest(tmp_path, "guest_debug")
    kernel_breakpoint = [0xDBDB, 0xFFFF0FF1, sym["kernel_target"]]  # DR6.B0, RIP at the instruction
    single_step = [0xDBDB, 0xFFFF4FF0, sym["after_step"]]  # DR6.BS, RIP after the stepped instruction
    icebp = [0xDBDB, 0xFFFF0FF0, sym["after_icebp"]]  # no DR6 status bit, RIP after 0xf1
    user_breakpoint = [] if NESTED_HOST else [0xDBDB, 0xFFFF0FF1, sym["user_target"]]
    assert log == [0x1111, *kernel_breakpoint, 0x2222, *single_step, *icebp, *user_breakpoint, 0x5C, 0]
    if NESTED_HOST:
        assert counts["syscalls completed"] == 1  # the breakpoint was armed throughout
        assert counts["debug exceptions reflected"] == 0  # this host hands none of them to the VMM


class Injector:
    """PIO 0x514: each write asks for one exception, injected the way the hooks inject them."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        vcpu = self.vm.vcpus[0]
        which = int.from_bytes(data, "little")
        if which == 1:  # what a host hands over as a guest's single step
            reflect_debug_exception(vcpu, 0xFFFF4FF0)
        elif which == 2:
            inject_fault(vcpu, GuestFault(Vector.GP, 0))
        elif which == 3:
            inject_fault(vcpu, PageFault(0xDEAD000, 0x2, "test"))


async def test_injected_exceptions_reach_the_guest_as_a_cpu_delivers_them(tmp_path: Path) -> None:
    """#DB with its DR6, #GP with its error code, #PF with its error code and CR2: each
    reaches the guest's handler through its IDT, at the RIP the VMM left."""
    elf = assemble("inject", tmp_path)
    with VM(VmConfig(kernel=elf, memory="16M")) as vm, trio.fail_after(30):
        log = Log()
        vm.pio.insert(0x510, 4, log)
        vm.pio.insert(0x514, 4, Injector(vm))
        assert (await vm.run()).reason is StopReason.POWER_OFF
    sym = symbols(elf)
    assert log.values == [
        0xDB, 0xFFFF4FF0, sym["after_db"],
        0x0D, 0, sym["after_gp"],
        0x0E, 0x2, 0xDEAD000, sym["after_pf"],
        0x600D,
    ]  # fmt: skip


async def test_mxcsr_instructions_and_their_faults(tmp_path: Path) -> None:
    """64-bit, CPL0: STMXCSR/LDMXCSR work, reserved MXCSR bits raise #GP(0), stores to a
    read-only page (CR0.WP) or an absent one raise #PF with the CPU's error code and CR2."""
    log, sym, counts = await run_guest(tmp_path, "mxcsr_faults")
    assert log == [
        0x1F80, 0x1FA0,  # stored, then loaded and stored again
        0x0D, 0, sym["load_reserved"],
        0x0E, 0x3, 0x60_0010, sym["store_read_only"],  # P | W
        0x0E, 0x2, 0x80_0024, sym["store_not_present"],  # W
        0x600D,
    ]  # fmt: skip
    if NESTED_HOST:  # the host could not run these; the fallback did, faults included
        assert counts["ldmxcsr: #GP"] == 1 and counts["stmxcsr: #PF"] == 2


async def test_mxcsr_operands_in_32_bit_code(tmp_path: Path) -> None:
    """32-bit protected mode: absolute disp32, segment bases and overrides, SS for an EBP
    base, 4 GiB wrap-around, and #GP(0) for a read-only segment and a segment limit."""
    log, sym, counts = await run_guest(tmp_path, "mxcsr32")
    assert log == [
        0x1111,
        0x1F80,  # DS base + absolute disp32
        0x1FA0,  # loaded through ES, stored through DS
        0x1FA0, 0,  # through SS, not DS
        0x1FA0,  # wrapped at 4 GiB
        0x0D, 0, sym["store_read_only"],
        0x0D, 0, sym["store_past_limit"],
        0x600D,
    ]  # fmt: skip
    if NESTED_HOST:
        assert counts["stmxcsr"] == 4 and counts["ldmxcsr"] == 1 and counts["stmxcsr: #GP"] == 2


async def test_without_the_fallback_an_emulation_failure_stops_the_vm_naming_it(tmp_path: Path) -> None:
    """The ``host`` template plugs in no hooks: on the nested host, whose emulator cannot run
    STMXCSR at CPL0, the VM stops with an error naming RIP and the instruction's bytes."""
    elf = assemble("mxcsr_faults", tmp_path)
    with VM(VmConfig(kernel=elf, memory="16M", cpu_template="host")) as vm, trio.fail_after(30):
        vm.pio.insert(0x510, 4, Log())
        if not NESTED_HOST:  # stock KVM runs it: nothing to stop for
            assert (await vm.run()).reason is StopReason.POWER_OFF
            return
        with pytest.raises(VmError) as info:
            await vm.run()
    message = str(info.value)
    assert f"vCPU 0: host KVM could not emulate the instruction at RIP {symbols(elf)['store_ok']:#x}" in message
    assert "bytes 0f ae 5b 04" in message and "no host-quirk hook" in message
