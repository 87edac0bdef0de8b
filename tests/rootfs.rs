//! The Debian root image from `guest/rootfs/build.sh` boots under forkvm with the kernel from
//! `guest/kernel/build.sh`: attached read-only as `/dev/vda`, with `forkvm-agent` as PID 1. The
//! agent puts a tmpfs overlay over the read-only root, prints its ready marker on the serial
//! console and serves on vsock port 1024, where this test speaks the agent protocol directly
//! (frames, `Hello` with generation 0, `Exec`, `WriteFile`, `ReadFile`, `PtyOpen`, `Shutdown`):
//! Python runs, files can be written although the disk is read-only, and PTY sessions work.
//!
//! Guest ring 0 is emulated on this project's hosts: the kernel takes ~15 s to reach init and
//! every process spawn ~0.5 s, so the timeouts are minutes. One boot. `scripts/test.sh` builds the
//! kernel and the image before the tests run; here the build scripts reuse their cache.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkvm::{ConsoleBuffer, ConsoleOutput, GuestExit, Vm, VmBuilder, Vsock};
use forkvm_agent_protocol::{
    AGENT_PORT, ExecRequest, ExitStatus, Frame, Hello, Kind, MIN_ENTROPY, PROTOCOL_VERSION,
    PowerAction, PtyOpenRequest, READY_MARKER, Reply, Request, WriteFileRequest, read_frame,
    write_control, write_frame,
};
use forkvm_tests::built_artifact;

/// How long the guest may take to boot to the agent's marker (~20 s here when the host is idle).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long any one request may take (a Python start-up is a few seconds here).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// The kernel command line: the root image read-only, the agent as init. Words with `=` and no dot
/// reach init's environment: `GLIBC_TUNABLES` keeps glibc's AVX code paths off in every process
/// (the guest kernel runs with `noxsave` here and does not preserve AVX state across context
/// switches; see guest/README.md). forkvm adds its platform parameters itself.
const CMDLINE: &str = "console=ttyS0 root=/dev/vda ro rootfstype=ext4 init=/sbin/forkvm-agent \
    GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512BW,-AVX512CD,-AVX512DQ,-AVX512VL,\
-AVX_VNNI,-FMA,-FMA4,-F16C";

