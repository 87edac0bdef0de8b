//! What limits a VM: `forkvm.Bucket` and `forkvm.RateLimit` (`forkvm::RateLimit`,
//! `docs/rate-limits.md`), the seccomp policy by name and `forkvm.SeccompDenials`
//! (`docs/seccomp.md`).

use std::time::Duration;

use forkvm::{Bucket, RateLimit, SeccompPolicy};
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;

use crate::errors::{InvalidArgumentError, vm_error};

/// A whole number of tokens from 0 to 2**64 - 1, for the argument `what`.
fn tokens(value: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    value.extract::<u64>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(value.py()) {
            PyOverflowError::new_err(format!("{what} must be from 0 to 2**64 - 1, not {value}"))
        } else {
            e
        }
    })
}

/// One token bucket of a rate limit: `size` tokens (bytes or requests), refilled from empty in
/// `refill_time` seconds, plus `one_time_burst` tokens given once at the start. A size of 0 or
/// a refill time of 0 raises `InvalidArgumentError`; a negative or too large size
/// `OverflowError`; a negative, NaN or infinite refill time `ValueError`.
#[pyclass(module = "forkvm", name = "Bucket", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PyBucket {
    bucket: Bucket,
}

#[pymethods]
impl PyBucket {
    #[new]
    #[pyo3(signature = (size, refill_time, *, one_time_burst = None))]
    fn new(
        size: &Bound<'_, PyAny>,
        refill_time: f64,
        one_time_burst: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let size = tokens(size, "size")?;
        let burst = one_time_burst.map_or(Ok(0), |b| tokens(b, "one_time_burst"))?;
        let refill_time = Duration::try_from_secs_f64(refill_time).map_err(|_| {
            PyValueError::new_err(format!(
                "refill_time must be a number of seconds above 0, not {refill_time}"
            ))
        })?;
        let bucket = Bucket::new(size, refill_time).with_one_time_burst(burst);
        RateLimit {
            bytes: Some(bucket),
            ops: None,
        }
        .check()
        .map_err(|e| vm_error(forkvm::Error::InvalidRateLimit(e)))?;
        Ok(Self { bucket })
    }

    /// The most tokens it holds.
    #[getter]
    fn size(&self) -> u64 {
        self.bucket.size
    }

    /// Seconds an empty bucket takes to fill.
    #[getter]
    fn refill_time(&self) -> f64 {
        self.bucket.refill_time.as_secs_f64()
    }

    /// Tokens given once at the start.
    #[getter]
    fn one_time_burst(&self) -> u64 {
        self.bucket.one_time_burst
    }

    fn __repr__(&self) -> String {
        format!(
            "Bucket({}, {:?}, one_time_burst={})",
            self.bucket.size,
            self.bucket.refill_time.as_secs_f64(),
            self.bucket.one_time_burst
        )
    }
}

/// A virtio device's rate limit: a `Bucket` on the `bytes` it moves and one on the requests
/// (`ops`) it serves; `None` limits nothing. `RateLimit()` is no limit.
#[pyclass(module = "forkvm", name = "RateLimit", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PyRateLimit {
    pub(crate) limit: RateLimit,
}

#[pymethods]
impl PyRateLimit {
    #[new]
    #[pyo3(signature = (*, bytes = None, ops = None))]
    fn new(bytes: Option<PyBucket>, ops: Option<PyBucket>) -> Self {
        Self {
            limit: RateLimit {
                bytes: bytes.map(|b| b.bucket),
                ops: ops.map(|b| b.bucket),
            },
        }
    }

    /// The bucket on bytes, or `None`.
    #[getter]
    fn bytes(&self) -> Option<PyBucket> {
        self.limit.bytes.map(|bucket| PyBucket { bucket })
    }

    /// The bucket on requests, or `None`.
    #[getter]
    fn ops(&self) -> Option<PyBucket> {
        self.limit.ops.map(|bucket| PyBucket { bucket })
    }

