//! Commands whose output arrives as it is produced: `vm.execStreaming` (a callback per chunk)
//! and `vm.spawn` (a `Process` handle: feed its input, read its output, signal it, wait for it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use forkvm_agent_client::{ExecOutput, ExitStatus, ProcessEvent as Event, Stream};
use napi::bindgen_prelude::{Buffer, Either};
use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::{Env, JsFunction, JsObject, JsUnknown, Status, ValueType};
use napi_derive::napi;

use crate::agent::{ExecOptions, ExitInfo, agent, bytes, command, exec_to_js};
use crate::convert;
use crate::error::{Failure, Outcome, sync};
use crate::task::{spawn, spawn_run};
use crate::vm::VM;

/// What `Process.read` got: a chunk of output, or the process's end.
#[napi(object)]
pub struct ProcessEvent {
    /// The stream a chunk of output came from.
    #[napi(ts_type = "'stdout' | 'stderr'")]
    pub stream: Option<String>,
    /// The chunk of output.
    pub data: Option<Buffer>,
    /// The process ended.
    pub exit: Option<ExitInfo>,
}

/// A lock whose holder may have panicked (the data stays consistent: every holder only reads
/// or replaces it whole).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The name JS sees for `stream`.
fn stream_name(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
    }
}

/// How many chunks of an `execStreaming` reached the JS thread, so that its promise settles
/// only after every chunk's callback ran.
#[derive(Default)]
struct Delivered {
    state: Mutex<Tally>,
    changed: Condvar,
}

#[derive(Default)]
struct Tally {
    /// Chunks handed to the callback.
    count: u64,
    /// The threadsafe function is gone (node tears the environment down): no more will come.
    closed: bool,
}

impl Delivered {
    /// Waits until `sent` chunks were handed to the callback (or none ever will be again).
    fn wait_for(&self, sent: u64) {
        let mut tally = lock(&self.state);
        while tally.count < sent && !tally.closed {
            tally = self.changed.wait(tally).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn update(&self, f: impl FnOnce(&mut Tally)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }
}

/// Counts chunks on the JS thread; owned by the threadsafe function's callback, so dropping it
/// means node finalized the function.
struct Counter(Arc<Delivered>);

impl Counter {
    fn tick(&self) {
        self.0.update(|t| t.count += 1);
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.0.update(|t| t.closed = true);
    }
}

fn exit_to_js(_: Env, status: ExitStatus) -> napi::Result<ExitInfo> {
    Ok(status.into())
}

/// Chunks of output (each at most the agent's 1 MiB frame, 64 KiB in practice) waiting for
/// `onOutput`, at most: when the JS thread falls behind, the command's worker thread waits, the
/// agent client stops reading and the guest's writes wait (host memory stays bounded).
const OUTPUT_QUEUE: usize = 64;

#[napi]
impl VM {
    /// Runs `argv` in the guest, calling `onOutput(stream, data)` on the JS thread with each
    /// chunk of its output, in order, as the guest produces it; resolves with how it ended,
    /// after the last call. An exception thrown by `onOutput` stops the calls and rejects the
    /// promise once the command has ended.
    #[napi(ts_return_type = "Promise<ExitInfo>")]
    pub fn exec_streaming(
        &self,
        env: Env,
        argv: Vec<String>,
        #[napi(ts_arg_type = "(stream: 'stdout' | 'stderr', data: Buffer) => void")]
        on_output: JsUnknown,
        options: Option<ExecOptions>,
    ) -> napi::Result<JsObject> {
        // Checked here: napi hands any value on as a `JsFunction`, and a threadsafe function
        // made from something else aborts node when it is released.
        let on_output = sync(env, || match on_output.get_type()? {
            // SAFETY: the value's type was checked to be a function.
            ValueType::Function => Ok(unsafe { on_output.cast::<JsFunction>() }),
            other => Err(Failure::new(
                "INVALID_TYPE",
                format!("onOutput must be a function, not {other}"),
            )),
        })?;
        let vm = self.get();
        let command = sync(env, || command(argv, options))?;
        let delivered = Arc::new(Delivered::default());
        let counter = Counter(delivered.clone());
        let tsfn: ThreadsafeFunction<(Stream, Vec<u8>), ErrorStrategy::Fatal> = on_output
            .create_threadsafe_function(
                OUTPUT_QUEUE,
                move |ctx: ThreadSafeCallContext<(Stream, Vec<u8>)>| {
                    // Counted before the callback runs, but it runs at once, on the JS thread: the
                    // promise's settlement, queued after this, can only follow it.
                    counter.tick();
                    let (stream, data) = ctx.value;
                    let stream = ctx.env.create_string(stream_name(stream))?;
                    let data = ctx.env.create_buffer_with_data(data)?.into_raw();
                    Ok::<_, napi::Error>(vec![stream.into_unknown(), data.into_unknown()])
                },
            )?;
        spawn(
            env,
            move || {
                let mut sent = 0;
                let status = agent(vm)?.run_streaming(&command, |stream, data| {
                    // Waits for room in the queue (on this worker thread, never the JS one).
                    let queued = tsfn.call(
                        (stream, data.to_vec()),
                        ThreadsafeFunctionCallMode::Blocking,
                    );
                    if queued == Status::Ok {
                        sent += 1;
                    }
                });
                delivered.wait_for(sent);
                drop(tsfn);
                Ok(status?)
            },
            exit_to_js,
        )
    }

    /// Starts `argv` in the guest and resolves with a handle to it, on a connection of its
    /// own: feed its standard input as you go (a pipe; `options.stdin` is written first), read
    /// its output as it comes, signal it, wait for it. `options` are those of `exec`.
    #[napi(ts_return_type = "Promise<Process>")]
    pub fn spawn(
        &self,
        env: Env,
        argv: Vec<String>,
        options: Option<ExecOptions>,
    ) -> napi::Result<JsObject> {
        let vm = self.get();
        let command = sync(env, || command(argv, options))?;
        spawn(env, move || Ok(agent(vm)?.spawn(&command)?), process_to_js)
    }
}

fn process_to_js(_: Env, process: forkvm_agent_client::Process) -> napi::Result<Process> {
    Ok(Process {
        pid: process.pid(),
        running: RwLock::new(Some(Arc::new(Running {
            process,
            exit: Mutex::new(None),
            ended: AtomicBool::new(false),
        }))),
    })
}

/// A spawned process and how it ended, once that was read.
struct Running {
    process: forkvm_agent_client::Process,
    /// Its end, once `read` or `wait` saw it (the agent says it once; later calls answer with
    /// it again). Held while waiting for its next event: reads and waits take turns.
    exit: Mutex<Option<ExitStatus>>,
    /// `exit` is set (readable while a read holds `exit`).
    ended: AtomicBool,
}

impl Running {
    /// Its next output or its end (`None` if nothing came within `timeout`).
    fn next(&self, timeout: Option<Duration>) -> Outcome<Option<Event>> {
        let mut exit = lock(&self.exit);
        if let Some(status) = *exit {
            return Ok(Some(Event::Exited(status)));
        }
        let event = self.process.next(timeout)?;
        if let Some(Event::Exited(status)) = &event {
            *exit = Some(*status);
            self.ended.store(true, Ordering::Release);
        }
        Ok(event)
    }

    /// The output not read yet and its end, once it ends.
    fn wait(&self) -> Outcome<ExecOutput> {
        let mut exit = lock(&self.exit);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let status = match *exit {
            Some(status) => status,
            None => self.process.wait(|stream, data| match stream {
                Stream::Stdout => stdout.extend_from_slice(data),
                Stream::Stderr => stderr.extend_from_slice(data),
            })?,
        };
        *exit = Some(status);
        self.ended.store(true, Ordering::Release);
        Ok(ExecOutput {
            stdout,
            stderr,
            status,
        })
    }
}

fn event_to_js(_: Env, event: Option<Event>) -> napi::Result<Option<ProcessEvent>> {
    Ok(event.map(|event| match event {
        Event::Output(stream, data) => ProcessEvent {
            stream: Some(stream_name(stream).into()),
            data: Some(data.into()),
            exit: None,
        },
        Event::Exited(status) => ProcessEvent {
            stream: None,
            data: None,
            exit: Some(status.into()),
        },
    }))
}

/// A command running in the guest (`vm.spawn`). `close()` — or garbage collection of the
/// object — kills it if it still runs and lets its connection go.
#[napi]
pub struct Process {
    pid: u32,
    running: RwLock<Option<Arc<Running>>>,
}

impl Process {
    fn get(&self) -> Outcome<Arc<Running>> {
        let guard = self.running.read().unwrap_or_else(|e| e.into_inner());
        guard.clone().ok_or_else(|| Failure::closed("process"))
    }
}

#[napi]
impl Process {
    /// Its process id in the guest.
    #[napi(getter)]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Writes `data` to its standard input.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn write_stdin(&self, env: Env, data: Either<Buffer, String>) -> napi::Result<JsObject> {
        let running = self.get();
        let data = bytes(data);
        spawn_run(env, move || Ok(running?.process.write_stdin(&data)?))
    }

    /// Closes its standard input: it reads end-of-file.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close_stdin(&self, env: Env) -> napi::Result<JsObject> {
        let running = self.get();
        spawn_run(env, move || Ok(running?.process.close_stdin()?))
    }

