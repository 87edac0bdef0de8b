/*
 * The exec scenario every binding runs against forkvm's Linux image: boot the kernel with the
 * root image read-only and the guest agent as init, run commands through the agent, move a file
 * in and out, stream a command's output, drive a PTY, spawn processes (input, output, signals),
 * fork, and check that the child's file system is its own. Needs the image:
 * FORKVM_LINUX_KERNEL (guest/kernel/build.sh) and FORKVM_LINUX_IMAGE (guest/rootfs/build.sh),
 * which scripts/test.sh sets; without them the test says it is skipped and passes.
 */
#include <pthread.h>

#include "check.h"

/* Runs `argv` through `agent` into `out` (freed first). */
static enum forkvm_status run(forkvm_agent *agent, const char *const *argv,
                              forkvm_exec_output *out)
{
    forkvm_exec_output_free(out);
    return forkvm_agent_exec(agent, argv, out);
}

/* What a streaming command printed, per stream, as the callback got it. */
struct streamed {
    char out[256], err[256];
    size_t out_len, err_len;
    int out_chunks, err_chunks;
};

static void on_chunk(void *user_data, forkvm_stream stream, const uint8_t *bytes, size_t len)
{
    struct streamed *s = user_data;
    int is_out = stream == FORKVM_STREAM_STDOUT;
    CHECK(is_out || stream == FORKVM_STREAM_STDERR);
    char *buf = is_out ? s->out : s->err;
    size_t *have = is_out ? &s->out_len : &s->err_len;
    CHECK(*have + len < sizeof s->out);
    memcpy(buf + *have, bytes, len);
    *have += len;
    buf[*have] = '\0';
    (*(is_out ? &s->out_chunks : &s->err_chunks))++;
}

/* forkvm_agent_run_streaming: each stream's bytes arrive whole, in order, in several chunks. */
static void streaming(forkvm_agent *agent)
{
    const char *argv[] = { "sh", "-c",
                           "for i in 1 2 3 4; do echo out$i; echo err$i >&2; sleep 0.1; done;"
                           " exit 7",
                           NULL };
    forkvm_command command = { .argv = argv };
    struct streamed s = { 0 };
    forkvm_exit_status status = { 0 };
    OK(forkvm_agent_run_streaming(agent, &command, on_chunk, &s, &status));
    CHECK(strcmp(s.out, "out1\nout2\nout3\nout4\n") == 0);
    CHECK(strcmp(s.err, "err1\nerr2\nerr3\nerr4\n") == 0);
    CHECK(s.out_chunks > 1 && s.err_chunks > 1);
    CHECK(status.has_code && status.code == 7 && !status.has_signal && !status.timed_out);
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_agent_run_streaming(agent, &command, NULL, &s, &status));
}

/* Reads `pty` until its output so far (in `seen`) contains `needle`, for at most 20 s. */
static void pty_until(forkvm_pty *pty, const char *needle, char *seen, size_t size)
{
    size_t len = strlen(seen);
    for (int i = 0; i < 200 && !strstr(seen, needle); i++) {
        forkvm_pty_event event = { 0 };
        OK(forkvm_pty_read(pty, 100, &event));
        CHECK(event.kind != FORKVM_PTY_EXITED);
        if (event.kind == FORKVM_PTY_OUTPUT) {
            size_t n = event.output.len < size - 1 - len ? event.output.len : size - 1 - len;
            memcpy(seen + len, event.output.data, n);
            len += n;
            seen[len] = '\0';
        }
        forkvm_pty_event_free(&event);
    }
    if (!strstr(seen, needle)) {
        fprintf(stderr, "PTY output has no \"%s\": %s\n", needle, seen);
        exit(1);
    }
    checks_passed++;
}

static void pty_type(forkvm_pty *pty, const char *line)
{
    OK(forkvm_pty_write(pty, (const uint8_t *)line, strlen(line)));
}

/* A PTY running sh: input is echoed and run, a resize reaches the program, a detached
 * session goes on and is attached again, the program's end comes as an event. */
