/*
 * forkvm from C: build a VM, start it, print its serial banner, fork it into two children,
 * stop everything. README.md shows this file; forkvm-ffi/test.sh compiles and runs it.
 *
 *   cc hello.c $(pkg-config --cflags --libs forkvm) -o hello && ./hello vmlinux
 */
#include <forkvm.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define TRY(call)                                                                        \
    do {                                                                                 \
        forkvm_status status_ = (call);                                                  \
        if (status_ != FORKVM_OK) {                                                      \
            fprintf(stderr, "%s: %s: %s\n", #call, forkvm_status_name(status_),          \
                    forkvm_last_error());                                                \
            return 1;                                                                    \
        }                                                                                \
    } while (0)

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s KERNEL [CMDLINE]\n", argv[0]);
        return 2;
    }
    forkvm_console *console;
    TRY(forkvm_console_new(0, &console));

    forkvm_builder *builder;
    TRY(forkvm_builder_new(&builder));
    TRY(forkvm_builder_kernel(builder, argv[1]));
    TRY(forkvm_builder_cmdline(builder, argc > 2 ? argv[2] : "mode=spin"));
    TRY(forkvm_builder_memory_mib(builder, 32));
    forkvm_output output = { .kind = FORKVM_OUTPUT_BUFFER, .buffer = console };
    TRY(forkvm_builder_console(builder, &output));

    forkvm_vm *vm;
    TRY(forkvm_builder_build(builder, &vm));
    TRY(forkvm_builder_free(builder));
    TRY(forkvm_vm_start(vm));

    /* Wait for the guest's banner. */
    forkvm_bytes text = { 0 };
    for (int i = 0; i < 1000; i++) {
        forkvm_bytes_free(&text);
        TRY(forkvm_console_contents(console, &text));
        if (text.len > 0 && text.data[text.len - 1] == '\n')
            break;
        usleep(10000);
    }
    printf("guest says: %s", (const char *)text.data);
    forkvm_bytes_free(&text);

    /* Two children continuing from this instant (their output discarded). */
    forkvm_vm *children[2];
    TRY(forkvm_vm_fork(vm, NULL, 2, children));
    for (int i = 0; i < 2; i++) {
        forkvm_identity id;
        TRY(forkvm_vm_identity(children[i], &id));
        printf("child %d: generation %llu\n", i, (unsigned long long)id.generation);
        forkvm_exit exit;
        TRY(forkvm_vm_stop(children[i], &exit));
        TRY(forkvm_vm_free(children[i]));
    }

    forkvm_exit exit;
    TRY(forkvm_vm_stop(vm, &exit));
    printf("parent: %s\n", exit.description);
    TRY(forkvm_vm_free(vm));
    TRY(forkvm_console_free(console));
    /* Freed VMs are released on forkvm's threads: let them finish before exiting. */
    TRY(forkvm_wait_for_releases(10000));
    return 0;
}
