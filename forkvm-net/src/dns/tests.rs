use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use simple_dns::rdata::{OPT, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, Question, RCODE, TYPE};

use super::*;
use crate::policy::{Cidr, DnsPins, NetworkPolicy};
use crate::seams::{Resolver, StaticResolver};

const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 40000);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A resolver that records the names it is asked for and answers from a static map.
#[derive(Default)]
struct Recording {
    inner: StaticResolver,
    calls: Mutex<Vec<String>>,
}

impl Resolver for Recording {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        self.calls.lock().unwrap().push(name.to_owned());
        self.inner.resolve(name)
    }
}

/// A resolver that blocks until released.
#[derive(Default)]
struct Blocking {
    released: Mutex<bool>,
    wake: Condvar,
}

impl Blocking {
    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.wake.notify_all();
    }
}

impl Resolver for Blocking {
    fn resolve(&self, _: &str) -> io::Result<Vec<IpAddr>> {
        let mut released = self.released.lock().unwrap();
        while !*released {
            released = self.wake.wait(released).unwrap();
        }
        Ok(vec![ip("93.184.216.34")])
    }
}

/// A resolver that fails in the given way.
struct Failing(io::ErrorKind);

impl Resolver for Failing {
    fn resolve(&self, _: &str) -> io::Result<Vec<IpAddr>> {
        Err(io::Error::from(self.0))
    }
}

struct Panicking;

impl Resolver for Panicking {
    fn resolve(&self, _: &str) -> io::Result<Vec<IpAddr>> {
        panic!("a resolver bug")
    }
}

/// A forwarder under test, with its policy, pins and host addresses.
struct Harness {
    forwarder: DnsForwarder,
    policy: NetworkPolicy,
    pins: DnsPins,
    host_addrs: Vec<IpAddr>,
}

impl Harness {
    fn new(resolver: Arc<dyn Resolver>) -> Self {
        Self::with_hosts(resolver, HashMap::new())
    }

    fn with_hosts(resolver: Arc<dyn Resolver>, hosts: HashMap<String, Vec<IpAddr>>) -> Self {
        Self {
            forwarder: DnsForwarder::new(resolver, hosts).unwrap(),
            policy: NetworkPolicy::public_internet(),
            pins: DnsPins::default(),
            host_addrs: Vec::new(),
        }
    }

    fn send(&mut self, packet: &[u8]) -> Option<Vec<u8>> {
        self.forwarder.query(
            CLIENT,
            packet,
            &self.policy,
            &mut self.pins,
            &self.host_addrs,
            Instant::now(),
        )
    }

    fn take(&mut self) -> Vec<(SocketAddrV4, Vec<u8>)> {
        self.forwarder.take_answers(
            &self.policy,
            &mut self.pins,
            &self.host_addrs,
            Instant::now(),
        )
    }

    /// The next resolved answer, after waiting for the eventfd.
    fn resolved(&mut self) -> Vec<u8> {
        assert!(
            readable(self.forwarder.event_fd(), 5000),
            "no answer in 5 s"
        );
        let mut answers = self.take();
        assert_eq!(answers.len(), 1);
        let (client, answer) = answers.remove(0);
        assert_eq!(client, CLIENT);
        answer
    }
}

/// Whether `fd` becomes readable within `timeout_ms`.
fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and the count says one.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
    assert!(ready >= 0, "poll: {}", io::Error::last_os_error());
    ready == 1 && pollfd.revents & libc::POLLIN != 0
}

fn query(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        qtype.into(),
        CLASS::IN.into(),
        false,
    ));
    packet.build_bytes_vec().unwrap()
}

fn a_query(name: &str) -> Vec<u8> {
    query(0x1234, name, TYPE::A)
}

/// The response's code and A addresses, after checking what every answer must have.
fn decode(bytes: &[u8], id: u16, name: &str) -> (RCODE, Vec<Ipv4Addr>) {
    let packet = Packet::parse(bytes).unwrap();
    assert_eq!(packet.id(), id);
    assert!(packet.has_flags(PacketFlag::RESPONSE));
    assert!(packet.has_flags(PacketFlag::RECURSION_AVAILABLE));
    assert!(packet.has_flags(PacketFlag::RECURSION_DESIRED));
    assert_eq!(packet.questions.len(), 1);
    assert_eq!(packet.questions[0].qname.to_string(), name);
    let addrs = packet
        .answers
        .iter()
        .map(|record| {
            assert_eq!(record.ttl, 60);
            assert_eq!(record.class, CLASS::IN);
            match &record.rdata {
                RData::A(a) => Ipv4Addr::from(a.address),
                other => panic!("not an A record: {other:?}"),
            }
        })
        .collect();
    (packet.rcode(), addrs)
}

