//! Copy-on-write fork of running test guests on this host's KVM.

use forkvm::{ConsoleBuffer, ConsoleOutput, GuestExit, Vm};
use forkvm_tests::{hex_after, read_u64, spinning_guest, test_guest_vm, wait_until_above};

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn children_continue_from_the_fork_point_and_run_on_their_own() {
    let (parent, addr, _console) = spinning_guest(1);
    wait_until_above(&parent, addr, 0);
    parent.pause().unwrap();
    let at_fork = read_u64(&parent, addr);
    let consoles = [ConsoleBuffer::new(), ConsoleBuffer::new()];
    let children = parent
        .fork(consoles.iter().map(|c| ConsoleOutput::Buffer(c.clone())))
        .unwrap();
    assert!(parent.is_paused(), "a paused parent stays paused");
    assert_eq!(read_u64(&parent, addr), at_fork);
    for child in &children {
        wait_until_above(child, addr, at_fork);
        assert_eq!(child.exit(), None);
    }
    assert_eq!(
        read_u64(&parent, addr),
        at_fork,
        "the children ran, the parent did not"
    );
    parent.resume().unwrap();
    wait_until_above(&parent, addr, at_fork);
    for child in &children {
        assert_eq!(child.stop(), GuestExit::Stopped);
    }
    assert_eq!(parent.stop(), GuestExit::Stopped);
}

/// Scratch memory the test guest does not use (it runs below 4 MiB and checks memory only
/// when asked to).
const SCRATCH: u64 = 20 << 20;

