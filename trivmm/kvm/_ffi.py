"""cffi (ABI mode) bindings of the ``<linux/kvm.h>`` structures and ioctls trivmm uses.

ABI mode needs no compiler at install time, so every layout is written by hand, in
``_cdef.py``; ``_kvm_cffi.py`` is cffi's pre-parsed form of it (out-of-line ABI mode), which
loads in a millisecond where parsing the declarations at import took ~60 ms or more.
``tests/unit/test_kvm_abi.py`` compiles a C program against the system header and checks
the size of every struct and the offset of every field declared below, and every ioctl
number, against what cffi computes: a typo here fails that test, not a guest.

Only x86-64 is described. Unions the kernel declares anonymously are anonymous here too, so
field paths read as in C (``run.io.port``, ``run.emulation_failure.insn_bytes``).
"""

from __future__ import annotations

from trivmm.kvm._kvm_cffi import ffi

__all__ = ["ffi", "libc", "ioctl_fixed", "IOCTLS", "STRUCTS"]


libc = ffi.dlopen(None)

# The hot path's ioctl (KVM_RUN) through a fixed three-argument prototype: cffi builds a
# call descriptor for every call of a variadic function, which costs ~0.6 us, a tenth of
# an exit. Sound on x86-64 glibc, whose ioctl takes the third argument from RDX and never
# reads vector registers (the only difference a variadic call makes, through AL).
ioctl_fixed = ffi.cast("int (*)(int, unsigned long, void *)", ffi.addressof(libc, "ioctl"))

# Every struct declared above, for the ABI test (and for nothing else).
STRUCTS = [
    "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry",
    "kvm_msrs", "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state",
    "kvm_xsave", "kvm_xcr", "kvm_xcrs", "kvm_debugregs", "kvm_mp_state", "kvm_vcpu_events",
    "kvm_pic_state", "kvm_ioapic_state", "kvm_irqchip", "kvm_pit_channel_state",
    "kvm_pit_state2", "kvm_pit_config", "kvm_clock_data", "kvm_userspace_memory_region",
    "kvm_dirty_log", "kvm_clear_dirty_log", "kvm_ioeventfd", "kvm_irqfd",
    "kvm_irq_routing_irqchip", "kvm_irq_routing_msi", "kvm_irq_routing_entry",
    "kvm_irq_routing", "kvm_msi", "kvm_irq_level", "kvm_translation", "kvm_guest_debug_arch",
    "kvm_guest_debug", "kvm_enable_cap", "kvm_debug_exit_arch", "kvm_run",
]  # fmt: skip

# --- ioctl numbers, computed as <asm-generic/ioctl.h> does --------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
_KVMIO = 0xAE


def _ioc(direction: int, nr: int, struct: str | None) -> int:
    size = ffi.sizeof(f"struct {struct}") if struct and not struct.startswith("u") else 0
    if struct == "u64":
        size = 8
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, None)


def _ior(nr: int, struct: str) -> int:
    return _ioc(_IOC_READ, nr, struct)


def _iow(nr: int, struct: str) -> int:
    return _ioc(_IOC_WRITE, nr, struct)


def _iowr(nr: int, struct: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, struct)


