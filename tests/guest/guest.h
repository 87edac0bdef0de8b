/*
 * Shared definitions for the forkvm test guest (C and assembly).
 *
 * The guest runs almost everything in ring 3: on the target host KVM emulates
 * every ring-0 instruction (~1 M instructions/s) while ring-3 code runs
 * natively, so ring 0 only does the setup and tiny interrupt handlers.
 */
#ifndef FORKVM_GUEST_H
#define FORKVM_GUEST_H

/* GDT selectors (see gdt[] in kernel.c). */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   (0x18 | 3)
#define USER_CS   (0x20 | 3)
#define TSS_SEL   0x28

/* Interrupt vectors. */
#define TIMER_VECTOR    0x20
#define SYSCALL_VECTOR  0x80    /* `int $0x80` from ring 3 (DPL 3 gate) */
#define SPURIOUS_VECTOR 0xff

/* Requests for the int 0x80 gate, passed in eax. */
#define SYS_HALT     0  /* stop the LAPIC timer; cli; hlt forever */
#define SYS_NULL_IDT 1  /* load an IDT with limit 0, return to ring 3 */

/* A 32-bit write of a status to this port ends the VM (0 = success). */
#define DEBUG_EXIT_PORT 0xf4

#define LAPIC_BASE 0xfee00000
#define LAPIC_EOI  0xb0
#define LAPIC_TIMER_ICR 0x380  /* initial count; 0 stops the timer */

/* Exit status codes written to the debug-exit port. */
#define EXIT_OK           0
#define EXIT_UNKNOWN_MODE 2
#define EXIT_NO_TICKS     3
#define EXIT_MEMCHECK     4
#define EXIT_BOOT_INFO    5     /* bad start_info magic / no usable memory map */
#define EXIT_BAD_ARG      6     /* malformed command-line value */
#define EXIT_BAD_SYSCALL  7     /* unknown int 0x80 request */
#define EXIT_NO_FAULT     8     /* mode=fault did not fault */
/* virtio (virtio.c, mode=virtio-*) */
#define EXIT_VIRTIO_NO_DEVICE   9   /* no command-line device with the wanted DeviceID */
#define EXIT_VIRTIO_BAD_DEVICE  10  /* window without virtio magic or not version 2 */
#define EXIT_VIRTIO_FEATURES    11  /* VERSION_1 not offered, or FEATURES_OK rejected */
#define EXIT_VIRTIO_QUEUE       12  /* a queue unavailable (QueueNumMax 0) or already live */
#define EXIT_VIRTIO_TIMEOUT     13  /* device did not complete (or reset) within ~2 s */
#define EXIT_VIRTIO_USED_LEN    14  /* used ring entry: bad length or descriptor id */
#define EXIT_VIRTIO_NOT_RANDOM  15  /* virtio-rng data all zero or repeated */
#define EXIT_VIRTIO_NEEDS_RESET 16  /* device set DEVICE_NEEDS_RESET */
/* virtio-blk (mode=virtio-blk) */
#define EXIT_VIRTIO_BLK_STATUS   17 /* request status not OK (or not written / not 0..2) */
#define EXIT_VIRTIO_BLK_MISMATCH 18 /* sector read back differs from what it should hold */
#define EXIT_VIRTIO_BLK_OOR      19 /* read of sector `capacity` not refused with IOERR */
#define EXIT_VIRTIO_BLK_RO       20 /* RO offered but a write not refused with IOERR, or RO
                                       not as blk_readonly= says */
#define EXIT_VIRTIO_BLK_CAPACITY 21 /* capacity 0, or blk_sector= not below capacity */
#define EXIT_VIRTIO_BLK_EXPECT   22 /* first byte of the sector is not blk_expect= */
/* virtio-vsock (vsock.c, mode=vsock-*) */
#define EXIT_VSOCK_RESET    23  /* connection refused, or reset / shut down by the host early */
#define EXIT_VSOCK_MISMATCH 24  /* echoed bytes differ from the ones sent, or too many came */
#define EXIT_VSOCK_PROTOCOL 25  /* a packet the spec does not allow (bad CID, op, length,
                                   credit overrun, bad guest_cid in config) */
#define EXIT_VSOCK_TIMEOUT  26  /* no progress for ~8 s (~30 s waiting for a connection) */
/* virtio-balloon (mode=virtio-balloon); 23..26 are vsock's */
#define EXIT_VIRTIO_BALLOON      27 /* no target within ~10 s (or no config interrupt with
                                       it), or a target above balloon_pages= */
#define EXIT_IDENTITY            28 /* no forkvm.identity=, or no FORKVMID page there */
#define EXIT_TORN                29 /* mode=spin-check: memory and register counters differ */
#define EXIT_EXCEPTION    0x100 /* + CPU exception vector */

#ifndef __ASSEMBLER__

#include <stdint.h>
#include <stddef.h>

#define NORETURN __attribute__((noreturn))

/* Ports; ring 3 may only use the ones allowed in the TSS I/O bitmap. */
#define COM1      0x3f8
#define COM1_LSR  (COM1 + 5)
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY  0x20
#define I8042_CMD 0x64

static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

/* ~2 s of TSC at 2.5 GHz, for polling timeouts. */
#define TSC_TIMEOUT_2S 5000000000ull

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* serial.c: polled 8250 output, usable from ring 0 and ring 3. */
void serial_putc(char c);
void serial_puts(const char *s);
void serial_put_hex(uint64_t v);
void serial_put_dec(uint64_t v);
NORETURN void guest_exit(uint32_t status);

/* Shared between ring 0 and ring 3 (all pages are user-accessible). */
extern uint64_t boot_info_paddr;        /* ebx at PVH entry */
extern volatile uint64_t timer_ticks;   /* bumped by the LAPIC timer handler */

/* A slice of the command line. */
struct str {
    const char *p;
    size_t len;
};

static inline int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n';
}

/*
 * Finds the next `key=value` token at or after *s, stores its value in *val and moves *s past
 * it; 0 when there is none. The token is the whole space-separated word.
 */
static inline int cmdline_next(const char **s, const char *key, struct str *val)
{
    size_t klen = 0;

    while (key[klen])
        klen++;
    while (**s) {
        while (is_space(**s))
            (*s)++;
        const char *tok = *s;
        while (**s && !is_space(**s))
            (*s)++;
        size_t n = 0;
        while (n < klen && tok + n < *s && tok[n] == key[n])
            n++;
        if (n == klen && tok + klen < *s && tok[klen] == '=') {
            val->p = tok + klen + 1;
            val->len = (size_t)(*s - val->p);
            return 1;
        }
    }
    return 0;
}

#endif /* __ASSEMBLER__ */
#endif /* FORKVM_GUEST_H */
