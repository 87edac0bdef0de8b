//! Node.js binding of forkvm (napi-rs): a thin layer over the Rust API — `VM` (build, start,
//! wait, stop, pause/resume, memory, fork, snapshot/restore, devices, the guest agent's
//! exec/files/PTY/processes), `ConsoleBuffer`, `Pty` and `Process` — that converts types and
//! nothing more. Every call that may block runs on node's thread pool and returns a promise;
//! failures are JS errors with a `code` (`error.rs`), which `index.js` gives `Error` subclasses.
//!
//! The crate builds a cdylib whose node symbols resolve when node loads it; it has no Rust
//! tests (the Node tests in `test/` run through `test.sh`).

mod agent;
mod console;
mod convert;
mod error;
mod limits;
mod network;
mod process;
mod task;
mod vm;

use napi::Env;
use napi_derive::napi;

// The module's exported functions (reached from JS only, through napi's registration).
pub use limits::{SeccompDenials, seccomp_denials, seccomp_policy, set_seccomp_policy};

/// The forkvm version this binding was built from.
#[napi]
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Waits up to `timeoutMs` until what closed VMs and forks let go of (KVM VMs, memory) is
/// released on forkvm's background threads and those threads have ended; says whether it was.
/// Blocks the calling thread: for shutdown paths and tests that count threads or fds.
#[napi]
pub fn wait_for_releases(env: Env, timeout_ms: f64) -> napi::Result<bool> {
    error::sync(env, || {
        Ok(forkvm::wait_for_releases(convert::millis(
            timeout_ms,
            "timeoutMs",
        )?))
    })
}

/// The kernel command line of forkvm's Linux image (root on the read-only `/dev/vda`, the
/// agent as PID 1): pass it as `cmdline` with the image as a read-only disk and a vsock device.
#[napi]
pub const IMAGE_CMDLINE: &str = forkvm_agent_client::IMAGE_CMDLINE;
