//! `forkvm_agent` and `forkvm_pty`: the guest agent of forkvm's Linux image (`forkvm_agent_client`):
//! run commands, move files, open terminals.

use forkvm_agent_client::VmAgentExt;
use std::ffi::{CString, c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use forkvm_agent_client::{
    Agent, Command, ExecOutput, ExitStatus, IMAGE_CMDLINE, Process, ProcessEvent, Pty, PtyEvent,
    Stream, WriteOptions,
};
use forkvm_agent_protocol::{FileType, PowerAction};

use crate::error::{Failure, ffi, forkvm_status};
use crate::handle::Registry;
use crate::vm::{VMS, forkvm_vm};
use crate::{bytes_arg, forkvm_bytes, opt_str_arg, out_arg, str_arg, str_array_arg};

/// A connection to a VM's guest agent (`forkvm_agent_client::Agent`). Made by `forkvm_vm_agent`,
/// freed by `forkvm_agent_free`. Thread-safe: threads may make requests at once.
pub struct forkvm_agent {
    _private: [u8; 0],
}

static AGENTS: Registry<Agent> = Registry::new("forkvm_agent");

/// Connects to the VM's guest agent through its vsock device, retrying while the guest boots,
/// for at most `timeout_ms`; into `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_agent(
    vm: *const forkvm_vm,
    timeout_ms: u64,
    out: *mut *mut forkvm_agent,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let agent = VMS.get(vm)?.agent(Duration::from_millis(timeout_ms))?;
        *out = AGENTS.insert(agent);
        Ok(())
    })
}

/// The same agent with `timeout_ms` for requests other than commands, as a new handle in
/// `*out` (free both).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_with_timeout(
    agent: *const forkvm_agent,
    timeout_ms: u64,
    out: *mut *mut forkvm_agent,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let agent = (*AGENTS.get(agent)?).clone();
        *out = AGENTS.insert(agent.with_timeout(Duration::from_millis(timeout_ms)));
        Ok(())
    })
}

/// Releases an agent handle; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_free(agent: *mut forkvm_agent) -> forkvm_status {
    ffi(|| {
        if !agent.is_null() {
            AGENTS.remove(agent)?;
        }
        Ok(())
    })
}

/// Checks that the agent answers; `*uptime_ms` (may be NULL) is how long it has been up.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_ping(
    agent: *const forkvm_agent,
    uptime_ms: *mut u64,
) -> forkvm_status {
    ffi(|| {
        let uptime = AGENTS.get(agent)?.ping()?;
        // SAFETY: an optional out-pointer: NULL or valid for writes for the call.
        if let Some(out) = unsafe { uptime_ms.as_mut() } {
            *out = u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX);
        }
        Ok(())
    })
}

/// How a guest process ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_exit_status {
    /// Whether it exited (then `code` is its exit code).
    pub has_code: bool,
    /// Its exit code.
    pub code: i32,
    /// Whether a signal killed it (then `signal` is the signal).
    pub has_signal: bool,
    /// The signal.
    pub signal: i32,
    /// Whether the agent killed it because its timeout passed.
    pub timed_out: bool,
}

impl From<ExitStatus> for forkvm_exit_status {
    fn from(status: ExitStatus) -> Self {
        Self {
            has_code: status.code.is_some(),
            code: status.code.unwrap_or(0),
            has_signal: status.signal.is_some(),
            signal: status.signal.unwrap_or(0),
            timed_out: status.timed_out,
        }
    }
}

/// What a guest command printed and how it ended. Free with `forkvm_exec_output_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_exec_output {
    /// Its standard output.
    pub stdout_bytes: forkvm_bytes,
    /// Its standard error.
    pub stderr_bytes: forkvm_bytes,
    /// How it ended.
    pub status: forkvm_exit_status,
}

fn put_output(out: &mut forkvm_exec_output, output: ExecOutput) {
    *out = forkvm_exec_output {
        stdout_bytes: forkvm_bytes::from_vec(output.stdout),
        stderr_bytes: forkvm_bytes::from_vec(output.stderr),
        status: output.status.into(),
    };
}

