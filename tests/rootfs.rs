//! forkvm's Linux image end to end: the kernel from `guest/kernel/build.sh` and the Debian root
//! image from `guest/rootfs/build.sh`, attached read-only as `/dev/vda` with `forkvm-agent` as
//! PID 1 (it puts a tmpfs overlay over the root and serves on vsock port 1024), driven through
//! the host API (`Vm::agent`): commands (echo, Python, a failure, a timeout), a 5 MB file round
//! trip, writes on the overlay, a PTY running `sh` with a resize and a pause; then the booted guest
//! is snapshotted and forked with the PTY session open: each child's session continues on its
//! own, with a reseeded `/dev/urandom`, and so does that of a VM restored from the snapshot.
//!
//! Guest ring 0 is emulated on this project's hosts: the kernel takes ~15 s to reach init and
//! every process spawn ~0.5 s, so the timeouts are minutes. One boot. `scripts/test.sh` builds the
//! kernel and the image before the tests run; here the build scripts reuse their cache.

use forkvm_agent_client::VmAgentExt;
use std::time::{Duration, Instant};

use forkvm::{Child, ConsoleBuffer, ConsoleOutput, GuestExit, Vm};
use forkvm_agent_client::{Agent, AgentError, Command, PtyEvent, WriteOptions};
use forkvm_agent_protocol::{ErrorKind, PowerAction};
use forkvm_tests::{linux_image_vm, start_linux_image};

