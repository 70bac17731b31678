/* 64-bit, CPL0: int3 through our IDT's #BP gate, then fwait, then (if asked) an
 * instruction a nested host cannot emulate, to see the VM stop with a clear error. */
        .include "common.inc"
        .include "long64.inc"
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+3*16, bp_handler
        LOG     $0x1111
        int3
        LOG     $0x2222                 /* back from the #BP handler */
        fwait
        LOG     $0x3333
        cmpl    $0, try_cmpxchg16b(%rip)
        je      1f
        lea     scratch(%rip), %rsi
        xor     %eax, %eax
        xor     %edx, %edx
        lock cmpxchg16b (%rsi)
        LOG     $0x4444
1:      POWER_OFF_NOW

bp_handler:
        LOG     $0xbbbb
        iretq

        .p2align 4
idt:    .fill   3 * 16, 1, 0
        GATE    bp_handler
idt_end:
idt_descriptor:
        .word   idt_end - idt - 1
        .quad   idt
        .p2align 4
scratch: .quad  0, 0
        .globl try_cmpxchg16b
try_cmpxchg16b: .long 0
        GDT64
