//! Whether a VM's agent can still answer: once the VM ends, every connection to its agent ends
//! with [`forkvm::Error::NotRunning`], waking the requests waiting on them, and no new one opens.
//!
//! The vsock sockets of a stopped VM stay open until its handle is dropped (a stopped VM can
//! still be captured), so nothing else would tell a waiting request; the VM's exit hook
//! ([`forkvm::Vm::on_exit`], registered once per VM) calls [`VmLife::end`].

use std::sync::{Mutex, Weak};

use forkvm::GuestExit;
use forkvm_devices::sync::lock;

use super::AgentError;

/// What the VM's end ends: a connection to its agent.
pub(crate) trait Ending: Send + Sync {
    /// The VM ended, with `exit` if known.
    fn vm_ended(&self, exit: Option<GuestExit>);
}

/// The error of a request to a VM that ended, with `exit` if known.
pub(crate) fn not_running(exit: Option<GuestExit>) -> AgentError {
    AgentError::Vm(Box::new(forkvm::Error::NotRunning(Box::new(exit))))
}

/// A VM's end, if it came, and the live connections to its agent.
#[derive(Default)]
pub(crate) struct VmLife {
    state: Mutex<LifeState>,
}

#[derive(Default)]
struct LifeState {
    /// `Some` once the VM ended, with its exit if known.
    ended: Option<Option<GuestExit>>,
    /// Pruned of dropped connections each time one is added, so at most twice the live ones.
    connections: Vec<Weak<dyn Ending>>,
}

impl VmLife {
    /// The VM ended with `exit`: ends every connection.
    pub(crate) fn end(&self, exit: Option<GuestExit>) {
        let connections = {
            let mut state = lock(&self.state);
            if state.ended.is_some() {
                return;
            }
            state.ended = Some(exit.clone());
            std::mem::take(&mut state.connections)
        };
        for connection in connections.iter().filter_map(Weak::upgrade) {
            connection.vm_ended(exit.clone());
        }
    }

    /// `Ok` until the VM ends; then its [`forkvm::Error::NotRunning`].
    pub(crate) fn check(&self) -> Result<(), AgentError> {
        match &lock(&self.state).ended {
            None => Ok(()),
            Some(exit) => Err(not_running(exit.clone())),
        }
    }

    /// Ends `connection` with the VM; fails at once if it ended.
    pub(crate) fn register(&self, connection: Weak<dyn Ending>) -> Result<(), AgentError> {
        let mut state = lock(&self.state);
        if let Some(exit) = &state.ended {
            return Err(not_running(exit.clone()));
        }
        state.connections.retain(|c| c.strong_count() > 0);
        state.connections.push(connection);
        Ok(())
    }
}
