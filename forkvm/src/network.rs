//! [`Network`]: a VM's network, a virtio-net device with forkvm's user-mode network behind it
//! (crate `forkvm-net`): no privileges, no helper process; each VM, and each fork child, has its
//! own. The guest gets its address by DHCP (forkvm adds `ip=dhcp` to a Linux guest's command line
//! unless it names `ip=` itself), reaches the public internet through host sockets, and is kept
//! from this host, its networks and metadata addresses by the [`NetworkPolicy`]. The design is in
//! `docs/design/network.md`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use forkvm_devices::virtio::net::{Net, NetBackend};
pub use forkvm_net::{
    CONNECT_CALL_LIMIT, Cidr, Connector, DeniedFlow, DenyReason, GuestConnection, HostConnector,
    HostResolver, NetworkHandle, NetworkPolicy, NetworkStats, Protocol, Resolver, RuleTarget,
    Seams, StaticResolver, Verdict,
};

use crate::error::{Error, setup_err};
use crate::virtio::VirtioDeviceSpec;
use forkvm_devices::chain::ErrorChain;

/// A VM's network: [`crate::VmBuilder::network`] adds it, [`crate::Child::network`] gives a fork
/// child another. Defaults: addresses 10.0.2.15/24 (guest), 10.0.2.2 (gateway, standing for the
/// host), 10.0.2.3 (DNS); the policy [`NetworkPolicy::public_internet`]; no published ports.
#[derive(Clone, Debug)]
pub struct Network {
    /// The host TAP interface behind the device instead of the user-mode network.
    tap: Option<String>,
    addresses: forkvm_net::NetworkConfig,
    policy: NetworkPolicy,
    publish: Vec<(SocketAddr, u16)>,
    seams: Seams,
    kernel_dhcp: bool,
    rate_limit: forkvm_devices::virtio::rate_limit::RateLimit,
    rx_rate_limit: forkvm_devices::virtio::rate_limit::RateLimit,
}

impl Default for Network {
    fn default() -> Self {
        Self::user()
    }
}

impl Network {
    /// The user-mode network with its defaults.
    pub fn user() -> Self {
        Self {
            tap: None,
            addresses: forkvm_net::NetworkConfig::default(),
            policy: NetworkPolicy::default(),
            publish: Vec::new(),
            seams: Seams::host(),
            kernel_dhcp: true,
            rate_limit: Default::default(),
            rx_rate_limit: Default::default(),
        }
    }

    /// The device on the host TAP interface `name` instead (Firecracker-style networking: the
    /// host configures and routes the interface; opening it needs `CAP_NET_ADMIN` or a
    /// persistent TAP device the caller owns). forkvm's policy, DHCP, DNS and published ports do
    /// not apply, and [`crate::Vm::network`] is `None`. A TAP interface serves one VM: a fork
    /// child of a VM on one gets the user-mode network unless its [`crate::Child::network`]
    /// names another interface.
    pub fn tap(name: &str) -> Self {
        Self {
            tap: Some(name.to_owned()),
            kernel_dhcp: false,
            ..Self::user()
        }
    }

    /// The egress policy (changeable later with [`NetworkHandle::set_policy`]).
    pub fn policy(mut self, policy: NetworkPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Publishes guest TCP port `guest_port` on the host at `host` (port 0 picks a free one:
    /// [`NetworkHandle::published`] lists what was bound).
    pub fn publish(mut self, host: SocketAddr, guest_port: u16) -> Self {
        self.publish.push((host, guest_port));
        self
    }

    /// Publishes guest TCP port `guest_port` on the host's 127.0.0.1, port `host_port`.
    pub fn publish_local(self, host_port: u16, guest_port: u16) -> Self {
        self.publish(
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port),
            guest_port,
        )
    }

    /// Answers `name` with `addresses` in the VM's DNS, without asking the host's resolver.
    pub fn host(mut self, name: &str, addresses: &[IpAddr]) -> Self {
        self.seams.hosts.insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            addresses.to_vec(),
        );
        self
    }

    /// How the network opens host sockets and resolves names (tests give ones that never leave
    /// the machine); the hosts given with [`Network::host`] stay.
    pub fn seams(mut self, connector: Arc<dyn Connector>, resolver: Arc<dyn Resolver>) -> Self {
        self.seams.connector = connector;
        self.seams.resolver = resolver;
        self
    }

    /// Lets the network open host sockets to the host's loopback only (127.0.0.0/8, ::1),
    /// whatever its policy allows: a guest that may reach services on this host and nothing
    /// beyond it. (Tests use it so that no packet can leave the machine.)
    pub fn loopback_only(mut self) -> Self {
        self.seams.connector = Arc::new(forkvm_net::LoopbackOnly::new(self.seams.connector));
        self
    }

    /// The link's MTU, 576 to 65,520 (default 65,520, as passt and slirp4netns: the network
    /// ends the guest's TCP flows, and large segments cost less per byte). The guest's
    /// interface comes up with it. User-mode network only; a TAP device keeps its own.
    pub fn mtu(mut self, mtu: u16) -> Self {
        self.addresses.mtu = mtu;
        self
    }

