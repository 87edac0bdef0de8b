/*
 * The network through the C binding, on the test guest (which has no network driver, so nothing
 * in it talks on the network and nothing listens): a forkvm_network with rules, a static name
 * and a port published on 127.0.0.1:0; a port published on the running VM (its bound port
 * accepts a host connect, a second publish there fails, unpublish closes it); connect_tcp's fd
 * opens a flow and ends (EOF or reset) since no guest answers; policy changes; stats; fork
 * children with a network of their own or the default one; and readable errors for bad CIDRs,
 * names and addresses, and for a VM without a network. Only 127.0.0.1 is ever dialled.
 */
#include "check.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Whether a TCP connect to 127.0.0.1:port succeeds. */
static int connect_local(uint16_t port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(s >= 0);
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port) };
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ok = connect(s, (struct sockaddr *)&to, sizeof to) == 0;
    close(s);
    return ok;
}

static void misuse(void)
{
    forkvm_network *net;
    OK(forkvm_network_new(&net));
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_network_allow(net, "10.0.0.0/33"));
    CHECK(strstr(forkvm_last_error(), "10.0.0.0/33") != NULL);
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_network_deny(net, "not a cidr"));
    CHECK(strstr(forkvm_last_error(), "not a cidr") != NULL);
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_network_allow_domain(net, "*.example.com"));
    CHECK(strstr(forkvm_last_error(), "domain") != NULL);
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_network_publish(net, "localhost", 0, 80));
    CHECK(strstr(forkvm_last_error(), "not an IP address") != NULL);
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_network_host(net, "db", "10.0.2"));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_network_allow(net, NULL));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_network_allow(NULL, "10.0.0.0/8"));
    OK(forkvm_network_allow(net, "127.0.0.1")); /* a bare address is a /32 */
    OK(forkvm_network_allow(net, "127.0.0.1 tcp/8000-8999"));
    OK(forkvm_network_deny(net, "10.0.0.0/8 udp/53"));
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_network_deny(net, "10.0.0.0/8 sctp"));
    CHECK(strstr(forkvm_last_error(), "sctp") != NULL);
    OK(forkvm_network_free(net));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_network_allow(net, "10.0.0.0/8"));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_network_free(net));
    OK(forkvm_network_free(NULL));

    /* A VM without a network. */
    forkvm_builder *builder = test_guest("mode=generation", NULL);
    forkvm_vm *vm;
    OK(forkvm_builder_build(builder, &vm));
    OK(forkvm_builder_free(builder));
    int fd = -1;
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_connect_tcp(vm, 80, &fd));
    CHECK(strstr(forkvm_last_error(), "no network") != NULL);
    CHECK(fd == -1);
    forkvm_network_stats stats;
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_network_stats(vm, &stats));
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_publish(vm, "127.0.0.1", 0, 80, NULL));
    OK(forkvm_vm_free(vm));
}

