//! Console buffers (`forkvm_console`), where console output goes (`forkvm_output`), console
//! input file descriptors, and the host ends of a fork child (`forkvm_child`).

use std::ffi::{c_char, c_void};
use std::os::fd::{BorrowedFd, OwnedFd};

use forkvm::{Child, ConsoleBuffer, ConsoleInput, ConsoleOutput, DEFAULT_CONSOLE_BUFFER_LIMIT};

use crate::error::{Failure, ffi, forkvm_status};
use crate::handle::Registry;
use crate::network::forkvm_network;
use crate::{forkvm_bytes, out_arg, str_arg};

/// An in-memory console buffer (`ConsoleBuffer`): a VM writes its console output into it and
/// the caller reads it. It keeps only the newest bytes, up to its limit. Thread-safe.
pub struct forkvm_console {
    _private: [u8; 0],
}

pub(crate) static CONSOLES: Registry<ConsoleBuffer> = Registry::new("forkvm_console");

/// Makes a console buffer keeping the last `limit` bytes (0: 1 MiB) into `*out`. Free it with
/// `forkvm_console_free` (VMs writing into it keep their own reference).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_console_new(
    limit: usize,
    out: *mut *mut forkvm_console,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let limit = if limit == 0 {
            DEFAULT_CONSOLE_BUFFER_LIMIT
        } else {
            limit
        };
        *out = CONSOLES.insert(ConsoleBuffer::with_limit(limit));
        Ok(())
    })
}

/// Copies what the buffer holds into `*out` (free it with `forkvm_bytes_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_console_contents(
    console: *const forkvm_console,
    out: *mut forkvm_bytes,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        *out = forkvm_bytes::from_vec(CONSOLES.get(console)?.contents());
        Ok(())
    })
}

/// Empties the buffer, moving what it held into `*out` (free it with `forkvm_bytes_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_console_take(
    console: *const forkvm_console,
    out: *mut forkvm_bytes,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        *out = forkvm_bytes::from_vec(CONSOLES.get(console)?.take());
        Ok(())
    })
}

/// Releases a console buffer handle; NULL is ignored. A VM writing into it keeps writing into
/// its own reference until it is freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_console_free(console: *mut forkvm_console) -> forkvm_status {
    ffi(|| {
        if !console.is_null() {
            CONSOLES.remove(console)?;
        }
        Ok(())
    })
}

/// Which kind of destination a `forkvm_output` is (one of the `FORKVM_OUTPUT_*` values).
pub type forkvm_output_kind = u32;
/// Output is dropped (a zeroed `forkvm_output`).
pub const FORKVM_OUTPUT_DISCARD: forkvm_output_kind = 0;
/// Output goes to this process's standard output.
pub const FORKVM_OUTPUT_STDOUT: forkvm_output_kind = 1;
/// Output goes to the file `path`, created or truncated.
pub const FORKVM_OUTPUT_FILE: forkvm_output_kind = 2;
/// Output goes to the console buffer `buffer`.
pub const FORKVM_OUTPUT_BUFFER: forkvm_output_kind = 3;
/// Output is handed to `callback(user_data, bytes, len)`.
pub const FORKVM_OUTPUT_CALLBACK: forkvm_output_kind = 4;

/// Receives console output: `len` bytes at `bytes` (valid only during the call). Called on a
/// thread forkvm owns, never twice at once for one output, until the VM is stopped or freed.
pub type forkvm_output_fn =
    Option<unsafe extern "C" fn(user_data: *mut c_void, bytes: *const u8, len: usize)>;

/// Where console output goes. A zeroed value discards it.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_output {
    /// One of the `FORKVM_OUTPUT_*` values.
    pub kind: forkvm_output_kind,
    /// The file, for `FORKVM_OUTPUT_FILE`.
    pub path: *const c_char,
    /// The console buffer, for `FORKVM_OUTPUT_BUFFER`.
    pub buffer: *const forkvm_console,
    /// The function, for `FORKVM_OUTPUT_CALLBACK`.
    pub callback: forkvm_output_fn,
    /// Passed to `callback` as is; must stay valid until the VM is stopped or freed.
    pub user_data: *mut c_void,
}

/// The caller's `user_data`, which the caller promises may be used from forkvm's threads.
struct UserData(*mut c_void);

// SAFETY: `forkvm_output::user_data` is documented to be handed to the callback on threads
// forkvm owns; the caller makes what it points to fit for that.
unsafe impl Send for UserData {}

impl UserData {
    fn get(&self) -> *mut c_void {
        self.0
    }
}