    /// Whether it limits nothing.
    #[getter]
    fn unlimited(&self) -> bool {
        self.limit.is_unlimited()
    }

    pub(crate) fn __repr__(&self) -> String {
        let show = |b: Option<Bucket>| {
            b.map_or("None".to_owned(), |bucket| PyBucket { bucket }.__repr__())
        };
        format!(
            "RateLimit(bytes={}, ops={})",
            show(self.limit.bytes),
            show(self.limit.ops)
        )
    }
}

impl From<RateLimit> for PyRateLimit {
    fn from(limit: RateLimit) -> Self {
        Self { limit }
    }
}

/// A `rate_limit=` argument: a `RateLimit`, or `None` for none.
pub(crate) fn rate_limit(limit: Option<&PyRateLimit>) -> RateLimit {
    limit.map_or_else(RateLimit::unlimited, |l| l.limit)
}

/// The names of the seccomp policies, as Python spells them.
const POLICIES: [(&str, SeccompPolicy); 4] = [
    ("deny", SeccompPolicy::Deny),
    ("kill_thread", SeccompPolicy::KillThread),
    ("kill_process", SeccompPolicy::KillProcess),
    ("off", SeccompPolicy::Off),
];

/// The policy `name` names; `InvalidArgumentError` for another name.
pub(crate) fn seccomp_policy_arg(name: &str) -> PyResult<SeccompPolicy> {
    POLICIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            InvalidArgumentError::new_err(format!(
                "unknown seccomp policy {name:?}: \"deny\", \"kill_thread\", \"kill_process\" or \"off\""
            ))
        })
}

/// Sets the seccomp policy (`"deny"`, the default, `"kill_thread"`, `"kill_process"` or
/// `"off"`) of the threads forkvm starts from now on for the whole process and of VMs built
/// without `seccomp=`; threads running keep theirs.
#[pyfunction]
pub(crate) fn set_seccomp_policy(policy: &str) -> PyResult<()> {
    forkvm::set_seccomp_policy(seccomp_policy_arg(policy)?);
    Ok(())
}

/// The process-wide seccomp policy's name (`set_seccomp_policy`).
#[pyfunction]
pub(crate) fn seccomp_policy() -> &'static str {
    let policy = forkvm::seccomp_policy();
    POLICIES
        .iter()
        .find(|(_, p)| *p == policy)
        .map_or("deny", |(n, _)| n)
}

/// The seccomp denials counted in this process so far: system calls of forkvm's threads outside
/// their allowlist, each of which failed with `EPERM` (`total`, and by thread: `vcpu`,
/// `event_loop`, `prepare`, `reaper`), the number of the `last_syscall` denied (x86-64) or
/// `None`, and `install_failures`: threads running unfiltered because the kernel refused.
#[pyclass(module = "forkvm", name = "SeccompDenials", frozen, get_all, eq)]
#[derive(PartialEq)]
pub(crate) struct PySeccompDenials {
    total: u64,
    vcpu: u64,
    event_loop: u64,
    prepare: u64,
    reaper: u64,
    last_syscall: Option<i64>,
    install_failures: u64,
}

#[pymethods]
impl PySeccompDenials {
    fn __repr__(&self) -> String {
        format!(
            "SeccompDenials(total={}, vcpu={}, event_loop={}, prepare={}, reaper={}, \
             last_syscall={}, install_failures={})",
            self.total,
            self.vcpu,
            self.event_loop,
            self.prepare,
            self.reaper,
            self.last_syscall
                .map_or("None".to_owned(), |n| n.to_string()),
            self.install_failures
        )
    }
}

/// The seccomp denials counted so far (a `SeccompDenials`).
#[pyfunction]
pub(crate) fn seccomp_denials() -> PySeccompDenials {
    let d = forkvm::seccomp_denials();
    PySeccompDenials {
        total: d.total,
        vcpu: d.vcpu,
        event_loop: d.event_loop,
        prepare: d.prepare,
        reaper: d.reaper,
        last_syscall: d.last_syscall,
        install_failures: d.install_failures,
    }
}
