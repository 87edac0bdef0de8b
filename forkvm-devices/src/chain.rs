//! An error with its causes, as one line: what the bindings and logs show.
//!
//! forkvm's errors name their cause as [`std::error::Error::source`] and leave it out of their
//! own message (so that a reporter walking the chain does not print it twice). Where one string
//! is all a user sees, [`ErrorChain`] writes the message and each cause after it:
//! `"cannot open disk image /x: No such file or directory (os error 2)"`. forkvm re-exports it as
//! `forkvm::ErrorChain` and `forkvm::error_chain`; it lives here so that the devices' own logs
//! can use it too.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, separated by `": "`. A cause whose text
/// already ends the line (an error that also puts its source in its own message) is not
/// repeated.
#[derive(Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let next = error.to_string();
            if !next.is_empty() && !text.ends_with(&next) {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&next);
            }
            cause = error.source();
        }
        f.write_str(&text)
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The message of `error` and of each of its causes, as [`ErrorChain`] writes them.
pub fn error_chain(error: &dyn Error) -> String {
    ErrorChain(error).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle")]
    struct Middle(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("repeats: {0}")]
    struct Repeats(#[source] std::io::Error);

    fn io() -> std::io::Error {
        std::io::Error::other("the cause")
    }

    #[test]
    fn every_cause_once_in_order() {
        assert_eq!(
            error_chain(&Outer(Middle(io()))),
            "outer: middle: the cause"
        );
        assert_eq!(ErrorChain(&io()).to_string(), "the cause");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        assert_eq!(error_chain(&Repeats(io())), "repeats: the cause");
    }
}
