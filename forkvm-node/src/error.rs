//! Errors as JS sees them: an `Error` whose `code` names what failed (`NOT_RUNNING`,
//! `AGENT_NOT_READY`, ...), mapped from the `forkvm::ErrorKind` of a `forkvm::Error` or
//! `AgentError` (as the C binding's statuses are), with the error's message and its causes.
//! `index.js` gives each code its `Error` subclass.

use forkvm::ErrorKind;
use forkvm_agent_client::AgentError;
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
        Self::new(code(e.kind()), forkvm::error_chain(&e))
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Self {
        Self::new(code(e.kind()), forkvm::error_chain(&e))
    }
}

impl From<napi::Error> for Failure {
    fn from(e: napi::Error) -> Self {
        Self::invalid(e.reason)
    }
}

/// The code of a kind of error.
fn code(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
        ErrorKind::Kvm => "KVM",
        ErrorKind::Boot => "BOOT",
        ErrorKind::Memory => "MEMORY",
        ErrorKind::Io => "IO",
        ErrorKind::NoDevice => "NO_DEVICE",
        ErrorKind::Vsock => "VSOCK",
        ErrorKind::NotStarted => "NOT_STARTED",
        ErrorKind::AlreadyStarted => "ALREADY_STARTED",
        ErrorKind::NotRunning => "NOT_RUNNING",
        ErrorKind::TimedOut => "TIMED_OUT",
        ErrorKind::Snapshot => "SNAPSHOT",
        ErrorKind::AgentNotReady => "AGENT_NOT_READY",
        ErrorKind::CommandNotFound => "COMMAND_NOT_FOUND",
        ErrorKind::ConnectionLost => "CONNECTION_LOST",
        ErrorKind::Agent => "AGENT",
        ErrorKind::Other => "OTHER",
        // A kind newer than this binding.
        _ => "OTHER",
    }
}
