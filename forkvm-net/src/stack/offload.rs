//! Checksum offload on the user-mode network: it is a memory link that terminates every flow
//! (TCP in smoltcp, UDP relayed by payload), so no frame can be corrupted on it and no frame of
//! the guest's goes anywhere as it is. The guest may therefore send TCP/UDP checksums partial
//! (the device passes them on untouched, `csum_start`/`csum_offset` unread) and take TCP
//! segments whose checksum was never computed (the device marks them `DATA_VALID`): both sides
//! skip a pass over every byte. Frames the network builds itself (ARP, DHCP, DNS, ICMP, probes)
//! keep their checksums.

use std::io;

use smoltcp::iface::{Config, Interface};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

use super::Stack;
use crate::config::NetworkConfig;
use crate::device::Link;

/// smoltcp's interface for `config` on `link`: the gateway's addresses, the default route,
/// AnyIP. smoltcp takes the link's capabilities (checksums included) from `link` here, once.
pub(crate) fn new_iface(config: &NetworkConfig, link: &mut Link) -> io::Result<Interface> {
    let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(
        config.gateway_mac,
    )));
    iface_config.random_seed = super::random_seed();
    let mut iface = Interface::new(iface_config, link, smoltcp::time::Instant::ZERO);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(config.gateway_ip.into(), config.prefix_len));
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(config.gateway_ip)
        .map_err(|_| io::Error::other("smoltcp route table full"))?;
    iface.set_any_ip(true);
    Ok(iface)
}

impl Stack {
    /// What the guest's driver accepted (see the module docs). smoltcp reads checksum
    /// capabilities only when its interface is made, so a change makes a new one (the sockets
    /// live apart from it and go on; the guest's MAC address is told again at once). Drivers
    /// ack features before any traffic, and again only after a reset.
    pub(crate) fn set_offload(&mut self, from_guest_partial: bool, to_guest_unchecked: bool) {
        if (self.link.from_guest_partial, self.link.to_guest_unchecked)
            == (from_guest_partial, to_guest_unchecked)
        {
            return;
        }
        self.link.from_guest_partial = from_guest_partial;
        self.link.to_guest_unchecked = to_guest_unchecked;
        match new_iface(&self.config, &mut self.link) {
            Ok(iface) => {
                self.iface = iface;
                self.neighbor_at = None;
            }
            // Cannot happen: one route into a fresh table.
            Err(e) => log::error!("forkvm-net: checksum offload not applied: {e}"),
        }
    }

    /// Whether TCP/UDP checksums of the guest's frames are to be verified.
    pub(crate) fn verify_guest_checksums(&self) -> bool {
        !self.link.from_guest_partial
    }
}
