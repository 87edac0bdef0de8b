/*
 * Ring-3 part of the test guest: command-line parsing and the test modes.
 * This code runs natively on the target host (ring-0 code is emulated).
 */
#include "guest.h"
#include "virtio.h"
#include "vsock.h"
#include "modes.h"

/* PVH boot information (xen/include/public/arch-x86/hvm/start_info.h). */
#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};

struct hvm_memmap_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

#define E820_RAM 1
#define MiB (1ull << 20)
#define MEMCHECK_START (4 * MiB)
#define MAPPED_END (4ull << 30)     /* the page tables map only the first 4 GiB */

static const struct hvm_start_info *start_info;

const char *guest_cmdline(void)
{
    return (const char *)(uintptr_t)start_info->cmdline_paddr;
}

/* Finds `key=value` in the command line (the last one wins); 1 if found. */
int get_arg(const char *key, struct str *val)
{
    const char *s = (const char *)(uintptr_t)start_info->cmdline_paddr;
    int found = 0;

    if (!s)
        return 0;
    while (cmdline_next(&s, key, val))
        found = 1;
    return found;
}

int str_eq(struct str s, const char *lit)
{
    size_t i = 0;
    for (; i < s.len; i++)
        if (lit[i] != s.p[i])
            return 0;
    return lit[i] == '\0';
}

NORETURN void fail(const char *msg, uint32_t code)
{
    serial_puts(msg);
    guest_exit(code);
}

/*
 * Number in `base` (10 or 16), or 0x-prefixed hex in either; fails the run on
 * malformed input.
 */
