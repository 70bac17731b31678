/* The guest of `python -m bench.virtio_blk`: a virtio-blk driver over virtio-mmio whose hot
 * loop runs at CPL3 (native speed on the project's nested host), polling the used ring.
 *
 * Entered by the 64-bit (linux64) protocol: long mode, the VMM's identity map of 4 GiB in
 * 2 MiB pages (PML4 0x9000, PDPT 0xa000, PDs from 0xb000). At CPL0 it sets the U bit on the
 * first 64 MiB and on the 2 MiB page of the first virtio-mmio slot (0xF000_0000), installs
 * fault handlers, and initialises the device: reset, ACKNOWLEDGE|DRIVER, the features
 * VERSION_1, RING_EVENT_IDX and (INDIRECT = 1) INDIRECT_DESC -- nothing device-specific --,
 * FEATURES_OK, queue 0 of QSIZE entries, DRIVER_OK: a few dozen MMIO exits. Then `iretq` to
 * CPL3 (IF = 0) for the rest:
 *
 * - DEPTH request slots, each three descriptors (header: 16 bytes, IN, the sector; data:
 *   REQUEST_SECTORS * 512 bytes, device-writable; status: 1 byte, device-writable): at
 *   4 * slot of the ring's descriptor table, or (INDIRECT = 1) in an indirect table of the
 *   slot's own that descriptor `slot` of the ring's table points to, as Linux lays out a
 *   block request when VIRTIO_F_INDIRECT_DESC is negotiated;
 * - every data page touched once (the first touch of a page costs a shadow-paging fault on
 *   the nested host: paid here, before the timed part), READY set; then it spins until the
 *   host sets GO;
 * - DEPTH requests made available; then, until COUNT requests are done: poll used.idx, and
 *   for each used entry check the status byte (non-zero: ERRORS) and the data (the first u64
 *   of the buffer must be the request's first sector number, and the first u64 of its last
 *   512 bytes that sector plus REQUEST_SECTORS - 1: the benchmark's disk starts every sector
 *   with its own number; otherwise MISMATCHES, once per request), and re-submit the slot
 *   while fewer than COUNT requests were submitted. Before each submission the status byte
 *   is set to 0xff and both checked words to all-ones, so a request the device did not
 *   really serve cannot pass. After each pass over the new used entries: used_event set
 *   0x8000 past what was consumed (no used-buffer interrupt ever: the guest polls), avail.idx
 *   published, and QueueNotify written only when vring_need_event(avail_event, new, old)
 *   says the device waits for it (a 32-bit write at 0xF000_0050, which KVM serves through the
 *   VM's ioeventfd: no exit to the VMM);
 * - a used.idx that claims more new entries than there are requests outstanding is not
 *   taken: trivmm stores used.idx with struct.pack_into, which zeroes the field before it
 *   stores the value, so a driver polling from another CPU can read 0 in between. Such reads
 *   are counted in TORN and polled again. COUNT stays below 65536 for that: the 16-bit ring
 *   indices never wrap, so 0 is never a real new value;
 * - FINISHED set, then a spin until the host sets ACK, then `hlt`, which takes #GP at CPL3;
 *   the #GP handler (CPL0) powers off through ACPI PM1a. Any other fault, or a failure while
 *   initialising, records what happened in the results block and powers off.
 *
 * Sectors: sequential (RANDOM = 0) walks the disk in REQUEST_SECTORS steps from sector 0,
 * wrapping after BLOCKS_MASK + 1 requests; random (RANDOM = 1) takes block
 * (xorshift64(state) & BLOCKS_MASK), the state starting at SEED and advanced once per
 * submission (x ^= x << 13; x ^= x >> 7; x ^= x << 17), sector = block * REQUEST_SECTORS.
 * The disk must be at least (BLOCKS_MASK + 1) * REQUEST_SECTORS sectors.
 *
 * Parameters (as --defsym): COUNT (requests in all, 1..65535), DEPTH (in flight: 1..64, or
 * with INDIRECT 1..256), REQUEST_SECTORS (1..256), BLOCKS_MASK (a power of two minus one,
 * < 2^31), RANDOM, SEED, INDIRECT.
 *
 * Results: u64 words at RESULTS (0x5000), read by the host through vm.memory; the offsets are
 * below and in bench/virtio_blk.py. */
        .include "common.inc"
        .include "long64.inc"

        .set MMIO, 0xF0000000           /* trivmm.boot.layout.VIRTIO_MMIO_BASE: the first slot */
        .set QSIZE, 256
        .set RING, 0x300000
        .set DESC, RING                 /* 16 bytes x QSIZE */
        .set AVAIL, RING + 0x1000       /* flags, idx, ring[QSIZE], used_event */
        .set USED, RING + 0x2000        /* flags, idx, ring[QSIZE] of (id u32, len u32), avail_event */
        .set USED_EVENT, AVAIL + 4 + 2 * QSIZE
        .set AVAIL_EVENT, USED + 4 + 8 * QSIZE
        .set SLOTS, 0x310000            /* 32 bytes per slot: header (16), status (1) */
        .set TABLES, 0x320000           /* INDIRECT: 64 bytes per slot, three descriptors */
        .set DATA, 0x400000             /* REQUEST_BYTES per slot */
        .set REQUEST_BYTES, REQUEST_SECTORS * 512
        .set USER_PDES, 32              /* U bit on the first 64 MiB */
        .set USTACK, 0x8f00

        .set RESULTS, 0x5000
        .set READY, RESULTS + 0x00      /* guest: set up, waiting for GO */
        .set GO, RESULTS + 0x08         /* host: start */
        .set FINISHED, RESULTS + 0x10   /* guest: COUNT requests done */
        .set ACK, RESULTS + 0x18        /* host: seen; power off */
        .set DONE, RESULTS + 0x20       /* requests completed (updated after each pass) */
        .set ERRORS, RESULTS + 0x28     /* completed with a non-zero status */
        .set MISMATCHES, RESULTS + 0x30 /* completed with data that is not the sectors asked for */
        .set KICKS, RESULTS + 0x38      /* QueueNotify writes */
        .set SPINS, RESULTS + 0x40      /* polls of used.idx that found nothing new */
        .set FAIL, RESULTS + 0x48       /* why initialisation (or the loop) gave up: see fail codes */
        .set FAULT, RESULTS + 0x50      /* 0x100 | vector of the fault that ended the guest */
        .set FAULT_RIP, RESULTS + 0x58
        .set FAULT_CR2, RESULTS + 0x60
        .set FAULT_ERROR, RESULTS + 0x68
        .set BAD_EXPECTED, RESULTS + 0x70 /* the first mismatch: the sector number expected */
        .set BAD_SEEN, RESULTS + 0x78   /* ... and the u64 found */
        .set PASSES, RESULTS + 0x80     /* passes over the used ring that found new entries */
        .set TORN, RESULTS + 0x88       /* used.idx reads rejected: more new entries than outstanding */
        .set SECTOR_SUM, RESULTS + 0x90 /* the first sectors of all requests submitted, summed (mod 2^64) */

        .code64
        .text
        .globl _start
