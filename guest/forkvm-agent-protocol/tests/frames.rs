//! The wire format: round trips of every message, fragmentation, bad and oversized frames.
// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{self, Cursor, Read};

use forkvm_agent_protocol::*;

fn all_requests() -> Vec<Request> {
    vec![
        Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            generation: 3,
            entropy: (0..32).collect(),
            time_ns: 1_700_000_000_123_456_789,
        }),
        Request::Ping,
        Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo \"hi\" ünïcode".into()],
            env: vec![("A".into(), "1".into()), ("B".into(), String::new())],
            clear_env: true,
            cwd: Some("/tmp".into()),
            user: Some("nobody".into()),
            stdin: true,
            timeout_ms: Some(1500),
        }),
        Request::Exec(ExecRequest {
            argv: vec!["true".into()],
            ..ExecRequest::default()
        }),
        Request::Signal {
            target: 9,
            signal: 15,
        },
        Request::WriteFile(WriteFileRequest {
            path: "/tmp/f".into(),
            append: true,
            exclusive: false,
            mode: Some(0o600),
        }),
        Request::ReadFile {
            path: "/etc/passwd".into(),
            offset: 10,
            len: Some(20),
        },
        Request::Stat { path: "/".into() },
        Request::List { path: "/".into() },
        Request::Mkdir {
            path: "/a/b".into(),
            parents: true,
            mode: None,
        },
        Request::Remove {
            path: "/a".into(),
            recursive: true,
        },
        Request::Rename {
            from: "/a".into(),
            to: "/b".into(),
        },
        Request::PtyOpen(PtyOpenRequest {
            argv: vec!["sh".into()],
            env: vec![],
            cwd: None,
            user: None,
            rows: 24,
            cols: 80,
        }),
        Request::PtyAttach { session: 4 },
        Request::PtyResize {
            session: 4,
            rows: 50,
            cols: 132,
        },
        Request::PtyClose { session: 4 },
        Request::Shutdown {
            action: PowerAction::PowerOff,
        },
        Request::Shutdown {
            action: PowerAction::Reboot,
        },
    ]
}

fn all_replies() -> Vec<Reply> {
    let status = ExitStatus {
        code: None,
        signal: Some(9),
        timed_out: true,
    };
    vec![
        Reply::Hello {
            version: 1,
            agent: "forkvm-agent 0.1.0".into(),
            generation: u64::MAX,
            reseeded: true,
        },
        Reply::Ready {
            version: 1,
            agent: "a".into(),
        },
        Reply::Pong {
            uptime_ms: 5,
            sessions: 2,
        },
        Reply::Ok,
        Reply::Started { pid: 42 },
        Reply::Exited(status),
        Reply::Exited(ExitStatus {
            code: Some(3),
            ..ExitStatus::default()
        }),
        Reply::Written { bytes: 1 << 40 },
        Reply::ReadDone { bytes: 0 },
        Reply::Stat(FileStat {
            file_type: FileType::Dir,
            size: 4096,
            mode: 0o1777,
            uid: 0,
            gid: 0,
            mtime_ns: -5,
        }),
        Reply::Entries {
            entries: vec![
                DirEntry {
                    name: "a".into(),
                    file_type: FileType::File,
                    size: 1,
                },
                DirEntry {
                    name: "l".into(),
                    file_type: FileType::Symlink,
                    size: 3,
                },
                DirEntry {
                    name: "p".into(),
                    file_type: FileType::Other,
                    size: 0,
                },
            ],
        },
        Reply::PtyOpened { session: 1, pid: 7 },
        Reply::PtyAttached { session: 1 },
        Reply::PtyExited { session: 1, status },
        Reply::Error(ErrorReply {
            kind: ErrorKind::NotFound,
            message: "no such file".into(),
            errno: Some(2),
        }),
        Reply::Error(ErrorReply {
            kind: ErrorKind::ProgramNotFound,
            message: "no such program".into(),
            errno: Some(2),
        }),
    ]
}

/// Encodes frames back to back.
fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for frame in frames {
        write_frame(&mut bytes, frame).unwrap();
    }
    bytes
}

