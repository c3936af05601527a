//! Wall-clock time where it decides something that outlives a process or a
//! connection (session TTLs and their sweep, token `exp`/`nbf`), injected so
//! that tests move it instead of sleeping. Timers within one connection
//! (hello timeout, heartbeat, redelivery, the 4004 stall) run on tokio's
//! clock instead, which tests can pause (`tokio::time::pause`).

use std::fmt::Debug;

pub trait Clock: Send + Sync + Debug + 'static {
    /// Milliseconds since the Unix epoch: what persisted times are in.
    fn now_ms(&self) -> u64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

/// The system's wall clock, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A clock that moves only when told to: unit tests, and callers of the
/// library (the integration tests) that start a bridge with
/// [`Bridge::start_with_clock`](crate::Bridge::start_with_clock) to pass a
/// session's TTL or a token's expiry without waiting for it.
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        ManualClock(std::sync::atomic::AtomicU64::new(start_ms))
    }

    /// A manual clock that starts at the system's time now.
    pub fn at_system_time() -> Self {
        Self::new(now_ms())
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets the time, in milliseconds since the Unix epoch (it may go back,
    /// as a wall clock can).
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
