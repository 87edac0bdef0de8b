//! The wire protocol between a forkvm host and `forkvm-agent`, the agent that runs as PID 1 inside
//! a forkvm Linux guest.
//!
//! # Transport
//!
//! The agent listens on vsock port [`AGENT_PORT`] (1024) of its guest; the host connects with
//! `Vm::vsock_connect(AGENT_PORT, ..)`. Once it listens, the agent prints [`READY_MARKER`] on its
//! console and, best effort, connects to the host (CID 2) on [`READY_PORT`] (1025), sends one
//! [`Reply::Ready`] control frame (id 0) and closes that connection. A host may also simply retry
//! connecting to [`AGENT_PORT`] until its `Hello` is answered.
//!
//! # Frames
//!
//! Everything on a connection, both ways, is a frame:
//!
//! ```text
//! offset 0  u32 LE  payload length (at most MAX_PAYLOAD = 1 MiB)
//! offset 4  u8      kind: 1 control, 2 data, 3 stderr, 4 eof
//! offset 5  u32 LE  request id
//! offset 9  ...     payload
//! ```
//!
//! * **control** ([`Kind::Control`]): the payload is one JSON object, a [`Request`] from the host
//!   (tagged by `"op"`) or a [`Reply`] from the agent (tagged by `"type"`).
//! * **data** ([`Kind::Data`]): raw bytes of a request's main stream. Host to agent: an exec's
//!   stdin, a file being written, PTY input. Agent to host: an exec's stdout, a file being read,
//!   PTY output.
//! * **stderr** ([`Kind::Stderr`]): raw bytes of an exec's stderr (agent to host only).
//! * **eof** ([`Kind::Eof`]): empty payload; the host has no more data for that request (closes an
//!   exec's stdin, completes a file write).
//!
//! A frame longer than [`MAX_PAYLOAD`], of an unknown kind, cut short by the end of the stream, or
//! a control frame that is not a valid message makes the agent send an [`Reply::Error`] (id 0 when
//! the frame could not be read) and close the connection. It then keeps serving its other
//! connections.
//!
//! # Requests and ids
//!
//! The host chooses the id of each request (any `u32` not in use on that connection by a request
//! still running or by an attached PTY session, else [`ErrorKind::DuplicateId`]; by convention
//! `Hello` uses 0, as do the agent's errors about frames it could not read), and every frame of
//! that request, both ways, carries it. An id is free again once its final reply has been sent. Any number of requests may run at once on one connection:
//! the agent serves each on its own thread and interleaves their frames. Input for a request
//! (data/eof frames) that the request does not consume yet is buffered up to [`INPUT_QUEUE`]
//! frames, after which the connection's input side waits for it; a host that streams input to
//! long-running requests which may stop reading (an exec's stdin) opens a connection for them.
//!
//! A request ends with exactly one final reply on its id, after all its data frames:
//!
//! | request | frames before the final reply | final reply |
//! |---|---|---|
//! | [`Request::Hello`] (the first request, and only then) | — | [`Reply::Hello`] |
//! | [`Request::Ping`] | — | [`Reply::Pong`] |
//! | [`Request::Exec`] | [`Reply::Started`], stdout as data, stderr as stderr frames (host: data/eof for stdin when `stdin` is set) | [`Reply::Exited`] |
//! | [`Request::Signal`] | — | [`Reply::Ok`] |
//! | [`Request::WriteFile`] | host: data frames, then eof | [`Reply::Written`] |
//! | [`Request::ReadFile`] | the contents as data frames | [`Reply::ReadDone`] |
//! | [`Request::Stat`] | — | [`Reply::Stat`] |
//! | [`Request::List`] | — | [`Reply::Entries`] |
//! | [`Request::Mkdir`], [`Request::Remove`], [`Request::Rename`] | — | [`Reply::Ok`] |
//! | [`Request::PtyOpen`], [`Request::PtyAttach`] | [`Reply::PtyOpened`] / [`Reply::PtyAttached`], then output as data frames (host: input as data frames) | [`Reply::PtyExited`], or none when the session is detached or closed |
//! | [`Request::PtyResize`], [`Request::PtyDetach`], [`Request::PtyClose`] | — | [`Reply::Ok`] |
//! | [`Request::Shutdown`] | — | [`Reply::Ok`], then the guest powers off or reboots |
//!
//! Any request may instead end with [`Reply::Error`]; for a file write that error may come before
//! the host has sent all its data, and the agent drops data for a request that has ended.
//! A PTY session attached elsewhere, or closed, gets no further frames on the old request id.
//!
//! **Hello and the VM generation.** Each connection starts with [`Request::Hello`] carrying the
//! protocol version, the VM's generation (0 at boot, +1 per fork or restore), at least
//! [`MIN_ENTROPY`] bytes of fresh host entropy and the host's wall-clock time. When the
//! generation differs from the last one the agent saw (or it has seen none), the agent first adds
//! the entropy to the kernel's pool (crediting it) and forces the CRNG to reseed, then steps
//! `CLOCK_REALTIME` to the host's time, and only then answers, with `reseeded: true`. A version
//! other than [`PROTOCOL_VERSION`] is refused with [`ErrorKind::Version`].
//!
//! **Exec.** A process group of its own; `timeout_ms` kills the group (SIGKILL) and reports
//! `timed_out`. [`Request::Signal`] signals the group of a running exec of the same connection.
//! When a connection closes, its running execs are killed. An exec (or PTY session) whose
//! program does not exist fails with [`ErrorKind::ProgramNotFound`]; one whose working directory
//! does not exist fails with [`ErrorKind::NotFound`].
//!
//! **PTY sessions** live in the agent independently of connections: a session's output produced
//! while no connection is attached is kept (the last [`PTY_BACKLOG`] bytes) and sent on attach.
//! [`Request::PtyDetach`] detaches, and so does closing the connection; [`Request::PtyAttach`] (from any connection) takes the
//! session over from a connection still attached. [`Request::PtyClose`] kills and forgets it.
//!
//! Paths and strings are UTF-8 (JSON); file names that are not are reported lossily.