int main(void)
{
    int threads_before = count_entries("/proc/self/task");
    int fds_before = count_entries("/proc/self/fd");
    misuse();

    forkvm_network *net;
    OK(forkvm_network_new(&net));
    /* Host sockets to the host's loopback only, whatever the policy: nothing leaves the machine. */
    OK(forkvm_network_loopback_only(net));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_network_loopback_only(NULL));
    OK(forkvm_network_deny_all(net));
    OK(forkvm_network_allow(net, "127.0.0.1/32"));
    OK(forkvm_network_deny(net, "10.0.0.0/8"));
    OK(forkvm_network_allow_domain(net, "example.com"));
    OK(forkvm_network_host(net, "db.internal", "10.0.2.2"));
    OK(forkvm_network_host(net, "DB.internal.", "10.0.2.3")); /* a second address, same name */
    OK(forkvm_network_publish(net, "127.0.0.1", 0, 80));
    forkvm_console *console;
    OK(forkvm_console_new(0, &console));
    forkvm_output output = { .kind = FORKVM_OUTPUT_BUFFER, .buffer = console };
    forkvm_builder *builder = test_guest("mode=generation", &output);
    OK(forkvm_builder_network(builder, net));
    forkvm_vm *vm;
    OK(forkvm_builder_build(builder, &vm));
    OK(forkvm_builder_free(builder));
    OK(forkvm_vm_start(vm));
    wait_for(console, "generation 0 id ");

    /* A virtio-net device (type 1) is there. */
    forkvm_device_info devices[8];
    size_t count;
    OK(forkvm_vm_devices(vm, devices, 8, &count));
    int nets = 0;
    for (size_t i = 0; i < count; i++) {
        if (devices[i].device_type != 1)
            continue;
        nets++;
        /* What the guest receives can be limited, apart from what it sends, and lifted. */
        forkvm_rate_limit rx = { .bytes = { .size = 1 << 20, .refill_ms = 1000 } };
        OK(forkvm_vm_set_rx_rate_limit(vm, i, &rx));
        forkvm_rate_limit shown = { 0 };
        OK(forkvm_vm_rx_rate_limit(vm, i, &shown));
        CHECK(shown.bytes.size == 1 << 20 && shown.bytes.refill_ms == 1000 && shown.ops.size == 0);
        OK(forkvm_vm_rate_limit(vm, i, &shown));
        CHECK(shown.bytes.size == 0 && shown.ops.size == 0);
        rx.ops = (forkvm_bucket){ .size = 10, .refill_ms = 0 };
        EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_vm_set_rx_rate_limit(vm, i, &rx));
        OK(forkvm_vm_set_rx_rate_limit(vm, i, NULL));
        OK(forkvm_vm_rx_rate_limit(vm, i, &shown));
        CHECK(shown.bytes.size == 0);
    }
    CHECK(nets == 1);

    /* Publish on 127.0.0.1:0: the bound port accepts connects until it is unpublished. */
    uint16_t port = 0;
    OK(forkvm_vm_publish(vm, "127.0.0.1", 0, 8080, &port));
    CHECK(port != 0);
    CHECK(connect_local(port));
    EXPECT(FORKVM_ERR_IO, forkvm_vm_publish(vm, "127.0.0.1", port, 8080, NULL));
    CHECK(strstr(forkvm_last_error(), "cannot publish") != NULL);
    OK(forkvm_vm_unpublish(vm, "127.0.0.1", port));
    EXPECT(FORKVM_ERR_IO, forkvm_vm_unpublish(vm, "127.0.0.1", port));
    CHECK(strstr(forkvm_last_error(), "not published") != NULL);
    int refused = 0;
    for (int i = 0; i < 200 && !refused; i++) {
        refused = !connect_local(port);
        if (!refused)
            usleep(10000);
    }
    CHECK(refused);

    /* connect_tcp: a flow opens; no guest answers, so the stream ends (EOF or reset). */
    forkvm_network_stats stats;
    OK(forkvm_vm_network_stats(vm, &stats));
    CHECK(!stats.down);
    uint64_t flows_before = stats.tcp_flows_total;
    int fd = -1;
    OK(forkvm_vm_connect_tcp(vm, 80, &fd));
    CHECK(fd >= 0);
    double start = now();
    int opened = 0;
    while (!opened && now() - start < 5) {
        OK(forkvm_vm_network_stats(vm, &stats));
        opened = stats.tcp_flows_total == flows_before + 1;
        if (!opened)
            usleep(10000);
    }
    CHECK(opened);
    struct pollfd p = { .fd = fd, .events = POLLIN };
    CHECK(poll(&p, 1, 20000) == 1);
    char byte;
    ssize_t got = read(fd, &byte, 1);
    CHECK(got == 0 || (got < 0 && errno == ECONNRESET));
    close(fd);
    int closed = 0;
    for (int i = 0; i < 500 && !closed; i++) {
        OK(forkvm_vm_network_stats(vm, &stats));
        closed = stats.tcp_flows_open == 0;
        if (!closed)
            usleep(10000);
    }
    CHECK(closed);

    /* A policy change, from another forkvm_network's rules. */
    forkvm_network *open;
    OK(forkvm_network_new(&open));
    OK(forkvm_network_loopback_only(open));
    OK(forkvm_network_allow(open, "127.0.0.1/32"));
    OK(forkvm_vm_set_network_policy(vm, open));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_vm_set_network_policy(vm, NULL));

    /* Fork: one child with a network of its own, one with the default (the parent's policy). */
    forkvm_child children[2];
    memset(children, 0, sizeof children);
    children[0].network = open;
    forkvm_vm *kids[2];
    OK(forkvm_vm_fork(vm, children, 2, kids));
    for (int i = 0; i < 2; i++) {
        OK(forkvm_vm_network_stats(kids[i], &stats));
        CHECK(stats.tcp_flows_total == 0 && !stats.down);
        OK(forkvm_vm_publish(kids[i], "127.0.0.1", 0, 80, &port));
        CHECK(port != 0 && connect_local(port));
    }
    OK(forkvm_network_free(open));
    OK(forkvm_network_free(net));
    for (int i = 0; i < 2; i++)
        OK(forkvm_vm_free(kids[i]));
    OK(forkvm_vm_free(vm));
    forkvm_console_free(console);

    /* Every thread and fd forkvm made is gone, once what was freed is released. */
    OK(forkvm_wait_for_releases(60000));
    CHECK(count_entries("/proc/self/task") == threads_before);
    CHECK(count_entries("/proc/self/fd") == fds_before);
    printf("network: %d checks passed\n", checks_passed);
    return 0;
}
