/* Says it panics on COM1, then tells the VMM through the pvpanic port (0x505): reads the
 * events the device supports (logged), writes PANICKED. Must never get past that write. */
        .include "common.inc"
        .set PVPANIC_PORT, 0x505
        .code32
        .text
        .globl _start
_start:
        mov     $message, %esi
1:      lodsb
        test    %al, %al
        jz      2f
        mov     $0x3f8, %dx
        out     %al, %dx
        jmp     1b
2:      mov     $PVPANIC_PORT, %dx
        xor     %eax, %eax
        in      %dx, %al
        LOG     %eax                    /* supported events: PANICKED | CRASH_LOADED */
        mov     $PVPANIC_PORT, %dx
        mov     $1, %al
        out     %al, %dx                /* PANICKED */
        LOG     $0xdead                 /* never reached: the VM has ended */
3:      hlt
        jmp     3b
message: .asciz "Kernel panic - not syncing: tiny guest\n"
        PVH_NOTE _start
