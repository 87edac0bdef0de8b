//! What `forkvm.VM` adds as devices: `Disk` and `Balloon`, and a VM's `BalloonHandle`.

use std::path::PathBuf;

use forkvm::BalloonHandle;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::limits::PyRateLimit;

/// A virtio-blk disk over the raw image at `path` (`/dev/vda`, `/dev/vdb`, ... in order),
/// limited by `rate_limit` (a `RateLimit`; `VM.set_rate_limit` changes it while the VM runs).
#[pyclass(module = "forkvm", name = "Disk", frozen, get_all)]
#[derive(Clone)]
pub(crate) struct PyDisk {
    pub(crate) path: PathBuf,
    pub(crate) read_only: bool,
    pub(crate) direct_io: bool,
    pub(crate) rate_limit: Option<PyRateLimit>,
}

#[pymethods]
impl PyDisk {
    #[new]
    #[pyo3(signature = (path, *, read_only = false, direct_io = false, rate_limit = None))]
    pub(crate) fn new(
        path: PathBuf,
        read_only: bool,
        direct_io: bool,
        rate_limit: Option<PyRateLimit>,
    ) -> Self {
        Self {
            path,
            read_only,
            direct_io,
            rate_limit,
        }
    }

    fn __repr__(&self) -> String {
        let limit = match &self.rate_limit {
            Some(l) => format!(", rate_limit={}", l.__repr__()),
            None => String::new(),
        };
        format!(
            "Disk({:?}, read_only={}, direct_io={}{limit})",
            self.path,
            py_bool(self.read_only),
            py_bool(self.direct_io)
        )
    }
}

fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// A virtio-balloon device's options.
#[pyclass(module = "forkvm", name = "Balloon", frozen, get_all)]
#[derive(Clone)]
pub(crate) struct PyBalloon {
    pub(crate) deflate_on_oom: bool,
    pub(crate) free_page_reporting: bool,
}

#[pymethods]
impl PyBalloon {
    #[new]
    #[pyo3(signature = (*, deflate_on_oom = false, free_page_reporting = false))]
    pub(crate) fn new(deflate_on_oom: bool, free_page_reporting: bool) -> Self {
        Self {
            deflate_on_oom,
            free_page_reporting,
        }
    }
}

/// A VM's balloon (`VM.balloon`): set its target, read what the guest gave back.
#[pyclass(module = "forkvm", name = "BalloonHandle", frozen)]
pub(crate) struct PyBalloonHandle {
    pub(crate) handle: BalloonHandle,
}

#[pymethods]
impl PyBalloonHandle {
    /// Asks the guest to give back `mib` MiB.
    fn set_target_mib(&self, mib: u64) -> PyResult<()> {
        self.handle
            .set_target_mib(mib)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Asks the guest to give back `pages` 4 KiB pages.
    fn set_target_pages(&self, pages: u64) -> PyResult<()> {
        self.handle
            .set_target_pages(pages)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// The pages asked for.
    #[getter]
    fn target_pages(&self) -> u64 {
        self.handle.target_pages()
    }

    /// The pages the guest gave.
    #[getter]
    fn actual_pages(&self) -> u64 {
        self.handle.actual_pages()
    }

    /// Asks the guest for fresh memory statistics.
    fn request_stats(&self) {
        self.handle.request_stats();
    }

    /// The guest's latest memory statistics, by virtio tag, or `None` before any came.
    fn stats(&self) -> Option<Vec<(u16, u64)>> {
        self.handle.stats().map(|s| s.entries().to_vec())
    }

    /// How many statistics updates came.
    #[getter]
    fn stats_updates(&self) -> u64 {
        self.handle.stats_updates()
    }

    /// Bytes the host reclaimed from inflation.
    #[getter]
    fn inflated_bytes(&self) -> u64 {
        self.handle.inflated_bytes()
    }

    /// Bytes the guest took back.
    #[getter]
    fn deflated_bytes(&self) -> u64 {
        self.handle.deflated_bytes()
    }

    /// Bytes reclaimed through free page reporting.
    #[getter]
    fn reported_bytes(&self) -> u64 {
        self.handle.reported_bytes()
    }

    /// Guest requests the device refused.
    #[getter]
    fn rejected_requests(&self) -> u64 {
        self.handle.rejected_requests()
    }
}
