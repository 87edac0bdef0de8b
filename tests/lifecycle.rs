//! Many VMs, one process: 1,000 create → run → stop cycles and a batch of failed builds, then
//! 1,000 fork → stop cycles of one running VM, leave no growth in open fds, threads or resident
//! memory. One test only, so nothing else runs alongside and disturbs the counts.
//! `FORKVM_SOAK_CYCLES=N` runs N cycles of each instead (`scripts/soak.sh`: 10,000).

use forkvm::{
    BalloonConfig, Child, ConsoleBuffer, ConsoleOutput, GuestExit, VmBuilder, VsockConfig,
};
use std::time::Duration;

use forkvm_tests::{open_fds, proc_status, test_guest, test_guest_vm};

/// Cycles of each kind: `FORKVM_SOAK_CYCLES`, else 1,000.
fn cycles() -> usize {
    forkvm_tests::env_u64("FORKVM_SOAK_CYCLES", 1000) as usize
}
const WARM_UP: usize = 20;
/// Resident-memory growth tolerated after the cycles: allocator noise, far below one leaked
/// page per cycle (4 MB over 1,000) or one leaked guest (32 MiB).
const RSS_SLACK_KB: u64 = 3 * 1024;

fn cycle(i: usize) {
    let console = ConsoleBuffer::new();
    // Half the VMs (waited-for and stopped alike) carry virtio-rng, so its eventfds,
    // ioeventfds and irqfd are counted too.
    let mut builder = test_guest_vm("mode=exit memcheck=1", &console);
    if i % 4 < 2 {
        builder = builder.rng();
    }
    // A quarter also carry vsock (its epoll set, eventfd and, every other time, a listening
    // Unix socket whose file must go with the VM) and a balloon.
    if i.is_multiple_of(4) {
        let mut vsock = VsockConfig::new(3);
        if i.is_multiple_of(8) {
            vsock = vsock.uds_path(
                std::env::temp_dir()
                    .join(format!("forkvm-lifecycle-{}-{i}.sock", std::process::id())),
            );
        }
        builder = builder.vsock(vsock).balloon(BalloonConfig::new());
    }
    let vm = builder.vcpus(1 + (i % 2) as u32).build().unwrap();
    vm.start().unwrap();
    if i.is_multiple_of(2) {
        assert_eq!(
            vm.wait().unwrap(),
            GuestExit::PoweredOff { status: Some(0) },
            "cycle {i}: {}",
            console.text()
        );
    } else {
        // Stop at whatever point the guest has reached.
        let exit = vm.stop();
        assert!(
            matches!(
                exit,
                GuestExit::Stopped | GuestExit::PoweredOff { status: Some(0) }
            ),
            "cycle {i}: {exit:?}"
        );
    }
}

fn failed_build() {
    let result = VmBuilder::new()
        .kernel(test_guest())
        .memory_mib(16)
        .initrd("/nonexistent/initrd")
        .build();
    assert!(result.is_err());
}

/// Runs `cycle` 1,000 times after a warm-up and checks that fds, threads and RSS did not grow.
fn assert_no_growth(what: &str, mut cycle: impl FnMut(usize)) {
    for i in 0..WARM_UP {
        cycle(i);
    }
    // What the cycles let go of is freed in the background: counted once it is.
    assert!(forkvm::wait_for_releases(Duration::from_secs(60)));
    let (fds, threads, rss) = (open_fds(), proc_status("Threads"), proc_status("VmRSS"));
    let t0 = std::time::Instant::now();
    let mut peak_rss = rss;
    for i in 0..cycles() {
        cycle(i);
        if i % 100 == 99 {
            peak_rss = peak_rss.max(proc_status("VmRSS"));
        }
    }
    let took = t0.elapsed();
    assert!(forkvm::wait_for_releases(Duration::from_secs(60)));
    let (fds_after, threads_after, rss_after) =
        (open_fds(), proc_status("Threads"), proc_status("VmRSS"));
    eprintln!(
        "{what}: {} cycles in {:.1} s; fds {fds} -> {fds_after}, threads {threads} -> {threads_after}, RSS {rss} kB -> {rss_after} kB (peak {peak_rss} kB)",
        cycles(),
        took.as_secs_f64()
    );
    assert_eq!(fds_after, fds, "{what}: open fds");
    assert_eq!(threads_after, threads, "{what}: threads");
    assert!(
        rss_after <= rss + RSS_SLACK_KB,
        "{what}: RSS grew from {rss} kB to {rss_after} kB over {} cycles",
        cycles()
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn thousand_cycles_and_failed_builds_leave_no_growth() {
    assert_no_growth("create, run, stop", |i| {
        cycle(i);
        failed_build();
    });
    assert_vsock_sockets_removed();

    // Each fork of the running parent freezes its memory into a new image; images nobody maps
    // any more must go away with their last child. The parent has one of each virtio device, so
    // every child has copies (a disk overlay, and every eighth its own vsock socket file).
    let console = ConsoleBuffer::new();
    let disk = forkvm_tests::TempFile::with_contents("lifecycle.img", &[0u8; 1 << 20]);
    let parent = test_guest_vm("mode=spin", &console)
        .block(disk.path(), false)
        .rng()
        .virtio_console(ConsoleOutput::Discard, None)
        .vsock(VsockConfig::new(3))
        .balloon(BalloonConfig::new())
        .build()
        .unwrap();
    parent.start().unwrap();
    forkvm_tests::wait_for_output(&console, "spinning");
    assert_no_growth("fork, stop", |i| {
        let mut child = Child::new(ConsoleOutput::Discard);
        if i.is_multiple_of(8) {
            child = child.vsock_uds_path(std::env::temp_dir().join(format!(
                "forkvm-lifecycle-{}-fork-{i}.sock",
                std::process::id()
            )));
        }
        let child = parent.fork([child]).unwrap();
        assert_eq!(child[0].stop(), GuestExit::Stopped);
    });
    assert_vsock_sockets_removed();
    assert_eq!(parent.stop(), GuestExit::Stopped);
}

/// The Unix socket files of the vsock devices went with their VMs.
fn assert_vsock_sockets_removed() {
    let prefix = format!("forkvm-lifecycle-{}-", std::process::id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "vsock socket files left behind: {left:?}");
}
