//! Helpers shared by the integration tests: building guests and images, temporary files, and
//! running a guest to its end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use forkvm::{ConsoleBuffer, ConsoleOutput, GuestExit, VmBuilder};

pub mod agent_server;
pub mod host;
pub mod report;
pub mod rounds;
pub use host::{MEMINFO, cpu_time, env_u64, load_average, mappings, meminfo};
pub use report::{print_percentiles, print_percentiles_ns, record_series, sample_count};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Runs a build script that prints the path of what it built, and returns that path.
pub fn built_artifact(script: &str) -> PathBuf {
    let output = Command::new("bash")
        .arg(repo_root().join(script))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        path.is_file(),
        "{script} printed {path:?}, which is not a file"
    );
    path
}

/// The freestanding test guest (built once per test binary).
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| built_artifact("tests/guest/build.sh"))
}

/// A builder for the test guest with `cmdline`, 32 MiB, the debug-exit port and its console in
/// `console`.
pub fn test_guest_vm(cmdline: &str, console: &ConsoleBuffer) -> VmBuilder {
    VmBuilder::new()
        .kernel(test_guest())
        .memory_mib(32)
        .cmdline(cmdline)
        .debug_exit(true)
        .console(ConsoleOutput::Buffer(console.clone()))
}

/// Builds, starts and waits for the test guest; returns how it ended and its console.
pub fn run_test_guest(cmdline: &str) -> (GuestExit, String) {
    let console = ConsoleBuffer::new();
    let vm = test_guest_vm(cmdline, &console)
        .build()
        .expect("build the test guest VM");
    vm.start().expect("start");
    let exit = vm.wait().expect("wait");
    (exit, console.text())
}

/// Starts the test guest in `mode=echo` with its serial input fed from a pipe; returns the VM
/// and the pipe's write end.
pub fn echo_guest(console: &ConsoleBuffer) -> (forkvm::Vm, std::io::PipeWriter) {
    let (reader, writer) = std::io::pipe().expect("pipe");
    let vm = test_guest_vm("mode=echo", console)
        .console_input(forkvm::ConsoleInput::Fd(reader.into()))
        .build()
        .expect("build the echo guest");
    vm.start().expect("start");
    (vm, writer)
}

/// A builder for forkvm's Linux image: the kernel of `guest/kernel/build.sh` on
/// [`forkvm_agent_client::IMAGE_CMDLINE`], the root image of `guest/rootfs/build.sh` read-only as
/// `/dev/vda` (its agent serves on vsock, guest CID 3), `memory_mib` of RAM and the console in
/// `console`. Both build scripts reuse their cache.
pub fn linux_image_vm(memory_mib: u64, console: &ConsoleBuffer) -> VmBuilder {
    let kernel = built_artifact("guest/kernel/build.sh");
    let image = built_artifact("guest/rootfs/build.sh");
    VmBuilder::new()
        .kernel(&kernel)
        .cmdline(forkvm_agent_client::IMAGE_CMDLINE)
        .memory_mib(memory_mib)
        .block(&image, true)
        .vsock(forkvm::VsockConfig::new(3))
        .console(ConsoleOutput::Buffer(console.clone()))
}

/// Builds and starts the VM of `builder` (see [`linux_image_vm`]) and waits up to `timeout` for
/// its agent; panics with the console `console` if it does not answer.
pub fn start_linux_image(
    builder: VmBuilder,
    console: &ConsoleBuffer,
    timeout: std::time::Duration,
) -> (forkvm::Vm, forkvm_agent_client::Agent) {
    use forkvm_agent_client::VmAgentExt;
    let vm = builder.build().expect("build the Linux image's VM");
    vm.start().expect("start the Linux image");
    let agent = vm
        .agent(timeout)
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console.text()));
    (vm, agent)
}

/// A builder for a generated image: 16 MiB, the debug-exit port, no console.
pub fn image_vm(image: &Path) -> VmBuilder {
    VmBuilder::new()
        .kernel(image)
        .memory_mib(16)
        .debug_exit(true)
        .console(ConsoleOutput::Discard)
}

/// Writes a generated kernel image to a temporary file, boots it and returns how it ended.
pub fn run_image(name: &str, image: &[u8]) -> GuestExit {
    let file = TempFile::with_contents(name, image);
    let vm = image_vm(file.path()).build().expect("build the VM");
    vm.start().expect("start");
    vm.wait().expect("wait")
}

