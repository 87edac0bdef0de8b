//! The network: the user-mode network (`forkvm-net`) behind the real virtio-net device, driven
//! by a smoltcp guest whose link is a virtio-net driver in guest memory (the register-level test
//! driver; no KVM, no guest code: the bench thread plays guest and event loop):
//!
//! - bulk TCP guest → host and host → guest at MTU 1500 and 65520, with the checksum offloads
//!   negotiated (`CSUM`, `GUEST_CSUM`, as a Linux guest does) and without, against a loopback
//!   TCP socket pair moving the same bytes, in alternating rounds (Gbit/s, p50/p90/p99, ratio
//!   of medians; the offload's gain as the median of per-round ratios);
//! - connection set-up, guest `connect` → established through the NAT to a listener on
//!   127.0.0.1, against a loopback `connect`, alternating;
//! - memory: heap (a counting allocator) and `RssAnon` per idle network (`UserNetwork` + `Net`),
//!   and per open TCP flow;
//! - `fork(1)` of a paused test guest (KVM) with a network attached against the same VM without
//!   one, children prepared, alternating.
//!
//! No packet leaves 127.0.0.0/8: the guest reaches the host's 127.0.0.1 through the gateway
//! 10.0.2.2 with a policy that allows 127.0.0.1/32 only, and the connector refuses (and the
//! benchmark fails on) anything that is not loopback. Every loop is bounded in count and time.
//! `FORKVM_NET_BENCH_MIB` sets the bytes per throughput round (default 64 MiB),
//! `FORKVM_NET_BENCH_ROUNDS` the rounds (default 30); `FORKVM_NET_BENCH_ONLY=throughput`
//! (`connect`, `memory`, `fork`) runs one part.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../forkvm-net/tests/support/virtio_guest.rs"]
mod virtio_guest;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use forkvm_devices::virtio::net::Net;
use forkvm_net::{NetworkConfig, UserNetwork};
use smoltcp::socket::tcp::State;
use virtio_guest::{LoopbackOnly, VirtioGuest, loopback_only};

/// Counts the heap bytes this process holds.
struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LIMIT: Duration = Duration::from_secs(60);
/// Guest socket buffers for bulk transfers (the network's own per-flow buffers are 256 KiB).
const GUEST_BUFFER: usize = 1 << 20;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether the part `name` runs (`FORKVM_NET_BENCH_ONLY` unset or naming it).
fn runs(name: &str) -> bool {
    std::env::var("FORKVM_NET_BENCH_ONLY").map_or(true, |only| only.split(',').any(|o| o == name))
}

/// The `p`th percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Prints p50/p90/p99 of `v` (sorted here) in `unit`; returns the median.
fn print_pct(name: &str, v: &mut [f64], unit: &str) -> f64 {
    v.sort_by(f64::total_cmp);
    println!(
        "{name}: n={} p50={:.3} p90={:.3} p99={:.3} {unit}",
        v.len(),
        pct(v, 50.0),
        pct(v, 90.0),
        pct(v, 99.0)
    );
    pct(v, 50.0)
}

