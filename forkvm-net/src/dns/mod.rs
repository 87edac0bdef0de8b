//! The DNS forwarder at the gateway's DNS address: parses the guest's query, answers from the
//! VM's static hosts map or through the [`Resolver`] on the network's worker threads, filters
//! the answer through the policy, pins what it gave, and builds a new response. The guest never
//! gets a byte-level path to the host's resolver.
//!
//! Answers, in the order they are decided:
//! - malformed (not one question, counts the packet cannot hold, a response, a question
//!   `simple-dns` cannot parse): dropped, no answer ([`DnsStats::malformed`]);
//! - another opcode or a class other than IN: NOTIMP;
//! - a name that is not a plain host name (labels of letters, digits, `-`, `_`) or that a C
//!   library could take for an IP address (any `inet_aton` form, or a numeric last label):
//!   NXDOMAIN, without resolving;
//! - a type other than A or AAAA: NOTIMP;
//! - a name in the hosts map: answered at once, unfiltered (the user wrote it);
//! - a name the policy does not allow: NXDOMAIN ([`DnsStats::denied_names`]);
//! - AAAA: NOERROR with no answers (the network is IPv4 only);
//! - A: resolved on a worker thread (never the event loop), at most [`MAX_IN_FLIGHT`] at once
//!   (more: SERVFAIL at once).
//!   When it comes back ([`DnsForwarder::take_answers`]): the name is checked again against the
//!   policy of that moment; not found or no address → NXDOMAIN; a resolver error → SERVFAIL;
//!   IPv6 addresses are left out (only IPv6 → NOERROR with no answers); addresses the rebinding
//!   filter ([`NetworkPolicy::answer_allowed`]) drops are counted, and when none remain the answer
//!   is NXDOMAIN, as if the name did not exist. The rest (at most [`MAX_ANSWER_ADDRESSES`]) are
//!   pinned for [`ANSWER_TTL`] and answered with that TTL.
//!
//! Answers copy the question and the id, set RA and copy RD, and carry no EDNS record (they fit
//! in 512 bytes). A resolver that never returns keeps its worker and its slot; the forwarder never
//! waits for it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use simple_dns::rdata::{A, RData};
use simple_dns::{
    CLASS, OPCODE, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE,
};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

use crate::policy::{DnsPins, NetworkPolicy, is_ip_literal, is_valid_name, normalize_name};
use crate::seams::Resolver;

#[cfg(test)]
mod tests;

/// TTL of the answers the forwarder gives (and of the pins they make).
pub const ANSWER_TTL: Duration = Duration::from_secs(60);
/// Queries resolving at once, per VM.
pub const MAX_IN_FLIGHT: usize = 16;
/// The most addresses one answer carries (so that it fits in 512 bytes with the longest name).
pub const MAX_ANSWER_ADDRESSES: usize = 8;

/// The most addresses of one resolver answer looked at (a name can have thousands).
const MAX_RESOLVED_ADDRESSES: usize = 64;
/// A DNS header's length.
const HEADER_LEN: usize = 12;
/// The smallest question: the root name, type and class.
const MIN_QUESTION_LEN: usize = 5;
/// The smallest resource record: the root name, type, class, TTL and rdata length.
const MIN_RECORD_LEN: usize = 11;

/// Counters of a forwarder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Queries received.
    pub queries: u64,
    /// Answered with addresses.
    pub answered: u64,
    /// Answered NXDOMAIN because the policy does not allow the name.
    pub denied_names: u64,
    /// Addresses dropped from answers by the rebinding filter.
    pub filtered_addresses: u64,
    /// Packets dropped as malformed (no answer).
    pub malformed: u64,
    /// Answered SERVFAIL at once because [`MAX_IN_FLIGHT`] queries were resolving.
    pub busy: u64,
}

/// A query waiting for its worker thread.
struct Pending {
    client: SocketAddrV4,
    query: Query,
}

/// What an answer needs from its query.
struct Query {
    id: u16,
    opcode: OPCODE,
    recursion_desired: bool,
    question: Question<'static>,
}

