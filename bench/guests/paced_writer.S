/* The migration benchmark's guest (bench/migration.py): entered by PVH (32-bit, paging off:
 * trivmm and QEMU's microvm both boot it as a -kernel ELF), it builds its own identity map of
 * the first 4 GiB (2 MiB pages, user-accessible), enters long mode, drops to CPL3 (native
 * speed on the nested host) and:
 *   1. writes one word into every 4 KiB page from BUF (8 MiB) to MEM_END, unpaced, so that
 *      all of guest RAM holds data; then sets PHASE (0x18008) to 1;
 *   2. dirties pages at a set rate, paced by the TSC: one page every TICKS TSC ticks (the
 *      deadline moves on by TICKS per page; a guest more than LAG pages behind, after a pause,
 *      starts counting again from now), cycling over BUF..MEM_END; each page gets the
 *      iteration count, which COUNTER (0x18000, 64-bit) also holds.
 * MEM_END, TICKS and LAG are --defsym values (bench/migration.py assembles it). */
        .include "common.inc"
        .include "long64.inc"
        .set COUNTER, 0x18000
        .set PHASE, 0x18008
        .set BUF, 0x800000
        .set PML4_AT, 0x10000           /* PML4, PDPT, then four page directories */
        .set USTACK, 0x1f000
        .text
        .code32
        .globl _start
_start:
        cli
        cld
        mov     $PML4_AT, %edi
        xor     %eax, %eax
        mov     $(6 * 4096 / 4), %ecx
        rep stosl
        movl    $(PML4_AT + 0x1007), PML4_AT            /* PML4[0] -> PDPT */
        movl    $(PML4_AT + 0x2007), PML4_AT + 0x1000   /* PDPT[0..3] -> PD 0..3 */
        movl    $(PML4_AT + 0x3007), PML4_AT + 0x1008
        movl    $(PML4_AT + 0x4007), PML4_AT + 0x1010
        movl    $(PML4_AT + 0x5007), PML4_AT + 0x1018
        mov     $(PML4_AT + 0x2000), %edi
        mov     $0x87, %eax                             /* P, RW, U, PS */
        mov     $2048, %ecx
1:      mov     %eax, (%edi)
        add     $8, %edi
        add     $0x200000, %eax
        dec     %ecx
        jnz     1b
        mov     %cr4, %eax
        or      $0x20, %eax                             /* PAE */
        mov     %eax, %cr4
        mov     $PML4_AT, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx                       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        lgdt    gdt_descriptor
        mov     %cr0, %eax
        or      $0x80000001, %eax                       /* PG, PE */
        mov     %eax, %cr0
        ljmp    $0x10, $long64
        .code64
long64:
        mov     $0x18, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        SETUP64 idt
        movq    $0, COUNTER
        movq    $0, PHASE
        push    $0x23                   /* SS */
        push    $USTACK                 /* RSP */
        push    $0x3002                 /* RFLAGS: IOPL 3, IF 0 */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq
user:
        mov     $BUF, %rdi
        movabs  $MEM_END, %rsi
1:      movl    $1, (%rdi)              /* 1. every page once */
        add     $4096, %rdi
        cmp     %rsi, %rdi
        jb      1b
        movq    $1, PHASE
        movabs  $TICKS, %r10           /* 2. a page every TICKS ticks */
        movabs  $(TICKS * LAG), %r11
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %r8               /* the next page's deadline */
        mov     $BUF, %rdi
2:      rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        cmp     %r8, %rax
        jb      2b
        mov     %rax, %rcx
        sub     %r8, %rcx
        cmp     %r11, %rcx
        jb      3f
        mov     %rax, %r8               /* too far behind (paused): pace from now */
3:      add     %r10, %r8
        incq    COUNTER
        mov     COUNTER, %rax
        mov     %rax, (%rdi)
        add     $4096, %rdi
        cmp     %rsi, %rdi
        jb      2b
        mov     $BUF, %rdi
        jmp     2b

        .p2align 4
idt:    .fill   16, 1, 0
        IDT_END_AND_GDT64
        PVH_NOTE _start
