"""What VM construction computes once per process instead of once per VM: each cache gives
what the per-VM code gave, holds only immutable values, and is keyed on all it depends on."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from trivmm.boot import layout
from trivmm.boot.acpi import AcpiTables, acpi_tables
from trivmm.boot.e820 import memory_map
from trivmm.boot.elf import ElfImage
from trivmm.boot.loader import BootEntry, BootProtocol, _memory_map, _page_tables, load_kernel
from trivmm.boot.mptable import build_mptable
from trivmm.cpu import setup
from trivmm.cpu.templates import TEMPLATES, detect_host_template, get_template
from trivmm.guest.builtin import builtin_guest
from trivmm.kvm import _ioctl
from trivmm.kvm._ffi import ffi
from trivmm.kvm.system import CpuidEntry, Kvm
from trivmm.kvm.vcpu import _pack_cpuid
from trivmm.memory import GuestMemory


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.from_ranges(layout.ram_ranges(64 << 20))
    yield mem
    mem.close()


def test_identity_map_is_the_same_bytes_for_every_guest(memory: GuestMemory) -> None:
    assert _page_tables() is _page_tables()
    load_kernel(memory, builtin_guest(), protocol="linux64")
    assert memory.read_u64(layout.PML4) == layout.PDPT | 0x3
    for i in range(layout.PD_PAGES):
        assert memory.read_u64(layout.PDPT + 8 * i) == (layout.PD + i * 0x1000) | 0x3
    for j in (0, 1, 511, 512, 2047):
        assert memory.read_u64(layout.PD + 8 * j) == (j << 21) | 0x83


@pytest.mark.parametrize(("protocol", "code"), [("linux64", 0x00AF_9B00_0000_FFFF), ("pvh", 0x00CF_9B00_0000_FFFF)])
def test_gdt_and_the_idt_over_its_last_entry(protocol: str, code: int, memory: GuestMemory) -> None:
    """As before: the GDT's five entries, then the 8-byte empty IDT at 0x520 written over the
    fifth (the TSS descriptor, which the vCPU's TR already holds)."""
    memory.fill(0x500, 0x100, 0xAA)
    load_kernel(memory, builtin_guest(), protocol=protocol)
    assert struct.unpack("<5Q", memory.read(layout.GDT, 40)) == (0, 0, code, 0x00CF_9300_0000_FFFF, 0)
    assert memory.read(layout.GDT + 40, 8) == b"\xaa" * 8


def test_mp_and_acpi_tables_are_built_once_per_vcpu_count() -> None:
    assert build_mptable(2) is build_mptable(2) and build_mptable(2) != build_mptable(3)
    tables = acpi_tables(2)
    assert tables is acpi_tables(2) and tables is not acpi_tables(3)
    assert isinstance(tables.blobs, tuple) and all(isinstance(blob, bytes) for _, blob in tables.blobs)
    assert tables.blobs == AcpiTables(2).blobs and tables.rsdp_address == layout.ACPI_START
    with pytest.raises(AttributeError, match="immutable"):
        tables.blobs = ()  # type: ignore[misc]


def test_memory_map_is_kept_per_ram_layout() -> None:
    ram = tuple(layout.ram_ranges(5 << 30))
    e820, pvh = _memory_map(ram)
    assert _memory_map(ram)[0] is e820 and e820 == tuple(memory_map(list(ram)))
    assert pvh == b"".join(struct.pack("<QQII", e.address, e.size, e.type, 0) for e in e820)
    assert _memory_map(tuple(layout.ram_ranges(64 << 20)))[0] != e820


def test_small_elf_images_are_parsed_once() -> None:
    kernel = builtin_guest()
    assert builtin_guest() is kernel  # read once per process
    assert ElfImage.parse(kernel) is ElfImage.parse(kernel)
    copy = bytes(bytearray(kernel))  # equal, but another object: parsed on its own
    assert copy is not kernel and ElfImage.parse(copy) == ElfImage.parse(kernel)
    assert ElfImage.parse(bytearray(kernel)) is not ElfImage.parse(bytearray(kernel))  # mutable: never kept


def test_large_elf_images_are_not_kept() -> None:
    big = builtin_guest() + bytes(2 << 20)
    assert ElfImage.parse(big) is not ElfImage.parse(big)


def test_auto_template_is_detected_once() -> None:
    assert get_template("auto") is get_template("auto") is detect_host_template()
    assert get_template("host") is TEMPLATES["host"]


# --- CPUID -----------------------------------------------------------------------------------------
BASE = (
    CpuidEntry(0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65),
    CpuidEntry(1, 0, 0, 0xA00F11, 0x0800, 0xFEDA3203 | (1 << 26), 0x178BFBFF),
    CpuidEntry(7, 0, 1, 0, 0xFFFF_FFFF, 0xFFFF_FFFF, 0),
    CpuidEntry(0xB, 0, 1, 1, 1, 0x100, 0),
    CpuidEntry(0xD, 0, 1, 7, 0x340, 0x340, 0),
)


@pytest.mark.parametrize("template", list(TEMPLATES.values()), ids=list(TEMPLATES))
def test_vcpu_cpuid_is_kept_per_table_template_index_and_count(template: Any) -> None:
    table = setup.vcpu_cpuid(BASE, template, 1, 3)
    assert isinstance(table, tuple) and setup.vcpu_cpuid(BASE, template, 1, 3) is table
    assert table == setup.vcpu_cpuid(list(BASE), template, 1, 3)  # a list is not cached, same answer
    leaf1 = next(e for e in table if e.function == 1)
    assert leaf1.ebx >> 24 == 1 and (leaf1.ebx >> 16) & 0xFF == 3 and leaf1.ecx >> 31 == 1
    assert next(e for e in table if e.function == 0xB).edx == 1
    other = setup.vcpu_cpuid(BASE, template, 2, 3)
    assert next(e for e in other if e.function == 1).ebx >> 24 == 2
    assert setup.vcpu_cpuid(BASE, template, 1, 4) != table  # the vCPU count is in leaf 1
    assert list(table) == [e for e in setup._vcpu_cpuid(BASE, template, 1, 3)]
    if template.name == "nested-pvm":
        assert not any(e.function == 0xD for e in table) and not leaf1.ecx & (1 << 26)


def test_vcpu_cpuid_of_an_equal_but_other_table_is_not_taken_from_the_cache() -> None:
    template = TEMPLATES["host"]
    first = setup.vcpu_cpuid(BASE, template, 0, 1)
    changed = (BASE[0], CpuidEntry(1, 0, 0, 0xA00F11, 0x0800, 0, 0), *BASE[2:])
    assert setup.vcpu_cpuid(changed, template, 0, 1) != first


def test_packed_cpuid_is_what_kvm_cpuid2_holds() -> None:
    """The bytes KVM_SET_CPUID2 gets are those of a struct kvm_cpuid2 filled field by field."""
    table = setup.vcpu_cpuid(BASE, TEMPLATES["host"], 0, 1)
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(table), "entries": len(table)})
    for i, e in enumerate(table):
        c = cpuid.entries[i]
        c.function, c.index, c.flags, c.eax, c.ebx, c.ecx, c.edx = (e.function, e.index, e.flags, e.eax, e.ebx,
                                                                    e.ecx, e.edx)  # fmt: skip
    expected = bytes(ffi.buffer(cpuid, ffi.sizeof("struct kvm_cpuid2") + len(table) * 40))
    assert _pack_cpuid(table) == expected and _pack_cpuid(table) is _pack_cpuid(table)
    assert _pack_cpuid(list(table)) == expected