#[test]
fn hosts_map_answers_at_once_and_pins() {
    let hosts = HashMap::from([(
        "Host.Internal.".to_owned(),
        vec![ip("10.0.2.2"), ip("fd00::2")],
    )]);
    let resolver = Arc::new(Recording::default());
    let mut h = Harness::with_hosts(resolver.clone(), hosts);
    let answer = h.send(&a_query("HOST.internal")).unwrap();
    let (rcode, addrs) = decode(&answer, 0x1234, "HOST.internal");
    assert_eq!(rcode, RCODE::NoError);
    assert_eq!(addrs, [Ipv4Addr::new(10, 0, 2, 2)]);
    assert_eq!(
        h.pins.pinned(ip("10.0.2.2"), Instant::now()),
        Some("host.internal")
    );

    let aaaa = h.send(&query(7, "host.internal", TYPE::AAAA)).unwrap();
    assert_eq!(decode(&aaaa, 7, "host.internal"), (RCODE::NoError, vec![]));
    assert!(resolver.calls.lock().unwrap().is_empty());
    assert_eq!(h.forwarder.stats().answered, 1);
    assert_eq!(h.forwarder.stats().queries, 2);
}

#[test]
fn resolver_answers_come_through_the_eventfd() {
    let resolver = StaticResolver::new().with(
        "example.com",
        &[
            ip("93.184.216.34"),
            ip("2606:2800:220:1::1"),
            ip("93.184.216.34"),
        ],
    );
    let mut h = Harness::new(Arc::new(resolver));
    assert!(!readable(h.forwarder.event_fd(), 0));
    assert_eq!(h.send(&a_query("example.com.")), None);
    assert_eq!(h.forwarder.in_flight(), 1);
    let answer = h.resolved();
    assert_eq!(
        decode(&answer, 0x1234, "example.com"),
        (RCODE::NoError, vec![Ipv4Addr::new(93, 184, 216, 34)])
    );
    // The event is consumed and the slot given back.
    assert!(!readable(h.forwarder.event_fd(), 0));
    assert!(h.take().is_empty());
    assert_eq!(h.forwarder.in_flight(), 0);
    assert_eq!(
        h.pins.pinned(ip("93.184.216.34"), Instant::now()),
        Some("example.com")
    );
    let stats = h.forwarder.stats();
    assert_eq!((stats.queries, stats.answered), (1, 1));
}

#[test]
fn aaaa_is_empty_and_other_types_are_not_implemented() {
    let resolver = Arc::new(Recording::default());
    let mut h = Harness::new(resolver.clone());
    let aaaa = h.send(&query(1, "example.com", TYPE::AAAA)).unwrap();
    assert_eq!(decode(&aaaa, 1, "example.com"), (RCODE::NoError, vec![]));
    let mx = h.send(&query(2, "example.com", TYPE::MX)).unwrap();
    assert_eq!(
        decode(&mx, 2, "example.com"),
        (RCODE::NotImplemented, vec![])
    );
    let txt = h.send(&query(3, "example.com", TYPE::TXT)).unwrap();
    assert_eq!(
        decode(&txt, 3, "example.com"),
        (RCODE::NotImplemented, vec![])
    );
    // Class CH (version.bind and the like).
    let mut chaos = Packet::new_query(4);
    chaos.set_flags(PacketFlag::RECURSION_DESIRED);
    chaos.questions.push(Question::new(
        Name::new_unchecked("version.bind"),
        TYPE::TXT.into(),
        CLASS::CH.into(),
        false,
    ));
    let answer = h.send(&chaos.build_bytes_vec().unwrap()).unwrap();
    assert_eq!(
        Packet::parse(&answer).unwrap().rcode(),
        RCODE::NotImplemented
    );
    assert!(resolver.calls.lock().unwrap().is_empty());
}

