//! Tests of the socket device through its guest-side test driver and real host sockets.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::test_support::*;
use super::*;
use crate::virtio::DeviceState;
use crate::virtio::mmio::reg;
use crate::virtio::test_driver::Driver;

#[test]
fn config_space_holds_the_guest_cid_and_reserved_cids_are_refused() {
    let mut g = Guest::new(None);
    assert_eq!(g.d.read(0x100), GUEST_CID as u32);
    assert_eq!(g.d.read(0x104), 0);
    assert_eq!(g.d.read(reg::DEVICE_ID), VSOCK_DEVICE_TYPE);
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert!(matches!(
            Vsock::new(cid, None),
            Err(VsockError::InvalidCid(_))
        ));
    }
}

#[test]
fn config_space_is_the_guest_cid_little_endian() {
    use crate::virtio::VirtioDevice;
    let vsock = Vsock::new(0x0102_0304, None).unwrap();
    let mut config = [0xee; 12];
    vsock.read_config(0, &mut config);
    // The layout the device had before it was built from `VsockConfig`: the CID's 8 bytes.
    assert_eq!(config[..8], 0x0102_0304u64.to_le_bytes());
    assert_eq!(config[8..], [0; 4]);
    let mut part = [0xee; 4];
    vsock.read_config(2, &mut part);
    assert_eq!(part, [2, 1, 0, 0]);
}

#[test]
fn guest_connection_carries_data_both_ways() {
    let (mut g, mut host, _dir) = guest_connected("both-ways");
    g.send(Hdr::to_host(1234, OP_RW), b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    host.write_all(b"hello guest").unwrap();
    g.host_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RW);
    assert_eq!(got[0].1, b"hello guest");
    assert_eq!(got[0].0.fwd_cnt, 10, "the guest learns what the host took");
}

#[test]
fn a_host_port_nobody_listens_on_is_refused() {
    let dir = temp_dir("refused");
    let mut g = Guest::new(Some(&dir.join("v.sock")));
    g.post_rx(2);
    g.send(Hdr::to_host(99, OP_REQUEST), &[]);
    assert_eq!(g.ops(), [OP_RST]);
    let mut g = Guest::new(None);
    g.post_rx(2);
    g.send(Hdr::to_host(99, OP_REQUEST), &[]);
    assert_eq!(
        g.ops(),
        [OP_RST],
        "no Unix socket path: every guest connection is refused"
    );
}

#[test]
fn a_host_listener_that_does_not_accept_cannot_stall_the_device() {
    let dir = temp_dir("backlog");
    let listener =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&socket2::SockAddr::unix(dir.join("v.sock_7")).unwrap())
        .unwrap();
    listener.listen(1).unwrap();
    let mut g = Guest::new(Some(&dir.join("v.sock")));
    g.post_rx(16);
    for port in 0..8 {
        let mut request = Hdr::to_host(7, OP_REQUEST);
        request.src_port = GUEST_PORT + port;
        g.send(request, &[]);
    }
    let ops = g.ops();
    assert_eq!(ops.len(), 8, "every request is answered at once");
    assert!(ops.contains(&OP_RST), "a full backlog refuses: {ops:?}");
}

#[test]
fn packets_the_device_cannot_carry_are_answered_with_a_reset() {
    let (mut g, _host, _dir) = guest_connected("foreign");
    let wrong_cid = Hdr {
        src_cid: 7,
        ..Hdr::to_host(1234, OP_RW)
    };
    let other_vm = Hdr {
        dst_cid: 43,
        ..Hdr::to_host(1234, OP_RW)
    };
    let seqpacket = Hdr {
        type_: 2,
        ..Hdr::to_host(1234, OP_RW)
    };
    let unknown = Hdr::to_host(4321, OP_RW);
    let bad_op = Hdr::to_host(1234, 99);
    for hdr in [wrong_cid, other_vm, seqpacket, unknown] {
        g.send(hdr, b"x");
        assert_eq!(g.ops(), [OP_RST], "{hdr:?}");
    }
    g.send(Hdr::to_host(4321, OP_RST), &[]);
    assert!(g.ops().is_empty(), "a reset is never answered");
    g.send(bad_op, &[]);
    assert_eq!(g.ops(), [OP_RST], "an unknown op resets the connection");
    g.send(Hdr::to_host(1234, OP_RW), b"x");
    assert_eq!(g.ops(), [OP_RST], "the connection is gone");
    assert!(!g.needs_reset());
}

