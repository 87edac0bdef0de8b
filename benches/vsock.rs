//! Host → guest vsock stream throughput: a host program writes into its end of an established
//! connection and the device moves the bytes into receive buffers posted in guest memory
//! (8 × 64 KiB per iteration, with the guest's credit update for the previous 8), against plain
//! `read`s of the same bytes from a Unix socket into a
//! host buffer in the same run.
//!
//! Then the hardening's costs (issue 15), each connection served on a thread of its own, in
//! alternating rounds: rate limits that never bind on both directions against none, and the
//! event loop's seccomp filter against none.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkvm::{RateLimit, ThreadKind};
use forkvm_devices::virtio::test_driver::{Driver, QUEUE_SIZE};
use forkvm_devices::virtio::vsock::packet::{HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, TYPE_STREAM};
use forkvm_devices::virtio::vsock::{MAX_PACKET_DATA, RX_QUEUE, TX_QUEUE, Vsock};
use forkvm_tests::rounds::{Worker, compare, round_count, unbinding_limit};
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

/// A guest's connection to a host program that keeps writing: the driver, its receive buffers
/// posted, and what it has read so far.
struct Stream {
    d: Driver,
    dir: std::path::PathBuf,
    used: u16,
    consumed: u32,
    /// The host program's end, when this thread writes it itself (no feeding thread).
    host: Option<UnixStream>,
}

impl Stream {
    /// Connects a fresh device's guest to a host program (in a directory named after `tag`),
    /// optionally with `limit` on both directions, and fills the first buffers.
    /// With `fed`, a thread of its own keeps the host end full; without, [`Stream::iteration`]
    /// writes it between the device's turns, on the calling thread.
    fn new(tag: &str, limit: Option<RateLimit>, fed: bool) -> Self {
        let dir =
            std::env::temp_dir().join(format!("forkvm-bench-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join(format!("v.sock_{HOST_PORT}"))).unwrap();
        let vsock = Vsock::new(GUEST_CID, Some(&dir.join("v.sock"))).unwrap();
        let mut d = Driver::new(Box::new(vsock));
        d.start();
        if let Some(limit) = limit {
            d.transport.set_rate_limit(limit).unwrap();
            d.transport.set_rx_rate_limit(limit).unwrap();
        }

        // Connect from the guest; the host program accepts and starts writing.
        d.select(TX_QUEUE as u16);
        d.memory
            .write_slice(&packet(OP_REQUEST, 0), GuestAddress(HEADERS))
            .unwrap();
        d.chain(0, &[(HEADERS, 44, false)]);
        d.notify();
        let (host, _) = listener.accept().unwrap();
        let host = if fed {
            feed(host);
            None
        } else {
            host.set_nonblocking(true).unwrap();
            Some(host)
        };

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
        let mut stream = Self {
            d,
            dir,
            used: 0,
            consumed: 0,
            host,
        };
        stream.serve_until(BUFFERS);
        stream.used = BUFFERS;
        stream.consumed = payload(&stream.d, 1, BUFFERS);
        stream
    }

    /// Serves host events until `target` buffers were used, writing the host end first when
    /// this thread feeds it.
    fn serve_until(&mut self, target: u16) {
        let chunk = [0x5au8; 64 << 10];
        while self.d.used(0).0 != target {
            if let Some(host) = &mut self.host {
                let _ = host.write(&chunk);
            }
            self.d.transport.process_host_event();
        }
    }

    /// The guest consumed the data and says so, as a driver does, and gives the device back
    /// every buffer; then the device fills them from the socket. Returns the bytes moved.
    fn iteration(&mut self) -> u32 {
        let d = &mut self.d;
        d.select(TX_QUEUE as u16);
        d.memory
            .write_slice(
                &packet(OP_CREDIT_UPDATE, self.consumed),
                GuestAddress(HEADERS),
            )
            .unwrap();
        d.make_available(0);
        d.notify();
        d.select(RX_QUEUE as u16);
        for i in 0..BUFFERS {
            d.make_available(2 * i);
        }
        d.notify();
        let target = self.used.wrapping_add(BUFFERS);
        self.serve_until(target);
        let moved = payload(&self.d, self.used, target);
        self.consumed = self.consumed.wrapping_add(moved);
        self.used = target;
        moved
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the guest has read: the payloads of the used buffers `from..to`.
fn payload(d: &Driver, from: u16, to: u16) -> u32 {
    (0..to.wrapping_sub(from))
        .map(|i| d.used(from.wrapping_add(i) % QUEUE_SIZE).1 - PKT_HEADER_SIZE as u32)
        .sum()
}

fn bench_vsock(c: &mut Criterion) {
    let mut stream = Stream::new("plain", None, true);
    let mut group = c.benchmark_group("vsock_host_to_guest");
    group.throughput(Throughput::Bytes(
        u64::from(BUFFERS) * u64::from(MAX_PACKET_DATA),
    ));
    group
        .sample_size(50)
        .measurement_time(Duration::from_secs(5));
    // Bytes moved and buffers filled over all iterations: buffers are not always full (the
    // device takes what the socket holds), so the real throughput is criterion's figure times
    // the fill ratio printed at the end.
    let mut totals = (0u64, 0u64);
    group.bench_function("virtio_vsock", |b| {
        b.iter(|| {
            let moved = stream.iteration();
            totals = (totals.0 + u64::from(moved), totals.1 + u64::from(BUFFERS));
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
    drop(stream);

    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--profile-time") {
        overheads();
    }
}

/// The costs of rate limits that never bind (1 TiB/s and 2^30 packets/s, both directions)
/// and of the event loop's seccomp filter, on the thread serving the device; alternating
/// rounds against the same set-up without them. Each thread writes its host end itself, in
/// 64 KiB writes between the device's turns (a feeding thread per connection would make the
/// figures follow the scheduler on a small machine).
fn overheads() {
    let worker = |mut stream: Stream, filtered: bool| {
        let enter = move || {
            if filtered {
                forkvm::filter_this_thread_for_bench(ThreadKind::EventLoop).unwrap();
            }
        };
        Worker::spawn(enter, move || {
            stream.iteration();
        })
    };
    let rounds = round_count();
    let plain = worker(Stream::new("a", None, false), false);
    let limited = worker(Stream::new("b", Some(unbinding_limit()), false), false);
    compare(
        "vsock_512KiB_rate_limit",
        ("none", &plain),
        ("unbinding", &limited),
        rounds,
        20,
    );
    drop(limited);
    let filtered = worker(Stream::new("c", None, false), true);
    compare(
        "vsock_512KiB_seccomp",
        ("off", &plain),
        ("event_loop_filter", &filtered),
        rounds,
        20,
    );
}

criterion_group!(benches, bench_vsock);
criterion_main!(benches);
