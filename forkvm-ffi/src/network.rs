//! `forkvm_network`: a VM's network (`forkvm::Network`: the virtio-net device with forkvm's
//! user-mode network behind it) and its egress policy; the network calls of a running VM.

use std::collections::BTreeMap;
use std::ffi::c_char;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::IntoRawFd;
use std::sync::Mutex;

use forkvm::network::RuleTarget;
use forkvm::{Network, NetworkHandle, NetworkPolicy, Vm};

use crate::error::{Failure, ffi, forkvm_status};
use crate::handle::Registry;
use crate::vm::{VMS, forkvm_vm};
use crate::{out_arg, str_arg};

/// A VM's network configuration (`forkvm::Network` and its `NetworkPolicy`). Made by
/// `forkvm_network_new`, set with the `forkvm_network_*` functions, given to
/// `forkvm_builder_network`, a `forkvm_child` or `forkvm_vm_set_network_policy` (which copy it:
/// it stays the caller's), freed with `forkvm_network_free`. Thread-safe.
pub struct forkvm_network {
    _private: [u8; 0],
}

/// One rule of the policy, in the order given.
#[derive(Clone, Debug)]
enum Rule {
    Allow(RuleTarget),
    Deny(RuleTarget),
    Domain(String),
}

/// What a `forkvm_network` holds: the network without its policy and static names, the policy's
/// parts (kept apart so that `forkvm_network_deny_all` keeps the rules given before it) and the
/// names (so that `forkvm_network_host` adds an address to a name).
#[derive(Clone, Debug, Default)]
struct NetworkSpec {
    network: Network,
    deny_all: bool,
    rules: Vec<Rule>,
    hosts: BTreeMap<String, Vec<IpAddr>>,
}

impl NetworkSpec {
    fn policy(&self) -> Result<NetworkPolicy, Failure> {
        let base = if self.deny_all {
            NetworkPolicy::deny_all()
        } else {
            NetworkPolicy::public_internet()
        };
        self.rules.iter().try_fold(base, |policy, rule| match rule {
            Rule::Allow(target) => Ok(policy.allow_target(*target)),
            Rule::Deny(target) => Ok(policy.deny_target(*target)),
            Rule::Domain(name) => policy
                .allow_domain(name)
                .map_err(|e| Failure::invalid(e.to_string())),
        })
    }

    fn build(&self) -> Result<Network, Failure> {
        let network = self.network.clone().policy(self.policy()?);
        Ok(self
            .hosts
            .iter()
            .fold(network, |network, (name, ips)| network.host(name, ips)))
    }
}

static NETWORKS: Registry<Mutex<NetworkSpec>> = Registry::new("forkvm_network");

/// Changes the configuration behind `network` with `set` (which changes nothing when it fails).
fn with_network(
    network: *const forkvm_network,
    set: impl FnOnce(&mut NetworkSpec) -> Result<(), Failure>,
) -> forkvm_status {
    ffi(|| {
        let entry = NETWORKS.get(network)?;
        let mut spec = entry.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = spec.clone();
        set(&mut changed)?;
        *spec = changed;
        Ok(())
    })
}

/// The network `network` describes (required).
pub(crate) fn network_arg(network: *const forkvm_network) -> Result<Network, Failure> {
    let entry = NETWORKS.get(network)?;
    let spec = entry.lock().unwrap_or_else(|e| e.into_inner());
    spec.build()
}

fn rule_arg(rule: *const c_char) -> Result<RuleTarget, Failure> {
    let text = str_arg(rule, "rule")?;
    text.parse::<RuleTarget>()
        .map_err(|e| Failure::invalid(e.to_string()))
}

fn ip_arg(ip: *const c_char, what: &str) -> Result<IpAddr, Failure> {
    let text = str_arg(ip, what)?;
    text.parse()
        .map_err(|_| Failure::invalid(format!("{what} {text:?} is not an IP address")))
}

/// Makes a network with the defaults into `*out`: guest 10.0.2.15/24 by DHCP, gateway 10.0.2.2
/// (standing for the host), DNS 10.0.2.3; the policy "public internet" (nothing on this host or
/// its networks); no published ports.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_new(out: *mut *mut forkvm_network) -> forkvm_status {
    ffi(|| {
        *out_arg(out, "out")? = NETWORKS.insert(Mutex::new(NetworkSpec::default()));
        Ok(())
    })
}

