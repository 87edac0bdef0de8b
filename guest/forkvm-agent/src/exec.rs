//! Running processes: stdout and stderr streamed as they are produced, stdin from the host,
//! timeouts, and the `Launch` (command set-up and spawn errors) shared with PTY sessions.
//!
//! Each exec runs in a process group of its own, so a timeout or a `Signal` reaches everything
//! it started. Its final `Exited` reply comes after all its output: the agent waits for both pipes
//! to end, or for [`OUTPUT_GRACE`] after the process exits when something it left running in the
//! background keeps them open (what that writes later is dropped).

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
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
use crate::request::{Chunk, Out, RequestContext};
use crate::{error, io_error, user};

/// How long output may still arrive after the process exits.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Size of the reads from a process's pipes (and so of its largest output frames).
const PIPE_READ: usize = 64 * 1024;

/// The `PATH` a program is looked up in when the process's environment has none (the C
/// library's default for `execvp`).
#[cfg(target_env = "musl")]
const DEFAULT_PATH: &str = "/usr/local/bin:/bin:/usr/bin";
/// The `PATH` a program is looked up in when the process's environment has none (the C
/// library's default for `execvp`).
#[cfg(not(target_env = "musl"))]
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// What a process (an exec's or a PTY session's) is started from.
pub(crate) struct Launch<'a> {
    /// The program and its arguments.
    pub argv: &'a [String],
    /// Variables added to (or replacing those of) the environment.
    pub env: &'a [(String, String)],
    /// Start from an empty environment rather than the agent's.
    pub clear_env: bool,
    /// The working directory.
    pub cwd: Option<&'a str>,
    /// The user to run as.
    pub user: Option<&'a str>,
}

impl Launch<'_> {
    /// A [`Command`] for `argv` with its environment, working directory and user.
    pub(crate) fn command(&self) -> Result<Command, ErrorReply> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| error(ErrorKind::InvalidArgument, "argv is empty"))?;
        for (key, value) in self.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(error(
                    ErrorKind::InvalidArgument,
                    format!("bad environment variable {key:?}"),
                ));
            }
        }
        let mut command = Command::new(program);
        command.args(args);
        if self.clear_env {
            command.env_clear();
        }
        if let Some(spec) = self.user {
            let user = user::resolve(spec)?;
            // Without root std cannot drop groups; the spawn then fails with EPERM, as it should.
            command
                .uid(user.uid)
                .gid(user.gid)
                .env("HOME", &user.home)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(cwd) = self.cwd {
            command.current_dir(cwd);
        }
        Ok(command)
    }

    /// The error reply for a failed spawn of [`Launch::command`].
    ///
    /// ENOENT and ENOTDIR do not say what is missing: the working directory (the child's
    /// `chdir`), the program, or an interpreter or loader the program names (its `execve`). So
    /// after such a failure (never on the way to a successful start) the agent looks: a working
    /// directory that does not resolve is [`ErrorKind::NotFound`] (as before, ENOTDIR there is
    /// [`ErrorKind::Io`]); a program that is neither at its path nor on the child's `PATH` is
    /// [`ErrorKind::ProgramNotFound`]; a program that exists is [`ErrorKind::NotFound`], with a
    /// message that says its interpreter or loader may be missing.
    pub(crate) fn spawn_error(&self, spawn: &io::Error) -> ErrorReply {
        let program = self.argv.first().map_or("", String::as_str);
        let context = format!("running {program:?}");
        if !matches!(spawn.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) {
            return io_error(&context, spawn);
        }
        if let Some(cwd) = self.cwd {
            let missing = match fs::metadata(cwd) {
                Ok(meta) => !meta.is_dir(),
                Err(e) => matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)),
            };
            if missing {
                return io_error(&format!("working directory {cwd:?}"), spawn);
            }
        }
        if self.program_exists(program) {
            return io_error(
                &format!("{context} (it exists: its interpreter or loader may be missing)"),
                spawn,
            );
        }
        let message = if program.contains('/') {
            format!("{context}: {spawn}")
        } else {
            format!("{context}: not found on PATH")
        };
        ErrorReply {
            kind: ErrorKind::ProgramNotFound,
            message,
            errno: spawn.raw_os_error(),
        }
    }

    /// Whether `program` names a file the way the child's `execvp` looks it up: a path (a
    /// relative one from the working directory), else a file in a directory of the child's
    /// `PATH`.
    fn program_exists(&self, program: &str) -> bool {
        let base = Path::new(self.cwd.unwrap_or("."));
        // Joining an absolute path replaces the base.
        let is_file = |path: &Path| fs::metadata(base.join(path)).is_ok_and(|m| !m.is_dir());
        if program.contains('/') {
            return is_file(Path::new(program));
        }
        if program.is_empty() {
            return false;
        }
        self.search_path()
            .as_bytes()
            .split(|&b| b == b':')
            .map(|dir| match dir {
                b"" => Path::new("."),
                dir => Path::new(OsStr::from_bytes(dir)),
            })
            .any(|dir| is_file(&dir.join(program)))
    }

    /// The `PATH` the child's environment holds (the request's, else the agent's unless
    /// cleared), or [`DEFAULT_PATH`] when it holds none.
    fn search_path(&self) -> OsString {
        let path = match self.env.iter().rev().find(|(key, _)| key == "PATH") {
            Some((_, value)) => Some(OsString::from(value)),
            None if self.clear_env => None,
            None => env::var_os("PATH"),
        };
        path.unwrap_or_else(|| DEFAULT_PATH.into())
    }
}

/// Runs an exec request to its end and returns its `Exited` reply (having sent `Started` and
/// the output).
pub fn run(
    ctx: &RequestContext,
    request: ExecRequest,
    input: Option<Receiver<Chunk>>,
) -> Result<Reply, ErrorReply> {
    let launch = Launch {
        argv: &request.argv,
        env: &request.env,
        clear_env: request.clear_env,
        cwd: request.cwd.as_deref(),
        user: request.user.as_deref(),
    };
    let mut command = launch.command()?;
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
        .reaper
        .spawn(&mut command)
        .map_err(|e| launch.spawn_error(&e))?;
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
