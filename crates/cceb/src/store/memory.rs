//! The embedded store's in-memory state, which serves every read. Pure data
//! structures: persistence is the journal's job.

use super::{AgentEntry, AgentPatch, DedupKey, DirectoryOp};
use crate::session::AgentId;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

#[derive(Default)]
pub struct Tenant {
    pub agents: HashMap<String, AgentEntry>,
    contacts: HashMap<String, String>,
}

impl Tenant {
    pub fn put(&mut self, entry: AgentEntry) -> Option<AgentEntry> {
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
pub struct Dedup {
    seen: HashMap<DedupKey, Instant>,
    order: VecDeque<(Instant, DedupKey)>,
    capacity: usize,
}

impl Dedup {
    fn new(capacity: usize) -> Self {
        Dedup { seen: HashMap::new(), order: VecDeque::new(), capacity }
    }

    pub fn contains(&mut self, key: DedupKey, now: Instant) -> bool {
        self.evict(now);
        self.seen.get(&key).is_some_and(|&expiry| expiry > now)
    }

    /// Remembers `key` until `expiry`; entries must come in expiry order.
    pub fn insert(&mut self, key: DedupKey, expiry: Instant, now: Instant) {
        self.seen.insert(key, expiry);
        self.order.push_back((expiry, key));
        self.evict(now);
    }

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

/// (tenant, agent) as map key.
pub type AgentKey = (Arc<str>, Arc<str>);

/// What the embedded store serves reads from; the journal makes it durable.
pub struct Memory {
    pub tenants: RwLock<HashMap<String, Tenant>>,
    pub dedup: Mutex<Dedup>,
    /// Valid long-lived sessions per (tenant, agent).
    pub counts: Mutex<HashMap<AgentKey, u64>>,
    /// Agents whose last published chat availability is `true`.
    pub published: Mutex<HashMap<AgentKey, AgentId>>,
    /// Auto-accepted interactions: (tenant, agent, interaction) → expiry (unix ms).
    pub accepted: Mutex<HashMap<(AgentKey, String), u64>>,
}

impl Memory {
    pub fn new(dedup_capacity: usize) -> Self {
        Memory {
            tenants: RwLock::default(),
            dedup: Mutex::new(Dedup::new(dedup_capacity)),
            counts: Mutex::default(),
            published: Mutex::default(),
            accepted: Mutex::default(),
        }
    }

    /// Applies a directory change; returns the entry before and after it.
    pub fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> (Option<AgentEntry>, Option<AgentEntry>) {
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        let t = tenants.entry(tenant.to_owned()).or_default();
        match op {
            DirectoryOp::Put(entry) => (t.put(entry.clone()), Some(entry)),
            DirectoryOp::Patch { agent_guid, patch } => {
                let prev = t.agents.get(&agent_guid).cloned();
                let base = prev.clone().unwrap_or(AgentEntry { agent_guid, ..AgentEntry::default() });
                let next = patched(base, patch);
                t.put(next.clone());
                (prev, Some(next))
            }
            DirectoryOp::Remove { agent_guid } => (t.remove(&agent_guid), None),
        }
    }

    pub fn directory_get(&self, tenant: &str, agent_guid: &str) -> Option<AgentEntry> {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        tenants.get(tenant).and_then(|t| t.agents.get(agent_guid)).cloned()
    }

    pub fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Option<String> {
        let tenants = self.tenants.read().unwrap_or_else(PoisonError::into_inner);
        tenants.get(tenant).and_then(|t| t.contacts.get(contact_id)).cloned()
    }

    pub fn dedup(&self) -> MutexGuard<'_, Dedup> {
        self.dedup.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Key of an agent in the per-agent maps.
pub fn agent_key(a: &AgentId) -> AgentKey {
    (a.tenant_guid.clone(), a.agent_guid.clone())
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn directory_tracks_contacts_through_updates_and_deletes() {
        let s = Memory::new(10);
        let e = AgentEntry { agent_guid: "a1".into(), contact_id: Some("1001".into()), ..AgentEntry::default() };
        s.directory_apply("t", DirectoryOp::Put(e));
        assert_eq!(s.resolve_contact("t", "1001").as_deref(), Some("a1"));
        assert_eq!(s.resolve_contact("other", "1001"), None);
        let patch =
            AgentPatch { contact_id: Some("1002".into()), recording_controls: Some(2), ..AgentPatch::default() };
        let (prev, next) = s.directory_apply("t", DirectoryOp::Patch { agent_guid: "a1".into(), patch });
        assert_eq!(prev.and_then(|p| p.recording_controls), None);
        assert_eq!(next.and_then(|p| p.recording_controls), Some(2));
        assert_eq!(s.resolve_contact("t", "1001"), None);
        assert_eq!(s.resolve_contact("t", "1002").as_deref(), Some("a1"));
        s.directory_apply("t", DirectoryOp::Remove { agent_guid: "a1".into() });
        assert_eq!(s.directory_get("t", "a1"), None);
        assert_eq!(s.resolve_contact("t", "1002"), None);
    }

    #[test]
    fn dedup_forgets_past_capacity_and_window() {
        let mut d = Dedup::new(2);
        let now = Instant::now();
        let k = |u: &str| DedupKey::new("t", "a", u);
        for u in ["1", "2", "3"] {
            d.insert(k(u), now + Duration::from_secs(60), now);
        }
        assert!(!d.contains(k("1"), now));
        assert!(d.contains(k("3"), now));
        assert!(!d.contains(k("3"), now + Duration::from_secs(61)));
        assert_ne!(DedupKey::new("t", "ab", "c"), DedupKey::new("t", "a", "bc"));
    }
}
