//! The guest agent's client in forkvm's Linux image (one boot, ~25 s here; a binary of its own,
//! as Linux boots do not run alongside the integration tests): `cat /dev/zero` that nobody
//! reads fills the host's buffer to its bound and stops there, the host's memory flat, and a command in
//! flight when the VM stops, and every call after, fail at once with NotRunning.

use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ErrorKind};
use forkvm_agent_client::{AgentError, Command, VmAgentExt};
use forkvm_tests::{linux_image_vm, proc_status, start_linux_image};

/// Slack for "at once": generous, this host is slow and shared.
const SLACK: Duration = Duration::from_secs(1);

fn kind(result: Result<impl std::fmt::Debug, AgentError>) -> ErrorKind {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.kind(),
    }
}

/// How long the Linux image may take to boot to its agent here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// In forkvm's Linux image: `cat /dev/zero` that nobody reads holds at most the client's bound
/// on the host and the host's memory stays flat (the guest is stopped by vsock credit, not
/// buffered for); then a command in flight when the VM stops, and every call after, fail at
/// once with NotRunning.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn in_the_image_unread_output_stays_bounded_and_a_stop_ends_calls_at_once() {
    let console = ConsoleBuffer::new();
    let (vm, agent) = start_linux_image(linux_image_vm(256, &console), &console, BOOT_TIMEOUT);

    // The guest is slow here (about 0.2 MB/s from `cat` to the host): a small limit is reached
    // within the test's time.
    const LIMIT: usize = 256 << 10;
    let limited = agent.clone().with_buffer_limit(LIMIT);
    let cat = limited.spawn(&Command::new(["cat", "/dev/zero"])).unwrap();
    let before = proc_status("RssAnon") << 10;
    let bound = LIMIT + forkvm_agent_protocol::MAX_PAYLOAD + forkvm_agent_client::FRAME_COST;
    let (mut buffered, mut rss) = (0, before);
    let t0 = Instant::now();
    // Full once the next frame (64 KiB from this agent) would not fit.
    while buffered + (64 << 10) <= LIMIT && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
        buffered = cat.buffered_bytes();
    }
    assert!(
        buffered + (64 << 10) > LIMIT,
        "only {buffered} bytes came in 60 s"
    );
    // Full: nothing more arrives while nobody reads (the guest's writes wait).
    let full = cat.buffered_bytes();
    for _ in 0..25 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            cat.buffered_bytes(),
            full,
            "output kept arriving past the bound"
        );
        rss = rss.max(proc_status("RssAnon") << 10);
    }
    assert!(full <= bound, "{full} bytes buffered, bound {bound}");
    let grown = rss.saturating_sub(before);
    assert!(grown < 64 << 20, "the host grew by {grown} bytes");
    // Reading lets it go on.
    let mut read = 0;
    while read <= full {
        match cat.next(Some(Duration::from_secs(60))).unwrap() {
            Some(forkvm_agent_client::ProcessEvent::Output(_, bytes)) => read += bytes.len(),
            other => panic!("{other:?}"),
        }
    }
    cat.kill().unwrap();
    let status = cat.wait(|_, _| {}).unwrap();
    assert_eq!(status.signal, Some(libc::SIGKILL));
    eprintln!(
        "unread cat /dev/zero: {full} bytes buffered at the {LIMIT}-byte limit after {:?}, \
         anonymous RSS +{grown} bytes",
        t0.elapsed()
    );

    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let result = agent.exec(["sleep", "1000"]);
            (result.map(|_| ()), Instant::now())
        });
        std::thread::sleep(Duration::from_secs(2));
        let stopped = Instant::now();
        vm.stop();
        let (result, returned) = waiting.join().unwrap();
        assert_eq!(kind(result), ErrorKind::NotRunning);
        let took = returned.saturating_duration_since(stopped);
        assert!(took < SLACK, "took {took:?}");
    });
    let t0 = Instant::now();
    assert_eq!(kind(agent.exec(["true"])), ErrorKind::NotRunning);
    assert_eq!(
        kind(agent.run(&Command::new(["cat"]).stdin("x"))),
        ErrorKind::NotRunning
    );
    assert_eq!(kind(agent.pty(["sh"], 24, 80)), ErrorKind::NotRunning);
    assert_eq!(
        kind(agent.read_file("/etc/hostname")),
        ErrorKind::NotRunning
    );
    assert_eq!(kind(vm.exec(["true"])), ErrorKind::NotRunning);
    assert!(t0.elapsed() < SLACK, "took {:?}", t0.elapsed());
}
