//! The user-mode network behind the real virtio-net device, without KVM: a smoltcp guest whose
//! link is a virtio-net driver in guest memory (`support/virtio_guest.rs`, over the
//! register-level test driver) → `Net` → `UserNetwork` → servers on 127.0.0.1, reached through
//! the gateway with a policy that allows 127.0.0.1/32 only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;
#[path = "support/virtio_guest.rs"]
mod virtio_guest;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener};
use std::thread;
use std::time::Duration;

use smoltcp::socket::dhcpv4;
use support::{checksum, pattern};
use virtio_guest::{VirtioGuest, loopback_only};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn dhcp_leases_the_guest_its_address_through_the_device() {
    dhcp(false);
}

#[test]
fn dhcp_leases_the_guest_its_address_with_checksum_offload() {
    dhcp(true);
}

fn dhcp(offload: bool) {
    let (seams, connector, policy) = loopback_only();
    let mut g = VirtioGuest::with_offload(1500, 2048, policy, seams, false, offload);
    let socket = g.sockets.add(dhcpv4::Socket::new());
    let mut lease = None;
    assert!(g.run_until(LIMIT, |g| {
        if let Some(dhcpv4::Event::Configured(c)) =
            g.sockets.get_mut::<dhcpv4::Socket>(socket).poll()
        {
            lease = Some((c.address, c.router, c.dns_servers.to_vec()));
        }
        lease.is_some()
    }));
    let (address, router, dns) = lease.unwrap();
    assert_eq!(address.address(), Ipv4Addr::new(10, 0, 2, 15));
    assert_eq!(address.prefix_len(), 24);
    assert_eq!(router, Some(Ipv4Addr::new(10, 0, 2, 2)));
    assert_eq!(dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
    assert!(g.stats.tx_frames() >= 2 && g.stats.rx_frames() >= 2);
    assert_eq!(g.stats.rx_dropped(), 0);
    assert!(connector.refused.lock().unwrap().is_empty());
}

/// Moves `size` bytes each way between the guest and a server on 127.0.0.1 (the guest sends all
/// and half-closes, then the server answers with its bytes and closes) and compares checksums.
/// With `offload`, the guest sends every TCP segment with a partial (zero) checksum and takes
/// every segment unverified.
fn bulk_both_ways(mtu: u16, size: usize, offload: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(LIMIT)).unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        conn.write_all(&pattern(size, 2)).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        got
    });
    let (seams, connector, policy) = loopback_only();
    let rx_buf_len = VirtioGuest::rx_buf_len_for(mtu);
    let mut g = VirtioGuest::with_offload(mtu, rx_buf_len, policy, seams, true, offload);
    let conn = g.connect_gateway(port, 1 << 20);
    let upload = pattern(size, 1);
    let (mut sent, mut closed, mut received) = (0, false, Vec::new());
    let done = g.run_until(LIMIT, |g| {
        let socket = g.tcp(conn);
        if socket.can_send() && sent < upload.len() {
            sent += socket.send_slice(&upload[sent..]).unwrap();
        }
        if sent == upload.len() && !closed && socket.send_queue() == 0 {
            socket.close();
            closed = true;
        }
        while socket.can_recv() {
            socket
                .recv(|data| {
                    received.extend_from_slice(data);
                    (data.len(), ())
                })
                .unwrap();
        }
        closed && !socket.may_recv() && received.len() >= size
    });
    assert!(done, "sent {sent}, received {}", received.len());
    let got = server.join().unwrap();
    assert_eq!(got.len(), size);
    assert_eq!(checksum(&got), checksum(&upload));
    assert_eq!(received.len(), size);
    assert_eq!(checksum(&received), checksum(&pattern(size, 2)));
    // Every frame went through the device, none was dropped.
    let counts = g.counts();
    assert_eq!(g.stats.tx_frames(), counts.tx_frames);
    assert_eq!(g.stats.rx_frames(), counts.rx_frames);
    assert_eq!(g.stats.rx_dropped(), 0);
    assert!(connector.refused.lock().unwrap().is_empty());
    let stats = g.handle.stats();
    assert_eq!(stats.tcp_flows_total, 1);
    assert_eq!(stats.denied_total, 0);
}

#[test]
fn bulk_both_ways_through_the_device_at_mtu_1500() {
    bulk_both_ways(1500, 4 << 20, false);
}

#[test]
fn bulk_both_ways_with_checksum_offload_at_mtu_1500() {
    bulk_both_ways(1500, 4 << 20, true);
}

#[test]
fn bulk_both_ways_through_the_device_at_mtu_65520() {
    bulk_both_ways(65520, 4 << 20, false);
}

#[test]
fn bulk_both_ways_with_checksum_offload_at_mtu_65520() {
    bulk_both_ways(65520, 4 << 20, true);
}
