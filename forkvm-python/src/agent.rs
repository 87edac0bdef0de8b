//! The guest agent (`forkvm.Agent`), PTY sessions (`forkvm.Pty`) and spawned processes
//! (`forkvm.Process`): commands, files and terminals in a guest running forkvm's Linux image.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkvm_agent_client::{
    Agent, AgentError, Command, ExecOutput, ExitStatus, Process, ProcessEvent, Pty, PtyEvent,
    Stream, WriteOptions,
};
use forkvm_agent_protocol::PowerAction;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::errors::{agent_error, process_closed, pty_closed};
use crate::types::{PyDirEntry, PyExecResult, PyExitStatus, PyFileStat};

/// Seconds (a Python float) as a [`Duration`]; `None` is "no limit".
pub(crate) fn duration(seconds: Option<f64>) -> PyResult<Duration> {
    match seconds {
        None => Ok(Duration::MAX),
        Some(s) => Duration::try_from_secs_f64(s)
            .map_err(|_| PyValueError::new_err(format!("{s} is not a valid timeout in seconds"))),
    }
}

/// A stream's name in Python: `"stdout"` or `"stderr"`.
fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// Locks `m`, going on after a panic in another holder (as `vm.rs` does).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The command `exec` and `spawn` run, from its keyword arguments.
fn command(
    argv: Vec<String>,
    stdin: Option<&[u8]>,
    env: Option<HashMap<String, String>>,
    cwd: Option<String>,
    user: Option<String>,
    clear_env: bool,
    timeout: Option<f64>,
) -> PyResult<Command> {
    if argv.is_empty() {
        return Err(PyValueError::new_err(
            "argv is empty: name a program to run",
        ));
    }
    let mut command = Command::new(argv);
    if clear_env {
        command = command.clear_env();
    }
    for (key, value) in env.unwrap_or_default() {
        command = command.env(key, value);
    }
    if let Some(cwd) = cwd {
        command = command.cwd(cwd);
    }
    if let Some(user) = user {
        command = command.user(user);
    }
    if let Some(stdin) = stdin {
        command = command.stdin(stdin);
    }
    if let Some(timeout) = timeout {
        command = command.timeout(duration(Some(timeout))?);
    }
    Ok(command)
}

/// A connected guest agent (`VM.agent()`): runs commands, moves files and opens terminals in
/// the guest. Every method blocks without holding the GIL.
#[pyclass(module = "forkvm", name = "Agent", frozen)]
pub(crate) struct PyAgent {
    pub(crate) agent: Agent,
}

#[pymethods]
impl PyAgent {
    /// The same agent with another timeout (seconds) for requests other than commands.
    fn with_timeout(&self, timeout: f64) -> PyResult<Self> {
        Ok(Self {
            agent: self.agent.clone().with_timeout(duration(Some(timeout))?),
        })
    }

    /// Whether the connection is still up.
    #[getter]
    fn is_connected(&self) -> bool {
        self.agent.is_connected()
    }

    /// Checks that the agent answers; returns how long it has been up, in seconds.
    fn ping(&self, py: Python<'_>) -> PyResult<f64> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.ping())
            .map(|d| d.as_secs_f64())
            .map_err(agent_error)
    }

    /// Runs `argv` and returns its output and status. `timeout` (seconds) kills the command
    /// and reports it with `timed_out` set; it is not an exception.
    #[pyo3(signature = (argv, *, stdin = None, env = None, cwd = None, user = None, clear_env = false, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        env: Option<HashMap<String, String>>,
        cwd: Option<String>,
        user: Option<String>,
        clear_env: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyExecResult> {
        let command = command(argv, stdin, env, cwd, user, clear_env, timeout)?;
        let agent = self.agent.clone();
        let output = py
            .allow_threads(move || agent.run(&command))
            .map_err(agent_error)?;
        Ok(PyExecResult::new(py, output))
    }

