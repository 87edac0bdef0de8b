//! The host side of the guest agent (`forkvm-agent`, PID 1 of forkvm's Linux guest image): run
//! commands, move files and keep terminals open in a guest, over vsock.
//!
//! A crate of its own above `forkvm`: the VMM knows nothing of the agent. [`VmAgentExt::agent`]
//! (`use forkvm_agent_client::VmAgentExt` gives every [`forkvm::Vm`] `vm.agent(timeout)`)
//! connects to the agent of a VM (waiting for it to come up); [`Agent`] then runs
//! commands ([`Agent::exec`], [`Agent::run`], [`Agent::run_streaming`]), moves files
//! ([`Agent::write_file`], [`Agent::read_file`], [`Agent::stat`], ...) and opens PTY sessions
//! ([`Agent::pty`]). The wire protocol is `forkvm-agent-protocol`'s (documented there): one
//! connection carries many requests at once; a command with input and each PTY get a
//! connection of their own, so that a process that stops reading cannot hold up the others.
//!
//! Every connection starts with a Hello carrying the VM's generation
//! ([`forkvm::Identity`]), fresh host entropy and the host's time: in a fork child or
//! a restored VM (a new generation) the agent reseeds the guest's RNG and steps its clock before
//! it answers, so no request is served on stale randomness. A fork child's connections are its
//! own: [`VmAgentExt::agent`] on the child connects afresh (vsock connections do not survive a fork).
//!
//! Output nobody reads does not grow host memory: each request buffers at most
//! [`CALL_BUFFER`] bytes ([`Agent::with_buffer_limit`]), then the connection stops reading and
//! vsock credit stops the guest's writer (see `connection`). Requests on a VM that never started, stopped or ended fail at
//! once with [`forkvm::ErrorKind::NotStarted`] or [`forkvm::ErrorKind::NotRunning`], those
//! already waiting included; connection attempts take at most the rest of the caller's timeout.
#![warn(missing_debug_implementations)]

mod connection;
mod life;
mod process;
mod pty;
mod vm;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkvm_agent_protocol::{
    DirEntry, ErrorKind, ErrorReply, ExecRequest, FileStat, Kind, MAX_PAYLOAD, PowerAction,
    ProtocolError, PtyOpenRequest, Reply, Request, WriteFileRequest,
};

use self::connection::Connection;
pub use self::connection::{CALL_BUFFER, FRAME_COST, OVERCOMMIT};
use self::life::VmLife;
pub use self::process::{Process, ProcessEvent};
pub use self::pty::{Pty, PtyEvent};
pub use self::vm::VmAgentExt;
pub use forkvm_agent_protocol::{DirEntry as AgentDirEntry, ExitStatus, FileStat as AgentFileStat};

/// The kernel command line of forkvm's Linux image (`guest/image.sh`): its root file system is
/// the read-only ext4 disk `/dev/vda`, which the agent (PID 1) covers with an in-memory overlay.
/// `GLIBC_TUNABLES` (a word without a dot reaches init's environment, and the agent passes it on)
/// keeps glibc's AVX code paths off in every process: the guest kernel runs with `noxsave` on
/// hosts that emulate guest ring 0, and does not preserve AVX state across context switches
/// there (guest/README.md).
pub const IMAGE_CMDLINE: &str = "console=ttyS0 root=/dev/vda ro rootfstype=ext4 \
    init=/sbin/forkvm-agent GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512BW,\
-AVX512CD,-AVX512DQ,-AVX512VL,-AVX_VNNI,-FMA,-FMA4,-F16C";
/// Memory the image's guests get unless told otherwise.
pub const IMAGE_MEMORY_MIB: u64 = 256;