static void pty_session(forkvm_agent *agent)
{
    static char seen[1 << 16];
    const char *argv[] = { "sh", NULL };
    forkvm_pty *pty;
    OK(forkvm_agent_pty(agent, argv, 24, 80, &pty));
    pty_type(pty, "echo hi-$((6*7))\n");
    pty_until(pty, "echo hi-$((6*7))", seen, sizeof seen); /* the terminal's echo */
    pty_until(pty, "hi-42", seen, sizeof seen);           /* what sh printed */
    seen[0] = '\0';
    pty_type(pty, "stty size\n");
    pty_until(pty, "24 80", seen, sizeof seen);
    OK(forkvm_pty_resize(pty, 40, 100));
    seen[0] = '\0';
    pty_type(pty, "stty size\n");
    pty_until(pty, "40 100", seen, sizeof seen);

    /* Detach (the handle goes, the session runs on), attach again and go on. */
    uint64_t session = 0;
    OK(forkvm_pty_session(pty, &session));
    OK(forkvm_pty_free(pty));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_pty_write(pty, (const uint8_t *)"x", 1));
    OK(forkvm_agent_pty_attach(agent, session, &pty));
    seen[0] = '\0';
    pty_type(pty, "echo back-$((1+1))\n");
    pty_until(pty, "back-2", seen, sizeof seen);

    pty_type(pty, "exit 3\n");
    forkvm_pty_event event = { 0 };
    for (int i = 0; i < 200 && event.kind != FORKVM_PTY_EXITED; i++) {
        forkvm_pty_event_free(&event);
        OK(forkvm_pty_read(pty, 100, &event));
    }
    CHECK(event.kind == FORKVM_PTY_EXITED && event.status.has_code && event.status.code == 3);
    forkvm_pty_event_free(&event);
    OK(forkvm_pty_close(pty));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_pty_close(pty));
}

/* Writes what `arg` (a forkvm_process) gets on stdin, in chunks, from another thread. */
static uint8_t cat_input[6000];

static void *feed(void *arg)
{
    forkvm_process *process = arg;
    for (size_t at = 0; at < sizeof cat_input; at += 1000)
        OK(forkvm_process_write_stdin(process, cat_input + at, 1000));
    OK(forkvm_process_close_stdin(process));
    return NULL;
}

/* Reads `process`'s events until it ends, appending its stdout to `out` (at most `size`). */
static forkvm_exit_status read_to_end(forkvm_process *process, uint8_t *out, size_t size,
                                      size_t *len)
{
    for (int i = 0; i < 600; i++) {
        forkvm_process_event event = { 0 };
        OK(forkvm_process_read(process, 100, &event));
        if (event.kind == FORKVM_PROCESS_EXITED)
            return event.status;
        if (event.kind == FORKVM_PROCESS_OUTPUT) {
            CHECK(event.stream == FORKVM_STREAM_STDOUT);
            CHECK(*len + event.output.len <= size);
            memcpy(out + *len, event.output.data, event.output.len);
            *len += event.output.len;
        }
        forkvm_process_event_free(&event);
    }
    fprintf(stderr, "process did not end within 60 s\n");
    exit(1);
}

/* Guest pid `pid` is gone within 10 s. */
static void gone(forkvm_agent *agent, uint32_t pid)
{
    char script[64];
    snprintf(script, sizeof script, "kill -0 %u 2>/dev/null", pid);
    const char *argv[] = { "sh", "-c", script, NULL };
    forkvm_exec_output out = { 0 };
    for (int i = 0; i < 100; i++) {
        OK(forkvm_agent_exec(agent, argv, &out));
        int alive = out.status.code == 0;
        forkvm_exec_output_free(&out);
        if (!alive) {
            checks_passed++;
            return;
        }
        usleep(100000);
    }
    fprintf(stderr, "guest process %u still runs\n", pid);
    exit(1);
}

/* forkvm_agent_spawn: cat gives back its input exactly while another thread writes it;
 * signal, kill and free end processes; a freed handle is refused. */
