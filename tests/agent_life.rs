//! The guest agent's client against VMs that cannot answer (the freestanding test guest, which
//! runs no agent): never started, stopped, ending while a call waits, or paused: every call
//! fails at once or within its timeout. The same in forkvm's Linux image: tests/agent_image.rs.

use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, ErrorKind, VsockConfig};
use forkvm_agent_client::{AgentError, VmAgentExt};
use forkvm_tests::{spinning_guest_with, test_guest_vm};

/// Slack for "at once" and "within its timeout": generous, this host is slow and shared.
const SLACK: Duration = Duration::from_secs(1);

fn with_vsock(builder: forkvm::VmBuilder) -> forkvm::VmBuilder {
    builder.vsock(VsockConfig::new(3))
}

fn kind(result: Result<impl std::fmt::Debug, AgentError>) -> ErrorKind {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.kind(),
    }
}

/// `agent(timeout)` returns in about its timeout, not after a fixed 5 s per connection attempt.
/// The VM is paused so that nothing answers (a guest without a vsock driver refuses at once).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn connecting_honours_a_short_timeout() {
    let (vm, _, _console) = spinning_guest_with(1, 32, with_vsock);
    vm.pause().unwrap();
    for timeout in [Duration::from_millis(300), Duration::from_millis(1500)] {
        let t0 = Instant::now();
        assert_eq!(kind(vm.agent(timeout)), ErrorKind::AgentNotReady);
        let took = t0.elapsed();
        assert!(took < timeout + SLACK, "{timeout:?} took {took:?}");
    }
}

/// Calls on a VM that was stopped fail at once with NotRunning, whatever their timeout.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn calls_on_a_stopped_vm_fail_at_once() {
    let (vm, _, _console) = spinning_guest_with(1, 32, with_vsock);
    vm.stop();
    let t0 = Instant::now();
    assert_eq!(
        kind(vm.agent(Duration::from_secs(60))),
        ErrorKind::NotRunning
    );
    assert_eq!(kind(vm.exec(["true"])), ErrorKind::NotRunning);
    assert!(t0.elapsed() < SLACK, "took {:?}", t0.elapsed());
}

/// Calls on a VM never started fail at once with NotStarted.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn calls_on_a_vm_never_started_fail_at_once() {
    let console = ConsoleBuffer::new();
    let vm = with_vsock(test_guest_vm("mode=spin", &console))
        .build()
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(
        kind(vm.agent(Duration::from_secs(60))),
        ErrorKind::NotStarted
    );
    assert_eq!(kind(vm.exec(["true"])), ErrorKind::NotStarted);
    assert!(t0.elapsed() < SLACK, "took {:?}", t0.elapsed());
}

/// A connection attempt in flight when the VM stops gives up promptly with NotRunning.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_connection_attempt_in_flight_when_the_vm_stops_returns_promptly() {
    let (vm, _, _console) = spinning_guest_with(1, 32, with_vsock);
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let result = vm.agent(Duration::from_secs(60));
            (result.map(|_| ()), Instant::now())
        });
        std::thread::sleep(Duration::from_millis(300));
        let stopped = Instant::now();
        vm.stop();
        let (result, returned) = waiting.join().unwrap();
        assert_eq!(kind(result), ErrorKind::NotRunning);
        let took = returned.saturating_duration_since(stopped);
        assert!(took < Duration::from_secs(1) + SLACK, "took {took:?}");
    });
}
