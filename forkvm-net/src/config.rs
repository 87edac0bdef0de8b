//! The addresses of a VM's user-mode network.

use std::net::Ipv4Addr;

/// The addresses the guest sees. The defaults are the ones slirp made familiar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The guest's MAC address (the virtio-net device reports it).
    pub guest_mac: [u8; 6],
    /// The gateway's MAC address.
    pub gateway_mac: [u8; 6],
    /// The guest's address, leased by DHCP.
    pub guest_ip: Ipv4Addr,
    /// The gateway: answers ARP and ping; flows to it go to the host's loopback.
    pub gateway_ip: Ipv4Addr,
    /// The DNS forwarder.
    pub dns_ip: Ipv4Addr,
    /// Prefix length of the guest's network.
    pub prefix_len: u8,
    /// The link's MTU: 576 to 65,520. The default, 65,520, is what passt and slirp4netns use:
    /// the network terminates the guest's TCP, so the guest's segments need not fit any real
    /// link, and large ones cost far less per byte (see `docs/measurements.md`). The device
    /// announces it (`VIRTIO_NET_F_MTU`) and so does DHCP.
    pub mtu: u16,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            guest_mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            gateway_mac: [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02],
            guest_ip: Ipv4Addr::new(10, 0, 2, 15),
            gateway_ip: Ipv4Addr::new(10, 0, 2, 2),
            dns_ip: Ipv4Addr::new(10, 0, 2, 3),
            prefix_len: 24,
            mtu: 65520,
        }
    }
}
