//! Locking shared VMM state.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, recovering it if a previous holder panicked: forkvm's shared state stays
/// consistent between accesses (devices, queues, run state), so a poisoned lock carries no
/// half-done update worth refusing, and one panicked thread must not take the whole VMM down.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
