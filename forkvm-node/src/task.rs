//! Blocking work off the JS thread: every call that may wait (start, wait, stop, pause, fork,
//! snapshot, agent requests) runs as a napi `AsyncTask` on libuv's thread pool and settles a
//! promise.

use std::panic::{AssertUnwindSafe, catch_unwind};

use napi::bindgen_prelude::{AsyncTask, ToNapiValue, TypeName};
use napi::{Env, JsObject, Task};

use crate::error::{Failure, Outcome};

/// Work for the thread pool and how its result becomes a JS value.
pub struct Blocking<T: Send + 'static, J: ToNapiValue + TypeName> {
    work: Option<Box<dyn FnOnce() -> Outcome<T> + Send>>,
    to_js: fn(Env, T) -> napi::Result<J>,
}

/// A promise settled by `work` (run on the thread pool), its value made by `to_js`.
pub fn blocking<T: Send + 'static, J: ToNapiValue + TypeName>(
    work: impl FnOnce() -> Outcome<T> + Send + 'static,
    to_js: fn(Env, T) -> napi::Result<J>,
) -> AsyncTask<Blocking<T, J>> {
    AsyncTask::new(Blocking {
        work: Some(Box::new(work)),
        to_js,
    })
}

/// A promise for `work`'s value as it is.
pub fn run<T: Send + ToNapiValue + TypeName + 'static>(
    work: impl FnOnce() -> Outcome<T> + Send + 'static,
) -> AsyncTask<Blocking<T, T>> {
    blocking(work, |_, value| Ok(value))
}

impl<T: Send + 'static, J: ToNapiValue + TypeName> Task for Blocking<T, J> {
    type Output = Outcome<T>;
    type JsValue = J;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        let Some(work) = self.work.take() else {
            return Ok(Err(Failure::new("OTHER", "task ran twice")));
        };
        // A panic in forkvm rejects the promise instead of aborting node.
        Ok(unwind(work))
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> napi::Result<J> {
        match output {
            Ok(value) => (self.to_js)(env, value),
            Err(failure) => Err(failure.into_napi(env)),
        }
    }
}

/// A promise settled by `work` run on a thread of its own, its value made by `to_js` on the JS
/// thread: for calls that may wait long (a VM's end, anything asking the guest agent). On
/// libuv's pool (four threads by default) each would hold a pool thread while it waits, so four
/// pending `wait()`s would hold up every later `stop()` — and with it their own end.
pub fn spawn<T: Send + 'static, J: ToNapiValue + 'static>(
    env: Env,
    work: impl FnOnce() -> Outcome<T> + Send + 'static,
    to_js: fn(Env, T) -> napi::Result<J>,
) -> napi::Result<JsObject> {
    let (deferred, promise) = env.create_deferred()?;
    std::thread::Builder::new()
        .name("forkvm-node-call".into())
        .spawn(move || {
            let outcome = unwind(work);
            deferred.resolve(move |env| match outcome {
                Ok(value) => to_js(env, value),
                Err(failure) => Err(failure.into_napi(env)),
            });
        })
        .map_err(|e| Failure::new("OTHER", format!("cannot start a thread: {e}")).into_napi(env))?;
    Ok(promise)
}

/// [`spawn`] for a value that is its own JS value.
pub fn spawn_run<T: Send + ToNapiValue + 'static>(
    env: Env,
    work: impl FnOnce() -> Outcome<T> + Send + 'static,
) -> napi::Result<JsObject> {
    spawn(env, work, |_, value| Ok(value))
}

/// Runs `work`, turning a panic into a `PANIC` failure instead of unwinding into node.
fn unwind<T>(work: impl FnOnce() -> Outcome<T>) -> Outcome<T> {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Failure::new(
            "PANIC",
            format!("internal error in forkvm: {what}"),
        ))
    })
}
