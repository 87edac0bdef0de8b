//! [`NetworkHandle`]: what the embedder holds to steer a running network from any thread. The
//! policy, the counters and the denial callbacks are shared with the event loop; connects and
//! published ports travel to the loop as commands over a bounded channel plus the loop's control
//! eventfd. No call waits for the loop, so a stopped VM never blocks a caller.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vmm_sys_util::eventfd::EventFd;

use crate::dns::DnsStats;
use crate::policy::{DenyReason, NetworkPolicy, Protocol};

/// Commands waiting for the loop, at most.
pub(crate) const COMMAND_QUEUE: usize = 256;
/// Denied flows waiting for the `on_denied` callbacks, at most (more are counted, not told).
pub(crate) const DENIED_QUEUE: usize = 1024;

/// A flow the policy refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedFlow {
    /// Its transport.
    pub protocol: Protocol,
    /// The destination the policy judged (the gateway already mapped to the host's loopback).
    pub destination: SocketAddr,
    /// The destination as the guest dialled it.
    pub dialled: SocketAddrV4,
    /// Why.
    pub reason: DenyReason,
}

/// Counters of one VM's network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Frames the guest sent.
    pub frames_from_guest: u64,
    /// Frames queued for the guest.
    pub frames_to_guest: u64,
    /// Frames dropped: unusable guest frames (IPv6, fragments, malformed, foreign source) and
    /// frames lost at a full queue or after the network went down.
    pub frames_dropped: u64,
    /// TCP flows open now.
    pub tcp_flows_open: u64,
    /// TCP flows opened in total (both directions).
    pub tcp_flows_total: u64,
    /// Guest connections reset without a policy decision: flow or handshake cap, an address in
    /// the guest's own network, or a host connect that failed.
    pub tcp_rejected: u64,
    /// UDP flows open now.
    pub udp_flows_open: u64,
    /// UDP flows opened in total.
    pub udp_flows_total: u64,
    /// Flows the policy denied.
    pub denied_total: u64,
    /// The same, by reason.
    pub denied_by_reason: HashMap<DenyReason, u64>,
    /// The DNS forwarder's counters.
    pub dns: DnsStats,
    /// Whether the network went down after an internal error (a panic it contained).
    pub down: bool,
}

/// A callback on denied flows.
pub(crate) type DeniedCallback = Arc<dyn Fn(&DeniedFlow) + Send + Sync>;

/// What the handle and the loop share.
pub(crate) struct Shared {
    pub(crate) policy: RwLock<NetworkPolicy>,
    pub(crate) stats: Mutex<NetworkStats>,
    pub(crate) callbacks: Mutex<Vec<DeniedCallback>>,
    /// Denied flows on their way to the callbacks.
    untold: Mutex<Untold>,
    pub(crate) published: Mutex<HashSet<SocketAddr>>,
    /// The guest's TCP connections the network carries now, as of the loop's last turn.
    pub(crate) connections: Mutex<Vec<GuestConnection>>,
}

