//! Wall-clock time where it decides something that outlives a process
//! (session TTLs, expiry), injected so that tests move it instead of sleeping.

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

/// A clock that moves only when told to.
#[cfg(test)]
#[derive(Debug)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

#[cfg(test)]
impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        ManualClock(std::sync::atomic::AtomicU64::new(start_ms))
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
