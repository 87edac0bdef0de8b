//! The DHCP server: one lease, the configured guest address, to whoever asks (the link has one
//! guest). DISCOVER gets an OFFER, REQUEST for our address an ACK (another address a NAK), with
//! the gateway as router and server, the DNS forwarder, the netmask, the MTU and a day's lease.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr,
    EthernetAddress,
};

use crate::config::NetworkConfig;
use crate::frames::udp_frame;

/// The lease time given (seconds).
pub(crate) const LEASE_SECS: u32 = 24 * 60 * 60;
/// DHCP option 26, interface MTU.
const OPT_INTERFACE_MTU: u8 = 26;

/// The reply frame to a DHCP message from the guest, if it gets one.
pub(crate) fn reply(config: &NetworkConfig, payload: &[u8]) -> Option<Vec<u8>> {
    let packet = DhcpPacket::new_checked(payload).ok()?;
    let request = DhcpRepr::parse(&packet).ok()?;
    let message_type = match request.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request => {
            let wanted = request.requested_ip.unwrap_or(request.client_ip);
            let for_us = request
                .server_identifier
                .is_none_or(|server| server == config.gateway_ip);
            if !for_us {
                // The guest chose another server's offer: nothing to say.
                return None;
            }
            if wanted == config.guest_ip {
                DhcpMessageType::Ack
            } else {
                DhcpMessageType::Nak
            }
        }
        _ => return None,
    };
    let nak = message_type == DhcpMessageType::Nak;
    let mtu = config.mtu.to_be_bytes();
    let options = [DhcpOption {
        kind: OPT_INTERFACE_MTU,
        data: &mtu,
    }];
    let dns = heapless::Vec::from_slice(&[config.dns_ip]).ok()?;
    let answer = DhcpRepr {
        message_type,
        transaction_id: request.transaction_id,
        secs: 0,
        client_hardware_address: request.client_hardware_address,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: if nak {
            Ipv4Addr::UNSPECIFIED
        } else {
            config.guest_ip
        },
        server_ip: config.gateway_ip,
        router: (!nak).then_some(config.gateway_ip),
        subnet_mask: (!nak).then(|| netmask(config.prefix_len)),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: request.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(config.gateway_ip),
        parameter_request_list: None,
        dns_servers: (!nak).then_some(dns),
        max_size: None,
        lease_duration: (!nak).then_some(LEASE_SECS),
        renew_duration: None,
        rebind_duration: None,
        additional_options: if nak { &[] } else { &options },
    };
    let mut body = vec![0u8; answer.buffer_len()];
    let mut out = DhcpPacket::new_unchecked(&mut body[..]);
    answer.emit(&mut out).ok()?;
    // A client that has an address gets it unicast; one that has none gets a broadcast (it
    // cannot receive unicast before it configured the address, whatever its broadcast flag says).
    let (dst_ip, dst_mac) = if !request.client_ip.is_unspecified() && !request.broadcast {
        (request.client_ip, request.client_hardware_address)
    } else {
        (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST)
    };
    Some(udp_frame(
        config.gateway_mac,
        dst_mac.0,
        SocketAddrV4::new(config.gateway_ip, DHCP_SERVER_PORT),
        SocketAddrV4::new(dst_ip, DHCP_CLIENT_PORT),
        &body,
    ))
}

/// The netmask of a prefix length (lengths over 32 count as 32).
pub(crate) fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(40), Ipv4Addr::new(255, 255, 255, 255));
    }

    fn message(
        message_type: DhcpMessageType,
        requested: Option<Ipv4Addr>,
        server: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: None,
            server_identifier: server,
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut body = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
            .unwrap();
        body
    }

    /// The DHCP message inside a reply frame.
    fn answer(frame: &[u8]) -> (DhcpMessageType, Ipv4Addr, Option<u32>, Ipv4Addr) {
        let crate::frames::Guest::Udp { dst, payload, .. } = crate::frames::classify(frame) else {
            panic!("not udp");
        };
        assert_eq!(dst.port(), DHCP_CLIENT_PORT);
        let packet = DhcpPacket::new_checked(payload).unwrap();
        let repr = DhcpRepr::parse(&packet).unwrap();
        assert_eq!(repr.transaction_id, 0x1234_5678);
        (
            repr.message_type,
            repr.your_ip,
            repr.lease_duration,
            *dst.ip(),
        )
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack_or_a_nak() {
        let config = NetworkConfig::default();
        let offer = reply(&config, &message(DhcpMessageType::Discover, None, None)).unwrap();
        assert_eq!(
            answer(&offer),
            (
                DhcpMessageType::Offer,
                config.guest_ip,
                Some(LEASE_SECS),
                Ipv4Addr::BROADCAST
            )
        );
        let ours = Some(config.gateway_ip);
        let ack = reply(
            &config,
            &message(DhcpMessageType::Request, Some(config.guest_ip), ours),
        );
        assert_eq!(answer(&ack.unwrap()).0, DhcpMessageType::Ack);
        let other = Some(Ipv4Addr::new(10, 0, 2, 99));
        let nak = reply(&config, &message(DhcpMessageType::Request, other, ours)).unwrap();
        assert_eq!(
            answer(&nak),
            (
                DhcpMessageType::Nak,
                Ipv4Addr::UNSPECIFIED,
                None,
                Ipv4Addr::BROADCAST
            )
        );
        // A request that chose another server's offer, and messages a server does not answer.
        let elsewhere = Some(Ipv4Addr::new(10, 0, 2, 1));
        assert!(
            reply(
                &config,
                &message(DhcpMessageType::Request, Some(config.guest_ip), elsewhere)
            )
            .is_none()
        );
        assert!(reply(&config, &message(DhcpMessageType::Release, None, ours)).is_none());
        assert!(reply(&config, &message(DhcpMessageType::Offer, None, None)).is_none());
    }

    #[test]
    fn garbage_gets_no_reply() {
        let config = NetworkConfig::default();
        for len in 0..300 {
            assert!(reply(&config, &vec![0xff; len]).is_none());
        }
    }
}
