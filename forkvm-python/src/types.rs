//! Plain result objects: how a guest ended, a VM's identity and devices, a command's result,
//! file metadata.

use forkvm::Identity;
use forkvm::{CrashReason, DeviceInfo, GuestExit};
use forkvm_agent_client::{AgentDirEntry, AgentFileStat, ExecOutput, ExitStatus};
use forkvm_agent_protocol::FileType;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::limits::PyRateLimit;

/// How a guest ended (`VM.wait()`, `VM.stop()`, `VM.exit`).
///
/// `kind` is one of `"powered_off"` (with `status` from the debug-exit port, if any),
/// `"reset"`, `"triple_fault"` (with `vcpu`), `"crashed"` (with `vcpu` and `reason`) and
/// `"stopped"` (the host stopped it); `str()` describes it.
#[pyclass(module = "forkvm", name = "Exit", frozen, eq)]
#[derive(PartialEq)]
pub(crate) struct PyExit {
    /// How it ended.
    #[pyo3(get)]
    kind: &'static str,
    /// The debug-exit status of a `"powered_off"` guest.
    #[pyo3(get)]
    status: Option<u32>,
    /// The vCPU of a `"triple_fault"` or `"crashed"` guest.
    #[pyo3(get)]
    vcpu: Option<u32>,
    /// What KVM reported for a `"crashed"` guest.
    #[pyo3(get)]
    reason: Option<String>,
    message: String,
}

impl From<GuestExit> for PyExit {
    fn from(exit: GuestExit) -> Self {
        let message = exit.to_string();
        let (kind, status, vcpu, reason) = match exit {
            GuestExit::PoweredOff { status } => ("powered_off", status, None, None),
            GuestExit::Reset => ("reset", None, None, None),
            GuestExit::TripleFault { vcpu, .. } => ("triple_fault", None, Some(vcpu), None),
            GuestExit::Crashed(crash) => {
                let reason = match &crash.reason {
                    CrashReason::GuestCrash => "guest crash".to_owned(),
                    other => format!("{other:?}"),
                };
                ("crashed", None, Some(crash.vcpu), Some(reason))
            }
            GuestExit::Stopped => ("stopped", None, None, None),
            // An exit newer than this binding: not a clean end; the message says what.
            _ => ("crashed", None, None, None),
        };
        Self {
            kind,
            status,
            vcpu,
            reason,
            message,
        }
    }
}

#[pymethods]
impl PyExit {
    fn __str__(&self) -> &str {
        &self.message
    }

    fn __repr__(&self) -> String {
        match self.status {
            Some(status) => format!("Exit(kind={:?}, status={status})", self.kind),
            None => format!("Exit(kind={:?})", self.kind),
        }
    }
}

/// Who a VM is: `generation` 0 when booted, one more than its source's for a fork child or a
/// restored snapshot, and a random 16-byte `id`.
#[pyclass(module = "forkvm", name = "Identity", frozen, eq)]
#[derive(PartialEq)]
pub(crate) struct PyIdentity {
    #[pyo3(get)]
    generation: u64,
    id: [u8; 16],
}

impl From<Identity> for PyIdentity {
    fn from(identity: Identity) -> Self {
        Self {
            generation: identity.generation,
            id: identity.id,
        }
    }
}

#[pymethods]
impl PyIdentity {
    /// The VM id's 16 bytes.
    #[getter]
    fn id<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.id)
    }

    fn __repr__(&self) -> String {
        let hex: String = self.id.iter().map(|b| format!("{b:02x}")).collect();
        format!("Identity(generation={}, id={hex})", self.generation)
    }
}

/// One virtio device of a VM.
#[pyclass(module = "forkvm", name = "DeviceInfo", frozen, get_all)]
pub(crate) struct PyDeviceInfo {
    /// Virtio device type (2 block, 3 console, 4 entropy, 5 balloon, 19 vsock).
    device_type: u32,
    /// Guest-physical base of its virtio-mmio window.
    mmio_base: u64,
    /// Its interrupt line.
    irq: u32,
    /// The driver's status register.
    status: u32,
    /// The rate limit in force (`VM.set_rate_limit`).
    rate_limit: PyRateLimit,
    /// The limit on what a network or vsock device pushes to the guest
    /// (`VM.set_rx_rate_limit`); `None` for devices without a receive direction.
    rx_rate_limit: Option<PyRateLimit>,
}

impl From<DeviceInfo> for PyDeviceInfo {
    fn from(d: DeviceInfo) -> Self {
        Self {
            device_type: d.kind.virtio_id(),
            mmio_base: d.mmio_base,
            irq: d.irq,
            status: d.status,
            rate_limit: d.rate_limit.into(),
            rx_rate_limit: d.rx_rate_limit.map(Into::into),
        }
    }
}

