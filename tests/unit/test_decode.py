"""The memory-operand decoder, by hand and against GNU as in 64-bit and 32-bit mode."""

from __future__ import annotations

import dataclasses
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.fake_cpu import segment
from trivmm.cpu.arch import EFER_LMA, GPR_NAMES
from trivmm.cpu.decode import CpuMode, Undecodable, check_operand_access, cpu_mode, decode_memory_operand
from trivmm.cpu.paging import GuestFault

REGS = NS(**{name: 0x1000 * (i + 1) for i, name in enumerate(GPR_NAMES)})
SREGS = NS(**{name: segment(0, base=0x10_0000 * (i + 1)) for i, name in enumerate(("es", "cs", "ss", "ds", "fs"))},
           gs=segment(0, base=0xFFFF_8880_0000_0000), cr4=0)  # fmt: skip


def decode(hex_bytes: str, mode: CpuMode, rip: int = 0) -> tuple[int, int, int]:
    operand = decode_memory_operand(bytes.fromhex(hex_bytes), mode, rip, REGS, SREGS)
    return operand.reg, operand.address, operand.length


def test_64_bit_forms() -> None:
    bits64 = CpuMode.BITS64
    assert decode("0fae1510000000", bits64, 0x100) == (2, 0x117, 7)  # ldmxcsr 0x10(%rip)
    assert decode("65410fae542420", bits64) == (2, 0xFFFF_8880_0000_D020, 7)  # ldmxcsr %gs:0x20(%r12)
    assert decode("0fae548808", bits64) == (2, 0x1000 + 0x2000 * 4 + 8, 5)  # ldmxcsr 8(%rax,%rcx,4)
    assert decode("3e0fae18", bits64) == (3, 0x1000, 4)  # stmxcsr %ds:(%rax): DS's base ignored
    assert decode("670fae1510000000", bits64, 0xFFFF_FFF0) == (2, (0xFFFF_FFF0 + 8 + 0x10) & 0xFFFF_FFFF, 8)


def test_32_bit_forms() -> None:
    bits32 = CpuMode.BITS32
    ds, ss, es = 0x40_0000, 0x30_0000, 0x10_0000
    assert decode("0fae1510000000", bits32, 0x100) == (2, ds + 0x10, 7)  # absolute, not EIP-relative
    assert decode("0fae5d08", bits32) == (3, ss + 0x6000 + 8, 4)  # stmxcsr 8(%ebp): SS
    assert decode("0fae1c24", bits32) == (3, ss + 0x5000, 4)  # stmxcsr (%esp): SS
    assert decode("260fae5d08", bits32) == (3, es + 0x6000 + 8, 5)  # an ES override wins
    assert decode("0fae1c8d00000000", bits32) == (3, ds + 0x2000 * 4, 8)  # (,%ecx,4): no base, DS


def test_32_bit_addresses_wrap_at_4_gib() -> None:
    regs = NS(**vars(REGS))
    regs.rbx = 0x1_FFFF_FFF0  # only EBX counts
    operand = decode_memory_operand(bytes.fromhex("0fae5b20"), CpuMode.BITS32, 0, regs, SREGS)  # 0x20(%ebx)
    assert operand.offset == 0x10 and operand.address == 0x40_0010


def test_forms_outside_the_table_are_refused() -> None:
    with pytest.raises(Undecodable, match="16-bit addressing"):
        decode("670fae17", CpuMode.BITS32)
    with pytest.raises(Undecodable, match="16-bit code"):
        decode("0fae17", CpuMode.BITS16)
    with pytest.raises(Undecodable, match="not a two-byte"):
        decode("410fae13", CpuMode.BITS32)  # INC ECX, then ldmxcsr: two instructions
    with pytest.raises(Undecodable, match="register operand"):
        decode("0faed0", CpuMode.BITS64)
    with pytest.raises(GuestFault, match="longer than 15"):
        decode("26" * 12 + "0fae5b20", CpuMode.BITS32)