_start:
        SETUP64 idt
        FILL_GATE idt+6*16, ud_handler
        FILL_GATE idt+13*16, gp_handler
        FILL_GATE idt+14*16, pf_handler

        orq     $4, 0x9000              /* PML4[0] */
        orq     $4, 0xa000              /* PDPT[0]: the first GiB */
        orq     $4, 0xa018              /* PDPT[3]: the last GiB below 4 GiB */
        mov     $PD, %edi
        mov     $USER_PDES, %ecx
1:      orq     $4, (%rdi)
        add     $8, %rdi
        dec     %ecx
        jnz     1b
        orq     $4, PD + 3 * 0x1000 + ((MMIO - 0xC0000000) >> 21) * 8
        mov     %cr3, %rax
        mov     %rax, %cr3

        /* The device (virtio-mmio registers: trivmm/devices/virtio/mmio.py). */
        mov     $MMIO, %ebx
        mov     0x000(%rbx), %eax
        cmp     $0x74726976, %eax       /* "virt" */
        jne     fail_magic
        mov     0x004(%rbx), %eax
        cmp     $2, %eax                /* version 2 (virtio 1.x) */
        jne     fail_version
        mov     0x008(%rbx), %eax
        cmp     $2, %eax                /* block device */
        jne     fail_device
        movl    $0, 0x070(%rbx)         /* reset */
        movl    $3, 0x070(%rbx)         /* ACKNOWLEDGE | DRIVER */
        movl    $1, 0x014(%rbx)         /* device features, bits 32..63 */
        mov     0x010(%rbx), %eax
        test    $1, %eax                /* VIRTIO_F_VERSION_1 */
        jz      fail_version1
        movl    $0, 0x014(%rbx)
        mov     0x010(%rbx), %eax
        test    $1 << 29, %eax          /* VIRTIO_F_RING_EVENT_IDX */
        jz      fail_event_idx
