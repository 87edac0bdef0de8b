/*
 * The exec scenario every binding runs against forkvm's Linux image: boot the kernel with the
 * root image read-only and the guest agent as init, run commands through the agent, move a file
 * in and out, fork, and check that the child's file system is its own. Needs the image:
 * FORKVM_LINUX_KERNEL (guest/kernel/build.sh) and FORKVM_LINUX_IMAGE (guest/rootfs/build.sh),
 * which scripts/test.sh sets; without them the test says it is skipped and passes.
 */
#include "check.h"

/* Runs `argv` through `agent` into `out` (freed first). */
static enum forkvm_status run(forkvm_agent *agent, const char *const *argv,
                              forkvm_exec_output *out)
{
    forkvm_exec_output_free(out);
    return forkvm_agent_exec(agent, argv, out);
}

int main(void)
{
    const char *kernel = getenv("FORKVM_LINUX_KERNEL");
    const char *image = getenv("FORKVM_LINUX_IMAGE");
    if (!kernel || !image) {
        printf("skipped: set FORKVM_LINUX_KERNEL and FORKVM_LINUX_IMAGE to run it\n");
        return 0;
    }
    int threads_before = count_entries("/proc/self/task");
    int fds_before = count_entries("/proc/self/fd");

    forkvm_builder *builder;
    OK(forkvm_builder_new(&builder));
    OK(forkvm_builder_kernel(builder, kernel));
    OK(forkvm_builder_cmdline(builder, forkvm_image_cmdline()));
    OK(forkvm_builder_memory_mib(builder, 256));
    OK(forkvm_builder_disk(builder, image, true, false));
    OK(forkvm_builder_vsock(builder, 3, NULL));
    forkvm_output discard = { .kind = FORKVM_OUTPUT_DISCARD };
    OK(forkvm_builder_console(builder, &discard));
    forkvm_vm *vm;
    OK(forkvm_builder_build(builder, &vm));
    OK(forkvm_builder_free(builder));
    OK(forkvm_vm_start(vm));

    /* The guest boots (~25 s where its kernel is emulated), then its agent answers. */
    forkvm_agent *agent;
    OK(forkvm_vm_agent(vm, 300000, &agent));
    forkvm_exec_output out = { 0 };
    const char *echo[] = { "echo", "hello", NULL };
    OK(run(agent, echo, &out));
    CHECK(out.status.code == 0 && strcmp((const char *)out.stdout_bytes.data, "hello\n") == 0);
    const char *failing[] = { "sh", "-c", "echo oops >&2; exit 3", NULL };
    OK(run(agent, failing, &out));
    CHECK(out.status.code == 3 && strcmp((const char *)out.stderr_bytes.data, "oops\n") == 0);
    const char *missing[] = { "no-such-program", NULL };
    EXPECT(FORKVM_ERR_COMMAND_NOT_FOUND, run(agent, missing, &out));
    CHECK(strstr(forkvm_last_error(), "no-such-program") != NULL);

    /* A file in and out (the root is read-only; the agent's overlay takes the write). */
    static uint8_t data[1 << 20];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 2654435761u >> 24);
    uint64_t written = 0;
    OK(forkvm_agent_write_file(agent, "/srv/data.bin", data, sizeof data, NULL, &written));
    CHECK(written == sizeof data);
    forkvm_bytes back = { 0 };
    OK(forkvm_agent_read_file(agent, "/srv/data.bin", &back));
    CHECK(back.len == sizeof data && memcmp(back.data, data, sizeof data) == 0);
    forkvm_bytes_free(&back);

    /* A fork: the child starts with the parent's files and then writes its own. */
    forkvm_vm *child;
    OK(forkvm_vm_fork(vm, NULL, 1, &child));
    forkvm_agent *child_agent;
    OK(forkvm_vm_agent(child, 60000, &child_agent));
    const char *overwrite[] = { "sh", "-c", "echo child > /srv/data.bin; cat /srv/data.bin", NULL };
    OK(run(child_agent, overwrite, &out));
    CHECK(strcmp((const char *)out.stdout_bytes.data, "child\n") == 0);
    OK(forkvm_agent_read_file(agent, "/srv/data.bin", &back));
    CHECK(back.len == sizeof data);
    forkvm_bytes_free(&back);

    forkvm_exec_output_free(&out);
    OK(forkvm_agent_free(child_agent));
    OK(forkvm_agent_free(agent));
    forkvm_exit ended;
    OK(forkvm_vm_stop(child, &ended));
    OK(forkvm_vm_free(child));
    OK(forkvm_vm_stop(vm, &ended));
    OK(forkvm_vm_free(vm));
    CHECK(count_entries("/proc/self/task") == threads_before);
    CHECK(count_entries("/proc/self/fd") == fds_before);
    printf("image: %d checks passed\n", checks_passed);
    return 0;
}
