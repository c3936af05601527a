//! Sessions: who is connected, as which agent, and what each session still owes
//! its client. `registry` finds sessions by agent and tenant; `outbox` keeps
//! one session's notifications until acked.

mod outbox;
mod rate;
mod registry;

pub use outbox::{Due, Notification, Outbox, Pushed};
pub use rate::TokenBucket;
pub use registry::Registry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// An authenticated agent: every lookup is keyed by (tenant, agent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentId {
    pub tenant_guid: Arc<str>,
    pub agent_guid: Arc<str>,
    pub ir_instance: Arc<str>,
}

#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub agent: AgentId,
    outbox: Mutex<Outbox>,
    /// Wakes the connection when there is something to write.
    pub wake: Notify,
    overflowed: AtomicBool,
}

impl Session {
    pub fn new(id: String, agent: AgentId, max_unacked: usize) -> Self {
        Session {
            id,
            agent,
            outbox: Mutex::new(Outbox::new(max_unacked)),
            wake: Notify::new(),
            overflowed: AtomicBool::new(false),
        }
    }

    pub fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a notification and wakes the connection.
    pub fn deliver(&self, n: Arc<Notification>) {
        if self.outbox().push(n) == Pushed::Overflow {
            self.overflowed.store(true, Ordering::Release);
        }
        self.wake.notify_one();
    }

    /// Whether the client let more than `max_unacked` pile up (close 4004).
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}
