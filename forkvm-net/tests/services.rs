//! What the gateway answers itself or relays: UDP, DNS, DHCP, ARP, ping; and hostile frames.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::Duration;

use forkvm_devices::virtio::net::NetBackend;
use forkvm_net::{NetworkPolicy, StaticResolver};
use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, Packet, Question, RCODE, TYPE};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::{dhcpv4, udp};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
};
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

fn udp_socket(h: &mut Harness, port: u16) -> SocketHandle {
    let meta = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 16], vec![0; 16384]);
    let mut socket = udp::Socket::new(meta(), meta());
    socket.bind(port).unwrap();
    h.sockets.add(socket)
}

/// Receives one datagram on a guest UDP socket.
fn recv_udp(h: &mut Harness, socket: SocketHandle) -> (Vec<u8>, SocketAddr) {
    let mut got = None;
    assert!(h.run_until(LIMIT, |h| {
        if let Ok((data, meta)) = h.sockets.get_mut::<udp::Socket>(socket).recv() {
            let IpAddress::Ipv4(ip) = meta.endpoint.addr;
            got = Some((data.to_vec(), SocketAddr::from((ip, meta.endpoint.port))));
        }
        got.is_some()
    }));
    got.unwrap()
}

#[test]
fn udp_round_trip_through_the_relay() {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let echo = thread::spawn(move || {
        server.set_read_timeout(Some(LIMIT)).unwrap();
        let mut buffer = [0u8; 2048];
        let (n, from) = server.recv_from(&mut buffer).unwrap();
        server.send_to(&buffer[..n], from).unwrap();
    });
    let internet = FakeInternet::new().map(SocketAddr::from(([8, 8, 4, 4], 7)), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let socket = udp_socket(&mut h, 5000);
    h.sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(b"echo me", (Ipv4Addr::new(8, 8, 4, 4), 7))
        .unwrap();
    let (data, from) = recv_udp(&mut h, socket);
    assert_eq!(data, b"echo me");
    assert_eq!(from, SocketAddr::from(([8, 8, 4, 4], 7)));
    echo.join().unwrap();
    assert_eq!(h.handle.stats().udp_flows_total, 1);

    // A documentation address is denied by the default groups: nothing reaches the connector.
    h.sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(b"x", (Ipv4Addr::new(198, 51, 100, 7), 7))
        .unwrap();
    h.run_for(Duration::from_millis(50));
    assert_eq!(
        h.internet.calls(),
        vec![SocketAddr::from(([8, 8, 4, 4], 7))]
    );
    assert_eq!(h.handle.stats().denied_total, 1);
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut packet = Packet::new_query(id);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        TYPE::A.into(),
        CLASS::IN.into(),
        false,
    ));
    packet.build_bytes_vec().unwrap()
}

#[test]
fn dns_through_the_forwarder_then_a_connection_to_the_answer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let resolver = StaticResolver::new().with("example.com", &[ip(93, 184, 216, 34)]);
    let mut h = Harness::with(NetworkPolicy::public_internet(), internet, resolver, true);
    let socket = udp_socket(&mut h, 5353);
    let dns = (Ipv4Addr::new(10, 0, 2, 3), 53);
    h.sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(&dns_query(7, "example.com"), dns)
        .unwrap();
    let (answer, from) = recv_udp(&mut h, socket);
    assert_eq!(from, SocketAddr::from(dns));
    let packet = Packet::parse(&answer).unwrap();
    assert_eq!(packet.id(), 7);
    assert_eq!(packet.rcode(), RCODE::NoError);
    let addrs: Vec<Ipv4Addr> = packet
        .answers
        .iter()
        .filter_map(|r| match &r.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect();
    assert_eq!(addrs, vec![Ipv4Addr::new(93, 184, 216, 34)]);

    // An unknown name: NXDOMAIN.
    h.sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(&dns_query(8, "nowhere.example"), dns)
        .unwrap();
    let (answer, _) = recv_udp(&mut h, socket);
    assert_eq!(Packet::parse(&answer).unwrap().rcode(), RCODE::NameError);
    assert!(h.handle.stats().dns.queries >= 2);

    let conn = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(conn)
        == smoltcp::socket::tcp::State::Established));
    assert!(listener.accept().is_ok());
    assert!(h.internet.refused().is_empty());
}