fn scratch(vm: &Vm) -> u64 {
    let mut bytes = [0u8; 8];
    vm.read_memory(SCRATCH, &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

fn set_scratch(vm: &Vm, value: u64) {
    vm.write_memory(SCRATCH, &value.to_le_bytes()).unwrap();
}

fn fork_quiet(vm: &Vm, n: usize) -> Vec<Vm> {
    vm.fork((0..n).map(|_| ConsoleOutput::Discard)).unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn no_vm_sees_another_vms_writes_after_a_fork_at_any_depth() {
    let (parent, addr, _console) = spinning_guest(2);
    wait_until_above(&parent, addr, 0);
    set_scratch(&parent, 7);
    let children = fork_quiet(&parent, 8);
    set_scratch(&parent, 1000);
    for (i, child) in children.iter().enumerate() {
        assert_eq!(scratch(child), 7, "child {i} starts from the fork point");
        set_scratch(child, i as u64 + 1);
    }
    assert_eq!(scratch(&parent), 1000);
    for (i, child) in children.iter().enumerate() {
        assert_eq!(
            scratch(child),
            i as u64 + 1,
            "child {i} sees only its own write"
        );
        wait_until_above(child, addr, 0);
    }
    // A fork of a fork starts from its parent's state, then diverges the same way.
    let grandchildren = fork_quiet(&children[3], 2);
    set_scratch(&grandchildren[0], 40);
    assert_eq!(scratch(&grandchildren[0]), 40);
    assert_eq!(scratch(&grandchildren[1]), 4);
    assert_eq!(scratch(&children[3]), 4);
    // A second fork of the parent carries what it wrote since the first.
    let later = fork_quiet(&parent, 1);
    assert_eq!(scratch(&later[0]), 1000);
    for vm in grandchildren.iter().chain(&children).chain(&later) {
        let before = read_u64(vm, addr);
        wait_until_above(vm, addr, before);
    }
    wait_until_above(&parent, addr, read_u64(&parent, addr));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vm_that_was_not_started_cannot_be_forked() {
    let console = ConsoleBuffer::new();
    let unstarted = test_guest_vm("mode=spin", &console).build().unwrap();
    assert!(matches!(
        unstarted.fork(vec![ConsoleOutput::Discard]),
        Err(forkvm::Error::NotStarted)
    ));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn prepared_children_are_used_first_and_behave_like_any_other() {
    let (parent, addr, _console) = spinning_guest(2);
    wait_until_above(&parent, addr, 0);
    parent.prepare_forks(2).unwrap();
    assert_eq!(parent.prepared_forks(), 2);
    set_scratch(&parent, 9);
    let children = fork_quiet(&parent, 3);
    assert_eq!(
        parent.prepared_forks(),
        0,
        "both prepared children were used"
    );
    for (i, child) in children.iter().enumerate() {
        assert_eq!(scratch(child), 9);
        set_scratch(child, 100 + i as u64);
        let now = read_u64(child, addr);
        wait_until_above(child, addr, now);
    }
    for (i, child) in children.iter().enumerate() {
        assert_eq!(scratch(child), 100 + i as u64);
    }
    assert_eq!(scratch(&parent), 9);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vm_keeps_children_prepared_in_the_background() {
    let (parent, addr, _console) = spinning_guest(1);
    wait_until_above(&parent, addr, 0);
    let wait_for = |n: usize| {
        let t0 = std::time::Instant::now();
        while parent.prepared_forks() != n {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(20),
                "{} prepared, not {n}",
                parent.prepared_forks()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    parent.keep_forks_ready(2);
    wait_for(2);
    let children = fork_quiet(&parent, 3);
    wait_for(2);
    for child in &children {
        let now = read_u64(child, addr);
        wait_until_above(child, addr, now);
    }
    parent.keep_forks_ready(0);
    drop(fork_quiet(&parent, 1));
    assert_eq!(
        parent.prepared_forks(),
        1,
        "no refill once it is switched off"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_fork_records_how_long_it_held_the_parent_paused() {
    let (parent, addr, _console) = spinning_guest(2);
    wait_until_above(&parent, addr, 0);
    assert_eq!(parent.last_pause(), None, "no fork yet");
    let children = fork_quiet(&parent, 1);
    let first = parent.last_pause().expect("the fork paused the parent");
    assert!(first > std::time::Duration::ZERO);
    assert!(!parent.is_paused(), "a running parent runs on");
    assert_eq!(children[0].last_pause(), None, "a child was never forked");
    // A second fork of the parent, which ran (and wrote) since, records its own pause.
    wait_until_above(&parent, addr, read_u64(&parent, addr));
    let _more = fork_quiet(&parent, 1);
    assert!(parent.last_pause().is_some());
    // A fork of a child records on the child.
    let _grandchild = fork_quiet(&children[0], 1);
    assert!(children[0].last_pause().is_some());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn repeated_forks_of_a_running_guest_carry_what_it_counted() {
    let (parent, addr, _console) = spinning_guest(1);
    wait_until_above(&parent, addr, 0);
    let mut previous = 0;
    let mut children = Vec::new();
    for round in 0..6u64 {
        // The guest writes its counter while each fork's draft copies, and the host writes too.
        set_scratch(&parent, round);
        let before = read_u64(&parent, addr);
        wait_until_above(&parent, addr, before);
        let child = fork_quiet(&parent, 1).remove(0);
        let started = read_u64(&child, addr);
        assert!(
            started > before && started >= previous,
            "round {round}: child from {started}, parent was at {before}, last child from {previous}"
        );
        assert_eq!(scratch(&child), round);
        wait_until_above(&child, addr, started);
        previous = started;
        children.push(child);
    }
    // Children are forked the same way, repeatedly.
    let child = &children[0];
    let mut previous = 0;
    for round in 0..3u64 {
        let before = read_u64(child, addr);
        wait_until_above(child, addr, before);
        let grandchild = fork_quiet(child, 1).remove(0);
        let started = read_u64(&grandchild, addr);
        assert!(started > before && started >= previous, "round {round}");
        assert_eq!(scratch(&grandchild), 0);
        previous = started;
    }
}

/// A paused VM's forks reuse what the first of them captured; once the VM ran again, a fork
/// captures anew. (A child forked from a stale capture would start where the parent paused
/// first, 200 ms of counting behind.)
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_fork_after_the_parent_ran_again_continues_from_its_new_state() {
    let (parent, addr, _console) = spinning_guest(2);
    wait_until_above(&parent, addr, 0);
    parent.pause().unwrap();
    let first_pause = read_u64(&parent, addr);
    for _ in 0..2 {
        let child = fork_quiet(&parent, 1).remove(0);
        wait_until_above(&child, addr, first_pause);
    }
    parent.resume().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    parent.pause().unwrap();
    let second_pause = read_u64(&parent, addr);
    assert!(second_pause > first_pause);
    let child = fork_quiet(&parent, 1).remove(0);
    child.pause().unwrap();
    assert!(
        read_u64(&child, addr) >= second_pause,
        "the child continues from the second pause"
    );
}

/// After a fork, each VM counts only the memory it holds on its own: a child starts with what its
/// guest wrote since the fork, and grows by what it writes.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_child_counts_only_the_memory_it_writes() {
    let (parent, addr, _console) = spinning_guest(1);
    wait_until_above(&parent, addr, 0);
    parent.pause().unwrap();
    let child = fork_quiet(&parent, 1).remove(0);
    child.pause().unwrap();
    let fresh = child.memory_allocated_bytes().unwrap();
    assert!(fresh < 64 << 10, "a fresh child holds {fresh} bytes");
    for page in 0..256u64 {
        child.write_memory(SCRATCH + page * 4096, &[1]).unwrap();
    }
    assert_eq!(child.memory_allocated_bytes().unwrap(), fresh + (1 << 20));
    assert_eq!(
        parent.memory_allocated_bytes().unwrap(),
        0,
        "the paused parent wrote nothing since"
    );
}

/// Forks, pauses, resumes and snapshots of one VM from several threads at once: every fork
/// point is one instant (the guest of `mode=spin-check` keeps its count in a register and in
/// memory and exits with EXIT_TORN when a child starts from a register state and a memory taken
/// at different instants), a user's pause holds while other threads fork, and a stop in the
/// middle of it all ends every thread's loop with errors, not hangs. (Fails on the flag-pause
/// design this replaced: a resume between a fork's pause and its capture tore the fork point.)
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn concurrent_lifecycle_calls_never_tear_a_fork_point() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    let console = ConsoleBuffer::new();
    // Devices make a capture longer (their state is read too).
    let vm = test_guest_vm("mode=spin-check", &console)
        .vcpus(2)
        .rng()
        .vsock(forkvm::VsockConfig::new(3))
        .build()
        .unwrap();
    vm.start().unwrap();
    let addr = hex_after(&console, "counter at ");
    wait_until_above(&vm, addr, 0);
    let dir = std::env::temp_dir().join(format!("forkvm-concurrent-{}", std::process::id()));
    let done = AtomicBool::new(false);
    let (forks, snapshots, pauses, captures) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    // A child's guest checks its counters at its first step; it has run a thousand steps
    // (or ended) soon after.
    let check = |child: &Vm, what: &str| {
        let start = read_u64(child, addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.exit().is_none() && read_u64(child, addr) < start + 1000 {
            assert!(Instant::now() < deadline, "{what} makes no progress");
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(child.exit(), None, "{what} started from a torn fork point");
        child.stop();
    };
    let end = Instant::now() + Duration::from_secs(4);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    let Ok(children) = vm.fork([ConsoleOutput::Discard]) else {
                        break;
                    };
                    forks.fetch_add(1, Ordering::SeqCst);
                    for child in &children {
                        check(child, "a fork child");
                    }
                }
            });
        }
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if vm.snapshot(&dir).is_err() {
                    break;
                }
                let restored = Vm::restore(&dir, ConsoleOutput::Discard).unwrap();
                check(&restored, "a restored VM");
                snapshots.fetch_add(1, Ordering::SeqCst);
            }
        });
        // A user's pause and resume, against the other threads' resumes and forks.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                if vm.pause().is_err() || vm.resume().is_err() {
                    break;
                }
            }
        });
        // A pause hold of its own: no other thread's resume, fork or snapshot lets the VM run.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let Ok(hold) = vm.pause_guard() else {
                    break;
                };
                let held = read_u64(&vm, addr);
                std::thread::sleep(Duration::from_micros(300));
                if vm.exit().is_none() {
                    assert_eq!(held, read_u64(&vm, addr), "the VM ran during a pause");
                }
                drop(hold);
                pauses.fetch_add(1, Ordering::SeqCst);
            }
        });
        // A held snapshot: each VM spawned from it starts with the count it captured.
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let Ok(snapshot) = vm.capture() else {
                    break;
                };
                let mut bytes = [0; 8];
                snapshot.read_memory(addr, &mut bytes).unwrap();
                let captured = u64::from_le_bytes(bytes);
                for _ in 0..2 {
                    let child = snapshot.spawn(ConsoleOutput::Discard).unwrap();
                    child.pause().unwrap();
                    assert!(read_u64(&child, addr) >= captured);
                    child.resume().unwrap();
                    check(&child, "a VM spawned from a held snapshot");
                }
                captures.fetch_add(1, Ordering::SeqCst);
            }
        });
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let _ = vm.resume();
                std::thread::yield_now();
            }
        });
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A stop while everything else goes on: every loop ends.
        vm.stop();
        done.store(true, Ordering::SeqCst);
    });
    let _ = std::fs::remove_dir_all(&dir);
    let counts = [forks, snapshots, pauses, captures].map(AtomicUsize::into_inner);
    eprintln!("forks, snapshots, pause holds, held captures: {counts:?}");
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
}

