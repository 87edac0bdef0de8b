//! Errors as JS sees them: an `Error` whose `code` names what failed (`NOT_RUNNING`,
//! `AGENT_NOT_READY`, ...), mapped from `forkvm::Error` and `AgentError` like the C binding's
//! statuses. `index.js` gives each code its `Error` subclass.

use forkvm::agent::AgentError;
use napi::{Env, JsError, JsUnknown, NapiValue};

/// A failed call: its code and message, made into a JS error on the JS thread.
#[derive(Debug)]
pub struct Failure {
    /// The `code` property of the JS error.
    pub code: &'static str,
    /// Its message.
    pub message: String,
}

impl Failure {
    /// A failure with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// An argument that is not acceptable (beyond its JS type, which napi checks).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("INVALID_ARGUMENT", message)
    }

    /// A call on a VM or PTY that was closed.
    pub fn closed(what: &str) -> Self {
        Self::new(
            "CLOSED",
            format!("this {what} was closed; it cannot be used any more"),
        )
    }

    /// The JS error (an `Error` with `code`), as a `napi::Error` that throws or rejects with it.
    pub fn into_napi(self, env: Env) -> napi::Error {
        let code = self.code;
        let error = napi::Error::new(code, self.message);
        // SAFETY: `env` is the live environment of the JS thread this runs on; the value is
        // created in it and handed straight back to it.
        let value = unsafe { JsError::from(error).into_value(env.raw()) };
        // SAFETY: as above; `value` is a valid JS value of `env`.
        let unknown = unsafe { JsUnknown::from_raw_unchecked(env.raw(), value) };
        napi::Error::from(unknown)
    }
}

/// `Result` of the binding's own work, before it reaches JS.
pub type Outcome<T> = Result<T, Failure>;

/// Runs `f` and turns a failure into the JS error, for synchronous methods.
pub fn sync<T>(env: Env, f: impl FnOnce() -> Outcome<T>) -> napi::Result<T> {
    f().map_err(|failure| failure.into_napi(env))
}

impl From<forkvm::Error> for Failure {
    fn from(e: forkvm::Error) -> Self {
        Self::new(vm_code(&e), e.to_string())
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        let code = match &e {
            AgentError::NotReady(_) => "AGENT_NOT_READY",
            AgentError::CommandNotFound(_) => "COMMAND_NOT_FOUND",
            AgentError::TimedOut => "TIMED_OUT",
            AgentError::ConnectionLost => "CONNECTION_LOST",
            AgentError::Io(_) => "IO",
            AgentError::Vm(inner) => vm_code(inner),
            _ => "AGENT",
        };
        Self::new(code, e.to_string())
    }
}

impl From<napi::Error> for Failure {
    fn from(e: napi::Error) -> Self {
        Self::invalid(e.reason)
    }
}

/// The code of a `forkvm::Error`.
fn vm_code(e: &forkvm::Error) -> &'static str {
    use forkvm::Error as E;
    match e {
        E::NoKernel | E::NoVcpus | E::TooManyVcpus { .. } | E::MemoryTooSmall { .. } => {
            "INVALID_ARGUMENT"
        }
        E::KvmMissing(_) | E::KvmPermission(_) | E::KvmOpen { .. } | E::Kvm { .. } => "KVM",
        E::GuestAddress { .. } | E::Memory(_) => "MEMORY",
        E::Boot(_) => "BOOT",
        E::BlockImage { .. } | E::ConsoleFile { .. } | E::Snapshot { .. } => "IO",
        E::NoVsock => "NO_DEVICE",
        E::Vsock(_) | E::VsockConnect { .. } => "VSOCK",
        E::AlreadyStarted => "ALREADY_STARTED",
        E::NotStarted => "NOT_STARTED",
        E::NotRunning(_) => "NOT_RUNNING",
        E::PauseTimedOut => "TIMED_OUT",
        E::SnapshotInvalid { .. } | E::SnapshotIncompatible { .. } => "SNAPSHOT",
        _ => "OTHER",
    }
}
