//! What a failure at a trait boundary (`Bus`, `Store`) means for the caller:
//! the one vocabulary both boundaries use, so that `conn` and the backend
//! port decide what to tell a client by kind, never by an error's text.

use std::fmt;

/// The cause behind a boundary error, kept for logs and messages.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend could not be reached or cannot write now (broker down,
    /// failing disk, closed store); the same request may succeed later.
    Unavailable,
    /// No answer within the bound; the same request may succeed later.
    Timeout,
    /// The backend refuses this request for what it holds (too large, unknown
    /// destination, schema conflict); sending it again gets the same answer.
    Rejected,
    /// The component is broken or misconfigured; nothing succeeds until an
    /// operator acts.
    Fatal,
}

impl ErrorKind {
    /// Whether the same request, sent again later, may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::Timeout)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Rejected => "refused",
            ErrorKind::Fatal => "failed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_outage_or_a_timeout_is_worth_a_retry() {
        let retryable = [ErrorKind::Unavailable, ErrorKind::Timeout, ErrorKind::Rejected, ErrorKind::Fatal]
            .map(ErrorKind::is_retryable);
        assert_eq!(retryable, [true, true, false, false]);
    }
}
