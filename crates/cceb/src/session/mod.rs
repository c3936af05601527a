//! Sessions: who is connected, as which agent, and what each session still owes
//! its client. `roster` finds sessions by agent, tenant and id; `mailbox`
//! keeps one session's notifications until acked; `manager` opens, resumes,
//! ends and expires them (contract sections 5 and 6); `key` makes and checks
//! long-lived session keys.

mod key;
mod mailbox;
mod manager;
mod placed;
mod rate;
mod roster;

pub use crate::model::{AgentId, Notification};
pub use key::SessionKey;
pub use mailbox::{Due, Mailbox, Pushed, Stalled};
pub use manager::{Held, OpenError, OpenRequest, Opened, Reactions, SessionSettings, Sessions};
pub use placed::{Cluster, Peers};
pub use rate::TokenBucket;
pub use roster::{Full, Roster};

use crate::store::{SessionRecord, Store};
use crate::sync::{lock, Signal};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Seqs a long-lived session reserves durably at a time; the next block is
/// asked for when half of this one is used, so sending rarely waits for it.
const SEQ_BLOCK: u64 = 1024;

/// What makes a session long-lived: its key and the store it writes through.
struct LongLived {
    key_hash: [u8; 32],
    store: Arc<dyn Store>,
    /// Set on a cluster store, where the store decides seqs and attachments:
    /// the generation of this node's attachment there. The mailbox then
    /// mirrors the durable one (entries arrive with their seq, already
    /// written) and nothing is written through but acks.
    mirror: Option<AtomicU64>,
}

impl std::fmt::Debug for LongLived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LongLived")
    }
}

#[derive(Debug)]
struct State {
    mailbox: Mailbox,
    auto_accept: bool,
    push_token: Option<String>,
    /// Mailbox entries dropped since a client was last attached.
    dropped: u64,
    /// The connection attached now.
    attached: Option<Attached>,
    generation: u64,
    disconnected_at_ms: Option<u64>,
    /// Ended (`end_session`, expiry): never attached or written again.
    ended: bool,
    /// Highest seq (exclusive) asked to be durably reserved (long-lived).
    seq_reserved: u64,
}

#[derive(Debug)]
struct Attached {
    generation: u64,
    /// Cancelled on takeover.
    stop: CancellationToken,
    /// Wakes this connection, and no other: one taken over never takes a
    /// wake-up meant for the one after it.
    wake: Arc<Signal>,
}

/// Releases the session lock, then wakes the attached connection, if any
/// (one attached later writes everything due on its first turn): the woken
/// task does not wait on the lock of the thread waking it.
fn unlock_and_wake(st: MutexGuard<'_, State>) {
    let wake = st.attached.as_ref().map(|a| a.wake.clone());
    drop(st);
    if let Some(w) = wake {
        w.notify();
    }
}

/// A connection's hold on a session.
#[derive(Debug)]
pub struct Attachment {
    pub generation: u64,
    /// Cancelled when another connection takes the session over (close
    /// 4005), or when its parent (the bridge's shutdown) is: the connection
    /// waits on this one token for both.
    pub stop: CancellationToken,
    /// Wakes the connection when there is something to write.
    pub wake: Arc<Signal>,
    /// Mailbox entries dropped while no client was attached.
    pub dropped: u64,
    /// The store's generation of this attachment (cluster store): its
    /// detach is written only while the store still has it.
    pub store_generation: Option<u64>,
}

/// What one delivery did, for metrics and push.
#[derive(Debug, Default)]
pub struct Delivered {
    pub dropped: bool,
    /// Device token to announce the notification to: the session is long-lived
    /// and no client is attached.
    pub announce_to: Option<String>,
}

#[derive(Debug)]
pub struct Session {
    pub id: Arc<str>,
    pub agent: AgentId,
    long_lived: Option<LongLived>,
    state: Mutex<State>,
    overflowed: AtomicBool,
    /// Notifications meant for this short-lived session were lost on their
    /// way from another node (close 1012: the client reconnects and reads
    /// its state again).
    missed: AtomicBool,
    max_unacked: usize,
}

impl Session {
    /// A session that lives as long as its connection (`attach` sets what the client asked).
    pub fn new(id: Arc<str>, agent: AgentId, max_unacked: usize) -> Self {
        // One over max_unacked: the connection is closed (4004) when it is reached.
        let mailbox = Mailbox::new(max_unacked + 1, max_unacked + 1);
        Self::build(id, agent, None, mailbox, max_unacked, false, None, None)
    }

    /// A long-lived session; every change is written through `store`. Its
    /// mailbox sends only seqs durably reserved: call [`Session::reserve_seqs`].
    pub fn long_lived(record: &SessionRecord, mut mailbox: Mailbox, max_unacked: usize, store: Arc<dyn Store>) -> Self {
        mailbox.send_below(mailbox.next_seq());
        Self::with_record(record, mailbox, max_unacked, LongLived { key_hash: record.key_hash, store, mirror: None })
    }