#[test]
fn the_root_image_boots_to_the_agent_which_runs_python_on_a_writable_overlay() {
    let kernel = built_artifact("guest/kernel/build.sh");
    let image = built_artifact("guest/rootfs/build.sh");
    let console = ConsoleBuffer::new();
    let vm = VmBuilder::new()
        .kernel(&kernel)
        .cmdline(CMDLINE)
        .memory_mib(256)
        .block(&image, true)
        .vsock(Vsock::new(3))
        .console(ConsoleOutput::Buffer(console.clone()))
        .build()
        .expect("build the VM");
    let t0 = Instant::now();
    vm.start().unwrap();
    wait_for_marker(&vm, &console);
    let booted = t0.elapsed();
    // The agent reports what failed of its PID-1 set-up (overlay, mounts, hostname) this way.
    let text = console.text();
    assert!(
        !text.contains("forkvm-agent: "),
        "the agent reported problems:\n{text}"
    );

    let mut agent = Agent::connect(&vm);
    let hello = agent.hello();
    let hello_done = t0.elapsed();

    let t = Instant::now();
    let (status, stdout, stderr) = agent.exec(&["python3", "-c", "print(6*7)"]);
    let python = t.elapsed();
    assert_eq!(
        (status.code, stdout.as_str()),
        (Some(0), "42\n"),
        "{status:?}, stderr: {stderr}\nconsole:\n{}",
        console.text()
    );

    // The disk is read-only; the overlay takes writes: one from the agent, one from a process.
    let contents = b"written in the guest\n";
    let t = Instant::now();
    let written = agent.write_file("/etc/forkvm-overlay-check", contents);
    assert_eq!(written, contents.len() as u64);
    let (status, stdout, stderr) = agent.exec(&[
        "python3",
        "-c",
        "import os, sys\n\
         open('/usr/forkvm-from-python', 'w').write('from python\\n')\n\
         sys.stdout.write(open('/etc/forkvm-overlay-check').read())\n\
         print(os.statvfs('/').f_flag & os.ST_RDONLY)\n\
         print(os.environ.get('GLIBC_TUNABLES', '').startswith('glibc.cpu.hwcaps=-AVX,'))\n\
         import multiprocessing\n\
         with multiprocessing.Lock():\n    print('locked')",
    ]);
    // The root is writable, GLIBC_TUNABLES came from the kernel command line through the agent's
    // environment, and POSIX semaphores (/dev/shm) work.
    assert_eq!(
        (status.code, stdout.as_str()),
        (Some(0), "written in the guest\n0\nTrue\nlocked\n"),
        "{status:?}, stderr: {stderr}"
    );
    assert_eq!(agent.read_file("/usr/forkvm-from-python"), b"from python\n");
    let writes = t.elapsed();
    // `/` is the agent's overlay (tmpfs upper layer over the read-only ext4 root).
    let mounts = String::from_utf8(agent.read_file("/proc/mounts")).unwrap();
    let root = mounts
        .lines()
        .find(|line| line.split(' ').nth(1) == Some("/"))
        .unwrap_or_else(|| panic!("no / in /proc/mounts:\n{mounts}"));
    assert!(
        root.starts_with("overlay / overlay ") && root.contains("upperdir="),
        "/ is not the overlay: {root}\n{mounts}"
    );

    // A PTY session (devpts): the shell's terminal is a pty, and its output comes back.
    let t = Instant::now();
    let (status, output) = agent.pty(&["sh", "-c", "tty; echo pty-$((6*7))"]);
    let pty = t.elapsed();
    assert_eq!(status.code, Some(0), "{status:?}: {output}");
    assert!(
        output.contains("/dev/pts/") && output.contains("pty-42"),
        "PTY output: {output:?}"
    );

    agent.shutdown();
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.exit().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A guest that did not go down in time is stopped, and the assertion below shows it.
    let exit = match vm.exit() {
        Some(_) => vm.wait().unwrap(),
        None => vm.stop(),
    };
    assert_eq!(exit, GuestExit::Reset, "console:\n{}", console.text());
    eprintln!(
        "root image {image:?}: agent ready after {:.1} s, Hello answered after {:.1} s ({hello}), \
         python3 print(6*7) {:.1} s, overlay writes and reads {:.1} s, PTY session {:.1} s, all \
         {:.1} s",
        booted.as_secs_f64(),
        hello_done.as_secs_f64(),
        python.as_secs_f64(),
        writes.as_secs_f64(),
        pty.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
    );
}