/// Polls `console` until it contains `needle` (the guest runs on other threads).
pub fn wait_for_output(console: &ConsoleBuffer, needle: &str) {
    for _ in 0..2000 {
        if console.text().contains(needle) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!(
        "the guest never printed {needle:?}; console:\n{}",
        console.text()
    );
}

/// A file in the temporary directory, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    /// Creates a uniquely named file holding `contents`.
    pub fn with_contents(name: &str, contents: &[u8]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("forkvm-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        Self(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// 64-bit code that reports `rsi` (the boot-params pointer) through the debug-exit port:
/// `mov eax, esi; mov dx, 0xf4; out dx, eax; jmp $`.
pub const REPORT_RSI: [u8; 9] = [0x89, 0xf0, 0x66, 0xba, 0xf4, 0x00, 0xef, 0xeb, 0xfe];

/// A minimal bzImage (boot protocol 2.15) whose 64-bit entry runs `code`.
pub fn fake_bzimage(code: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // loadflags: LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    image[0x260..0x264].copy_from_slice(&0x10000u32.to_le_bytes()); // init_size
    // The protected-mode kernel: the 64-bit entry is 0x200 bytes in.
    let mut kernel = vec![0xf4u8; 0x200];
    kernel.extend_from_slice(code);
    image.extend_from_slice(&kernel);
    image
}

/// A minimal ELF64 executable with one PT_LOAD segment of `code` at `paddr` spanning `memsz`
/// bytes in memory, entered at `paddr`, and no PVH note.
pub fn fake_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    elf_image(paddr, code, memsz, false)
}

/// Like [`fake_elf`], with a PVH note naming `paddr` as the 32-bit entry point.
pub fn fake_pvh_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    elf_image(paddr, code, 0, true)
}

/// 32-bit code that ends the VM through the debug-exit port with status 0 as its first
/// instruction: `out 0xf4, eax` (eax is 0 at the PVH entry), then `jmp $`.
pub const EXIT_AT_ONCE: [u8; 4] = [0xe7, 0xf4, 0xeb, 0xfe];

fn elf_image(paddr: u64, code: &[u8], memsz: u64, pvh: bool) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    const NOTE_LEN: u64 = 20; // namesz, descsz, type, "Xen\0", 32-bit entry
    let phnum: u64 = if pvh { 2 } else { 1 };
    let note_offset = EHDR + phnum * PHDR;
    let code_offset = note_offset + if pvh { NOTE_LEN } else { 0 };
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&paddr.to_le_bytes()); // e_entry
    elf.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(phnum as u16).to_le_bytes());
    elf.extend_from_slice(&[0; 6]); // no section headers
    let mut phdr = |p_type: u32, offset: u64, addr: u64, filesz: u64, memsz: u64| {
        elf.extend_from_slice(&p_type.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&offset.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&addr.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&filesz.to_le_bytes());
        elf.extend_from_slice(&memsz.to_le_bytes());
        elf.extend_from_slice(&4u64.to_le_bytes()); // p_align
    };
    let len = code.len() as u64;
    phdr(1, code_offset, paddr, len, memsz.max(len)); // PT_LOAD
    if pvh {
        phdr(4, note_offset, 0, NOTE_LEN, NOTE_LEN); // PT_NOTE
        elf.extend_from_slice(&4u32.to_le_bytes());
        elf.extend_from_slice(&4u32.to_le_bytes());
        elf.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        elf.extend_from_slice(b"Xen\0");
        elf.extend_from_slice(&(paddr as u32).to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A field of /proc/self/status, in its unit (kB for memory).
pub fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Starts a test guest (`vcpus` vCPUs) spinning on a counter; returns it, the counter's guest
/// address (the guest prints it) and its console.
pub fn spinning_guest(vcpus: u32) -> (forkvm::Vm, u64, ConsoleBuffer) {
    spinning_guest_sized(vcpus, 32)
}

/// [`spinning_guest`] with `memory_mib` of memory.
pub fn spinning_guest_sized(vcpus: u32, memory_mib: u64) -> (forkvm::Vm, u64, ConsoleBuffer) {
    spinning_guest_with(vcpus, memory_mib, |builder| builder)
}

/// [`spinning_guest_sized`] with whatever `add` adds to its builder (devices).
pub fn spinning_guest_with(
    vcpus: u32,
    memory_mib: u64,
    add: impl FnOnce(VmBuilder) -> VmBuilder,
) -> (forkvm::Vm, u64, ConsoleBuffer) {
    let console = ConsoleBuffer::new();
    let vm = add(test_guest_vm("mode=spin", &console))
        .vcpus(vcpus)
        .memory_mib(memory_mib)
        .build()
        .expect("build the spinning guest");
    vm.start().expect("start");
    let addr = hex_after(&console, "counter at ");
    (vm, addr, console)
}

/// Waits for the last line of `console` that starts with `prefix` and a hex number (`0x...`)
/// to be complete, and returns the number.
pub fn hex_after(console: &ConsoleBuffer, prefix: &str) -> u64 {
    // The whole line: the guest writes it a byte at a time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let hex = loop {
        let text = console.text();
        let rest = text.rsplit(prefix).next().filter(|_| text.contains(prefix));
        if let Some((hex, _)) = rest.and_then(|rest| rest.split_once('\n')) {
            break hex.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no whole {prefix:?} line: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    u64::from_str_radix(hex.trim().trim_start_matches("0x"), 16).expect("hex number")
}

/// The mailbox of the test guest's `blk-mailbox` mode, through which the host has it write and
/// read a sector of its disk.
#[derive(Clone, Copy)]
pub struct BlkMailbox(u64);

impl BlkMailbox {
    /// Waits for the guest on `console` to announce its mailbox.
    pub fn find(console: &ConsoleBuffer) -> Self {
        Self(hex_after(console, "blk-mailbox at "))
    }

    /// The mailbox's guest address (its first word is the command, 0 once served).
    pub fn address(self) -> u64 {
        self.0
    }

    /// Has the guest of `vm` (its console `console`) write `value` into its sector.
    pub fn write(self, vm: &forkvm::Vm, console: &ConsoleBuffer, value: u64) {
        let before = console.text().matches("blk wrote").count();
        vm.write_memory(self.0 + 8, &value.to_le_bytes()).unwrap();
        vm.write_memory(self.0, &1u64.to_le_bytes()).unwrap();
        wait_until(
            || console.text().matches("blk wrote").count() > before,
            console,
        );
    }

    /// Has the guest of `vm` read its sector; returns its first 8 bytes.
    pub fn read(self, vm: &forkvm::Vm, console: &ConsoleBuffer) -> u64 {
        let before = console.text().matches("blk read ").count();
        vm.write_memory(self.0, &2u64.to_le_bytes()).unwrap();
        wait_until(
            || {
                let text = console.text();
                text.matches("blk read ").count() > before && text.ends_with('\n')
            },
            console,
        );
        hex_after(console, "blk read ")
    }

    /// Has the guest of `vm` exit with status 0.
    pub fn exit(self, vm: &forkvm::Vm) {
        vm.write_memory(self.0, &3u64.to_le_bytes()).unwrap();
    }
}

/// Waits up to 10 s for `done`, showing `console` if it does not come.
fn wait_until(mut done: impl FnMut() -> bool, console: &ConsoleBuffer) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out; console:\n{}",
            console.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Waits for the guest of `vm` to end and checks that it powered off with status 0, showing
/// its console `console` if not.
pub fn assert_exits_ok(vm: &forkvm::Vm, console: &ConsoleBuffer) {
    assert_eq!(
        vm.wait().unwrap(),
        forkvm::GuestExit::PoweredOff { status: Some(0) },
        "{}",
        console.text()
    );
}

/// Reads the u64 at guest address `addr`.
pub fn read_u64(vm: &forkvm::Vm, addr: u64) -> u64 {
    let mut bytes = [0u8; 8];
    vm.read_memory(addr, &mut bytes).expect("read guest memory");
    u64::from_le_bytes(bytes)
}

/// Waits (at most 10 s) until the u64 at `addr` exceeds `than`; returns it.
pub fn wait_until_above(vm: &forkvm::Vm, addr: u64, than: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = read_u64(vm, addr);
        if now > than {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no progress past {than}: {:?}",
            vm.exit()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Runs `make` `iters` times and adds up how long each call took; what it made is dropped
/// outside the timed part (benchmarks of VM creation leave KVM's teardown out).
pub fn time_each<T>(iters: u64, mut make: impl FnMut() -> T) -> std::time::Duration {
    (0..iters)
        .map(|_| {
            let t0 = std::time::Instant::now();
            let made = make();
            let took = t0.elapsed();
            drop(made);
            took
        })
        .sum()
}

/// Raises this process's soft limit on open files to its hard limit (a thousand VMs need
/// thousands of fds); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed, which outlives them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// Replaces the `state.json` of the snapshot in `dir` by `state`, with its checksum in
/// `checksums.json` updated (as someone who edits a snapshot on purpose would): what the load
/// then says is about the state, not a damaged file.
pub fn rewrite_snapshot_state(dir: &Path, state: &str) {
    std::fs::write(dir.join(forkvm::STATE_FILE), state).unwrap();
    let sums_path = dir.join(forkvm::CHECKSUM_FILE);
    let mut sums: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sums_path).unwrap()).unwrap();
    sums["files"][forkvm::STATE_FILE] = serde_json::json!({
        "len": state.len(),
        "crc32": crc32fast::hash(state.as_bytes()),
    });
    std::fs::write(&sums_path, serde_json::to_vec(&sums).unwrap()).unwrap();
}