    /// A long-lived session attached by this node on a cluster store, under
    /// the store's `generation`: its mailbox (read at the attach) mirrors the
    /// durable one, entries arrive through [`Session::deliver_at`].
    pub fn mirrored(
        record: &SessionRecord,
        mailbox: Mailbox,
        max_unacked: usize,
        store: Arc<dyn Store>,
        generation: u64,
    ) -> Self {
        let mirror = Some(AtomicU64::new(generation));
        Self::with_record(record, mailbox, max_unacked, LongLived { key_hash: record.key_hash, store, mirror })
    }

    fn with_record(record: &SessionRecord, mailbox: Mailbox, max_unacked: usize, ll: LongLived) -> Self {
        let mut s = Self::build(
            record.id.clone(),
            record.agent.clone(),
            Some(ll),
            mailbox,
            max_unacked,
            record.auto_accept,
            record.push_token.clone(),
            record.disconnected_at_ms,
        );
        let st = s.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        st.dropped = record.dropped;
        st.seq_reserved = st.mailbox.next_seq();
        s
    }

    /// Reserves the next block of seqs in the store; they become sendable once
    /// the reservation is durable, so a seq is never used twice, even across a
    /// crash (gaps are allowed). Long-lived sessions only.
    pub fn reserve_seqs(self: &Arc<Self>) {
        let mut st = self.state();
        self.reserve_ahead(&mut st, true);
    }

    fn reserve_ahead(self: &Arc<Self>, st: &mut State, now: bool) {
        let Some(ll) = self.long_lived.as_ref().filter(|ll| ll.mirror.is_none()) else { return };
        let next = st.mailbox.next_seq();
        if st.ended || !(now || next + SEQ_BLOCK / 2 >= st.seq_reserved) {
            return;
        }
        let upto = st.seq_reserved.max(next) + SEQ_BLOCK;
        st.seq_reserved = upto;
        let me = Arc::downgrade(self);
        ll.store.seq_reserve(&self.agent, &self.id, upto, Box::new(move || Self::reserved(&me, upto)));
    }

