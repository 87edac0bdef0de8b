//! The guest agent (forkvm's Linux image): commands, files and PTY sessions, reached through
//! the VM's vsock device. Every request runs on the thread pool.

use forkvm_agent_client::VmAgentExt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use forkvm_agent_client::{
    AgentDirEntry, AgentFileStat, Command, DEFAULT_REQUEST_TIMEOUT, ExitStatus,
};
use napi::bindgen_prelude::{Buffer, Either};
use napi::{Env, JsObject};
use napi_derive::napi;

use crate::convert;
use crate::error::{Failure, Outcome, sync};
use crate::task::{spawn, spawn_run};
use crate::vm::VM;

/// How to run a command.
#[napi(object)]
pub struct ExecOptions {
    /// Its standard input.
    #[napi(ts_type = "Buffer | string")]
    pub stdin: Option<Either<Buffer, String>>,
    /// Environment variables added to the agent's.
    pub env: Option<std::collections::HashMap<String, String>>,
    /// Start with an empty environment (then `env`).
    pub clear_env: Option<bool>,
    /// Its working directory.
    pub cwd: Option<String>,
    /// The user to run it as.
    pub user: Option<String>,
    /// Kill it after this many milliseconds (then `timedOut` is set).
    pub timeout_ms: Option<f64>,
}

/// What a command printed and how it ended.
#[napi(object)]
pub struct ExecResult {
    /// Its standard output.
    pub stdout: Buffer,
    /// Its standard error.
    pub stderr: Buffer,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Its timeout killed it.
    pub timed_out: bool,
}

/// How a program ended.
#[napi(object)]
pub struct ExitInfo {
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Its timeout killed it.
    pub timed_out: bool,
}

impl From<ExitStatus> for ExitInfo {
    fn from(status: ExitStatus) -> Self {
        Self {
            exit_code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
        }
    }
}

/// How to write a guest file.
#[napi(object)]
pub struct WriteFileOptions {
    /// Append instead of truncating.
    pub append: Option<bool>,
    /// Fail if the file exists.
    pub exclusive: Option<bool>,
    /// Permission bits of a file it creates (default 0o644).
    pub mode: Option<u32>,
}

/// A guest file's type, size, mode, owner and modification time.
#[napi(object)]
pub struct FileStat {
    /// `'file'`, `'dir'`, `'symlink'` or `'other'`.
    pub file_type: String,
    /// Size in bytes.
    pub size: f64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: f64,
}

/// A guest directory entry.
#[napi(object)]
pub struct DirEntry {
    /// Its name.
    pub name: String,
    /// `'file'`, `'dir'`, `'symlink'` or `'other'`.
    pub file_type: String,
    /// Its size in bytes.
    pub size: f64,
}

/// What `Pty.read` got: output, or the program's end.
#[napi(object)]
pub struct PtyEvent {
    /// Output of the terminal.
    pub output: Option<Buffer>,
    /// The program ended (the session stays until `close()`).
    pub exit: Option<ExitInfo>,
}

fn file_type(t: forkvm_agent_protocol::FileType) -> String {
    use forkvm_agent_protocol::FileType as F;
    match t {
        F::File => "file",
        F::Dir => "dir",
        F::Symlink => "symlink",
        F::Other => "other",
    }
    .into()
}

/// The command `argv` with `options` (those of `exec`, `execStreaming` and `spawn`).
pub(crate) fn command(argv: Vec<String>, options: Option<ExecOptions>) -> Outcome<Command> {
    let mut command = Command::new(argv);
    if let Some(o) = options {
        if o.clear_env == Some(true) {
            command = command.clear_env();
        }
        for (key, value) in o.env.unwrap_or_default() {
            command = command.env(key, value);
        }
        if let Some(cwd) = o.cwd {
            command = command.cwd(cwd);
        }
        if let Some(user) = o.user {
            command = command.user(user);
        }
        if let Some(stdin) = o.stdin {
            command = command.stdin(bytes(stdin));
        }
        if let Some(ms) = o.timeout_ms {
            command = command.timeout(convert::millis(ms, "timeoutMs")?);
        }
    }
    Ok(command)
}

