//! The DNS forwarder at the gateway's DNS address: parses the guest's query, answers from the
//! VM's static hosts map or through the [`Resolver`] on a bounded set of worker threads, filters
//! the answer through the policy, pins what it gave, and builds a new response. The guest never
//! gets a byte-level path to the host's resolver.
//!
//! STUB (interface only): helper "net-policy" implements this file. Semantics: A queries answered
//! with the IPv4 addresses (AAAA: an empty NOERROR answer, since the network is IPv4 only); a name
//! that parses as an IP address in any `inet_aton` form → NXDOMAIN without resolving; names the
//! policy does not allow → NXDOMAIN; resolver failure → SERVFAIL (not found → NXDOMAIN); answers
//! with TTL [`ANSWER_TTL`]; at most [`MAX_IN_FLIGHT`] queries resolving at once (more → SERVFAIL
//! at once); malformed queries are dropped (no answer); every answer counts in [`DnsStats`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::policy::{DnsPins, NetworkPolicy};
use crate::seams::Resolver;

/// TTL of the answers the forwarder gives (and of the pins they make).
pub const ANSWER_TTL: Duration = Duration::from_secs(60);
/// Queries resolving at once, per VM.
pub const MAX_IN_FLIGHT: usize = 16;

/// Counters of a forwarder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries received.
    pub queries: u64,
    /// Answered with addresses.
    pub answered: u64,
    /// Answered NXDOMAIN because the policy does not allow the name.
    pub denied_names: u64,
    /// Addresses dropped from answers by the rebinding filter.
    pub filtered_addresses: u64,
}

/// One VM's DNS forwarder.
pub struct DnsForwarder {
    _resolver: Arc<dyn Resolver>,
    _hosts: HashMap<String, Vec<IpAddr>>,
}

impl DnsForwarder {
    /// A forwarder that answers names in `hosts` itself and asks `resolver` for the rest.
    pub fn new(
        resolver: Arc<dyn Resolver>,
        hosts: HashMap<String, Vec<IpAddr>>,
    ) -> io::Result<Self> {
        let _ = (resolver, hosts);
        todo!()
    }

    /// A query (a UDP payload) from the guest at `client`. Returns the answer when it is known at
    /// once (hosts map, denied name, malformed → `None` and nothing later); otherwise the query
    /// is resolving and its answer comes from [`Self::take_answers`].
    pub fn query(
        &mut self,
        client: SocketAddrV4,
        packet: &[u8],
        policy: &NetworkPolicy,
        pins: &mut DnsPins,
        host_addrs: &[IpAddr],
        now: Instant,
    ) -> Option<Vec<u8>> {
        todo!(
            "{client} {} {policy:?} {pins:?} {host_addrs:?} {now:?}",
            packet.len()
        )
    }

    /// Readable when resolved answers wait in [`Self::take_answers`].
    pub fn event_fd(&self) -> RawFd {
        todo!()
    }

    /// The answers resolved since the last call (consumes the event), filtered by `policy` and
    /// pinned in `pins`, each with the client it goes to.
    pub fn take_answers(
        &mut self,
        policy: &NetworkPolicy,
        pins: &mut DnsPins,
        host_addrs: &[IpAddr],
        now: Instant,
    ) -> Vec<(SocketAddrV4, Vec<u8>)> {
        todo!("{policy:?} {pins:?} {host_addrs:?} {now:?}")
    }

    /// Its counters.
    pub fn stats(&self) -> DnsStats {
        todo!()
    }
}
