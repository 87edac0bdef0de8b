//! Console sinks and sources from JS values: a [`ConsoleBuffer`], `'stdout'`, a file path,
//! `null` (discarded) or a function receiving `Buffer`s; input from `'stdin'` or a file
//! descriptor (duplicated: the caller keeps its own).

use std::os::fd::{BorrowedFd, RawFd};

use napi::bindgen_prelude::{Buffer, ClassInstance, FromNapiValue};
use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::{Env, JsFunction, JsString, JsUnknown, NapiRaw, ValueType};
use napi_derive::napi;

use crate::convert;
use crate::error::{Failure, Outcome, sync};

/// Console output kept in memory (the last `limit` bytes, 1 MiB by default), shared with the
/// VMs that write to it: pass it as a `console`, read it with `text()`.
#[napi]
pub struct ConsoleBuffer {
    pub(crate) inner: forkvm::ConsoleBuffer,
}

#[napi]
impl ConsoleBuffer {
    /// A buffer keeping the last `limit` bytes (default 1 MiB).
    #[napi(constructor)]
    pub fn new(env: Env, limit: Option<f64>) -> napi::Result<Self> {
        let inner = match limit {
            None => forkvm::ConsoleBuffer::new(),
            Some(limit) => {
                forkvm::ConsoleBuffer::with_limit(sync(env, || convert::usize_arg(limit, "limit"))?)
            }
        };
        Ok(Self { inner })
    }

    /// What the buffer holds, as text (invalid UTF-8 replaced).
    #[napi]
    pub fn text(&self) -> String {
        self.inner.text()
    }

    /// A copy of what the buffer holds.
    #[napi]
    pub fn contents(&self) -> Buffer {
        self.inner.contents().into()
    }

    /// Empties the buffer and returns what it held.
    #[napi]
    pub fn take(&self) -> Buffer {
        self.inner.take().into()
    }
}

/// Chunks of console output waiting for a JS callback, at most (each at most 64 KiB, the
/// virtio console's largest): beyond that, while the JS thread is busy, output is dropped as
/// a serial line with nobody listening would drop it. (Waiting instead would hold a vCPU, and a
/// JS thread waiting for that vCPU would never drain the queue.)
const CALLBACK_QUEUE: usize = 256;

/// The sink a JS value names: `undefined`/`null` discard, `'stdout'`, a path, a
/// [`ConsoleBuffer`], or a function called with each chunk (on the JS thread, through a
/// threadsafe function that does not keep node alive, with at most [`CALLBACK_QUEUE`] chunks
/// queued).
pub fn output(env: Env, value: Option<JsUnknown>, what: &str) -> Outcome<forkvm::ConsoleOutput> {
    let Some(value) = value else {
        return Ok(forkvm::ConsoleOutput::Discard);
    };
    match value.get_type()? {
        ValueType::Null | ValueType::Undefined => Ok(forkvm::ConsoleOutput::Discard),
        ValueType::String => {
            // SAFETY: the value's type was checked to be a string.
            let text = unsafe { value.cast::<JsString>() }
                .into_utf8()?
                .into_owned()?;
            Ok(if text == "stdout" {
                forkvm::ConsoleOutput::Stdout
            } else {
                forkvm::ConsoleOutput::File(text.into())
            })
        }
        ValueType::Function => {
            // SAFETY: the value's type was checked to be a function.
            let function = unsafe { value.cast::<JsFunction>() };
            let mut tsfn: ThreadsafeFunction<Vec<u8>, ErrorStrategy::Fatal> = function
                .create_threadsafe_function(
                    CALLBACK_QUEUE,
                    |ctx: ThreadSafeCallContext<Vec<u8>>| Ok(vec![Buffer::from(ctx.value)]),
                )?;
            tsfn.unref(&env)?;
            Ok(forkvm::ConsoleOutput::Callback(Box::new(move |bytes| {
                tsfn.call(bytes.to_vec(), ThreadsafeFunctionCallMode::NonBlocking);
            })))
        }
        ValueType::Object if ConsoleBuffer::instance_of(env, &value)? => {
            // SAFETY: the value was checked to be an instance of the ConsoleBuffer class, so
            // what it wraps is a `ConsoleBuffer`.
            let buffer =
                unsafe { ClassInstance::<ConsoleBuffer>::from_napi_value(env.raw(), value.raw()) }?;
            Ok(forkvm::ConsoleOutput::Buffer(buffer.inner.clone()))
        }
        other => Err(Failure::new(
            "INVALID_TYPE",
            format!(
                "{what} must be a ConsoleBuffer, 'stdout', a file path, null or a function, not {other}"
            ),
        )),
    }
}

/// The source a JS value names: `'stdin'` or a file descriptor number (duplicated).
pub fn input(value: Option<JsUnknown>, what: &str) -> Outcome<Option<forkvm::ConsoleInput>> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.get_type()? {
        ValueType::Null | ValueType::Undefined => Ok(None),
        ValueType::String => {
            // SAFETY: the value's type was checked to be a string.
            let text = unsafe { value.cast::<JsString>() }
                .into_utf8()?
                .into_owned()?;
            if text == "stdin" {
                Ok(Some(forkvm::ConsoleInput::Stdin))
            } else {
                Err(Failure::invalid(format!(
                    "{what} must be 'stdin' or a file descriptor, not {text:?}"
                )))
            }
        }
        ValueType::Number => {
            let fd: i32 = value.coerce_to_number()?.get_int32()?;
            Ok(Some(forkvm::ConsoleInput::Fd(dup(fd, what)?)))
        }
        other => Err(Failure::new(
            "INVALID_TYPE",
            format!("{what} must be 'stdin' or a file descriptor number, not {other}"),
        )),
    }
}

/// A duplicate of the caller's descriptor `fd`.
fn dup(fd: RawFd, what: &str) -> Outcome<std::os::fd::OwnedFd> {
    if fd < 0 {
        return Err(Failure::invalid(format!(
            "{what}: {fd} is not a file descriptor"
        )));
    }
    // SAFETY: `fd` is only borrowed for the duplication; if it is not open, `try_clone_to_owned`
    // (F_DUPFD_CLOEXEC) fails with EBADF and nothing else happens.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed
        .try_clone_to_owned()
        .map_err(|e| Failure::new("IO", format!("{what}: cannot duplicate fd {fd}: {e}")))
}
