"""Architectural state of vCPUs at boot: CPUID, MSRs, FPU, LAPIC, and the BSP's entry mode."""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

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


def vcpu_cpuid(base: Sequence[CpuidEntry], template: CpuTemplate, index: int, vcpus: int) -> tuple[CpuidEntry, ...]:
    """The CPUID table of vCPU ``index``: the template applied, APIC ids and counts set.

    A pure function of its arguments; for a ``base`` that is a tuple (``Kvm.supported_cpuid``
    hands every VM the same one) and a template (immutable, and in practice one of
    ``TEMPLATES``), the answer is remembered by the identity of both -- no hashing of a
    table per call -- and the cache holds both objects, so an identity cannot be reused."""
    if not isinstance(base, tuple):
        return _vcpu_cpuid(base, template, index, vcpus)
    key = (id(base), id(template), index, vcpus)
    hit = _cpuid_cache.get(key)
    if hit is not None and hit[0] is base and hit[1] is template:
        return hit[2]
    table = _vcpu_cpuid(base, template, index, vcpus)
    with _cpuid_cache_lock:
        if len(_cpuid_cache) >= _CPUID_CACHE_SIZE:
            _cpuid_cache.clear()
        _cpuid_cache[key] = (base, template, table)
    return table


_CPUID_CACHE_SIZE = 256  # tables of (base, template, vCPU index, vCPU count)
_cpuid_cache: dict[tuple[int, int, int, int], tuple[tuple[CpuidEntry, ...], CpuTemplate, tuple[CpuidEntry, ...]]] = {}
_cpuid_cache_lock = threading.Lock()


def _vcpu_cpuid(base: Sequence[CpuidEntry], template: CpuTemplate, index: int, vcpus: int) -> tuple[CpuidEntry, ...]:
    out = []
    for entry in template.apply(base):
        if entry.function == 1:
            ebx = (entry.ebx & 0x0000_FFFF) | (min(vcpus, 255) << 16) | (index << 24)
            entry = attrs.evolve(entry, ebx=ebx, ecx=entry.ecx | _CPUID_HYPERVISOR)
        elif entry.function in (0xB, 0x1F):
            entry = attrs.evolve(entry, edx=index)
        out.append(entry)
    return tuple(out)


def _set_lint(vcpu: Vcpu) -> None:
    """LINT0 = ExtINT (the 8259 PIC), LINT1 = NMI, as firmware leaves a PC."""
    lapic = vcpu.get_lapic()
    regs = ffi.buffer(lapic.regs)
    for offset, mode in ((_LAPIC_LVT0, _DELIVERY_EXTINT), (_LAPIC_LVT1, _DELIVERY_NMI)):
        (value,) = struct.unpack_from("<I", regs, offset)
        struct.pack_into("<I", regs, offset, (value & ~0x700) | (mode << 8))
    vcpu.set_lapic(lapic)


def configure_vcpu(vcpu: Vcpu, cpuid: Sequence[CpuidEntry]) -> None:
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


def _entry_segments(long_mode: bool) -> bytes:
    """CS, DS, ES, FS, GS, SS and TR of the boot vCPU (consecutive in ``struct kvm_sregs``),
    as bytes: built once per mode with ``_segment`` on a scratch struct (the segments'
    padding bytes, which KVM ignores, are 0)."""
    sregs = ffi.new("struct kvm_sregs *")
    _segment(sregs.cs, 0x10, 0xB, code64=long_mode)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, 0x18, 0x3)
    _segment(sregs.tr, 0x20, 0xB)
    sregs.tr.s = 0
    sregs.tr.limit = 0xFFFFF
    sregs.tr.g = 0
    return bytes(ffi.buffer(sregs)[_SEGMENTS_START:_SEGMENTS_END])


_SEGMENTS_START = ffi.offsetof("struct kvm_sregs", "cs")
_SEGMENTS_END = ffi.offsetof("struct kvm_sregs", "tr") + ffi.sizeof("struct kvm_segment")
assert _SEGMENTS_END - _SEGMENTS_START == 7 * ffi.sizeof("struct kvm_segment")  # cs ds es fs gs ss tr
_ENTRY_SEGMENTS = {long_mode: _entry_segments(long_mode) for long_mode in (False, True)}


def set_entry_state(vcpu: Vcpu, entry: BootEntry) -> None:
    """Registers of the boot vCPU for ``entry`` (see ``trivmm.boot.loader``)."""
    sregs = vcpu.get_sregs()
    long_mode = entry.protocol is BootProtocol.LINUX64
    ffi.buffer(sregs)[_SEGMENTS_START:_SEGMENTS_END] = _ENTRY_SEGMENTS[long_mode]
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
    # Every field of struct kvm_regs is set here (the GPRs to 0), so no KVM_GET_REGS first.
    regs = ffi.new("struct kvm_regs *")
    regs.rip = entry.rip
    regs.rflags = 0x2
    regs.rsp = regs.rbp = layout.BOOT_STACK
    if long_mode:
        regs.rsi = entry.boot_info
    else:
        regs.rbx = entry.boot_info
    vcpu.set_regs(regs)
