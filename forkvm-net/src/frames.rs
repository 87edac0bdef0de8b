//! Guest frames: what each one is, read with smoltcp's checked parsers only (a truncated or
//! lying frame is an error, never a panic), and the few frames the network builds itself (UDP
//! replies, DHCP, ping replies).

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv4Repr, IpAddress,
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};

/// Ethernet header length.
pub(crate) const ETHERNET_HEADER: usize = 14;
/// IPv4 (no options) plus UDP header length.
pub(crate) const IPV4_UDP_HEADERS: usize = 28;

/// What a guest frame is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Guest<'a> {
    /// An ARP request or reply for `target`.
    Arp {
        /// The address asked about (request) or answered to (reply).
        target: Ipv4Addr,
        /// A request (else a reply).
        request: bool,
    },
    /// A TCP segment with a valid checksum.
    Tcp {
        /// The guest's end.
        src: SocketAddrV4,
        /// The address the guest sent it to.
        dst: SocketAddrV4,
        /// SYN without ACK, RST or FIN: the start of a new connection.
        syn: bool,
    },
    /// A UDP datagram with a valid checksum.
    Udp {
        /// The guest's end.
        src: SocketAddrV4,
        /// The address the guest sent it to.
        dst: SocketAddrV4,
        /// Its payload.
        payload: &'a [u8],
    },
    /// An ICMP echo request with a valid checksum.
    Ping {
        /// The sender.
        src: Ipv4Addr,
        /// The address pinged.
        dst: Ipv4Addr,
        /// Echo identifier.
        ident: u16,
        /// Echo sequence number.
        seq_no: u16,
        /// Echo data.
        data: &'a [u8],
    },
    /// Anything else (IPv6, fragments, other protocols, malformed frames): dropped.
    Other(&'static str),
}

/// Reads one guest frame, verifying every checksum in it.
#[cfg(test)]
pub(crate) fn classify(frame: &[u8]) -> Guest<'_> {
    classify_with(frame, true)
}

/// Reads one guest frame; with `verify_l4` false its TCP and UDP checksums are not looked at
/// (the guest sends them partial: checksum offload). The IPv4 header's and ICMP's are always
/// verified (the guest computes those itself).
pub(crate) fn classify_with(frame: &[u8], verify_l4: bool) -> Guest<'_> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Guest::Other("short ethernet frame");
    };
    let payload = &frame[ETHERNET_HEADER..];
    match eth.ethertype() {
        EthernetProtocol::Arp => classify_arp(payload),
        EthernetProtocol::Ipv4 => classify_ipv4(payload, verify_l4),
        EthernetProtocol::Ipv6 => Guest::Other("ipv6"),
        _ => Guest::Other("ethertype"),
    }
}

fn classify_arp(payload: &[u8]) -> Guest<'_> {
    let Ok(packet) = ArpPacket::new_checked(payload) else {
        return Guest::Other("short arp");
    };
    match ArpRepr::parse(&packet) {
        Ok(ArpRepr::EthernetIpv4 {
            operation,
            target_protocol_addr,
            ..
        }) => match operation {
            ArpOperation::Request | ArpOperation::Reply => Guest::Arp {
                target: target_protocol_addr,
                request: operation == ArpOperation::Request,
            },
            _ => Guest::Other("arp operation"),
        },
        _ => Guest::Other("arp"),
    }
}

fn classify_ipv4(payload: &[u8], verify_l4: bool) -> Guest<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(payload) else {
        return Guest::Other("malformed ipv4");
    };
    if !ip.verify_checksum() {
        return Guest::Other("ipv4 checksum");
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Guest::Other("ipv4 fragment");
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let header_len = usize::from(ip.header_len());
    let total_len = usize::from(ip.total_len());
    // new_checked guarantees header_len <= total_len <= payload.len().
    let Some(body) = payload.get(header_len..total_len) else {
        return Guest::Other("malformed ipv4");
    };
    let (src_ip, dst_ip) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    match ip.next_header() {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(body) else {
                return Guest::Other("malformed tcp");
            };
            if verify_l4 && !tcp.verify_checksum(&src_ip, &dst_ip) {
                return Guest::Other("tcp checksum");
            }
            Guest::Tcp {
                src: SocketAddrV4::new(src, tcp.src_port()),
                dst: SocketAddrV4::new(dst, tcp.dst_port()),
                syn: tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin(),
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(body) else {
                return Guest::Other("malformed udp");
            };
            if verify_l4 && !udp.verify_checksum(&src_ip, &dst_ip) {
                return Guest::Other("udp checksum");
            }
            let length = usize::from(udp.len());
            let Some(payload) = body.get(8..length) else {
                return Guest::Other("malformed udp");
            };
            Guest::Udp {
                src: SocketAddrV4::new(src, udp.src_port()),
                dst: SocketAddrV4::new(dst, udp.dst_port()),
                payload,
            }
        }
        IpProtocol::Icmp => {
            let Ok(icmp) = Icmpv4Packet::new_checked(body) else {
                return Guest::Other("malformed icmp");
            };
            if !icmp.verify_checksum() {
                return Guest::Other("icmp checksum");
            }
            if icmp.msg_type() != Icmpv4Message::EchoRequest || icmp.msg_code() != 0 {
                return Guest::Other("icmp other than echo");
            }
            Guest::Ping {
                src,
                dst,
                ident: icmp.echo_ident(),
                seq_no: icmp.echo_seq_no(),
                data: icmp.data(),
            }
        }
        _ => Guest::Other("ip protocol"),
    }
}

