//! TCP through the user-mode network: a smoltcp guest, servers on 127.0.0.1, the fake internet.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread;
use std::time::Duration;

use forkvm_devices::virtio::net::NetBackend;
use forkvm_net::NetworkPolicy;
use smoltcp::socket::tcp::State;
use support::*;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn bulk_both_ways_with_half_close() {
    const SIZE: usize = 8 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(LIMIT)).unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        // The guest shut its write side; ours is still open.
        conn.write_all(&pattern(SIZE, 2)).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        got
    });
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    let upload = pattern(SIZE, 1);
    let mut sent = 0;
    let mut received = Vec::new();
    let mut closed = false;
    let done = h.run_until(LIMIT, |h| {
        let socket = h.tcp(conn);
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
        closed && !socket.may_recv() && received.len() >= SIZE
    });
    assert!(
        done,
        "sent {sent}, received {} bytes, state {}",
        received.len(),
        h.state(conn)
    );
    let got = server.join().unwrap();
    assert_eq!(got.len(), SIZE);
    assert_eq!(checksum(&got), checksum(&upload));
    assert_eq!(checksum(&received), checksum(&pattern(SIZE, 2)));
    assert!(h.internet.refused().is_empty());
    let stats = h.handle.stats();
    assert_eq!(stats.tcp_flows_total, 1);
    assert_eq!(stats.denied_total, 0);
}

#[test]
fn host_reset_reaches_the_guest_as_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(LIMIT)).unwrap();
        let mut first = [0u8; 5];
        conn.read_exact(&mut first).unwrap();
        socket2::SockRef::from(&conn)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(conn);
        first
    });
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::Established));
    h.tcp(conn).send_slice(b"hello").unwrap();
    // A reset closes the guest's socket outright; a FIN would leave it in CLOSE-WAIT.
    let mut states = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let state = h.state(conn);
        if states.last() != Some(&state) {
            states.push(state);
        }
        state == State::Closed
    }));
    assert_eq!(server.join().unwrap(), *b"hello");
    assert!(!states.contains(&State::CloseWait), "{states:?}");
    assert!(h.run_until(LIMIT, |h| h.handle.stats().tcp_flows_open == 0));
}

#[test]
fn closed_host_port_resets_the_guest() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let internet = FakeInternet::new().map(public(81), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(81));
    let mut states = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let state = h.state(conn);
        if states.last() != Some(&state) {
            states.push(state);
        }
        state == State::Closed
    }));
    // The SYN-ACK was held, so the guest never saw the connection open.
    assert_eq!(states, vec![State::SynSent, State::Closed]);
    assert_eq!(h.internet.calls(), vec![public(81)]);
    let stats = h.handle.stats();
    assert_eq!(stats.tcp_rejected, 1);
    assert_eq!(stats.denied_total, 0);
}

#[test]
fn flows_up_to_the_cap_and_one_past_it_refused() {
    let cap = forkvm_net::MAX_TCP_FLOWS;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The server holds every connection open until the test ends.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let start = std::time::Instant::now();
        while held.len() < cap && start.elapsed() < LIMIT {
            match listener.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
        let _ = stopped.recv_timeout(LIMIT);
        held.len()
    });
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let mut conns = Vec::new();
    // Open them in batches below the handshake cap.
    while conns.len() < cap {
        let batch = (cap - conns.len()).min(forkvm_net::MAX_PENDING_HANDSHAKES / 2);
        let new: Vec<_> = (0..batch).map(|_| h.connect(public(80))).collect();
        assert!(h.run_until(LIMIT, |h| {
            new.iter().all(|c| h.state(*c) == State::Established)
        }));
        conns.extend(new);
    }
    assert_eq!(h.handle.stats().tcp_flows_open, cap as u64);
    let extra = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(extra) == State::Closed));
    assert_eq!(h.handle.stats().tcp_rejected, 1);
    assert!(conns.iter().all(|c| h.state(*c) == State::Established));
    stop.send(()).unwrap();
    assert_eq!(server.join().unwrap(), cap);
}

