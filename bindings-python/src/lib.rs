//! Python bindings for forkvm (pyo3 + maturin): arrive with the bindings issue; empty until then.
