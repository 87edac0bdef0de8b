//! `forkvm_agent`: the guest agent of forkvm's Linux image (`forkvm_agent_client`):
//! run commands and move files (spawned processes: `process.rs`; terminals: `pty.rs`).

use forkvm_agent_client::VmAgentExt;
use std::ffi::{CString, c_char, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use forkvm_agent_client::{
    Agent, Command, ExecOutput, ExitStatus, IMAGE_CMDLINE, Stream, WriteOptions,
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

pub(crate) static AGENTS: Registry<Agent> = Registry::new("forkvm_agent");

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

pub(crate) fn put_output(out: &mut forkvm_exec_output, output: ExecOutput) {
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

pub(crate) fn command_arg(command: *const forkvm_command) -> Result<Command, Failure> {
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

/// The kernel command line of forkvm's Linux image (`guest/image.sh`: root on the read-only
/// `/dev/vda`, the agent as init), for `forkvm_builder_cmdline` (a static string).
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_image_cmdline() -> *const c_char {
    static CMDLINE: OnceLock<CString> = OnceLock::new();
    CMDLINE
        .get_or_init(|| CString::new(IMAGE_CMDLINE).unwrap_or_default())
        .as_ptr()
}
