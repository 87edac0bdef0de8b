//! `forkvm_process`: a command spawned in the guest through its agent, with its input, output,
//! signals and end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forkvm_agent_client::{ExecOutput, Process, ProcessEvent, Stream};

use crate::agent::{
    AGENTS, command_arg, forkvm_agent, forkvm_command, forkvm_exec_output, forkvm_exit_status,
    forkvm_stream, put_output,
};
use crate::error::{ffi, forkvm_status};
use crate::handle::Registry;
use crate::{bytes_arg, forkvm_bytes, out_arg};

/// A command running in the guest (`forkvm_agent_client::Process`), started by `forkvm_agent_spawn`
/// on a connection of its own; freed by `forkvm_process_free`. Thread-safe: one thread may read
/// its output (`forkvm_process_read`, `forkvm_process_wait`) while others write its input or
/// signal it (two readers at once each get some of the events).
pub struct forkvm_process {
    _private: [u8; 0],
}

/// A spawned process and whether a read saw it end (then freeing it needs no kill).
struct Spawned {
    process: Process,
    exited: AtomicBool,
}

static PROCESSES: Registry<Spawned> = Registry::new("forkvm_process");

/// Starts `command` (as `forkvm_agent_run` takes it) and returns at once with a handle to it in
/// `*out`. Its standard input is a pipe: what `stdin_data` gives (with `has_stdin`) is written
/// first, then `forkvm_process_write_stdin` writes more and `forkvm_process_close_stdin` ends it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_agent_spawn(
    agent: *const forkvm_agent,
    command: *const forkvm_command,
    out: *mut *mut forkvm_process,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(out, "out")?;
        let command = command_arg(command)?;
        let process = AGENTS.get(agent)?.spawn(&command)?;
        *out = PROCESSES.insert(Spawned {
            process,
            exited: AtomicBool::new(false),
        });
        Ok(())
    })
}

/// The process's id in the guest, into `*pid`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_pid(
    process: *const forkvm_process,
    pid: *mut u32,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(pid, "pid")?;
        *out = PROCESSES.get(process)?.process.pid();
        Ok(())
    })
}

/// Writes `len` bytes of `input` to the process's standard input.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_write_stdin(
    process: *const forkvm_process,
    input: *const u8,
    len: usize,
) -> forkvm_status {
    ffi(|| {
        let input = bytes_arg(input, len, "input")?;
        Ok(PROCESSES.get(process)?.process.write_stdin(input)?)
    })
}

/// Closes the process's standard input (it reads end-of-file).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_close_stdin(
    process: *const forkvm_process,
) -> forkvm_status {
    ffi(|| Ok(PROCESSES.get(process)?.process.close_stdin()?))
}

/// Sends `signal` (e.g. `SIGTERM`) to the process's process group.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_signal(
    process: *const forkvm_process,
    signal: i32,
) -> forkvm_status {
    ffi(|| Ok(PROCESSES.get(process)?.process.signal(signal)?))
}

/// Kills the process (`SIGKILL` to its process group); its end still comes as an event.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_kill(process: *const forkvm_process) -> forkvm_status {
    ffi(|| Ok(PROCESSES.get(process)?.process.kill()?))
}

/// What `forkvm_process_read` got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum forkvm_process_event_kind {
    /// Nothing within the timeout.
    FORKVM_PROCESS_NOTHING = 0,
    /// A chunk of output, in `output`, from `stream`.
    FORKVM_PROCESS_OUTPUT = 1,
    /// The process ended, as `status` says (its last event: reading on fails).
    FORKVM_PROCESS_EXITED = 2,
}

/// An event of a spawned process. Free with `forkvm_process_event_free`.
#[repr(C)]
#[derive(Debug)]
pub struct forkvm_process_event {
    /// What happened.
    pub kind: forkvm_process_event_kind,
    /// Which stream `output` came from, for `FORKVM_PROCESS_OUTPUT` (else
    /// `FORKVM_STREAM_STDOUT`).
    pub stream: forkvm_stream,
    /// The output, for `FORKVM_PROCESS_OUTPUT`.
    pub output: forkvm_bytes,
    /// How the process ended, for `FORKVM_PROCESS_EXITED`.
    pub status: forkvm_exit_status,
}

/// The process's next chunk of output or its end, waiting at most `timeout_ms`, into `*event`
/// (free it with `forkvm_process_event_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_read(
    process: *const forkvm_process,
    timeout_ms: u64,
    event: *mut forkvm_process_event,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(event, "event")?;
        let spawned = PROCESSES.get(process)?;
        let got = spawned
            .process
            .next(Some(Duration::from_millis(timeout_ms)))?;
        let mut event = forkvm_process_event {
            kind: forkvm_process_event_kind::FORKVM_PROCESS_NOTHING,
            stream: forkvm_stream::FORKVM_STREAM_STDOUT,
            output: forkvm_bytes::EMPTY,
            status: forkvm_exit_status::default(),
        };
        match got {
            None => {}
            Some(ProcessEvent::Output(stream, bytes)) => {
                event.kind = forkvm_process_event_kind::FORKVM_PROCESS_OUTPUT;
                event.stream = stream.into();
                event.output = forkvm_bytes::from_vec(bytes);
            }
            Some(ProcessEvent::Exited(status)) => {
                spawned.exited.store(true, Ordering::Relaxed);
                event.kind = forkvm_process_event_kind::FORKVM_PROCESS_EXITED;
                event.status = status.into();
            }
        }
        *out = event;
        Ok(())
    })
}

/// Frees an event's output and resets it; NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_event_free(event: *mut forkvm_process_event) {
    // SAFETY: NULL or a valid `forkvm_process_event`.
    if let Some(event) = unsafe { event.as_mut() } {
        event.output.release();
        event.kind = forkvm_process_event_kind::FORKVM_PROCESS_NOTHING;
    }
}

/// Waits (without a limit) for the process to end and puts the output it printed since the
/// last read and how it ended in `*output`, as `forkvm_agent_run` does (free it with
/// `forkvm_exec_output_free`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_wait(
    process: *const forkvm_process,
    output: *mut forkvm_exec_output,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(output, "output")?;
        let spawned = PROCESSES.get(process)?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = spawned.process.wait(|stream, bytes| match stream {
            Stream::Stdout => stdout.extend_from_slice(bytes),
            Stream::Stderr => stderr.extend_from_slice(bytes),
        })?;
        spawned.exited.store(true, Ordering::Relaxed);
        put_output(
            out,
            ExecOutput {
                stdout,
                stderr,
                status,
            },
        );
        Ok(())
    })
}

/// Frees the handle, killing the process first if no read saw it end (a kill that fails is
/// ignored: closing its connection makes the agent kill it too); NULL is ignored. A read or
/// wait on another thread then returns with the process's end.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_process_free(process: *mut forkvm_process) -> forkvm_status {
    ffi(|| {
        if !process.is_null() {
            let spawned = PROCESSES.remove(process)?;
            if !spawned.exited.load(Ordering::Relaxed) {
                let _ = spawned.process.kill();
            }
        }
        Ok(())
    })
}