/// Waits until the agent's ready marker is on the console; fails when the guest ends first or
/// after [`BOOT_TIMEOUT`].
fn wait_for_marker(vm: &Vm, console: &ConsoleBuffer) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !console.text().contains(READY_MARKER) {
        assert!(
            vm.exit().is_none(),
            "the guest ended ({:?}) before {READY_MARKER}; console:\n{}",
            vm.exit(),
            console.text()
        );
        assert!(
            Instant::now() < deadline,
            "no {READY_MARKER} after {BOOT_TIMEOUT:?}; console:\n{}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection to the agent, one request at a time.
struct Agent {
    stream: UnixStream,
    next_id: u32,
}

impl Agent {
    fn connect(vm: &Vm) -> Agent {
        let stream = vm
            .vsock_connect(AGENT_PORT, Duration::from_secs(60))
            .expect("connect to the agent's vsock port");
        stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
        Agent { stream, next_id: 1 }
    }

    /// Sends `Hello` (generation 0, fresh entropy, the host's time); returns the agent's name.
    fn hello(&mut self) -> String {
        let mut entropy = vec![0u8; MIN_ENTROPY];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut entropy))
            .unwrap();
        let time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let request = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            generation: 0,
            entropy,
            time_ns,
        });
        write_control(&mut self.stream, 0, &request).unwrap();
        match self.reply(0) {
            Reply::Hello {
                version,
                agent,
                generation,
                ..
            } => {
                assert_eq!((version, generation), (PROTOCOL_VERSION, 0));
                agent
            }
            other => panic!("Hello answered with {other:?}"),
        }
    }

    /// Runs `argv` to its end; returns its status, stdout and stderr.
    fn exec(&mut self, argv: &[&str]) -> (ExitStatus, String, String) {
        let id = self.send(&Request::Exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms: Some(REQUEST_TIMEOUT.as_millis() as u64),
            ..ExecRequest::default()
        }));
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            let frame = self.frame(id);
            match frame.kind {
                Kind::Data => stdout.extend_from_slice(&frame.payload),
                Kind::Stderr => stderr.extend_from_slice(&frame.payload),
                Kind::Control => match frame.decode::<Reply>().unwrap() {
                    Reply::Started { .. } => {}
                    Reply::Exited(status) => {
                        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
                        return (status, text(stdout), text(stderr));
                    }
                    other => panic!("exec {argv:?}: {other:?}"),
                },
                Kind::Eof => panic!("exec {argv:?}: an eof frame from the agent"),
            }
        }
    }

    /// Writes `contents` to the guest file `path`; returns the bytes the agent wrote.
    fn write_file(&mut self, path: &str, contents: &[u8]) -> u64 {
        let id = self.send(&Request::WriteFile(WriteFileRequest {
            path: path.into(),
            append: false,
            exclusive: false,
            mode: None,
        }));
        write_frame(&mut self.stream, &Frame::data(id, contents.to_vec())).unwrap();
        write_frame(&mut self.stream, &Frame::eof(id)).unwrap();
        match self.reply(id) {
            Reply::Written { bytes } => bytes,
            other => panic!("write {path}: {other:?}"),
        }
    }

    /// Reads the whole guest file `path`.
    fn read_file(&mut self, path: &str) -> Vec<u8> {
        let id = self.send(&Request::ReadFile {
            path: path.into(),
            offset: 0,
            len: None,
        });
        let mut contents = Vec::new();
        loop {
            let frame = self.frame(id);
            match frame.kind {
                Kind::Data => contents.extend_from_slice(&frame.payload),
                Kind::Control => match frame.decode::<Reply>().unwrap() {
                    Reply::ReadDone { bytes } => {
                        assert_eq!(bytes, contents.len() as u64, "read {path}");
                        return contents;
                    }
                    other => panic!("read {path}: {other:?}"),
                },
                other => panic!("read {path}: a {other:?} frame"),
            }
        }
    }

    /// Runs `argv` in a PTY session (24x80) to its end; returns its status and output.
    fn pty(&mut self, argv: &[&str]) -> (ExitStatus, String) {
        let id = self.send(&Request::PtyOpen(PtyOpenRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            rows: 24,
            cols: 80,
        }));
        let mut output = Vec::new();
        loop {
            let frame = self.frame(id);
            match frame.kind {
                Kind::Data => output.extend_from_slice(&frame.payload),
                Kind::Control => match frame.decode::<Reply>().unwrap() {
                    Reply::PtyOpened { .. } => {}
                    Reply::PtyExited { status, .. } => {
                        return (status, String::from_utf8_lossy(&output).into_owned());
                    }
                    other => panic!("pty {argv:?}: {other:?}"),
                },
                other => panic!("pty {argv:?}: a {other:?} frame"),
            }
        }
    }

    /// Asks the agent to reboot the guest (`reboot=k`: forkvm reports a reset).
    fn shutdown(&mut self) {
        let id = self.send(&Request::Shutdown {
            action: PowerAction::Reboot,
        });
        match self.reply(id) {
            Reply::Ok => {}
            other => panic!("shutdown: {other:?}"),
        }
    }

    /// Sends `request` under a new id and returns that id.
    fn send(&mut self, request: &Request) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        write_control(&mut self.stream, id, request).unwrap();
        id
    }

    /// The next frame, which must belong to request `id`.
    fn frame(&mut self, id: u32) -> Frame {
        let frame = read_frame(&mut self.stream).expect("a frame from the agent");
        assert_eq!(frame.id, id, "a frame for another request: {frame:?}");
        frame
    }

    /// The next frame as a control reply to request `id`.
    fn reply(&mut self, id: u32) -> Reply {
        self.frame(id).decode().expect("a control reply")
    }
}
