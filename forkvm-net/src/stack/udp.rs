//! The UDP relay: one connected host UDP socket per (guest port, destination), opened through the
//! connector after the policy allowed the destination; replies come back as frames from the
//! address the guest sent to. Flows end after an idle time; their number is capped.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::tcp::Key;
use super::{Stack, TOKEN_UDP, in_subnet};
use crate::frames::{IPV4_UDP_HEADERS, udp_frame, udp_prohibited_frame};
use crate::policy::{Protocol, Verdict};
use crate::slab::Slab;

/// UDP flows open at once, at most (datagrams of further flows are dropped).
pub const MAX_UDP_FLOWS: usize = 256;
/// A UDP flow with no datagram either way for this long ends.
const UDP_IDLE: Duration = Duration::from_secs(180);
/// Datagrams read from one flow per turn.
const DATAGRAMS_PER_TURN: usize = 64;

/// One UDP flow.
pub(crate) struct UdpFlow {
    key: Key,
    socket: UdpSocket,
    readable: bool,
    reading: bool,
    last_activity: Instant,
}

/// The UDP flows.
#[derive(Default)]
pub(crate) struct UdpTable {
    pub(crate) flows: Slab<UdpFlow>,
    by_key: HashMap<Key, usize>,
    pub(crate) total: u64,
}

impl Stack {
    /// A datagram from the guest (source checked) to `dst` (not DHCP, not our DNS).
    pub(crate) fn udp_datagram(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
        now: Instant,
    ) {
        let key = (src, dst);
        let index = match self.udp.by_key.get(&key) {
            Some(&index) => index,
            None => match self.open_udp(key, payload.len(), now) {
                Some(index) => index,
                None => {
                    self.stats.frames_dropped += 1;
                    return;
                }
            },
        };
        let Some(flow) = self.udp.flows.get_mut(index) else {
            return;
        };
        flow.last_activity = now;
        if flow.socket.send(payload).is_err() {
            // Lossy by nature: a full socket buffer or an ICMP error loses this datagram.
            self.stats.frames_dropped += 1;
        }
    }

    /// A flow for `key`, if the policy, the caps and the connector allow; a denied datagram (of
    /// `payload_len` bytes) gets the guest an ICMP "administratively prohibited".
    fn open_udp(&mut self, key: Key, payload_len: usize, now: Instant) -> Option<usize> {
        let dialled = key.1;
        if *dialled.ip() != self.config.gateway_ip && in_subnet(&self.config, *dialled.ip()) {
            return None;
        }
        let target = self.host_target(dialled);
        if let Verdict::Deny(reason) = self.check(target, Protocol::Udp, now) {
            if self.report_udp_denial(key, now) {
                self.denied(Protocol::Udp, target, dialled, reason);
            }
            if self.link.has_room() {
                self.link.push(udp_prohibited_frame(
                    self.config.gateway_mac,
                    self.config.guest_mac,
                    self.config.gateway_ip,
                    key.0,
                    dialled,
                    payload_len,
                ));
            }
            return None;
        }
        if self.udp.flows.len() >= MAX_UDP_FLOWS {
            return None;
        }
        let socket = match crate::seams::connect_udp(&self.connector, target) {
            Ok(socket) => socket,
            Err(e) => {
                log::debug!("forkvm-net: udp to {target}: {e}");
                return None;
            }
        };
        socket.set_nonblocking(true).ok()?;
        let fd = socket.as_raw_fd();
        let index = self.udp.flows.insert(UdpFlow {
            key,
            socket,
            readable: false,
            reading: true,
            last_activity: now,
        });
        let event = EpollEvent::new(EventSet::IN, TOKEN_UDP + index as u64);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, event) {
            log::warn!("forkvm-net: epoll_ctl on a udp flow: {e}");
            self.udp.flows.remove(index);
            return None;
        }
        self.udp.by_key.insert(key, index);
        self.udp.total += 1;
        Some(index)
    }

    pub(crate) fn udp_event(&mut self, index: usize) {
        if let Some(flow) = self.udp.flows.get_mut(index) {
            flow.readable = true;
        }
    }

    /// Replies to the guest, idle flows out, epoll interest after the guest queue's room.
    pub(crate) fn service_udp(&mut self, now: Instant) {
        let max_payload = usize::from(self.config.mtu) - IPV4_UDP_HEADERS;
        let mut buffer = vec![0u8; 65536];
        for index in self.udp.flows.indices() {
            let Some(flow) = self.udp.flows.get_mut(index) else {
                continue;
            };
            for _ in 0..DATAGRAMS_PER_TURN {
                if !flow.readable || !self.link.has_room() {
                    break;
                }
                match flow.socket.recv(&mut buffer) {
                    Ok(len) => {
                        flow.last_activity = now;
                        let Some(payload) = buffer.get(..len).filter(|_| len <= max_payload) else {
                            // Larger than the guest's MTU (no fragmentation): lost.
                            self.stats.frames_dropped += 1;
                            continue;
                        };
                        let frame = udp_frame(
                            self.config.gateway_mac,
                            self.config.guest_mac,
                            flow.key.1,
                            flow.key.0,
                            payload,
                        );
                        self.link.push(frame);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => flow.readable = false,
                    // ICMP errors of earlier datagrams surface here; the next read goes on.
                    Err(_) => {}
                }
            }
            if now.duration_since(flow.last_activity) >= UDP_IDLE {
                if let Some(flow) = self.udp.flows.remove(index) {
                    self.udp.by_key.remove(&flow.key);
                }
                continue;
            }
            let wanted = self.link.has_room();
            if wanted != flow.reading {
                let events = if wanted {
                    EventSet::IN
                } else {
                    EventSet::empty()
                };
                let event = EpollEvent::new(events, TOKEN_UDP + index as u64);
                let fd = flow.socket.as_raw_fd();
                if self.epoll.ctl(ControlOperation::Modify, fd, event).is_ok() {
                    flow.reading = wanted;
                }
            }
        }
    }
}
