//! Client actions (contract section 4): protect reserved fields → resolve
//! contact ids inside the caller's tenant → inject identity → validate against
//! the Avro schema → publish → acknowledge. Deduplicated by action uuid.

use crate::bus::{Bus, BusError, OutRecord};
use crate::fault::{Cause, ErrorKind};
use crate::metrics::{ActionOutcome, Metrics};
use crate::notify::{Dispatcher, Target};
use crate::reactions::inject_identity;
use crate::schema::{FieldError, SchemaSet};
use crate::session::AgentId;
use crate::store::{DedupKey, Store, StoreError};
use cceb_protocol::{ErrorCode, NotificationType, TraceParent};
use serde_json::{json, Map, Value as Json};
use std::sync::Arc;
use std::time::Duration;

/// Fields a client may never set: the bridge fills them.
pub const RESERVED_FIELDS: [&str; 6] =
    ["irInstance", "tenantGuid", "agentGuid", "isSystemAction", "isRelocate", "source"];

/// Contact-id fields the bridge replaces by the agent GUID they resolve to.
pub const CONTACT_FIELDS: [(&str, &str); 2] =
    [("destinationAgentContactId", "destinationAgentGuid"), ("secondAgentContactId", "secondAgentGuid")];

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("`{0}` is not a supported action")]
    UnknownAction(String),
    #[error("`{0}` is set by the bridge and may not be given")]
    ReservedField(String),
    #[error("{0}")]
    InvalidDetails(FieldError),
    #[error("`{field}` does not name an agent of your tenant")]
    UnknownAgent { field: String },
    #[error("the backend did not take the action, retry with the same uuid: {0}")]
    BackendUnavailable(Cause),
    /// The contract has no code for a refusal a retry cannot cure: the client
    /// gets `backend_unavailable`, and the message says so.
    #[error("the backend refused the action, a retry will not help: {0}")]
    BackendRefused(Cause),
}

impl ActionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ActionError::UnknownAction(_) => ErrorCode::UnknownAction,
            ActionError::ReservedField(_) => ErrorCode::ReservedField,
            ActionError::InvalidDetails(_) => ErrorCode::InvalidActionDetails,
            ActionError::UnknownAgent { .. } => ErrorCode::UnknownAgent,
            ActionError::BackendUnavailable(_) | ActionError::BackendRefused(_) => ErrorCode::BackendUnavailable,
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            ActionError::ReservedField(f) | ActionError::UnknownAgent { field: f } => Some(f),
            ActionError::InvalidDetails(e) => Some(&e.field),
            _ => None,
        }
    }

    /// A bus or store failure as the client learns it: the kind alone decides
    /// whether a retry with the same uuid is worth it.
    fn backend(kind: ErrorKind, cause: impl Into<Cause>) -> Self {
        if kind.is_retryable() {
            ActionError::BackendUnavailable(cause.into())
        } else {
            ActionError::BackendRefused(cause.into())
        }
    }
}

impl From<StoreError> for ActionError {
    fn from(e: StoreError) -> Self {
        ActionError::backend(e.kind(), e)
    }
}