#[test]
fn unknown_names_and_resolver_failures() {
    let mut h = Harness::new(Arc::new(StaticResolver::new().with("empty.test", &[])));
    assert_eq!(h.send(&a_query("nowhere.test")), None);
    assert_eq!(
        decode(&h.resolved(), 0x1234, "nowhere.test").0,
        RCODE::NameError
    );
    assert_eq!(h.send(&a_query("empty.test")), None);
    assert_eq!(
        decode(&h.resolved(), 0x1234, "empty.test").0,
        RCODE::NameError
    );

    let mut h = Harness::new(Arc::new(Failing(io::ErrorKind::TimedOut)));
    assert_eq!(h.send(&a_query("example.com")), None);
    assert_eq!(
        decode(&h.resolved(), 0x1234, "example.com").0,
        RCODE::ServerFailure
    );

    let mut h = Harness::new(Arc::new(Panicking));
    assert_eq!(h.send(&a_query("example.com")), None);
    assert_eq!(
        decode(&h.resolved(), 0x1234, "example.com").0,
        RCODE::ServerFailure
    );
    assert_eq!(h.forwarder.in_flight(), 0);

    // Only IPv6 addresses: the name exists, with no A record.
    let v6 = StaticResolver::new().with("v6.test", &[ip("2606:2800:220:1::1")]);
    let mut h = Harness::new(Arc::new(v6));
    assert_eq!(h.send(&a_query("v6.test")), None);
    assert_eq!(
        decode(&h.resolved(), 0x1234, "v6.test"),
        (RCODE::NoError, vec![])
    );
}

#[test]
fn ip_literal_names_never_reach_the_resolver() {
    let resolver = Arc::new(Recording::default());
    let mut h = Harness::new(resolver.clone());
    for literal in [
        "2130706433",
        "0177.0.0.1",
        "0x7f.1",
        "127.1",
        "127.0.0.1",
        "127.0.0.1.",
        "169.254.169.254",
        "0251.0376.0251.0376",
        "0xA9FEA9FE",
        "1.2.3.999",
    ] {
        let answer = h.send(&a_query(literal)).expect(literal);
        assert_eq!(
            Packet::parse(&answer).unwrap().rcode(),
            RCODE::NameError,
            "{literal}"
        );
    }
    assert!(resolver.calls.lock().unwrap().is_empty());
    assert_eq!(h.forwarder.in_flight(), 0);
}

#[test]
fn names_that_are_not_host_names_are_answered_nxdomain() {
    let resolver = Arc::new(Recording::default());
    let mut h = Harness::new(resolver.clone());
    // A label holding a dot (it would read as two labels), a space, a NUL, the root.
    let mut dotted = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    dotted.extend_from_slice(b"\x09127.0.0.1\x00\x00\x01\x00\x01");
    let mut spaced = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    spaced.extend_from_slice(b"\x03a b\x03com\x00\x00\x01\x00\x01");
    let mut nul = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    nul.extend_from_slice(b"\x03a\x00b\x03com\x00\x00\x01\x00\x01");
    let mut root = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    root.extend_from_slice(b"\x00\x00\x01\x00\x01");
    for packet in [dotted, spaced, nul, root] {
        let answer = h.send(&packet).unwrap();
        assert_eq!(Packet::parse(&answer).unwrap().rcode(), RCODE::NameError);
    }
    assert!(resolver.calls.lock().unwrap().is_empty());
}

#[test]
fn names_the_policy_denies_are_nxdomain_without_resolving() {
    let resolver = Arc::new(Recording {
        inner: StaticResolver::new().with("www.example.com", &[ip("93.184.216.34")]),
        ..Recording::default()
    });
    let mut h = Harness::new(resolver.clone());
    h.policy = NetworkPolicy::deny_all()
        .allow_domain("example.com")
        .unwrap();
    let denied = h.send(&a_query("evil.net")).unwrap();
    assert_eq!(decode(&denied, 0x1234, "evil.net").0, RCODE::NameError);
    let denied = h.send(&query(9, "evil.net", TYPE::AAAA)).unwrap();
    assert_eq!(decode(&denied, 9, "evil.net").0, RCODE::NameError);
    assert_eq!(h.forwarder.stats().denied_names, 2);
    assert!(resolver.calls.lock().unwrap().is_empty());

    assert_eq!(h.send(&a_query("www.example.com")), None);
    let (rcode, addrs) = decode(&h.resolved(), 0x1234, "www.example.com");
    assert_eq!(
        (rcode, addrs),
        (RCODE::NoError, vec![Ipv4Addr::new(93, 184, 216, 34)])
    );
    assert_eq!(*resolver.calls.lock().unwrap(), ["www.example.com"]);

    // The policy changes while a name resolves: the answer follows the new one.
    assert_eq!(h.send(&a_query("www.example.com")), None);
    assert!(readable(h.forwarder.event_fd(), 5000));
    h.policy = NetworkPolicy::deny_all();
    let answers = h.take();
    assert_eq!(answers.len(), 1);
    assert_eq!(
        decode(&answers[0].1, 0x1234, "www.example.com").0,
        RCODE::NameError
    );
    assert_eq!(h.forwarder.stats().denied_names, 3);

    let mut h = Harness::new(Arc::new(Recording::default()));
    h.policy = NetworkPolicy::deny_all();
    let answer = h.send(&a_query("example.com")).unwrap();
    assert_eq!(decode(&answer, 0x1234, "example.com").0, RCODE::NameError);
}

