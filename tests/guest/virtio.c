/*
 * Polled virtio-mmio driver (transport version 2, virtio 1.1 spec), ring 3.
 * All register accesses are volatile 32-bit loads and stores.
 */
#include "virtio.h"

#define PAGE_SIZE 4096
#define MAPPED_END (4ull << 30)     /* the page tables map only the first 4 GiB */
#define VQ_MAX_SIZE 16              /* we never have more than a few buffers in flight */

/* Largest queue virtio_init sets up; a mode may raise it up to VIRTIO_QUEUE_LIMIT. */
unsigned virtio_queue_limit = VQ_MAX_SIZE;

/*
 * Ring memory, one page per queue: descriptor table at 0, avail ring right
 * after it, used ring after that (4-byte aligned). In the image (.bss is
 * loaded from the file), so guest-physical == virtual.
 */
static uint8_t vq_mem[VIRTIO_MAX_QUEUES][PAGE_SIZE] __attribute__((aligned(PAGE_SIZE)));

static inline void compiler_barrier(void)
{
    __asm__ volatile("" ::: "memory");
}

/* Full fence: the avail idx store must be visible before the notify. */
static inline void mb(void)
{
    __asm__ volatile("mfence" ::: "memory");
}

uint32_t virtio_read32(const struct virtio_mmio_dev *dev, uint32_t reg)
{
    return *(volatile uint32_t *)(dev->base + reg);
}

void virtio_write32(const struct virtio_mmio_dev *dev, uint32_t reg, uint32_t v)
{
    *(volatile uint32_t *)(dev->base + reg) = v;
}

NORETURN void virtio_fail(const struct virtio_mmio_dev *dev, const char *msg, uint32_t code)
{
    if (dev) {
        uint32_t status = virtio_read32(dev, VIRTIO_MMIO_STATUS);
        virtio_write32(dev, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_FAILED);
    }
    serial_puts("virtio: ");
    serial_puts(msg);
    serial_putc('\n');
    guest_exit(code);
}

static NORETURN void fail_reg(const struct virtio_mmio_dev *dev, const char *msg,
                              uint32_t value, uint32_t code)
{
    serial_puts("virtio: device at ");
    serial_put_hex(dev->base);
    serial_puts(": ");
    serial_puts(msg);
    serial_puts(" (");
    serial_put_hex(value);
    serial_puts(")\n");
    /* No FAILED here: the window may not hold a (modern) virtio device at all. */
    guest_exit(code);
}

void virtio_check_status(const struct virtio_mmio_dev *dev)
{
    uint32_t status = virtio_read32(dev, VIRTIO_MMIO_STATUS);

    if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET) {
        serial_puts("virtio: device at ");
        serial_put_hex(dev->base);
        serial_puts(" set DEVICE_NEEDS_RESET (status ");
        serial_put_hex(status);
        serial_puts(")\n");
        guest_exit(EXIT_VIRTIO_NEEDS_RESET);
    }
}

/* ---- command line: virtio_mmio.device=<size>@<base>:<irq>[:<id>] ---- */

static int digit_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return 99;
}

/*
 * Unsigned number at *pp (before end). base 0 means C/Linux style: 0x prefix
 * for hex, a leading 0 for octal, decimal otherwise. Advances *pp; 0 if there
 * are no digits or the value overflows.
 */
static int parse_number(const char **pp, const char *end, unsigned base, uint64_t *out)
{
    const char *p = *pp;
    uint64_t v = 0;

    if (base == 0) {
        if (end - p > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X') &&
            digit_value(p[2]) < 16) {
            base = 16;
            p += 2;
        } else if (p < end && p[0] == '0') {
            base = 8;
        } else {
            base = 10;
        }
    }
    if (p == end || digit_value(*p) >= (int)base)
        return 0;
    for (; p < end && digit_value(*p) < (int)base; p++) {
        unsigned d = (unsigned)digit_value(*p);
        if (v > (UINT64_MAX - d) / base)
            return 0;
        v = v * base + d;
    }
    *pp = p;
    *out = v;
    return 1;
}

