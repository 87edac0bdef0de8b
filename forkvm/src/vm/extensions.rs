//! [`Extensions`]: state that crates layered on forkvm keep per VM (the guest agent client keeps
//! its connection there), one value per type, living as long as the VM handle.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use forkvm_devices::sync::lock;

/// One value of each type, shared: what [`crate::Vm::extensions`] holds.
#[derive(Default)]
pub struct Extensions {
    values: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Extensions {
    /// The value of type `T`, made with `T::default()` the first time it is asked for.
    pub fn get_or_default<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut values = lock(&self.values);
        let value = values
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()))
            .clone();
        drop(values);
        match value.downcast::<T>() {
            Ok(value) => value,
            // Entries are keyed by their own type: this does not happen; a fresh value is
            // still a correct answer.
            Err(_) => Arc::new(T::default()),
        }
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extensions")
            .field("values", &lock(&self.values).len())
            .finish()
    }
}
