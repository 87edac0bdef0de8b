//! A VM's network on the test guest (which does not drive the device): the device is there, each
//! fork child gets a network of its own with the parent's policy at the fork (or the one its
//! `Child` gives) and no published ports, and a TAP interface can back the device instead.
//! Nothing here sends a packet: the networks' seams refuse every host socket.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;

use forkvm::network::{Connector, StaticResolver};
use forkvm::{Child, ConsoleOutput, DeviceKind, ErrorKind, Network, NetworkPolicy};
use forkvm_tests::spinning_guest_with;

/// Opens no host socket at all.
struct Nowhere;

impl Connector for Nowhere {
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{to}: test"),
        ))
    }
    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{to}: test"),
        ))
    }
}

fn network() -> Network {
    Network::user().seams(Arc::new(Nowhere), Arc::new(StaticResolver::new()))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn each_fork_child_gets_its_own_network_with_the_parents_policy_or_its_own() {
    let (vm, _, _) = spinning_guest_with(1, 32, |b| b.network(network().publish_local(0, 80)));
    assert!(vm.devices().iter().any(|d| d.kind == DeviceKind::Net));
    let parent = vm.network().expect("a network").clone();
    // Children prepared ahead make their networks ahead too, with the policy of then.
    vm.prepare_forks(2).unwrap();
    // Changed on the running VM: the children take the policy of the fork instant.
    parent.set_policy(NetworkPolicy::deny_all());
    let own = NetworkPolicy::public_internet().allow("127.0.0.1/32".parse().unwrap());
    let mut children = vm
        .fork([
            Child::new(ConsoleOutput::Discard),
            Child::new(ConsoleOutput::Discard).network(network().policy(own.clone())),
        ])
        .unwrap();
    let (second, first) = (children.pop().unwrap(), children.pop().unwrap());
    assert_eq!(vm.prepared_forks(), 0);
    assert_eq!(first.network().unwrap().policy(), NetworkPolicy::deny_all());
    assert_eq!(second.network().unwrap().policy(), own);
    // Their networks are their own: a policy change in one is seen in no other.
    first
        .network()
        .unwrap()
        .set_policy(NetworkPolicy::public_internet());
    assert_eq!(parent.policy(), NetworkPolicy::deny_all());
    // A published port stays the parent's: a child can publish the same guest port anew.
    let bound = first
        .network()
        .unwrap()
        .publish("127.0.0.1:0".parse().unwrap(), 80)
        .unwrap();
    assert!(bound.ip().is_loopback());
    for child in [first, second] {
        child.stop();
    }
    vm.stop();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vm_without_a_network_says_so_and_a_taken_port_fails_the_build() {
    let (vm, _, _) = spinning_guest_with(1, 32, |b| b);
    assert!(vm.network().is_none());
    assert_eq!(vm.connect_tcp(80).unwrap_err().kind(), ErrorKind::NoDevice);
    vm.stop();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let console = forkvm::ConsoleBuffer::new();
    let built = forkvm_tests::test_guest_vm("mode=spin", &console)
        .network(network().publish(taken.local_addr().unwrap(), 80))
        .build();
    let Err(error) = built else {
        panic!("built on a taken port")
    };
    assert_eq!(error.kind(), ErrorKind::Io);
    assert!(forkvm::error_chain(&error).contains("cannot publish"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_tap_interface_can_back_the_device_in_a_namespace_of_the_tests_own() {
    let outcome = std::thread::spawn(|| -> Result<(), String> {
        // SAFETY: unshare changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        let (vm, _, _) = spinning_guest_with(1, 32, |b| b.network(Network::tap("fvtap1")));
        assert!(vm.devices().iter().any(|d| d.kind == DeviceKind::Net));
        assert!(vm.network().is_none());
        // A fork child cannot share the interface: it gets a user-mode network of its own.
        let child = vm.fork([ConsoleOutput::Discard]).unwrap().remove(0);
        assert!(child.network().is_some());
        child.stop();
        vm.stop();
        Ok(())
    })
    .join()
    .unwrap();
    if let Err(why) = outcome {
        // Straight to the process's stderr: the test harness does not capture that, so the skip
        // shows in a normal run.
        let _ = writeln!(
            io::stderr(),
            "SKIPPED a_tap_interface_can_back_the_device_in_a_namespace_of_the_tests_own: {why}"
        );
    }
    // An impossible interface name fails the build with a readable error.
    let console = forkvm::ConsoleBuffer::new();
    let Err(error) = forkvm_tests::test_guest_vm("mode=spin", &console)
        .network(Network::tap("a-name-far-too-long-for-linux"))
        .build()
    else {
        panic!("built with a bad TAP name")
    };
    assert!(forkvm::error_chain(&error).contains("TAP"), "{error}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_restored_vm_gets_a_fresh_network_of_the_childs_choosing() {
    let (vm, _, _) = spinning_guest_with(1, 32, |b| {
        b.network(network().policy(NetworkPolicy::deny_all()))
    });
    let dir = std::env::temp_dir().join(format!("forkvm-net-snapshot-{}", std::process::id()));
    vm.snapshot(&dir).unwrap();
    vm.stop();
    let own = NetworkPolicy::public_internet().allow("127.0.0.1/32".parse().unwrap());
    let restored = forkvm::Vm::restore(
        &dir,
        Child::new(ConsoleOutput::Discard).network(network().policy(own.clone())),
    )
    .unwrap();
    assert_eq!(restored.network().unwrap().policy(), own);
    assert!(restored.devices().iter().any(|d| d.kind == DeviceKind::Net));
    restored.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