def test_cpu_mode() -> None:
    long_code = NS(efer=EFER_LMA, cr0=1, cs=NS(l=1, db=0))
    compatibility = NS(efer=EFER_LMA, cr0=1, cs=NS(l=0, db=1))
    protected16 = NS(efer=0, cr0=1, cs=NS(l=0, db=0))
    real = NS(efer=0, cr0=0, cs=NS(l=0, db=1))
    assert [cpu_mode(s) for s in (long_code, compatibility, protected16, real)] == [
        CpuMode.BITS64, CpuMode.BITS32, CpuMode.BITS16, CpuMode.BITS16]  # fmt: skip


def test_segment_checks_in_32_bit_code() -> None:
    sregs = NS(**vars(SREGS))
    operand = decode_memory_operand(bytes.fromhex("0fae1d00100000"), CpuMode.BITS32, 0, REGS, sregs)
    sregs.ds = segment(0x18, limit=0x1002)
    with pytest.raises(GuestFault, match="beyond the limit"):
        check_operand_access(operand, CpuMode.BITS32, sregs, 4, write=True)
    sregs.ds = segment(0x18, seg_type=0x1)  # read-only data
    check_operand_access(operand, CpuMode.BITS32, sregs, 4, write=False)
    with pytest.raises(GuestFault, match="read-only segment"):
        check_operand_access(operand, CpuMode.BITS32, sregs, 4, write=True)
    sregs.ds = segment(0x18)
    sregs.ds.unusable = 1
    with pytest.raises(GuestFault, match="unusable"):
        check_operand_access(operand, CpuMode.BITS32, sregs, 4, write=False)


# --- against GNU as --------------------------------------------------------------------------

REGISTERS64 = [f"%{name}" for name in GPR_NAMES]
REGISTERS32 = ["%eax", "%ecx", "%edx", "%ebx", "%esp", "%ebp", "%esi", "%edi",
               "%r8d", "%r9d", "%r10d", "%r11d", "%r12d", "%r13d", "%r14d", "%r15d"]  # fmt: skip
SEGMENTS = ["es", "cs", "ss", "ds", "fs", "gs"]
RIP = -1  # the base "register" of a RIP-relative form


@dataclasses.dataclass(frozen=True)
class Form:
    """One memory operand: register numbers (GPR_NAMES order), scale, displacement, prefix."""

    address32: bool  # 32-bit address size (in 64-bit mode: the 0x67 prefix)
    base: int | None  # a register number, RIP, or None
    index: int | None
    scale: int
    disp: int | None
    segment: str | None
    code64: bool  # assembled as 64-bit code

    def render(self, store: bool) -> str:
        """The AT&T operand, e.g. ``stmxcsr %fs:-8(%rax,%r12,4)``."""
        names = REGISTERS32 if self.address32 else REGISTERS64
        parts = ""
        if self.base == RIP:
            parts = "(%eip)" if self.address32 else "(%rip)"
        elif self.base is not None or self.index is not None:
            base = names[self.base] if self.base is not None else ""
            index = f",{names[self.index]},{self.scale}" if self.index is not None else ""
            parts = f"({base}{index})"
        disp = "" if self.disp is None else str(self.disp)
        prefix = f"%{self.segment}:" if self.segment else ""
        # Without a register to name the address size, 64-bit code says it with `addr32`.
        addr32 = "addr32 " if self.address32 and not parts and self.code64 else ""
        return f"{addr32}{'stmxcsr' if store else 'ldmxcsr'} {prefix}{disp}{parts}"

    def address(self, mode: CpuMode, regs: NS, sregs: NS, next_rip: int) -> int:
        """Where the operand points (SDM vol. 2, 2.1.5; vol. 3, 3.4 and 3.7.5)."""
        mask = (1 << 32) - 1 if self.address32 or mode is CpuMode.BITS32 else (1 << 64) - 1
        offset = next_rip if self.base == RIP else 0
        if self.base is not None and self.base != RIP:
            offset += int(getattr(regs, GPR_NAMES[self.base])) & mask
        if self.index is not None:
            offset += (int(getattr(regs, GPR_NAMES[self.index])) & mask) * self.scale
        offset = (offset + (self.disp or 0)) & mask
        segment_name = self.segment or ("ss" if self.base in (4, 5) else "ds")
        if mode is CpuMode.BITS64:
            base = getattr(sregs, segment_name).base if segment_name in ("fs", "gs") else 0
            return (base + offset) & ((1 << 64) - 1)
        return (getattr(sregs, segment_name).base + offset) & 0xFFFF_FFFF