    /// Runs `argv`, calling `on_output(stream, data)` (`stream` is `"stdout"` or `"stderr"`)
    /// with each chunk of its output as the guest produces it; returns how it ended. An
    /// exception from `on_output` is raised once the command has ended.
    #[pyo3(signature = (argv, on_output, *, stdin = None, env = None, cwd = None, user = None, clear_env = false, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn exec_streaming(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        on_output: Py<PyAny>,
        stdin: Option<&[u8]>,
        env: Option<HashMap<String, String>>,
        cwd: Option<String>,
        user: Option<String>,
        clear_env: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyExitStatus> {
        let command = command(argv, stdin, env, cwd, user, clear_env, timeout)?;
        let agent = self.agent.clone();
        let mut failed: Option<PyErr> = None;
        let status = py.allow_threads(|| {
            agent.run_streaming(&command, |stream, bytes| {
                if failed.is_some() {
                    return;
                }
                Python::with_gil(|py| {
                    let chunk = (stream_name(stream), PyBytes::new(py, bytes));
                    if let Err(e) = on_output.call1(py, chunk) {
                        failed = Some(e);
                    }
                });
            })
        });
        let status = status.map_err(agent_error)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(status.into()),
        }
    }

    /// Starts `argv` and returns at once with a `Process`: write its standard input as you go
    /// (a pipe; `stdin` is written first), read its output as it comes, signal it, wait for
    /// it. The options are `exec`'s; `timeout` (seconds) makes the agent kill it when it runs
    /// longer, reported with `timed_out` set.
    #[pyo3(signature = (argv, *, stdin = None, env = None, cwd = None, user = None, clear_env = false, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spawn(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        env: Option<HashMap<String, String>>,
        cwd: Option<String>,
        user: Option<String>,
        clear_env: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyProcess> {
        let command = command(argv, stdin, env, cwd, user, clear_env, timeout)?;
        let agent = self.agent.clone();
        py.allow_threads(move || agent.spawn(&command))
            .map(PyProcess::new)
            .map_err(agent_error)
    }

    /// Writes `data` to the guest file `path` (created with `mode`, else 0o644); returns how
    /// many bytes were written.
    #[pyo3(signature = (path, data, *, append = false, exclusive = false, mode = None))]
    pub(crate) fn write_file(
        &self,
        py: Python<'_>,
        path: String,
        data: &[u8],
        append: bool,
        exclusive: bool,
        mode: Option<u32>,
    ) -> PyResult<u64> {
        let agent = self.agent.clone();
        let options = WriteOptions {
            append,
            exclusive,
            mode,
        };
        py.allow_threads(move || agent.write_file(&path, data, options))
            .map_err(agent_error)
    }

    /// Reads the guest file `path` whole.
    pub(crate) fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let agent = self.agent.clone();
        let bytes = py
            .allow_threads(move || agent.read_file(&path))
            .map_err(agent_error)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Type, size, mode, owner and modification time of the guest path `path`.
    pub(crate) fn stat(&self, py: Python<'_>, path: String) -> PyResult<PyFileStat> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.stat(&path))
            .map(Into::into)
            .map_err(agent_error)
    }

    /// The entries of the guest directory `path`.
    pub(crate) fn list_dir(&self, py: Python<'_>, path: String) -> PyResult<Vec<PyDirEntry>> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.list(&path))
            .map(|entries| entries.into_iter().map(Into::into).collect())
            .map_err(agent_error)
    }

    /// Creates the guest directory `path` (and its parents with `parents`).
    #[pyo3(signature = (path, *, parents = false))]
    fn mkdir(&self, py: Python<'_>, path: String, parents: bool) -> PyResult<()> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.mkdir(&path, parents))
            .map_err(agent_error)
    }

    /// Removes the guest file or (with `recursive`, non-empty) directory `path`.
    #[pyo3(signature = (path, *, recursive = false))]
    fn remove(&self, py: Python<'_>, path: String, recursive: bool) -> PyResult<()> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.remove(&path, recursive))
            .map_err(agent_error)
    }

    /// Renames the guest path `src` to `dst`.
    fn rename(&self, py: Python<'_>, src: String, dst: String) -> PyResult<()> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.rename(&src, &dst))
            .map_err(agent_error)
    }

    /// Opens a PTY session running `argv` on a terminal of `rows` x `cols`.
    #[pyo3(signature = (argv, rows = 24, cols = 80))]
    pub(crate) fn pty(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        rows: u16,
        cols: u16,
    ) -> PyResult<PyPty> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.pty(argv, rows, cols))
            .map(PyPty::new)
            .map_err(agent_error)
    }

    /// Attaches to the PTY session `session` (opened earlier, maybe before a fork); output it
    /// produced meanwhile comes first.
    pub(crate) fn pty_attach(&self, py: Python<'_>, session: u64) -> PyResult<PyPty> {
        let agent = self.agent.clone();
        py.allow_threads(move || agent.pty_attach(session))
            .map(PyPty::new)
            .map_err(agent_error)
    }

    /// Asks the agent to power the guest off (`"poweroff"`) or reboot it (`"reboot"`, which
    /// ends a forkvm VM).
    #[pyo3(signature = (action = "poweroff"))]
    fn shutdown(&self, py: Python<'_>, action: &str) -> PyResult<()> {
        let action = match action {
            "poweroff" => PowerAction::PowerOff,
            "reboot" => PowerAction::Reboot,
            other => {
                return Err(PyValueError::new_err(format!(
                    "shutdown action is \"poweroff\" or \"reboot\", not {other:?}"
                )));
            }
        };
        let agent = self.agent.clone();
        py.allow_threads(move || agent.shutdown(action))
            .map_err(agent_error)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.agent)
    }
}

