/*
 * The test guest's virtio-console mode (mode=virtio-console): a driver that echoes what the host
 * types back through the device. Ring 3, like main.c, whose command-line helpers it uses.
 */
#include "guest.h"
#include "virtio.h"
#include "modes.h"

/* ---- virtio-console ---- */

#define CON_RX 0                /* receiveq (port 0, no multiport) */
#define CON_TX 1                /* transmitq */
#define CON_SLOTS 8             /* buffers in flight each way (fewer if a queue is smaller) */
#define CON_BUF 256             /* bytes per buffer: a few KiB of input fill dozens of them */
#define CON_EOT 0x04            /* terminator: ends the echo */
#define CON_IDLE_TIMEOUT (5 * TSC_TIMEOUT_2S)   /* ~10 s without progress */

static struct virtio_mmio_dev con_dev;
static struct virtq con_vqs[2];
static uint8_t con_rx[CON_SLOTS][CON_BUF];
static uint8_t con_tx[CON_SLOTS][CON_BUF];
static unsigned con_slots;
static uint32_t con_tx_busy;    /* bit i: transmit slot i is on the queue */
static uint64_t con_echoed, con_rx_buffers, con_last_progress;

/* Fails the run after ~10 s without progress; looks at the device status every ~0.1 s. */
static void con_check_idle(const char *what)
{
    static uint64_t last_status_check;

    if (rdtsc() - last_status_check > TSC_TIMEOUT_2S / 20) {
        virtio_check_status(&con_dev);
        virtio_ack_interrupt(&con_dev);
        last_status_check = rdtsc();
    }
    if (rdtsc() - con_last_progress > CON_IDLE_TIMEOUT) {
        virtio_check_status(&con_dev);
        serial_puts("virtio-console: timed out ");
        serial_puts(what);
        serial_puts(" after echoing ");
        serial_put_dec(con_echoed);
        serial_puts(" bytes from ");
        serial_put_dec(con_rx_buffers);
        serial_puts(" receive buffers\n");
        virtio_fail(&con_dev, "no progress", EXIT_VIRTIO_TIMEOUT);
    }
    cpu_relax();
}

/* Takes back the transmit chains the device is done with (device-readable only: length 0). */
static void con_reclaim_tx(void)
{
    uint32_t id, len;

    while (virtq_get_used(&con_dev, &con_vqs[CON_TX], &id, &len)) {
        if (id >= con_slots || !(con_tx_busy & 1u << id) || len != 0) {
            serial_puts("virtio-console: transmit used id ");
            serial_put_dec(id);
            serial_puts(" len ");
            serial_put_dec(len);
            serial_putc('\n');
            virtio_fail(&con_dev, "transmit used entry for a chain not in flight, or with a "
                        "written length", EXIT_VIRTIO_USED_LEN);
        }
        con_tx_busy &= ~(1u << id);
        con_last_progress = rdtsc();
    }
}

/* Queues `n` bytes on the transmit queue, CON_BUF per chain, waiting for free slots. */
static void con_send(const uint8_t *p, uint32_t n)
{
    while (n) {
        unsigned slot = 0;
        for (;;) {
            con_reclaim_tx();
            while (slot < con_slots && con_tx_busy & 1u << slot)
                slot++;
            if (slot < con_slots)
                break;
            slot = 0;
            con_check_idle("waiting for a transmit buffer");
        }
        uint32_t chunk = n < CON_BUF ? n : CON_BUF;
        for (uint32_t i = 0; i < chunk; i++)
            con_tx[slot][i] = p[i];
        struct virtio_buf buf = { con_tx[slot], chunk, 0 };
        con_tx_busy |= 1u << slot;
        virtq_add(&con_dev, &con_vqs[CON_TX], (uint16_t)slot, &buf, 1);
        virtq_notify(&con_dev, &con_vqs[CON_TX]);
        p += chunk;
        n -= chunk;
    }
}

static void con_post_rx(unsigned slot)
{
    struct virtio_buf buf = { con_rx[slot], CON_BUF, 1 };
    virtq_add(&con_dev, &con_vqs[CON_RX], (uint16_t)slot, &buf, 1);
}

/*
 * Console: keeps CON_SLOTS receive buffers of CON_BUF bytes posted, writes
 * "virtio-console ready\n" on the transmit queue, then echoes every received
 * byte back on it (a-z upper-cased, so the echo is the guest's work) until a
 * 0x04 byte, which is not echoed. Waits for the device to take all output,
 * prints "virtio-console ok echoed=N rx_buffers=M" on the serial console and
 * exits 0. Input may be split across buffers any way the device likes.
 */
NORETURN void mode_virtio_console(void)
{
    static const char banner[] = "virtio-console ready\n";

    if (!virtio_mmio_find(guest_cmdline(),
                          VIRTIO_ID_CONSOLE, &con_dev))
        fail("virtio-console: no console (DeviceID 3) among the virtio_mmio.device= "
             "entries\n", EXIT_VIRTIO_NO_DEVICE);
    virtio_init(&con_dev, con_vqs, 2, 0);
    con_slots = CON_SLOTS;
    if (con_vqs[CON_RX].num < con_slots)
        con_slots = con_vqs[CON_RX].num;
    if (con_vqs[CON_TX].num < con_slots)
        con_slots = con_vqs[CON_TX].num;
    con_last_progress = rdtsc();

    for (unsigned i = 0; i < con_slots; i++)
        con_post_rx(i);
    virtq_notify(&con_dev, &con_vqs[CON_RX]);
    con_send((const uint8_t *)banner, sizeof(banner) - 1);
    serial_puts("virtio-console: banner sent\n");

    for (int done = 0; !done;) {
        uint32_t id, len;
        if (!virtq_get_used(&con_dev, &con_vqs[CON_RX], &id, &len)) {
            con_reclaim_tx();
            con_check_idle("waiting for input");
            continue;
        }
        __asm__ volatile("" ::: "memory");  /* the device wrote con_rx[id] behind our back */
        if (id >= con_slots || len == 0 || len > CON_BUF) {
            serial_puts("virtio-console: receive used id ");
            serial_put_dec(id);
            serial_puts(" len ");
            serial_put_dec(len);
            serial_putc('\n');
            virtio_fail(&con_dev, "receive used entry with a bad id or length",
                        EXIT_VIRTIO_USED_LEN);
        }
        con_rx_buffers++;
        con_last_progress = rdtsc();
        uint8_t *p = con_rx[id];
        uint32_t n = 0;
        for (; n < len && p[n] != CON_EOT; n++)
            if (p[n] >= 'a' && p[n] <= 'z')
                p[n] = (uint8_t)(p[n] - 'a' + 'A');
        done = n < len;
        con_send(p, n);
        con_echoed += n;
        if (!done) {
            con_post_rx(id);
            virtq_notify(&con_dev, &con_vqs[CON_RX]);
        }
    }
    while (con_tx_busy) {
        con_reclaim_tx();
        con_check_idle("waiting for the device to take the echo");
    }
    virtio_check_status(&con_dev);
    serial_puts("virtio-console ok echoed=");
    serial_put_dec(con_echoed);
    serial_puts(" rx_buffers=");
    serial_put_dec(con_rx_buffers);
    serial_putc('\n');
    guest_exit(EXIT_OK);
}