#[test]
fn handshakes_past_the_pending_cap_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let pending = forkvm_net::MAX_PENDING_HANDSHAKES;
    // All SYNs reach the network in one turn, before any host connect was seen to complete.
    let conns: Vec<_> = (0..pending + 3).map(|_| h.connect(public(80))).collect();
    assert!(h.run_until(LIMIT, |h| {
        conns
            .iter()
            .all(|c| matches!(h.state(*c), State::Established | State::Closed))
    }));
    let closed = conns
        .iter()
        .filter(|c| h.state(**c) == State::Closed)
        .count();
    assert_eq!(closed, 3);
    assert_eq!(h.handle.stats().tcp_rejected, 3);
    drop(listener);
}

/// A connector that is the embedder's code runs on the network's worker threads, not on the
/// thread running the network (the VM's event loop, under its seccomp filter); a panic in it
/// fails that flow only.
#[test]
fn an_embedders_connector_runs_off_the_event_loop_and_its_panic_fails_one_flow() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new()
        .map(public(80), loopback(port))
        .panic_on(public(666));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let bad = h.connect(public(666));
    assert!(h.run_until(LIMIT, |h| h.state(bad) == State::Closed));
    let good = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(good) == State::Established));
    let (_accepted, _) = listener.accept().unwrap();
    let stats = h.handle.stats();
    assert!(!stats.down);
    assert_eq!(stats.tcp_rejected, 1);
    let threads = h.internet.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 2);
    assert!(threads.iter().all(|t| *t != std::thread::current().id()));
}

#[test]
fn a_panic_inside_the_network_takes_only_this_network_down() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new()
        .map(public(80), loopback(port))
        .panic_on(public(666))
        .on_event_loop();
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let good = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(good) == State::Established));
    let (accepted, _) = listener.accept().unwrap();

    let bad = h.connect(public(666));
    assert!(h.run_until(LIMIT, |h| h.handle.stats().down));
    // Everything is gone: the guest's connections time out or stay silent, frames are counted
    // as dropped, the event fd stays quiet, the handle refuses new work.
    h.run_for(Duration::from_millis(100));
    let before = h.handle.stats().frames_dropped;
    h.net.transmit(&[0u8; 60]);
    h.net.process();
    assert_eq!(h.handle.stats().frames_dropped, before + 1);
    assert!(h.net.peek_receive().is_none());
    let mut pfd = libc::pollfd {
        fd: h.net.event_fd().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    assert!(h.handle.connect_tcp(80).is_err());
    assert_ne!(h.state(bad), State::Established);
    // The accepted host connection was closed with the network.
    let mut conn = accepted;
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buffer = [0u8; 1];
    assert!(matches!(conn.read(&mut buffer), Ok(0) | Err(_)));
}

#[test]
fn the_syn_ack_waits_for_a_slow_host_connect() {
    use socket2::{Domain, Socket, Type};
    // A listener whose accept queue is full: the kernel drops further SYNs, so our connect stays
    // in progress until the server accepts.
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener.bind(&loopback(0).into()).unwrap();
    listener.listen(0).unwrap();
    let address = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let filler = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        filler.set_nonblocking(true).unwrap();
        let _ = filler.connect(&address.into());
        fillers.push(filler);
    }
    thread::sleep(Duration::from_millis(100));
    let internet = FakeInternet::new().map(public(80), address);
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    h.run_for(Duration::from_millis(1500));
    // No SYN-ACK while the host connect is in progress (whatever SYNs the guest retransmitted).
    assert_eq!(h.state(conn), State::SynSent);
    assert_eq!(h.internet.calls(), vec![public(80)]);
    // The server drains its queue: the connect completes, the SYN-ACK goes out.
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        while let Ok((conn, _)) = listener.accept() {
            accepted.push(conn);
        }
        h.state(conn) == State::Established
    }));
    assert_eq!(h.handle.stats().tcp_rejected, 0);
}