.if INDIRECT
        test    $1 << 28, %eax          /* VIRTIO_F_INDIRECT_DESC */
        jz      fail_indirect
.endif
        movl    $0, 0x024(%rbx)         /* driver features: EVENT_IDX (INDIRECT_DESC), VERSION_1 */
        movl    $1 << 29 | INDIRECT << 28, 0x020(%rbx)
        movl    $1, 0x024(%rbx)
        movl    $1, 0x020(%rbx)
        movl    $11, 0x070(%rbx)        /* | FEATURES_OK */
        mov     0x070(%rbx), %eax
        test    $8, %eax
        jz      fail_features
        mov     0x100(%rbx), %eax       /* config: capacity (u64, sectors) */
        mov     0x104(%rbx), %edx
        shl     $32, %rdx
        or      %rax, %rdx
        mov     $BLOCKS_MASK + 1, %rax
        imul    $REQUEST_SECTORS, %rax
        cmp     %rax, %rdx
        jb      fail_capacity
        movl    $0, 0x030(%rbx)         /* queue 0 */
        mov     0x034(%rbx), %eax
        cmp     $QSIZE, %eax
        jb      fail_queue_size
        movl    $QSIZE, 0x038(%rbx)
        movl    $DESC, 0x080(%rbx)
        movl    $0, 0x084(%rbx)
        movl    $AVAIL, 0x090(%rbx)
        movl    $0, 0x094(%rbx)
        movl    $USED, 0x0a0(%rbx)
        movl    $0, 0x0a4(%rbx)
        movl    $1, 0x044(%rbx)         /* QueueReady */
        mov     0x044(%rbx), %eax
        test    $1, %eax
        jz      fail_queue_ready
        movl    $15, 0x070(%rbx)        /* | DRIVER_OK */
        mov     0x070(%rbx), %eax
        test    $0x40, %eax             /* DEVICE_NEEDS_RESET */
        jnz     fail_needs_reset

        push    $0x23                   /* SS: user data */
        push    $USTACK                 /* RSP */
        push    $0x2                    /* RFLAGS: IF 0 */
        push    $0x2b                   /* CS: user code */
        lea     user(%rip), %rax
        push    %rax
        iretq

fail_magic:       mov $1, %eax; jmp fail
fail_version:     mov $2, %eax; jmp fail
fail_device:      mov $3, %eax; jmp fail
fail_version1:    mov $4, %eax; jmp fail
fail_event_idx:   mov $5, %eax; jmp fail
fail_features:    mov $6, %eax; jmp fail
fail_capacity:    mov $7, %eax; jmp fail
fail_queue_size:  mov $8, %eax; jmp fail
fail_queue_ready: mov $9, %eax; jmp fail
fail_needs_reset: mov $10, %eax; jmp fail
fail_indirect:    mov $12, %eax; jmp fail
fail:   mov     %rax, FAIL
        POWER_OFF_NOW

ud_handler:                             /* #UD: no error code */
        movq    $0x106, FAULT
        mov     (%rsp), %rax
        mov     %rax, FAULT_RIP
        jmp     fault
gp_handler:                             /* #GP: the `hlt` at the end, or a bug */
        movq    $0x10d, FAULT
        jmp     fault_with_error
pf_handler:
        movq    $0x10e, FAULT
fault_with_error:
        mov     (%rsp), %rax
        mov     %rax, FAULT_ERROR
        mov     8(%rsp), %rax
        mov     %rax, FAULT_RIP
fault:  mov     %cr2, %rax
        mov     %rax, FAULT_CR2
        POWER_OFF_NOW

/* --- CPL3 from here on ------------------------------------------------------------------ */
user:
        /* Descriptors: slot s owns 4s (header), 4s+1 (data), 4s+2 (status) of the ring's
         * table; with INDIRECT, descriptor s of the ring's table points to the slot's own
         * table of those three, at TABLES + 64s. */
        xor     %ecx, %ecx
