use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The decision on a TCP flow to `addr` port 443 with no pins and no host addresses.
fn tcp(policy: &NetworkPolicy, addr: &str) -> Verdict {
    check_with(policy, addr, 443, Protocol::Tcp, &DnsPins::default(), &[])
}

fn check_with(
    policy: &NetworkPolicy,
    addr: &str,
    port: u16,
    protocol: Protocol,
    pins: &DnsPins,
    host_addrs: &[IpAddr],
) -> Verdict {
    let context = PolicyContext {
        pins,
        host_addrs,
        now: Instant::now(),
    };
    policy.check(SocketAddr::new(ip(addr), port), protocol, &context)
}

const DEFAULT_GROUPS: &[(&str, DenyReason)] = &[
    ("0.0.0.0", DenyReason::Unspecified),
    ("0.1.2.3", DenyReason::Unspecified),
    ("255.255.255.255", DenyReason::Unspecified),
    ("::", DenyReason::Unspecified),
    ("::ffff:0.0.0.0", DenyReason::Unspecified),
    ("127.0.0.1", DenyReason::Loopback),
    ("127.255.0.9", DenyReason::Loopback),
    ("10.1.2.3", DenyReason::Private),
    ("172.16.0.1", DenyReason::Private),
    ("172.31.255.254", DenyReason::Private),
    ("192.168.1.1", DenyReason::Private),
    ("169.254.169.254", DenyReason::Metadata),
    ("169.254.170.2", DenyReason::Metadata),
    ("100.100.100.200", DenyReason::Metadata),
    ("169.254.1.1", DenyReason::LinkLocal),
    ("100.64.0.1", DenyReason::SharedAddressSpace),
    ("100.127.255.255", DenyReason::SharedAddressSpace),
    ("224.0.0.1", DenyReason::Reserved),
    ("239.255.255.250", DenyReason::Reserved),
    ("240.0.0.1", DenyReason::Reserved),
    ("198.18.0.1", DenyReason::Reserved),
    ("198.19.255.1", DenyReason::Reserved),
    ("192.0.0.8", DenyReason::Reserved),
    ("192.0.2.1", DenyReason::Reserved),
    ("198.51.100.1", DenyReason::Reserved),
    ("203.0.113.1", DenyReason::Reserved),
    ("::1", DenyReason::Loopback),
    ("::ffff:127.0.0.1", DenyReason::Loopback),
    ("::ffff:7f00:1", DenyReason::Loopback),
    ("::127.0.0.1", DenyReason::Loopback),
    ("::ffff:0:127.0.0.1", DenyReason::Loopback),
    ("::ffff:169.254.169.254", DenyReason::Metadata),
    ("64:ff9b::7f00:1", DenyReason::Loopback),
    ("64:ff9b::a9fe:a9fe", DenyReason::Metadata),
    ("64:ff9b:1::1", DenyReason::Private),
    ("2002:7f00:1::", DenyReason::Loopback),
    ("2002:a00:1::1", DenyReason::Private),
    ("2001::1", DenyReason::Reserved),
    ("2001:db8::1", DenyReason::Reserved),
    ("fe80::1", DenyReason::LinkLocal),
    ("fc00::1", DenyReason::Private),
    ("fd12:3456::1", DenyReason::Private),
    ("fec0::1", DenyReason::Private),
    ("fd00:ec2::254", DenyReason::Metadata),
    ("ff02::1", DenyReason::Reserved),
];

#[test]
fn every_default_group_is_denied_with_its_reason() {
    let policy = NetworkPolicy::public_internet();
    for &(addr, reason) in DEFAULT_GROUPS {
        assert_eq!(classify(ip(addr)), Some(reason), "classify {addr}");
        assert_eq!(tcp(&policy, addr), Verdict::Deny(reason), "check {addr}");
    }
}

#[test]
fn public_addresses_are_allowed_by_default() {
    let policy = NetworkPolicy::default();
    assert_eq!(policy, NetworkPolicy::public_internet());
    for addr in [
        "1.1.1.1",
        "8.8.8.8",
        "172.32.0.1",
        "100.128.0.1",
        "198.20.0.1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2606:4700::1111",
    ] {
        assert_eq!(classify(ip(addr)), None, "classify {addr}");
        assert_eq!(tcp(&policy, addr), Verdict::Allow, "check {addr}");
    }
    for protocol in [Protocol::Udp, Protocol::Icmp] {
        let verdict = check_with(&policy, "1.1.1.1", 53, protocol, &DnsPins::default(), &[]);
        assert_eq!(verdict, Verdict::Allow, "{protocol:?}");
    }
}

