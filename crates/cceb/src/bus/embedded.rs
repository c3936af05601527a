//! The embedded bus: published actions go to a bounded in-memory log that the
//! backend port serves with long-polling; events arrive on the backend port.

use super::{Bus, BusError, OutRecord};
use crate::schema::convert::{to_json, Keys};
use async_trait::async_trait;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Serialize)]
pub struct LoggedRecord {
    pub offset: u64,
    pub record: String,
    pub key: String,
    pub value: serde_json::Value,
}

pub struct EmbeddedBus {
    log: Mutex<VecDeque<LoggedRecord>>,
    capacity: usize,
    /// Offset of the newest record; long-polls wait on it.
    last: watch::Sender<u64>,
    accepting: AtomicBool,
    /// Milliseconds each publish waits before it is taken: a slow broker.
    delay_ms: AtomicU64,
}

impl EmbeddedBus {
    pub fn new(capacity: usize) -> Self {
        EmbeddedBus {
            log: Mutex::default(),
            capacity,
            last: watch::Sender::new(0),
            accepting: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
        }
    }

    /// The backend port's outage switch: while off, publishing fails as a
    /// broker outage would, so clients can exercise `backend_unavailable`.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
    }

    /// The backend port's slow-broker switch: each publish waits this long.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Records after `after`, at most `limit`, waiting up to `wait` for the first.
    pub async fn read_after(&self, after: u64, limit: usize, wait: Duration) -> (u64, Vec<LoggedRecord>) {
        let mut rx = self.last.subscribe();
        if *rx.borrow_and_update() <= after && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, rx.wait_for(|&last| last > after)).await;
        }
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let records: Vec<LoggedRecord> = log.iter().filter(|r| r.offset > after).take(limit).cloned().collect();
        let next = records.last().map_or(after, |r| r.offset);
        (next, records)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, record: OutRecord) -> Result<(), BusError> {
        if !self.accepting() {
            return Err(BusError::Unavailable("the embedded bus is switched off on the backend port".into()));
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let value = to_json(&record.value, Keys::AsIs);
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let offset = *self.last.borrow() + 1;
        log.push_back(LoggedRecord { offset, record: record.record, key: record.key, value });
        if log.len() > self.capacity {
            log.pop_front();
        }
        // Sent under the log lock so offsets are published in order.
        self.last.send_replace(offset);
        Ok(())
    }

    fn ready(&self) -> bool {
        true
    }
}
