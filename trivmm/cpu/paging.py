"""Guest-virtual memory as the guest's CPU sees it: page walks with permission checks.

An emulator that writes guest memory on the guest's behalf must refuse what the CPU would
refuse. ``KVM_TRANSLATE`` cannot say: on x86 its ``writeable`` and ``usermode`` answers are
constants. So the VMM walks the guest's page tables itself, from CR3, in the paging mode
CR0/CR4/EFER select (none, 32-bit, PAE, 4- or 5-level), and checks each access as the SDM
(vol. 3, 4.6) says: present bits, R/W at every level (for supervisor writes only with
CR0.WP), U/S at every level against the access's privilege, SMAP and SMEP, and NX (XD). A
check that fails raises ``PageFault`` with the error code and address the CPU would report;
an access that passes sets the accessed bits it walked and, for a write, the page's dirty
bit, as the CPU does. Not modelled: protection keys (CR4.PKE), reserved physical-address
bits above the guest's MAXPHYADDR, and the TLB (the walk always sees memory as it is now).
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from trivmm.cpu.arch import (
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_NXE,
    PF_FETCH,
    PF_PRESENT,
    PF_RESERVED,
    PF_USER,
    PF_WRITE,
    Vector,
)
from trivmm.kvm.vcpu import Vcpu
from trivmm.memory import GuestMemory

__all__ = ["AccessKind", "Access", "Paging", "GuestFault", "PageFault", "GuestView", "translate",
           "SUPERVISOR_READ", "SUPERVISOR_WRITE"]  # fmt: skip

PAGE_SIZE = 0x1000
_PRESENT, _WRITABLE, _USER, _ACCESSED, _DIRTY, _LARGE = 1, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
_NO_EXECUTE = 1 << 63
_ADDRESS_BITS = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a 64-bit entry
_U64, _U32 = (1 << 64) - 1, (1 << 32) - 1


class AccessKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


@attrs.frozen
class Access:
    """One memory access as the CPU classifies it.

    ``user``: a user-mode access (made at CPL 3 and not an implicit supervisor access).
    ``implicit``: a supervisor-mode access whatever the CPL (descriptor tables, exception
    frames); RFLAGS.AC never lets it reach a user page under SMAP. ``ac``: RFLAGS.AC at the
    access, which lets an explicit supervisor data access reach user pages under SMAP.
    """

    kind: AccessKind
    user: bool = False
    implicit: bool = False
    ac: bool = False


SUPERVISOR_READ = Access(AccessKind.READ, implicit=True)
SUPERVISOR_WRITE = Access(AccessKind.WRITE, implicit=True)


class GuestFault(Exception):
    """An exception the guest's CPU would raise at the instruction being emulated."""

    def __init__(self, vector: int, error_code: int | None = None, why: str = "") -> None:
        try:
            name = Vector(vector).name
        except ValueError:
            name = str(vector)
        code = "" if error_code is None else f"({error_code:#x})"
        super().__init__(f"#{name}{code}" + (f": {why}" if why else ""))
        self.vector = vector
        self.error_code = error_code


class PageFault(GuestFault):
    """#PF: ``address`` goes to CR2, ``error_code`` is what the CPU would push."""

    def __init__(self, address: int, error_code: int, why: str) -> None:
        super().__init__(Vector.PF, error_code, f"{why} at {address:#x}")
        self.address = address


@attrs.frozen
class Paging:
    """What decides translation on one vCPU: the paging mode and its control bits."""

    levels: int  # 0: paging off; 2: 32-bit; 3: PAE; 4 or 5: IA-32e (4- or 5-level)
    root: int  # physical address of the top-level table
    write_protect: bool = True  # CR0.WP
    large_pages_32: bool = False  # CR4.PSE (32-bit paging only)
    no_execute: bool = False  # EFER.NXE
    smep: bool = False
    smap: bool = False

    @classmethod
    def of(cls, sregs: Any) -> Paging:
        cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
        if not cr0 & CR0_PG:
            return cls(0, 0)
        if efer & EFER_LMA:
            levels, root = (5 if cr4 & CR4_LA57 else 4), sregs.cr3 & _ADDRESS_BITS
        elif cr4 & CR4_PAE:
            levels, root = 3, sregs.cr3 & 0xFFFF_FFE0
        else:
            levels, root = 2, sregs.cr3 & 0xFFFF_F000
        return cls(levels, root, write_protect=bool(cr0 & CR0_WP), large_pages_32=bool(cr4 & CR4_PSE),
                   no_execute=bool(efer & EFER_NXE) and levels >= 3, smep=bool(cr4 & CR4_SMEP),
                   smap=bool(cr4 & CR4_SMAP))  # fmt: skip

    @property
    def address_mask(self) -> int:
        """Linear addresses wrap at 4 GiB outside IA-32e paging."""
        return _U64 if self.levels >= 4 else _U32