/// The VM's agent (fails if the VM was closed).
pub(crate) fn agent(vm: Outcome<Arc<forkvm::Vm>>) -> Outcome<forkvm_agent_client::Agent> {
    Ok(vm?.agent(DEFAULT_REQUEST_TIMEOUT)?)
}

pub(crate) fn exec_to_js(_: Env, out: forkvm_agent_client::ExecOutput) -> napi::Result<ExecResult> {
    Ok(ExecResult {
        stdout: out.stdout.into(),
        stderr: out.stderr.into(),
        exit_code: out.status.code,
        signal: out.status.signal,
        timed_out: out.status.timed_out,
    })
}

fn bytes_to_js(_: Env, bytes: Vec<u8>) -> napi::Result<Buffer> {
    Ok(bytes.into())
}

fn stat_to_js(_: Env, s: AgentFileStat) -> napi::Result<FileStat> {
    Ok(FileStat {
        file_type: file_type(s.file_type),
        size: s.size as f64,
        mode: s.mode,
        uid: s.uid,
        gid: s.gid,
        mtime_ms: s.mtime_ns as f64 / 1e6,
    })
}

fn list_to_js(_: Env, entries: Vec<AgentDirEntry>) -> napi::Result<Vec<DirEntry>> {
    Ok(entries
        .into_iter()
        .map(|e| DirEntry {
            name: e.name,
            file_type: file_type(e.file_type),
            size: e.size as f64,
        })
        .collect())
}

fn pty_to_js(_: Env, pty: forkvm_agent_client::Pty) -> napi::Result<Pty> {
    Ok(Pty {
        session: pty.session().try_into().unwrap_or(i64::MAX),
        pty: RwLock::new(Some(Arc::new(Mutex::new(pty)))),
    })
}

pub(crate) fn bytes(data: Either<Buffer, String>) -> Vec<u8> {
    match data {
        Either::A(buffer) => buffer.to_vec(),
        Either::B(text) => text.into_bytes(),
    }
}

