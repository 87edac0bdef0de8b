//! The guest agent's cost on the host side: the real agent server (`forkvm-agent`) run in this
//! process over Unix socket pairs, driven through the host API (`forkvm_agent_client`), with its
//! privileged calls recorded instead of made (`forkvm_tests::agent_server`). What a guest adds on top (vsock, the guest kernel) is measured
//! end to end by `cargo test --test rootfs -- --nocapture`.
//!
//! - `exec_true`: `Agent::exec(["true"])`, call → exit status (a process spawn on this host);
//! - `ping`: one request and its reply, the protocol's own round trip;
//! - `upload_64MiB` / `download_64MiB`: `write_file` / `read_file` of 64 MiB to and from a file
//!   in the temporary directory (throughput as criterion reports it).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forkvm_agent_client::{Agent, WriteOptions};
use forkvm_tests::agent_server::agent_server;

fn agent() -> Agent {
    Agent::connect(agent_server().0, 0, Duration::from_secs(10)).unwrap()
}

fn bench_agent(c: &mut Criterion) {
    let agent = agent();
    let mut group = c.benchmark_group("agent");
    group.bench_function("ping", |b| b.iter(|| agent.ping().unwrap()));
    group.bench_function("exec_true", |b| {
        b.iter(|| assert!(agent.exec(["true"]).unwrap().success()))
    });
    let data = vec![0x5au8; 64 << 20];
    let path = std::env::temp_dir().join(format!("forkvm-agent-bench-{}", std::process::id()));
    let path = path.to_str().unwrap().to_owned();
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("upload_64MiB", |b| {
        b.iter(|| {
            agent
                .write_file(&path, &data[..], WriteOptions::default())
                .unwrap()
        })
    });
    std::fs::write(&path, &data).unwrap();
    group.bench_function("download_64MiB", |b| {
        b.iter(|| assert_eq!(agent.read_file(&path).unwrap().len(), data.len()))
    });
    group.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = bench_agent
}
criterion_main!(benches);
