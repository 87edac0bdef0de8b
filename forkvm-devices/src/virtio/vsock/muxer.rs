//! The device's connection table and control queue: guest packets matched to connections,
//! connections opened from either side, the header-only packets the device owes the guest, and
//! the data read from host sockets into the guest's receive buffers.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;

use virtio_vsock::packet::VsockPacket;
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, HostRead, Reset, State};
use super::device::Vsock;
use super::host::ConnectRequest;
use super::packet::*;
use super::{FIRST_LOCAL_PORT, MAX_CONNECTIONS, MAX_CONTROL_PACKETS};
use crate::virtio::DeviceError;

impl Vsock {
    pub(super) fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            crate::ratelimit::guest_warn!(
                "vsock: the guest takes no packets; dropped op {op} for {key:?}"
            );
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    /// Closes the host side of `key` (if open) and tells the guest with a reset.
    pub(super) fn reset_connection(&mut self, key: ConnKey) {
        self.close(key);
        self.push_control(key, OP_RST, 0);
    }

    pub(super) fn close(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            let fd = conn.as_raw_fd();
            self.by_fd.remove(&fd);
            let _ = self.host.rewatch(fd, conn.registered, EventSet::empty());
        }
    }

    pub(super) fn add_connection(&mut self, key: ConnKey, conn: Connection) {
        self.by_fd.insert(conn.as_raw_fd(), key);
        self.connections.insert(key, conn);
    }

    /// Drops every connection and pending client (driver reset, or the device left service).
    pub(super) fn close_all(&mut self) {
        let keys: Vec<_> = self.connections.keys().copied().collect();
        for key in keys {
            self.close(key);
        }
        self.host.drop_clients();
        self.control.clear();
        self.rx_starved = false;
        self.rx_throttled = false;
    }

    /// A guest packet from the transmit queue.
    pub(super) fn handle_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if pkt.src_cid() != self.cid || pkt.dst_cid() != HOST_CID || pkt.type_() != TYPE_STREAM {
            if pkt.op() != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if pkt.op() == OP_REQUEST {
            self.guest_connect(key, pkt.buf_alloc(), pkt.fwd_cnt());
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            if pkt.op() != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        };
        conn.peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        let outcome = match (pkt.op(), conn.state()) {
            (OP_RST, _) => {
                self.close(key);
                return;
            }
            (OP_RESPONSE, State::Connecting) => conn.establish(key.local_port),
            (OP_RW, State::Established) => match pkt.data_slice() {
                Some(data) => conn.send_to_host(data),
                None => Ok(()),
            },
            (OP_SHUTDOWN, State::Established) => conn.guest_shutdown(pkt.flags()),
            (OP_CREDIT_UPDATE, State::Established) => Ok(()),
            (OP_CREDIT_REQUEST, State::Established) => {
                self.queue_credit_update(key);
                Ok(())
            }
            _ => Err(Reset::Protocol),
        };
        self.after_host_write(key, outcome);
    }

    /// Settles a connection after data moved towards the host: resets it on failure, ends it
    /// when both sides are done, and tells the guest about freed credit.
    pub(super) fn after_host_write(&mut self, key: ConnKey, outcome: Result<(), Reset>) {
        if let Err(why) = outcome {
            log::debug!("vsock: resetting {key:?}: {why:?}");
            self.reset_connection(key);
            return;
        }
        let Some(conn) = self.connections.get(&key) else {
            return;
        };
        if conn.finished() {
            self.reset_connection(key);
        } else if conn.wants_credit_update() {
            self.queue_credit_update(key);
        }
    }

    pub(super) fn queue_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.get_mut(&key)
            && !conn.credit_update_queued
        {
            conn.credit_update_queued = true;
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// The guest asks for host port `key.local_port`.
    pub(super) fn guest_connect(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32) {
        if self.connections.contains_key(&key) || self.connections.len() >= MAX_CONNECTIONS {
            self.push_control(key, OP_RST, 0);
            return;
        }
        let connected = self
            .host
            .connect_host_port(key.local_port)
            .and_then(|stream| Connection::new(stream, State::Established));
        match connected {
            Ok(mut conn) => {
                conn.peer_credit(buf_alloc, fwd_cnt);
                self.add_connection(key, conn);
                self.push_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                log::debug!(
                    "vsock: guest connection to host port {}: {e}",
                    key.local_port
                );
                self.push_control(key, OP_RST, 0);
            }
        }
    }

    /// A host client asked for guest port `request.port`.
    pub(super) fn host_connect(&mut self, request: ConnectRequest) {
        if self.connections.len() >= MAX_CONNECTIONS {
            return; // Dropping the client's stream refuses it.
        }
        let Some(local_port) = self.free_local_port() else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: request.port,
        };
        match Connection::new(request.stream, State::Connecting) {
            Ok(conn) => {
                self.add_connection(key, conn);
                self.push_control(key, OP_REQUEST, 0);
            }
            Err(e) => crate::ratelimit::guest_warn!("vsock: cannot set up a host connection: {e}"),
        }
    }

    pub(super) fn free_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.connections.keys().any(|k| k.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    /// A ready host socket of connection `key`.
    pub(super) fn connection_event(
        &mut self,
        key: ConnKey,
        events: EventSet,
        readable: &mut Vec<ConnKey>,
    ) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.state() == State::Connecting {
            // The host client hung up before the guest answered.
            self.reset_connection(key);
            return;
        }
        if conn.registered.contains(EventSet::OUT) {
            let outcome = conn.flush();
            self.after_host_write(key, outcome);
        }
        let wanted_input = self
            .connections
            .get(&key)
            .is_some_and(|c| c.registered.contains(EventSet::IN));
        if wanted_input && events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            readable.push(key);
        }
    }

    pub(super) fn write_header(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        control: Control,
        len: u32,
    ) {
        let (buf_alloc, fwd_cnt) = match self.connections.get_mut(&control.key) {
            Some(conn) => {
                if control.op == OP_CREDIT_UPDATE {
                    conn.credit_update_queued = false;
                }
                conn.report_credit()
            }
            None => (0, 0),
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.cid)
            .set_src_port(control.key.local_port)
            .set_dst_port(control.key.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(control.op)
            .set_flags(control.flags)
            .set_len(len)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    /// Reads the first readable connection's data into `pkt`; returns the payload length, or
    /// `None` when that connection had nothing after all (the buffer is not used).
    pub(super) fn write_data(
        &mut self,
        pkt: &mut VsockPacket<'_, ()>,
        readable: &mut VecDeque<ConnKey>,
    ) -> Result<Option<u32>, DeviceError> {
        let Some(key) = readable.pop_front() else {
            return Ok(None);
        };
        let Some(conn) = self.connections.get_mut(&key) else {
            return Ok(None);
        };
        let Some(buffer) = pkt.data_slice() else {
            return Err(DeviceError::BadRequest(
                "vsock receive buffer has no room for data".into(),
            ));
        };
        let room = buffer.len();
        let control = |op, flags| Control { key, op, flags };
        match conn.read_for_guest(buffer) {
            HostRead::Data(n) => {
                if n as usize == room {
                    readable.push_back(key); // There may be more: another turn later.
                }
                self.write_header(pkt, control(OP_RW, 0), n);
                Ok(Some(n))
            }
            HostRead::WouldBlock => Ok(None),
            HostRead::Eof => {
                conn.set_host_eof();
                self.write_header(pkt, control(OP_SHUTDOWN, SHUTDOWN_SEND), 0);
                if self.connections.get(&key).is_some_and(Connection::finished) {
                    self.reset_connection(key);
                }
                Ok(Some(0))
            }
            HostRead::Failed(e) => {
                log::debug!("vsock: host socket of {key:?} failed: {e}");
                self.close(key);
                self.write_header(pkt, control(OP_RST, 0), 0);
                Ok(Some(0))
            }
        }
    }

    /// Registers each host socket for exactly the events that can make progress now.
    pub(super) fn sync_interests(&mut self, live: bool) {
        let rx_open = live && !self.rx_starved && !self.rx_throttled;
        for conn in self.connections.values_mut() {
            let wanted = conn.interest(rx_open);
            if wanted != conn.registered {
                match self.host.rewatch(conn.as_raw_fd(), conn.registered, wanted) {
                    Ok(()) => conn.registered = wanted,
                    Err(e) => {
                        crate::ratelimit::guest_warn!("vsock: cannot watch a host socket: {e}")
                    }
                }
            }
        }
    }
}
