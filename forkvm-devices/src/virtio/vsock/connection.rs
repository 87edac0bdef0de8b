//! One vsock stream between a guest port and a host Unix socket, with the credit-based flow
//! control of virtio 1.2 §5.10.6.3 in both directions.
//!
//! Guest → host: the device offers the guest [`TX_BUFFER_SIZE`] bytes of credit; what the host
//! socket does not take at once waits in a buffer that can never grow beyond that (a guest that
//! sends more than its credit gets its connection reset). `fwd_cnt` counts the bytes handed to the
//! host socket, and the guest learns of it in every packet the device sends.
//!
//! Host → guest: the device reads from the host socket only as much as the guest's advertised
//! buffer space (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) allows, straight into the guest's
//! receive buffer, so nothing is buffered on the host in this direction.

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError};
use vmm_sys_util::epoll::EventSet;

use super::packet::{SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer space the device offers the guest per connection (its `buf_alloc`).
pub const TX_BUFFER_SIZE: u32 = 128 << 10;
/// Unreported progress of `fwd_cnt` after which the device tells the guest without being asked.
const CREDIT_UPDATE_THRESHOLD: u32 = TX_BUFFER_SIZE / 4;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host asked to connect; the device sent a request and waits for the guest's answer.
    Connecting,
    /// Both sides may exchange data.
    Established,
}

/// Why a connection must be reset (the guest gets `OP_RST`, the host socket is closed).
#[derive(Debug)]
pub enum Reset {
    /// The guest sent more than the credit it was given, or data after saying it would not.
    CreditExceeded,
    /// The guest sent a packet its connection's state does not allow.
    Protocol,
    /// The host socket failed.
    Host(io::Error),
}

/// What reading from the host socket into a guest buffer gave.
#[derive(Debug)]
pub enum HostRead {
    /// This many bytes went into the buffer.
    Data(u32),
    /// Nothing to read now.
    WouldBlock,
    /// The host will send no more.
    Eof,
    /// The host socket failed.
    Failed(io::Error),
}

/// A vsock stream and its flow-control state.
pub struct Connection {
    stream: UnixStream,
    state: State,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// The guest's receive buffer size and how much of what it received it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest data the host socket has not taken yet (at most [`TX_BUFFER_SIZE`] bytes).
    to_host: Vec<u8>,
    /// Bytes of guest data handed to the host socket, and the value last told to the guest.
    fwd_cnt: u32,
    fwd_cnt_reported: u32,
    /// `SHUTDOWN_*` flags the guest sent.
    guest_shutdown: u32,
    /// The host side reached end of input.
    host_eof: bool,
    /// An `OP_CREDIT_UPDATE` for this connection is waiting to go to the guest.
    pub credit_update_queued: bool,
    /// What the host socket is registered for in the device's epoll set (empty: not registered).
    pub registered: EventSet,
}

