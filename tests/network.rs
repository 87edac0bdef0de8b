//! forkvm's Linux image on a network, end to end: the kernel takes its address by DHCP from the
//! user-mode network (`ip=dhcp`, added by forkvm), the guest fetches pages from an HTTP server
//! this test runs on 127.0.0.1 (through the gateway, which the policy opens for the host's
//! loopback only, and by a name the VM's static DNS map gives the gateway's address), a denied destination fails fast
//! without a host socket ever being opened, a published port and `Vm::connect_tcp` reach a
//! server in the guest, and a fork with a flow open keeps the flow in the parent and resets it
//! in the child, after which both open new flows.
//!
//! No packet leaves this machine: the network opens host sockets only through a connector that
//! refuses (and records) every destination outside 127.0.0.0/8, and resolves names only from a
//! static map. One boot; guest ring 0 is emulated here, so timeouts are minutes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkvm::network::{Connector, DenyReason, HostConnector, Resolver, StaticResolver};
use forkvm::{ConsoleBuffer, ConsoleOutput, Network, NetworkPolicy, Vm};
use forkvm_agent_client::{Agent, Command, VmAgentExt};
use forkvm_tests::{linux_image_vm, start_linux_image};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The seccomp mode of the calling thread (`Seccomp:` in `/proc/thread-self/status`: 0 for none,
/// 2 for a filter), or the error reading it (a filtered forkvm thread may not open files).
fn seccomp_mode() -> Result<u32, String> {
    let status = std::fs::read_to_string("/proc/thread-self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Seccomp:"))
        .and_then(|mode| mode.trim().parse().ok())
        .ok_or_else(|| "no Seccomp line".to_owned())
}

/// Opens host sockets to 127.0.0.0/8 only; every other destination is refused and recorded,
/// and so is the seccomp mode of each thread it was called on.
#[derive(Default)]
struct LoopbackOnly {
    refused: Mutex<Vec<SocketAddr>>,
    modes: Mutex<Vec<Result<u32, String>>>,
}

impl LoopbackOnly {
    fn check(&self, to: SocketAddr) -> io::Result<()> {
        self.modes.lock().unwrap().push(seccomp_mode());
        if to.ip().is_loopback() {
            return Ok(());
        }
        self.refused.lock().unwrap().push(to);
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "test connector: not loopback",
        ))
    }
}

impl Connector for LoopbackOnly {
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        self.check(to)?;
        HostConnector.connect_tcp(to)
    }
    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
        self.check(to)?;
        HostConnector.connect_udp(to)
    }
}

/// Resolves from a static map, and records the seccomp mode of each thread it was called on.
struct RecordingResolver {
    names: StaticResolver,
    modes: Mutex<Vec<Result<u32, String>>>,
}

impl Resolver for RecordingResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        self.modes.lock().unwrap().push(seccomp_mode());
        self.names.resolve(name)
    }
}

/// A small HTTP server on 127.0.0.1: `/` answers a page; `/slow` sends one line, waits for a
/// signal, then sends another and closes. Serves until the test ends (bounded by the test).
fn http_server() -> (SocketAddr, Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (go, release): (Sender<()>, Receiver<()>) = channel();
    let release = Arc::new(Mutex::new(release));
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let release = release.clone();
            std::thread::spawn(move || {
                let mut request = String::new();
                let _ = BufReader::new(&stream).read_line(&mut request);
                if request.starts_with("GET /slow") {
                    let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\npart1\n");
                    let _ = stream.flush();
                    let _ = release.lock().unwrap().recv_timeout(GUEST_TIMEOUT);
                    let _ = stream.write_all(b"part2\n");
                } else {
                    let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello-from-host\n");
                }
            });
        }
    });
    (address, go)
}

fn python(agent: &Agent, code: &str) -> String {
    let out = agent
        .run(&Command::new(["python3", "-c", code]).timeout(GUEST_TIMEOUT))
        .unwrap();
    assert!(
        out.success(),
        "python failed: {}{}",
        out.stdout_text(),
        out.stderr_text()
    );
    out.stdout_text()
}

