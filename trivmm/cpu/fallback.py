"""A small fallback for what a host KVM gets wrong, as a table of handlers.

Two kinds of trouble reach a VMM from a host KVM that cannot run some guest code (the
nested, PVM-style KVM in ../shared/notes/kvm-here.md; on stock KVM none of this triggers):

1. ``KVM_EXIT_INTERNAL_ERROR`` / emulation failure at an instruction the host's emulator
   does not know. ``EmulationFallback`` looks the instruction's bytes up in
   ``INSTRUCTION_HANDLERS`` and, if it knows them, does what the CPU would have done:
   INT3 at CPL0 delivers #BP through the guest's IDT; FWAIT is a no-op; CLAC/STAC flip
   RFLAGS.AC. Anything else stops the VM with an ``UnhandledInstruction`` that names RIP
   and the bytes.

2. SYSCALL from guest user space that the host runs without switching to CPL0: the jump
   to LSTAR then faults at once (#PF on a supervisor page, from CPL3). ``SyscallCompleter``
   puts a hardware breakpoint on the guest's #PF handler; when it hits with a frame whose
   RIP is LSTAR and whose CS is CPL3, it discards the fault and finishes the SYSCALL by hand
   (CS/SS from STAR, RFLAGS masked by FMASK, RIP = LSTAR; RCX/R11 already hold what SYSCALL
   saves). Any other page fault is let through by stepping over the breakpoint.

Neither touches guest state unless it is sure; each says why when it gives up.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs

from trivmm.kvm.constants import EMULATION_FLAG_INSTRUCTION_BYTES, GuestDebug
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemory, GuestMemoryError

__all__ = ["UnhandledInstruction", "EmulationFallback", "SyscallCompleter", "GuestView",
           "INSTRUCTION_HANDLERS", "describe_instruction"]  # fmt: skip

_EFER_LMA = 0x400
_RFLAGS_IF, _RFLAGS_TF, _RFLAGS_NT, _RFLAGS_RF, _RFLAGS_AC = 1 << 9, 1 << 8, 1 << 14, 1 << 16, 1 << 18
_RFLAGS_FIXED = 0x2
_MSR_STAR, _MSR_LSTAR, _MSR_FMASK = 0xC000_0081, 0xC000_0082, 0xC000_0084
_MSR_FS_BASE, _MSR_GS_BASE = 0xC000_0100, 0xC000_0101
_VECTOR_BP, _VECTOR_PF = 3, 14
_DR7_L0 = 0x1
_DR7_FIXED = 0x400
_GATE_INTERRUPT = 0xE
_PAGE = 0x1000

# Names for the bytes the nested host is known to choke on, for error messages.
_KNOWN_NAMES: dict[bytes, str] = {
    b"\xf0\x48\x0f\xc7": "lock cmpxchg16b",
    b"\x48\x0f\xc7": "cmpxchg16b",
    b"\x48\x0f\xae": "xsave/xrstor family",
    b"\x0f\xae": "ldmxcsr/stmxcsr/fxsave family (0f ae)",
    b"\xf3\x0f\xb8": "popcnt",
    b"\xf3\x48\x0f\xb8": "popcnt",
    b"\x0f\x01\xca": "clac",
    b"\x0f\x01\xcb": "stac",
    b"\x66\x0f\x6e": "movd (SSE2)",
    b"\x66\x44\x0f\x6e": "movd (SSE2)",
    b"\x66\x45\x0f\x6e": "movd (SSE2)",
    b"\x0f\x01\xd9": "vmmcall",
    b"\x0f\x01\xc1": "vmcall",
    b"\xcc": "int3",
    b"\xcf": "iret",
    b"\x48\xcf": "iretq",
    b"\x9b": "fwait",
}


def describe_instruction(code: bytes) -> str:
    for prefix in sorted(_KNOWN_NAMES, key=len, reverse=True):
        if code.startswith(prefix):
            return _KNOWN_NAMES[prefix]
    return "unknown instruction"


class UnhandledInstruction(Exception):
    """The host could not run an instruction and neither could the fallback."""

    def __init__(self, vcpu: int, rip: int, code: bytes, why: str) -> None:
        super().__init__(
            f"host KVM could not emulate the instruction at RIP {rip:#x} "
            f"(bytes {code.hex(' ') or 'unavailable'}: {describe_instruction(code)}); {why}"
        )
        self.vcpu = vcpu
        self.rip = rip
        self.code = code


@attrs.define
class GuestView:
    """Guest-virtual reads and writes through one vCPU's page tables (KVM_TRANSLATE)."""

    vcpu: Vcpu
    memory: GuestMemory

    def _physical(self, gva: int) -> int:
        tr = self.vcpu.translate(gva)
        if not tr.valid:
            raise GuestMemoryError(f"guest virtual address {gva:#x} is not mapped")
        return tr.physical_address

    def read(self, gva: int, length: int) -> bytes:
        out = bytearray()
        while length:
            chunk = min(length, _PAGE - (gva & (_PAGE - 1)))
            out += self.memory.read(self._physical(gva), chunk)
            gva, length = gva + chunk, length - chunk
        return bytes(out)

    def write(self, gva: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), _PAGE - (gva & (_PAGE - 1)))
            self.memory.write(self._physical(gva), data[:chunk])
            gva, data = gva + chunk, data[chunk:]

    def idt_gate(self, sregs: object, vector: int) -> tuple[int, int, int, int]:
        """(handler, selector, ist, type) of a 64-bit IDT gate; raises if absent."""
        idt = sregs.idt  # type: ignore[attr-defined]
        if vector * 16 + 15 > idt.limit:
            raise GuestMemoryError(f"IDT (limit {idt.limit:#x}) has no gate {vector}")
        raw = self.read(idt.base + vector * 16, 16)
        low, selector, ist, attr, mid, high = struct.unpack("<HHBBHI4x", raw)
        if not attr & 0x80:
            raise GuestMemoryError(f"IDT gate {vector} is not present")
        return low | (mid << 16) | (high << 32), selector, ist & 7, attr & 0xF