/// How long a request other than a command waits for the agent's answer by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request to the guest agent failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent did not answer in time (not booted yet, or no agent in this guest).
    #[error("the guest agent is not ready: {0}")]
    NotReady(String),
    /// The program to run (a command's or a PTY session's `argv[0]`) does not exist in the
    /// guest: not at its path, or not on `PATH`. (A missing working directory is
    /// [`AgentError::Agent`] with kind `NotFound`.)
    #[error("command not found in the guest: {0}")]
    CommandNotFound(String),
    /// The command or request did not finish within its timeout.
    #[error("timed out")]
    TimedOut,
    /// The connection to the agent ended (the VM stopped, was forked away from, or the agent
    /// died).
    #[error("the connection to the guest agent was lost")]
    ConnectionLost,
    /// The agent refused the request.
    #[error("the guest agent refused the request: {0}")]
    Agent(ErrorReply),
    /// The agent sent something this host does not understand.
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    /// The agent answered out of turn.
    #[error("unexpected answer from the guest agent: {0}")]
    Unexpected(String),
    /// A host-side I/O error (a socket, the file being uploaded or downloaded).
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The VM could not be reached (no vsock device, VM not running).
    #[error(transparent)]
    Vm(Box<forkvm::Error>),
}

impl AgentError {
    /// What kind of failure this is; for [`AgentError::Vm`], its VM error's kind.
    pub fn kind(&self) -> forkvm::ErrorKind {
        use forkvm::ErrorKind as K;
        match self {
            Self::NotReady(_) => K::AgentNotReady,
            Self::CommandNotFound(_) => K::CommandNotFound,
            Self::TimedOut => K::TimedOut,
            Self::ConnectionLost => K::ConnectionLost,
            Self::Agent(_) | Self::Protocol(_) | Self::Unexpected(_) => K::Agent,
            Self::Io(_) => K::Io,
            Self::Vm(error) => error.kind(),
        }
    }
}

impl From<ProtocolError> for AgentError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Closed => Self::ConnectionLost,
            ProtocolError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Self::ConnectionLost
            }
            e => Self::Protocol(e),
        }
    }
}

/// Opens a new stream to the agent (a vsock connection, or any stream speaking the protocol),
/// taking at most the given time (the rest of the caller's timeout).
pub type Connector = Arc<dyn Fn(Duration) -> std::io::Result<UnixStream> + Send + Sync>;

/// A command to run in the guest.
#[derive(Clone, Debug, Default)]
pub struct Command {
    request: ExecRequest,
    input: Option<Vec<u8>>,
}

impl Command {
    /// Runs `argv[0]` (looked up in the guest's `PATH`) with `argv`.
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        Self {
            request: ExecRequest {
                argv: argv.into_iter().map(Into::into).collect(),
                ..ExecRequest::default()
            },
            input: None,
        }
    }

    /// Sets an environment variable (on top of the agent's environment).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.env.push((key.into(), value.into()));
        self
    }

    /// Starts from an empty environment instead of the agent's.
    pub fn clear_env(mut self) -> Self {
        self.request.clear_env = true;
        self
    }

    /// The working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// Runs as this guest user (name or numeric id).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.request.user = Some(user.into());
        self
    }

    /// What the command reads on standard input (else it reads nothing: `/dev/null`).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.request.stdin = true;
        self.input = Some(input.into());
        self
    }

    /// Kills the command (its whole process group) if it runs longer than `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.request.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
}

/// Which output stream a chunk of [`Agent::run_streaming`] output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a command printed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// Its exit code, or the signal that ended it; `timed_out` if its timeout killed it.
    pub status: ExitStatus,
}

impl ExecOutput {
    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status.code == Some(0)
    }

    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// How [`Agent::write_file`] writes.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// Appends instead of truncating.
    pub append: bool,
    /// Fails if the file exists.
    pub exclusive: bool,
    /// Permission bits of a file it creates (default 0644).
    pub mode: Option<u32>,
}

/// A connected guest agent. Cheap to clone; every clone shares the connection. `Send + Sync`:
/// threads may make requests at once.
#[derive(Clone)]
pub struct Agent {
    connector: Connector,
    generation: u64,
    shared: Arc<Connection>,
    timeout: Duration,
    /// Bytes each request may hold for its caller ([`CALL_BUFFER`] by default).
    buffer_limit: usize,
    /// The VM's life, for an agent reached through [`VmAgentExt::agent`]: its connections end
    /// with the VM.
    life: Option<Arc<VmLife>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Connects through `connector` to an agent in a VM of `generation`, taking at most
    /// `timeout` for the connection and its Hello together (a single attempt:
    /// [`VmAgentExt::agent`] retries while the guest boots).
    pub fn connect(
        connector: Connector,
        generation: u64,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        Self::open(connector, generation, timeout, timeout, None)
    }

