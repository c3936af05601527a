//! The life of sessions (contract section 6): open or resume on `hello`,
//! detach on disconnect, end on `end_session`, expire after the TTL, restore
//! after a restart. What follows from them (chat availability records,
//! auto-accept) is told to [`Reactions`], above this module.

use super::placed::Cluster;
use super::{AgentId, Attachment, Full, Mailbox, Notification, Roster, Session, SessionKey};
use crate::clock::Clock;
use crate::fault::ErrorKind;
use crate::metrics::Metrics;
use crate::push::{Announcement, Push};
use crate::store::{SessionRecord, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub ttl: Duration,
    pub max_unacked: usize,
    pub mailbox_capacity: usize,
    /// Most sessions of one agent (at least 1).
    pub max_sessions_per_agent: usize,
    /// Decides TTLs: disconnect times, expiry.
    pub clock: Arc<dyn Clock>,
}

/// What a `hello` asks for.
#[derive(Debug, Clone, Default)]
pub struct OpenRequest {
    pub long_lived: bool,
    pub session_key: Option<String>,
    pub auto_accept: bool,
    pub push_token: Option<String>,
    /// The connection's attachment stops on a child of it (the bridge's shutdown).
    pub shutdown: CancellationToken,
}

pub struct Opened {
    pub held: Held,
    /// The key to give the client (long-lived sessions).
    pub key: Option<String>,
    pub resumed: bool,
}

pub struct Sessions {
    pub(super) roster: Arc<Roster>,
    pub(super) store: Arc<dyn Store>,
    pub(super) reactions: Arc<dyn Reactions>,
    pub(super) push: Arc<dyn Push>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) settings: SessionSettings,
    /// Set on a cluster store: sessions are shared with the other nodes
    /// (`placed.rs`).
    pub(super) cluster: Option<Cluster>,
}

/// What follows from session lifecycle events and lives above this module:
/// the records the bridge publishes (chat availability, auto-accept), which
/// need the bus. Sessions only tell; they never name the bus.
#[async_trait::async_trait]
pub trait Reactions: Send + Sync + 'static {
    /// The agent's count of valid long-lived sessions changed by `delta`.
    async fn availability_changed(&self, agent: &AgentId, delta: i64);
    /// Sessions of these agents came back at start-up: decide again what
    /// was not published before the bridge stopped.
    async fn restored(&self, agents: Vec<AgentId>) -> Result<(), StoreError>;
    /// Retries what could not be done yet (every sweep).
    async fn retry(&self);
    /// `interaction` was offered to `who`, a valid session of whom asked for auto-accept.
    async fn accept(&self, who: &AgentId, interaction: &str);
}

impl Sessions {
    pub fn new(
        roster: Arc<Roster>,
        store: Arc<dyn Store>,
        reactions: Arc<dyn Reactions>,
        push: Arc<dyn Push>,
        metrics: Arc<Metrics>,
        settings: SessionSettings,
    ) -> Self {
        Sessions { roster, store, reactions, push, metrics, settings, cluster: None }
    }

