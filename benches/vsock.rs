//! Host → guest vsock stream throughput: a host program writes into its end of an established
//! connection and the device moves the bytes into receive buffers posted in guest memory
//! (8 × 64 KiB per iteration, with the guest's credit update for the previous 8), against plain
//! `read`s of the same bytes from a Unix socket into a
//! host buffer in the same run.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkvm_devices::virtio::test_driver::{Driver, QUEUE_SIZE};
use forkvm_devices::virtio::vsock::packet::{HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, TYPE_STREAM};
use forkvm_devices::virtio::vsock::{MAX_PACKET_DATA, RX_QUEUE, TX_QUEUE, Vsock};
use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 1000;
const BUFFERS: u16 = 8;
const HEADERS: u64 = 0x4_0000;
const DATA: u64 = 0x8_0000;
const CHUNK: usize = 256 << 10;

/// A guest's packet from port 1 to the host's port 1000 with 1 MiB of receive buffer space, of
/// which all but what it has not consumed of `fwd_cnt` is free.
fn packet(op: u16, fwd_cnt: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(GUEST_CID.to_le_bytes());
    h.extend(HOST_CID.to_le_bytes());
    h.extend(1u32.to_le_bytes());
    h.extend(HOST_PORT.to_le_bytes());
    h.extend(0u32.to_le_bytes()); // len
    h.extend(TYPE_STREAM.to_le_bytes());
    h.extend(op.to_le_bytes());
    h.extend(0u32.to_le_bytes()); // flags
    h.extend((1u32 << 20).to_le_bytes()); // buf_alloc
    h.extend(fwd_cnt.to_le_bytes());
    h
}

/// Keeps writing into `stream` until the reader goes away.
fn feed(mut stream: UnixStream) {
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; CHUNK];
        while stream.write_all(&chunk).is_ok() {}
    });
}

fn bench_vsock(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("forkvm-bench-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let listener = UnixListener::bind(dir.join(format!("v.sock_{HOST_PORT}"))).unwrap();
    let vsock = Vsock::new(GUEST_CID, Some(&dir.join("v.sock"))).unwrap();
    let mut d = Driver::new(Box::new(vsock));
    d.start();

    // Connect from the guest; the host program accepts and starts writing.
    d.select(TX_QUEUE as u16);
    d.memory
        .write_slice(&packet(OP_REQUEST, 0), GuestAddress(HEADERS))
        .unwrap();
    d.chain(0, &[(HEADERS, 44, false)]);
    d.notify();
    let (host, _) = listener.accept().unwrap();
    feed(host);

    // Receive buffers: descriptor pairs (header, 64 KiB of data), written once.
    d.select(RX_QUEUE as u16);
    for i in 0..BUFFERS {
        let n = u64::from(i);
        d.chain(
            2 * i,
            &[
                (HEADERS + 0x100 * (n + 1), 44, true),
                (DATA + n * u64::from(MAX_PACKET_DATA), MAX_PACKET_DATA, true),
            ],
        );
    }
    d.notify(); // the RESPONSE takes the first buffer, data the other seven
    while d.used(0).0 != BUFFERS {
        d.transport.process_host_event();
    }
    let mut used = BUFFERS;

    let mut group = c.benchmark_group("vsock_host_to_guest");
    group.throughput(Throughput::Bytes(
        u64::from(BUFFERS) * u64::from(MAX_PACKET_DATA),
    ));
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(5));
    // What the guest has read: the payloads of every used buffer (the first held the response).
    let payload = |d: &Driver, from: u16, to: u16| -> u32 {
        (0..to.wrapping_sub(from))
            .map(|i| d.used(from.wrapping_add(i) % QUEUE_SIZE).1 - PKT_HEADER_SIZE as u32)
            .sum()
    };
    let mut consumed = payload(&d, 1, BUFFERS);
    // Bytes moved and buffers filled over all iterations: buffers are not always full (the
    // device takes what the socket holds), so the real throughput is criterion's figure times
    // the fill ratio printed at the end.
    let mut totals = (0u64, 0u64);
    group.bench_function("virtio_vsock", |b| {
        b.iter(|| {
            // The guest consumed the data and says so, as a driver does, and gives the device
            // back every buffer; then the device fills them from the socket.
            d.select(TX_QUEUE as u16);
            d.memory
                .write_slice(&packet(OP_CREDIT_UPDATE, consumed), GuestAddress(HEADERS))
                .unwrap();
            d.make_available(0);
            d.notify();
            d.select(RX_QUEUE as u16);
            for i in 0..BUFFERS {
                d.make_available(2 * i);
            }
            d.notify();
            let target = used.wrapping_add(BUFFERS);
            while d.used(0).0 != target {
                d.transport.process_host_event();
            }
            let moved = payload(&d, used, target);
            consumed = consumed.wrapping_add(moved);
            totals = (totals.0 + u64::from(moved), totals.1 + u64::from(BUFFERS));
            used = target;
        })
    });

    eprintln!(
        "virtio_vsock: receive buffers were {:.1}% full on average",
        100.0 * totals.0 as f64 / (totals.1 as f64 * f64::from(MAX_PACKET_DATA))
    );

    let (ours, theirs) = UnixStream::pair().unwrap();
    feed(theirs);
    let mut buffer = vec![0u8; BUFFERS as usize * MAX_PACKET_DATA as usize];
    group.bench_function("unix_socket_read", |b| {
        b.iter(|| (&ours).read_exact(&mut buffer).unwrap())
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench_vsock);
criterion_main!(benches);
