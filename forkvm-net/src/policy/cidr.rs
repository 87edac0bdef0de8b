//! Address blocks, parsed strictly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::PolicyError;

/// An address block, `10.0.0.0/8` or `fd00::/8` (parsed strictly: canonical dotted quads only).
///
/// A block of IPv4-mapped IPv6 addresses (`::ffff:10.0.0.0/104`) is stored as the IPv4 block it
/// maps (`10.0.0.0/8`), so that it compares equal to it and contains the same addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The block of `addr` with `prefix` bits (an error when the prefix is too long or host bits
    /// are set).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, PolicyError> {
        let invalid = || PolicyError::Invalid {
            what: "CIDR",
            value: format!("{addr}/{prefix}"),
        };
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let bits = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > bits {
            return Err(invalid());
        }
        let cidr = Self { addr, prefix };
        if masked(addr, prefix) != addr {
            return Err(invalid());
        }
        Ok(cidr)
    }

    /// The single-address block of `ip` (/32 or /128; IPv4-mapped addresses become IPv4).
    pub fn host(ip: IpAddr) -> Self {
        let addr = canonical(ip);
        let prefix = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        Self { addr, prefix }
    }

    /// The block's first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The block's prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in the block (IPv4-mapped IPv6 addresses compare as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                masked(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }

    /// Whether the whole of `other` lies inside this block.
    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = PolicyError;

    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a single-address block). The address must be
    /// written canonically (std's parsers: no octal, hex, short or zone forms) and the prefix in
    /// plain decimal without leading zeros.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || PolicyError::Invalid {
            what: "CIDR",
            value: s.to_owned(),
        };
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr).map_err(|_| invalid())?;
        let prefix = match prefix {
            None => match addr {
                IpAddr::V4(_) => 32,
                IpAddr::V6(_) => 128,
            },
            Some(p) => {
                let canonical_decimal = !p.is_empty()
                    && p.len() <= 3
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && (p == "0" || !p.starts_with('0'));
                if !canonical_decimal {
                    return Err(invalid());
                }
                p.parse::<u8>().map_err(|_| invalid())?
            }
        };
        Self::new(addr, prefix).map_err(|_| invalid())
    }
}

/// `ip` with IPv4-mapped IPv6 (`::ffff:a.b.c.d`) turned into IPv4; other addresses unchanged.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        IpAddr::V4(_) => ip,
    }
}

/// `ip` with all but its first `prefix` bits cleared (`prefix` at most the family's width).
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_blocks_and_bare_addresses() {
        let ten = cidr("10.0.0.0/8");
        assert_eq!(ten.addr(), IpAddr::from([10, 0, 0, 0]));
        assert_eq!(ten.prefix(), 8);
        assert_eq!(cidr("1.2.3.4"), cidr("1.2.3.4/32"));
        assert_eq!(cidr("fd00::/8").prefix(), 8);
        assert_eq!(cidr("::1").prefix(), 128);
        assert_eq!(cidr("0.0.0.0/0").prefix(), 0);
        assert_eq!(cidr("::/0").prefix(), 0);
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn rejects_non_canonical_and_invalid_text() {
        for bad in [
            "10.0.0.1/8",          // host bits set
            "fd00::1/8",           // host bits set
            "10.0.0.0/33",         // prefix too long
            "fd00::/129",          // prefix too long
            "010.0.0.1",           // octal-looking octet
            "0177.0.0.1",          // octal
            "0x7f.0.0.1",          // hex
            "127.1",               // short form
            "2130706433",          // decimal
            "10.0.0.0/08",         // leading zero in the prefix
            "10.0.0.0/+8",         // sign
            "10.0.0.0/",           // empty prefix
            "10.0.0.0/8/8",        // two prefixes
            " 10.0.0.0/8",         // whitespace
            "10.0.0.0/8 ",         // whitespace
            "fe80::1%eth0",        // zone
            "10.0.0.0/0x8",        // hex prefix
            "10.0.0.0/256",        // prefix out of u8
            "",                    // nothing
            "example.com/24",      // a name
            "1.2.3.4.5/32",        // five parts
            "::ffff:10.0.0.1/104", // host bits set in the mapped form
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn new_checks_prefix_and_host_bits() {
        assert!(Cidr::new(IpAddr::from([10, 0, 0, 0]), 8).is_ok());
        assert!(Cidr::new(IpAddr::from([10, 0, 0, 1]), 8).is_err());
        assert!(Cidr::new(IpAddr::from([10, 0, 0, 0]), 33).is_err());
        assert!(Cidr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 129).is_err());
        assert!(Cidr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).is_ok());
    }

    #[test]
    fn contains_respects_the_prefix() {
        let block = cidr("172.16.0.0/12");
        assert!(block.contains(IpAddr::from([172, 16, 0, 1])));
        assert!(block.contains(IpAddr::from([172, 31, 255, 255])));
        assert!(!block.contains(IpAddr::from([172, 32, 0, 0])));
        assert!(!block.contains(IpAddr::from([172, 15, 255, 255])));
        assert!(cidr("0.0.0.0/0").contains(IpAddr::from([8, 8, 8, 8])));
        assert!(cidr("1.2.3.4").contains(IpAddr::from([1, 2, 3, 4])));
        assert!(!cidr("1.2.3.4").contains(IpAddr::from([1, 2, 3, 5])));
        let ula = cidr("fc00::/7");
        assert!(ula.contains("fd12::1".parse().unwrap()));
        assert!(!ula.contains("fe80::1".parse().unwrap()));
    }

    #[test]
    fn mapped_ipv6_compares_as_ipv4() {
        let loopback = cidr("127.0.0.0/8");
        assert!(loopback.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!loopback.contains("::127.0.0.1".parse().unwrap()));
        // A block written in the mapped form is the IPv4 block.
        assert_eq!(cidr("::ffff:10.0.0.0/104"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("::ffff:127.0.0.1"), cidr("127.0.0.1/32"));
        assert!(cidr("::ffff:10.0.0.0/104").contains(IpAddr::from([10, 1, 2, 3])));
        // Families do not mix otherwise: ::/0 is all of IPv6, none of IPv4.
        assert!(!cidr("::/0").contains(IpAddr::from([10, 1, 2, 3])));
        assert!(!cidr("0.0.0.0/0").contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn contains_cidr_is_whole_block_inclusion() {
        let link_local = cidr("169.254.0.0/16");
        assert!(link_local.contains_cidr(&cidr("169.254.169.254/32")));
        assert!(link_local.contains_cidr(&link_local));
        assert!(!cidr("169.254.169.254/32").contains_cidr(&link_local));
        assert!(!cidr("10.0.0.0/8").contains_cidr(&cidr("0.0.0.0/0")));
        assert!(!cidr("::/0").contains_cidr(&cidr("10.0.0.0/8")));
    }
}
