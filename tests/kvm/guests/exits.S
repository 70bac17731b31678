/* The exit-cost guest: `out %al, $0x12` N times (N in EDI... here from the command line is
 * overkill: the count is patched at offset `count` by the benchmark), then power off.
 * Same instructions as ../shared/tools/kvm_exit_floor.c's guest, in 32-bit mode. */
        .include "common.inc"
        .code32
        .text
        .globl _start
_start:
        mov     count, %ecx
1:      out     %al, $0x12
        dec     %ecx
        jnz     1b
        POWER_OFF_NOW
        .p2align 2
        .globl count
count:  .long   1000
        PVH_NOTE _start
