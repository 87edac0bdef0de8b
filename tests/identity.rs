//! The identity page: a guest reads its generation and VM id, and sees them change when it
//! becomes a fork child or a restored snapshot.

use forkvm::Identity;
use forkvm::{ConsoleBuffer, ConsoleOutput, Vm};
use forkvm_tests::{test_guest_vm, wait_for_output};

/// The line the `generation` guest mode prints for `identity`.
fn line(identity: Identity) -> String {
    let id = u64::from_le_bytes(identity.id[..8].try_into().unwrap());
    format!("generation {} id {id:#x}\n", identity.generation)
}

fn fork_one(vm: &Vm) -> (Vm, ConsoleBuffer) {
    let console = ConsoleBuffer::new();
    let mut children = vm.fork([ConsoleOutput::Buffer(console.clone())]).unwrap();
    (children.remove(0), console)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_guest_reads_its_generation_and_id_and_sees_them_change_in_children() {
    let console = ConsoleBuffer::new();
    let parent = test_guest_vm("mode=generation", &console).build().unwrap();
    parent.start().unwrap();
    let first = parent.identity();
    assert_eq!(first.generation, 0);
    wait_for_output(&console, &line(first));
    assert!(
        console.text().contains("identity page read-only"),
        "{}",
        console.text()
    );

    let (a, a_console) = fork_one(&parent);
    let (b, b_console) = fork_one(&parent);
    for (child, console) in [(&a, &a_console), (&b, &b_console)] {
        let identity = child.identity();
        assert_eq!(identity.generation, 1);
        assert_ne!(identity.id, first.id);
        wait_for_output(console, &line(identity));
    }
    assert_ne!(a.identity().id, b.identity().id);

    let (grandchild, g_console) = fork_one(&a);
    assert_eq!(grandchild.identity().generation, 2);
    wait_for_output(&g_console, &line(grandchild.identity()));

    // Restoring a snapshot makes a new VM too.
    let dir = std::env::temp_dir().join(format!("forkvm-identity-{}", std::process::id()));
    parent.snapshot(&dir).unwrap();
    let r_console = ConsoleBuffer::new();
    let restored = Vm::restore(&dir, ConsoleOutput::Buffer(r_console.clone())).unwrap();
    assert_eq!(restored.identity().generation, 1);
    assert_ne!(restored.identity().id, first.id);
    wait_for_output(&r_console, &line(restored.identity()));
    let _ = std::fs::remove_dir_all(&dir);

    let text = console.text();
    assert_eq!(
        text.matches("generation ").count(),
        1,
        "the parent stays generation 0: {text}"
    );
    assert_eq!(parent.identity(), first);
}