def _deliver_exception(view: GuestView, vector: int, next_rip: int) -> None:
    """Deliver a trap-type exception without error code through the 64-bit IDT."""
    vcpu = view.vcpu
    sregs = vcpu.get_sregs()
    regs = vcpu.get_regs()
    if not sregs.efer & _EFER_LMA:
        raise GuestMemoryError("exception delivery by the VMM is implemented for long mode only")
    handler, selector, ist, gate_type = view.idt_gate(sregs, vector)
    cpl = sregs.cs.selector & 3
    if cpl != 0:
        raise GuestMemoryError("exception delivery from user mode is left to the CPU")
    if selector != sregs.cs.selector:
        raise GuestMemoryError(f"gate {vector} switches to code selector {selector:#x}; "
                               "only same-selector gates are handled")  # fmt: skip
    if ist:
        (rsp,) = struct.unpack("<Q", view.read(sregs.tr.base + 0x24 + 8 * (ist - 1), 8))
    else:
        rsp = regs.rsp
    rsp &= ~0xF
    frame = struct.pack("<5Q", next_rip, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector)
    rsp -= len(frame)
    view.write(rsp, frame)
    regs.rsp = rsp
    regs.rip = handler
    flags = regs.rflags & ~(_RFLAGS_TF | _RFLAGS_NT | _RFLAGS_RF)
    if gate_type == _GATE_INTERRUPT:
        flags &= ~_RFLAGS_IF
    regs.rflags = flags | _RFLAGS_FIXED
    vcpu.set_regs(regs)


def _handle_int3(view: GuestView, rip: int, code: bytes) -> None:
    _deliver_exception(view, _VECTOR_BP, rip + 1)


def _handle_fwait(view: GuestView, rip: int, code: bytes) -> None:
    regs = view.vcpu.get_regs()
    regs.rip = rip + 1
    view.vcpu.set_regs(regs)


def _rflags_ac(value: bool) -> Callable[[GuestView, int, bytes], None]:
    def handle(view: GuestView, rip: int, code: bytes) -> None:
        regs = view.vcpu.get_regs()
        regs.rflags = (regs.rflags | _RFLAGS_AC) if value else (regs.rflags & ~_RFLAGS_AC)
        regs.rip = rip + 3
        view.vcpu.set_regs(regs)

    return handle


_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
_SEGMENT_PREFIXES = {0x26: None, 0x2E: None, 0x36: None, 0x3E: None, 0x64: "fs", 0x65: "gs"}


class _Undecodable(GuestMemoryError):
    """The bytes are not a form the decoder handles."""


