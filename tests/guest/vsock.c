/*
 * Polled virtio-vsock driver (virtio 1.x, 5.10), ring 3: one stream connection
 * at a time. The rx queue stays stocked with header + data buffer pairs (the
 * layout Linux 6.1 uses, so the device must handle a header in its own
 * descriptor); packets go out on the tx queue as a header descriptor plus an
 * optional data descriptor. Every rx/tx chain owns a fixed pair of descriptors
 * (slot i: descriptors 2i and 2i+1), so the used id names the slot.
 *
 * The receive path never sends: what a received packet asks for (RESPONSE,
 * CREDIT_UPDATE, RST) is recorded and sent from flush_owed(), so waiting for a
 * free tx slot may service the rx queue without recursing.
 */
#include "virtio.h"
#include "vsock.h"

#define VQ_RX    0
#define VQ_TX    1
#define VQ_EVENT 2
#define NQUEUES  3

#define VSOCK_CFG_GUEST_CID 0x00    /* le64 */

#define VSOCK_TYPE_STREAM 1

#define OP_REQUEST        1
#define OP_RESPONSE       2
#define OP_RST            3
#define OP_SHUTDOWN       4
#define OP_RW             5
#define OP_CREDIT_UPDATE  6
#define OP_CREDIT_REQUEST 7

#define SHUTDOWN_RCV  1     /* the sender will not receive any more */
#define SHUTDOWN_SEND 2     /* the sender will not send any more */

#define EVENT_TRANSPORT_RESET 0