fn decode_all(reader: &mut impl Read) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        match read_frame(reader) {
            Ok(frame) => frames.push(frame),
            Err(ProtocolError::Closed) => return frames,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn every_message_round_trips() {
    for (id, request) in all_requests().into_iter().enumerate() {
        let frame = Frame::control(id as u32, &request).unwrap();
        let bytes = encode(std::slice::from_ref(&frame));
        let back = read_frame(&mut Cursor::new(bytes)).unwrap();
        assert_eq!(back, frame);
        assert_eq!(back.decode::<Request>().unwrap(), request);
    }
    for (id, reply) in all_replies().into_iter().enumerate() {
        let frame = Frame::control(id as u32, &reply).unwrap();
        let back = read_frame(&mut Cursor::new(encode(&[frame]))).unwrap();
        assert_eq!(back.id, id as u32);
        assert_eq!(back.decode::<Reply>().unwrap(), reply);
    }
}

#[test]
fn wire_layout_is_as_documented() {
    let bytes = encode(&[Frame::data(0x0102_0304, b"hi".to_vec())]);
    assert_eq!(bytes, [2, 0, 0, 0, 2, 4, 3, 2, 1, b'h', b'i']);
    let bytes = encode(&[Frame::eof(1)]);
    assert_eq!(bytes, [0, 0, 0, 0, 4, 1, 0, 0, 0]);
    let mut stderr = Vec::new();
    write_parts(&mut stderr, Kind::Stderr, 2, b"e").unwrap();
    assert_eq!(stderr, [1, 0, 0, 0, 3, 2, 0, 0, 0, b'e']);
    let ping = Frame::control(0, &Request::Ping).unwrap();
    assert_eq!(ping.payload, br#"{"op":"ping"}"#);
    let ok = Frame::control(0, &Reply::Ok).unwrap();
    assert_eq!(ok.payload, br#"{"type":"ok"}"#);
    let missing = Reply::Error(ErrorReply {
        kind: ErrorKind::ProgramNotFound,
        message: "m".into(),
        errno: None,
    });
    assert_eq!(
        Frame::control(0, &missing).unwrap().payload,
        br#"{"type":"error","kind":"program_not_found","message":"m","errno":null}"#
    );
    // An error kind this version does not know fails the whole reply: a new kind needs a new
    // PROTOCOL_VERSION.
    assert!(
        serde_json::from_str::<Reply>(r#"{"type":"error","kind":"newer_kind","message":"m"}"#)
            .is_err()
    );
    // Optional fields may be left out.
    let exec: Request = serde_json::from_str(r#"{"op":"exec","argv":["ls"]}"#).unwrap();
    assert_eq!(
        exec,
        Request::Exec(ExecRequest {
            argv: vec!["ls".into()],
            ..ExecRequest::default()
        })
    );
}

/// Hands out the underlying bytes split at the given offsets, one piece per read.
struct Pieces {
    data: Vec<u8>,
    cuts: Vec<usize>,
    pos: usize,
    interrupt: bool,
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.interrupt {
            self.interrupt = false;
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.interrupt = true;
        let end = self
            .cuts
            .iter()
            .copied()
            .find(|&cut| cut > self.pos)
            .unwrap_or(self.data.len())
            .min(self.pos + buf.len())
            .min(self.data.len());
        let n = end - self.pos;
        buf[..n].copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(n)
    }
}

#[test]
fn frames_split_anywhere_are_reassembled() {
    let frames = vec![
        Frame::control(1, &Request::Ping).unwrap(),
        Frame::data(1, (0..=255).collect()),
        Frame::eof(1),
        Frame::control(2, &all_replies()[9]).unwrap(),
        Frame::data(3, Vec::new()),
    ];
    let bytes = encode(&frames);
    // One cut at every byte offset, and two cuts at every pair of offsets a few bytes apart.
    for cut in 0..=bytes.len() {
        for second in [cut + 1, cut + 5, cut + 9] {
            let mut reader = Pieces {
                data: bytes.clone(),
                cuts: vec![cut, second],
                pos: 0,
                interrupt: false,
            };
            assert_eq!(decode_all(&mut reader), frames, "cut at {cut} and {second}");
        }
    }
    // One byte per read.
    let mut reader = Pieces {
        data: bytes.clone(),
        cuts: (1..bytes.len()).collect(),
        pos: 0,
        interrupt: true,
    };
    assert_eq!(decode_all(&mut reader), frames);
}

#[test]
fn end_of_stream_is_closed_at_a_boundary_and_truncated_inside_a_frame() {
    assert!(matches!(
        read_frame(&mut Cursor::new(Vec::new())),
        Err(ProtocolError::Closed)
    ));
    let bytes = encode(&[Frame::data(5, b"hello".to_vec())]);
    for len in 1..bytes.len() {
        let err = read_frame(&mut Cursor::new(&bytes[..len])).unwrap_err();
        let expected = if len < HEADER_LEN {
            (len, HEADER_LEN)
        } else {
            (len - HEADER_LEN, 5)
        };
        match err {
            ProtocolError::Truncated { got, expected: e } => assert_eq!((got, e), expected),
            other => panic!("{len}: {other}"),
        }
    }
}

#[test]
fn unknown_kinds_are_refused() {
    for kind in [0u8, 5, 200, 255] {
        let mut bytes = encode(&[Frame::data(1, b"x".to_vec())]);
        bytes[4] = kind;
        match read_frame(&mut Cursor::new(bytes)) {
            Err(ProtocolError::UnknownKind(k)) => assert_eq!(k, kind),
            other => panic!("{other:?}"),
        }
    }
}

/// A reader that fails the test if more than the header is read.
struct HeaderOnly(Cursor<Vec<u8>>);

impl Read for HeaderOnly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(
            self.0.position() < HEADER_LEN as u64,
            "read past the header"
        );
        let n = buf.len().min(HEADER_LEN - self.0.position() as usize);
        self.0.read(&mut buf[..n])
    }
}

#[test]
fn oversized_frames_are_refused_before_their_payload() {
    for len in [MAX_PAYLOAD as u32 + 1, u32::MAX] {
        let mut header = len.to_le_bytes().to_vec();
        header.extend([Kind::Data as u8, 0, 0, 0, 0]);
        match read_frame(&mut HeaderOnly(Cursor::new(header))) {
            Err(ProtocolError::Oversized { len: l, max }) => {
                assert_eq!((l, max), (len as usize, MAX_PAYLOAD));
            }
            other => panic!("{other:?}"),
        }
    }
    // The largest frame is fine.
    let big = Frame::data(1, vec![7; MAX_PAYLOAD]);
    let back = read_frame(&mut Cursor::new(encode(std::slice::from_ref(&big)))).unwrap();
    assert_eq!(back, big);
    // Nor can one be written or built.
    let mut sink = Vec::new();
    assert!(matches!(
        write_parts(&mut sink, Kind::Data, 1, &vec![0; MAX_PAYLOAD + 1]),
        Err(ProtocolError::Oversized { .. })
    ));
    assert!(sink.is_empty());
    let huge = Request::Stat {
        path: "x".repeat(MAX_PAYLOAD),
    };
    assert!(matches!(
        Frame::control(1, &huge),
        Err(ProtocolError::Oversized { .. })
    ));
}

#[test]
fn bad_control_payloads_are_errors() {
    for payload in [
        &b"not json"[..],
        br#"{"op":"no_such_op"}"#,
        br#"{"op":"exec"}"#,
        br#"{"op":"exec","argv":"ls"}"#,
        br#"{"op":"signal","target":-1,"signal":9}"#,
        br#"{"op":"pty_resize","session":1,"rows":70000,"cols":1}"#,
        b"\xff\xfe",
        b"",
    ] {
        let frame = Frame {
            kind: Kind::Control,
            id: 1,
            payload: payload.to_vec(),
        };
        assert!(
            matches!(frame.decode::<Request>(), Err(ProtocolError::Json(_))),
            "{payload:?}"
        );
    }
    assert!(matches!(
        Frame::data(1, br#"{"op":"ping"}"#.to_vec()).decode::<Request>(),
        Err(ProtocolError::NotControl(Kind::Data))
    ));
}