# --- the boot vCPU's registers ---------------------------------------------------------------------
class RegisterVcpu:
    """A vCPU whose KVM_GET_SREGS answers a struct full of 0xA5 and that keeps what is set."""

    def __init__(self) -> None:
        self.sregs_set: Any = None
        self.regs_set: Any = None

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ffi.buffer(sregs)[:] = b"\xa5" * ffi.sizeof("struct kvm_sregs")
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        self.sregs_set = bytes(ffi.buffer(sregs))

    def set_regs(self, regs: Any) -> None:
        self.regs_set = bytes(ffi.buffer(regs))


def reference_entry_state(entry: BootEntry) -> tuple[bytes, bytes]:
    """The entry state as set_entry_state set it field by field before its segments became a
    byte template (and before it stopped reading the registers it overwrites)."""
    sregs = RegisterVcpu().get_sregs()
    long_mode = entry.protocol is BootProtocol.LINUX64
    setup._segment(sregs.cs, 0x10, 0xB, code64=long_mode)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        setup._segment(seg, 0x18, 0x3)
    setup._segment(sregs.tr, 0x20, 0xB)
    sregs.tr.s, sregs.tr.limit, sregs.tr.g = 0, 0xFFFFF, 0
    sregs.gdt.base, sregs.gdt.limit = layout.GDT, 39
    sregs.idt.base, sregs.idt.limit = layout.IDT, 7
    if long_mode:
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x8005_0033, layout.PML4, 0x20, 0x500
    else:
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x11, 0, 0, 0
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss, sregs.tr):
        seg.padding = 0  # the template writes whole segments: their padding (KVM ignores it) is 0
    regs = ffi.new("struct kvm_regs *")
    regs.rip, regs.rflags, regs.rsp, regs.rbp = entry.rip, 0x2, layout.BOOT_STACK, layout.BOOT_STACK
    if long_mode:
        regs.rsi = entry.boot_info
    else:
        regs.rbx = entry.boot_info
    return bytes(ffi.buffer(sregs)), bytes(ffi.buffer(regs))


