//! Copy-on-write fork of running test guests on this host's KVM.

use forkvm::{ConsoleBuffer, ConsoleOutput, GuestExit, Vm};
use forkvm_tests::{read_u64, spinning_guest, test_guest_vm, wait_until_above};

#[test]
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
fn a_vm_that_was_not_started_cannot_be_forked() {
    let console = ConsoleBuffer::new();
    let unstarted = test_guest_vm("mode=spin", &console).build().unwrap();
    assert!(matches!(
        unstarted.fork(vec![ConsoleOutput::Discard]),
        Err(forkvm::Error::NotStarted)
    ));
}

#[test]
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
