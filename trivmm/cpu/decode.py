"""Decoding a two-byte (``0F``) instruction's ModRM memory operand, by CPU mode.

The emulation fallback handles a few instructions with a memory operand (LDMXCSR and
STMXCSR). Where that operand points depends on the mode the vCPU is in:

| | 64-bit mode (EFER.LMA and CS.L) | 32-bit code (CS.D; protected or compatibility mode) |
|---|---|---|
| bytes 0x40-0x4F | a REX prefix | INC/DEC: another instruction, not decoded here |
| mod=00 rm=101 | RIP-relative disp32 | absolute disp32 |
| address size | 64 bits; 32 with 0x67 | 32 bits; 0x67 selects 16-bit addressing: refused |
| segments | only the FS and GS bases apply | all apply, limits checked (see below) |

In 32-bit code the access goes through DS by default, SS when the base register is ESP or
EBP, or the segment an override prefix names.

16-bit code (real mode, or CS.D clear) is refused, as is anything not in this table. Every
read of the instruction bytes is bounds-checked, and effective addresses wrap at the
address size, as the CPU's do.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from trivmm.cpu.arch import CR0_PE, CR4_LA57, EFER_LMA, GPR_NAMES, REG_RBP, REG_RSP, Vector
from trivmm.cpu.paging import GuestFault

__all__ = ["CpuMode", "cpu_mode", "Undecodable", "Prefixes", "decode_prefixes", "MemoryOperand",
           "decode_memory_operand", "check_operand_access", "MAX_INSTRUCTION_LENGTH"]  # fmt: skip

MAX_INSTRUCTION_LENGTH = 15
SEGMENT_OVERRIDES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
PREFIX_LOCK, PREFIX_OPERAND_SIZE, PREFIX_ADDRESS_SIZE, PREFIX_REPNE, PREFIX_REP = 0xF0, 0x66, 0x67, 0xF2, 0xF3
_OTHER_PREFIXES = frozenset({PREFIX_LOCK, PREFIX_OPERAND_SIZE, PREFIX_ADDRESS_SIZE, PREFIX_REPNE, PREFIX_REP})
_REX_B, _REX_X = 0x1, 0x2
_SEGMENT_CODE, _SEGMENT_EXPAND_DOWN_OR_CONFORMING, _SEGMENT_WRITABLE_OR_READABLE = 0x8, 0x4, 0x2


class CpuMode(enum.Enum):
    """How the vCPU decodes instructions now."""

    BITS64 = 64
    BITS32 = 32
    BITS16 = 16


def cpu_mode(sregs: Any) -> CpuMode:
    """64-bit mode needs EFER.LMA and CS.L; 32-bit code needs CR0.PE and CS.D."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return CpuMode.BITS64
    if sregs.cr0 & CR0_PE and sregs.cs.db:
        return CpuMode.BITS32
    return CpuMode.BITS16


class Undecodable(ValueError):
    """The bytes are not a form the decoder handles (not a fault the guest should see)."""


@attrs.frozen
class Prefixes:
    """The prefixes in front of an opcode."""

    segment: str | None  # the last segment override, if any
    others: frozenset[int]  # the other legacy prefixes present (0x66, 0x67, 0xF0, 0xF2, 0xF3)
    rex: int  # the REX byte (64-bit mode only), or 0
    length: int


def decode_prefixes(code: bytes, mode: CpuMode) -> Prefixes:
    """Legacy prefixes in any order, then (64-bit mode only) one REX byte."""
    pos, segment, others = 0, None, set()
    while pos < len(code) and (code[pos] in SEGMENT_OVERRIDES or code[pos] in _OTHER_PREFIXES):
        if code[pos] in SEGMENT_OVERRIDES:
            segment = SEGMENT_OVERRIDES[code[pos]]
        else:
            others.add(code[pos])
        pos += 1
    rex = 0
    if mode is CpuMode.BITS64 and pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    return Prefixes(segment, frozenset(others), rex, pos)


@attrs.frozen
class MemoryOperand:
    """A decoded ``[prefixes] 0F <opcode> ModRM [SIB] [disp]`` with a memory operand."""

    opcode: int  # the byte after 0F
    reg: int  # ModRM.reg: the /digit that selects the operation
    segment: str  # the segment register the access goes through ("ds", "ss", "fs", ...)
    offset: int  # the effective address: the offset within the segment
    address: int  # the linear address: segment base + offset, wrapped as the mode wraps it
    stack: bool  # through SS: the CPU reports a segment violation as #SS, not #GP
    length: int  # of the whole instruction
    prefixes: Prefixes


