/*
 * Misuse gets a clear error, never a crash: NULL pointers, unknown, freed and wrong-typed
 * handles, double frees, calls on a VM that ended or never started, bad arguments; and the
 * rest of the surface: callbacks, exits, devices, snapshot/restore, free while another thread
 * waits.
 */
#include <pthread.h>

#include "check.h"

static void expect_error(const char *needle)
{
    if (!strstr(forkvm_last_error(), needle)) {
        fprintf(stderr, "last error \"%s\" does not mention \"%s\"\n", forkvm_last_error(),
                needle);
        exit(1);
    }
    checks_passed++;
}

static void null_pointers_and_bad_handles(void)
{
    forkvm_vm *bogus = (forkvm_vm *)(uintptr_t)0x1234;
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_builder_new(NULL));
    expect_error("out is NULL");
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_vm_start(NULL));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_vm_start(bogus));
    expect_error("not a live forkvm_vm handle");
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_console_new(0, NULL));
    CHECK(strcmp(forkvm_status_name(FORKVM_ERR_NOT_RUNNING), "FORKVM_ERR_NOT_RUNNING") == 0);
    CHECK(strcmp(forkvm_status_name(999), "FORKVM_ERR_UNKNOWN") == 0);
    CHECK(strcmp(forkvm_status_name(-1), "FORKVM_ERR_UNKNOWN") == 0);
    CHECK(strlen(forkvm_version()) > 0);

    /* The last error is per call: a success clears it. */
    forkvm_console *console;
    OK(forkvm_console_new(16, &console));
    CHECK(strcmp(forkvm_last_error(), "") == 0);

    /* A handle of another type is refused, not reinterpreted. */
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_vm_start((forkvm_vm *)console));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_builder_free((forkvm_builder *)console));
    /* Spawned processes too (a real freed one: tests/image.c): wrong type, never one, NULL. */
    forkvm_process *not_process = (forkvm_process *)console;
    uint32_t pid;
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_pid(not_process, &pid));
    expect_error("not a live forkvm_process handle");
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_write_stdin(not_process, NULL, 0));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_close_stdin(not_process));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_signal(not_process, 15));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_kill(not_process));
    forkvm_process_event event = { 0 };
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_read(not_process, 0, &event));
    forkvm_exec_output output = { 0 };
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_wait(not_process, &output));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_free(not_process));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_kill((forkvm_process *)(uintptr_t)0x1234));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_process_kill(NULL));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_process_pid(not_process, NULL));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_process_read(not_process, 0, NULL));
    OK(forkvm_process_free(NULL));
    forkvm_process_event_free(&event);
    forkvm_process_event_free(NULL);
    const char *argv[] = { "true", NULL };
    forkvm_command command = { .argv = argv };
    forkvm_process *process;
    EXPECT(FORKVM_ERR_INVALID_HANDLE,
           forkvm_agent_spawn((forkvm_agent *)console, &command, &process));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_agent_spawn((forkvm_agent *)console, &command, NULL));

    /* Double free and use after free. */
    OK(forkvm_console_free(console));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_console_free(console));
    forkvm_bytes bytes = { 0 };
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_console_contents(console, &bytes));
    OK(forkvm_console_free(NULL));
    forkvm_bytes_free(&bytes);
    forkvm_bytes_free(NULL);

    /* Builder misuse. */
    forkvm_builder *builder;
    OK(forkvm_builder_new(&builder));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_builder_kernel(builder, NULL));
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_builder_cmdline(builder, "\xff\xfe"));
    forkvm_output bad = { .kind = 99 };
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_builder_console(builder, &bad));
    expect_error("unknown output kind 99");
    /* A refused setter leaves the builder as it was. */
    OK(forkvm_builder_memory_mib(builder, 64));
    forkvm_builder *fresh;
    OK(forkvm_builder_new(&fresh));
    forkvm_vm *vm;
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_builder_build(fresh, &vm));
    expect_error("no kernel");
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_builder_build(fresh, &vm));
    expect_error("built already");
    OK(forkvm_builder_free(fresh));
    OK(forkvm_builder_free(builder));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_builder_free(builder));
}

