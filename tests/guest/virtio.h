/*
 * Minimal polled virtio-mmio (transport version 2, virtio 1.x) driver for the
 * test guest. Runs in ring 3: the device windows are identity-mapped,
 * user-accessible and uncached (see the page tables in entry.S).
 *
 * Devices are found the way Linux finds them without ACPI/DT: one
 * `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` token per device on the
 * command line. A device gets up to VIRTIO_MAX_QUEUES split virtqueues (0..n-1,
 * e.g. vsock's rx/tx/event), and completions are found by polling the used
 * rings; interrupts stay unused (but are acknowledged).
 */
#ifndef FORKVM_GUEST_VIRTIO_H
#define FORKVM_GUEST_VIRTIO_H

#include "guest.h"

/* virtio-mmio registers (virtio 1.1, 4.2.2). */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000
#define VIRTIO_MMIO_VERSION             0x004
#define VIRTIO_MMIO_DEVICE_ID           0x008
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034
#define VIRTIO_MMIO_QUEUE_NUM           0x038
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100

/* InterruptStatus bits (4.2.2). */
#define VIRTIO_MMIO_INT_VRING  0x1
#define VIRTIO_MMIO_INT_CONFIG 0x2

#define VIRTIO_MMIO_MAGIC   0x74726976  /* "virt" */
#define VIRTIO_MMIO_VERSION_MODERN 2

/* Device status bits (2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE        0x01
#define VIRTIO_STATUS_DRIVER             0x02
#define VIRTIO_STATUS_DRIVER_OK          0x04
#define VIRTIO_STATUS_FEATURES_OK        0x08
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED             0x80

#define VIRTIO_F_VERSION_1 32

/* virtio-blk (5.2): feature bits, config layout, requests. */
#define VIRTIO_BLK_F_RO    5        /* device is read-only */
#define VIRTIO_BLK_F_FLUSH 9        /* VIRTIO_BLK_T_FLUSH supported */

#define VIRTIO_BLK_CFG_CAPACITY 0x00    /* le64, in 512-byte sectors */

#define VIRTIO_BLK_T_IN     0
#define VIRTIO_BLK_T_OUT    1
#define VIRTIO_BLK_T_FLUSH  4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK     0
#define VIRTIO_BLK_S_IOERR  1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_SECTOR_SIZE 512
#define VIRTIO_BLK_ID_BYTES    20

/* Device-readable header at the start of every request. */
struct virtio_blk_req_hdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* Device IDs (5). */
#define VIRTIO_ID_NET     1
#define VIRTIO_ID_BLOCK   2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_ENTROPY 4
#define VIRTIO_ID_BALLOON 5

/* virtio-balloon (5.5): queues without STATS_VQ, config layout, PFN pages. */
#define VIRTIO_BALLOON_Q_INFLATE 0
#define VIRTIO_BALLOON_Q_DEFLATE 1
#define VIRTIO_BALLOON_CFG_NUM_PAGES 0x00   /* le32, the host's target */
#define VIRTIO_BALLOON_CFG_ACTUAL    0x04   /* le32, written by the driver */
#define VIRTIO_BALLOON_PFN_SHIFT 12
#define VIRTIO_BALLOON_PFNS_PER_REQ 256     /* as Linux: one 1 KiB array per request */

/* Split virtqueue (2.6). */
#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];    /* queue size entries, then used_event */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];  /* queue size entries, then avail_event */
};

/* One device window from the command line. */
struct virtio_mmio_dev {
    uintptr_t base;
    uint64_t size;
    uint32_t irq;
    uint32_t device_id;
};

/*
 * Most queues one device may have set up (vsock needs 3, balloon up to 4).
 * Ring memory is static, one page per queue, so only one device is driven at a
 * time (each mode drives a single device).
 */
#define VIRTIO_MAX_QUEUES 4
/* Most entries of a queue this driver sets up (its rings fit one page). */
#define VIRTIO_QUEUE_LIMIT 128
/* The queue size virtio_init asks for (16 unless a mode raises it, up to the limit). */
extern unsigned virtio_queue_limit;

/* Driver state of one split virtqueue. */
struct virtq {
    uint16_t index;         /* queue number on the device */
    uint16_t num;           /* queue size (power of 2) */
    uint16_t avail_idx;     /* next avail->idx to publish */
    uint16_t last_used;     /* used->idx already consumed */
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
};

