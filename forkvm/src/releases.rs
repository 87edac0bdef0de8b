//! Waiting until what was let go of is released, and forkvm's threads with it: the reaper's
//! (`reaper.rs`), then the services no VM needs any more (the exit hooks' thread,
//! `vstate/run_state.rs`; the network's workers, `forkvm_net::end_threads_if_unused`).

use std::time::{Duration, Instant};

/// Waits until everything let go of so far (dropped VMs included) is freed and the threads that
/// freed it have ended, or until `timeout` passes; says whether that was reached. With no VM
/// left, forkvm's other threads end too (exit hooks, the network's workers), so that a process
/// without VMs holds no thread of forkvm's. For tests and shutdown paths that count threads or
/// fds.
pub fn wait_for_releases(timeout: Duration) -> bool {
    let t0 = Instant::now();
    if !crate::reaper::wait_for_reaper(timeout) {
        return false;
    }
    let left = timeout.saturating_sub(t0.elapsed());
    crate::vstate::run_state::end_hook_runner_if_unused() & forkvm_net::end_threads_if_unused(left)
}