    /// Its next chunk of output (`{stream, data}`) or its end (`{exit}`, again for every later
    /// call); `null` if nothing came within `timeoutMs` (default: no limit). Reads and `wait()`
    /// take turns.
    #[napi(ts_return_type = "Promise<ProcessEvent | null>")]
    pub fn read(&self, env: Env, timeout_ms: Option<f64>) -> napi::Result<JsObject> {
        let running = self.get();
        let timeout = sync(env, || {
            timeout_ms
                .map(|ms| convert::millis(ms, "timeoutMs"))
                .transpose()
        })?;
        spawn(env, move || running?.next(timeout), event_to_js)
    }

    /// Sends `signal` (a number, e.g. `os.constants.signals.SIGTERM`) to its process group.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn signal(&self, env: Env, signal: i32) -> napi::Result<JsObject> {
        let running = self.get();
        spawn_run(env, move || Ok(running?.process.signal(signal)?))
    }

    /// Kills it (`SIGKILL` to its process group).
    #[napi(ts_return_type = "Promise<void>")]
    pub fn kill(&self, env: Env) -> napi::Result<JsObject> {
        let running = self.get();
        spawn_run(env, move || Ok(running?.process.kill()?))
    }

    /// Waits for its end; resolves with the output not read yet and how it ended (as `exec`).
    #[napi(ts_return_type = "Promise<ExecResult>")]
    pub fn wait(&self, env: Env) -> napi::Result<JsObject> {
        let running = self.get();
        spawn(env, move || running?.wait(), exec_to_js)
    }

    /// Kills it if it still runs and lets the handle go; later calls fail with code `CLOSED`
    /// (calls in flight finish: a pending `read()` gets the rest of its output and its end).
    /// Closing twice is fine.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self, env: Env) -> napi::Result<JsObject> {
        let running = self
            .running
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        spawn_run(env, move || {
            if let Some(running) = running
                && !running.ended.load(Ordering::Acquire)
            {
                // It may have ended unseen, or the VM gone: nothing left to kill then.
                let _ = running.process.kill();
            }
            Ok(())
        })
    }
}
