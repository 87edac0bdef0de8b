//! A test client for the agent: an agent served in-process over a Unix socket pair, with a fake
//! [`System`] that records the privileged calls.

#![allow(dead_code)] // Each test file uses its own part of this module.
// Test support: a broken test set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forkvm_agent::server::{Agent, Config, serve_connection};
use forkvm_agent::system::System;
use forkvm_agent_protocol::*;

/// A privileged call the agent made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Entropy(Vec<u8>),
    Reseed,
    Clock(u64),
    Power(PowerAction),
}

/// Records calls; can be told to fail entropy.
#[derive(Default)]
pub struct Fake {
    pub calls: Mutex<Vec<Call>>,
    pub fail_entropy: Mutex<bool>,
}

struct FakeSystem(Arc<Fake>);

impl System for FakeSystem {
    fn add_entropy(&self, entropy: &[u8]) -> std::io::Result<()> {
        if *self.0.fail_entropy.lock().unwrap() {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        self.0
            .calls
            .lock()
            .unwrap()
            .push(Call::Entropy(entropy.to_vec()));
        Ok(())
    }
    fn reseed_crng(&self) -> std::io::Result<()> {
        self.0.calls.lock().unwrap().push(Call::Reseed);
        Ok(())
    }
    fn set_clock(&self, time_ns: u64) -> std::io::Result<()> {
        self.0.calls.lock().unwrap().push(Call::Clock(time_ns));
        Ok(())
    }
    fn power(&self, action: PowerAction) -> std::io::Result<()> {
        self.0.calls.lock().unwrap().push(Call::Power(action));
        Ok(())
    }
}

/// An agent with a fake system.
pub fn agent(reap_all: bool, allow_shutdown: bool) -> (Arc<Agent>, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let agent = Agent::new(Config {
        system: Box::new(FakeSystem(Arc::clone(&fake))),
        reap_all,
        allow_shutdown,
    });
    (agent, fake)
}

/// Fresh test entropy.
pub fn entropy() -> Vec<u8> {
    (0..32u8).map(|i| i.wrapping_mul(37)).collect()
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// One connection to the agent.
pub struct Client {
    pub stream: UnixStream,
    /// The thread serving the connection (joined to check it did not panic).
    pub server: Option<JoinHandle<()>>,
    /// Frames read while waiting for another id.
    stash: Vec<Frame>,
}

/// Everything a request produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub replies: Vec<Reply>,
}

impl Outcome {
    pub fn last(&self) -> &Reply {
        self.replies.last().unwrap()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn exited(&self) -> ExitStatus {
        match self.last() {
            Reply::Exited(status) => *status,
            other => panic!(
                "not exited: {other:?} (stderr {:?})",
                String::from_utf8_lossy(&self.stderr)
            ),
        }
    }
    pub fn error(&self) -> ErrorReply {
        match self.last() {
            Reply::Error(e) => e.clone(),
            other => panic!("not an error: {other:?}"),
        }
    }
}

/// Whether `reply` ends the request it answers.
pub fn is_final(reply: &Reply) -> bool {
    !matches!(
        reply,
        Reply::Started { .. } | Reply::PtyOpened { .. } | Reply::PtyAttached { .. }
    )
}

impl Client {
    /// Connects without a hello.
    pub fn raw(agent: &Arc<Agent>) -> Client {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let agent = Arc::clone(agent);
        let server = thread::spawn(move || serve_connection(agent, theirs));
        Client {
            stream: ours,
            server: Some(server),
            stash: Vec::new(),
        }
    }

    /// Connects and says hello with `generation`.
    pub fn connect(agent: &Arc<Agent>, generation: u64) -> Client {
        let mut client = Client::raw(agent);
        let reply = client.hello(generation);
        assert!(matches!(reply, Reply::Hello { .. }), "{reply:?}");
        client
    }

    pub fn hello(&mut self, generation: u64) -> Reply {
        self.request(
            0,
            &Request::Hello(Hello {
                version: PROTOCOL_VERSION,
                generation,
                entropy: entropy(),
                time_ns: now_ns(),
            }),
        );
        self.next_reply(0)
    }

    pub fn send(&mut self, frame: &Frame) {
        write_frame(&mut self.stream, frame).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn request(&mut self, id: u32, request: &Request) {
        self.send(&Frame::control(id, request).unwrap());
    }

    pub fn data(&mut self, id: u32, bytes: &[u8]) {
        for chunk in bytes.chunks(MAX_PAYLOAD) {
            self.send(&Frame::data(id, chunk.to_vec()));
        }
    }

    pub fn eof(&mut self, id: u32) {
        self.send(&Frame::eof(id));
    }

    /// The next frame from the agent (any id).
    pub fn read(&mut self) -> Result<Frame, ProtocolError> {
        read_frame(&mut self.stream)
    }

    /// The next frame for `id`, keeping others for later.
    pub fn next_for(&mut self, id: u32) -> Frame {
        if let Some(i) = self.stash.iter().position(|f| f.id == id) {
            return self.stash.remove(i);
        }
        loop {
            let frame = self.read().unwrap();
            if frame.id == id {
                return frame;
            }
            self.stash.push(frame);
        }
    }

    /// The next control reply for `id`, skipping data.
    pub fn next_reply(&mut self, id: u32) -> Reply {
        loop {
            let frame = self.next_for(id);
            if frame.kind == Kind::Control {
                return frame.decode().unwrap();
            }
        }
    }

    /// Collects frames for `id` until its final reply.
    pub fn finish(&mut self, id: u32) -> Outcome {
        let mut outcome = Outcome::default();
        loop {
            let frame = self.next_for(id);
            match frame.kind {
                Kind::Data => outcome.stdout.extend(&frame.payload),
                Kind::Stderr => outcome.stderr.extend(&frame.payload),
                Kind::Control => {
                    let reply: Reply = frame.decode().unwrap();
                    let done = is_final(&reply);
                    outcome.replies.push(reply);
                    if done {
                        return outcome;
                    }
                }
                Kind::Eof => panic!("the agent sent eof"),
            }
        }
    }

    /// Runs a request to its end.
    pub fn call(&mut self, id: u32, request: &Request) -> Outcome {
        self.request(id, request);
        self.finish(id)
    }

    /// Runs `argv` (no stdin).
    pub fn exec(&mut self, id: u32, argv: &[&str]) -> Outcome {
        self.call(id, &exec_request(argv))
    }

    /// Expects the agent to close the connection (after any frames already sent), and the
    /// connection's thread to have ended without a panic.
    pub fn expect_closed(mut self) {
        loop {
            match self.read() {
                Ok(_) => {}
                Err(ProtocolError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        self.server
            .take()
            .unwrap()
            .join()
            .expect("connection thread panicked");
    }
}

pub fn exec_request(argv: &[&str]) -> Request {
    Request::Exec(ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..ExecRequest::default()
    })
}

/// Bytes from a simple deterministic generator.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A checksum good enough to compare files (FNV-1a).
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A fresh empty directory under the system temp directory.
pub fn temp_dir(name: &str) -> String {
    let dir = format!(
        "{}/forkvm-agent-{}-{name}",
        std::env::temp_dir().display(),
        std::process::id()
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
