//! A VM's network (`forkvm::Network`: a virtio-net device with forkvm's user-mode network behind
//! it) from JS options, and the VM's network methods.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::IntoRawFd;

use forkvm::network::{DenyReason, RuleTarget};
use forkvm::{Network, NetworkHandle, NetworkPolicy};
use napi::{Env, JsObject};
use napi_derive::napi;

use crate::error::{Failure, Outcome, sync};
use crate::task::spawn_run;
use crate::vm::VM;

/// A VM's egress policy: the public internet (nothing on this host or its networks), or
/// nothing with `denyAll`. `allow` and `deny` are rules: a CIDR (`'127.0.0.1/32'` opens the
/// host's loopback through the gateway 10.0.2.2), optionally with one protocol and its ports
/// (`'127.0.0.1 tcp/8080'`, `'10.0.0.0/8 udp/5000-5999'`, `'10.0.0.0/8 tcp'`, `'192.0.2.1
/// icmp'`); allow rules are checked before deny rules, the first that matches deciding. `allowDomains` limits egress to those names and their subdomains.
#[napi(object)]
pub struct NetworkPolicyOptions {
    /// Rules to allow (`'10.0.0.0/8'`, a bare address is a /32; `'127.0.0.1 tcp/8080'`).
    pub allow: Option<Vec<String>>,
    /// Rules to deny (written as for `allow`).
    pub deny: Option<Vec<String>>,
    /// Domains (and their subdomains) the guest may reach; none: any.
    pub allow_domains: Option<Vec<String>>,
    /// Deny all egress but what `allow` and `allowDomains` open.
    pub deny_all: Option<bool>,
}

/// A VM's network (`{}` for the defaults: guest 10.0.2.15 by DHCP, gateway 10.0.2.2 standing
/// for the host, DNS 10.0.2.3, the public internet, no published ports).
#[napi(object)]
pub struct NetworkOptions {
    /// Host ports published to guest TCP ports: `{ 8080: 80 }` (on 127.0.0.1) or
    /// `{ '127.0.0.1:0': 80 }` (port 0 picks a free one: `vm.publish` returns what it binds).
    pub publish: Option<HashMap<String, f64>>,
    /// CIDRs to allow (see `NetworkPolicyOptions`).
    pub allow: Option<Vec<String>>,
    /// CIDRs to deny.
    pub deny: Option<Vec<String>>,
    /// Domains (and their subdomains) the guest may reach.
    pub allow_domains: Option<Vec<String>>,
    /// Deny all egress but what `allow` and `allowDomains` open.
    pub deny_all: Option<bool>,
    /// Names the VM's DNS answers itself: `{ db: ['10.0.2.2'] }`.
    pub hosts: Option<HashMap<String, Vec<String>>>,
    /// Open host sockets to the host's loopback only, whatever the policy allows.
    pub loopback_only: Option<bool>,
    /// A limit on what the guest transmits (a fork child keeps its parent's and ignores this).
    pub rate_limit: Option<crate::limits::RateLimit>,
    /// A limit on what the guest receives (frames beyond it wait on the host side).
    pub rx_rate_limit: Option<crate::limits::RateLimit>,
}

/// An IP address argument.
fn ip(text: &str) -> Outcome<IpAddr> {
    text.parse()
        .map_err(|_| Failure::invalid(format!("{text:?} is not an IP address")))
}

/// A port argument.
fn port(value: f64, what: &str) -> Outcome<u16> {
    crate::convert::u16_arg(value, what)
}

/// The policy the options describe.
fn policy(
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    allow_domains: Option<Vec<String>>,
    deny_all: Option<bool>,
) -> Outcome<NetworkPolicy> {
    let rule = |text: &String| {
        text.parse::<RuleTarget>()
            .map_err(|e| Failure::invalid(e.to_string()))
    };
    let mut policy = if deny_all.unwrap_or(false) {
        NetworkPolicy::deny_all()
    } else {
        NetworkPolicy::public_internet()
    };
    for text in allow.unwrap_or_default() {
        policy = policy.allow_target(rule(&text)?);
    }
    for text in deny.unwrap_or_default() {
        policy = policy.deny_target(rule(&text)?);
    }
    for name in allow_domains.unwrap_or_default() {
        policy = policy
            .allow_domain(&name)
            .map_err(|e| Failure::invalid(e.to_string()))?;
    }
    Ok(policy)
}

