//! Whether a VM's agent can still answer: once the VM ends, every connection to its agent ends
//! with [`forkvm::Error::NotRunning`], waking the requests waiting on them, and no new one opens.
//!
//! The vsock sockets of a stopped VM stay open until its handle is dropped (a stopped VM can
//! still be captured), so nothing else would tell a waiting request; the VM's exit hook
//! ([`forkvm::Vm::on_exit`], registered once per VM) calls [`VmLife::end`].

use std::sync::{Arc, Mutex, Weak};

use forkvm::GuestExit;
use forkvm_devices::sync::lock;

use super::AgentError;
use super::connection::{Ended, Shared};

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
    connections: Vec<Weak<Shared>>,
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
            connection.end(Ended::NotRunning(exit.clone()));
        }
    }

    /// `Ok` until the VM ends; then its [`forkvm::Error::NotRunning`].
    pub(crate) fn check(&self) -> Result<(), AgentError> {
        match &lock(&self.state).ended {
            None => Ok(()),
            Some(exit) => Err(Ended::NotRunning(exit.clone()).error()),
        }
    }

    /// Ends `connection` with the VM; fails at once if it ended.
    pub(super) fn register(&self, connection: &Arc<Shared>) -> Result<(), AgentError> {
        let mut state = lock(&self.state);
        if let Some(exit) = &state.ended {
            return Err(Ended::NotRunning(exit.clone()).error());
        }
        state.connections.retain(|c| c.strong_count() > 0);
        state.connections.push(Arc::downgrade(connection));
        Ok(())
    }
}
