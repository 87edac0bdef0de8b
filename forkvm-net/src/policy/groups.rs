//! The default-denied address groups, and how an address is classified into one.
//!
//! IPv4-mapped IPv6 addresses are classified as the IPv4 address they map (and can be opened by
//! IPv4 rules). The other forms that carry an IPv4 address (IPv4-compatible `::a.b.c.d`, SIIT
//! `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are classified by that address
//! too, but no rule opens them: a rule that means the host's loopback names the IPv4 form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::DenyReason;
use super::cidr::{Cidr, canonical};

/// The group an address belongs to: why it is denied by default, and the block a user allow
/// rule's CIDR must lie inside to open it (`None`: no rule opens it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) reason: DenyReason,
    pub(crate) block: Option<Cidr>,
}

impl Group {
    /// Whether an allow rule for `rule` opens this group.
    pub(crate) fn opened_by(&self, rule: &Cidr) -> bool {
        self.block.is_some_and(|block| block.contains_cidr(rule))
    }
}

/// IPv4 groups, most specific first (the first block that contains an address is its group).
const V4_GROUPS: &[([u8; 4], u8, DenyReason)] = &[
    ([0, 0, 0, 0], 8, DenyReason::Unspecified),
    ([255, 255, 255, 255], 32, DenyReason::Unspecified),
    ([127, 0, 0, 0], 8, DenyReason::Loopback),
    // Cloud metadata services, each its own group inside link-local or CGNAT: AWS/GCP/Azure,
    // ECS task credentials, EKS pod identity, Alibaba.
    ([169, 254, 169, 254], 32, DenyReason::Metadata),
    ([169, 254, 170, 2], 32, DenyReason::Metadata),
    ([169, 254, 170, 23], 32, DenyReason::Metadata),
    ([100, 100, 100, 200], 32, DenyReason::Metadata),
    ([10, 0, 0, 0], 8, DenyReason::Private),
    ([172, 16, 0, 0], 12, DenyReason::Private),
    ([192, 168, 0, 0], 16, DenyReason::Private),
    ([169, 254, 0, 0], 16, DenyReason::LinkLocal),
    ([100, 64, 0, 0], 10, DenyReason::SharedAddressSpace),
    // IETF protocol assignments, documentation, benchmarking, the 6to4 relay anycast,
    // multicast and reserved.
    ([192, 0, 0, 0], 24, DenyReason::Reserved),
    ([192, 0, 2, 0], 24, DenyReason::Reserved),
    ([198, 51, 100, 0], 24, DenyReason::Reserved),
    ([203, 0, 113, 0], 24, DenyReason::Reserved),
    ([198, 18, 0, 0], 15, DenyReason::Reserved),
    ([192, 88, 99, 0], 24, DenyReason::Reserved),
    ([224, 0, 0, 0], 4, DenyReason::Reserved),
    ([240, 0, 0, 0], 4, DenyReason::Reserved),
];

/// IPv6 groups, most specific first. The forms that carry an IPv4 address are handled apart.
const V6_GROUPS: &[(u128, u8, DenyReason)] = &[
    (0, 128, DenyReason::Unspecified),
    (1, 128, DenyReason::Loopback),
    // AWS's IPv6 metadata and EKS pod identity addresses.
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0254,
        128,
        DenyReason::Metadata,
    ),
    (
        0xfd00_0ec2_0000_0000_0000_0000_0000_0023,
        128,
        DenyReason::Metadata,
    ),
    (0xfc00 << 112, 7, DenyReason::Private),
    // Site-local (deprecated, still routed locally by some stacks).
    (0xfec0 << 112, 10, DenyReason::Private),
    (0xfe80 << 112, 10, DenyReason::LinkLocal),
    // Local-use NAT64 (RFC 8215): a translator on the local network.
    (0x0064_ff9b_0001 << 80, 48, DenyReason::Private),
    (0xff00 << 112, 8, DenyReason::Reserved),
    // Teredo (its embedded IPv4 is obfuscated), benchmarking, documentation, discard-only.
    (0x2001 << 112, 32, DenyReason::Reserved),
    (0x2001_0002 << 96, 48, DenyReason::Reserved),
    (0x2001_0db8 << 96, 32, DenyReason::Reserved),
    (0x3fff << 112, 20, DenyReason::Reserved),
    (0x0100 << 112, 64, DenyReason::Reserved),
];

/// The default group of `ip`, if any (the host's own addresses are not a static group: see
/// `NetworkPolicy::check`).
pub(crate) fn group(ip: IpAddr) -> Option<Group> {
    match canonical(ip) {
        IpAddr::V4(v4) => group_v4(v4),
        IpAddr::V6(v6) => group_v6(v6),
    }
}

fn group_v4(ip: Ipv4Addr) -> Option<Group> {
    V4_GROUPS.iter().find_map(|&(addr, prefix, reason)| {
        let block = Cidr::new(IpAddr::from(addr), prefix).ok()?;
        block.contains(IpAddr::V4(ip)).then_some(Group {
            reason,
            block: Some(block),
        })
    })
}

fn group_v6(ip: Ipv6Addr) -> Option<Group> {
    let bits = u128::from(ip);
    // Exact groups first: `::` and `::1` must be seen before the IPv4-compatible form below turns
    // them into 0.0.0.0 and 0.0.0.1.
    let listed = V6_GROUPS.iter().find_map(|&(addr, prefix, reason)| {
        let block = Cidr::new(IpAddr::V6(Ipv6Addr::from(addr)), prefix).ok()?;
        block.contains(IpAddr::V6(ip)).then_some(Group {
            reason,
            block: Some(block),
        })
    });
    if listed.is_some() {
        return listed;
    }
    let embedded = embedded_v4(bits)?;
    group_v4(embedded).map(|inner| Group {
        reason: inner.reason,
        block: None,
    })
}

/// The IPv4 address an IPv6 address carries in one of the translation or tunnelling forms.
fn embedded_v4(bits: u128) -> Option<Ipv4Addr> {
    // Low 32 bits; the u128 → u32 truncation is the point.
    let low = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    let high96 = bits >> 32;
    if high96 == 0 {
        // IPv4-compatible ::a.b.c.d (deprecated).
        Some(low)
    } else if high96 == 0xffff_0000 {
        // SIIT IPv4-translated ::ffff:0:a.b.c.d.
        Some(low)
    } else if high96 == 0x0064_ff9b_0000_0000_0000_0000 {
        // Well-known NAT64 prefix 64:ff9b::/96.
        Some(low)
    } else if bits >> 112 == 0x2002 {
        // 6to4 2002:aabb:ccdd::/48.
        Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32))
    } else {
        None
    }
}
