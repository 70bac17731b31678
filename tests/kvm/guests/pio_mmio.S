/* PIO of each width, string PIO, MMIO, and an unclaimed port; results go to the log. */
        .include "common.inc"
        .code32
        .text
        .globl _start
_start:
        mov     $0x500, %dx
        mov     $0x11, %al
        out     %al, %dx                /* outb 0x11 -> 0x500 */
        mov     $0x502, %dx
        mov     $0x2233, %ax
        out     %ax, %dx                /* outw -> 0x502 */
        mov     $0x504, %dx
        mov     $0x44556677, %eax
        out     %eax, %dx               /* outl -> 0x504 */
        mov     $0x500, %dx
        xor     %eax, %eax
        in      %dx, %al
        LOG     %eax                    /* inb 0x500 */
        mov     $0x504, %dx
        in      %dx, %eax
        LOG     %eax                    /* inl 0x504 */
        mov     $0x520, %dx
        in      %dx, %eax
        LOG     %eax                    /* unclaimed: all ones */
        movl    $0xcafebabe, 0xd0000000 /* MMIO write */
        movl    0xd0000004, %eax        /* MMIO read */
        LOG     %eax
        mov     $msg, %esi              /* rep outsb: one exit, count 4 */
        mov     $4, %ecx
        mov     $0x506, %dx
        rep outsb
        LOG     $0x600d
        POWER_OFF_NOW
msg:    .ascii  "abcd"
        PVH_NOTE _start