    /// The store made the reservation up to `upto` durable.
    fn reserved(me: &Weak<Session>, upto: u64) {
        if let Some(s) = me.upgrade() {
            let mut st = s.state();
            st.mailbox.send_below(upto);
            unlock_and_wake(st);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        id: Arc<str>,
        agent: AgentId,
        long_lived: Option<LongLived>,
        mailbox: Mailbox,
        max_unacked: usize,
        auto_accept: bool,
        push_token: Option<String>,
        disconnected_at_ms: Option<u64>,
    ) -> Self {
        Session {
            id,
            agent,
            long_lived,
            state: Mutex::new(State {
                mailbox,
                auto_accept,
                push_token,
                dropped: 0,
                attached: None,
                generation: 0,
                disconnected_at_ms,
                ended: false,
                seq_reserved: 0,
            }),
            overflowed: AtomicBool::new(false),
            missed: AtomicBool::new(false),
            max_unacked,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn is_long_lived(&self) -> bool {
        self.long_lived.is_some()
    }

    /// Whether `hash` is this session's key hash, compared in constant time.
    pub fn key_matches(&self, hash: &[u8; 32]) -> bool {
        let stored = self.long_lived.as_ref().map_or([0u8; 32], |l| l.key_hash);
        self.long_lived.is_some() & crate::secret::same(&stored, hash)
    }

    pub fn auto_accept(&self) -> bool {
        self.state().auto_accept
    }

    /// Whether the session is still valid at `now_ms`: attached, or
    /// disconnected for less than `ttl`.
    pub fn valid_at(&self, now_ms: u64, ttl: Duration) -> bool {
        Self::valid(&self.state(), now_ms, ttl)
    }

    fn valid(st: &State, now_ms: u64, ttl: Duration) -> bool {
        match (st.ended, st.attached.is_some(), st.disconnected_at_ms) {
            (true, _, _) => false,
            (false, true, _) | (false, false, None) => true,
            (false, false, Some(at)) => now_ms < at.saturating_add(ttl.as_millis() as u64),
        }
    }

    /// Ends the session — unless `unless_valid_at` (now, TTL) finds it still
    /// valid — so that no later resume can attach to it and nothing more is
    /// written for it. Returns whether this call ended it.
    pub fn end(&self, unless_valid_at: Option<(u64, Duration)>) -> bool {
        let mut st = self.state();
        if st.ended || unless_valid_at.is_some_and(|(now, ttl)| Self::valid(&st, now, ttl)) {
            return false;
        }
        st.ended = true;
        true
    }

    /// When the last connection left a long-lived session that no connection
    /// holds now; `None` for any other session.
    pub fn disconnected_at(&self) -> Option<u64> {
        let st = self.state();
        // A session made but not yet attached has no disconnect time: not idle.
        let idle = self.long_lived.is_some() && !st.ended && st.attached.is_none();
        st.disconnected_at_ms.filter(|_| idle)
    }

    /// Ends a long-lived session that a connection held and left; returns whether it did.
    pub fn end_if_detached(&self) -> bool {
        let mut st = self.state();
        if self.long_lived.is_none() || st.ended || st.attached.is_some() || st.disconnected_at_ms.is_none() {
            return false;
        }
        st.ended = true;
        true
    }

    /// The record the store keeps, `None` for a short-lived session.
    pub fn record(&self) -> Option<SessionRecord> {
        let ll = self.long_lived.as_ref()?;
        Some(Self::record_of(self, ll, &self.state()))
    }

    fn record_of(&self, ll: &LongLived, st: &State) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            key_hash: ll.key_hash,
            agent: self.agent.clone(),
            auto_accept: st.auto_accept,
            push_token: st.push_token.clone(),
            dropped: st.dropped,
            disconnected_at_ms: st.disconnected_at_ms,
        }
    }

    /// Writes the record through (buffered) while `st` is held, so records
    /// reach the store in the order they changed.
    fn save(&self, st: &State) {
        if st.ended {
            return;
        }
        // A mirrored session's record is the store's: it is changed there, one step at a time.
        if let Some(ll) = self.long_lived.as_ref().filter(|ll| ll.mirror.is_none()) {
            ll.store.session_put(&self.record_of(ll, st));
        }
    }

    /// The store's generation of this node's attachment (cluster store).
    pub fn store_generation(&self) -> Option<u64> {
        self.long_lived.as_ref()?.mirror.as_ref().map(|g| g.load(Ordering::SeqCst))
    }

    /// This node attached the session again in the store, under `generation`.
    pub fn set_store_generation(&self, generation: u64) {
        if let Some(g) = self.long_lived.as_ref().and_then(|ll| ll.mirror.as_ref()) {
            g.store(generation, Ordering::SeqCst);
        }
    }

    /// Whether a connection holds the session now.
    pub fn is_attached(&self) -> bool {
        self.state().attached.is_some()
    }

    /// Another node attached the session under `generation`: the connection
    /// here is taken over (4005) unless it is newer. Returns whether it was.
    pub fn taken_elsewhere(&self, generation: u64) -> bool {
        let mut st = self.state();
        if self.store_generation().is_none_or(|g| g >= generation) {
            return false;
        }
        if let Some(a) = st.attached.take() {
            a.stop.cancel();
        }
        st.ended = true;
        true
    }

    /// Everything the store held up to `upto` is in the mailbox (read in one
    /// step): later seqs are sent in order from there (mirrored session).
    pub fn contiguous_upto(&self, upto: u64) {
        let mut st = self.state();
        st.mailbox.contiguous_upto(upto);
        unlock_and_wake(st);
    }

    /// The seq a mirrored session's connection waits for (see `Mailbox::gap`).
    pub fn gap(&self) -> Option<u64> {
        self.state().mailbox.gap()
    }

    /// Puts an entry the store already holds at `seq` (mirrored session);
    /// `None` when it is held already or the session ended.
    pub fn deliver_at(&self, seq: u64, n: &Arc<Notification>) -> Option<Pushed> {
        let mut st = self.state();
        if st.ended {
            return None;
        }
        let pushed = st.mailbox.push_at(seq, n.clone())?;
        unlock_and_wake(st);
        Some(pushed)
    }

    /// Attaches a connection: any earlier one is taken over, and everything
    /// unacked is due again to the new one. `auto_accept` and `push_token`
    /// follow what the client asks now; the attachment's stop token is a
    /// child of `shutdown`. `None` once the session has ended.
    pub fn attach(
        &self,
        auto_accept: bool,
        push_token: Option<String>,
        shutdown: &CancellationToken,
    ) -> Option<Attachment> {
        self.attach_as(None, auto_accept, push_token, shutdown)
    }

    /// [`Session::attach`], for a mirrored session under the store's
    /// `generation`, in one step: no detach of an earlier connection can
    /// come between the two and be written under the new generation.
    pub fn attach_as(
        &self,
        store_generation: Option<u64>,
        auto_accept: bool,
        push_token: Option<String>,
        shutdown: &CancellationToken,
    ) -> Option<Attachment> {
        let mut st = self.state();
        if st.ended {
            return None;
        }
        if let (Some(g), Some(mirror)) = (store_generation, self.long_lived.as_ref().and_then(|ll| ll.mirror.as_ref()))
        {
            mirror.store(g, Ordering::SeqCst);
        }
        if let Some(old) = st.attached.take() {
            old.stop.cancel();
        }
        st.generation += 1;
        let (stop, wake) = (shutdown.child_token(), Arc::new(Signal::default()));
        st.attached = Some(Attached { generation: st.generation, stop: stop.clone(), wake: wake.clone() });
        st.disconnected_at_ms = None;
        st.auto_accept = auto_accept;
        st.push_token = push_token;
        let dropped = std::mem::take(&mut st.dropped);
        st.mailbox.rewind();
        self.overflowed.store(false, Ordering::Release);
        self.save(&st);
        let generation = st.generation;
        drop(st);
        // Everything unacked is due to the new connection: its first turn writes it.
        wake.notify();
        Some(Attachment { generation, stop, wake, dropped, store_generation: self.store_generation() })
    }

    /// Detaches the connection of `generation` if it is still the attached
    /// one; a long-lived session's TTL starts at `now_ms`. Returns whether it was.
    pub fn detach(&self, generation: u64, now_ms: u64) -> bool {
        let mut st = self.state();
        if st.attached.as_ref().is_none_or(|a| a.generation != generation) {
            return false;
        }
        st.attached = None;
        st.disconnected_at_ms = Some(now_ms);
        self.save(&st);
        true
    }

    /// Detaches whatever connection is attached (shutdown).
    pub fn detach_any(&self, now_ms: u64) {
        let generation = self.state().attached.as_ref().map(|a| a.generation);
        if let Some(g) = generation {
            self.detach(g, now_ms);
        }
    }

    /// Queues a notification (written through for a long-lived session) and
    /// wakes the connection.
    pub fn deliver(self: &Arc<Self>, n: &Arc<Notification>) -> Delivered {
        let mut st = self.state();
        let pushed = st.mailbox.push(n.clone());
        let mut out = Delivered { dropped: pushed.dropped.is_some(), announce_to: None };
        if let Some(ll) = self.long_lived.as_ref().filter(|_| !st.ended) {
            // Under the lock: an ack of this seq must not reach the store before its put.
            ll.store.mailbox_put(&self.agent, &self.id, pushed.seq, n);
            if let Some(seq) = pushed.dropped {
                ll.store.mailbox_remove(&self.agent, &self.id, seq);
                st.dropped += 1;
                self.save(&st);
            }
            if st.attached.is_none() {
                out.announce_to = st.push_token.clone();
            }
            self.reserve_ahead(&mut st, false);
        } else if st.attached.is_some() && st.mailbox.len() > self.max_unacked {
            // Short-lived: the queue past max_unacked closes the connection
            // (4004); a long-lived one keeps it in its mailbox (flow control).
            self.overflowed.store(true, Ordering::Release);
        }
        unlock_and_wake(st);
        out
    }

    /// Removes an acknowledged notification; returns how long it waited since
    /// first sent, `None` for an unknown or already acked uuid.
    pub fn ack(&self, uuid: &str, now: Instant) -> Option<Duration> {
        let mut st = self.state();
        let (seq, waited) = st.mailbox.ack(uuid, now)?;
        if let Some(ll) = self.long_lived.as_ref().filter(|_| !st.ended) {
            ll.store.mailbox_remove(&self.agent, &self.id, seq);
        }
        // The window has room again for what waits behind it.
        if st.mailbox.waiting() {
            unlock_and_wake(st);
        }
        Some(waited)
    }

    /// What the connection of `generation` should write now; nothing when it
    /// is no longer the attached one. [`Stalled`]: close it with 4004.
    pub fn take_due(
        &self,
        generation: u64,
        now: Instant,
        ack_timeout: Duration,
        out: &mut Vec<Due>,
    ) -> Result<Option<Instant>, Stalled> {
        let mut st = self.state();
        if st.attached.as_ref().is_none_or(|a| a.generation != generation) {
            return Ok(None);
        }
        st.mailbox.take_due(now, ack_timeout, out)
    }

    /// What the connection of `generation` took at `taken` is written now
    /// (see [`Mailbox::written`]); returns when to look again.
    pub fn written(&self, generation: u64, taken: Instant, now: Instant, ack_timeout: Duration) -> Option<Instant> {
        let mut st = self.state();
        if st.attached.as_ref().is_none_or(|a| a.generation != generation) {
            return None;
        }
        st.mailbox.written(taken, now, ack_timeout)
    }

    /// Whether the client of a short-lived session let more than
    /// `max_unacked` pile up (close 4004).
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Notifications for this session were lost before reaching this node.
    pub fn missed_notifications(&self) {
        self.missed.store(true, Ordering::Release);
        unlock_and_wake(self.state());
    }

    pub fn has_missed(&self) -> bool {
        self.missed.load(Ordering::Acquire)
    }

    pub fn mailbox_len(&self) -> usize {
        self.state().mailbox.len()
    }
}