/* Size as Linux memparse() reads it: a number with an optional K/M/G suffix. */
static int parse_size(const char **pp, const char *end, uint64_t *out)
{
    uint64_t v;
    unsigned shift = 0;

    if (!parse_number(pp, end, 0, &v))
        return 0;
    if (*pp < end) {
        switch (**pp) {
        case 'K': case 'k': shift = 10; break;
        case 'M': case 'm': shift = 20; break;
        case 'G': case 'g': shift = 30; break;
        }
        if (shift) {
            if (v > (UINT64_MAX >> shift))
                return 0;
            v <<= shift;
            (*pp)++;
        }
    }
    *out = v;
    return 1;
}

static int expect_char(const char **pp, const char *end, char c)
{
    if (*pp < end && **pp == c) {
        (*pp)++;
        return 1;
    }
    return 0;
}

static NORETURN void bad_token(const char *tok, const char *end, const char *why)
{
    serial_puts("virtio: bad command-line token '");
    while (tok < end)
        serial_putc(*tok++);
    serial_puts("': ");
    serial_puts(why);
    serial_putc('\n');
    guest_exit(EXIT_BAD_ARG);
}

/* Parses the value of one virtio_mmio.device= token; fails the run if malformed. */
static void parse_device(const char *tok, const char *val, const char *end,
                         struct virtio_mmio_dev *dev)
{
    const char *p = val;
    uint64_t size, base, irq, id;

    if (!parse_size(&p, end, &size) || !expect_char(&p, end, '@') ||
        !parse_number(&p, end, 0, &base) || !expect_char(&p, end, ':') ||
        !parse_number(&p, end, 10, &irq))
        bad_token(tok, end, "expected <size>@<base>:<irq>[:<id>]");
    if (expect_char(&p, end, ':') && !parse_number(&p, end, 10, &id))
        bad_token(tok, end, "bad device id");
    if (p != end)
        bad_token(tok, end, "trailing characters");
    if (irq == 0 || irq > UINT32_MAX)
        bad_token(tok, end, "bad irq");
    if (size < VIRTIO_MMIO_CONFIG)
        bad_token(tok, end, "window smaller than the register block");
    if (base % 4 || base >= MAPPED_END || size > MAPPED_END - base)
        bad_token(tok, end, "window misaligned or not below 4 GiB");
    dev->base = (uintptr_t)base;
    dev->size = size;
    dev->irq = (uint32_t)irq;
}

int virtio_mmio_find(const char *cmdline, uint32_t device_id, struct virtio_mmio_dev *dev)
{
    const char *s = cmdline;
    struct str val;

    if (!s)
        return 0;
    while (cmdline_next(&s, "virtio_mmio.device", &val)) {
        struct virtio_mmio_dev d;
        parse_device(val.p, val.p, val.p + val.len, &d);
        uint32_t magic = virtio_read32(&d, VIRTIO_MMIO_MAGIC_VALUE);
        if (magic != VIRTIO_MMIO_MAGIC)
            fail_reg(&d, "bad MagicValue", magic, EXIT_VIRTIO_BAD_DEVICE);
        uint32_t version = virtio_read32(&d, VIRTIO_MMIO_VERSION);
        if (version != VIRTIO_MMIO_VERSION_MODERN)
            fail_reg(&d, "Version is not 2 (legacy transport?)", version,
                     EXIT_VIRTIO_BAD_DEVICE);
        d.device_id = virtio_read32(&d, VIRTIO_MMIO_DEVICE_ID);
        /* DeviceID 0 is an empty slot: ignore it without error (4.2.3.1.1). */
        if (d.device_id != 0 && d.device_id == device_id) {
            *dev = d;
            serial_puts("virtio: device ");
            serial_put_dec(d.device_id);
            serial_puts(" at ");
            serial_put_hex(d.base);
            serial_puts(" size ");
            serial_put_hex(d.size);
            serial_puts(" irq ");
            serial_put_dec(d.irq);
            serial_putc('\n');
            return 1;
        }
    }
    return 0;
}

/* ---- initialisation (3.1.1) ---- */

