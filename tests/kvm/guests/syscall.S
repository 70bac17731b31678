/* 64-bit: user code at 1 MiB (U=1), kernel entry at 2 MiB (supervisor-only). Drops to
 * CPL3, spins ~1e9 TSC cycles (so a VMM can see LSTAR and the IDT before it matters), then
 * SYSCALLs. The entry logs 0x5c and the CPL it runs at; a page fault logs 0xeeee instead. */
        .include "common.inc"
        .include "long64.inc"
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+14*16, pf_handler
        USER_LOW_2M
        SYSCALL_MSRS syscall_entry, $0x200
        LOG     $0x1111
        push    $0x23                   /* SS */
        push    $0x8f00                 /* RSP */
        push    $0x3002                 /* RFLAGS: IOPL 3 */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq
user:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        lea     1000000000(%rax), %rbx
1:      rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        cmp     %rbx, %rax
        jb      1b
        mov     $0x2a, %edi
        syscall
2:      jmp     2b

        .p2align 4
idt:    .fill   14 * 16, 1, 0
        GATE    pf_handler
        IDT_END_AND_GDT64

        .section .super, "ax"
syscall_entry:
        LOG_SYSCALL_ENTRY
        LOG     %edi
        POWER_OFF_NOW
pf_handler:
        LOG     $0xeeee
        POWER_OFF_NOW
