//! The VM's state as KVM and its threads hold it: the KVM handle, VM and vCPUs ([`kvm`]), the
//! vCPU run loop and its kick signal ([`vcpu`]), the run state every thread shares (end, counted
//! pauses: [`run_state`]), the event loop serving devices ([`event_loop`]) and threads started
//! ahead ([`threads`]). Nothing here knows the builder, snapshots or the VM handle.

pub(crate) mod event_loop;
pub(crate) mod kvm;
pub(crate) mod run_state;
pub(crate) mod threads;
pub(crate) mod vcpu;

use crate::seccomp::SeccompPolicy;

/// How a VM's threads are set up: the signal that kicks its vCPUs out of `KVM_RUN` (its handler
/// installed) and the seccomp policy of its threads. A VM's children and spawned VMs get their
/// source's, unless a builder says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ThreadSetup {
    pub kick_signal: i32,
    pub seccomp: SeccompPolicy,
}
