//! Python bindings for forkvm: the `forkvm._forkvm` extension module, which the pure-Python
//! package `forkvm` (forkvm-python/forkvm/) re-exports.
//!
//! A thin layer over the Rust API: every class wraps one Rust type, every method calls one Rust
//! method, converting arguments and results and mapping errors onto the exception hierarchy
//! rooted at `forkvm.Error` ([`errors`]). Every call that can block — on the guest, on another
//! thread or on I/O — releases the GIL, so Python threads run VMs in parallel and a console
//! callback (which takes the GIL on a thread of forkvm's) can never deadlock against a caller.

mod agent;
mod console;
mod devices;
mod errors;
mod limits;
mod network;
mod types;
mod vm;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _forkvm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<vm::PyVm>()?;
    m.add_class::<console::PyConsoleBuffer>()?;
    m.add_class::<vm::PyChild>()?;
    m.add_class::<devices::PyDisk>()?;
    m.add_class::<devices::PyBalloon>()?;
    m.add_class::<devices::PyBalloonHandle>()?;
    m.add_class::<limits::PyBucket>()?;
    m.add_class::<limits::PyRateLimit>()?;
    m.add_class::<limits::PySeccompDenials>()?;
    m.add_class::<network::PyNetwork>()?;
    m.add_class::<agent::PyAgent>()?;
    m.add_class::<agent::PyPty>()?;
    m.add_class::<agent::PyProcess>()?;
    m.add_class::<types::PyExit>()?;
    m.add_class::<types::PyIdentity>()?;
    m.add_class::<types::PyDeviceInfo>()?;
    m.add_class::<types::PyExecResult>()?;
    m.add_class::<types::PyExitStatus>()?;
    m.add_class::<types::PyFileStat>()?;
    m.add_class::<types::PyDirEntry>()?;
    m.add_function(wrap_pyfunction!(vm::stop_all, m)?)?;
    m.add_function(wrap_pyfunction!(vm::wait_for_releases, m)?)?;
    m.add_function(wrap_pyfunction!(limits::set_seccomp_policy, m)?)?;
    m.add_function(wrap_pyfunction!(limits::seccomp_policy, m)?)?;
    m.add_function(wrap_pyfunction!(limits::seccomp_denials, m)?)?;
    errors::register(m)?;
    m.add("DEFAULT_MEMORY_MIB", forkvm::DEFAULT_MEMORY_MIB)?;
    m.add("IMAGE_CMDLINE", forkvm_agent_client::IMAGE_CMDLINE)?;
    m.add("IMAGE_MEMORY_MIB", forkvm_agent_client::IMAGE_MEMORY_MIB)?;
    m.add("IDENTITY_PAGE_ADDR", forkvm::IDENTITY_PAGE_ADDR)?;
    Ok(())
}