#[test]
fn host_addresses_are_denied_and_opened_only_by_their_exact_address() {
    let host = [ip("203.0.114.7"), ip("192.168.1.20"), ip("127.0.0.1")];
    let pins = DnsPins::default();
    let check = |policy: &NetworkPolicy, addr: &str| {
        check_with(policy, addr, 80, Protocol::Tcp, &pins, &host)
    };
    let policy = NetworkPolicy::public_internet();
    assert_eq!(
        check(&policy, "203.0.114.7"),
        Verdict::Deny(DenyReason::HostAddress)
    );
    assert_eq!(
        check(&policy, "::ffff:203.0.114.7"),
        Verdict::Deny(DenyReason::HostAddress)
    );
    assert_eq!(check(&policy, "203.0.114.8"), Verdict::Allow);
    // A private host address keeps its own group's reason first.
    assert_eq!(
        check(&policy, "192.168.1.20"),
        Verdict::Deny(DenyReason::Private)
    );

    let wide = NetworkPolicy::public_internet()
        .allow(cidr("203.0.114.0/24"))
        .allow(cidr("192.168.0.0/16"));
    assert_eq!(
        check(&wide, "203.0.114.7"),
        Verdict::Deny(DenyReason::HostAddress)
    );
    assert_eq!(
        check(&wide, "192.168.1.20"),
        Verdict::Deny(DenyReason::HostAddress)
    );
    assert_eq!(check(&wide, "192.168.1.21"), Verdict::Allow);

    let exact = NetworkPolicy::public_internet()
        .allow(cidr("203.0.114.7/32"))
        .allow(cidr("192.168.1.20/32"))
        .allow(cidr("127.0.0.1/32"));
    assert_eq!(check(&exact, "203.0.114.7"), Verdict::Allow);
    assert_eq!(check(&exact, "192.168.1.20"), Verdict::Allow);
    // Loopback is its own group: the host's 127.0.0.1 opens with it.
    assert_eq!(check(&exact, "127.0.0.1"), Verdict::Allow);
}

#[test]
fn an_allow_opens_a_group_only_from_inside_it() {
    let loopback = NetworkPolicy::public_internet().allow(cidr("127.0.0.1/32"));
    assert_eq!(tcp(&loopback, "127.0.0.1"), Verdict::Allow);
    assert_eq!(tcp(&loopback, "::ffff:127.0.0.1"), Verdict::Allow);
    assert_eq!(
        tcp(&loopback, "127.0.0.2"),
        Verdict::Deny(DenyReason::Loopback)
    );
    // The forms that carry an IPv4 address in IPv6 are never opened.
    assert_eq!(tcp(&loopback, "::1"), Verdict::Deny(DenyReason::Loopback));
    assert_eq!(
        tcp(&loopback, "64:ff9b::7f00:1"),
        Verdict::Deny(DenyReason::Loopback)
    );

    let everything = NetworkPolicy::deny_all()
        .allow(cidr("0.0.0.0/0"))
        .allow(cidr("::/0"));
    for &(addr, reason) in DEFAULT_GROUPS {
        assert_eq!(tcp(&everything, addr), Verdict::Deny(reason), "{addr}");
    }
    assert_eq!(tcp(&everything, "8.8.8.8"), Verdict::Allow);

    let private = NetworkPolicy::public_internet().allow(cidr("10.0.0.0/8"));
    assert_eq!(tcp(&private, "10.9.9.9"), Verdict::Allow);
    assert_eq!(
        tcp(&private, "172.16.0.1"),
        Verdict::Deny(DenyReason::Private)
    );
    // A block wider than the group does not open it.
    let wider = NetworkPolicy::public_internet().allow(cidr("10.0.0.0/7"));
    assert_eq!(tcp(&wider, "10.9.9.9"), Verdict::Deny(DenyReason::Private));
}

#[test]
fn the_unspecified_address_and_broadcast_are_never_opened() {
    let policy = NetworkPolicy::public_internet()
        .allow(cidr("0.0.0.0/32"))
        .allow(cidr("0.0.0.0/8"))
        .allow(cidr("255.255.255.255/32"))
        .allow(cidr("::/128"));
    for addr in [
        "0.0.0.0",
        "0.0.0.1",
        "255.255.255.255",
        "::",
        "::ffff:0.0.0.0",
    ] {
        assert_eq!(
            tcp(&policy, addr),
            Verdict::Deny(DenyReason::Unspecified),
            "{addr}"
        );
    }
}

