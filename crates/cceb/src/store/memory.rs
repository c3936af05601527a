//! The embedded store's in-memory state, which serves every read. Pure data
//! structures: persistence is the journal's job.

use super::{AgentEntry, AgentPatch, DedupCapacity, DedupKey, DirectoryOp};
use crate::model::AgentId;
use crate::sync::{lock, read, write};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

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

/// Tenant name of dedup keys read from a version-1 database, which did not
/// record the tenant: they are consulted for every tenant until they expire.
/// No tenant has this name (a token with an empty `tenant_guid` is refused).
const UNKNOWN_TENANT: &str = "";

/// One tenant's keys, expiry (wall-clock ms) in non-decreasing order.
#[derive(Default)]
struct TenantKeys {
    seen: HashMap<u128, u64>,
    order: VecDeque<(u64, u128)>,
}

impl TenantKeys {
    fn pop(&mut self) {
        if let Some((expiry, key)) = self.order.pop_front() {
            // An earlier insert of a key inserted again leaves its newer entry.
            if self.seen.get(&key) == Some(&expiry) {
                self.seen.remove(&key);
            }
        }
    }

    fn expire(&mut self, now: u64) {
        while self.order.front().is_some_and(|&(expiry, _)| expiry <= now) {
            self.pop();
        }
    }
}

/// Action uuids per tenant, forgotten when their window passes or, earlier,
/// oldest first by the tenant's own traffic: once it holds `per_tenant` keys,
/// or once all tenants together hold `total` and it holds the most. So one
/// tenant's traffic never evicts another tenant's keys while that tenant holds
/// no more than `min(per_tenant, total / tenants holding keys)`.
///
/// Expiries are wall-clock milliseconds, the values the journal keeps, so the
/// journal can drop exactly the keys evicted here ([`Dedup::take_trimmed`]).
pub struct Dedup {
    tenants: HashMap<Arc<str>, TenantKeys>,
    /// (keys held, tenant) of every tenant holding keys: the last one pays
    /// when the total is full.
    by_size: BTreeSet<(usize, Arc<str>)>,
    total: usize,
    capacity: DedupCapacity,
    /// Tenants that lost keys to a capacity since the last `take_trimmed`.
    trimmed: HashSet<Arc<str>>,
}

impl Dedup {
    fn new(capacity: DedupCapacity) -> Self {
        Dedup { tenants: HashMap::new(), by_size: BTreeSet::new(), total: 0, capacity, trimmed: HashSet::new() }
    }

    pub fn contains(&self, key: &DedupKey, now: u64) -> bool {
        let held = |tenant: &str| {
            self.tenants.get(tenant).and_then(|t| t.seen.get(&key.hash)).is_some_and(|&expiry| expiry > now)
        };
        held(&key.tenant) || held(UNKNOWN_TENANT)
    }

    /// Remembers `key` until `expiry`, or until the newest expiry the tenant
    /// already holds if that is later (the wall clock stepped back), which
    /// keeps each tenant's keys in expiry order. Returns the expiry used.
    pub fn insert(&mut self, key: &DedupKey, expiry: u64, now: u64) -> u64 {
        let tenant = &key.tenant;
        let mut expiry = expiry;
        self.update(tenant, |t| {
            t.expire(now);
            expiry = expiry.max(t.order.back().map_or(0, |&(e, _)| e));
            t.seen.insert(key.hash, expiry);
            t.order.push_back((expiry, key.hash));
        });
        if self.tenants.get(tenant).is_some_and(|t| t.order.len() > self.capacity.per_tenant) {
            self.evict_oldest(tenant.clone());
        }
        while self.total > self.capacity.total {
            let Some((most, largest)) = self.by_size.last().cloned() else { break };
            // On a tie the inserting tenant pays, so it never evicts a tenant
            // holding no more keys than it does.
            let held = self.tenants.get(tenant).map_or(0, |t| t.order.len());
            self.evict_oldest(if held == most { tenant.clone() } else { largest });
        }
        expiry
    }