/// Frees the output's buffers and resets it; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_exec_output_free(output: *mut forkvm_exec_output) {
    // SAFETY: NULL or a valid `forkvm_exec_output`.
    if let Some(output) = unsafe { output.as_mut() } {
        output.stdout_bytes.release();
        output.stderr_bytes.release();
        output.status = forkvm_exit_status::default();
    }
}

/// A command to run in the guest (`forkvm_agent_client::Command`). Zeroed fields mean "default".
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_command {
    /// The program (looked up in the guest's `PATH`) and its arguments, NULL-terminated.
    pub argv: *const *const c_char,
    /// Environment variables to set, as `KEY=VALUE` strings, NULL-terminated; or NULL.
    pub env: *const *const c_char,
    /// Start from an empty environment instead of the agent's.
    pub clear_env: bool,
    /// The working directory, or NULL.
    pub cwd: *const c_char,
    /// The guest user to run as (name or number), or NULL.
    pub user: *const c_char,
    /// What the command reads on standard input (`stdin_len` bytes), if `has_stdin`; else it
    /// reads `/dev/null`.
    pub stdin_data: *const u8,
    /// How many bytes of `stdin_data`.
    pub stdin_len: usize,
    /// Whether the command gets `stdin_data` as its input.
    pub has_stdin: bool,
    /// Kill the command after this many milliseconds; 0: no limit.
    pub timeout_ms: u64,
}

fn command_arg(command: *const forkvm_command) -> Result<Command, Failure> {
    // SAFETY: NULL or a valid `forkvm_command` for the call.
    let c = unsafe { command.as_ref() }.ok_or_else(|| Failure::null("command"))?;
    let mut built = Command::new(str_array_arg(c.argv, "argv")?);
    if !c.env.is_null() {
        for pair in str_array_arg(c.env, "env")? {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| Failure::invalid(format!("env entry {pair:?} has no '='")))?;
            built = built.env(key, value);
        }
    }
    if c.clear_env {
        built = built.clear_env();
    }
    if let Some(cwd) = opt_str_arg(c.cwd, "cwd")? {
        built = built.cwd(cwd);
    }
    if let Some(user) = opt_str_arg(c.user, "user")? {
        built = built.user(user);
    }
    if c.has_stdin {
        built = built.stdin(bytes_arg(c.stdin_data, c.stdin_len, "stdin_data")?);
    }
    if c.timeout_ms > 0 {
        built = built.timeout(Duration::from_millis(c.timeout_ms));
    }
    Ok(built)
}

/// Runs `argv` (NULL-terminated) in the guest and puts its output and status in `*output`
/// (free it with `forkvm_exec_output_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_exec(
    agent: *const forkvm_agent,
    argv: *const *const c_char,
    output: *mut forkvm_exec_output,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(output, "output")?;
        let argv = str_array_arg(argv, "argv")?;
        put_output(out, AGENTS.get(agent)?.exec(argv)?);
        Ok(())
    })
}

/// Runs `argv` in the VM's guest through its agent (connecting as `forkvm_vm_agent` does,
/// waiting up to 60 s), as `forkvm_agent_exec`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_exec(
    vm: *const forkvm_vm,
    argv: *const *const c_char,
    output: *mut forkvm_exec_output,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(output, "output")?;
        let argv = str_array_arg(argv, "argv")?;
        put_output(out, VMS.get(vm)?.exec(argv)?);
        Ok(())
    })
}

/// Runs `command` and puts its output and status in `*output` (free it with
/// `forkvm_exec_output_free`). A command killed by its timeout is reported in
/// `status.timed_out`, not as an error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_run(
    agent: *const forkvm_agent,
    command: *const forkvm_command,
    output: *mut forkvm_exec_output,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(output, "output")?;
        let command = command_arg(command)?;
        put_output(out, AGENTS.get(agent)?.run(&command)?);
        Ok(())
    })
}

/// Which stream a chunk of command output came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_stream {
    /// Standard output.
    FORKVM_STREAM_STDOUT = 1,
    /// Standard error.
    FORKVM_STREAM_STDERR = 2,
}

