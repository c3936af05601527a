//! Shared state behind a trait: the tenant directory, action deduplication,
//! long-lived sessions with their mailboxes, chat availability and auto-accept
//! claims. The embedded store keeps it in this process's memory with a SQLite
//! journal under `CCEB_DATA_DIR`; the Redis store (`CCEB_STORE=redis`) keeps
//! it all in Redis, so nothing above the trait may assume one process.

mod embedded;
mod journal;
mod memory;
mod redis;

pub use self::redis::RedisStore;
pub use embedded::EmbeddedStore;
pub use journal::OpenError;

use crate::fault::{Cause, ErrorKind};
use crate::model::{AgentId, Notification};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// What the bridge knows of one agent, from provisioning records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentEntry {
    pub agent_guid: String,
    pub contact_id: Option<String>,
    pub off_hook_enabled: bool,
    pub recording_controls: Option<i32>,
}

/// A change to one agent's entry; `None` fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPatch {
    pub contact_id: Option<String>,
    pub off_hook_enabled: Option<bool>,
    pub recording_controls: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryOp {
    Put(AgentEntry),
    /// Creates the entry when the agent is not known yet.
    Patch {
        agent_guid: String,
        patch: AgentPatch,
    },
    Remove {
        agent_guid: String,
    },
}

/// Identifies one client action for deduplication (contract section 4). The
/// tenant is kept in clear so that a store can account keys per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupKey {
    pub tenant: Arc<str>,
    /// Of tenant, agent and action uuid.
    pub hash: u128,
}

impl DedupKey {
    pub fn new(tenant: Arc<str>, agent: &str, action_uuid: &str) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [&*tenant, agent, action_uuid] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        DedupKey { tenant, hash: u128::from_le_bytes(b) }
    }
}

/// How many dedup keys the embedded store keeps before their window has
/// passed. The Redis store has no such bound: each key expires by itself
/// (`SET PX`) and Redis's memory bounds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupCapacity {
    /// Keys one tenant keeps; past it the tenant's own oldest is forgotten.
    pub per_tenant: usize,
    /// Keys all tenants keep together; past it the tenant holding the most
    /// forgets its oldest.
    pub total: usize,
}

/// A long-lived session as the store keeps it (contract section 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: Arc<str>,
    /// SHA-256 of the key's secret part; the key itself is never stored.
    pub key_hash: [u8; 32],
    pub agent: AgentId,
    pub auto_accept: bool,
    /// Device token for the push provider.
    pub push_token: Option<String>,
    /// Mailbox entries dropped since the client last connected.
    pub dropped: u64,
    /// Unix milliseconds; `None` while a client is connected.
    pub disconnected_at_ms: Option<u64>,
}

/// A session read back at start-up: its record and its mailbox in seq order.
#[derive(Debug)]
pub struct StoredSession {
    pub record: SessionRecord,
    /// Seq the next notification gets.
    pub next_seq: u64,
    pub mailbox: Vec<(u64, Arc<Notification>)>,
}

/// A store operation that failed: its kind says whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[error("store {kind}: {source}")]
pub struct StoreError {
    kind: ErrorKind,
    source: Cause,
}

