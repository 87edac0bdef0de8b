/*
 * Polled virtio-vsock driver (virtio 1.x, 5.10) for the test guest: one stream
 * connection at a time, over the multi-queue virtio-mmio driver in virtio.c.
 */
#ifndef FORKVM_GUEST_VSOCK_H
#define FORKVM_GUEST_VSOCK_H

#include "guest.h"

#define VIRTIO_ID_VSOCK 19

#define VSOCK_HOST_CID 2

/*
 * Echo test as a client: connects to host port `port`, sends `bytes` bytes of
 * a deterministic pattern, checks that the same bytes come back, shuts down
 * and ends the run (0 on success). `trace` prints every packet.
 */
NORETURN void vsock_run_connect(const char *cmdline, uint32_t port, uint64_t bytes, int trace);

/*
 * Echo server: prints the guest CID, waits for the host to connect to `port`,
 * echoes every byte back until the host shuts down or resets the connection,
 * then ends the run with 0.
 */
NORETURN void vsock_run_listen(const char *cmdline, uint32_t port, int trace);

#endif /* FORKVM_GUEST_VSOCK_H */
