//! The real privileged calls, and the binary itself serving over a Unix socket.
// Test helpers: a broken set-up panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use forkvm_agent::system::{RealSystem, System};
use forkvm_agent_protocol::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn real_entropy_calls_need_privilege() {
    let entropy = vec![0x5a; MIN_ENTROPY];
    let added = RealSystem.add_entropy(&entropy);
    let reseeded = RealSystem.reseed_crng();
    if is_root() {
        added.unwrap();
        reseeded.unwrap();
    } else {
        assert_eq!(added.unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert_eq!(reseeded.unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
    // Stepping the clock is only exercised through the fake system (agent.rs): doing it for
    // real would step this machine's clock.
}

#[test]
fn the_binary_serves_a_unix_socket() {
    let dir = temp_dir("binary");
    let path = format!("{dir}/agent.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_forkvm-agent"))
        .args(["--unix", &path])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with(READY_MARKER), "{line:?}");
    assert!(line.contains(&format!("unix={path}")), "{line:?}");
    // A hello that cannot reseed (wrong version), so that this host's RNG and clock are left
    // alone; the binary answers it, then serves another connection.
    for _ in 0..2 {
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let hello = Request::Hello(Hello {
            version: PROTOCOL_VERSION + 100,
            generation: 0,
            entropy: entropy(),
            time_ns: now_ns(),
        });
        write_control(&mut stream, 0, &hello).unwrap();
        match read_frame(&mut stream).unwrap().decode::<Reply>().unwrap() {
            Reply::Error(e) => assert_eq!(e.kind, ErrorKind::Version),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_frame(&mut stream),
            Err(ProtocolError::Closed)
        ));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let usage = Command::new(env!("CARGO_BIN_EXE_forkvm-agent"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage"));
}
