//! Running processes: stdout and stderr streamed as they are produced, stdin from the host,
//! timeouts, and the [`Command`] setup shared with PTY sessions.
//!
//! Each exec runs in a process group of its own, so a timeout or a `Signal` reaches everything
//! it started. Its final `Exited` reply comes after all its output: the agent waits for both pipes
//! to end, or for [`OUTPUT_GRACE`] after the process exits when something it left running in the
//! background keeps them open (what that writes later is dropped).

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use forkvm_agent_protocol::{
    ErrorKind, ErrorReply, ExecRequest, ExitStatus, Kind, Reply, write_parts,
};

use crate::reaper::kill_group;
use crate::server::{Chunk, Out, RequestContext};
use crate::{error, io_error, user};

/// How long output may still arrive after the process exits.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Size of the reads from a process's pipes (and so of its largest output frames).
const PIPE_READ: usize = 64 * 1024;

/// A [`Command`] for `argv` with its environment, working directory and user.
pub(crate) fn command(
    argv: &[String],
    env: &[(String, String)],
    clear_env: bool,
    cwd: Option<&str>,
    user: Option<&str>,
) -> Result<Command, ErrorReply> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| error(ErrorKind::InvalidArgument, "argv is empty"))?;
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!("bad environment variable {key:?}"),
            ));
        }
    }
    let mut command = Command::new(program);
    command.args(args);
    if clear_env {
        command.env_clear();
    }
    if let Some(spec) = user {
        let user = user::resolve(spec)?;
        // Without root std cannot drop groups; the spawn then fails with EPERM, as it should.
        command
            .uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    Ok(command)
}

/// Runs an exec request to its end and returns its `Exited` reply (having sent `Started` and
/// the output).
pub fn run(
    ctx: &RequestContext,
    request: ExecRequest,
    input: Option<Receiver<Chunk>>,
) -> Result<Reply, ErrorReply> {
    let mut command = command(
        &request.argv,
        &request.env,
        request.clear_env,
        request.cwd.as_deref(),
        request.user.as_deref(),
    )?;
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, exited) = ctx
        .agent
        .reaper
        .spawn(&mut command)
        .map_err(|e| io_error(&format!("running {:?}", request.argv[0]), &e))?;
    // Pids are positive and below 2^22.
    let pid = child.id() as libc::pid_t;
    ctx.running.set_pid(ctx.id, pid);
    let _ = ctx.out.reply(ctx.id, &Reply::Started { pid: child.id() });

    if let (Some(stdin), Some(input)) = (child.stdin.take(), input) {
        // Without the thread stdin just closes: the process sees EOF.
        let _ = thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || feed(stdin, &input));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();
    let mut pumps = 0;
    let pipes: [(Option<Box<dyn Read + Send>>, Kind); 2] = [
        (child.stdout.take().map(|p| Box::new(p) as _), Kind::Data),
        (child.stderr.take().map(|p| Box::new(p) as _), Kind::Stderr),
    ];
    for (pipe, kind) in pipes {
        let Some(pipe) = pipe else { continue };
        let pump = Pump {
            out: Arc::clone(&ctx.out),
            id: ctx.id,
            kind,
            stop: Arc::clone(&stop),
            done: done_tx.clone(),
        };
        if thread::Builder::new()
            .name("exec-output".into())
            .spawn(move || pump.run(pipe))
            .is_ok()
        {
            pumps += 1;
        }
    }
    drop(done_tx);

    let deadline = request
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let status = wait(&exited, deadline, pid);
    ctx.running.clear_pid(ctx.id);

    let grace = Instant::now() + OUTPUT_GRACE;
    for _ in 0..pumps {
        let left = grace.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    {
        // Under the stream lock: no output frame can follow the Exited reply.
        let _stream = ctx.out.lock();
        stop.store(true, Ordering::SeqCst);
    }
    Ok(Reply::Exited(status))
}

/// Waits for the exit status; past `deadline` kills the process group first.
fn wait(exited: &Receiver<ExitStatus>, deadline: Option<Instant>, pid: libc::pid_t) -> ExitStatus {
    if let Some(deadline) = deadline {
        match exited.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(status) => return status,
            Err(RecvTimeoutError::Disconnected) => return ExitStatus::default(),
            Err(RecvTimeoutError::Timeout) => {
                let _ = kill_group(pid, libc::SIGKILL);
                let mut status = exited.recv().unwrap_or_default();
                status.timed_out = true;
                return status;
            }
        }
    }
    exited.recv().unwrap_or_default()
}

fn feed(mut stdin: ChildStdin, input: &Receiver<Chunk>) {
    for chunk in input {
        match chunk {
            Chunk::Data(bytes) => {
                if stdin.write_all(&bytes).is_err() {
                    return;
                }
            }
            Chunk::Eof => return,
        }
    }
}

/// Copies one pipe of a process to the connection.
struct Pump {
    out: Arc<Out>,
    id: u32,
    kind: Kind,
    stop: Arc<AtomicBool>,
    done: Sender<()>,
}

impl Pump {
    fn run(self, mut pipe: Box<dyn Read + Send>) {
        let mut buf = vec![0u8; PIPE_READ];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut stream = self.out.lock();
                    // After Exited the output is drained and dropped, so writers never block.
                    if !self.stop.load(Ordering::SeqCst) {
                        let _ = write_parts(&mut *stream, self.kind, self.id, &buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = self.done.send(());
    }
}
