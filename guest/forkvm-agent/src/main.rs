//! `forkvm-agent [--port N | --unix PATH] [--hostname NAME]`
//!
//! As PID 1 it puts a tmpfs overlay over a read-only root (unless `forkvm.overlay=0`), mounts the
//! basic file systems, sets the hostname, reaps every process and honours `Shutdown`; otherwise it
//! only serves. It listens on vsock port N (default 1024) or, with
//! `--unix`, on a Unix socket (for trying it on a host), prints `FORKVM-AGENT-READY` on stdout
//! once listening, and when on vsock also sends a `Ready` frame to the host's port 1025.

use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::thread;

use forkvm_agent::server::{self, Agent, Config};
use forkvm_agent::system::RealSystem;
use forkvm_agent::{init, vsock};
use forkvm_agent_protocol::{AGENT_PORT, PROTOCOL_VERSION, READY_MARKER, READY_PORT};

enum Listen {
    Vsock(u32),
    Unix(String),
}

struct Args {
    listen: Listen,
    hostname: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: Listen::Vsock(AGENT_PORT),
        hostname: "forkvm".into(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--port" => {
                let port = value()?;
                let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
                args.listen = Listen::Vsock(port);
            }
            "--unix" => args.listen = Listen::Unix(value()?),
            "--hostname" => args.hostname = value()?,
            // The kernel passes unknown command-line words to init as arguments.
            _ if std::process::id() == 1 => {}
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("forkvm-agent: {e}");
            eprintln!("usage: forkvm-agent [--port N | --unix PATH] [--hostname NAME]");
            return ExitCode::from(2);
        }
    };
    let pid1 = std::process::id() == 1;
    if pid1 {
        if std::env::var_os("PATH").is_none() {
            // SAFETY: no other thread exists yet.
            unsafe { std::env::set_var("PATH", init::DEFAULT_PATH) };
        }
        // A read-only root gets a tmpfs overlay first: everything below mounts on top of it.
        if let Err(e) = init::overlay_root() {
            eprintln!("forkvm-agent: {e}");
        }
        for problem in init::setup(&args.hostname) {
            eprintln!("forkvm-agent: {problem}");
        }
    }
    let agent = Agent::new(Config {
        system: Box::new(RealSystem),
        reap_all: pid1,
        allow_shutdown: pid1,
    });
    let ready = |at: &str| println!("{READY_MARKER} protocol={PROTOCOL_VERSION} {at}");
    match args.listen {
        Listen::Vsock(port) => {
            let listener = match vsock::VsockListener::bind(port) {
                Ok(listener) => listener,
                Err(e) => {
                    eprintln!("forkvm-agent: vsock port {port}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            ready(&format!("vsock={port}"));
            thread::spawn(|| {
                // Best effort: the host may not listen for it.
                let _ = vsock::notify_ready(libc::VMADDR_CID_HOST, READY_PORT);
            });
            server::serve(&agent, listener.incoming());
        }
        Listen::Unix(path) => {
            let listener = match UnixListener::bind(&path) {
                Ok(listener) => listener,
                Err(e) => {
                    eprintln!("forkvm-agent: {path}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            ready(&format!("unix={path}"));
            server::serve(&agent, listener.incoming());
        }
    }
    ExitCode::SUCCESS
}
