//! Connections: the `Hello` (and the reseed it may trigger), reading frames, dispatching requests
//! to handlers (long ones on their own threads), routing input frames, and cleaning up when a
//! connection ends.
//!
//! A connection is any connected stream socket as a [`UnixStream`]: in the guest an `AF_VSOCK`
//! socket (see [`crate::vsock`]; `UnixStream` only reads, writes, duplicates and shuts down its
//! fd, which works for every stream socket), in tests a Unix socket.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use std::{io, thread};

use forkvm_agent_protocol::{
    ErrorKind, ErrorReply, Frame, Hello, INPUT_QUEUE, Kind, PROTOCOL_VERSION, PowerAction,
    ProtocolError, Reply, Request, read_frame,
};

use crate::pty::{Registry, Session};
use crate::reaper::{Reaper, kill_group};
use crate::request::{Chunk, Out, RequestContext, Running};
use crate::system::System;
use crate::{error, exec, files, io_error, reseed};

/// How the agent is set up.
pub struct Config {
    /// The privileged calls.
    pub system: Box<dyn System>,
    /// Reap every child of the process (PID 1).
    pub reap_all: bool,
    /// Honour `Shutdown` requests (PID 1).
    pub allow_shutdown: bool,
}

/// The agent's state shared by all connections.
pub struct Agent {
    started: Instant,
    system: Box<dyn System>,
    allow_shutdown: bool,
    /// The last VM generation seen in a `Hello`. Written only while reseeding, and requests wait
    /// for the read side, so nothing is served while a reseed is in progress.
    generation: RwLock<Option<u64>>,
    pub(crate) reaper: Arc<Reaper>,
    pub(crate) sessions: Registry,
    next_connection: AtomicU64,
}

impl Agent {
    /// A new agent.
    pub fn new(config: Config) -> Arc<Agent> {
        Arc::new(Agent {
            started: Instant::now(),
            system: config.system,
            allow_shutdown: config.allow_shutdown,
            generation: RwLock::new(None),
            reaper: Reaper::new(config.reap_all),
            sessions: Registry::default(),
            next_connection: AtomicU64::new(1),
        })
    }

    fn hello(&self, hello: &Hello) -> Result<Reply, ErrorReply> {
        if hello.version != PROTOCOL_VERSION {
            return Err(error(
                ErrorKind::Version,
                format!(
                    "protocol version {} not supported (agent speaks {PROTOCOL_VERSION})",
                    hello.version
                ),
            ));
        }
        reseed::check_entropy(&hello.entropy)?;
        let seen = *self
            .generation
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut reseeded = false;
        if seen != Some(hello.generation) {
            let mut generation = self
                .generation
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            // Another connection may have reseeded for this generation meanwhile.
            if *generation != Some(hello.generation) {
                reseed::reseed(self.system.as_ref(), &hello.entropy, hello.time_ns)?;
                *generation = Some(hello.generation);
                reseeded = true;
            }
        }
        Ok(Reply::Hello {
            version: PROTOCOL_VERSION,
            agent: crate::AGENT_NAME.to_owned(),
            generation: hello.generation,
            reseeded,
        })
    }

