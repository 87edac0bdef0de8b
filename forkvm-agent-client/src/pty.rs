//! PTY sessions in the guest: a terminal running a program, which outlives the handle that
//! opened it (drop the handle, [`super::Agent::pty_attach`] later, from any handle).

use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_agent_protocol::{ExitStatus, Kind, Reply, Request};

use super::connection::{Call, Connection};
use super::{Agent, AgentError, program_not_found, unexpected};

/// What [`Pty::read`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PtyEvent {
    /// Output of the terminal.
    Output(Vec<u8>),
    /// The program ended (the session stays until [`Pty::close`]).
    Exited(ExitStatus),
}

/// A handle on a PTY session, on a connection of its own. [`Pty::detach`] or dropping it detaches:
/// the session runs on and keeps its latest output for the next attach.
pub struct Pty {
    agent: Agent,
    session: u64,
    call: Call,
    // Declared after `call`, which holds a reference-counted handle on it too.
    _connection: Arc<Connection>,
}

impl std::fmt::Debug for Pty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pty")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Pty {
    /// Opens or attaches with `request` on `connection`.
    pub(super) fn open(
        agent: Agent,
        connection: Arc<Connection>,
        request: &Request,
    ) -> Result<Self, AgentError> {
        let call = connection.start(request)?;
        let session = match call.reply(agent.deadline()) {
            Ok(Reply::PtyOpened { session, .. } | Reply::PtyAttached { session }) => session,
            Ok(other) => return Err(unexpected(&other)),
            Err(e) => {
                return Err(match request {
                    Request::PtyOpen(open) => program_not_found(e, &open.argv),
                    _ => e,
                });
            }
        };
        Ok(Self {
            agent,
            session,
            call,
            _connection: connection,
        })
    }

    /// The session's id, for [`super::Agent::pty_attach`].
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Types `input` into the terminal.
    pub fn write(&self, input: &[u8]) -> Result<(), AgentError> {
        self.call.send_data(input)
    }

    /// The next output of the terminal, or its program's end; `None` if nothing came within
    /// `timeout`.
    pub fn read(&self, timeout: Duration) -> Result<Option<PtyEvent>, AgentError> {
        let deadline = Instant::now().checked_add(timeout);
        let frame = match self.call.next(deadline) {
            Ok(frame) => frame,
            Err(AgentError::TimedOut) => return Ok(None),
            Err(e) => return Err(e),
        };
        match frame.kind {
            Kind::Data => Ok(Some(PtyEvent::Output(frame.payload))),
            Kind::Control => match frame.decode::<Reply>()? {
                Reply::PtyExited { status, .. } => Ok(Some(PtyEvent::Exited(status))),
                Reply::Error(error) => Err(AgentError::Agent(error)),
                other => Err(unexpected(&other)),
            },
            Kind::Stderr | Kind::Eof => Err(AgentError::Unexpected(format!(
                "{:?} frame from a PTY",
                frame.kind
            ))),
        }
    }

    /// Reads until the output so far contains `needle` (or `timeout` passes, or the program
    /// ends); returns everything read.
    pub fn read_until(&self, needle: &str, timeout: Duration) -> Result<String, AgentError> {
        // `None`: a timeout beyond the clock's range, no limit.
        let deadline = Instant::now().checked_add(timeout);
        let mut text = String::new();
        while !text.contains(needle) {
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            match self.read(left)? {
                Some(PtyEvent::Output(bytes)) => text.push_str(&String::from_utf8_lossy(&bytes)),
                Some(PtyEvent::Exited(_)) | None => break,
            }
        }
        Ok(text)
    }

    /// Changes the terminal's size (the program gets `SIGWINCH`).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.agent.expect_ok(&Request::PtyResize {
            session: self.session,
            rows,
            cols,
        })
    }

    /// Detaches from the session, which runs on and keeps its latest output for the next attach.
    /// Returns once the agent has detached it, so that all output made from then on is kept
    /// (dropping the handle detaches too, without waiting: output the agent sends before it
    /// sees that detach is lost).
    pub fn detach(self) -> Result<(), AgentError> {
        let call = self._connection.start(&Request::PtyDetach {
            session: self.session,
        })?;
        match call.reply(self.agent.deadline())? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Ends the session: kills its program and forgets it.
    pub fn close(self) -> Result<(), AgentError> {
        self.agent.expect_ok(&Request::PtyClose {
            session: self.session,
        })
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // Tells the agent first (a request of its own, not waited for); the connection's close
        // detaches as well, later.
        let _ = self._connection.start(&Request::PtyDetach {
            session: self.session,
        });
    }
}
