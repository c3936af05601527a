//! One session's outstanding notifications: sequence numbers, what is unsent,
//! what waits for an ack, and when it is due again (contract section 5).
//! Pure logic: time comes in as an argument.

use cceb_protocol::NotificationType;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One notification, shared by every session that receives it.
#[derive(Debug)]
pub struct Notification {
    pub ty: NotificationType,
    pub uuid: String,
    /// `data`, serialised once.
    pub data: Box<str>,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    n: Arc<Notification>,
    /// Last time it was written to the client; `None` while unsent.
    sent_at: Option<Instant>,
    first_sent: Option<Instant>,
}

/// A frame to write to the client.
#[derive(Debug)]
pub struct Due {
    pub seq: u64,
    pub n: Arc<Notification>,
    pub redelivery: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// More than the allowed number is outstanding.
    Overflow,
}

#[derive(Debug)]
pub struct Outbox {
    next_seq: u64,
    /// In seq order; entries before `cursor` were sent at least once.
    entries: VecDeque<Entry>,
    cursor: usize,
    max_unacked: usize,
}

impl Outbox {
    pub fn new(max_unacked: usize) -> Self {
        Outbox { next_seq: 1, entries: VecDeque::new(), cursor: 0, max_unacked }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, n: Arc<Notification>) -> Pushed {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Entry { seq, n, sent_at: None, first_sent: None });
        if self.entries.len() > self.max_unacked {
            Pushed::Overflow
        } else {
            Pushed::Queued
        }
    }

    /// Removes an acknowledged notification; returns how long it waited since
    /// first sent. Unknown or already acked uuids are ignored.
    pub fn ack(&mut self, uuid: &str, now: Instant) -> Option<Duration> {
        // Acks nearly always arrive in order: the front is the usual hit.
        let i = self.entries.iter().position(|e| e.n.uuid == uuid)?;
        let e = self.entries.remove(i)?;
        if i < self.cursor {
            self.cursor -= 1;
        }
        Some(e.first_sent.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)))
    }

    /// Everything to write now: sent entries whose ack is overdue (again, same
    /// uuid and seq), then the unsent ones, in seq order within each group.
    /// Returns when the next one falls due.
    pub fn take_due(&mut self, now: Instant, ack_timeout: Duration, out: &mut Vec<Due>) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for e in self.entries.iter_mut().take(self.cursor) {
            let sent = e.sent_at.unwrap_or(now);
            if sent + ack_timeout <= now {
                e.sent_at = Some(now);
                out.push(Due { seq: e.seq, n: e.n.clone(), redelivery: true });
            }
            let due = e.sent_at.unwrap_or(now) + ack_timeout;
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        let unsent = self.entries.len() - self.cursor;
        for e in self.entries.iter_mut().skip(self.cursor) {
            e.sent_at = Some(now);
            e.first_sent = Some(now);
            out.push(Due { seq: e.seq, n: e.n.clone(), redelivery: false });
        }
        if unsent > 0 {
            self.cursor = self.entries.len();
            let due = now + ack_timeout;
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(uuid: &str) -> Arc<Notification> {
        Arc::new(Notification { ty: NotificationType::Presence, uuid: uuid.into(), data: "{}".into() })
    }

    fn seqs(d: &[Due]) -> Vec<(u64, bool)> {
        d.iter().map(|d| (d.seq, d.redelivery)).collect()
    }

    #[test]
    fn sends_once_then_redelivers_with_the_same_seq_until_acked() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut o = Outbox::new(10);
        o.push(n("a"));
        o.push(n("b"));
        let mut out = Vec::new();
        assert_eq!(o.take_due(t0, timeout, &mut out), Some(t0 + timeout));
        assert_eq!(seqs(&out), [(1, false), (2, false)]);
        out.clear();
        assert_eq!(o.take_due(t0 + Duration::from_secs(1), timeout, &mut out), Some(t0 + timeout));
        assert!(out.is_empty());
        assert_eq!(o.ack("a", t0 + Duration::from_secs(2)), Some(Duration::from_secs(2)));
        assert_eq!(o.ack("a", t0), None, "second ack is ignored");
        o.push(n("c"));
        let t1 = t0 + timeout;
        o.take_due(t1, timeout, &mut out);
        assert_eq!(seqs(&out), [(2, true), (3, false)]);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn overflow_past_max_unacked() {
        let mut o = Outbox::new(2);
        assert_eq!(o.push(n("a")), Pushed::Queued);
        assert_eq!(o.push(n("b")), Pushed::Queued);
        assert_eq!(o.push(n("c")), Pushed::Overflow);
    }

    #[test]
    fn ack_of_a_middle_entry_keeps_the_cursor_right() {
        let t0 = Instant::now();
        let mut o = Outbox::new(10);
        let mut out = Vec::new();
        o.push(n("a"));
        o.push(n("b"));
        o.take_due(t0, Duration::from_secs(1), &mut out);
        o.ack("a", t0);
        o.push(n("c"));
        out.clear();
        o.take_due(t0, Duration::from_secs(1), &mut out);
        assert_eq!(seqs(&out), [(3, false)]);
    }
}
