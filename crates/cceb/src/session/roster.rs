//! The sessions of this node, by tenant and agent, and the long-lived ones by id.

use super::Session;
use crate::sync::{read, write};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

type Agents = HashMap<Arc<str>, Vec<Arc<Session>>>;

/// The agent has as many sessions as allowed, all of them connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Default)]
pub struct Roster {
    tenants: RwLock<HashMap<Arc<str>, Agents>>,
    long_lived: RwLock<HashMap<Arc<str>, Arc<Session>>>,
    count: AtomicUsize,
}

impl Roster {
    pub fn add(&self, s: Arc<Session>) {
        if s.is_long_lived() {
            write(&self.long_lived).insert(s.id.clone(), s.clone());
        }
        let mut t = write(&self.tenants);
        let agents = t.entry(s.agent.tenant_guid.clone()).or_default();
        agents.entry(s.agent.agent_guid.clone()).or_default().push(s);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a long-lived session unless its agent already has `cap` of them:
    /// then the agent's least recently connected disconnected one is ended and
    /// taken out to make room (returned), or, when all are connected, nothing
    /// changes and `Err(Full)`. Decided under the lock, so racing hellos
    /// cannot exceed the cap (at least 1, as the settings require).
    pub fn add_capped(&self, s: Arc<Session>, cap: usize) -> Result<Option<Arc<Session>>, Full> {
        let mut t = write(&self.tenants);
        let list = t.entry(s.agent.tenant_guid.clone()).or_default().entry(s.agent.agent_guid.clone()).or_default();
        let mut evicted = None;
        if list.iter().filter(|x| x.is_long_lived()).count() >= cap {
            let mut idle: Vec<(u64, usize)> =
                list.iter().enumerate().filter_map(|(i, x)| x.disconnected_at().map(|at| (at, i))).collect();
            idle.sort_unstable();
            // Ended under its own lock: a resume racing this either attached
            // first (then it is skipped) or finds it ended.
            let Some(&(_, i)) = idle.iter().find(|&&(_, i)| list[i].end_if_detached()) else {
                return Err(Full);
            };
            let old = list.swap_remove(i);
            self.count.fetch_sub(1, Ordering::Relaxed);
            evicted = Some(old);
        }
        list.push(s.clone());
        self.count.fetch_add(1, Ordering::Relaxed);
        drop(t);
        let mut ll = write(&self.long_lived);
        if let Some(old) = &evicted {
            if ll.get(&old.id).is_some_and(|x| Arc::ptr_eq(x, old)) {
                ll.remove(&old.id);
            }
        }
        ll.insert(s.id.clone(), s);
        Ok(evicted)
    }

    /// Removes the session; returns whether it was registered.
    pub fn remove(&self, s: &Arc<Session>) -> bool {
        if s.is_long_lived() {
            let mut ll = write(&self.long_lived);
            if ll.get(&s.id).is_some_and(|x| Arc::ptr_eq(x, s)) {
                ll.remove(&s.id);
            }
        }
        let mut removed = false;
        let mut t = write(&self.tenants);
        let Some(agents) = t.get_mut(&s.agent.tenant_guid) else { return false };
        if let Some(list) = agents.get_mut(&s.agent.agent_guid) {
            if let Some(i) = list.iter().position(|x| Arc::ptr_eq(x, s)) {
                list.swap_remove(i);
                self.count.fetch_sub(1, Ordering::Relaxed);
                removed = true;
            }
            if list.is_empty() {
                agents.remove(&s.agent.agent_guid);
            }
        }
        if agents.is_empty() {
            t.remove(&s.agent.tenant_guid);
        }
        removed
    }

    /// A long-lived session by id.
    pub fn long_lived(&self, id: &str) -> Option<Arc<Session>> {
        read(&self.long_lived).get(id).cloned()
    }

    /// Every long-lived session, for the expiry sweep.
    pub fn all_long_lived(&self) -> Vec<Arc<Session>> {
        read(&self.long_lived).values().cloned().collect()
    }

    /// Every short-lived session (told when notifications were lost to them).
    pub fn all_short_lived(&self) -> Vec<Arc<Session>> {
        let t = read(&self.tenants);
        t.values().flat_map(|agents| agents.values().flatten()).filter(|s| !s.is_long_lived()).cloned().collect()
    }

    /// Calls `f` for every session of one agent, under the lock: a handful at
    /// most, and no copy of the list on the per-notification path.
    pub fn for_agent(&self, tenant: &str, agent: &str, f: impl FnMut(&Arc<Session>)) -> usize {
        let t = read(&self.tenants);
        let list = t.get(tenant).and_then(|a| a.get(agent));
        list.map_or(0, |l| {
            l.iter().for_each(f);
            l.len()
        })
    }

    /// The sessions of one tenant, taken under the lock and used outside it.
    pub fn of_tenant(&self, tenant: &str) -> Vec<Arc<Session>> {
        let t = read(&self.tenants);
        t.get(tenant).map(|agents| agents.values().flatten().cloned().collect()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::AgentId;

    fn session(t: &str, a: &str) -> Arc<Session> {
        let agent = AgentId { tenant_guid: t.into(), agent_guid: a.into(), ir_instance: "ir".into() };
        Arc::new(Session::new(format!("{t}/{a}").into(), agent, 10))
    }

    #[test]
    fn finds_by_agent_and_tenant_and_never_across_tenants() {
        let r = Roster::default();
        let (a, b, c) = (session("t1", "a"), session("t1", "b"), session("t2", "a"));
        let a2 = session("t1", "a");
        for s in [&a, &b, &c, &a2] {
            r.add(s.clone());
        }
        assert_eq!(r.for_agent("t1", "a", |_| {}), 2);
        assert_eq!(r.of_tenant("t1").len(), 3);
        let ids: Vec<String> = r.of_tenant("t2").iter().map(|s| s.id.to_string()).collect();
        assert_eq!(ids, ["t2/a"]);
        assert!(r.remove(&a));
        assert!(!r.remove(&a));
        assert_eq!(r.len(), 3);
        assert_eq!(r.for_agent("t1", "a", |_| {}), 1);
    }
}
