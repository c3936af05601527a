//! The embedded store: reads from memory, writes through the SQLite journal
//! under `CCEB_DATA_DIR`, everything read back at start-up.

use super::journal::{AfterCommit, Journal, Op, OpenError};
use super::memory::{agent_key, lock, Memory};
use super::{now_ms, AgentEntry, DedupKey, DirectoryOp, SessionRecord, Store, StoreError, StoredSession};
use crate::session::{AgentId, Notification};
use async_trait::async_trait;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct EmbeddedStore {
    mem: Memory,
    journal: Journal,
    /// Read back at open; handed out once.
    loaded: Mutex<Vec<StoredSession>>,
    dedup_capacity: usize,
}

impl EmbeddedStore {
    pub fn open(dir: &Path, dedup_capacity: usize) -> Result<EmbeddedStore, OpenError> {
        let now = now_ms();
        let (journal, loaded) = Journal::open(dir, now)?;
        let mem = Memory::new(dedup_capacity);
        for (tenant, entry) in loaded.directory {
            mem.directory_apply(&tenant, DirectoryOp::Put(entry));
        }
        {
            let (mut d, instant) = (mem.dedup(), Instant::now());
            for (key, expires) in loaded.dedup {
                d.insert(DedupKey(key), instant + Duration::from_millis(expires.saturating_sub(now)), instant);
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
        Ok(EmbeddedStore { mem, journal, loaded: Mutex::new(loaded.sessions), dedup_capacity })
    }

    async fn durable(&self) -> Result<(), StoreError> {
        self.journal.sync().await.map_err(StoreError::Unavailable)
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

    async fn dedup_contains(&self, key: DedupKey) -> Result<bool, StoreError> {
        Ok(self.mem.dedup().contains(key, Instant::now()))
    }

    async fn dedup_insert(&self, key: DedupKey, window: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        self.mem.dedup().insert(key, now + window, now);
        // Buffered, durable with the next group commit: a crash can lose only keys
        // whose ack may not have reached the client, whose retry republishes anyway.
        self.journal.push(Op::DedupPut { key: key.0, expires_ms: now_ms() + window.as_millis() as u64 });
        Ok(())
    }

    async fn sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        Ok(std::mem::take(&mut *lock(&self.loaded)))
    }

    fn session_put(&self, record: &SessionRecord) {
        self.journal.push(Op::SessionPut(record.clone()));
    }

    fn session_delete(&self, id: &str) {
        self.journal.push(Op::SessionDelete(id.to_owned()));
    }

    fn mailbox_put(&self, session: &Arc<str>, seq: u64, n: &Arc<Notification>) {
        self.journal.push(Op::MailboxPut { session: session.clone(), seq, n: n.clone() });
    }

    fn mailbox_remove(&self, session: &Arc<str>, seq: u64) {
        self.journal.push(Op::MailboxRemove { session: session.clone(), seq });
    }

    fn seq_reserve(&self, session: &Arc<str>, upto: u64, durable: Box<dyn FnOnce() + Send>) {
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
        let expires_ms = now_ms() + ttl.as_millis() as u64;
        {
            let mut accepted = lock(&self.mem.accepted);
            let key = (agent_key(agent), interaction.to_owned());
            if accepted.get(&key).is_some_and(|&e| e > now_ms()) {
                return Ok(false);
            }
            accepted.insert(key, expires_ms);
        }
        self.journal.push(Op::AutoAccepted { agent: agent.clone(), interaction: interaction.to_owned(), expires_ms });
        self.durable().await.map(|()| true)
    }

    async fn auto_accept_release(&self, agent: &AgentId, interaction: &str) -> Result<(), StoreError> {
        lock(&self.mem.accepted).remove(&(agent_key(agent), interaction.to_owned()));
        self.journal.push(Op::AutoAcceptRemove { agent: agent.clone(), interaction: interaction.to_owned() });
        self.durable().await
    }

    async fn expire(&self) -> Result<(), StoreError> {
        let now = now_ms();
        lock(&self.mem.accepted).retain(|_, &mut e| e > now);
        self.journal.push(Op::Expire { now_ms: now, dedup_keep: self.dedup_capacity });
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

    fn agent() -> AgentId {
        AgentId { tenant_guid: "t".into(), agent_guid: "a".into(), ir_instance: "ir".into() }
    }

    #[tokio::test]
    async fn everything_written_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id: Arc<str> = "s1".into();
        {
            let s = EmbeddedStore::open(dir.path(), 10).expect("open");
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
                s.mailbox_put(&id, seq, &n(u));
            }
            s.mailbox_remove(&id, 2);
            s.mailbox_remove(&id, 3);
            let entry = AgentEntry { agent_guid: "a".into(), contact_id: Some("100".into()), ..AgentEntry::default() };
            s.directory_apply("t", DirectoryOp::Put(entry)).await.expect("directory");
            s.dedup_insert(DedupKey::new("t", "a", "u1"), Duration::from_secs(60)).await.expect("dedup");
            s.sync().await.expect("sync");
            s.set_availability_published(&agent(), true).await.expect("availability");
            assert!(s.auto_accept_claim(&agent(), "i1", Duration::from_secs(60)).await.expect("claim"));
            assert!(!s.auto_accept_claim(&agent(), "i1", Duration::from_secs(60)).await.expect("claim"));
            s.close().await;
        }
        let s = EmbeddedStore::open(dir.path(), 10).expect("reopen");
        let sessions = s.sessions().await.expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].record.push_token.as_deref(), Some("dev"));
        assert_eq!(sessions[0].record.key_hash, [7; 32]);
        assert_eq!(sessions[0].next_seq, 4, "seq keeps growing past acked entries");
        let uuids: Vec<_> = sessions[0].mailbox.iter().map(|(seq, n)| (*seq, n.uuid.as_str())).collect();
        assert_eq!(uuids, [(1, "n1")]);
        assert_eq!(s.resolve_contact("t", "100").await.expect("get").as_deref(), Some("a"));
        assert!(s.dedup_contains(DedupKey::new("t", "a", "u1")).await.expect("dedup"));
        assert_eq!(s.availability_published().await.expect("published"), [agent()]);
        assert_eq!(s.availability_count(&agent(), 0).await.expect("count"), 1);
        assert!(!s.auto_accept_claim(&agent(), "i1", Duration::from_secs(60)).await.expect("claim"));
        s.session_delete("s1");
        s.sync().await.expect("sync");
        drop(s);
        let s = EmbeddedStore::open(dir.path(), 10).expect("reopen");
        assert!(s.sessions().await.expect("sessions").is_empty());
    }
}
