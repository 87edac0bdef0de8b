//! The agent of a [`forkvm::Vm`]: [`VmAgentExt`], and the connection and life kept for it in
//! the VM's extensions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm::Vm;
use forkvm_agent_protocol::AGENT_PORT;
use forkvm_devices::sync::lock;

use super::life::VmLife;
use super::{Agent, AgentError, Connector, DEFAULT_REQUEST_TIMEOUT, ExecOutput};

/// Longest single attempt to reach the agent's port: a VM that ends during an attempt is noticed
/// after it, so this bounds how long [`VmAgentExt::agent`] takes to fail then.
const DIAL_ATTEMPT: Duration = Duration::from_secs(1);
/// Pause between attempts while the guest boots.
const DIAL_RETRY: Duration = Duration::from_millis(50);

/// A VM's agent connection, kept between calls to [`VmAgentExt::agent`], and its life (in the
/// VM's [`forkvm::Extensions`]).
#[derive(Default)]
struct AgentSlot {
    agent: Mutex<Option<Agent>>,
    /// Made, and tied to the VM's end, by the first call.
    life: Mutex<Option<Arc<VmLife>>>,
}

impl AgentSlot {
    /// The VM's life, tied to its end the first time.
    fn life(&self, vm: &Vm) -> Arc<VmLife> {
        let mut life = lock(&self.life);
        if let Some(life) = life.as_ref() {
            return life.clone();
        }
        let made = Arc::new(VmLife::default());
        let ending = Arc::downgrade(&made);
        vm.on_exit(move |exit| {
            if let Some(life) = ending.upgrade() {
                life.end(Some(exit.clone()));
            }
        });
        *life = Some(made.clone());
        made
    }
}

/// The guest agent of a [`forkvm::Vm`]: `use forkvm_agent_client::VmAgentExt` and call
/// `vm.agent(timeout)` or `vm.exec(argv)`.
pub trait VmAgentExt {
    /// The guest agent of this VM (forkvm's Linux image runs it as PID 1), connecting through
    /// the vsock device — and retrying while the guest boots — for at most `timeout`. The
    /// connection is kept for later calls and re-made if it was lost. Returns in about
    /// `timeout` at most (each attempt takes at most what is left of it; a timeout beyond the
    /// clock's range is no limit); at once [`forkvm::Error::NotStarted`] or
    /// [`forkvm::Error::NotRunning`] on a VM that never started or ended, and the latter when
    /// the VM ends while it waits. Requests on the agent it returns fail the same way once the
    /// VM ends, those waiting included.
    fn agent(&self, timeout: Duration) -> Result<Agent, AgentError>;

    /// Runs `argv` in the guest through its agent ([`VmAgentExt::agent`], waiting up to
    /// [`DEFAULT_REQUEST_TIMEOUT`] for it) and returns its output and status.
    fn exec<S: Into<String>>(
        &self,
        argv: impl IntoIterator<Item = S>,
    ) -> Result<ExecOutput, AgentError>;
}

impl VmAgentExt for Vm {
    fn agent(&self, timeout: Duration) -> Result<Agent, AgentError> {
        let vsock = self
            .vsock_dialer()
            .ok_or_else(|| AgentError::Vm(Box::new(forkvm::Error::NoVsock)))?;
        self.check_running()
            .map_err(|e| AgentError::Vm(Box::new(e)))?;
        let slot = self.extensions().get_or_default::<AgentSlot>();
        let life = slot.life(self);
        let mut slot = lock(&slot.agent);
        if let Some(agent) = slot.as_ref().filter(|a| a.is_connected()) {
            return Ok(agent.clone());
        }
        let connector: Connector = Arc::new(move |within| vsock.connect(AGENT_PORT, within));
        let generation = self.identity().generation;
        // `None`: no limit (a timeout too large for the clock).
        let deadline = Instant::now().checked_add(timeout);
        let left = || {
            deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            })
        };
        let agent = loop {
            life.check()?;
            let within = left();
            match Agent::open(
                connector.clone(),
                generation,
                within.min(DIAL_ATTEMPT),
                within,
                Some(life.clone()),
            ) {
                Ok(agent) => break agent,
                Err(e) if left().is_zero() => {
                    return Err(match e {
                        AgentError::NotReady(_) | AgentError::Vm(_) => e,
                        e => AgentError::NotReady(e.to_string()),
                    });
                }
                Err(e @ AgentError::Vm(_)) => return Err(e),
                Err(_) => {
                    life.check()?;
                    std::thread::sleep(DIAL_RETRY.min(left()));
                }
            }
        };
        *slot = Some(agent.clone());
        Ok(agent)
    }

    fn exec<S: Into<String>>(
        &self,
        argv: impl IntoIterator<Item = S>,
    ) -> Result<ExecOutput, AgentError> {
        self.agent(DEFAULT_REQUEST_TIMEOUT)?.exec(argv)
    }
}
