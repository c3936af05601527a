//! Shared state behind a trait: the tenant directory and action deduplication.
//! The embedded store keeps it in this process; a cluster store (Redis) will
//! implement the same trait, so nothing above it may assume one process.

mod memory;

pub use memory::MemoryStore;

use async_trait::async_trait;
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

/// Identifies one client action for deduplication (contract section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DedupKey(pub u128);

impl DedupKey {
    pub fn new(tenant: &str, agent: &str, action_uuid: &str) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [tenant, agent, action_uuid] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let d = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        DedupKey(u128::from_le_bytes(b))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies a directory change; returns the entry as it was before.
    async fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> Result<Option<AgentEntry>, StoreError>;
    async fn directory_get(&self, tenant: &str, agent_guid: &str) -> Result<Option<AgentEntry>, StoreError>;
    /// The agent GUID with this contact id in this tenant.
    async fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Result<Option<String>, StoreError>;
    /// Whether this action was already published within the window.
    async fn dedup_contains(&self, key: DedupKey) -> Result<bool, StoreError>;
    /// Remembers a published action for `window`.
    async fn dedup_insert(&self, key: DedupKey, window: Duration) -> Result<(), StoreError>;
    fn ready(&self) -> bool;
}
