//! What a request handler gets: the connection's sending half ([`Out`]), its input ([`Chunk`]),
//! the connection's running requests ([`Running`]) and the request's context.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use forkvm_agent_protocol::{Kind, ProtocolError, Reply, write_control, write_parts};

use crate::reaper::Reaper;

/// The sending half of a connection, shared by the threads serving its requests; each frame is
/// written whole under its lock.
pub struct Out {
    stream: Mutex<UnixStream>,
}

impl Out {
    pub(crate) fn new(stream: UnixStream) -> Out {
        Out {
            stream: Mutex::new(stream),
        }
    }

    /// The stream, locked: frames written through the guard are not interleaved with others.
    pub(crate) fn lock(&self) -> MutexGuard<'_, UnixStream> {
        self.stream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a control frame.
    pub fn reply(&self, id: u32, reply: &Reply) -> Result<(), ProtocolError> {
        write_control(&mut *self.lock(), id, reply)
    }

    /// Sends `bytes` as frames of `kind`, split at the maximum payload.
    pub fn bytes(&self, kind: Kind, id: u32, bytes: &[u8]) -> Result<(), ProtocolError> {
        let mut stream = self.lock();
        for chunk in bytes.chunks(forkvm_agent_protocol::MAX_PAYLOAD) {
            write_parts(&mut *stream, kind, id, chunk)?;
        }
        Ok(())
    }
}

/// Input for a request: a data frame's payload, or the end of it.
pub enum Chunk {
    /// Bytes.
    Data(Vec<u8>),
    /// No more bytes.
    Eof,
}

/// The requests of a connection that run on their own threads, with the pid of each exec.
#[derive(Default)]
pub struct Running {
    requests: Mutex<HashMap<u32, Option<libc::pid_t>>>,
}

impl Running {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<u32, Option<libc::pid_t>>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the process an exec request runs.
    pub(crate) fn set_pid(&self, id: u32, pid: libc::pid_t) {
        self.lock().insert(id, Some(pid));
    }

    /// Forgets the process of an exec request (it has been reaped).
    pub(crate) fn clear_pid(&self, id: u32) {
        if let Some(pid) = self.lock().get_mut(&id) {
            *pid = None;
        }
    }
}

/// What a request handler running on its own thread gets.
pub struct RequestContext {
    /// Starts and reaps the request's processes.
    pub reaper: Arc<Reaper>,
    /// Where to send frames.
    pub out: Arc<Out>,
    /// The request's id.
    pub id: u32,
    /// The connection's running requests.
    pub running: Arc<Running>,
}