use std::io::{self, ErrorKind as IoErrorKind, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version; [`Hello::version`] must equal it.
///
/// It changes whenever a message of one version could fail to decode in a peer of the previous
/// one (a new [`ErrorKind`], reply or required field: an unknown enum value fails the whole
/// message). Version 2 added [`ErrorKind::ProgramNotFound`], version 3 [`Request::PtyDetach`].
pub const PROTOCOL_VERSION: u32 = 3;
/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The host vsock port the agent sends its [`Reply::Ready`] to (best effort).
pub const READY_PORT: u32 = 1025;
/// The line the agent prints on its console once it listens.
pub const READY_MARKER: &str = "FORKVM-AGENT-READY";
/// The largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Size of a frame header: length, kind, id.
pub const HEADER_LEN: usize = 9;
/// The fewest bytes of entropy a [`Hello`] must carry.
pub const MIN_ENTROPY: usize = 32;
/// The most bytes of entropy a [`Hello`] may carry.
pub const MAX_ENTROPY: usize = 4096;
/// Input frames the agent buffers per request before the connection's input side waits.
pub const INPUT_QUEUE: usize = 16;
/// Output bytes a detached PTY session keeps for the next attach.
pub const PTY_BACKLOG: usize = 1 << 20;

/// What went wrong reading, writing or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The underlying stream failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream at a frame boundary.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes of the header or payload that arrived.
        got: usize,
        /// Bytes that were expected.
        expected: usize,
    },
    /// A frame announced a payload larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    Oversized {
        /// The announced length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A frame had a kind byte this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control payload was not valid JSON for the expected message.
    #[error("bad control message: {0}")]
    Json(#[from] serde_json::Error),
    /// A control message was expected but the frame is of another kind.
    #[error("expected a control frame, got {0:?}")]
    NotControl(Kind),
}