/// A host peer on 127.0.0.1 that either counts what it reads (`sink`) or writes without end,
/// until `stop`.
struct Peer {
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Peer {
    fn spawn(mut conn: TcpStream, sink: bool) -> Self {
        let read = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (read.clone(), stop.clone());
        conn.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        conn.set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let thread = thread::spawn(move || {
            let mut buf = vec![0x5au8; 256 << 10];
            while !s.load(Ordering::Relaxed) {
                let n = if sink {
                    conn.read(&mut buf)
                } else {
                    conn.write(&buf)
                };
                match n {
                    Ok(0) => break,
                    Ok(n) if sink => {
                        r.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        });
        Self {
            read,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A guest with one established connection to a host peer.
struct Bulk {
    guest: VirtioGuest,
    conn: smoltcp::iface::SocketHandle,
    peer: Peer,
    connector: Arc<LoopbackOnly>,
    data: Vec<u8>,
}

impl Bulk {
    fn new(mtu: u16, guest_sends: bool, offload: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seams, connector, policy) = loopback_only();
        let rx_buf_len = VirtioGuest::rx_buf_len_for(mtu);
        let mut guest = VirtioGuest::with_offload(mtu, rx_buf_len, policy, seams, true, offload);
        let conn = guest.connect_gateway(port, GUEST_BUFFER);
        assert!(guest.run_until(LIMIT, |g| g.tcp(conn).state() == State::Established));
        let (host, _) = listener.accept().unwrap();
        let peer = Peer::spawn(host, guest_sends);
        Self {
            guest,
            conn,
            peer,
            connector,
            data: vec![0xa5; 256 << 10],
        }
    }

    /// Moves `bytes` guest → host (until the host has read them) or host → guest (until the
    /// guest has read them, into a buffer).
    fn round(&mut self, bytes: u64, guest_sends: bool) -> Duration {
        let start = Instant::now();
        let target = self.peer.read.load(Ordering::Relaxed) + bytes;
        let mut got = 0u64;
        let (data, peer) = (&mut self.data, &self.peer);
        let conn = self.conn;
        let done = self.guest.run_until(LIMIT, |g| {
            let socket = g.tcp(conn);
            if guest_sends {
                while socket.can_send() {
                    socket.send_slice(data).unwrap();
                }
                peer.read.load(Ordering::Relaxed) >= target
            } else {
                while socket.can_recv() && got < bytes {
                    got += socket.recv_slice(data).unwrap() as u64;
                }
                got >= bytes
            }
        });
        assert!(done, "a throughput round did not finish in {LIMIT:?}");
        start.elapsed()
    }
}

/// The same over a loopback TCP pair: this thread writes (the peer reads) or reads.
struct Loopback {
    ours: TcpStream,
    peer: Peer,
    buf: Vec<u8>,
}

impl Loopback {
    fn new(we_send: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        Self {
            ours,
            peer: Peer::spawn(theirs, we_send),
            buf: vec![0xa5; 256 << 10],
        }
    }

    fn round(&mut self, bytes: u64, we_send: bool) -> Duration {
        let start = Instant::now();
        if we_send {
            let target = self.peer.read.load(Ordering::Relaxed) + bytes;
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(self.buf.len() as u64) as usize;
                self.ours.write_all(&self.buf[..n]).unwrap();
                sent += n as u64;
            }
            while self.peer.read.load(Ordering::Relaxed) < target {
                assert!(start.elapsed() < LIMIT);
                thread::yield_now();
            }
        } else {
            let mut got = 0u64;
            while got < bytes {
                let n = (bytes - got).min(self.buf.len() as u64) as usize;
                self.ours.read_exact(&mut self.buf[..n]).unwrap();
                got += n as u64;
            }
        }
        start.elapsed()
    }
}

fn gbits(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e9
}

/// Bulk TCP both ways at both MTUs, device + network against loopback, alternating rounds.
fn throughput(_: &mut Criterion) {
    if !runs("throughput") {
        return;
    }
    let bytes = env("FORKVM_NET_BENCH_MIB", 64) << 20;
    let rounds = env("FORKVM_NET_BENCH_ROUNDS", 30);
    let profiling = env("FORKVM_NET_BENCH_PROFILE", 0) == 1;
    for mtu in [1500u16, 65520] {
        for guest_sends in [true, false] {
            let way = if guest_sends {
                "guest_to_host"
            } else {
                "host_to_guest"
            };
            let name = format!("net_throughput/{way}/mtu{mtu}");
            let mut bulk = Bulk::new(mtu, guest_sends, true);
            let mut plain = Bulk::new(mtu, guest_sends, false);
            let mut lo = Loopback::new(guest_sends);
            // One untimed round each: windows open, buffers are allocated.
            bulk.round(bytes / 4, guest_sends);
            plain.round(bytes / 4, guest_sends);
            lo.round(bytes / 4, guest_sends);
            let (mut a, mut p, mut b) = (Vec::new(), Vec::new(), Vec::new());
            let (mut ratios, mut gains) = (Vec::new(), Vec::new());
            let counts = bulk.guest.counts();
            for _ in 0..rounds {
                let va = gbits(bytes, bulk.round(bytes, guest_sends));
                let vp = gbits(bytes, plain.round(bytes, guest_sends));
                // FORKVM_NET_BENCH_PROFILE=1 leaves loopback out (for `perf record`).
                let vb = if profiling {
                    1.0
                } else {
                    gbits(bytes, lo.round(bytes, guest_sends))
                };
                a.push(va);
                p.push(vp);
                b.push(vb);
                ratios.push(va / vb);
                gains.push(va / vp);
            }
            let after = bulk.guest.counts();
            let ma = print_pct(&format!("{name}/virtio_net"), &mut a, "Gbit/s");
            let mp = print_pct(
                &format!("{name}/virtio_net_no_csum_offload"),
                &mut p,
                "Gbit/s",
            );
            let mb = print_pct(&format!("{name}/loopback_tcp"), &mut b, "Gbit/s");
            print_pct(&format!("{name}/ratio_per_round"), &mut ratios, "x");
            print_pct(
                &format!("{name}/csum_offload_gain_per_round"),
                &mut gains,
                "x",
            );
            println!(
                "{name}: ratio of medians {:.2} (without checksum offload {:.2}); per round: {:.0} \
                 frames to the guest, {:.0} from it, {:.0} tx kicks, {:.0} rx kicks, {:.0} host \
                 events; device dropped {}",
                ma / mb,
                mp / mb,
                (after.rx_frames - counts.rx_frames) as f64 / rounds as f64,
                (after.tx_frames - counts.tx_frames) as f64 / rounds as f64,
                (after.tx_kicks - counts.tx_kicks) as f64 / rounds as f64,
                (after.rx_kicks - counts.rx_kicks) as f64 / rounds as f64,
                (after.host_events - counts.host_events) as f64 / rounds as f64,
                bulk.guest.stats.rx_dropped() + plain.guest.stats.rx_dropped(),
            );
            assert!(bulk.connector.refused.lock().unwrap().is_empty());
            assert!(plain.connector.refused.lock().unwrap().is_empty());
        }
    }
}

/// Guest connect → established through the NAT, against a loopback connect, alternating.
fn connect_latency(_: &mut Criterion) {
    if !runs("connect") {
        return;
    }
    const ROUNDS: usize = 1000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    listener.set_nonblocking(true).unwrap();
    let acceptor = thread::spawn(move || {
        let mut held = Vec::new();
        let start = Instant::now();
        while !s.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
            match listener.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => thread::sleep(Duration::from_micros(200)),
            }
            if held.len() > 64 {
                held.clear();
            }
        }
    });
    let (seams, connector, policy) = loopback_only();
    let mut g = VirtioGuest::new(1500, 2048, policy, seams, true);
    let (mut a, mut b, mut host) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS + 20 {
        let t0 = Instant::now();
        let conn = g.connect_gateway(address.port(), 4096);
        // The guest puts its SYN in the transmit ring; the host side's part is from the kick
        // to the SYN-ACK in the guest's receive buffer (device, NAT, host connect, device).
        let now = g.now();
        g.iface.poll(now, &mut g.link, &mut g.sockets);
        let kick = Instant::now();
        g.link.flush();
        let deadline = Instant::now() + LIMIT;
        while !g.link.rx_ready() && Instant::now() < deadline {
            g.link.serve_host_event(1);
        }
        let host_side = kick.elapsed();
        assert!(g.run_until(LIMIT, |g| g.tcp(conn).state() == State::Established));
        let took = t0.elapsed();
        g.tcp(conn).abort();
        for _ in 0..4 {
            g.step(0);
        }
        g.sockets.remove(conn);
        let t0 = Instant::now();
        let lo = TcpStream::connect(address).unwrap();
        let took_lo = t0.elapsed();
        drop(lo);
        if round >= 20 {
            a.push(took.as_secs_f64() * 1e6);
            b.push(took_lo.as_secs_f64() * 1e6);
            host.push(host_side.as_secs_f64() * 1e6);
        }
    }
    stop.store(true, Ordering::Relaxed);
    acceptor.join().unwrap();
    let ma = print_pct("net_connect/virtio_net_guest_to_host", &mut a, "us");
    print_pct(
        "net_connect/virtio_net_host_side (SYN kicked -> SYN-ACK in guest memory)",
        &mut host,
        "us",
    );
    let mb = print_pct("net_connect/loopback_connect", &mut b, "us");
    println!("net_connect: ratio of medians {:.2}", ma / mb);
    assert!(connector.refused.lock().unwrap().is_empty());
}

fn proc_kib(field: &str) -> i64 {
    forkvm_tests::proc_status(field) as i64
}

/// Heap and `RssAnon` per idle network and per open TCP flow.
fn memory(_: &mut Criterion) {
    if !runs("memory") {
        return;
    }
    const NETWORKS: usize = 64;
    const FLOWS: usize = 64;
    let heap = || HEAP.load(Ordering::Relaxed) as f64 / 1024.0;
    // One first, so that one-time costs are not charged to the measured ones.
    let make = || {
        let (seams, _, policy) = loopback_only();
        let config = NetworkConfig::default();
        let (net, handle) = UserNetwork::new(config.clone(), policy, seams).unwrap();
        (Net::new(config.guest_mac, Box::new(net)), handle)
    };
    let warm = make();
    let (h0, r0, t0) = (heap(), proc_kib("RssAnon"), proc_kib("Threads"));
    let mut created = Vec::new();
    let networks: Vec<_> = (0..NETWORKS)
        .map(|_| {
            let t = Instant::now();
            let network = make();
            created.push(t.elapsed().as_secs_f64() * 1e6);
            network
        })
        .collect();
    let (h1, r1, t1) = (heap(), proc_kib("RssAnon"), proc_kib("Threads"));
    print_pct(
        "net_memory/create_network (UserNetwork::new + Net::new)",
        &mut created,
        "us",
    );
    let mut ifaddrs: Vec<f64> = (0..NETWORKS)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(forkvm_net::policy::host_addresses());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    print_pct(
        "net_memory/host_addresses (getifaddrs, in the first turn since 26f4bc6)",
        &mut ifaddrs,
        "us",
    );
    println!(
        "net_memory/idle_network: {NETWORKS} UserNetwork + Net: heap {:.1} KiB, RssAnon {:.1} \
         KiB, threads {} per network",
        (h1 - h0) / NETWORKS as f64,
        (r1 - r0) as f64 / NETWORKS as f64,
        (t1 - t0) as f64 / NETWORKS as f64
    );
    drop(networks);
    drop(warm);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seams, connector, policy) = loopback_only();
    let mut g = VirtioGuest::new(1500, 2048, policy, seams, true);
    let guest_buffer = 4096;
    // A first flow opened and closed: one-time costs.
    let first = g.connect_gateway(port, guest_buffer);
    assert!(g.run_until(LIMIT, |g| g.tcp(first).state() == State::Established));
    let held_first = listener.accept().unwrap();
    let mut held = Vec::new();
    // The first 64 flows get 256 KiB buffers each way, the later ones 32 KiB.
    for batch in ["first_64_flows", "next_64_flows"] {
        let (h0, r0) = (heap(), proc_kib("RssAnon"));
        for _ in 0..FLOWS {
            let conn = g.connect_gateway(port, guest_buffer);
            assert!(g.run_until(LIMIT, |g| g.tcp(conn).state() == State::Established));
            held.push(listener.accept().unwrap());
        }
        g.run_until(Duration::from_millis(50), |_| false);
        let (h1, r1) = (heap(), proc_kib("RssAnon"));
        let guest_side = 2.0 * guest_buffer as f64 / 1024.0;
        println!(
            "net_memory/open_tcp_flow/{batch}: heap {:.1} KiB per flow (less the guest's own \
             {guest_side:.0} KiB of smoltcp buffers: {:.1} KiB), RssAnon {:.1} KiB per flow; \
             {} flows open",
            (h1 - h0) / FLOWS as f64,
            (h1 - h0) / FLOWS as f64 - guest_side,
            (r1 - r0) as f64 / FLOWS as f64,
            g.handle.stats().tcp_flows_open,
        );
    }
    drop(held_first);
    assert!(connector.refused.lock().unwrap().is_empty());
}

/// `fork(1)` of a paused test guest with a network against one without, children prepared,
/// alternating.
fn fork_with_network(_: &mut Criterion) {
    if !runs("fork") {
        return;
    }
    const ROUNDS: usize = 100;
    let quiet = || vec![forkvm::ConsoleOutput::Discard];
    let (plain, _, _) = forkvm_tests::spinning_guest_with(2, 256, |b| b);
    let (seams, connector, policy) = loopback_only();
    let (networked, _, _) = forkvm_tests::spinning_guest_with(2, 256, |b| {
        b.network(
            forkvm::Network::user()
                .policy(policy)
                .seams(seams.connector.clone(), seams.resolver.clone())
                .kernel_dhcp(false),
        )
    });
    plain.pause().unwrap();
    networked.pause().unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    // With FORKVM_PHASES=1: each phase's times, with and without the network.
    let mut phases: [BTreeMap<&'static str, Vec<f64>>; 2] = Default::default();
    for round in 0..ROUNDS + 5 {
        for (which, (vm, out)) in [(&networked, &mut a), (&plain, &mut b)]
            .into_iter()
            .enumerate()
        {
            vm.prepare_forks(1).unwrap();
            forkvm::take_phase_timings();
            let t0 = Instant::now();
            let children = vm.fork(quiet()).unwrap();
            let took = t0.elapsed();
            let timed = forkvm::take_phase_timings();
            drop(children);
            if round >= 5 {
                out.push(took.as_secs_f64() * 1e3);
                for (phase, ns) in timed {
                    phases[which]
                        .entry(phase)
                        .or_default()
                        .push(ns as f64 / 1e3);
                }
            }
        }
    }
    for (phase, with) in &mut phases[0].clone() {
        let mut without = phases[1].get(phase).cloned().unwrap_or_default();
        with.sort_by(f64::total_cmp);
        without.sort_by(f64::total_cmp);
        println!(
            "net_fork1 phase {phase}: p50 {:.1} / {:.1} µs (with / without network)",
            pct(with, 50.0),
            if without.is_empty() {
                f64::NAN
            } else {
                pct(&without, 50.0)
            },
        );
    }
    // Each round forked both: the difference within a round is less exposed to this host's
    // scheduler (a fork that loses the CPU for a tick takes ~3 ms more).
    let mut paired: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    print_pct("net_fork1/paired_difference_per_round", &mut paired, "ms");
    let (mut fa, mut fb) = (a.clone(), b.clone());
    fa.sort_by(f64::total_cmp);
    fb.sort_by(f64::total_cmp);
    println!(
        "net_fork1: p10 {:.3} / {:.3} ms, p25 {:.3} / {:.3} ms (with / without network)",
        pct(&fa, 10.0),
        pct(&fb, 10.0),
        pct(&fa, 25.0),
        pct(&fb, 25.0)
    );
    let ma = print_pct("net_fork1/paused_prepared/with_network", &mut a, "ms");
    let mb = print_pct("net_fork1/paused_prepared/without_network", &mut b, "ms");
    println!("net_fork1: difference of medians {:.3} ms", ma - mb);
    assert!(connector.refused.lock().unwrap().is_empty());
}

criterion_group!(
    benches,
    throughput,
    connect_latency,
    memory,
    fork_with_network
);
criterion_main!(benches);
