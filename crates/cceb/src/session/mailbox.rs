//! One session's outstanding notifications: sequence numbers, what is unsent,
//! what waits for an ack, when it is due again, and how many may be in flight
//! (contract section 5). Pure logic: time comes in as an argument.

use crate::model::Notification;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Entry {
    seq: u64,
    n: Arc<Notification>,
    /// Last time it was written to the current connection; `None` while unsent.
    sent_at: Option<Instant>,
    /// First time it was written to any connection.
    first_sent: Option<Instant>,
}

/// A frame to write to the client.
#[derive(Debug)]
pub struct Due {
    pub seq: u64,
    pub n: Arc<Notification>,
    pub redelivery: bool,
}

/// What `push` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    pub seq: u64,
    /// The oldest entry, dropped to stay within capacity.
    pub dropped: Option<u64>,
}

/// The connection's window was full and no ack came for `ack_timeout` (close 4004).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled;

#[derive(Debug)]
pub struct Mailbox {
    next_seq: u64,
    /// In seq order; entries before `cursor` were sent to the current connection.
    entries: VecDeque<Entry>,
    cursor: usize,
    capacity: usize,
    /// Most entries in flight (sent, unacked) on one connection.
    window: usize,
    /// Entries with this seq or higher wait: their seq is not yet durably
    /// reserved, and a crash could hand it to another notification.
    sendable_below: u64,
    /// Since when the window has been full with no ack.
    full_since: Option<Instant>,
    /// A mirrored mailbox (cluster store, where entries come with the seq the
    /// store gave them, from whichever node): the seq that must come before
    /// later ones are sent, so seqs go out in increasing order even when two
    /// nodes' messages cross.
    awaited: Option<u64>,
    /// Since when an entry waits for `awaited`.
    gap_since: Option<Instant>,
    /// Seqs passed over after `GAP_WAIT` (from, to exclusive), the newest few:
    /// one of them arriving late is still taken; any other seq below
    /// `awaited` was held already (sent, acked), so it is not taken again.
    skipped: VecDeque<(u64, u64)>,
}

/// Longest an entry waits for a lower seq (a message from another node still
/// on its way) before it is sent anyway: a lost message must not hold up the
/// rest. The sweep (every second) reads the missing one from the store before
/// that; past it, it is read at the next resync or resume.
pub const GAP_WAIT: Duration = Duration::from_secs(3);

impl Mailbox {
    /// An mailbox that keeps at most `capacity` entries, dropping the oldest,
    /// and has at most `window` of them in flight.
    pub fn new(capacity: usize, window: usize) -> Self {
        Mailbox {
            next_seq: 1,
            entries: VecDeque::new(),
            cursor: 0,
            capacity,
            window,
            sendable_below: u64::MAX,
            full_since: None,
            awaited: None,
            gap_since: None,
            skipped: VecDeque::new(),
        }
    }

    /// An mailbox read back from the store: entries in seq order, none sent
    /// to a connection yet; `next_seq` is the durable high-water mark.
    pub fn restore(
        capacity: usize,
        window: usize,
        next_seq: u64,
        entries: impl IntoIterator<Item = (u64, Arc<Notification>)>,
    ) -> Self {
        let entries: VecDeque<Entry> =
            entries.into_iter().map(|(seq, n)| Entry { seq, n, sent_at: None, first_sent: None }).collect();
        let next_seq = entries.back().map_or(next_seq, |e| next_seq.max(e.seq + 1));
        Mailbox { next_seq, entries, ..Mailbox::new(capacity, window) }
    }

    /// Seq the next notification gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Only entries below `seq` may be sent (their seqs are durably reserved).
    pub fn send_below(&mut self, seq: u64) {
        self.sendable_below = seq;
    }