#[pymethods]
impl PyDeviceInfo {
    fn __repr__(&self) -> String {
        format!(
            "DeviceInfo(device_type={}, mmio_base={:#x}, irq={}, status={:#x}, rate_limit={}, \
             rx_rate_limit={})",
            self.device_type,
            self.mmio_base,
            self.irq,
            self.status,
            self.rate_limit.__repr__(),
            self.rx_rate_limit
                .as_ref()
                .map_or_else(|| "None".to_owned(), PyRateLimit::__repr__)
        )
    }
}

/// How a guest program ended: its `exit_code`, or the `signal` that killed it; `timed_out`
/// when its timeout killed it.
#[pyclass(module = "forkvm", name = "ExitStatus", frozen, get_all, eq)]
#[derive(PartialEq)]
pub(crate) struct PyExitStatus {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
}

impl From<ExitStatus> for PyExitStatus {
    fn from(s: ExitStatus) -> Self {
        Self {
            exit_code: s.code,
            signal: s.signal,
            timed_out: s.timed_out,
        }
    }
}

#[pymethods]
impl PyExitStatus {
    /// Whether it exited with code 0.
    #[getter]
    fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    fn __repr__(&self) -> String {
        format!(
            "ExitStatus(exit_code={}, signal={}, timed_out={})",
            py_opt(self.exit_code),
            py_opt(self.signal),
            if self.timed_out { "True" } else { "False" }
        )
    }
}

/// What a guest command printed and how it ended (`VM.exec()`).
#[pyclass(module = "forkvm", name = "ExecResult", frozen, get_all)]
pub(crate) struct PyExecResult {
    /// Its standard output.
    stdout: Py<PyBytes>,
    /// Its standard error.
    stderr: Py<PyBytes>,
    /// Its exit code, if it exited.
    exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    signal: Option<i32>,
    /// Whether its timeout killed it.
    timed_out: bool,
}

impl PyExecResult {
    pub(crate) fn new(py: Python<'_>, output: ExecOutput) -> Self {
        Self {
            stdout: PyBytes::new(py, &output.stdout).unbind(),
            stderr: PyBytes::new(py, &output.stderr).unbind(),
            exit_code: output.status.code,
            signal: output.status.signal,
            timed_out: output.status.timed_out,
        }
    }
}

#[pymethods]
impl PyExecResult {
    /// Whether it exited with code 0.
    #[getter]
    fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "ExecResult(exit_code={}, signal={}, timed_out={}, stdout={} bytes, stderr={} bytes)",
            py_opt(self.exit_code),
            py_opt(self.signal),
            if self.timed_out { "True" } else { "False" },
            self.stdout.bind(py).as_bytes().len(),
            self.stderr.bind(py).as_bytes().len()
        )
    }
}

fn py_opt(v: Option<i32>) -> String {
    v.map_or_else(|| "None".to_owned(), |v| v.to_string())
}

fn file_type(t: FileType) -> &'static str {
    match t {
        FileType::File => "file",
        FileType::Dir => "dir",
        FileType::Symlink => "symlink",
        FileType::Other => "other",
    }
}

/// A guest path's metadata (`VM.stat()`); `file_type` is `"file"`, `"dir"`, `"symlink"` or
/// `"other"`.
#[pyclass(module = "forkvm", name = "FileStat", frozen, get_all)]
pub(crate) struct PyFileStat {
    file_type: &'static str,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
}

impl From<AgentFileStat> for PyFileStat {
    fn from(s: AgentFileStat) -> Self {
        Self {
            file_type: file_type(s.file_type),
            size: s.size,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            mtime_ns: s.mtime_ns,
        }
    }
}

#[pymethods]
impl PyFileStat {
    fn __repr__(&self) -> String {
        format!(
            "FileStat(file_type={:?}, size={}, mode={:#o})",
            self.file_type, self.size, self.mode
        )
    }
}

/// One entry of a guest directory (`VM.list_dir()`).
#[pyclass(module = "forkvm", name = "DirEntry", frozen, get_all)]
pub(crate) struct PyDirEntry {
    name: String,
    file_type: &'static str,
    size: u64,
}

impl From<AgentDirEntry> for PyDirEntry {
    fn from(e: AgentDirEntry) -> Self {
        Self {
            name: e.name,
            file_type: file_type(e.file_type),
            size: e.size,
        }
    }
}

#[pymethods]
impl PyDirEntry {
    fn __repr__(&self) -> String {
        format!(
            "DirEntry(name={:?}, file_type={:?}, size={})",
            self.name, self.file_type, self.size
        )
    }
}
