//! The embedded store: everything in this process's memory.

use super::{AgentEntry, AgentPatch, DedupKey, DirectoryOp, Store, StoreError};
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tenant {
    agents: HashMap<String, AgentEntry>,
    contacts: HashMap<String, String>,
}

impl Tenant {
    fn put(&mut self, entry: AgentEntry) -> Option<AgentEntry> {
        let prev = self.remove(&entry.agent_guid);
        if let Some(c) = &entry.contact_id {
            self.contacts.insert(c.clone(), entry.agent_guid.clone());
        }
        self.agents.insert(entry.agent_guid.clone(), entry);
        prev
    }

    fn remove(&mut self, agent: &str) -> Option<AgentEntry> {
        let prev = self.agents.remove(agent)?;
        if let Some(c) = &prev.contact_id {
            if self.contacts.get(c).is_some_and(|a| a == agent) {
                self.contacts.remove(c);
            }
        }
        Some(prev)
    }
}

fn patched(mut e: AgentEntry, p: AgentPatch) -> AgentEntry {
    if p.contact_id.is_some() {
        e.contact_id = p.contact_id;
    }
    if let Some(v) = p.off_hook_enabled {
        e.off_hook_enabled = v;
    }
    if p.recording_controls.is_some() {
        e.recording_controls = p.recording_controls;
    }
    e
}

/// Action uuids, evicted by age or, past `capacity`, oldest first.
struct Dedup {
    seen: HashMap<DedupKey, Instant>,
    order: VecDeque<(Instant, DedupKey)>,
    capacity: usize,
}

impl Dedup {
    fn evict(&mut self, now: Instant) {
        while let Some(&(expiry, key)) = self.order.front() {
            if expiry > now && self.order.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&key) == Some(&expiry) {
                self.seen.remove(&key);
            }
        }
    }
}

pub struct MemoryStore {
    tenants: RwLock<HashMap<String, Tenant>>,
    dedup: Mutex<Dedup>,
}

impl MemoryStore {
    pub fn new(dedup_capacity: usize) -> Self {
        MemoryStore {
            tenants: RwLock::default(),
            dedup: Mutex::new(Dedup { seen: HashMap::new(), order: VecDeque::new(), capacity: dedup_capacity }),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> Result<Option<AgentEntry>, StoreError> {
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        let t = tenants.entry(tenant.to_owned()).or_default();
        Ok(match op {
            DirectoryOp::Put(entry) => t.put(entry),
            DirectoryOp::Patch { agent_guid, patch } => {
                let prev = t.agents.get(&agent_guid).cloned();
                let base = prev.clone().unwrap_or(AgentEntry { agent_guid, ..AgentEntry::default() });
                t.put(patched(base, patch));
                prev
            }
            DirectoryOp::Remove { agent_guid } => t.remove(&agent_guid),
        })
    }

    async fn directory_get(&self, tenant: &str, agent_guid: &str) -> Result<Option<AgentEntry>, StoreError> {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        Ok(tenants.get(tenant).and_then(|t| t.agents.get(agent_guid)).cloned())
    }

    async fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Result<Option<String>, StoreError> {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        Ok(tenants.get(tenant).and_then(|t| t.contacts.get(contact_id)).cloned())
    }

    async fn dedup_contains(&self, key: DedupKey) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut d = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
        d.evict(now);
        Ok(d.seen.get(&key).is_some_and(|&expiry| expiry > now))
    }

    async fn dedup_insert(&self, key: DedupKey, window: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut d = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
        let expiry = now + window;
        d.seen.insert(key, expiry);
        d.order.push_back((expiry, key));
        d.evict(now);
        Ok(())
    }

    fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn directory_tracks_contacts_through_updates_and_deletes() {
        let s = MemoryStore::new(10);
        let e = AgentEntry { agent_guid: "a1".into(), contact_id: Some("1001".into()), ..AgentEntry::default() };
        s.directory_apply("t", DirectoryOp::Put(e)).await.expect("put");
        assert_eq!(s.resolve_contact("t", "1001").await.expect("get").as_deref(), Some("a1"));
        assert_eq!(s.resolve_contact("other", "1001").await.expect("get"), None);
        let patch =
            AgentPatch { contact_id: Some("1002".into()), recording_controls: Some(2), ..AgentPatch::default() };
        let prev = s.directory_apply("t", DirectoryOp::Patch { agent_guid: "a1".into(), patch }).await.expect("patch");
        assert_eq!(prev.and_then(|p| p.recording_controls), None);
        assert_eq!(s.resolve_contact("t", "1001").await.expect("get"), None);
        assert_eq!(s.resolve_contact("t", "1002").await.expect("get").as_deref(), Some("a1"));
        s.directory_apply("t", DirectoryOp::Remove { agent_guid: "a1".into() }).await.expect("remove");
        assert_eq!(s.directory_get("t", "a1").await.expect("get"), None);
        assert_eq!(s.resolve_contact("t", "1002").await.expect("get"), None);
    }

    #[tokio::test]
    async fn dedup_forgets_past_capacity_and_window() {
        let s = MemoryStore::new(2);
        let k = |u: &str| DedupKey::new("t", "a", u);
        for u in ["1", "2", "3"] {
            s.dedup_insert(k(u), Duration::from_secs(60)).await.expect("insert");
        }
        assert!(!s.dedup_contains(k("1")).await.expect("get"));
        assert!(s.dedup_contains(k("3")).await.expect("get"));
        s.dedup_insert(k("z"), Duration::ZERO).await.expect("insert");
        assert!(!s.dedup_contains(k("z")).await.expect("get"));
        assert_ne!(DedupKey::new("t", "ab", "c"), DedupKey::new("t", "a", "bc"));
    }
}
