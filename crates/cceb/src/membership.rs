//! Cluster membership and discovery on Redis (`store = "redis"`).
//!
//! Each node keeps one record under `{nodes}` — id, public endpoint, open
//! connections, draining flag, and a per-process instance id — written with
//! `PX node_ttl_ms` and renewed every `node_heartbeat_ms`, so a node that dies
//! drops out by itself within one TTL. The same round trip reads every live
//! record into the view discovery chooses from. Every key shares the `{nodes}`
//! hash tag, so the one script that does all of it runs in one slot of a
//! Redis Cluster.

use crate::kv::{agent_tag, Kv};
use crate::metrics::Metrics;
use crate::sync::{read, write};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bounded-load factor: no node is chosen while it holds more than
/// `ceil(LOAD_FACTOR × average)` connections. 1.25 keeps every node within a quarter of the average —
/// enough headroom that a node leaving does not pile its agents onto one
/// neighbour — while few agents are moved off their hashed node, which is
/// what keeps an agent's desktop and mobile sessions together.
const LOAD_FACTOR: (u128, u128) = (5, 4);

/// One node as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Random per process: tells a restarted node from its previous life.
    pub instance: String,
    /// The `/ws/v1` URL discovery hands out for it.
    pub endpoint: String,
    /// Open WebSocket connections.
    pub connections: u64,
    pub draining: bool,
}

/// The node for an agent among `members`: rendezvous (highest random weight)
/// hashing of `agent` over the members not draining, passing over any whose
/// load has reached the bounded-load capacity. Every node holding the same
/// view answers the same; an agent moves only when its node leaves, drains
/// or fills up. `None` when every member drains (or there is none).
pub fn choose<'a>(agent: &str, members: &'a [Member]) -> Option<&'a Member> {
    let mut open: Vec<(u64, &Member)> =
        members.iter().filter(|m| !m.draining).map(|m| (weight(agent, &m.id), m)).collect();
    if open.is_empty() {
        return None;
    }
    // Highest weight first; ids break a tie, so the order never depends on the view's order.
    open.sort_by(|(wa, a), (wb, b)| wb.cmp(wa).then_with(|| a.id.cmp(&b.id)));
    let total: u128 = open.iter().map(|(_, m)| u128::from(m.connections)).sum();
    let n = open.len() as u128;
    let (num, den) = LOAD_FACTOR;
    // ceil(c × total / n): the least loaded node holds at most the average, so someone is chosen.
    let capacity = (num * total).div_ceil(den * n);
    // `or`: never taken by the bound above, but a member is still better than none.
    open.iter().find(|(_, m)| u128::from(m.connections) <= capacity).or(open.first()).map(|(_, m)| *m)
}

/// The rendezvous weight of `node` for `agent`: the same on every node
/// (SHA-256, never a per-process hasher).
fn weight(agent: &str, node: &str) -> u64 {
    let mut h = Sha256::new();
    h.update((agent.len() as u64).to_le_bytes());
    h.update(agent.as_bytes());
    h.update(node.as_bytes());
    let d = h.finalize();
    let mut w = [0u8; 8];
    w.copy_from_slice(&d[..8]);
    u64::from_be_bytes(w)
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "node_id `{node_id}` is held by another live bridge (instance {holder}) after waiting {waited:?} for it to expire: every node needs its own node_id"
    )]
    NodeIdTaken { node_id: String, holder: String, waited: Duration },
    #[error("cannot register in the cluster: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What this node is and how often it says so.
#[derive(Debug, Clone)]
pub struct MembershipSettings {
    pub node_id: String,
    /// The `/ws/v1` URL of this node.
    pub endpoint: String,
    pub heartbeat: Duration,
    pub ttl: Duration,
    /// Random per process: tells a restarted node from its previous life
    /// (the store records attachments under it too).
    pub instance: String,
}

/// Writes this node's record (unless another instance holds the id), drops
/// ids whose record expired, and returns `[claimed, holder, record...]`.
/// KEYS[1]: the set of ids; KEYS[2]: this node's record.
/// ARGV: instance, record, TTL (ms), the record keys' prefix.
const BEAT: &str = r#"
local claimed, holder = 1, ''
local held = redis.call('GET', KEYS[2])
if held then
  local ok, rec = pcall(cjson.decode, held)
  holder = (ok and type(rec) == 'table' and rec.instance) or '?'
  if holder ~= ARGV[1] then claimed = 0 end