/// `start` on a VM that already runs (a fork child runs from its start) changes nothing: the
/// child can still be paused, forked, snapshotted and stopped (Python's `with child:` starts it).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn starting_a_running_fork_child_changes_nothing() {
    let (parent, addr, _console) = spinning_guest(1);
    wait_until_above(&parent, addr, 0);
    let child = fork_quiet(&parent, 1).remove(0);
    assert!(matches!(child.start(), Err(forkvm::Error::AlreadyStarted)));
    assert!(matches!(parent.start(), Err(forkvm::Error::AlreadyStarted)));
    child.pause().unwrap();
    let grandchild = fork_quiet(&child, 1).remove(0);
    let dir = std::env::temp_dir().join(format!("forkvm-restart-{}", std::process::id()));
    child.snapshot(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    child.resume().unwrap();
    wait_until_above(&child, addr, read_u64(&child, addr));
    wait_until_above(&grandchild, addr, read_u64(&grandchild, addr));
    assert_eq!(child.stop(), GuestExit::Stopped);
    assert!(matches!(child.start(), Err(forkvm::Error::AlreadyStarted)));
    assert_eq!(grandchild.stop(), GuestExit::Stopped);
    assert_eq!(parent.stop(), GuestExit::Stopped);
}

/// Pause holds are counted: the VM runs again only when the last is released, and a user's
/// `resume` releases only the user's own pause.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vm_runs_again_only_when_the_last_pause_hold_is_released() {
    let (vm, addr, _console) = spinning_guest(2);
    wait_until_above(&vm, addr, 0);
    let first = vm.pause_guard().unwrap();
    let second = vm.pause_guard().unwrap();
    vm.pause().unwrap();
    let held = read_u64(&vm, addr);
    vm.resume().unwrap();
    drop(first);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(vm.is_paused());
    assert_eq!(read_u64(&vm, addr), held, "one hold is left");
    // A fork of the held VM leaves it held.
    let child = fork_quiet(&vm, 1).remove(0);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(read_u64(&vm, addr), held, "the fork let the VM run");
    drop(second);
    wait_until_above(&vm, addr, held);
    assert!(!vm.is_paused());
    child.stop();
    vm.stop();
    assert!(matches!(
        vm.pause_guard(),
        Err(forkvm::Error::NotRunning(_))
    ));
}