/* A failed build's status is its kind (a missing KVM device is FORKVM_ERR_KVM, as every other
 * KVM failure), and its message carries its cause, once. */
static void build_failures(void)
{
    forkvm_builder *builder;
    forkvm_vm *vm;
    OK(forkvm_builder_new(&builder));
    OK(forkvm_builder_kernel(builder, "/nonexistent/vmlinux"));
    OK(forkvm_builder_kvm_device(builder, "/nonexistent/kvm"));
    EXPECT(FORKVM_ERR_KVM, forkvm_builder_build(builder, &vm));
    expect_error("/nonexistent/kvm does not exist");
    OK(forkvm_builder_free(builder));

    OK(forkvm_builder_new(&builder));
    OK(forkvm_builder_kernel(builder, "/nonexistent/vmlinux"));
    EXPECT(FORKVM_ERR_BOOT, forkvm_builder_build(builder, &vm));
    const char *cause = "No such file or directory";
    expect_error("cannot read kernel /nonexistent/vmlinux: No such file or directory");
    CHECK(strstr(strstr(forkvm_last_error(), cause) + strlen(cause), cause) == NULL);
    OK(forkvm_builder_free(builder));

    /* A size that does not fit is refused, not truncated: 2^44 + 256 MiB once built 256 MiB. */
    OK(forkvm_builder_new(&builder));
    OK(forkvm_builder_kernel(builder, "/nonexistent/vmlinux"));
    OK(forkvm_builder_memory_mib(builder, (1ull << 44) + 256));
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_builder_build(builder, &vm));
    expect_error("too much");
    OK(forkvm_builder_free(builder));
}

/* The agent of a VM that never started or stopped fails at once, whatever the timeout (the
 * largest once overflowed the clock and panicked). */
static void agent_of_a_vm_that_cannot_answer(void)
{
    forkvm_output discard = { .kind = FORKVM_OUTPUT_DISCARD };
    forkvm_builder *builder = test_guest("mode=spin", &discard);
    OK(forkvm_builder_vsock(builder, 3, NULL));
    forkvm_vm *vm;
    OK(forkvm_builder_build(builder, &vm));
    OK(forkvm_builder_free(builder));
    forkvm_agent *agent;
    EXPECT(FORKVM_ERR_NOT_STARTED, forkvm_vm_agent(vm, UINT64_MAX, &agent));
    OK(forkvm_vm_start(vm));
    forkvm_exit ended;
    OK(forkvm_vm_stop(vm, &ended));
    EXPECT(FORKVM_ERR_NOT_RUNNING, forkvm_vm_agent(vm, UINT64_MAX, &agent));
    OK(forkvm_vm_free(vm));
}

static char seen[4096];
static size_t seen_len;
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_output(void *user_data, const uint8_t *bytes, size_t len)
{
    CHECK(user_data == (void *)seen);
    pthread_mutex_lock(&seen_lock);
    if (len > sizeof seen - 1 - seen_len)
        len = sizeof seen - 1 - seen_len;
    memcpy(seen + seen_len, bytes, len);
    seen_len += len;
    pthread_mutex_unlock(&seen_lock);
}

