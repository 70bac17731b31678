/* 64-bit, CPL0: LDMXCSR/STMXCSR and the faults they raise, which a nested host leaves to the
 * VMM's fallback: a store and a load that work, a load of reserved bits (#GP(0)), a store to
 * a read-only page with CR0.WP on (#PF, P|W) and to a page that is not present (#PF, W).
 * The #GP and #PF handlers log 0x0d / 0x0e, the error code, (CR2,) the faulting RIP, then
 * resume at the next step. */
        .include "common.inc"
        .include "long64.inc"
        .set READ_ONLY, 0x600000        /* the 2 MiB page at 6 MiB, made read-only */
        .set NOT_PRESENT, 0x800000      /* the 2 MiB page at 8 MiB, made not present */
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+13*16, gp_handler
        FILL_GATE idt+14*16, pf_handler
        mov     %cr4, %rax
        or      $0x200, %rax            /* OSFXSR: SSE on */
        mov     %rax, %cr4
        andq    $~2, PD + 3 * 8         /* 6-8 MiB: read-only */
        andq    $~1, PD + 4 * 8         /* 8-10 MiB: not present */
        mov     %cr3, %rax
        mov     %rax, %cr3
        lea     stored(%rip), %rbx
        .globl store_ok
store_ok:
        stmxcsr 4(%rbx)                 /* the reset value, 0x1f80 */
        mov     4(%rbx), %eax
        LOG     %eax
        .globl load_ok
load_ok:
        ldmxcsr good_value(%rip)        /* 0x1fa0: round to -inf, masks kept */
        stmxcsr stored(%rip)
        mov     stored(%rip), %eax
        LOG     %eax
        .globl load_reserved
load_reserved:
        ldmxcsr bad_value(%rip)         /* #GP(0) */
        .globl step2
step2:  mov     $READ_ONLY + 0x10, %rsi
        .globl store_read_only
store_read_only:
        stmxcsr (%rsi)                  /* #PF, error code P|W */
        .globl step3
step3:  mov     $NOT_PRESENT, %rsi
        .globl store_not_present
store_not_present:
        stmxcsr 0x24(%rsi)              /* #PF, error code W */
        .globl step4
step4:  LOG     $0x600d
        POWER_OFF_NOW

gp_handler:
        LOG     $0x0d
        mov     (%rsp), %rbx
        LOG     %ebx
        mov     8(%rsp), %rbx
        LOG     %ebx
        lea     step2(%rip), %rbx
        jmp     resume
pf_handler:
        LOG_PF_FRAME $0x0e
        lea     step3(%rip), %rax
        lea     step4(%rip), %rbx
        cmpq    $store_read_only, 8(%rsp)
        cmove   %rax, %rbx
resume: mov     %rbx, 8(%rsp)
        add     $8, %rsp                /* the error code */
        iretq

        .p2align 4
good_value: .long 0x1fa0
bad_value:  .long 0x11f80
stored:     .long 0, 0
        .p2align 4
idt:    .fill   13 * 16, 1, 0
        GATE    gp_handler              /* 13 */
        GATE    pf_handler              /* 14 */
        IDT_END_AND_GDT64
