/* 64-bit, CPL0: asks the VMM (a test device at port 0x514) to inject exceptions into it:
 * each `out` names one; the handlers log what the CPU hands them and return past the `out`.
 * #DB logs 0xdb, DR6, RIP; #GP logs 0x0d, the error code, RIP; #PF logs 0x0e, the error
 * code, CR2, RIP. */
        .include "common.inc"
        .include "long64.inc"
        .set INJECT_PORT, 0x514
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+1*16, db_handler
        FILL_GATE idt+13*16, gp_handler
        FILL_GATE idt+14*16, pf_handler
        mov     $1, %eax
        mov     $INJECT_PORT, %dx
        out     %eax, %dx               /* a #DB, as a host hands over a single step */
        .globl after_db
after_db:
        mov     $2, %eax
        mov     $INJECT_PORT, %dx       /* again: the handlers' LOG changes DX */
        out     %eax, %dx               /* #GP(0) */
        .globl after_gp
after_gp:
        mov     $3, %eax
        mov     $INJECT_PORT, %dx
        out     %eax, %dx               /* #PF */
        .globl after_pf
after_pf:
        LOG     $0x600d
        POWER_OFF_NOW

db_handler:
        LOG     $0xdb
        mov     %dr6, %rbx
        LOG     %ebx
        mov     (%rsp), %rbx
        LOG     %ebx
        iretq
gp_handler:
        LOG     $0x0d
        mov     (%rsp), %rbx
        LOG     %ebx
        mov     8(%rsp), %rbx
        LOG     %ebx
        add     $8, %rsp
        iretq
pf_handler:
        LOG_PF_FRAME $0x0e
        add     $8, %rsp
        iretq

        .p2align 4
idt:    .fill   16, 1, 0
        GATE    db_handler              /* 1 */
        .fill   11 * 16, 1, 0
        GATE    gp_handler              /* 13 */
        GATE    pf_handler              /* 14 */
        IDT_END_AND_GDT64