#[test]
fn dhcp_leases_the_guest_its_address() {
    let mut h = Harness::with(
        NetworkPolicy::public_internet(),
        FakeInternet::new(),
        StaticResolver::new(),
        false,
    );
    let socket = h.sockets.add(dhcpv4::Socket::new());
    let mut config = None;
    assert!(h.run_until(LIMIT, |h| {
        if let Some(dhcpv4::Event::Configured(c)) =
            h.sockets.get_mut::<dhcpv4::Socket>(socket).poll()
        {
            config = Some((
                c.address,
                c.router,
                c.dns_servers.to_vec(),
                c.server.address,
            ));
        }
        config.is_some()
    }));
    let (address, router, dns, server) = config.unwrap();
    assert_eq!(address.address(), Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(address.prefix_len(), 24);
    assert_eq!(router, Some(Ipv4Addr::new(10, 0, 2, 2)));
    assert_eq!(dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
    assert_eq!(server, Ipv4Addr::new(10, 0, 2, 2));
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let config = forkvm_net::NetworkConfig::default();
    let eth = EthernetRepr {
        src_addr: EthernetAddress(config.guest_mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(config.guest_mac),
        source_protocol_addr: config.guest_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut frame = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut eth_frame);
    arp.emit(&mut ArpPacket::new_unchecked(eth_frame.payload_mut()));
    frame
}

/// Sends `frame` and collects what comes back within a short time.
fn exchange(h: &mut Harness, frame: &[u8]) -> Vec<Vec<u8>> {
    h.net.transmit(frame);
    let mut replies = Vec::new();
    for _ in 0..20 {
        h.net.process();
        while let Some(reply) = h.net.peek_receive() {
            replies.push(reply.to_vec());
            h.net.consume_receive();
        }
        if !replies.is_empty() {
            break;
        }
        wait_readable(h.net.event_fd().unwrap(), 5);
    }
    replies
}

#[test]
fn arp_answers_the_gateway_and_dns_only() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let config = h.config.clone();
    for target in [config.gateway_ip, config.dns_ip] {
        let replies = exchange(&mut h, &arp_request(target));
        assert_eq!(replies.len(), 1);
        let eth = EthernetFrame::new_checked(&replies[0][..]).unwrap();
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            ..
        } = arp
        else {
            panic!()
        };
        assert_eq!(operation, ArpOperation::Reply);
        assert_eq!(source_protocol_addr, target);
        assert_eq!(source_hardware_addr, EthernetAddress(config.gateway_mac));
    }
    // Not the guest's own address (DHCP clients probe it) nor another neighbour's.
    for target in [config.guest_ip, Ipv4Addr::new(10, 0, 2, 99)] {
        assert!(exchange(&mut h, &arp_request(target)).is_empty());
    }
}

fn ping(to: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let config = forkvm_net::NetworkConfig::default();
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 0x77,
        seq_no: 3,
        data,
    };
    let ip = Ipv4Repr {
        src_addr: config.guest_ip,
        dst_addr: to,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(config.guest_mac),
        dst_addr: EthernetAddress(config.gateway_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + icmp.buffer_len()];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut eth_frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
    ip.emit(&mut ip_packet, &Default::default());
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(ip_packet.payload_mut()),
        &Default::default(),
    );
    frame
}

