//! `forkvm-agent`: the agent that runs as PID 1 in a forkvm Linux guest and serves the
//! [`forkvm_agent_protocol`] on vsock port [`AGENT_PORT`](forkvm_agent_protocol::AGENT_PORT).
//!
//! The library holds everything but argument parsing, so that the server and its handlers run as
//! ordinary host processes in tests, over Unix sockets: [`server::serve_connection`] takes any
//! connected stream socket. PID-1 duties ([`init`]) and reaping every process ([`reaper`]) are
//! only switched on when the binary really is PID 1; the privileged calls (reseeding, stepping the
//! clock, powering off) go through the [`system::System`] trait so tests can substitute them.
//!
//! | module | concern |
//! |---|---|
//! | [`server`] | connections: Hello and reseed, frame dispatch, request ids, input routing |
//! | [`exec`] | running processes, streaming their output, timeouts and signals |
//! | [`files`] | write, read, stat, list, mkdir, remove, rename |
//! | [`pty`] | PTY sessions and their registry, independent of connections |
//! | [`reaper`] | waiting for children (all of them when PID 1) |
//! | [`init`] | PID-1 duties: mounts, hostname, power off |
//! | [`reseed`] | entropy and clock after a fork or restore |
//! | [`system`] | the privileged calls, injectable |
//! | [`user`] | `/etc/passwd` lookup without NSS |
//! | [`vsock`] | AF_VSOCK listen and connect |

pub mod exec;
pub mod files;
pub mod init;
pub mod pty;
pub mod reaper;
pub mod request;
pub mod reseed;
pub mod server;
pub mod system;
pub mod user;
pub mod vsock;

use std::io;

use forkvm_agent_protocol::{ErrorKind, ErrorReply};

/// The agent's name and version, as sent in `Hello` and `Ready` replies.
pub const AGENT_NAME: &str = concat!("forkvm-agent ", env!("CARGO_PKG_VERSION"));

/// An error reply for an OS error, classified by its kind.
pub fn io_error(context: &str, error: &io::Error) -> ErrorReply {
    let kind = match error.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    ErrorReply {
        kind,
        message: format!("{context}: {error}"),
        errno: error.raw_os_error(),
    }
}

/// An error reply of `kind` with no OS error.
pub fn error(kind: ErrorKind, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        kind,
        message: message.into(),
        errno: None,
    }
}