impl From<Stream> for forkvm_stream {
    fn from(stream: Stream) -> Self {
        match stream {
            Stream::Stdout => Self::FORKVM_STREAM_STDOUT,
            Stream::Stderr => Self::FORKVM_STREAM_STDERR,
        }
    }
}

/// Receives a chunk of command output (`len` bytes at `bytes`, valid only during the call), on
/// the thread that called `forkvm_agent_run_streaming`.
pub type forkvm_stream_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        stream: forkvm_stream,
        bytes: *const u8,
        len: usize,
    ),
>;

/// Runs `command`, handing `callback` each chunk of its output as the guest produces it, and
/// puts how it ended in `*status`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_run_streaming(
    agent: *const forkvm_agent,
    command: *const forkvm_command,
    callback: forkvm_stream_fn,
    user_data: *mut c_void,
    status: *mut forkvm_exit_status,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(status, "status")?;
        let callback = callback.ok_or_else(|| Failure::null("callback"))?;
        let command = command_arg(command)?;
        let ended = AGENTS
            .get(agent)?
            .run_streaming(&command, |stream, bytes| {
                let stream = stream.into();
                // SAFETY: the caller's callback, on the caller's thread, with `bytes` valid for the
                // call and `user_data` as given.
                unsafe { callback(user_data, stream, bytes.as_ptr(), bytes.len()) }
            })?;
        *out = ended.into();
        Ok(())
    })
}

/// A command running in the guest (`forkvm_agent_client::Process`), started by `forkvm_agent_spawn`
/// on a connection of its own; freed by `forkvm_process_free`. Thread-safe: one thread may read
/// its output (`forkvm_process_read`, `forkvm_process_wait`) while others write its input or
/// signal it (two readers at once each get some of the events).
pub struct forkvm_process {
    _private: [u8; 0],
}

/// A spawned process and whether a read saw it end (then freeing it needs no kill).
struct Spawned {
    process: Process,
    exited: AtomicBool,
}

static PROCESSES: Registry<Spawned> = Registry::new("forkvm_process");

/// Starts `command` (as `forkvm_agent_run` takes it) and returns at once with a handle to it in
/// `*out`. Its standard input is a pipe: what `stdin_data` gives (with `has_stdin`) is written
/// first, then `forkvm_process_write_stdin` writes more and `forkvm_process_close_stdin` ends it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_spawn(
    agent: *const forkvm_agent,
    command: *const forkvm_command,
    out: *mut *mut forkvm_process,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let command = command_arg(command)?;
        let process = AGENTS.get(agent)?.spawn(&command)?;
        *out = PROCESSES.insert(Spawned {
            process,
            exited: AtomicBool::new(false),
        });
        Ok(())
    })
}

/// The process's id in the guest, into `*pid`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_pid(
    process: *const forkvm_process,
    pid: *mut u32,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(pid, "pid")?;
        *out = PROCESSES.get(process)?.process.pid();
        Ok(())
    })
}

/// Writes `len` bytes of `input` to the process's standard input.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_write_stdin(
    process: *const forkvm_process,
    input: *const u8,
    len: usize,
) -> forkvm_status {
    ffi(|| {
        let input = bytes_arg(input, len, "input")?;
        Ok(PROCESSES.get(process)?.process.write_stdin(input)?)
    })
}

/// Closes the process's standard input (it reads end-of-file).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_close_stdin(
    process: *const forkvm_process,
) -> forkvm_status {
    ffi(|| Ok(PROCESSES.get(process)?.process.close_stdin()?))
}

/// Sends `signal` (e.g. `SIGTERM`) to the process's process group.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_signal(
    process: *const forkvm_process,
    signal: i32,
) -> forkvm_status {
    ffi(|| Ok(PROCESSES.get(process)?.process.signal(signal)?))
}

/// Kills the process (`SIGKILL` to its process group); its end still comes as an event.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_kill(process: *const forkvm_process) -> forkvm_status {
    ffi(|| Ok(PROCESSES.get(process)?.process.kill()?))
}