    /// A new connection takes over: everything still unacked is due again,
    /// in seq order, with its seq.
    pub fn rewind(&mut self) {
        self.cursor = 0;
        self.full_since = None;
        for e in &mut self.entries {
            e.sent_at = None;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether entries wait behind the window.
    pub fn waiting(&self) -> bool {
        self.entries.len() > self.cursor
    }

    pub fn push(&mut self, n: Arc<Notification>) -> Pushed {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push_back(Entry { seq, n, sent_at: None, first_sent: None });
        let mut dropped = None;
        if self.entries.len() > self.capacity {
            dropped = self.entries.pop_front().map(|e| e.seq);
            self.cursor = self.cursor.saturating_sub(1);
        }
        Pushed { seq, dropped }
    }

    /// Puts a notification whose seq the store gave (a cluster node's
    /// mailbox mirrors the durable one): `None` when that seq is held already.
    /// Entries may arrive out of seq order (two nodes appended, their messages
    /// crossed): one lower than an entry already sent goes first among the
    /// unsent, never into the sent part.
    pub fn push_at(&mut self, seq: u64, n: Arc<Notification>) -> Option<Pushed> {
        if self.entries.iter().any(|e| e.seq == seq) {
            return None;
        }
        if self.awaited.is_some_and(|a| seq < a) && !self.skipped.iter().any(|&(from, to)| (from..to).contains(&seq)) {
            // Held before (sent, and acked since): not new.
            return None;
        }
        let at = self.cursor + self.entries.iter().skip(self.cursor).take_while(|e| e.seq < seq).count();
        self.entries.insert(at, Entry { seq, n, sent_at: None, first_sent: None });
        self.next_seq = self.next_seq.max(seq + 1);
        self.advance();
        let mut dropped = None;
        if self.entries.len() > self.capacity {
            dropped = self.entries.pop_front().map(|e| e.seq);
            self.cursor = self.cursor.saturating_sub(1);
        }
        Some(Pushed { seq, dropped })
    }

    /// Everything up to `upto` was read from the store in one step (its gaps
    /// are acks and drops, not messages on their way): later entries are sent
    /// in seq order from `upto + 1`.
    pub fn contiguous_upto(&mut self, upto: u64) {
        let next = upto.saturating_add(1);
        if self.awaited.is_none_or(|a| a < next) {
            self.awaited = Some(next);
            self.gap_since = None;
        }
        self.advance();
    }

    /// The seq a mirrored mailbox waits for before what it holds after it.
    pub fn gap(&self) -> Option<u64> {
        let a = self.awaited?;
        let held_after = self.entries.iter().skip(self.cursor).any(|e| e.seq > a);
        let missing = self.entries.iter().skip(self.cursor).all(|e| e.seq != a);
        (held_after && missing).then_some(a)
    }

    fn advance(&mut self) {
        while let Some(a) = self.awaited.filter(|a| self.entries.iter().skip(self.cursor).any(|e| e.seq == *a)) {
            self.awaited = Some(a + 1);
            self.gap_since = None;
        }
    }

    /// Removes an acknowledged notification; returns its seq and how long it
    /// waited since first sent. Unknown or already acked uuids are ignored.
    pub fn ack(&mut self, uuid: &str, now: Instant) -> Option<(u64, Duration)> {
        // Acks nearly always arrive in order: the front is the usual hit.
        let i = self.entries.iter().position(|e| e.n.uuid == uuid)?;
        let e = self.entries.remove(i)?;
        if i < self.cursor {
            self.cursor -= 1;
            // A slot of the window is free again: the stall clock restarts when it fills.
            self.full_since = None;
        }
        Some((e.seq, e.first_sent.map_or(Duration::ZERO, |t| now.saturating_duration_since(t))))
    }

    /// Entries neither acked nor dropped, for replay after a restart.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Arc<Notification>)> {
        self.entries.iter().map(|e| (e.seq, &e.n))
    }

    /// Everything to write now: sent entries whose ack is overdue (again, same
    /// uuid and seq), then unsent ones while the window has room, in seq order
    /// within each group. Returns when to look again, or [`Stalled`] when the
    /// window has been full for `ack_timeout` without an ack.
    pub fn take_due(
        &mut self,
        now: Instant,
        ack_timeout: Duration,
        out: &mut Vec<Due>,
    ) -> Result<Option<Instant>, Stalled> {
        let mut next: Option<Instant> = None;
        let mut soonest = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        for e in self.entries.iter_mut().take(self.cursor) {
            let sent = e.sent_at.unwrap_or(now);
            if sent + ack_timeout <= now {
                e.sent_at = Some(now);
                out.push(Due { seq: e.seq, n: e.n.clone(), redelivery: true });
            }
            soonest(e.sent_at.unwrap_or(now) + ack_timeout);
        }
        // The first unsent entry past a gap in a mirrored mailbox: sent once
        // the gap filled, or once it waited `GAP_WAIT`.
        let held = self.awaited.and_then(|a| self.entries.iter().skip(self.cursor).map(|e| e.seq).find(|&s| s > a));
        if let (Some(first), Some(a)) = (held, self.awaited) {
            if self.entries.iter().skip(self.cursor).all(|e| e.seq != a) {
                let since = *self.gap_since.get_or_insert(now);
                if since + GAP_WAIT <= now {
                    self.skipped.push_back((a, first));
                    if self.skipped.len() > 16 {
                        self.skipped.pop_front();
                    }
                    self.awaited = Some(first);
                    self.gap_since = None;
                    self.advance();
                } else {
                    soonest(since + GAP_WAIT);
                }
            }
        }
        let awaited = self.awaited;
        let room = self.window.saturating_sub(self.cursor);
        let mut sent = 0;
        for e in self.entries.iter_mut().skip(self.cursor).take(room) {
            if e.seq >= self.sendable_below || awaited.is_some_and(|a| e.seq > a) {
                break;
            }
            e.sent_at = Some(now);
            let redelivery = e.first_sent.is_some();
            e.first_sent.get_or_insert(now);
            out.push(Due { seq: e.seq, n: e.n.clone(), redelivery });
            sent += 1;
        }
        if sent > 0 {
            self.cursor += sent;
            soonest(now + ack_timeout);
        }
        if self.cursor >= self.window {
            let since = *self.full_since.get_or_insert(now);
            if since + ack_timeout <= now {
                return Err(Stalled);
            }
            soonest(since + ack_timeout);
        }
        Ok(next)
    }

    /// What `take_due` handed out at `taken` finished writing at `now`: its
    /// ack clock (redelivery, and the stall of a full window) starts now, not
    /// while a slow link was still carrying it. Returns when to look again.
    pub fn written(&mut self, taken: Instant, now: Instant, ack_timeout: Duration) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        for e in self.entries.iter_mut().take(self.cursor) {
            if e.sent_at == Some(taken) {
                e.sent_at = Some(now);
            }
            if let Some(sent) = e.sent_at {
                next = Some(next.map_or(sent + ack_timeout, |n| n.min(sent + ack_timeout)));
            }
        }
        if self.full_since == Some(taken) {
            self.full_since = Some(now);
        }
        if let Some(since) = self.full_since {
            next = Some(next.map_or(since + ack_timeout, |n| n.min(since + ack_timeout)));
        }
        if let Some(since) = self.gap_since {
            next = Some(next.map_or(since + GAP_WAIT, |n| n.min(since + GAP_WAIT)));
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cceb_protocol::NotificationType;

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
        let mut o = Mailbox::new(10, 10);
        o.push(n("a"));
        o.push(n("b"));
        let mut out = Vec::new();
        assert_eq!(o.take_due(t0, timeout, &mut out), Ok(Some(t0 + timeout)));
        assert_eq!(seqs(&out), [(1, false), (2, false)]);
        out.clear();
        assert_eq!(o.take_due(t0 + Duration::from_secs(1), timeout, &mut out), Ok(Some(t0 + timeout)));
        assert!(out.is_empty());
        assert_eq!(o.ack("a", t0 + Duration::from_secs(2)), Some((1, Duration::from_secs(2))));
        assert_eq!(o.ack("a", t0), None, "second ack is ignored");
        o.push(n("c"));
        let t1 = t0 + timeout;
        o.take_due(t1, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(2, true), (3, false)]);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn past_capacity_the_oldest_is_dropped() {
        let t0 = Instant::now();
        let mut o = Mailbox::new(2, 2);
        assert_eq!(o.push(n("a")), Pushed { seq: 1, dropped: None });
        o.take_due(t0, Duration::from_secs(1), &mut Vec::new()).expect("not stalled");
        assert_eq!(o.push(n("b")), Pushed { seq: 2, dropped: None });
        assert_eq!(o.push(n("c")), Pushed { seq: 3, dropped: Some(1) });
        let mut out = Vec::new();
        o.take_due(t0, Duration::from_secs(1), &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(2, false), (3, false)]);
    }

