//! `forkvm.Network` (a VM's network: `forkvm::Network` and its `NetworkPolicy`) and the network
//! calls of a VM, which `forkvm.VM`'s methods forward to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::IntoRawFd;

use forkvm::network::{DenyReason, RuleTarget};
use forkvm::{Network, NetworkHandle, NetworkPolicy, Vm};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{HostIoError, InvalidArgumentError, vm_error};
use crate::limits::PyRateLimit;

/// A VM's network: a virtio-net device with forkvm's user-mode network behind it (no
/// privileges; the guest gets 10.0.2.15 by DHCP, the gateway 10.0.2.2 stands for the host).
///
/// `publish` maps host ports to guest TCP ports: `{8080: 80}` (on 127.0.0.1) or
/// `{("127.0.0.1", 0): 80}` (port 0 picks a free one: `VM.publish` returns what it binds).
/// The egress policy: the public internet (nothing on this host or its networks), or nothing
/// with `deny_all`; `allow` and `deny` are rules: a CIDR (`"127.0.0.1/32"` opens the host's
/// loopback through the gateway), optionally with one protocol and its ports (`"127.0.0.1
/// tcp/8080"`, `"10.0.0.0/8 udp/5000-5999"`, `"10.0.0.0/8 tcp"`, `"192.0.2.1 icmp"`); allow rules checked before deny rules, the first that matches
/// deciding; `allow_domains` limits egress to those names and their subdomains. `hosts` answers
/// names in the VM's DNS: `{"db": ["10.0.2.2"]}`. `loopback_only` lets it open host sockets to
/// the host's loopback only, whatever the policy allows. `rate_limit`: a `RateLimit` on what
/// the guest transmits, `rx_rate_limit` on what it receives (frames beyond it wait on the host
/// side; a fork child keeps its parent's limits, whatever network it is given).
#[pyclass(module = "forkvm", name = "Network", frozen)]
pub(crate) struct PyNetwork {
    pub(crate) network: Network,
}

#[pymethods]
impl PyNetwork {
    #[new]
    #[pyo3(signature = (
        *, publish = None, allow = Vec::new(), deny = Vec::new(), allow_domains = Vec::new(),
        deny_all = false, hosts = None, loopback_only = false, rate_limit = None,
        rx_rate_limit = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        publish: Option<&Bound<'_, PyDict>>,
        allow: Vec<String>,
        deny: Vec<String>,
        allow_domains: Vec<String>,
        deny_all: bool,
        hosts: Option<HashMap<String, Vec<String>>>,
        loopback_only: bool,
        rate_limit: Option<PyRateLimit>,
        rx_rate_limit: Option<PyRateLimit>,
    ) -> PyResult<Self> {
        let mut network = Network::user()
            .policy(policy(&allow, &deny, &allow_domains, deny_all)?)
            .rate_limit(crate::limits::rate_limit(rate_limit.as_ref()))
            .rx_rate_limit(crate::limits::rate_limit(rx_rate_limit.as_ref()));
        if loopback_only {
            network = network.loopback_only();
        }
        for (host, guest_port) in publish.into_iter().flat_map(|d| d.iter()) {
            let host = publish_address(&host)?;
            let guest_port = guest_port.extract::<u16>().map_err(|_| {
                PyTypeError::new_err("a published port maps to a guest port (an int)")
            })?;
            network = network.publish(host, guest_port);
        }
        for (name, addresses) in hosts.unwrap_or_default() {
            let addresses = addresses
                .iter()
                .map(|a| ip(a))
                .collect::<PyResult<Vec<_>>>()?;
            network = network.host(&name, &addresses);
        }
        Ok(Self { network })
    }
}

/// A published port's host address: a port (on 127.0.0.1) or a `(host, port)` pair.
fn publish_address(key: &Bound<'_, PyAny>) -> PyResult<SocketAddr> {
    if let Ok(port) = key.extract::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok((host, port)) = key.extract::<(String, u16)>() {
        return Ok(SocketAddr::new(ip(&host)?, port));
    }
    Err(PyTypeError::new_err(
        "a published port is a host port (int) or a (host, port) pair",
    ))
}

/// An IP address argument.
fn ip(text: &str) -> PyResult<IpAddr> {
    text.parse()
        .map_err(|_| InvalidArgumentError::new_err(format!("{text:?} is not an IP address")))
}