    /// Waits while a reseed is in progress.
    fn wait_for_reseed(&self) {
        drop(
            self.generation
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }
}

enum Input {
    Queue(SyncSender<Chunk>),
    Pty(Arc<Session>),
}

struct Connection {
    agent: Arc<Agent>,
    out: Arc<Out>,
    token: u64,
    inputs: HashMap<u32, Input>,
    running: Arc<Running>,
}

/// Accepts connections until `incoming` ends, serving each on its own thread.
pub fn serve(agent: &Arc<Agent>, incoming: impl Iterator<Item = io::Result<UnixStream>>) {
    for stream in incoming {
        match stream {
            Ok(stream) => {
                let agent = Arc::clone(agent);
                if let Err(e) = thread::Builder::new()
                    .name("connection".into())
                    .spawn(move || serve_connection(agent, stream))
                {
                    eprintln!("forkvm-agent: cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("forkvm-agent: accept: {e}");
                // Out of fds or memory: give it a moment.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one connection until the peer closes it or sends a bad frame (answered by an error
/// reply, then the connection is shut down). Then its execs are killed and its PTY sessions
/// detached.
pub fn serve_connection(agent: Arc<Agent>, stream: UnixStream) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    let token = agent.next_connection.fetch_add(1, Ordering::Relaxed);
    let mut connection = Connection {
        agent,
        out: Arc::new(Out::new(writer)),
        token,
        inputs: HashMap::new(),
        running: Arc::default(),
    };
    let mut reader = BufReader::with_capacity(64 * 1024, &stream);
    if let Err((id, reply)) = connection.run(&mut reader) {
        // The peer may be gone already.
        let _ = connection.out.reply(id, &Reply::Error(reply));
    }
    let _ = stream.shutdown(Shutdown::Both);
    connection.close();
}

/// The error reply for a frame that could not be read.
fn frame_error(e: &ProtocolError) -> ErrorReply {
    let kind = match e {
        ProtocolError::Oversized { .. } => ErrorKind::Oversized,
        ProtocolError::Io(_) => ErrorKind::Io,
        _ => ErrorKind::BadFrame,
    };
    error(kind, e.to_string())
}

fn decode_request(frame: &Frame) -> Result<Request, (u32, ErrorReply)> {
    frame
        .decode()
        .map_err(|e| (frame.id, error(ErrorKind::BadMessage, e.to_string())))
}

impl Connection {
    /// Reads and handles frames; `Err` is a fatal error to report on the given id.
    fn run(&mut self, reader: &mut impl Read) -> Result<(), (u32, ErrorReply)> {
        let first = match read_frame(reader) {
            Ok(frame) => frame,
            Err(ProtocolError::Closed) => return Ok(()),
            Err(e) => return Err((0, frame_error(&e))),
        };
        let Request::Hello(hello) = decode_request(&first)? else {
            return Err((
                first.id,
                error(ErrorKind::NotHello, "the first request must be a hello"),
            ));
        };
        let reply = self.agent.hello(&hello).map_err(|e| (first.id, e))?;
        if self.out.reply(first.id, &reply).is_err() {
            return Ok(());
        }
        loop {
            let frame = match read_frame(reader) {
                Ok(frame) => frame,
                Err(ProtocolError::Closed) => return Ok(()),
                Err(e) => return Err((0, frame_error(&e))),
            };
            match frame.kind {
                Kind::Control => {
                    let request = decode_request(&frame)?;
                    self.dispatch(frame.id, request)?;
                }
                Kind::Data => self.input(frame.id, Chunk::Data(frame.payload)),
                Kind::Eof => self.input(frame.id, Chunk::Eof),
                Kind::Stderr => {
                    return Err((
                        frame.id,
                        error(
                            ErrorKind::BadFrame,
                            "stderr frames only come from the agent",
                        ),
                    ));
                }
            }
        }
    }

    fn reply(&self, id: u32, result: Result<Reply, ErrorReply>) {
        let reply = result.unwrap_or_else(Reply::Error);
        // A peer that is gone is noticed by the reading side.
        let _ = self.out.reply(id, &reply);
    }

    /// Whether `id` is taken by a running request or an attached PTY session.
    fn busy(&self, id: u32) -> bool {
        self.running.lock().contains_key(&id)
            || matches!(self.inputs.get(&id), Some(Input::Pty(session)) if session.is_attached_to(self.token, id))
    }

    fn dispatch(&mut self, id: u32, request: Request) -> Result<(), (u32, ErrorReply)> {
        self.agent.wait_for_reseed();
        match request {
            Request::Hello(_) => {
                return Err((
                    id,
                    error(ErrorKind::NotHello, "hello is only the first request"),
                ));
            }
            Request::Ping => self.reply(
                id,
                Ok(Reply::Pong {
                    uptime_ms: self.agent.started.elapsed().as_millis() as u64,
                    sessions: self.agent.sessions.len() as u64,
                }),
            ),
            Request::Signal { target, signal } => self.reply(id, self.signal(target, signal)),
            Request::Stat { path } => self.reply(id, files::stat(&path)),
            Request::List { path } => self.reply(id, files::list(&path)),
            Request::Mkdir {
                path,
                parents,
                mode,
            } => self.reply(id, files::mkdir(&path, parents, mode)),
            Request::Remove { path, recursive } => {
                self.reply(id, files::remove(&path, recursive));
            }
            Request::Rename { from, to } => self.reply(id, files::rename(&from, &to)),
            Request::PtyResize {
                session,
                rows,
                cols,
            } => self.reply(id, self.agent.sessions.resize(session, rows, cols)),
            Request::PtyDetach { session } => {
                self.reply(id, self.agent.sessions.detach(session, self.token))
            }
            Request::PtyClose { session } => self.reply(id, self.agent.sessions.close(session)),
            Request::PtyOpen(_) | Request::PtyAttach { .. } if self.busy(id) => {
                self.reply(id, Err(duplicate(id)));
            }
            Request::PtyOpen(request) => {
                let opened = self.agent.sessions.open(
                    &self.agent.reaper,
                    request,
                    self.token,
                    id,
                    &self.out,
                );
                match opened {
                    Ok(session) => {
                        self.inputs.insert(id, Input::Pty(session));
                    }
                    Err(e) => self.reply(id, Err(e)),
                }
            }
            Request::PtyAttach { session } => {
                match self
                    .agent
                    .sessions
                    .attach(session, self.token, id, &self.out)
                {
                    Ok(session) => {
                        self.inputs.insert(id, Input::Pty(session));
                    }
                    Err(e) => self.reply(id, Err(e)),
                }
            }
            Request::Shutdown { action } => self.shutdown(id, action),
            Request::Exec(request) => {
                let input = request.stdin;
                self.spawn_request(id, input, move |ctx, input| exec::run(ctx, request, input));
            }
            Request::WriteFile(request) => {
                self.spawn_request(id, true, move |_, input| {
                    files::write(&request, input.as_ref())
                });
            }
            Request::ReadFile { path, offset, len } => {
                self.spawn_request(id, false, move |ctx, _| {
                    files::read(ctx, &path, offset, len)
                });
            }
        }
        Ok(())
    }

    /// Runs `handler` on its own thread, with an input queue when `with_input`, and sends its
    /// final reply.
    fn spawn_request<F>(&mut self, id: u32, with_input: bool, handler: F)
    where
        F: FnOnce(&RequestContext, Option<Receiver<Chunk>>) -> Result<Reply, ErrorReply>
            + Send
            + 'static,
    {
        if self.busy(id) {
            self.reply(id, Err(duplicate(id)));
            return;
        }
        // Replaces any route left by a finished request with this id.
        self.inputs.remove(&id);
        let input = with_input.then(|| {
            let (tx, rx) = sync_channel(INPUT_QUEUE);
            self.inputs.insert(id, Input::Queue(tx));
            rx
        });
        self.running.lock().insert(id, None);
        let ctx = RequestContext {
            reaper: Arc::clone(&self.agent.reaper),
            out: Arc::clone(&self.out),
            id,
            running: Arc::clone(&self.running),
        };
        let spawned = thread::Builder::new()
            .name(format!("request-{id}"))
            .spawn(move || {
                // A bug in a handler must not leave the request without its final reply (and
                // its id taken forever).
                let result = panic::catch_unwind(AssertUnwindSafe(|| handler(&ctx, input)))
                    .unwrap_or_else(|_| Err(error(ErrorKind::Io, "the agent's handler failed")));
                // Free the id before the final reply: the host may reuse it as soon as it sees it.
                ctx.running.lock().remove(&ctx.id);
                let _ = ctx.out.reply(ctx.id, &result.unwrap_or_else(Reply::Error));
            });
        if let Err(e) = spawned {
            self.running.lock().remove(&id);
            self.inputs.remove(&id);
            self.reply(id, Err(io_error("starting a request thread", &e)));
        }
    }

    fn input(&mut self, id: u32, chunk: Chunk) {
        match self.inputs.get(&id) {
            Some(Input::Queue(tx)) => {
                let eof = matches!(chunk, Chunk::Eof);
                // Blocks while the request's queue is full; fails when the request has ended.
                if tx.send(chunk).is_err() || eof {
                    self.inputs.remove(&id);
                }
            }
            Some(Input::Pty(session)) => {
                if let Chunk::Data(bytes) = chunk {
                    session.input(self.token, id, &bytes);
                }
            }
            // The request has ended or takes no input.
            None => {}
        }
    }

    fn signal(&self, target: u32, signal: i32) -> Result<Reply, ErrorReply> {
        let pid = self.running.lock().get(&target).copied().flatten();
        let pid = pid.ok_or_else(|| {
            error(
                ErrorKind::NotFound,
                format!("no running exec with id {target}"),
            )
        })?;
        kill_group(pid, signal).map_err(|e| io_error("kill", &e))?;
        Ok(Reply::Ok)
    }

    fn shutdown(&self, id: u32, action: PowerAction) {
        if !self.agent.allow_shutdown {
            self.reply(id, Err(error(ErrorKind::NotInit, "the agent is not PID 1")));
            return;
        }
        self.reply(id, Ok(Reply::Ok));
        if let Err(e) = self.agent.system.power(action) {
            eprintln!("forkvm-agent: {action:?} failed: {e}");
        }
    }

    fn close(mut self) {
        // Dropping the queues closes execs' stdin and aborts unfinished file writes.
        self.inputs.clear();
        for pid in self.running.lock().values().flatten() {
            let _ = kill_group(*pid, libc::SIGKILL);
        }
        self.agent.sessions.detach_connection(self.token);
    }
}

fn duplicate(id: u32) -> ErrorReply {
    error(ErrorKind::DuplicateId, format!("request id {id} is in use"))
}
