//! The C binding of forkvm: `libforkvm.so` / `libforkvm.a` and `include/forkvm.h` (generated from
//! this crate by cbindgen; `tests/header.rs` fails when it is stale).
//!
//! A thin layer over the Rust API (`forkvm::VmBuilder`, `forkvm::Vm`, `forkvm_agent_client::Agent`):
//! every function converts its arguments, calls the Rust API once and converts the result.
//!
//! **Conventions.** Every function returns a `forkvm_status` (`FORKVM_OK` is 0) and writes its
//! results through out-pointers. On failure, `forkvm_last_error()` describes what went wrong (the
//! Rust error's message) on the calling thread until that thread's next call into forkvm. No Rust
//! panic crosses into C: one becomes `FORKVM_ERR_PANIC`.
//!
//! **Handles** (`forkvm_builder`, `forkvm_network`, `forkvm_vm`, `forkvm_console`, `forkvm_agent`,
//! `forkvm_pty`, `forkvm_process`) are opaque: they are never dereferenced, but looked up in a
//! table of live handles, and a handle's number is never reused. So a handle that was freed, a
//! double free or a handle of the wrong type gets `FORKVM_ERR_INVALID_HANDLE`, not undefined
//! behaviour. Each handle is freed with its `_free` function (which accepts NULL). Result buffers
//! (`forkvm_bytes`, `forkvm_exec_output`, `forkvm_dir_list`, `forkvm_pty_event`,
//! `forkvm_process_event`) belong to the caller and are freed with their `_free` function, which
//! resets them, so a second free of the same struct does nothing.
//!
//! **Pointers.** A pointer argument is NULL (refused with `FORKVM_ERR_NULL_POINTER` where it is
//! required) or valid for the access the function documents for the duration of the call;
//! strings are NUL-terminated UTF-8. This is the contract of every function here, so no function
//! repeats it in a `# Safety` section.
//!
//! **Threads.** Every function may be called from any thread, at once on the same handle: a VM
//! may be waited for on one thread and stopped, paused or forked from others. `forkvm_vm_free`
//! while another thread is inside a call on the same VM stops the VM, which makes that call
//! return; the VM is released when the last such call returns. Console callbacks run on a thread
//! forkvm starts for each output (never a seccomp-filtered VMM thread), never two at once for one
//! output, and must not stop or free the VM they report on (that waits for the callback).
#![allow(non_camel_case_types)]
// The safety contract is the same for every exported function: see "Pointers" above.
#![allow(clippy::missing_safety_doc)]

mod agent;
mod builder;
mod console;
mod error;
mod handle;
mod hardening;
mod network;
mod process;
mod pty;
mod vm;

#[cfg(test)]
mod bench;

use std::ffi::{CStr, c_char};

pub use agent::*;
pub use builder::*;
pub use console::*;
pub use error::{forkvm_last_error, forkvm_status, forkvm_status_name};
pub use hardening::*;
pub use network::*;
pub use vm::*;

use error::Failure;

/// Bytes forkvm allocated for the caller: `data` holds `len` bytes followed by a NUL (so text
/// can be printed as a C string); `data` is NULL when empty and freed. Free with
/// `forkvm_bytes_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_bytes {
    /// The bytes, NUL-terminated; NULL for none.
    pub data: *mut u8,
    /// How many bytes (without the NUL).
    pub len: usize,
}

impl forkvm_bytes {
    /// An empty value (what `forkvm_bytes_free` leaves).
    pub(crate) const EMPTY: Self = Self {
        data: std::ptr::null_mut(),
        len: 0,
    };

    /// Hands `bytes` to C, NUL-terminated.
    pub(crate) fn from_vec(mut bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        bytes.push(0);
        let data = Box::into_raw(bytes.into_boxed_slice()).cast::<u8>();
        Self { data, len }
    }

    /// Takes the bytes back and frees them, leaving `self` empty.
    pub(crate) fn release(&mut self) {
        if !self.data.is_null() {
            let slice = std::ptr::slice_from_raw_parts_mut(self.data, self.len + 1);
            // SAFETY: `data` came from `from_vec`: a boxed slice of `len + 1` bytes, not freed
            // yet (a free resets `data` to NULL).
            drop(unsafe { Box::from_raw(slice) });
        }
        *self = Self::EMPTY;
    }
}

/// Frees what `bytes` holds and resets it to empty; a NULL `bytes` or an empty one is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_bytes_free(bytes: *mut forkvm_bytes) {
    // SAFETY: the caller passes NULL or a valid `forkvm_bytes` (see the crate's pointer rules).
    if let Some(bytes) = unsafe { bytes.as_mut() } {
        bytes.release();
    }
}

/// forkvm's version, e.g. `"0.1.0"` (a static string).
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_version() -> *const c_char {
    static VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(version) => version,
            Err(_) => panic!("the version has a NUL"),
        };
    VERSION.as_ptr()
}

/// The string at `ptr`, required.
pub(crate) fn str_arg<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-NULL, and a string argument is NUL-terminated and valid for the call.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))
}

/// The string at `ptr`, or `None` for NULL.
pub(crate) fn opt_str_arg<'a>(ptr: *const c_char, what: &str) -> Result<Option<&'a str>, Failure> {
    if ptr.is_null() {
        Ok(None)
    } else {
        str_arg(ptr, what).map(Some)
    }
}

/// The out-pointer `ptr`, required.
pub(crate) fn out_arg<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: an out-pointer is NULL or valid for writes of a `T` for the call.
    unsafe { ptr.as_mut() }.ok_or_else(|| Failure::null(what))
}

/// `len` bytes at `ptr` (NULL allowed when `len` is 0).
pub(crate) fn bytes_arg<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-NULL, and a buffer argument is valid for reads of `len` bytes for the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// A NULL-terminated array of strings (`argv`-style), required.
pub(crate) fn str_array_arg(ptr: *const *const c_char, what: &str) -> Result<Vec<String>, Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    let mut strings = Vec::new();
    for i in 0.. {
        // SAFETY: the array is valid and NULL-terminated, so every index up to the NULL is in it.
        let item = unsafe { *ptr.add(i) };
        if item.is_null() {
            break;
        }
        strings.push(str_arg(item, what)?.to_owned());
    }
    Ok(strings)
}