static void set_status(const struct virtio_mmio_dev *dev, uint32_t *status, uint32_t bit)
{
    *status |= bit;
    virtio_write32(dev, VIRTIO_MMIO_STATUS, *status);
}

/* Fails the run about queue `index` (the message names it). */
static NORETURN void fail_queue(const struct virtio_mmio_dev *dev, uint16_t index,
                                const char *msg, uint32_t value)
{
    serial_puts("virtio: queue ");
    serial_put_dec(index);
    serial_puts(": ");
    serial_puts(msg);
    serial_puts(" (");
    serial_put_hex(value);
    serial_puts(")\n");
    virtio_fail(dev, "queue setup failed", EXIT_VIRTIO_QUEUE);
}

static void setup_queue(const struct virtio_mmio_dev *dev, struct virtq *vq, uint16_t index)
{
    uint8_t *mem = vq_mem[index];

    virtio_write32(dev, VIRTIO_MMIO_QUEUE_SEL, index);
    uint32_t ready = virtio_read32(dev, VIRTIO_MMIO_QUEUE_READY);
    if (ready != 0)
        fail_queue(dev, index, "already ready after reset", ready);
    uint32_t max = virtio_read32(dev, VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0)
        fail_queue(dev, index, "not available (QueueNumMax 0)", max);

    /* Split queue sizes are powers of 2: largest one within both limits. */
    uint16_t num = 1;
    while (num * 2 <= virtio_queue_limit && num * 2 <= VIRTIO_QUEUE_LIMIT && num * 2 <= max)
        num *= 2;

    /* Descriptors 16-aligned, avail 2-aligned, used 4-aligned (2.6). */
    size_t desc_off = 0;
    size_t avail_off = desc_off + sizeof(struct virtq_desc) * num;
    size_t used_off = (avail_off + 6 + 2 * num + 3) & ~(size_t)3;
    size_t end = used_off + 6 + sizeof(struct virtq_used_elem) * num;
    _Static_assert(6 + 2 * VIRTIO_QUEUE_LIMIT + 3 + 6 + 8 * VIRTIO_QUEUE_LIMIT +
                       16 * VIRTIO_QUEUE_LIMIT <= PAGE_SIZE,
                   "virtqueue does not fit its page");
    for (size_t i = 0; i < end; i++)
        ((volatile uint8_t *)mem)[i] = 0;

    vq->index = index;
    vq->num = num;
    vq->avail_idx = 0;
    vq->last_used = 0;
    vq->desc = (volatile struct virtq_desc *)(mem + desc_off);
    vq->avail = (volatile struct virtq_avail *)(mem + avail_off);
    vq->used = (volatile struct virtq_used *)(mem + used_off);

    uint64_t desc = (uintptr_t)vq->desc, avail = (uintptr_t)vq->avail,
             used = (uintptr_t)vq->used;
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_NUM, num);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    mb();   /* rings zeroed before the device may look at them */
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    ready = virtio_read32(dev, VIRTIO_MMIO_QUEUE_READY);
    if (ready != 1)
        fail_queue(dev, index, "did not become ready", ready);
}

