/* 64-bit: drops to CPL3 (IOPL 3, interrupts off) and increments a counter at 0x4000 for
 * ever: a vCPU that never exits on its own, for pause/resume and cancellation tests.
 * (A 32-bit `iret` to CPL3 is one of the things the nested host cannot emulate.) */
        .include "common.inc"
        .include "long64.inc"
        .set COUNTER, 0x4000
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        USER_LOW_2M
        movl    $0, COUNTER
        LOG     $0x3333
        push    $0x23                   /* SS */
        push    $0x8f00                 /* RSP */
        push    $0x3002                 /* RFLAGS: IOPL 3, IF 0 */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq
user:
        incl    COUNTER
        jmp     user

        .p2align 4
idt:    .fill   16, 1, 0
        IDT_END_AND_GDT64