/// One VM's DNS forwarder.
pub struct DnsForwarder {
    resolver: Arc<dyn Resolver>,
    hosts: HashMap<String, Vec<IpAddr>>,
    event: Arc<EventFd>,
    sender: Sender<(u64, io::Result<Vec<IpAddr>>)>,
    receiver: Receiver<(u64, io::Result<Vec<IpAddr>>)>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    stats: DnsStats,
    /// The network's claim on the worker threads (`outside.rs`) that run the resolver and the
    /// network's other seams and callbacks.
    _workers: crate::outside::PoolUser,
}

impl DnsForwarder {
    /// A forwarder that answers names in `hosts` itself and asks `resolver` for the rest.
    pub fn new(
        resolver: Arc<dyn Resolver>,
        hosts: HashMap<String, Vec<IpAddr>>,
    ) -> io::Result<Self> {
        // The worker threads start from the first network's thread (`outside.rs`).
        let workers = crate::outside::user()?;
        let event = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?);
        let (sender, receiver) = channel();
        let hosts = hosts
            .into_iter()
            .map(|(name, addrs)| (normalize_name(&name), addrs))
            .collect();
        Ok(Self {
            resolver,
            hosts,
            event,
            sender,
            receiver,
            pending: HashMap::new(),
            next_token: 0,
            stats: DnsStats::default(),
            _workers: workers,
        })
    }

    /// A query (a UDP payload) from the guest at `client`. Returns the answer when it is known at
    /// once (hosts map, denied name, malformed → `None` and nothing later); otherwise the query
    /// is resolving and its answer comes from [`Self::take_answers`].
    pub fn query(
        &mut self,
        client: SocketAddrV4,
        packet: &[u8],
        policy: &NetworkPolicy,
        pins: &mut DnsPins,
        host_addrs: &[IpAddr],
        now: Instant,
    ) -> Option<Vec<u8>> {
        // The hosts map is the user's own: neither filtered nor checked against host addresses.
        let _ = host_addrs;
        self.stats.queries += 1;
        let Some(query) = parse(packet) else {
            self.stats.malformed += 1;
            return None;
        };
        if query.opcode != OPCODE::StandardQuery
            || query.question.qclass != QCLASS::CLASS(CLASS::IN)
        {
            return answer(&query, RCODE::NotImplemented, &[]);
        }
        let Some(name) = resolvable_name(&query.question) else {
            return answer(&query, RCODE::NameError, &[]);
        };
        let want_a = match query.question.qtype {
            QTYPE::TYPE(TYPE::A) => true,
            QTYPE::TYPE(TYPE::AAAA) => false,
            _ => return answer(&query, RCODE::NotImplemented, &[]),
        };
        if let Some(addrs) = self.hosts.get(&name) {
            if !want_a {
                return answer(&query, RCODE::NoError, &[]);
            }
            let mut addrs = ipv4_only(addrs);
            addrs.truncate(MAX_ANSWER_ADDRESSES);
            pins.pin(&name, &as_ips(&addrs), now + ANSWER_TTL);
            if !addrs.is_empty() {
                self.stats.answered += 1;
            }
            return answer(&query, RCODE::NoError, &addrs);
        }
        if !policy.name_allowed(&name) {
            self.stats.denied_names += 1;
            return answer(&query, RCODE::NameError, &[]);
        }
        if !want_a {
            return answer(&query, RCODE::NoError, &[]);
        }
        if self.pending.len() >= MAX_IN_FLIGHT {
            self.stats.busy += 1;
            return answer(&query, RCODE::ServerFailure, &[]);
        }
        match self.spawn(name) {
            Ok(token) => {
                self.pending.insert(token, Pending { client, query });
                None
            }
            Err(e) => {
                log::warn!("DNS forwarder: cannot hand the name to a worker thread: {e}");
                answer(&query, RCODE::ServerFailure, &[])
            }
        }
    }

    /// Readable when resolved answers wait in [`Self::take_answers`].
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// The answers resolved since the last call (consumes the event), filtered by `policy` and
    /// pinned in `pins`, each with the client it goes to.
    pub fn take_answers(
        &mut self,
        policy: &NetworkPolicy,
        pins: &mut DnsPins,
        host_addrs: &[IpAddr],
        now: Instant,
    ) -> Vec<(SocketAddrV4, Vec<u8>)> {
        // Consume the event first: a result sent after the drain below writes the event again.
        if let Err(e) = self.event.read()
            && e.kind() != io::ErrorKind::WouldBlock
        {
            log::warn!("DNS forwarder: reading its eventfd: {e}");
        }
        let mut answers = Vec::new();
        // At most one result per pending query is ever sent, so this ends.
        while let Ok((token, result)) = self.receiver.try_recv() {
            let Some(Pending { client, query }) = self.pending.remove(&token) else {
                continue;
            };
            if let Some(bytes) = self.resolved(&query, result, policy, pins, host_addrs, now) {
                answers.push((client, bytes));
            }
        }
        answers
    }

    /// Its counters.
    pub fn stats(&self) -> DnsStats {
        self.stats
    }

    /// Queries resolving now (at most [`MAX_IN_FLIGHT`]).
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Starts resolving `name` on one of the network's worker threads (`outside.rs`); its
    /// result comes back with the token.
    fn spawn(&mut self, name: String) -> io::Result<u64> {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let resolver = Arc::clone(&self.resolver);
        let sender = self.sender.clone();
        let event = Arc::clone(&self.event);
        crate::outside::submit(move || {
            let result = catch_unwind(AssertUnwindSafe(|| resolver.resolve(&name)))
                .unwrap_or_else(|_| Err(io::Error::other("the resolver panicked")));
            // The forwarder may be gone: then nobody waits for this answer.
            if sender.send((token, result)).is_ok() {
                let _ = event.write(1);
            }
        })?;
        Ok(token)
    }

    /// The answer to a query whose resolution ended with `result`.
    fn resolved(
        &mut self,
        query: &Query,
        result: io::Result<Vec<IpAddr>>,
        policy: &NetworkPolicy,
        pins: &mut DnsPins,
        host_addrs: &[IpAddr],
        now: Instant,
    ) -> Option<Vec<u8>> {
        let name = resolvable_name(&query.question)?;
        // The policy may have changed while the name was resolving.
        if !policy.name_allowed(&name) {
            self.stats.denied_names += 1;
            return answer(query, RCODE::NameError, &[]);
        }
        let addrs = match result {
            Ok(addrs) if addrs.is_empty() => return answer(query, RCODE::NameError, &[]),
            Ok(addrs) => addrs,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return answer(query, RCODE::NameError, &[]);
            }
            Err(e) => {
                log::debug!("DNS forwarder: resolving {name:?}: {e}");
                return answer(query, RCODE::ServerFailure, &[]);
            }
        };
        let v4 = ipv4_only(&addrs);
        if v4.is_empty() {
            return answer(query, RCODE::NoError, &[]);
        }
        let mut kept: Vec<Ipv4Addr> = v4
            .iter()
            .copied()
            .filter(|&ip| policy.answer_allowed(IpAddr::V4(ip), host_addrs))
            .collect();
        self.stats.filtered_addresses += (v4.len() - kept.len()) as u64;
        if kept.is_empty() {
            log::debug!("DNS forwarder: every address of {name:?} filtered (rebinding)");
            return answer(query, RCODE::NameError, &[]);
        }
        kept.truncate(MAX_ANSWER_ADDRESSES);
        pins.pin(&name, &as_ips(&kept), now + ANSWER_TTL);
        self.stats.answered += 1;
        answer(query, RCODE::NoError, &kept)
    }
}