/// The `ConsoleOutput` `output` describes; NULL discards.
pub(crate) fn output_arg(output: *const forkvm_output) -> Result<ConsoleOutput, Failure> {
    // SAFETY: NULL or a valid `forkvm_output` for the call.
    let Some(output) = (unsafe { output.as_ref() }) else {
        return Ok(ConsoleOutput::Discard);
    };
    Ok(match output.kind {
        FORKVM_OUTPUT_DISCARD => ConsoleOutput::Discard,
        FORKVM_OUTPUT_STDOUT => ConsoleOutput::Stdout,
        FORKVM_OUTPUT_FILE => ConsoleOutput::File(str_arg(output.path, "output path")?.into()),
        FORKVM_OUTPUT_BUFFER => ConsoleOutput::Buffer((*CONSOLES.get(output.buffer)?).clone()),
        FORKVM_OUTPUT_CALLBACK => {
            let callback = output
                .callback
                .ok_or_else(|| Failure::null("output callback"))?;
            let user_data = UserData(output.user_data);
            ConsoleOutput::Callback(Box::new(move |bytes: &[u8]| {
                // SAFETY: the caller's callback, called as documented: `bytes` valid for the
                // call, `user_data` as given.
                unsafe { callback(user_data.get(), bytes.as_ptr(), bytes.len()) }
            }))
        }
        kind => return Err(Failure::invalid(format!("unknown output kind {kind}"))),
    })
}

/// No input file descriptor.
pub const FORKVM_NO_FD: i32 = -1;

/// Console input from the caller's `fd` (duplicated: the caller keeps and closes its own), or
/// none for `FORKVM_NO_FD` (any negative number).
pub(crate) fn input_arg(fd: i32) -> Result<Option<ConsoleInput>, Failure> {
    if fd < 0 {
        return Ok(None);
    }
    // SAFETY: only borrowed for the duplication below; a closed fd makes it fail with EBADF.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned: OwnedFd = fd
        .try_clone_to_owned()
        .map_err(|e| Failure::new(forkvm_status::FORKVM_ERR_IO, format!("input fd: {e}")))?;
    Ok(Some(ConsoleInput::Fd(owned)))
}

/// The fd at `fd`, if `fd` is not NULL.
fn input_ptr_arg(fd: *const i32) -> Result<Option<ConsoleInput>, Failure> {
    // SAFETY: NULL or a valid `int` for the call.
    match unsafe { fd.as_ref() } {
        Some(&fd) if fd >= 0 => input_arg(fd),
        Some(_) => Err(Failure::invalid("a negative input fd")),
        None => Ok(None),
    }
}

/// The host end of a virtio console: its output, and the fd it reads input from. A zeroed
/// value discards output and has no input.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_virtio_console {
    /// Where its output goes.
    pub output: forkvm_output,
    /// Points to the fd its input comes from (duplicated), or NULL for none.
    pub input_fd: *const i32,
}

/// How a fork child (or a restored VM) reaches the host (`forkvm::Child`). A zeroed value is a
/// child whose output is discarded.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_child {
    /// Its serial console.
    pub console: forkvm_output,
    /// Points to the fd its serial console input comes from (duplicated), or NULL for none.
    pub console_input_fd: *const i32,
    /// The host ends of its virtio consoles, in the parent's order (the rest discard output).
    pub virtio_consoles: *const forkvm_virtio_console,
    /// How many `virtio_consoles`.
    pub virtio_console_count: usize,
    /// Its vsock Unix socket path, or NULL.
    pub vsock_uds_path: *const c_char,
    /// Its own network (copied), or NULL: like the parent's, with the parent's policy in force
    /// now and no published ports. Ignored for a VM without a network.
    pub network: *const forkvm_network,
}

/// The `Child` `child` describes; NULL is a child whose output is discarded.
pub(crate) fn child_arg(child: *const forkvm_child) -> Result<Child, Failure> {
    // SAFETY: NULL or a valid `forkvm_child` for the call.
    let Some(child) = (unsafe { child.as_ref() }) else {
        return Ok(Child::new(ConsoleOutput::Discard));
    };
    let mut built = Child::new(output_arg(&child.console)?);
    if let Some(input) = input_ptr_arg(child.console_input_fd)? {
        built = built.console_input(input);
    }
    let consoles = slice_arg(
        child.virtio_consoles,
        child.virtio_console_count,
        "virtio_consoles",
    )?;
    for console in consoles {
        built = built.virtio_console(
            output_arg(&console.output)?,
            input_ptr_arg(console.input_fd)?,
        );
    }
    if let Some(path) = crate::opt_str_arg(child.vsock_uds_path, "vsock_uds_path")? {
        built = built.vsock_uds_path(path);
    }
    if !child.network.is_null() {
        built = built.network(crate::network::network_arg(child.network)?);
    }
    Ok(built)
}

/// `len` values at `ptr` (NULL allowed when `len` is 0).
pub(crate) fn slice_arg<'a, T>(ptr: *const T, len: usize, what: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-NULL, and an array argument holds `len` valid values for the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}