    /// [`Agent::connect`] with at most `dial` for the connection, `timeout` in all, and the
    /// VM's `life`.
    fn open(
        connector: Connector,
        generation: u64,
        dial: Duration,
        timeout: Duration,
        life: Option<Arc<VmLife>>,
    ) -> Result<Self, AgentError> {
        let started = Instant::now();
        let stream =
            connector(dial.min(timeout)).map_err(|e| AgentError::NotReady(e.to_string()))?;
        let left = timeout.saturating_sub(started.elapsed());
        let shared = Arc::new(Connection::open(stream, generation, left, life.as_deref())?);
        Ok(Self {
            connector,
            generation,
            shared,
            timeout: DEFAULT_REQUEST_TIMEOUT,
            buffer_limit: CALL_BUFFER,
            life,
        })
    }

    /// The same agent with another timeout for requests other than commands (commands have
    /// their own, [`Command::timeout`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same agent with another bound on what each request may hold of output its caller has
    /// not read ([`CALL_BUFFER`] by default; a request may hold [`OVERCOMMIT`] times as much while
    /// another request on its connection waits for an answer). Beyond it the host stops reading
    /// and the guest's writes wait. It applies to the connection this agent shares with its
    /// clones and to the connections it opens from now on (commands with input, PTYs).
    pub fn with_buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_limit = bytes;
        self.shared.set_buffer_limit(bytes);
        self
    }

    /// Whether the shared connection is still up.
    pub fn is_connected(&self) -> bool {
        self.shared.is_open()
    }

    /// A connection of its own, for a command with input or a PTY: made within the request
    /// timeout; at once [`forkvm::Error::NotRunning`] once the VM ended.
    fn own_connection(&self) -> Result<Arc<Connection>, AgentError> {
        if let Some(life) = &self.life {
            life.check()?;
        }
        let started = Instant::now();
        let stream = (self.connector)(self.timeout).map_err(|e| self.dial_error(e))?;
        let connection = Connection::open(
            stream,
            self.generation,
            self.timeout.saturating_sub(started.elapsed()),
            self.life.as_deref(),
        )?;
        connection.set_buffer_limit(self.buffer_limit);
        Ok(Arc::new(connection))
    }

    /// Why a connection could not be made: the VM's end if it came meanwhile, else `error`.
    fn dial_error(&self, error: std::io::Error) -> AgentError {
        match self.life.as_ref().map(|life| life.check()) {
            Some(Err(ended)) => ended,
            _ => AgentError::Io(error),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.timeout)
    }

    /// Sends `request` on the shared connection and waits for its one reply.
    fn ask(&self, request: &Request) -> Result<Reply, AgentError> {
        let call = self.shared.start(request)?;
        call.reply(self.deadline())
    }

    /// Checks that the agent answers; returns how long it has been up.
    pub fn ping(&self) -> Result<Duration, AgentError> {
        match self.ask(&Request::Ping)? {
            Reply::Pong { uptime_ms, .. } => Ok(Duration::from_millis(uptime_ms)),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs `argv` and returns its output and status.
    pub fn exec<S: Into<String>>(
        &self,
        argv: impl IntoIterator<Item = S>,
    ) -> Result<ExecOutput, AgentError> {
        self.run(&Command::new(argv))
    }

    /// Runs `command` and returns its output and status. A command that runs longer than its
    /// timeout is killed and reported with `status.timed_out` set (not as an error). A program
    /// that does not exist in the guest is [`AgentError::CommandNotFound`].
    pub fn run(&self, command: &Command) -> Result<ExecOutput, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = self.run_streaming(command, |stream, bytes| match stream {
            Stream::Stdout => stdout.extend_from_slice(bytes),
            Stream::Stderr => stderr.extend_from_slice(bytes),
        })?;
        Ok(ExecOutput {
            stdout,
            stderr,
            status,
        })
    }

    /// Runs `command`, handing `output` each chunk of its output as the guest produces it, and
    /// returns how it ended.
    pub fn run_streaming(
        &self,
        command: &Command,
        mut output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitStatus, AgentError> {
        // A command with input gets its own connection: one that stops reading must not hold
        // up the shared one.
        let process = match &command.input {
            Some(input) => {
                let process = Process::start(self.own_connection()?, command, self.deadline())?;
                process.call.send_data(input)?;
                process.call.send_eof()?;
                process
            }
            None => Process::start(self.shared.clone(), command, self.deadline())?,
        };
        process.wait(&mut output)
    }

    /// Starts `command` and returns at once with a handle to it, on a connection of its own:
    /// feed its standard input as you go, read its output as it comes, signal it. Its standard
    /// input is a pipe whatever [`Command::stdin`] says (what that gave is written first).
    pub fn spawn(&self, command: &Command) -> Result<Process, AgentError> {
        let mut piped = command.clone();
        piped.request.stdin = true;
        let process = Process::start(self.own_connection()?, &piped, self.deadline())?;
        if let Some(input) = &command.input {
            process.call.send_data(input)?;
        }
        Ok(process)
    }

    /// Writes what `data` yields to the guest file `path` (created with `options.mode`, else
    /// 0644); returns how many bytes were written.
    pub fn write_file(
        &self,
        path: &str,
        mut data: impl Read,
        options: WriteOptions,
    ) -> Result<u64, AgentError> {
        let call = self.shared.start(&Request::WriteFile(WriteFileRequest {
            path: path.to_owned(),
            append: options.append,
            exclusive: options.exclusive,
            mode: options.mode,
        }))?;
        let mut chunk = vec![0u8; MAX_PAYLOAD];
        loop {
            let n = match data.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AgentError::Io(e)),
            };
            call.send_data(&chunk[..n])?;
        }
        call.send_eof()?;
        match call.reply(self.deadline())? {
            Reply::Written { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads the guest file `path` whole.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, AgentError> {
        let mut bytes = Vec::new();
        self.read_file_to(path, &mut bytes)?;
        Ok(bytes)
    }

    /// Streams the guest file `path` into `to`; returns how many bytes came.
    pub fn read_file_to(&self, path: &str, mut to: impl Write) -> Result<u64, AgentError> {
        let call = self.shared.start(&Request::ReadFile {
            path: path.to_owned(),
            offset: 0,
            len: None,
        })?;
        loop {
            let frame = call.next(self.deadline())?;
            match frame.kind {
                Kind::Data => to.write_all(&frame.payload).map_err(AgentError::Io)?,
                Kind::Control => {
                    return match frame.decode::<Reply>()? {
                        Reply::ReadDone { bytes } => Ok(bytes),
                        Reply::Error(error) => Err(AgentError::Agent(error)),
                        other => Err(unexpected(&other)),
                    };
                }
                Kind::Stderr | Kind::Eof => {
                    return Err(AgentError::Unexpected(format!(
                        "{:?} frame in a file read",
                        frame.kind
                    )));
                }
            }
        }
    }

    /// Type, size, mode, owner and times of the guest path `path`.
    pub fn stat(&self, path: &str) -> Result<FileStat, AgentError> {
        match self.ask(&Request::Stat {
            path: path.to_owned(),
        })? {
            Reply::Stat(stat) => Ok(stat),
            other => Err(unexpected(&other)),
        }
    }

    /// The entries of the guest directory `path`.
    pub fn list(&self, path: &str) -> Result<Vec<DirEntry>, AgentError> {
        match self.ask(&Request::List {
            path: path.to_owned(),
        })? {
            Reply::Entries { entries } => Ok(entries),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates the guest directory `path` (and its parents with `parents`).
    pub fn mkdir(&self, path: &str, parents: bool) -> Result<(), AgentError> {
        self.expect_ok(&Request::Mkdir {
            path: path.to_owned(),
            parents,
            mode: None,
        })
    }

    /// Removes the guest file or (with `recursive`, non-empty) directory `path`.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), AgentError> {
        self.expect_ok(&Request::Remove {
            path: path.to_owned(),
            recursive,
        })
    }

    /// Renames the guest path `from` to `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
        })
    }

    /// Opens a PTY session running `argv` with a terminal of `rows` × `cols`. A program that
    /// does not exist in the guest is [`AgentError::CommandNotFound`].
    pub fn pty<S: Into<String>>(
        &self,
        argv: impl IntoIterator<Item = S>,
        rows: u16,
        cols: u16,
    ) -> Result<Pty, AgentError> {
        let request = Request::PtyOpen(PtyOpenRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            user: None,
            rows,
            cols,
        });
        Pty::open(self.clone(), self.own_connection()?, &request)
    }

    /// Attaches to the PTY session `session` (opened earlier, maybe by a handle since dropped,
    /// or before a fork); output it produced meanwhile comes first.
    pub fn pty_attach(&self, session: u64) -> Result<Pty, AgentError> {
        Pty::open(
            self.clone(),
            self.own_connection()?,
            &Request::PtyAttach { session },
        )
    }

    /// Asks the agent to power the guest off or reboot it.
    pub fn shutdown(&self, action: PowerAction) -> Result<(), AgentError> {
        self.expect_ok(&Request::Shutdown { action })
    }

    fn expect_ok(&self, request: &Request) -> Result<(), AgentError> {
        match self.ask(request)? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
}

