//! Egress policy: which destinations a VM's flows may reach.
//!
//! [`NetworkPolicy::check`] decides a flow in four steps:
//!
//! 1. Always denied, whatever the rules: the unspecified address (0.0.0.0/8, `::`) and the
//!    limited broadcast 255.255.255.255, in any IPv6 form that carries them.
//! 2. The user's rules, first match wins: `allow`/`deny` of a [`Cidr`], optionally limited to a
//!    port range of one [`Protocol`] (ICMP has no port: a rule for ICMP matches all of it).
//! 3. The default groups ([`classify`]), denied unless the rule that matched in (2) is an *allow*
//!    whose whole CIDR lies inside the address's group: `allow 127.0.0.1/32` opens host loopback,
//!    `allow 0.0.0.0/0` opens no private range, and `allow 169.254.0.0/16` opens link-local but not
//!    the metadata address 169.254.169.254, a group of its own that only `allow
//!    169.254.169.254/32` opens. The host's own addresses (`PolicyContext::host_addrs`, other than
//!    loopback) are a group too, opened only by an allow of that exact address. IPv6 forms that
//!    carry an IPv4 address (compatible, SIIT, NAT64, 6to4) take the IPv4 address's group and no
//!    rule opens them; IPv4-mapped addresses are the IPv4 address.
//! 4. The egress mode for the rest: with a domain allowlist ([`NetworkPolicy::allow_domain`]) an
//!    address must be pinned by a DNS answer for a name allowed now ([`DnsPins`]); otherwise
//!    `public_internet` allows it and `deny_all` denies it.
//!
//! For DNS: [`NetworkPolicy::name_allowed`] says which names the forwarder resolves, and
//! [`NetworkPolicy::answer_allowed`] drops answers in a default group (rebinding) unless a user
//! allow rule covers and opens them.
//!
//! A pin allows every flow to its address, so a name on a shared CDN address allows all the sites
//! on it; DoH or DoT to a resolver that is not pinned fails under an allowlist.

mod cidr;
mod groups;
mod host;
mod names;
mod pins;
mod rule_text;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

pub use cidr::Cidr;
pub use host::host_addresses;
pub use pins::{DnsPins, MAX_PINS};
pub use rule_text::RuleTarget;

use cidr::canonical;
use groups::Group;
pub(crate) use names::{is_ip_literal, is_valid_name, normalize_name};

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

