//! Commands running in the guest, with a handle to feed, read and signal them ([`Process`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_agent_protocol::{ExitStatus, Kind, Reply, Request};

use super::connection::{Call, Connection};
use super::{AgentError, Command, DEFAULT_REQUEST_TIMEOUT, Stream, program_not_found, unexpected};

/// What a running [`Process`] did next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessEvent {
    /// A chunk of its output.
    Output(Stream, Vec<u8>),
    /// It ended.
    Exited(ExitStatus),
}

/// A command running in the guest ([`Agent::spawn`]). Dropping the handle before the process
/// ends closes its connection, which makes the agent kill it. `Send + Sync`: one thread may wait
/// for its output ([`Process::next`]) while another feeds its input or signals it.
pub struct Process {
    pub(super) call: Call,
    connection: Arc<Connection>,
    pid: u32,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Process {
    /// Sends `command` on `connection` and waits (until `deadline`) for the agent to start it.
    pub(super) fn start(
        connection: Arc<Connection>,
        command: &Command,
        deadline: Option<Instant>,
    ) -> Result<Self, AgentError> {
        let call = connection.start(&Request::Exec(command.request.clone()))?;
        let pid = match call.reply(deadline) {
            Ok(Reply::Started { pid }) => pid,
            Ok(other) => return Err(unexpected(&other)),
            Err(e) => return Err(program_not_found(e, &command.request.argv)),
        };
        Ok(Self {
            call,
            connection,
            pid,
        })
    }

    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Bytes of its output (payload plus [`crate::FRAME_COST`] a frame) received and not read
    /// yet: at most the agent's buffer limit ([`crate::CALL_BUFFER`] unless
    /// [`crate::Agent::with_buffer_limit`] said otherwise) and one frame, or [`crate::OVERCOMMIT`]
    /// times the limit and one frame while a [`Process::signal`] waits. Beyond that the host
    /// stops reading and the guest's writes wait.
    pub fn buffered_bytes(&self) -> usize {
        self.call.buffered()
    }

    /// Writes `input` to its standard input.
    pub fn write_stdin(&self, input: &[u8]) -> Result<(), AgentError> {
        self.call.send_data(input)
    }

    /// Closes its standard input (it reads end-of-file).
    pub fn close_stdin(&self) -> Result<(), AgentError> {
        self.call.send_eof()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to its process group.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let call = self.connection.start(&Request::Signal {
            target: self.call.id(),
            signal,
        })?;
        match call.reply(Instant::now().checked_add(DEFAULT_REQUEST_TIMEOUT))? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Kills it (`SIGKILL` to its process group).
    pub fn kill(&self) -> Result<(), AgentError> {
        self.signal(libc::SIGKILL)
    }

    /// Its next output, or its end; `None` if nothing came within `timeout` (`None`: no limit).
    pub fn next(&self, timeout: Option<Duration>) -> Result<Option<ProcessEvent>, AgentError> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let frame = match self.call.next(deadline) {
                Ok(frame) => frame,
                Err(AgentError::TimedOut) if timeout.is_some() => return Ok(None),
                Err(e) => return Err(e),
            };
            return Ok(Some(match frame.kind {
                Kind::Data => ProcessEvent::Output(Stream::Stdout, frame.payload),
                Kind::Stderr => ProcessEvent::Output(Stream::Stderr, frame.payload),
                Kind::Control => match frame.decode::<Reply>()? {
                    Reply::Exited(status) => ProcessEvent::Exited(status),
                    Reply::Error(error) => return Err(AgentError::Agent(error)),
                    other => return Err(unexpected(&other)),
                },
                Kind::Eof => continue,
            }));
        }
    }

    /// Hands `output` everything it prints until it ends; returns how it ended.
    pub fn wait(&self, mut output: impl FnMut(Stream, &[u8])) -> Result<ExitStatus, AgentError> {
        loop {
            // The agent enforces the command's timeout; the host waits as long as it takes.
            match self.next(None)? {
                Some(ProcessEvent::Output(stream, bytes)) => output(stream, &bytes),
                Some(ProcessEvent::Exited(status)) => return Ok(status),
                None => {}
            }
        }
    }
}
