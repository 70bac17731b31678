"""CPU and in-kernel platform state: captured from KVM, serialised, applied to a new VM.

Per vCPU (``VcpuState``, section ``vcpu/N``): the CPUID table, registers, special
registers, FPU and XSAVE areas, XCRs, LAPIC, pending events, MP state, debug registers,
every MSR KVM lists that KVM_GET_MSRS reads here (the time-stamp counter, MSR 0x10, among
them) and the TSC frequency. KVM structures travel as their raw bytes (the stream version
fixes their layout); each is checked to be exactly its struct's size.

Per VM: the in-kernel PIC (both chips), IOAPIC, PIT and kvmclock, one raw struct each
(``PLATFORM_SECTIONS``). The host-quirk layer's memory of the guest (``QuirkState``,
section ``quirks/N``) goes with its vCPU.

Order matters when applying (as Firecracker does it): CPUID first; the TSC frequency; MP
state; registers; XSAVE after the FPU (KVM_SET_FPU's MXCSR is not reliable here); the
LAPIC before the MSRs (the TSC deadline needs the LAPIC's timer mode); events last. The
platform follows the vCPUs, kvmclock last.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from typing import Any

import attrs

from trivmm.cpu.fallback import FallbackState, SyscallCompleterState
from trivmm.cpu.hooks import VcpuHooks
from trivmm.cpu.quirks import QuirkHooks
from trivmm.errors import MigrationError
from trivmm.kvm import KvmError
from trivmm.kvm._ffi import ffi
from trivmm.kvm.constants import Cap
from trivmm.kvm.system import CpuidEntry
from trivmm.kvm.vcpu import Vcpu
from trivmm.kvm.vm import IRQCHIP_IOAPIC, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, Vm
from trivmm.migration.codec import Size, decode_state, encode_state, pack_fields, unpack_fields

__all__ = ["VcpuState", "QuirkState", "capture_vcpu", "apply_vcpu", "encode_vcpu", "decode_vcpu",
           "capture_quirks", "apply_quirks", "capture_platform", "apply_platform", "PLATFORM_SECTIONS",
           "MAX_MSRS", "MAX_CPUID_ENTRIES"]  # fmt: skip

_log = logging.getLogger(__name__)
MAX_MSRS = 1024
MAX_CPUID_ENTRIES = 256
_MSR = struct.Struct("<IQ")
_U32 = struct.Struct("<I")
_CPUID_ENTRY = struct.Struct("<7I12x")  # struct kvm_cpuid_entry2
assert _CPUID_ENTRY.size == ffi.sizeof("struct kvm_cpuid_entry2")
# struct kvm_vcpu_events.flags: what KVM_SET_VCPU_EVENTS should take from the struct.
_EVENTS_VALID_NMI_PENDING = 0x1
_EVENTS_VALID_SIPI_VECTOR = 0x2
_MP_STATE_LIMIT = 16  # KVM_MP_STATE_* are 0..8

# Raw KVM structs by field name: (C type, name in the vCPU section).
_VCPU_STRUCTS = {
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "fpu": "struct kvm_fpu",
    "xsave": "struct kvm_xsave",
    "xcrs": "struct kvm_xcrs",
    "lapic": "struct kvm_lapic_state",
    "events": "struct kvm_vcpu_events",
    "debugregs": "struct kvm_debugregs",
}
_VCPU_SIZES = {name: Size.exact(ffi.sizeof(ctype)) for name, ctype in _VCPU_STRUCTS.items()} | {
    "mp_state": Size.exact(4),
    "tsc_khz": Size.exact(4),
    "msrs": Size(0, MAX_MSRS * _MSR.size, _MSR.size),
    "cpuid": Size(0, MAX_CPUID_ENTRIES * _CPUID_ENTRY.size, _CPUID_ENTRY.size),
}


@attrs.frozen
class VcpuState:
    """One vCPU's architectural state: KVM structs as raw bytes, MSRs, CPUID."""

    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    lapic: bytes
    events: bytes
    debugregs: bytes
    mp_state: int
    tsc_khz: int  # 0: the host could not say
    msrs: tuple[tuple[int, int], ...]
    cpuid: tuple[CpuidEntry, ...]

    def struct(self, name: str) -> Any:
        """A fresh cdata copy of raw field ``name`` (``regs``, ``sregs``...)."""
        return _from_bytes(_VCPU_STRUCTS[name], getattr(self, name))


def _from_bytes(ctype: str, data: bytes) -> Any:
    value = ffi.new(f"{ctype} *")
    ffi.buffer(value)[:] = data
    return value


def _raw(value: Any) -> bytes:
    return bytes(ffi.buffer(value))