/// The default group of `ip`, if it has one: why it is denied unless a rule opens it.
///
/// IPv4-mapped, IPv4-compatible and SIIT IPv6 forms, NAT64 `64:ff9b::/96` and 6to4 `2002::/16`
/// are classified by the IPv4 address they carry (`::1` is loopback, not 0.0.0.1). The host's own
/// addresses are not known here; [`NetworkPolicy::check`] adds them.
pub fn classify(ip: IpAddr) -> Option<DenyReason> {
    groups::group(ip).map(|group| group.reason)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ports {
    protocol: Protocol,
    first: u16,
    last: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    action: Action,
    cidr: Cidr,
    ports: Option<Ports>,
}

impl Rule {
    fn matches(&self, ip: IpAddr, port: u16, protocol: Protocol) -> bool {
        self.cidr.contains(ip)
            && self.ports.is_none_or(|ports| {
                ports.protocol == protocol
                    && (protocol == Protocol::Icmp || (ports.first..=ports.last).contains(&port))
            })
    }

    /// Whether this (allow) rule opens the default groups of `ip`.
    fn opens(&self, group: Option<Group>, host_address: bool, ip: IpAddr) -> bool {
        group.is_none_or(|group| group.opened_by(&self.cidr))
            && (!host_address || self.cidr == Cidr::host(ip))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Egress {
    #[default]
    PublicInternet,
    DenyAll,
}

/// A VM's egress policy. The default is [`NetworkPolicy::public_internet`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    rules: Vec<Rule>,
    egress: Egress,
    domains: BTreeSet<String>,
}

impl NetworkPolicy {
    /// The public internet, and nothing on this host or its networks.
    pub fn public_internet() -> Self {
        Self::default()
    }

    /// No egress at all (the gateway's DHCP and DNS still answer; DNS answers NXDOMAIN).
    pub fn deny_all() -> Self {
        Self {
            egress: Egress::DenyAll,
            ..Self::default()
        }
    }

    /// Allows `cidr` (all ports and protocols).
    pub fn allow(self, cidr: Cidr) -> Self {
        self.rule(Action::Allow, cidr, None)
    }

    /// Allows `cidr` on ports `first..=last` of `protocol` only (the bounds are taken in either
    /// order; for ICMP, which has no ports, they are ignored).
    pub fn allow_ports(self, cidr: Cidr, protocol: Protocol, first: u16, last: u16) -> Self {
        self.rule(Action::Allow, cidr, Some(ports(protocol, first, last)))
    }

    /// Denies `cidr`.
    pub fn deny(self, cidr: Cidr) -> Self {
        self.rule(Action::Deny, cidr, None)
    }

    /// Denies `cidr` on ports `first..=last` of `protocol` only (the bounds are taken in either
    /// order; for ICMP, which has no ports, they are ignored).
    pub fn deny_ports(self, cidr: Cidr, protocol: Protocol, first: u16, last: u16) -> Self {
        self.rule(Action::Deny, cidr, Some(ports(protocol, first, last)))
    }

    /// Allows names: `example.com` allows it and its subdomains. Once any name is allowed, only
    /// addresses pinned by answers for allowed names (or covered by an allow rule) are reachable.
    ///
    /// The name is compared without case and without a trailing dot; it must be a host name
    /// (labels of letters, digits, `-` and `_`; no wildcard) and not an IP address in any form.
    pub fn allow_domain(mut self, name: &str) -> Result<Self, PolicyError> {
        let normalized = normalize_name(name);
        if !is_valid_name(&normalized) || is_ip_literal(&normalized) {
            return Err(PolicyError::Invalid {
                what: "domain name",
                value: name.to_owned(),
            });
        }
        self.domains.insert(normalized);
        Ok(self)
    }

    /// Whether a domain allowlist is in force (see [`NetworkPolicy::allow_domain`]).
    pub fn has_domain_allowlist(&self) -> bool {
        !self.domains.is_empty()
    }

    /// Whether the DNS forwarder may resolve `name` under this policy: with a domain allowlist,
    /// names in it and their subdomains; otherwise every name unless egress is denied.
    pub fn name_allowed(&self, name: &str) -> bool {
        let name = normalize_name(name);
        if name.is_empty() {
            return false;
        }
        if self.domains.is_empty() {
            return self.egress == Egress::PublicInternet;
        }
        self.domains.iter().any(|domain| {
            name.strip_suffix(domain.as_str())
                .is_some_and(|head| head.is_empty() || head.ends_with('.'))
        })
    }

    /// Whether an address from a DNS answer may be given to the guest (rebinding filter): an
    /// address outside the default groups may; one inside them only when some user allow rule
    /// covers it and opens its group; the unspecified address and broadcast never.
    pub fn answer_allowed(&self, ip: IpAddr, host_addrs: &[IpAddr]) -> bool {
        let ip = canonical(ip);
        let group = groups::group(ip);
        if group.is_some_and(|group| group.reason == DenyReason::Unspecified) {
            return false;
        }
        let host_address = is_host_address(ip, group, host_addrs);
        if group.is_none() && !host_address {
            return true;
        }
        self.rules.iter().any(|rule| {
            rule.action == Action::Allow
                && rule.cidr.contains(ip)
                && rule.opens(group, host_address, ip)
        })
    }

    /// The decision on a flow to `to` (the exact address the guest dialled, after the gateway was
    /// mapped to the host's loopback).
    pub fn check(
        &self,
        to: SocketAddr,
        protocol: Protocol,
        context: &PolicyContext<'_>,
    ) -> Verdict {
        let ip = canonical(to.ip());
        let group = groups::group(ip);
        if group.is_some_and(|group| group.reason == DenyReason::Unspecified) {
            return Verdict::Deny(DenyReason::Unspecified);
        }
        let host_address = is_host_address(ip, group, context.host_addrs);
        let matched = self
            .rules
            .iter()
            .find(|rule| rule.matches(ip, to.port(), protocol));
        match matched {
            Some(rule) if rule.action == Action::Deny => Verdict::Deny(DenyReason::Rule),
            Some(rule) => {
                if let Some(group) = group.filter(|group| !group.opened_by(&rule.cidr)) {
                    Verdict::Deny(group.reason)
                } else if host_address && rule.cidr != Cidr::host(ip) {
                    Verdict::Deny(DenyReason::HostAddress)
                } else {
                    Verdict::Allow
                }
            }
            None => {
                if let Some(group) = group {
                    Verdict::Deny(group.reason)
                } else if host_address {
                    Verdict::Deny(DenyReason::HostAddress)
                } else if !self.domains.is_empty() {
                    // A pin counts only for a name the policy allows now (pins are made for
                    // every answer, and the policy can change while they last).
                    match context.pins.pinned(ip, context.now) {
                        Some(name) if self.name_allowed(name) => Verdict::Allow,
                        _ => Verdict::Deny(DenyReason::NotPinned),
                    }
                } else {
                    match self.egress {
                        Egress::PublicInternet => Verdict::Allow,
                        Egress::DenyAll => Verdict::Deny(DenyReason::DenyAll),
                    }
                }
            }
        }
    }

    fn rule(mut self, action: Action, cidr: Cidr, ports: Option<Ports>) -> Self {
        self.rules.push(Rule {
            action,
            cidr,
            ports,
        });
        self
    }
}

fn ports(protocol: Protocol, first: u16, last: u16) -> Ports {
    Ports {
        protocol,
        first: first.min(last),
        last: first.max(last),
    }
}

/// Whether `ip` (canonical) is one of the host's own addresses, loopback aside (loopback is its
/// own group already).
fn is_host_address(ip: IpAddr, group: Option<Group>, host_addrs: &[IpAddr]) -> bool {
    group.is_none_or(|group| group.reason != DenyReason::Loopback)
        && host_addrs.iter().any(|&host| canonical(host) == ip)
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