/// Frees a network configuration (VMs built with it keep their copy); NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_free(network: *mut forkvm_network) -> forkvm_status {
    ffi(|| {
        if !network.is_null() {
            NETWORKS.remove(network)?;
        }
        Ok(())
    })
}

/// Adds a rule allowing `rule`: a CIDR (`"10.0.0.0/8"`; a bare address is a /32), optionally
/// with one protocol and its ports (`"127.0.0.1 tcp/8080"`, `"10.0.0.0/8 udp/5000-5999"`,
/// `"10.0.0.0/8 tcp"` for every TCP port, `"192.0.2.1 icmp"`). Rules are checked in the order
/// they were added, the first that matches decides; `"127.0.0.1/32"` opens the host's loopback
/// through the gateway 10.0.2.2. `FORKVM_ERR_INVALID_ARGUMENT` for a rule that does not parse.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_allow(
    network: *mut forkvm_network,
    rule: *const c_char,
) -> forkvm_status {
    with_network(network, |spec| {
        spec.rules.push(Rule::Allow(rule_arg(rule)?));
        Ok(())
    })
}

/// Adds a rule denying `rule` (written as for `forkvm_network_allow`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_deny(
    network: *mut forkvm_network,
    rule: *const c_char,
) -> forkvm_status {
    with_network(network, |spec| {
        spec.rules.push(Rule::Deny(rule_arg(rule)?));
        Ok(())
    })
}

/// Allows the domain `name` and its subdomains. Once a domain is allowed, only addresses that
/// answers for allowed names gave (or that an allow rule covers) are reachable.
/// `FORKVM_ERR_INVALID_ARGUMENT` for a name that is not a host name.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_allow_domain(
    network: *mut forkvm_network,
    name: *const c_char,
) -> forkvm_status {
    with_network(network, |spec| {
        let name = str_arg(name, "name")?;
        NetworkPolicy::default()
            .allow_domain(name)
            .map_err(|e| Failure::invalid(e.to_string()))?;
        spec.rules.push(Rule::Domain(name.to_owned()));
        Ok(())
    })
}

/// Lets the network open host sockets to the host's loopback only (127.0.0.0/8, ::1), whatever
/// its policy allows: a guest that may reach services on this host and nothing beyond it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_loopback_only(
    network: *mut forkvm_network,
) -> forkvm_status {
    with_network(network, |spec| {
        spec.network = spec.network.clone().loopback_only();
        Ok(())
    })
}

/// Denies all egress but what the rules allow (the default is the public internet).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_deny_all(network: *mut forkvm_network) -> forkvm_status {
    with_network(network, |spec| {
        spec.deny_all = true;
        Ok(())
    })
}

/// Publishes the guest's TCP `guest_port` on the host at `addr` (`"127.0.0.1"`), port
/// `host_port` (0 picks a free one: `forkvm_vm_publish` on the built VM returns the port it
/// binds). Bound when the VM is built.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_publish(
    network: *mut forkvm_network,
    addr: *const c_char,
    host_port: u16,
    guest_port: u16,
) -> forkvm_status {
    with_network(network, |spec| {
        let host = SocketAddr::new(ip_arg(addr, "addr")?, host_port);
        spec.network = spec.network.clone().publish(host, guest_port);
        Ok(())
    })
}

/// Answers the name `name` with the address `ip` in the VM's DNS (without asking the host's
/// resolver); call again to add addresses to the name (compared without case and trailing dot).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_network_host(
    network: *mut forkvm_network,
    name: *const c_char,
    ip: *const c_char,
) -> forkvm_status {
    with_network(network, |spec| {
        let name = str_arg(name, "name")?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = ip_arg(ip, "ip")?;
        spec.hosts.entry(name).or_default().push(ip);
        Ok(())
    })
}

/// The VM's network, or `FORKVM_ERR_NO_DEVICE`.
fn handle_of(vm: &Vm) -> Result<&NetworkHandle, Failure> {
    vm.network().ok_or_else(|| forkvm::Error::NoNetwork.into())
}

