//! forkvm's user-mode network: each VM gets its own small TCP/IP endpoint, in process and without
//! privileges, that terminates the guest's TCP and UDP flows and opens ordinary host sockets on
//! its behalf (the slirp/passt model). It plugs into the virtio-net device as its
//! [`forkvm_devices::virtio::net::NetBackend`] and runs on the VM's event loop.
//!
//! What the guest sees (defaults of [`NetworkConfig`]): a gateway at 10.0.2.2 that answers ARP and
//! ping and stands for the host (a flow to it goes to the host's 127.0.0.1, if the policy allows
//! loopback), a DNS server at 10.0.2.3, and a DHCP server that leases 10.0.2.15/24.
//!
//! Why smoltcp: it is the maintained Rust TCP/IP stack with Ethernet, ARP, IPv4, window scaling
//! and a SYN-ACK that can be held back until the host side has connected (so a refused or denied
//! destination reaches the guest as a reset, not as a connection that opened and died), and it is
//! what microsandbox uses for the same job. forkvm keeps its own flow table, NAT and policy around
//! it: smoltcp has no wildcard listen, so a socket is made per guest SYN on that exact address.
//!
//! Everything that reaches the outside goes through two seams that tests replace: a
//! [`Connector`] opens host sockets and a [`Resolver`] resolves names (both in [`Seams`]). The
//! design is in `docs/design/network.md`.
//!
//! Use: [`UserNetwork::new`] gives the backend (hand it to the virtio-net device, whose event
//! loop watches its one event fd and calls `process()`) and a [`NetworkHandle`] (any thread:
//! change the [`NetworkPolicy`], read [`NetworkStats`], hear of each [`DeniedFlow`], connect to
//! a guest port in process, publish a guest port on a host address).
//!
//! ```no_run
//! use forkvm_net::{NetworkConfig, NetworkPolicy, Seams, UserNetwork};
//!
//! let (backend, handle) =
//!     UserNetwork::new(NetworkConfig::default(), NetworkPolicy::public_internet(), Seams::host())?;
//! let published = handle.publish("127.0.0.1:0".parse().unwrap(), 80)?;
//! # let _ = (backend, published);
//! # Ok::<(), std::io::Error>(())
//! ```

mod config;
mod device;
mod dhcp;
pub mod dns;
mod frames;
mod handle;
mod outside;
pub mod policy;
mod seams;
mod slab;
mod stack;
mod tap;

pub use config::NetworkConfig;
pub use handle::{DeniedFlow, GuestConnection, NetworkHandle, NetworkStats};
pub use outside::end_threads_if_unused;
pub use policy::{Cidr, DenyReason, NetworkPolicy, Protocol, RuleTarget, Verdict};
pub use seams::{
    CONNECT_CALL_LIMIT, Connector, HostConnector, HostResolver, LoopbackOnly, Resolver, Seams,
    StaticResolver,
};
pub use stack::UserNetwork;
pub use stack::tcp::{MAX_PENDING_HANDSHAKES, MAX_TCP_FLOWS};
pub use stack::udp::MAX_UDP_FLOWS;
pub use tap::TapBackend;