def decode_memory_operand(code: bytes, rip: int, regs: object, sregs: object) -> tuple[int, int, int]:
    """Decode ``[segment prefix] [REX] 0F <op> ModRM [SIB] [disp]`` in 64-bit mode.

    Returns (ModRM reg field, effective guest-virtual address, instruction length). Only
    memory operands are accepted (mod != 3); every read is bounds-checked against ``code``.
    """

    def byte(i: int) -> int:
        if i >= len(code):
            raise _Undecodable("instruction bytes end inside the instruction")
        return code[i]

    def signed(i: int, width: int) -> int:  # a little-endian displacement at code[i:]
        return int.from_bytes(bytes(byte(i + k) for k in range(width)), "little", signed=True)

    pos, segment_base, rex = 0, 0, 0
    while byte(pos) in _SEGMENT_PREFIXES:
        name = _SEGMENT_PREFIXES[code[pos]]
        segment_base = getattr(sregs, name).base if name else 0
        pos += 1
    if 0x40 <= byte(pos) <= 0x4F:
        rex = code[pos]
        pos += 1
    if byte(pos) != 0x0F:
        raise _Undecodable("not a two-byte (0F) opcode")
    pos += 2  # 0F and the opcode byte
    modrm = byte(pos)
    pos += 1
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        raise _Undecodable("register operand, not memory")

    def gpr(number: int) -> int:
        return int(getattr(regs, _GPR_NAMES[number]))

    address = 0
    if rm == 4:  # SIB
        sib = byte(pos)
        pos += 1
        scale, index, base = 1 << (sib >> 6), ((sib >> 3) & 7) | (rex & 0x2) << 2, (sib & 7) | (rex & 0x1) << 3
        if index != 4:
            address += gpr(index) * scale
        if (base & 7) == 5 and mod == 0:
            address += signed(pos, 4)
            pos += 4
        else:
            address += gpr(base)
    elif rm == 5 and mod == 0:  # RIP-relative: from the next instruction
        address = rip + pos + 4 + signed(pos, 4)
        pos += 4
    else:
        address = gpr(rm | (rex & 0x1) << 3)
    if mod == 1:
        address += signed(pos, 1)
        pos += 1
    elif mod == 2:
        address += signed(pos, 4)
        pos += 4
    return reg, (segment_base + address) & 0xFFFF_FFFF_FFFF_FFFF, pos


def _handle_0f_ae(view: GuestView, rip: int, code: bytes) -> None:
    """LDMXCSR m32 (0F AE /2) and STMXCSR m32 (0F AE /3) through the vCPU's FPU state."""
    vcpu = view.vcpu
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    reg, address, length = decode_memory_operand(code, rip, regs, sregs)
    fpu = vcpu.get_fpu()
    if reg == 2:
        (value,) = struct.unpack("<I", view.read(address, 4))
        if value & 0xFFFF_0000:
            raise GuestMemoryError(f"LDMXCSR of reserved bits ({value:#x}) would #GP; not emulated")
        fpu.mxcsr = value
        vcpu.set_fpu(fpu)
    elif reg == 3:
        view.write(address, struct.pack("<I", fpu.mxcsr))
    else:
        raise _Undecodable(f"0f ae /{reg} is not ldmxcsr/stmxcsr")
    regs.rip = rip + length
    vcpu.set_regs(regs)


def _with_prefixes(opcode: bytes) -> list[bytes]:
    """``opcode`` as it may appear after an optional segment prefix and REX byte."""
    forms = [opcode]
    for rex in range(0x40, 0x50):
        forms.append(bytes([rex]) + opcode)
    for segment in (0x64, 0x65):
        forms += [bytes([segment]) + f for f in list(forms)]
    return forms


# Exact leading bytes -> what to do. Longest match wins.
INSTRUCTION_HANDLERS: dict[bytes, Callable[[GuestView, int, bytes], None]] = {
    b"\xcc": _handle_int3,
    b"\x9b": _handle_fwait,
    b"\x0f\x01\xca": _rflags_ac(False),  # clac
    b"\x0f\x01\xcb": _rflags_ac(True),  # stac
    **{form: _handle_0f_ae for form in _with_prefixes(b"\x0f\xae")},  # ldmxcsr / stmxcsr
}


@attrs.define
class EmulationFallback:
    """Handles KVM_INTERNAL_ERROR_EMULATION exits for one vCPU."""

    view: GuestView
    handled: dict[str, int] = attrs.field(factory=dict)

    def instruction_bytes(self, run: object, rip: int) -> bytes:
        failure = run.emulation_failure  # type: ignore[attr-defined]
        if failure.ndata >= 1 and failure.flags & EMULATION_FLAG_INSTRUCTION_BYTES and failure.insn_size:
            return bytes(failure.insn_bytes[0 : min(failure.insn_size, 15)])
        try:
            return self.view.read(rip, 15)
        except GuestMemoryError:
            try:
                return self.view.read(rip, _PAGE - (rip & (_PAGE - 1)))[:15]
            except GuestMemoryError:
                return b""

    def handle(self, run: object) -> None:
        """Emulate the failed instruction or raise ``UnhandledInstruction``."""
        vcpu = self.view.vcpu
        rip = vcpu.get_regs().rip
        code = self.instruction_bytes(run, rip)
        for prefix in sorted(INSTRUCTION_HANDLERS, key=len, reverse=True):
            if code.startswith(prefix):
                try:
                    INSTRUCTION_HANDLERS[prefix](self.view, rip, code)
                except GuestMemoryError as exc:
                    raise UnhandledInstruction(vcpu.index, rip, code, f"the fallback could not: {exc}") from None
                name = describe_instruction(code)
                self.handled[name] = self.handled.get(name, 0) + 1
                return
        raise UnhandledInstruction(vcpu.index, rip, code, "no fallback handles it")


