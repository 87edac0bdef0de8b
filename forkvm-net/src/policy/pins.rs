//! Addresses pinned by DNS answers for allowed names.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::time::Instant;

use super::cidr::canonical;

/// The most addresses a [`DnsPins`] holds; past it, pinning an address evicts the pin that ends
/// first (an expired one if any, else the oldest, since every pin lasts the same TTL).
pub const MAX_PINS: usize = 4096;

/// Addresses the DNS forwarder gave the guest for allowed names, until their TTL ends.
#[derive(Clone, Debug, Default)]
pub struct DnsPins {
    by_ip: HashMap<IpAddr, (String, Instant)>,
}

impl DnsPins {
    /// Records that `name` resolved to `ips`, valid until `until`. A pin that exists already is
    /// renewed (it keeps the later end); at [`MAX_PINS`] the pin that ends first is evicted.
    pub fn pin(&mut self, name: &str, ips: &[IpAddr], until: Instant) {
        for &ip in ips {
            let ip = canonical(ip);
            if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= MAX_PINS {
                self.evict_first_ending();
            }
            match self.by_ip.entry(ip) {
                Entry::Occupied(mut pinned) => {
                    let (pinned_name, pinned_until) = pinned.get_mut();
                    if until >= *pinned_until {
                        name.clone_into(pinned_name);
                        *pinned_until = until;
                    }
                }
                Entry::Vacant(vacant) => {
                    vacant.insert((name.to_owned(), until));
                }
            }
        }
    }

    /// The name that pinned `ip`, if a pin is still valid at `now`.
    pub fn pinned(&self, ip: IpAddr, now: Instant) -> Option<&str> {
        self.by_ip
            .get(&canonical(ip))
            .filter(|(_, until)| *until > now)
            .map(|(name, _)| name.as_str())
    }

    /// Drops the pins that have ended by `now`.
    pub fn prune(&mut self, now: Instant) {
        self.by_ip.retain(|_, (_, until)| *until > now);
    }

    /// How many addresses are pinned (expired pins included until pruned or evicted).
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether no address is pinned.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    fn evict_first_ending(&mut self) {
        let first = self
            .by_ip
            .iter()
            .min_by_key(|(_, (_, until))| *until)
            .map(|(ip, _)| *ip);
        if let Some(ip) = first {
            self.by_ip.remove(&ip);
        }
    }
}
