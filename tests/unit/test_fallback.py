"""The host-quirk fallback against a fake vCPU: exact guest-state effects, on any host."""

from __future__ import annotations

import struct
from types import SimpleNamespace as NS

import pytest

from trivmm.cpu.fallback import (
    EmulationFallback,
    GuestView,
    SyscallCompleter,
    UnhandledInstruction,
    decode_memory_operand,
)
from trivmm.kvm.constants import GuestDebug
from trivmm.kvm.vcpu import Translation
from trivmm.memory import GuestMemory

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
KERNEL_CS, LSTAR, IDT, STACK = 0x10, 0x200000, 0x3000, 0x8000


def _segment(selector: int) -> NS:
    return NS(selector=selector, base=0, limit=0, type=0, present=1, dpl=0, s=1, g=1, l=0, db=0, unusable=0)


class FakeVcpu:
    """Identity-mapped long-mode vCPU whose state lives in Python objects."""

    index = 0

    def __init__(self, memory: GuestMemory, rip: int, cs: int = KERNEL_CS) -> None:
        self.memory = memory
        self.regs = NS(rip=rip, rflags=0x202, **{name: 0 for name in GPRS})
        self.regs.rsp = STACK
        self.sregs = NS(cs=_segment(cs), ss=_segment(0x18), fs=_segment(0), gs=_segment(0),
                        tr=_segment(0x30), idt=NS(base=IDT, limit=0xFFF), efer=0x500)  # fmt: skip
        self.fpu = NS(mxcsr=0x1F80)
        self.msrs = {0xC0000081: (0x10 << 32), 0xC0000082: LSTAR, 0xC0000084: 0x200}
        self.debug: list[tuple[int, list[int] | None]] = []

    def get_regs(self) -> NS:
        return NS(**vars(self.regs))

    def set_regs(self, regs: NS) -> None:
        self.regs = regs

    def get_sregs(self) -> NS:
        return self.sregs

    def set_sregs(self, sregs: NS) -> None:
        self.sregs = sregs

    def get_fpu(self) -> NS:
        return NS(**vars(self.fpu))

    def set_fpu(self, fpu: NS) -> None:
        self.fpu = fpu

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return {i: self.msrs[i] for i in indices if i in self.msrs}

    def translate(self, gva: int) -> Translation:
        return Translation(gva, self.memory.contains(gva), True, False)

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.debug.append((control, debugreg))


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.from_ranges([(0, 1 << 22)])
    yield mem
    mem.close()


def _gate(memory: GuestMemory, vector: int, handler: int, ist: int = 0) -> None:
    memory.write(IDT + 16 * vector, struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, ist, 0x8E,
                                                (handler >> 16) & 0xFFFF, handler >> 32, 0))  # fmt: skip


def _failure(code: bytes) -> NS:
    return NS(emulation_failure=NS(ndata=1, flags=1, insn_size=len(code), insn_bytes=list(code)))


def test_int3_delivers_bp_through_the_idt(memory: GuestMemory) -> None:
    _gate(memory, 3, 0x150000)
    vcpu = FakeVcpu(memory, rip=0x100000)
    EmulationFallback(GuestView(vcpu, memory)).handle(_failure(b"\xcc"))  # type: ignore[arg-type]
    assert vcpu.regs.rip == 0x150000
    assert vcpu.regs.rflags & 0x200 == 0  # interrupt gate clears IF
    frame = struct.unpack("<5Q", memory.read(vcpu.regs.rsp, 40))
    assert frame == (0x100001, KERNEL_CS, 0x202, STACK, 0x18)  # RIP after int3, CS, RFLAGS, RSP, SS


def test_int3_on_an_ist_stack(memory: GuestMemory) -> None:
    _gate(memory, 3, 0x150000, ist=2)
    vcpu = FakeVcpu(memory, rip=0x100000)
    vcpu.sregs.tr.base = 0x5000
    memory.write_u64(0x5000 + 0x24 + 8, 0x9000)  # IST2
    EmulationFallback(GuestView(vcpu, memory)).handle(_failure(b"\xcc"))  # type: ignore[arg-type]
    assert vcpu.regs.rsp == 0x9000 - 40


def test_fwait_and_clac_step_over(memory: GuestMemory) -> None:
    vcpu = FakeVcpu(memory, rip=0x100000)
    fallback = EmulationFallback(GuestView(vcpu, memory))
    fallback.handle(_failure(b"\x9b"))  # type: ignore[arg-type]
    assert vcpu.regs.rip == 0x100001
    vcpu.regs.rflags |= 1 << 18
    fallback.handle(_failure(b"\x0f\x01\xca"))  # type: ignore[arg-type]
    assert vcpu.regs.rip == 0x100004 and not vcpu.regs.rflags & (1 << 18)
    assert fallback.handled == {"fwait": 1, "clac": 1}


def test_ldmxcsr_and_stmxcsr(memory: GuestMemory) -> None:
    vcpu = FakeVcpu(memory, rip=0x100000)
    memory.write_u32(STACK + 4, 0x1FA0)
    fallback = EmulationFallback(GuestView(vcpu, memory))
    fallback.handle(_failure(bytes.fromhex("0fae542404")))  # type: ignore[arg-type]  # ldmxcsr 4(%rsp)
    assert vcpu.fpu.mxcsr == 0x1FA0 and vcpu.regs.rip == 0x100005
    vcpu.regs.rbp = 0x7000
    fallback.handle(_failure(bytes.fromhex("0fae5dec")))  # type: ignore[arg-type]  # stmxcsr -0x14(%rbp)
    assert memory.read_u32(0x7000 - 0x14) == 0x1FA0 and vcpu.regs.rip == 0x100009