/// A held snapshot spawns VMs that continue from its instant however long after, and however the
/// source ran meanwhile; it saves to a directory that restores the same, and a builder spawns
/// from it with its own KVM device.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_held_snapshot_spawns_saves_and_builds_from_its_instant() {
    let (vm, addr, _console) = spinning_guest(1);
    wait_until_above(&vm, addr, 0);
    set_scratch(&vm, 5);
    let snapshot = vm.capture().unwrap();
    assert!(!vm.is_paused(), "a running VM runs on after a capture");
    set_scratch(&vm, 6);
    let mut bytes = [0; 8];
    snapshot.read_memory(SCRATCH, &mut bytes).unwrap();
    assert_eq!(u64::from_le_bytes(bytes), 5);
    snapshot.prepare(1).unwrap();
    assert_eq!(snapshot.prepared(), 1);
    let a = snapshot.spawn(ConsoleOutput::Discard).unwrap();
    assert_eq!(snapshot.prepared(), 0, "the prepared child was used");
    let b = snapshot.spawn(ConsoleOutput::Discard).unwrap();
    assert_eq!(scratch(&a), 5);
    assert_eq!(scratch(&b), 5);
    assert_eq!(a.identity().generation, vm.identity().generation + 1);
    let dir = std::env::temp_dir().join(format!("forkvm-held-{}", std::process::id()));
    snapshot.save(&dir).unwrap();
    let loaded = forkvm::Snapshot::load(&dir).unwrap();
    assert_eq!(loaded.memory_size(), snapshot.memory_size());
    assert_eq!(loaded.vcpus(), 1);
    // Kept ready in the background: each restore in a row finds a child prepared.
    loaded.keep_ready(2).unwrap();
    let ready = |n: usize| {
        let t0 = std::time::Instant::now();
        while loaded.prepared() < n {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "never {n} prepared"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    ready(2);
    let again = loaded.spawn(ConsoleOutput::Discard).unwrap();
    ready(2);
    assert_eq!(scratch(&again), 5);
    drop(again);
    loaded.keep_ready(0).unwrap();
    let restored = loaded.spawn(ConsoleOutput::Discard).unwrap();
    assert_eq!(scratch(&restored), 5);
    assert_eq!(loaded.prepared(), 1, "not refilled once told to stop");
    let built = forkvm::VmBuilder::new()
        .kvm_device("/dev/kvm")
        .build_from_snapshot(&snapshot, ConsoleOutput::Discard)
        .unwrap();
    assert_eq!(scratch(&built), 5);
    let refused = forkvm::VmBuilder::new()
        .kvm_device("/nonexistent/kvm")
        .build_from_snapshot(&loaded, ConsoleOutput::Discard);
    assert!(refused.is_err(), "the builder's KVM device is used");
    let _ = std::fs::remove_dir_all(&dir);
    for spawned in [&a, &b, &restored, &built] {
        wait_until_above(spawned, addr, read_u64(spawned, addr));
        spawned.stop();
    }
    vm.stop();
}
