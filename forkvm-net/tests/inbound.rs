//! Connections into the guest: the handle's in-process connect and published ports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use forkvm_net::NetworkPolicy;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;
use support::*;

const LIMIT: Duration = Duration::from_secs(30);

fn guest_listener(h: &mut Harness, port: u16) -> SocketHandle {
    let handle = h.tcp_socket(64 * 1024);
    h.tcp(handle).listen(port).unwrap();
    handle
}

/// Reads what `read` gives until `want` bytes came, running the harness meanwhile.
fn read_some(
    h: &mut Harness,
    want: usize,
    mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
) -> Vec<u8> {
    let mut got = Vec::new();
    assert!(h.run_until(LIMIT, |_| {
        let mut buffer = [0u8; 1024];
        match read(&mut buffer) {
            Ok(n) => got.extend_from_slice(&buffer[..n]),
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}"),
        }
        got.len() >= want
    }));
    got
}

/// Runs until `read` reports end-of-file or a reset.
fn ends(h: &mut Harness, mut read: impl FnMut(&mut [u8]) -> std::io::Result<usize>) -> bool {
    h.run_until(LIMIT, |_| {
        let mut buffer = [0u8; 64];
        match read(&mut buffer) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    })
}

#[test]
fn connect_tcp_reaches_a_guest_listener_both_ways() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let listener = guest_listener(&mut h, 8080);
    let mut stream = h.handle.connect_tcp(8080).unwrap();
    stream.set_nonblocking(true).unwrap();
    assert!(h.run_until(LIMIT, |h| h.state(listener) == State::Established));
    let peer = h.tcp(listener).remote_endpoint().unwrap();
    assert_eq!(peer.addr, smoltcp::wire::IpAddress::Ipv4(GATEWAY));

    stream.write_all(b"from the host").unwrap();
    let mut got = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let mut buffer = [0u8; 64];
        if let Ok(n) = h.tcp(listener).recv_slice(&mut buffer) {
            got.extend_from_slice(&buffer[..n]);
        }
        got.len() >= 13
    }));
    assert_eq!(got, b"from the host");

    h.tcp(listener).send_slice(b"from the guest").unwrap();
    let got = read_some(&mut h, 14, |b| stream.read(b));
    assert_eq!(got, b"from the guest");

    // The guest closes: the host side reads end-of-file.
    h.tcp(listener).close();
    assert!(ends(&mut h, |b| stream.read(b)));
    assert!(h.internet.calls().is_empty());
}

#[test]
fn connect_tcp_to_a_port_nobody_listens_on_reads_end_of_file() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let mut stream = h.handle.connect_tcp(9999).unwrap();
    stream.set_nonblocking(true).unwrap();
    assert!(ends(&mut h, |b| stream.read(b)));
    assert!(h.run_until(LIMIT, |h| h.handle.stats().tcp_flows_open == 0));
}

#[test]
fn a_published_port_reaches_a_guest_listener() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let listener = guest_listener(&mut h, 80);
    let address = h.handle.publish(loopback(0), 80).unwrap();
    assert!(address.ip().is_loopback());
    assert_ne!(address.port(), 0);
    let mut client = TcpStream::connect(address).unwrap();
    client.set_nonblocking(true).unwrap();
    assert!(h.run_until(LIMIT, |h| h.state(listener) == State::Established));
    client.write_all(b"GET /").unwrap();
    let mut got = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let mut buffer = [0u8; 64];
        if let Ok(n) = h.tcp(listener).recv_slice(&mut buffer) {
            got.extend_from_slice(&buffer[..n]);
        }
        got.len() >= 5
    }));
    assert_eq!(got, b"GET /");
    h.tcp(listener).send_slice(b"200 OK").unwrap();
    let got = read_some(&mut h, 6, |b| client.read(b));
    assert_eq!(got, b"200 OK");

    // Unpublished, the port takes no more connections.
    h.handle.unpublish(address).unwrap();
    h.run_for(Duration::from_millis(50));
    assert!(TcpStream::connect(address).is_err());
    assert!(h.handle.unpublish(address).is_err());
}

#[test]
fn a_published_port_without_a_guest_listener_ends_the_connection() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let address = h.handle.publish(loopback(0), 81).unwrap();
    let mut client = TcpStream::connect(address).unwrap();
    client.set_nonblocking(true).unwrap();
    assert!(ends(&mut h, |b| client.read(b)));
}

#[test]
fn dropping_the_in_process_stream_closes_the_guests_connection() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let listener = guest_listener(&mut h, 7000);
    let stream = h.handle.connect_tcp(7000).unwrap();
    assert!(h.run_until(LIMIT, |h| h.state(listener) == State::Established));
    drop(stream);
    assert!(h.run_until(LIMIT, |h| h.state(listener) == State::CloseWait));
    h.tcp(listener).close();
    assert!(h.run_until(LIMIT, |h| h.handle.stats().tcp_flows_open == 0));
}

/// A request-response over an in-process connect, as an HTTP/1.0 server in the guest does it:
/// the host writes its request at once (before the guest accepted), the guest answers and
/// closes; the host reads the whole answer and then end-of-file, never a reset.
#[test]
fn a_request_written_before_the_guest_accepts_gets_its_whole_answer_then_eof() {
    let mut h = Harness::new(NetworkPolicy::public_internet(), FakeInternet::new());
    let listener = guest_listener(&mut h, 8000);
    let mut stream = h.handle.connect_tcp(8000).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    stream.set_nonblocking(true).unwrap();
    let mut request = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let mut buffer = [0u8; 64];
        if let Ok(n) = h.tcp(listener).recv_slice(&mut buffer) {
            request.extend_from_slice(&buffer[..n]);
        }
        request.ends_with(b"\r\n\r\n")
    }));
    let answer = vec![b'x'; 100_000];
    let mut sent = 0;
    assert!(h.run_until(LIMIT, |h| {
        if sent < answer.len() {
            sent += h.tcp(listener).send_slice(&answer[sent..]).unwrap();
            if sent == answer.len() {
                h.tcp(listener).close();
            }
        }
        sent == answer.len()
    }));
    let mut got = Vec::new();
    let mut end = None;
    assert!(h.run_until(LIMIT, |_| {
        let mut buffer = [0u8; 4096];
        match stream.read(&mut buffer) {
            Ok(0) => end = Some(Ok(())),
            Ok(n) => got.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => end = Some(Err(e)),
        }
        end.is_some()
    }));
    assert!(end.unwrap().is_ok());
    assert_eq!(got.len(), answer.len());
}