end
if claimed == 1 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[1], KEYS[2]:sub(#ARGV[4] + 1))
end
local out = {claimed, holder}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rec = redis.call('GET', ARGV[4] .. id)
  if rec then table.insert(out, rec) else redis.call('SREM', KEYS[1], id) end
end
return out
"#;

/// Deletes this node's record if this instance still holds it.
/// KEYS[1]: the set of ids; KEYS[2]: this node's record. ARGV: instance, id.
const LEAVE: &str = r#"
local held = redis.call('GET', KEYS[2])
if held then
  local ok, rec = pcall(cjson.decode, held)
  if ok and type(rec) == 'table' and rec.instance == ARGV[1] then
    redis.call('DEL', KEYS[2])
    redis.call('SREM', KEYS[1], ARGV[2])
  end
end
return 1
"#;

/// The members this node saw last, and when.
struct View {
    members: Vec<Member>,
    read_at: Instant,
}

/// What discovery answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Connect to this endpoint (node id, endpoint).
    Node { id: String, endpoint: String },
    /// This node drains and knows no other: nothing to offer now.
    Unavailable,
}

/// This node's membership: its record in Redis and its view of the others.
pub struct Membership {
    kv: Kv,
    settings: MembershipSettings,
    instance: String,
    ids_key: String,
    record_prefix: String,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    view: RwLock<Option<View>>,
    /// One beat at a time: the heartbeat's and the drain's must not cross, or
    /// a record read before `draining` was set could land after the one with it.
    beating: tokio::sync::Mutex<()>,
    beat: redis::Script,
    leave: redis::Script,
}

impl Membership {
    fn new(kv: Kv, settings: MembershipSettings, metrics: Arc<Metrics>) -> Self {
        Membership {
            ids_key: kv.key("{nodes}:ids"),
            record_prefix: kv.key("{nodes}:node:"),
            kv,
            instance: settings.instance.clone(),
            settings,
            draining: AtomicBool::new(false),
            metrics,
            view: RwLock::new(None),
            beating: tokio::sync::Mutex::new(()),
            beat: redis::Script::new(BEAT),
            leave: redis::Script::new(LEAVE),
        }
    }

