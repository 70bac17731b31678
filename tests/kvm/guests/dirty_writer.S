/* 64-bit: dirties memory at CPL3 (native speed on the nested host) for migration tests.
 * A counter at 0x4000 counts iterations; iteration N (N = 1, 2, ...) writes N into the
 * first word of page (N - 1) mod PAGES of the buffer at 4 MiB (PAGES at most 1024: 4 MiB;
 * the 2 MiB pages 4..8 MiB are made user-accessible), then spins SPIN times. So, paused
 * with the counter at C, page (C - k - 1) mod PAGES holds C - k for 0 < k < PAGES (if
 * C - k > 0), and page (C - 1) mod PAGES holds C, or C - PAGES if the pause fell between
 * the increment and the store: any page a migration lost would hold an older value.
 * PAGES and SPIN are 32-bit words the tests patch (tests/kvm/guests.py). RBX counts too. */
        .include "common.inc"
        .include "long64.inc"
        .set COUNTER, 0x4000
        .set BUF, 0x400000
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        USER_LOW_2M
        orq     $0x4, PD + 16           /* PD[2]: 4..6 MiB */
        orq     $0x4, PD + 24           /* PD[3]: 6..8 MiB */
        mov     %cr3, %rax
        mov     %rax, %cr3
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
        mov     $BUF, %rdi
        xor     %ebx, %ebx
1:      incl    COUNTER
        inc     %rbx
        mov     COUNTER, %eax
        mov     %eax, (%rdi)
        add     $4096, %rdi
        mov     PAGES(%rip), %ecx
        shl     $12, %rcx
        add     $BUF, %rcx
        cmp     %rcx, %rdi
        jb      2f
        mov     $BUF, %rdi
2:      mov     SPIN(%rip), %ecx
        test    %ecx, %ecx
        jz      1b
3:      dec     %ecx
        jnz     3b
        jmp     1b

        .p2align 2
        .globl  PAGES, SPIN
PAGES:  .long   1024
SPIN:   .long   0

        .p2align 4
idt:    .fill   16, 1, 0
        IDT_END_AND_GDT64
