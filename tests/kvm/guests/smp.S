/* The BSP wakes the AP with INIT-SIPI-SIPI through the in-kernel LAPIC; the AP (real mode,
 * at 0x8000) logs its initial APIC id from CPUID and bumps a counter the BSP waits for. */
        .include "common.inc"
        .set LAPIC, 0xfee00000
        .set AP_COUNTER, 0x9000
        .code32
        .text
        .globl _start
_start:
        movl    $0, AP_COUNTER
        mov     $trampoline, %esi       /* copy the AP's real-mode code to 0x8000 */
        mov     $0x8000, %edi
        mov     $(trampoline_end - trampoline), %ecx
        rep movsb
        movl    $0x1ff, LAPIC + 0xf0    /* spurious vector register: APIC on */
        movl    $(1 << 24), LAPIC + 0x310
        movl    $0x00004500, LAPIC + 0x300  /* INIT */
        movl    $0x00004608, LAPIC + 0x300  /* SIPI, vector 0x08 -> 0x8000 */
        movl    $0x00004608, LAPIC + 0x300  /* SIPI again, as the MP spec says */
1:      cmpl    $0, AP_COUNTER
        je      1b
        LOG     $0xb5b5
        POWER_OFF_NOW

        .code16
trampoline:
        cli
        mov     $1, %eax
        cpuid
        shr     $24, %ebx
        mov     %ebx, %eax
        mov     $LOG_PORT, %dx
        out     %eax, %dx               /* log the AP's APIC id */
        xor     %ax, %ax
        mov     %ax, %ds
        lock incl AP_COUNTER
2:      hlt
        jmp     2b
trampoline_end:
        .code32
        PVH_NOTE _start