@attrs.frozen
class _Walk:
    """A translation that passed its checks, and the entries to mark accessed/dirty."""

    physical: int
    entries: tuple[tuple[int, int], ...]  # (physical address, size in bytes) of each entry walked
    leaf: int  # index in ``entries`` of the entry that mapped the page


def _error_code(paging: Paging, access: Access, present: bool, reserved: bool = False) -> int:
    code = (PF_PRESENT if present or reserved else 0) | (PF_RESERVED if reserved else 0)
    code |= PF_WRITE if access.kind is AccessKind.WRITE else 0
    code |= PF_USER if access.user else 0
    if access.kind is AccessKind.FETCH and (paging.no_execute or paging.smep):
        code |= PF_FETCH
    return code


def _walk(memory: GuestMemory, paging: Paging, address: int, access: Access) -> _Walk:
    """Walk the tables for ``address``; raise ``PageFault`` where the CPU would."""
    if paging.levels == 0:
        return _Walk(address & _U32, (), -1)
    entries: list[tuple[int, int]] = []
    writable = user = True
    no_execute = False

    def fault(why: str, present: bool = True, reserved: bool = False) -> PageFault:
        return PageFault(address, _error_code(paging, access, present, reserved), why)

    shifts: tuple[int, ...]
    if paging.levels == 2:  # 32-bit paging: 4-byte entries, 10-bit indices
        table, shifts, size = paging.root, (22, 12), 4
    elif paging.levels == 3:  # PAE: a 4-entry PDPT that carries no permissions
        pdpte_address = paging.root + ((address >> 30) & 3) * 8
        pdpte = memory.read_u64(pdpte_address)
        if not pdpte & _PRESENT:
            raise fault("PDPTE not present", present=False)
        table, shifts, size = pdpte & _ADDRESS_BITS, (21, 12), 8
    else:
        table, shifts, size = paging.root, (48, 39, 30, 21, 12)[5 - paging.levels :], 8
    index_bits = 10 if size == 4 else 9
    for depth, shift in enumerate(shifts):
        entry_address = table + ((address >> shift) & ((1 << index_bits) - 1)) * size
        entry = memory.read_u32(entry_address) if size == 4 else memory.read_u64(entry_address)
        entries.append((entry_address, size))
        if not entry & _PRESENT:
            raise fault(f"not present (level {len(shifts) - depth})", present=False)
        if entry & _NO_EXECUTE and size == 8:
            if not paging.no_execute:
                raise fault("XD bit set while EFER.NXE is off", reserved=True)
            no_execute = True
        writable = writable and bool(entry & _WRITABLE)
        user = user and bool(entry & _USER)
        large = bool(entry & _LARGE) and shift != 12
        if large and shift >= 39:
            raise fault("PS bit set in a PML4E/PML5E", reserved=True)
        if shift == 12 or (large and (size == 8 or paging.large_pages_32)):
            page_size = 1 << shift
            if size == 4 and large:  # a 4 MiB page: PSE-36 puts address bits 39:32 in 20:13
                frame = (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32)
            else:
                frame = entry & (_ADDRESS_BITS if size == 8 else 0xFFFF_F000) & ~(page_size - 1)
            physical = frame | (address & (page_size - 1))
            break
        table = entry & (_ADDRESS_BITS if size == 8 else 0xFFFF_F000)
    _check_permissions(paging, access, writable, user, no_execute, fault)
    return _Walk(physical, tuple(entries), len(entries) - 1)


