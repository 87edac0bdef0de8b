/* Polled serial output and VM exit; callable from ring 0 and ring 3. */
#include "guest.h"

void serial_putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
        cpu_relax();
    outb(COM1, (uint8_t)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

void serial_put_hex(uint64_t v)
{
    char buf[19];
    int i = sizeof(buf);

    buf[--i] = '\0';
    do {
        buf[--i] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    serial_puts(&buf[i]);
}

void serial_put_dec(uint64_t v)
{
    char buf[21];
    int i = sizeof(buf);

    buf[--i] = '\0';
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    serial_puts(&buf[i]);
}

/*
 * Ends the VM with `status` through the debug-exit port. A VMM without that device ignores the
 * write; then fall back to what every PC has, so the run still ends and still tells success
 * from failure: success resets through the i8042, failure triple-faults (IDT limit 0, then #DE).
 */
NORETURN void guest_exit(uint32_t status)
{
    uint16_t cs;

    outl(DEBUG_EXIT_PORT, status);
    if (status == EXIT_OK)
        outb(I8042_CMD, 0xfe);
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    if ((cs & 3) == 0) {
        static const struct __attribute__((packed)) { uint16_t limit; uint64_t base; } null_idt;
        __asm__ volatile("lidt %0" : : "m"(null_idt));
    } else {
        __asm__ volatile("int %1" : : "a"(SYS_NULL_IDT), "i"(SYSCALL_VECTOR) : "memory");
    }
    __asm__ volatile("divl %0" : : "r"(0), "a"(1), "d"(0));
    for (;;)    /* the VMM stops the vCPU; never fall through */
        cpu_relax();
}