/// The policy the `allow`, `deny`, `allow_domains` and `deny_all` arguments describe.
pub(crate) fn policy(
    allow: &[String],
    deny: &[String],
    allow_domains: &[String],
    deny_all: bool,
) -> PyResult<NetworkPolicy> {
    let rule = |text: &String| {
        text.parse::<RuleTarget>()
            .map_err(|e| InvalidArgumentError::new_err(e.to_string()))
    };
    let mut policy = if deny_all {
        NetworkPolicy::deny_all()
    } else {
        NetworkPolicy::public_internet()
    };
    for text in allow {
        policy = policy.allow_target(rule(text)?);
    }
    for text in deny {
        policy = policy.deny_target(rule(text)?);
    }
    for name in allow_domains {
        policy = policy
            .allow_domain(name)
            .map_err(|e| InvalidArgumentError::new_err(e.to_string()))?;
    }
    Ok(policy)
}

/// The VM's network, or `NoDeviceError`.
fn handle(vm: &Vm) -> PyResult<&NetworkHandle> {
    vm.network()
        .ok_or_else(|| vm_error(forkvm::Error::NoNetwork))
}

/// `VM.connect_tcp`: a connected `socket.socket` to the guest's TCP `port`.
pub(crate) fn connect_tcp<'py>(py: Python<'py>, vm: &Vm, port: u16) -> PyResult<Bound<'py, PyAny>> {
    let fd = vm.connect_tcp(port).map_err(vm_error)?.into_raw_fd();
    let kwargs = PyDict::new(py);
    kwargs.set_item("fileno", fd)?;
    py.import("socket")?
        .getattr("socket")?
        .call((), Some(&kwargs))
}

/// `VM.publish`: the bound `(host, port)`.
pub(crate) fn publish(vm: &Vm, guest_port: u16, host: &str, port: u16) -> PyResult<(String, u16)> {
    let host = SocketAddr::new(ip(host)?, port);
    let bound = handle(vm)?
        .publish(host, guest_port)
        .map_err(|source| vm_error(forkvm::Error::Publish { host, source }))?;
    Ok((bound.ip().to_string(), bound.port()))
}

/// `VM.unpublish`.
pub(crate) fn unpublish(vm: &Vm, host: &str, port: u16) -> PyResult<()> {
    let host = SocketAddr::new(ip(host)?, port);
    handle(vm)?
        .unpublish(host)
        .map_err(|e| HostIoError::new_err(format!("cannot unpublish {host}: {e}")))
}

/// `VM.set_network_policy`.
pub(crate) fn set_policy(vm: &Vm, policy: NetworkPolicy) -> PyResult<()> {
    handle(vm)?.set_policy(policy);
    Ok(())
}

/// The name of a denial reason in `network_stats()["denied_by_reason"]`.
fn reason_name(reason: DenyReason) -> &'static str {
    match reason {
        DenyReason::Unspecified => "unspecified",
        DenyReason::Loopback => "loopback",
        DenyReason::Private => "private",
        DenyReason::LinkLocal => "link_local",
        DenyReason::Metadata => "metadata",
        DenyReason::SharedAddressSpace => "shared_address_space",
        DenyReason::Reserved => "reserved",
        DenyReason::HostAddress => "host_address",
        DenyReason::Rule => "rule",
        DenyReason::NotPinned => "not_pinned",
        DenyReason::DenyAll => "deny_all",
    }
}

/// `VM.network_stats`: the counters as a dict.
pub(crate) fn stats<'py>(py: Python<'py>, vm: &Vm) -> PyResult<Bound<'py, PyDict>> {
    let s = handle(vm)?.stats();
    let out = PyDict::new(py);
    for (key, value) in [
        ("frames_from_guest", s.frames_from_guest),
        ("frames_to_guest", s.frames_to_guest),
        ("frames_dropped", s.frames_dropped),
        ("tcp_flows_open", s.tcp_flows_open),
        ("tcp_flows_total", s.tcp_flows_total),
        ("tcp_rejected", s.tcp_rejected),
        ("udp_flows_open", s.udp_flows_open),
        ("udp_flows_total", s.udp_flows_total),
        ("denied_total", s.denied_total),
    ] {
        out.set_item(key, value)?;
    }
    let reasons = PyDict::new(py);
    for (reason, count) in &s.denied_by_reason {
        reasons.set_item(reason_name(*reason), count)?;
    }
    out.set_item("denied_by_reason", reasons)?;
    let dns = PyDict::new(py);
    for (key, value) in [
        ("queries", s.dns.queries),
        ("answered", s.dns.answered),
        ("denied_names", s.dns.denied_names),
        ("filtered_addresses", s.dns.filtered_addresses),
        ("malformed", s.dns.malformed),
        ("busy", s.dns.busy),
    ] {
        dns.set_item(key, value)?;
    }
    out.set_item("dns", dns)?;
    out.set_item("down", s.down)?;
    Ok(out)
}