@attrs.define
class SyscallCompleter:
    """Completes guest-user SYSCALLs the host left at CPL3 (see the module docstring)."""

    view: GuestView
    armed_at: int | None = None
    stepping: bool = False
    completed: int = 0
    passed_faults: int = 0
    base_mismatches: int = 0  # FS/GS bases where KVM_GET_SREGS and KVM_GET_MSRS disagreed

    def _arm(self, handler: int) -> None:
        self.view.vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.USE_HW_BP,
                                       [handler, 0, 0, 0, 0, 0, 0, _DR7_L0 | _DR7_FIXED])  # fmt: skip
        self.armed_at = handler

    def refresh(self) -> None:
        """Arm (or move) the breakpoint once the guest has set LSTAR and its #PF gate."""
        if self.stepping:
            return
        vcpu = self.view.vcpu
        sregs = vcpu.get_sregs()
        if not sregs.efer & _EFER_LMA or sregs.idt.limit < _VECTOR_PF * 16 + 15:
            return
        if not vcpu.get_msrs([_MSR_LSTAR]).get(_MSR_LSTAR):
            return
        try:
            handler, *_ = self.view.idt_gate(sregs, _VECTOR_PF)
        except GuestMemoryError:
            return
        if handler != self.armed_at:
            self._arm(handler)

    def on_debug_exit(self, run: object) -> bool:
        """Handle a debug exit; False if it was not ours."""
        vcpu = self.view.vcpu
        if self.stepping:
            self.stepping = False
            assert self.armed_at is not None
            self._arm(self.armed_at)
            return True
        pc = run.debug.arch.pc  # type: ignore[attr-defined]
        if self.armed_at is None or pc != self.armed_at:
            return False
        regs = vcpu.get_regs()
        _error, rip, cs, rflags, user_rsp, _ss = struct.unpack("<6Q", self.view.read(regs.rsp, 48))
        msrs = vcpu.get_msrs([_MSR_STAR, _MSR_LSTAR, _MSR_FMASK, _MSR_FS_BASE, _MSR_GS_BASE])
        if rip == msrs.get(_MSR_LSTAR) and cs & 3 == 3:
            self._complete_syscall(regs, msrs, rflags, user_rsp)
        else:
            # A genuine page fault: let the guest's handler run, one step without the
            # breakpoint (RF is not honoured by every host), then re-arm.
            vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP)
            self.stepping = True
            self.passed_faults += 1
        return True

    def _complete_syscall(self, regs: object, msrs: dict[int, int], rflags: int, user_rsp: int) -> None:
        vcpu = self.view.vcpu
        sregs = vcpu.get_sregs()
        # KVM_SET_SREGS writes every segment back. Take the FS/GS bases from the MSRs, the
        # registers the guest kernel writes (arch_prctl); a stale base in the segment state
        # would otherwise be written over the task's TLS pointer. (Suspected on the nested
        # host after one user task died on an FS-relative load with FS base 0.)
        for seg, index in ((sregs.fs, _MSR_FS_BASE), (sregs.gs, _MSR_GS_BASE)):
            base = msrs.get(index)
            if base is not None and base != seg.base:
                self.base_mismatches += 1
                seg.base = base
        kernel_cs = (msrs[_MSR_STAR] >> 32) & 0xFFFF
        for seg, selector, seg_type, long_code in ((sregs.cs, kernel_cs, 0xB, True),
                                                   (sregs.ss, kernel_cs + 8, 0x3, False)):  # fmt: skip
            seg.selector, seg.base, seg.limit, seg.type = selector, 0, 0xFFFF_FFFF, seg_type
            seg.present, seg.dpl, seg.s, seg.g, seg.unusable = 1, 0, 1, 1, 0
            seg.l, seg.db = (1, 0) if long_code else (0, 1)
        vcpu.set_sregs(sregs)
        regs.rip = msrs[_MSR_LSTAR]  # type: ignore[attr-defined]
        regs.rsp = user_rsp  # type: ignore[attr-defined]
        regs.rflags = (rflags & ~msrs.get(_MSR_FMASK, 0)) | _RFLAGS_FIXED  # type: ignore[attr-defined]
        vcpu.set_regs(regs)
        self.completed += 1