/// The kind of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A JSON [`Request`] or [`Reply`].
    Control = 1,
    /// Raw bytes of a request's main stream.
    Data = 2,
    /// Raw bytes of an exec's stderr.
    Stderr = 3,
    /// End of the host's data for a request.
    Eof = 4,
}

impl TryFrom<u8> for Kind {
    type Error = ProtocolError;

    fn try_from(byte: u8) -> Result<Self, Self::Error> {
        match byte {
            1 => Ok(Kind::Control),
            2 => Ok(Kind::Data),
            3 => Ok(Kind::Stderr),
            4 => Ok(Kind::Eof),
            other => Err(ProtocolError::UnknownKind(other)),
        }
    }
}

/// One frame: kind, request id, payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: Kind,
    /// The request the frame belongs to.
    pub id: u32,
    /// The payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A control frame holding `message` as JSON.
    pub fn control<T: Serialize>(id: u32, message: &T) -> Result<Frame, ProtocolError> {
        let payload = serde_json::to_vec(message)?;
        check_len(payload.len())?;
        Ok(Frame {
            kind: Kind::Control,
            id,
            payload,
        })
    }

    /// A data frame (split larger data with `chunks(MAX_PAYLOAD)`).
    pub fn data(id: u32, payload: Vec<u8>) -> Frame {
        Frame {
            kind: Kind::Data,
            id,
            payload,
        }
    }

    /// An eof frame.
    pub fn eof(id: u32) -> Frame {
        Frame {
            kind: Kind::Eof,
            id,
            payload: Vec::new(),
        }
    }

    /// Decodes a control frame's JSON payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        if self.kind != Kind::Control {
            return Err(ProtocolError::NotControl(self.kind));
        }
        Ok(serde_json::from_slice(&self.payload)?)
    }
}

fn check_len(len: usize) -> Result<(), ProtocolError> {
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::Oversized {
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == IoErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one frame. [`ProtocolError::Closed`] when the stream ends before its first byte.
///
/// The header is checked (kind, length) before the payload is read or allocated.
pub fn read_frame<R: Read + ?Sized>(reader: &mut R) -> Result<Frame, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header)?;
    if got == 0 {
        return Err(ProtocolError::Closed);
    }
    if got < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            got,
            expected: HEADER_LEN,
        });
    }
    let [l0, l1, l2, l3, kind, i0, i1, i2, i3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let kind = Kind::try_from(kind)?;
    check_len(len)?;
    let id = u32::from_le_bytes([i0, i1, i2, i3]);
    let mut payload = vec![0u8; len];
    let got = read_full(reader, &mut payload)?;
    if got < len {
        return Err(ProtocolError::Truncated { got, expected: len });
    }
    Ok(Frame { kind, id, payload })
}

/// Writes one frame from its parts (no copy of `payload`).
pub fn write_parts<W: Write + ?Sized>(
    writer: &mut W,
    kind: Kind,
    id: u32,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    check_len(payload.len())?;
    let mut header = [0u8; HEADER_LEN];
    // check_len bounds the length to MAX_PAYLOAD, which fits in a u32.
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4] = kind as u8;
    header[5..].copy_from_slice(&id.to_le_bytes());
    writer.write_all(&header)?;
    writer.write_all(payload)?;
    writer.flush()?;
    Ok(())
}

/// Writes one frame.
pub fn write_frame<W: Write + ?Sized>(writer: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    write_parts(writer, frame.kind, frame.id, &frame.payload)
}

/// Writes a control frame holding `message`.
pub fn write_control<W: Write + ?Sized, T: Serialize>(
    writer: &mut W,
    id: u32,
    message: &T,
) -> Result<(), ProtocolError> {
    write_frame(writer, &Frame::control(id, message)?)
}