def listed_msrs(vcpu: Vcpu) -> dict[int, int]:
    """Every MSR KVM lists for saving that KVM_GET_MSRS reads on ``vcpu``, with its value."""
    return vcpu.get_listed_msrs(vcpu.vm.kvm.msr_index_list())


def capture_vcpu(vcpu: Vcpu) -> VcpuState:
    """``vcpu``'s state; it must not be running (its thread parked, or never started)."""
    tsc_khz = vcpu.get_tsc_khz() if vcpu.vm.kvm.check_extension(Cap.GET_TSC_KHZ) > 0 else 0
    msrs = listed_msrs(vcpu)
    if len(msrs) > MAX_MSRS:
        raise MigrationError(f"vCPU {vcpu.index}: {len(msrs)} MSRs are more than a stream carries ({MAX_MSRS})")
    return VcpuState(
        regs=_raw(vcpu.get_regs()), sregs=_raw(vcpu.get_sregs()), fpu=_raw(vcpu.get_fpu()),
        xsave=_raw(vcpu.get_xsave()), xcrs=_raw(vcpu.get_xcrs()), lapic=_raw(vcpu.get_lapic()),
        events=_raw(vcpu.get_vcpu_events()), debugregs=_raw(vcpu.get_debugregs()),
        mp_state=vcpu.get_mp_state(), tsc_khz=tsc_khz, msrs=tuple(sorted(msrs.items())),
        cpuid=tuple(vcpu.get_cpuid()),
    )  # fmt: skip


def apply_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Give ``vcpu`` (built, never run) ``state``. A refusal by KVM is a ``MigrationError``."""
    where = f"vCPU {vcpu.index}"
    try:
        if state.cpuid:
            vcpu.set_cpuid(state.cpuid)
        _apply_tsc_khz(vcpu, state.tsc_khz)
        vcpu.set_mp_state(state.mp_state)
        vcpu.set_regs(state.struct("regs"))
        vcpu.set_sregs(state.struct("sregs"))
        vcpu.set_fpu(state.struct("fpu"))
        vcpu.set_xsave(state.struct("xsave"))
        vcpu.set_xcrs(state.struct("xcrs"))
        vcpu.set_debugregs(state.struct("debugregs"))
        vcpu.set_lapic(state.struct("lapic"))
        if state.msrs:
            vcpu.set_msrs(dict(state.msrs))
        events = state.struct("events")
        events.flags |= _EVENTS_VALID_NMI_PENDING | _EVENTS_VALID_SIPI_VECTOR
        vcpu.set_vcpu_events(events)
    except KvmError as exc:
        raise MigrationError(f"{where}: the host's KVM refused the saved state: {exc}") from exc


def _apply_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    kvm = vcpu.vm.kvm
    if not khz or kvm.check_extension(Cap.GET_TSC_KHZ) <= 0:
        return
    here = vcpu.get_tsc_khz()
    if here == khz:
        return
    if kvm.check_extension(Cap.TSC_CONTROL) > 0:
        vcpu.set_tsc_khz(khz)
    else:
        _log.warning("vCPU %d: the guest's TSC ran at %d kHz and runs at %d kHz here (this host's KVM cannot "
                     "scale it): guest time may drift", vcpu.index, khz, here)  # fmt: skip


def encode_vcpu(state: VcpuState) -> bytes:
    fields = {name: getattr(state, name) for name in _VCPU_STRUCTS}
    fields["mp_state"] = _U32.pack(state.mp_state)
    fields["tsc_khz"] = _U32.pack(state.tsc_khz)
    fields["msrs"] = b"".join(_MSR.pack(index, value) for index, value in state.msrs)
    fields["cpuid"] = b"".join(_CPUID_ENTRY.pack(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                               for e in state.cpuid)  # fmt: skip
    return pack_fields(fields)


def decode_vcpu(payload: bytes, what: str) -> VcpuState:
    """A ``VcpuState`` from its section, every field checked; ``MigrationError`` otherwise."""
    fields = unpack_fields(payload, what, _VCPU_SIZES)
    (mp_state,) = _U32.unpack(fields["mp_state"])
    if mp_state >= _MP_STATE_LIMIT:
        raise MigrationError(f"{what}: MP state {mp_state} is not one KVM knows")
    msrs = tuple(_MSR.iter_unpack(fields["msrs"]))
    if len({index for index, _ in msrs}) != len(msrs):
        raise MigrationError(f"{what}: an MSR appears twice")
    cpuid = tuple(CpuidEntry(*values) for values in _CPUID_ENTRY.iter_unpack(fields["cpuid"]))
    raw = {name: fields[name] for name in _VCPU_STRUCTS}
    return VcpuState(**raw, mp_state=mp_state, tsc_khz=_U32.unpack(fields["tsc_khz"])[0], msrs=msrs, cpuid=cpuid)


# --- the host-quirk layer ----------------------------------------------------------------------


@attrs.frozen
class QuirkState:
    """What a vCPU's host-quirk hooks remember (``trivmm.cpu.quirks.QuirkHooks``)."""

    fallback: FallbackState | None
    syscalls: SyscallCompleterState | None