    #[test]
    fn entries_with_given_seqs_are_held_once_and_a_late_one_goes_first_among_the_unsent() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut o = Mailbox::new(10, 10);
        assert_eq!(o.push_at(2, n("b")), Some(Pushed { seq: 2, dropped: None }));
        assert_eq!(o.push_at(2, n("b")), None, "held already");
        let mut out = Vec::new();
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(2, false)]);
        // 1 and 4 arrive after 2 was sent, 3 after 4: none goes into the sent part.
        assert!(o.push_at(4, n("d")).is_some());
        assert!(o.push_at(1, n("a")).is_some());
        assert!(o.push_at(3, n("c")).is_some());
        out.clear();
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(1, false), (3, false), (4, false)]);
        assert_eq!(o.next_seq(), 5);
        assert_eq!(o.ack("b", t0).map(|(seq, _)| seq), Some(2));
        assert_eq!(o.push_at(6, n("f")), Some(Pushed { seq: 6, dropped: None }), "a gap is kept: 5 may come");
    }

    #[test]
    fn a_mirrored_mailbox_sends_seqs_in_order_holding_what_comes_after_a_gap_until_it_fills() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut o = Mailbox::new(10, 10);
        o.push_at(3, n("c"));
        o.push_at(5, n("e"));
        // Read from the store in one step up to 5: 4 was acked before.
        o.contiguous_upto(5);
        let mut out = Vec::new();
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(3, false), (5, false)]);
        // 7 arrives before 6 (two nodes' messages crossed): it waits for 6.
        o.push_at(7, n("g"));
        out.clear();
        let next = o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert!(out.is_empty(), "7 waits for 6");
        assert_eq!(next, Some(t0 + GAP_WAIT), "looked at again when the wait is over");
        o.push_at(6, n("f"));
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(6, false), (7, false)], "in order once 6 came");
        // 9 without 8: sent after GAP_WAIT (8's message was lost; the store keeps it).
        o.push_at(9, n("i"));
        out.clear();
        o.take_due(t0 + GAP_WAIT - Duration::from_millis(1), timeout, &mut out).expect("not stalled");
        assert!(out.is_empty());
        let later = t0 + GAP_WAIT + Duration::from_millis(1);
        o.take_due(later, timeout, &mut out).expect("not stalled");
        o.take_due(later + GAP_WAIT, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(9, false)]);
        o.push_at(10, n("j"));
        out.clear();
        o.take_due(later + GAP_WAIT, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(10, false)], "no gap after 9: at once");
    }

    #[test]
    fn past_capacity_an_entry_with_a_given_seq_drops_the_oldest() {
        let mut o = Mailbox::new(2, 2);
        o.push_at(1, n("a"));
        o.push_at(2, n("b"));
        assert_eq!(o.push_at(3, n("c")), Some(Pushed { seq: 3, dropped: Some(1) }));
    }

    #[test]
    fn rewind_replays_everything_unacked_in_order_with_its_seq() {
        let t0 = Instant::now();
        let mut o = Mailbox::restore(10, 10, 5, [(3, n("x")), (4, n("y"))]);
        assert_eq!(o.push(n("z")).seq, 5, "seq continues after what was read back");
        let mut out = Vec::new();
        o.take_due(t0, Duration::from_secs(10), &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(3, false), (4, false), (5, false)]);
        o.ack("y", t0);
        o.push(n("w"));
        o.rewind();
        out.clear();
        o.take_due(t0, Duration::from_secs(10), &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(3, true), (5, true), (6, false)]);
    }

    #[test]
    fn ack_of_a_middle_entry_keeps_the_cursor_right() {
        let t0 = Instant::now();
        let mut o = Mailbox::new(10, 10);
        let mut out = Vec::new();
        o.push(n("a"));
        o.push(n("b"));
        o.take_due(t0, Duration::from_secs(1), &mut out).expect("not stalled");
        o.ack("a", t0);
        o.push(n("c"));
        out.clear();
        o.take_due(t0, Duration::from_secs(1), &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(3, false)]);
    }

    #[test]
    fn a_backlog_larger_than_the_window_goes_out_window_by_window_as_acks_free_it() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut o = Mailbox::restore(100, 3, 1, (1..=7).map(|i| (i, n(&format!("n{i}")))));
        let mut out = Vec::new();
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(1, false), (2, false), (3, false)], "at most the window in flight");
        out.clear();
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert!(out.is_empty(), "nothing more until an ack");
        o.ack("n1", t0);
        o.ack("n2", t0);
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(4, false), (5, false)]);
    }

    #[test]
    fn a_full_window_without_an_ack_for_the_ack_timeout_stalls_and_an_ack_restarts_the_clock() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut o = Mailbox::new(100, 2);
        for i in 1..=4 {
            o.push(n(&format!("n{i}")));
        }
        let mut out = Vec::new();
        assert_eq!(o.take_due(t0, timeout, &mut out), Ok(Some(at(10))), "look again when the stall would be due");
        assert_eq!(o.take_due(at(9), timeout, &mut out), Ok(Some(at(10))));
        o.ack("n1", at(9));
        out.clear();
        o.take_due(at(9), timeout, &mut out).expect("an ack arrived");
        assert_eq!(seqs(&out), [(3, false)]);
        // n2 is redelivered at 10 s, and the window (n2, n3) is full again since 9 s.
        assert_eq!(o.take_due(at(18), timeout, &mut out), Ok(Some(at(19))));
        assert_eq!(o.take_due(at(19), timeout, &mut out), Err(Stalled));
        assert_eq!(o.len(), 3, "a stall loses nothing: the mailbox keeps its entries");
        o.rewind();
        out.clear();
        assert!(o.take_due(at(30), timeout, &mut out).is_ok(), "a new connection starts with an empty window");
        assert_eq!(seqs(&out), [(2, true), (3, true)]);
    }

    #[test]
    fn entries_whose_seq_is_not_yet_reserved_wait() {
        let t0 = Instant::now();
        let mut o = Mailbox::new(10, 10);
        o.send_below(3);
        for i in 1..=4 {
            o.push(n(&format!("n{i}")));
        }
        let mut out = Vec::new();
        o.take_due(t0, Duration::from_secs(10), &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(1, false), (2, false)]);
        o.send_below(10);
        out.clear();
        o.take_due(t0, Duration::from_secs(10), &mut out).expect("not stalled");
        assert_eq!(seqs(&out), [(3, false), (4, false)]);
    }

    #[test]
    fn the_ack_clock_starts_when_the_write_finished_not_when_it_was_taken() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut o = Mailbox::new(100, 2);
        for i in 1..=3 {
            o.push(n(&format!("n{i}")));
        }
        let mut out = Vec::new();
        o.take_due(t0, timeout, &mut out).expect("not stalled");
        // A slow link took 9 s to carry the window.
        assert_eq!(o.written(t0, at(9), timeout), Some(at(19)));
        out.clear();
        assert_eq!(o.take_due(at(15), timeout, &mut out), Ok(Some(at(19))), "neither redelivered nor stalled yet");
        assert!(out.is_empty());
        assert_eq!(o.take_due(at(19), timeout, &mut out), Err(Stalled));
    }
}
