//! `forkvm.VM` and `Child`, how a fork child or restored VM reaches the host.

use forkvm_agent_client::VmAgentExt;
use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use forkvm::{BalloonConfig, Child, DiskConfig, LoadOptions, Vm, VmBuilder, VsockConfig};
use forkvm_agent_client::DEFAULT_REQUEST_TIMEOUT;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::agent::{PyAgent, PyProcess, PyPty, duration};
use crate::console::{ConsoleArg, console_input, console_output};
use crate::devices::{PyBalloon, PyBalloonHandle, PyDisk};
use crate::errors::{agent_error, closed, vm_error};
use crate::limits::{PyRateLimit, rate_limit, seccomp_policy_arg};
use crate::network::{self, PyNetwork};
use crate::types::{PyDeviceInfo, PyDirEntry, PyExecResult, PyExit, PyFileStat, PyIdentity};

/// Every VM this process made, so that interpreter exit can stop those still running
/// ([`stop_all`], registered with `atexit` by the package) before their console callbacks
/// could reach a finalized interpreter.
static LIVE: Mutex<Vec<Weak<Vm>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops every VM of this process that is still running (called at interpreter exit).
#[pyfunction]
pub(crate) fn stop_all(py: Python<'_>) {
    let vms: Vec<Arc<Vm>> = lock(&LIVE).drain(..).filter_map(|w| w.upgrade()).collect();
    py.allow_threads(move || {
        for vm in vms {
            vm.stop();
        }
    });
}

/// Waits up to `timeout` seconds until what closed VMs and forks let go of (KVM VMs, memory) is
/// released on forkvm's background threads and those threads have ended; says whether it was.
/// For shutdown paths and tests that count threads or fds.
#[pyfunction]
#[pyo3(signature = (timeout = 60.0))]
pub(crate) fn wait_for_releases(py: Python<'_>, timeout: f64) -> bool {
    let timeout = std::time::Duration::try_from_secs_f64(timeout.max(0.0))
        .unwrap_or(std::time::Duration::MAX);
    py.allow_threads(move || forkvm::wait_for_releases(timeout))
}

/// How one child of a fork (or a restored VM) reaches the host: its serial console and input,
/// the host ends of its virtio consoles (each a console output, or an `(output, input)` pair)
/// and its vsock Unix socket; its own `network` (default: like its source's, with the policy in
/// force, no published ports).
#[pyclass(module = "forkvm", name = "Child", frozen)]
pub(crate) struct PyChild {
    console: Option<Py<PyAny>>,
    console_input: Option<Py<PyAny>>,
    virtio_consoles: Vec<Py<PyAny>>,
    vsock_uds_path: Option<PathBuf>,
    network: Option<Py<PyNetwork>>,
}

#[pymethods]
impl PyChild {
    #[new]
    #[pyo3(signature = (console = None, *, console_input = None, virtio_consoles = Vec::new(), vsock_uds_path = None, network = None))]
    fn new(
        console: Option<Py<PyAny>>,
        console_input: Option<Py<PyAny>>,
        virtio_consoles: Vec<Py<PyAny>>,
        vsock_uds_path: Option<PathBuf>,
        network: Option<Py<PyNetwork>>,
    ) -> Self {
        Self {
            console,
            console_input,
            virtio_consoles,
            vsock_uds_path,
            network,
        }
    }
}

/// A virtio console's host end: an output, or an `(output, input)` pair.
fn virtio_console(
    spec: &Bound<'_, PyAny>,
) -> PyResult<(forkvm::ConsoleOutput, Option<forkvm::ConsoleInput>)> {
    if let Ok(pair) = spec.downcast::<PyTuple>() {
        if pair.len() != 2 {
            return Err(PyTypeError::new_err(
                "a virtio console is an output or an (output, input) pair",
            ));
        }
        let output = console_output(Some(&pair.get_item(0)?))?;
        return Ok((output, console_input(Some(&pair.get_item(1)?))?));
    }
    Ok((console_output(Some(spec))?, None))
}

/// A `Child` or console output argument (see [`ConsoleArg`]).
pub(crate) struct ChildArg(Child);

