/* 32-bit protected mode, CPL0, paging off (entered by PVH): LDMXCSR/STMXCSR operands decoded
 * as 32-bit code decodes them -- mod=00 rm=101 is an absolute disp32 (not RIP-relative),
 * DS is the default segment and its base applies, an ES prefix selects ES, an EBP base
 * selects SS, offsets wrap at 4 GiB -- and segment checks: a store through a read-only data
 * segment, and one past a segment's limit, raise #GP(0). Results are read back through a
 * flat segment and logged; the #GP handler logs 0x0d, the error code and EIP. */
        .include "common.inc"
        .set FLAT_CODE, 0x08
        .set FLAT_DATA, 0x10
        .set DATA_300000, 0x18          /* base 0x300000 */
        .set DATA_400000, 0x20          /* base 0x400000 */
        .set READ_ONLY, 0x28            /* base 0, read-only */
        .set SMALL, 0x30                /* base 0, limit 0xfff */
        .code32
        .text
        .globl _start
_start:
        lgdt    gdt_descriptor
        ljmp    $FLAT_CODE, $1f
1:      mov     $FLAT_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     $0x1f0000, %esp
        mov     $gp_handler, %eax
        mov     %ax, gp_gate
        shr     $16, %eax
        mov     %ax, gp_gate + 6
        lidt    idt_descriptor
        mov     %cr4, %eax
        or      $0x200, %eax            /* OSFXSR: SSE on */
        mov     %eax, %cr4
        movl    $0x1fa0, 0x400200       /* the value to load, in ES's segment below */
        LOG     $0x1111

        /* mod=00 rm=101 with DS based at 0x300000: linear 0x300100 */
        mov     $DATA_300000, %ax
        mov     %ax, %ds
        .globl store_absolute
store_absolute:
        stmxcsr 0x100
        mov     %es:0x300100, %eax
        LOG     %eax                    /* 0x1f80 */

        /* an ES override (base 0x400000): loads from linear 0x400200 */
        mov     $DATA_400000, %ax
        mov     %ax, %es
        .globl load_es
load_es:
        ldmxcsr %es:0x200
        mov     $FLAT_DATA, %ax
        mov     %ax, %es
        stmxcsr 0x104
        mov     %es:0x300104, %eax
        LOG     %eax                    /* 0x1fa0 */

        /* an EBP base goes through SS (flat), not DS */
        mov     $0x500000, %ebp
        .globl store_ebp
store_ebp:
        stmxcsr 8(%ebp)
        mov     %es:0x500008, %eax
        LOG     %eax                    /* 0x1fa0 */
        mov     %es:0x800008, %eax
        LOG     %eax                    /* 0: DS's base was not used */

        /* DS base 0x300000 + offset 0xfff00010 wraps to 0x200010 */
        mov     $0xfff00010, %ebx
        .globl store_wrap
store_wrap:
        stmxcsr (%ebx)
        mov     %es:0x200010, %eax
        LOG     %eax                    /* 0x1fa0 */

        /* through a read-only data segment: #GP(0) */
        movl    $2f, %es:continuation
        mov     $READ_ONLY, %ax
        mov     %ax, %ds
        .globl store_read_only
store_read_only:
        stmxcsr 0x300
2:
        /* past the limit of a 4 KiB segment: #GP(0) */
        movl    $3f, %es:continuation
        mov     $SMALL, %ax
        mov     %ax, %ds
        .globl store_past_limit
store_past_limit:
        stmxcsr 0xffe
3:      LOG     $0x600d
        POWER_OFF_NOW

gp_handler:
        LOG     $0x0d
        mov     (%esp), %ebx
        LOG     %ebx                    /* error code */
        mov     4(%esp), %ebx
        LOG     %ebx                    /* EIP */
        mov     $FLAT_DATA, %ax
        mov     %ax, %ds
        mov     $0x1f0000, %esp
        jmp     *continuation

        .p2align 3
gdt:    .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08 flat code */
        .quad   0x00cf92000000ffff      /* 0x10 flat data */
        .quad   0x00cf92300000ffff      /* 0x18 data, base 0x300000 */
        .quad   0x00cf92400000ffff      /* 0x20 data, base 0x400000 */
        .quad   0x00cf90000000ffff      /* 0x28 data, read-only */
        .quad   0x0040920000000fff      /* 0x30 data, limit 0xfff, byte-granular */
gdt_end:
gdt_descriptor:
        .word   gdt_end - gdt - 1
        .long   gdt
        .p2align 3
idt:    .fill   13 * 8, 1, 0
gp_gate:
        .word   0                       /* 13: 32-bit interrupt gate; offset filled at run time */
        .word   FLAT_CODE
        .byte   0, 0x8e
        .word   0
idt_end:
idt_descriptor:
        .word   idt_end - idt - 1
        .long   idt
        .p2align 2
continuation: .long 0
        PVH_NOTE _start
