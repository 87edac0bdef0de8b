//! The reaper that waits for every child (as PID 1 does) sleeps while there is none: an idle
//! guest must not wake up, and on hosts that emulate guest ring 0 each wake-up is emulated
//! kernel code (issue 14: idle children cost no CPU). Its own test binary: the reaper is one per
//! process, and another test's children would wake it.
// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::thread;
use std::time::Duration;

use common::*;

/// Voluntary and involuntary context switches of this process's thread named `name`.
fn switches_of(name: &str) -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        return status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
    }
    panic!("no thread named {name}");
}

#[test]
fn an_idle_reaper_does_not_wake_up() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let (agent, _) = agent(true, false);
    let mut client = Client::connect(&agent, 0);
    // A child comes and goes, so the reaper has gone through its loop.
    assert_eq!(client.exec(1, &["true"]).exited().code, Some(0));
    thread::sleep(Duration::from_millis(300));
    let before = switches_of("agent-reaper");
    thread::sleep(Duration::from_millis(3500));
    let woke = switches_of("agent-reaper") - before;
    assert_eq!(
        woke, 0,
        "the reaper woke up {woke} times in 3.5 s without children"
    );
    // And it still reaps.
    assert_eq!(
        client.exec(2, &["sh", "-c", "exit 4"]).exited().code,
        Some(4)
    );
}