impl Connection {
    /// A connection over `stream` (made non-blocking) in `state`.
    pub fn new(stream: UnixStream, state: State) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            state,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            to_host: Vec::new(),
            fwd_cnt: 0,
            fwd_cnt_reported: 0,
            guest_shutdown: 0,
            host_eof: false,
            credit_update_queued: false,
            registered: EventSet::empty(),
        })
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Where the connection is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The guest accepted a host-initiated connection: tells the host client which port it got
    /// (`OK <port>\n`, the hybrid-vsock reply).
    pub fn establish(&mut self, local_port: u32) -> Result<(), Reset> {
        self.state = State::Established;
        let reply = format!("OK {local_port}\n");
        match send_nosignal(&self.stream, reply.as_bytes()) {
            Ok(n) if n == reply.len() => Ok(()),
            Ok(_) => Err(Reset::Host(io::Error::new(
                ErrorKind::WriteZero,
                "the host client's socket buffer is full",
            ))),
            Err(e) => Err(Reset::Host(e)),
        }
    }

    /// Records the guest's buffer space from the header of any packet it sent.
    pub fn peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// How many more bytes the guest can take now. A guest whose counters make no sense
    /// (more consumed than sent) gets nothing.
    pub fn peer_credit_left(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// The `buf_alloc` and `fwd_cnt` to put in a packet to the guest; the guest now knows the
    /// current `fwd_cnt`.
    pub fn report_credit(&mut self) -> (u32, u32) {
        self.fwd_cnt_reported = self.fwd_cnt;
        (TX_BUFFER_SIZE, self.fwd_cnt)
    }

    /// Whether enough guest data reached the host since the last report that a guest waiting
    /// for credit should be told.
    pub fn wants_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_reported) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Takes guest data for the host socket: sends what the socket accepts, keeps the rest.
    pub fn send_to_host<B: BitmapSlice>(
        &mut self,
        data: &VolatileSlice<'_, B>,
    ) -> Result<(), Reset> {
        let in_flight = self.to_host.len() + data.len();
        if in_flight > TX_BUFFER_SIZE as usize || self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Err(Reset::CreditExceeded);
        }
        let start = self.to_host.len();
        self.to_host.resize(in_flight, 0);
        data.copy_to(&mut self.to_host[start..]);
        self.flush()
    }

    /// Sends buffered guest data to the host socket until it would block.
    pub fn flush(&mut self) -> Result<(), Reset> {
        while !self.to_host.is_empty() {
            match send_nosignal(&self.stream, &self.to_host) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    // `n` is at most TX_BUFFER_SIZE.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Reset::Host(e)),
            }
        }
        if self.to_host.is_empty() && self.guest_shutdown & SHUTDOWN_SEND != 0 {
            // The guest will send no more and all it sent arrived: the host reads end of input.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Records the guest's `SHUTDOWN` flags (they only accumulate).
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<(), Reset> {
        self.guest_shutdown |= flags & SHUTDOWN_BOTH;
        self.flush()
    }

    /// The host reached end of input; the guest must be told with `SHUTDOWN(SEND)`.
    pub fn set_host_eof(&mut self) {
        self.host_eof = true;
    }

    /// Whether both sides are done: the guest shut down both directions and everything it sent
    /// reached the host. The connection then ends with a reset.
    pub fn finished(&self) -> bool {
        self.guest_shutdown == SHUTDOWN_BOTH && self.to_host.is_empty()
    }

    /// Reads host data into `buffer`, at most as much as the guest has credit for.
    pub fn read_for_guest<B: BitmapSlice>(&mut self, buffer: &VolatileSlice<'_, B>) -> HostRead {
        let max = (self.peer_credit_left() as usize).min(buffer.len());
        let Ok(mut window) = buffer.subslice(0, max) else {
            return HostRead::WouldBlock;
        };
        if max == 0 {
            return HostRead::WouldBlock;
        }
        match (&self.stream).read_volatile(&mut window) {
            Ok(0) => HostRead::Eof,
            Ok(n) => {
                // `n` is at most `max`, which came from a u32.
                self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                HostRead::Data(n as u32)
            }
            Err(VolatileMemoryError::IOError(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) =>
            {
                HostRead::WouldBlock
            }
            Err(VolatileMemoryError::IOError(e)) => HostRead::Failed(e),
            Err(e) => HostRead::Failed(io::Error::other(e.to_string())),
        }
    }

    /// The epoll events the host socket should be watched for. `rx_open` says whether the guest
    /// can take data now (the device is live and has receive buffers).
    pub fn interest(&self, rx_open: bool) -> EventSet {
        match self.state {
            // Only to notice a host client that gives up before the guest answers.
            State::Connecting => EventSet::READ_HANG_UP,
            State::Established => {
                let mut events = EventSet::empty();
                let guest_reads = self.guest_shutdown & SHUTDOWN_RCV == 0;
                if rx_open && guest_reads && !self.host_eof && self.peer_credit_left() > 0 {
                    events |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    events |= EventSet::OUT;
                }
                events
            }
        }
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer that went away yields `EPIPE` instead of killing the
/// embedding process with `SIGPIPE`.
pub fn send_nosignal(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe the readable slice `bytes`, and `stream` owns an
    // open socket for the duration of the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
