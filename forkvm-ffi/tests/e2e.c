/*
 * The end-to-end scenario every binding runs: build the test guest, start it, read its serial
 * banner, fork it into 3, check through the guests' output that each child is a VM of its own,
 * stop everything, and check that no thread or fd is left behind.
 */
#include "check.h"

/* Guest memory the test guest does not use: each VM gets its own value there. */
#define SCRATCH (20ull << 20)

/* The "generation G id H" line in `console`: G and H. */
static void generation_line(forkvm_console *console, unsigned long long *generation,
                            unsigned long long *id)
{
    forkvm_bytes text = console_text(console);
    const char *line = strstr((const char *)text.data, "generation ");
    CHECK(line != NULL);
    CHECK(sscanf(line, "generation %llu id %llx", generation, id) == 2);
    forkvm_bytes_free(&text);
}

static unsigned long long id_prefix(const forkvm_identity *identity)
{
    unsigned long long h = 0;
    for (int i = 7; i >= 0; i--)
        h = h << 8 | identity->id[i];
    return h;
}

int main(void)
{
    int threads_before = count_entries("/proc/self/task");
    int fds_before = count_entries("/proc/self/fd");

    forkvm_console *console;
    OK(forkvm_console_new(0, &console));
    forkvm_output output = { .kind = FORKVM_OUTPUT_BUFFER, .buffer = console };
    forkvm_builder *builder = test_guest("mode=generation", &output);
    forkvm_vm *parent;
    OK(forkvm_builder_build(builder, &parent));
    OK(forkvm_builder_free(builder));
    OK(forkvm_vm_start(parent));

    /* The banner, then the guest's generation and id, as the host sees them too. */
    wait_for(console, "forkvm test guest\n");
    wait_for(console, "generation 0 id ");
    unsigned long long generation, id;
    generation_line(console, &generation, &id);
    forkvm_identity identity;
    OK(forkvm_vm_identity(parent, &identity));
    CHECK(generation == 0 && identity.generation == 0);
    CHECK(id == id_prefix(&identity));

    /* Three children, each with a console of its own. */
    OK(forkvm_vm_pause(parent));
    uint64_t seven = 7;
    OK(forkvm_vm_write_memory(parent, SCRATCH, (const uint8_t *)&seven, sizeof seven));
    forkvm_console *consoles[3];
    forkvm_child children[3];
    memset(children, 0, sizeof children);
    for (int i = 0; i < 3; i++) {
        OK(forkvm_console_new(0, &consoles[i]));
        children[i].console.kind = FORKVM_OUTPUT_BUFFER;
        children[i].console.buffer = consoles[i];
    }
    forkvm_vm *vms[3];
    OK(forkvm_vm_fork(parent, children, 3, vms));
    bool paused;
    OK(forkvm_vm_is_paused(parent, &paused));
    CHECK(paused);

    /* Each child tells through its own console that it is generation 1 with an id of its own. */
    unsigned long long ids[3];
    for (int i = 0; i < 3; i++) {
        wait_for(consoles[i], "generation 1 id ");
        generation_line(consoles[i], &generation, &ids[i]);
        CHECK(generation == 1);
        OK(forkvm_vm_identity(vms[i], &identity));
        CHECK(identity.generation == 1 && ids[i] == id_prefix(&identity));
        CHECK(ids[i] != id);
        for (int j = 0; j < i; j++)
            CHECK(ids[i] != ids[j]);
    }
    /* ... and the parent's console saw none of it. */
    forkvm_bytes text = console_text(console);
    CHECK(strstr((const char *)text.data, "generation 1") == NULL);
    forkvm_bytes_free(&text);

    /* Memory: every VM starts from the fork point, then sees only its own writes. */
    for (uint64_t i = 0; i < 3; i++) {
        uint64_t value = 0;
        OK(forkvm_vm_read_memory(vms[i], SCRATCH, (uint8_t *)&value, sizeof value));
        CHECK(value == 7);
        value = 100 + i;
        OK(forkvm_vm_write_memory(vms[i], SCRATCH, (const uint8_t *)&value, sizeof value));
    }
    for (uint64_t i = 0; i < 3; i++) {
        uint64_t value = 0;
        OK(forkvm_vm_read_memory(vms[i], SCRATCH, (uint8_t *)&value, sizeof value));
        CHECK(value == 100 + i);
    }
    uint64_t value = 0;
    OK(forkvm_vm_read_memory(parent, SCRATCH, (uint8_t *)&value, sizeof value));
    CHECK(value == 7);
    OK(forkvm_vm_resume(parent));

    /* Stop and free everything. */
    for (int i = 0; i < 3; i++) {
        forkvm_exit ended;
        OK(forkvm_vm_stop(vms[i], &ended));
        CHECK(ended.kind == FORKVM_EXIT_STOPPED);
        OK(forkvm_vm_free(vms[i]));
        OK(forkvm_console_free(consoles[i]));
    }
    forkvm_exit ended;
    OK(forkvm_vm_stop(parent, &ended));
    CHECK(ended.kind == FORKVM_EXIT_STOPPED);
    CHECK(strcmp(ended.description, "stopped by the host") == 0);
    OK(forkvm_vm_free(parent));
    OK(forkvm_console_free(console));

    /* Freed VMs are released in the background: wait for that before counting. */
    OK(forkvm_wait_for_releases(60000));
    CHECK(forkvm_pending_releases() == 0);
    int threads_after = count_entries("/proc/self/task");
    int fds_after = count_entries("/proc/self/fd");
    printf("threads %d -> %d, fds %d -> %d\n", threads_before, threads_after, fds_before,
           fds_after);
    CHECK(threads_after == threads_before);
    CHECK(fds_after == fds_before);
    printf("e2e: %d checks passed\n", checks_passed);
    return 0;
}
