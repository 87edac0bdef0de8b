//! The integration tests on this host's KVM, one module per file beside this one, linked as one
//! test binary: one link instead of one per file (`docs/test-binaries.md`). Run one file's tests
//! with a filter: `cargo test --test integration pause:: -- --nocapture`. Apart: lifecycle.rs
//! (its counts of fds, threads and memory need a process of its own), linux.rs and rootfs.rs
//! (Linux boots, slow: they do not run alongside these).

mod agent;
mod agent_life;
mod bad_input;
mod boot;
mod fork;
mod fork_devices;
mod identity;
mod network_devices;
mod pause;
mod rate_limit;
mod snapshot;
mod snapshot_files;
mod vsock;