    /// Shares the sessions with the other nodes of a cluster store.
    pub fn clustered(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Brings back the long-lived sessions of the store, expires those whose
    /// TTL passed while the bridge was down, and publishes any availability
    /// change not yet published. Returns how many sessions came back.
    pub async fn restore(&self) -> Result<usize, StoreError> {
        if let Some(c) = &self.cluster {
            // Nothing to bring back: a session is read from the store when
            // attached. Sessions whose TTL passed while no node ran end now.
            self.sweep_placed(c).await;
            return Ok(0);
        }
        let stored = self.store.sessions().await?;
        let now = self.settings.clock.now_ms();
        let count = stored.len();
        for s in stored {
            let mut record = s.record;
            // A bridge stopped by SIGKILL never recorded the disconnect: count the TTL from now.
            record.disconnected_at_ms.get_or_insert(now);
            let (capacity, window) = (self.settings.mailbox_capacity, self.settings.max_unacked);
            let mailbox = Mailbox::restore(capacity, window, s.next_seq, s.mailbox);
            let session =
                Arc::new(Session::long_lived(&record, mailbox, self.settings.max_unacked, self.store.clone()));
            session.reserve_seqs();
            self.add(session);
        }
        self.store.sync().await?;
        self.reactions.restored(self.roster.all_long_lived().iter().map(|s| s.agent.clone()).collect()).await?;
        self.sweep().await;
        Ok(count)
    }

    /// Opens the session a `hello` asks for: resumes it when the key is valid
    /// for this agent, else creates a new one (long-lived when asked, or when
    /// a key was given).
    pub async fn open(self: &Arc<Self>, agent: AgentId, req: OpenRequest) -> Result<Opened, OpenError> {
        if self.cluster.is_some() {
            return self.open_placed(agent, req).await;
        }
        if let Some(text) = &req.session_key {
            let found = self.find(&agent, text);
            // None: it ended between the lookup and now; a new session follows.
            if let Some((session, attachment)) =
                found.and_then(|s| s.attach(req.auto_accept, req.push_token.clone(), &req.shutdown).map(|a| (s, a)))
            {
                let held = self.hold(session, attachment);
                // No sync: after a crash the session counts as disconnected anyway.
                self.metrics.sessions_resumed.increment(1);
                return Ok(Opened { held, key: Some(text.clone()), resumed: true });
            }
        }
        let id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        if !(req.long_lived || req.session_key.is_some()) {
            let session = Arc::new(Session::new(id, agent, self.settings.max_unacked));
            self.add(session.clone());
            let attachment = session.attach(req.auto_accept, None, &req.shutdown).ok_or(OpenError::EndedAtOnce)?;
            return Ok(Opened { held: self.hold(session, attachment), key: None, resumed: false });
        }
        if !self.store.ready() {
            // Its key could not be made durable; refusing now also keeps
            // retrying clients from piling writes on a failing disk.
            return Err(StoreError::new(ErrorKind::Unavailable, "the store cannot write").into());
        }
        let (text, key) = SessionKey::generate(&id);
        let record = SessionRecord {
            id,
            key_hash: key.hash,
            agent,
            auto_accept: req.auto_accept,
            push_token: req.push_token.clone(),
            dropped: 0,
            disconnected_at_ms: None,
        };
        let mailbox = Mailbox::new(self.settings.mailbox_capacity, self.settings.max_unacked);
        let session = Arc::new(Session::long_lived(&record, mailbox, self.settings.max_unacked, self.store.clone()));
        let delta = self.admit(&session)?;
        let attachment =
            session.attach(req.auto_accept, req.push_token, &req.shutdown).ok_or(OpenError::EndedAtOnce)?;
        let held = self.hold(session.clone(), attachment);
        session.reserve_seqs();
        // The key must survive a crash before the client is given it.
        if let Err(e) = self.store.sync().await {
            session.end(None);
            self.remove(&session);
            self.store.session_delete(&session.agent, &session.id);
            self.reactions.availability_changed(&session.agent, delta - 1).await;
            return Err(e.into());
        }
        self.reactions.availability_changed(&session.agent, delta).await;
        Ok(Opened { held, key: Some(text), resumed: false })
    }

    /// Registers a new long-lived session within its agent's cap, ending the
    /// least recently connected disconnected one to make room (as
    /// `end_session` would; its deletion is made durable by the caller's
    /// sync); returns the change to the agent's count of long-lived sessions.
    fn admit(&self, session: &Arc<Session>) -> Result<i64, OpenError> {
        let cap = self.settings.max_sessions_per_agent;
        let evicted = self.roster.add_capped(session.clone(), cap).map_err(|Full| OpenError::TooManySessions(cap))?;
        self.metrics.sessions.increment(1.0);
        let Some(old) = evicted else { return Ok(1) };
        tracing::debug!(session = %old.id, agent = %old.agent.agent_guid, "session ended to make room");
        self.metrics.sessions.decrement(1.0);
        self.metrics.sessions_evicted.increment(1);
        self.store.session_delete(&old.agent, &old.id);
        Ok(0)
    }

    /// The valid long-lived session `text` names, if it belongs to `agent`.
    /// Whatever fails, the caller learns nothing but "no".
    fn find(&self, agent: &AgentId, text: &str) -> Option<Arc<Session>> {
        let key = SessionKey::parse(text)?;
        let Some(session) = self.roster.long_lived(&key.session_id) else {
            // Same work as a wrong secret, so timing does not tell which ids exist.
            std::hint::black_box(crate::secret::same(&[0; 32], &key.hash));
            return None;
        };
        let owned = session.key_matches(&key.hash) & (session.agent == *agent);
        (owned && session.valid_at(self.settings.clock.now_ms(), self.settings.ttl)).then_some(session)
    }

    pub(super) fn add(&self, session: Arc<Session>) {
        self.roster.add(session);
        self.metrics.sessions.increment(1.0);
    }

    pub(super) fn remove(&self, session: &Arc<Session>) -> bool {
        let removed = self.roster.remove(session);
        if removed {
            self.metrics.sessions.decrement(1.0);
        }
        removed
    }

    /// A connection's hold on a session, released however the connection's
    /// task ends (closed, failed, cancelled or panicked).
    pub(super) fn hold(self: &Arc<Self>, session: Arc<Session>, attachment: Attachment) -> Held {
        Held { sessions: self.clone(), session, attachment }
    }

    /// The connection of `attachment` is gone: a short-lived session ends, a
    /// long-lived one keeps its mailbox and starts counting its TTL.
    fn disconnected(&self, session: &Arc<Session>, attachment: &Attachment) {
        if let Some(c) = &self.cluster {
            return self.disconnected_placed(c, session, attachment);
        }
        if session.is_long_lived() {
            session.detach(attachment.generation, self.settings.clock.now_ms());
        } else {
            self.remove(session);
        }
    }

    /// `end_session`: the session, its key and its mailbox are gone.
    /// `false`: the session was attached elsewhere since (cluster store):
    /// not this connection's to end.
    pub async fn end(&self, session: &Arc<Session>, attachment: &Attachment) -> Result<bool, StoreError> {
        if let (Some(c), Some(generation)) = (&self.cluster, attachment.store_generation) {
            return self.end_placed(c, session, generation).await;
        }
        if !session.is_long_lived() || !session.end(None) {
            return Ok(true);
        }
        self.remove(session);
        self.store.session_delete(&session.agent, &session.id);
        // The session is gone whatever the sync says (its delete is retried
        // until durable): its availability goes with it.
        let synced = self.store.sync().await;
        self.reactions.availability_changed(&session.agent, -1).await;
        synced.map(|()| true)
    }

    /// Removes expired sessions, forgets expired store entries and retries
    /// unpublished availability changes. Run every second or so.
    pub async fn sweep(&self) {
        if let Some(c) = &self.cluster {
            return self.sweep_placed(c).await;
        }
        let now = self.settings.clock.now_ms();
        let mut expired = Vec::new();
        for s in self.roster.all_long_lived() {
            // Ended under the session's lock: a resume racing the sweep either
            // attached first (then it is valid) or finds it ended.
            if s.end(Some((now, self.settings.ttl))) {
                self.remove(&s);
                tracing::debug!(session = %s.id, "session expired");
                self.metrics.sessions_expired.increment(1);
                self.store.session_delete(&s.agent, &s.id);
                expired.push(s);
            }
        }
        // One commit for every session that expired in this sweep.
        if !expired.is_empty() {
            if let Err(e) = self.store.sync().await {
                tracing::warn!(error = %e, "cannot record expired sessions");
            }
        }
        for s in expired {
            self.reactions.availability_changed(&s.agent, -1).await;
        }
        if let Err(e) = self.store.expire().await {
            tracing::warn!(error = %e, "store expiry failed");
        }
        self.reactions.retry().await;
    }

    /// Puts a notification in the mailbox of every session of one agent;
    /// returns how many.
    pub fn deliver_to_agent(&self, tenant: &str, agent: &str, n: &Arc<Notification>) -> usize {
        self.roster.for_agent(tenant, agent, |s| self.deliver_to(n, s))
    }

    /// Puts a notification in the mailbox of every session of one tenant.
    /// Outside the roster's lock: a tenant-wide fan-out must not hold up
    /// hellos and disconnects.
    pub fn deliver_to_tenant(&self, tenant: &str, n: &Arc<Notification>) -> usize {
        let sessions = self.roster.of_tenant(tenant);
        sessions.iter().for_each(|s| self.deliver_to(n, s));
        sessions.len()
    }

    /// Puts a notification in one session's mailbox; a disconnected
    /// long-lived session with a push token gets it announced.
    pub(super) fn deliver_to(&self, n: &Arc<Notification>, s: &Arc<Session>) {
        let d = s.deliver(n);
        if d.dropped {
            self.metrics.mailbox_dropped.increment(1);
        }
        if let Some(token) = d.announce_to {
            self.push.announce(Announcement { token, session_id: s.id.clone(), ty: n.ty, uuid: n.uuid.clone() });
        }
    }

    /// An interaction was offered to the agent: accept it on the agent's
    /// behalf once, if a valid session of the agent asked for auto-accept.
    pub async fn offered(&self, tenant: &str, agent: &str, interaction: &str) {
        if let Some(c) = &self.cluster {
            return self.offered_placed(c, tenant, agent, interaction).await;
        }
        let now = self.settings.clock.now_ms();
        let mut who = None;
        self.roster.for_agent(tenant, agent, |s| {
            if who.is_none() && s.auto_accept() && s.valid_at(now, self.settings.ttl) {
                who = Some(s.agent.clone());
            }
        });
        let Some(who) = who else { return };
        self.reactions.accept(&who, interaction).await;
    }

    /// On shutdown: every attached long-lived session starts its TTL now.
    pub fn detach_all(&self) {
        if let Some(c) = &self.cluster {
            return self.detach_all_placed(c);
        }
        for s in self.roster.all_long_lived() {
            s.detach_any(self.settings.clock.now_ms());
        }
    }
}

/// A connection's hold on its session: dropping it detaches the connection
/// (a short-lived session ends, a long-lived one starts its TTL).
pub struct Held {
    sessions: Arc<Sessions>,
    pub session: Arc<Session>,
    pub attachment: Attachment,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.sessions.disconnected(&self.session, &self.attachment);
    }
}

