//! A guest-side vsock driver for the tests, over the register-level test driver: packet
//! headers built and parsed field by field, receive buffers posted, packets sent and received.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_vsock::packet::PKT_HEADER_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::connection::TX_BUFFER_SIZE;
use super::host::VsockConnector;
use super::packet::*;
use super::{RX_QUEUE, TX_QUEUE, Vsock};
use crate::virtio::mmio::{S_NEEDS_RESET, reg};
use crate::virtio::test_driver::Driver;

pub(super) const GUEST_CID: u64 = 42;
pub(super) const GUEST_PORT: u32 = 5000;
/// Receive buffers: header at `RX_AREA + i * RX_STRIDE`, data right after it.
pub(super) const RX_AREA: u64 = 0x4_0000;
pub(super) const RX_STRIDE: u64 = 0x2000;
pub(super) const RX_DATA: u32 = 0x1000;
pub(super) const TX_AREA: u64 = 0x8_0000;

/// Packet header fields in wire order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Hdr {
    pub(super) src_cid: u64,
    pub(super) dst_cid: u64,
    pub(super) src_port: u32,
    pub(super) dst_port: u32,
    pub(super) len: u32,
    pub(super) type_: u16,
    pub(super) op: u16,
    pub(super) flags: u32,
    pub(super) buf_alloc: u32,
    pub(super) fwd_cnt: u32,
}

impl Hdr {
    pub(super) fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(PKT_HEADER_SIZE);
        b.extend(self.src_cid.to_le_bytes());
        b.extend(self.dst_cid.to_le_bytes());
        b.extend(self.src_port.to_le_bytes());
        b.extend(self.dst_port.to_le_bytes());
        b.extend(self.len.to_le_bytes());
        b.extend(self.type_.to_le_bytes());
        b.extend(self.op.to_le_bytes());
        b.extend(self.flags.to_le_bytes());
        b.extend(self.buf_alloc.to_le_bytes());
        b.extend(self.fwd_cnt.to_le_bytes());
        b
    }

    pub(super) fn parse(b: &[u8]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// A packet from the test guest's port to `host_port`.
    pub(super) fn to_host(host_port: u32, op: u16) -> Self {
        Self {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 64 << 10,
            ..Self::default()
        }
    }
}

/// A guest-side vsock driver over the register-level test driver.
pub(super) struct Guest {
    pub(super) d: Driver,
    pub(super) connector: VsockConnector,
    pub(super) rx_posted: u16,
    pub(super) rx_seen: u16,
    pub(super) tx_sent: u16,
}

impl Guest {
    pub(super) fn new(uds: Option<&Path>) -> Self {
        let vsock = Vsock::new(GUEST_CID, uds).unwrap();
        let connector = vsock.connector();
        let mut d = Driver::new(Box::new(vsock));
        d.start();
        Self {
            d,
            connector,
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
        }
    }

    /// Posts `n` receive buffers (header + `RX_DATA` bytes of data each).
    pub(super) fn post_rx(&mut self, n: u16) {
        self.d.select(RX_QUEUE as u16);
        for _ in 0..n {
            let slot = u64::from(self.rx_posted % 16);
            let hdr = RX_AREA + slot * RX_STRIDE;
            let head = (self.rx_posted % 64) * 2;
            self.d.chain(
                head,
                &[
                    (hdr, PKT_HEADER_SIZE as u32, true),
                    (hdr + 0x100, RX_DATA, true),
                ],
            );
            self.rx_posted += 1;
        }
        self.d.notify();
    }

    /// Sends a packet with `data` on the transmit queue.
    pub(super) fn send(&mut self, hdr: Hdr, data: &[u8]) {
        let hdr = Hdr {
            len: data.len() as u32,
            ..hdr
        };
        self.send_raw(&hdr.bytes(), data);
    }

    pub(super) fn send_raw(&mut self, hdr: &[u8], data: &[u8]) {
        self.d.select(TX_QUEUE as u16);
        let at = TX_AREA + u64::from(self.tx_sent % 4) * 0x1_0000;
        let head = (self.tx_sent % 64) * 2;
        self.d.memory.write_slice(hdr, GuestAddress(at)).unwrap();
        self.d
            .memory
            .write_slice(data, GuestAddress(at + 0x100))
            .unwrap();
        let mut parts = vec![(at, hdr.len() as u32, false)];
        if !data.is_empty() {
            parts.push((at + 0x100, data.len() as u32, false));
        }
        self.d.chain(head, &parts);
        self.tx_sent += 1;
        self.d.notify();
    }

    /// Lets the device handle its host sockets, as the event loop would.
    pub(super) fn host_event(&mut self) {
        self.d.transport.process_host_event();
    }

    /// Packets the device delivered since the last call, with their data.
    pub(super) fn received(&mut self) -> Vec<(Hdr, Vec<u8>)> {
        self.d.select(RX_QUEUE as u16);
        let (idx, _) = self.d.used(0);
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let n = self.rx_seen;
            let (_, len) = self.d.used(n % 128);
            let slot = u64::from(n % 16);
            let hdr_at = RX_AREA + slot * RX_STRIDE;
            let mut raw = [0u8; PKT_HEADER_SIZE];
            self.d
                .memory
                .read_slice(&mut raw, GuestAddress(hdr_at))
                .unwrap();
            let hdr = Hdr::parse(&raw);
            assert_eq!(len, PKT_HEADER_SIZE as u32 + hdr.len, "used length");
            let mut data = vec![0u8; hdr.len as usize];
            self.d
                .memory
                .read_slice(&mut data, GuestAddress(hdr_at + 0x100))
                .unwrap();
            out.push((hdr, data));
            self.rx_seen += 1;
        }
        out
    }

    pub(super) fn ops(&mut self) -> Vec<u16> {
        self.received().iter().map(|(h, _)| h.op).collect()
    }

    pub(super) fn needs_reset(&mut self) -> bool {
        self.d.read(reg::STATUS) & S_NEEDS_RESET != 0
    }
}

pub(super) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("forkvm-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A guest connected to host port 1234, where `listener` accepted the host end.
pub(super) fn guest_connected(name: &str) -> (Guest, UnixStream, PathBuf) {
    let dir = temp_dir(name);
    let uds = dir.join("v.sock");
    let listener = UnixListener::bind(dir.join("v.sock_1234")).unwrap();
    let mut g = Guest::new(Some(&uds));
    g.post_rx(8);
    g.send(Hdr::to_host(1234, OP_REQUEST), &[]);
    let (host, _) = listener.accept().unwrap();
    let got = g.received();
    assert_eq!(got.len(), 1);
    let (hdr, _) = got[0];
    assert_eq!(
        (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port),
        (OP_RESPONSE, HOST_CID, GUEST_CID, 1234, GUEST_PORT)
    );
    assert_eq!(hdr.buf_alloc, TX_BUFFER_SIZE);
    (g, host, dir)
}
