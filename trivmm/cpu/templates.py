"""CPU templates: what CPU a guest sees, as data.

A template starts from KVM_GET_SUPPORTED_CPUID and clears feature bits. On most hosts that
is the whole story. On a host whose KVM passes bits of the real CPU through regardless of
KVM_SET_CPUID2 (the nested, PVM-style KVM this project grew up on), the table alone cannot
hide a feature, so a template also carries kernel command-line options for Linux guests
(``clearcpuid=``) that keep the kernel off the instructions the host cannot run.

A template also names the host quirks its host needs (``Quirk``): the per-vCPU hooks that
``trivmm.cpu.quirks`` builds for them plug into the run loop. ``host`` names none.

``detect_host_template`` picks the template for the host; ``--cpu-template`` overrides it.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from pathlib import Path

import attrs

from trivmm.kvm.system import CpuidEntry

__all__ = ["CpuTemplate", "CpuidBits", "Quirk", "TEMPLATES", "detect_host_template", "get_template",
           "LINUX_CLEARCPUID_MAX"]


class Quirk(enum.Enum):
    """A host-quirk hook a template asks for (built per vCPU by ``trivmm.cpu.quirks``)."""

    EMULATION_FALLBACK = "emulation-fallback"  # emulate what the host's instruction emulator cannot
    SYSCALL_COMPLETION = "syscall-completion"  # the host runs SYSCALL from CPL3 without entering CPL0


@attrs.frozen
class CpuidBits:
    """Bits to clear in one register of one CPUID leaf (every sub-leaf if ``index`` is None)."""

    function: int
    register: str  # "eax", "ebx", "ecx" or "edx"
    mask: int
    index: int | None = None


def _bits(*positions: int) -> int:
    mask = 0
    for p in positions:
        mask |= 1 << p
    return mask


@attrs.frozen
class CpuTemplate:
    """A named CPU model: CPUID bits cleared, leaves dropped, Linux options, host quirks."""

    name: str
    description: str
    clear: tuple[CpuidBits, ...] = ()
    drop_leaves: tuple[int, ...] = ()  # leaves removed entirely (e.g. 0xD when XSAVE is off)
    linux_cmdline: tuple[str, ...] = ()
    quirks: frozenset[Quirk] = frozenset()  # host-quirk hooks this host needs; none on stock KVM

    def apply(self, entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
        out = []
        drop, clear = self.drop_leaves, self.clear
        for entry in entries:
            if entry.function in drop:
                continue
            for bits in clear:
                if bits.function == entry.function and bits.index in (None, entry.index):
                    value = getattr(entry, bits.register) & ~bits.mask
                    entry = attrs.evolve(entry, **{bits.register: value})
            out.append(entry)
        return out


# CPUID.1:ECX / CPUID.7.0:EBX / CPUID.7.0:ECX bit numbers (Intel SDM vol. 2, CPUID).
_LEAF1_ECX = dict(pclmulqdq=1, ssse3=9, fma=12, cx16=13, sse4_1=19, sse4_2=20, movbe=22,
                  popcnt=23, aes=25, xsave=26, osxsave=27, avx=28, f16c=29, rdrand=30)  # fmt: skip
_LEAF7_EBX = dict(fsgsbase=0, bmi1=3, avx2=5, bmi2=8, invpcid=10, avx512f=16, rdseed=18,
                  adx=19, smap=20, clflushopt=23, clwb=24, sha_ni=29)  # fmt: skip
_LEAF7_ECX = dict(pku=3, ospke=4, rdpid=22)
# KVM paravirt features (CPUID 0x40000001 EAX) that need no hypercall: the kvmclock bits.
_KVM_FEATURE_CLOCKSOURCE, _KVM_FEATURE_CLOCKSOURCE2, _KVM_FEATURE_CLOCKSOURCE_STABLE = 0, 3, 24
_KVM_FEATURES_WITHOUT_HYPERCALLS = _bits(_KVM_FEATURE_CLOCKSOURCE, _KVM_FEATURE_CLOCKSOURCE2,
                                         _KVM_FEATURE_CLOCKSOURCE_STABLE)  # fmt: skip

# What ../shared/notes/kvm-here.md found the nested host cannot emulate at guest CPL0, and
# the clearcpuid= list that got a stock kernel furthest there (6.1 takes these names).
# Linux 6.1 reads at most 127 characters of clearcpuid=, and only one such option, so the
# list names what `noxsave` does not already clear (AVX*, FMA, F16C, PKU and the XSAVE
# variants all depend on XSAVE).
_NESTED_CLEARCPUID = (
    "smap,fsgsbase,invpcid,pcid,rdpid,popcnt,movbe,bmi1,bmi2,clflushopt,clwb,rdseed,adx,aes,"
    "pclmulqdq,sha_ni,ssse3,sse4_1,sse4_2"
)
LINUX_CLEARCPUID_MAX = 127

TEMPLATES: dict[str, CpuTemplate] = {
    t.name: t
    for t in (
        CpuTemplate("host", "everything the host KVM supports (KVM_GET_SUPPORTED_CPUID as is)"),
        CpuTemplate(
            "nested-pvm",
            "for nested, PVM-style KVM hosts: hide what the host cannot emulate at guest CPL0 "
            "(CMPXCHG16B, XSAVE/XRSTOR, SMAP/CLAC, POPCNT, AVX, SSSE3+, ...) and KVM PV features "
            "that need hypercalls, in CPUID and, for Linux guests, with clearcpuid=",
            clear=(
                CpuidBits(1, "ecx", _bits(*_LEAF1_ECX.values())),
                CpuidBits(7, "ebx", _bits(*_LEAF7_EBX.values()), index=0),
                CpuidBits(7, "ecx", _bits(*_LEAF7_ECX.values()), index=0),
                # The host never completes VMCALL/VMMCALL: a guest using PV IPIs, PV
                # unhalt or PV TLB flush would sit at the hypercall for ever.
                CpuidBits(0x4000_0001, "eax", 0xFFFF_FFFF & ~_KVM_FEATURES_WITHOUT_HYPERCALLS),
            ),
            drop_leaves=(0xD,),
            # nowatchdog: CPL0 code is emulated ~1000x slower; the soft-lockup detector
            # would otherwise fire during ordinary boot work (ftrace self-tests, kallsyms).
            # cryptomgr.notests: Debian's kernel self-tests every crypto algorithm it
            # registers (RSA among them); measured here, that is many minutes of boot.
            linux_cmdline=("noxsave", f"clearcpuid={_NESTED_CLEARCPUID}", "nowatchdog", "cryptomgr.notests"),
            quirks=frozenset({Quirk.EMULATION_FALLBACK, Quirk.SYSCALL_COMPLETION}),
        ),
    )
}

_PVM_MODULE = Path("/sys/module/kvm_pvm")


def detect_host_template(sys_module: Path = _PVM_MODULE) -> CpuTemplate:
    """The template this host needs: ``nested-pvm`` where kvm_pvm is loaded, else ``host``."""
    return TEMPLATES["nested-pvm" if sys_module.exists() else "host"]


@functools.cache
def _host_template() -> CpuTemplate:
    # Whether kvm_pvm is loaded is the host's, fixed for this process's life (a sysfs
    # lookup is tens of microseconds on the nested host: once, not per VM).
    return detect_host_template()


def get_template(name: str) -> CpuTemplate:
    if name == "auto":
        return _host_template()
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown CPU template {name!r} (choose from auto, {', '.join(TEMPLATES)})") from None
