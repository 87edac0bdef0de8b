//! `forkvm`: boot a guest from the command line, its serial console on this terminal; or boot
//! forkvm's Linux image and run one command in it through the guest agent.

use forkvm_agent_client::VmAgentExt;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use forkvm::{
    ConsoleBuffer, ConsoleInput, ConsoleOutput, DEFAULT_MEMORY_MIB, ErrorChain, GuestExit, Network,
    VmBuilder, VsockConfig, error_chain,
};
use forkvm_agent_client::{Command, IMAGE_CMDLINE, IMAGE_MEMORY_MIB, Stream};

const USAGE: &str =
    "usage: forkvm run --kernel PATH [--initrd PATH] [--cmdline STR] [--memory MIB] \
[--vcpus N] [--rng] [--disk PATH] [--disk-ro PATH] [--vsock CID[:UDS_PATH]] [--debug-exit]
       [--net] [--publish [ADDR:]HOST_PORT:GUEST_PORT]...
       forkvm exec --image DIR [--memory MIB] [--vcpus N] [--timeout SECS] [--net]
       [--publish [ADDR:]HOST_PORT:GUEST_PORT]... -- PROGRAM [ARG...]

--net gives the guest forkvm's user-mode network (DHCP; the public internet, nothing on this
host or its networks); --publish forwards a host TCP port (on 127.0.0.1 unless ADDR is given)
to a guest port, and implies --net.

`run` boots the kernel with the serial console on this terminal and exits with the guest's end
state:
  0    the guest powered off or reset (Linux `reboot`)
  N    the status a test guest wrote to the debug-exit port (--debug-exit)
  125  a vCPU triple-faulted
  126  the guest crashed (KVM could not run it)
  1    forkvm could not build or start the VM

`exec` boots forkvm's Linux image (DIR holds `vmlinux` and `rootfs.ext4`, as `guest/image.sh`
builds it), runs PROGRAM through the guest agent with its output on this terminal, stops the VM
and exits with PROGRAM's status (128 + N for signal N, 124 if it timed out, 1 if forkvm failed;
the guest's console goes to standard error if the agent does not come up).";

/// Exit status for a triple fault.
const EXIT_TRIPLE_FAULT: u8 = 125;
/// Exit status for a crash.
const EXIT_CRASH: u8 = 126;

struct RunArgs {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory_mib: u64,
    vcpus: u32,
    debug_exit: bool,
    rng: bool,
    disks: Vec<(PathBuf, bool)>,
    vsock: Option<VsockConfig>,
    network: Option<Network>,
}

/// What `forkvm exec` runs, and in what.
struct ExecArgs {
    image: PathBuf,
    memory_mib: u64,
    vcpus: u32,
    timeout: Duration,
    network: Option<Network>,
    argv: Vec<String>,
}

/// A command line of either subcommand.
enum Invocation {
    Run(RunArgs),
    Exec(ExecArgs),
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Invocation, String> {
    match args.next().as_deref() {
        Some("run") => parse_run(args).map(Invocation::Run),
        Some("exec") => parse_exec(args).map(Invocation::Exec),
        Some("-h" | "--help") => Err(String::new()),
        _ => Err("expected the `run` or `exec` command".into()),
    }
}

fn parse_exec(mut args: impl Iterator<Item = String>) -> Result<ExecArgs, String> {
    let (mut image, mut network) = (None, None);
    let (mut memory_mib, mut vcpus, mut timeout) = (IMAGE_MEMORY_MIB, 1, Duration::from_secs(600));
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--image" => image = Some(PathBuf::from(value()?)),
            "--memory" => memory_mib = value()?.parse().map_err(|e| format!("--memory: {e}"))?,
            "--vcpus" => vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--timeout" => {
                let secs: u64 = value()?.parse().map_err(|e| format!("--timeout: {e}"))?;
                timeout = Duration::from_secs(secs);
            }
            "--net" => network = Some(network.unwrap_or_default()),
            "--publish" => network = Some(parse_publish(network, &value()?)?),
            "--" => break,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let argv: Vec<String> = args.collect();
    if argv.is_empty() {
        return Err("exec needs a program to run after --".into());
    }
    Ok(ExecArgs {
        image: image.ok_or("--image is required")?,
        memory_mib,
        vcpus,
        timeout,
        network,
        argv,
    })
}

