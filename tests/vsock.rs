//! virtio-vsock end to end: the test guest's vsock modes against host programs on both sides of
//! the hybrid (Firecracker-style) Unix-socket host side and `Vm::vsock_connect`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use forkvm::{ConsoleBuffer, GuestExit, Vm, VsockConfig};
use forkvm_tests::{assert_exits_ok, test_guest_vm, wait_for_output};

const GUEST_CID: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(20);

/// A temporary directory for the Unix sockets, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("forkvm-vsock-{}-{n}-{name}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the test guest with `cmdline` and a vsock device (CID 3) listening at `uds` if given.
fn vsock_vm(cmdline: &str, uds: Option<&Path>, console: &ConsoleBuffer) -> Vm {
    let mut vsock = VsockConfig::new(GUEST_CID);
    if let Some(path) = uds {
        vsock = vsock.uds_path(path);
    }
    test_guest_vm(cmdline, console)
        .vsock(vsock)
        .build()
        .unwrap()
}

/// A pattern not periodic at any buffer size the device or guest uses.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
        .collect()
}

/// Writes `data` on a clone of `stream` from another thread while reading as many bytes back,
/// so neither direction waits for the other; returns what came back.
fn echo_roundtrip(stream: &UnixStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.to_vec();
    let sender = thread::spawn(move || writer.write_all(&to_send));
    let mut back = vec![0u8; data.len()];
    let mut reader = stream.try_clone().unwrap();
    reader.set_read_timeout(Some(TIMEOUT)).unwrap();
    reader.read_exact(&mut back).expect("read the echo");
    sender.join().unwrap().expect("send to the guest");
    back
}

/// The hybrid-vsock handshake on the device's Unix socket: `CONNECT <port>\n`, then `OK <n>\n`.
/// Returns the stream and the host-side port, or what the device answered instead.
fn uds_connect(uds: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut stream = UnixStream::connect(uds).expect("connect to the vsock Unix socket");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    // Byte by byte: whatever follows the line belongs to the guest's stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&line))),
        }
    }
    let line = String::from_utf8(line).unwrap();
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("unexpected reply {line:?}"))?;
    Ok((stream, host_port))
}

/// Starts a `vsock-listen` guest on `port` and waits until it listens.
fn listening_guest(port: u32, uds: Option<&Path>, console: &ConsoleBuffer) -> Vm {
    let vm = vsock_vm(
        &format!("mode=vsock-listen vsock_port={port}"),
        uds,
        console,
    );
    vm.start().unwrap();
    wait_for_output(console, &format!("vsock-listen: listening on port {port}"));
    vm
}

/// The guest's flow-control counters from its `<who>: credit_stalls=...` line.
fn credit_stats(text: &str, who: &str) -> (u32, u32, u32) {
    let prefix = format!("{who}: credit_stalls=");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no credit stats in:\n{text}"));
    let numbers: Vec<u32> = line
        .split(' ')
        .skip(1)
        .map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

/// Accepts one connection on `path` in a thread that waits `delay` before echoing everything
/// until end of input; the thread returns how many bytes it echoed.
fn echo_listener(path: PathBuf, delay: Duration) -> thread::JoinHandle<usize> {
    let listener = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        thread::sleep(delay);
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        loop {
            match stream.read(&mut buf).unwrap() {
                0 => return total,
                n => {
                    stream.write_all(&buf[..n]).unwrap();
                    total += n;
                }
            }
        }
    })
}

