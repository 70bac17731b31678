/* Waits for the ACPI power button: enables PWRBTN_EN (PM1 enable, bit 8), logs 1, polls
 * PM1 status until PWRBTN_STS is set, clears it (write one), logs the status it saw, and
 * powers off through PM1 control -- what an ACPI guest does when its button is pressed. */
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
        POWER_OFF_NOW
        PVH_NOTE _start
