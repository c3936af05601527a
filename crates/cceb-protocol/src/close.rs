//! WebSocket close codes (contract section 7).

/// Normal closure, after `end_session`.
pub const NORMAL: u16 = 1000;
/// The connection went silent for three heartbeat intervals.
pub const GOING_AWAY: u16 = 1001;
/// A binary frame was received.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A frame over the size limit was received.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// Server restarting or draining: reconnect (through discovery) with the session key.
pub const SERVICE_RESTART: u16 = 1012;
/// Not authenticated or unauthorized.
pub const UNAUTHORIZED: u16 = 4001;
/// The token expired on an open connection.
pub const TOKEN_EXPIRED: u16 = 4002;
/// No `hello` in time.
pub const HELLO_TIMEOUT: u16 = 4003;
/// Too many unacknowledged notifications.
pub const TOO_MANY_UNACKED: u16 = 4004;
/// The session was taken over by another connection.
pub const TAKEN_OVER: u16 = 4005;
/// The agent already has `CCEB_MAX_SESSIONS_PER_AGENT` sessions, all connected.
pub const TOO_MANY_SESSIONS: u16 = 4006;