#[test]
fn ping_to_the_gateway_is_answered_and_elsewhere_is_not() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let replies = exchange(&mut h, &ping(GATEWAY, b"abcdef"));
    assert_eq!(replies.len(), 1);
    let eth = EthernetFrame::new_checked(&replies[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!(ip.src_addr(), GATEWAY);
    assert_eq!(ip.dst_addr(), Ipv4Addr::new(10, 0, 2, 15));
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert!(icmp.verify_checksum());
    let repr = Icmpv4Repr::parse(&icmp, &Default::default()).unwrap();
    assert_eq!(
        repr,
        Icmpv4Repr::EchoReply {
            ident: 0x77,
            seq_no: 3,
            data: b"abcdef"
        }
    );
    let before = h.handle.stats().frames_dropped;
    assert!(exchange(&mut h, &ping(Ipv4Addr::new(1, 1, 1, 1), b"x")).is_empty());
    assert_eq!(h.handle.stats().frames_dropped, before + 1);
}

#[test]
fn garbage_frames_are_dropped_and_the_network_lives_on() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let valid = ping(GATEWAY, b"0123456789");
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..4000 {
        let mut frame = if round % 2 == 0 {
            valid.clone()
        } else {
            vec![0u8; (next() % 200) as usize]
        };
        // Corrupt a few bytes (the checksums catch most; the parsers must survive the rest).
        for _ in 0..(next() % 4) {
            if !frame.is_empty() {
                let i = (next() as usize) % frame.len();
                frame[i] = next() as u8;
            }
        }
        let len = (next() as usize) % (frame.len() + 1);
        frame.truncate(len.max(frame.len() / 2));
        h.net.transmit(&frame);
        if round % 64 == 0 {
            h.net.process();
            while h.net.peek_receive().is_some() {
                h.net.consume_receive();
            }
        }
    }
    h.net.process();
    while h.net.peek_receive().is_some() {
        h.net.consume_receive();
    }
    let stats = h.handle.stats();
    assert!(!stats.down);
    assert!(stats.frames_dropped > 0);
    // And it still works.
    assert_eq!(exchange(&mut h, &ping(GATEWAY, b"alive")).len(), 1);
    assert!(h.internet.calls().is_empty());
}

#[test]
fn a_domain_allowlist_opens_only_addresses_its_names_resolved_to() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new().map(public(443), loopback(port));
    let resolver = StaticResolver::new()
        .with("example.com", &[ip(93, 184, 216, 34)])
        .with("other.org", &[ip(93, 184, 216, 35)]);
    let policy = NetworkPolicy::public_internet()
        .allow_domain("example.com")
        .unwrap();
    let mut h = Harness::with(policy, internet, resolver, true);

    // Before any answer the address is not pinned: reset, connector never asked.
    let conn = h.connect(public(443));
    assert!(h.run_until(LIMIT, |h| h.state(conn)
        == smoltcp::socket::tcp::State::Closed));
    assert_eq!(
        h.handle
            .stats()
            .denied_by_reason
            .get(&forkvm_net::DenyReason::NotPinned),
        Some(&1)
    );
    assert!(h.internet.calls().is_empty());

    let socket = udp_socket(&mut h, 5353);
    let dns = (Ipv4Addr::new(10, 0, 2, 3), 53);
    h.sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(&dns_query(1, "other.org"), dns)
        .unwrap();
    let (answer, _) = recv_udp(&mut h, socket);
    assert_eq!(Packet::parse(&answer).unwrap().rcode(), RCODE::NameError);
    h.sockets
        .get_mut::<udp::Socket>(socket)
        .send_slice(&dns_query(2, "example.com"), dns)
        .unwrap();
    let (answer, _) = recv_udp(&mut h, socket);
    assert_eq!(Packet::parse(&answer).unwrap().answers.len(), 1);

    // Now pinned: the same destination connects.
    let conn = h.connect(public(443));
    assert!(h.run_until(LIMIT, |h| h.state(conn)
        == smoltcp::socket::tcp::State::Established));
    assert_eq!(h.internet.calls(), vec![public(443)]);
    assert_eq!(h.handle.stats().dns.denied_names, 1);
}

