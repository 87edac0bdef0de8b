//! Status codes, the thread-local last error, and the wrapper every exported function runs in.

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use forkvm::ErrorKind;
use forkvm_agent_client::AgentError;

/// What a forkvm function returns: `FORKVM_OK` (0), or why it failed (details in
/// `forkvm_last_error()`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_status {
    /// Success.
    FORKVM_OK = 0,
    /// A required pointer argument was NULL.
    FORKVM_ERR_NULL_POINTER = 1,
    /// A handle that is not live: freed already (double free, use after free), never made by
    /// forkvm, or of another type.
    FORKVM_ERR_INVALID_HANDLE = 2,
    /// An argument or configuration is not acceptable (no kernel, 0 vCPUs, too little memory,
    /// a string that is not UTF-8, an unknown kind, a builder that was already built).
    FORKVM_ERR_INVALID_ARGUMENT = 3,
    /// The VM was not started.
    FORKVM_ERR_NOT_STARTED = 4,
    /// The VM was already started (or stopped).
    FORKVM_ERR_ALREADY_STARTED = 5,
    /// The VM is not running: it ended or was stopped.
    FORKVM_ERR_NOT_RUNNING = 6,
    /// Something did not finish in time (a pause, an agent request).
    FORKVM_ERR_TIMED_OUT = 7,
    /// A host file or socket could not be used (kernel, disk image, console file, snapshot
    /// files, agent I/O).
    FORKVM_ERR_IO = 8,
    /// KVM is missing or may not be opened, one of its calls failed, or probing the host's KVM
    /// failed.
    FORKVM_ERR_KVM = 9,
    /// The kernel or initrd could not be loaded.
    FORKVM_ERR_BOOT = 10,
    /// Guest memory could not be created, frozen or accessed (including an address outside RAM).
    FORKVM_ERR_MEMORY = 11,
    /// A directory is not a usable snapshot, or one from another forkvm version or CPU.
    FORKVM_ERR_SNAPSHOT = 12,
    /// The VM has no such device (no vsock device, no balloon).
    FORKVM_ERR_NO_DEVICE = 13,
    /// A vsock connection to the guest failed (refused, or no answer in time).
    FORKVM_ERR_VSOCK = 14,
    /// The guest agent did not come up in time (not booted yet, or no agent in this guest).
    FORKVM_ERR_AGENT_NOT_READY = 15,
    /// The program to run does not exist in the guest.
    FORKVM_ERR_COMMAND_NOT_FOUND = 16,
    /// The connection to the guest agent was lost.
    FORKVM_ERR_CONNECTION_LOST = 17,
    /// The guest agent refused the request (no such file, permission denied, ...), or answered
    /// something unexpected.
    FORKVM_ERR_AGENT = 18,
    /// The caller's buffer is too small (the needed size is reported).
    FORKVM_ERR_BUFFER_TOO_SMALL = 19,
    /// The handle is in use by another thread and cannot be consumed now.
    FORKVM_ERR_BUSY = 20,
    /// Something forkvm cannot do yet. No function returns it at present; the value stays
    /// reserved.
    FORKVM_ERR_UNSUPPORTED = 21,
    /// Any other failure of the VMM (a thread or device could not be set up).
    FORKVM_ERR_OTHER = 22,
    /// forkvm hit an internal error (a Rust panic, caught at the boundary).
    FORKVM_ERR_PANIC = 23,
}

use forkvm_status::*;

/// A failed call: its status and message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: forkvm_status,
    pub message: String,
}