impl<'py> FromPyObject<'py> for ChildArg {
    fn extract_bound(spec: &Bound<'py, PyAny>) -> PyResult<Self> {
        child(Some(spec)).map(Self)
    }
}

/// The Rust [`Child`] for a `Child` or a console output spelling.
fn child(spec: Option<&Bound<'_, PyAny>>) -> PyResult<Child> {
    let Some(spec) = spec else {
        return Ok(Child::new(forkvm::ConsoleOutput::Discard));
    };
    let Ok(c) = spec.downcast::<PyChild>() else {
        return Ok(Child::new(console_output(Some(spec))?));
    };
    let (c, py) = (c.get(), spec.py());
    let mut child = Child::new(console_output(c.console.as_ref().map(|o| o.bind(py)))?);
    if let Some(input) = console_input(c.console_input.as_ref().map(|o| o.bind(py)))? {
        child = child.console_input(input);
    }
    for spec in &c.virtio_consoles {
        let (output, input) = virtio_console(spec.bind(py))?;
        child = child.virtio_console(output, input);
    }
    if let Some(path) = &c.vsock_uds_path {
        child = child.vsock_uds_path(path);
    }
    if let Some(network) = &c.network {
        child = child.network(network.get().network.clone());
    }
    Ok(child)
}

/// A virtual machine.
///
/// `VM(kernel, ...)` builds one (nothing runs until `start()`); `with VM(...) as vm:` starts
/// it if it was not started, and stops and closes it at the end of the block. Fork children
/// and restored VMs are running already. Every blocking method releases the GIL; the package
/// (`forkvm/__init__.py`) adds `*_async` methods that await their blocking twin run in a thread
/// (`asyncio.to_thread`).
#[pyclass(module = "forkvm", name = "VM", frozen, weakref)]
pub(crate) struct PyVm {
    vm: Mutex<Option<Arc<Vm>>>,
}

impl PyVm {
    fn wrap(vm: Vm) -> Self {
        let vm = Arc::new(vm);
        let mut live = lock(&LIVE);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&vm));
        Self {
            vm: Mutex::new(Some(vm)),
        }
    }

    /// The VM, unless it was closed.
    fn get(&self) -> PyResult<Arc<Vm>> {
        lock(&self.vm).clone().ok_or_else(closed)
    }

    /// The VM's agent with the default request timeout, as `Agent` methods want it.
    fn default_agent(&self, py: Python<'_>) -> PyResult<PyAgent> {
        self.agent(py, DEFAULT_REQUEST_TIMEOUT.as_secs_f64())
    }
}

impl Drop for PyVm {
    /// A VM collected without `close()` stops here, without the GIL: its vCPU threads may be
    /// waiting for the GIL in a console callback, and stopping joins them.
    fn drop(&mut self) {
        let vm = self.vm.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(vm) = vm {
            Python::with_gil(|py| py.allow_threads(move || drop(vm)));
        }
    }
}

