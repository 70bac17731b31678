/* 64-bit: the guest's own debug exceptions, with a VMM's SYSCALL breakpoint armed (LSTAR and
 * the #PF gate are set before the first exit). At CPL0: an instruction breakpoint of its own
 * (DR0). At CPL3: a TF single step, ICEBP (0xf1), and DR0 on a user instruction; then a
 * SYSCALL ends the run. The #DB handler logs 0xdbdb, DR6 and the RIP it would return to. */
        .include "common.inc"
        .include "long64.inc"
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+1*16, db_handler
        FILL_GATE idt+14*16, pf_handler
        USER_LOW_2M
        SYSCALL_MSRS syscall_entry, $0x47700
        LOG     $0x1111                 /* the first exit: a VMM completing SYSCALLs arms here */
        lea     kernel_target(%rip), %rax
        mov     %rax, %dr0
        mov     $0x401, %rax            /* DR7: L0, execute, 1 byte */
        mov     %rax, %dr7
        .globl kernel_target
kernel_target:
        nop
        LOG     $0x2222
        lea     user_target(%rip), %rax /* DR0 moves to a user instruction */
        mov     %rax, %dr0
        push    $0x23                   /* SS */
        push    $0x8f00                 /* RSP */
        push    $0x2                    /* RFLAGS */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq

user:
        pushfq
        orq     $0x100, (%rsp)          /* TF */
        popfq
        nop                             /* the single-step trap comes after this one */
        .globl after_step
after_step:
        .byte   0xf1                    /* ICEBP */
        .globl after_icebp
after_icebp:
        nop                             /* RF, set by the handler's IRET, clears here */
        .globl user_target
user_target:
        nop
        mov     $0x2a, %edi
        syscall
1:      jmp     1b

        .p2align 4
idt:    .fill   16, 1, 0
        GATE    db_handler              /* 1 */
        .fill   12 * 16, 1, 0
        GATE    pf_handler              /* 14 */
        IDT_END_AND_GDT64

        .section .super, "ax"
        .globl syscall_entry
syscall_entry:
        LOG_SYSCALL_ENTRY
        POWER_OFF_NOW
db_handler:
        LOG     $0xdbdb
        mov     %dr6, %rbx
        LOG     %ebx
        mov     (%rsp), %rbx
        LOG     %ebx                    /* the RIP the handler returns to */
        mov     $0xffff0ff0, %rbx       /* DR6 cleared, as handlers do */
        mov     %rbx, %dr6
        andq    $~0x100, 16(%rsp)       /* TF off */
        orq     $0x10000, 16(%rsp)      /* RF on: an instruction breakpoint would fire again */
        iretq
pf_handler:
        LOG     $0xeeee
        POWER_OFF_NOW