#[test]
fn malformed_transmit_chains_are_dropped() {
    let (mut g, mut host, _dir) = guest_connected("malformed");
    g.send_raw(&[0u8; 8], &[]); // header too short
    let mut lying = Hdr::to_host(1234, OP_RW);
    lying.len = 1000; // claims more data than its buffer holds
    g.send_raw(&lying.bytes(), b"short");
    lying.len = MAX_PACKET_DATA + 1;
    g.send_raw(&lying.bytes(), &[0u8; 16]);
    assert!(g.ops().is_empty());
    assert!(!g.needs_reset());
    // The connection still works.
    g.send(Hdr::to_host(1234, OP_RW), b"ok");
    let mut buf = [0u8; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset() {
    let (mut g, host, _dir) = guest_connected("credit");
    host.set_nonblocking(true).unwrap();
    // Fill the host socket's buffer and the device's; the host reads nothing.
    let chunk = vec![7u8; 60 << 10];
    let mut sent = 0usize;
    let mut ops = Vec::new();
    while !ops.contains(&OP_RST) && sent < 16 << 20 {
        g.send(Hdr::to_host(1234, OP_RW), &chunk);
        sent += chunk.len();
        ops.extend(g.ops());
    }
    assert_eq!(
        ops.last(),
        Some(&OP_RST),
        "reset once the guest overran its credit"
    );
    let mut host = host;
    host.set_nonblocking(false).unwrap();
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert!(
        all.len() < sent,
        "what went beyond the credit never reached the host"
    );
}

#[test]
fn host_data_waits_for_receive_buffers_and_credit_without_spinning() {
    let dir = temp_dir("starved");
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_1234")).unwrap();
    let mut g = Guest::new(Some(&uds));
    g.post_rx(1);
    let mut request = Hdr::to_host(1234, OP_REQUEST);
    request.buf_alloc = 6; // the guest can take 6 bytes
    g.send(request, &[]);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(g.ops(), [OP_RESPONSE]);
    host.write_all(b"0123456789").unwrap();
    g.host_event();
    assert_eq!(g.received(), [], "no receive buffer");
    assert!(
        !host_work_pending(&g),
        "starved: the socket is not watched, the loop sleeps"
    );
    g.post_rx(2);
    assert!(host_work_pending(&g), "posting buffers re-arms the socket");
    g.host_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"012345", "only as much as the credit allows");
    assert!(!host_work_pending(&g), "no credit: not watched");
    let mut update = Hdr::to_host(1234, OP_CREDIT_UPDATE);
    update.buf_alloc = 6;
    update.fwd_cnt = 6;
    g.send(update, &[]);
    g.host_event();
    assert_eq!(g.received()[0].1, b"6789");
}

/// Whether the device's host event fd is readable (the event loop would wake).
fn host_work_pending(g: &Guest) -> bool {
    let mut poll = libc::pollfd {
        fd: g.d.transport.host_event().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut poll, 1, 0) == 1 }
}

#[test]
fn host_end_of_input_and_guest_shutdown_close_the_connection() {
    let (mut g, host, _dir) = guest_connected("shutdown");
    host.shutdown(std::net::Shutdown::Write).unwrap();
    g.host_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The guest may still send; then it closes both directions.
    g.send(Hdr::to_host(1234, OP_RW), b"bye");
    let mut shutdown = Hdr::to_host(1234, OP_SHUTDOWN);
    shutdown.flags = SHUTDOWN_BOTH;
    g.send(shutdown, &[]);
    assert_eq!(g.ops(), [OP_RST]);
    let mut rest = Vec::new();
    (&host).read_to_end(&mut rest).unwrap();
    assert_eq!(
        rest, b"bye",
        "everything the guest sent arrives, then end of input"
    );
}

#[test]
fn a_host_that_goes_away_resets_the_guest_connection() {
    let (mut g, host, _dir) = guest_connected("host-gone");
    drop(host);
    g.host_event();
    assert_eq!(g.ops(), [OP_SHUTDOWN]);
    g.send(Hdr::to_host(1234, OP_RW), b"anyone?");
    assert_eq!(g.ops(), [OP_RST], "writing to a closed host socket resets");
}

