"""The host-quirk fallback: guest work a host KVM could not finish, finished by the VMM.

Two kinds of trouble reach a VMM from a host KVM that cannot run some guest code (the
nested, PVM-style KVM of ../shared/notes/kvm-here.md; docs/host-quirks.md). The CPU
templates that need these parts plug them in (``trivmm.cpu.quirks``); on stock KVM none runs.

1. ``KVM_EXIT_INTERNAL_ERROR`` / emulation failure at an instruction the host's emulator
   does not know. ``EmulationFallback`` looks the opcode up in ``INSTRUCTION_HANDLERS`` and
   does what the CPU would have done, faults included: it decodes by the CPU mode, checks
   CPL and control bits, walks the guest's page tables with the access's permissions, and
   injects #UD, #NM, #MF, #GP, #SS, #AC or #PF (with CR2) where the CPU would raise them.
   What it cannot decode or emulate stops the VM with an ``UnhandledInstruction`` naming
   RIP and the bytes.

2. SYSCALL from guest user space, which the host runs without switching to CPL0: the jump
   to LSTAR then faults at once (#PF on a supervisor page, from CPL3). ``SyscallCompleter``
   puts a hardware breakpoint on the guest's #PF handler; when it hits, it completes the
   SYSCALL by hand only once the fault is proven to be one (``syscall_proof_failure``).
   Anything else -- an ordinary page fault, a user process jumping to LSTAR with forged
   RCX/R11 -- reaches the guest's handler as the genuine #PF it is. Debug exceptions that
   are the guest's own are given back to it (``reflect_debug_exception``).

Neither touches guest state unless it is sure; each says why when it gives up.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs

from trivmm.cpu.arch import (
    CR0_AM,
    CR0_EM,
    CR0_MP,
    CR0_NE,
    CR0_TS,
    CR4_OSFXSR,
    DR6_B0,
    DR6_B0_B3,
    DR6_BS,
    DR6_FIXED,
    DR7_FIXED,
    DR7_L0,
    EFER_LMA,
    EFER_SCE,
    FSW_ES,
    MXCSR_RESERVED,
    PF_FETCH,
    PF_PRESENT,
    PF_USER,
    RFLAGS_AC,
    RFLAGS_FIXED,
    RFLAGS_IF,
    RFLAGS_IOPL,
    RFLAGS_NT,
    RFLAGS_RESERVED,
    RFLAGS_RF,
    RFLAGS_TF,
    RFLAGS_VM,
    Msr,
    Vector,
)
from trivmm.cpu.decode import (
    PREFIX_ADDRESS_SIZE,
    PREFIX_LOCK,
    CpuMode,
    Undecodable,
    check_operand_access,
    cpu_mode,
    decode_memory_operand,
    decode_prefixes,
)
from trivmm.cpu.hooks import UnhandledInstruction, failed_instruction
from trivmm.cpu.paging import (
    SUPERVISOR_READ,
    SUPERVISOR_WRITE,
    Access,
    AccessKind,
    GuestFault,
    GuestView,
    PageFault,
    Paging,
)
from trivmm.kvm.constants import GuestDebug
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemoryError

__all__ = ["EmulationFallback", "SyscallCompleter", "FallbackState", "SyscallCompleterState",
           "INSTRUCTION_HANDLERS", "idt_gate", "inject_fault",
           "reflect_debug_exception", "syscall_proof_failure", "FaultFrame"]  # fmt: skip

_GATE_INTERRUPT = 0xE
_U64 = (1 << 64) - 1
_SYSCALL = b"\x0f\x05"


def idt_gate(view: GuestView, sregs: Any, vector: int, paging: Paging | None = None) -> tuple[int, int, int, int]:
    """(handler, selector, ist, type) of a 64-bit IDT gate; raises ``GuestMemoryError`` if absent."""
    idt = sregs.idt
    if vector * 16 + 15 > idt.limit:
        raise GuestMemoryError(f"IDT (limit {idt.limit:#x}) has no gate {vector}")
    try:
        raw = view.read(idt.base + vector * 16, 16, SUPERVISOR_READ, paging, mark=False)
    except GuestFault as fault:
        raise GuestMemoryError(f"IDT gate {vector} is not readable: {fault}") from None
    low, selector, ist, attr, mid, high = struct.unpack("<HHBBHI4x", raw)
    if not attr & 0x80:
        raise GuestMemoryError(f"IDT gate {vector} is not present")
    return low | (mid << 16) | (high << 32), selector, ist & 7, attr & 0xF


def inject_fault(vcpu: Vcpu, fault: GuestFault) -> None:
    """Make the guest take ``fault`` at its current RIP, as the CPU would have."""
    if isinstance(fault, PageFault):
        vcpu.set_cr2(fault.address)
    vcpu.inject_exception(fault.vector, fault.error_code)


# --- emulation failures -------------------------------------------------------------------


class NotEmulated(Exception):
    """The fallback will not do this; the VM stops with an ``UnhandledInstruction`` saying why."""


@attrs.define
class _Instruction:
    """One instruction the host could not emulate, and the vCPU state it runs against."""

    view: GuestView
    name: str
    rip: int
    code: bytes
    regs: Any
    sregs: Any
    mode: CpuMode
    paging: Paging

    @property
    def vcpu(self) -> Vcpu:
        return self.view.vcpu

    @property
    def cpl(self) -> int:
        return int(self.sregs.cs.selector & 3)

    def finish(self, length: int) -> None:
        """Retire the instruction: RIP past it (EIP wraps at 4 GiB outside 64-bit mode)."""
        self.regs.rip = (self.rip + length) & (_U64 if self.mode is CpuMode.BITS64 else 0xFFFF_FFFF)
        self.vcpu.set_regs(self.regs)


def _deliver_exception(ins: _Instruction, vector: int, next_rip: int) -> None:
    """Deliver a trap-type exception without error code through the 64-bit IDT, at CPL0."""
    sregs, regs, view = ins.sregs, ins.regs, ins.view
    handler, selector, ist, gate_type = idt_gate(view, sregs, vector, ins.paging)
    if selector != sregs.cs.selector:
        raise NotEmulated(f"gate {vector} switches to code selector {selector:#x}; "
                          "only same-selector gates are handled")  # fmt: skip
    try:
        if ist:
            ist_slot = sregs.tr.base + 0x24 + 8 * (ist - 1)  # in the 64-bit TSS
            (rsp,) = struct.unpack("<Q", view.read(ist_slot, 8, SUPERVISOR_READ, ins.paging))
        else:
            rsp = regs.rsp
        rsp &= ~0xF
        frame = struct.pack("<5Q", next_rip, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector)
        rsp = (rsp - len(frame)) & _U64  # the CPU wraps the stack pointer
        view.write(rsp, frame, SUPERVISOR_WRITE, ins.paging)
    except GuestFault as fault:  # a #DF on real hardware
        raise NotEmulated(f"delivering #{Vector(vector).name} would fault ({fault})") from None
    regs.rsp = rsp
    regs.rip = handler
    flags = regs.rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF)
    if gate_type == _GATE_INTERRUPT:
        flags &= ~RFLAGS_IF
    regs.rflags = flags | RFLAGS_FIXED
    ins.vcpu.set_regs(regs)


def _handle_int3(ins: _Instruction) -> None:
    if ins.mode is not CpuMode.BITS64:
        raise NotEmulated("#BP delivery by the VMM is implemented for 64-bit mode only")
    if ins.cpl != 0:
        raise NotEmulated("INT3 from user mode is left to the CPU")
    _deliver_exception(ins, Vector.BP, ins.rip + 1)


def _handle_fwait(ins: _Instruction) -> None:
    cr0 = ins.sregs.cr0
    if cr0 & CR0_MP and cr0 & CR0_TS:
        raise GuestFault(Vector.NM, why="FWAIT with CR0.MP and CR0.TS set")
    if ins.vcpu.get_fsw() & FSW_ES:
        if cr0 & CR0_NE:
            raise GuestFault(Vector.MF, why="FWAIT with an unmasked x87 exception pending")
        raise NotEmulated("a pending x87 exception with CR0.NE clear (FERR#) is not emulated")
    ins.finish(1)


def _rflags_ac(value: bool) -> Callable[[_Instruction], None]:
    """CLAC (``value`` False) or STAC: RFLAGS.AC, at CPL0 only."""

    def handle(ins: _Instruction) -> None:
        if ins.cpl != 0:
            raise GuestFault(Vector.UD, why=f"{ins.name.upper()} at CPL {ins.cpl}")
        flags = ins.regs.rflags
        ins.regs.rflags = (flags | RFLAGS_AC) if value else (flags & ~RFLAGS_AC)
        ins.finish(3)

    return handle


def _handle_0f_ae(ins: _Instruction) -> None:
    """LDMXCSR m32 (0F AE /2) and STMXCSR m32 (0F AE /3), faults as the SDM lists them."""
    operand = decode_memory_operand(ins.code, ins.mode, ins.rip, ins.regs, ins.sregs)
    if operand.reg not in (2, 3):
        raise Undecodable(f"0f ae /{operand.reg} is not ldmxcsr/stmxcsr")
    ins.name = "ldmxcsr" if operand.reg == 2 else "stmxcsr"
    store = operand.reg == 3
    if PREFIX_LOCK in operand.prefixes.others:
        raise GuestFault(Vector.UD, why=f"LOCK {ins.name}")
    if operand.prefixes.others - {PREFIX_ADDRESS_SIZE}:
        raise NotEmulated(f"{ins.name} with a 66/F2/F3 prefix is not emulated")
    cr0, cr4, rflags = ins.sregs.cr0, ins.sregs.cr4, ins.regs.rflags
    if cr0 & CR0_EM or not cr4 & CR4_OSFXSR:
        raise GuestFault(Vector.UD, why=f"{ins.name} with CR0.EM set or CR4.OSFXSR clear")
    if cr0 & CR0_TS:
        raise GuestFault(Vector.NM, why=f"{ins.name} with CR0.TS set")
    check_operand_access(operand, ins.mode, ins.sregs, 4, store)
    if ins.cpl == 3 and cr0 & CR0_AM and rflags & RFLAGS_AC and operand.address & 3:
        raise GuestFault(Vector.AC, 0, f"misaligned {ins.name} operand at CPL 3")
    access = Access(AccessKind.WRITE if store else AccessKind.READ, user=ins.cpl == 3, ac=bool(rflags & RFLAGS_AC))
    if store:
        ins.view.write(operand.address, struct.pack("<I", ins.vcpu.get_mxcsr()), access, ins.paging)
    else:
        (value,) = struct.unpack("<I", ins.view.read(operand.address, 4, access, ins.paging))
        if value & MXCSR_RESERVED:
            raise GuestFault(Vector.GP, 0, f"LDMXCSR of reserved bits ({value:#x})")
        ins.vcpu.set_mxcsr(value)
    ins.finish(operand.length)


@attrs.frozen
class InstructionHandler:
    """What to do with one opcode: its name, the handler, and whether prefixes may precede it."""

    name: str
    handle: Callable[[_Instruction], None]
    takes_prefixes: bool = False


# Opcode bytes (after any prefixes) -> handler. Longest match wins.
INSTRUCTION_HANDLERS: dict[bytes, InstructionHandler] = {
    b"\xcc": InstructionHandler("int3", _handle_int3),
    b"\x9b": InstructionHandler("fwait", _handle_fwait),
    b"\x0f\x01\xca": InstructionHandler("clac", _rflags_ac(False)),
    b"\x0f\x01\xcb": InstructionHandler("stac", _rflags_ac(True)),
    b"\x0f\xae": InstructionHandler("ldmxcsr/stmxcsr", _handle_0f_ae, takes_prefixes=True),
}
_OPCODES_LONGEST_FIRST = sorted(INSTRUCTION_HANDLERS, key=len, reverse=True)


_REFUSED_KINDS = 32  # distinct refusal reasons SyscallCompleter.refused keeps apart


_SAVED_COUNTS = 64  # distinct names a saved fallback's counters may hold


def _check_counts(counts: dict[str, int], what: str, limit: int = _SAVED_COUNTS) -> None:
    if len(counts) > limit or any(value < 0 for value in counts.values()):
        raise ValueError(f"saved {what} counters: more than {limit} names, or negative counts")


@attrs.frozen
class FallbackState:
    """What an ``EmulationFallback`` remembers: its counters (it keeps no guest state)."""

    handled: dict[str, int]
    faults: dict[str, int]


@attrs.define
class EmulationFallback:
    """Handles KVM_INTERNAL_ERROR_EMULATION exits for one vCPU."""

    view: GuestView
    handled: dict[str, int] = attrs.field(factory=dict)  # instructions emulated, by name
    faults: dict[str, int] = attrs.field(factory=dict)  # exceptions injected instead, "name: #XX"

    def handle(self, run: Any) -> None:
        """Emulate the failed instruction (or inject the fault it raises), or raise
        ``UnhandledInstruction``."""
        vcpu = self.view.vcpu
        rip, code = failed_instruction(vcpu, self.view.memory, run)
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        mode = cpu_mode(sregs)
        prefixes = decode_prefixes(code, mode)
        opcode = code[prefixes.length :]
        key = next((k for k in _OPCODES_LONGEST_FIRST if opcode.startswith(k)), None)
        if key is None:
            raise UnhandledInstruction(vcpu.index, rip, code, "no fallback handles it")
        entry = INSTRUCTION_HANDLERS[key]
        if prefixes.length and not entry.takes_prefixes:
            raise UnhandledInstruction(vcpu.index, rip, code, f"a prefixed {entry.name} is not emulated")
        ins = _Instruction(self.view, entry.name, rip, code, regs, sregs, mode, Paging.of(sregs))
        try:
            entry.handle(ins)
        except GuestFault as fault:
            inject_fault(vcpu, fault)
            name = f"{ins.name}: #{Vector(fault.vector).name}"
            self.faults[name] = self.faults.get(name, 0) + 1
            return
        except (NotEmulated, Undecodable, GuestMemoryError) as exc:
            raise UnhandledInstruction(vcpu.index, rip, code, f"the fallback could not: {exc}") from None
        self.handled[ins.name] = self.handled.get(ins.name, 0) + 1

    def save(self) -> FallbackState:
        return FallbackState(dict(self.handled), dict(self.faults))

    def restore(self, state: FallbackState) -> None:
        _check_counts(state.handled, "fallback")
        _check_counts(state.faults, "fallback fault")
        self.handled, self.faults = dict(state.handled), dict(state.faults)


# --- SYSCALL completion and debug exits -----------------------------------------------------


@attrs.frozen
class FaultFrame:
    """The 64-bit exception frame of a fault with an error code, as the handler sees it."""

    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    @classmethod
    def read(cls, view: GuestView, rsp: int, paging: Paging) -> FaultFrame:
        return cls(*struct.unpack("<6Q", view.read(rsp, 48, SUPERVISOR_READ, paging, mark=False)))


_USER_FETCH = Access(AccessKind.FETCH, user=True)


def _canonical(address: int, paging: Paging) -> bool:
    bits = 57 if paging.levels == 5 else 48
    top = address >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def _r11_inconsistency(r11: int, frame_rflags: int, fmask: int) -> str | None:
    """Why ``r11`` is not what this host's SYSCALL saves, given the #PF frame's RFLAGS.

    Measured on the nested host (docs/host-quirks.md): a real SYSCALL leaves the user's
    RFLAGS in R11 as the hardware held them -- IF set and IOPL 0, because guest user code
    runs at the hardware's CPL3 with interrupts on and its IOPL virtualised -- and the
    fault's frame holds that value with the FMASK bits cleared and RF set. A jump to LSTAR
    leaves whatever R11 the process chose, which the kernel's SYSRET/IRET would load into
    RFLAGS (IOPL 3 would give the process port I/O).
    """
    if r11 & RFLAGS_RESERVED or not r11 & RFLAGS_FIXED or r11 & RFLAGS_VM:
        return "R11 is not an RFLAGS value user code can have"
    if (r11 ^ frame_rflags) & ~(fmask | RFLAGS_RF) & _U64:
        return "R11 disagrees with the frame's RFLAGS outside FMASK"
    if r11 & RFLAGS_IOPL:
        return "R11 has IOPL > 0, which this host's SYSCALL never saves"
    if not r11 & RFLAGS_IF:
        return "R11 has IF clear, which this host's SYSCALL never saves"
    return None


def syscall_proof_failure(view: GuestView, paging: Paging, regs: Any, sregs: Any, msrs: dict[int, int],
                          frame: FaultFrame) -> str | None:  # fmt: skip
    """Why the #PF in ``frame`` is not a SYSCALL the host left at CPL3; None if it is one.

    A SYSCALL the host ran without entering CPL0 faults on fetching LSTAR from user mode,
    with RCX just past its ``0f 05`` and R11 holding the user's RFLAGS. Each check is one
    thing a process jumping to LSTAR cannot fake, or could only fake into the truth.
    """
    lstar = msrs.get(Msr.LSTAR)
    if frame.cs & 3 != 3:
        return "the fault is not from user mode"
    if not sregs.efer & EFER_SCE:
        return "EFER.SCE is clear: SYSCALL would have raised #UD"
    if frame.rip != lstar:
        return "the faulting RIP is not LSTAR"
    expected = PF_PRESENT | PF_USER | (PF_FETCH if paging.no_execute or paging.smep else 0)
    if frame.error_code != expected:
        return f"error code {frame.error_code:#x} is not a user-mode fetch from a supervisor page ({expected:#x})"
    if sregs.cr2 != lstar:
        return f"CR2 ({sregs.cr2:#x}) is not LSTAR"
    after = int(regs.rcx)
    if not _canonical(after, paging) or not _canonical((after - 2) & _U64, paging):
        return "RCX is not canonical"
    try:
        before = view.read((after - 2) & _U64, 2, _USER_FETCH, paging, mark=False)
    except (GuestFault, GuestMemoryError):
        return "the two bytes before RCX are not executable in the user's mapping"
    if before != _SYSCALL:
        return f"the two bytes before RCX are {before.hex(' ')}, not SYSCALL (0f 05)"
    return _r11_inconsistency(int(regs.r11), frame.rflags, msrs.get(Msr.FMASK, 0))


def reflect_debug_exception(vcpu: Vcpu, dr6: int) -> None:
    """Give the guest a #DB the host handed to the VMM: DR6 reports what the exit reported
    (B0-B3 replaced, BS/BD/BT added, as the CPU updates it), then #DB at the current RIP."""
    reported = dr6 & ~DR6_FIXED & 0xFFFF_FFFF
    current = vcpu.get_debugregs().dr6
    vcpu.set_dr6(((current & ~DR6_B0_B3) | reported | DR6_FIXED) & 0xFFFF_FFFF)
    vcpu.inject_exception(Vector.DB)


