//! The egress policy as the guest meets it: denied flows are reset before any host socket is
//! opened, counted and reported; a policy change takes effect on the running network.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use forkvm_net::{Cidr, DenyReason, NetworkPolicy, Protocol};
use smoltcp::socket::tcp::State;
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

fn echo_server() -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(LIMIT)).unwrap();
        let mut buffer = [0u8; 4];
        conn.read_exact(&mut buffer).unwrap();
        conn.write_all(&buffer).unwrap();
    });
    (port, server)
}

/// Runs until `conn` is closed; returns whether it ever was established.
fn refused(h: &mut Harness, conn: smoltcp::iface::SocketHandle) -> bool {
    let mut opened = false;
    assert!(h.run_until(LIMIT, |h| {
        opened |= h.state(conn) == State::Established;
        h.state(conn) == State::Closed
    }));
    !opened
}

#[test]
fn the_gateway_is_the_hosts_loopback_only_when_allowed() {
    let (port, server) = echo_server();
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let denied = Arc::new(Mutex::new(Vec::new()));
    let seen = denied.clone();
    h.handle.on_denied(Box::new(move |flow| {
        seen.lock()
            .unwrap()
            .push((flow.clone(), std::thread::current().id()))
    }));

    // The default policy denies loopback: the guest gets a reset, the connector is never asked.
    let gateway = SocketAddr::from((GATEWAY, port));
    let conn = h.connect(gateway);
    assert!(refused(&mut h, conn));
    assert!(h.internet.calls().is_empty());
    let stats = h.handle.stats();
    assert_eq!(stats.denied_total, 1);
    assert_eq!(stats.denied_by_reason.get(&DenyReason::Loopback), Some(&1));
    // The callback runs soon after, on a worker thread: never on the thread running the
    // network (the VM's event loop, under its seccomp filter).
    let deadline = std::time::Instant::now() + LIMIT;
    while denied.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let flows = denied.lock().unwrap().clone();
    assert_eq!(flows.len(), 1);
    let (flow, thread) = &flows[0];
    assert_ne!(*thread, std::thread::current().id());
    assert_eq!(flow.protocol, Protocol::Tcp);
    assert_eq!(flow.destination, loopback(port));
    assert_eq!(flow.reason, DenyReason::Loopback);

    // Allowing 127.0.0.1/32 on the running network opens it.
    let allow: Cidr = "127.0.0.1/32".parse().unwrap();
    h.handle
        .set_policy(NetworkPolicy::public_internet().allow(allow));
    let conn = h.connect(gateway);
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::Established));
    h.tcp(conn).send_slice(b"ping").unwrap();
    let mut echo = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let mut buffer = [0u8; 4];
        if let Ok(n) = h.tcp(conn).recv_slice(&mut buffer) {
            echo.extend_from_slice(&buffer[..n]);
        }
        echo.len() == 4
    }));
    assert_eq!(echo, b"ping");
    server.join().unwrap();
    assert_eq!(h.internet.calls(), vec![loopback(port)]);
    assert_eq!(h.handle.stats().denied_total, 1);

    // And taking the rule away closes it again for new flows.
    h.handle.set_policy(NetworkPolicy::public_internet());
    let conn = h.connect(gateway);
    assert!(refused(&mut h, conn));
    assert_eq!(h.internet.calls().len(), 1);
    assert_eq!(h.handle.stats().denied_total, 2);
}

#[test]
fn private_and_metadata_destinations_never_reach_the_connector() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let cases = [
        (
            SocketAddr::from(([169, 254, 169, 254], 80)),
            DenyReason::Metadata,
        ),
        (
            SocketAddr::from(([192, 168, 1, 1], 80)),
            DenyReason::Private,
        ),
        (
            SocketAddr::from(([172, 16, 0, 1], 443)),
            DenyReason::Private,
        ),
        (
            SocketAddr::from(([100, 64, 0, 1], 80)),
            DenyReason::SharedAddressSpace,
        ),
        (
            SocketAddr::from(([100, 100, 100, 200], 80)),
            DenyReason::Metadata,
        ),
    ];
    for (to, _) in cases {
        let conn = h.connect(to);
        assert!(refused(&mut h, conn), "{to}");
    }
    assert!(h.internet.calls().is_empty(), "{:?}", h.internet.calls());
    let stats = h.handle.stats();
    assert_eq!(stats.denied_total, cases.len() as u64);
    for (_, reason) in cases {
        assert!(
            stats.denied_by_reason.get(&reason).is_some_and(|n| *n >= 1),
            "{reason:?}"
        );
    }
}

#[test]
fn deny_all_denies_public_destinations() {
    let mut h = Harness::new(NetworkPolicy::deny_all(), FakeInternet::new());
    let conn = h.connect(public(80));
    assert!(refused(&mut h, conn));
    let stats = h.handle.stats();
    assert_eq!(stats.denied_by_reason.get(&DenyReason::DenyAll), Some(&1));
    assert_eq!(stats.denied_total, 1);
    assert!(h.internet.calls().is_empty());
}
