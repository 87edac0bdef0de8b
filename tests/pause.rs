//! Pause and resume of running VMs on this host's KVM: a paused guest makes no progress and its
//! devices serve nothing until it resumes; stop and drop work while paused.

use std::time::{Duration, Instant};

use forkvm::{ConsoleBuffer, GuestExit};
use forkvm_tests::{read_u64, spinning_guest, test_guest_vm, wait_for_output, wait_until_above};

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_paused_guest_makes_no_progress_and_resumes_where_it_stopped() {
    let (vm, addr, _console) = spinning_guest(2);
    wait_until_above(&vm, addr, 0);
    vm.pause().unwrap();
    assert!(vm.is_paused());
    let frozen = read_u64(&vm, addr);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read_u64(&vm, addr), frozen, "the vCPU ran while paused");
    vm.pause().unwrap(); // pausing again changes nothing
    vm.resume().unwrap();
    assert!(!vm.is_paused());
    wait_until_above(&vm, addr, frozen);
    assert_eq!(vm.exit(), None);
    assert_eq!(vm.stop(), GuestExit::Stopped);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn many_pauses_in_a_row_all_take_effect() {
    let (vm, addr, _console) = spinning_guest(2);
    let mut last = wait_until_above(&vm, addr, 0);
    let mut pauses = Vec::new();
    for _ in 0..100 {
        let t0 = Instant::now();
        vm.pause().unwrap();
        pauses.push(t0.elapsed());
        let frozen = read_u64(&vm, addr);
        assert!(frozen >= last);
        assert_eq!(read_u64(&vm, addr), frozen);
        vm.resume().unwrap();
        last = frozen;
    }
    wait_until_above(&vm, addr, last);
    pauses.sort();
    eprintln!(
        "pause of a spinning 2-vCPU guest: median {:?}, max {:?}",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_paused_vm_serves_no_device_input_until_it_resumes() {
    let console = ConsoleBuffer::new();
    let (vm, writer) = forkvm_tests::echo_guest(&console);
    wait_for_output(&console, "forkvm test guest");
    vm.pause().unwrap();
    let before = console.text();
    std::io::Write::write_all(&mut &writer, b"paused-input").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        console.text(),
        before,
        "input reached the guest while paused"
    );
    vm.resume().unwrap();
    wait_for_output(&console, "paused-input");
    std::io::Write::write_all(&mut &writer, b"q").unwrap();
    assert_eq!(
        vm.wait().unwrap(),
        GuestExit::PoweredOff { status: Some(0) }
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn stop_and_drop_end_a_paused_vm() {
    let (vm, _, _console) = spinning_guest(2);
    vm.pause().unwrap();
    assert_eq!(vm.stop(), GuestExit::Stopped);
    assert!(!vm.is_paused());
    let (vm, _, _console) = spinning_guest(1);
    vm.pause().unwrap();
    drop(vm);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn pause_and_resume_need_a_running_vm() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=exit", &console).build().unwrap();
    assert!(matches!(vm.pause(), Err(forkvm::Error::NotStarted)));
    assert!(matches!(vm.resume(), Err(forkvm::Error::NotStarted)));
    vm.start().unwrap();
    vm.wait().unwrap();
    let err = vm.pause().unwrap_err();
    assert!(matches!(err, forkvm::Error::NotRunning(_)), "{err}");
    assert!(err.to_string().contains("ended"), "{err}");
    assert!(matches!(vm.resume(), Err(forkvm::Error::NotRunning(_))));
    let mut buf = [0u8; 8];
    assert!(matches!(
        vm.read_memory(u64::MAX - 3, &mut buf),
        Err(forkvm::Error::GuestAddress { .. })
    ));
}

/// A VM built with another kick signal pauses, forks and stops with it (its children too); an
/// offset that is no real-time signal is refused at build.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vm_with_its_own_kick_signal_pauses_forks_and_stops() {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm("mode=spin", &console)
        .vcpus(2)
        .kick_signal_offset(5)
        .build()
        .unwrap();
    vm.start().unwrap();
    let addr = forkvm_tests::hex_after(&console, "counter at ");
    wait_until_above(&vm, addr, 0);
    for _ in 0..20 {
        vm.pause().unwrap();
        let held = read_u64(&vm, addr);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(read_u64(&vm, addr), held);
        vm.resume().unwrap();
    }
    let child = vm.fork([forkvm::ConsoleOutput::Discard]).unwrap().remove(0);
    wait_until_above(&child, addr, read_u64(&child, addr));
    child.pause().unwrap();
    assert_eq!(child.stop(), GuestExit::Stopped);
    assert_eq!(vm.stop(), GuestExit::Stopped);
    let refused = test_guest_vm("mode=spin", &console)
        .kick_signal_offset(1000)
        .build();
    assert!(
        matches!(refused, Err(forkvm::Error::Setup { .. })),
        "{refused:?}"
    );
}