impl Failure {
    pub fn new(status: forkvm_status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn null(what: &str) -> Self {
        Self::new(FORKVM_ERR_NULL_POINTER, format!("{what} is NULL"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FORKVM_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<forkvm::Error> for Failure {
    fn from(e: forkvm::Error) -> Self {
        Self::new(status(e.kind()), forkvm::error_chain(&e))
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        Self::new(status(e.kind()), forkvm::error_chain(&e))
    }
}

/// The status of a kind of error.
fn status(kind: ErrorKind) -> forkvm_status {
    match kind {
        ErrorKind::InvalidArgument => FORKVM_ERR_INVALID_ARGUMENT,
        ErrorKind::Kvm => FORKVM_ERR_KVM,
        ErrorKind::Boot => FORKVM_ERR_BOOT,
        ErrorKind::Memory => FORKVM_ERR_MEMORY,
        ErrorKind::Io => FORKVM_ERR_IO,
        ErrorKind::NoDevice => FORKVM_ERR_NO_DEVICE,
        ErrorKind::Vsock => FORKVM_ERR_VSOCK,
        ErrorKind::NotStarted => FORKVM_ERR_NOT_STARTED,
        ErrorKind::AlreadyStarted => FORKVM_ERR_ALREADY_STARTED,
        ErrorKind::NotRunning => FORKVM_ERR_NOT_RUNNING,
        ErrorKind::TimedOut => FORKVM_ERR_TIMED_OUT,
        ErrorKind::Snapshot => FORKVM_ERR_SNAPSHOT,
        ErrorKind::AgentNotReady => FORKVM_ERR_AGENT_NOT_READY,
        ErrorKind::CommandNotFound => FORKVM_ERR_COMMAND_NOT_FOUND,
        ErrorKind::ConnectionLost => FORKVM_ERR_CONNECTION_LOST,
        ErrorKind::Agent => FORKVM_ERR_AGENT,
        ErrorKind::Other => FORKVM_ERR_OTHER,
        // A kind newer than this binding.
        _ => FORKVM_ERR_OTHER,
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message with a NUL in it is cut there.
    let end = message.find('\0').unwrap_or(message.len());
    let message = CString::new(&message[..end]).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

/// Runs the body of an exported function: `FORKVM_OK` and an empty last error if it succeeds,
/// else its status and message; a panic becomes `FORKVM_ERR_PANIC`.
pub(crate) fn ffi(body: impl FnOnce() -> Result<(), Failure>) -> forkvm_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            // Cleared without allocating: a successful call costs no heap traffic here.
            LAST_ERROR.with(|last| {
                if !last.borrow().is_empty() {
                    *last.borrow_mut() = CString::default();
                }
            });
            FORKVM_OK
        }
        Ok(Err(failure)) => {
            set_last_error(&failure.message);
            failure.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error in forkvm: {what}"));
            FORKVM_ERR_PANIC
        }
    }
}

/// The message of the calling thread's last failed forkvm call: `""` if that call succeeded.
/// Never NULL; valid until this thread's next call into forkvm (other than this one and
/// `forkvm_status_name`).
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// The name of a status (`"FORKVM_ERR_NOT_RUNNING"`), or `"FORKVM_ERR_UNKNOWN"` for a number
/// that is none. A static string.
#[unsafe(no_mangle)]
pub extern "C" fn forkvm_status_name(status: i32) -> *const c_char {
    const NAMES: [&std::ffi::CStr; 24] = [
        c"FORKVM_OK",
        c"FORKVM_ERR_NULL_POINTER",
        c"FORKVM_ERR_INVALID_HANDLE",
        c"FORKVM_ERR_INVALID_ARGUMENT",
        c"FORKVM_ERR_NOT_STARTED",
        c"FORKVM_ERR_ALREADY_STARTED",
        c"FORKVM_ERR_NOT_RUNNING",
        c"FORKVM_ERR_TIMED_OUT",
        c"FORKVM_ERR_IO",
        c"FORKVM_ERR_KVM",
        c"FORKVM_ERR_BOOT",
        c"FORKVM_ERR_MEMORY",
        c"FORKVM_ERR_SNAPSHOT",
        c"FORKVM_ERR_NO_DEVICE",
        c"FORKVM_ERR_VSOCK",
        c"FORKVM_ERR_AGENT_NOT_READY",
        c"FORKVM_ERR_COMMAND_NOT_FOUND",
        c"FORKVM_ERR_CONNECTION_LOST",
        c"FORKVM_ERR_AGENT",
        c"FORKVM_ERR_BUFFER_TOO_SMALL",
        c"FORKVM_ERR_BUSY",
        c"FORKVM_ERR_UNSUPPORTED",
        c"FORKVM_ERR_OTHER",
        c"FORKVM_ERR_PANIC",
    ];
    usize::try_from(status)
        .ok()
        .and_then(|i| NAMES.get(i))
        .unwrap_or(&c"FORKVM_ERR_UNKNOWN")
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(e: impl Into<Failure>) -> forkvm_status {
        e.into().status
    }

    #[test]
    fn every_kvm_failure_is_err_kvm() {
        use forkvm::Error as E;
        assert_eq!(status_of(E::KvmMissing("/x".into())), FORKVM_ERR_KVM);
        assert_eq!(status_of(E::KvmPermission("/x".into())), FORKVM_ERR_KVM);
        assert_eq!(status_of(E::Probe("no".into())), FORKVM_ERR_KVM);
    }

    #[test]
    fn an_agent_error_from_the_vm_has_the_vm_error_status() {
        let vm = |e: forkvm::Error| AgentError::Vm(Box::new(e));
        assert_eq!(
            status_of(vm(forkvm::Error::KvmMissing("/x".into()))),
            FORKVM_ERR_KVM
        );
        assert_eq!(
            status_of(vm(forkvm::Error::NoKernel)),
            FORKVM_ERR_INVALID_ARGUMENT
        );
        assert_eq!(status_of(vm(forkvm::Error::NoVsock)), FORKVM_ERR_NO_DEVICE);
        assert_eq!(status_of(AgentError::TimedOut), FORKVM_ERR_TIMED_OUT);
    }
}