/// A terminal session in the guest (`VM.pty()`). One call at a time: a `read` waiting in one
/// thread holds up a `write` from another until it returns. Leaving a `with` block (or
/// `close()`) ends the session; `detach()` lets it run on for a later `pty_attach`. Either way
/// the handle then holds nothing: later calls raise `ClosedError`.
#[pyclass(module = "forkvm", name = "Pty", frozen)]
pub(crate) struct PyPty {
    pty: Mutex<Option<Pty>>,
    session: u64,
}

impl PyPty {
    fn new(pty: Pty) -> Self {
        Self {
            session: pty.session(),
            pty: Mutex::new(Some(pty)),
        }
    }

    /// Runs `f` on the session without the GIL; `ClosedError` once the handle was closed or
    /// detached.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Pty) -> Result<T, forkvm_agent_client::AgentError> + Send,
    ) -> PyResult<T> {
        py.allow_threads(|| {
            let pty = self.pty.lock().unwrap_or_else(|e| e.into_inner());
            match pty.as_ref() {
                Some(pty) => f(pty).map_err(agent_error),
                None => Err(pty_closed()),
            }
        })
    }
}

#[pymethods]
impl PyPty {
    /// The session's id, for `pty_attach`.
    #[getter]
    fn session(&self) -> u64 {
        self.session
    }

    /// Types `data` into the terminal.
    fn write(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        self.with(py, |pty| pty.write(data))
    }

    /// The next output of the terminal (`bytes`), its program's end (an `ExitStatus`), or
    /// `None` if nothing came within `timeout` seconds (`None`: wait as long as it takes).
    #[pyo3(signature = (timeout = None))]
    fn read(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        let timeout = duration(timeout)?;
        Ok(match self.with(py, |pty| pty.read(timeout))? {
            Some(PtyEvent::Output(bytes)) => PyBytes::new(py, &bytes).into_any().unbind(),
            Some(PtyEvent::Exited(status)) => Py::new(py, PyExitStatus::from(status))?.into_any(),
            None => py.None(),
        })
    }

    /// Reads until the output so far contains `needle` (or `timeout` seconds pass, or the
    /// program ends); returns everything read, as text.
    #[pyo3(signature = (needle, timeout = 10.0))]
    fn read_until(&self, py: Python<'_>, needle: &str, timeout: f64) -> PyResult<String> {
        let timeout = duration(Some(timeout))?;
        self.with(py, |pty| pty.read_until(needle, timeout))
    }

    /// Changes the terminal's size (the program gets `SIGWINCH`).
    fn resize(&self, py: Python<'_>, rows: u16, cols: u16) -> PyResult<()> {
        self.with(py, |pty| pty.resize(rows, cols))
    }

