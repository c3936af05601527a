//! CCEB wire types: the envelope, the messages a client may send, the messages
//! the bridge sends, and the error and close codes of the contract
//! (`shared/PROTOCOL.md`, sections 2–7). Serde only, no IO, so the server, the
//! tests, the CLI and the benchmark all speak exactly the same protocol.

pub mod close;
mod error;
pub mod incoming;
mod notification;
pub mod outgoing;
pub mod trace;

pub use error::ErrorCode;
pub use incoming::{parse_client_message, ClientMessage, ParseError};
pub use notification::NotificationType;
pub use trace::{TraceParent, TraceParentError};

/// Whether `s` reads the same inside JSON quotes as it is: no `"`, no `\`,
/// no control character (all JSON requires escaped). The ack fast path and
/// the notification frame's uuid rely on it.
pub(crate) fn needs_no_json_escape(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}