uint64_t virtio_init(const struct virtio_mmio_dev *dev, struct virtq *vqs, unsigned nqueues,
                     uint64_t want)
{
    uint32_t status = 0;

    if (nqueues == 0 || nqueues > VIRTIO_MAX_QUEUES)
        virtio_fail(dev, "bad number of queues for virtio_init", EXIT_VIRTIO_QUEUE);

    /* Reset, and wait for it to complete (reads back 0). */
    virtio_write32(dev, VIRTIO_MMIO_STATUS, 0);
    uint64_t t0 = rdtsc();
    while (virtio_read32(dev, VIRTIO_MMIO_STATUS) != 0) {
        if (rdtsc() - t0 > TSC_TIMEOUT_2S)
            virtio_fail(dev, "device reset did not complete", EXIT_VIRTIO_TIMEOUT);
        cpu_relax();
    }

    set_status(dev, &status, VIRTIO_STATUS_ACKNOWLEDGE);
    set_status(dev, &status, VIRTIO_STATUS_DRIVER);

    virtio_write32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t features = virtio_read32(dev, VIRTIO_MMIO_DEVICE_FEATURES);
    virtio_write32(dev, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    features |= (uint64_t)virtio_read32(dev, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    if (!(features & (1ull << VIRTIO_F_VERSION_1))) {
        serial_puts("virtio: device features ");
        serial_put_hex(features);
        serial_putc('\n');
        virtio_fail(dev, "device does not offer VIRTIO_F_VERSION_1", EXIT_VIRTIO_FEATURES);
    }

    uint64_t accepted = features & (want | 1ull << VIRTIO_F_VERSION_1);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)accepted);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    virtio_write32(dev, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(accepted >> 32));

    set_status(dev, &status, VIRTIO_STATUS_FEATURES_OK);
    uint32_t readback = virtio_read32(dev, VIRTIO_MMIO_STATUS);
    if (!(readback & VIRTIO_STATUS_FEATURES_OK)) {
        serial_puts("virtio: status after FEATURES_OK ");
        serial_put_hex(readback);
        serial_putc('\n');
        virtio_fail(dev, "device rejected FEATURES_OK", EXIT_VIRTIO_FEATURES);
    }
    virtio_check_status(dev);

    /* All queues before DRIVER_OK: the device may use any of them from then on (3.1.1). */
    for (unsigned i = 0; i < nqueues; i++)
        setup_queue(dev, &vqs[i], (uint16_t)i);

    set_status(dev, &status, VIRTIO_STATUS_DRIVER_OK);
    virtio_check_status(dev);
    return accepted;
}

/* ---- device-specific configuration space ---- */

static volatile uint32_t *config_reg(const struct virtio_mmio_dev *dev, uint32_t offset)
{
    if (offset % 4 || offset >= dev->size - VIRTIO_MMIO_CONFIG ||
        dev->size - VIRTIO_MMIO_CONFIG - offset < 4) {
        serial_puts("virtio: config offset ");
        serial_put_hex(offset);
        serial_puts(" outside the window of size ");
        serial_put_hex(dev->size);
        serial_putc('\n');
        virtio_fail(dev, "config space access out of range", EXIT_VIRTIO_BAD_DEVICE);
    }
    return (volatile uint32_t *)(dev->base + VIRTIO_MMIO_CONFIG + offset);
}

uint32_t virtio_config_read32(const struct virtio_mmio_dev *dev, uint32_t offset)
{
    return *config_reg(dev, offset);
}

void virtio_config_write32(const struct virtio_mmio_dev *dev, uint32_t offset, uint32_t v)
{
    *config_reg(dev, offset) = v;
}