static void a_vm_that_ended(void)
{
    /* The guest exits with status 3 through the debug-exit port; its output goes to a
     * callback. */
    forkvm_output output = { .kind = FORKVM_OUTPUT_CALLBACK, .callback = on_output,
                             .user_data = seen };
    forkvm_builder *builder = test_guest("mode=exit exit_code=3", &output);
    OK(forkvm_builder_rng(builder));
    forkvm_vm *vm;
    OK(forkvm_builder_build(builder, &vm));
    OK(forkvm_builder_free(builder));

    forkvm_exit ended;
    EXPECT(FORKVM_ERR_NOT_STARTED, forkvm_vm_wait(vm, &ended));
    EXPECT(FORKVM_ERR_NOT_STARTED, forkvm_vm_pause(vm));
    OK(forkvm_vm_exit(vm, &ended));
    CHECK(ended.kind == FORKVM_EXIT_RUNNING);

    forkvm_device_info devices[2];
    size_t count;
    EXPECT(FORKVM_ERR_BUFFER_TOO_SMALL, forkvm_vm_devices(vm, NULL, 0, &count));
    CHECK(count == 1);
    OK(forkvm_vm_devices(vm, devices, 2, &count));
    CHECK(count == 1 && devices[0].device_type == 4);

    /* Rate limits: set, lifted with NULL, refused without a refill time or a device. */
    forkvm_rate_limit limit = { .ops = { .size = 100, .refill_ms = 1000 } };
    OK(forkvm_vm_set_rate_limit(vm, 0, &limit));
    OK(forkvm_vm_set_rate_limit(vm, 0, NULL));
    limit.bytes = (forkvm_bucket){ .size = 4096, .refill_ms = 0 };
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_vm_set_rate_limit(vm, 0, &limit));
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_set_rate_limit(vm, 1, NULL));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_vm_set_rate_limit(NULL, 0, NULL));
    /* A receive limit only for a device that pushes to the guest: not the entropy device. */
    limit.bytes = (forkvm_bucket){ .size = 4096, .refill_ms = 10 };
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_vm_set_rx_rate_limit(vm, 0, &limit));
    CHECK(strstr(forkvm_last_error(), "receive direction") != NULL);
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_set_rx_rate_limit(vm, 1, NULL));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_vm_set_rx_rate_limit(NULL, 0, NULL));
    EXPECT(FORKVM_ERR_INVALID_ARGUMENT, forkvm_vm_rx_rate_limit(vm, 0, &limit));
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_rx_rate_limit(vm, 1, &limit));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_vm_rx_rate_limit(vm, 0, NULL));

    OK(forkvm_vm_start(vm));
    OK(forkvm_vm_wait(vm, &ended));
    CHECK(ended.kind == FORKVM_EXIT_POWERED_OFF && ended.has_status && ended.status == 3);
    pthread_mutex_lock(&seen_lock);
    CHECK(strstr(seen, "forkvm test guest\n") != NULL);
    CHECK(strstr(seen, "test guest: done\n") != NULL);
    pthread_mutex_unlock(&seen_lock);

    /* Everything on a VM that ended fails cleanly. */
    EXPECT(FORKVM_ERR_ALREADY_STARTED, forkvm_vm_start(vm));
    EXPECT(FORKVM_ERR_NOT_RUNNING, forkvm_vm_pause(vm));
    expect_error("not running");
    EXPECT(FORKVM_ERR_NOT_RUNNING, forkvm_vm_resume(vm));
    forkvm_vm *child;
    CHECK(forkvm_vm_fork(vm, NULL, 1, &child) != FORKVM_OK);
    CHECK(forkvm_vm_snapshot(vm, "/tmp/forkvm-c-misuse-never") != FORKVM_OK);
    OK(forkvm_vm_stop(vm, &ended));
    CHECK(ended.kind == FORKVM_EXIT_POWERED_OFF);
    OK(forkvm_vm_wait(vm, &ended));

    /* No such device, no such memory. */
    int fd;
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_vsock_connect(vm, 52, 100, &fd));
    forkvm_agent *agent;
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_agent(vm, 100, &agent));
    forkvm_balloon_info info;
    EXPECT(FORKVM_ERR_NO_DEVICE, forkvm_vm_balloon_info(vm, &info));
    uint8_t byte;
    EXPECT(FORKVM_ERR_MEMORY, forkvm_vm_read_memory(vm, 1ull << 40, &byte, 1));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_vm_read_memory(vm, 0, NULL, 1));

    OK(forkvm_vm_free(vm));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_vm_free(vm));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_vm_stop(vm, &ended));
    OK(forkvm_vm_free(NULL));
}

static void *wait_for_vm(void *vm)
{
    static forkvm_exit ended;
    forkvm_status status = forkvm_vm_wait(vm, &ended);
    return status == FORKVM_OK && ended.kind == FORKVM_EXIT_STOPPED ? vm : NULL;
}