def decode_memory_operand(code: bytes, mode: CpuMode, rip: int, regs: Any, sregs: Any) -> MemoryOperand:
    """Decode ``code`` (the instruction's bytes, from RIP) in ``mode``; raises ``Undecodable``."""
    if mode is CpuMode.BITS16:
        raise Undecodable("16-bit code is not decoded")

    def byte(i: int) -> int:
        if i >= MAX_INSTRUCTION_LENGTH:
            raise GuestFault(Vector.GP, 0, "instruction longer than 15 bytes")
        if i >= len(code):
            raise Undecodable("instruction bytes end inside the instruction")
        return code[i]

    def displacement(i: int, width: int) -> int:  # little-endian, sign-extended
        return int.from_bytes(bytes(byte(i + k) for k in range(width)), "little", signed=True)

    prefixes = decode_prefixes(code[:MAX_INSTRUCTION_LENGTH], mode)
    pos, rex = prefixes.length, prefixes.rex
    if PREFIX_ADDRESS_SIZE in prefixes.others and mode is CpuMode.BITS32:
        raise Undecodable("16-bit addressing (0x67 in 32-bit code) is not decoded")
    address_bits = 32 if mode is CpuMode.BITS32 or PREFIX_ADDRESS_SIZE in prefixes.others else 64
    address_mask = (1 << address_bits) - 1
    if byte(pos) != 0x0F:
        raise Undecodable(f"not a two-byte (0F) opcode: {code[pos]:#04x}")
    opcode = byte(pos + 1)
    modrm = byte(pos + 2)
    pos += 3
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        raise Undecodable("a register operand, not memory")

    def gpr(number: int) -> int:
        return int(getattr(regs, GPR_NAMES[number])) & address_mask

    offset = 0
    base: int | None = None  # the base register's number, for the default segment
    if rm == 4:  # a SIB byte follows
        sib = byte(pos)
        pos += 1
        scale, index = sib >> 6, ((sib >> 3) & 7) | (8 if rex & _REX_X else 0)
        if index != REG_RSP:  # index 100 (without REX.X) means none
            offset += gpr(index) << scale
        if sib & 7 == REG_RBP and mod == 0:  # no base: disp32 (REX.B does not change this)
            offset += displacement(pos, 4)
            pos += 4
        else:
            base = (sib & 7) | (8 if rex & _REX_B else 0)
            offset += gpr(base)
    elif rm == REG_RBP and mod == 0:
        if mode is CpuMode.BITS64:  # RIP-relative, from the end of the instruction (no immediate follows)
            offset = rip + pos + 4 + displacement(pos, 4)
        else:  # absolute
            offset = displacement(pos, 4)
        pos += 4
    else:
        base = rm | (8 if rex & _REX_B else 0)
        offset = gpr(base)
    if mod == 1:
        offset += displacement(pos, 1)
        pos += 1
    elif mod == 2:
        offset += displacement(pos, 4)
        pos += 4
    offset &= address_mask
    if pos > MAX_INSTRUCTION_LENGTH:
        raise GuestFault(Vector.GP, 0, "instruction longer than 15 bytes")

    segment = prefixes.segment or ("ss" if base in (REG_RSP, REG_RBP) else "ds")
    if mode is CpuMode.BITS64:
        segment_base = getattr(sregs, segment).base if segment in ("fs", "gs") else 0
        address = (segment_base + offset) & ((1 << 64) - 1)
    else:
        address = (getattr(sregs, segment).base + offset) & 0xFFFF_FFFF
    return MemoryOperand(opcode, reg, segment, offset, address, segment == "ss", pos, prefixes)


def _canonical(address: int, bits: int) -> bool:
    top = address >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def check_operand_access(operand: MemoryOperand, mode: CpuMode, sregs: Any, size: int, write: bool) -> None:
    """Raise the #GP(0) or #SS(0) the CPU would raise for this access before paging: a
    non-canonical address in 64-bit mode, or a segment that refuses it in 32-bit code."""
    vector = Vector.SS if operand.stack else Vector.GP
    if mode is CpuMode.BITS64:
        bits = 57 if sregs.cr4 & CR4_LA57 else 48
        last = (operand.address + size - 1) & ((1 << 64) - 1)
        if not (_canonical(operand.address, bits) and _canonical(last, bits)):
            raise GuestFault(vector, 0, f"non-canonical address {operand.address:#x}")
        return
    seg = getattr(sregs, operand.segment)
    if seg.unusable or not seg.present:
        raise GuestFault(vector, 0, f"{operand.segment.upper()} is unusable (null selector)")
    if seg.type & _SEGMENT_CODE:
        if write or not seg.type & _SEGMENT_WRITABLE_OR_READABLE:
            raise GuestFault(vector, 0, f"{'write to' if write else 'read of'} code segment {operand.segment.upper()}")
    else:
        if write and not seg.type & _SEGMENT_WRITABLE_OR_READABLE:
            raise GuestFault(vector, 0, f"write to read-only segment {operand.segment.upper()}")
        if seg.type & _SEGMENT_EXPAND_DOWN_OR_CONFORMING:
            raise Undecodable("expand-down data segments are not emulated")
    if operand.offset + size - 1 > seg.limit:
        raise GuestFault(vector, 0, f"offset {operand.offset:#x} beyond the limit of {operand.segment.upper()}")
