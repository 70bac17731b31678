"""Architectural state of vCPUs at boot: CPUID, MSRs, FPU, LAPIC, and the BSP's entry mode."""

from __future__ import annotations

import struct

import attrs

from trivmm.boot import layout
from trivmm.boot.loader import BootEntry, BootProtocol
from trivmm.cpu.arch import (
    CR0_AM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    GPR_NAMES,
    MISC_ENABLE_FAST_STRING,
    MTRR_DEF_TYPE_ENABLE_WB,
    Msr,
)
from trivmm.cpu.templates import CpuTemplate
from trivmm.kvm._ffi import ffi
from trivmm.kvm.system import CpuidEntry
from trivmm.kvm.vcpu import Vcpu

__all__ = ["configure_vcpu", "set_entry_state", "vcpu_cpuid"]

_LAPIC_LVT0, _LAPIC_LVT1 = 0x350, 0x360
_DELIVERY_EXTINT, _DELIVERY_NMI = 7, 4
_CPUID_HYPERVISOR = 1 << 31


def vcpu_cpuid(base: list[CpuidEntry], template: CpuTemplate, index: int, vcpus: int) -> list[CpuidEntry]:
    """The CPUID table of vCPU ``index``: the template applied, APIC ids and counts set."""
    out = []
    for entry in template.apply(base):
        if entry.function == 1:
            ebx = (entry.ebx & 0x0000_FFFF) | (min(vcpus, 255) << 16) | (index << 24)
            entry = attrs.evolve(entry, ebx=ebx, ecx=entry.ecx | _CPUID_HYPERVISOR)
        elif entry.function in (0xB, 0x1F):
            entry = attrs.evolve(entry, edx=index)
        out.append(entry)
    return out


def _set_lint(vcpu: Vcpu) -> None:
    """LINT0 = ExtINT (the 8259 PIC), LINT1 = NMI, as firmware leaves a PC."""
    lapic = vcpu.get_lapic()
    regs = ffi.buffer(lapic.regs)
    for offset, mode in ((_LAPIC_LVT0, _DELIVERY_EXTINT), (_LAPIC_LVT1, _DELIVERY_NMI)):
        (value,) = struct.unpack_from("<I", regs, offset)
        struct.pack_into("<I", regs, offset, (value & ~0x700) | (mode << 8))
    vcpu.set_lapic(lapic)


def configure_vcpu(vcpu: Vcpu, cpuid: list[CpuidEntry]) -> None:
    """What every vCPU needs before it first runs: CPUID, MSRs, FPU control words, LINTs."""
    vcpu.set_cpuid(cpuid)
    vcpu.set_msrs({
        Msr.SYSENTER_CS: 0, Msr.SYSENTER_ESP: 0, Msr.SYSENTER_EIP: 0,
        Msr.STAR: 0, Msr.CSTAR: 0, Msr.KERNEL_GS_BASE: 0, Msr.FMASK: 0, Msr.LSTAR: 0,
        Msr.TSC: 0, Msr.MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        Msr.MTRR_DEF_TYPE: MTRR_DEF_TYPE_ENABLE_WB,
    })  # fmt: skip
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    vcpu.set_fpu(fpu)
    vcpu.set_mxcsr(0x1F80)  # not through KVM_SET_FPU: see Vcpu.set_mxcsr
    _set_lint(vcpu)


def _segment(seg: object, selector: int, seg_type: int, *, code64: bool = False) -> None:
    s = seg
    s.base = 0  # type: ignore[attr-defined]
    s.limit = 0xFFFF_FFFF  # type: ignore[attr-defined]
    s.selector = selector  # type: ignore[attr-defined]
    s.type = seg_type  # type: ignore[attr-defined]
    s.present = 1  # type: ignore[attr-defined]
    s.dpl = 0  # type: ignore[attr-defined]
    s.db = 0 if code64 else 1  # type: ignore[attr-defined]
    s.s = 1  # type: ignore[attr-defined]
    s.l = 1 if code64 else 0  # type: ignore[attr-defined]
    s.g = 1  # type: ignore[attr-defined]
    s.avl = 0  # type: ignore[attr-defined]
    s.unusable = 0  # type: ignore[attr-defined]


def set_entry_state(vcpu: Vcpu, entry: BootEntry) -> None:
    """Registers of the boot vCPU for ``entry`` (see ``trivmm.boot.loader``)."""
    sregs = vcpu.get_sregs()
    long_mode = entry.protocol is BootProtocol.LINUX64
    _segment(sregs.cs, 0x10, 0xB, code64=long_mode)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, 0x18, 0x3)
    _segment(sregs.tr, 0x20, 0xB)
    sregs.tr.s = 0
    sregs.tr.limit = 0xFFFFF
    sregs.tr.g = 0
    sregs.gdt.base, sregs.gdt.limit = layout.GDT, 5 * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.IDT, 7
    if long_mode:
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
        sregs.cr3 = layout.PML4
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
    else:
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in GPR_NAMES:
        setattr(regs, name, 0)
    regs.rip = entry.rip
    regs.rflags = 0x2
    regs.rsp = regs.rbp = layout.BOOT_STACK
    if long_mode:
        regs.rsi = entry.boot_info
    else:
        regs.rbx = entry.boot_info
    vcpu.set_regs(regs)
