/* PIO of each width, string PIO, MMIO, and an unclaimed port; results go to the log. */
        .include "common.inc"
        .code32
        .text
        .globl _start
_start:
        mov     $0x520, %dx
        mov     $0x11, %al
        out     %al, %dx                /* outb 0x11 -> 0x520 */
        mov     $0x522, %dx
        mov     $0x2233, %ax
        out     %ax, %dx                /* outw -> 0x522 */
        mov     $0x524, %dx
        mov     $0x44556677, %eax
        out     %eax, %dx               /* outl -> 0x524 */
        mov     $0x520, %dx
        xor     %eax, %eax
        in      %dx, %al
        LOG     %eax                    /* inb 0x520 */
        mov     $0x524, %dx
        in      %dx, %eax
        LOG     %eax                    /* inl 0x524 */
        mov     $0x540, %dx
        in      %dx, %eax
        LOG     %eax                    /* unclaimed: all ones */
        movl    $0xcafebabe, 0xd0000000 /* MMIO write */
        movl    0xd0000004, %eax        /* MMIO read */
        LOG     %eax
        mov     $msg, %esi              /* rep outsb: one exit, count 4 */
        mov     $4, %ecx
        mov     $0x526, %dx
        rep outsb
        LOG     $0x600d
        POWER_OFF_NOW
msg:    .ascii  "abcd"
        PVH_NOTE _start