    /// Ends the session: kills its program and forgets it; later calls raise `ClosedError`.
    /// Does nothing a second time.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| {
            let pty = self.pty.lock().unwrap_or_else(|e| e.into_inner()).take();
            pty.map_or(Ok(()), |pty| pty.close().map_err(agent_error))
        })
    }

    /// Detaches this handle; the session runs on (attach again with `pty_attach(session)`) and
    /// keeps all output made from the return on. Later calls on this handle raise `ClosedError`;
    /// `close()` then does nothing.
    fn detach(&self, py: Python<'_>) {
        py.allow_threads(|| {
            let pty = self.pty.lock().unwrap_or_else(|e| e.into_inner()).take();
            // Detached either way: a failed request only loses the wait for the agent's answer.
            if let Some(pty) = pty {
                let _ = pty.detach();
            }
        });
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        if lock(&self.pty).is_none() {
            format!("Pty(session={}, closed)", self.session)
        } else {
            format!("Pty(session={})", self.session)
        }
    }
}

/// What a `Process` handle read of its output and not handed out yet, and how it ended.
#[derive(Default)]
struct Output {
    /// Chunks read by a `wait` that timed out, handed out first by the next `read` or `wait`.
    pending: VecDeque<(Stream, Vec<u8>)>,
    /// How the process ended, once read.
    status: Option<ExitStatus>,
}

/// A process running in the guest (`Agent.spawn()`): feed its standard input, read its output
/// as it comes, signal it, wait for it. One thread may wait for its output while another
/// writes its input or signals it; reads from several threads take turns. Leaving a `with`
/// block (or `close()`) kills it if it still runs.
#[pyclass(module = "forkvm", name = "Process", frozen)]
pub(crate) struct PyProcess {
    /// The process, until `close()`; calls clone it, so a waiting read holds up nothing.
    process: Mutex<Option<Arc<Process>>>,
    /// Held by the reading call (`read`, `wait`, iteration) while it waits.
    output: Mutex<Output>,
    /// The process id in the guest (kept after `close()`).
    pid: u32,
}

impl PyProcess {
    fn new(process: Process) -> Self {
        Self {
            pid: process.pid(),
            process: Mutex::new(Some(Arc::new(process))),
            output: Mutex::new(Output::default()),
        }
    }

    /// The process, unless the handle was closed.
    fn get(&self) -> PyResult<Arc<Process>> {
        lock(&self.process).clone().ok_or_else(process_closed)
    }

    /// Runs `f` on the process without the GIL.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Process) -> Result<T, AgentError> + Send,
    ) -> PyResult<T> {
        let process = self.get()?;
        py.allow_threads(move || f(&process).map_err(agent_error))
    }

    /// Whether its end was read (`false` while a read waits for it in another thread).
    fn ended(&self) -> bool {
        self.output.try_lock().is_ok_and(|o| o.status.is_some())
    }

    /// The next event: output read ahead first, the end again once it came, else the process's
    /// next event within `timeout` (`None`: no limit). Without the GIL.
    fn next_event(
        &self,
        py: Python<'_>,
        timeout: Option<Duration>,
    ) -> PyResult<Option<ProcessEvent>> {
        let process = self.get()?;
        py.allow_threads(move || {
            let mut output = lock(&self.output);
            if let Some((stream, bytes)) = output.pending.pop_front() {
                return Ok(Some(ProcessEvent::Output(stream, bytes)));
            }
            if let Some(status) = &output.status {
                return Ok(Some(ProcessEvent::Exited(*status)));
            }
            let event = process.next(timeout).map_err(agent_error)?;
            if let Some(ProcessEvent::Exited(status)) = &event {
                output.status = Some(*status);
            }
            Ok(event)
        })
    }
}

/// An output event as Python sees it: `(stream, bytes)` or an `ExitStatus`.
fn event_to_py(py: Python<'_>, event: ProcessEvent) -> PyResult<PyObject> {
    Ok(match event {
        ProcessEvent::Output(stream, bytes) => (stream_name(stream), PyBytes::new(py, &bytes))
            .into_pyobject(py)?
            .into_any()
            .unbind(),
        ProcessEvent::Exited(status) => Py::new(py, PyExitStatus::from(status))?.into_any(),
    })
}