IOCTLS: dict[str, int] = {
    # system (/dev/kvm)
    "KVM_GET_API_VERSION": _io(0x00),
    "KVM_CREATE_VM": _io(0x01),
    "KVM_GET_MSR_INDEX_LIST": _iowr(0x02, "kvm_msr_list"),
    "KVM_CHECK_EXTENSION": _io(0x03),
    "KVM_GET_VCPU_MMAP_SIZE": _io(0x04),
    "KVM_GET_SUPPORTED_CPUID": _iowr(0x05, "kvm_cpuid2"),
    "KVM_GET_EMULATED_CPUID": _iowr(0x09, "kvm_cpuid2"),
    "KVM_GET_MSR_FEATURE_INDEX_LIST": _iowr(0x0A, "kvm_msr_list"),
    # VM
    "KVM_CREATE_VCPU": _io(0x41),
    "KVM_GET_DIRTY_LOG": _iow(0x42, "kvm_dirty_log"),
    "KVM_SET_USER_MEMORY_REGION": _iow(0x46, "kvm_userspace_memory_region"),
    "KVM_SET_TSS_ADDR": _io(0x47),
    "KVM_SET_IDENTITY_MAP_ADDR": _iow(0x48, "u64"),
    "KVM_CREATE_IRQCHIP": _io(0x60),
    "KVM_IRQ_LINE": _iow(0x61, "kvm_irq_level"),
    "KVM_GET_IRQCHIP": _iowr(0x62, "kvm_irqchip"),
    "KVM_SET_IRQCHIP": _ior(0x63, "kvm_irqchip"),
    "KVM_IRQ_LINE_STATUS": _iowr(0x67, "kvm_irq_level"),
    "KVM_SET_GSI_ROUTING": _iow(0x6A, "kvm_irq_routing"),
    "KVM_IRQFD": _iow(0x76, "kvm_irqfd"),
    "KVM_CREATE_PIT2": _iow(0x77, "kvm_pit_config"),
    "KVM_IOEVENTFD": _iow(0x79, "kvm_ioeventfd"),
    "KVM_SET_CLOCK": _iow(0x7B, "kvm_clock_data"),
    "KVM_GET_CLOCK": _ior(0x7C, "kvm_clock_data"),
    "KVM_GET_PIT2": _ior(0x9F, "kvm_pit_state2"),
    "KVM_SET_PIT2": _iow(0xA0, "kvm_pit_state2"),
    "KVM_ENABLE_CAP": _iow(0xA3, "kvm_enable_cap"),
    "KVM_SIGNAL_MSI": _iow(0xA5, "kvm_msi"),
    "KVM_CLEAR_DIRTY_LOG": _iowr(0xC0, "kvm_clear_dirty_log"),
    # vCPU
    "KVM_RUN": _io(0x80),
    "KVM_GET_REGS": _ior(0x81, "kvm_regs"),
    "KVM_SET_REGS": _iow(0x82, "kvm_regs"),
    "KVM_GET_SREGS": _ior(0x83, "kvm_sregs"),
    "KVM_SET_SREGS": _iow(0x84, "kvm_sregs"),
    "KVM_TRANSLATE": _iowr(0x85, "kvm_translation"),
    "KVM_GET_MSRS": _iowr(0x88, "kvm_msrs"),
    "KVM_SET_MSRS": _iow(0x89, "kvm_msrs"),
    "KVM_GET_FPU": _ior(0x8C, "kvm_fpu"),
    "KVM_SET_FPU": _iow(0x8D, "kvm_fpu"),
    "KVM_GET_LAPIC": _ior(0x8E, "kvm_lapic_state"),
    "KVM_SET_LAPIC": _iow(0x8F, "kvm_lapic_state"),
    "KVM_SET_CPUID2": _iow(0x90, "kvm_cpuid2"),
    "KVM_GET_CPUID2": _iowr(0x91, "kvm_cpuid2"),
    "KVM_GET_MP_STATE": _ior(0x98, "kvm_mp_state"),
    "KVM_SET_MP_STATE": _iow(0x99, "kvm_mp_state"),
    "KVM_SET_GUEST_DEBUG": _iow(0x9B, "kvm_guest_debug"),
    "KVM_GET_VCPU_EVENTS": _ior(0x9F, "kvm_vcpu_events"),
    "KVM_SET_VCPU_EVENTS": _iow(0xA0, "kvm_vcpu_events"),
    "KVM_GET_DEBUGREGS": _ior(0xA1, "kvm_debugregs"),
    "KVM_SET_DEBUGREGS": _iow(0xA2, "kvm_debugregs"),
    "KVM_GET_XSAVE": _ior(0xA4, "kvm_xsave"),
    "KVM_SET_XSAVE": _iow(0xA5, "kvm_xsave"),
    "KVM_GET_XCRS": _ior(0xA6, "kvm_xcrs"),
    "KVM_SET_XCRS": _iow(0xA7, "kvm_xcrs"),
    "KVM_SET_TSC_KHZ": _io(0xA2),
    "KVM_GET_TSC_KHZ": _io(0xA3),
    "KVM_KVMCLOCK_CTRL": _io(0xAD),
}