/// A published port's host address: `'8080'` (on 127.0.0.1) or `'ADDR:PORT'`.
fn publish_address(key: &str) -> Outcome<SocketAddr> {
    if let Ok(port) = key.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    key.parse().map_err(|_| {
        Failure::invalid(format!(
            "published port {key:?}: want a port or 'ADDR:PORT'"
        ))
    })
}

/// The network `options` describe.
pub(crate) fn network(options: NetworkOptions) -> Outcome<Network> {
    let mut network = Network::user().policy(policy(
        options.allow,
        options.deny,
        options.allow_domains,
        options.deny_all,
    )?);
    for (key, guest_port) in options.publish.unwrap_or_default() {
        network = network.publish(
            publish_address(&key)?,
            port(guest_port, &format!("publish[{key:?}]"))?,
        );
    }
    for (name, addresses) in options.hosts.unwrap_or_default() {
        let addresses = addresses
            .iter()
            .map(|a| ip(a))
            .collect::<Outcome<Vec<_>>>()?;
        network = network.host(&name, &addresses);
    }
    if options.loopback_only.unwrap_or(false) {
        network = network.loopback_only();
    }
    Ok(network
        .rate_limit(crate::limits::rate_limit(
            options.rate_limit,
            "network.rateLimit",
        )?)
        .rx_rate_limit(crate::limits::rate_limit(
            options.rx_rate_limit,
            "network.rxRateLimit",
        )?))
}

/// Where `vm.publish` bound.
#[napi(object)]
pub struct Published {
    /// The host address.
    pub host: String,
    /// The port.
    pub port: u32,
}

/// The DNS forwarder's counters.
#[napi(object)]
pub struct DnsStats {
    /// Queries from the guest.
    pub queries: f64,
    /// Queries answered.
    pub answered: f64,
    /// Names the policy refused.
    pub denied_names: f64,
    /// Addresses dropped from answers (rebinding).
    pub filtered_addresses: f64,
    /// Malformed queries.
    pub malformed: f64,
    /// Queries dropped with too many in flight.
    pub busy: f64,
}

/// A VM's network counters, as of its event loop's last turn.
#[napi(object)]
pub struct NetworkStats {
    /// Frames the guest sent.
    pub frames_from_guest: f64,
    /// Frames queued for the guest.
    pub frames_to_guest: f64,
    /// Frames dropped (unusable, or lost at a full queue).
    pub frames_dropped: f64,
    /// TCP flows open now.
    pub tcp_flows_open: f64,
    /// TCP flows opened in total (both directions).
    pub tcp_flows_total: f64,
    /// Guest connections reset without a policy decision (caps, failed host connects).
    pub tcp_rejected: f64,
    /// UDP flows open now.
    pub udp_flows_open: f64,
    /// UDP flows opened in total.
    pub udp_flows_total: f64,
    /// Flows the policy denied.
    pub denied_total: f64,
    /// The same by reason (`loopback`, `private`, `metadata`, `rule`, `denyAll`, ...).
    pub denied_by_reason: HashMap<String, f64>,
    /// The DNS forwarder's counters.
    pub dns: DnsStats,
    /// Whether the network went down after an internal error.
    pub down: bool,
}

/// The name of a denial reason in `deniedByReason`.
fn reason_name(reason: DenyReason) -> &'static str {
    match reason {
        DenyReason::Unspecified => "unspecified",
        DenyReason::Loopback => "loopback",
        DenyReason::Private => "private",
        DenyReason::LinkLocal => "linkLocal",
        DenyReason::Metadata => "metadata",
        DenyReason::SharedAddressSpace => "sharedAddressSpace",
        DenyReason::Reserved => "reserved",
        DenyReason::HostAddress => "hostAddress",
        DenyReason::Rule => "rule",
        DenyReason::NotPinned => "notPinned",
        DenyReason::DenyAll => "denyAll",
    }
}

