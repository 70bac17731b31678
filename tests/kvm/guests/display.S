/* 64-bit, for the display tests: draws into the framebuffer at CPL3 (native speed on the
 * nested host) and stores the scancodes the i8042 delivers on IRQ 1.
 *
 * CPL0 set-up: the #GP and IRQ 1 (PIC vector 0x21) gates, the 8259 PIC (IRQ 1 only), the
 * framebuffer's 2 MiB pages made user-accessible. At CPL3 it draws the pattern
 *     pixel (x, y) = XRGB (x & 0xff, y & 0xff, BLUE)
 * over WIDTH x HEIGHT pixels at FB (all three patched by the tests; BLUE starts at 0x80).
 * Then, unless BUSY: `hlt` at CPL3 faults (#GP), whose handler sets DONE (0x4000) to 1 and
 * halts at CPL0 with interrupts on: an idle guest that never touches the screen again.
 * With BUSY set it redraws for ever, BLUE + 1 each time, and counts passes in DONE.
 * IRQ 1: the byte at port 0x60 goes to KEYS (0x5000 + count, count at 0x4ff0), and a
 * 16 x 16 square at (0, 0) is painted XRGB(code, code, code); Escape (0x01) powers off. */
        .include "common.inc"
        .include "long64.inc"
        .set DONE, 0x4000
        .set KEYCOUNT, 0x4ff0
        .set KEYS, 0x5000
        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+13*16, to_idle
        FILL_GATE idt+0x21*16, kbd_irq
        USER_LOW_2M
        movl    $0, DONE
        movl    $0, KEYCOUNT
        /* the framebuffer's 2 MiB pages user-accessible: PML4[0], PDPT[FB >> 30], 4 PDEs */
        mov     fb(%rip), %eax
        mov     %rax, %rbx
        shr     $30, %rbx
        orq     $0x4, 0xa000(,%rbx,8)
        shr     $21, %rax               /* PDE index over the four page directories */
        lea     PD(,%rax,8), %rdi
        orq     $0x4, (%rdi)
        orq     $0x4, 8(%rdi)
        orq     $0x4, 16(%rdi)
        orq     $0x4, 24(%rdi)
        mov     %cr3, %rax
        mov     %rax, %cr3
        /* 8259s: vector bases 0x20 / 0x28, cascade on IRQ 2, 8086 mode; only IRQ 1 open */
        mov     $0x11, %al
        out     %al, $0x20
        out     %al, $0xa0
        mov     $0x20, %al
        out     %al, $0x21
        mov     $0x28, %al
        out     %al, $0xa1
        mov     $0x04, %al
        out     %al, $0x21
        mov     $0x02, %al
        out     %al, $0xa1
        mov     $0x01, %al
        out     %al, $0x21
        out     %al, $0xa1
        mov     $0xfd, %al
        out     %al, $0x21
        mov     $0xff, %al
        out     %al, $0xa1
        LOG     $0x3333
        push    $0x23                   /* SS */
        push    $0x8f00                 /* RSP */
        push    $0x3002                 /* RFLAGS: IOPL 3, IF 0 */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq

user:
        mov     blue(%rip), %r10d
1:      mov     fb(%rip), %edi
        mov     height(%rip), %r9d
        xor     %ecx, %ecx              /* y */
2:      mov     width(%rip), %r8d
        xor     %edx, %edx              /* x */
3:      movzbl  %dl, %eax
        shl     $16, %eax
        movzbl  %cl, %ebx
        shl     $8, %ebx
        or      %ebx, %eax
        movzbl  %r10b, %ebx
        or      %ebx, %eax
        mov     %eax, (%rdi)
        add     $4, %rdi
        inc     %edx
        cmp     %r8d, %edx
        jb      3b
        inc     %ecx
        cmp     %r9d, %ecx
        jb      2b
        cmpl    $0, busy(%rip)
        je      4f
        incl    DONE
        inc     %r10d
        jmp     1b
4:      hlt                             /* #GP at CPL3: on to the CPL0 idle loop */

to_idle:
        mov     $KSTACK, %rsp
        movl    $1, DONE
        LOG     $0x4444
        sti
5:      hlt
        jmp     5b

kbd_irq:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdi
        in      $0x60, %al
        movzbl  %al, %eax
        mov     KEYCOUNT, %ebx
        and     $0xfff, %ebx
        mov     %al, KEYS(%rbx)
        incl    KEYCOUNT
        mov     %eax, %ebx              /* the square's colour: the code in R, G and B */
        shl     $8, %ebx
        or      %eax, %ebx
        shl     $8, %ebx
        or      %eax, %ebx
        mov     fb(%rip), %edi
        mov     $16, %ecx
6:      mov     %ebx, (%rdi)
        mov     %ebx, 4(%rdi)
        mov     %ebx, 8(%rdi)
        mov     %ebx, 12(%rdi)
        mov     %ebx, 16(%rdi)
        mov     %ebx, 20(%rdi)
        mov     %ebx, 24(%rdi)
        mov     %ebx, 28(%rdi)
        mov     %ebx, 32(%rdi)
        mov     %ebx, 36(%rdi)
        mov     %ebx, 40(%rdi)
        mov     %ebx, 44(%rdi)
        mov     %ebx, 48(%rdi)
        mov     %ebx, 52(%rdi)
        mov     %ebx, 56(%rdi)
        mov     %ebx, 60(%rdi)
        mov     width(%rip), %eax
        lea     (%rdi,%rax,4), %rdi
        dec     %ecx
        jnz     6b
        cmp     $0x01, %bl              /* Escape pressed (the code is in the colour): power off */
        jne     7f
        POWER_OFF_NOW
7:      mov     $0x20, %al              /* EOI to the master PIC */
        out     %al, $0x20
        pop     %rdi
        pop     %rcx
        pop     %rbx
        pop     %rax
        iretq

        .p2align 2
        .globl fb, width, height, blue, busy
fb:     .long   0xf4000000
width:  .long   320
height: .long   200
blue:   .long   0x80
busy:   .long   0

        .p2align 4
idt:    .fill   13 * 16, 1, 0
        GATE    to_idle                 /* 13: #GP */
        .fill   (0x21 - 14) * 16, 1, 0
        GATE    kbd_irq                 /* 0x21: IRQ 1 */
        IDT_END_AND_GDT64