#[pymethods]
impl PyProcess {
    /// The process id in the guest.
    #[getter]
    fn pid(&self) -> u32 {
        self.pid
    }

    /// Writes `data` to its standard input.
    fn write_stdin(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        self.with(py, |process| process.write_stdin(data))
    }

    /// Closes its standard input (it reads end-of-file).
    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, Process::close_stdin)
    }

    /// Sends `signal` (a number, e.g. `signal.SIGTERM`) to its process group.
    fn signal(&self, py: Python<'_>, signal: i32) -> PyResult<()> {
        self.with(py, |process| process.signal(signal))
    }

    /// Kills it (`SIGKILL` to its process group).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, Process::kill)
    }

    /// Its next event: a chunk of output as `(stream, bytes)` (`stream` is `"stdout"` or
    /// `"stderr"`), its end as an `ExitStatus` (again at every later call), or `None` if
    /// nothing came within `timeout` seconds (`None`: wait as long as it takes).
    #[pyo3(signature = (timeout = None))]
    fn read(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        let timeout = timeout.map(|t| duration(Some(t))).transpose()?;
        match self.next_event(py, timeout)? {
            Some(event) => event_to_py(py, event),
            None => Ok(py.None()),
        }
    }

    /// Waits for it to end and returns its output not read yet and its status, as `exec`
    /// does. If it has not ended within `timeout` seconds (`None`: no limit), raises
    /// `TimedOutError` and keeps what it read for the next `read` or `wait`.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyExecResult> {
        let timeout = timeout.map(|t| duration(Some(t))).transpose()?;
        let process = self.get()?;
        let output = py.allow_threads(move || {
            let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
            let mut output = lock(&self.output);
            let mut read: Vec<(Stream, Vec<u8>)> = output.pending.drain(..).collect();
            let status = loop {
                if let Some(status) = output.status {
                    break status;
                }
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                match process.next(left) {
                    Ok(Some(ProcessEvent::Output(stream, bytes))) => read.push((stream, bytes)),
                    Ok(Some(ProcessEvent::Exited(status))) => output.status = Some(status),
                    Ok(None) => {
                        output.pending.extend(read);
                        return Err(AgentError::TimedOut);
                    }
                    Err(e) => {
                        output.pending.extend(read);
                        return Err(e);
                    }
                }
            };
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            for (stream, bytes) in read {
                match stream {
                    Stream::Stdout => stdout.extend_from_slice(&bytes),
                    Stream::Stderr => stderr.extend_from_slice(&bytes),
                }
            }
            Ok(ExecOutput {
                stdout,
                stderr,
                status,
            })
        });
        Ok(PyExecResult::new(py, output.map_err(agent_error)?))
    }

    /// Ends the handle: kills the process if it has not ended and forgets it; later calls raise
    /// `ClosedError`. Does nothing a second time.
    fn close(&self, py: Python<'_>) {
        let process = lock(&self.process).take();
        py.allow_threads(move || {
            let Some(process) = process else { return };
            // Dropping the handle closes its connection, which makes the agent kill it; a read
            // waiting in another thread holds the connection, so the kill is asked for too (an
            // error only says it ended or the connection did). A read holding the output lock
            // waits for the process, which has not ended then.
            if !self.ended() {
                let _ = process.kill();
            }
            drop(process);
        });
    }

    /// Iterating yields its output as `(stream, bytes)` chunks until it ends (then `wait()`
    /// returns its status at once).
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyObject>> {
        match self.next_event(py, None)? {
            Some(ProcessEvent::Output(stream, bytes)) => {
                event_to_py(py, ProcessEvent::Output(stream, bytes)).map(Some)
            }
            Some(ProcessEvent::Exited(_)) | None => Ok(None),
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        let closed = lock(&self.process).is_none();
        match (closed, self.ended()) {
            (true, _) => format!("Process(pid={}, closed)", self.pid),
            (false, true) => format!("Process(pid={}, ended)", self.pid),
            (false, false) => format!("Process(pid={})", self.pid),
        }
    }
}