#[test]
fn host_clients_connect_through_the_unix_socket_and_in_process() {
    let dir = temp_dir("host-connect");
    let uds = dir.join("v.sock");
    let mut g = Guest::new(Some(&uds));
    let connector = g.connector.clone();
    g.post_rx(8);
    let timeout = Duration::from_secs(10);
    let unix = std::thread::spawn({
        let uds = uds.clone();
        move || {
            let stream = UnixStream::connect(&uds).unwrap();
            host::hybrid_handshake(&stream, 52, timeout).map(|port| (stream, port))
        }
    });
    let in_process = std::thread::spawn(move || connector.connect(53, timeout));
    let mut requests = Vec::new();
    while requests.len() < 2 {
        g.host_event();
        requests.extend(g.received());
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut ports: Vec<u32> = requests.iter().map(|(h, _)| h.dst_port).collect();
    ports.sort();
    assert_eq!(ports, [52, 53]);
    for (hdr, _) in &requests {
        assert_eq!(hdr.op, OP_REQUEST);
        assert!(hdr.src_port >= FIRST_LOCAL_PORT);
        let answer = Hdr {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: if hdr.dst_port == 52 {
                OP_RESPONSE
            } else {
                OP_RST
            },
            buf_alloc: 4096,
            ..Hdr::default()
        };
        g.send(answer, &[]);
    }
    let (mut stream, port) = unix.join().unwrap().expect("the guest accepted port 52");
    assert!(port >= FIRST_LOCAL_PORT);
    let refused = in_process
        .join()
        .unwrap()
        .expect_err("the guest refused port 53");
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    stream.write_all(b"data").unwrap();
    g.host_event();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.dst_port, &got[0].1[..]),
        (OP_RW, 52, &b"data"[..])
    );
}

#[test]
fn clients_are_refused_until_the_driver_is_up_and_reset_drops_connections() {
    let dir = temp_dir("not-live");
    let uds = dir.join("v.sock");
    let mut d = Driver::new(Box::new(Vsock::new(GUEST_CID, Some(&uds)).unwrap()));
    let client = UnixStream::connect(&uds).unwrap();
    d.transport.process_host_event();
    let err = host::hybrid_handshake(&client, 1, Duration::from_secs(5)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

    let (mut g, host, _dir) = guest_connected("reset");
    g.d.write(reg::STATUS, 0);
    let mut rest = Vec::new();
    (&host).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "a driver reset closes every host socket");
}

#[test]
fn receive_buffers_without_room_put_the_device_into_needs_reset() {
    let (mut g, mut host, _dir) = guest_connected("tiny-rx");
    g.d.select(RX_QUEUE as u16);
    g.d.chain(100, &[(RX_AREA, PKT_HEADER_SIZE as u32, true)]);
    // Use up the well-formed buffers first.
    host.write_all(&vec![1u8; 7 * RX_DATA as usize]).unwrap();
    for _ in 0..8 {
        g.host_event();
    }
    assert!(g.needs_reset());
}

#[test]
fn random_packets_never_panic() {
    let (mut g, _host, _dir) = guest_connected("random");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..5_000 {
        let r = next();
        let mut hdr = Hdr::to_host(1230 + (r % 8) as u32, (r >> 8) as u16 % 9);
        hdr.src_port = GUEST_PORT + (r >> 20) as u32 % 3;
        hdr.flags = (r >> 24) as u32 % 4;
        hdr.buf_alloc = (r >> 32) as u32;
        hdr.fwd_cnt = (r >> 40) as u32;
        let data = vec![0u8; (r >> 48) as usize % 300];
        if r & 1 == 0 {
            g.send(hdr, &data);
        } else {
            hdr.len = (r >> 50) as u32;
            g.send_raw(&hdr.bytes(), &data);
        }
        if r % 7 == 0 && g.rx_posted - g.rx_seen < 8 {
            g.post_rx(4);
        }
        g.host_event();
        g.received();
    }
}