#[test]
fn metadata_is_its_own_group_inside_link_local() {
    let link_local = NetworkPolicy::public_internet().allow(cidr("169.254.0.0/16"));
    assert_eq!(tcp(&link_local, "169.254.1.1"), Verdict::Allow);
    assert_eq!(
        tcp(&link_local, "169.254.169.254"),
        Verdict::Deny(DenyReason::Metadata)
    );
    assert_eq!(
        tcp(&link_local, "::ffff:169.254.169.254"),
        Verdict::Deny(DenyReason::Metadata)
    );
    let metadata = NetworkPolicy::public_internet().allow(cidr("169.254.169.254/32"));
    assert_eq!(tcp(&metadata, "169.254.169.254"), Verdict::Allow);
    assert_eq!(
        tcp(&metadata, "169.254.169.253"),
        Verdict::Deny(DenyReason::LinkLocal)
    );
    // Alibaba's metadata address inside CGNAT likewise.
    let cgnat = NetworkPolicy::public_internet().allow(cidr("100.64.0.0/10"));
    assert_eq!(tcp(&cgnat, "100.64.0.1"), Verdict::Allow);
    assert_eq!(
        tcp(&cgnat, "100.100.100.200"),
        Verdict::Deny(DenyReason::Metadata)
    );
}

#[test]
fn port_rules_apply_to_their_protocol_and_range() {
    let https_only =
        NetworkPolicy::deny_all().allow_ports(cidr("0.0.0.0/0"), Protocol::Tcp, 443, 443);
    let pins = DnsPins::default();
    let check =
        |addr: &str, port: u16, protocol| check_with(&https_only, addr, port, protocol, &pins, &[]);
    assert_eq!(check("1.1.1.1", 443, Protocol::Tcp), Verdict::Allow);
    assert_eq!(
        check("1.1.1.1", 80, Protocol::Tcp),
        Verdict::Deny(DenyReason::DenyAll)
    );
    assert_eq!(
        check("1.1.1.1", 444, Protocol::Tcp),
        Verdict::Deny(DenyReason::DenyAll)
    );
    assert_eq!(
        check("1.1.1.1", 443, Protocol::Udp),
        Verdict::Deny(DenyReason::DenyAll)
    );
    assert_eq!(
        check("1.1.1.1", 0, Protocol::Icmp),
        Verdict::Deny(DenyReason::DenyAll)
    );
    assert_eq!(
        check("10.0.0.1", 443, Protocol::Tcp),
        Verdict::Deny(DenyReason::Private)
    );

    // A range, with its bounds in either order.
    let range =
        NetworkPolicy::deny_all().allow_ports(cidr("1.1.1.0/24"), Protocol::Udp, 2000, 1000);
    let check = |port: u16| check_with(&range, "1.1.1.9", port, Protocol::Udp, &pins, &[]);
    assert_eq!(check(999), Verdict::Deny(DenyReason::DenyAll));
    assert_eq!(check(1000), Verdict::Allow);
    assert_eq!(check(2000), Verdict::Allow);
    assert_eq!(check(2001), Verdict::Deny(DenyReason::DenyAll));

    // ICMP has no port: a rule for ICMP matches all of it.
    let no_ping =
        NetworkPolicy::public_internet().deny_ports(cidr("0.0.0.0/0"), Protocol::Icmp, 7, 7);
    assert_eq!(
        check_with(&no_ping, "1.1.1.1", 0, Protocol::Icmp, &pins, &[]),
        Verdict::Deny(DenyReason::Rule)
    );
    assert_eq!(
        check_with(&no_ping, "1.1.1.1", 7, Protocol::Tcp, &pins, &[]),
        Verdict::Allow
    );

    let no_smtp =
        NetworkPolicy::public_internet().deny_ports(cidr("0.0.0.0/0"), Protocol::Tcp, 25, 25);
    assert_eq!(
        check_with(&no_smtp, "1.1.1.1", 25, Protocol::Tcp, &pins, &[]),
        Verdict::Deny(DenyReason::Rule)
    );
    assert_eq!(
        check_with(&no_smtp, "1.1.1.1", 25, Protocol::Udp, &pins, &[]),
        Verdict::Allow
    );
}