/// How many times the network's event fd turned readable (each followed by `process()`) in
/// `span`, with the guest idle.
fn wakeups(h: &mut Harness, span: Duration) -> usize {
    let start = std::time::Instant::now();
    let mut count = 0;
    while start.elapsed() < span {
        let mut pfd = libc::pollfd {
            fd: h.net.event_fd().unwrap(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a bounded timeout.
        if unsafe { libc::poll(&mut pfd, 1, 10) } == 1 {
            count += 1;
            h.net.process();
        }
    }
    count
}

#[test]
fn an_idle_network_does_not_spin() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::Established));
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(b"x").unwrap();
    assert!(h.run_until(LIMIT, |h| h.tcp(conn).recv_queue() == 1));
    // An open, idle flow: the housekeeping tick at most, no busy loop.
    assert!(wakeups(&mut h, Duration::from_millis(500)) < 10);
    // The host's side closes and the guest keeps its half open: still no busy loop.
    server.shutdown(Shutdown::Write).unwrap();
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::CloseWait));
    assert!(wakeups(&mut h, Duration::from_millis(500)) < 10);
    // The guest closes too; once the flow is gone the network is silent.
    h.tcp(conn).close();
    assert!(h.run_until(LIMIT, |h| h.handle.stats().tcp_flows_open == 0));
    h.run_for(Duration::from_millis(20));
    assert_eq!(wakeups(&mut h, Duration::from_millis(300)), 0);
}

#[test]
fn a_guest_reset_resets_the_host_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::Established));
    let (mut server, _) = listener.accept().unwrap();
    h.tcp(conn).abort();
    assert!(h.run_until(LIMIT, |h| h.handle.stats().tcp_flows_open == 0));
    server.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buffer = [0u8; 8];
    let error = server.read(&mut buffer).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn a_guest_that_stops_receiving_gets_everything_later_and_nothing_is_dropped() {
    const SIZE: usize = 4 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(&pattern(SIZE, 9)).unwrap();
    });
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::Established));
    // No receive buffers: the network stops producing at its queue's bound.
    h.rx_paused = true;
    let before = h.handle.stats().frames_to_guest;
    h.run_for(Duration::from_millis(300));
    let queued = h.handle.stats().frames_to_guest - before;
    assert!(queued > 0 && queued <= 600, "{queued}");
    h.run_for(Duration::from_millis(200));
    assert_eq!(h.handle.stats().frames_to_guest - before, queued);
    // Buffers again: all of it arrives, in order, and nothing was dropped on the way.
    h.rx_paused = false;
    let mut received = Vec::new();
    assert!(h.run_until(LIMIT, |h| {
        let socket = h.tcp(conn);
        while socket.can_recv() {
            socket
                .recv(|data| {
                    received.extend_from_slice(data);
                    (data.len(), ())
                })
                .unwrap();
        }
        received.len() >= SIZE
    }));
    server.join().unwrap();
    assert_eq!(checksum(&received), checksum(&pattern(SIZE, 9)));
    assert_eq!(h.handle.stats().frames_dropped, 0);
}

/// A fork child's network never carried its guest's connections: given them, it resets them in
/// the guest at once, even one whose guest side only waits to read (it would send nothing, so
/// the reset-on-next-segment alone would leave it hanging).
#[test]
fn a_new_network_resets_the_connections_it_is_given_without_the_guest_sending() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || listener.accept().unwrap().0);
    let internet = FakeInternet::new().map(public(80), loopback(port));
    let mut h = Harness::new(NetworkPolicy::public_internet(), internet);
    let conn = h.connect(public(80));
    assert!(h.run_until(LIMIT, |h| h.state(conn) == State::Established));
    let _host = server.join().unwrap();
    // The loop publishes its connections at the end of a turn.
    h.run_for(Duration::from_millis(50));
    let connections = h.handle.tcp_connections();
    assert_eq!(connections.len(), 1, "{connections:?}");
    let (guest, remote) = connections[0];
    assert_eq!(remote.port(), 80);
    assert_eq!(*guest.ip(), h.config.guest_ip);

    // The "child": the same guest, now behind a new network that was told of the connection.
    let seams = forkvm_net::Seams {
        connector: h.internet.clone(),
        resolver: std::sync::Arc::new(forkvm_net::StaticResolver::new()),
        hosts: Default::default(),
    };
    let (mut child, child_handle) =
        forkvm_net::UserNetwork::new(h.config.clone(), NetworkPolicy::public_internet(), seams)
            .unwrap();
    child.reset_guest_connections(&connections);
    h.net = child;
    h.handle = child_handle;
    // The guest sends nothing of its own; only the probe's answer reaches the new network.
    assert!(
        h.run_until(LIMIT, |h| h.state(conn) == State::Closed),
        "{:?}",
        h.state(conn)
    );
    assert!(h.handle.tcp_connections().is_empty());
}
