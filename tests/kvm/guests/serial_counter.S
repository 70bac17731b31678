/* Prints a line counter on COM1 for ever -- "00000001\n", "00000002\n", ... in hex --
 * with a short spin between lines; the counter is at 0x4000 too. 32-bit, CPL0 (port I/O
 * from CPL3 is refused on the nested host), so every instruction is emulated there: a
 * snapshot lands anywhere in the loop, mid-line included, and the restored guest must
 * continue the sequence with no byte lost or repeated. */
        .include "common.inc"
        .set COUNTER, 0x4000
        .set COM1, 0x3f8
        .set SPIN, 400
        .code32
        .text
        .globl _start
_start:
        movl    $0, COUNTER
line:
        incl    COUNTER
        mov     COUNTER, %ebx
        mov     $8, %ecx                /* eight hex digits, most significant first */
        mov     $COM1, %dx
1:      rol     $4, %ebx
        mov     %ebx, %eax
        and     $0xf, %eax
        cmp     $10, %eax
        jb      2f
        add     $39, %eax               /* 'a' - '0' - 10 */
2:      add     $48, %eax               /* '0' */
        out     %al, %dx
        dec     %ecx
        jnz     1b
        mov     $10, %al                /* '\n' */
        out     %al, %dx
        mov     $SPIN, %ecx
3:      dec     %ecx
        jnz     3b
        jmp     line
        PVH_NOTE _start
