//! The vsock wire format's constants (virtio 1.2 §5.10.6) and the control packets the device
//! sends to the guest. Packet parsing itself is `virtio-vsock`'s `VsockPacket`.

/// The host's CID: the destination of every packet a guest may send through this device.
pub const HOST_CID: u64 = 2;
/// The only socket type carried: stream.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// One side will no longer receive and/or send (see the `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// The sender's receive buffer space (`buf_alloc`, `fwd_cnt`) changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for an [`OP_CREDIT_UPDATE`].
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Ends of a connection: the host's port and the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host side (the destination of the guest's packets).
    pub local_port: u32,
    /// Port on the guest side (the source of the guest's packets).
    pub peer_port: u32,
}

/// A header-only packet the device owes the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// The connection it belongs to.
    pub key: ConnKey,
    /// One of the `OP_*` values other than [`OP_RW`].
    pub op: u16,
    /// Shutdown flags for [`OP_SHUTDOWN`], else 0.
    pub flags: u32,
}