fn parse_run(mut args: impl Iterator<Item = String>) -> Result<RunArgs, String> {
    let (mut kernel, mut initrd, mut cmdline) = (None, None, None);
    let (mut memory_mib, mut vcpus, mut debug_exit, mut rng) =
        (DEFAULT_MEMORY_MIB, 1, false, false);
    let mut disks = Vec::new();
    let (mut vsock, mut network) = (None, None);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = Some(value()?),
            "--memory" => memory_mib = value()?.parse().map_err(|e| format!("--memory: {e}"))?,
            "--vcpus" => vcpus = value()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--debug-exit" => debug_exit = true,
            "--rng" => rng = true,
            "--disk" => disks.push((PathBuf::from(value()?), false)),
            "--disk-ro" => disks.push((PathBuf::from(value()?), true)),
            "--vsock" => vsock = Some(parse_vsock(&value()?)?),
            "--net" => network = Some(network.unwrap_or_default()),
            "--publish" => network = Some(parse_publish(network, &value()?)?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    let kernel = kernel.ok_or("--kernel is required")?;
    Ok(RunArgs {
        kernel,
        initrd,
        cmdline,
        memory_mib,
        vcpus,
        debug_exit,
        rng,
        disks,
        vsock,
        network,
    })
}

/// `[ADDR:]HOST_PORT:GUEST_PORT`, added to `network` (or to a new default one).
fn parse_publish(network: Option<Network>, value: &str) -> Result<Network, String> {
    let bad =
        |what: &str| format!("--publish {value:?}: {what} (want [ADDR:]HOST_PORT:GUEST_PORT)");
    let (host, guest) = value.rsplit_once(':').ok_or_else(|| bad("no guest port"))?;
    let guest: u16 = guest.parse().map_err(|_| bad("bad guest port"))?;
    let host: SocketAddr = match host.parse::<u16>() {
        Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
        Err(_) => host.parse().map_err(|_| bad("bad host address"))?,
    };
    Ok(network.unwrap_or_default().publish(host, guest))
}

/// `CID` or `CID:UDS_PATH`.
fn parse_vsock(value: &str) -> Result<VsockConfig, String> {
    let (cid, path) = match value.split_once(':') {
        Some((cid, path)) => (cid, Some(path)),
        None => (value, None),
    };
    let cid = cid
        .parse()
        .map_err(|e| format!("--vsock: CID {cid:?}: {e}"))?;
    Ok(match path {
        Some(path) => VsockConfig::new(cid).uds_path(path),
        None => VsockConfig::new(cid),
    })
}

fn run(args: RunArgs) -> Result<GuestExit, forkvm::Error> {
    let mut builder = VmBuilder::new()
        .kernel(args.kernel)
        .memory_mib(args.memory_mib)
        .vcpus(args.vcpus)
        .debug_exit(args.debug_exit)
        .console(ConsoleOutput::Stdout);
    // Standard input feeds the guest's console when there is one (CI may run us without).
    if let Ok(stdin) = std::io::stdin().as_fd().try_clone_to_owned() {
        builder = builder.console_input(ConsoleInput::Fd(stdin));
    }
    if args.rng {
        builder = builder.rng();
    }
    for (path, read_only) in args.disks {
        builder = builder.block(path, read_only);
    }
    if let Some(vsock) = args.vsock {
        builder = builder.vsock(vsock);
    }
    if let Some(initrd) = args.initrd {
        builder = builder.initrd(initrd);
    }
    if let Some(cmdline) = args.cmdline {
        builder = builder.cmdline(cmdline);
    }
    if let Some(network) = args.network {
        builder = builder.network(network);
    }
    let vm = builder.build()?;
    vm.start()?;
    vm.wait()
}

/// Boots the image, runs the command through the agent with its output on this terminal, and
/// returns its exit status for this process.
fn exec(args: ExecArgs) -> Result<u8, String> {
    let console = ConsoleBuffer::new();
    let mut builder = VmBuilder::new();
    if let Some(network) = args.network {
        builder = builder.network(network);
    }
    let vm = builder
        .kernel(args.image.join("vmlinux"))
        .block(args.image.join("rootfs.ext4"), true)
        .cmdline(IMAGE_CMDLINE)
        .memory_mib(args.memory_mib)
        .vcpus(args.vcpus)
        .rng()
        .vsock(VsockConfig::new(3))
        .console(ConsoleOutput::Buffer(console.clone()))
        .build()
        .map_err(|e| error_chain(&e))?;
    vm.start().map_err(|e| error_chain(&e))?;
    let agent = vm.agent(args.timeout).map_err(|e| {
        eprint!("{}", console.text());
        error_chain(&e)
    })?;
    let command = Command::new(args.argv).timeout(args.timeout);
    let status = agent
        .run_streaming(&command, |stream, bytes| {
            // The command's output, as it comes; a closed terminal only loses it.
            let _ = match stream {
                Stream::Stdout => std::io::stdout().write_all(bytes),
                Stream::Stderr => std::io::stderr().write_all(bytes),
            };
        })
        .map_err(|e| error_chain(&e))?;
    vm.stop();
    Ok(match (status.code, status.signal) {
        _ if status.timed_out => 124,
        (Some(code), _) => u8::try_from(code).unwrap_or(u8::MAX),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(u8::MAX),
        (None, None) => 1,
    })
}

fn exit_code(exit: &GuestExit) -> ExitCode {
    match exit {
        GuestExit::PoweredOff { status: None } | GuestExit::Reset => ExitCode::SUCCESS,
        GuestExit::PoweredOff { status: Some(s) } => ExitCode::from(if *s == 0 {
            0
        } else {
            u8::try_from(*s).unwrap_or(u8::MAX).max(1)
        }),
        GuestExit::TripleFault { .. } => ExitCode::from(EXIT_TRIPLE_FAULT),
        GuestExit::Crashed(_) | GuestExit::Stopped => ExitCode::from(EXIT_CRASH),
        // An exit this program does not know: not a clean one.
        _ => ExitCode::from(EXIT_CRASH),
    }
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("forkvm: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let args = match args {
        Invocation::Run(args) => args,
        Invocation::Exec(args) => {
            return match exec(args) {
                Ok(status) => ExitCode::from(status),
                Err(e) => {
                    eprintln!("forkvm: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match run(args) {
        Ok(exit) => {
            if !matches!(
                exit,
                GuestExit::Reset
                    | GuestExit::PoweredOff {
                        status: None | Some(0)
                    }
            ) {
                eprintln!("forkvm: {exit}");
            }
            exit_code(&exit)
        }
        Err(e) => {
            eprintln!("forkvm: {}", ErrorChain(&e));
            ExitCode::FAILURE
        }
    }
}
