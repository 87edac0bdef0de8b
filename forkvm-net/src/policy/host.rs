//! The host's own interface addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host's own addresses (every interface's, from `getifaddrs`), to deny them by default.
/// An error is logged and gives an empty list.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for getifaddrs to store the head of the list it allocates.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        log::warn!(
            "getifaddrs: {}; the host's own addresses are not denied by address (the other \
             default groups still are)",
            std::io::Error::last_os_error()
        );
        return Vec::new();
    }
    let mut addrs = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a non-null node of the list getifaddrs returned, which stays valid
        // until freeifaddrs below.
        let ifa = unsafe { &*entry };
        // SAFETY: `ifa_addr` is null or points to a sockaddr of the family it declares, valid
        // until freeifaddrs.
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) }
            && !addrs.contains(&ip)
        {
            addrs.push(ip);
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: `list` came from a successful getifaddrs and is freed once; no reference into it
    // outlives this call (the addresses were copied out).
    unsafe { libc::freeifaddrs(list) };
    addrs
}

/// The address in `sa` when it is IPv4 or IPv6.
///
/// # Safety
/// `sa` is null or points to a valid sockaddr whose storage is as large as its family's type.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the caller; every sockaddr starts with its family.
    let family = i32::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in; read unaligned to be safe.
            let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6; read unaligned to be safe.
            let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}