    /// Registers this node and starts its heartbeat. An id still held by
    /// another instance (a previous life that did not leave: killed, or cut
    /// off) is waited for up to one TTL plus a heartbeat; held past that, a
    /// second live bridge has the same `node_id` and this one refuses to start.
    pub async fn join(
        kv: Kv,
        settings: MembershipSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Registration, MembershipError> {
        let m = Arc::new(Membership::new(kv, settings, metrics));
        let patience = m.settings.ttl + m.settings.heartbeat;
        let started = Instant::now();
        loop {
            match m.beat().await? {
                Beat::Claimed => break,
                Beat::HeldBy(holder) if started.elapsed() >= patience => {
                    return Err(MembershipError::NodeIdTaken {
                        node_id: m.settings.node_id.clone(),
                        holder,
                        waited: started.elapsed(),
                    });
                }
                Beat::HeldBy(holder) => {
                    tracing::warn!(node = %m.settings.node_id, %holder, "node_id still held by another instance; waiting for its record to expire");
                    tokio::time::sleep(m.settings.heartbeat).await;
                }
            }
        }
        tracing::info!(node = %m.settings.node_id, instance = %m.instance, "joined the cluster");
        let stop = CancellationToken::new();
        let beating = tokio::spawn(heartbeat(m.clone(), stop.clone()));
        Ok(Registration { membership: m, beating, stop })
    }

    /// Writes this node's record and reads everyone's, in one round trip.
    async fn beat(&self) -> Result<Beat, redis::RedisError> {
        let _one = self.beating.lock().await;
        let me = Member {
            id: self.settings.node_id.clone(),
            instance: self.instance.clone(),
            endpoint: self.settings.endpoint.clone(),
            connections: self.metrics.open_connections(),
            draining: self.draining.load(Ordering::SeqCst),
        };
        let record = serde_json::to_string(&me).unwrap_or_default();
        let ttl_ms = self.settings.ttl.as_millis() as u64;
        let reply: Vec<redis::Value> = self
            .beat
            .key(&self.ids_key)
            .key(format!("{}{}", self.record_prefix, self.settings.node_id))
            .arg(&self.instance)
            .arg(record)
            .arg(ttl_ms)
            .arg(&self.record_prefix)
            .invoke_async(&mut self.kv.conn())
            .await?;
        let read_at = Instant::now();
        let mut parts = reply.into_iter();
        let claimed = matches!(parts.next(), Some(redis::Value::Int(1)));
        let holder = parts.next().map(text).unwrap_or_default();
        let members: Vec<Member> = parts.filter_map(|v| serde_json::from_str(&text(v)).ok()).collect();
        self.metrics.cluster_nodes.set(members.len() as f64);
        *write(&self.view) = Some(View { members, read_at });
        Ok(if claimed { Beat::Claimed } else { Beat::HeldBy(holder) })
    }

    /// The ids of the live members, this node included; empty when the view
    /// is older than a TTL (Redis unreachable): not known.
    pub fn live(&self) -> Vec<String> {
        let view = read(&self.view);
        view.as_ref()
            .filter(|v| v.read_at.elapsed() < self.settings.ttl)
            .map(|v| v.members.iter().map(|m| m.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Whether this node has started to drain (not ready any more).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The node `/v1/discovery` offers the agent (tenant, agent): chosen
    /// from the live members by [`choose`]. With no view (Redis unreachable
    /// for a TTL) or nobody to choose, this node — unless it drains.
    pub fn discover(&self, tenant: &str, agent: &str) -> Answer {
        let draining = self.draining.load(Ordering::SeqCst);
        let chosen = {
            let view = read(&self.view);
            // A view older than a TTL may list nodes that died since: no better than none.
            view.as_ref().filter(|v| v.read_at.elapsed() < self.settings.ttl).and_then(|v| {
                // Our own flag is newer than our record in the view.
                let members: Vec<Member> = v
                    .members
                    .iter()
                    .map(|m| Member {
                        draining: m.draining || (draining && m.id == self.settings.node_id),
                        ..m.clone()
                    })
                    .collect();
                choose(&agent_tag(tenant, agent), &members)
                    .map(|m| Answer::Node { id: m.id.clone(), endpoint: m.endpoint.clone() })
            })
        };
        match chosen {
            Some(answer) => answer,
            None if draining => Answer::Unavailable,
            None => Answer::Node { id: self.settings.node_id.clone(), endpoint: self.settings.endpoint.clone() },
        }
    }
}

enum Beat {
    Claimed,
    /// Another instance holds this node id.
    HeldBy(String),
}

fn text(v: redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        redis::Value::SimpleString(s) => s,
        _ => String::new(),
    }
}

/// Renews the record and the view every heartbeat until stopped.
async fn heartbeat(m: Arc<Membership>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(m.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and `join` has just beaten.
    tick.tick().await;
    let mut held_by = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = tokio::select! {
            _ = stop.cancelled() => return,
            beat = m.beat() => beat,
        };
        match beat {
            Ok(Beat::Claimed) => held_by = None,
            // Said once per holder: it repeats every heartbeat until that record expires.
            Ok(Beat::HeldBy(holder)) if held_by.as_ref() != Some(&holder) => {
                tracing::error!(node = %m.settings.node_id, %holder, "another live bridge holds this node_id: every node needs its own");
                held_by = Some(holder);
            }
            Ok(Beat::HeldBy(_)) => {}
            Err(e) => tracing::warn!(error = %e, "cluster heartbeat failed"),
        }
    }
}

/// A joined node: its membership and the heartbeat task, stopped when this
/// is dropped or leaves.
pub struct Registration {
    membership: Arc<Membership>,
    beating: JoinHandle<()>,
    stop: CancellationToken,
}

impl Registration {
    pub fn membership(&self) -> Arc<Membership> {
        self.membership.clone()
    }

    /// Publishes that this node drains, then waits until every other node
    /// has read it — its next heartbeat, plus one more for a late tick or a
    /// slow read — or `budget`, whichever is shorter. Returns the time spent.
    pub async fn drain(&self, budget: Duration) -> Duration {
        let m = &self.membership;
        let started = Instant::now();
        m.draining.store(true, Ordering::SeqCst);
        match tokio::time::timeout(budget, m.beat()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not publish that this node drains; its record expires instead")
            }
            Err(_) => {
                tracing::warn!("publishing that this node drains took the whole budget; its record expires instead")
            }
        }
        let wait = (m.settings.heartbeat * 2).min(budget.saturating_sub(started.elapsed()));
        tokio::time::sleep(wait).await;
        started.elapsed()
    }

    /// Stops the heartbeat and deletes this node's record (if still its own).
    pub async fn leave(mut self) {
        self.stop.cancel();
        let _ = (&mut self.beating).await;
        let m = &self.membership;
        let left: Result<i64, _> = m
            .leave
            .key(&m.ids_key)
            .key(format!("{}{}", m.record_prefix, m.settings.node_id))
            .arg(&m.instance)
            .arg(&m.settings.node_id)
            .invoke_async(&mut m.kv.conn())
            .await;
        if let Err(e) = left {
            tracing::warn!(error = %e, "could not remove this node's record; it expires instead");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(id: &str, connections: u64) -> Member {
        Member {
            id: id.into(),
            instance: "i".into(),
            endpoint: format!("ws://{id}/ws/v1"),
            connections,
            draining: false,
        }
    }

    fn nodes(n: usize) -> Vec<Member> {
        (0..n).map(|i| member(&format!("node-{i}"), 0)).collect()
    }

    fn chosen(agent: &str, members: &[Member]) -> String {
        choose(agent, members).map(|m| m.id.clone()).unwrap_or_default()
    }

    #[test]
    fn nobody_to_choose_when_every_member_drains_or_there_is_none() {
        assert!(choose("a", &[]).is_none());
        let mut all = nodes(2);
        all.iter_mut().for_each(|m| m.draining = true);
        assert!(choose("a", &all).is_none());
    }

    #[test]
    fn agents_spread_over_every_node() {
        let members = nodes(3);
        let mut per_node = std::collections::HashMap::new();
        for a in 0..300 {
            *per_node.entry(chosen(&format!("agent-{a}"), &members)).or_insert(0) += 1;
        }
        assert_eq!(per_node.len(), 3, "{per_node:?}");
        assert!(per_node.values().all(|&n| n > 50), "{per_node:?}");
    }

    #[test]
    fn a_draining_node_is_never_chosen() {
        let mut members = nodes(3);
        members[1].draining = true;
        for a in 0..100 {
            assert_ne!(chosen(&format!("agent-{a}"), &members), "node-1");
        }
    }

    #[test]
    fn a_node_past_the_bounded_load_is_passed_over_and_one_at_it_is_not() {
        let mut members = nodes(3);
        // total 12 → capacity ceil(1.25 × 12 / 3) = 5.
        members[0].connections = 6;
        members[1].connections = 5;
        members[2].connections = 1;
        for a in 0..100 {
            let c = chosen(&format!("agent-{a}"), &members);
            assert_ne!(c, "node-0", "past capacity");
        }
        let takes_node_1 = (0..100).any(|a| chosen(&format!("agent-{a}"), &members) == "node-1");
        assert!(takes_node_1, "at capacity, node-1 keeps its agents");
    }

    proptest! {
        #[test]
        fn the_choice_ignores_the_views_order(agent in "[a-z0-9]{1,12}", loads in prop::collection::vec(0u64..50, 1..8), rot in 0usize..8) {
            let members: Vec<Member> = loads.iter().enumerate().map(|(i, &c)| member(&format!("n{i}"), c)).collect();
            let mut rotated = members.clone();
            rotated.rotate_left(rot % members.len());
            prop_assert_eq!(chosen(&agent, &members), chosen(&agent, &rotated));
        }

        #[test]
        fn an_agent_moves_only_when_its_node_leaves(agents in prop::collection::vec("[a-z0-9]{1,12}", 1..40), n in 2usize..8, gone in 0usize..8) {
            let members = nodes(n);
            let gone = format!("node-{}", gone % n);
            let rest: Vec<Member> = members.iter().filter(|m| m.id != gone).cloned().collect();
            for agent in &agents {
                let before = chosen(agent, &members);
                let after = chosen(agent, &rest);
                if before != gone {
                    prop_assert_eq!(before, after);
                } else {
                    prop_assert_ne!(after, gone.clone());
                }
            }
        }

        #[test]
        fn the_chosen_node_is_below_capacity_and_not_draining(agent in "[a-z0-9]{1,12}", loads in prop::collection::vec((0u64..1000, any::<bool>()), 1..8)) {
            let members: Vec<Member> = loads
                .iter()
                .enumerate()
                .map(|(i, &(c, draining))| Member { draining, ..member(&format!("n{i}"), c) })
                .collect();
            let open: Vec<&Member> = members.iter().filter(|m| !m.draining).collect();
            match choose(&agent, &members) {
                None => prop_assert!(open.is_empty()),
                Some(m) => {
                    prop_assert!(!m.draining);
                    let total: u64 = open.iter().map(|m| m.connections).sum();
                    // connections <= ceil(1.25 × total / n), in integers.
                    let n = open.len() as u64;
                    prop_assert!(4 * n * m.connections < 5 * total + 4 * n);
                }
            }
        }
    }
}
