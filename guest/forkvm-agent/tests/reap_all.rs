//! The reaper that waits for every child, as PID 1 does. Its own test binary: it reaps every
//! child of the process, which would steal other tests' children. The binary makes itself a child
//! subreaper so that orphans come to it, as they come to PID 1.
// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn reap_all_collects_orphans_and_still_reports_exits() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }, 0);
    let (agent, _) = agent(true, false);
    let mut client = Client::connect(&agent, 0);
    for round in 0..20 {
        let outcome = client.exec(1, &["sh", "-c", &format!("exit {}", round % 5)]);
        assert_eq!(outcome.exited().code, Some(round % 5));
    }
    // The background subshell outlives its parent and is reparented to us.
    let outcome = client.exec(2, &["sh", "-c", "(sleep 0.3; exit 0) >/dev/null & echo $!"]);
    assert_eq!(outcome.exited().code, Some(0));
    let orphan: u32 = outcome.stdout().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Reaped, not left a zombie: /proc/<pid> goes away.
    while std::fs::metadata(format!("/proc/{orphan}")).is_ok() {
        assert!(Instant::now() < deadline, "orphan {orphan} was not reaped");
        thread::sleep(Duration::from_millis(20));
    }
    let outcome = client.exec(3, &["true"]);
    assert_eq!(outcome.exited().code, Some(0));
}

#[test]
fn failed_execs_do_not_race_the_reaper() {
    // std reaps a child whose exec failed itself (and asserts that it can): the reaper must not
    // take it first. A user forces std's fork/exec path rather than posix_spawn; without root the
    // child fails at setgid instead of exec, the same path.
    // SAFETY: geteuid has no preconditions.
    let expected = if unsafe { libc::geteuid() } == 0 {
        forkvm_agent_protocol::ErrorKind::ProgramNotFound
    } else {
        forkvm_agent_protocol::ErrorKind::PermissionDenied
    };
    let (agent, _) = agent(true, false);
    let mut client = Client::connect(&agent, 0);
    for round in 0..200 {
        let outcome = client.call(
            1,
            &forkvm_agent_protocol::Request::Exec(forkvm_agent_protocol::ExecRequest {
                argv: vec!["/nonexistent/forkvm-program".into()],
                user: Some("0:0".into()),
                ..Default::default()
            }),
        );
        assert_eq!(outcome.error().kind, expected, "round {round}");
    }
    assert_eq!(client.exec(2, &["true"]).exited().code, Some(0));
}
