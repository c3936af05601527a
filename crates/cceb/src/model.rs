//! The plain values the layers hand each other: who an agent is, and a
//! notification as sessions queue it and the store keeps it. Below both
//! `session` and `store`, so neither needs the other's types.

use cceb_protocol::NotificationType;
use std::sync::Arc;

/// An authenticated agent: every lookup is keyed by (tenant, agent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentId {
    pub tenant_guid: Arc<str>,
    pub agent_guid: Arc<str>,
    pub ir_instance: Arc<str>,
}

/// One notification, shared by every session that receives it.
#[derive(Debug)]
pub struct Notification {
    pub ty: NotificationType,
    pub uuid: String,
    /// `data`, serialised once.
    pub data: Box<str>,
}