#[test]
fn a_forked_device_sends_one_transport_reset_and_a_restarted_driver_none() {
    let mut g = Guest::new(None);
    let state = g.d.transport.freeze().unwrap();
    let DeviceState::Vsock(vsock_state) = &state.device else {
        panic!("not a vsock state: {:?}", state.device);
    };
    let child = Vsock::from_state(vsock_state, None).unwrap();
    let interrupt = crate::virtio::Interrupt::new(crate::trigger::IrqTrigger::new().unwrap());
    g.d.transport = crate::virtio::mmio::MmioTransport::restore(
        Box::new(child),
        g.d.memory.clone(),
        interrupt,
        &state.transport,
    )
    .unwrap();
    // The event loop serves the queues the restore marked notified (no event buffer yet).
    for index in 0..3 {
        assert_eq!(g.d.transport.queue_events()[index].read().unwrap(), 1);
        g.d.transport.process_queue(index);
    }
    let event_buffer = |g: &mut Guest, head: u16, at: u64| {
        g.d.memory.write_obj(u32::MAX, GuestAddress(at)).unwrap();
        g.d.select(EVENT_QUEUE as u16);
        g.d.chain(head, &[(at, 4, true)]);
        g.d.notify();
    };
    event_buffer(&mut g, 0, 0xa_0000);
    assert_eq!(g.d.used(0), (1, 4));
    let id: u32 = g.d.memory.read_obj(GuestAddress(0xa_0000)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    event_buffer(&mut g, 1, 0xa_0100);
    assert_eq!(g.d.used(0).0, 1, "one reset per fork");

    // A driver that starts over after the fork has nothing to reset.
    let state = g.d.transport.freeze().unwrap();
    let DeviceState::Vsock(vsock_state) = &state.device else {
        panic!("not a vsock state");
    };
    g.d = Driver::new(Box::new(Vsock::from_state(vsock_state, None).unwrap()));
    g.d.start_with(0);
    event_buffer(&mut g, 0, 0xa_0000);
    assert_eq!(g.d.used(0).0, 0);
}

#[test]
fn a_bytes_limit_holds_back_what_the_guest_sends_until_the_refill() {
    use std::sync::Arc;

    use crate::virtio::rate_limit::{Bucket, ManualClock, RateLimit};

    let (mut g, mut host, _dir) = guest_connected("limited");
    let clock = Arc::new(ManualClock::default());
    g.d.transport.set_rate_limit_clock(clock.clone());
    // Each packet below moves its header and 64 bytes: 108 bytes, so the bucket of 250 lets
    // three through (the third into debt).
    let bytes = Bucket::new(250, Duration::from_secs(1));
    g.d.transport
        .set_rate_limit(RateLimit {
            bytes: Some(bytes),
            ops: None,
        })
        .unwrap();
    for i in 0..4u8 {
        g.send(Hdr::to_host(1234, OP_RW), &[i; 64]);
    }
    host.set_nonblocking(true).unwrap();
    let mut got = vec![0u8; 1024];
    let n = host.read(&mut got).unwrap();
    assert_eq!(n, 3 * 64);
    assert_eq!(
        host.read(&mut got).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );

    clock.advance(Duration::from_secs(1));
    g.d.transport.rate_limit_timer_fired();
    while g.d.turn_pending() {
        g.d.serve_turn();
    }
    assert_eq!(host.read(&mut got).unwrap(), 64);
    assert_eq!(got[..64], [3u8; 64]);
}

#[test]
fn a_receive_limit_leaves_host_data_in_the_socket_and_loses_none() {
    use std::sync::Arc;

    use crate::virtio::rate_limit::{Bucket, ManualClock, RateLimit};

    let (mut g, mut host, _dir) = guest_connected("rx-limited");
    let clock = Arc::new(ManualClock::default());
    g.d.transport.set_rate_limit_clock(clock.clone());
    // Two data packets a second.
    let ops = Bucket::new(2, Duration::from_secs(1));
    g.d.transport
        .set_rx_rate_limit(RateLimit {
            bytes: None,
            ops: Some(ops),
        })
        .unwrap();
    g.post_rx(7);
    // Five buffers' worth of data, and a little more.
    let sent: Vec<u8> = (0..5 * RX_DATA + 100).map(|i| (i % 251) as u8).collect();
    host.write_all(&sent).unwrap();
    g.host_event();
    let mut got: Vec<u8> = Vec::new();
    let take = |g: &mut Guest, got: &mut Vec<u8>| {
        let packets = g.received();
        for (hdr, data) in &packets {
            assert_eq!(hdr.op, OP_RW);
            got.extend_from_slice(data);
        }
        packets.len()
    };
    assert_eq!(take(&mut g, &mut got), 2);
    // Nothing more without the timer: the socket is not even watched for input meanwhile.
    g.host_event();
    assert_eq!(take(&mut g, &mut got), 0);
    // The guest's own packets still go out (credit updates are not held either).
    g.send(Hdr::to_host(1234, OP_RW), b"ping");
    let mut ping = [0u8; 4];
    host.read_exact(&mut ping).unwrap();
    assert_eq!(&ping, b"ping");
    assert_eq!(take(&mut g, &mut got), 0);

    let mut turns = 0;
    while got.len() < sent.len() {
        turns += 1;
        assert!(
            turns < 10,
            "only {} of {} bytes arrived",
            got.len(),
            sent.len()
        );
        clock.advance(Duration::from_millis(500));
        g.d.transport.rx_rate_limit_timer_fired();
        g.host_event();
        assert!(
            take(&mut g, &mut got) <= 1,
            "half a second: one packet at most"
        );
    }
    assert_eq!(got, sent, "every byte, in order");
    assert_eq!(turns, 4);
}