    /// The guest's MAC address.
    pub fn mac(mut self, mac: [u8; 6]) -> Self {
        self.addresses.guest_mac = mac;
        self
    }

    /// Whether forkvm adds `ip=dhcp` to the guest kernel's command line (default: yes, unless the
    /// command line names `ip=` already).
    pub fn kernel_dhcp(mut self, on: bool) -> Self {
        self.kernel_dhcp = on;
        self
    }

    /// Limits what the guest transmits (frames and their bytes; see [`crate::RateLimit`]). None
    /// by default; [`crate::Vm::set_rate_limit`] changes it while the VM runs. A fork child
    /// keeps the limit its parent's device had, whatever network it is given.
    pub fn rate_limit(mut self, limit: crate::RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Limits what the guest receives (frames delivered into its receive queue and their
    /// bytes; see [`crate::RateLimit`]), independently of [`Self::rate_limit`]. Frames beyond it
    /// wait in the network's queues as for a guest that posts no receive buffers, so TCP
    /// senders slow down. None by default; [`crate::Vm::set_rx_rate_limit`] changes it while the
    /// VM runs; a fork child keeps it.
    pub fn rx_rate_limit(mut self, limit: crate::RateLimit) -> Self {
        self.rx_rate_limit = limit;
        self
    }

    /// The command-line switch for the guest kernel, if forkvm adds one.
    pub(crate) fn cmdline(&self, user_cmdline: &str) -> Option<&'static str> {
        let named = user_cmdline
            .split_whitespace()
            .any(|arg| arg.starts_with("ip="));
        (self.kernel_dhcp && !named).then_some("ip=dhcp")
    }

    /// The same network for a fork child: the policy `handle` holds now, no published ports.
    pub(crate) fn for_child(&self, handle: Option<&NetworkHandle>) -> Self {
        let mut child = self.clone();
        child.tap = None;
        if let Some(handle) = handle {
            child.policy = handle.policy();
        }
        child.publish.clear();
        child
    }

    /// A user-mode network made ahead for a child that will get this network (a prepared
    /// child's), or `None` for a TAP interface.
    pub(crate) fn prepare(&self) -> Result<Option<PreparedNetwork>, Error> {
        if self.tap.is_some() {
            return Ok(None);
        }
        self.user_network().map(Some)
    }

    /// A new user-mode network with this network's addresses, policy and seams.
    fn user_network(&self) -> Result<PreparedNetwork, Error> {
        let (network, handle) = forkvm_net::UserNetwork::new(
            self.addresses.clone(),
            self.policy.clone(),
            self.seams.clone(),
        )
        .map_err(|e| setup_err("the user-mode network", e))?;
        Ok(PreparedNetwork { network, handle })
    }

    /// A new network instance: the device's backend and the handle the VM keeps, its ports
    /// published, and the guest's connections of the VM it continues (`resets`) reset. Uses
    /// `prepared`, made ahead by [`Network::prepare`] of a network like this one, if given.
    pub(crate) fn backend(
        &self,
        resets: &[GuestConnection],
        prepared: Option<PreparedNetwork>,
    ) -> Result<(Box<dyn NetBackend>, Option<NetworkHandle>), Error> {
        if let Some(name) = &self.tap {
            let tap = forkvm_net::TapBackend::open(name)
                .map_err(|e| setup_err("the TAP interface", ErrorChain(&e)))?;
            return Ok((Box::new(tap), None));
        }
        let PreparedNetwork {
            mut network,
            handle,
        } = match prepared {
            Some(prepared) => {
                // Made with this network's addresses and seams; the policy may have changed
                // since.
                prepared.handle.set_policy(self.policy.clone());
                prepared
            }
            None => self.user_network()?,
        };
        network.reset_guest_connections(resets);
        for &(host, guest_port) in &self.publish {
            handle
                .publish(host, guest_port)
                .map_err(|source| Error::Publish { host, source })?;
        }
        Ok((Box::new(network), Some(handle)))
    }

    /// The virtio-net device of a new VM, with its network.
    pub(crate) fn create(&self) -> Result<(VirtioDeviceSpec, Option<NetworkHandle>), Error> {
        let (backend, handle) = self.backend(&[], None)?;
        let device = Net::new(self.addresses.guest_mac, backend);
        let spec = VirtioDeviceSpec::new(Box::new(device))
            .with_rate_limit(self.rate_limit)
            .with_rx_rate_limit(self.rx_rate_limit);
        Ok((spec, handle))
    }
}

/// A user-mode network made ahead for a prepared child ([`Network::prepare`]).
pub(crate) struct PreparedNetwork {
    network: forkvm_net::UserNetwork,
    handle: NetworkHandle,
}

/// A VM's network as the VM keeps it: how it was made (for its children) and its handle.
#[derive(Clone, Debug)]
pub(crate) struct VmNetwork {
    pub config: Network,
    /// The user-mode network's handle (none on a TAP interface).
    pub handle: Option<NetworkHandle>,
}

impl VmNetwork {
    /// Whether the network holds names on the host that a caller may want back at once: published
    /// ports, a TAP interface.
    pub fn holds_host_names(&self) -> bool {
        !self.config.publish.is_empty() || self.config.tap.is_some()
    }
}