/// What `forkvm_process_read` got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_process_event_kind {
    /// Nothing within the timeout.
    FORKVM_PROCESS_NOTHING = 0,
    /// A chunk of output, in `output`, from `stream`.
    FORKVM_PROCESS_OUTPUT = 1,
    /// The process ended, as `status` says (its last event: reading on fails).
    FORKVM_PROCESS_EXITED = 2,
}

/// An event of a spawned process. Free with `forkvm_process_event_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_process_event {
    /// What happened.
    pub kind: forkvm_process_event_kind,
    /// Which stream `output` came from, for `FORKVM_PROCESS_OUTPUT` (else
    /// `FORKVM_STREAM_STDOUT`).
    pub stream: forkvm_stream,
    /// The output, for `FORKVM_PROCESS_OUTPUT`.
    pub output: forkvm_bytes,
    /// How the process ended, for `FORKVM_PROCESS_EXITED`.
    pub status: forkvm_exit_status,
}

/// The process's next chunk of output or its end, waiting at most `timeout_ms`, into `*event`
/// (free it with `forkvm_process_event_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_read(
    process: *const forkvm_process,
    timeout_ms: u64,
    event: *mut forkvm_process_event,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(event, "event")?;
        let spawned = PROCESSES.get(process)?;
        let got = spawned
            .process
            .next(Some(Duration::from_millis(timeout_ms)))?;
        let mut event = forkvm_process_event {
            kind: forkvm_process_event_kind::FORKVM_PROCESS_NOTHING,
            stream: forkvm_stream::FORKVM_STREAM_STDOUT,
            output: forkvm_bytes::EMPTY,
            status: forkvm_exit_status::default(),
        };
        match got {
            None => {}
            Some(ProcessEvent::Output(stream, bytes)) => {
                event.kind = forkvm_process_event_kind::FORKVM_PROCESS_OUTPUT;
                event.stream = stream.into();
                event.output = forkvm_bytes::from_vec(bytes);
            }
            Some(ProcessEvent::Exited(status)) => {
                spawned.exited.store(true, Ordering::Relaxed);
                event.kind = forkvm_process_event_kind::FORKVM_PROCESS_EXITED;
                event.status = status.into();
            }
        }
        *out = event;
        Ok(())
    })
}

/// Frees an event's output and resets it; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_event_free(event: *mut forkvm_process_event) {
    // SAFETY: NULL or a valid `forkvm_process_event`.
    if let Some(event) = unsafe { event.as_mut() } {
        event.output.release();
        event.kind = forkvm_process_event_kind::FORKVM_PROCESS_NOTHING;
    }
}

/// Waits (without a limit) for the process to end and puts the output it printed since the
/// last read and how it ended in `*output`, as `forkvm_agent_run` does (free it with
/// `forkvm_exec_output_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_wait(
    process: *const forkvm_process,
    output: *mut forkvm_exec_output,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(output, "output")?;
        let spawned = PROCESSES.get(process)?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = spawned.process.wait(|stream, bytes| match stream {
            Stream::Stdout => stdout.extend_from_slice(bytes),
            Stream::Stderr => stderr.extend_from_slice(bytes),
        })?;
        spawned.exited.store(true, Ordering::Relaxed);
        put_output(
            out,
            ExecOutput {
                stdout,
                stderr,
                status,
            },
        );
        Ok(())
    })
}

/// Frees the handle, killing the process first if no read saw it end (a kill that fails is
/// ignored: closing its connection makes the agent kill it too); NULL is ignored. A read or
/// wait on another thread then returns with the process's end.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_free(process: *mut forkvm_process) -> forkvm_status {
    ffi(|| {
        if !process.is_null() {
            let spawned = PROCESSES.remove(process)?;
            if !spawned.exited.load(Ordering::Relaxed) {
                let _ = spawned.process.kill();
            }
        }
        Ok(())
    })
}

/// How `forkvm_agent_write_file` writes. A zeroed value truncates and creates with 0644.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_write_options {
    /// Append instead of truncating.
    pub append: bool,
    /// Fail if the file exists.
    pub exclusive: bool,
    /// Permission bits of a file it creates; 0: 0644.
    pub mode: u32,
}