def _check_permissions(paging: Paging, access: Access, writable: bool, user_page: bool, no_execute: bool,
                       fault: Any) -> None:  # fmt: skip
    kind = access.kind
    if access.user:
        if not user_page:
            raise fault("user-mode access to a supervisor page")
        if kind is AccessKind.WRITE and not writable:
            raise fault("user-mode write to a read-only page")
        if kind is AccessKind.FETCH and no_execute:
            raise fault("fetch from a no-execute page")
        return
    if kind is AccessKind.FETCH:
        if no_execute:
            raise fault("fetch from a no-execute page")
        if paging.smep and user_page:
            raise fault("supervisor fetch from a user page with SMEP on")
        return
    if paging.smap and user_page and (access.implicit or not access.ac):
        raise fault("supervisor access to a user page with SMAP on and RFLAGS.AC clear")
    if kind is AccessKind.WRITE and not writable and paging.write_protect:
        raise fault("supervisor write to a read-only page with CR0.WP on")


def _mark(memory: GuestMemory, paging: Paging, walk: _Walk, write: bool) -> None:
    """Set the accessed bits walked and, for a write, the dirty bit of the leaf.

    Only for accesses the VMM performs in the guest's stead (an emulated store, an
    exception frame): a CPU sets these bits atomically, and this read-then-write is not
    atomic against another vCPU rewriting the entry. It writes only when a bit is missing,
    which for the kernel pages these accesses touch is almost never. Reads that only check
    something (the SYSCALL proof, instruction bytes, the IDT) pass ``mark=False`` and never
    write a page-table entry."""
    for i, (entry_address, size) in enumerate(walk.entries):
        bits = _ACCESSED | (_DIRTY if write and i == walk.leaf else 0)
        if size == 4:
            entry = memory.read_u32(entry_address)
            if entry & bits != bits:
                memory.write_u32(entry_address, entry | bits)
        else:
            entry = memory.read_u64(entry_address)
            if entry & bits != bits:
                memory.write_u64(entry_address, entry | bits)


def translate(memory: GuestMemory, paging: Paging, address: int, access: Access) -> int:
    """The physical address ``access`` at ``address`` reaches; raises ``PageFault``.
    Marks nothing: use ``GuestView`` for accesses that happen."""
    return _walk(memory, paging, address, access).physical


class GuestView:
    """Guest-virtual reads and writes for one vCPU, checked as its CPU would check them.

    An access spanning pages is checked on every page before any byte moves, so a fault
    leaves memory as it was. Addresses that are not RAM raise ``GuestMemoryError``.
    """

    def __init__(self, vcpu: Vcpu, memory: GuestMemory) -> None:
        self.vcpu = vcpu
        self.memory = memory

    def paging(self) -> Paging:
        return Paging.of(self.vcpu.get_sregs())

    def _pieces(self, address: int, length: int, access: Access, paging: Paging) -> list[tuple[_Walk, int]]:
        pieces = []
        mask = paging.address_mask
        address &= mask
        while length:
            chunk = min(length, PAGE_SIZE - (address & (PAGE_SIZE - 1)))
            pieces.append((_walk(self.memory, paging, address, access), chunk))
            address, length = (address + chunk) & mask, length - chunk
        return pieces

    def read(self, address: int, length: int, access: Access = SUPERVISOR_READ,
             paging: Paging | None = None, *, mark: bool = True) -> bytes:  # fmt: skip
        """Read as the CPU would; ``mark=False`` for a look that the guest did not make
        (no accessed bit is set, no page-table entry written)."""
        paging = paging if paging is not None else self.paging()
        pieces = self._pieces(address, length, access, paging)
        out = bytearray()
        for walk, chunk in pieces:
            out += self.memory.read(walk.physical, chunk)
            if mark:
                _mark(self.memory, paging, walk, write=False)
        return bytes(out)

    def write(self, address: int, data: bytes, access: Access = SUPERVISOR_WRITE,
              paging: Paging | None = None) -> None:  # fmt: skip
        paging = paging if paging is not None else self.paging()
        pieces = self._pieces(address, len(data), access, paging)
        for walk, chunk in pieces:
            self.memory.write(walk.physical, data[:chunk])
            _mark(self.memory, paging, walk, write=True)
            data = data[chunk:]