#[napi]
impl VM {
    /// Waits (at most `timeoutMs`, default 60 s) until the guest agent answers.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn agent_ready(&self, env: Env, timeout_ms: Option<f64>) -> napi::Result<JsObject> {
        let vm = self.get();
        let timeout = sync(env, || {
            convert::millis_or(timeout_ms, "timeoutMs", DEFAULT_REQUEST_TIMEOUT)
        })?;
        spawn_run(env, move || Ok(vm?.agent(timeout).map(drop)?))
    }

    /// Checks that the guest agent answers; resolves with how long it has been up, in
    /// milliseconds.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn ping(&self, env: Env) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn_run(env, move || Ok(agent(vm)?.ping()?.as_secs_f64() * 1000.0))
    }

    /// Runs `argv` in the guest; resolves with its output and how it ended.
    #[napi(ts_return_type = "Promise<ExecResult>")]
    pub fn exec(
        &self,
        env: Env,
        argv: Vec<String>,
        options: Option<ExecOptions>,
    ) -> napi::Result<JsObject> {
        let vm = self.get();
        let command = sync(env, || command(argv, options))?;
        spawn(env, move || Ok(agent(vm)?.run(&command)?), exec_to_js)
    }

    /// Writes `data` to the guest file `path`; resolves with the bytes written.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn write_file(
        &self,
        env: Env,
        path: String,
        data: Either<Buffer, String>,
        options: Option<WriteFileOptions>,
    ) -> napi::Result<JsObject> {
        let vm = self.get();
        let data = bytes(data);
        let options =
            options.map_or_else(Default::default, |o| forkvm_agent_client::WriteOptions {
                append: o.append.unwrap_or(false),
                exclusive: o.exclusive.unwrap_or(false),
                mode: o.mode,
            });
        spawn_run(env, move || {
            Ok(agent(vm)?.write_file(&path, data.as_slice(), options)? as f64)
        })
    }

    /// Reads the guest file `path` whole.
    #[napi(ts_return_type = "Promise<Buffer>")]
    pub fn read_file(&self, env: Env, path: String) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn(env, move || Ok(agent(vm)?.read_file(&path)?), bytes_to_js)
    }

    /// Type, size, mode, owner and time of the guest path `path`.
    #[napi(ts_return_type = "Promise<FileStat>")]
    pub fn stat(&self, env: Env, path: String) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn(env, move || Ok(agent(vm)?.stat(&path)?), stat_to_js)
    }

    /// The entries of the guest directory `path`.
    #[napi(ts_return_type = "Promise<DirEntry[]>")]
    pub fn list(&self, env: Env, path: String) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn(env, move || Ok(agent(vm)?.list(&path)?), list_to_js)
    }

    /// Creates the guest directory `path` (and its parents with `parents`).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn mkdir(&self, env: Env, path: String, parents: Option<bool>) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn_run(env, move || {
            Ok(agent(vm)?.mkdir(&path, parents.unwrap_or(false))?)
        })
    }

    /// Removes the guest file or (with `recursive`) directory `path`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn remove(
        &self,
        env: Env,
        path: String,
        recursive: Option<bool>,
    ) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn_run(env, move || {
            Ok(agent(vm)?.remove(&path, recursive.unwrap_or(false))?)
        })
    }

    /// Renames the guest path `from` to `to`.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn rename(&self, env: Env, from: String, to: String) -> napi::Result<JsObject> {
        let vm = self.get();
        spawn_run(env, move || Ok(agent(vm)?.rename(&from, &to)?))
    }

    /// Asks the agent to power the guest off (`'poweroff'`) or reboot it (`'reboot'`, which
    /// ends a forkvm VM).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn shutdown(
        &self,
        env: Env,
        #[napi(ts_arg_type = "'poweroff' | 'reboot'")] action: String,
    ) -> napi::Result<JsObject> {
        use forkvm_agent_protocol::PowerAction;
        let (vm, action) = sync(env, || {
            let action = match action.as_str() {
                "poweroff" => PowerAction::PowerOff,
                "reboot" => PowerAction::Reboot,
                other => {
                    return Err(Failure::invalid(format!(
                        "action must be 'poweroff' or 'reboot', not {other:?}"
                    )));
                }
            };
            Ok((self.get(), action))
        })?;
        spawn_run(env, move || Ok(agent(vm)?.shutdown(action)?))
    }

    /// Opens a PTY session running `argv` on a `rows` × `cols` terminal (default 24 × 80).
    #[napi(ts_return_type = "Promise<Pty>")]
    pub fn pty(
        &self,
        env: Env,
        argv: Vec<String>,
        rows: Option<f64>,
        cols: Option<f64>,
    ) -> napi::Result<JsObject> {
        let (vm, rows, cols) = sync(env, || {
            let size = |v: Option<f64>, default: u16, what: &str| {
                v.map_or(Ok(default), |v| convert::u16_arg(v, what))
            };
            Ok((self.get(), size(rows, 24, "rows")?, size(cols, 80, "cols")?))
        })?;
        spawn(
            env,
            move || Ok(agent(vm)?.pty(argv, rows, cols)?),
            pty_to_js,
        )
    }

    /// Attaches to the PTY session `session` (opened earlier, maybe before a fork).
    #[napi(ts_return_type = "Promise<Pty>")]
    pub fn pty_attach(&self, env: Env, session: i64) -> napi::Result<JsObject> {
        let (vm, session) = sync(env, || {
            let session = u64::try_from(session)
                .map_err(|_| Failure::invalid("session must not be negative"))?;
            Ok((self.get(), session))
        })?;
        spawn(env, move || Ok(agent(vm)?.pty_attach(session)?), pty_to_js)
    }
}