static void free_while_waited_for_and_snapshots(void)
{
    forkvm_console *console;
    OK(forkvm_console_new(0, &console));
    forkvm_output output = { .kind = FORKVM_OUTPUT_BUFFER, .buffer = console };
    forkvm_builder *builder = test_guest("mode=generation", &output);
    forkvm_vm *vm;
    OK(forkvm_builder_build(builder, &vm));
    OK(forkvm_builder_free(builder));
    OK(forkvm_vm_start(vm));
    wait_for(console, "generation 0 id ");

    /* Snapshot, restore (twice: independent VMs), and a directory that is no snapshot. */
    char dir[] = "/tmp/forkvm-c-snapshot-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char snapshot[sizeof dir + 8];
    snprintf(snapshot, sizeof snapshot, "%s/snap", dir);
    OK(forkvm_vm_snapshot(vm, snapshot));
    forkvm_console *restored_console;
    OK(forkvm_console_new(0, &restored_console));
    forkvm_child child = { .console = { .kind = FORKVM_OUTPUT_BUFFER,
                                        .buffer = restored_console } };
    forkvm_vm *restored;
    OK(forkvm_vm_restore(snapshot, &child, &restored));
    wait_for(restored_console, "generation 1 id ");
    forkvm_vm *quiet;
    OK(forkvm_vm_restore(snapshot, NULL, &quiet));
    forkvm_identity a, b;
    OK(forkvm_vm_identity(restored, &a));
    OK(forkvm_vm_identity(quiet, &b));
    CHECK(a.generation == 1 && b.generation == 1 && memcmp(a.id, b.id, 16) != 0);
    int64_t pause_ns;
    OK(forkvm_vm_last_pause(vm, &pause_ns));
    CHECK(pause_ns > 0);
    OK(forkvm_vm_free(quiet));
    OK(forkvm_vm_free(restored));
    OK(forkvm_console_free(restored_console));

    /* Kept ready: restores start in children made ahead, refilled after each. */
    CHECK(forkvm_restores_ready(snapshot) == 0);
    OK(forkvm_keep_restores_ready(snapshot, 1));
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < 10000 && forkvm_restores_ready(snapshot) < 1; i++)
            usleep(1000);
        CHECK(forkvm_restores_ready(snapshot) == 1);
        forkvm_vm *ready;
        OK(forkvm_vm_restore(snapshot, NULL, &ready));
        forkvm_identity c;
        OK(forkvm_vm_identity(ready, &c));
        CHECK(c.generation == 1);
        OK(forkvm_vm_free(ready));
    }
    OK(forkvm_keep_restores_ready(snapshot, 0));
    CHECK(forkvm_restores_ready(snapshot) == 0);
    CHECK(forkvm_restores_ready(NULL) == 0);
    EXPECT(FORKVM_ERR_SNAPSHOT, forkvm_keep_restores_ready(dir, 1));
    forkvm_vm *none;
    EXPECT(FORKVM_ERR_SNAPSHOT, forkvm_vm_restore(dir, NULL, &none));
    char command[128];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    CHECK(system(command) == 0);

    /* Freeing a VM another thread waits for stops it; that wait returns. */
    pthread_t waiter;
    CHECK(pthread_create(&waiter, NULL, wait_for_vm, vm) == 0);
    usleep(50000);
    OK(forkvm_vm_free(vm));
    void *result;
    CHECK(pthread_join(waiter, &result) == 0);
    CHECK(result == vm);
    OK(forkvm_console_free(console));
}

int main(void)
{
    int threads_before = count_entries("/proc/self/task");
    int fds_before = count_entries("/proc/self/fd");
    null_pointers_and_bad_handles();
    build_failures();
    agent_of_a_vm_that_cannot_answer();
    a_vm_that_ended();
    free_while_waited_for_and_snapshots();
    OK(forkvm_wait_for_releases(60000));
    CHECK(count_entries("/proc/self/task") == threads_before);
    CHECK(count_entries("/proc/self/fd") == fds_before);
    printf("misuse: %d checks passed\n", checks_passed);
    return 0;
}
