"""Numeric constants of the KVM API (``<linux/kvm.h>``, x86-64), checked by the ABI test."""

from __future__ import annotations

import enum

__all__ = ["ExitReason", "Cap", "MpState", "GuestDebug", "InternalError", "SystemEvent",
           "IO_IN", "IO_OUT", "MEM_LOG_DIRTY_PAGES", "IOEVENTFD_FLAG_DATAMATCH",
           "IOEVENTFD_FLAG_PIO", "IOEVENTFD_FLAG_DEASSIGN", "IRQFD_FLAG_DEASSIGN",
           "IRQ_ROUTING_IRQCHIP", "IRQ_ROUTING_MSI", "EMULATION_FLAG_INSTRUCTION_BYTES"]  # fmt: skip


class ExitReason(enum.IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers, for KVM_CHECK_EXTENSION and readable errors."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    MP_STATE = 14
    SET_GUEST_DEBUG = 23
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    IOEVENTFD_ANY_LENGTH = 122
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    KVMCLOCK_CTRL = 76
    SIGNAL_MSI = 77
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class GuestDebug(enum.IntFlag):
    ENABLE = 0x1
    SINGLESTEP = 0x2
    USE_SW_BP = 0x10000
    USE_HW_BP = 0x20000
    INJECT_DB = 0x40000
    INJECT_BP = 0x80000


class InternalError(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3


IO_IN = 0
IO_OUT = 1
MEM_LOG_DIRTY_PAGES = 1
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
IRQFD_FLAG_DEASSIGN = 1 << 0
IRQ_ROUTING_IRQCHIP = 1
IRQ_ROUTING_MSI = 2
EMULATION_FLAG_INSTRUCTION_BYTES = 1