/// A PTY session in the guest. Dropping the object detaches (the session runs on);
/// `close()` ends it.
#[napi]
pub struct Pty {
    session: i64,
    // The Rust handle is `Send` but not `Sync`: calls on one PTY take turns.
    pty: RwLock<Option<Arc<Mutex<forkvm_agent_client::Pty>>>>,
}

fn lock(
    pty: &Arc<Mutex<forkvm_agent_client::Pty>>,
) -> std::sync::MutexGuard<'_, forkvm_agent_client::Pty> {
    pty.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pty {
    fn get(&self) -> Outcome<Arc<Mutex<forkvm_agent_client::Pty>>> {
        let guard = self.pty.read().unwrap_or_else(|e| e.into_inner());
        guard.clone().ok_or_else(|| Failure::closed("PTY"))
    }
}

fn event_to_js(
    _: Env,
    event: Option<forkvm_agent_client::PtyEvent>,
) -> napi::Result<Option<PtyEvent>> {
    Ok(event.map(|event| match event {
        forkvm_agent_client::PtyEvent::Output(bytes) => PtyEvent {
            output: Some(bytes.into()),
            exit: None,
        },
        forkvm_agent_client::PtyEvent::Exited(status) => PtyEvent {
            output: None,
            exit: Some(status.into()),
        },
    }))
}

#[napi]
impl Pty {
    /// The session's id, for `vm.ptyAttach`.
    #[napi(getter)]
    pub fn session(&self, env: Env) -> napi::Result<i64> {
        sync(env, || self.get().map(|_| self.session))
    }

    /// Types `input` into the terminal.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn write(&self, env: Env, input: Either<Buffer, String>) -> napi::Result<JsObject> {
        let pty = self.get();
        let input = bytes(input);
        spawn_run(env, move || Ok(lock(&pty?).write(&input)?))
    }

    /// The next output or the program's end; `null` if nothing came within `timeoutMs`
    /// (default 1000).
    #[napi(ts_return_type = "Promise<PtyEvent | null>")]
    pub fn read(&self, env: Env, timeout_ms: Option<f64>) -> napi::Result<JsObject> {
        let pty = self.get();
        let timeout = sync(env, || {
            convert::millis_or(timeout_ms, "timeoutMs", Duration::from_millis(1000))
        })?;
        spawn(env, move || Ok(lock(&pty?).read(timeout)?), event_to_js)
    }

    /// Reads until the output contains `needle` (or `timeoutMs` passes, or the program ends);
    /// resolves with everything read.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn read_until(&self, env: Env, needle: String, timeout_ms: f64) -> napi::Result<JsObject> {
        let pty = self.get();
        let timeout = sync(env, || convert::millis(timeout_ms, "timeoutMs"))?;
        spawn_run(env, move || Ok(lock(&pty?).read_until(&needle, timeout)?))
    }

    /// Changes the terminal's size.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn resize(&self, env: Env, rows: f64, cols: f64) -> napi::Result<JsObject> {
        let (pty, rows, cols) = sync(env, || {
            let size = convert::u16_arg;
            Ok((self.get(), size(rows, "rows")?, size(cols, "cols")?))
        })?;
        spawn_run(env, move || Ok(lock(&pty?).resize(rows, cols)?))
    }

    /// Ends the session (kills its program). Fails with code `BUSY` while another call on
    /// this object is in flight; closing twice is fine.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self, env: Env) -> napi::Result<JsObject> {
        let pty = sync(env, || {
            let mut slot = self.pty.write().unwrap_or_else(|e| e.into_inner());
            match slot.take().map(Arc::try_unwrap) {
                None => Ok(None),
                Some(Ok(pty)) => Ok(Some(pty.into_inner().unwrap_or_else(|e| e.into_inner()))),
                Some(Err(shared)) => {
                    *slot = Some(shared);
                    Err(Failure::new(
                        "BUSY",
                        "another call on this PTY is in flight",
                    ))
                }
            }
        })?;
        spawn_run(env, move || match pty {
            Some(pty) => Ok(pty.close()?),
            None => Ok(()),
        })
    }
}