/// The name in a query, lowercased and without a trailing dot, for logs and tests (`None` when
/// the forwarder would drop the packet as malformed, or the name is not printable ASCII).
pub fn parse_query_name(packet: &[u8]) -> Option<String> {
    question_name(&parse(packet)?.question)
}

/// `packet` parsed, when it is a plausible query: a header, exactly one question, no more records
/// than its length can hold, and not a response.
///
/// Only the header and the question go to the parser: the other sections (at most an EDNS record
/// in a query) are not needed, and leaving them out keeps the guest's bytes away from the record
/// parsers. A panic in the parser, which would be its bug, drops the packet.
fn parse(packet: &[u8]) -> Option<Query> {
    let header: &[u8; HEADER_LEN] = packet.get(..HEADER_LEN)?.try_into().ok()?;
    // The four counts follow the id and the flags; the indices are within the 12 bytes.
    let count = |at: usize| usize::from(u16::from_be_bytes([header[at], header[at + 1]]));
    let (questions, records) = (count(4), count(6) + count(8) + count(10));
    if questions != 1 || packet.len() - HEADER_LEN < MIN_QUESTION_LEN + records * MIN_RECORD_LEN {
        return None;
    }
    let mut question_only = packet.to_vec();
    if let Some(counts) = question_only.get_mut(6..HEADER_LEN) {
        counts.fill(0);
    }
    catch_unwind(|| {
        let parsed = Packet::parse(&question_only).ok()?;
        if parsed.has_flags(PacketFlag::RESPONSE) {
            return None;
        }
        Some(Query {
            id: parsed.id(),
            opcode: parsed.opcode(),
            recursion_desired: parsed.has_flags(PacketFlag::RECURSION_DESIRED),
            question: parsed.questions.into_iter().next()?.into_owned(),
        })
    })
    .ok()
    .flatten()
}

