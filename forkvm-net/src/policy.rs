//! Egress policy: which destinations a VM's flows may reach.
//!
//! STUB (interface only): helper "net-policy" implements this file. Semantics:
//!
//! - Order: (1) always denied, whatever the rules: the unspecified address (0.0.0.0/8, ::) and
//!   broadcast; (2) the user's rules, first match wins (`allow`/`deny` of a CIDR, optionally a
//!   port range and protocol); (3) the default groups, denied unless a user *allow* rule whose
//!   whole CIDR lies inside that group matched in (2) (so `allow 127.0.0.1/32` opens host loopback
//!   but `allow 0.0.0.0/0` opens no private range): loopback 127/8, RFC 1918, link-local
//!   169.254/16 (its own reason `Metadata` for 169.254.169.254), CGNAT 100.64/10, multicast
//!   224/4, reserved 240/4, benchmarking 198.18/15, 192.0.0.0/24, documentation ranges, the
//!   host's own addresses; IPv6 likewise (::1, fc00::/7, fe80::/10, ff00::/8; mapped and
//!   NAT64/6to4 forms classified by the IPv4 they carry); (4) the egress mode: `PublicInternet`
//!   allows the rest, `DenyAll` denies it, and when domain names are allowed
//!   ([`NetworkPolicy::allow_domain`]) the rest is allowed only if the address is pinned by a
//!   DNS answer for an allowed name ([`DnsPins`]).
//! - DNS: with a domain allowlist, names outside it are answered NXDOMAIN; answers whose addresses
//!   fall in a default-denied group (rebinding) are dropped unless a user allow rule covers them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Instant;

/// The transport a flow uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo.
    Icmp,
}

/// An address block, `10.0.0.0/8` or `fd00::/8` (parsed strictly: canonical dotted quads only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `addr` with `prefix` bits (an error when the prefix is too long or host bits
    /// are set).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, PolicyError> {
        todo!("{addr} {prefix}")
    }

    /// Whether `ip` lies in the block (IPv4-mapped IPv6 addresses compare as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        todo!("{ip}")
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        todo!("{s}")
    }
}

/// A policy that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A CIDR, port range or domain name that does not parse.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// What was being parsed.
        what: &'static str,
        /// The text.
        value: String,
    },
}

/// Why a flow was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// 0.0.0.0/8, ::, broadcast: never reachable.
    Unspecified,
    /// The host's loopback.
    Loopback,
    /// RFC 1918 / ULA.
    Private,
    /// Link-local.
    LinkLocal,
    /// The cloud metadata address.
    Metadata,
    /// CGNAT 100.64/10.
    SharedAddressSpace,
    /// Multicast, reserved, benchmarking or documentation ranges.
    Reserved,
    /// One of the host's own addresses.
    HostAddress,
    /// A user deny rule.
    Rule,
    /// A domain allowlist is in force and no allowed name resolved to this address.
    NotPinned,
    /// The policy denies all egress.
    DenyAll,
}

/// The decision on one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The flow may be opened.
    Allow,
    /// It may not; the guest gets a reset or ICMP unreachable.
    Deny(DenyReason),
}

/// A VM's egress policy. The default is [`NetworkPolicy::public_internet`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    _todo: (),
}

impl NetworkPolicy {
    /// The public internet, and nothing on this host or its networks.
    pub fn public_internet() -> Self {
        todo!()
    }
    /// No egress at all (the gateway's DHCP and DNS still answer; DNS answers NXDOMAIN).
    pub fn deny_all() -> Self {
        todo!()
    }
    /// Allows `cidr` (all ports and protocols).
    pub fn allow(self, cidr: Cidr) -> Self {
        todo!("{cidr:?}")
    }
    /// Allows `cidr` on ports `first..=last` of `protocol` only.
    pub fn allow_ports(self, cidr: Cidr, protocol: Protocol, first: u16, last: u16) -> Self {
        todo!("{cidr:?} {protocol:?} {first} {last}")
    }
    /// Denies `cidr`.
    pub fn deny(self, cidr: Cidr) -> Self {
        todo!("{cidr:?}")
    }
    /// Denies `cidr` on ports `first..=last` of `protocol` only.
    pub fn deny_ports(self, cidr: Cidr, protocol: Protocol, first: u16, last: u16) -> Self {
        todo!("{cidr:?} {protocol:?} {first} {last}")
    }
    /// Allows names: `example.com` allows it and its subdomains. Once any name is allowed, only
    /// addresses pinned by answers for allowed names (or covered by an allow rule) are reachable.
    pub fn allow_domain(self, name: &str) -> Result<Self, PolicyError> {
        todo!("{name}")
    }
    /// Whether the DNS forwarder may resolve `name` under this policy.
    pub fn name_allowed(&self, name: &str) -> bool {
        todo!("{name}")
    }
    /// Whether an address from a DNS answer may be given to the guest (rebinding filter).
    pub fn answer_allowed(&self, ip: IpAddr, host_addrs: &[IpAddr]) -> bool {
        todo!("{ip} {host_addrs:?}")
    }
    /// The decision on a flow to `to` (the exact address the guest dialled, after the gateway was
    /// mapped to the host's loopback).
    pub fn check(
        &self,
        to: SocketAddr,
        protocol: Protocol,
        context: &PolicyContext<'_>,
    ) -> Verdict {
        todo!("{to} {protocol:?} {context:?}")
    }
}

/// What a decision consults besides the policy.
#[derive(Debug)]
pub struct PolicyContext<'a> {
    /// Addresses pinned by DNS answers for allowed names.
    pub pins: &'a DnsPins,
    /// The host's own addresses.
    pub host_addrs: &'a [IpAddr],
    /// Now (pins expire).
    pub now: Instant,
}

/// Addresses the DNS forwarder gave the guest for allowed names, until their TTL ends.
#[derive(Clone, Debug, Default)]
pub struct DnsPins {
    by_ip: HashMap<IpAddr, (String, Instant)>,
}

impl DnsPins {
    /// Records that `name` resolved to `ips`, valid until `until`.
    pub fn pin(&mut self, name: &str, ips: &[IpAddr], until: Instant) {
        todo!("{name} {ips:?} {until:?} {}", self.by_ip.len())
    }
    /// The name that pinned `ip`, if a pin is still valid at `now`.
    pub fn pinned(&self, ip: IpAddr, now: Instant) -> Option<&str> {
        todo!("{ip} {now:?}")
    }
}

/// The host's own addresses (every interface's, from `getifaddrs`), to deny them by default.
pub fn host_addresses() -> Vec<IpAddr> {
    todo!()
}
