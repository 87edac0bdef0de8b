//! The exception hierarchy: `forkvm.Error` and one subclass per [`ErrorKind`] of
//! [`forkvm::Error`] and [`forkvm_agent_client::AgentError`] (the classification the C and Node
//! bindings map too), raised with the error's message and its causes.

use forkvm::ErrorKind;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    forkvm,
    Error,
    PyException,
    "Base of every error forkvm raises."
);
create_exception!(
    forkvm,
    InvalidArgumentError,
    Error,
    "The VM's configuration is invalid (no kernel, no vCPUs, too many, too little memory...)."
);
create_exception!(
    forkvm,
    KvmError,
    Error,
    "KVM is missing, may not be opened, or one of its calls failed."
);
create_exception!(
    forkvm,
    BootError,
    Error,
    "The kernel or initrd could not be loaded."
);
create_exception!(
    forkvm,
    GuestMemoryError,
    Error,
    "Guest memory could not be created, or an access was outside guest RAM."
);
create_exception!(
    forkvm,
    HostIoError,
    Error,
    "A host file or socket failed (disk image, console file, snapshot, file transfer)."
);
create_exception!(
    forkvm,
    NoDeviceError,
    Error,
    "The VM lacks the device the call needs (e.g. no vsock device for the agent)."
);
create_exception!(
    forkvm,
    VsockError,
    Error,
    "The vsock device or a connection through it failed."
);
create_exception!(forkvm, NotStartedError, Error, "The VM was not started.");
create_exception!(
    forkvm,
    AlreadyStartedError,
    Error,
    "The VM was already started or stopped."
);
create_exception!(
    forkvm,
    NotRunningError,
    Error,
    "The VM is not running (it ended or was stopped)."
);
create_exception!(
    forkvm,
    ClosedError,
    NotRunningError,
    "The VM (or process or PTY handle) was closed (`close()`, the end of its `with` block, or a \
     PTY's `detach()`): it holds nothing any more."
);
create_exception!(
    forkvm,
    TimedOutError,
    Error,
    "Something did not happen in time (a pause, an agent request)."
);
create_exception!(
    forkvm,
    UnsupportedError,
    Error,
    "Something forkvm cannot do yet (nothing raises it at present; kept for compatibility)."
);
create_exception!(
    forkvm,
    SnapshotError,
    Error,
    "A directory holds no usable snapshot, or one taken elsewhere."
);
create_exception!(
    forkvm,
    AgentError,
    Error,
    "The guest agent refused or failed a request."
);
create_exception!(
    forkvm,
    AgentNotReadyError,
    AgentError,
    "The guest agent did not answer in time (not booted yet, or no agent in this guest)."
);
create_exception!(
    forkvm,
    CommandNotFoundError,
    AgentError,
    "The program to run does not exist in the guest."
);
create_exception!(
    forkvm,
    ConnectionLostError,
    AgentError,
    "The connection to the guest agent ended (the VM stopped, or the agent died)."
);

/// Adds the exceptions to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    m.add("KvmError", py.get_type::<KvmError>())?;
    m.add("BootError", py.get_type::<BootError>())?;
    m.add("GuestMemoryError", py.get_type::<GuestMemoryError>())?;
    m.add("HostIoError", py.get_type::<HostIoError>())?;
    m.add("NoDeviceError", py.get_type::<NoDeviceError>())?;
    m.add("VsockError", py.get_type::<VsockError>())?;
    m.add("NotStartedError", py.get_type::<NotStartedError>())?;
    m.add("AlreadyStartedError", py.get_type::<AlreadyStartedError>())?;
    m.add("NotRunningError", py.get_type::<NotRunningError>())?;
    m.add("ClosedError", py.get_type::<ClosedError>())?;
    m.add("TimedOutError", py.get_type::<TimedOutError>())?;
    m.add("UnsupportedError", py.get_type::<UnsupportedError>())?;
    m.add("SnapshotError", py.get_type::<SnapshotError>())?;
    m.add("AgentError", py.get_type::<AgentError>())?;
    m.add("AgentNotReadyError", py.get_type::<AgentNotReadyError>())?;
    m.add(
        "CommandNotFoundError",
        py.get_type::<CommandNotFoundError>(),
    )?;
    m.add("ConnectionLostError", py.get_type::<ConnectionLostError>())?;
    Ok(())
}

/// The exception for a [`forkvm::Error`], with its message and causes.
pub(crate) fn vm_error(e: forkvm::Error) -> PyErr {
    exception(e.kind(), forkvm::error_chain(&e))
}

/// The exception for an [`AgentError`], with its message and causes.
pub(crate) fn agent_error(e: forkvm_agent_client::AgentError) -> PyErr {
    exception(e.kind(), forkvm::error_chain(&e))
}

/// The exception class of a kind of error, raised with `message`.
fn exception(kind: ErrorKind, message: String) -> PyErr {
    match kind {
        ErrorKind::InvalidArgument => InvalidArgumentError::new_err(message),
        ErrorKind::Kvm => KvmError::new_err(message),
        ErrorKind::Boot => BootError::new_err(message),
        ErrorKind::Memory => GuestMemoryError::new_err(message),
        ErrorKind::Io => HostIoError::new_err(message),
        ErrorKind::NoDevice => NoDeviceError::new_err(message),
        ErrorKind::Vsock => VsockError::new_err(message),
        ErrorKind::NotStarted => NotStartedError::new_err(message),
        ErrorKind::AlreadyStarted => AlreadyStartedError::new_err(message),
        ErrorKind::NotRunning => NotRunningError::new_err(message),
        ErrorKind::TimedOut => TimedOutError::new_err(message),
        ErrorKind::Snapshot => SnapshotError::new_err(message),
        ErrorKind::AgentNotReady => AgentNotReadyError::new_err(message),
        ErrorKind::CommandNotFound => CommandNotFoundError::new_err(message),
        ErrorKind::ConnectionLost => ConnectionLostError::new_err(message),
        ErrorKind::Agent => AgentError::new_err(message),
        // `Other`, and a kind newer than this binding.
        _ => Error::new_err(message),
    }
}

/// The error of a call on a closed VM.
pub(crate) fn closed() -> PyErr {
    ClosedError::new_err("the VM was closed; build, fork or restore a new one")
}

/// The error of a call on a closed `Process` handle.
pub(crate) fn process_closed() -> PyErr {
    ClosedError::new_err("the process handle was closed")
}

/// The error of a call on a closed or detached `Pty` handle.
pub(crate) fn pty_closed() -> PyErr {
    ClosedError::new_err("the PTY handle was closed or detached")
}