impl Shared {
    pub(crate) fn new(policy: NetworkPolicy) -> Self {
        Self {
            policy: RwLock::new(policy),
            stats: Mutex::new(NetworkStats::default()),
            callbacks: Mutex::new(Vec::new()),
            untold: Mutex::new(Untold::default()),
            published: Mutex::new(HashSet::new()),
            connections: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn policy(&self) -> NetworkPolicy {
        match self.policy.read() {
            Ok(policy) => policy.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn stats(&self) -> MutexGuard<'_, NetworkStats> {
        lock(&self.stats)
    }

    /// Tells the callbacks of `flow` on one of the network's worker threads (`outside.rs`), in
    /// the order the flows were denied; a panicking callback is contained and logged. Never
    /// waits for a callback: at most [`DENIED_QUEUE`] flows wait, the rest are only counted.
    pub(crate) fn denied(self: &Arc<Self>, flow: &DeniedFlow) {
        if lock(&self.callbacks).is_empty() {
            return;
        }
        let mut untold = lock(&self.untold);
        if untold.flows.len() >= DENIED_QUEUE {
            if untold.dropped == 0 {
                log::warn!("forkvm-net: on_denied callbacks fall behind; flows go untold");
            }
            untold.dropped += 1;
            return;
        }
        untold.flows.push_back(flow.clone());
        if untold.delivering {
            return;
        }
        untold.delivering = true;
        let shared = self.clone();
        if let Err(e) = crate::outside::submit(move || shared.tell()) {
            log::warn!("forkvm-net: cannot tell the on_denied callbacks: {e}");
            untold.delivering = false;
            untold.dropped += untold.flows.len() as u64;
            untold.flows.clear();
        }
    }

    /// Runs on a worker: calls the callbacks on every waiting flow, until none waits.
    fn tell(&self) {
        loop {
            let flows = {
                let mut untold = lock(&self.untold);
                if untold.flows.is_empty() {
                    untold.delivering = false;
                    return;
                }
                std::mem::take(&mut untold.flows)
            };
            let callbacks = lock(&self.callbacks).clone();
            for flow in &flows {
                for callback in &callbacks {
                    let call = std::panic::AssertUnwindSafe(|| callback(flow));
                    if std::panic::catch_unwind(call).is_err() {
                        log::error!("forkvm-net: an on_denied callback panicked");
                    }
                }
            }
        }
    }
}

/// Denied flows the callbacks have not been told of yet.
#[derive(Default)]
struct Untold {
    flows: VecDeque<DeniedFlow>,
    /// Whether a worker is telling them.
    delivering: bool,
    /// Flows never told (the queue was full).
    dropped: u64,
}

/// Locks `mutex`, taking the data of a poisoned one (the counters stay usable).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Requests to the loop.
pub(crate) enum Command {
    /// Bridge `stream` to a new connection to the guest's `guest_port`.
    Connect { guest_port: u16, stream: UnixStream },
    /// Accept on `listener` and bridge each connection to `guest_port`.
    Publish {
        listener: TcpListener,
        guest_port: u16,
    },
    /// Stop accepting on the listener bound to this address.
    Unpublish(SocketAddr),
}

/// One TCP connection of the guest: its own end, and the other end as the guest sees it.
pub type GuestConnection = (SocketAddrV4, SocketAddrV4);

/// Steers one VM's user-mode network from any thread. Cheap to clone.
#[derive(Clone)]
pub struct NetworkHandle {
    shared: Arc<Shared>,
    commands: SyncSender<Command>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for NetworkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkHandle").finish_non_exhaustive()
    }
}

impl NetworkHandle {
    pub(crate) fn new(
        shared: Arc<Shared>,
        commands: SyncSender<Command>,
        wake: Arc<EventFd>,
    ) -> Self {
        Self {
            shared,
            commands,
            wake,
        }
    }

    /// Replaces the policy; flows opened from now on are judged by it (open flows stay).
    pub fn set_policy(&self, policy: NetworkPolicy) {
        match self.shared.policy.write() {
            Ok(mut current) => *current = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> NetworkPolicy {
        self.shared.policy()
    }

    /// The counters, as of the loop's last turn.
    pub fn stats(&self) -> NetworkStats {
        self.shared.stats().clone()
    }

    /// Calls `callback` for every flow the policy denies, soon after, in order, on one of the
    /// network's worker threads (never the VM's event loop; a panic in it is contained). If the
    /// callbacks fall more than 1,024 flows behind, the flows beyond are counted in
    /// [`NetworkStats::denied_total`] but not told.
    pub fn on_denied(&self, callback: Box<dyn Fn(&DeniedFlow) + Send + Sync>) {
        lock(&self.shared.callbacks).push(Arc::from(callback));
    }

    /// Connects to the guest's TCP `guest_port` from inside the process (no host listener): the
    /// returned stream carries the connection. When the guest refuses, or the network is down,
    /// the stream reads end-of-file.
    pub fn connect_tcp(&self, guest_port: u16) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        self.send(Command::Connect {
            guest_port,
            stream: theirs,
        })?;
        Ok(ours)
    }

    /// Listens on `host` (a TCP address the embedder chose, normally 127.0.0.1 with port 0) and
    /// bridges each accepted connection to the guest's `guest_port`. Returns the bound address.
    pub fn publish(&self, host: SocketAddr, guest_port: u16) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(host)?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?;
        lock(&self.shared.published).insert(bound);
        if let Err(e) = self.send(Command::Publish {
            listener,
            guest_port,
        }) {
            lock(&self.shared.published).remove(&bound);
            return Err(e);
        }
        Ok(bound)
    }

    /// The guest's TCP connections this network carries (as of the event loop's last turn). A
    /// fork takes them while the VM is paused, so that each child's new network can reset them
    /// ([`crate::UserNetwork::reset_guest_connections`]).
    pub fn tcp_connections(&self) -> Vec<GuestConnection> {
        lock(&self.shared.connections).clone()
    }

    /// Stops publishing the port [`Self::publish`] bound at `host` (open connections stay).
    pub fn unpublish(&self, host: SocketAddr) -> io::Result<()> {
        if !lock(&self.shared.published).remove(&host) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} is not published"),
            ));
        }
        self.send(Command::Unpublish(host))
    }

    fn send(&self, command: Command) -> io::Result<()> {
        match self.commands.try_send(command) {
            Ok(()) => {
                // The loop reads the channel whenever it runs; a failed wake only delays it.
                let _ = self.wake.write(1);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the network's command queue is full",
            )),
            Err(TrySendError::Disconnected(_)) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the network is down",
            )),
        }
    }
}
