//! One connection to the guest agent, shared by any number of requests at once: frames go out
//! under a lock, and a reader thread hands each incoming frame to the request whose id it
//! carries.
//!
//! Host memory is bounded by backpressure, not by dropping output: each request keeps at most
//! its connection's buffer limit ([`CALL_BUFFER`] unless the agent was given another) of
//! frames its caller has not taken (one frame more when it holds none, so a frame of the
//! protocol's largest size still goes through). When a request's buffer is
//! full, the reader thread stops reading the socket until the caller takes some; the socket's
//! buffer fills, the vsock device stops giving the guest credit and the guest agent's writes
//! block. While another request on the same connection waits for its answer (a signal sent to
//! a process whose output nobody reads, on that process's connection), the full request may
//! hold up to [`OVERCOMMIT`] times the limit (8 MiB by default) so that the answer can get past
//! its output.
//!
//! A connection ends when the agent closes it or when its VM ends ([`Shared::end`], from
//! `crate::life::VmLife`): every request waiting on it then fails at once with the reason.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkvm::GuestExit;
use forkvm_agent_protocol::{
    Frame, Hello, Kind, MAX_PAYLOAD, MIN_ENTROPY, PROTOCOL_VERSION, Reply, Request, read_frame,
    write_control, write_parts,
};
use forkvm_devices::sync::lock;
use forkvm_devices::virtio::rng::fill_random;

use super::AgentError;
use super::life::{Ending, VmLife, not_running};

/// Bytes of frames (payload plus [`FRAME_COST`] each) one request keeps for its caller before
/// the connection stops reading from the guest, unless the agent was given another limit
/// (`Agent::with_buffer_limit`).
pub const CALL_BUFFER: usize = 2 << 20;
/// How many times its limit a full request may hold while another request on its connection
/// waits for an answer.
pub const OVERCOMMIT: usize = 4;
/// What a buffered frame costs beyond its payload (its bookkeeping), so that a flood of empty
/// frames is bounded too.
pub const FRAME_COST: usize = 64;

/// Why a connection ended.
#[derive(Clone, Debug)]
enum Ended {
    /// The agent closed it, or it failed.
    Lost,
    /// The VM stopped or ended, with this exit if known.
    NotRunning(Option<GuestExit>),
}

impl Ended {
    fn error(&self) -> AgentError {
        match self {
            Self::Lost => AgentError::ConnectionLost,
            Self::NotRunning(exit) => not_running(exit.clone()),
        }
    }
}

/// Frames of one request that its caller has not taken yet.
#[derive(Default)]
struct Inbox {
    frames: VecDeque<Frame>,
    /// Their cost ([`cost`]), at most the buffer bound plus one frame.
    bytes: usize,
    /// Its caller waits in [`Call::next`] with nothing to take.
    waiting: bool,
}

/// A connection's requests and whether it ended.
#[derive(Default)]
struct State {
    calls: HashMap<u32, Inbox>,
    /// How many requests' callers wait with nothing to take.
    waiting: usize,
    ended: Option<Ended>,
}

/// What the reader thread, the callers and the VM's end share.
struct Shared {
    state: Mutex<State>,
    /// Signalled on every change of `state`.
    changed: Condvar,
    /// The socket, to shut it down (which wakes the reader and fails blocked writes).
    socket: UnixStream,
    /// Bytes one request may hold ([`CALL_BUFFER`] by default).
    limit: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wait<'a>(
        &self,
        state: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        match deadline {
            None => self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                self.changed
                    .wait_timeout(state, left)
                    .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard)
            }
        }
    }

    /// Ends the connection for `why` (a VM's end overrides an earlier loss: it says more),
    /// waking every waiting request and the reader thread.
    fn end(&self, why: Ended) {
        {
            let mut state = self.lock();
            match (&state.ended, &why) {
                (None, _) | (Some(Ended::Lost), Ended::NotRunning(_)) => state.ended = Some(why),
                _ => {}
            }
        }
        self.changed.notify_all();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Hands `frame` to its request, waiting while the request's buffer is full; `false` once
    /// the connection ended.
    fn deliver(&self, frame: Frame) -> bool {
        let cost = cost(&frame);
        let mut state = self.lock();
        loop {
            if state.ended.is_some() {
                return false;
            }
            let others_waiting = state.waiting;
            // Frames for a request nobody waits for any more (a dropped PTY handle) are dropped.
            let Some(inbox) = state.calls.get_mut(&frame.id) else {
                return true;
            };
            let others_waiting = others_waiting > usize::from(inbox.waiting);
            let limit = self.limit.load(Ordering::Relaxed);
            let bound = if others_waiting {
                limit.saturating_mul(OVERCOMMIT)
            } else {
                limit
            };
            if inbox.bytes == 0 || inbox.bytes.saturating_add(cost) <= bound {
                inbox.bytes += cost;
                inbox.frames.push_back(frame);
                drop(state);
                self.changed.notify_all();
                return true;
            }
            state = self.wait(state, None);
        }
    }
}

impl Ending for Shared {
    fn vm_ended(&self, exit: Option<GuestExit>) {
        self.end(Ended::NotRunning(exit));
    }
}

/// What a buffered frame counts for.
fn cost(frame: &Frame) -> usize {
    frame.payload.len().saturating_add(FRAME_COST)
}

/// A connection after its Hello.
pub(super) struct Connection {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    reader: Option<JoinHandle<()>>,
}