/// Waits until the guest file `path` contains `needle`; returns its content.
fn wait_for_file(agent: &Agent, path: &str, needle: &str) -> String {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        let text = String::from_utf8_lossy(&agent.read_file(path).unwrap_or_default()).into_owned();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends an HTTP/1.0 GET of `/` on `stream` and reads the answer to its end.
fn http_get(mut stream: impl Read + Write) -> io::Result<String> {
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_image_reaches_the_host_through_dhcp_dns_policy_published_ports_and_forks() {
    let (server, go) = http_server();
    let connector = Arc::new(LoopbackOnly::default());
    // Names resolve only from static maps: the VM's own (`Network::host`, which names the
    // gateway, the host as the guest sees it) and an empty resolver.
    let resolver = Arc::new(RecordingResolver {
        names: StaticResolver::new(),
        modes: Mutex::new(Vec::new()),
    });
    let policy = NetworkPolicy::public_internet().allow("127.0.0.1/32".parse().unwrap());
    let console = ConsoleBuffer::new();
    let builder = linux_image_vm(256, &console).network(
        Network::user()
            .policy(policy)
            .host("host.test", &[IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))])
            .seams(connector.clone(), resolver.clone()),
    );
    let (vm, agent) = start_linux_image(builder, &console, BOOT_TIMEOUT);
    let denials = Arc::new(Mutex::new(Vec::new()));
    let seen = denials.clone();
    vm.network().unwrap().on_denied(Box::new(move |flow| {
        seen.lock().unwrap().push((flow.reason, seccomp_mode()))
    }));

    // DHCP: the kernel took a lease and wrote the name server where resolv.conf points.
    let pnp = String::from_utf8_lossy(&agent.read_file("/proc/net/pnp").unwrap()).into_owned();
    assert!(
        pnp.contains("nameserver 10.0.2.3"),
        "{pnp}\n{}",
        console.text()
    );
    // The link's MTU (65,520 by default) reached the interface.
    let mtu = agent.read_file("/sys/class/net/eth0/mtu").unwrap();
    assert_eq!(String::from_utf8_lossy(&mtu).trim(), "65520");

    // The host's loopback through the gateway, by address and by name.
    let port = server.port();
    let fetch = |host: &str| {
        format!(
            "import urllib.request; print(urllib.request.urlopen('http://{host}:{port}/', timeout=60).read().decode(), end='')"
        )
    };
    let fetched = agent
        .run(&Command::new(["python3", "-c", &fetch("10.0.2.2")]).timeout(GUEST_TIMEOUT))
        .unwrap();
    assert_eq!(
        fetched.stdout_text(),
        "hello-from-host\n",
        "{}\n{:?}\nrefused: {:?}",
        fetched.stderr_text(),
        vm.network().unwrap().stats(),
        connector.refused.lock().unwrap()
    );
    assert_eq!(python(&agent, &fetch("host.test")), "hello-from-host\n");

    // The metadata address is denied at once, and no host socket was opened for it.
    let denied = python(
        &agent,
        "import socket\ntry:\n socket.create_connection(('169.254.169.254', 80), timeout=60)\n print('connected')\nexcept ConnectionRefusedError:\n print('refused')",
    );
    assert_eq!(denied, "refused\n");
    let stats = vm.network().unwrap().stats();
    assert!(
        stats
            .denied_by_reason
            .get(&DenyReason::Metadata)
            .copied()
            .unwrap_or(0)
            >= 1
    );
    assert!(connector.refused.lock().unwrap().is_empty());

    // A name outside the static map goes to the resolver (which knows nothing).
    let unknown = python(
        &agent,
        "import socket\ntry:\n socket.gethostbyname('unknown.test')\n print('found')\nexcept socket.gaierror:\n print('unknown')",
    );
    assert_eq!(unknown, "unknown\n");
    // The embedder's code (connector, resolver, denial callback) ran on threads without a
    // seccomp filter, never on the VM's event loop.
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while denials.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let denied = denials.lock().unwrap().clone();
    assert!(
        denied.contains(&(DenyReason::Metadata, Ok(0))),
        "{denied:?}"
    );
    for modes in [&connector.modes, &resolver.modes] {
        let modes = modes.lock().unwrap().clone();
        assert!(
            !modes.is_empty() && modes.iter().all(|m| *m == Ok(0)),
            "{modes:?}"
        );
    }

    // A server in the guest, reached through a published port and in-process.
    agent
        .run(&Command::new([
            "sh",
            "-c",
            "setsid python3 -m http.server 8000 --bind 0.0.0.0 >/tmp/http.log 2>&1 &",
        ]))
        .unwrap();
    let published = vm
        .network()
        .unwrap()
        .publish("127.0.0.1:0".parse().unwrap(), 8000)
        .unwrap();
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let page = loop {
        // Until the server listens, the guest refuses: the host side reads a reset.
        let page = TcpStream::connect(published)
            .and_then(http_get)
            .unwrap_or_default();
        if page.contains("200") || Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(page.contains("Directory listing"), "{page}");
    let page = http_get(vm.connect_tcp(8000).unwrap()).unwrap();
    assert!(page.contains("Directory listing"), "{page}");

    // A flow open across a fork: it completes in the parent and is reset in the child.
    let script = format!(
        "import socket\ns = socket.create_connection(('10.0.2.2', {port}), timeout=600)\ns.sendall(b'GET /slow HTTP/1.0\\r\\n\\r\\n')\nf = s.makefile('rb')\nout = open('/tmp/flow', 'w', buffering=1)\nwhile b'part1' not in f.readline(): pass\nout.write('part1\\n')\ntry:\n out.write('complete\\n' if b'part2' in f.read() else 'eof\\n')\nexcept ConnectionResetError:\n out.write('reset\\n')\n"
    );
    agent
        .write_file("/tmp/flow.py", script.as_bytes(), Default::default())
        .unwrap();
    agent
        .run(&Command::new([
            "sh",
            "-c",
            "setsid python3 /tmp/flow.py >/tmp/flow.err 2>&1 &",
        ]))
        .unwrap();
    let first = wait_for_file(&agent, "/tmp/flow", "part1");
    assert!(first.contains("part1"), "{first}");
    let child = vm.fork([ConsoleOutput::Discard]).unwrap().remove(0);
    go.send(()).unwrap();
    let parent_flow = wait_for_file(&agent, "/tmp/flow", "complete");
    assert!(parent_flow.contains("complete"), "{parent_flow}");
    let child_agent = child.agent(BOOT_TIMEOUT).unwrap();
    let child_flow = wait_for_file(&child_agent, "/tmp/flow", "reset");
    assert!(child_flow.contains("reset"), "{child_flow}");
    // Both open new flows.
    assert_eq!(python(&agent, &fetch("10.0.2.2")), "hello-from-host\n");
    assert_eq!(
        python(&child_agent, &fetch("10.0.2.2")),
        "hello-from-host\n"
    );
    assert!(connector.refused.lock().unwrap().is_empty());
    child.stop();
    vm.stop();
    let _: &Vm = &vm;
}
