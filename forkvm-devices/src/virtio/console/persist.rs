//! What a console carries across a fork or into a snapshot ([`ConsoleState`]): the host input
//! its guest had not taken yet, which every child gets.

use std::io::{self, Write};

use super::INPUT_BUFFER_SIZE;
use super::device::Console;
use crate::virtio::saved::SavedStateError;

/// A console at a fork: the host input its guest has not taken yet (every child gets it).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    pending_input: Vec<u8>,
}

impl ConsoleState {
    /// Checks a state read back from a snapshot: no more pending input than a console buffers.
    pub fn check(&self) -> Result<(), SavedStateError> {
        if self.pending_input.len() > INPUT_BUFFER_SIZE {
            return Err(SavedStateError::new(
                "pending_input",
                format_args!("{} bytes", self.pending_input.len()),
                "more than a console buffers",
            ));
        }
        Ok(())
    }
}

impl Console {
    /// A console that continues from `state`, writing the guest's output to `output`.
    pub fn from_state(state: &ConsoleState, output: Box<dyn Write + Send>) -> io::Result<Self> {
        let console = Self::new(output)?;
        console.input.push(&state.pending_input);
        Ok(console)
    }

    /// What a child's console continues from (see [`Console::from_state`]).
    pub(super) fn state(&self) -> ConsoleState {
        ConsoleState {
            pending_input: self.input.lock().iter().copied().collect(),
        }
    }
}