struct vsock_hdr {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

#define SLOTS     8         /* rx and tx chains in flight (fewer if a queue is smaller) */
#define PKT_DATA  4096      /* data buffer per slot, as Linux's rx buffers */
#define RXBUF     65536     /* receive ring: what we advertise as buf_alloc */
#define NEVENTS   4
#define GUEST_PORT 49152    /* our port when connecting (one connection per run) */

#define IDLE_TIMEOUT   (4 * TSC_TIMEOUT_2S)     /* ~8 s without progress */
#define ACCEPT_TIMEOUT (15 * TSC_TIMEOUT_2S)    /* ~30 s for the host to connect */

static struct virtio_mmio_dev dev;
static struct virtq vqs[NQUEUES];
static uint64_t guest_cid;
static int trace;

static struct vsock_hdr rx_hdr[SLOTS];
static uint8_t rx_data[SLOTS][PKT_DATA] __attribute__((aligned(4096)));
static unsigned rx_slots;
static struct vsock_hdr tx_hdr[SLOTS];
static uint8_t tx_data[SLOTS][PKT_DATA] __attribute__((aligned(4096)));
static unsigned tx_slots;
static uint32_t tx_busy;    /* bit i: tx slot i is on the queue */
static uint32_t events[NEVENTS];    /* struct virtio_vsock_event: le32 id */

enum conn_state { C_IDLE, C_LISTEN, C_CONNECTING, C_CONNECTED, C_CLOSED };

/* The one connection. Counters wrap like the spec's (u32). */
static struct {
    enum conn_state state;
    uint32_t local_port, peer_port;
    uint32_t peer_buf_alloc, peer_fwd_cnt;  /* the peer's credit, as last advertised */
    uint32_t tx_cnt;            /* data bytes we sent */
    uint32_t rx_cnt;            /* data bytes received into rxbuf */
    uint32_t fwd_cnt;           /* data bytes taken out of rxbuf */
    uint32_t fwd_advertised;    /* fwd_cnt as we last told the peer */
    uint32_t peer_shutdown;     /* SHUTDOWN flags received */
    int reset;                  /* RST (or a transport reset) received */
    int owe_response, owe_credit_update;
    /* For the tests: evidence that credit flow control was exercised. */
    uint32_t credit_stalls;     /* times we had data to send but no credit */
    uint32_t updates_sent, updates_received;    /* CREDIT_UPDATE packets */
    int stalled;
} conn;
static uint8_t rxbuf[RXBUF];    /* data from rx_cnt - fwd_cnt bytes back, index % RXBUF */

/* One RST owed for a packet that belongs to no connection (ports from our side). */
static struct {
    int pending;
    uint32_t local_port, peer_port;
} stray_rst;

static uint64_t last_progress;

/* ---- diagnostics ---- */

static const char *op_name(uint16_t op)
{
    static const char *const names[] = {
        "0?", "REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW", "CREDIT_UPDATE", "CREDIT_REQUEST",
    };
    return op < sizeof(names) / sizeof(names[0]) ? names[op] : "?";
}

static void trace_pkt(const char *dir, const struct vsock_hdr *h)
{
    serial_puts("vsock: ");
    serial_puts(dir);
    serial_putc(' ');
    serial_puts(op_name(h->op));
    serial_puts(" op=");
    serial_put_dec(h->op);
    serial_putc(' ');
    serial_put_dec(h->src_cid);
    serial_putc(':');
    serial_put_dec(h->src_port);
    serial_puts(" -> ");
    serial_put_dec(h->dst_cid);
    serial_putc(':');
    serial_put_dec(h->dst_port);
    serial_puts(" type=");
    serial_put_dec(h->type);
    serial_puts(" len=");
    serial_put_dec(h->len);
    serial_puts(" flags=");
    serial_put_dec(h->flags);
    serial_puts(" buf_alloc=");
    serial_put_dec(h->buf_alloc);
    serial_puts(" fwd_cnt=");
    serial_put_dec(h->fwd_cnt);
    serial_putc('\n');
}

static void put_state(void)
{
    serial_puts("vsock: state ");
    serial_put_dec(conn.state);
    serial_puts(" tx_cnt=");
    serial_put_dec(conn.tx_cnt);
    serial_puts(" peer_buf_alloc=");
    serial_put_dec(conn.peer_buf_alloc);
    serial_puts(" peer_fwd_cnt=");
    serial_put_dec(conn.peer_fwd_cnt);
    serial_puts(" rx_cnt=");
    serial_put_dec(conn.rx_cnt);
    serial_puts(" fwd_cnt=");
    serial_put_dec(conn.fwd_cnt);
    serial_puts(" peer_shutdown=");
    serial_put_dec(conn.peer_shutdown);
    serial_puts(" tx_busy=");
    serial_put_hex(tx_busy);
    serial_putc('\n');
}

/* A received packet the spec does not allow: always printed, then the run fails. */
static NORETURN void bad_packet(const struct vsock_hdr *h, const char *why)
{
    trace_pkt("rx (rejected)", h);
    put_state();
    virtio_fail(&dev, why, EXIT_VSOCK_PROTOCOL);
}

static NORETURN void vsock_fail(const char *why, uint32_t code)
{
    put_state();
    virtio_fail(&dev, why, code);
}

/*
 * Fails the run if nothing happened for `timeout` TSC ticks. Also looks at the
 * device status every ~0.1 s, so DEVICE_NEEDS_RESET shows up as such rather
 * than as a timeout.
 */
static void check_idle(uint64_t timeout, const char *what)
{
    static uint64_t last_status_check;

    if (rdtsc() - last_status_check > TSC_TIMEOUT_2S / 20) {
        virtio_check_status(&dev);
        last_status_check = rdtsc();
    }
    if (rdtsc() - last_progress > timeout) {
        virtio_check_status(&dev);
        serial_puts("vsock: timed out ");
        serial_puts(what);
        serial_putc('\n');
        vsock_fail("no progress", EXIT_VSOCK_TIMEOUT);
    }
}

/* ---- queues ---- */

static void post_rx(unsigned slot)
{
    struct virtio_buf bufs[2] = {
        { &rx_hdr[slot], sizeof(rx_hdr[slot]), 1 },
        { rx_data[slot], PKT_DATA, 1 },
    };
    virtq_add(&dev, &vqs[VQ_RX], (uint16_t)(2 * slot), bufs, 2);
}

static void post_event(unsigned i)
{
    struct virtio_buf buf = { &events[i], sizeof(events[i]), 1 };
    events[i] = 0xffffffff;     /* not an event id: shows whether the device wrote one */
    virtq_add(&dev, &vqs[VQ_EVENT], (uint16_t)i, &buf, 1);
}

/* Takes back the tx chains the device is done with. */
static int reclaim_tx(void)
{
    uint32_t id, len;
    int any = 0;

    while (virtq_get_used(&dev, &vqs[VQ_TX], &id, &len)) {
        unsigned slot = id / 2;
        if (id % 2 || slot >= tx_slots || !(tx_busy & 1u << slot)) {
            serial_puts("vsock: tx used id ");
            serial_put_dec(id);
            serial_putc('\n');
            vsock_fail("tx used entry for a chain not in flight", EXIT_VIRTIO_USED_LEN);
        }
        tx_busy &= ~(1u << slot);
        any = 1;
    }
    return any;
}

/* A free tx slot, or -1 if all are on the queue. */
static int free_tx_slot(void)
{
    reclaim_tx();
    for (unsigned i = 0; i < tx_slots; i++)
        if (!(tx_busy & 1u << i))
            return (int)i;
    return -1;
}

/* Header fields every packet we send carries, with our credit. */
static void fill_hdr(struct vsock_hdr *h, uint32_t local_port, uint32_t peer_port, uint16_t op,
                     uint32_t flags, uint32_t len)
{
    h->src_cid = guest_cid;
    h->dst_cid = VSOCK_HOST_CID;
    h->src_port = local_port;
    h->dst_port = peer_port;
    h->len = len;
    h->type = VSOCK_TYPE_STREAM;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = RXBUF;
    h->fwd_cnt = conn.fwd_cnt;
}

/* Puts a packet in tx slot `slot` (data already in tx_data[slot]) and notifies. */
static void send_slot(unsigned slot, uint32_t local_port, uint32_t peer_port, uint16_t op,
                      uint32_t flags, uint32_t len)
{
    struct virtio_buf bufs[2] = {
        { &tx_hdr[slot], sizeof(tx_hdr[slot]), 0 },
        { tx_data[slot], len, 0 },
    };

    fill_hdr(&tx_hdr[slot], local_port, peer_port, op, flags, len);
    if (local_port == conn.local_port && peer_port == conn.peer_port)
        conn.fwd_advertised = conn.fwd_cnt;
    if (trace)
        trace_pkt("tx", &tx_hdr[slot]);
    tx_busy |= 1u << slot;
    virtq_add(&dev, &vqs[VQ_TX], (uint16_t)(2 * slot), bufs, len ? 2 : 1);
    virtq_notify(&dev, &vqs[VQ_TX]);
}

static int service(void);

/* Sends a control packet (no data), waiting for a tx slot if need be. */
static void send_control(uint32_t local_port, uint32_t peer_port, uint16_t op, uint32_t flags)
{
    int slot;
    uint64_t t0 = rdtsc();

    while ((slot = free_tx_slot()) < 0) {
        service();
        if (rdtsc() - t0 > IDLE_TIMEOUT)
            vsock_fail("timed out waiting for a free tx slot", EXIT_VSOCK_TIMEOUT);
        cpu_relax();
    }
    send_slot((unsigned)slot, local_port, peer_port, op, flags, 0);
}

/* ---- receive path ---- */

static void owe_stray_rst(const struct vsock_hdr *h)
{
    if (h->op == OP_RST)
        return;     /* never answer a RST */
    if (stray_rst.pending) {
        serial_puts("vsock: dropping a RST owed for a stray packet\n");
        return;
    }
    stray_rst.pending = 1;
    stray_rst.local_port = h->dst_port;
    stray_rst.peer_port = h->src_port;
}

static void take_credit(const struct vsock_hdr *h)
{
    conn.peer_buf_alloc = h->buf_alloc;
    conn.peer_fwd_cnt = h->fwd_cnt;
}

/* A REQUEST while listening: the connection is established once we answer. */
static void accept_request(const struct vsock_hdr *h)
{
    conn.peer_port = h->src_port;
    conn.state = C_CONNECTED;
    conn.owe_response = 1;
    take_credit(h);
    serial_puts("vsock: connection from ");
    serial_put_dec(h->src_cid);
    serial_putc(':');
    serial_put_dec(h->src_port);
    serial_putc('\n');
}

static void handle_rw(const struct vsock_hdr *h, const uint8_t *data, uint32_t n)
{
    if (conn.state != C_CONNECTED)
        bad_packet(h, "RW before the connection was established");
    if (conn.peer_shutdown & SHUTDOWN_SEND)
        bad_packet(h, "RW after the peer's SHUTDOWN (will not send)");
    if (n > RXBUF - (conn.rx_cnt - conn.fwd_cnt))
        bad_packet(h, "RW beyond the credit we gave (buf_alloc - bytes not yet consumed)");
    for (uint32_t i = 0; i < n; i++)
        rxbuf[(conn.rx_cnt + i) % RXBUF] = data[i];
    conn.rx_cnt += n;
}

/* One packet from the rx queue (`n` data bytes at `data`). */
static void handle_packet(const struct vsock_hdr *h, const uint8_t *data, uint32_t n)
{
    if (trace)
        trace_pkt("rx", h);
    if (h->dst_cid != guest_cid || h->src_cid != VSOCK_HOST_CID)
        bad_packet(h, "packet not from the host to our CID");
    if (h->type != VSOCK_TYPE_STREAM) {
        trace_pkt("rx (not a stream, refused)", h);
        owe_stray_rst(h);
        return;
    }
    if (h->op != OP_RW && n != 0)
        bad_packet(h, "data in a packet that is not RW");

    int ours = (conn.state == C_CONNECTING || conn.state == C_CONNECTED) &&
               h->dst_port == conn.local_port && h->src_port == conn.peer_port;
    if (!ours) {
        if (conn.state == C_LISTEN && h->op == OP_REQUEST && h->dst_port == conn.local_port) {
            accept_request(h);
            return;
        }
        trace_pkt("rx (no such connection)", h);
        owe_stray_rst(h);
        return;
    }

    take_credit(h);
    switch (h->op) {
    case OP_RESPONSE:
        if (conn.state != C_CONNECTING)
            bad_packet(h, "RESPONSE on an established connection");
        conn.state = C_CONNECTED;
        break;
    case OP_RST:
        conn.reset = 1;
        conn.state = C_CLOSED;
        break;
    case OP_SHUTDOWN:
        if (h->flags & ~(uint32_t)(SHUTDOWN_RCV | SHUTDOWN_SEND))
            bad_packet(h, "SHUTDOWN with unknown flags");
        conn.peer_shutdown |= h->flags;
        break;
    case OP_RW:
        handle_rw(h, data, n);
        break;
    case OP_CREDIT_UPDATE:
        conn.updates_received++;    /* take_credit() did the rest */
        break;
    case OP_CREDIT_REQUEST:
        conn.owe_credit_update = 1;
        break;
    case OP_REQUEST:
        bad_packet(h, "REQUEST on an existing connection");
    default:
        bad_packet(h, "unknown op");
    }
}

static int poll_rx(void)
{
    uint32_t id, len;
    int any = 0;

    while (virtq_get_used(&dev, &vqs[VQ_RX], &id, &len)) {
        unsigned slot = id / 2;
        if (id % 2 || slot >= rx_slots) {
            serial_puts("vsock: rx used id ");
            serial_put_dec(id);
            serial_putc('\n');
            vsock_fail("rx used entry for a chain we did not post", EXIT_VIRTIO_USED_LEN);
        }
        __asm__ volatile("" ::: "memory");  /* the device wrote the slot behind our back */
        const struct vsock_hdr *h = &rx_hdr[slot];
        if (len < sizeof(*h) || len > sizeof(*h) + PKT_DATA) {
            serial_puts("vsock: rx used length ");
            serial_put_dec(len);
            serial_putc('\n');
            vsock_fail("rx used length not in 44..44+4096", EXIT_VIRTIO_USED_LEN);
        }
        if (h->len != len - sizeof(*h)) {
            serial_puts("vsock: rx used length ");
            serial_put_dec(len);
            serial_putc('\n');
            bad_packet(h, "header len does not match the used length - 44");
        }
        handle_packet(h, rx_data[slot], h->len);
        post_rx(slot);
        any = 1;
    }
    if (any)
        virtq_notify(&dev, &vqs[VQ_RX]);
    return any;
}

static int poll_events(void)
{
    uint32_t id, len;
    int any = 0;

    while (virtq_get_used(&dev, &vqs[VQ_EVENT], &id, &len)) {
        if (id >= NEVENTS || len != sizeof(events[0]))
            vsock_fail("bad event queue used entry", EXIT_VIRTIO_USED_LEN);
        serial_puts("vsock: event ");
        serial_put_dec(events[id]);
        serial_putc('\n');
        if (events[id] == EVENT_TRANSPORT_RESET) {
            /* Every connection is gone and the CID may have changed (5.10.6.7). */
            if (conn.state == C_CONNECTING || conn.state == C_CONNECTED) {
                conn.reset = 1;
                conn.state = C_CLOSED;
            }
            guest_cid = virtio_config_read64(&dev, VSOCK_CFG_GUEST_CID);
        }
        post_event(id);
        any = 1;
    }
    if (any)
        virtq_notify(&dev, &vqs[VQ_EVENT]);
    return any;
}

/* Everything that needs no tx slot; 1 if anything happened. */
static int service(void)
{
    int any = reclaim_tx();
    any |= poll_rx();
    any |= poll_events();
    /* Register accesses are VM exits: only when something happened, not every spin. */
    if (any) {
        virtio_ack_interrupt(&dev);
        last_progress = rdtsc();
    }
    return any;
}

/*
 * Sends what received packets asked for, and a CREDIT_UPDATE once a quarter of
 * our buffer was consumed without the peer hearing of it (so a peer that ran
 * out of credit always learns of new room: when it has sent all RXBUF bytes
 * and we consumed them, that is more than a quarter).
 */
static void flush_owed(void)
{
    if (stray_rst.pending) {
        stray_rst.pending = 0;
        send_control(stray_rst.local_port, stray_rst.peer_port, OP_RST, 0);
    }
    if (conn.state != C_CONNECTED)
        return;
    if (conn.owe_response) {
        conn.owe_response = 0;
        send_control(conn.local_port, conn.peer_port, OP_RESPONSE, 0);
    }
    if (conn.owe_credit_update || conn.fwd_cnt - conn.fwd_advertised >= RXBUF / 4) {
        conn.owe_credit_update = 0;
        conn.updates_sent++;
        send_control(conn.local_port, conn.peer_port, OP_CREDIT_UPDATE, 0);
    }
}

static void poll_all(void)
{
    if (service())
        virtio_check_status(&dev);
    flush_owed();
}

/* ---- connection ---- */

/* Bytes the peer still accepts (its buf_alloc minus what it has not yet consumed). */
static uint32_t peer_credit(void)
{
    return conn.peer_buf_alloc - (conn.tx_cnt - conn.peer_fwd_cnt);
}

/* Sends up to one packet of `buf`; returns how much went (0: no credit or no slot). */
static uint32_t conn_send(const uint8_t *buf, uint32_t len)
{
    uint32_t credit = peer_credit();
    int slot;

    if (conn.state != C_CONNECTED || (conn.peer_shutdown & SHUTDOWN_RCV))
        return 0;
    if (credit > conn.peer_buf_alloc)
        vsock_fail("peer fwd_cnt ahead of what we sent", EXIT_VSOCK_PROTOCOL);
    /* Count each stretch without credit once, not every spin of it. */
    if (len && credit == 0 && !conn.stalled)
        conn.credit_stalls++;
    conn.stalled = len && credit == 0;
    uint32_t n = len < credit ? len : credit;
    if (n > PKT_DATA)
        n = PKT_DATA;
    if (n == 0 || (slot = free_tx_slot()) < 0)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        tx_data[slot][i] = buf[i];
    send_slot((unsigned)slot, conn.local_port, conn.peer_port, OP_RW, 0, n);
    conn.tx_cnt += n;
    last_progress = rdtsc();
    return n;
}

/* Bytes received and not yet consumed. */
static uint32_t conn_pending(void)
{
    return conn.rx_cnt - conn.fwd_cnt;
}

/* Copies up to `max` unconsumed bytes without consuming them. */
static uint32_t conn_peek(uint8_t *buf, uint32_t max)
{
    uint32_t n = conn_pending() < max ? conn_pending() : max;

    for (uint32_t i = 0; i < n; i++)
        buf[i] = rxbuf[(conn.fwd_cnt + i) % RXBUF];
    return n;
}

/* Consumes `n` bytes: they count towards the fwd_cnt we advertise. */
static void conn_consume(uint32_t n)
{
    conn.fwd_cnt += n;
}

/*
 * Clean close (5.10.6.6): SHUTDOWN with both flags, then the peer's RST (or
 * its own SHUTDOWN, answered with RST); RST ourselves if neither comes within
 * ~2 s. Waits until the device took every tx packet, so nothing we sent is
 * lost when the run ends right after.
 */
static void conn_close(const char *who)
{
    if (conn.state == C_CONNECTED) {
        send_control(conn.local_port, conn.peer_port, OP_SHUTDOWN,
                     SHUTDOWN_RCV | SHUTDOWN_SEND);
        uint64_t t0 = rdtsc();
        while (!conn.reset && conn.peer_shutdown != (SHUTDOWN_RCV | SHUTDOWN_SEND) &&
               rdtsc() - t0 < TSC_TIMEOUT_2S) {
            poll_all();
            cpu_relax();
        }
        serial_puts(who);
        serial_puts(conn.reset ? ": peer answered the SHUTDOWN with RST\n"
                    : conn.peer_shutdown == 3 ? ": peer answered with SHUTDOWN, sending RST\n"
                                              : ": no answer to the SHUTDOWN, sending RST\n");
        if (!conn.reset)
            send_control(conn.local_port, conn.peer_port, OP_RST, 0);
        conn.state = C_CLOSED;
    }
    uint64_t t0 = rdtsc();
    while (tx_busy) {
        service();
        if (rdtsc() - t0 > TSC_TIMEOUT_2S)
            vsock_fail("the device did not take the last tx packets", EXIT_VSOCK_TIMEOUT);
        cpu_relax();
    }
}

/* Flow-control counters, for the tests to see that credit was exercised. */
static void put_stats(const char *who)
{
    serial_puts(who);
    serial_puts(": credit_stalls=");
    serial_put_dec(conn.credit_stalls);
    serial_puts(" credit_updates_sent=");
    serial_put_dec(conn.updates_sent);
    serial_puts(" credit_updates_received=");
    serial_put_dec(conn.updates_received);
    serial_putc('\n');
}

/* ---- setup ---- */

static void vsock_start(const char *cmdline, int want_trace)
{
    trace = want_trace;
    if (!virtio_mmio_find(cmdline, VIRTIO_ID_VSOCK, &dev)) {
        serial_puts("vsock: no vsock device (DeviceID 19) among the virtio_mmio.device= "
                    "entries\n");
        guest_exit(EXIT_VIRTIO_NO_DEVICE);
    }
    virtio_init(&dev, vqs, NQUEUES, 0);

    guest_cid = virtio_config_read64(&dev, VSOCK_CFG_GUEST_CID);
    serial_puts("vsock: guest cid ");
    serial_put_dec(guest_cid);
    serial_putc('\n');
    /* 0..2 are reserved, and the upper 32 bits must be zero (5.10.4). */
    if (guest_cid < 3 || guest_cid > UINT32_MAX)
        virtio_fail(&dev, "guest_cid in config space is reserved or wider than 32 bits",
                    EXIT_VSOCK_PROTOCOL);

    rx_slots = vqs[VQ_RX].num / 2 < SLOTS ? vqs[VQ_RX].num / 2 : SLOTS;
    tx_slots = vqs[VQ_TX].num / 2 < SLOTS ? vqs[VQ_TX].num / 2 : SLOTS;
    if (rx_slots == 0 || tx_slots == 0 || vqs[VQ_EVENT].num < NEVENTS)
        virtio_fail(&dev, "vsock queues too small for this driver", EXIT_VIRTIO_QUEUE);
    for (unsigned i = 0; i < rx_slots; i++)
        post_rx(i);
    virtq_notify(&dev, &vqs[VQ_RX]);
    for (unsigned i = 0; i < NEVENTS; i++)
        post_event(i);
    virtq_notify(&dev, &vqs[VQ_EVENT]);
    last_progress = rdtsc();
}

/* ---- modes ---- */

/* The byte at offset i of the stream the connect mode sends (not periodic at 4 KiB). */
static uint8_t pattern_byte(uint64_t i)
{
    return (uint8_t)(i ^ (i >> 8) * 31 ^ (i >> 16) * 131);
}

static void put_progress(const char *who, const char *what, uint64_t done, uint64_t total)
{
    serial_puts(who);
    serial_puts(what);
    serial_put_dec(done);
    serial_putc('/');
    serial_put_dec(total);
    serial_putc('\n');
}

/* Checks the echoed bytes against the pattern and consumes them; returns how many. */
static uint32_t check_echo(uint64_t offset, uint64_t total)
{
    static uint8_t chunk[PKT_DATA];
    uint32_t n = conn_peek(chunk, sizeof(chunk));

    if (n > total - offset)
        vsock_fail("more bytes echoed than were sent", EXIT_VSOCK_MISMATCH);
    for (uint32_t i = 0; i < n; i++) {
        if (chunk[i] != pattern_byte(offset + i)) {
            serial_puts("vsock-connect: echoed byte ");
            serial_put_dec(offset + i);
            serial_puts(" is ");
            serial_put_hex(chunk[i]);
            serial_puts(", sent ");
            serial_put_hex(pattern_byte(offset + i));
            serial_putc('\n');
            vsock_fail("echo differs from what was sent", EXIT_VSOCK_MISMATCH);
        }
    }
    conn_consume(n);
    return n;
}

NORETURN void vsock_run_connect(const char *cmdline, uint32_t port, uint64_t bytes, int want_trace)
{
    static const char who[] = "vsock-connect";
    static uint8_t chunk[PKT_DATA];
    uint64_t sent = 0, echoed = 0, next_mark = 65536;

    vsock_start(cmdline, want_trace);
    conn.state = C_CONNECTING;
    conn.local_port = GUEST_PORT;
    conn.peer_port = port;
    serial_puts("vsock-connect: connecting to port ");
    serial_put_dec(port);
    serial_putc('\n');
    send_control(conn.local_port, conn.peer_port, OP_REQUEST, 0);
    while (conn.state == C_CONNECTING) {
        poll_all();
        check_idle(IDLE_TIMEOUT, "waiting for RESPONSE");
        cpu_relax();
    }
    if (conn.reset)
        vsock_fail("connection refused (RST)", EXIT_VSOCK_RESET);
    serial_puts("vsock-connect: connected, peer buf_alloc ");
    serial_put_dec(conn.peer_buf_alloc);
    serial_putc('\n');

    while (echoed < bytes) {
        poll_all();
        if (conn.reset || conn.peer_shutdown)
            vsock_fail("host closed the connection before the echo was complete",
                       EXIT_VSOCK_RESET);
        if (sent < bytes) {
            uint32_t n = bytes - sent < PKT_DATA ? (uint32_t)(bytes - sent) : PKT_DATA;
            for (uint32_t i = 0; i < n; i++)
                chunk[i] = pattern_byte(sent + i);
            sent += conn_send(chunk, n);
            if (sent == bytes)
                put_progress(who, ": sent ", sent, bytes);
        }
        echoed += check_echo(echoed, bytes);
        if (echoed >= next_mark && echoed < bytes) {
            put_progress(who, ": echoed ", echoed, bytes);
            next_mark += 65536;
        }
        check_idle(IDLE_TIMEOUT, "waiting for credit or echoed data");
        cpu_relax();
    }
    flush_owed();
    serial_puts("vsock-connect: echo of ");
    serial_put_dec(bytes);
    serial_puts(" bytes intact\n");
    conn_close(who);
    put_stats(who);
    serial_puts("vsock-connect ok\n");
    guest_exit(EXIT_OK);
}

NORETURN void vsock_run_listen(const char *cmdline, uint32_t port, int want_trace)
{
    static const char who[] = "vsock-listen";
    static uint8_t chunk[PKT_DATA];
    uint64_t echoed = 0;

    vsock_start(cmdline, want_trace);
    conn.state = C_LISTEN;
    conn.local_port = port;
    serial_puts("vsock-listen: listening on port ");
    serial_put_dec(port);
    serial_putc('\n');
    while (conn.state == C_LISTEN) {
        poll_all();
        check_idle(ACCEPT_TIMEOUT, "waiting for a connection");
        cpu_relax();
    }
    flush_owed();   /* the RESPONSE */
    serial_puts("vsock-listen: connected\n");

    for (;;) {
        poll_all();
        if (conn.reset) {
            serial_puts("vsock-listen: reset by the host after echoing ");
            serial_put_dec(echoed);
            serial_puts(" bytes\n");
            break;
        }
        /* Echo while the host still receives; once it will not, drop what is left. */
        if (conn.peer_shutdown & SHUTDOWN_RCV) {
            conn_consume(conn_pending());
        } else if (conn_pending()) {
            uint32_t n = conn_peek(chunk, sizeof(chunk));
            n = conn_send(chunk, n);
            conn_consume(n);
            echoed += n;
        }
        if (conn.peer_shutdown && conn_pending() == 0) {
            serial_puts("vsock-listen: host shut down (flags ");
            serial_put_dec(conn.peer_shutdown);
            serial_puts(") after ");
            serial_put_dec(echoed);
            serial_puts(" bytes echoed\n");
            /* A peer that only stopped sending gets our SHUTDOWN; one that did both, RST. */
            if (conn.peer_shutdown == (SHUTDOWN_RCV | SHUTDOWN_SEND)) {
                send_control(conn.local_port, conn.peer_port, OP_RST, 0);
                conn.state = C_CLOSED;
            }
            conn_close(who);
            break;
        }
        check_idle(IDLE_TIMEOUT, "echoing");
        cpu_relax();
    }
    conn_close(who);    /* drains tx */
    put_stats(who);
    serial_puts("vsock-listen ok\n");
    guest_exit(EXIT_OK);
}