/// Why a `hello` got no session.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the agent already has {0} sessions, all connected")]
    TooManySessions(usize),
    /// A session that was just made cannot have ended; if it somehow did,
    /// the client is told to reconnect rather than the bridge panicking.
    #[error("the new session ended before it was attached")]
    EndedAtOnce,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("sessions", &self.roster.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::embedded::LogLimits;
    use crate::bus::EmbeddedBus;
    use crate::clock::ManualClock;
    use crate::push::NoPush;
    use crate::reactions::{BridgeRecords, ReactionSettings};
    use crate::schema::SchemaSet;
    use crate::session::Stalled;
    use crate::store::{DedupCapacity, EmbeddedStore};
    use std::time::Instant;

    const TTL: Duration = Duration::from_secs(3600);

    struct Fixture {
        sessions: Arc<Sessions>,
        clock: Arc<ManualClock>,
        bus: Arc<EmbeddedBus>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        fixture_with_window(10)
    }

    /// Sessions whose connections have at most `window` notifications unacked.
    fn fixture_with_window(window: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(ManualClock::new(1_000_000));
        let store = EmbeddedStore::open(dir.path(), DedupCapacity { per_tenant: 100, total: 100 }, clock.clone())
            .expect("store");
        let schemas = Arc::new(SchemaSet::load(None).expect("schemas"));
        let bus = Arc::new(EmbeddedBus::new(LogLimits { records: 100, bytes: 1 << 20 }));
        let store: Arc<dyn Store> = Arc::new(store);
        let metrics = Arc::new(Metrics::new(schemas.action_names()));
        let settings = ReactionSettings { source: "test".into(), claim_ttl: TTL };
        let records = Arc::new(BridgeRecords::new(store.clone(), bus.clone(), schemas, metrics.clone(), settings));
        let sessions = Arc::new(Sessions::new(
            Arc::new(Roster::default()),
            store,
            records,
            Arc::new(NoPush),
            metrics,
            SessionSettings {
                ttl: TTL,
                max_unacked: window,
                mailbox_capacity: 10,
                max_sessions_per_agent: 4,
                clock: clock.clone(),
            },
        ));
        Fixture { sessions, clock, bus, _dir: dir }
    }

    /// How long a connection waits for an ack (redelivery, and the 4004 stall).
    const ACK_TIMEOUT: Duration = Duration::from_secs(10);

    fn note(uuid: &str) -> Arc<Notification> {
        Arc::new(Notification { ty: cceb_protocol::NotificationType::Presence, uuid: uuid.into(), data: "{}".into() })
    }

    /// What the attached connection of `opened` is due to write at `now`: (seq, redelivery).
    fn due(opened: &Opened, now: Instant) -> Result<Vec<(u64, bool)>, Stalled> {
        let mut out = Vec::new();
        opened.held.session.take_due(opened.held.attachment.generation, now, ACK_TIMEOUT, &mut out)?;
        Ok(out.iter().map(|d| (d.seq, d.redelivery)).collect())
    }

    fn deliver(f: &Fixture, uuids: impl IntoIterator<Item = u32>) {
        for i in uuids {
            assert_eq!(f.sessions.deliver_to_agent("t", "a", &note(&format!("n{i}"))), 1);
        }
    }

    fn agent() -> AgentId {
        AgentId { tenant_guid: "t".into(), agent_guid: "a".into(), ir_instance: "ir".into() }
    }

    fn long_lived(key: Option<&str>) -> OpenRequest {
        OpenRequest { long_lived: true, session_key: key.map(str::to_owned), ..OpenRequest::default() }
    }

    /// (record, value of `field`) of what the bridge published.
    async fn published(f: &Fixture, field: &str) -> Vec<(String, serde_json::Value)> {
        let page = serde_json::to_value(f.bus.read_after(0, 100, Duration::ZERO).await.expect("page")).expect("json");
        let records = page["records"].as_array().cloned().unwrap_or_default();
        records
            .iter()
            .map(|r| (r["record"].as_str().unwrap_or_default().to_owned(), r["value"][field].clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_key_resumes_within_the_ttl_counted_from_disconnect_and_not_after() {
        let f = fixture();
        let first = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        let key = first.key.clone().expect("key");
        // Connected for longer than the TTL: still valid.
        f.clock.advance(TTL * 2);
        drop(first);
        f.clock.advance(TTL - Duration::from_millis(1));
        let again = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("resume");
        assert!(again.resumed);
        drop(again);
        f.clock.advance(TTL);
        let late = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("open");
        assert!(!late.resumed, "expired: a new session");
        assert_ne!(late.key.as_deref(), Some(key.as_str()));
    }

    #[tokio::test]
    async fn a_resumed_session_replays_its_unacked_backlog_window_by_window_as_acks_free_it() {
        let f = fixture_with_window(3);
        let t0 = Instant::now();
        let first = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        let key = first.key.clone().expect("key");
        deliver(&f, [1]);
        assert_eq!(due(&first, t0), Ok(vec![(1, false)]), "written, never acked");
        drop(first);
        deliver(&f, 2..=7);
        let again = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("resume");
        assert!(again.resumed);
        let ack = |uuids: &[&str]| uuids.iter().for_each(|u| assert!(again.held.session.ack(u, t0).is_some()));
        assert_eq!(due(&again, t0), Ok(vec![(1, true), (2, false), (3, false)]), "the first window, in seq order");
        assert_eq!(due(&again, t0), Ok(vec![]), "no more than the window in flight");
        ack(&["n1", "n2"]);
        assert_eq!(due(&again, t0), Ok(vec![(4, false), (5, false)]));
        ack(&["n3", "n4", "n5"]);
        assert_eq!(due(&again, t0), Ok(vec![(6, false), (7, false)]));
        ack(&["n6", "n7"]);
        assert_eq!(again.held.session.mailbox_len(), 0);
    }

    #[tokio::test]
    async fn a_full_window_unacked_for_the_ack_timeout_stalls_with_4004_and_a_resume_replays_it() {
        let f = fixture_with_window(2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let first = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        let key = first.key.clone().expect("key");
        deliver(&f, 1..=3);
        assert_eq!(due(&first, t0), Ok(vec![(1, false), (2, false)]));
        let timeout_ms = ACK_TIMEOUT.as_millis() as u64;
        // Just before the ack timeout: neither redelivered nor stalled.
        assert_eq!(due(&first, at(timeout_ms - 1)), Ok(vec![]));
        assert_eq!(due(&first, at(timeout_ms)), Err(Stalled), "the full window waited the ack timeout: 4004");
        // The client reconnects with its key: nothing was lost, and the new
        // connection starts with an empty window.
        let again = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("resume");
        assert!(again.resumed);
        assert_eq!(due(&first, at(timeout_ms)), Ok(vec![]), "the stalled connection writes nothing more");
        assert_eq!(due(&again, at(timeout_ms)), Ok(vec![(1, true), (2, true)]));
        assert!(again.held.session.ack("n1", at(timeout_ms)).is_some(), "an ack restarts the stall clock");
        assert_eq!(due(&again, at(2 * timeout_ms - 1)), Ok(vec![(3, false)]));
        assert_eq!(due(&again, at(2 * timeout_ms)), Ok(vec![(2, true)]), "redelivered, not stalled: an ack came");
    }

    #[tokio::test]
    async fn availability_goes_up_with_the_first_session_and_stays_through_disconnect_resume_and_takeover_until_the_ttl(
    ) {
        let f = fixture();
        let available = || async { published(&f, "available").await.into_iter().map(|(_, v)| v).collect::<Vec<_>>() };
        let first = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        let key = first.key.clone().expect("key");
        assert_eq!(available().await, [true], "the first session: available");
        drop(first);
        f.clock.advance(TTL - Duration::from_millis(1));
        f.sessions.sweep().await;
        let resumed = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("resume");
        let taken_over = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("takeover");
        assert!(resumed.resumed && taken_over.resumed);
        drop(resumed);
        assert_eq!(available().await, [true], "disconnect, resume and takeover change nothing");
        drop(taken_over);
        f.clock.advance(TTL - Duration::from_millis(1));
        f.sessions.sweep().await;
        assert_eq!(available().await, [true], "valid until its TTL passed");
        f.clock.advance(Duration::from_millis(1));
        f.sessions.sweep().await;
        assert_eq!(available().await, [true, false], "the TTL passed: the last session went");
        let _again = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        assert_eq!(available().await, [true, false, true], "a first session again");
    }

    #[tokio::test]
    async fn a_second_connection_takes_the_session_over_and_the_first_detaches_nothing() {
        let f = fixture();
        let first = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        let key = first.key.clone().expect("key");
        let second = f.sessions.open(agent(), long_lived(Some(&key))).await.expect("resume");
        assert!(first.held.attachment.stop.is_cancelled(), "the first connection is told (4005)");
        drop(first);
        assert!(
            second.held.session.disconnected_at().is_none(),
            "the old connection's end leaves the new one attached"
        );
    }

    #[tokio::test]
    async fn the_sweep_ends_a_session_once_its_ttl_passed_and_availability_follows_each_transition() {
        let f = fixture();
        let one = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        let two = f.sessions.open(agent(), long_lived(None)).await.expect("open");
        assert_eq!(published(&f, "available").await, [("AgentChatAvailabilityEvent".to_owned(), true.into())]);
        drop(two);
        f.sessions.end(&one.held.session, &one.held.attachment).await.expect("end");
        assert_eq!(published(&f, "available").await.len(), 1, "the other session is still valid");
        f.clock.advance(TTL - Duration::from_millis(1));
        f.sessions.sweep().await;
        assert_eq!(f.sessions.roster.all_long_lived().len(), 1);
        f.clock.advance(Duration::from_millis(1));
        f.sessions.sweep().await;
        assert!(f.sessions.roster.all_long_lived().is_empty());
        let records = published(&f, "available").await;
        assert_eq!(records.last(), Some(&("AgentChatAvailabilityEvent".to_owned(), false.into())));
        assert_eq!(records.len(), 2);
    }

    #[tokio::test]
    async fn auto_accept_claims_an_interaction_once_for_any_session_that_asked() {
        let f = fixture();
        let req = OpenRequest { auto_accept: true, ..long_lived(None) };
        let _a = f.sessions.open(agent(), req.clone()).await.expect("open");
        let _b = f.sessions.open(agent(), req).await.expect("open");
        f.sessions.offered("t", "a", "i-1").await;
        f.sessions.offered("t", "a", "i-1").await;
        f.sessions.offered("t", "a", "i-2").await;
        f.sessions.offered("t", "other", "i-3").await;
        let accepts: Vec<_> =
            published(&f, "interactionId").await.into_iter().filter(|(r, _)| r == "AcceptInteractionEvent").collect();
        assert_eq!(
            accepts,
            [("AcceptInteractionEvent".to_owned(), "i-1".into()), ("AcceptInteractionEvent".to_owned(), "i-2".into())]
        );
    }

    #[tokio::test]
    async fn a_disconnected_session_auto_accepts_within_its_ttl_and_not_once_it_passed_even_before_the_sweep() {
        let f = fixture();
        let opened = f.sessions.open(agent(), OpenRequest { auto_accept: true, ..long_lived(None) }).await;
        drop(opened.expect("open"));
        f.clock.advance(TTL - Duration::from_millis(1));
        f.sessions.offered("t", "a", "i-1").await;
        f.clock.advance(Duration::from_millis(1));
        f.sessions.offered("t", "a", "i-2").await;
        let accepted: Vec<_> =
            published(&f, "interactionId").await.into_iter().filter(|(r, _)| r == "AcceptInteractionEvent").collect();
        assert_eq!(accepted, [("AcceptInteractionEvent".to_owned(), "i-1".into())]);
    }

    #[tokio::test]
    async fn a_connection_task_killed_or_panicking_mid_flight_still_detaches_and_the_session_expires() {
        let f = fixture();
        for kill in ["abort", "panic"] {
            let opened = f.sessions.open(agent(), long_lived(None)).await.expect("open");
            let session = opened.held.session.clone();
            assert!(session.disconnected_at().is_none(), "attached");
            let task = tokio::spawn(async move {
                let _held = opened.held;
                if kill == "panic" {
                    panic!("a connection task panics mid-flight");
                }
                std::future::pending::<()>().await;
            });
            if kill == "abort" {
                tokio::task::yield_now().await;
                task.abort();
            }
            assert!(task.await.is_err(), "{kill}: the task did not end normally");
            assert!(session.disconnected_at().is_some(), "{kill}: detached");
            f.clock.advance(TTL);
            f.sessions.sweep().await;
            assert!(f.sessions.roster.long_lived(&session.id).is_none(), "{kill}: expired after its TTL");
        }
        assert!(f.sessions.roster.is_empty());
    }
}
