//! Tables of live handles. A C handle is a number that looks like a pointer (never
//! dereferenced): looked up in its type's table on every call, so a freed, foreign or
//! wrong-typed handle is refused instead of being dereferenced. Numbers are never reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Failure, forkvm_status};

/// The next handle number, shared by all types (so one type's handle is never another's).
/// Steps by 16 from 0x10000, so a handle never looks like a small integer or NULL.
static NEXT: AtomicUsize = AtomicUsize::new(0x10000);

/// The live handles of one type.
pub(crate) struct Registry<T> {
    what: &'static str,
    live: RwLock<Option<HashMap<usize, Arc<T>>>>,
}

impl<T> Registry<T> {
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            live: RwLock::new(None),
        }
    }

    /// Registers `value`; returns its handle.
    pub fn insert<H>(&self, value: T) -> *mut H {
        let id = NEXT.fetch_add(16, Ordering::Relaxed);
        self.write()
            .get_or_insert_default()
            .insert(id, Arc::new(value));
        std::ptr::without_provenance_mut(id)
    }

    /// The value behind `handle`, if it is live.
    pub fn get<H>(&self, handle: *const H) -> Result<Arc<T>, Failure> {
        if handle.is_null() {
            return Err(Failure::null(self.what));
        }
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        live.as_ref()
            .and_then(|live| live.get(&handle.addr()))
            .cloned()
            .ok_or_else(|| self.dead(handle.addr()))
    }

    /// Unregisters `handle` and returns its value (other threads' calls in flight may still
    /// hold it).
    pub fn remove<H>(&self, handle: *const H) -> Result<Arc<T>, Failure> {
        if handle.is_null() {
            return Err(Failure::null(self.what));
        }
        self.write()
            .as_mut()
            .and_then(|live| live.remove(&handle.addr()))
            .ok_or_else(|| self.dead(handle.addr()))
    }

    /// Unregisters `handle` and returns its value, only if no call in flight holds it.
    pub fn take<H>(&self, handle: *const H) -> Result<T, Failure> {
        if handle.is_null() {
            return Err(Failure::null(self.what));
        }
        let mut live = self.write();
        let live = live.get_or_insert_default();
        let entry = live
            .remove(&handle.addr())
            .ok_or_else(|| self.dead(handle.addr()))?;
        Arc::try_unwrap(entry).map_err(|entry| {
            live.insert(handle.addr(), entry);
            Failure::new(
                forkvm_status::FORKVM_ERR_BUSY,
                format!("{} is in use by another thread", self.what),
            )
        })
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<HashMap<usize, Arc<T>>>> {
        self.live.write().unwrap_or_else(|e| e.into_inner())
    }

    fn dead(&self, addr: usize) -> Failure {
        Failure::new(
            forkvm_status::FORKVM_ERR_INVALID_HANDLE,
            format!(
                "{addr:#x} is not a live {} handle (freed already, or never one)",
                self.what
            ),
        )
    }
}