static void spawn(forkvm_agent *agent)
{
    for (size_t i = 0; i < sizeof cat_input; i++)
        cat_input[i] = (uint8_t)(i * 2654435761u >> 24);
    const char *cat_argv[] = { "cat", NULL };
    forkvm_command cat = { .argv = cat_argv };
    forkvm_process *process;
    OK(forkvm_agent_spawn(agent, &cat, &process));
    uint32_t pid = 0;
    OK(forkvm_process_pid(process, &pid));
    CHECK(pid > 1);
    pthread_t feeder;
    CHECK(pthread_create(&feeder, NULL, feed, process) == 0);
    static uint8_t back[sizeof cat_input + 1];
    size_t len = 0;
    forkvm_exit_status status = read_to_end(process, back, sizeof back, &len);
    CHECK(pthread_join(feeder, NULL) == 0);
    CHECK(len == sizeof cat_input && memcmp(back, cat_input, len) == 0);
    CHECK(status.has_code && status.code == 0 && !status.has_signal);
    OK(forkvm_process_free(process));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_pid(process, &pid));
    EXPECT(FORKVM_ERR_INVALID_HANDLE, forkvm_process_free(process));

    /* stdin_data comes first; forkvm_process_wait collects both streams like a run. */
    const char *sh_argv[] = { "sh", "-c", "cat; echo done >&2; exit 4", NULL };
    forkvm_command sh = { .argv = sh_argv,
                          .stdin_data = (const uint8_t *)"first ",
                          .stdin_len = 6,
                          .has_stdin = true };
    OK(forkvm_agent_spawn(agent, &sh, &process));
    OK(forkvm_process_write_stdin(process, (const uint8_t *)"second", 6));
    OK(forkvm_process_close_stdin(process));
    forkvm_exec_output out = { 0 };
    OK(forkvm_process_wait(process, &out));
    CHECK(strcmp((const char *)out.stdout_bytes.data, "first second") == 0);
    CHECK(strcmp((const char *)out.stderr_bytes.data, "done\n") == 0);
    CHECK(out.status.has_code && out.status.code == 4);
    forkvm_exec_output_free(&out);
    OK(forkvm_process_free(process));

    /* kill: the end says SIGKILL; signal: SIGTERM. */
    const char *sleep_argv[] = { "sleep", "30", NULL };
    forkvm_command sleep30 = { .argv = sleep_argv };
    OK(forkvm_agent_spawn(agent, &sleep30, &process));
    forkvm_process_event event = { 0 };
    OK(forkvm_process_read(process, 200, &event));
    CHECK(event.kind == FORKVM_PROCESS_NOTHING);
    OK(forkvm_process_kill(process));
    OK(forkvm_process_wait(process, &out));
    CHECK(out.status.has_signal && out.status.signal == 9 && !out.status.has_code);
    forkvm_exec_output_free(&out);
    OK(forkvm_process_free(process));

    OK(forkvm_agent_spawn(agent, &sleep30, &process));
    OK(forkvm_process_signal(process, 15));
    len = 0;
    status = read_to_end(process, back, sizeof back, &len);
    CHECK(len == 0 && status.has_signal && status.signal == 15);
    OK(forkvm_process_free(process));

    /* Freeing a running process kills it. */
    OK(forkvm_agent_spawn(agent, &sleep30, &process));
    OK(forkvm_process_pid(process, &pid));
    OK(forkvm_process_free(process));
    gone(agent, pid);

    const char *missing[] = { "no-such-program", NULL };
    forkvm_command bad = { .argv = missing };
    EXPECT(FORKVM_ERR_COMMAND_NOT_FOUND, forkvm_agent_spawn(agent, &bad, &process));
    EXPECT(FORKVM_ERR_NULL_POINTER, forkvm_agent_spawn(agent, NULL, &process));
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

    streaming(agent);
    pty_session(agent);
    spawn(agent);

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
    OK(forkvm_wait_for_releases(60000));
    CHECK(count_entries("/proc/self/task") == threads_before);
    CHECK(count_entries("/proc/self/fd") == fds_before);
    printf("image: %d checks passed\n", checks_passed);
    return 0;
}
