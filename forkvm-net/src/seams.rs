//! The two ways the network reaches outside the process: opening host sockets ([`Connector`]) and
//! resolving names ([`Resolver`]). Tests replace both, so that no test can send a packet off the
//! machine even when the code under test is wrong.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// Opens host sockets for the guest's flows. Every host socket the network opens comes from here,
/// after the policy allowed the exact destination.
pub trait Connector: Send + Sync {
    /// A non-blocking TCP socket whose connect to `to` has started (it may still be in
    /// progress: the caller waits for it to become writable and reads `SO_ERROR`).
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream>;
    /// A non-blocking UDP socket connected to `to`.
    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket>;

    /// Whether the VM's event loop may call this connector itself. `false` (the default): it
    /// is called on the network's worker threads, off the event loop's
    /// seccomp filter, and must return within [`CONNECT_CALL_LIMIT`] (the event loop waits for
    /// it; a later answer fails the flow). `true` only for code that makes just the socket
    /// calls of [`HostConnector`], which the event loop's filter allows.
    fn runs_on_event_loop(&self) -> bool {
        false
    }
}

/// How long a VM's event loop waits for a [`Connector`] that runs on the network's worker
/// threads.
pub const CONNECT_CALL_LIMIT: Duration = Duration::from_secs(1);

/// Opens a TCP socket to `to` through `connector`, on the event loop or on a worker.
pub(crate) fn connect_tcp(connector: &Arc<dyn Connector>, to: SocketAddr) -> io::Result<TcpStream> {
    if connector.runs_on_event_loop() {
        return connector.connect_tcp(to);
    }
    let connector = connector.clone();
    crate::outside::call(CONNECT_CALL_LIMIT, move || connector.connect_tcp(to))?
}

/// Opens a UDP socket to `to` through `connector`, on the event loop or on a worker.
pub(crate) fn connect_udp(connector: &Arc<dyn Connector>, to: SocketAddr) -> io::Result<UdpSocket> {
    if connector.runs_on_event_loop() {
        return connector.connect_udp(to);
    }
    let connector = connector.clone();
    crate::outside::call(CONNECT_CALL_LIMIT, move || connector.connect_udp(to))?
}

/// The real connector: ordinary host sockets.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostConnector;

impl Connector for HostConnector {
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&to.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(socket.into())
    }

    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(to), Type::DGRAM, None)?;
        socket.set_nonblocking(true)?;
        socket.connect(&to.into())?;
        Ok(socket.into())
    }

    fn runs_on_event_loop(&self) -> bool {
        true
    }
}

/// A connector that opens host sockets only to the host's loopback (127.0.0.0/8, ::1) through
/// `inner` and refuses every other destination, whatever the policy says: a network that can
/// reach services on this host and nothing beyond it (and a guard for tests that must never
/// send a packet off the machine, even when the code under test is wrong).
pub struct LoopbackOnly {
    inner: Arc<dyn Connector>,
}

impl LoopbackOnly {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Connector>) -> Self {
        Self { inner }
    }

    fn check(to: SocketAddr) -> io::Result<()> {
        if to.ip().is_loopback() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{to}: this network reaches the host's loopback only"),
            ))
        }
    }
}

impl Connector for LoopbackOnly {
    fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        Self::check(to)?;
        self.inner.connect_tcp(to)
    }

    fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
        Self::check(to)?;
        self.inner.connect_udp(to)
    }

    fn runs_on_event_loop(&self) -> bool {
        self.inner.runs_on_event_loop()
    }
}

/// Resolves names for the DNS forwarder. Called on the network's worker threads
/// (never on the event loop, so it may block and read files); never called
/// with a name that parses as an IP address.
pub trait Resolver: Send + Sync {
    /// The addresses of `name`; an empty list or `NotFound` when it has none.
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>>;
}

/// The host's resolver (the C library's, through the standard library).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostResolver;

impl Resolver for HostResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        Ok((name, 0)
            .to_socket_addrs()?
            .map(|address| address.ip())
            .collect())
    }
}

/// A resolver that answers from a fixed map only (for tests, and for users who pin names).
#[derive(Clone, Debug, Default)]
pub struct StaticResolver {
    names: HashMap<String, Vec<IpAddr>>,
}

impl StaticResolver {
    /// An empty map: every name is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name` with `addresses` (names compare without case and without a trailing dot).
    pub fn with(mut self, name: &str, addresses: &[IpAddr]) -> Self {
        self.names.insert(normalize(name), addresses.to_vec());
        self
    }
}

impl Resolver for StaticResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        self.names
            .get(&normalize(name))
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: unknown")))
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What a [`crate::UserNetwork`] uses to reach outside the process: the connector for host
/// sockets, the resolver for the DNS forwarder, and the VM's static names (answered by the
/// forwarder without asking the resolver).
#[derive(Clone)]
pub struct Seams {
    /// Opens every host socket.
    pub connector: Arc<dyn Connector>,
    /// Resolves every name the guest asks for (outside `hosts`).
    pub resolver: Arc<dyn Resolver>,
    /// Names answered from this map.
    pub hosts: HashMap<String, Vec<IpAddr>>,
}

impl Seams {
    /// The real ones: host sockets and the host's resolver, no static names.
    pub fn host() -> Self {
        Self {
            connector: Arc::new(HostConnector),
            resolver: Arc::new(HostResolver),
            hosts: HashMap::new(),
        }
    }
}

impl std::fmt::Debug for Seams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seams")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches it and refuses it all.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<SocketAddr>>);

    impl Connector for Recorder {
        fn connect_tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(to);
            Err(io::ErrorKind::Other.into())
        }
        fn connect_udp(&self, to: SocketAddr) -> io::Result<UdpSocket> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(to);
            Err(io::ErrorKind::Other.into())
        }
    }

    #[test]
    fn loopback_only_passes_loopback_and_refuses_the_rest() {
        let inner = Arc::new(Recorder::default());
        let guard = LoopbackOnly::new(inner.clone());
        for to in [
            "93.184.216.34:80",
            "10.0.0.1:80",
            "169.254.169.254:80",
            "[2001:db8::1]:80",
        ] {
            let to: SocketAddr = to.parse().unwrap();
            let refused = guard.connect_tcp(to).unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
            assert!(guard.connect_udp(to).is_err());
        }
        assert!(inner.0.lock().unwrap().is_empty());
        for to in ["127.0.0.1:80", "127.1.2.3:80", "[::1]:80"] {
            let _ = guard.connect_tcp(to.parse().unwrap());
        }
        assert_eq!(inner.0.lock().unwrap().len(), 3);
    }
}
