/* Assertions and helpers shared by the C tests of libforkvm. */
#ifndef FORKVM_TEST_CHECK_H
#define FORKVM_TEST_CHECK_H

#include <dirent.h>
#include <forkvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int checks_passed;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,      \
                    __LINE__, #cond, forkvm_last_error());                               \
            exit(1);                                                                     \
        }                                                                                \
        checks_passed++;                                                                 \
    } while (0)

/* A call that must return `expected`. */
#define EXPECT(expected, call)                                                           \
    do {                                                                                 \
        forkvm_status got_ = (call);                                                     \
        if (got_ != (expected)) {                                                        \
            fprintf(stderr, "%s:%d: %s returned %s, expected %s: %s\n", __FILE__,        \
                    __LINE__, #call, forkvm_status_name(got_),                           \
                    forkvm_status_name(expected), forkvm_last_error());                  \
            exit(1);                                                                     \
        }                                                                                \
        checks_passed++;                                                                 \
    } while (0)

#define OK(call) EXPECT(FORKVM_OK, call)

/* Entries in a /proc/self directory (task: threads, fd: fds, counting the one reading it). */
static inline int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* The text of `console` now (freed by the caller with forkvm_bytes_free). */
static inline forkvm_bytes console_text(forkvm_console *console)
{
    forkvm_bytes text = { 0 };
    OK(forkvm_console_contents(console, &text));
    return text;
}

/* Waits up to 10 s for `console` to contain a whole line starting with `needle` (the serial
 * console delivers a line a few bytes at a time). */
static inline void wait_for(forkvm_console *console, const char *needle)
{
    for (int i = 0; i < 1000; i++) {
        forkvm_bytes text = console_text(console);
        const char *at = text.data ? strstr((const char *)text.data, needle) : NULL;
        int found = at && strchr(at + strlen(needle) - 1, '\n');
        forkvm_bytes_free(&text);
        if (found)
            return;
        usleep(10000);
    }
    forkvm_bytes text = console_text(console);
    fprintf(stderr, "timed out waiting for \"%s\"; console: %s\n", needle,
            text.data ? (const char *)text.data : "");
    exit(1);
}

/* A builder for the test guest (path in $FORKVM_TEST_GUEST) with `cmdline`, 32 MiB, the
 * debug-exit port, and `output` as its console. */
static inline forkvm_builder *test_guest(const char *cmdline, const forkvm_output *output)
{
    const char *kernel = getenv("FORKVM_TEST_GUEST");
    if (!kernel) {
        fprintf(stderr, "set FORKVM_TEST_GUEST to the test guest (tests/guest/build.sh)\n");
        exit(2);
    }
    forkvm_builder *builder;
    OK(forkvm_builder_new(&builder));
    OK(forkvm_builder_kernel(builder, kernel));
    OK(forkvm_builder_cmdline(builder, cmdline));
    OK(forkvm_builder_memory_mib(builder, 32));
    OK(forkvm_builder_debug_exit(builder, true));
    OK(forkvm_builder_console(builder, output));
    return builder;
}

#endif