/// Writes `len` bytes of `data` to the guest file `path`; `options` may be NULL (truncate,
/// 0644); `*written` (may be NULL) is how many bytes were written.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_write_file(
    agent: *const forkvm_agent,
    path: *const c_char,
    data: *const u8,
    len: usize,
    options: *const forkvm_write_options,
    written: *mut u64,
) -> forkvm_status {
    ffi(|| {
        let path = str_arg(path, "path")?;
        let data = bytes_arg(data, len, "data")?;
        // SAFETY: NULL or a valid `forkvm_write_options` for the call.
        let options = unsafe { options.as_ref() }.copied().unwrap_or_default();
        let options = WriteOptions {
            append: options.append,
            exclusive: options.exclusive,
            mode: (options.mode != 0).then_some(options.mode),
        };
        let n = AGENTS.get(agent)?.write_file(path, data, options)?;
        // SAFETY: an optional out-pointer: NULL or valid for writes for the call.
        if let Some(written) = unsafe { written.as_mut() } {
            *written = n;
        }
        Ok(())
    })
}

/// Reads the guest file `path` whole into `*out` (free it with `forkvm_bytes_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_read_file(
    agent: *const forkvm_agent,
    path: *const c_char,
    out: *mut forkvm_bytes,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let path = str_arg(path, "path")?;
        *out = forkvm_bytes::from_vec(AGENTS.get(agent)?.read_file(path)?);
        Ok(())
    })
}

/// The type of a guest file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_file_type {
    /// A regular file.
    FORKVM_FILE_REGULAR = 1,
    /// A directory.
    FORKVM_FILE_DIR = 2,
    /// A symbolic link.
    FORKVM_FILE_SYMLINK = 3,
    /// Anything else (device, FIFO, socket).
    FORKVM_FILE_OTHER = 4,
}

impl From<FileType> for forkvm_file_type {
    fn from(t: FileType) -> Self {
        match t {
            FileType::File => Self::FORKVM_FILE_REGULAR,
            FileType::Dir => Self::FORKVM_FILE_DIR,
            FileType::Symlink => Self::FORKVM_FILE_SYMLINK,
            FileType::Other => Self::FORKVM_FILE_OTHER,
        }
    }
}

/// Metadata of a guest path.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct forkvm_file_stat {
    /// Its type.
    pub file_type: forkvm_file_type,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Type, size, mode, owner and time of the guest path `path`, into `*stat`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_stat(
    agent: *const forkvm_agent,
    path: *const c_char,
    stat: *mut forkvm_file_stat,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(stat, "stat")?;
        let s = AGENTS.get(agent)?.stat(str_arg(path, "path")?)?;
        *out = forkvm_file_stat {
            file_type: s.file_type.into(),
            size: s.size,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            mtime_ns: s.mtime_ns,
        };
        Ok(())
    })
}

/// One guest directory entry.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_dir_entry {
    /// Its name (NUL-terminated, in `name.data`).
    pub name: forkvm_bytes,
    /// Its type (symlinks not followed).
    pub file_type: forkvm_file_type,
    /// Its size in bytes.
    pub size: u64,
}

/// The entries of a guest directory. Free with `forkvm_dir_list_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_dir_list {
    /// The entries; NULL when there are none.
    pub entries: *mut forkvm_dir_entry,
    /// How many.
    pub count: usize,
}

/// The entries of the guest directory `path`, into `*list` (free it with
/// `forkvm_dir_list_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_list(
    agent: *const forkvm_agent,
    path: *const c_char,
    list: *mut forkvm_dir_list,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(list, "list")?;
        let entries: Box<[forkvm_dir_entry]> = AGENTS
            .get(agent)?
            .list(str_arg(path, "path")?)?
            .into_iter()
            .map(|e| forkvm_dir_entry {
                name: forkvm_bytes::from_vec(e.name.into_bytes()),
                file_type: e.file_type.into(),
                size: e.size,
            })
            .collect();
        let count = entries.len();
        let entries = if count == 0 {
            std::ptr::null_mut()
        } else {
            Box::into_raw(entries).cast::<forkvm_dir_entry>()
        };
        *out = forkvm_dir_list { entries, count };
        Ok(())
    })
}