/// Connects to the guest's TCP `port` in-process (no host listener) through the VM's network:
/// `*fd` is a connected Unix stream socket the caller owns (close it to disconnect). When the
/// guest refuses (nothing listens), the socket reads end-of-file (or a reset) at once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_connect_tcp(
    vm: *const forkvm_vm,
    port: u16,
    fd: *mut i32,
) -> forkvm_status {
    ffi(|| {
        let fd = out_arg(fd, "fd")?;
        *fd = VMS.get(vm)?.connect_tcp(port)?.into_raw_fd();
        Ok(())
    })
}

/// Publishes the guest's TCP `guest_port` on the host at `addr` (`"127.0.0.1"`), port `port` (0
/// picks a free one); `*bound_port` (may be NULL) is the port bound.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_publish(
    vm: *const forkvm_vm,
    addr: *const c_char,
    port: u16,
    guest_port: u16,
    bound_port: *mut u16,
) -> forkvm_status {
    ffi(|| {
        let host = SocketAddr::new(ip_arg(addr, "addr")?, port);
        let vm = VMS.get(vm)?;
        let bound = handle_of(&vm)?
            .publish(host, guest_port)
            .map_err(|source| forkvm::Error::Publish { host, source })?;
        // SAFETY: an optional out-pointer: NULL or valid for writes for the call.
        if let Some(out) = unsafe { bound_port.as_mut() } {
            *out = bound.port();
        }
        Ok(())
    })
}

/// Stops publishing the port `forkvm_vm_publish` (or the network's configuration) bound at
/// `addr`, `port` (open connections stay). `FORKVM_ERR_IO` if nothing is published there.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_unpublish(
    vm: *const forkvm_vm,
    addr: *const c_char,
    port: u16,
) -> forkvm_status {
    ffi(|| {
        let host = SocketAddr::new(ip_arg(addr, "addr")?, port);
        let vm = VMS.get(vm)?;
        handle_of(&vm)?.unpublish(host).map_err(|e| {
            Failure::new(
                forkvm_status::FORKVM_ERR_IO,
                format!("cannot unpublish {host}: {e}"),
            )
        })
    })
}

/// Replaces the VM's egress policy with the one `network` holds (its allow, deny, domain and
/// deny-all settings; the rest of it is ignored). Flows opened from now on are judged by it;
/// open ones stay.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_set_network_policy(
    vm: *const forkvm_vm,
    network: *const forkvm_network,
) -> forkvm_status {
    ffi(|| {
        let policy = {
            let entry = NETWORKS.get(network)?;
            let spec = entry.lock().unwrap_or_else(|e| e.into_inner());
            spec.policy()?
        };
        let vm = VMS.get(vm)?;
        handle_of(&vm)?.set_policy(policy);
        Ok(())
    })
}

/// Counters of a VM's network (`forkvm::NetworkStats`), as of its event loop's last turn.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct forkvm_network_stats {
    /// Frames the guest sent.
    pub frames_from_guest: u64,
    /// Frames queued for the guest.
    pub frames_to_guest: u64,
    /// Frames dropped (unusable, or lost at a full queue).
    pub frames_dropped: u64,
    /// TCP flows open now.
    pub tcp_flows_open: u64,
    /// TCP flows opened in total (both directions).
    pub tcp_flows_total: u64,
    /// Guest connections reset without a policy decision (caps, failed host connects).
    pub tcp_rejected: u64,
    /// UDP flows open now.
    pub udp_flows_open: u64,
    /// UDP flows opened in total.
    pub udp_flows_total: u64,
    /// Flows the policy denied.
    pub denied_total: u64,
    /// Whether the network went down after an internal error.
    pub down: bool,
}

/// The VM's network counters, into `*stats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn forkvm_vm_network_stats(
    vm: *const forkvm_vm,
    stats: *mut forkvm_network_stats,
) -> forkvm_status {
    ffi(|| {
        let out = out_arg(stats, "stats")?;
        let vm = VMS.get(vm)?;
        let s = handle_of(&vm)?.stats();
        *out = forkvm_network_stats {
            frames_from_guest: s.frames_from_guest,
            frames_to_guest: s.frames_to_guest,
            frames_dropped: s.frames_dropped,
            tcp_flows_open: s.tcp_flows_open,
            tcp_flows_total: s.tcp_flows_total,
            tcp_rejected: s.tcp_rejected,
            udp_flows_open: s.udp_flows_open,
            udp_flows_total: s.udp_flows_total,
            denied_total: s.denied_total,
            down: s.down,
        };
        Ok(())
    })
}
