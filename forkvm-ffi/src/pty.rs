//! `forkvm_pty`: a PTY session in the guest through its agent (open, attach, write, read, resize,
//! close).

use std::ffi::c_char;
use std::sync::Mutex;
use std::time::Duration;

use forkvm_agent_client::{Pty, PtyEvent};

use crate::agent::{AGENTS, forkvm_agent, forkvm_exit_status};
use crate::error::{ffi, forkvm_status};
use crate::handle::Registry;
use crate::{bytes_arg, forkvm_bytes, out_arg, str_array_arg};

/// A PTY session in the guest (`forkvm_agent_client::Pty`): a terminal running a program, on a
/// connection of its own. `forkvm_pty_free` detaches (the session runs on; attach again with
/// `forkvm_agent_pty_attach`); `forkvm_pty_close` ends it. Calls on one handle take turns (a
/// read waiting for output holds up a write on another thread: read with short timeouts).
pub struct forkvm_pty {
    _private: [u8; 0],
}

/// A `Pty` is not `Sync`: calls on one PTY handle take turns.
static PTYS: Registry<Mutex<Pty>> = Registry::new("forkvm_pty");

fn lock(pty: &std::sync::Arc<Mutex<Pty>>) -> std::sync::MutexGuard<'_, Pty> {
    pty.lock().unwrap_or_else(|e| e.into_inner())
}

/// Opens a PTY session running `argv` (NULL-terminated) on a `rows` × `cols` terminal, into
/// `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_pty(
    agent: *const forkvm_agent,
    argv: *const *const c_char,
    rows: u16,
    cols: u16,
    out: *mut *mut forkvm_pty,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let argv = str_array_arg(argv, "argv")?;
        *out = PTYS.insert(Mutex::new(AGENTS.get(agent)?.pty(argv, rows, cols)?));
        Ok(())
    })
}

/// Attaches to the PTY session `session` (output it produced meanwhile comes first), into
/// `*out`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_pty_attach(
    agent: *const forkvm_agent,
    session: u64,
    out: *mut *mut forkvm_pty,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        *out = PTYS.insert(Mutex::new(AGENTS.get(agent)?.pty_attach(session)?));
        Ok(())
    })
}

/// The session's id (for `forkvm_agent_pty_attach`), into `*session`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_session(
    pty: *const forkvm_pty,
    session: *mut u64,
) -> forkvm_status {
    ffi(|| {
        *out_arg(session, "session")? = lock(&PTYS.get(pty)?).session();
        Ok(())
    })
}

/// Types `len` bytes of `input` into the terminal.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_write(
    pty: *const forkvm_pty,
    input: *const u8,
    len: usize,
) -> forkvm_status {
    ffi(|| {
        let input = bytes_arg(input, len, "input")?;
        Ok(lock(&PTYS.get(pty)?).write(input)?)
    })
}

/// What `forkvm_pty_read` got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_pty_event_kind {
    /// Nothing within the timeout.
    FORKVM_PTY_NOTHING = 0,
    /// Terminal output, in `output`.
    FORKVM_PTY_OUTPUT = 1,
    /// The program ended, as `status` says (the session stays until closed).
    FORKVM_PTY_EXITED = 2,
}

/// An event of a PTY session. Free with `forkvm_pty_event_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_pty_event {
    /// What happened.
    pub kind: forkvm_pty_event_kind,
    /// The output, for `FORKVM_PTY_OUTPUT`.
    pub output: forkvm_bytes,
    /// How the program ended, for `FORKVM_PTY_EXITED`.
    pub status: forkvm_exit_status,
}

/// The terminal's next output or its program's end, waiting at most `timeout_ms`, into
/// `*event` (free it with `forkvm_pty_event_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_read(
    pty: *const forkvm_pty,
    timeout_ms: u64,
    event: *mut forkvm_pty_event,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(event, "event")?;
        let got = lock(&PTYS.get(pty)?).read(Duration::from_millis(timeout_ms))?;
        *out = match got {
            None => forkvm_pty_event {
                kind: forkvm_pty_event_kind::FORKVM_PTY_NOTHING,
                output: forkvm_bytes::EMPTY,
                status: forkvm_exit_status::default(),
            },
            Some(PtyEvent::Output(bytes)) => forkvm_pty_event {
                kind: forkvm_pty_event_kind::FORKVM_PTY_OUTPUT,
                output: forkvm_bytes::from_vec(bytes),
                status: forkvm_exit_status::default(),
            },
            Some(PtyEvent::Exited(status)) => forkvm_pty_event {
                kind: forkvm_pty_event_kind::FORKVM_PTY_EXITED,
                output: forkvm_bytes::EMPTY,
                status: status.into(),
            },
        };
        Ok(())
    })
}

/// Frees an event's output and resets it; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_event_free(event: *mut forkvm_pty_event) {
    // SAFETY: NULL or a valid `forkvm_pty_event`.
    if let Some(event) = unsafe { event.as_mut() } {
        event.output.release();
        event.kind = forkvm_pty_event_kind::FORKVM_PTY_NOTHING;
    }
}

/// Changes the terminal's size (the program gets `SIGWINCH`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_resize(
    pty: *const forkvm_pty,
    rows: u16,
    cols: u16,
) -> forkvm_status {
    ffi(|| Ok(lock(&PTYS.get(pty)?).resize(rows, cols)?))
}

/// Ends the session (kills its program) and frees the handle, even when the agent's answer is
/// an error. `FORKVM_ERR_BUSY` (handle kept) while another thread is in a call on it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_close(pty: *mut forkvm_pty) -> forkvm_status {
    ffi(|| {
        let pty = PTYS.take(pty)?;
        Ok(pty
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .close()?)
    })
}

/// Detaches from the session (it runs on) and frees the handle; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_pty_free(pty: *mut forkvm_pty) -> forkvm_status {
    ffi(|| {
        if !pty.is_null() {
            PTYS.remove(pty)?;
        }
        Ok(())
    })
}