impl StoreError {
    pub fn new(kind: ErrorKind, source: impl Into<Cause>) -> Self {
        StoreError { kind, source: source.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a directory change; returns the entry as it was before.
    async fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> Result<Option<AgentEntry>, StoreError>;
    async fn directory_get(&self, tenant: &str, agent_guid: &str) -> Result<Option<AgentEntry>, StoreError>;
    /// The agent GUID with this contact id in this tenant.
    async fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Result<Option<String>, StoreError>;
    /// Whether this action was already published within the window.
    async fn dedup_contains(&self, key: &DedupKey) -> Result<bool, StoreError>;
    /// Remembers a published action for `window` (durable with the next
    /// `sync`), within the [`DedupCapacity`]: only the key's own tenant's
    /// traffic may make it be forgotten earlier, unless that tenant holds
    /// more than its share of the total.
    async fn dedup_insert(&self, key: &DedupKey, window: Duration) -> Result<(), StoreError>;

    /// Every long-lived session the store holds, with its mailbox.
    async fn sessions(&self) -> Result<Vec<StoredSession>, StoreError>;
    // The writes below are buffered, in call order, and durable once a later
    // `sync` returns: the notification path must not wait for a disk per session.
    fn session_put(&self, record: &SessionRecord);
    // Each names the session's agent, so that a store can keep a session's
    // keys with its agent's (one Redis Cluster slot) without a lookup.
    /// Deletes the session and its mailbox.
    fn session_delete(&self, agent: &AgentId, id: &str);
    fn mailbox_put(&self, agent: &AgentId, session: &Arc<str>, seq: u64, n: &Arc<Notification>);
    fn mailbox_remove(&self, agent: &AgentId, session: &Arc<str>, seq: u64);
    /// Raises the session's seq high-water mark to `upto`: after a restart its
    /// seqs start there. `durable` is called once the reservation is durable,
    /// never from within this call: the caller holds the session's lock,
    /// which `durable` takes.
    fn seq_reserve(&self, agent: &AgentId, session: &Arc<str>, upto: u64, durable: Box<dyn FnOnce() + Send>);
    /// Every buffered write so far is durable.
    async fn sync(&self) -> Result<(), StoreError>;

    /// Adds `delta` to the agent's count of valid long-lived sessions; returns the new count.
    async fn availability_count(&self, agent: &AgentId, delta: i64) -> Result<u64, StoreError>;
    /// Agents whose last published chat availability is `available: true`.
    async fn availability_published(&self) -> Result<Vec<AgentId>, StoreError>;
    /// Records the availability just published for the agent; durable when it returns.
    async fn set_availability_published(&self, agent: &AgentId, available: bool) -> Result<(), StoreError>;

    /// Claims the auto-accept of one interaction for the agent; `false` when
    /// it was already claimed. Durable when it returns.
    async fn auto_accept_claim(&self, agent: &AgentId, interaction: &str, ttl: Duration) -> Result<bool, StoreError>;
    /// Gives a claim back (the accept could not be published).
    async fn auto_accept_release(&self, agent: &AgentId, interaction: &str) -> Result<(), StoreError>;

    /// Forgets what has expired (dedup keys, auto-accept claims).
    async fn expire(&self) -> Result<(), StoreError>;
    fn ready(&self) -> bool;
    /// Makes every buffered write durable and stops; later writes are lost.
    async fn close(&self);
}

/// A long-lived session attached by this node ([`Placement::attach`]).
#[derive(Debug)]
pub struct Attached {
    /// The record (`dropped`: entries dropped while no client was attached,
    /// now reset in the store) and the whole mailbox, read in the same step
    /// as the attach: nothing appended before it is missed, and everything
    /// appended after it is routed to this node.
    pub stored: StoredSession,
    /// The attachment's generation in the store; every attach raises it.
    pub generation: u64,
    /// The node it was attached to before, when another node held it.
    pub previous: Option<String>,
}

/// Where one notification for an agent went ([`Placement::route`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routed {
    /// (node, session, seq, push token): long-lived sessions attached to a
    /// node, with the seq the notification got in their mailbox (durable
    /// already) and their device token, if any.
    pub attached: Vec<(String, Arc<str>, u64, Option<String>)>,
    /// (session, push token): detached long-lived sessions with a device token.
    pub detached: Vec<(Arc<str>, String)>,
    /// Nodes with short-lived sessions of the agent.
    pub short_lived: Vec<String>,
    /// Mailbox entries dropped to make room.
    pub dropped: u64,
}

/// Whether an agent has room for one more long-lived session ([`Placement::admit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    Room,
    /// Room made by ending this one, the least recently connected detached session.
    Evicted(Arc<str>),
    /// Every session of the agent is attached.
    Full,
}