/// Runs a `vsock-connect` guest sending `bytes` to host port 5000, whose listener echoes after
/// `delay`; checks the echo and returns the guest's credit counters.
fn guest_connect_echo(bytes: usize, delay: Duration) -> (u32, u32, u32) {
    let dir = TempDir::new("connect");
    let uds = dir.join("v.sock");
    // The guest's connection to host port 5000 goes to `<uds>_5000`.
    let echo = echo_listener(dir.join("v.sock_5000"), delay);
    let console = ConsoleBuffer::new();
    let vm = vsock_vm(
        &format!("mode=vsock-connect vsock_port=5000 vsock_bytes={bytes}"),
        Some(&uds),
        &console,
    );
    vm.start().unwrap();
    assert_exits_ok(&vm, &console);
    let text = console.text();
    assert!(
        text.contains(&format!("vsock-connect: echo of {bytes} bytes intact")),
        "{text}"
    );
    assert!(
        text.contains("vsock-connect: peer answered the SHUTDOWN with RST"),
        "{text}"
    );
    assert!(text.contains("vsock-connect ok"), "{text}");
    // The guest's SHUTDOWN reached the host listener as end of input.
    assert_eq!(echo.join().unwrap(), bytes);
    credit_stats(&text, "vsock-connect")
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_connects_to_a_host_listener_and_its_300_kib_come_back_intact() {
    guest_connect_echo(300 << 10, Duration::ZERO);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_waits_for_credit_when_the_host_reads_late() {
    // The listener reads nothing for a while: the guest runs out of the device's credit
    // (128 KiB beyond what the host socket buffers) and must wait for CREDIT_UPDATE; then the
    // echo fills the guest's 64 KiB window faster than it can send, so it must hand out credit.
    let (stalls, sent, received) = guest_connect_echo(1 << 20, Duration::from_millis(300));
    eprintln!("guest credit stalls {stalls}, CREDIT_UPDATE sent {sent}, received {received}");
    assert!(stalls > 0, "the guest never ran out of credit");
    assert!(received > 0, "the device never sent CREDIT_UPDATE");
    assert!(sent > 0, "the guest never sent CREDIT_UPDATE");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn host_connects_through_the_unix_socket_and_gets_an_echo() {
    let dir = TempDir::new("uds");
    let uds = dir.join("v.sock");
    let console = ConsoleBuffer::new();
    let vm = listening_guest(1234, Some(&uds), &console);
    assert!(
        console.text().contains("vsock: guest cid 3"),
        "{}",
        console.text()
    );

    let (stream, host_port) = uds_connect(&uds, 1234).unwrap();
    assert!(host_port > 0);
    // More than the guest's 64 KiB receive buffer and the device's 128 KiB: credit both ways.
    let data = pattern(200 << 10);
    assert!(echo_roundtrip(&stream, &data) == data, "the echo differs");

    // Half-close: the guest sees SHUTDOWN, closes its side, and the host reads end of input.
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&stream).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_exits_ok(&vm, &console);
    let text = console.text();
    assert!(text.contains("vsock-listen: host shut down"), "{text}");
    assert!(text.contains("vsock-listen ok"), "{text}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn host_connects_in_process_and_closing_it_ends_the_guests_connection() {
    let console = ConsoleBuffer::new();
    let vm = listening_guest(77, None, &console);
    let stream = vm.vsock_connect(77, TIMEOUT).unwrap();
    let data = pattern(5000);
    assert!(echo_roundtrip(&stream, &data) == data, "the echo differs");

    // Closing the host end (no half-close) must end the guest's connection.
    drop(stream);
    assert_exits_ok(&vm, &console);
    let text = console.text();
    assert!(
        text.contains("vsock-listen: reset by the host")
            || text.contains("vsock-listen: host shut down"),
        "{text}"
    );
    assert!(text.contains(" 5000 bytes"), "{text}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_connecting_to_a_port_nobody_listens_on_is_refused() {
    let dir = TempDir::new("refused");
    let uds = dir.join("v.sock");
    let console = ConsoleBuffer::new();
    let vm = vsock_vm("mode=vsock-connect vsock_port=5999", Some(&uds), &console);
    vm.start().unwrap();
    assert_eq!(
        vm.wait().unwrap(),
        GuestExit::PoweredOff { status: Some(23) }, // EXIT_VSOCK_RESET
        "{}",
        console.text()
    );
    assert!(
        console.text().contains("connection refused (RST)"),
        "{}",
        console.text()
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn host_connecting_to_a_port_the_guest_does_not_listen_on_fails_cleanly() {
    let dir = TempDir::new("noport");
    let uds = dir.join("v.sock");
    let console = ConsoleBuffer::new();
    let vm = listening_guest(1234, Some(&uds), &console);

    // The guest answers the stray REQUEST with RST; both host paths report a failure.
    assert!(vm.vsock_connect(4321, TIMEOUT).is_err());
    let refused = uds_connect(&uds, 4321);
    assert!(refused.is_err(), "{refused:?}");

    // The guest still serves its own port.
    let stream = vm.vsock_connect(1234, TIMEOUT).unwrap();
    assert_eq!(echo_roundtrip(&stream, b"still there"), b"still there");
    stream.shutdown(Shutdown::Both).unwrap();
    drop(stream);
    assert_exits_ok(&vm, &console);
    assert!(
        console.text().contains("(no such connection)"),
        "{}",
        console.text()
    );
}
