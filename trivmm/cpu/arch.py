"""x86 architectural numbers trivmm uses, in one place: MSRs, register names and bits.

Intel SDM vol. 3 (and AMD APM vol. 2) for the meaning of each. Plain integers rather than
``enum.IntFlag``: ``~`` on an IntFlag keeps only the bits the flag defines, which is never
what register arithmetic wants.
"""

from __future__ import annotations

import enum


class Msr(enum.IntEnum):
    """Model-specific registers, by their index."""

    TSC = 0x10
    SYSENTER_CS = 0x174
    SYSENTER_ESP = 0x175
    SYSENTER_EIP = 0x176
    MISC_ENABLE = 0x1A0
    MTRR_DEF_TYPE = 0x2FF
    EFER = 0xC000_0080
    STAR = 0xC000_0081
    LSTAR = 0xC000_0082
    CSTAR = 0xC000_0083
    FMASK = 0xC000_0084  # the RFLAGS bits SYSCALL clears (Linux: MSR_SYSCALL_MASK)
    FS_BASE = 0xC000_0100
    GS_BASE = 0xC000_0101
    KERNEL_GS_BASE = 0xC000_0102


# struct kvm_regs field names of the general-purpose registers, in encoding order: the
# number a ModRM/SIB field (plus REX bit) names is the index here.
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
REG_RSP, REG_RBP = 4, 5


class Vector(enum.IntEnum):
    """Exception vectors."""

    DB = 1  # debug
    BP = 3  # breakpoint (INT3)
    UD = 6  # invalid opcode
    NM = 7  # device not available
    SS = 12  # stack-segment fault
    GP = 13  # general protection
    PF = 14  # page fault
    MF = 16  # x87 floating-point error
    AC = 17  # alignment check

MISC_ENABLE_FAST_STRING = 1
MTRR_DEF_TYPE_ENABLE_WB = (1 << 11) | 6

CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR0_WP, CR0_AM, CR0_PG = 1 << 16, 1 << 18, 1 << 31
CR4_PSE, CR4_PAE, CR4_OSFXSR, CR4_LA57 = 1 << 4, 1 << 5, 1 << 9, 1 << 12
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1, 1 << 8, 1 << 10, 1 << 11

RFLAGS_CF, RFLAGS_FIXED, RFLAGS_TF, RFLAGS_IF = 1, 1 << 1, 1 << 8, 1 << 9
RFLAGS_IOPL, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM, RFLAGS_AC = 3 << 12, 1 << 14, 1 << 16, 1 << 17, 1 << 18
RFLAGS_VIF, RFLAGS_VIP = 1 << 19, 1 << 20
# Bits an RFLAGS value can never have set: 3, 5, 15 and 22-63.
RFLAGS_RESERVED = (1 << 3) | (1 << 5) | (1 << 15) | ~((1 << 22) - 1) & 0xFFFF_FFFF_FFFF_FFFF

# Page-fault error code bits.
PF_PRESENT, PF_WRITE, PF_USER, PF_RESERVED, PF_FETCH = 1, 1 << 1, 1 << 2, 1 << 3, 1 << 4

# Debug registers: DR6 status bits and the value it reads as with nothing reported; DR7's
# always-one bit and the local enable bit of breakpoint slot 0.
DR6_B0, DR6_B0_B3, DR6_BS, DR6_FIXED = 1, 0xF, 1 << 14, 0xFFFF_0FF0
DR7_L0, DR7_FIXED = 1, 1 << 10

MXCSR_RESERVED = 0xFFFF_0000  # bits LDMXCSR refuses with #GP(0)
FSW_ES = 1 << 7  # x87 status word: an unmasked exception is pending
