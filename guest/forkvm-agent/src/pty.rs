//! PTY sessions. They live in a [`Registry`] independent of connections: a session runs while
//! no connection is attached (its output kept, up to [`PTY_BACKLOG`] bytes, for the next attach),
//! and any connection can attach to it by its id, taking it over from a connection still
//! attached.
//!
//! A session's process is a session leader with the PTY as its controlling terminal. Closing a
//! session SIGKILLs its process group and the terminal's foreground process group; the kernel
//! then hangs up the rest. A session whose process has exited stays (with its status) until it
//! is closed.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;

use forkvm_agent_protocol::{
    ErrorKind, ErrorReply, ExitStatus, Kind, PTY_BACKLOG, PtyOpenRequest, Reply,
};

use crate::reaper::{Reaper, kill_group};
use crate::request::Out;
use crate::{error, exec, io_error};

/// Size of the reads from a PTY (and so of its largest output frames).
const PTY_READ: usize = 64 * 1024;

/// All PTY sessions, by id.
#[derive(Default)]
pub struct Registry {
    last_id: AtomicU64,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
}

/// One PTY session.
pub struct Session {
    id: u64,
    pid: libc::pid_t,
    master: File,
    state: Mutex<State>,
}

struct State {
    attached: Option<Attachment>,
    backlog: VecDeque<u8>,
    exited: Option<ExitStatus>,
}

