/*
 * vsock-check: the Linux test's round trip over forkvm's virtio-vsock, through
 * the guest kernel's own AF_VSOCK stack.
 *
 *   vsock-check HOST_PORT GUEST_PORT
 *
 * 1. Listens on GUEST_PORT first, so the host may connect as soon as step 2
 *    is done.
 * 2. Connects to the host (CID 2) on HOST_PORT, sends "FORKVM-VSOCK-PING\n",
 *    reads one line back and prints FORKVM-VSOCK-TO-HOST-OK <line>.
 * 3. Accepts one connection on GUEST_PORT, echoes what arrives until the host
 *    shuts down its side, and prints FORKVM-VSOCK-FROM-HOST-OK <bytes>.
 * Any failure prints FORKVM-VSOCK-FAILED <step>: <error> and exits 1.
 *
 * Static and libc-only: the initramfs has no shared libraries. Each system
 * call costs ~0.3 ms in a guest whose kernel is emulated, so I/O is done in
 * large reads and writes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *step)
{
    printf("FORKVM-VSOCK-FAILED %s: %s\n", step, strerror(errno));
    return 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static struct sockaddr_vm vsock_addr(unsigned int cid, unsigned int port)
{
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = cid;
    addr.svm_port = port;
    return addr;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: vsock-check HOST_PORT GUEST_PORT\n");
        return 2;
    }
    unsigned int host_port = (unsigned int)strtoul(argv[1], NULL, 10);
    unsigned int guest_port = (unsigned int)strtoul(argv[2], NULL, 10);

    int listener = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm local = vsock_addr(VMADDR_CID_ANY, guest_port);
    if (listener < 0 || bind(listener, (struct sockaddr *)&local, sizeof(local)) < 0 ||
        listen(listener, 1) < 0)
        return fail("listen");

    int conn = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm host = vsock_addr(VMADDR_CID_HOST, host_port);
    if (conn < 0 || connect(conn, (struct sockaddr *)&host, sizeof(host)) < 0)
        return fail("connect");
    static const char ping[] = "FORKVM-VSOCK-PING\n";
    if (write_all(conn, ping, sizeof(ping) - 1) < 0)
        return fail("send");
    char line[128];
    size_t got = 0;
    while (got < sizeof(line) - 1 && (got == 0 || line[got - 1] != '\n')) {
        ssize_t n = read(conn, line + got, sizeof(line) - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return fail("receive");
        got += (size_t)n;
    }
    line[got] = '\0';
    close(conn);
    printf("FORKVM-VSOCK-TO-HOST-OK %s", line);
    fflush(stdout);

    int peer = accept(listener, NULL, NULL);
    if (peer < 0)
        return fail("accept");
    static char buf[64 << 10];
    size_t echoed = 0;
    for (;;) {
        ssize_t n = read(peer, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return fail("echo read");
        if (n == 0)
            break;
        if (write_all(peer, buf, (size_t)n) < 0)
            return fail("echo write");
        echoed += (size_t)n;
    }
    close(peer);
    printf("FORKVM-VSOCK-FROM-HOST-OK %zu\n", echoed);
    return 0;
}
