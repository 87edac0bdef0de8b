/*
 * Ring-0 setup: GDT/TSS, IDT, LAPIC timer, then drop to ring 3.
 *
 * Every instruction here is emulated on the target host, so the tables are
 * static data wherever possible and only the address-dependent fields are
 * filled in at run time.
 */
#include "guest.h"

/* Defined in entry.S. */
extern char kstack_top[], ustack_top[];
extern char exception_stubs[], ud_isr[], timer_isr[], spurious_isr[], syscall_isr[];
void enter_user(void (*rip)(void), void *rsp) NORETURN;
void user_main(void) NORETURN;

uint64_t boot_info_paddr;
volatile uint64_t timer_ticks;

struct desc_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* Flat 64-bit segments; the TSS descriptor (two slots) is filled at run time. */
static uint64_t gdt[7] = {
    [KERNEL_CS / 8] = 0x00af9a000000ffff,   /* code, DPL 0, L=1 */
    [KERNEL_DS / 8] = 0x00cf92000000ffff,   /* data, DPL 0 */
    [USER_DS / 8]   = 0x00cff2000000ffff,   /* data, DPL 3 */
    [USER_CS / 8]   = 0x00affa000000ffff,   /* code, DPL 3, L=1 */
};

/* Used by the 32-bit entry stub (entry.S). */
struct desc_ptr gdt_desc = { sizeof(gdt) - 1, (uint64_t)gdt };

/*
 * 64-bit TSS. rsp0 is the stack used when an interrupt arrives in ring 3.
 * IOPL does not grant port access at CPL 3 on the target host, so ring-3 port
 * I/O relies on the I/O permission bitmap: a set bit denies the port, ports
 * past the bitmap (beyond the TSS limit) are denied, and the CPU may read one
 * byte past the last needed one, hence the 0xff terminator.
 */
#define IOMAP_PORTS 0x400   /* covers every port we allow (highest 0x3ff) */

static struct tss {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
    uint8_t iomap[IOMAP_PORTS / 8 + 1];
} __attribute__((packed)) tss = {
    .rsp = { (uint64_t)kstack_top },
    .iomap_base = offsetof(struct tss, iomap),
    .iomap = { [0 ... IOMAP_PORTS / 8] = 0xff },
};

struct idt_gate {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t reserved;
};

/* Vectors without a handler stay not-present: they raise #NP, which is reported. */
static struct idt_gate idt[256];

#define GATE_INTR      0x8e     /* present, DPL 0, 64-bit interrupt gate */
#define GATE_INTR_USER 0xee     /* same, callable from ring 3 with `int` */

static void set_gate(unsigned vec, const void *handler, uint8_t type_attr)
{
    uint64_t a = (uint64_t)handler;
    idt[vec] = (struct idt_gate){
        .offset_lo = (uint16_t)a,
        .selector = KERNEL_CS,
        .type_attr = type_attr,
        .offset_mid = (uint16_t)(a >> 16),
        .offset_hi = (uint32_t)(a >> 32),
    };
}

static void allow_ports(unsigned first, unsigned count)
{
    for (unsigned p = first; p < first + count; p++)
        tss.iomap[p / 8] &= (uint8_t)~(1u << (p % 8));
}

static void setup_tss(void)
{
    uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;

    allow_ports(COM1, 8);
    allow_ports(0x60, 1);               /* i8042 data */
    allow_ports(I8042_CMD, 1);
    allow_ports(DEBUG_EXIT_PORT, 4);    /* 32-bit outl */

    gdt[TSS_SEL / 8] = (limit & 0xffff) | (base & 0xffffff) << 16 |
                       0x89ull << 40 /* present, available 64-bit TSS */ |
                       ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
    gdt[TSS_SEL / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(TSS_SEL));
}

static void setup_idt(void)
{
    for (unsigned v = 0; v < 32; v++)
        set_gate(v, exception_stubs + 16 * v, GATE_INTR);
    set_gate(6, ud_isr, GATE_INTR);     /* also catches `int $0x80`, see entry.S */
    set_gate(TIMER_VECTOR, timer_isr, GATE_INTR);
    set_gate(SPURIOUS_VECTOR, spurious_isr, GATE_INTR);
    set_gate(SYSCALL_VECTOR, syscall_isr, GATE_INTR_USER);

    struct desc_ptr d = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" : : "m"(d));
}

/* LAPIC registers (xAPIC MMIO). */
#define LAPIC_SVR       0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TIMER_DCR 0x3e0

static void lapic_write(uint32_t reg, uint32_t v)
{
    *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + reg) = v;
}

static void setup_lapic_timer(void)
{
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);   /* software enable */
    /*
     * Mask LINT0 (ExtINT): nothing programs the 8259, so any PIC interrupt
     * would arrive with a meaningless vector.
     */
    lapic_write(LAPIC_LVT_LINT0, 1u << 16 | 7u << 8);
    lapic_write(LAPIC_TIMER_DCR, 0x3);                 /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, 1u << 17 | TIMER_VECTOR); /* periodic */
    /* KVM's APIC bus runs at 1 GHz: 62500 * 16 ns = 1 ms. */
    lapic_write(LAPIC_TIMER_ICR, 62500);
}

NORETURN void kernel_main(void)
{
    setup_tss();
    setup_idt();
    setup_lapic_timer();
    enter_user(user_main, ustack_top);
}

/* Stack layout built by the exception stubs in entry.S plus the CPU. */
struct exception_frame {
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

NORETURN void exception_report(const struct exception_frame *f)
{
    serial_puts("\nEXCEPTION vector=");
    serial_put_dec(f->vector);
    serial_puts(" error=");
    serial_put_hex(f->error);
    serial_puts(" rip=");
    serial_put_hex(f->rip);
    serial_puts(" cs=");
    serial_put_hex(f->cs);
    serial_puts(" rsp=");
    serial_put_hex(f->rsp);
    if (f->vector == 14) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        serial_puts(" cr2=");
        serial_put_hex(cr2);
    }
    serial_putc('\n');
    guest_exit(EXIT_EXCEPTION + (uint32_t)f->vector);
}
