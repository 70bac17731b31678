/* 64-bit, CPL3: user code jumps to LSTAR with forged RCX/R11, twice, then reads LSTAR's
 * address; each must reach the guest's #PF handler as the page fault it is, never the
 * SYSCALL entry. Then a real SYSCALL, which must enter the kernel at CPL0. The #PF handler
 * logs 0xeeee, the error code, CR2 and the faulting RIP, then resumes user code at the next
 * attempt. (User code cannot log: port I/O from CPL3 faults on the nested host.) */
        .include "common.inc"
        .include "long64.inc"
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+14*16, pf_handler
        USER_LOW_2M
        SYSCALL_MSRS syscall_entry, $0x47700
        LOG     $0x1111                 /* the first exit: a VMM completing SYSCALLs arms here */
        push    $0x23                   /* SS */
        push    $0x8f00                 /* RSP */
        push    $0x2                    /* RFLAGS */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq

user:   /* 1: RCX at bytes that are not a SYSCALL, R11 a plausible RFLAGS */
        lea     not_syscall(%rip), %rcx
        mov     $0x202, %r11
        jmp     *lstar(%rip)
        .globl resume1
resume1: /* 2: RCX just past a real SYSCALL instruction, R11 claiming IOPL 3 */
        lea     after_syscall(%rip), %rcx
        mov     $0x3202, %r11
        jmp     *lstar(%rip)
        .globl resume2
resume2: /* 3: a user-mode read of LSTAR's address: an ordinary #PF, CR2 == LSTAR too */
        mov     lstar(%rip), %rax
        .globl read_lstar
read_lstar:
        mov     (%rax), %rax
        .globl resume3
resume3: /* 4: the real thing */
        mov     $0x2a, %edi
        syscall
after_syscall:
        jmp     after_syscall
not_syscall:
        nop
        nop

        .p2align 3
        .globl lstar
lstar:  .quad   syscall_entry
resume_table:
        .quad   resume1, resume2, resume3
attempt: .quad  0
        .p2align 4
idt:    .fill   14 * 16, 1, 0
        GATE    pf_handler
        IDT_END_AND_GDT64

        .section .super, "ax"
        .globl syscall_entry
syscall_entry:
        LOG_SYSCALL_ENTRY
        LOG     %edi
        POWER_OFF_NOW
pf_handler:
        LOG_PF_FRAME $0xeeee
        mov     attempt(%rip), %rbx
        cmp     $3, %rbx
        jae     1f
        lea     resume_table(%rip), %rcx
        mov     (%rcx,%rbx,8), %rcx
        mov     %rcx, 8(%rsp)           /* resume at the next attempt */
        incq    attempt(%rip)
        add     $8, %rsp                /* the error code */
        iretq
1:      POWER_OFF_NOW
