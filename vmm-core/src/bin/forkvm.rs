//! `forkvm`: boot a guest from the command line, its serial console on this terminal.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use forkvm::{ConsoleInput, ConsoleOutput, DEFAULT_MEMORY_MIB, GuestExit, VmBuilder, Vsock};

const USAGE: &str =
    "usage: forkvm run --kernel PATH [--initrd PATH] [--cmdline STR] [--memory MIB] \
[--vcpus N] [--rng] [--disk PATH] [--disk-ro PATH] [--vsock CID[:UDS_PATH]] [--debug-exit]

Boots the kernel with the serial console on this terminal and exits with the guest's end state:
  0    the guest powered off or reset (Linux `reboot`)
  N    the status a test guest wrote to the debug-exit port (--debug-exit)
  125  a vCPU triple-faulted
  126  the guest crashed (KVM could not run it)
  1    forkvm could not build or start the VM";

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
    vsock: Option<Vsock>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<RunArgs, String> {
    if args.next().as_deref() != Some("run") {
        return Err("expected the `run` command".into());
    }
    let (mut kernel, mut initrd, mut cmdline) = (None, None, None);
    let (mut memory_mib, mut vcpus, mut debug_exit, mut rng) =
        (DEFAULT_MEMORY_MIB, 1, false, false);
    let mut disks = Vec::new();
    let mut vsock = None;
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
    })
}

/// `CID` or `CID:UDS_PATH`.
fn parse_vsock(value: &str) -> Result<Vsock, String> {
    let (cid, path) = match value.split_once(':') {
        Some((cid, path)) => (cid, Some(path)),
        None => (value, None),
    };
    let cid = cid
        .parse()
        .map_err(|e| format!("--vsock: CID {cid:?}: {e}"))?;
    Ok(match path {
        Some(path) => Vsock::new(cid).uds_path(path),
        None => Vsock::new(cid),
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
    let vm = builder.build()?;
    vm.start()?;
    vm.wait()
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
            eprintln!("forkvm: {e}");
            ExitCode::FAILURE
        }
    }
}