/// The VM's network, or a `NO_DEVICE` failure.
fn handle(vm: &forkvm::Vm) -> Outcome<&NetworkHandle> {
    vm.network().ok_or_else(|| forkvm::Error::NoNetwork.into())
}

#[napi]
impl VM {
    /// Connects to the guest's TCP `port` in-process through its network (no host listener);
    /// resolves with the stream's file descriptor, which the caller owns. `index.js` makes it
    /// `connectTcp`, resolving with a `net.Socket`. When nothing listens in the guest, the
    /// stream ends at once.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn connect_tcp_fd(&self, env: Env, port: f64) -> napi::Result<JsObject> {
        let vm = self.get();
        let guest_port = self::port(port, "port");
        spawn_run(env, move || Ok(vm?.connect_tcp(guest_port?)?.into_raw_fd()))
    }

    /// Publishes the guest's TCP `guestPort` on the host at `host` (default `'127.0.0.1'`),
    /// `port` (default 0: a free one); returns where it bound.
    #[napi]
    pub fn publish(
        &self,
        env: Env,
        guest_port: f64,
        host: Option<String>,
        port: Option<f64>,
    ) -> napi::Result<Published> {
        sync(env, || {
            let host = SocketAddr::new(
                ip(host.as_deref().unwrap_or("127.0.0.1"))?,
                self::port(port.unwrap_or(0.0), "port")?,
            );
            let guest_port = self::port(guest_port, "guestPort")?;
            let vm = self.get()?;
            let bound = handle(&vm)?
                .publish(host, guest_port)
                .map_err(|source| forkvm::Error::Publish { host, source })?;
            Ok(Published {
                host: bound.ip().to_string(),
                port: bound.port().into(),
            })
        })
    }

    /// Stops publishing what `publish` bound at `host` (default `'127.0.0.1'`), `port` (open
    /// connections stay).
    #[napi]
    pub fn unpublish(&self, env: Env, port: f64, host: Option<String>) -> napi::Result<()> {
        sync(env, || {
            let host = SocketAddr::new(
                ip(host.as_deref().unwrap_or("127.0.0.1"))?,
                self::port(port, "port")?,
            );
            let vm = self.get()?;
            handle(&vm)?
                .unpublish(host)
                .map_err(|e| Failure::new("IO", format!("cannot unpublish {host}: {e}")))
        })
    }

    /// Replaces the network's egress policy; flows opened from now on are judged by it.
    #[napi]
    pub fn set_network_policy(&self, env: Env, policy: NetworkPolicyOptions) -> napi::Result<()> {
        sync(env, || {
            let policy = self::policy(
                policy.allow,
                policy.deny,
                policy.allow_domains,
                policy.deny_all,
            )?;
            let vm = self.get()?;
            handle(&vm)?.set_policy(policy);
            Ok(())
        })
    }

    /// The network's counters.
    #[napi]
    pub fn network_stats(&self, env: Env) -> napi::Result<NetworkStats> {
        sync(env, || {
            let vm = self.get()?;
            let s = handle(&vm)?.stats();
            Ok(NetworkStats {
                frames_from_guest: s.frames_from_guest as f64,
                frames_to_guest: s.frames_to_guest as f64,
                frames_dropped: s.frames_dropped as f64,
                tcp_flows_open: s.tcp_flows_open as f64,
                tcp_flows_total: s.tcp_flows_total as f64,
                tcp_rejected: s.tcp_rejected as f64,
                udp_flows_open: s.udp_flows_open as f64,
                udp_flows_total: s.udp_flows_total as f64,
                denied_total: s.denied_total as f64,
                denied_by_reason: s
                    .denied_by_reason
                    .iter()
                    .map(|(reason, count)| (reason_name(*reason).to_owned(), *count as f64))
                    .collect(),
                dns: DnsStats {
                    queries: s.dns.queries as f64,
                    answered: s.dns.answered as f64,
                    denied_names: s.dns.denied_names as f64,
                    filtered_addresses: s.dns.filtered_addresses as f64,
                    malformed: s.dns.malformed as f64,
                    busy: s.dns.busy as f64,
                },
                down: s.down,
            })
        })
    }
}