@pytest.mark.parametrize("entry", [
    BootEntry(BootProtocol.LINUX64, 0x100200, layout.ZERO_PAGE, 0x500000, None),
    BootEntry(BootProtocol.PVH, 0x1000600, layout.PVH_START_INFO, 0x500000, None),
], ids=["linux64", "pvh"])  # fmt: skip
def test_entry_state_is_what_it_was_field_by_field(entry: BootEntry) -> None:
    vcpu = RegisterVcpu()
    setup.set_entry_state(vcpu, entry)  # type: ignore[arg-type]
    sregs, regs = reference_entry_state(entry)
    assert vcpu.sregs_set == sregs and vcpu.regs_set == regs
    ldt = ffi.offsetof("struct kvm_sregs", "ldt")
    assert vcpu.sregs_set[ldt : ldt + 24] == b"\xa5" * 24  # what it does not set is KVM's, untouched


# --- the host's KVM ----------------------------------------------------------------------------
@pytest.mark.kvm
def test_host_answers_are_asked_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from trivmm.kvm.constants import Cap

    with Kvm() as first:
        supported = first.supported_cpuid()
        first.check_extension(Cap.IRQCHIP)
        _ = first.vcpu_mmap_size
    asked: list[str] = []
    real_ioctl = _ioctl.FdObject.ioctl

    def counting_ioctl(self: Any, request: str, *args: Any) -> int:
        asked.append(request)
        return real_ioctl(self, request, *args)

    monkeypatch.setattr(_ioctl.FdObject, "ioctl", counting_ioctl)
    with Kvm() as second:
        assert second.supported_cpuid() is supported and isinstance(supported, tuple)
        assert second.check_extension(Cap.IRQCHIP) > 0 and second.vcpu_mmap_size >= 4096
    assert asked == []  # no KVM_GET_API_VERSION, CHECK_EXTENSION, GET_VCPU_MMAP_SIZE, GET_SUPPORTED_CPUID