#[test]
fn rebinding_answers_are_filtered() {
    let resolver = StaticResolver::new()
        .with(
            "mixed.example",
            &[ip("127.0.0.1"), ip("169.254.169.254"), ip("93.184.216.34")],
        )
        .with("rebind.example", &[ip("127.0.0.1")])
        .with("metadata.example", &[ip("169.254.169.254")])
        .with("self.example", &[ip("203.0.114.7")]);
    let mut h = Harness::new(Arc::new(resolver));
    h.host_addrs = vec![ip("203.0.114.7")];

    assert_eq!(h.send(&a_query("mixed.example")), None);
    let (rcode, addrs) = decode(&h.resolved(), 0x1234, "mixed.example");
    assert_eq!(
        (rcode, addrs),
        (RCODE::NoError, vec![Ipv4Addr::new(93, 184, 216, 34)])
    );
    assert_eq!(h.forwarder.stats().filtered_addresses, 2);
    assert_eq!(h.pins.pinned(ip("127.0.0.1"), Instant::now()), None);

    for name in ["rebind.example", "metadata.example", "self.example"] {
        assert_eq!(h.send(&a_query(name)), None);
        assert_eq!(
            decode(&h.resolved(), 0x1234, name),
            (RCODE::NameError, vec![])
        );
    }
    assert_eq!(h.forwarder.stats().filtered_addresses, 5);
    assert_eq!(h.forwarder.stats().answered, 1);

    // A user allow rule that opens the group lets the answer through.
    h.policy = NetworkPolicy::public_internet().allow(Cidr::host(ip("127.0.0.1")));
    assert_eq!(h.send(&a_query("rebind.example")), None);
    let (rcode, addrs) = decode(&h.resolved(), 0x1234, "rebind.example");
    assert_eq!((rcode, addrs), (RCODE::NoError, vec![Ipv4Addr::LOCALHOST]));
}

#[test]
fn answers_carry_at_most_max_answer_addresses() {
    let many: Vec<IpAddr> = (1..=40u8)
        .map(|i| IpAddr::from([93, 184, 216, i]))
        .collect();
    let long = format!(
        "{}.{}.{}.example",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63)
    );
    let resolver = StaticResolver::new().with(&long, &many);
    let mut h = Harness::new(Arc::new(resolver));
    assert_eq!(h.send(&a_query(&long)), None);
    let answer = h.resolved();
    assert!(answer.len() <= 512, "{} bytes", answer.len());
    let (rcode, addrs) = decode(&answer, 0x1234, &long);
    assert_eq!(rcode, RCODE::NoError);
    assert_eq!(addrs.len(), MAX_ANSWER_ADDRESSES);
}

#[test]
fn in_flight_cap_answers_servfail_at_once_and_drop_does_not_wait() {
    let blocking = Arc::new(Blocking::default());
    let mut h = Harness::new(blocking.clone());
    for i in 0..MAX_IN_FLIGHT {
        assert_eq!(h.send(&a_query(&format!("n{i}.example"))), None);
    }
    assert_eq!(h.forwarder.in_flight(), MAX_IN_FLIGHT);
    let busy = h.send(&a_query("one-more.example")).unwrap();
    assert_eq!(
        decode(&busy, 0x1234, "one-more.example").0,
        RCODE::ServerFailure
    );
    assert_eq!(h.forwarder.stats().busy, 1);
    assert!(h.take().is_empty());

    // Dropping a forwarder whose resolver hangs returns at once.
    let hung = Arc::new(Blocking::default());
    let mut other = Harness::new(hung.clone());
    assert_eq!(other.send(&a_query("hangs.example")), None);
    let started = Instant::now();
    drop(other);
    assert!(started.elapsed() < Duration::from_secs(1));
    hung.release();

    // Released, every query is answered and the slots come back.
    blocking.release();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut answered = 0;
    while answered < MAX_IN_FLIGHT && Instant::now() < deadline {
        if readable(h.forwarder.event_fd(), 1000) {
            answered += h.take().len();
        }
    }
    assert_eq!(answered, MAX_IN_FLIGHT);
    assert_eq!(h.forwarder.in_flight(), 0);
    assert_eq!(h.send(&a_query("again.example")), None);
}