/// How long the guest may take to boot to its agent (~25 s here when the host is idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a PTY may take to answer (a process start is ~0.5 s here, Python several).
const PTY_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_image_runs_commands_files_and_ptys_through_the_agent_and_forks_with_them() {
    let console = ConsoleBuffer::new();
    let t0 = Instant::now();
    let (vm, agent) = start_linux_image(linux_image_vm(256, &console), &console, BOOT_TIMEOUT);
    let booted = t0.elapsed();
    // The agent reports what failed of its PID-1 set-up (overlay, mounts, hostname) this way.
    let text = console.text();
    assert!(
        !text.contains("forkvm-agent: "),
        "the agent reported problems:\n{text}"
    );

    let t = Instant::now();
    let out = agent.exec(["echo", "hello"]).unwrap();
    let echo = t.elapsed();
    assert_eq!(
        (out.status.code, out.stdout_text()),
        (Some(0), "hello\n".into())
    );
    let t = Instant::now();
    let out = agent.exec(["true"]).unwrap();
    let true_round_trip = t.elapsed();
    assert!(out.success());

    let t = Instant::now();
    let out = agent
        .exec([
            "python3",
            "-c",
            "import os\n\
             print(6*7)\n\
             print(os.environ.get('GLIBC_TUNABLES', '').startswith('glibc.cpu.hwcaps=-AVX,'))\n\
             import multiprocessing\n\
             with multiprocessing.Lock():\n    print('locked')",
        ])
        .unwrap();
    let python = t.elapsed();
    // GLIBC_TUNABLES came from the kernel command line through the agent's environment, and
    // POSIX semaphores (/dev/shm) work.
    assert_eq!(
        (out.status.code, out.stdout_text()),
        (Some(0), "42\nTrue\nlocked\n".into()),
        "stderr: {}",
        out.stderr_text()
    );

    let out = agent
        .exec(["sh", "-c", "echo failing >&2; exit 3"])
        .unwrap();
    assert_eq!(
        (out.status.code, out.stderr_text()),
        (Some(3), "failing\n".into())
    );
    assert!(matches!(
        agent.exec(["no-such-program"]),
        Err(AgentError::CommandNotFound(_))
    ));
    // With a working directory too; a missing working directory is not a missing command.
    assert!(matches!(
        agent.run(&Command::new(["no-such-program"]).cwd("/tmp")),
        Err(AgentError::CommandNotFound(_))
    ));
    assert!(matches!(
        agent.run(&Command::new(["true"]).cwd("/no/such/dir")),
        Err(AgentError::Agent(e)) if e.kind == ErrorKind::NotFound
    ));
    let out = agent
        .run(&Command::new(["sleep", "60"]).timeout(Duration::from_secs(2)))
        .unwrap();
    assert!(out.status.timed_out, "{out:?}");

    // 5 MB up and back; the disk is read-only, the overlay takes the write.
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let t = Instant::now();
    let written = agent
        .write_file("/srv/data.bin", &data[..], WriteOptions::default())
        .unwrap();
    let upload = t.elapsed();
    assert_eq!(written, data.len() as u64);
    let t = Instant::now();
    let back = agent.read_file("/srv/data.bin").unwrap();
    let download = t.elapsed();
    assert!(back == data, "the 5 MB file came back changed");
    let sum = agent
        .exec(["cksum", "/srv/data.bin"])
        .unwrap()
        .stdout_text();
    assert!(
        sum.starts_with(&format!("{} 5000000 ", posix_cksum(&data))),
        "{sum}"
    );
    // `/` is the agent's overlay (tmpfs upper layer over the read-only ext4 root).
    let mounts = String::from_utf8(agent.read_file("/proc/mounts").unwrap()).unwrap();
    let root = mounts
        .lines()
        .find(|line| line.split(' ').nth(1) == Some("/"))
        .unwrap_or_else(|| panic!("no / in /proc/mounts:\n{mounts}"));
    assert!(
        root.starts_with("overlay / overlay ") && root.contains("upperdir="),
        "{root}"
    );

    // A PTY session running sh, resized.
    let pty = agent.pty(["sh"], 24, 80).unwrap();
    pty.write(b"stty size\n").unwrap();
    let text = pty.read_until("24 80", PTY_TIMEOUT).unwrap();
    assert!(text.contains("24 80"), "{text:?}");
    pty.resize(40, 100).unwrap();
    pty.write(b"stty size\n").unwrap();
    let text = pty.read_until("40 100", PTY_TIMEOUT).unwrap();
    assert!(text.contains("40 100"), "{text:?}");
    pty.write(b"cd /srv; GREETING=forked; echo set-$((6*7))\n")
        .unwrap();
    let text = pty.read_until("set-42", PTY_TIMEOUT).unwrap();
    assert!(text.contains("set-42"), "{text:?}");
    // The session survives a pause.
    vm.pause().unwrap();
    vm.resume().unwrap();
    pty.write(b"echo still-$((2+2))\n").unwrap();
    let text = pty.read_until("still-4", PTY_TIMEOUT).unwrap();
    assert!(text.contains("still-4"), "{text:?}");
    let session = pty.session();
    // Detached: the session runs on in the agent, and goes into snapshots and children with it.
    drop(pty);
    let snapshot = std::env::temp_dir().join(format!("forkvm-rootfs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&snapshot);
    vm.snapshot(&snapshot).unwrap();

    let t = Instant::now();
    let children = vm
        .fork((0..2).map(|_| Child::new(ConsoleOutput::Discard)))
        .unwrap();
    let fork = t.elapsed();
    let mut random = Vec::new();
    for (n, child) in std::iter::once(&vm).chain(&children).enumerate() {
        // A child's connections are its own; its agent reseeds before answering.
        let agent = child.agent(Duration::from_secs(60)).unwrap();
        let pty = agent.pty_attach(session).unwrap();
        pty.write(
            format!(
                "echo \"$GREETING-$((100+{n}))\" $(pwd); head -c 16 /dev/urandom | od -An -tx1\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mine = format!("forked-{} /srv", 100 + n);
        let hex_line = read_line_after(&pty, &mine, |line| line.split_whitespace().count() == 16);
        random.push(hex_line.trim().to_owned());
        pty.write(b"exit\n").unwrap();
        loop {
            match pty.read(PTY_TIMEOUT).unwrap() {
                Some(PtyEvent::Exited(status)) => {
                    assert_eq!(status.code, Some(0));
                    break;
                }
                Some(PtyEvent::Output(_)) => {}
                None => panic!("VM {n}: the shell did not exit"),
            }
        }
    }
    let mut distinct = random.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        3,
        "each VM has its own randomness: {random:?}"
    );

    for child in &children {
        child.stop();
    }

    // A VM restored from the snapshot taken before the fork has the session too.
    let restored = Vm::restore(&snapshot, ConsoleOutput::Discard).unwrap();
    let pty = restored
        .agent(Duration::from_secs(60))
        .unwrap()
        .pty_attach(session)
        .unwrap();
    pty.write(b"echo \"$GREETING-restored\" $(pwd)\n").unwrap();
    let text = pty.read_until("forked-restored /srv", PTY_TIMEOUT).unwrap();
    assert!(text.contains("forked-restored /srv"), "{text:?}");
    restored.stop();
    std::fs::remove_dir_all(&snapshot).unwrap();

    shut_down(&vm, &agent, &console);
    eprintln!(
        "Linux image (this host emulates guest ring 0): agent answered {:.1} s after start; exec \
         round trip: echo {:.0} ms, true {:.0} ms; python3 {:.1} s; 5 MB up {:.0} ms ({:.0} \
         MB/s), down {:.0} ms ({:.0} MB/s); fork(2) with a PTY open {:.1} ms",
        booted.as_secs_f64(),
        echo.as_secs_f64() * 1e3,
        true_round_trip.as_secs_f64() * 1e3,
        python.as_secs_f64(),
        upload.as_secs_f64() * 1e3,
        5.0 / upload.as_secs_f64(),
        download.as_secs_f64() * 1e3,
        5.0 / download.as_secs_f64(),
        fork.as_secs_f64() * 1e3,
    );
}

/// Reads the PTY until a line after `marker` satisfies `wanted`; returns that line.
fn read_line_after(
    pty: &forkvm_agent_client::Pty,
    marker: &str,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + PTY_TIMEOUT;
    let mut text = String::new();
    loop {
        if let Some((_, after)) = text.split_once(marker) {
            // Only whole lines: the last one may still be arriving.
            let whole = after.rsplit_once('\n').map_or("", |(lines, _)| lines);
            if let Some(line) = whole.lines().find(|line| wanted(line)) {
                return line.to_owned();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match pty.read(left).unwrap() {
            Some(PtyEvent::Output(bytes)) => text.push_str(&String::from_utf8_lossy(&bytes)),
            other => panic!("no line after {marker:?} ({other:?}): {text:?}"),
        }
    }
}

/// Asks the agent to power the guest off (a reset in a forkvm VM) and waits for it.
fn shut_down(vm: &Vm, agent: &Agent, console: &ConsoleBuffer) {
    agent.shutdown(PowerAction::PowerOff).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.exit().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A guest that did not go down in time is stopped, and the assertion shows it.
    let exit = match vm.exit() {
        Some(_) => vm.wait().unwrap(),
        None => vm.stop(),
    };
    assert_eq!(exit, GuestExit::Reset, "console:\n{}", console.text());
}

/// The checksum POSIX `cksum` prints (CRC-32/CKSUM over the data, then its length).
fn posix_cksum(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    let mut feed = |byte: u8| {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    };
    data.iter().for_each(|b| feed(*b));
    let mut len = data.len();
    while len > 0 {
        feed(len as u8);
        len >>= 8;
    }
    !crc
}