#[pymethods]
impl PyVm {
    /// Builds a VM (validates the configuration, creates the VM, loads the guest).
    ///
    /// `console`: `"stdout"` (default), `None` (discarded), a `ConsoleBuffer`, a path, or a
    /// callable receiving `bytes` (on a thread of forkvm's; an exception it raises goes to
    /// `sys.unraisablehook`). `console_input`: `None`, `"stdin"`, an fd or an object with
    /// `fileno()`. `disks`: paths or `Disk`s. `virtio_consoles`: outputs or `(output, input)`
    /// pairs. `balloon`: `True` or a `Balloon`. `network`: a `Network` (a virtio-net device).
    /// `vsock_rate_limit`: a `RateLimit` on what the guest sends through vsock,
    /// `vsock_rx_rate_limit` on what the host sends it (the rest waits in the host's sockets). `seccomp`: the
    /// policy of this VM's threads (`"deny"`, `"kill_thread"`, `"kill_process"`, `"off"`;
    /// default: the process-wide `seccomp_policy()`). `kick_signal_offset`: kick vCPUs with
    /// `SIGRTMIN + offset` (default 2); `replace_signal_handler`: replace a handler the program
    /// installed for it (else the build raises `InvalidArgumentError`).
    #[new]
    #[pyo3(signature = (
        kernel, *, initrd = None, cmdline = None, memory_mib = forkvm::DEFAULT_MEMORY_MIB,
        vcpus = 1, console = ConsoleArg::stdout(), console_input = None, rng = false, disks = Vec::new(),
        virtio_consoles = Vec::new(), vsock_cid = None, vsock_uds_path = None, balloon = None,
        debug_exit = false, kvm_device = None, network = None, vsock_rate_limit = None,
        vsock_rx_rate_limit = None, seccomp = None, kick_signal_offset = None, replace_signal_handler = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
        memory_mib: u64,
        vcpus: u32,
        console: ConsoleArg,
        console_input: Option<&Bound<'_, PyAny>>,
        rng: bool,
        disks: Vec<Bound<'_, PyAny>>,
        virtio_consoles: Vec<Bound<'_, PyAny>>,
        vsock_cid: Option<u64>,
        vsock_uds_path: Option<PathBuf>,
        balloon: Option<&Bound<'_, PyAny>>,
        debug_exit: bool,
        kvm_device: Option<PathBuf>,
        network: Option<PyRef<'_, PyNetwork>>,
        vsock_rate_limit: Option<PyRateLimit>,
        vsock_rx_rate_limit: Option<PyRateLimit>,
        seccomp: Option<&str>,
        kick_signal_offset: Option<i32>,
        replace_signal_handler: bool,
    ) -> PyResult<Self> {
        let mut builder = VmBuilder::new()
            .kernel(kernel)
            .memory_mib(memory_mib)
            .vcpus(vcpus)
            .debug_exit(debug_exit)
            .replace_signal_handler(replace_signal_handler);
        if let Some(policy) = seccomp {
            builder = builder.seccomp(seccomp_policy_arg(policy)?);
        }
        if let Some(offset) = kick_signal_offset {
            builder = builder.kick_signal_offset(offset);
        }
        if let Some(initrd) = initrd {
            builder = builder.initrd(initrd);
        }
        if let Some(cmdline) = cmdline {
            builder = builder.cmdline(cmdline);
        }
        builder = builder.console(console.0);
        if let Some(input) = self::console_input(console_input)? {
            builder = builder.console_input(input);
        }
        if rng {
            builder = builder.rng();
        }
        for disk in &disks {
            let disk = match disk.downcast::<PyDisk>() {
                Ok(d) => d.get().clone(),
                Err(_) => PyDisk::new(
                    disk.extract()
                        .map_err(|_| PyTypeError::new_err("a disk is a path or a forkvm.Disk"))?,
                    false,
                    false,
                    None,
                ),
            };
            builder = builder.disk(
                DiskConfig::new(disk.path)
                    .read_only(disk.read_only)
                    .direct_io(disk.direct_io)
                    .rate_limit(rate_limit(disk.rate_limit.as_ref())),
            );
        }
        for spec in &virtio_consoles {
            let (output, input) = virtio_console(spec)?;
            builder = builder.virtio_console(output, input);
        }
        match (vsock_cid, vsock_uds_path) {
            (Some(cid), path) => {
                let mut vsock = VsockConfig::new(cid)
                    .rate_limit(rate_limit(vsock_rate_limit.as_ref()))
                    .rx_rate_limit(rate_limit(vsock_rx_rate_limit.as_ref()));
                if let Some(path) = path {
                    vsock = vsock.uds_path(path);
                }
                builder = builder.vsock(vsock);
            }
            (None, Some(_)) => {
                return Err(PyValueError::new_err("vsock_uds_path needs a vsock_cid"));
            }
            (None, None) if vsock_rate_limit.is_some() || vsock_rx_rate_limit.is_some() => {
                return Err(PyValueError::new_err(
                    "vsock_rate_limit and vsock_rx_rate_limit need a vsock_cid",
                ));
            }
            (None, None) => {}
        }
        if let Some(spec) = balloon.filter(|b| !b.is_none()) {
            let options = if let Ok(b) = spec.downcast::<PyBalloon>() {
                Some(b.get().clone())
            } else if spec.extract::<bool>().map_err(|_| {
                PyTypeError::new_err("balloon is True, False, None or a forkvm.Balloon")
            })? {
                Some(PyBalloon::new(false, false))
            } else {
                None
            };
            if let Some(b) = options {
                builder = builder.balloon(
                    BalloonConfig::new()
                        .deflate_on_oom(b.deflate_on_oom)
                        .free_page_reporting(b.free_page_reporting),
                );
            }
        }
        if let Some(path) = kvm_device {
            builder = builder.kvm_device(path);
        }
        if let Some(network) = network {
            builder = builder.network(network.network.clone());
        }
        let vm = py
            .allow_threads(move || builder.build())
            .map_err(vm_error)?;
        Ok(Self::wrap(vm))
    }

    /// Starts a new VM from the snapshot in `directory`, running, connected to the host as
    /// `console` says (a console output spelling or a `Child`; default: standard output).
    /// `verify_data`: read the memory and disk files whole and check them against their
    /// checksums (a damaged one raises `SnapshotError`); `copy_memory`: copy the memory rather
    /// than map the file, so that nothing done to it later reaches the VM. Either loads the
    /// directory anew, even if it is kept ready.
    #[staticmethod]
    #[pyo3(signature = (
        directory, console = ChildArg(Child::new(forkvm::ConsoleOutput::Stdout)), *,
        verify_data = false, copy_memory = false
    ))]
    fn restore(
        py: Python<'_>,
        directory: PathBuf,
        console: ChildArg,
        verify_data: bool,
        copy_memory: bool,
    ) -> PyResult<Self> {
        let child = console.0;
        let vm = py
            .allow_threads(move || {
                if verify_data || copy_memory {
                    let options = LoadOptions::new()
                        .verify_data(verify_data)
                        .copy_memory(copy_memory);
                    Vm::restore_with(directory, child, options)
                } else {
                    Vm::restore(directory, child)
                }
            })
            .map_err(vm_error)?;
        Ok(Self::wrap(vm))
    }

    /// Keeps `n` children prepared for restores of the snapshot in `directory`: it stays loaded
    /// and each `restore` of it starts in a child made ahead (refilled in the background), until
    /// a new snapshot is saved there. 0 lets the directory go.
    #[staticmethod]
    fn keep_restores_ready(py: Python<'_>, directory: PathBuf, n: usize) -> PyResult<()> {
        py.allow_threads(move || Vm::keep_restores_ready(directory, n))
            .map_err(vm_error)
    }

    /// How many children are prepared for restores of `directory` (`keep_restores_ready`).
    #[staticmethod]
    fn restores_ready(directory: PathBuf) -> usize {
        Vm::restores_ready(directory)
    }

    /// Starts the vCPU threads and the event loop.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.get()?;
        py.allow_threads(move || vm.start()).map_err(vm_error)
    }

    /// Blocks until the guest ends (or `stop()` is called) and returns how it ended.
    fn wait(&self, py: Python<'_>) -> PyResult<PyExit> {
        let vm = self.get()?;
        py.allow_threads(move || vm.wait())
            .map(Into::into)
            .map_err(vm_error)
    }

    /// Ends the VM and waits for its threads; returns how it ended (`"stopped"`, or the
    /// guest's own end if that came first).
    fn stop(&self, py: Python<'_>) -> PyResult<PyExit> {
        let vm = self.get()?;
        Ok(py.allow_threads(move || vm.stop()).into())
    }

    /// Stops the VM and releases everything it holds (threads, memory, fds) once no call in
    /// another thread still uses it; later calls raise `ClosedError`. Does nothing a second
    /// time.
    fn close(&self, py: Python<'_>) {
        let vm = lock(&self.vm).take();
        // Dropping the last reference ends the VM (its threads are joined in the background,
        // unless it holds host names): without the GIL.
        py.allow_threads(move || drop(vm));
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.vm).is_none()
    }

    /// Pauses every vCPU and the device loop until `resume()`.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.get()?;
        py.allow_threads(move || vm.pause()).map_err(vm_error)
    }

    /// Lets a paused VM run again.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.get()?;
        py.allow_threads(move || vm.resume()).map_err(vm_error)
    }

    /// Whether the VM is paused.
    #[getter]
    fn is_paused(&self) -> PyResult<bool> {
        Ok(self.get()?.is_paused())
    }

    /// How the guest ended, or `None` while it runs (does not block).
    #[getter]
    fn exit(&self) -> PyResult<Option<PyExit>> {
        Ok(self.get()?.exit().map(Into::into))
    }

    /// The VM's virtio devices.
    #[getter]
    fn devices(&self) -> PyResult<Vec<PyDeviceInfo>> {
        Ok(self.get()?.devices().into_iter().map(Into::into).collect())
    }

    /// Replaces the rate limit of device `device` (an index into `devices`) while the VM runs
    /// or before it starts: a `RateLimit`, its buckets full, or `None` to lift it. Fork
    /// children and snapshots keep the limit in force. `NoDeviceError` for an index out of
    /// range.
    fn set_rate_limit(&self, device: usize, limit: Option<PyRateLimit>) -> PyResult<()> {
        self.get()?
            .set_rate_limit(device, rate_limit(limit.as_ref()))
            .map_err(vm_error)
    }

    /// Replaces the limit on what device `device` (a network or vsock device) pushes to the
    /// guest, apart from `set_rate_limit`'s: a `RateLimit`, or `None` to lift it. Data beyond it
    /// waits on the host side. `InvalidArgumentError` for a device without a receive direction,
    /// `NoDeviceError` for an index out of range.
    fn set_rx_rate_limit(&self, device: usize, limit: Option<PyRateLimit>) -> PyResult<()> {
        self.get()?
            .set_rx_rate_limit(device, rate_limit(limit.as_ref()))
            .map_err(vm_error)
    }

    /// Who this VM is (generation and id).
    #[getter]
    fn identity(&self) -> PyResult<PyIdentity> {
        Ok(self.get()?.identity().into())
    }

    /// How long (seconds) the last fork or snapshot held this VM paused, or `None`.
    #[getter]
    fn last_pause(&self) -> PyResult<Option<f64>> {
        Ok(self.get()?.last_pause().map(|d| d.as_secs_f64()))
    }

    /// Guest memory size in bytes.
    #[getter]
    fn memory_size(&self) -> PyResult<u64> {
        Ok(self.get()?.memory_size())
    }

    /// Host memory backing guest RAM now, in bytes.
    fn memory_allocated_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        let vm = self.get()?;
        py.allow_threads(move || vm.memory_allocated_bytes())
            .map_err(vm_error)
    }

    /// The balloon (`balloon=` when built), or `None`.
    #[getter]
    fn balloon(&self) -> PyResult<Option<PyBalloonHandle>> {
        Ok(self
            .get()?
            .balloon()
            .map(|h| PyBalloonHandle { handle: h.clone() }))
    }

    /// Reads `size` bytes of guest memory at guest-physical `addr` (consistent while paused).
    fn read_memory<'py>(
        &self,
        py: Python<'py>,
        addr: u64,
        size: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let vm = self.get()?;
        let mut buf = vec![0u8; size];
        let buf = py
            .allow_threads(move || vm.read_memory(addr, &mut buf).map(|()| buf))
            .map_err(vm_error)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Writes `data` into guest memory at guest-physical `addr` (this VM's copy only).
    fn write_memory(&self, py: Python<'_>, addr: u64, data: &[u8]) -> PyResult<()> {
        let vm = self.get()?;
        py.allow_threads(move || vm.write_memory(addr, data))
            .map_err(vm_error)
    }

    /// Splits this running (or paused) VM into new running VMs, all continuing from this
    /// instant: `children` is a count (consoles discarded) or a list with one entry per child,
    /// each a console output spelling or a `Child`. Returns the children.
    fn fork(&self, py: Python<'_>, children: &Bound<'_, PyAny>) -> PyResult<Vec<Self>> {
        let vm = self.get()?;
        let children: Vec<Child> = if let Ok(n) = children.extract::<usize>() {
            (0..n)
                .map(|_| Child::new(forkvm::ConsoleOutput::Discard))
                .collect()
        } else if children.is_instance_of::<pyo3::types::PyString>() {
            return Err(PyTypeError::new_err(
                "children is a count or a list of consoles or Child objects",
            ));
        } else {
            children
                .try_iter()
                .map_err(|_| {
                    PyTypeError::new_err(
                        "children is a count or a list of consoles or Child objects",
                    )
                })?
                .map(|c| child(Some(&c?)))
                .collect::<PyResult<_>>()?
        };
        let vms = py
            .allow_threads(move || vm.fork(children))
            .map_err(vm_error)?;
        Ok(vms.into_iter().map(Self::wrap).collect())
    }

    /// Writes this running (or paused) VM's complete state to `directory`.
    fn snapshot(&self, py: Python<'_>, directory: PathBuf) -> PyResult<()> {
        let vm = self.get()?;
        py.allow_threads(move || vm.snapshot(directory))
            .map_err(vm_error)
    }

    /// Creates `n` children ahead of time so the next forks are faster.
    fn prepare_forks(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        let vm = self.get()?;
        py.allow_threads(move || vm.prepare_forks(n))
            .map_err(vm_error)
    }

    /// Keeps `n` children prepared, topped up on a background thread after each fork.
    fn keep_forks_ready(&self, n: usize) -> PyResult<()> {
        self.get()?.keep_forks_ready(n);
        Ok(())
    }

    /// How many children are prepared.
    #[getter]
    fn prepared_forks(&self) -> PyResult<usize> {
        Ok(self.get()?.prepared_forks())
    }

    /// Opens a stream to guest vsock `port` (waiting at most `timeout` seconds for the guest
    /// to accept), as a connected `socket.socket`.
    #[pyo3(signature = (port, timeout = 5.0))]
    fn vsock_connect<'py>(
        &self,
        py: Python<'py>,
        port: u32,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let vm = self.get()?;
        let timeout = duration(Some(timeout))?;
        let stream = py
            .allow_threads(move || vm.vsock_connect(port, timeout))
            .map_err(vm_error)?;
        let fd = stream.into_raw_fd();
        let socket = py.import("socket")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("fileno", fd)?;
        socket.getattr("socket")?.call((), Some(&kwargs))
    }

    /// Connects to the guest's TCP `port` in-process through its network (no host listener), as
    /// a connected `socket.socket`; when nothing listens in the guest it ends at once.
    fn connect_tcp<'py>(&self, py: Python<'py>, port: u16) -> PyResult<Bound<'py, PyAny>> {
        network::connect_tcp(py, &*self.get()?, port)
    }

    /// Publishes the guest's TCP `guest_port` on the host at `host`, `port` (0: a free one);
    /// returns the bound `(host, port)`.
    #[pyo3(signature = (guest_port, host = "127.0.0.1", port = 0))]
    fn publish(&self, guest_port: u16, host: &str, port: u16) -> PyResult<(String, u16)> {
        network::publish(&*self.get()?, guest_port, host, port)
    }

    /// Stops publishing what `publish` bound at `host`, `port` (open connections stay).
    #[pyo3(signature = (port, host = "127.0.0.1"))]
    fn unpublish(&self, port: u16, host: &str) -> PyResult<()> {
        network::unpublish(&*self.get()?, host, port)
    }

    /// Replaces the network's egress policy (arguments as `Network`'s); flows opened from now
    /// on are judged by it.
    #[pyo3(signature = (*, allow = Vec::new(), deny = Vec::new(), allow_domains = Vec::new(), deny_all = false))]
    fn set_network_policy(
        &self,
        allow: Vec<String>,
        deny: Vec<String>,
        allow_domains: Vec<String>,
        deny_all: bool,
    ) -> PyResult<()> {
        let policy = network::policy(&allow, &deny, &allow_domains, deny_all)?;
        network::set_policy(&*self.get()?, policy)
    }

    /// The network's counters, as a dict (flows, frames, denials by reason, DNS).
    fn network_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        network::stats(py, &*self.get()?)
    }

    /// The guest agent (forkvm's Linux image), connecting through the vsock device and
    /// waiting up to `timeout` seconds for it to come up.
    #[pyo3(signature = (timeout = 60.0))]
    fn agent(&self, py: Python<'_>, timeout: f64) -> PyResult<PyAgent> {
        let vm = self.get()?;
        let timeout = duration(Some(timeout))?;
        py.allow_threads(move || vm.agent(timeout))
            .map(|agent| PyAgent { agent })
            .map_err(agent_error)
    }

    /// Runs `argv` in the guest through its agent (see `Agent.exec`).
    #[pyo3(signature = (argv, *, stdin = None, env = None, cwd = None, user = None, clear_env = false, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        env: Option<std::collections::HashMap<String, String>>,
        cwd: Option<String>,
        user: Option<String>,
        clear_env: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyExecResult> {
        self.default_agent(py)?
            .exec(py, argv, stdin, env, cwd, user, clear_env, timeout)
    }

    /// Starts `argv` in the guest through its agent and returns a `Process` (see
    /// `Agent.spawn`).
    #[pyo3(signature = (argv, *, stdin = None, env = None, cwd = None, user = None, clear_env = false, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        env: Option<std::collections::HashMap<String, String>>,
        cwd: Option<String>,
        user: Option<String>,
        clear_env: bool,
        timeout: Option<f64>,
    ) -> PyResult<PyProcess> {
        self.default_agent(py)?
            .spawn(py, argv, stdin, env, cwd, user, clear_env, timeout)
    }

    /// Writes `data` to the guest file `path` (see `Agent.write_file`).
    #[pyo3(signature = (path, data, *, append = false, exclusive = false, mode = None))]
    fn write_file(
        &self,
        py: Python<'_>,
        path: String,
        data: &[u8],
        append: bool,
        exclusive: bool,
        mode: Option<u32>,
    ) -> PyResult<u64> {
        self.default_agent(py)?
            .write_file(py, path, data, append, exclusive, mode)
    }

    /// Reads the guest file `path` whole.
    fn read_file<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyBytes>> {
        self.default_agent(py)?.read_file(py, path)
    }

    /// The guest path's metadata.
    fn stat(&self, py: Python<'_>, path: String) -> PyResult<PyFileStat> {
        self.default_agent(py)?.stat(py, path)
    }

    /// The entries of the guest directory `path`.
    fn list_dir(&self, py: Python<'_>, path: String) -> PyResult<Vec<PyDirEntry>> {
        self.default_agent(py)?.list_dir(py, path)
    }

    /// Opens a PTY session running `argv` (see `Agent.pty`).
    #[pyo3(signature = (argv, rows = 24, cols = 80))]
    fn pty(&self, py: Python<'_>, argv: Vec<String>, rows: u16, cols: u16) -> PyResult<PyPty> {
        self.default_agent(py)?.pty(py, argv, rows, cols)
    }

    /// Attaches to the PTY session `session`.
    fn pty_attach(&self, py: Python<'_>, session: u64) -> PyResult<PyPty> {
        self.default_agent(py)?.pty_attach(py, session)
    }

    /// Starts the VM unless it started already (a fork child, a restored VM).
    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let vm = slf.get().get()?;
        match slf.py().allow_threads(move || vm.start()) {
            Ok(()) | Err(forkvm::Error::AlreadyStarted) => Ok(slf.clone().unbind()),
            Err(e) => Err(vm_error(e)),
        }
    }

    /// Stops and closes the VM.
    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        match lock(&self.vm).as_ref() {
            None => "VM(closed)".to_owned(),
            Some(vm) => {
                let identity = vm.identity();
                let state = match vm.exit() {
                    Some(exit) => format!("ended: {exit}"),
                    None if vm.is_paused() => "paused".to_owned(),
                    None => "running or not started".to_owned(),
                };
                format!("VM(generation={}, {state})", identity.generation)
            }
        }
    }
}