def capture_quirks(hooks: VcpuHooks) -> bytes | None:
    """The hooks' state as a section payload; None for hooks that keep none (stock KVM)."""
    if not isinstance(hooks, QuirkHooks):
        return None
    fallback = hooks.fallback.save() if hooks.fallback is not None else None
    syscalls = hooks.syscalls.save() if hooks.syscalls is not None else None
    return encode_state(QuirkState(fallback, syscalls))


def apply_quirks(hooks: VcpuHooks, payload: bytes, what: str) -> None:
    """Give the hooks their saved state (after the vCPU's own state: it re-arms guest
    debugging). The hooks here must have the same parts as the saved ones."""
    state = decode_state(QuirkState, payload, what)
    if not isinstance(hooks, QuirkHooks) or (state.fallback is None) != (hooks.fallback is None) \
            or (state.syscalls is None) != (hooks.syscalls is None):  # fmt: skip
        raise MigrationError(f"{what}: the saved host-quirk hooks are not this CPU template's")
    try:
        if state.fallback is not None and hooks.fallback is not None:
            hooks.fallback.restore(state.fallback)
        if state.syscalls is not None and hooks.syscalls is not None:
            hooks.syscalls.restore(state.syscalls)
    except ValueError as exc:
        raise MigrationError(f"{what}: {exc}") from None
    except KvmError as exc:
        raise MigrationError(f"{what}: the host's KVM refused guest debugging: {exc}") from exc


# --- the in-kernel platform ----------------------------------------------------------------------

# Section name -> C type of its raw payload.
PLATFORM_SECTIONS: dict[str, str] = {
    "kvm/pic-master": "struct kvm_irqchip",
    "kvm/pic-slave": "struct kvm_irqchip",
    "kvm/ioapic": "struct kvm_irqchip",
    "kvm/pit": "struct kvm_pit_state2",
    "kvm/clock": "struct kvm_clock_data",
}
_CHIPS = {"kvm/pic-master": IRQCHIP_PIC_MASTER, "kvm/pic-slave": IRQCHIP_PIC_SLAVE, "kvm/ioapic": IRQCHIP_IOAPIC}


def capture_platform(vm: Vm) -> dict[str, bytes]:
    """The in-kernel PIC, IOAPIC, PIT and kvmclock, by section name."""
    out = {name: _raw(vm.get_irqchip(chip)) for name, chip in _CHIPS.items()}
    out["kvm/pit"] = _raw(vm.get_pit2())
    out["kvm/clock"] = _raw(vm.get_clock())
    return out


def check_platform(name: str, payload: bytes) -> None:
    """``MigrationError`` unless ``payload`` has the size (and chip id) of ``name``'s struct."""
    size = ffi.sizeof(PLATFORM_SECTIONS[name])
    if len(payload) != size:
        raise MigrationError(f"{name}: {len(payload)} bytes, not the {size} of {PLATFORM_SECTIONS[name]}")
    if name in _CHIPS and _U32.unpack_from(payload)[0] != _CHIPS[name]:
        raise MigrationError(f"{name}: holds another interrupt controller's state")


def apply_platform(vm: Vm, sections: dict[str, bytes], vcpus: Sequence[Vcpu]) -> None:
    """Restore the in-kernel platform from ``capture_platform``'s sections (checked)."""
    try:
        for name in _CHIPS:
            vm.set_irqchip(_from_bytes(PLATFORM_SECTIONS[name], sections[name]))
        vm.set_pit2(_from_bytes(PLATFORM_SECTIONS["kvm/pit"], sections["kvm/pit"]))
        clock = _from_bytes(PLATFORM_SECTIONS["kvm/clock"], sections["kvm/clock"])
        clock.flags = 0  # the saved clock value as it is: no host-time or realtime adjustment
        vm.set_clock(clock)
    except KvmError as exc:
        raise MigrationError(f"the host's KVM refused the saved platform state: {exc}") from exc
    if vm.kvm.check_extension(Cap.KVMCLOCK_CTRL) > 0:
        for vcpu in vcpus:  # tell a kvmclock guest it was stopped (no soft-lockup warnings)
            try:
                vcpu.ioctl("KVM_KVMCLOCK_CTRL")
            except KvmError:
                pass  # the guest has not enabled kvmclock: nothing to tell