/// What a store shared by a cluster of nodes adds (the Redis store): seqs
/// and attachments decided in the store, one step per agent, so that any node
/// can append to any session's mailbox and any node can attach it.
#[async_trait]
pub trait Placement: Send + Sync + 'static {
    /// The record of one long-lived session of `agent` (to check a key
    /// before attaching); `None` when there is none.
    async fn record(&self, agent: &AgentId, id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Makes room for a new long-lived session of `agent` within `cap`.
    async fn admit(&self, agent: &AgentId, cap: usize) -> Result<Admitted, StoreError>;
    /// Attaches the session to `node` (its process `instance`) unless it is
    /// gone or its TTL passed while detached (at `now_ms`).
    #[allow(clippy::too_many_arguments)]
    async fn attach(
        &self,
        agent: &AgentId,
        id: &str,
        node: &str,
        instance: &str,
        now_ms: u64,
        ttl: Duration,
        auto_accept: bool,
        push_token: Option<&str>,
    ) -> Result<Option<Attached>, StoreError>;
    /// Records that the attachment of `generation` ended at `now_ms`, if it
    /// is still the session's (a later attach elsewhere wins). Buffered:
    /// durable with the next `sync`.
    fn detach(&self, agent: &AgentId, id: &Arc<str>, node: &str, generation: u64, now_ms: u64, ttl: Duration);
    /// Takes a session back for `node` (`instance`) under `generation` after
    /// the others detached it (this node was missing from their views): `true`
    /// while it is still this attachment's, `false` once attached elsewhere
    /// since, or gone.
    async fn reclaim(
        &self,
        agent: &AgentId,
        id: &str,
        generation: u64,
        node: &str,
        instance: &str,
    ) -> Result<bool, StoreError>;
    /// Deletes the session and its mailbox if `generation` is still its
    /// attachment's (`end_session`); `false`: attached again since, elsewhere.
    async fn end(&self, agent: &AgentId, id: &str, generation: u64) -> Result<bool, StoreError>;
    /// Detaches, as of `now_ms`, every session attached to `node` under an
    /// instance other than `alive` (every instance: `None`): the node died,
    /// or restarted. Returns how many.
    async fn reap(&self, node: &str, alive: Option<&str>, now_ms: u64, ttl: Duration) -> Result<usize, StoreError>;
    /// The nodes sessions are attached to (some may be dead).
    async fn attached_nodes(&self) -> Result<Vec<String>, StoreError>;
    /// Appends `n` to the mailbox of every long-lived session of `agent`,
    /// each at its next seq, keeping at most `capacity` entries; once per
    /// uuid (a source sent again after a failure part-way appends nothing
    /// twice, and routes nothing).
    async fn route(
        &self,
        agent: &AgentId,
        n: &Notification,
        capacity: usize,
        now_ms: u64,
    ) -> Result<Routed, StoreError>;
    /// Records a short-lived session of `agent` as open on `node` (`Some`)
    /// or closed. Buffered, in order with the other writes; idempotent.
    fn short_lived(&self, agent: &AgentId, session: &Arc<str>, node: Option<&Arc<str>>);
    /// Agents of the tenant with long-lived sessions.
    async fn tenant_agents(&self, tenant: &str) -> Result<Vec<AgentId>, StoreError>;
    /// Ends the detached sessions whose TTL passed by `now_ms`; returns the
    /// agent of each session ended, once per session, whichever node asks.
    async fn expire_due(&self, now_ms: u64, ttl: Duration) -> Result<Vec<AgentId>, StoreError>;
    /// Mailbox entries of a session past `after` (a node catching up).
    async fn mailbox_after(
        &self,
        agent: &AgentId,
        id: &str,
        after: u64,
    ) -> Result<Vec<(u64, Arc<Notification>)>, StoreError>;
    /// The agent (with the IR instance of its session) when a valid
    /// long-lived session of it asked for auto-accept.
    async fn auto_accepts(&self, agent: &AgentId, now_ms: u64, ttl: Duration) -> Result<Option<AgentId>, StoreError>;
    /// Decides the agent's next availability record, once across the
    /// cluster: `Some((available, lease))` when its sessions (any or none)
    /// disagree with what was last published, now marked published and
    /// leased to the caller until [`Placement::availability_done`]; `None`
    /// otherwise.
    async fn availability_claim(&self, agent: &AgentId) -> Result<Option<(bool, String)>, StoreError>;
    /// The record of a claimed transition is published (or given back and
    /// retried by its claimer): its lease ends, nobody publishes it again.
    async fn availability_done(&self, lease: &str) -> Result<(), StoreError>;
    /// Transitions claimed but not published within their lease (their
    /// claimer died): the agent, the availability to publish and the lease,
    /// taken over by the caller.
    async fn availability_overdue(&self) -> Result<Vec<(AgentId, bool, String)>, StoreError>;
}