impl Connection {
    /// Says Hello on `stream` for a VM of `generation` (with fresh entropy and the host's time)
    /// and waits at most `timeout` for the answer. With `life`, the connection ends when the VM
    /// does (and opening fails at once if it has).
    pub(super) fn open(
        stream: UnixStream,
        generation: u64,
        timeout: Duration,
        life: Option<&VmLife>,
    ) -> Result<Self, AgentError> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            changed: Condvar::new(),
            socket: stream.try_clone().map_err(AgentError::Io)?,
            limit: AtomicUsize::new(CALL_BUFFER),
        });
        if let Some(life) = life {
            let ending: Weak<dyn Ending> = Arc::downgrade(&shared) as Weak<Shared>;
            life.register(ending)?;
        }
        let hello = say_hello(stream, generation, timeout);
        // A VM that ended meanwhile shut the socket down: say so rather than what that did.
        if let Some(ended) = &shared.lock().ended {
            return Err(ended.error());
        }
        let (reader, writer) = hello?;
        let dispatching = shared.clone();
        let reader = thread::Builder::new()
            .name("forkvm-agent-rx".into())
            .spawn(move || dispatch(reader, &dispatching))
            .map_err(AgentError::Io)?;
        Ok(Self {
            writer: Mutex::new(writer),
            shared,
            // 0 is Hello's.
            next_id: AtomicU32::new(1),
            reader: Some(reader),
        })
    }

    /// Sends `request` under a new id; its frames arrive through the returned call.
    pub(super) fn start(self: &Arc<Self>, request: &Request) -> Result<Call, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.shared.lock();
            if let Some(ended) = &state.ended {
                return Err(ended.error());
            }
            state.calls.insert(id, Inbox::default());
        }
        let call = Call {
            connection: self.clone(),
            id,
        };
        let sent = write_control(&mut *lock(&self.writer), id, request);
        self.sent(sent)?;
        Ok(call)
    }

    /// The connection's end if it ended (it explains a failed write better), else `result`'s
    /// error.
    fn sent<E: Into<AgentError>>(&self, result: Result<(), E>) -> Result<(), AgentError> {
        result.map_err(|e| match &self.shared.lock().ended {
            Some(ended) => ended.error(),
            None => e.into(),
        })
    }

    /// Sets how many bytes each request may hold before the connection stops reading.
    pub(super) fn set_buffer_limit(&self, bytes: usize) {
        self.shared.limit.store(bytes, Ordering::Relaxed);
        // A reader waiting for room may have it now.
        self.shared.changed.notify_all();
    }

    /// Whether the connection is still up (the agent has not gone away, the VM runs).
    pub(super) fn is_open(&self) -> bool {
        self.shared.lock().ended.is_none()
    }

    fn send(&self, kind: Kind, id: u32, payload: &[u8]) -> Result<(), AgentError> {
        for chunk in payload.chunks(MAX_PAYLOAD).chain(
            // An empty payload still makes one frame (eof).
            payload.is_empty().then_some(&[][..]),
        ) {
            let sent = write_parts(&mut *lock(&self.writer), kind, id, chunk);
            self.sent(sent)?;
        }
        Ok(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.end(Ended::Lost);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Sends Hello on `stream` and reads the answer within `timeout`; returns the reader and
/// writer ends.
fn say_hello(
    stream: UnixStream,
    generation: u64,
    timeout: Duration,
) -> Result<(UnixStream, UnixStream), AgentError> {
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
    // A zero timeout means none to the socket.
    reader
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
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
    Ok((reader, writer))
}

/// Reads frames until the connection ends, handing each to its request.
fn dispatch(mut stream: UnixStream, shared: &Shared) {
    while let Ok(frame) = read_frame(&mut stream) {
        if !shared.deliver(frame) {
            break;
        }
    }
    // Every waiting request learns that the connection is lost.
    shared.end(Ended::Lost);
}

/// One request in flight on a connection. `Sync`: one thread may wait for its frames while
/// others send on it.
pub(super) struct Call {
    connection: Arc<Connection>,
    id: u32,
}

impl Call {
    /// The next frame of the request, waiting until `deadline` at most; the connection's end
    /// once it ended and no frame is left.
    pub(super) fn next(&self, deadline: Option<Instant>) -> Result<Frame, AgentError> {
        let shared = &self.connection.shared;
        let mut state = shared.lock();
        let result = loop {
            let State {
                calls,
                waiting,
                ended,
            } = &mut *state;
            let Some(inbox) = calls.get_mut(&self.id) else {
                break Err(AgentError::ConnectionLost);
            };
            if let Some(frame) = inbox.frames.pop_front() {
                inbox.bytes = inbox.bytes.saturating_sub(cost(&frame));
                break Ok(frame);
            }
            if let Some(ended) = ended {
                break Err(ended.error());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Err(AgentError::TimedOut);
            }
            if !inbox.waiting {
                inbox.waiting = true;
                *waiting += 1;
                // The reader may hold a frame for another request that it may now overcommit.
                shared.changed.notify_all();
            }
            state = shared.wait(state, deadline);
        };
        let State { calls, waiting, .. } = &mut *state;
        if let Some(inbox) = calls.get_mut(&self.id).filter(|i| i.waiting) {
            inbox.waiting = false;
            *waiting = waiting.saturating_sub(1);
        }
        drop(state);
        if result.is_ok() {
            // The reader may wait for room.
            shared.changed.notify_all();
        }
        result
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

    /// Bytes of frames received for the request and not taken yet (payload plus
    /// [`FRAME_COST`] each).
    pub(super) fn buffered(&self) -> usize {
        self.connection
            .shared
            .lock()
            .calls
            .get(&self.id)
            .map_or(0, |inbox| inbox.bytes)
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let shared = &self.connection.shared;
        let mut state = shared.lock();
        if let Some(inbox) = state.calls.remove(&self.id)
            && inbox.waiting
        {
            state.waiting = state.waiting.saturating_sub(1);
        }
        drop(state);
        // The reader may wait for room in this request's buffer.
        shared.changed.notify_all();
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