1:      mov     %rcx, %rdi
        shl     $6, %rdi
.if INDIRECT
        add     $TABLES, %rdi
        mov     %rcx, %rax
        shl     $4, %rax
        mov     %rdi, DESC(%rax)
        movl    $48, DESC + 8(%rax)
        movw    $4, DESC + 12(%rax)     /* INDIRECT */
        movw    $0, DESC + 14(%rax)
        mov     %rcx, %rdx
        shl     $5, %rdx
        add     $SLOTS, %rdx
        mov     %rdx, (%rdi)            /* header */
        movl    $16, 8(%rdi)
        movw    $1, 12(%rdi)            /* NEXT */
        movw    $1, 14(%rdi)
        imul    $REQUEST_BYTES, %rcx, %rax
        add     $DATA, %rax
        mov     %rax, 16(%rdi)          /* data */
        movl    $REQUEST_BYTES, 24(%rdi)
        movw    $3, 28(%rdi)            /* NEXT | WRITE */
        movw    $2, 30(%rdi)
.else
        add     $DESC, %rdi
        mov     %rcx, %rdx
        shl     $5, %rdx
        add     $SLOTS, %rdx
        mov     %rdx, (%rdi)            /* header */
        movl    $16, 8(%rdi)
        movw    $1, 12(%rdi)            /* NEXT */
        lea     1(,%rcx,4), %eax
        mov     %ax, 14(%rdi)
        imul    $REQUEST_BYTES, %rcx, %rax
        add     $DATA, %rax
        mov     %rax, 16(%rdi)          /* data */
        movl    $REQUEST_BYTES, 24(%rdi)
        movw    $3, 28(%rdi)            /* NEXT | WRITE */
        lea     2(,%rcx,4), %eax
        mov     %ax, 30(%rdi)
.endif
        lea     16(%rdx), %rax
        mov     %rax, 32(%rdi)          /* status */
        movl    $1, 40(%rdi)
        movw    $2, 44(%rdi)            /* WRITE */
        movw    $0, 46(%rdi)
        movl    $0, (%rdx)              /* header: type IN, reserved 0 */
        movl    $0, 4(%rdx)
        inc     %ecx
        cmp     $DEPTH, %ecx
        jb      1b

        /* Touch every page of the data buffers once. */
        mov     $DATA, %edi
        mov     $DEPTH * REQUEST_BYTES / 4096, %ecx
2:      movb    $0, (%rdi)
        add     $4096, %rdi
        dec     %ecx
        jnz     2b

        movw    $1, AVAIL               /* VIRTQ_AVAIL_F_NO_INTERRUPT (ignored with EVENT_IDX) */
        movw    $0x8000, USED_EVENT     /* no used-buffer interrupt: far from any index */
        movabs  $SEED, %r8              /* PRNG state (random) or next block (sequential) */
.if RANDOM == 0
        xor     %r8d, %r8d
.endif
        xor     %r9d, %r9d              /* spins */
        xor     %r10d, %r10d            /* passes */
        xor     %r12d, %r12d            /* used entries consumed (mod 2^32) */
        xor     %r13d, %r13d            /* avail entries written */
        xor     %r14d, %r14d            /* requests submitted */
        xor     %r15d, %r15d            /* requests done */
        xor     %ebp, %ebp              /* avail.idx as last published */

        movq    $1, READY
3:      pause
        cmpq    $0, GO
        je      3b

        xor     %ecx, %ecx              /* the first DEPTH requests (fewer if COUNT is smaller) */
4:      cmp     $COUNT, %r14
        jae     5f
        call    submit
        inc     %ecx
        cmp     $DEPTH, %ecx
        jb      4b
5:      call    publish

poll:   movzwl  USED + 2, %eax          /* used.idx */
        mov     %eax, %edx
        sub     %r12d, %edx
        movzwl  %dx, %edx               /* entries new since the last pass */
        jz      spin
        mov     %r13d, %esi
        sub     %r12d, %esi             /* entries outstanding */
        cmp     %esi, %edx
        jbe     reap
        incq    TORN                    /* more than can be: a value caught mid-update */
spin:   inc     %r9
        pause
        jmp     poll

reap:   mov     %eax, %r11d             /* consume up to this used.idx */
        inc     %r10