def test_decoder_forms() -> None:
    regs = NS(**{name: 0x1000 * (i + 1) for i, name in enumerate(GPRS)})
    sregs = NS(fs=NS(base=0), gs=NS(base=0xFFFF_8880_0000_0000))
    assert decode_memory_operand(bytes.fromhex("0fae1510000000"), 0x100, regs, sregs) == (2, 0x117, 7)
    assert decode_memory_operand(bytes.fromhex("65410fae542420"), 0, regs, sregs) == (2, 0xFFFF_8880_0000_D020, 7)
    # SIB with index and scale: ldmxcsr 8(%rax,%rcx,4)
    assert decode_memory_operand(bytes.fromhex("0fae548808"), 0, regs, sregs) == (2, 0x1000 + 0x2000 * 4 + 8, 5)


def test_unknown_instruction_is_named_with_rip_and_bytes(memory: GuestMemory) -> None:
    vcpu = FakeVcpu(memory, rip=0x123456)
    with pytest.raises(UnhandledInstruction) as info:
        EmulationFallback(GuestView(vcpu, memory)).handle(_failure(bytes.fromhex("f0480fc70e")))  # type: ignore[arg-type]
    message = str(info.value)
    assert "RIP 0x123456" in message and "f0 48 0f c7 0e" in message and "cmpxchg16b" in message


def test_truncated_instruction_bytes_are_refused(memory: GuestMemory) -> None:
    vcpu = FakeVcpu(memory, rip=0x100000)
    with pytest.raises(UnhandledInstruction, match="fallback could not"):
        EmulationFallback(GuestView(vcpu, memory)).handle(_failure(bytes.fromhex("0fae54")))  # type: ignore[arg-type]


def _fault_frame(memory: GuestMemory, vcpu: FakeVcpu, rip: int, cs: int) -> NS:
    vcpu.regs.rsp = STACK - 48
    memory.write(vcpu.regs.rsp, struct.pack("<6Q", 0x15, rip, cs, 0x246, 0x7FF0, 0x2B))
    vcpu.regs.rip = 0x150000
    vcpu.regs.rcx, vcpu.regs.r11 = 0x401000, 0x246  # what the host's SYSCALL saved
    return NS(debug=NS(arch=NS(pc=0x150000)))


def test_syscall_completion_from_the_pf_breakpoint(memory: GuestMemory) -> None:
    _gate(memory, 14, 0x150000)
    vcpu = FakeVcpu(memory, rip=0x100000)
    completer = SyscallCompleter(GuestView(vcpu, memory))  # type: ignore[arg-type]
    completer.refresh()
    assert completer.armed_at == 0x150000
    assert vcpu.debug[-1] == (GuestDebug.ENABLE | GuestDebug.USE_HW_BP, [0x150000, 0, 0, 0, 0, 0, 0, 0x401])
    run = _fault_frame(memory, vcpu, rip=LSTAR, cs=0x33)
    assert completer.on_debug_exit(run)
    assert vcpu.regs.rip == LSTAR and vcpu.regs.rsp == 0x7FF0
    assert vcpu.regs.rflags == (0x246 & ~0x200) | 2
    assert vcpu.sregs.cs.selector == 0x10 and vcpu.sregs.cs.l == 1 and vcpu.sregs.cs.dpl == 0
    assert vcpu.sregs.ss.selector == 0x18
    assert completer.completed == 1
    assert completer.base_mismatches == 0


def test_syscall_completion_keeps_the_msr_fs_base(memory: GuestMemory) -> None:
    _gate(memory, 14, 0x150000)
    vcpu = FakeVcpu(memory, rip=0x100000)
    vcpu.msrs[0xC0000100] = 0x7F00_1234_0000  # the task's TLS, as the guest kernel wrote it
    vcpu.sregs.fs.base = 0  # a stale copy in the segment state
    completer = SyscallCompleter(GuestView(vcpu, memory))  # type: ignore[arg-type]
    completer.refresh()
    assert completer.on_debug_exit(_fault_frame(memory, vcpu, rip=LSTAR, cs=0x33))
    assert vcpu.sregs.fs.base == 0x7F00_1234_0000
    assert completer.base_mismatches == 1


def test_other_page_faults_are_stepped_over_then_rearmed(memory: GuestMemory) -> None:
    _gate(memory, 14, 0x150000)
    vcpu = FakeVcpu(memory, rip=0x100000)
    completer = SyscallCompleter(GuestView(vcpu, memory))  # type: ignore[arg-type]
    completer.refresh()
    run = _fault_frame(memory, vcpu, rip=0x401234, cs=0x33)  # a user page fault elsewhere
    assert completer.on_debug_exit(run)
    assert vcpu.debug[-1] == (GuestDebug.ENABLE | GuestDebug.SINGLESTEP, None)
    assert vcpu.regs.rip == 0x150000  # the guest's handler runs
    assert completer.on_debug_exit(NS(debug=NS(arch=NS(pc=0x150004))))  # the step's exit
    assert vcpu.debug[-1][0] == GuestDebug.ENABLE | GuestDebug.USE_HW_BP
    assert completer.completed == 0 and completer.passed_faults == 1
    assert not completer.on_debug_exit(NS(debug=NS(arch=NS(pc=0x999))))  # not ours
