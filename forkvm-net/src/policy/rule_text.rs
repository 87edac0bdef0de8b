//! Rules written as text, for the bindings and the command line: `"10.0.0.0/8"` (every port and
//! protocol), `"10.0.0.0/8 tcp"` (every TCP port), `"127.0.0.1 tcp/8080"`,
//! `"192.0.2.0/24 udp/5000-5999"`, `"203.0.113.9 icmp"`. One parser, so that every binding reads
//! a rule the same way.

use std::str::FromStr;

use super::{Cidr, NetworkPolicy, PolicyError, Protocol};

/// What one allow or deny rule covers: a CIDR, and optionally one protocol's port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleTarget {
    /// The addresses.
    pub cidr: Cidr,
    /// The protocol and its ports `first..=last`, or `None` for every port of every protocol.
    pub ports: Option<(Protocol, u16, u16)>,
}

impl FromStr for RuleTarget {
    type Err = PolicyError;

    /// `CIDR [PROTOCOL[/PORT[-PORT]]]`: a [`Cidr`], then optionally `tcp`, `udp` or `icmp`
    /// (lower case), then for TCP and UDP optionally `/` and a port or an inclusive range. Parts
    /// are separated by one or more spaces; nothing else may follow.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || PolicyError::Invalid {
            what: "rule (\"CIDR [tcp|udp[/PORT[-PORT]]|icmp]\")",
            value: s.to_owned(),
        };
        let mut parts = s.split_whitespace();
        let cidr = parts
            .next()
            .and_then(|cidr| cidr.parse::<Cidr>().ok())
            .ok_or_else(invalid)?;
        let Some(transport) = parts.next() else {
            return Ok(Self { cidr, ports: None });
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        let (name, range) = match transport.split_once('/') {
            Some((name, range)) => (name, Some(range)),
            None => (transport, None),
        };
        let protocol = match name {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" if range.is_none() => Protocol::Icmp,
            _ => return Err(invalid()),
        };
        let (first, last) = match range {
            None => (0, u16::MAX),
            Some(range) => {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                let (first, last) = (
                    port(first).ok_or_else(invalid)?,
                    port(last).ok_or_else(invalid)?,
                );
                if first > last {
                    return Err(invalid());
                }
                (first, last)
            }
        };
        Ok(Self {
            cidr,
            ports: Some((protocol, first, last)),
        })
    }
}

/// A port in plain decimal (no sign, no leading zeros).
fn port(text: &str) -> Option<u16> {
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    plain.then(|| text.parse().ok()).flatten()
}

impl NetworkPolicy {
    /// Allows what `target` covers (see [`RuleTarget`]).
    pub fn allow_target(self, target: RuleTarget) -> Self {
        match target.ports {
            None => self.allow(target.cidr),
            Some((protocol, first, last)) => self.allow_ports(target.cidr, protocol, first, last),
        }
    }

    /// Denies what `target` covers (see [`RuleTarget`]).
    pub fn deny_target(self, target: RuleTarget) -> Self {
        match target.ports {
            None => self.deny(target.cidr),
            Some((protocol, first, last)) => self.deny_ports(target.cidr, protocol, first, last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Result<RuleTarget, PolicyError> {
        text.parse()
    }

    #[test]
    fn rules_parse_from_text() {
        let net = |s: &str| s.parse::<Cidr>().unwrap();
        assert_eq!(
            target("10.0.0.0/8").unwrap(),
            RuleTarget {
                cidr: net("10.0.0.0/8"),
                ports: None
            }
        );
        assert_eq!(
            target("127.0.0.1  tcp/8080").unwrap().ports,
            Some((Protocol::Tcp, 8080, 8080))
        );
        assert_eq!(
            target("192.0.2.0/24 udp/5000-5999").unwrap(),
            RuleTarget {
                cidr: net("192.0.2.0/24"),
                ports: Some((Protocol::Udp, 5000, 5999))
            }
        );
        assert_eq!(
            target("::1 tcp").unwrap().ports,
            Some((Protocol::Tcp, 0, 65535))
        );
        assert_eq!(
            target("203.0.113.9 icmp").unwrap().ports,
            Some((Protocol::Icmp, 0, 65535))
        );
        for bad in [
            "",
            "tcp/80",
            "10.0.0.0/8 tcp/80 udp/53",
            "10.0.0.0/8 TCP/80",
            "10.0.0.0/8 sctp",
            "10.0.0.0/8 icmp/8",
            "10.0.0.0/8 tcp/",
            "10.0.0.0/8 tcp/080",
            "10.0.0.0/8 tcp/+80",
            "10.0.0.0/8 tcp/65536",
            "10.0.0.0/8 tcp/90-80",
            "10.0.0.0/8 tcp/80-",
            "10.0.0.0/8 tcp/80-90-100",
            "10.0.0.0/33 tcp/80",
        ] {
            assert!(target(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_rule_from_text_decides_like_the_same_rule_built() {
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let policy = NetworkPolicy::public_internet()
            .allow_target(target("127.0.0.1/32 tcp/8080").unwrap())
            .deny_target(target("1.2.3.0/24 udp/53").unwrap());
        let pins = super::super::DnsPins::default();
        let context = super::super::PolicyContext {
            pins: &pins,
            host_addrs: &[],
            now: std::time::Instant::now(),
        };
        let check = |ip: IpAddr, protocol, port| {
            policy.check(SocketAddr::new(ip, port), protocol, &context)
        };
        let other = IpAddr::V4(Ipv4Addr::new(1, 2, 3, 7));
        for (ip, protocol, port, allowed) in [
            (loopback, Protocol::Tcp, 8080, true),
            (loopback, Protocol::Tcp, 8081, false),
            (loopback, Protocol::Udp, 8080, false),
            (other, Protocol::Udp, 53, false),
            (other, Protocol::Udp, 54, true),
            (other, Protocol::Tcp, 53, true),
        ] {
            let verdict = check(ip, protocol, port);
            assert_eq!(
                verdict == super::super::Verdict::Allow,
                allowed,
                "{ip} {protocol:?}/{port}: {verdict:?}"
            );
        }
    }
}