/* A buffer to hand to the device. */
struct virtio_buf {
    void *addr;             /* guest-physical == virtual */
    uint32_t len;
    int device_writes;      /* 1: write-only for the device (VIRTQ_DESC_F_WRITE) */
};

uint32_t virtio_read32(const struct virtio_mmio_dev *dev, uint32_t reg);
void virtio_write32(const struct virtio_mmio_dev *dev, uint32_t reg, uint32_t v);

/*
 * Finds the first command-line device whose DeviceID is `device_id`. Every
 * window looked at on the way must have the virtio magic and version 2, or the
 * run fails (EXIT_VIRTIO_BAD_DEVICE); malformed tokens fail with EXIT_BAD_ARG.
 * Returns 1 and fills *dev if found, 0 if not.
 */
int virtio_mmio_find(const char *cmdline, uint32_t device_id, struct virtio_mmio_dev *dev);

/*
 * Full initialisation (3.1.1): reset, ACKNOWLEDGE, DRIVER, feature negotiation,
 * FEATURES_OK, setup of queues 0..nqueues-1 into vqs[0..nqueues-1] (1 <=
 * nqueues <= VIRTIO_MAX_QUEUES), DRIVER_OK. VIRTIO_F_VERSION_1 is required; of
 * the bits in `want` (e.g. 1ull << VIRTIO_BLK_F_FLUSH), those the device offers
 * are accepted too. Returns the negotiated feature set. Fails the run on any
 * error, including a queue the device does not have.
 */
uint64_t virtio_init(const struct virtio_mmio_dev *dev, struct virtq *vqs, unsigned nqueues,
                     uint64_t want);

/*
 * Device-specific configuration space (at VIRTIO_MMIO_CONFIG), read with
 * aligned 32-bit accesses (4.2.2.2). The 64-bit read retries until
 * ConfigGeneration is the same before and after, so both halves belong to the
 * same version of the field. Offsets outside the window fail the run.
 */
uint32_t virtio_config_read32(const struct virtio_mmio_dev *dev, uint32_t offset);
uint64_t virtio_config_read64(const struct virtio_mmio_dev *dev, uint32_t offset);
/* Aligned 32-bit write of a driver-writable config field. */
void virtio_config_write32(const struct virtio_mmio_dev *dev, uint32_t offset, uint32_t v);

/* Fails the run (EXIT_VIRTIO_NEEDS_RESET) if the device set DEVICE_NEEDS_RESET. */
void virtio_check_status(const struct virtio_mmio_dev *dev);

/*
 * Asynchronous use, for devices with several buffers in flight (vsock). The
 * caller numbers the descriptors: a chain of `nbufs` buffers occupies
 * descriptors head..head+nbufs-1 until the device returns it (so fixed slots
 * of equal-length chains need no allocator).
 *
 * virtq_add() fills the descriptors and publishes the chain in the avail ring
 * without notifying; virtq_notify() tells the device about everything added so
 * far. virtq_get_used() takes the next used entry: 1 with the chain's head in
 * *id and the written length in *len, 0 if there is none. Each fails the run
 * on a driver or device error (queue overfull, used entry never made
 * available, id outside the table).
 */
void virtq_add(const struct virtio_mmio_dev *dev, struct virtq *vq, uint16_t head,
               const struct virtio_buf *bufs, unsigned nbufs);
void virtq_notify(const struct virtio_mmio_dev *dev, const struct virtq *vq);
int virtq_get_used(const struct virtio_mmio_dev *dev, struct virtq *vq, uint32_t *id,
                   uint32_t *len);

/* Acknowledges whatever InterruptStatus holds (we poll, but keep the line quiet). */
void virtio_ack_interrupt(const struct virtio_mmio_dev *dev);

/*
 * Puts one descriptor chain made of `bufs` on the queue (in order; each buffer
 * device-readable or device-writable as its flag says), notifies the device
 * and polls the used ring (~2 s timeout: EXIT_VIRTIO_TIMEOUT). Acknowledges
 * the interrupt status. Returns the used length the device reported. Only for
 * queues with nothing else in flight (it always uses descriptors 0..).
 */
uint32_t virtio_transfer(const struct virtio_mmio_dev *dev, struct virtq *vq,
                         const struct virtio_buf *bufs, unsigned nbufs);

/* Sets FAILED in the device status, prints `msg` and ends the run with `code`. */
NORETURN void virtio_fail(const struct virtio_mmio_dev *dev, const char *msg, uint32_t code);

#endif /* FORKVM_GUEST_VIRTIO_H */