uint64_t virtio_config_read64(const struct virtio_mmio_dev *dev, uint32_t offset)
{
    volatile uint32_t *lo = config_reg(dev, offset), *hi = config_reg(dev, offset + 4);
    uint64_t t0 = rdtsc();

    for (;;) {
        uint32_t gen = virtio_read32(dev, VIRTIO_MMIO_CONFIG_GENERATION);
        uint64_t v = *lo | (uint64_t)*hi << 32;
        if (virtio_read32(dev, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
            return v;
        if (rdtsc() - t0 > TSC_TIMEOUT_2S)
            virtio_fail(dev, "ConfigGeneration kept changing", EXIT_VIRTIO_TIMEOUT);
        cpu_relax();
    }
}

/* ---- I/O ---- */

void virtq_add(const struct virtio_mmio_dev *dev, struct virtq *vq, uint16_t head,
               const struct virtio_buf *bufs, unsigned nbufs)
{
    if (nbufs == 0 || nbufs > vq->num || head > vq->num - nbufs)
        virtio_fail(dev, "bad descriptor range for the queue", EXIT_VIRTIO_QUEUE);
    if ((uint16_t)(vq->avail_idx - vq->last_used) >= vq->num)
        virtio_fail(dev, "more chains in flight than the queue has entries", EXIT_VIRTIO_QUEUE);
    for (unsigned i = 0; i < nbufs; i++) {
        /* Device-readable buffers must all come before the writable ones (2.6.4.2). */
        if (i > 0 && bufs[i - 1].device_writes && !bufs[i].device_writes)
            virtio_fail(dev, "device-readable buffer after a writable one", EXIT_VIRTIO_QUEUE);
        uint16_t flags = bufs[i].device_writes ? VIRTQ_DESC_F_WRITE : 0;
        if (i + 1 < nbufs)
            flags |= VIRTQ_DESC_F_NEXT;
        vq->desc[head + i].addr = (uintptr_t)bufs[i].addr;
        vq->desc[head + i].len = bufs[i].len;
        vq->desc[head + i].flags = flags;
        vq->desc[head + i].next = (uint16_t)(i + 1 < nbufs ? head + i + 1 : 0);
    }
    vq->avail->ring[vq->avail_idx % vq->num] = head;
    compiler_barrier();     /* x86 keeps stores in order: descriptors and entry before idx */
    vq->avail->idx = ++vq->avail_idx;
}

void virtq_notify(const struct virtio_mmio_dev *dev, const struct virtq *vq)
{
    mb();   /* the avail idx store must be visible before the notify */
    virtio_write32(dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

int virtq_get_used(const struct virtio_mmio_dev *dev, struct virtq *vq, uint32_t *id,
                   uint32_t *len)
{
    uint16_t used_idx = vq->used->idx;

    if (used_idx == vq->last_used)
        return 0;
    compiler_barrier();     /* x86 keeps loads in order: idx before the entry */
    /* The device may only return chains we made available and have not taken back. */
    if ((uint16_t)(used_idx - vq->last_used) > (uint16_t)(vq->avail_idx - vq->last_used)) {
        serial_puts("virtio: queue ");
        serial_put_dec(vq->index);
        serial_puts(": used idx jumped to ");
        serial_put_dec(used_idx);
        serial_puts(" (avail idx ");
        serial_put_dec(vq->avail_idx);
        serial_puts(")\n");
        virtio_fail(dev, "device used more buffers than were made available",
                    EXIT_VIRTIO_USED_LEN);
    }
    *id = vq->used->ring[vq->last_used % vq->num].id;
    *len = vq->used->ring[vq->last_used % vq->num].len;
    vq->last_used++;
    if (*id >= vq->num)
        virtio_fail(dev, "used ring returned a descriptor id outside the table",
                    EXIT_VIRTIO_USED_LEN);
    return 1;
}

void virtio_ack_interrupt(const struct virtio_mmio_dev *dev)
{
    uint32_t isr = virtio_read32(dev, VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        virtio_write32(dev, VIRTIO_MMIO_INTERRUPT_ACK, isr);
}

uint32_t virtio_transfer(const struct virtio_mmio_dev *dev, struct virtq *vq,
                         const struct virtio_buf *bufs, unsigned nbufs)
{
    const uint16_t head = 0;    /* one chain in flight at a time: always descriptors 0.. */
    uint64_t writable = 0;
    uint32_t id, len;

    for (unsigned i = 0; i < nbufs; i++)
        if (bufs[i].device_writes)
            writable += bufs[i].len;
    virtq_add(dev, vq, head, bufs, nbufs);
    virtq_notify(dev, vq);

    uint64_t t0 = rdtsc();
    for (unsigned spins = 0; !virtq_get_used(dev, vq, &id, &len); spins++) {
        if (spins % 4096 == 4095)
            virtio_check_status(dev);
        if (rdtsc() - t0 > TSC_TIMEOUT_2S) {
            virtio_check_status(dev);
            virtio_fail(dev, "timed out waiting for the used ring", EXIT_VIRTIO_TIMEOUT);
        }
        cpu_relax();
    }
    virtio_ack_interrupt(dev);
    virtio_check_status(dev);

    if (id != head)
        virtio_fail(dev, "used ring returned a descriptor id that was not the head",
                    EXIT_VIRTIO_USED_LEN);
    if (len > writable) {
        serial_puts("virtio: used length ");
        serial_put_dec(len);
        serial_puts(" > writable ");
        serial_put_dec(writable);
        serial_putc('\n');
        virtio_fail(dev, "used length larger than the device-writable buffers",
                    EXIT_VIRTIO_USED_LEN);
    }
    return len;
}
