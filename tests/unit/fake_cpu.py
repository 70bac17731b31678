"""A fake vCPU whose state lives in Python objects, and guest page tables to go with it."""

from __future__ import annotations

import struct
from types import SimpleNamespace as NS
from typing import Any

from trivmm.cpu.arch import CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_PAE, EFER_LMA, EFER_LME, EFER_SCE, GPR_NAMES, Msr
from trivmm.memory import GuestMemory

KERNEL_CS, KERNEL_SS, USER_CS, USER_SS = 0x10, 0x18, 0x2B, 0x23
IDT, STACK, LSTAR = 0x3000, 0x8000, 0x20_0000
TABLES = 0x60_0000  # page tables are allocated from here up
MEMORY_SIZE = 8 << 20
PRESENT, WRITABLE, USER, ACCESSED, DIRTY, LARGE = 1, 2, 4, 0x20, 0x40, 0x80
NO_EXECUTE = 1 << 63


def segment(selector: int, *, base: int = 0, limit: int = 0xFFFF_FFFF, seg_type: int = 0x3, long: bool = False,
            db: bool = True) -> NS:  # fmt: skip
    """A present, usable kvm_segment-like object (data read/write by default)."""
    return NS(selector=selector, base=base, limit=limit, type=seg_type, present=1, dpl=selector & 3, s=1, g=1,
              l=int(long), db=int(db and not long), unusable=0, avl=0)  # fmt: skip


class PageTables:
    """4-level tables in guest memory mapping the first 8 MiB one to one with 4 KiB pages:
    upper levels present, writable and user; each page supervisor read/write until changed."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.next_free = TABLES
        self.root = self._table()
        for address in range(0, MEMORY_SIZE, 0x1000):
            self.map(address, address, PRESENT | WRITABLE)

    def _table(self) -> int:
        address = self.next_free
        self.next_free += 0x1000
        self.memory.fill(address, 0x1000)
        return address

    def _entry(self, address: int) -> int:
        """The physical address of the PTE for ``address``, creating tables on the way."""
        table = self.root
        for shift in (39, 30, 21):
            slot = table + ((address >> shift) & 511) * 8
            entry = self.memory.read_u64(slot)
            if not entry & PRESENT:
                entry = self._table() | PRESENT | WRITABLE | USER
                self.memory.write_u64(slot, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        return table + ((address >> 12) & 511) * 8

    def map(self, address: int, physical: int, flags: int) -> None:
        self.memory.write_u64(self._entry(address), physical | flags)

    def flags(self, address: int, *, set_: int = 0, clear: int = 0) -> int:
        """Change a page's PTE flags; return the entry."""
        slot = self._entry(address)
        entry = (self.memory.read_u64(slot) | set_) & ~clear
        self.memory.write_u64(slot, entry)
        return entry

    def pte(self, address: int) -> int:
        return self.memory.read_u64(self._entry(address))


class FakeVcpu:
    """A long-mode vCPU at CPL0 over ``PageTables``; records what the VMM asks of KVM."""

    index = 0

    def __init__(self, memory: GuestMemory, tables: PageTables, rip: int = 0x10_0000, cs: int = KERNEL_CS) -> None:
        self.memory = memory
        self.regs = NS(rip=rip, rflags=0x202, **{name: 0 for name in GPR_NAMES})
        self.regs.rsp = STACK
        self.sregs = NS(cs=segment(cs, seg_type=0xB, long=True), ss=segment(KERNEL_SS), ds=segment(0),
                        es=segment(0), fs=segment(0), gs=segment(0), tr=segment(0x30, seg_type=0xB),
                        idt=NS(base=IDT, limit=0xFFF), cr0=CR0_PE | CR0_WP | CR0_PG, cr2=0, cr3=tables.root,
                        cr4=CR4_PAE | CR4_OSFXSR, efer=EFER_SCE | EFER_LME | EFER_LMA)  # fmt: skip
        self.mxcsr = 0x1F80
        self.fsw = 0
        self.msrs = {Msr.STAR: KERNEL_CS << 32, Msr.LSTAR: LSTAR, Msr.FMASK: 0x47700}
        self.debug: list[tuple[int, list[int] | None]] = []
        self.injected: list[tuple[int, int | None]] = []
        self.dr6 = 0xFFFF0FF0

    def user_mode(self) -> None:
        self.sregs.cs = segment(USER_CS, seg_type=0xB, long=True)
        self.sregs.ss = segment(USER_SS)

    def get_regs(self) -> NS:
        return NS(**vars(self.regs))

    def set_regs(self, regs: NS) -> None:
        self.regs = regs

    def get_sregs(self) -> NS:
        return self.sregs

    def set_sregs(self, sregs: NS) -> None:
        self.sregs = sregs

    def get_fsw(self) -> int:
        return self.fsw

    def get_mxcsr(self) -> int:
        return self.mxcsr

    def set_mxcsr(self, value: int) -> None:
        self.mxcsr = value

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        return {i: self.msrs[i] for i in indices if i in self.msrs}

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        self.debug.append((control, debugreg))

    def get_debugregs(self) -> NS:
        return NS(dr6=self.dr6)

    def set_dr6(self, value: int) -> None:
        self.dr6 = value

    def set_cr2(self, address: int) -> None:
        self.sregs.cr2 = address

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        self.injected.append((vector, error_code))


def idt_gate(memory: GuestMemory, vector: int, handler: int, ist: int = 0) -> None:
    """A 64-bit interrupt gate, DPL 0, in the fake IDT."""
    memory.write(IDT + 16 * vector, struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, ist, 0x8E,
                                                (handler >> 16) & 0xFFFF, handler >> 32, 0))  # fmt: skip


def emulation_failure(code: bytes) -> Any:
    """A kvm_run-like object for an emulation failure that carries the instruction bytes."""
    return NS(emulation_failure=NS(ndata=1, flags=1, insn_size=len(code), insn_bytes=list(code)))


def debug_exit(pc: int, dr6: int) -> Any:
    return NS(debug=NS(arch=NS(pc=pc, dr6=dr6, exception=1)))