/// An Ethernet frame carrying one IPv4 packet of `protocol` whose payload `emit` writes.
fn ipv4_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    emit: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: 64,
    };
    let mut buffer = vec![0u8; eth.buffer_len() + ip.buffer_len() + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buffer[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    emit(packet.payload_mut());
    buffer
}

/// A UDP datagram from `src` to `dst` in an Ethernet frame (callers keep `payload` within the
/// MTU).
pub(crate) fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let (src_ip, dst_ip) = (IpAddress::Ipv4(*src.ip()), IpAddress::Ipv4(*dst.ip()));
    ipv4_frame(
        src_mac,
        dst_mac,
        *src.ip(),
        *dst.ip(),
        IpProtocol::Udp,
        udp.header_len() + payload.len(),
        |buffer| {
            let mut packet = UdpPacket::new_unchecked(buffer);
            udp.emit(
                &mut packet,
                &src_ip,
                &dst_ip,
                payload.len(),
                |out| out.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// A bare TCP ACK from `src` to `dst` with sequence number `seq`: sent to a guest connection
/// with a sequence number outside its window, it makes the guest answer with an ACK that
/// carries its own sequence numbers (RFC 793's reply to an unacceptable segment), which a
/// stack without that connection then resets exactly.
pub(crate) fn tcp_probe_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control: TcpControl::None,
        // The wire carries the 32 bits; smoltcp's type is signed.
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: Some(TcpSeqNumber(0)),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (src_ip, dst_ip) = (IpAddress::Ipv4(*src.ip()), IpAddress::Ipv4(*dst.ip()));
    ipv4_frame(
        src_mac,
        dst_mac,
        *src.ip(),
        *dst.ip(),
        IpProtocol::Tcp,
        tcp.buffer_len(),
        |buffer| {
            tcp.emit(
                &mut TcpPacket::new_unchecked(buffer),
                &src_ip,
                &dst_ip,
                &ChecksumCapabilities::default(),
            );
        },
    )
}

/// An ICMP "communication administratively prohibited" from `router` to the guest about its UDP
/// datagram from `src` to `dst` of `payload_len` bytes (the guest's connected socket fails with
/// EHOSTUNREACH at once rather than waiting for an answer).
pub(crate) fn udp_prohibited_frame(
    router_mac: [u8; 6],
    guest_mac: [u8; 6],
    router: Ipv4Addr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload_len: usize,
) -> Vec<u8> {
    // The offending datagram's IP header and its first 8 bytes: the UDP header (checksum 0).
    let udp_len = u16::try_from(payload_len + 8).unwrap_or(u16::MAX);
    let mut udp_header = [0u8; 8];
    udp_header[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp_header[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp_header[4..6].copy_from_slice(&udp_len.to_be_bytes());
    let icmp = Icmpv4Repr::DstUnreachable {
        reason: Icmpv4DstUnreachable::CommProhibited,
        header: Ipv4Repr {
            src_addr: *src.ip(),
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Udp,
            payload_len: usize::from(udp_len),
            hop_limit: 64,
        },
        data: &udp_header,
    };
    ipv4_frame(
        router_mac,
        guest_mac,
        router,
        *src.ip(),
        IpProtocol::Icmp,
        icmp.buffer_len(),
        |buffer| {
            let mut packet = Icmpv4Packet::new_unchecked(buffer);
            icmp.emit(&mut packet, &ChecksumCapabilities::default());
        },
    )
}

/// An ARP request from `src_mac`/`src_ip` for `target`.
pub(crate) fn arp_request_frame(src_mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(src_mac),
        source_protocol_addr: src_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buffer = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buffer[..]);
    eth.emit(&mut frame);
    arp.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    buffer
}

/// An ICMP echo reply from `src` to `dst`.
pub(crate) fn echo_reply_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    ipv4_frame(
        src_mac,
        dst_mac,
        src,
        dst,
        IpProtocol::Icmp,
        icmp.buffer_len(),
        |buffer| {
            let mut packet = Icmpv4Packet::new_unchecked(buffer);
            icmp.emit(&mut packet, &ChecksumCapabilities::default());
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_udp_frames_read_back() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 53);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 4000);
        let frame = udp_frame([2; 6], [4; 6], src, dst, b"hello");
        assert_eq!(
            classify(&frame),
            Guest::Udp {
                src,
                dst,
                payload: b"hello"
            }
        );
    }

    #[test]
    fn l4_checksums_are_ignored_only_when_asked() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 1);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 2);
        let mut frame = udp_frame([2; 6], [4; 6], src, dst, b"partial");
        // The UDP checksum (after the Ethernet and IPv4 headers, at 6) made wrong.
        frame[ETHERNET_HEADER + 20 + 6] ^= 0x5a;
        assert_eq!(classify(&frame), Guest::Other("udp checksum"));
        let payload = b"partial";
        assert_eq!(
            classify_with(&frame, false),
            Guest::Udp { src, dst, payload }
        );
        // The IPv4 header's checksum is verified either way.
        frame[ETHERNET_HEADER + 10] ^= 0x5a;
        assert_eq!(classify_with(&frame, false), Guest::Other("ipv4 checksum"));
    }

    #[test]
    fn every_truncation_of_a_frame_is_rejected_without_panic() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 1);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 2);
        let frame = udp_frame([2; 6], [4; 6], src, dst, &[7; 40]);
        for len in 0..frame.len() {
            assert!(matches!(classify(&frame[..len]), Guest::Other(_)), "{len}");
            let unverified = classify_with(&frame[..len], false);
            assert!(matches!(unverified, Guest::Other(_)), "{len}");
        }
        let ping = echo_reply_frame([2; 6], [4; 6], *src.ip(), *dst.ip(), 1, 2, &[1; 9]);
        for len in 0..ping.len() {
            assert!(matches!(classify(&ping[..len]), Guest::Other(_)), "{len}");
        }
    }
}
