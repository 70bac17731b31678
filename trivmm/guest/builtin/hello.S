/* trivmm's built-in guest: a PVH kernel of a few hundred bytes.
 *
 * Entered by the PVH boot protocol (32-bit protected mode, paging off, EBX = physical
 * address of struct hvm_start_info), it prints a greeting and the command line it was
 * given on the 16550 UART at 0x3f8, then powers the VM off through the ACPI PM1a control
 * register at 0x604 (SLP_TYP = 5, SLP_EN), the same path a Linux guest's poweroff takes.
 *
 * Rebuild with `python -m trivmm guest builtin` (GNU as and ld); a test checks that the
 * shipped hello.elf is what this source assembles to.
 */
        .code32
        .section .text
        .globl _start
_start:
        mov     $0x9000, %esp
        mov     $greeting, %esi
        call    puts
        mov     24(%ebx), %esi          /* hvm_start_info.cmdline_paddr (low 32 bits) */
        test    %esi, %esi
        jz      1f
        call    puts
1:      mov     $newline, %esi
        call    puts
        mov     $0x604, %dx             /* ACPI PM1a control */
        mov     $0x3400, %ax            /* SLP_TYP = 5 << 10 | SLP_EN (1 << 13) */
        out     %ax, %dx
2:      hlt
        jmp     2b

/* puts: write the NUL-terminated string at %esi to COM1, waiting for THR empty. */
puts:
        mov     $0x3fd, %dx             /* line status register */
3:      in      %dx, %al
        test    $0x20, %al
        jz      3b
        lodsb
        test    %al, %al
        jz      4f
        mov     $0x3f8, %dx
        out     %al, %dx
        jmp     puts
4:      ret

        .section .rodata
greeting:
        .asciz  "Hello from the trivmm built-in guest! cmdline: "
newline:
        .asciz  "\r\n"

        /* XEN_ELFNOTE_PHYS32_ENTRY: where a PVH loader jumps. */
        .section .note.Xen, "a", @note
        .p2align 2
        .long   4, 4, 18
        .asciz  "Xen"
        .p2align 2
        .long   _start
