//! One connection to the guest agent, shared by any number of requests at once: frames go out
//! under a lock, and a reader thread hands each incoming frame to the request whose id it
//! carries.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkvm_agent_protocol::{
    Frame, Hello, Kind, MAX_PAYLOAD, MIN_ENTROPY, PROTOCOL_VERSION, Reply, Request, read_frame,
    write_control, write_parts,
};
use forkvm_devices::sync::lock;
use forkvm_devices::virtio::rng::fill_random;

use super::AgentError;

/// Requests waiting for frames, by id.
type Pending = Arc<Mutex<Option<HashMap<u32, Sender<Frame>>>>>;

/// A connection after its Hello.
pub(super) struct Connection {
    writer: Mutex<UnixStream>,
    /// `None` once the reader saw the connection end: every request then fails.
    pending: Pending,
    next_id: AtomicU32,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Says Hello on `stream` for a VM of `generation` (with fresh entropy and the host's time)
    /// and waits at most `timeout` for the answer.
    pub(super) fn open(
        stream: UnixStream,
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let mut entropy = vec![0u8; MIN_ENTROPY];
        fill_random(&mut entropy).map_err(AgentError::Io)?;
        let time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            generation,
            entropy,
            time_ns,
        });
        let mut reader = stream.try_clone().map_err(AgentError::Io)?;
        let mut writer = stream;
        write_control(&mut writer, 0, &hello)?;
        reader
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let answer = read_frame(&mut reader).map_err(|e| match e {
            forkvm_agent_protocol::ProtocolError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                AgentError::NotReady(format!("no answer to Hello within {timeout:?}"))
            }
            e => AgentError::from(e),
        })?;
        match answer.decode::<Reply>()? {
            Reply::Hello { .. } => {}
            Reply::Error(error) => return Err(AgentError::Agent(error)),
            other => return Err(AgentError::Unexpected(format!("{other:?}"))),
        }
        reader.set_read_timeout(None).map_err(AgentError::Io)?;
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let shared = pending.clone();
        let reader = thread::Builder::new()
            .name("forkvm-agent-rx".into())
            .spawn(move || dispatch(reader, &shared))
            .map_err(AgentError::Io)?;
        Ok(Self {
            writer: Mutex::new(writer),
            pending,
            // 0 is Hello's.
            next_id: AtomicU32::new(1),
            reader: Some(reader),
        })
    }

    /// Sends `request` under a new id; its frames arrive on the returned receiver.
    pub(super) fn start(self: &Arc<Self>, request: &Request) -> Result<Call, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        match lock(&self.pending).as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(AgentError::ConnectionLost),
        };
        let call = Call {
            connection: self.clone(),
            id,
            frames: Mutex::new(rx),
        };
        write_control(&mut *lock(&self.writer), id, request)?;
        Ok(call)
    }

    /// Whether the reader still runs (the agent has not gone away).
    pub(super) fn is_open(&self) -> bool {
        lock(&self.pending).is_some()
    }

    fn send(&self, kind: Kind, id: u32, payload: &[u8]) -> Result<(), AgentError> {
        for chunk in payload.chunks(MAX_PAYLOAD).chain(
            // An empty payload still makes one frame (eof).
            payload.is_empty().then_some(&[][..]),
        ) {
            write_parts(&mut *lock(&self.writer), kind, id, chunk)?;
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Reads frames until the connection ends, handing each to its request.
fn dispatch(mut stream: UnixStream, pending: &Pending) {
    while let Ok(frame) = read_frame(&mut stream) {
        let tx = lock(pending)
            .as_ref()
            .and_then(|p| p.get(&frame.id).cloned());
        // Frames for a request nobody waits for any more (a dropped PTY handle) are dropped.
        if let Some(tx) = tx {
            let _ = tx.send(frame);
        }
    }
    // Every waiting request sees its channel close: the connection is lost.
    *lock(pending) = None;
}

/// One request in flight on a connection. `Sync`: one thread may wait for its frames while
/// others send on it.
pub(super) struct Call {
    connection: Arc<Connection>,
    id: u32,
    /// Behind a lock only to make the call `Sync` (a `Receiver` is not): it is never
    /// contended unless two threads wait for frames of the same call at once.
    frames: Mutex<Receiver<Frame>>,
}

impl Call {
    /// The next frame of the request, waiting until `deadline` at most.
    pub(super) fn next(&self, deadline: Option<Instant>) -> Result<Frame, AgentError> {
        let frames = lock(&self.frames);
        let frame = match deadline {
            None => frames.recv().map_err(|_| AgentError::ConnectionLost),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                frames.recv_timeout(left).map_err(|e| match e {
                    RecvTimeoutError::Timeout => AgentError::TimedOut,
                    RecvTimeoutError::Disconnected => AgentError::ConnectionLost,
                })
            }
        }?;
        Ok(frame)
    }

    /// The next control message, skipping nothing: a data frame here is a protocol error.
    pub(super) fn reply(&self, deadline: Option<Instant>) -> Result<Reply, AgentError> {
        let frame = self.next(deadline)?;
        let reply: Reply = frame.decode()?;
        match reply {
            Reply::Error(error) => Err(AgentError::Agent(error)),
            reply => Ok(reply),
        }
    }

    /// Sends data for the request (split into frames of at most `MAX_PAYLOAD`).
    pub(super) fn send_data(&self, bytes: &[u8]) -> Result<(), AgentError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.connection.send(Kind::Data, self.id, bytes)
    }

    /// The request's id on its connection.
    pub(super) fn id(&self) -> u32 {
        self.id
    }

    /// Tells the agent the request's input is complete.
    pub(super) fn send_eof(&self) -> Result<(), AgentError> {
        self.connection.send(Kind::Eof, self.id, &[])
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(pending) = lock(&self.connection.pending).as_mut() {
            pending.remove(&self.id);
        }
    }
}