/// The first request of every connection (id 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The host's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The VM's generation: 0 at boot, +1 per fork or restore.
    pub generation: u64,
    /// Fresh host entropy, [`MIN_ENTROPY`] to [`MAX_ENTROPY`] bytes.
    pub entropy: Vec<u8>,
    /// The host's wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

/// Runs a process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Variables to set, in order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Start from an empty environment instead of the agent's.
    #[serde(default)]
    pub clear_env: bool,
    /// Working directory (default: the agent's, `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user: a name from the guest's `/etc/passwd`, or `uid` or `uid:gid`.
    #[serde(default)]
    pub user: Option<String>,
    /// Stdin comes from the host's data frames (ended by eof); otherwise `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Writes a file from the data frames that follow, up to an eof frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// The file.
    pub path: String,
    /// Append to the file instead of truncating it.
    #[serde(default)]
    pub append: bool,
    /// Fail if the file exists.
    #[serde(default)]
    pub exclusive: bool,
    /// Permission bits when the file is created (default 0o644).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// Opens a PTY session running a program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyOpenRequest {
    /// The program and its arguments, as for [`ExecRequest::argv`].
    pub argv: Vec<String>,
    /// Variables to set (`TERM` defaults to `xterm-256color`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user, as for [`ExecRequest::user`].
    #[serde(default)]
    pub user: Option<String>,
    /// Terminal rows.
    pub rows: u16,
    /// Terminal columns.
    pub cols: u16,
}

/// What [`Request::Shutdown`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// `reboot(RB_POWER_OFF)`.
    PowerOff,
    /// `reboot(RB_AUTOBOOT)`; with `reboot=k` this ends a forkvm VM.
    Reboot,
}

/// A message from the host (control frame payload), tagged by `"op"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Opens the connection; see the crate docs.
    Hello(Hello),
    /// Health check.
    Ping,
    /// Runs a process.
    Exec(ExecRequest),
    /// Sends `signal` to the process group of the running exec `target` of this connection.
    Signal {
        /// The exec's request id.
        target: u32,
        /// The signal number.
        signal: i32,
    },
    /// Writes a file.
    WriteFile(WriteFileRequest),
    /// Reads a file, streamed as data frames.
    ReadFile {
        /// The file.
        path: String,
        /// Where to start.
        #[serde(default)]
        offset: u64,
        /// How many bytes at most (default: to the end).
        #[serde(default)]
        len: Option<u64>,
    },
    /// Metadata of a path (following symlinks).
    Stat {
        /// The path.
        path: String,
    },
    /// Entries of a directory, sorted by name.
    List {
        /// The directory.
        path: String,
    },
    /// Creates a directory.
    Mkdir {
        /// The directory.
        path: String,
        /// Create missing parents too, and succeed if it exists.
        #[serde(default)]
        parents: bool,
        /// Permission bits (default 0o755).
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Removes a file, symlink or empty directory.
    Remove {
        /// The path.
        path: String,
        /// Remove a directory with its contents.
        #[serde(default)]
        recursive: bool,
    },
    /// Renames a path.
    Rename {
        /// The old path.
        from: String,
        /// The new path.
        to: String,
    },
    /// Opens a PTY session, attached to this request.
    PtyOpen(PtyOpenRequest),
    /// Attaches an existing session to this request.
    PtyAttach {
        /// The session.
        session: u64,
    },
    /// Sets a session's terminal size.
    PtyResize {
        /// The session.
        session: u64,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Detaches a session attached to this connection (a session another connection took over
    /// stays attached there): its output from then on is kept
    /// for the next attach. (Closing the attached connection detaches too, but output the agent
    /// writes before it sees the close is lost; after this request's reply none is.)
    PtyDetach {
        /// The session.
        session: u64,
    },
    /// Kills a session's process group and forgets it.
    PtyClose {
        /// The session.
        session: u64,
    },
    /// Stops all processes, syncs and powers off or reboots (only when the agent is PID 1).
    Shutdown {
        /// Power off or reboot.
        action: PowerAction,
    },
}

/// How a process ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Its exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// The type of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, FIFO, socket).
    Other,
}

/// Metadata of a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Its type.
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Its name.
    pub name: String,
    /// Its type (symlinks not followed).
    pub file_type: FileType,
    /// Its size in bytes.
    pub size: u64,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A frame could not be read (unknown kind, truncated); the connection closes.
    BadFrame,
    /// A frame was larger than [`MAX_PAYLOAD`]; the connection closes.
    Oversized,
    /// A control frame was not a valid request; the connection closes.
    BadMessage,
    /// The first frame was not a `Hello`, or a second `Hello` came; the connection closes.
    NotHello,
    /// The `Hello`'s protocol version is not [`PROTOCOL_VERSION`]; the connection closes.
    Version,
    /// Reseeding the RNG or stepping the clock failed; the connection closes.
    Reseed,
    /// The request id is in use by a running request.
    DuplicateId,
    /// An argument is invalid (empty argv, unknown user, bad entropy length, ...).
    InvalidArgument,
    /// No such file, directory (an exec's or PTY's working directory), session or exec.
    NotFound,
    /// The program an exec or PTY session was to run (`argv[0]`) does not exist: no such file
    /// (or a path component is not a directory), or not found on `PATH`. A program that exists
    /// but whose interpreter or loader is missing is [`ErrorKind::NotFound`]. Since version 2.
    ProgramNotFound,
    /// The operation is not permitted.
    PermissionDenied,
    /// Another operating-system error (see `errno`).
    Io,
    /// The operation needs the agent to be PID 1.
    NotInit,
}

