//! Output nobody reads keeps the host's memory flat (issue 15 item 3): a test binary of its own,
//! since it measures this process's resident memory, which tests running alongside would move.

use std::time::Duration;

use forkvm_agent_client::Command;
use forkvm_tests::agent_server::agent;

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    forkvm_tests::proc_status("RssAnon") << 10
}

/// A process writes 1 GiB that nobody reads for a while: the host buffers at most its bound
/// (the connection stops reading, the agent's writes wait) and its memory stays flat; read
/// afterwards, every byte arrives. (The case, `cat /dev/zero` in a guest, grew the host
/// without bound: every frame went into an unbounded channel.) The agent runs in this process
/// here, so its memory counts too.
#[test]
fn output_nobody_reads_keeps_host_memory_flat_and_nothing_is_lost() {
    const VOLUME: u64 = 1 << 30;
    let agent = agent();
    let process = agent
        .spawn(&Command::new([
            "head",
            "-c",
            &VOLUME.to_string(),
            "/dev/zero",
        ]))
        .unwrap();
    let before = rss();
    let bound = forkvm_agent_client::CALL_BUFFER
        + forkvm_agent_protocol::MAX_PAYLOAD
        + forkvm_agent_client::FRAME_COST;
    let mut peak = (0, before);
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = (peak.0.max(process.buffered_bytes()), peak.1.max(rss()));
    }
    assert!(peak.0 > 0, "no output came at all");
    assert!(peak.0 <= bound, "{} bytes buffered, bound {bound}", peak.0);
    let grown = peak.1.saturating_sub(before);
    assert!(grown < 64 << 20, "the host grew by {grown} bytes");
    let mut total = 0u64;
    let status = process
        .wait(|_, bytes| total += bytes.len() as u64)
        .unwrap();
    assert_eq!((status.code, total), (Some(0), VOLUME));
}
