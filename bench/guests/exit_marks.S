/* The exit-cost guest of `python -m bench`: tests/kvm/guests/exits.S's loop (`out %al,
 * $EXIT_PORT`; dec; jnz) run COUNT times, then one byte written to the serial port (COM1)
 * as a mark, MARKS times over; then power off. EXIT_PORT, COUNT and MARKS are set when
 * assembling (as --defsym). The benchmark aims EXIT_PORT at 0x70, the CMOS RTC index port
 * trivmm claims, for the CLI and the Python floor, and at 0x12 for the API path. The marks
 * let it time the loop from outside a process (trivmm copies them to stdout; the Python
 * floor writes a byte per COUNT + 1 exits itself), leaving start-up out. */
        .include "common.inc"
        .set    COM1, 0x3f8
        .code32
        .text
        .globl _start
_start:
        mov     $COM1, %dx
        mov     $'.', %al
        mov     $MARKS, %ebx
2:      mov     $COUNT, %ecx
1:      out     %al, $EXIT_PORT
        dec     %ecx
        jnz     1b
        out     %al, %dx
        dec     %ebx
        jnz     2b
        POWER_OFF_NOW
        PVH_NOTE _start