/// Frees a directory listing and resets it; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_dir_list_free(list: *mut forkvm_dir_list) {
    // SAFETY: NULL or a valid `forkvm_dir_list`.
    let Some(list) = (unsafe { list.as_mut() }) else {
        return;
    };
    if !list.entries.is_null() {
        let slice = std::ptr::slice_from_raw_parts_mut(list.entries, list.count);
        // SAFETY: `entries` came from `forkvm_agent_list`: a boxed slice of `count` entries, not
        // freed yet (a free resets it to NULL).
        let mut entries = unsafe { Box::from_raw(slice) };
        for entry in entries.iter_mut() {
            entry.name.release();
        }
    }
    list.entries = std::ptr::null_mut();
    list.count = 0;
}

/// Creates the guest directory `path` (and its parents with `parents`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_mkdir(
    agent: *const forkvm_agent,
    path: *const c_char,
    parents: bool,
) -> forkvm_status {
    ffi(|| Ok(AGENTS.get(agent)?.mkdir(str_arg(path, "path")?, parents)?))
}

/// Removes the guest file or (with `recursive`, non-empty) directory `path`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_remove(
    agent: *const forkvm_agent,
    path: *const c_char,
    recursive: bool,
) -> forkvm_status {
    ffi(|| {
        Ok(AGENTS
            .get(agent)?
            .remove(str_arg(path, "path")?, recursive)?)
    })
}

/// Renames the guest path `from` to `to`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_rename(
    agent: *const forkvm_agent,
    from: *const c_char,
    to: *const c_char,
) -> forkvm_status {
    ffi(|| {
        let (from, to) = (str_arg(from, "from")?, str_arg(to, "to")?);
        Ok(AGENTS.get(agent)?.rename(from, to)?)
    })
}

/// Asks the agent to power the guest off (`reboot` false) or reboot it (`reboot` true; with
/// `reboot=k` that ends a forkvm VM too).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_shutdown(
    agent: *const forkvm_agent,
    reboot: bool,
) -> forkvm_status {
    ffi(|| {
        let action = if reboot {
            PowerAction::Reboot
        } else {
            PowerAction::PowerOff
        };
        Ok(AGENTS.get(agent)?.shutdown(action)?)
    })
}

/// A PTY session in the guest (`forkvm_agent_client::Pty`): a terminal running a program, on a
/// connection of its own. `forkvm_pty_free` detaches (the session runs on; attach again with
/// `forkvm_agent_pty_attach`); `forkvm_pty_close` ends it. Calls on one handle take turns (a
/// read waiting for output holds up a write on another thread: read with short timeouts).
pub struct forkvm_pty {
    _private: [u8; 0],
}

/// A `Pty` is not `Sync`: calls on one PTY handle take turns.
static PTYS: Registry<Mutex<Pty>> = Registry::new("forkvm_pty");

fn lock(pty: &std::sync::Arc<Mutex<Pty>>) -> std::sync::MutexGuard<'_, Pty> {
    pty.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a PTY session running `argv` (NULL-terminated) on a `rows` × `cols` terminal, into
/// `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_pty(
    agent: *const forkvm_agent,
    argv: *const *const c_char,
    rows: u16,
    cols: u16,
    out: *mut *mut forkvm_pty,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let argv = str_array_arg(argv, "argv")?;
        *out = PTYS.insert(Mutex::new(AGENTS.get(agent)?.pty(argv, rows, cols)?));
        Ok(())
    })
}

/// Attaches to the PTY session `session` (output it produced meanwhile comes first), into
/// `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_pty_attach(
    agent: *const forkvm_agent,
    session: u64,
    out: *mut *mut forkvm_pty,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        *out = PTYS.insert(Mutex::new(AGENTS.get(agent)?.pty_attach(session)?));
        Ok(())
    })
}