static uint64_t parse_uint(struct str s, unsigned base, const char *what)
{
    uint64_t v = 0;
    size_t i = 0;

    if (s.len > 2 && s.p[0] == '0' && (s.p[1] == 'x' || s.p[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (i == s.len)
        goto bad;
    for (; i < s.len; i++) {
        char c = s.p[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            goto bad;
        if (v > (UINT64_MAX - d) / base)
            goto bad;
        v = v * base + d;
    }
    return v;
bad:
    serial_puts("bad value for ");
    fail(what, EXIT_BAD_ARG);
}

/* Decimal or 0x-prefixed hex. */
uint64_t parse_u64(struct str s, const char *what)
{
    return parse_uint(s, 10, what);
}

static inline void syscall0(uint32_t nr)
{
    __asm__ volatile("int %1" : : "a"(nr), "i"(SYSCALL_VECTOR) : "memory");
}

static void wait_ticks(void)
{
    /* The timer fires every ~1 ms. */
    const uint64_t timeout = TSC_TIMEOUT_2S;
    uint64_t start = timer_ticks, t0 = rdtsc();

    while (timer_ticks - start < 5) {
        if (rdtsc() - t0 > timeout)
            fail("timer ticks not arriving\n", EXIT_NO_TICKS);
        cpu_relax();
    }
    serial_puts("ticks ok\n");
}

/* Shrink [*lo, *hi) so it does not overlap [base, base + len). */
static int avoid(uint64_t *lo, uint64_t *hi, uint64_t base, uint64_t len)
{
    uint64_t end = base + len;

    if (len == 0 || end <= *lo || base >= *hi)
        return 0;
    if (base <= *lo)
        *lo = end < *hi ? end : *hi;
    else
        *hi = base;
    return 1;
}

static uint64_t memcheck_pattern(uint64_t addr)
{
    return addr ^ 0x5a5a5a5a5a5a5a5aull;
}

/* End of the RAM region holding `addr` in the memory map, at most MAPPED_END; 0 if none. */
static uint64_t ram_region_end(uint64_t addr)
{
    const struct hvm_memmap_entry *map =
        (const void *)(uintptr_t)start_info->memmap_paddr;
    uint32_t n = start_info->version >= 1 ? start_info->memmap_entries : 0;
    uint64_t region_end = 0;

    for (uint32_t i = 0; i < n && map; i++) {
        if (map[i].type == E820_RAM && map[i].addr <= addr && addr < map[i].addr + map[i].size)
            region_end = map[i].addr + map[i].size;
    }
    return region_end > MAPPED_END ? MAPPED_END : region_end;
}

static void memcheck(void)
{
    const struct hvm_memmap_entry *map =
        (const void *)(uintptr_t)start_info->memmap_paddr;
    uint32_t n = start_info->version >= 1 ? start_info->memmap_entries : 0;
    uint64_t region_end = ram_region_end(MEMCHECK_START);

    if (!region_end)
        fail("memcheck: no RAM region at 4 MiB in the memory map\n", EXIT_BOOT_INFO);

    /* memcheck=N MiB (default 8) or memcheck=all, starting at 4 MiB. */
    uint64_t lo = MEMCHECK_START, avail_mib = (region_end - lo) / MiB;
    uint64_t mib = 8, hi;
    struct str arg;
    if (get_arg("memcheck", &arg))
        mib = str_eq(arg, "all") ? UINT64_MAX : parse_u64(arg, "memcheck\n");
    if (mib == UINT64_MAX) {
        hi = region_end;
    } else if (mib > avail_mib) {
        serial_puts("memcheck: clamped to ");
        serial_put_dec(avail_mib);
        serial_puts(" MiB (RAM region ends at ");
        serial_put_hex(region_end);
        serial_puts(")\n");
        hi = region_end;
    } else {
        hi = lo + mib * MiB;
    }

    /* Never overwrite what the VMM handed us (normally below 1 MiB anyway). */
    const char *cmdline = (const char *)(uintptr_t)start_info->cmdline_paddr;
    size_t cmdline_len = 0;
    while (cmdline && cmdline[cmdline_len])
        cmdline_len++;
    if (avoid(&lo, &hi, (uintptr_t)start_info, sizeof(*start_info)) |
        avoid(&lo, &hi, (uintptr_t)cmdline, cmdline_len + 1) |
        avoid(&lo, &hi, (uintptr_t)map, n * sizeof(*map)))
        serial_puts("memcheck: range shrunk around boot info\n");

    for (uint64_t a = lo; a < hi; a += 8)
        *(volatile uint64_t *)a = memcheck_pattern(a);
    for (uint64_t a = lo; a < hi; a += 8) {
        uint64_t v = *(volatile uint64_t *)a;
        if (v != memcheck_pattern(a)) {
            serial_puts("memcheck FAILED at ");
            serial_put_hex(a);
            serial_puts(": got ");
            serial_put_hex(v);
            serial_puts(" expected ");
            serial_put_hex(memcheck_pattern(a));
            fail("\n", EXIT_MEMCHECK);
        }
    }
    serial_puts("memcheck ok ");
    serial_put_dec((hi - lo) / MiB);
    serial_puts(" MiB\n");
}

static NORETURN void mode_exit(void)
{
    struct str arg;
    uint32_t status = EXIT_OK;

    if (get_arg("exit_code", &arg))
        status = (uint32_t)parse_u64(arg, "exit_code\n");
    wait_ticks();
    memcheck();
    serial_puts("test guest: done\n");
    guest_exit(status);
}

static NORETURN void mode_echo(void)
{
    for (;;) {
        while (!(inb(COM1_LSR) & LSR_DATA_READY))
            ;
        char c = (char)inb(COM1);
        serial_putc(c);
        if (c == 'q') {
            serial_puts("\necho done\n");
            guest_exit(EXIT_OK);
        }
    }
}

static NORETURN void mode_spin(void)
{
    static volatile uint64_t spins;

    /* The counter's address lets the host watch the guest make progress (pause tests). */
    serial_puts("spinning, counter at ");
    serial_put_hex((uint64_t)(uintptr_t)&spins);
    serial_putc('\n');
    for (;;)
        spins++;
}

/*
 * Like mode=spin, but the count is kept twice, in a register and in memory, and checked
 * before each step: a VM whose processor state and memory were captured at different
 * instants (a torn fork point or snapshot) finds them apart and exits with EXIT_TORN.
 */
static NORETURN void mode_spin_check(void)
{
    static volatile uint64_t spins;
    uint64_t mine = spins;

    serial_puts("spinning, counter at ");
    serial_put_hex((uint64_t)(uintptr_t)&spins);
    serial_putc('\n');
    for (;;) {
        uint64_t seen = spins;
        if (seen != mine) {
            serial_puts("torn: memory ");
            serial_put_hex(seen);
            serial_puts(" register ");
            serial_put_hex(mine);
            fail("\n", EXIT_TORN);
        }
        spins = ++mine;
    }
}

/*
 * Identity page (its address is forkvm.identity= on the command line): checks
 * the magic, tries to write the generation (a read-only page keeps it) and
 * prints "identity page read-only" or "identity page writable", then counts
 * like mode=spin, printing "generation G id H" (H: the VM id's first 8 bytes)
 * at start and whenever the generation changes: after a fork or a restore.
 */
static NORETURN void mode_generation(void)
{
    static volatile uint64_t spins;
    struct str arg;

    if (!get_arg("forkvm.identity", &arg))
        fail("no forkvm.identity= on the command line\n", EXIT_IDENTITY);
    volatile uint64_t *page =
        (volatile uint64_t *)(uintptr_t)parse_u64(arg, "forkvm.identity\n");
    if (page[0] != 0x44494d564b524f46ull)     /* "FORKVMID" */
        fail("identity page: bad magic\n", EXIT_IDENTITY);
    uint64_t generation = page[2];
    page[2] = generation + 1000;
    serial_puts(page[2] == generation ? "identity page read-only\n"
                                      : "identity page writable\n");
    serial_puts("spinning, counter at ");
    serial_put_hex((uint64_t)(uintptr_t)&spins);
    serial_putc('\n');
    for (uint64_t seen = UINT64_MAX;; spins++) {
        generation = page[2];
        if (generation == seen)
            continue;
        seen = generation;
        serial_puts("generation ");
        serial_put_dec(generation);
        serial_puts(" id ");
        serial_put_hex(page[3]);
        serial_putc('\n');
    }
}

static NORETURN void mode_reset(void)
{
    serial_puts("resetting\n");
    outb(I8042_CMD, 0xfe);  /* i8042 "pulse reset line" */
    for (;;)
        cpu_relax();
}

static NORETURN void mode_triple_fault(void)
{
    serial_puts("triple fault\n");
    syscall0(SYS_NULL_IDT);
    /* #DE -> IDT limit exceeded -> #GP -> #DF -> shutdown. */
    __asm__ volatile("divl %0" : : "r"(0), "a"(1), "d"(0));
    for (;;)
        cpu_relax();
}

/* Port 0x80 is not in the TSS I/O bitmap: #GP, reported as 0x100 + 13. */
static NORETURN void mode_fault(void)
{
    serial_puts("faulting\n");
    outb(0x80, 0);
    fail("port 0x80 was not blocked\n", EXIT_NO_FAULT);
}

static NORETURN void mode_halt(void)
{
    serial_puts("halting\n");
    syscall0(SYS_HALT);
    for (;;)
        cpu_relax();
}

/*
 * Lazy-fault probe (fork benchmarks): prints the address of a flag, waits (spinning in ring 3)
 * until the host sets it, then writes one byte per 4 KiB page over touch_mib= MiB (default 64)
 * from 4 MiB, prints "touched N MiB" and halts. touch_wait=0 touches at once.
 */
static NORETURN void mode_touch(void)
{
    static volatile uint64_t go;
    struct str arg;
    uint64_t mib = 64, end = ram_region_end(MEMCHECK_START);

    if (get_arg("touch_mib", &arg))
        mib = parse_u64(arg, "touch_mib\n");
    if (get_arg("touch_wait", &arg) && !parse_u64(arg, "touch_wait\n"))
        go = 1;
    if (!end || mib > (end - MEMCHECK_START) / MiB)
        fail("touch: touch_mib beyond the RAM region at 4 MiB\n", EXIT_BAD_ARG);
    serial_puts("touch: waiting, flag at ");
    serial_put_hex((uint64_t)(uintptr_t)&go);
    serial_putc('\n');
    while (!go)
        cpu_relax();
    for (uint64_t a = MEMCHECK_START; a < MEMCHECK_START + mib * MiB; a += 4096)
        *(volatile uint8_t *)a = 1;
    serial_puts("touched ");
    serial_put_dec(mib);
    serial_puts(" MiB\n");
    syscall0(SYS_HALT);
    for (;;)
        cpu_relax();
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/*
 * Entropy device: two 64-byte reads, one device-writable descriptor each.
 * Each must return 1..64 bytes, not all zero, and the two must differ.
 */
static NORETURN void mode_virtio_rng(void)
{
    static uint8_t data[2][64];
    struct virtio_mmio_dev dev;
    struct virtq vq;
    uint32_t len[2];

    if (!virtio_mmio_find((const char *)(uintptr_t)start_info->cmdline_paddr,
                          VIRTIO_ID_ENTROPY, &dev))
        fail("virtio-rng: no entropy device (DeviceID 4) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    virtio_init(&dev, &vq, 1, 0);

    for (int r = 0; r < 2; r++) {
        struct virtio_buf buf = { data[r], sizeof(data[r]), 1 };
        for (size_t i = 0; i < sizeof(data[r]); i++)
            ((volatile uint8_t *)data[r])[i] = 0;
        len[r] = virtio_transfer(&dev, &vq, &buf, 1);
        __asm__ volatile("" ::: "memory");  /* the device wrote data[r] behind our back */
        if (len[r] == 0 || len[r] > sizeof(data[r])) {
            serial_puts("virtio-rng: used length ");
            serial_put_dec(len[r]);
            serial_putc('\n');
            virtio_fail(&dev, "rng used length not in 1..64", EXIT_VIRTIO_USED_LEN);
        }
        if (all_zero(data[r], len[r]))
            virtio_fail(&dev, "rng read returned only zero bytes",
                        EXIT_VIRTIO_NOT_RANDOM);
    }
    uint32_t common = len[0] < len[1] ? len[0] : len[1], same = 1;
    for (uint32_t i = 0; i < common; i++)
        if (data[0][i] != data[1][i])
            same = 0;
    if (same)
        virtio_fail(&dev, "rng reads returned the same bytes twice", EXIT_VIRTIO_NOT_RANDOM);

    serial_puts("virtio-rng ok ");
    serial_put_dec(len[0] + len[1]);
    serial_puts(" bytes\n");
    guest_exit(EXIT_OK);
}

/* Most entries of flood_indirect='s table (64 KiB of descriptors). */
#define FLOOD_TABLE_MAX 4096

/*
 * A hostile driver for the pause benchmark: the entropy device's queue (128 entries) is kept
 * full of one chain of all 128 descriptors (one byte each), and whatever the device returns is
 * made available again at once, with a notification, so the device always has up to 128 x 128
 * descriptors to walk. With flood_indirect=N (up to 4096), the chain is one indirect
 * descriptor naming a table of N one-byte buffers instead (VIRTIO_F_INDIRECT_DESC is never
 * negotiated: a device that follows it anyway walks 128 x N). Runs until the host stops it.
 */
static NORETURN void mode_virtio_flood(void)
{
    static uint8_t bytes[FLOOD_TABLE_MAX];
    static struct virtq_desc table[FLOOD_TABLE_MAX] __attribute__((aligned(16)));
    struct virtio_mmio_dev dev;
    struct virtq vq;
    struct str arg;
    uint64_t indirect = 0;

    if (get_arg("flood_indirect", &arg))
        indirect = parse_u64(arg, "flood_indirect\n");
    if (indirect > FLOOD_TABLE_MAX)
        fail("bad value for flood_indirect (0 up to 4096)\n", EXIT_BAD_ARG);

    if (!virtio_mmio_find((const char *)(uintptr_t)start_info->cmdline_paddr,
                          VIRTIO_ID_ENTROPY, &dev))
        fail("virtio-flood: no entropy device (DeviceID 4) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    virtio_queue_limit = VIRTIO_QUEUE_LIMIT;
    virtio_init(&dev, &vq, 1, 0);
    uint16_t n = vq.num;
    volatile struct virtq_desc *descs = indirect ? table : vq.desc;
    uint64_t len = indirect ? indirect : n;
    for (uint64_t i = 0; i < len; i++) {
        int last = i + 1 == len;
        descs[i].addr = (uintptr_t)&bytes[i];
        descs[i].len = 1;
        descs[i].flags = VIRTQ_DESC_F_WRITE | (last ? 0 : VIRTQ_DESC_F_NEXT);
        descs[i].next = (uint16_t)(last ? 0 : i + 1);
    }
    if (indirect) {
        vq.desc[0].addr = (uintptr_t)table;
        vq.desc[0].len = (uint32_t)(indirect * sizeof(struct virtq_desc));
        vq.desc[0].flags = VIRTQ_DESC_F_INDIRECT;
        vq.desc[0].next = 0;
    }
    serial_puts("virtio-flood ready: chains of ");
    serial_put_dec(len);
    serial_puts(indirect ? " indirect descriptors\n" : " descriptors\n");
    for (;;) {
        /* Every entry the device used is made available again. */
        while ((uint16_t)(vq.avail_idx - vq.used->idx) < n)
            vq.avail->ring[vq.avail_idx++ % n] = 0;
        __asm__ volatile("" ::: "memory");
        vq.avail->idx = vq.avail_idx;
        virtq_notify(&dev, &vq);
    }
}

/* ---- virtio-blk ---- */

static struct virtio_mmio_dev blk_dev;
static struct virtq blk_vq;

#define BLK_WORDS (VIRTIO_BLK_SECTOR_SIZE / 8)

/*
 * One request, the standard chain: header (device-readable), the data buffer if
 * len > 0 (device-readable for OUT, device-writable otherwise), status byte
 * (device-writable). Fails the run with `code` unless the device completes it
 * with status `want`, and with EXIT_VIRTIO_BLK_STATUS if it wrote no valid status.
 */
static void blk_request(const char *what, uint32_t type, uint64_t sector, void *data,
                        uint32_t len, uint8_t want, uint32_t code)
{
    static struct virtio_blk_req_hdr hdr;
    static uint8_t status;
    struct virtio_buf bufs[3];
    unsigned n = 0;

    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    status = 0xff;      /* not a valid status: shows whether the device wrote one */
    bufs[n++] = (struct virtio_buf){ &hdr, sizeof(hdr), 0 };
    if (len)
        bufs[n++] = (struct virtio_buf){ data, len, type != VIRTIO_BLK_T_OUT };
    bufs[n++] = (struct virtio_buf){ &status, 1, 1 };
    uint32_t used = virtio_transfer(&blk_dev, &blk_vq, bufs, n);
    __asm__ volatile("" ::: "memory");  /* the device wrote status (and data) behind our back */

    uint8_t got = *(volatile uint8_t *)&status;
    if (got == want)
        return;
    serial_puts("virtio-blk: ");
    serial_puts(what);
    serial_puts(" (type ");
    serial_put_dec(type);
    serial_puts(", sector ");
    serial_put_dec(sector);
    serial_puts("): status ");
    serial_put_dec(got);
    serial_puts(", expected ");
    serial_put_dec(want);
    serial_puts(", used length ");
    serial_put_dec(used);
    serial_putc('\n');
    if (got > VIRTIO_BLK_S_UNSUPP)
        virtio_fail(&blk_dev, "status byte not written or not a valid status",
                    EXIT_VIRTIO_BLK_STATUS);
    virtio_fail(&blk_dev, "unexpected request status", code);
}

/* Fails the run (EXIT_VIRTIO_BLK_MISMATCH) unless the two sectors are equal. */
static void blk_compare(const uint64_t *got, const uint64_t *want, const char *what)
{
    for (unsigned i = 0; i < BLK_WORDS; i++) {
        if (got[i] != want[i]) {
            serial_puts("virtio-blk: ");
            serial_puts(what);
            serial_puts(": byte offset ");
            serial_put_dec(i * 8);
            serial_puts(" holds ");
            serial_put_hex(got[i]);
            serial_puts(", expected ");
            serial_put_hex(want[i]);
            serial_putc('\n');
            virtio_fail(&blk_dev, "sector contents differ", EXIT_VIRTIO_BLK_MISMATCH);
        }
    }
}

/* The ID string: up to 20 bytes, NUL-terminated only when shorter. */
static void put_blk_id(const char *id)
{
    for (unsigned i = 0; i < VIRTIO_BLK_ID_BYTES && id[i]; i++)
        serial_putc(id[i] > ' ' && id[i] < 0x7f ? id[i] : '?');
}

/* splitmix64: the pattern written to the disk. */
static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/*
 * Block device: read the capacity, GET_ID, read a sector, write a pattern to
 * it, FLUSH (if negotiated), read it back and compare, and check that the
 * sector past the end is refused with IOERR. On a read-only device (RO
 * offered) the write must be refused with IOERR and the sector stay as it was.
 *   blk_sector=N      sector to use (default: the last one)
 *   blk_expect=XX     hex byte the sector must start with before the write
 *   blk_readonly=0|1  whether the device must (1) or must not (0) offer RO
 */
static NORETURN void mode_virtio_blk(void)
{
    static uint64_t orig[BLK_WORDS], pattern[BLK_WORDS], back[BLK_WORDS], past[BLK_WORDS];
    static char id[VIRTIO_BLK_ID_BYTES + 1];
    struct str arg;
    int want_ro = -1, want_first = -1, have_sector = 0;
    uint64_t sector = 0;

    /* Arguments first: a malformed one must not leave the device half-used. */
    if (get_arg("blk_readonly", &arg)) {
        uint64_t v = parse_u64(arg, "blk_readonly\n");
        if (v > 1)
            fail("bad value for blk_readonly (0 or 1)\n", EXIT_BAD_ARG);
        want_ro = (int)v;
    }
    if (get_arg("blk_expect", &arg)) {
        uint64_t v = parse_uint(arg, 16, "blk_expect\n");
        if (v > 0xff)
            fail("bad value for blk_expect (one hex byte)\n", EXIT_BAD_ARG);
        want_first = (int)v;
    }
    if (get_arg("blk_sector", &arg)) {
        sector = parse_u64(arg, "blk_sector\n");
        have_sector = 1;
    }

    if (!virtio_mmio_find((const char *)(uintptr_t)start_info->cmdline_paddr,
                          VIRTIO_ID_BLOCK, &blk_dev))
        fail("virtio-blk: no block device (DeviceID 2) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    uint64_t features = virtio_init(&blk_dev, &blk_vq, 1,
                                    1ull << VIRTIO_BLK_F_FLUSH | 1ull << VIRTIO_BLK_F_RO);
    int ro = !!(features & 1ull << VIRTIO_BLK_F_RO);
    int flush = !!(features & 1ull << VIRTIO_BLK_F_FLUSH);
    uint64_t capacity = virtio_config_read64(&blk_dev, VIRTIO_BLK_CFG_CAPACITY);
    serial_puts("virtio-blk: capacity ");
    serial_put_dec(capacity);
    serial_puts(" sectors, features ");
    serial_put_hex(features);
    serial_puts(flush ? " flush" : "");
    serial_puts(ro ? " ro" : "");
    serial_putc('\n');

    if (want_ro >= 0 && want_ro != ro)
        virtio_fail(&blk_dev, want_ro ? "blk_readonly=1 but the device does not offer RO"
                                      : "blk_readonly=0 but the device offers RO",
                    EXIT_VIRTIO_BLK_RO);
    if (capacity == 0)
        virtio_fail(&blk_dev, "capacity is 0", EXIT_VIRTIO_BLK_CAPACITY);
    if (!have_sector)
        sector = capacity - 1;
    if (sector >= capacity)
        virtio_fail(&blk_dev, "blk_sector is not below the capacity", EXIT_VIRTIO_BLK_CAPACITY);

    for (unsigned i = 0; i < sizeof(id); i++)
        id[i] = 0;
    blk_request("GET_ID", VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES,
                VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
    serial_puts("virtio-blk: id '");
    put_blk_id(id);
    serial_puts("'\n");

    blk_request("read", VIRTIO_BLK_T_IN, sector, orig, sizeof(orig),
                VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
    const uint8_t first = ((const uint8_t *)orig)[0];
    serial_puts("virtio-blk: sector ");
    serial_put_dec(sector);
    serial_puts(" starts with ");
    serial_put_hex(first);
    serial_putc('\n');
    if (want_first >= 0 && first != want_first) {
        serial_puts("virtio-blk: expected the sector to start with ");
        serial_put_hex((uint64_t)want_first);
        serial_putc('\n');
        virtio_fail(&blk_dev, "sector does not start with blk_expect", EXIT_VIRTIO_BLK_EXPECT);
    }

    uint64_t seed = rdtsc() ^ mix64(sector);
    int differs = 0;
    for (unsigned i = 0; i < BLK_WORDS; i++) {
        pattern[i] = mix64(seed + i);
        differs |= pattern[i] != orig[i];
    }
    if (!differs)
        pattern[0] = ~pattern[0];   /* a write that does nothing must not pass */
    if (ro)
        blk_request("write to a read-only device", VIRTIO_BLK_T_OUT, sector, pattern,
                    sizeof(pattern), VIRTIO_BLK_S_IOERR, EXIT_VIRTIO_BLK_RO);
    else
        blk_request("write", VIRTIO_BLK_T_OUT, sector, pattern, sizeof(pattern),
                    VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
    if (flush)
        blk_request("flush", VIRTIO_BLK_T_FLUSH, 0, 0, 0, VIRTIO_BLK_S_OK,
                    EXIT_VIRTIO_BLK_STATUS);

    /* Pre-fill with something else than the expected data: a read must overwrite it. */
    const uint64_t *expected = ro ? orig : pattern;
    for (unsigned i = 0; i < BLK_WORDS; i++)
        back[i] = ~expected[i];
    blk_request("read back", VIRTIO_BLK_T_IN, sector, back, sizeof(back),
                VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
    blk_compare(back, expected, ro ? "read-only sector after the refused write"
                                   : "sector read back after the write");

    blk_request("read past the end", VIRTIO_BLK_T_IN, capacity, past, sizeof(past),
                VIRTIO_BLK_S_IOERR, EXIT_VIRTIO_BLK_OOR);

    serial_puts("virtio-blk ok capacity=");
    serial_put_dec(capacity);
    serial_puts(" id=");
    put_blk_id(id);
    serial_putc('\n');
    guest_exit(EXIT_OK);
}

/*
 * Block device driven by the host through a mailbox in guest memory (fork and
 * snapshot tests): sets the device up, prints "blk-mailbox at 0x<address>",
 * then serves the commands the host writes to the mailbox's first word, clears
 * it and prints a line:
 *   1: write the mailbox's second word as the first 8 bytes of sector
 *      blk_sector= (default 2), the rest zero  -> "blk wrote"
 *   2: read that sector                        -> "blk read 0x<first 8 bytes>"
 *   3: exit 0
 */
static NORETURN void mode_blk_mailbox(void)
{
    static volatile uint64_t mailbox[2];
    static uint64_t data[BLK_WORDS];
    struct str arg;
    uint64_t sector = 2;

    if (get_arg("blk_sector", &arg))
        sector = parse_u64(arg, "blk_sector\n");
    if (!virtio_mmio_find((const char *)(uintptr_t)start_info->cmdline_paddr,
                          VIRTIO_ID_BLOCK, &blk_dev))
        fail("virtio-blk: no block device (DeviceID 2) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    virtio_init(&blk_dev, &blk_vq, 1, 0);
    serial_puts("blk-mailbox at ");
    serial_put_hex((uint64_t)(uintptr_t)mailbox);
    serial_putc('\n');
    for (;;) {
        uint64_t command = mailbox[0];
        if (command == 1) {
            for (unsigned i = 0; i < BLK_WORDS; i++)
                data[i] = 0;
            data[0] = mailbox[1];
            blk_request("mailbox write", VIRTIO_BLK_T_OUT, sector, data, sizeof(data),
                        VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
            /* Cleared before the answer: once the host sees it, it may write the next command. */
            mailbox[0] = 0;
            serial_puts("blk wrote\n");
        } else if (command == 2) {
            blk_request("mailbox read", VIRTIO_BLK_T_IN, sector, data, sizeof(data),
                        VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
            mailbox[0] = 0;
            serial_puts("blk read ");
            serial_put_hex(data[0]);
            serial_putc('\n');
        } else if (command == 3) {
            guest_exit(EXIT_OK);
        } else {
            cpu_relax();
        }
    }
}

/*
 * Block device read in a loop (the rate_limit benchmark): reads blk_kib= KiB (default 4, 1 to
 * 64) from sector 0 again and again, one request at a time, counting the reads completed in
 * memory; prints "blk-loop counter at 0x<address>" first, so the host can sample the count.
 */
static NORETURN void mode_blk_loop(void)
{
    static volatile uint64_t reads;
    static uint64_t data[64 * 1024 / 8];
    struct str arg;
    uint64_t kib = 4;

    if (get_arg("blk_kib", &arg))
        kib = parse_u64(arg, "blk_kib\n");
    if (kib == 0 || kib > 64)
        fail("blk_kib must be 1 to 64\n", EXIT_BAD_ARG);
    if (!virtio_mmio_find((const char *)(uintptr_t)start_info->cmdline_paddr,
                          VIRTIO_ID_BLOCK, &blk_dev))
        fail("virtio-blk: no block device (DeviceID 2) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    virtio_init(&blk_dev, &blk_vq, 1, 0);
    serial_puts("blk-loop counter at ");
    serial_put_hex((uint64_t)(uintptr_t)&reads);
    serial_putc('\n');
    for (;;) {
        blk_request("loop read", VIRTIO_BLK_T_IN, 0, data, (uint32_t)(kib * 1024),
                    VIRTIO_BLK_S_OK, EXIT_VIRTIO_BLK_STATUS);
        reads = reads + 1;
    }
}

/* ---- virtio-vsock (driver in vsock.c) ---- */

/* vsock_port=N: a 32-bit port number (required). */
static uint32_t vsock_port_arg(void)
{
    struct str arg;

    if (!get_arg("vsock_port", &arg))
        fail("vsock modes need vsock_port=N\n", EXIT_BAD_ARG);
    uint64_t port = parse_u64(arg, "vsock_port\n");
    if (port > UINT32_MAX)
        fail("bad value for vsock_port (32 bits)\n", EXIT_BAD_ARG);
    return (uint32_t)port;
}

/* vsock_trace=1 prints every packet sent and received. */
static int vsock_trace_arg(void)
{
    struct str arg;

    return get_arg("vsock_trace", &arg) && parse_u64(arg, "vsock_trace\n") != 0;
}

/*
 * Client: connect to host port vsock_port=, send vsock_bytes= bytes (default
 * 300 KiB: several buffers and more than one window of credit each way) and
 * check that they come back.
 */
static NORETURN void mode_vsock_connect(void)
{
    uint32_t port = vsock_port_arg();
    uint64_t bytes = 300 * 1024;
    struct str arg;

    if (get_arg("vsock_bytes", &arg))
        bytes = parse_u64(arg, "vsock_bytes\n");
    vsock_run_connect((const char *)(uintptr_t)start_info->cmdline_paddr, port, bytes,
                      vsock_trace_arg());
}

/* Server: echo whatever the host sends to port vsock_port= until it closes. */
static NORETURN void mode_vsock_listen(void)
{
    uint32_t port = vsock_port_arg();

    vsock_run_listen((const char *)(uintptr_t)start_info->cmdline_paddr, port,
                     vsock_trace_arg());
}

/* ---- virtio-balloon ---- */

#define BALLOON_START MEMCHECK_START    /* the guest's own pages, past the image */

/*
 * Memory balloon: touches balloon_pages= pages (default 256) from 4 MiB, so the
 * host backs them, prints "virtio-balloon: touched N pages", waits (~10 s) for
 * the host's target num_pages (1..N) and, if it was not set yet, the config
 * change interrupt that comes with it, gives that many of them to the balloon
 * on the inflate queue, VIRTIO_BALLOON_PFNS_PER_REQ PFNs per request, and
 * writes `actual`.
 */
static NORETURN void mode_virtio_balloon(void)
{
    static uint32_t pfns[VIRTIO_BALLOON_PFNS_PER_REQ];
    struct virtio_mmio_dev dev;
    struct virtq vqs[2];
    struct str arg;
    uint64_t pages = 256;

    if (get_arg("balloon_pages", &arg))
        pages = parse_u64(arg, "balloon_pages\n");
    uint64_t ram_end = ram_region_end(BALLOON_START);
    if (pages == 0 || ram_end <= BALLOON_START ||
        pages > (ram_end - BALLOON_START) >> VIRTIO_BALLOON_PFN_SHIFT)
        fail("bad value for balloon_pages (1 up to the RAM above 4 MiB)\n", EXIT_BAD_ARG);

    if (!virtio_mmio_find((const char *)(uintptr_t)start_info->cmdline_paddr,
                          VIRTIO_ID_BALLOON, &dev))
        fail("virtio-balloon: no balloon (DeviceID 5) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    virtio_init(&dev, vqs, 2, 0);

    for (uint64_t p = 0; p < pages; p++)
        *(volatile uint64_t *)(BALLOON_START + (p << VIRTIO_BALLOON_PFN_SHIFT)) = p + 1;
    serial_puts("virtio-balloon: touched ");
    serial_put_dec(pages);
    serial_puts(" pages\n");

    uint32_t target = virtio_config_read32(&dev, VIRTIO_BALLOON_CFG_NUM_PAGES);
    const int waited = target == 0;
    uint64_t t0 = rdtsc();
    while (target == 0) {
        if (rdtsc() - t0 > 5 * TSC_TIMEOUT_2S)
            virtio_fail(&dev, "the host set no balloon target", EXIT_VIRTIO_BALLOON);
        virtio_check_status(&dev);
        cpu_relax();
        target = virtio_config_read32(&dev, VIRTIO_BALLOON_CFG_NUM_PAGES);
    }
    /* A target set while the driver was live comes with a configuration change interrupt. */
    t0 = rdtsc();
    while (waited && !(virtio_read32(&dev, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG)) {
        if (rdtsc() - t0 > TSC_TIMEOUT_2S)
            virtio_fail(&dev, "no configuration change interrupt for the new target",
                        EXIT_VIRTIO_BALLOON);
        cpu_relax();
    }
    virtio_write32(&dev, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    serial_puts("virtio-balloon: target ");
    serial_put_dec(target);
    serial_puts(" pages\n");
    if (target > pages)
        virtio_fail(&dev, "target larger than balloon_pages", EXIT_VIRTIO_BALLOON);

    for (uint32_t done = 0; done < target;) {
        uint32_t n = target - done;
        if (n > VIRTIO_BALLOON_PFNS_PER_REQ)
            n = VIRTIO_BALLOON_PFNS_PER_REQ;
        for (uint32_t i = 0; i < n; i++)
            pfns[i] = (uint32_t)((BALLOON_START >> VIRTIO_BALLOON_PFN_SHIFT) + done + i);
        struct virtio_buf buf = { pfns, n * (uint32_t)sizeof(pfns[0]), 0 };
        virtio_transfer(&dev, &vqs[VIRTIO_BALLOON_Q_INFLATE], &buf, 1);
        done += n;
    }
    virtio_config_write32(&dev, VIRTIO_BALLOON_CFG_ACTUAL, target);
    virtio_check_status(&dev);

    serial_puts("virtio-balloon ok inflated=");
    serial_put_dec(target);
    serial_putc('\n');
    guest_exit(EXIT_OK);
}

NORETURN void user_main(void)
{
    serial_puts("forkvm test guest\n");

    start_info = (const struct hvm_start_info *)(uintptr_t)boot_info_paddr;
    if (!start_info || start_info->magic != HVM_START_MAGIC)
        fail("bad hvm_start_info magic\n", EXIT_BOOT_INFO);

    struct str mode = { "exit", 4 };
    get_arg("mode", &mode);

    if (str_eq(mode, "exit"))
        mode_exit();
    if (str_eq(mode, "spin"))
        mode_spin();
    if (str_eq(mode, "spin-check"))
        mode_spin_check();
    if (str_eq(mode, "generation"))
        mode_generation();
    if (str_eq(mode, "echo"))
        mode_echo();
    if (str_eq(mode, "reset"))
        mode_reset();
    if (str_eq(mode, "triple-fault"))
        mode_triple_fault();
    if (str_eq(mode, "halt"))
        mode_halt();
    if (str_eq(mode, "fault"))
        mode_fault();
    if (str_eq(mode, "touch"))
        mode_touch();
    if (str_eq(mode, "virtio-rng"))
        mode_virtio_rng();
    if (str_eq(mode, "virtio-flood"))
        mode_virtio_flood();
    if (str_eq(mode, "virtio-blk"))
        mode_virtio_blk();
    if (str_eq(mode, "blk-mailbox"))
        mode_blk_mailbox();
    if (str_eq(mode, "blk-loop"))
        mode_blk_loop();
    if (str_eq(mode, "vsock-connect"))
        mode_vsock_connect();
    if (str_eq(mode, "vsock-listen"))
        mode_vsock_listen();
    if (str_eq(mode, "virtio-balloon"))
        mode_virtio_balloon();
    if (str_eq(mode, "virtio-console"))
        mode_virtio_console();
    fail("unknown mode\n", EXIT_UNKNOWN_MODE);
}