/// The question's name, lowercased and without a trailing dot, when its labels are printable
/// ASCII without dots inside them (a label holding a dot would read as two).
fn question_name(question: &Question<'_>) -> Option<String> {
    let mut text = String::new();
    for label in question.qname.get_labels() {
        let bytes: &[u8] = label.as_ref();
        if !bytes.iter().all(|b| b.is_ascii_graphic() && *b != b'.') {
            return None;
        }
        if !text.is_empty() {
            text.push('.');
        }
        text.extend(bytes.iter().map(|&b| char::from(b)));
    }
    Some(normalize_name(&text))
}

/// The question's name when it is one the forwarder resolves: a valid host name that no C
/// library could take for an IP address.
fn resolvable_name(question: &Question<'_>) -> Option<String> {
    question_name(question).filter(|name| is_valid_name(name) && !is_ip_literal(name))
}

/// The answer to `query` with `rcode` and A records for `addrs` (at most
/// [`MAX_ANSWER_ADDRESSES`]).
fn answer(query: &Query, rcode: RCODE, addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let mut reply = Packet::new_reply(query.id);
    *reply.opcode_mut() = query.opcode;
    *reply.rcode_mut() = rcode;
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.recursion_desired {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    reply.questions.push(query.question.clone());
    let ttl = u32::try_from(ANSWER_TTL.as_secs()).unwrap_or(u32::MAX);
    for &addr in addrs.iter().take(MAX_ANSWER_ADDRESSES) {
        reply.answers.push(ResourceRecord::new(
            query.question.qname.clone(),
            CLASS::IN,
            ttl,
            RData::A(A {
                address: u32::from(addr),
            }),
        ));
    }
    match reply.build_bytes_vec_compressed() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            log::warn!("DNS forwarder: cannot build an answer: {e}");
            None
        }
    }
}

/// The IPv4 addresses among the first [`MAX_RESOLVED_ADDRESSES`] of `addrs`, without repeats,
/// in order (IPv6 ones are left out).
fn ipv4_only(addrs: &[IpAddr]) -> Vec<Ipv4Addr> {
    let mut v4 = Vec::new();
    for addr in addrs.iter().take(MAX_RESOLVED_ADDRESSES) {
        if let IpAddr::V4(ip) = *addr
            && !v4.contains(&ip)
        {
            v4.push(ip);
        }
    }
    v4
}

fn as_ips(addrs: &[Ipv4Addr]) -> Vec<IpAddr> {
    addrs.iter().copied().map(IpAddr::V4).collect()
}