#[test]
fn malformed_packets_get_no_answer() {
    let resolver = Arc::new(Recording::default());
    let mut h = Harness::new(resolver.clone());
    let good = a_query("example.com");
    let with_counts = |qd: u16, an: u16, ns: u16, ar: u16| {
        let mut packet = good.clone();
        packet[4..6].copy_from_slice(&qd.to_be_bytes());
        packet[6..8].copy_from_slice(&an.to_be_bytes());
        packet[8..10].copy_from_slice(&ns.to_be_bytes());
        packet[10..12].copy_from_slice(&ar.to_be_bytes());
        packet
    };
    let mut response = good.clone();
    response[2] |= 0x80;
    let mut pointer_forward = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    pointer_forward.extend_from_slice(&[0xc0, 0x20, 0, 1, 0, 1]);
    let mut pointer_self = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    pointer_self.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    let mut long_label = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    long_label.push(64);
    long_label.extend_from_slice(&[b'a'; 64]);
    long_label.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut unknown_type = good.clone();
    let at = unknown_type.len() - 4;
    unknown_type[at..at + 2].copy_from_slice(&0xfff0u16.to_be_bytes());
    let mut garbage = vec![0u8; 300];
    let mut state = 0x2545_f491_u32;
    for byte in &mut garbage {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        *byte = state as u8;
    }

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short header", good[..11].to_vec()),
        ("header only", good[..12].to_vec()),
        ("truncated question", good[..good.len() - 1].to_vec()),
        ("zero questions", with_counts(0, 0, 0, 0)),
        ("two questions", with_counts(2, 0, 0, 0)),
        ("huge question count", with_counts(u16::MAX, 0, 0, 0)),
        ("huge answer count", with_counts(1, u16::MAX, 0, 0)),
        ("huge authority count", with_counts(1, 0, u16::MAX, 0)),
        ("huge additional count", with_counts(1, 0, 0, u16::MAX)),
        ("a response", response),
        ("forward pointer", pointer_forward),
        ("self pointer", pointer_self),
        ("label over 63", long_label),
        ("unknown type", unknown_type),
        ("garbage", garbage.clone()),
    ];
    for len in [1, 13, 17, 64, 299] {
        cases.push(("garbage prefix", garbage[..len].to_vec()));
    }
    for (what, packet) in &cases {
        assert_eq!(h.send(packet), None, "{what}");
    }
    assert_eq!(h.forwarder.in_flight(), 0);
    assert!(resolver.calls.lock().unwrap().is_empty());
    assert_eq!(h.forwarder.stats().malformed, cases.len() as u64);

    // Every truncation of a good query and every single-byte change: no panic (an answer or
    // none, whichever the bytes call for).
    for len in 0..good.len() {
        h.send(&good[..len]);
    }
    for at in 0..good.len() {
        for value in [0x00, 0x3f, 0x40, 0x80, 0xc0, 0xff] {
            let mut packet = good.clone();
            packet[at] = value;
            h.send(&packet);
        }
    }
}

#[test]
fn edns_queries_are_answered_without_edns() {
    let hosts = HashMap::from([("host.internal".to_owned(), vec![ip("10.0.2.2")])]);
    let mut h = Harness::with_hosts(Arc::new(Recording::default()), hosts);
    let mut packet = Packet::new_query(0x4242);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked("host.internal"),
        TYPE::A.into(),
        CLASS::IN.into(),
        false,
    ));
    *packet.opt_mut() = Some(OPT {
        opt_codes: Vec::new(),
        udp_packet_size: 1232,
        version: 0,
    });
    let bytes = packet.build_bytes_vec().unwrap();
    assert_eq!(
        u16::from_be_bytes([bytes[10], bytes[11]]),
        1,
        "one additional record"
    );
    let answer = h.send(&bytes).unwrap();
    let (rcode, addrs) = decode(&answer, 0x4242, "host.internal");
    assert_eq!(
        (rcode, addrs),
        (RCODE::NoError, vec![Ipv4Addr::new(10, 0, 2, 2)])
    );
    assert!(Packet::parse(&answer).unwrap().opt().is_none());
}

#[test]
fn parse_query_name_reads_the_question() {
    assert_eq!(
        parse_query_name(&a_query("WWW.Example.COM.")).as_deref(),
        Some("www.example.com")
    );
    assert_eq!(
        parse_query_name(&a_query("127.1")).as_deref(),
        Some("127.1")
    );
    assert_eq!(parse_query_name(&[0; 5]), None);
    assert_eq!(parse_query_name(&a_query("example.com")[..20]), None);
    let mut nul = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    nul.extend_from_slice(b"\x03a\x00b\x00\x00\x01\x00\x01");
    assert_eq!(parse_query_name(&nul), None);
}