/// The connection and request a session's output goes to.
struct Attachment {
    connection: u64,
    id: u32,
    out: Arc<Out>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, session: u64) -> Result<Arc<Session>, ErrorReply> {
        self.lock()
            .get(&session)
            .cloned()
            .ok_or_else(|| error(ErrorKind::NotFound, format!("no PTY session {session}")))
    }

    /// The number of sessions.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Opens a session attached to request `id` of `connection`, sending `PtyOpened` on `out`.
    pub(crate) fn open(
        &self,
        reaper: &Reaper,
        request: PtyOpenRequest,
        connection: u64,
        id: u32,
        out: &Arc<Out>,
    ) -> Result<Arc<Session>, ErrorReply> {
        let mut env = request.env;
        if !env.iter().any(|(key, _)| key == "TERM") {
            env.push(("TERM".into(), "xterm-256color".into()));
        }
        let launch = exec::Launch {
            argv: &request.argv,
            env: &env,
            clear_env: false,
            cwd: request.cwd.as_deref(),
            user: request.user.as_deref(),
        };
        let mut command = launch.command()?;
        let (master, slave) =
            open_pty(request.rows, request.cols).map_err(|e| io_error("opening a PTY", &e))?;
        let stdio = || {
            slave
                .try_clone()
                .map(Stdio::from)
                .map_err(|e| io_error("opening a PTY", &e))
        };
        command.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed; setsid and ioctl are system calls.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (child, exited) = reaper
            .spawn(&mut command)
            .map_err(|e| launch.spawn_error(&e))?;
        // The parent's copies of the terminal's slave side go, so that the master reads EIO once
        // the session's processes have closed theirs.
        drop(command);
        drop(slave);
        let session = Arc::new(Session {
            id: self.last_id.fetch_add(1, Ordering::Relaxed) + 1,
            // Pids are positive and below 2^22.
            pid: child.id() as libc::pid_t,
            master,
            state: Mutex::new(State {
                attached: Some(Attachment {
                    connection,
                    id,
                    out: Arc::clone(out),
                }),
                backlog: VecDeque::new(),
                exited: None,
            }),
        });
        // Held until PtyOpened is sent, so that no output overtakes it.
        let state = session.lock();
        let pump = Arc::clone(&session);
        if let Err(e) = thread::Builder::new()
            .name(format!("pty-{}", session.id))
            .spawn(move || pump.pump(&exited))
        {
            let _ = kill_group(session.pid, libc::SIGKILL);
            return Err(io_error("starting a PTY thread", &e));
        }
        self.lock().insert(session.id, Arc::clone(&session));
        let _ = out.reply(
            id,
            &Reply::PtyOpened {
                session: session.id,
                pid: child.id(),
            },
        );
        drop(state);
        Ok(session)
    }

    /// Attaches `session` to request `id` of `connection`: sends `PtyAttached`, the backlog and,
    /// if its process has ended, `PtyExited`.
    pub(crate) fn attach(
        &self,
        session: u64,
        connection: u64,
        id: u32,
        out: &Arc<Out>,
    ) -> Result<Arc<Session>, ErrorReply> {
        let session = self.get(session)?;
        let mut state = session.lock();
        state.attached = Some(Attachment {
            connection,
            id,
            out: Arc::clone(out),
        });
        let backlog: Vec<u8> = state.backlog.drain(..).collect();
        let sent = out
            .reply(
                id,
                &Reply::PtyAttached {
                    session: session.id,
                },
            )
            .and_then(|()| out.bytes(Kind::Data, id, &backlog));
        if let (Ok(()), Some(status)) = (&sent, state.exited) {
            let _ = out.reply(
                id,
                &Reply::PtyExited {
                    session: session.id,
                    status,
                },
            );
        }
        if sent.is_err() {
            state.attached = None;
            state.backlog = backlog.into();
        }
        drop(state);
        Ok(session)
    }

    /// Sets a session's terminal size (its foreground processes get SIGWINCH).
    pub(crate) fn resize(&self, session: u64, rows: u16, cols: u16) -> Result<Reply, ErrorReply> {
        let session = self.get(session)?;
        set_size(&session.master, rows, cols).map_err(|e| io_error("TIOCSWINSZ", &e))?;
        Ok(Reply::Ok)
    }

    /// Detaches a session if it is attached to `connection` (not if another connection took it
    /// over); its output goes to the backlog from now on.
    pub(crate) fn detach(&self, session: u64, connection: u64) -> Result<Reply, ErrorReply> {
        self.get(session)?.detach_from(connection);
        Ok(Reply::Ok)
    }

    /// Kills a session's processes and forgets it.
    pub(crate) fn close(&self, session: u64) -> Result<Reply, ErrorReply> {
        let session = self
            .lock()
            .remove(&session)
            .ok_or_else(|| error(ErrorKind::NotFound, format!("no PTY session {session}")))?;
        let mut state = session.lock();
        state.attached = None;
        if state.exited.is_none() {
            let mut foreground: libc::pid_t = 0;
            // SAFETY: TIOCGPGRP writes one pid_t to `foreground`; the fd is open.
            let rc = unsafe {
                libc::ioctl(session.master.as_raw_fd(), libc::TIOCGPGRP, &mut foreground)
            };
            if rc == 0 && foreground > 0 {
                let _ = kill_group(foreground, libc::SIGKILL);
            }
            kill_group(session.pid, libc::SIGKILL).map_err(|e| io_error("kill", &e))?;
        }
        Ok(Reply::Ok)
    }

    /// Detaches every session attached to `connection` (which has closed).
    pub(crate) fn detach_connection(&self, connection: u64) {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        for session in sessions {
            session.detach_from(connection);
        }
    }
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Detaches the session if it is attached to `connection`.
    fn detach_from(&self, connection: u64) {
        let mut state = self.lock();
        if state
            .attached
            .as_ref()
            .is_some_and(|a| a.connection == connection)
        {
            state.attached = None;
        }
    }

    /// Whether the session is attached to request `id` of `connection`.
    pub(crate) fn is_attached_to(&self, connection: u64, id: u32) -> bool {
        self.lock()
            .attached
            .as_ref()
            .is_some_and(|a| a.connection == connection && a.id == id)
    }

    /// Writes input from request `id` of `connection`, if the session is still attached to it.
    pub(crate) fn input(&self, connection: u64, id: u32, bytes: &[u8]) {
        if self.is_attached_to(connection, id) {
            // A session whose processes are gone takes no input; nothing to report.
            let _ = (&self.master).write_all(bytes);
        }
    }

    /// Sends output to the attached connection, or keeps it in the backlog.
    fn output(&self, bytes: &[u8]) {
        let mut state = self.lock();
        if let Some(attachment) = &state.attached {
            if attachment
                .out
                .bytes(Kind::Data, attachment.id, bytes)
                .is_ok()
            {
                return;
            }
            state.attached = None;
        }
        state.backlog.extend(bytes);
        let excess = state.backlog.len().saturating_sub(PTY_BACKLOG);
        state.backlog.drain(..excess);
    }

    /// Copies the terminal's output until its processes have all closed it, then records how the
    /// session's process ended.
    fn pump(&self, exited: &Receiver<ExitStatus>) {
        let mut buf = vec![0u8; PTY_READ];
        loop {
            match (&self.master).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.output(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: every slave side is closed.
                Err(_) => break,
            }
        }
        let status = exited.recv().unwrap_or_default();
        let mut state = self.lock();
        state.exited = Some(status);
        if let Some(attachment) = &state.attached {
            let reply = Reply::PtyExited {
                session: self.id,
                status,
            };
            if attachment.out.reply(attachment.id, &reply).is_err() {
                state.attached = None;
            }
        }
    }
}

/// Opens a PTY pair of the given size; both ends close on exec.
fn open_pty(rows: u16, cols: u16) -> io::Result<(File, File)> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: grantpt and unlockpt only act on the open master fd.
    if unsafe { libc::grantpt(fd) } < 0 || unsafe { libc::unlockpt(fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` has the length passed; the fd is open.
    let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(OsStr::from_bytes(path.to_bytes()))?;
    set_size(&master, rows, cols)?;
    Ok((master, slave))
}

fn set_size(master: &File, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize; the fd is open.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