#[test]
fn first_matching_rule_wins() {
    let deny_first = NetworkPolicy::public_internet()
        .deny(cidr("1.1.1.1/32"))
        .allow(cidr("1.1.1.0/24"));
    assert_eq!(tcp(&deny_first, "1.1.1.1"), Verdict::Deny(DenyReason::Rule));
    assert_eq!(tcp(&deny_first, "1.1.1.2"), Verdict::Allow);

    let allow_first = NetworkPolicy::deny_all()
        .allow(cidr("1.1.1.1/32"))
        .deny(cidr("1.1.1.0/24"));
    assert_eq!(tcp(&allow_first, "1.1.1.1"), Verdict::Allow);
    assert_eq!(
        tcp(&allow_first, "1.1.1.2"),
        Verdict::Deny(DenyReason::Rule)
    );
    assert_eq!(
        tcp(&allow_first, "1.1.2.1"),
        Verdict::Deny(DenyReason::DenyAll)
    );

    // The first match decides even when it cannot open the group: a later, narrower allow is
    // not consulted.
    let wide_first = NetworkPolicy::public_internet()
        .allow(cidr("0.0.0.0/0"))
        .allow(cidr("10.0.0.0/8"));
    assert_eq!(
        tcp(&wide_first, "10.0.0.1"),
        Verdict::Deny(DenyReason::Private)
    );
    // A deny rule's reason wins over a group's.
    let deny_loopback = NetworkPolicy::public_internet().deny(cidr("127.0.0.0/8"));
    assert_eq!(
        tcp(&deny_loopback, "127.0.0.1"),
        Verdict::Deny(DenyReason::Rule)
    );
}

#[test]
fn deny_all_denies_the_rest_and_every_name() {
    let policy = NetworkPolicy::deny_all();
    assert_eq!(tcp(&policy, "1.1.1.1"), Verdict::Deny(DenyReason::DenyAll));
    assert_eq!(tcp(&policy, "10.0.0.1"), Verdict::Deny(DenyReason::Private));
    assert!(!policy.name_allowed("example.com"));
    assert!(NetworkPolicy::public_internet().name_allowed("example.com"));
    let opened = policy.allow(cidr("1.1.1.0/24"));
    assert_eq!(tcp(&opened, "1.1.1.1"), Verdict::Allow);
    assert_eq!(tcp(&opened, "1.1.2.1"), Verdict::Deny(DenyReason::DenyAll));
}

#[test]
fn domain_allowlist_allows_pinned_addresses_until_they_expire() {
    let policy = NetworkPolicy::public_internet()
        .allow_domain("Example.COM.")
        .unwrap()
        .allow(cidr("9.9.9.9/32"));
    assert!(policy.has_domain_allowlist());
    assert!(policy.name_allowed("example.com"));
    assert!(policy.name_allowed("www.EXAMPLE.com."));
    assert!(!policy.name_allowed("badexample.com"));
    assert!(!policy.name_allowed("example.com.evil.net"));
    assert!(!policy.name_allowed("com"));
    assert!(!policy.name_allowed(""));

    let now = Instant::now();
    let mut pins = DnsPins::default();
    let verdict = |pins: &DnsPins, addr: &str, now| {
        let context = PolicyContext {
            pins,
            host_addrs: &[],
            now,
        };
        policy.check(SocketAddr::new(ip(addr), 443), Protocol::Tcp, &context)
    };
    assert_eq!(
        verdict(&pins, "93.184.216.34", now),
        Verdict::Deny(DenyReason::NotPinned)
    );
    // An allow rule covers an address without a pin.
    assert_eq!(verdict(&pins, "9.9.9.9", now), Verdict::Allow);

    pins.pin(
        "www.example.com",
        &[ip("93.184.216.34")],
        now + Duration::from_secs(60),
    );
    assert_eq!(
        pins.pinned(ip("93.184.216.34"), now),
        Some("www.example.com")
    );
    assert_eq!(verdict(&pins, "93.184.216.34", now), Verdict::Allow);
    assert_eq!(verdict(&pins, "::ffff:93.184.216.34", now), Verdict::Allow);
    assert_eq!(
        verdict(&pins, "93.184.216.35", now),
        Verdict::Deny(DenyReason::NotPinned)
    );
    let later = now + Duration::from_secs(61);
    assert_eq!(pins.pinned(ip("93.184.216.34"), later), None);
    assert_eq!(
        verdict(&pins, "93.184.216.34", later),
        Verdict::Deny(DenyReason::NotPinned)
    );

    // A pin made for a name the policy does not allow (pins are made for every answer) does
    // not count.
    pins.pin("evil.net", &[ip("6.6.6.6")], now + Duration::from_secs(60));
    assert_eq!(
        verdict(&pins, "6.6.6.6", now),
        Verdict::Deny(DenyReason::NotPinned)
    );

    // A pin does not open a default group.
    pins.pin(
        "example.com",
        &[ip("127.0.0.1")],
        later + Duration::from_secs(60),
    );
    assert_eq!(
        verdict(&pins, "127.0.0.1", later),
        Verdict::Deny(DenyReason::Loopback)
    );

    // An allowlist on deny_all allows its names too.
    let strict = NetworkPolicy::deny_all()
        .allow_domain("example.com")
        .unwrap();
    assert!(strict.name_allowed("api.example.com"));
    assert!(!strict.name_allowed("example.org"));
}