impl From<BusError> for ActionError {
    fn from(e: BusError) -> Self {
        ActionError::backend(e.kind(), e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Published,
    /// Seen within the dedup window: acknowledged again, not published again.
    Duplicate,
}

pub struct ActionSettings {
    pub source: String,
    pub dedup_window: Duration,
    pub off_hook_offer_timeout_seconds: u64,
}

pub struct Actions {
    schemas: Arc<SchemaSet>,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    dispatcher: Arc<Dispatcher>,
    settings: ActionSettings,
    metrics: Arc<Metrics>,
}

impl Actions {
    pub fn new(
        schemas: Arc<SchemaSet>,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        dispatcher: Arc<Dispatcher>,
        settings: ActionSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Actions { schemas, store, bus, dispatcher, settings, metrics }
    }

    /// Carries out one client action; `Ok` means the client gets its `ack`.
    pub async fn perform(
        &self,
        who: &AgentId,
        uuid: &str,
        action: &str,
        details: Map<String, Json>,
        traceparent: Option<TraceParent>,
    ) -> Result<Done, ActionError> {
        let result = self.perform_inner(who, uuid, action, details, traceparent).await;
        let outcome = match &result {
            Ok(Done::Published) => ActionOutcome::Published,
            Ok(Done::Duplicate) => ActionOutcome::Duplicate,
            Err(e) => ActionOutcome::Refused(e.code()),
        };
        self.metrics.action(action, outcome);
        result
    }

    async fn perform_inner(
        &self,
        who: &AgentId,
        uuid: &str,
        action: &str,
        mut details: Map<String, Json>,
        traceparent: Option<TraceParent>,
    ) -> Result<Done, ActionError> {
        let record = self.schemas.action(action).ok_or_else(|| ActionError::UnknownAction(action.to_owned()))?;
        // Its dedup key could not be made durable: publishing now could not be
        // deduplicated after a crash, and would pile writes on a failing disk.
        if !self.store.ready() {
            return Err(StoreError::new(ErrorKind::Unavailable, "the store cannot write").into());
        }
        if let Some(f) = RESERVED_FIELDS.iter().find(|f| details.contains_key(**f)) {
            return Err(ActionError::ReservedField((*f).to_owned()));
        }
        // The trace context is not part of the action: a retry under the same
        // uuid is the same action whatever trace it carries.
        let dedup = DedupKey::new(who.tenant_guid.clone(), &who.agent_guid, uuid);
        if self.store.dedup_contains(&dedup).await? {
            return Ok(Done::Duplicate);
        }
        self.resolve_agents(who, &mut details).await?;
        inject_identity(record, &mut details, who, false, &self.settings.source);
        let value = self.schemas.build(record, &details).map_err(ActionError::InvalidDetails)?;
        let out = OutRecord { record: action.to_owned(), key: who.agent_guid.to_string(), value, traceparent };
        self.bus.publish(out).await?;
        self.store.dedup_insert(&dedup, self.settings.dedup_window).await?;
        if action == "ChangeAgentStateEvent" && details.get("state").and_then(Json::as_str) == Some("Available") {
            self.offer_off_hook(who).await?;
        }
        Ok(Done::Published)
    }

    /// Contact ids become agent GUIDs; given GUIDs must be agents of the caller's tenant.
    async fn resolve_agents(&self, who: &AgentId, details: &mut Map<String, Json>) -> Result<(), ActionError> {
        let tenant = &*who.tenant_guid;
        for (contact_field, guid_field) in CONTACT_FIELDS {
            if let Some(contact) = details.remove(contact_field) {
                let invalid = |reason: &str| {
                    ActionError::InvalidDetails(FieldError { field: contact_field.into(), reason: reason.into() })
                };
                if details.contains_key(guid_field) {
                    return Err(invalid(&format!("give `{contact_field}` or `{guid_field}`, not both")));
                }
                let contact = contact.as_str().ok_or_else(|| invalid("expected a string"))?;
                let agent = self.store.resolve_contact(tenant, contact).await?;
                let agent = agent.ok_or_else(|| ActionError::UnknownAgent { field: contact_field.into() })?;
                details.insert(guid_field.to_owned(), Json::String(agent));
            } else if let Some(Json::String(guid)) = details.get(guid_field) {
                if self.store.directory_get(tenant, guid).await?.is_none() {
                    return Err(ActionError::UnknownAgent { field: guid_field.into() });
                }
            }
        }
        Ok(())
    }

    /// The platform does not announce the off-hook offer; the bridge does, at
    /// once, so the client can show its countdown (contract section 5).
    async fn offer_off_hook(&self, who: &AgentId) -> Result<(), ActionError> {
        let entry = self.store.directory_get(&who.tenant_guid, &who.agent_guid).await?;
        if entry.is_some_and(|e| e.off_hook_enabled) {
            let to = Target::Agent { tenant: who.tenant_guid.to_string(), agent: who.agent_guid.to_string() };
            let data = json!({"state": "offering", "timeout": self.settings.off_hook_offer_timeout_seconds});
            // The offer is the platform's to make: a client that misses it still gets its result.
            if let Err(e) = self.dispatcher.send(&to, NotificationType::OffHook, &data).await {
                tracing::warn!(error = %e, "the off-hook offer was not delivered");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [ErrorKind; 4] = [ErrorKind::Unavailable, ErrorKind::Timeout, ErrorKind::Rejected, ErrorKind::Fatal];

    #[test]
    fn a_backend_failure_tells_the_client_whether_to_retry_by_its_kind_alone() {
        for kind in KINDS {
            // The same text for every kind: only the kind may decide.
            let errors =
                [ActionError::from(BusError::new(kind, "broker")), ActionError::from(StoreError::new(kind, "disk"))];
            for e in errors {
                assert_eq!(e.code(), ErrorCode::BackendUnavailable, "the contract's only code for it: {kind:?}");
                assert_eq!(e.field(), None);
                let text = e.to_string();
                assert_eq!(matches!(e, ActionError::BackendUnavailable(_)), kind.is_retryable(), "{kind:?}: {text}");
                let (retry, futile) = (text.contains("retry with the same uuid"), text.contains("will not help"));
                assert_eq!((retry, futile), (kind.is_retryable(), !kind.is_retryable()), "{kind:?}: {text}");
            }
        }
    }
}
