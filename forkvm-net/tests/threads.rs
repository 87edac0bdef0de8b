//! The network's worker threads (`outside.rs`) are the process's only while a network needs
//! them: once none does, `end_threads_if_unused` ends them, and the next network starts them
//! again. A binary of its own: it counts this process's threads.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use forkvm_net::{NetworkConfig, NetworkPolicy, Seams, StaticResolver, UserNetwork};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn network() -> UserNetwork {
    let seams = Seams {
        resolver: Arc::new(StaticResolver::new()),
        ..Seams::host()
    };
    UserNetwork::new(NetworkConfig::default(), NetworkPolicy::deny_all(), seams)
        .unwrap()
        .0
}

#[test]
fn the_workers_end_once_no_network_needs_them_and_start_again() {
    let before = threads();
    for _ in 0..2 {
        let first = network();
        let second = network();
        assert!(threads() > before, "a network starts the pool's spawner");
        drop(first);
        // The second network still needs them: they stay.
        assert!(forkvm_net::end_threads_if_unused(Duration::from_secs(10)));
        assert!(threads() > before);
        drop(second);
        assert!(forkvm_net::end_threads_if_unused(Duration::from_secs(10)));
        assert_eq!(threads(), before);
    }
}