@attrs.frozen
class SyscallCompleterState:
    """What a ``SyscallCompleter`` knows of its guest: where its breakpoint is armed (the
    guest's #PF handler) and whether it is stepping past it; and its counters. KVM cannot
    be asked for guest-debug state, so this is the only record of it."""

    armed_at: int | None
    stepping: bool
    completed: int
    passed_faults: int
    refused: dict[str, int]
    reflected: int
    base_mismatches: int


@attrs.define
class SyscallCompleter:
    """Completes guest-user SYSCALLs the host left at CPL3 (see the module docstring)."""

    view: GuestView
    armed_at: int | None = None
    stepping: bool = False
    completed: int = 0
    passed_faults: int = 0  # page faults stepped over to the guest's handler
    refused: dict[str, int] = attrs.field(factory=dict)  # CPL3 faults at LSTAR that were not SYSCALLs, by reason
    reflected: int = 0  # debug exits that were the guest's own, injected back
    base_mismatches: int = 0  # FS/GS bases where KVM_GET_SREGS and KVM_GET_MSRS disagreed

    def _arm(self, handler: int) -> None:
        self.view.vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.USE_HW_BP,
                                       [handler, 0, 0, 0, 0, 0, 0, DR7_L0 | DR7_FIXED])  # fmt: skip
        self.armed_at = handler

    def refresh(self) -> None:
        """Arm (or move) the breakpoint once the guest has set LSTAR and its #PF gate."""
        if self.stepping:
            return
        vcpu = self.view.vcpu
        sregs = vcpu.get_sregs()
        if not sregs.efer & EFER_LMA or sregs.idt.limit < Vector.PF * 16 + 15:
            return
        if not vcpu.get_msrs([Msr.LSTAR]).get(Msr.LSTAR):
            return
        try:
            handler, *_ = idt_gate(self.view, sregs, Vector.PF, Paging.of(sregs))
        except GuestMemoryError:
            return
        if handler != self.armed_at:
            self._arm(handler)

    def on_debug_exit(self, run: Any) -> bool:
        """Handle a debug exit; False if guest debugging is not ours (nothing armed)."""
        if self.armed_at is None:
            return False
        vcpu = self.view.vcpu
        arch = run.debug.arch
        if self.stepping:
            if arch.dr6 & DR6_BS:  # our step past the guest's #PF handler entry: re-arm
                self.stepping = False
                self._arm(self.armed_at)
            else:
                self._reflect(arch.dr6)
            return True
        if arch.pc != self.armed_at or not arch.dr6 & DR6_B0:  # not our slot-0 breakpoint
            self._reflect(arch.dr6)
            return True
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        paging = Paging.of(sregs)
        msrs = vcpu.get_msrs([Msr.STAR, Msr.LSTAR, Msr.FMASK, Msr.FS_BASE, Msr.GS_BASE])
        try:
            frame: FaultFrame | None = FaultFrame.read(self.view, regs.rsp, paging)
        except (GuestFault, GuestMemoryError):
            frame = None  # not a frame the CPU could have pushed: the guest's handler will see
        if frame is not None:
            why = syscall_proof_failure(self.view, paging, regs, sregs, msrs, frame)
            if why is None:
                self._complete_syscall(regs, sregs, msrs, frame)
                return True
            if frame.cs & 3 == 3 and frame.rip == msrs.get(Msr.LSTAR):
                # Reasons quote guest values: count at most _REFUSED_KINDS of them apart.
                key = why if why in self.refused or len(self.refused) < _REFUSED_KINDS else "other reasons"
                self.refused[key] = self.refused.get(key, 0) + 1
        # A genuine page fault: let the guest's handler run, one step without the
        # breakpoint (this host does not honour RF), then re-arm at the step's exit.
        vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP)
        self.stepping = True
        self.passed_faults += 1
        return True

    def save(self) -> SyscallCompleterState:
        return SyscallCompleterState(self.armed_at, self.stepping, self.completed, self.passed_faults,
                                     dict(self.refused), self.reflected, self.base_mismatches)  # fmt: skip

    def restore(self, state: SyscallCompleterState) -> None:
        """Take ``state`` and set the vCPU's guest debugging as it was (after its debug
        registers are restored): the breakpoint armed, or the step past it under way."""
        if state.stepping and state.armed_at is None:
            raise ValueError("a saved SYSCALL completer steps past a breakpoint it never armed")
        if state.armed_at is not None and not 0 <= state.armed_at < 1 << 64:
            raise ValueError(f"saved breakpoint address {state.armed_at:#x} is not a 64-bit address")
        _check_counts(state.refused, "refused-syscall", _REFUSED_KINDS + 1)
        if min(state.completed, state.passed_faults, state.reflected, state.base_mismatches) < 0:
            raise ValueError("saved SYSCALL completer counters are negative")
        self.completed, self.passed_faults = state.completed, state.passed_faults
        self.refused, self.reflected, self.base_mismatches = dict(state.refused), state.reflected, state.base_mismatches
        self.stepping = state.stepping
        if state.stepping:
            self.armed_at = state.armed_at
            self.view.vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP)
        elif state.armed_at is not None:
            self._arm(state.armed_at)
        else:
            self.armed_at = None

    def _reflect(self, dr6: int) -> None:
        reflect_debug_exception(self.view.vcpu, dr6)
        self.reflected += 1

    def _complete_syscall(self, regs: Any, sregs: Any, msrs: dict[int, int], frame: FaultFrame) -> None:
        """Do what SYSCALL does (RCX already holds the return RIP, R11 the user's RFLAGS)."""
        vcpu = self.view.vcpu
        # KVM_SET_SREGS writes every segment back. Take the FS/GS bases from the MSRs, the
        # registers the guest kernel writes (arch_prctl); a stale base in the segment state
        # would otherwise be written over the task's TLS pointer. (Suspected on the nested
        # host after one user task died on an FS-relative load with FS base 0.)
        for seg, index in ((sregs.fs, Msr.FS_BASE), (sregs.gs, Msr.GS_BASE)):
            base = msrs.get(index)
            if base is not None and base != seg.base:
                self.base_mismatches += 1
                seg.base = base
        kernel_cs = (msrs[Msr.STAR] >> 32) & 0xFFFC  # SYSCALL forces RPL 0
        for seg, selector, seg_type, long_code in ((sregs.cs, kernel_cs, 0xB, True),
                                                   (sregs.ss, kernel_cs + 8, 0x3, False)):  # fmt: skip
            seg.selector, seg.base, seg.limit, seg.type = selector, 0, 0xFFFF_FFFF, seg_type
            seg.present, seg.dpl, seg.s, seg.g, seg.unusable = 1, 0, 1, 1, 0
            seg.l, seg.db = (1, 0) if long_code else (0, 1)
        vcpu.set_sregs(sregs)
        regs.rip = msrs[Msr.LSTAR]
        regs.rsp = frame.rsp
        regs.rflags = (regs.r11 & ~(msrs.get(Msr.FMASK, 0) | RFLAGS_RF) & _U64) | RFLAGS_FIXED
        vcpu.set_regs(regs)
        self.completed += 1