6:      mov     %r12d, %eax
        and     $QSIZE - 1, %eax
        mov     USED + 4(,%rax,8), %ecx /* id: the head descriptor, 4 * slot (INDIRECT: slot) */
.if INDIRECT == 0
        test    $3, %ecx
        jnz     bad_id
        shr     $2, %ecx
.endif
        cmp     $DEPTH, %ecx
        jae     bad_id
        mov     %rcx, %rdx
        shl     $5, %rdx
        cmpb    $0, SLOTS + 16(%rdx)    /* status */
        je      7f
        incq    ERRORS
7:      mov     SLOTS + 8(%rdx), %rax   /* the sector asked for */
        imul    $REQUEST_BYTES, %rcx, %rsi
        mov     DATA(%rsi), %rdi
        cmp     %rdi, %rax
        jne     8f
        add     $REQUEST_SECTORS - 1, %rax
        mov     DATA + REQUEST_BYTES - 512(%rsi), %rdi
        cmp     %rdi, %rax
        je      9f
8:      cmpq    $0, MISMATCHES
        jne     10f
        mov     %rax, BAD_EXPECTED
        mov     %rdi, BAD_SEEN
10:     incq    MISMATCHES
9:      inc     %r15
        inc     %r12d
        cmp     $COUNT, %r14
        jae     11f
        call    submit                  /* the same slot again */
11:     cmp     %r12w, %r11w
        jne     6b
        lea     0x8000(%r12), %eax
        mov     %ax, USED_EVENT
        mov     %r15, DONE
        call    publish
        cmp     $COUNT, %r15
        jb      poll

        mov     %r9, SPINS
        mov     %r10, PASSES
        movq    $1, FINISHED
12:     pause
        cmpq    $0, ACK
        je      12b
        hlt                             /* #GP at CPL3: the handler powers off */

bad_id: mov     %rcx, BAD_SEEN
        movq    $11, FAIL
        hlt

/* Make slot %rcx's next request available (not yet published). Clobbers rax, rdx, rsi. */
submit:
.if RANDOM
        mov     %r8, %rax
        shl     $13, %rax
        xor     %rax, %r8
        mov     %r8, %rax
        shr     $7, %rax
        xor     %rax, %r8
        mov     %r8, %rax
        shl     $17, %rax
        xor     %rax, %r8
        mov     %r8, %rax
.else
        mov     %r8, %rax
        inc     %r8
.endif
        and     $BLOCKS_MASK, %rax
        imul    $REQUEST_SECTORS, %rax
        add     %rax, SECTOR_SUM
        mov     %rcx, %rdx
        shl     $5, %rdx
        mov     %rax, SLOTS + 8(%rdx)   /* header.sector */
        movb    $0xff, SLOTS + 16(%rdx) /* status: not yet */
        imul    $REQUEST_BYTES, %rcx, %rsi
        movq    $-1, DATA(%rsi)
        movq    $-1, DATA + REQUEST_BYTES - 512(%rsi)
        mov     %r13d, %eax
        and     $QSIZE - 1, %eax
.if INDIRECT
        mov     %ecx, %edx
.else
        lea     (,%rcx,4), %edx
.endif
        mov     %dx, AVAIL + 4(,%rax,2)
        inc     %r13d
        inc     %r14
        ret

/* Publish avail.idx; notify the device if it asked to hear of an index now passed. */
publish:
        cmp     %r13w, %bp
        je      1f
        mov     %r13w, AVAIL + 2        /* avail.idx, after the ring entries (stores stay in order) */
        mfence                          /* ... and before avail_event is loaded */
        movzwl  AVAIL_EVENT, %eax
        mov     %r13d, %edx             /* vring_need_event: (u16)(new - event - 1) < (u16)(new - old) */
        sub     %eax, %edx
        dec     %edx
        movzwl  %dx, %edx
        mov     %r13d, %esi
        sub     %ebp, %esi
        movzwl  %si, %esi
        mov     %r13d, %ebp
        cmp     %esi, %edx
        jae     1f
        movl    $0, 0x050(%rbx)         /* QueueNotify, queue 0 */
        incq    KICKS
1:      ret

        .p2align 4
idt:    .fill   6 * 16, 1, 0
        GATE    ud_handler              /* 6 */
        .fill   6 * 16, 1, 0
        GATE    gp_handler              /* 13 */
        GATE    pf_handler              /* 14 */
        IDT_END_AND_GDT64
