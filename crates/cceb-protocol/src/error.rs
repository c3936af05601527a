use serde::{Deserialize, Serialize};
use std::fmt;

/// The `data.code` of an `error` message (contract section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidMessage,
    UnknownType,
    NotAuthenticated,
    Unauthorized,
    UnknownAction,
    ReservedField,
    InvalidActionDetails,
    UnknownAgent,
    BackendUnavailable,
    RateLimited,
    TooManySessions,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidMessage,
        ErrorCode::UnknownType,
        ErrorCode::NotAuthenticated,
        ErrorCode::Unauthorized,
        ErrorCode::UnknownAction,
        ErrorCode::ReservedField,
        ErrorCode::InvalidActionDetails,
        ErrorCode::UnknownAgent,
        ErrorCode::BackendUnavailable,
        ErrorCode::RateLimited,
        ErrorCode::TooManySessions,
    ];

    /// Dense index (position in [`ErrorCode::ALL`]), for per-code metric handles.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::ReservedField => "reserved_field",
            ErrorCode::InvalidActionDetails => "invalid_action_details",
            ErrorCode::UnknownAgent => "unknown_agent",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySessions => "too_many_sessions",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NotificationType;

    #[test]
    fn dense_indexes_match_the_all_lists() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        for (i, t) in NotificationType::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
        }
    }
}