/// The session's id (for `forkvm_agent_pty_attach`), into `*session`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_session(
    pty: *const forkvm_pty,
    session: *mut u64,
) -> forkvm_status {
    ffi(|| {
        *out_arg(session, "session")? = lock(&PTYS.get(pty)?).session();
        Ok(())
    })
}

/// Types `len` bytes of `input` into the terminal.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_write(
    pty: *const forkvm_pty,
    input: *const u8,
    len: usize,
) -> forkvm_status {
    ffi(|| {
        let input = bytes_arg(input, len, "input")?;
        Ok(lock(&PTYS.get(pty)?).write(input)?)
    })
}

/// What `forkvm_pty_read` got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_pty_event_kind {
    /// Nothing within the timeout.
    FORKVM_PTY_NOTHING = 0,
    /// Terminal output, in `output`.
    FORKVM_PTY_OUTPUT = 1,
    /// The program ended, as `status` says (the session stays until closed).
    FORKVM_PTY_EXITED = 2,
}

/// An event of a PTY session. Free with `forkvm_pty_event_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_pty_event {
    /// What happened.
    pub kind: forkvm_pty_event_kind,
    /// The output, for `FORKVM_PTY_OUTPUT`.
    pub output: forkvm_bytes,
    /// How the program ended, for `FORKVM_PTY_EXITED`.
    pub status: forkvm_exit_status,
}

/// The terminal's next output or its program's end, waiting at most `timeout_ms`, into
/// `*event` (free it with `forkvm_pty_event_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_read(
    pty: *const forkvm_pty,
    timeout_ms: u64,
    event: *mut forkvm_pty_event,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(event, "event")?;
        let got = lock(&PTYS.get(pty)?).read(Duration::from_millis(timeout_ms))?;
        *out = match got {
            None => forkvm_pty_event {
                kind: forkvm_pty_event_kind::FORKVM_PTY_NOTHING,
                output: forkvm_bytes::EMPTY,
                status: forkvm_exit_status::default(),
            },
            Some(PtyEvent::Output(bytes)) => forkvm_pty_event {
                kind: forkvm_pty_event_kind::FORKVM_PTY_OUTPUT,
                output: forkvm_bytes::from_vec(bytes),
                status: forkvm_exit_status::default(),
            },
            Some(PtyEvent::Exited(status)) => forkvm_pty_event {
                kind: forkvm_pty_event_kind::FORKVM_PTY_EXITED,
                output: forkvm_bytes::EMPTY,
                status: status.into(),
            },
        };
        Ok(())
    })
}

/// Frees an event's output and resets it; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_event_free(event: *mut forkvm_pty_event) {
    // SAFETY: NULL or a valid `forkvm_pty_event`.
    if let Some(event) = unsafe { event.as_mut() } {
        event.output.release();
        event.kind = forkvm_pty_event_kind::FORKVM_PTY_NOTHING;
    }
}

/// Changes the terminal's size (the program gets `SIGWINCH`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_resize(
    pty: *const forkvm_pty,
    rows: u16,
    cols: u16,
) -> forkvm_status {
    ffi(|| Ok(lock(&PTYS.get(pty)?).resize(rows, cols)?))
}

/// Ends the session (kills its program) and frees the handle, even when the agent's answer is
/// an error. `FORKVM_ERR_BUSY` (handle kept) while another thread is in a call on it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_close(pty: *mut forkvm_pty) -> forkvm_status {
    ffi(|| {
        let pty = PTYS.take(pty)?;
        Ok(pty
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .close()?)
    })
}

/// Detaches from the session (it runs on) and frees the handle; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_free(pty: *mut forkvm_pty) -> forkvm_status {
    ffi(|| {
        if !pty.is_null() {
            PTYS.remove(pty)?;
        }
        Ok(())
    })
}

/// The kernel command line of forkvm's Linux image (`guest/image.sh`: root on the read-only
/// `/dev/vda`, the agent as init), for `forkvm_builder_cmdline` (a static string).
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_image_cmdline() -> *const c_char {
    static CMDLINE: OnceLock<CString> = OnceLock::new();
    CMDLINE
        .get_or_init(|| CString::new(IMAGE_CMDLINE).unwrap_or_default())
        .as_ptr()
}