#[test]
fn allow_domain_rejects_what_is_not_a_host_name() {
    for bad in [
        "",
        ".",
        "*.example.com",
        "a..b",
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "::1",
        "a b",
    ] {
        assert!(
            NetworkPolicy::public_internet().allow_domain(bad).is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn answer_filter_drops_default_groups_unless_a_rule_opens_them() {
    let open = NetworkPolicy::public_internet();
    let host = [ip("203.0.114.7")];
    assert!(open.answer_allowed(ip("93.184.216.34"), &host));
    for addr in [
        "127.0.0.1",
        "169.254.169.254",
        "10.0.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "203.0.114.7",
    ] {
        assert!(!open.answer_allowed(ip(addr), &host), "{addr}");
    }
    let local = NetworkPolicy::public_internet()
        .allow(cidr("10.0.0.0/8"))
        .allow(cidr("169.254.0.0/16"))
        .allow(cidr("0.0.0.0/8"));
    assert!(local.answer_allowed(ip("10.1.1.1"), &host));
    assert!(local.answer_allowed(ip("169.254.1.1"), &host));
    assert!(!local.answer_allowed(ip("169.254.169.254"), &host));
    assert!(!local.answer_allowed(ip("0.0.0.0"), &host));
    assert!(!local.answer_allowed(ip("127.0.0.1"), &host));
}

#[test]
fn pins_are_bounded_and_evict_the_first_ending() {
    let now = Instant::now();
    let mut pins = DnsPins::default();
    let addr = |i: usize| IpAddr::from((0x0b00_0000_u32 + i as u32).to_be_bytes());
    // One expired pin, then a full table of live ones.
    pins.pin("old", &[addr(0)], now - Duration::from_secs(1));
    for i in 1..MAX_PINS {
        pins.pin("name", &[addr(i)], now + Duration::from_secs(i as u64));
    }
    assert_eq!(pins.len(), MAX_PINS);
    pins.pin("new", &[addr(MAX_PINS)], now + Duration::from_secs(100_000));
    assert_eq!(pins.len(), MAX_PINS);
    assert_eq!(pins.pinned(addr(MAX_PINS), now), Some("new"));
    assert_eq!(pins.pinned(addr(1), now), Some("name"));
    // The next one evicts the oldest live pin.
    pins.pin(
        "newer",
        &[addr(MAX_PINS + 1)],
        now + Duration::from_secs(100_000),
    );
    assert_eq!(pins.len(), MAX_PINS);
    assert_eq!(pins.pinned(addr(1), now), None);
    assert_eq!(pins.pinned(addr(2), now), Some("name"));
    // Renewing keeps the later end.
    pins.pin("again", &[addr(2)], now);
    assert_eq!(
        pins.pinned(addr(2), now + Duration::from_millis(1500)),
        Some("name")
    );
    pins.prune(now + Duration::from_secs(10));
    assert_eq!(pins.pinned(addr(9), now), None);
    assert_eq!(pins.pinned(addr(11), now), Some("name"));
}

#[test]
fn host_addresses_lists_loopback_when_it_is_configured() {
    // Binding succeeds only to an address of this host (nothing is sent): when 127.0.0.1 is one,
    // getifaddrs must list it.
    let addrs = host_addresses();
    if std::net::UdpSocket::bind("127.0.0.1:0").is_ok() {
        assert!(addrs.contains(&ip("127.0.0.1")), "{addrs:?}");
    }
    let mut unique = addrs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), addrs.len(), "{addrs:?}");
}
