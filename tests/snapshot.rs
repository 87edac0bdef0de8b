//! Snapshot and restore of a running test guest on this host's KVM.

use std::path::PathBuf;

use forkvm::{ConsoleOutput, GuestExit, STATE_FILE, Vm};
use forkvm_tests::{read_u64, rewrite_snapshot_state, spinning_guest, wait_until_above};

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
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
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
    assert_eq!(
        names.len(),
        3,
        "only the memory, state and checksum files: {names:?}"
    );

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

/// Waits until `dir` has `n` restores ready (they are made in the background).
fn wait_for_ready(dir: &PathBuf, n: usize) {
    let t0 = std::time::Instant::now();
    while Vm::restores_ready(dir) != n {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "{} restores ready, not {n}",
            Vm::restores_ready(dir)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A directory kept ready restores into prepared children, refilled after each restore; a
/// snapshot saved over it is loaded anew (its state, not the kept one), and 0 lets it go.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn restores_of_a_directory_kept_ready_use_prepared_children_until_it_is_saved_over() {
    let dir = snapshot_dir("kept");
    let (vm, addr, _console) = spinning_guest(2);
    wait_until_above(&vm, addr, 0);
    vm.write_memory(SCRATCH, &7u64.to_le_bytes()).unwrap();
    vm.snapshot(&dir).unwrap();
    assert_eq!(Vm::restores_ready(&dir), 0, "not kept ready yet");
    Vm::keep_restores_ready(&dir, 2).unwrap();
    wait_for_ready(&dir, 2);

    let a = restore(&dir);
    assert_eq!(read_u64(&a, SCRATCH), 7);
    wait_until_above(&a, addr, 0);
    wait_for_ready(&dir, 2);

    // Saved over: the kept snapshot is stale and forgotten; restores show the new state.
    vm.write_memory(SCRATCH, &9u64.to_le_bytes()).unwrap();
    vm.snapshot(&dir).unwrap();
    assert_eq!(
        Vm::restores_ready(&dir),
        0,
        "a replaced snapshot is not kept"
    );
    let b = restore(&dir);
    assert_eq!(read_u64(&b, SCRATCH), 9, "the snapshot saved last");

    Vm::keep_restores_ready(&dir, 1).unwrap();
    wait_for_ready(&dir, 1);
    Vm::keep_restores_ready(&dir, 0).unwrap();
    assert_eq!(Vm::restores_ready(&dir), 0);
    assert!(Vm::keep_restores_ready(dir.join("missing"), 1).is_err());
    for v in [&a, &b, &vm] {
        v.stop();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
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

    rewrite_snapshot_state(
        &dir,
        &state.replacen(
            &format!("\"format\":{}", forkvm::SNAPSHOT_FORMAT),
            "\"format\":99",
            1,
        ),
    );
    let err = refusal(&dir);
    assert!(err.contains("snapshot format"), "{err}");

    let other_cpu = state.replacen("\"host_cpu\":\"", "\"host_cpu\":\"OtherVendor ", 1);
    rewrite_snapshot_state(&dir, &other_cpu);
    let err = refusal(&dir);
    assert!(err.contains("host CPU"), "{err}");

    rewrite_snapshot_state(&dir, "{ not json");
    let err = refusal(&dir);
    assert!(err.contains("not a usable snapshot"), "{err}");

    std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
    let err = refusal(&dir);
    assert!(err.contains("did not finish"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The console-echo guest is snapshotted once its banner is out; each of two restores gets its
/// own virtio console ends, and each echoes exactly its own input.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_devices_are_snapshotted_with_their_queues_and_continue_after_restore() {
    use std::io::Write;

    use forkvm::{Child, ConsoleBuffer, ConsoleInput};

    let serial = ConsoleBuffer::new();
    let hvc = ConsoleBuffer::new();
    let parent = forkvm_tests::test_guest_vm("mode=virtio-console", &serial)
        .rng()
        .virtio_console(ConsoleOutput::Buffer(hvc.clone()), None)
        .vsock(forkvm::VsockConfig::new(3))
        .build()
        .unwrap();
    parent.start().unwrap();
    forkvm_tests::wait_for_output(&hvc, "virtio-console ready\n");
    let dir = snapshot_dir("virtio");
    parent.snapshot(&dir).unwrap();
    parent.stop();
    let state = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
    assert!(state.contains("\"Console\""), "{state}");

    let restores: Vec<_> = (0..2)
        .map(|i| {
            let (serial, hvc) = (ConsoleBuffer::new(), ConsoleBuffer::new());
            let (reader, mut writer) = std::io::pipe().unwrap();
            let vm = Vm::restore(
                &dir,
                Child::new(ConsoleOutput::Buffer(serial.clone())).virtio_console(
                    ConsoleOutput::Buffer(hvc.clone()),
                    Some(ConsoleInput::Fd(reader.into())),
                ),
            )
            .unwrap();
            assert_eq!(vm.devices().len(), 3);
            writer
                .write_all(format!("restore {i}\x04").as_bytes())
                .unwrap();
            (vm, serial, hvc, writer)
        })
        .collect();
    for (i, (vm, serial, hvc, _)) in restores.iter().enumerate() {
        assert_eq!(
            vm.wait().unwrap(),
            GuestExit::PoweredOff { status: Some(0) },
            "{}",
            serial.text()
        );
        assert_eq!(hvc.text(), format!("RESTORE {i}"));
    }
    // A device moved onto a line that is not a virtio IRQ is refused.
    let tampered = state.replacen("\"irq\":5", "\"irq\":99", 1);
    assert_ne!(tampered, state);
    rewrite_snapshot_state(&dir, &tampered);
    let Err(err) = Vm::restore(&dir, ConsoleOutput::Discard) else {
        panic!("restored a device on IRQ 99");
    };
    assert!(err.to_string().contains("not a free virtio slot"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A disk is part of a snapshot: the parent's later writes do not reach it, and each VM
/// restored from it writes its own copy.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_snapshot_keeps_the_disk_as_it_was_and_restores_write_privately() {
    use forkvm::ConsoleBuffer;
    use forkvm_tests::BlkMailbox;

    let bytes = vec![7u8; 64 * 512];
    let image = forkvm_tests::TempFile::with_contents("snapshot.img", &bytes);
    let serial = ConsoleBuffer::new();
    let parent = forkvm_tests::test_guest_vm("mode=blk-mailbox", &serial)
        .block(image.path(), false)
        .build()
        .unwrap();
    parent.start().unwrap();
    let mailbox = BlkMailbox::find(&serial);
    mailbox.write(&parent, &serial, 0x1111);
    let dir = snapshot_dir("disk");
    parent.snapshot(&dir).unwrap();
    mailbox.write(&parent, &serial, 0x2222);
    let disk = dir.join(format!("{}0", forkvm::DISK_FILE_PREFIX));
    let saved = std::fs::read(&disk).unwrap();
    assert_eq!(saved.len(), bytes.len());
    assert_eq!(
        u64::from_le_bytes(saved[1024..1032].try_into().unwrap()),
        0x1111
    );
    assert_eq!(saved[0], 7, "the rest of the disk is saved too");

    let restored: Vec<_> = (0..2)
        .map(|_| {
            let console = ConsoleBuffer::new();
            let vm = Vm::restore(&dir, ConsoleOutput::Buffer(console.clone())).unwrap();
            (vm, console)
        })
        .collect();
    for (vm, console) in &restored {
        assert_eq!(mailbox.read(vm, console), 0x1111);
    }
    mailbox.write(&restored[0].0, &restored[0].1, 0x3333);
    assert_eq!(mailbox.read(&restored[1].0, &restored[1].1), 0x1111);
    assert_eq!(mailbox.read(&restored[0].0, &restored[0].1), 0x3333);
    assert_eq!(mailbox.read(&parent, &serial), 0x2222);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        saved,
        "restored VMs never write the snapshot"
    );
    for (vm, _) in &restored {
        mailbox.exit(vm);
    }
    mailbox.exit(&parent);
    // A disk file outside the snapshot is refused.
    let state = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
    let tampered = state.replacen("\"file\":\"disk-0\"", "\"file\":\"../disk-0\"", 1);
    assert_ne!(tampered, state);
    rewrite_snapshot_state(&dir, &tampered);
    let Err(err) = Vm::restore(&dir, ConsoleOutput::Discard) else {
        panic!("restored a disk from outside the snapshot");
    };
    assert!(
        err.to_string().contains("not this device's disk file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
