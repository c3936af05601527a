//! The embedded store: reads from memory, writes through the SQLite journal
//! under `CCEB_DATA_DIR`, everything read back at start-up.

use super::journal::{AfterCommit, Journal, Op, OpenError};
use super::memory::{agent_key, Memory};
use super::{AgentEntry, DedupCapacity, DedupKey, DirectoryOp, SessionRecord, Store, StoreError, StoredSession};
use crate::clock::Clock;
use crate::fault::ErrorKind;
use crate::model::{AgentId, Notification};
use crate::sync::lock;
use async_trait::async_trait;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct EmbeddedStore {
    mem: Memory,
    journal: Journal,
    /// Read back at open; handed out once.
    loaded: Mutex<Vec<StoredSession>>,
    /// Decides when dedup keys and auto-accept claims expire.
    clock: Arc<dyn Clock>,
}

impl EmbeddedStore {
    pub fn open(dir: &Path, dedup: DedupCapacity, clock: Arc<dyn Clock>) -> Result<EmbeddedStore, OpenError> {
        let now = clock.now_ms();
        let (journal, loaded) = Journal::open(dir, now)?;
        let mem = Memory::new(dedup);
        for (tenant, entry) in loaded.directory {
            mem.directory_apply(&tenant, DirectoryOp::Put(entry));
        }
        {
            // In expiry order, as they were inserted: a capacity lowered since
            // evicts each tenant's oldest, and the first `expire` trims the journal.
            let mut d = mem.dedup();
            for (tenant, hash, expires) in loaded.dedup {
                d.insert(&DedupKey { tenant: tenant.into(), hash }, expires, now);
            }
        }
        {
            let mut counts = lock(&mem.counts);
            for s in &loaded.sessions {
                *counts.entry(agent_key(&s.record.agent)).or_default() += 1;
            }
        }
        lock(&mem.published).extend(loaded.published.into_iter().map(|a| (agent_key(&a), a)));
        lock(&mem.accepted).extend(loaded.accepted.into_iter().map(|(a, i, expires)| ((agent_key(&a), i), expires)));
        Ok(EmbeddedStore { mem, journal, loaded: Mutex::new(loaded.sessions), clock })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        // A barrier fails only while a commit fails for a reason that passes
        // (lock, disk) or once the store is closed: writes the database
        // refuses for their content are discarded by the journal, not reported.
        self.journal.sync().await.map_err(|e| StoreError::new(ErrorKind::Unavailable, e))
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> Result<Option<AgentEntry>, StoreError> {
        let agent = match &op {
            DirectoryOp::Put(e) => e.agent_guid.clone(),
            DirectoryOp::Patch { agent_guid, .. } | DirectoryOp::Remove { agent_guid } => agent_guid.clone(),
        };
        let (prev, next) = self.mem.directory_apply(tenant, op);
        // Buffered: the event that caused it is acknowledged after the next `sync`.
        self.journal.push(match next {
            Some(entry) => Op::DirectoryPut { tenant: tenant.to_owned(), entry },
            None => Op::DirectoryRemove { tenant: tenant.to_owned(), agent },
        });
        Ok(prev)
    }

    async fn directory_get(&self, tenant: &str, agent_guid: &str) -> Result<Option<AgentEntry>, StoreError> {
        Ok(self.mem.directory_get(tenant, agent_guid))
    }

    async fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.mem.resolve_contact(tenant, contact_id))
    }

    async fn dedup_contains(&self, key: &DedupKey) -> Result<bool, StoreError> {
        Ok(self.mem.dedup().contains(key, self.clock.now_ms()))
    }

    async fn dedup_insert(&self, key: &DedupKey, window: Duration) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let mut dedup = self.mem.dedup();
        let expires_ms = dedup.insert(key, now.saturating_add(window.as_millis() as u64), now);
        // Buffered, durable with the next group commit: a crash can lose only keys
        // whose ack may not have reached the client, whose retry republishes anyway.
        // Pushed under the dedup lock so the journal sees puts and trims in memory's order.
        self.journal.push(Op::DedupPut { tenant: key.tenant.clone(), key: key.hash, expires_ms });
        Ok(())
    }

    async fn sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        Ok(std::mem::take(&mut *lock(&self.loaded)))
    }

    fn session_put(&self, record: &SessionRecord) {
        self.journal.push(Op::SessionPut(record.clone()));
    }

    fn session_delete(&self, _agent: &AgentId, id: &str) {
        self.journal.push(Op::SessionDelete(id.to_owned()));
    }

    fn mailbox_put(&self, _agent: &AgentId, session: &Arc<str>, seq: u64, n: &Arc<Notification>) {
        self.journal.push(Op::MailboxPut { session: session.clone(), seq, n: n.clone() });
    }

    fn mailbox_remove(&self, _agent: &AgentId, session: &Arc<str>, seq: u64) {
        self.journal.push(Op::MailboxRemove { session: session.clone(), seq });
    }

    fn seq_reserve(&self, _agent: &AgentId, session: &Arc<str>, upto: u64, durable: Box<dyn FnOnce() + Send>) {
        self.journal.push(Op::SeqReserve { session: session.clone(), upto });
        self.journal.push(Op::AfterCommit(AfterCommit(durable)));
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.durable().await
    }

    async fn availability_count(&self, agent: &AgentId, delta: i64) -> Result<u64, StoreError> {
        let mut counts = lock(&self.mem.counts);
        let key = agent_key(agent);
        let n = counts.get(&key).copied().unwrap_or(0).saturating_add_signed(delta);
        if n == 0 {
            counts.remove(&key);
        } else {
            counts.insert(key, n);
        }
        Ok(n)
    }

    async fn availability_published(&self) -> Result<Vec<AgentId>, StoreError> {
        Ok(lock(&self.mem.published).values().cloned().collect())
    }

    async fn set_availability_published(&self, agent: &AgentId, available: bool) -> Result<(), StoreError> {
        {
            let mut p = lock(&self.mem.published);
            if available {
                p.insert(agent_key(agent), agent.clone());
            } else {
                p.remove(&agent_key(agent));
            }
        }
        self.journal.push(Op::Availability { agent: agent.clone(), available });
        self.durable().await
    }

    async fn auto_accept_claim(&self, agent: &AgentId, interaction: &str, ttl: Duration) -> Result<bool, StoreError> {
        let expires_ms = self.clock.now_ms() + ttl.as_millis() as u64;
        {
            let mut accepted = lock(&self.mem.accepted);
            let key = (agent_key(agent), interaction.to_owned());
            if accepted.get(&key).is_some_and(|&e| e > self.clock.now_ms()) {
                return Ok(false);
            }
            accepted.insert(key, expires_ms);
        }
        self.journal.push(Op::AutoAccepted { agent: agent.clone(), interaction: interaction.to_owned(), expires_ms });
        if let Err(e) = self.durable().await {
            // Not claimed after all (the caller publishes nothing): withdraw
            // it, so that the offer delivered again can claim it.
            lock(&self.mem.accepted).remove(&(agent_key(agent), interaction.to_owned()));
            self.journal.push(Op::AutoAcceptRemove { agent: agent.clone(), interaction: interaction.to_owned() });
            return Err(e);
        }
        Ok(true)
    }

    async fn auto_accept_release(&self, agent: &AgentId, interaction: &str) -> Result<(), StoreError> {
        lock(&self.mem.accepted).remove(&(agent_key(agent), interaction.to_owned()));
        self.journal.push(Op::AutoAcceptRemove { agent: agent.clone(), interaction: interaction.to_owned() });
        self.durable().await
    }

    async fn expire(&self) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        lock(&self.mem.accepted).retain(|_, &mut e| e > now);
        {
            let mut dedup = self.mem.dedup();
            dedup.expire(now);
            self.journal.push(Op::Expire { now_ms: now, dedup_trimmed: dedup.take_trimmed() });
        }
        self.durable().await
    }

    fn ready(&self) -> bool {
        self.journal.healthy()
    }

    async fn close(&self) {
        let _ = self.durable().await;
        self.journal.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cceb_protocol::NotificationType;

    const CAPACITY: DedupCapacity = DedupCapacity { per_tenant: 10, total: 10 };

    fn agent() -> AgentId {
        AgentId { tenant_guid: "t".into(), agent_guid: "a".into(), ir_instance: "ir".into() }
    }

    fn system() -> Arc<dyn Clock> {
        Arc::new(crate::clock::SystemClock)
    }

    #[tokio::test]
    async fn dedup_keys_and_auto_accept_claims_last_their_window_by_the_injected_clock_also_across_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = Arc::new(crate::clock::ManualClock::new(1_000_000));
        let key = DedupKey::new("t".into(), "a", "action-1");
        let window = Duration::from_secs(600);
        {
            let s = EmbeddedStore::open(dir.path(), CAPACITY, clock.clone()).expect("open");
            s.dedup_insert(&key, window).await.expect("insert");
            assert!(s.auto_accept_claim(&agent(), "i-1", window).await.expect("claim"));
            clock.advance(window - Duration::from_millis(1));
            assert!(s.dedup_contains(&key).await.expect("contains"), "within the window");
            assert!(!s.auto_accept_claim(&agent(), "i-1", window).await.expect("claim"), "claimed once");
            s.close().await;
        }
        let s = EmbeddedStore::open(dir.path(), CAPACITY, clock.clone()).expect("reopen");
        assert!(s.dedup_contains(&key).await.expect("contains"), "within the window after a reopen");
        assert!(!s.auto_accept_claim(&agent(), "i-1", window).await.expect("claim"));
        clock.advance(Duration::from_millis(1));
        assert!(!s.dedup_contains(&key).await.expect("contains"), "the window passed");
        assert!(s.auto_accept_claim(&agent(), "i-1", window).await.expect("claim"), "the claim expired");
    }

    #[tokio::test]
    async fn everything_written_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id: Arc<str> = "s1".into();
        {
            let s = EmbeddedStore::open(dir.path(), CAPACITY, system()).expect("open");
            let record = SessionRecord {
                id: id.clone(),
                key_hash: [7; 32],
                agent: agent(),
                auto_accept: true,
                push_token: Some("dev".into()),
                dropped: 2,
                disconnected_at_ms: Some(5),
            };
            s.session_put(&record);
            let n =
                |u: &str| Arc::new(Notification { ty: NotificationType::Presence, uuid: u.into(), data: "{}".into() });
            for (seq, u) in [(1, "n1"), (2, "n2"), (3, "n3")] {
                s.mailbox_put(&agent(), &id, seq, &n(u));
            }
            s.mailbox_remove(&agent(), &id, 2);
            s.mailbox_remove(&agent(), &id, 3);
            let entry = AgentEntry { agent_guid: "a".into(), contact_id: Some("100".into()), ..AgentEntry::default() };
            s.directory_apply("t", DirectoryOp::Put(entry)).await.expect("directory");
            s.dedup_insert(&DedupKey::new("t".into(), "a", "u1"), Duration::from_secs(60)).await.expect("dedup");
            s.sync().await.expect("sync");
            s.set_availability_published(&agent(), true).await.expect("availability");
            assert!(s.auto_accept_claim(&agent(), "i1", Duration::from_secs(60)).await.expect("claim"));
            assert!(!s.auto_accept_claim(&agent(), "i1", Duration::from_secs(60)).await.expect("claim"));
            s.close().await;
        }
        let s = EmbeddedStore::open(dir.path(), CAPACITY, system()).expect("reopen");
        let sessions = s.sessions().await.expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].record.push_token.as_deref(), Some("dev"));
        assert_eq!(sessions[0].record.key_hash, [7; 32]);
        assert_eq!(sessions[0].next_seq, 4, "seq keeps growing past acked entries");
        let uuids: Vec<_> = sessions[0].mailbox.iter().map(|(seq, n)| (*seq, n.uuid.as_str())).collect();
        assert_eq!(uuids, [(1, "n1")]);
        assert_eq!(s.resolve_contact("t", "100").await.expect("get").as_deref(), Some("a"));
        assert!(s.dedup_contains(&DedupKey::new("t".into(), "a", "u1")).await.expect("dedup"));
        assert_eq!(s.availability_published().await.expect("published"), [agent()]);
        assert_eq!(s.availability_count(&agent(), 0).await.expect("count"), 1);
        assert!(!s.auto_accept_claim(&agent(), "i1", Duration::from_secs(60)).await.expect("claim"));
        s.session_delete(&agent(), "s1");
        s.sync().await.expect("sync");
        drop(s);
        let s = EmbeddedStore::open(dir.path(), CAPACITY, system()).expect("reopen");
        assert!(s.sessions().await.expect("sessions").is_empty());
    }

    fn dedup_rows(dir: &Path) -> Vec<(String, i64)> {
        let conn = rusqlite::Connection::open(dir.join("cceb.sqlite3")).expect("sqlite");
        let mut st = conn.prepare("SELECT tenant, count(*) FROM dedup GROUP BY tenant ORDER BY tenant").expect("query");
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("rows");
        rows.collect::<Result<_, _>>().expect("read")
    }

    #[tokio::test]
    async fn dedup_keys_are_reloaded_per_tenant_and_the_journal_drops_what_memory_evicted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let capacity = DedupCapacity { per_tenant: 2, total: 10 };
        let key = |tenant: &str, uuid: &str| DedupKey::new(tenant.into(), "a", uuid);
        let window = Duration::from_secs(60);
        {
            let s = EmbeddedStore::open(dir.path(), capacity, system()).expect("open");
            s.dedup_insert(&key("A", "a0"), window).await.expect("dedup");
            for i in 0..5 {
                // Each in its own millisecond: the journal drops by expiry.
                tokio::time::sleep(Duration::from_millis(2)).await;
                s.dedup_insert(&key("B", &format!("b{i}")), window).await.expect("dedup");
            }
            s.expire().await.expect("expire");
            assert_eq!(dedup_rows(dir.path()), [("A".into(), 1), ("B".into(), 2)]);
            s.close().await;
        }
        let s = EmbeddedStore::open(dir.path(), capacity, system()).expect("reopen");
        for (k, kept) in
            [(key("A", "a0"), true), (key("B", "b4"), true), (key("B", "b3"), true), (key("B", "b2"), false)]
        {
            assert_eq!(s.dedup_contains(&k).await.expect("dedup"), kept, "{k:?}");
        }
        assert!(!s.dedup_contains(&key("B", "a0")).await.expect("dedup"), "keys are per tenant");
    }

    /// Schema version 1, whose dedup keys did not record the tenant.
    const SCHEMA_V1: &str = "
        CREATE TABLE sessions(
            id TEXT PRIMARY KEY, key_hash BLOB NOT NULL, tenant TEXT NOT NULL, agent TEXT NOT NULL,
            ir_instance TEXT NOT NULL, auto_accept INTEGER NOT NULL, push_token TEXT,
            dropped INTEGER NOT NULL, disconnected_at INTEGER, next_seq INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE mailbox(
            session TEXT NOT NULL, seq INTEGER NOT NULL, uuid TEXT NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY(session, seq)) WITHOUT ROWID;
        CREATE TABLE dedup(key BLOB PRIMARY KEY, expires INTEGER NOT NULL) WITHOUT ROWID;
        CREATE INDEX dedup_expires ON dedup(expires);
        CREATE TABLE directory(
            tenant TEXT NOT NULL, agent TEXT NOT NULL, contact_id TEXT, off_hook INTEGER NOT NULL,
            recording_controls INTEGER, PRIMARY KEY(tenant, agent)) WITHOUT ROWID;
        CREATE TABLE availability(
            tenant TEXT NOT NULL, agent TEXT NOT NULL, ir_instance TEXT NOT NULL, PRIMARY KEY(tenant, agent)) WITHOUT ROWID;
        CREATE TABLE auto_accepted(
            tenant TEXT NOT NULL, agent TEXT NOT NULL, interaction TEXT NOT NULL, expires INTEGER NOT NULL,
            PRIMARY KEY(tenant, agent, interaction)) WITHOUT ROWID;
        PRAGMA user_version = 1;";

    #[tokio::test]
    async fn a_version_1_database_is_migrated_and_its_dedup_keys_still_deduplicate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let live = DedupKey::new("t".into(), "a", "u1");
        {
            let conn = rusqlite::Connection::open(dir.path().join("cceb.sqlite3")).expect("sqlite");
            conn.execute_batch(SCHEMA_V1).expect("v1 schema");
            let mut put = conn.prepare("INSERT INTO dedup(key, expires) VALUES (?1, ?2)").expect("insert");
            put.execute(rusqlite::params![&live.hash.to_le_bytes()[..], crate::clock::now_ms() + 60_000])
                .expect("live key");
            let expired = DedupKey::new("t".into(), "a", "u0");
            put.execute(rusqlite::params![&expired.hash.to_le_bytes()[..], 1]).expect("expired key");
            conn.execute("INSERT INTO directory VALUES ('t', 'a', '100', 0, NULL)", []).expect("directory");
        }
        let s = EmbeddedStore::open(dir.path(), CAPACITY, system()).expect("migrated");
        assert!(s.dedup_contains(&live).await.expect("dedup"), "a retry across the upgrade is not published twice");
        assert!(!s.dedup_contains(&DedupKey::new("t".into(), "a", "u0")).await.expect("dedup"));
        assert_eq!(s.resolve_contact("t", "100").await.expect("directory").as_deref(), Some("a"));
        s.dedup_insert(&DedupKey::new("t".into(), "a", "u2"), Duration::from_secs(60)).await.expect("dedup");
        s.expire().await.expect("expire");
        s.close().await;
        drop(s);
        let conn = rusqlite::Connection::open(dir.path().join("cceb.sqlite3")).expect("sqlite");
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
        assert_eq!(version, 2);
        drop(conn);
        assert_eq!(dedup_rows(dir.path()), [(String::new(), 1), ("t".into(), 1)], "the expired key is gone");
        let s = EmbeddedStore::open(dir.path(), CAPACITY, system()).expect("reopened at version 2");
        assert!(s.dedup_contains(&live).await.expect("dedup"));
    }
}
