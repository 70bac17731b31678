"""The host-quirk fallback against a fake vCPU: exact guest-state effects, on any host."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from types import SimpleNamespace as NS
from typing import Any

import pytest

from tests.unit.fake_cpu import (
    ACCESSED,
    DIRTY,
    KERNEL_CS,
    LSTAR,
    NO_EXECUTE,
    PRESENT,
    STACK,
    USER,
    USER_CS,
    USER_SS,
    WRITABLE,
    FakeVcpu,
    PageTables,
    debug_exit,
    emulation_failure,
    idt_gate,
    segment,
)
from trivmm.cpu.arch import CR0_EM, CR0_MP, CR0_TS, CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE, EFER_SCE, FSW_ES, Vector
from trivmm.cpu.fallback import EmulationFallback, SyscallCompleter
from trivmm.cpu.hooks import UnhandledInstruction, VcpuHooks
from trivmm.cpu.paging import GuestView
from trivmm.cpu.quirks import QuirkHooks, vcpu_hooks
from trivmm.cpu.templates import TEMPLATES
from trivmm.kvm.constants import GuestDebug
from trivmm.memory import GuestMemory

CODE = 0x10_0000
PF_HANDLER = 0x15_0000
USER_PAGE = 0x30_0000  # user code with a SYSCALL in it
SYSCALL_AT = USER_PAGE + 0x100
USER_DATA = 0x31_0000
ARMED = (GuestDebug.ENABLE | GuestDebug.USE_HW_BP, [PF_HANDLER, 0, 0, 0, 0, 0, 0, 0x401])
STEPPING = (GuestDebug.ENABLE | GuestDebug.SINGLESTEP, None)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.from_ranges([(0, 8 << 20)])
    yield mem
    mem.close()


@pytest.fixture
def tables(memory: GuestMemory) -> PageTables:
    tables = PageTables(memory)
    tables.flags(USER_PAGE, set_=USER)
    tables.flags(USER_DATA, set_=USER)
    memory.write(SYSCALL_AT, b"\x0f\x05")
    return tables


@pytest.fixture
def vcpu(memory: GuestMemory, tables: PageTables) -> FakeVcpu:
    return FakeVcpu(memory, tables, rip=CODE)


def emulate(vcpu: FakeVcpu, code: bytes) -> EmulationFallback:
    fallback = EmulationFallback(GuestView(vcpu, vcpu.memory))  # type: ignore[arg-type]
    fallback.handle(emulation_failure(code))
    return fallback


# --- INT3, FWAIT, CLAC/STAC ------------------------------------------------------------------


def test_int3_delivers_bp_through_the_idt(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    idt_gate(memory, 3, 0x15_0000)
    emulate(vcpu, b"\xcc")
    assert vcpu.regs.rip == 0x15_0000
    assert vcpu.regs.rflags & 0x200 == 0  # interrupt gate clears IF
    frame = struct.unpack("<5Q", memory.read(vcpu.regs.rsp, 40))
    assert frame == (CODE + 1, KERNEL_CS, 0x202, STACK, 0x18)  # RIP after int3, CS, RFLAGS, RSP, SS


def test_int3_on_an_ist_stack(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    idt_gate(memory, 3, 0x15_0000, ist=2)
    vcpu.sregs.tr.base = 0x5000
    memory.write_u64(0x5000 + 0x24 + 8, 0x9000)  # IST2
    emulate(vcpu, b"\xcc")
    assert vcpu.regs.rsp == 0x9000 - 40


def test_fwait_and_clac_step_over(vcpu: FakeVcpu) -> None:
    fallback = emulate(vcpu, b"\x9b")
    assert vcpu.regs.rip == CODE + 1
    vcpu.regs.rflags |= 1 << 18
    fallback.handle(emulation_failure(b"\x0f\x01\xca"))
    assert vcpu.regs.rip == CODE + 4 and not vcpu.regs.rflags & (1 << 18)
    assert fallback.handled == {"fwait": 1, "clac": 1}


@pytest.mark.parametrize("code", [b"\x0f\x01\xca", b"\x0f\x01\xcb"], ids=["clac", "stac"])
def test_clac_and_stac_at_cpl3_raise_ud(vcpu: FakeVcpu, code: bytes) -> None:
    vcpu.user_mode()
    fallback = emulate(vcpu, code)
    assert vcpu.injected == [(Vector.UD, None)]
    assert vcpu.regs.rip == CODE and vcpu.regs.rflags == 0x202  # nothing retired
    assert fallback.handled == {} and sum(fallback.faults.values()) == 1


def test_fwait_with_ts_and_mp_raises_nm_and_a_pending_x87_error_raises_mf(vcpu: FakeVcpu) -> None:
    vcpu.sregs.cr0 |= CR0_TS | CR0_MP
    emulate(vcpu, b"\x9b")
    vcpu.sregs.cr0 &= ~CR0_TS
    vcpu.fsw = FSW_ES
    vcpu.sregs.cr0 |= 0x20  # NE
    emulate(vcpu, b"\x9b")
    assert vcpu.injected == [(Vector.NM, None), (Vector.MF, None)]
    assert vcpu.regs.rip == CODE


# --- LDMXCSR / STMXCSR -----------------------------------------------------------------------


def test_ldmxcsr_and_stmxcsr(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    memory.write_u32(STACK + 4, 0x1FA0)
    fallback = emulate(vcpu, bytes.fromhex("0fae542404"))  # ldmxcsr 4(%rsp)
    assert vcpu.mxcsr == 0x1FA0 and vcpu.regs.rip == CODE + 5
    vcpu.regs.rbp = 0x7000
    fallback.handle(emulation_failure(bytes.fromhex("0fae5dec")))  # stmxcsr -0x14(%rbp)
    assert memory.read_u32(0x7000 - 0x14) == 0x1FA0 and vcpu.regs.rip == CODE + 9
    assert fallback.handled == {"ldmxcsr": 1, "stmxcsr": 1}


def test_ldmxcsr_of_reserved_bits_raises_gp0(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    memory.write_u32(STACK, 0x1_1F80)
    fallback = emulate(vcpu, bytes.fromhex("0fae1424"))  # ldmxcsr (%rsp)
    assert vcpu.injected == [(Vector.GP, 0)]
    assert vcpu.mxcsr == 0x1F80 and vcpu.regs.rip == CODE
    assert fallback.faults == {"ldmxcsr: #GP": 1}


STMXCSR_RBX = bytes.fromhex("0fae1b")  # stmxcsr (%rbx)
LDMXCSR_RBX = bytes.fromhex("0fae13")  # ldmxcsr (%rbx)


@pytest.mark.parametrize(
    ("page_flags", "cpl", "code", "error_code"),
    [
        (0, 0, STMXCSR_RBX, 0x2),  # not present: W
        (0, 3, STMXCSR_RBX, 0x6),  # not present, from user mode: U | W
        (PRESENT, 0, STMXCSR_RBX, 0x3),  # read-only, CR0.WP: P | W
        (PRESENT | USER, 3, STMXCSR_RBX, 0x7),  # read-only user page from user mode: P | U | W
        (PRESENT | WRITABLE, 3, STMXCSR_RBX, 0x7),  # a supervisor page from user mode: P | U | W
        (PRESENT | WRITABLE, 3, LDMXCSR_RBX, 0x5),  # ... read: P | U
        (0, 3, LDMXCSR_RBX, 0x4),  # not present, user read: U
    ],
    ids=["absent", "absent-user", "read-only", "read-only-user", "supervisor-from-user", "supervisor-read-from-user",
         "absent-user-read"],
)
def test_memory_operands_fault_as_the_page_tables_say(tables: PageTables, vcpu: FakeVcpu, page_flags: int, cpl: int,
                                                      code: bytes, error_code: int) -> None:  # fmt: skip
    target = 0x40_0000 + 0x24
    tables.map(0x40_0000, 0x40_0000, page_flags)
    if cpl == 3:
        vcpu.user_mode()
    vcpu.regs.rbx = target
    emulate(vcpu, code)
    assert vcpu.injected == [(Vector.PF, error_code)]
    assert vcpu.sregs.cr2 == target
    assert vcpu.regs.rip == CODE  # the instruction did not retire
    assert vcpu.memory.read_u32(target) == 0  # nothing was written


def test_a_supervisor_write_to_a_read_only_page_passes_without_cr0_wp(tables: PageTables, vcpu: FakeVcpu) -> None:
    tables.map(0x40_0000, 0x40_0000, PRESENT)
    vcpu.sregs.cr0 &= ~CR0_WP
    vcpu.regs.rbx = 0x40_0010
    emulate(vcpu, STMXCSR_RBX)
    assert vcpu.injected == [] and vcpu.memory.read_u32(0x40_0010) == 0x1F80
    assert tables.pte(0x40_0000) & (ACCESSED | DIRTY) == ACCESSED | DIRTY  # as the CPU marks it


def test_smap_refuses_supervisor_access_to_user_pages_unless_ac(vcpu: FakeVcpu) -> None:
    vcpu.sregs.cr4 |= CR4_SMAP
    vcpu.regs.rbx = USER_DATA
    emulate(vcpu, STMXCSR_RBX)
    assert vcpu.injected == [(Vector.PF, 0x3)] and vcpu.sregs.cr2 == USER_DATA
    vcpu.regs.rflags |= 1 << 18  # AC: the kernel's stac() window
    emulate(vcpu, STMXCSR_RBX)
    assert vcpu.injected == [(Vector.PF, 0x3)] and vcpu.memory.read_u32(USER_DATA) == 0x1F80


@pytest.mark.parametrize(
    ("code", "setup", "vector"),
    [
        (LDMXCSR_RBX, lambda v: setattr(v.sregs, "cr0", v.sregs.cr0 | CR0_TS), Vector.NM),
        (LDMXCSR_RBX, lambda v: setattr(v.sregs, "cr0", v.sregs.cr0 | CR0_EM), Vector.UD),
        (LDMXCSR_RBX, lambda v: setattr(v.sregs, "cr4", 0x20), Vector.UD),  # OSFXSR clear
        (b"\xf0" + LDMXCSR_RBX, lambda v: None, Vector.UD),  # LOCK
        (LDMXCSR_RBX, lambda v: setattr(v.regs, "rbx", 0x8000_0000_0000), Vector.GP),  # non-canonical
        (bytes.fromhex("0fae1424"), lambda v: setattr(v.regs, "rsp", 0x8000_0000_0000), Vector.SS),  # via RSP
    ],
    ids=["ts", "em", "no-osfxsr", "lock", "non-canonical", "non-canonical-stack"],
)
def test_mxcsr_instructions_raise_what_the_cpu_raises(vcpu: FakeVcpu, code: bytes, setup: Any, vector: int) -> None:
    setup(vcpu)
    emulate(vcpu, code)
    assert vcpu.injected == [(vector, 0 if vector in (Vector.GP, Vector.SS) else None)]
    assert vcpu.regs.rip == CODE


def test_32_bit_code_decodes_0x40_as_inc_not_rex(vcpu: FakeVcpu) -> None:
    """In 32-bit code `41 0f ae 13` is INC ECX followed by LDMXCSR: not one instruction the
    fallback handles; in 64-bit mode the same bytes are LDMXCSR (%r11)."""
    vcpu.sregs.cs = segment(0x08, seg_type=0xB)  # compatibility mode: CS.L clear, CS.D set
    with pytest.raises(UnhandledInstruction, match="no fallback handles it"):
        emulate(vcpu, bytes.fromhex("410fae13"))
    vcpu.sregs.cs = segment(KERNEL_CS, seg_type=0xB, long=True)
    vcpu.regs.r11 = USER_DATA
    vcpu.memory.write_u32(USER_DATA, 0x1F00)
    emulate(vcpu, bytes.fromhex("410fae13"))
    assert vcpu.mxcsr == 0x1F00


def test_32_bit_code_disp32_is_absolute_and_segment_bases_apply(vcpu: FakeVcpu) -> None:
    vcpu.sregs.cs = segment(0x08, seg_type=0xB)
    vcpu.sregs.ds = segment(0x18, base=0x20_0000)
    vcpu.sregs.es = segment(0x20, base=0x30_0000)
    emulate(vcpu, bytes.fromhex("0fae1d00010000"))  # stmxcsr 0x100: DS base + 0x100
    assert vcpu.memory.read_u32(0x20_0100) == 0x1F80
    assert vcpu.regs.rip == CODE + 7
    vcpu.memory.write_u32(0x30_0200, 0x1FC0)
    emulate(vcpu, bytes.fromhex("260fae1500020000"))  # ldmxcsr %es:0x200
    assert vcpu.mxcsr == 0x1FC0


def test_16_bit_code_and_16_bit_addressing_are_refused(vcpu: FakeVcpu) -> None:
    vcpu.sregs.cs = segment(0x08, seg_type=0xB, db=False)
    with pytest.raises(UnhandledInstruction, match="16-bit code"):
        emulate(vcpu, bytes.fromhex("0fae1d0001"))
    vcpu.sregs.cs = segment(0x08, seg_type=0xB)
    with pytest.raises(UnhandledInstruction, match="16-bit addressing"):
        emulate(vcpu, bytes.fromhex("670fae1e0001"))


def test_unknown_instruction_is_named_with_rip_and_bytes(vcpu: FakeVcpu) -> None:
    vcpu.regs.rip = 0x12_3456
    with pytest.raises(UnhandledInstruction) as info:
        emulate(vcpu, bytes.fromhex("f0480fc70e"))
    message = str(info.value)
    assert "RIP 0x123456" in message and "f0 48 0f c7 0e" in message and "cmpxchg16b" in message


def test_truncated_instruction_bytes_are_refused(vcpu: FakeVcpu) -> None:
    with pytest.raises(UnhandledInstruction, match="fallback could not"):
        emulate(vcpu, bytes.fromhex("0fae54"))


def test_instruction_bytes_are_fetched_through_the_page_tables(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    """An exit without the bytes: they are read at CS:RIP, as the vCPU would fetch them."""
    memory.write(CODE, b"\x9b")
    fallback = EmulationFallback(GuestView(vcpu, memory))  # type: ignore[arg-type]
    fallback.handle(NS(emulation_failure=NS(ndata=0, flags=0, insn_size=0, insn_bytes=[])))
    assert fallback.handled == {"fwait": 1}


# --- SYSCALL completion ----------------------------------------------------------------------


@pytest.fixture
def completer(memory: GuestMemory, vcpu: FakeVcpu) -> SyscallCompleter:
    idt_gate(memory, 14, PF_HANDLER)
    completer = SyscallCompleter(GuestView(vcpu, memory))  # type: ignore[arg-type]
    completer.refresh()
    assert completer.armed_at == PF_HANDLER and vcpu.debug == [ARMED]
    return completer


def fault_at_the_pf_handler(vcpu: FakeVcpu, *, rip: int = LSTAR, cs: int = USER_CS, error: int = 0x5,
                            rflags: int = 0x10246 & ~0x200) -> Any:  # fmt: skip
    """The state at the #PF handler's breakpoint after the host ran a SYSCALL at CPL3 (by
    default): the frame holds R11 & ~FMASK | RF, CR2 is LSTAR, RCX is past `0f 05`."""
    vcpu.regs.rsp = STACK - 48
    vcpu.memory.write(vcpu.regs.rsp, struct.pack("<6Q", error, rip, cs, rflags, 0x7FF0, USER_SS))
    vcpu.regs.rip = PF_HANDLER
    vcpu.regs.rcx, vcpu.regs.r11 = SYSCALL_AT + 2, 0x246
    vcpu.sregs.cr2 = LSTAR
    return debug_exit(PF_HANDLER, 0xFFFF0FF1)


def assert_stepped_to_the_guest_handler(vcpu: FakeVcpu, completer: SyscallCompleter) -> None:
    assert vcpu.regs.rip == PF_HANDLER and vcpu.sregs.cs.selector == KERNEL_CS  # untouched
    assert vcpu.debug[-1] == STEPPING
    assert completer.completed == 0 and completer.passed_faults == 1


def test_a_syscall_is_completed(vcpu: FakeVcpu, completer: SyscallCompleter) -> None:
    assert completer.on_debug_exit(fault_at_the_pf_handler(vcpu))
    assert vcpu.regs.rip == LSTAR and vcpu.regs.rsp == 0x7FF0
    assert vcpu.regs.rflags == 0x246 & ~0x47700 | 2  # R11 with FMASK's bits cleared
    assert vcpu.sregs.cs.selector == KERNEL_CS and vcpu.sregs.cs.l == 1 and vcpu.sregs.cs.dpl == 0
    assert vcpu.sregs.ss.selector == KERNEL_CS + 8
    assert completer.completed == 1 and completer.refused == {} and completer.base_mismatches == 0


def test_a_syscall_with_nx_reports_the_fetch_bit(vcpu: FakeVcpu, completer: SyscallCompleter) -> None:
    vcpu.sregs.efer |= EFER_NXE
    assert completer.on_debug_exit(fault_at_the_pf_handler(vcpu, error=0x15))
    assert completer.completed == 1


def test_syscall_completion_keeps_the_msr_fs_base(vcpu: FakeVcpu, completer: SyscallCompleter) -> None:
    vcpu.msrs[0xC000_0100] = 0x7F00_1234_0000  # the task's TLS, as the guest kernel wrote it
    vcpu.sregs.fs.base = 0  # a stale copy in the segment state
    assert completer.on_debug_exit(fault_at_the_pf_handler(vcpu))
    assert vcpu.sregs.fs.base == 0x7F00_1234_0000
    assert completer.base_mismatches == 1


def _rcx(value: int) -> Any:
    return lambda vcpu, tables: setattr(vcpu.regs, "rcx", value)


def _r11(value: int) -> Any:
    return lambda vcpu, tables: setattr(vcpu.regs, "r11", value)


# Each case breaks exactly one thing a real SYSCALL on this host would have; all must be
# refused and stepped over, so that the guest's handler sees the #PF it is.
REFUSALS = {
    "error code: not present": (lambda v, t: None, dict(error=0x4), "error code 0x4"),
    "error code: a write": (lambda v, t: None, dict(error=0x7), "error code 0x7"),
    "error code: fetch bit without NX/SMEP": (lambda v, t: None, dict(error=0x15), "error code 0x15"),
    "error code: no fetch bit with SMEP": (lambda v, t: setattr(v.sregs, "cr4", v.sregs.cr4 | CR4_SMEP), {},
                                           "error code 0x5"),
    "CR2": (lambda v, t: setattr(v.sregs, "cr2", LSTAR + 0x40), {}, "CR2"),
    "RCX non-canonical": (_rcx(0x0000_8000_0000_0002), {}, "RCX is not canonical"),
    "RCX not after 0f 05": (_rcx(SYSCALL_AT + 3), {}, "not SYSCALL"),
    "RCX in a supervisor page": (_rcx(CODE + 2), {}, "not executable in the user's mapping"),
    "RCX in an absent page": (lambda v, t: (t.flags(USER_PAGE, clear=PRESENT), _rcx(SYSCALL_AT + 2)(v, t)), {},
                              "not executable in the user's mapping"),
    "RCX in a no-execute page": (lambda v, t: (setattr(v.sregs, "efer", v.sregs.efer | EFER_NXE),
                                               t.flags(USER_PAGE, set_=NO_EXECUTE)), dict(error=0x15),
                                 "not executable in the user's mapping"),
    "R11 reserved bit": (_r11(0x246 | 1 << 3), {}, "not an RFLAGS value"),
    "R11 bit 1 clear": (_r11(0x244), {}, "not an RFLAGS value"),
    "R11 disagrees with the frame": (_r11(0x247), {}, "disagrees with the frame"),
    "R11 IOPL 3": (_r11(0x3246), {}, "IOPL"),
    "R11 IF clear": (_r11(0x046), {}, "IF clear"),
    "EFER.SCE clear": (lambda v, t: setattr(v.sregs, "efer", v.sregs.efer & ~EFER_SCE), {}, "EFER.SCE"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_each_syscall_check_refuses_on_its_own(tables: PageTables, vcpu: FakeVcpu, completer: SyscallCompleter,
                                               case: str) -> None:  # fmt: skip
    change, frame_fields, reason = REFUSALS[case]
    run = fault_at_the_pf_handler(vcpu, **frame_fields)
    change(vcpu, tables)
    assert completer.on_debug_exit(run)
    assert_stepped_to_the_guest_handler(vcpu, completer)
    ((why, count),) = completer.refused.items()
    assert reason in why and count == 1


@pytest.mark.parametrize(("fields", "case"), [(dict(cs=KERNEL_CS), "kernel"), (dict(rip=0x40_1234), "elsewhere")])
def test_other_page_faults_are_stepped_over_then_rearmed(vcpu: FakeVcpu, completer: SyscallCompleter,
                                                         fields: dict[str, int], case: str) -> None:  # fmt: skip
    assert completer.on_debug_exit(fault_at_the_pf_handler(vcpu, **fields))
    assert_stepped_to_the_guest_handler(vcpu, completer)
    assert completer.refused == {}  # not a SYSCALL candidate at all
    assert completer.on_debug_exit(debug_exit(PF_HANDLER + 4, 0xFFFF4FF0))  # the step's exit: DR6.BS
    assert vcpu.debug[-1] == ARMED and not completer.stepping


# --- debug exits that are the guest's own -----------------------------------------------------


@pytest.mark.parametrize(("pc", "dr6"), [(0x40_1000, 0xFFFF4FF0), (0x40_1000, 0xFFFF0FF0), (PF_HANDLER, 0xFFFF0FF2)],
                         ids=["single-step", "icebp", "another-slot"])  # fmt: skip
def test_a_debug_exit_that_is_not_ours_is_given_back(vcpu: FakeVcpu, completer: SyscallCompleter, pc: int,
                                                     dr6: int) -> None:  # fmt: skip
    vcpu.regs.rip = pc
    assert completer.on_debug_exit(debug_exit(pc, dr6))
    assert vcpu.injected == [(Vector.DB, None)]
    assert vcpu.dr6 == dr6 and vcpu.regs.rip == pc
    assert completer.reflected == 1 and completer.completed == 0 and vcpu.debug == [ARMED]


def test_a_debug_exit_during_our_step_that_is_not_the_step_is_given_back(
    vcpu: FakeVcpu, completer: SyscallCompleter
) -> None:
    completer.on_debug_exit(fault_at_the_pf_handler(vcpu, rip=0x40_1234))
    assert completer.stepping
    assert completer.on_debug_exit(debug_exit(PF_HANDLER, 0xFFFF0FF1))
    assert vcpu.injected == [(Vector.DB, None)] and completer.stepping


def test_debug_exits_are_not_claimed_before_arming(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    completer = SyscallCompleter(GuestView(vcpu, memory))  # type: ignore[arg-type]
    assert not completer.on_debug_exit(debug_exit(0x1234, 0xFFFF4FF0))
    assert vcpu.injected == []


# --- which template gets what ------------------------------------------------------------------


def test_templates_choose_the_hooks(memory: GuestMemory, vcpu: FakeVcpu) -> None:
    host = vcpu_hooks(TEMPLATES["host"], vcpu, memory)  # type: ignore[arg-type]
    assert type(host) is VcpuHooks and host.settled and not host.wants_refresh
    assert not host.on_emulation_failure(emulation_failure(b"\x9b"))
    nested = vcpu_hooks(TEMPLATES["nested-pvm"], vcpu, memory)  # type: ignore[arg-type]
    assert isinstance(nested, QuirkHooks) and nested.wants_refresh and not nested.settled
    assert nested.on_emulation_failure(emulation_failure(b"\x9b")) and nested.counts()["fwait"] == 1
