//! Snapshot and restore of a running test guest on this host's KVM.

use std::path::PathBuf;

use forkvm::{ConsoleOutput, GuestExit, STATE_FILE, Vm};
use forkvm_tests::{read_u64, spinning_guest, wait_until_above};

/// Scratch memory the spinning test guest does not use.
const SCRATCH: u64 = 20 << 20;

fn snapshot_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn restore(dir: &PathBuf) -> Vm {
    Vm::restore(dir, ConsoleOutput::Discard).unwrap()
}

#[test]
fn a_snapshot_restores_twice_into_independent_vms_that_continue_from_it() {
    let dir = snapshot_dir("twice");
    let (vm, addr, _console) = spinning_guest(2);
    wait_until_above(&vm, addr, 0);
    vm.write_memory(SCRATCH, &7u64.to_le_bytes()).unwrap();
    vm.pause().unwrap();
    let at_snapshot = read_u64(&vm, addr);
    vm.snapshot(&dir).unwrap();
    assert!(vm.is_paused(), "a paused VM stays paused");
    vm.resume().unwrap();
    vm.write_memory(SCRATCH, &8u64.to_le_bytes()).unwrap();

    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "only the memory and state files: {names:?}");

    let a = restore(&dir);
    let b = restore(&dir);
    for restored in [&a, &b] {
        assert_eq!(read_u64(restored, SCRATCH), 7, "memory as at the snapshot");
        assert!(read_u64(restored, addr) >= at_snapshot);
        wait_until_above(restored, addr, at_snapshot);
    }
    a.write_memory(SCRATCH, &1u64.to_le_bytes()).unwrap();
    assert_eq!(read_u64(&b, SCRATCH), 7, "restored VMs do not share writes");
    assert_eq!(read_u64(&vm, SCRATCH), 8);
    for v in [&a, &b, &vm] {
        assert_eq!(v.stop(), GuestExit::Stopped);
    }
    // Restoring again after the first restores ended still works: the files are unchanged.
    let c = restore(&dir);
    assert_eq!(read_u64(&c, SCRATCH), 7);
    c.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn incomplete_or_foreign_snapshots_are_refused() {
    let dir = snapshot_dir("refused");
    let (vm, _, _console) = spinning_guest(1);
    vm.snapshot(&dir).unwrap();
    vm.stop();
    let state = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
    let refusal = |dir: &PathBuf| match Vm::restore(dir, ConsoleOutput::Discard) {
        Ok(_) => panic!("restored a snapshot that should be refused"),
        Err(e) => e.to_string(),
    };

    std::fs::write(
        dir.join(STATE_FILE),
        state.replacen(
            &format!("\"format\":{}", forkvm::SNAPSHOT_FORMAT),
            "\"format\":99",
            1,
        ),
    )
    .unwrap();
    let err = refusal(&dir);
    assert!(err.contains("snapshot format"), "{err}");

    let other_cpu = state.replacen("\"host_cpu\":\"", "\"host_cpu\":\"OtherVendor ", 1);
    std::fs::write(dir.join(STATE_FILE), other_cpu).unwrap();
    let err = refusal(&dir);
    assert!(err.contains("host CPU"), "{err}");

    std::fs::write(dir.join(STATE_FILE), "{ not json").unwrap();
    let err = refusal(&dir);
    assert!(err.contains("not a usable snapshot"), "{err}");

    std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
    let err = refusal(&dir);
    assert!(err.contains("did not finish"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_vm_with_virtio_devices_is_not_snapshotted_yet_and_runs_on() {
    let console = forkvm::ConsoleBuffer::new();
    let vm = forkvm_tests::test_guest_vm("mode=spin", &console)
        .rng()
        .build()
        .unwrap();
    vm.start().unwrap();
    forkvm_tests::wait_for_output(&console, "spinning");
    let dir = snapshot_dir("virtio");
    let err = vm
        .snapshot(&dir)
        .expect_err("snapshot with a virtio device");
    assert!(matches!(err, forkvm::Error::Unsupported { .. }), "{err}");
    assert!(!dir.join(STATE_FILE).exists());
    assert!(!vm.is_paused());
    assert_eq!(vm.exit(), None);
}
