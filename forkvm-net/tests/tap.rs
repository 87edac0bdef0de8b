//! The TAP backend, inside a network namespace this test makes itself (so its packets stay in
//! it): a smoltcp "guest" behind the backend reaches a TCP server the namespace's kernel runs on
//! the TAP interface's address. Skipped, with a message, where a namespace or a TAP device
//! cannot be made (no CAP_SYS_ADMIN / CAP_NET_ADMIN, no /dev/net/tun).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use forkvm_devices::virtio::net::NetBackend;
use forkvm_net::TapBackend;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

/// The guest's side of the link: frames through the backend's methods, as the device moves them.
struct Link<'a>(&'a mut TapBackend);
struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut TapBackend);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.transmit(&frame);
        r
    }
}

impl phy::Device for Link<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        self.0.process();
        let frame = self.0.peek_receive()?.to_vec();
        self.0.consume_receive();
        Some((Rx(frame), Tx(self.0)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(self.0))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// Gives interface `name` the address `ip`/24 and brings it up (in this thread's namespace).
fn configure(name: &str, ip: Ipv4Addr) -> io::Result<()> {
    // SAFETY: a new socket or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let request = |address: Option<Ipv4Addr>| {
        // SAFETY: plain old data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (to, from) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *to = from as libc::c_char;
        }
        if let Some(address) = address {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(address).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in the sockaddr of the union (both 16 bytes).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (&sin as *const libc::sockaddr_in).cast::<u8>(),
                    (&mut ifr.ifr_ifru.ifru_addr as *mut libc::sockaddr).cast::<u8>(),
                    std::mem::size_of::<libc::sockaddr_in>(),
                );
            }
        }
        ifr
    };
    let ioctl = |op: libc::c_ulong, ifr: &mut libc::ifreq| {
        // SAFETY: each of these ioctls reads or writes one ifreq we own; the fd is open.
        if unsafe { libc::ioctl(socket.as_raw_fd(), op, ifr as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    ioctl(libc::SIOCSIFADDR, &mut request(Some(ip)))?;
    ioctl(
        libc::SIOCSIFNETMASK,
        &mut request(Some(Ipv4Addr::new(255, 255, 255, 0))),
    )?;
    let mut flags = request(None);
    ioctl(libc::SIOCGIFFLAGS, &mut flags)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { flags.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut flags)
}

#[test]
fn a_guest_on_a_tap_interface_reaches_its_namespace() {
    // The namespace is this thread's alone: the test runs in a thread of its own.
    let outcome = std::thread::spawn(|| -> Result<(), String> {
        // SAFETY: unshare changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            ));
        }
        let mut tap = TapBackend::open("fvtap0").map_err(|e| format!("TAP device: {e}"))?;
        configure("fvtap0", HOST).map_err(|e| format!("configuring fvtap0: {e}"))?;
        run(&mut tap);
        Ok(())
    })
    .join()
    .unwrap();
    if let Err(why) = outcome {
        // Straight to the process's stderr: the test harness does not capture that, so the skip
        // shows in a normal run.
        let _ = writeln!(
            io::stderr(),
            "SKIPPED a_guest_on_a_tap_interface_reaches_its_namespace: {why}"
        );
    }
}

fn run(tap: &mut TapBackend) {
    let listener = TcpListener::bind(SocketAddrV4::new(HOST, 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let mac = EthernetAddress([0x52, 0x54, 0x00, 0x09, 0x00, 0x02]);
    let epoch = Instant::now();
    let now = || smoltcp::time::Instant::from_micros(epoch.elapsed().as_micros() as i64);
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(mac)),
        &mut Link(tap),
        now(),
    );
    iface.update_ip_addrs(|a| a.push(IpCidr::new(GUEST.into(), 24)).unwrap());
    let mut sockets = SocketSet::new(Vec::new());
    let handle = sockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65536]),
        tcp::SocketBuffer::new(vec![0; 65536]),
    ));
    sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(iface.context(), (HOST, port), 40000)
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut server = None;
    let (mut sent, mut echoed) = (false, Vec::new());
    while echoed.len() < 11 {
        assert!(Instant::now() < deadline, "no echo through the TAP device");
        iface.poll(now(), &mut Link(tap), &mut sockets);
        if server.is_none()
            && let Ok((stream, peer)) = listener.accept()
        {
            assert_eq!(peer.ip(), std::net::IpAddr::V4(GUEST));
            stream.set_nonblocking(true).unwrap();
            server = Some(stream);
        }
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        if socket.may_send() && !sent {
            socket.send_slice(b"hello, tap!").unwrap();
            sent = true;
        }
        if let Some(stream) = server.as_mut() {
            let mut buffer = [0u8; 64];
            if let Ok(n) = stream.read(&mut buffer) {
                stream.write_all(&buffer[..n]).unwrap();
            }
        }
        if socket.can_recv() {
            socket
                .recv(|data| {
                    echoed.extend_from_slice(data);
                    (data.len(), ())
                })
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(echoed, b"hello, tap!");
    assert_eq!(tap.dropped(), 0);
}
