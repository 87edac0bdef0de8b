//! Consoles: `forkvm.ConsoleBuffer`, and the Python values that name a console's output
//! (`ConsoleOutput`) or input (`ConsoleInput`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use forkvm::{ConsoleBuffer, ConsoleInput, ConsoleOutput};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

/// Console output kept in memory (the last `limit` bytes), shared between the VM and Python.
#[pyclass(module = "forkvm", name = "ConsoleBuffer", frozen)]
pub(crate) struct PyConsoleBuffer {
    pub(crate) buffer: ConsoleBuffer,
}

#[pymethods]
impl PyConsoleBuffer {
    #[new]
    #[pyo3(signature = (limit = forkvm::DEFAULT_CONSOLE_BUFFER_LIMIT))]
    fn new(limit: usize) -> Self {
        Self {
            buffer: ConsoleBuffer::with_limit(limit),
        }
    }

    /// What the buffer holds, as text (invalid UTF-8 replaced).
    fn text(&self) -> String {
        self.buffer.text()
    }

    /// A copy of what the buffer holds.
    fn contents<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.buffer.contents())
    }

    /// Empties the buffer and returns what it held.
    fn take<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.buffer.take())
    }

    fn __repr__(&self) -> String {
        format!("ConsoleBuffer({} bytes)", self.buffer.contents().len())
    }
}

/// A console output argument, for parameters whose default (no argument) is standard output
/// while an explicit `None` discards.
pub(crate) struct ConsoleArg(pub(crate) ConsoleOutput);

impl ConsoleArg {
    /// The default: standard output, as in the Rust API.
    pub(crate) fn stdout() -> Self {
        Self(ConsoleOutput::Stdout)
    }
}

impl<'py> FromPyObject<'py> for ConsoleArg {
    fn extract_bound(spec: &Bound<'py, PyAny>) -> PyResult<Self> {
        console_output(Some(spec)).map(Self)
    }
}

/// Where console output goes, from its Python spelling: `None` (discarded), `"stdout"`, a
/// `ConsoleBuffer`, another `str` or an `os.PathLike` (a file, created or truncated), or a
/// callable receiving each chunk as `bytes`.
pub(crate) fn console_output(spec: Option<&Bound<'_, PyAny>>) -> PyResult<ConsoleOutput> {
    let Some(spec) = spec.filter(|s| !s.is_none()) else {
        return Ok(ConsoleOutput::Discard);
    };
    if let Ok(buffer) = spec.downcast::<PyConsoleBuffer>() {
        return Ok(ConsoleOutput::Buffer(buffer.get().buffer.clone()));
    }
    if let Ok(text) = spec.downcast::<PyString>()
        && text.to_cow()? == "stdout"
    {
        return Ok(ConsoleOutput::Stdout);
    }
    if let Ok(path) = spec.extract::<PathBuf>() {
        return Ok(ConsoleOutput::File(path));
    }
    if spec.is_callable() {
        let callback: Py<PyAny> = spec.clone().unbind();
        return Ok(ConsoleOutput::Callback(Box::new(move |bytes: &[u8]| {
            Python::with_gil(|py| {
                let callback = callback.bind(py);
                if let Err(e) = callback.call1((PyBytes::new(py, bytes),)) {
                    // A console callback has no caller to raise to: Python's unraisable hook
                    // reports it (a warning on stderr by default) and the VM goes on.
                    e.write_unraisable(py, Some(callback));
                }
            })
        })));
    }
    Err(PyTypeError::new_err(format!(
        "a console is None, \"stdout\", a ConsoleBuffer, a path or a callable taking bytes, \
         not {}",
        spec.get_type().name()?
    )))
}

/// Where console input comes from: `None` (no input), `"stdin"`, a file descriptor or an
/// object with `fileno()` (duplicated: the caller keeps its own).
pub(crate) fn console_input(spec: Option<&Bound<'_, PyAny>>) -> PyResult<Option<ConsoleInput>> {
    let Some(spec) = spec.filter(|s| !s.is_none()) else {
        return Ok(None);
    };
    if let Ok(text) = spec.downcast::<PyString>()
        && text.to_cow()? == "stdin"
    {
        return Ok(Some(ConsoleInput::Stdin));
    }
    let fd = if let Ok(fd) = spec.extract::<i32>() {
        fd
    } else if spec.hasattr("fileno")? {
        spec.call_method0("fileno")?.extract::<i32>()?
    } else {
        return Err(PyTypeError::new_err(format!(
            "console input is None, \"stdin\", a file descriptor or an object with fileno(), \
             not {}",
            spec.get_type().name()?
        )));
    };
    let dup: i32 = spec
        .py()
        .import("os")?
        .call_method1("dup", (fd,))?
        .extract()?;
    // SAFETY: `os.dup` just created `dup` and returned it to us alone; nothing else closes it.
    Ok(Some(ConsoleInput::Fd(unsafe { OwnedFd::from_raw_fd(dup) })))
}