/// `error`, or [`AgentError::CommandNotFound`] when the agent says that the program `argv[0]`
/// does not exist ([`ErrorKind::ProgramNotFound`]).
fn program_not_found(error: AgentError, argv: &[String]) -> AgentError {
    match error {
        AgentError::Agent(error) if error.kind == ErrorKind::ProgramNotFound => {
            let program = argv.first().map_or("", String::as_str);
            AgentError::CommandNotFound(format!("{program}: {}", error.message))
        }
        other => other,
    }
}

fn unexpected(reply: &Reply) -> AgentError {
    AgentError::Unexpected(format!("{reply:?}"))
}

#[cfg(test)]
mod kind_tests {
    use forkvm_agent_protocol::{ErrorKind as ReplyKind, ErrorReply, ProtocolError};

    use super::AgentError;

    #[test]
    fn agent_errors_have_their_kind_and_a_vm_error_its_own() {
        use forkvm::ErrorKind as K;
        let reply = ErrorReply {
            kind: ReplyKind::NotFound,
            message: "no".into(),
            errno: None,
        };
        for (error, kind) in [
            (AgentError::NotReady("no".into()), K::AgentNotReady),
            (AgentError::CommandNotFound("x".into()), K::CommandNotFound),
            (AgentError::TimedOut, K::TimedOut),
            (AgentError::ConnectionLost, K::ConnectionLost),
            (AgentError::Agent(reply), K::Agent),
            (
                AgentError::Protocol(ProtocolError::UnknownKind(9)),
                K::Agent,
            ),
            (AgentError::Unexpected("x".into()), K::Agent),
            (
                AgentError::Io(std::io::Error::from_raw_os_error(libc::ENOENT)),
                K::Io,
            ),
            (
                AgentError::Vm(Box::new(forkvm::Error::NoVsock)),
                K::NoDevice,
            ),
            (
                AgentError::Vm(Box::new(forkvm::Error::KvmMissing("/x".into()))),
                K::Kvm,
            ),
            (
                AgentError::Vm(Box::new(forkvm::Error::NotRunning(Box::new(None)))),
                K::NotRunning,
            ),
        ] {
            assert_eq!(error.kind(), kind, "{error:?}");
        }
    }

    /// An agent error wrapping a VM error prints the VM error's causes once.
    #[test]
    fn a_vm_error_inside_an_agent_error_keeps_its_chain() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let vm = forkvm::Error::BlockImage {
            path: "/x".into(),
            source: io,
        };
        let agent = AgentError::Vm(Box::new(vm));
        let chain = forkvm::error_chain(&agent);
        assert!(chain.starts_with("cannot open disk image /x: "), "{chain}");
        assert_eq!(
            chain
                .matches(&std::io::Error::from_raw_os_error(libc::ENOENT).to_string())
                .count(),
            1,
            "{chain}"
        );
    }
}
