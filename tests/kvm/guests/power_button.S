/* Waits for the ACPI power button: enables PWRBTN_EN (PM1 enable, bit 8), logs 1, polls
 * PM1 status until PWRBTN_STS is set, clears it (write one), logs the status it saw, and
 * powers off through PM1 control -- what an ACPI guest does when its button is pressed.
 * With IGNORE patched to 1 it goes back to waiting instead (enabled, but never obeys). */
        .include "common.inc"
        .code32
        .text
        .globl _start
_start:
        mov     $0x602, %dx             /* PM1a enable */
        mov     $0x0100, %ax            /* PWRBTN_EN */
        out     %ax, %dx
        LOG     $1
1:      mov     $0x600, %dx             /* PM1a status */
        in      %dx, %ax
        test    $0x0100, %ax
        jz      1b
        movzwl  %ax, %ebx
        mov     $0x0100, %ax            /* write one to clear PWRBTN_STS */
        out     %ax, %dx
        mov     $0x600, %dx
        in      %dx, %ax
        movzwl  %ax, %ecx
        LOG     %ebx                    /* the status seen with the button pressed */
        LOG     %ecx                    /* the status after the clear */
        cmpl    $0, ignore
        jne     1b                      /* IGNORE set: a guest that listens but never powers off */
        POWER_OFF_NOW

        .data
        .globl ignore
ignore: .long   0
        PVH_NOTE _start
