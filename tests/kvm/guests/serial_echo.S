/* Enables the UART's receive interrupt... and polls: waits for bytes on COM1 (LSR bit 0),
 * logs each, and powers off after a newline. Exercises host -> guest console input. */
        .include "common.inc"
        .code32
        .text
        .globl _start
_start:
        mov     $0x3f9, %dx             /* IER: received-data interrupt on (level seen by KVM) */
        mov     $0x01, %al
        out     %al, %dx
1:      mov     $0x3fd, %dx             /* LSR */
        in      %dx, %al
        test    $0x01, %al
        jz      1b
        mov     $0x3f8, %dx             /* RBR */
        xor     %eax, %eax
        in      %dx, %al
        mov     %eax, %ebx
        LOG     %ebx
        cmp     $0x0a, %bl
        jne     1b
        POWER_OFF_NOW
        PVH_NOTE _start