@st.composite
def forms(draw: st.DrawFn, mode: CpuMode) -> Form:
    count = 8 if mode is CpuMode.BITS32 else 16
    base = draw(st.sampled_from([None, *range(count)] + ([RIP] if mode is CpuMode.BITS64 else [])))
    index = None if base == RIP else draw(st.sampled_from([None, *[i for i in range(count) if i != 4]]))
    interesting = [0, 1, -1, 0x7F, -0x80, 0x80, -0x81, 0x7FFF_FFFF, -0x8000_0000]
    disp = draw(st.none() | st.sampled_from(interesting) | st.integers(-(2**31), 2**31 - 1))
    if base is None and index is None:
        disp = disp or 0x1234
    return Form(address32=mode is CpuMode.BITS32 or draw(st.booleans()), base=base, index=index,
                scale=draw(st.sampled_from([1, 2, 4, 8])), disp=disp,
                segment=draw(st.none() | st.sampled_from(SEGMENTS)), code64=mode is CpuMode.BITS64)  # fmt: skip


def assemble(lines: list[str], mode: CpuMode) -> tuple[bytes, list[int]]:
    """Assemble ``lines`` with one `as` call (labels around each); return the code and the
    offset of each line, plus the end."""
    bits32 = mode is CpuMode.BITS32
    with tempfile.TemporaryDirectory() as tmp:
        source, obj, flat = Path(tmp) / "forms.S", Path(tmp) / "forms.o", Path(tmp) / "forms.bin"
        labelled = "".join(f"form_{i}: {line}\n" for i, line in enumerate(lines))
        source.write_text(f".code{32 if bits32 else 64}\n{labelled}form_{len(lines)}:\n")
        subprocess.run(["as", "--32" if bits32 else "--64", "-o", str(obj), str(source)], check=True,
                       capture_output=True)  # fmt: skip
        table = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
        subprocess.run(["ld", "-m", "elf_i386" if bits32 else "elf_x86_64", "--oformat", "binary", "-Ttext", "0",
                        "-e", "0", "-o", str(flat), str(obj)], check=True, capture_output=True)  # fmt: skip
        code = flat.read_bytes()
    offsets = {int(name[5:]): int(value, 16) for value, _, name in (line.split() for line in table.splitlines())}
    return code, [offsets[i] for i in range(len(lines) + 1)]


def register_files(mode: CpuMode) -> st.SearchStrategy[tuple[NS, NS, int]]:
    """General-purpose registers, segment bases and where the code sits."""
    top = 2**64 - 1 if mode is CpuMode.BITS64 else 2**32 - 1
    value = st.integers(0, top) | st.sampled_from([0, 1, top, top >> 1, 0xFFFF_FFFF, 0x1_0000_0000 & top])
    regs = st.lists(value, min_size=16, max_size=16).map(lambda vs: NS(**dict(zip(GPR_NAMES, vs, strict=True))))
    sregs = st.lists(value, min_size=6, max_size=6).map(
        lambda bs: NS(**{name: segment(0, base=b) for name, b in zip(SEGMENTS, bs, strict=True)}))  # fmt: skip
    return st.tuples(regs, sregs, st.integers(0, top - 0x10000))


BATCH = 32


@pytest.mark.parametrize("mode", [CpuMode.BITS64, CpuMode.BITS32], ids=["64-bit", "32-bit"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoder_agrees_with_gnu_as(binutils: None, mode: CpuMode, data: st.DataObject) -> None:
    """ModRM/SIB/displacement/REX/segment/address-size forms, generated and assembled by
    `as`: the decoder finds each instruction's length and the address its operand names."""
    batch = data.draw(st.lists(st.tuples(forms(mode), st.booleans()), min_size=BATCH, max_size=BATCH))
    regs, sregs, code_base = data.draw(register_files(mode))
    code, offsets = assemble([form.render(store) for form, store in batch], mode)
    for (form, store), start, end in zip(batch, offsets, offsets[1:], strict=False):
        line = f"{form.render(store)} = {code[start:end].hex(' ')}"
        operand = decode_memory_operand(code[start:], mode, code_base + start, regs, sregs)
        assert (operand.length, operand.reg) == (end - start, 3 if store else 2), line
        assert operand.address == form.address(mode, regs, sregs, code_base + end), line