/// An error reply (also the error type of the agent's request handlers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ErrorReply {
    /// The class of error.
    pub kind: ErrorKind,
    /// A human-readable description.
    pub message: String,
    /// The OS error number, when there is one.
    #[serde(default)]
    pub errno: Option<i32>,
}

/// A message from the agent (control frame payload), tagged by `"type"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answers [`Request::Hello`].
    Hello {
        /// The agent's [`PROTOCOL_VERSION`].
        version: u32,
        /// The agent's name and version.
        agent: String,
        /// The generation the agent now knows.
        generation: u64,
        /// The RNG was reseeded and the clock stepped for this Hello.
        reseeded: bool,
    },
    /// Sent once to [`READY_PORT`] when the agent listens.
    Ready {
        /// The agent's [`PROTOCOL_VERSION`].
        version: u32,
        /// The agent's name and version.
        agent: String,
    },
    /// Answers [`Request::Ping`].
    Pong {
        /// Milliseconds since the agent started.
        uptime_ms: u64,
        /// Open PTY sessions.
        sessions: u64,
    },
    /// The request succeeded.
    Ok,
    /// An exec's process started.
    Started {
        /// Its pid.
        pid: u32,
    },
    /// An exec's process ended; all its output has been sent.
    Exited(ExitStatus),
    /// A file write finished.
    Written {
        /// Bytes written.
        bytes: u64,
    },
    /// A file read finished; all its data frames have been sent.
    ReadDone {
        /// Bytes sent.
        bytes: u64,
    },
    /// Answers [`Request::Stat`].
    Stat(FileStat),
    /// Answers [`Request::List`].
    Entries {
        /// The entries, sorted by name.
        entries: Vec<DirEntry>,
    },
    /// A PTY session was opened and is attached to this request.
    PtyOpened {
        /// The session id, for attach, resize and close.
        session: u64,
        /// The pid of its process.
        pid: u32,
    },
    /// A PTY session is attached to this request; its backlog follows as data frames.
    PtyAttached {
        /// The session id.
        session: u64,
    },
    /// An attached session's process ended (the session stays until closed).
    PtyExited {
        /// The session id.
        session: u64,
        /// How it ended.
        status: ExitStatus,
    },
    /// The request failed.
    Error(ErrorReply),
}