#[test]
fn a_segment_of_a_connection_the_network_never_saw_is_reset_at_once() {
    use smoltcp::wire::{TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};
    // What a fork child's fresh network meets: the guest goes on with a connection (no ARP
    // first, its cache is warm). The answer must be the reset, not an ARP request.
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let config = h.config.clone();
    let (src, dst) = (config.guest_ip, Ipv4Addr::new(93, 184, 216, 34));
    let tcp = TcpRepr {
        src_port: 40000,
        dst_port: 80,
        control: TcpControl::Psh,
        seq_number: TcpSeqNumber(1000),
        ack_number: Some(TcpSeqNumber(2000)),
        window_len: 1000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: b"old data",
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(config.guest_mac),
        dst_addr: EthernetAddress(config.gateway_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut eth_frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
    ip.emit(&mut ip_packet, &Default::default());
    tcp.emit(
        &mut TcpPacket::new_unchecked(ip_packet.payload_mut()),
        &src.into(),
        &dst.into(),
        &Default::default(),
    );
    let replies = exchange(&mut h, &frame);
    assert_eq!(replies.len(), 1);
    let eth = EthernetFrame::new_checked(&replies[0][..]).unwrap();
    assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
    assert_eq!(eth.dst_addr(), EthernetAddress(config.guest_mac));
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(tcp.rst());
    assert_eq!((ip.src_addr(), tcp.src_port()), (dst, 80));
    assert_eq!(tcp.dst_port(), 40000);
    assert!(h.internet.calls().is_empty());
}

#[test]
fn udp_flows_past_the_cap_are_dropped() {
    let cap = forkvm_net::MAX_UDP_FLOWS;
    // Ports the test owns on 127.0.0.1, reached through the gateway once loopback is allowed.
    let servers: Vec<UdpSocket> = (0..=cap)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let allow: forkvm_net::Cidr = "127.0.0.1/32".parse().unwrap();
    let mut h = Harness::new(
        NetworkPolicy::public_internet().allow(allow),
        FakeInternet::new(),
    );
    let socket = h.sockets.add(udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 512], vec![0; 65536]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 512], vec![0; 65536]),
    ));
    h.sockets.get_mut::<udp::Socket>(socket).bind(6000).unwrap();
    for server in &servers {
        let port = server.local_addr().unwrap().port();
        h.sockets
            .get_mut::<udp::Socket>(socket)
            .send_slice(b"hi", (GATEWAY, port))
            .unwrap();
    }
    assert!(h.run_until(LIMIT, |h| h.handle.stats().frames_from_guest
        >= (cap + 1) as u64));
    h.run_for(Duration::from_millis(50));
    let stats = h.handle.stats();
    assert_eq!(stats.udp_flows_open, cap as u64);
    assert_eq!(stats.udp_flows_total, cap as u64);
    assert_eq!(h.internet.calls().len(), cap);
    // The first servers got their datagram, the last one did not.
    let mut buffer = [0u8; 8];
    servers[0].set_read_timeout(Some(LIMIT)).unwrap();
    assert_eq!(servers[0].recv(&mut buffer).unwrap(), 2);
    servers[cap].set_nonblocking(true).unwrap();
    assert!(servers[cap].recv(&mut buffer).is_err());
}

/// A UDP datagram the policy denies fails fast in the guest: an ICMP "communication
/// administratively prohibited" from the gateway quoting it, and no host socket.
#[test]
fn a_denied_udp_datagram_gets_an_icmp_prohibited_back() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let config = h.config.clone();
    let (src, dst) = (config.guest_ip, Ipv4Addr::new(169, 254, 169, 254));
    let udp = smoltcp::wire::UdpRepr {
        src_port: 5353,
        dst_port: 53,
    };
    let payload = b"where am I";
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(config.guest_mac),
        dst_addr: EthernetAddress(config.gateway_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut eth_frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
    ip.emit(&mut ip_packet, &Default::default());
    udp.emit(
        &mut smoltcp::wire::UdpPacket::new_unchecked(ip_packet.payload_mut()),
        &src.into(),
        &dst.into(),
        payload.len(),
        |out| out.copy_from_slice(payload),
        &Default::default(),
    );
    let replies = exchange(&mut h, &frame);
    assert_eq!(replies.len(), 1);
    let eth = EthernetFrame::new_checked(&replies[0][..]).unwrap();
    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
    assert_eq!((ip.src_addr(), ip.dst_addr()), (config.gateway_ip, src));
    let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(
        icmp.msg_type(),
        smoltcp::wire::Icmpv4Message::DstUnreachable
    );
    assert_eq!(icmp.msg_code(), 13); // communication administratively prohibited
    // The quote: the datagram's IP header (as a truncated packet: smoltcp's checked parser
    // refuses it, as it should) and its UDP header.
    let quote = icmp.data();
    assert_eq!(quote.len(), 28);
    assert_eq!(&quote[12..20], &[10, 0, 2, 15, 169, 254, 169, 254]);
    assert_eq!(&quote[20..24], &[0x14, 0xe9, 0x00, 0x35]); // ports 5353 -> 53
    assert!(h.internet.calls().is_empty());
    assert_eq!(h.handle.stats().denied_total, 1);
}