    /// Forgets every tenant's keys whose window has passed.
    pub fn expire(&mut self, now: u64) {
        let stale: Vec<Arc<str>> = self
            .tenants
            .iter()
            .filter(|(_, t)| t.order.front().is_some_and(|&(expiry, _)| expiry <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.update(&name, |t| t.expire(now));
        }
    }

    /// Each tenant that lost keys to a capacity since the last call, with
    /// the expiry of the oldest key it still holds (`None`: it holds none).
    /// Its keys expiring before that are no longer remembered.
    pub fn take_trimmed(&mut self) -> Vec<(Arc<str>, Option<u64>)> {
        let trimmed = std::mem::take(&mut self.trimmed);
        let oldest = |name: &Arc<str>| self.tenants.get(name).and_then(|t| t.order.front()).map(|&(e, _)| e);
        trimmed.into_iter().map(|name| (name.clone(), oldest(&name))).collect()
    }

    fn evict_oldest(&mut self, tenant: Arc<str>) {
        self.update(&tenant, TenantKeys::pop);
        self.trimmed.insert(tenant);
    }

    /// Changes one tenant's keys, keeping the total and `by_size` in step;
    /// a tenant left with no keys is dropped.
    fn update(&mut self, tenant: &Arc<str>, f: impl FnOnce(&mut TenantKeys)) {
        let t = self.tenants.entry(tenant.clone()).or_default();
        let before = t.order.len();
        self.by_size.remove(&(before, tenant.clone()));
        f(t);
        let after = t.order.len();
        self.total = self.total + after - before;
        if after == 0 {
            self.tenants.remove(tenant);
        } else {
            self.by_size.insert((after, tenant.clone()));
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
    pub fn new(dedup: DedupCapacity) -> Self {
        Memory {
            tenants: RwLock::default(),
            dedup: Mutex::new(Dedup::new(dedup)),
            counts: Mutex::default(),
            published: Mutex::default(),
            accepted: Mutex::default(),
        }
    }

    /// Applies a directory change; returns the entry before and after it.
    pub fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> (Option<AgentEntry>, Option<AgentEntry>) {
        let mut tenants = write(&self.tenants);
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
        let tenants = read(&self.tenants);
        tenants.get(tenant).and_then(|t| t.agents.get(agent_guid)).cloned()
    }

    pub fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Option<String> {
        let tenants = read(&self.tenants);
        tenants.get(tenant).and_then(|t| t.contacts.get(contact_id)).cloned()
    }

    pub fn dedup(&self) -> MutexGuard<'_, Dedup> {
        lock(&self.dedup)
    }
}

/// Key of an agent in the per-agent maps.
pub fn agent_key(a: &AgentId) -> AgentKey {
    (a.tenant_guid.clone(), a.agent_guid.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_tracks_contacts_through_updates_and_deletes() {
        let s = Memory::new(DedupCapacity { per_tenant: 10, total: 10 });
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

    const WINDOW: u64 = 60_000;

    fn key(tenant: &str, uuid: &str) -> DedupKey {
        DedupKey::new(tenant.into(), "agent", uuid)
    }

    fn held(d: &Dedup, tenant: &str, n: usize, now: u64) -> Vec<usize> {
        (0..n).filter(|i| d.contains(&key(tenant, &i.to_string()), now)).collect()
    }

    #[test]
    fn another_tenants_traffic_never_evicts_a_tenants_keys_but_its_own_overflow_does() {
        let mut d = Dedup::new(DedupCapacity { per_tenant: 3, total: 6 });
        let now = 1_000;
        d.insert(&key("A", "0"), now + WINDOW, now);
        for i in 0..10_000 {
            d.insert(&key("B", &i.to_string()), now + WINDOW, now);
            assert!(d.contains(&key("A", "0"), now), "B's key {i} evicted A's");
        }
        assert_eq!(held(&d, "B", 10_000, now), [9_997, 9_998, 9_999], "B keeps its newest");
        for i in 1..4 {
            d.insert(&key("A", &i.to_string()), now + WINDOW, now);
        }
        assert_eq!(held(&d, "A", 4, now), [1, 2, 3], "A's own overflow evicts A's oldest");
        assert!(!d.contains(&key("A", "3"), now + WINDOW), "forgotten once the window passed");
        assert!(!d.contains(&key("B", "1"), now), "tenants do not share keys");
    }

    #[test]
    fn the_total_is_bounded_and_taken_from_the_tenant_holding_the_most() {
        let mut d = Dedup::new(DedupCapacity { per_tenant: 100, total: 10 });
        let now = 1_000;
        for (tenant, n) in [("A", 4), ("B", 3), ("C", 20)] {
            for i in 0..n {
                d.insert(&key(tenant, &i.to_string()), now + WINDOW + i as u64, now);
            }
        }
        assert_eq!(d.total, 10);
        // Once C held as many as A, the largest, each of C's keys evicted C's own oldest.
        assert_eq!((held(&d, "A", 4, now), held(&d, "B", 3, now)), (vec![0, 1, 2, 3], vec![0, 1, 2]));
        assert_eq!(held(&d, "C", 20, now), [17, 18, 19]);
        assert_eq!(d.take_trimmed(), [("C".into(), Some(now + WINDOW + 17))], "what the journal may drop");
        // A newcomer takes from the tenant holding the most: A, above its share of 10 / 4.
        d.insert(&key("D", "0"), now + WINDOW, now);
        assert_eq!(held(&d, "A", 4, now), [1, 2, 3]);
        assert_eq!(d.take_trimmed(), [("A".into(), Some(now + WINDOW + 1))]);
        assert_eq!(d.total, 10);
    }

    #[test]
    fn expiry_frees_every_tenant_and_keys_of_an_unknown_tenant_match_any() {
        let mut d = Dedup::new(DedupCapacity { per_tenant: 10, total: 10 });
        let legacy = DedupKey { tenant: UNKNOWN_TENANT.into(), hash: key("A", "old").hash };
        d.insert(&legacy, 500, 0);
        d.insert(&key("B", "0"), 2_000, 0);
        assert!(d.contains(&key("A", "old"), 0), "a key from a version-1 database still deduplicates");
        // The clock stepped back: the key is kept as long as the tenant's newest.
        assert_eq!(d.insert(&key("B", "1"), 1_500, 0), 2_000);
        d.expire(1_000);
        assert!(!d.contains(&key("A", "old"), 0));
        assert_eq!((d.total, d.tenants.len()), (2, 1));
        d.expire(2_000);
        assert_eq!((d.total, d.tenants.len(), d.by_size.len()), (0, 0, 0));
        assert!(d.take_trimmed().is_empty(), "expiry is not a trim");
        assert_ne!(DedupKey::new("t".into(), "ab", "c"), DedupKey::new("t".into(), "a", "bc"));
    }
}
