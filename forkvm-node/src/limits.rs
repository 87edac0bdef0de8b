//! What limits a VM: rate limits (`forkvm::RateLimit`, `docs/rate-limits.md`) from and to JS,
//! the seccomp policy by name and the denials counted (`docs/seccomp.md`), and the options of a
//! restore (`forkvm::LoadOptions`).

use forkvm::SeccompPolicy;
use napi::Env;
use napi_derive::napi;

use crate::convert;
use crate::error::{Failure, Outcome, sync};

/// One token bucket: `size` tokens (bytes or requests), refilled from empty in
/// `refillTimeMs`, plus `oneTimeBurst` tokens given once at the start. A size or refill time
/// of 0 is refused (`INVALID_ARGUMENT`).
#[napi(object)]
pub struct Bucket {
    /// The most tokens it holds (at least 1).
    pub size: f64,
    /// Milliseconds an empty bucket takes to fill (at least 1).
    pub refill_time_ms: f64,
    /// Extra tokens available once, before the bucket's own (default 0).
    pub one_time_burst: Option<f64>,
}

/// A virtio device's rate limit: a bucket on the `bytes` it moves and one on the requests
/// (`ops`) it serves; an absent bucket limits nothing (`{}` is no limit).
#[napi(object)]
pub struct RateLimit {
    /// Bytes between guest memory and the host.
    pub bytes: Option<Bucket>,
    /// Requests (descriptor chains) served.
    pub ops: Option<Bucket>,
}

fn bucket(b: Bucket, what: &str) -> Outcome<forkvm::Bucket> {
    let size = convert::whole(b.size, &format!("{what}.size"), u64::MAX)?;
    let refill = convert::millis(b.refill_time_ms, &format!("{what}.refillTimeMs"))?;
    let burst = b.one_time_burst.map_or(Ok(0), |burst| {
        convert::whole(burst, &format!("{what}.oneTimeBurst"), u64::MAX)
    })?;
    let bucket = forkvm::Bucket::new(size, refill).with_one_time_burst(burst);
    forkvm::RateLimit {
        bytes: Some(bucket),
        ops: None,
    }
    .check()
    .map_err(|e| Failure::invalid(format!("{what}: {e}")))?;
    Ok(bucket)
}

/// The Rust limit of the JS `limit` (absent: none), checked, for the argument `what`.
pub(crate) fn rate_limit(limit: Option<RateLimit>, what: &str) -> Outcome<forkvm::RateLimit> {
    let Some(limit) = limit else {
        return Ok(forkvm::RateLimit::unlimited());
    };
    Ok(forkvm::RateLimit {
        bytes: limit
            .bytes
            .map(|b| bucket(b, &format!("{what}.bytes")))
            .transpose()?,
        ops: limit
            .ops
            .map(|b| bucket(b, &format!("{what}.ops")))
            .transpose()?,
    })
}

/// The JS form of a Rust limit.
pub(crate) fn rate_limit_to_js(limit: forkvm::RateLimit) -> RateLimit {
    let to_js = |b: forkvm::Bucket| Bucket {
        size: b.size as f64,
        refill_time_ms: b.refill_time.as_secs_f64() * 1e3,
        one_time_burst: Some(b.one_time_burst as f64),
    };
    RateLimit {
        bytes: limit.bytes.map(to_js),
        ops: limit.ops.map(to_js),
    }
}

/// The seccomp policies by their JS names.
const POLICIES: [(&str, SeccompPolicy); 4] = [
    ("deny", SeccompPolicy::Deny),
    ("killThread", SeccompPolicy::KillThread),
    ("killProcess", SeccompPolicy::KillProcess),
    ("off", SeccompPolicy::Off),
];

/// The policy `name` names, for the argument `what`.
pub(crate) fn seccomp_policy_arg(name: &str, what: &str) -> Outcome<SeccompPolicy> {
    POLICIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .ok_or_else(|| {
            Failure::invalid(format!(
                "{what}: unknown seccomp policy {name:?} ('deny', 'killThread', 'killProcess' or 'off')"
            ))
        })
}

/// Sets the seccomp policy (`'deny'`, the default, `'killThread'`, `'killProcess'` or
/// `'off'`) of the threads forkvm starts from now on for the whole process and of VMs built
/// without `seccomp`; threads running keep theirs.
#[napi]
pub fn set_seccomp_policy(
    env: Env,
    #[napi(ts_arg_type = "'deny' | 'killThread' | 'killProcess' | 'off'")] policy: String,
) -> napi::Result<()> {
    sync(env, || {
        forkvm::set_seccomp_policy(seccomp_policy_arg(&policy, "policy")?);
        Ok(())
    })
}

/// The process-wide seccomp policy (`setSeccompPolicy`).
#[napi(ts_return_type = "'deny' | 'killThread' | 'killProcess' | 'off'")]
pub fn seccomp_policy() -> &'static str {
    let policy = forkvm::seccomp_policy();
    POLICIES
        .iter()
        .find(|(_, p)| *p == policy)
        .map_or("deny", |(n, _)| n)
}

/// The seccomp denials counted in this process: system calls of forkvm's threads outside
/// their allowlist, each of which failed with `EPERM`.
#[napi(object)]
pub struct SeccompDenials {
    /// All denied calls.
    pub total: f64,
    /// Denied on vCPU threads.
    pub vcpu: f64,
    /// Denied on event-loop threads (and the DNS threads they start).
    pub event_loop: f64,
    /// Denied on the threads preparing children.
    pub prepare: f64,
    /// Denied on the reaper's threads.
    pub reaper: f64,
    /// The number of the last denied system call (x86-64), if any.
    pub last_syscall: Option<f64>,
    /// Threads that run unfiltered because the kernel refused their filter.
    pub install_failures: f64,
}

/// The seccomp denials counted so far.
#[napi]
pub fn seccomp_denials() -> SeccompDenials {
    let d = forkvm::seccomp_denials();
    SeccompDenials {
        total: d.total as f64,
        vcpu: d.vcpu as f64,
        event_loop: d.event_loop as f64,
        prepare: d.prepare as f64,
        reaper: d.reaper as f64,
        last_syscall: d.last_syscall.map(|n| n as f64),
        install_failures: d.install_failures as f64,
    }
}

/// How `VM.restore` reads the snapshot.
#[napi(object)]
pub struct RestoreOptions {
    /// Read the memory and disk files whole and check them against their checksums (a damaged
    /// one rejects with `SNAPSHOT`); costs a read of every byte.
    pub verify_data: Option<bool>,
    /// Copy the memory rather than map the file, so that nothing done to it later (a
    /// truncation, a write) reaches the VM; costs a copy.
    pub copy_memory: Option<bool>,
}

/// The load options `options` ask for, or `None` for a plain restore.
pub(crate) fn load_options(options: Option<RestoreOptions>) -> Option<forkvm::LoadOptions> {
    let options = options?;
    let (verify, copy) = (
        options.verify_data.unwrap_or(false),
        options.copy_memory.unwrap_or(false),
    );
    (verify || copy).then(|| {
        forkvm::LoadOptions::new()
            .verify_data(verify)
            .copy_memory(copy)
    })
}

/// A kick signal offset from JS (`SIGRTMIN + offset`; the build refuses one past `SIGRTMAX`).
pub(crate) fn kick_signal_offset(value: f64) -> Outcome<i32> {
    // `whole` keeps it within i32.
    Ok(convert::whole(value, "kickSignalOffset", i32::MAX as u64)? as i32)
}
