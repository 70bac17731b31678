"""Guest page walks: every paging mode, the permission rules, A/D bits, all-or-nothing writes."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace as NS

import pytest

from tests.unit.fake_cpu import ACCESSED, DIRTY, LARGE, NO_EXECUTE, PRESENT, USER, WRITABLE, FakeVcpu, PageTables
from trivmm.cpu.arch import CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_NXE
from trivmm.cpu.paging import Access, AccessKind, GuestView, PageFault, Paging, translate
from trivmm.memory import GuestMemory

READ, WRITE, FETCH = (Access(kind) for kind in AccessKind)
USER_READ, USER_WRITE, USER_FETCH = (Access(kind, user=True) for kind in AccessKind)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.from_ranges([(0, 8 << 20)])
    yield mem
    mem.close()


def sregs(cr3: int, *, cr0: int = CR0_PG | CR0_WP | 1, cr4: int = 0, efer: int = 0) -> NS:
    return NS(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)


def fault(memory: GuestMemory, paging: Paging, address: int, access: Access) -> int:
    with pytest.raises(PageFault) as info:
        translate(memory, paging, address, access)
    assert info.value.address == address
    return info.value.error_code


def test_paging_off_is_identity_within_4_gib(memory: GuestMemory) -> None:
    paging = Paging.of(sregs(0, cr0=1))
    assert translate(memory, paging, 0x1234_5678, USER_WRITE) == 0x1234_5678


def test_32_bit_paging_with_a_4_mib_page(memory: GuestMemory) -> None:
    memory.write_u32(0x1000 + (0x0040_0000 >> 22) * 4, 0x0040_0000 | LARGE | PRESENT | WRITABLE | USER)
    memory.write_u32(0x1000 + (0x0080_0000 >> 22) * 4, 0x2000 | PRESENT | WRITABLE)  # a page table
    memory.write_u32(0x2000 + 5 * 4, 0x0070_0000 | PRESENT)  # its page 5: read-only, supervisor
    paging = Paging.of(sregs(0x1000, cr4=CR4_PSE))
    assert paging.levels == 2
    assert translate(memory, paging, 0x0041_2345, USER_WRITE) == 0x0041_2345
    assert translate(memory, paging, 0x0080_5123, READ) == 0x0070_0123
    assert fault(memory, paging, 0x0080_5123, WRITE) == 0x3
    assert fault(memory, paging, 0x0080_5123, USER_READ) == 0x5
    assert fault(memory, paging, 0x00C0_0000, READ) == 0x0


def test_pae_paging_with_a_2_mib_page_and_nx(memory: GuestMemory) -> None:
    memory.write_u64(0x1000, 0x2000 | PRESENT)  # PDPTE 0: no permission bits in PAE
    memory.write_u64(0x2000 + 2 * 8, 0x0040_0000 | LARGE | PRESENT | WRITABLE | USER | NO_EXECUTE)
    paging = Paging.of(sregs(0x1000, cr4=CR4_PAE, efer=EFER_NXE))
    assert paging.levels == 3
    assert translate(memory, paging, 0x0045_6789, USER_WRITE) == 0x0045_6789
    assert fault(memory, paging, 0x0045_6789, USER_FETCH) == 0x15  # P | U | I
    assert fault(memory, paging, 0x4000_0000, READ) == 0x0  # PDPTE 1 absent


def test_xd_without_nxe_is_a_reserved_bit(memory: GuestMemory) -> None:
    memory.write_u64(0x1000, 0x2000 | PRESENT)
    memory.write_u64(0x2000, 0x0 | LARGE | PRESENT | NO_EXECUTE)
    assert fault(memory, Paging.of(sregs(0x1000, cr4=CR4_PAE)), 0x1000, READ) == 0x9  # P | RSVD


def test_4_level_paging_with_a_1_gib_page(memory: GuestMemory) -> None:
    memory.write_u64(0x1000 + 511 * 8, 0x2000 | PRESENT | WRITABLE)  # PML4[511]
    memory.write_u64(0x2000 + 510 * 8, 0x4000_0000 | LARGE | PRESENT | WRITABLE)  # a 1 GiB page
    paging = Paging.of(sregs(0x1000, cr4=CR4_PAE, efer=EFER_LMA))
    assert translate(memory, paging, 0xFFFF_FFFF_8012_3456, WRITE) == 0x4012_3456


def test_5_level_paging_walks_one_more_table(memory: GuestMemory) -> None:
    memory.write_u64(0x1000 + 1 * 8, 0x2000 | PRESENT | WRITABLE | USER)  # PML5[1]
    memory.write_u64(0x2000, 0x3000 | PRESENT | WRITABLE | USER)
    memory.write_u64(0x3000, 0x0 | LARGE | PRESENT | WRITABLE | USER)  # 1 GiB at 0
    paging = Paging.of(sregs(0x1000, cr4=CR4_PAE | CR4_LA57, efer=EFER_LMA))
    assert paging.levels == 5
    assert translate(memory, paging, (1 << 48) | 0x5000, USER_READ) == 0x5000


def test_a_ps_bit_in_the_pml4_is_a_reserved_bit(memory: GuestMemory) -> None:
    memory.write_u64(0x1000, 0 | LARGE | PRESENT)
    assert fault(memory, Paging.of(sregs(0x1000, cr4=CR4_PAE, efer=EFER_LMA)), 0x1000, READ) == 0x9


def test_supervisor_rules(memory: GuestMemory) -> None:
    tables = PageTables(memory)
    tables.flags(0x1000, set_=USER)  # a user page
    tables.flags(0x2000, clear=WRITABLE)  # a read-only supervisor page
    base = sregs(tables.root, cr4=CR4_PAE, efer=EFER_LMA)
    paging = Paging.of(base)
    assert translate(memory, paging, 0x1000, WRITE) == 0x1000  # no SMAP: the kernel may touch user pages
    assert fault(memory, paging, 0x2000, WRITE) == 0x3  # CR0.WP
    assert translate(memory, Paging.of(sregs(tables.root, cr0=CR0_PG | 1, cr4=CR4_PAE, efer=EFER_LMA)), 0x2000,
                     WRITE) == 0x2000  # fmt: skip
    smap_smep = Paging.of(sregs(tables.root, cr4=CR4_PAE | (3 << 20), efer=EFER_LMA))
    assert fault(memory, smap_smep, 0x1000, READ) == 0x1
    assert translate(memory, smap_smep, 0x1000, Access(AccessKind.READ, ac=True)) == 0x1000
    assert fault(memory, smap_smep, 0x1000, Access(AccessKind.READ, implicit=True, ac=True)) == 0x1
    assert fault(memory, smap_smep, 0x1000, FETCH) == 0x11  # SMEP: P | I


def test_a_write_across_pages_is_all_or_nothing_and_marks_dirty(memory: GuestMemory) -> None:
    tables = PageTables(memory)
    tables.flags(0x3000, clear=PRESENT)
    view = GuestView(FakeVcpu(memory, tables), memory)  # type: ignore[arg-type]
    with pytest.raises(PageFault) as info:
        view.write(0x2FFE, b"abcd")
    assert info.value.address == 0x3000 and memory.read(0x2FFE, 2) == b"\0\0"
    assert not tables.pte(0x2000) & (ACCESSED | DIRTY)
    view.write(0x1FFE, b"abcd")
    assert memory.read(0x1FFE, 4) == b"abcd"
    assert tables.pte(0x1000) & (ACCESSED | DIRTY) == ACCESSED | DIRTY
    assert tables.pte(0x2000) & (ACCESSED | DIRTY) == ACCESSED | DIRTY
    assert view.read(0x4000, 2) == b"\0\0" and tables.pte(0x4000) & (ACCESSED | DIRTY) == ACCESSED
