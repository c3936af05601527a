//! Backend events → notifications → session mailboxes (contract section 5).
//!
//! What an event becomes and who receives it is read from the mapping file
//! (`schema::EventMapping`); this module carries out the few behaviours that
//! mapping names (off-hook states, phone validation, list expansion, the tenant
//! directory and `agent_phone_update`).

use crate::metrics::Metrics;
use crate::schema::convert::{field, field_bool, field_i64, field_str, to_json, Keys};
use crate::schema::{Audience, DirectoryChange, EventMapping, FieldError, SchemaSet, Transform};
use crate::session::{Notification, Sessions};
use crate::store::{AgentEntry, AgentPatch, DirectoryOp, Store, StoreError};
use crate::sync::lock;
use apache_avro::types::Value as Avro;
use cceb_protocol::{NotificationType, TraceParent};
use serde_json::{json, Map, Value as Json};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

/// Who receives a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Agent { tenant: String, agent: String },
    Tenant { tenant: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub to: Target,
    pub ty: NotificationType,
    pub data: Json,
}

/// A validated backend event with the notifications it makes.
#[derive(Debug, Clone)]
pub struct Event {
    pub record: String,
    pub value: Avro,
    /// The planned notifications, `data` serialised once.
    out: Vec<Outgoing>,
    directory: Option<DirectoryChange>,
    /// The `state` that makes this event an offer to auto-accept.
    auto_accept: Option<String>,
    /// Where the event came from (a Kafka record's position, a backend-port
    /// `id`): its notifications' uuids derive from it, so a source delivered
    /// again yields the same uuids.
    source: Option<String>,
    /// The W3C trace context the event came with (a Kafka record's
    /// `traceparent` header, a backend-port event's `traceparent`): in the
    /// log lines of its notifications.
    traceparent: Option<TraceParent>,
}

impl Event {
    /// The event with the trace context its source carried.
    pub fn traced(self, traceparent: Option<TraceParent>) -> Event {
        Event { traceparent, ..self }
    }

    pub fn traceparent(&self) -> Option<&TraceParent> {
        self.traceparent.as_ref()
    }
}

#[derive(Debug, Clone)]
struct Outgoing {
    to: Target,
    ty: NotificationType,
    data: Box<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("unknown event record `{0}`")]
    UnknownRecord(String),
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    Unmappable(String),
    #[error("a `{ty}` notification of {size} bytes exceeds the largest allowed, {limit} bytes (CCEB_MAX_NOTIFICATION_BYTES)")]
    TooLarge { ty: NotificationType, size: usize, limit: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Turns backend records into events: schema validation, mapping, size limit.
/// Pure: no session or store, so parsers of outside input can be fuzzed with it.
pub struct EventReader {
    schemas: Arc<SchemaSet>,
    /// Largest serialised `data` of one notification.
    max_bytes: usize,
}

impl EventReader {
    pub fn new(schemas: Arc<SchemaSet>, max_bytes: usize) -> Self {
        EventReader { schemas, max_bytes }
    }

    /// Validates an event given as plain JSON (the backend port).
    pub fn from_json(
        &self,
        record: &str,
        value: &Map<String, Json>,
        source: Option<String>,
    ) -> Result<Event, EventError> {
        let (r, _) = self.schemas.event(record).ok_or_else(|| EventError::UnknownRecord(record.to_owned()))?;
        let value = self.schemas.build(r, value).map_err(EventError::Invalid)?;
        self.from_avro(record, value, source)
    }

    /// Plans an already-decoded event (a bus that carries Avro).
    pub fn from_avro(&self, record: &str, value: Avro, source: Option<String>) -> Result<Event, EventError> {
        let (_, mapping) = self.schemas.event(record).ok_or_else(|| EventError::UnknownRecord(record.to_owned()))?;
        let mut out = Vec::new();
        for p in plan(record, mapping, &value)? {
            let data: Box<str> = p.data.to_string().into();
            if data.len() > self.max_bytes {
                return Err(EventError::TooLarge { ty: p.ty, size: data.len(), limit: self.max_bytes });
            }
            out.push(Outgoing { to: p.to, ty: p.ty, data });
        }
        Ok(Event {
            record: record.to_owned(),
            value,
            out,
            directory: mapping.directory,
            auto_accept: mapping.auto_accept.clone(),
            source,
            traceparent: None,
        })
    }
}

/// The uuid of the `index`th notification of a source: the same source always
/// gives the same uuid (contract section 5); without a source, a random one.
pub fn notification_uuid(source: Option<&str>, index: usize) -> String {
    let bytes: [u8; 16] = match source {
        Some(source) => {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update((source.len() as u64).to_le_bytes());
            h.update(source.as_bytes());
            h.update((index as u64).to_le_bytes());
            let d = h.finalize();
            let mut b = [0u8; 16];
            b.copy_from_slice(&d[..16]);
            return uuid::Builder::from_custom_bytes(b).into_uuid().to_string();
        }
        // The thread-local generator: `new_v4` asks the kernel each time.
        None => rand::random(),
    };
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

/// Sources whose notifications are in the mailboxes already: a source sent
/// again (a backend retrying after a 503 whose writes the store later made
/// durable, a Kafka record read again after a rebalance) is not queued twice.
/// Bounded, oldest forgotten first; gone with the process, as are mailboxes
/// that were not durable.
struct Recent {
    seen: HashSet<u128>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl Recent {
    fn key(source: &str) -> u128 {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(source.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        u128::from_le_bytes(b)
    }

    /// Remembers `key`; `false` when it was remembered already.
    fn insert(&mut self, key: u128) -> bool {
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    fn remove(&mut self, key: u128) {
        if self.seen.remove(&key) {
            self.order.retain(|&k| k != key);
        }
    }
}

/// How many sources [`Recent`] remembers.
const RECENT_SOURCES: usize = 100_000;

pub struct Dispatcher {
    sessions: Arc<Sessions>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    recent: Mutex<Recent>,
}

impl Dispatcher {
    pub fn new(sessions: Arc<Sessions>, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        let recent = Recent { seen: HashSet::new(), order: VecDeque::new(), capacity: RECENT_SOURCES };
        Dispatcher { sessions, store, metrics, recent: Mutex::new(recent) }
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        lock(&self.recent)
    }

    /// Applies the events to the directory, puts their notifications in the
    /// mailboxes of every addressed session and carries out auto-accept;
    /// returns how many were queued. Every step that can fail (the store)
    /// runs for all events before any notification is queued, so a failure
    /// leaves no event half-taken. Durable only after [`Dispatcher::commit`].
    pub async fn ingest(&self, events: &[Event]) -> Result<usize, NotifyError> {
        // Claim each source in one step: one queued already (or twice in this
        // batch) is skipped, and two requests racing with it claim it once.
        let keys: Vec<Option<u128>> = events.iter().map(|e| e.source.as_deref().map(Recent::key)).collect();
        let fresh: Vec<bool> = {
            let mut recent = self.recent();
            keys.iter().map(|k| k.is_none_or(|k| recent.insert(k))).collect()
        };
        let mut extra = Vec::with_capacity(events.len());
        for (event, &is_fresh) in events.iter().zip(&fresh) {
            let change = match event.directory.filter(|_| is_fresh) {
                Some(change) => self.directory_change(change, &event.value).await,
                None => Ok(None),
            };
            match change {
                Ok(p) => extra.push(p),
                Err(e) => {
                    // Nothing was queued: the retry must find the sources unclaimed.
                    let mut recent = self.recent();
                    keys.iter().zip(&fresh).filter(|(_, &f)| f).flat_map(|(k, _)| k).for_each(|k| recent.remove(*k));
                    return Err(e);
                }
            }
        }
        let mut queued = 0;
        for ((event, extra), _) in events.iter().zip(extra).zip(&fresh).filter(|(_, &f)| f) {
            let (source, trace) = (event.source.as_deref(), event.traceparent.as_ref());
            let mut planned: Vec<(&Target, NotificationType, Box<str>, String)> = Vec::new();
            for (i, o) in event.out.iter().enumerate() {
                planned.push((&o.to, o.ty, o.data.clone(), notification_uuid(source, i)));
            }
            if let Some(p) = &extra {
                planned.push((&p.to, p.ty, p.data.to_string().into(), notification_uuid(source, event.out.len())));
            }
            for (to, ty, data, uuid) in planned {
                match self.deliver(to, ty, data, uuid, trace).await {
                    Ok(n) => queued += n,
                    Err(e) => {
                        // A cluster store refused part of it: the whole batch is sent
                        // again, and what was delivered comes again with its uuid.
                        let mut recent = self.recent();
                        keys.iter()
                            .zip(&fresh)
                            .filter(|(_, &f)| f)
                            .flat_map(|(k, _)| k)
                            .for_each(|k| recent.remove(*k));
                        return Err(e.into());
                    }
                }
            }
        }
        // Also for skipped sources: the claim in the store makes it once, and
        // an offer whose claim failed before gets another chance.
        for event in events {
            self.auto_accept(event).await;
        }
        Ok(queued)
    }

    async fn auto_accept(&self, event: &Event) {
        let Some(offered) = &event.auto_accept else { return };
        let v = &event.value;
        if field_str(v, "state") != Some(offered.as_str()) {
            return;
        }
        if let (Some(t), Some(a), Some(i)) =
            (field_str(v, "tenantGuid"), field_str(v, "agentGuid"), field_str(v, "interactionId"))
        {
            self.sessions.offered(t, a, i).await;
        }
    }

    /// Returns once everything ingested so far is durable: only then may the
    /// bus side be told the events were taken.
    pub async fn commit(&self) -> Result<(), NotifyError> {
        Ok(self.store.sync().await?)
    }

    /// Sends one notification the bridge makes itself (e.g. the synthesised
    /// off-hook offering); returns how many sessions got it.
    pub async fn send(&self, to: &Target, ty: NotificationType, data: &Json) -> Result<usize, NotifyError> {
        Ok(self.deliver(to, ty, data.to_string().into(), notification_uuid(None, 0), None).await?)
    }

    /// Queues one notification in every addressed session's mailbox; the
    /// debug line names it with the event's trace context, so an operator can
    /// follow a trace from the backend's event to the notification's uuid.
    async fn deliver(
        &self,
        to: &Target,
        ty: NotificationType,
        data: Box<str>,
        uuid: String,
        trace: Option<&TraceParent>,
    ) -> Result<usize, StoreError> {
        let n = Arc::new(Notification { ty, uuid, data });
        let count = match to {
            Target::Agent { tenant, agent } => self.sessions.deliver_agent(tenant, agent, &n).await?,
            Target::Tenant { tenant } => self.sessions.deliver_tenant(tenant, &n).await?,
        };
        tracing::debug!(
            uuid = %n.uuid,
            r#type = %ty,
            sessions = count,
            traceparent = trace.map(tracing::field::display),
            "notification queued"
        );
        if count == 0 {
            self.metrics.undeliverable.increment(1);
        }
        Ok(count)
    }

    /// Applies only the event's directory change (catching up on provisioning
    /// at start, without notifying anyone).
    pub async fn apply_directory(&self, event: &Event) -> Result<(), NotifyError> {
        if let Some(change) = event.directory {
            self.directory_change(change, &event.value).await?;
        }
        Ok(())
    }

    async fn directory_change(&self, change: DirectoryChange, v: &Avro) -> Result<Option<Planned>, NotifyError> {
        let (Some(tenant), Some(agent)) = (field_str(v, "tenantGuid"), field_str(v, "agentGuid")) else {
            return Ok(None);
        };
        let op = match change {
            DirectoryChange::AgentAdded => DirectoryOp::Put(AgentEntry {
                agent_guid: agent.to_owned(),
                contact_id: field_str(v, "contactId").map(str::to_owned),
                off_hook_enabled: field_bool(v, "offHookEnabled").unwrap_or(false),
                recording_controls: field_i64(v, "recordingControls").and_then(|n| i32::try_from(n).ok()),
            }),
            DirectoryChange::AgentUpdated => {
                let deltas = field(v, "deltas").cloned().unwrap_or(Avro::Null);
                DirectoryOp::Patch {
                    agent_guid: agent.to_owned(),
                    patch: AgentPatch {
                        contact_id: field_str(&deltas, "contactId").map(str::to_owned),
                        off_hook_enabled: field_bool(&deltas, "offHookEnabled"),
                        recording_controls: field_i64(&deltas, "recordingControls").and_then(|n| i32::try_from(n).ok()),
                    },
                }
            }
            DirectoryChange::AgentDeleted => DirectoryOp::Remove { agent_guid: agent.to_owned() },
        };
        let new_controls = match &op {
            DirectoryOp::Patch { patch, .. } => patch.recording_controls,
            _ => None,
        };
        let prev = self.store.directory_apply(tenant, op).await?;
        // Only a change of recordingControls reaches the agent on its own.
        Ok(new_controls.filter(|&n| prev.and_then(|p| p.recording_controls) != Some(n)).map(|n| Planned {
            to: Target::Agent { tenant: tenant.to_owned(), agent: agent.to_owned() },
            ty: NotificationType::AgentPhoneUpdate,
            data: json!({ "recording_controls": n }),
        }))
    }
}

/// The notifications an event makes, in delivery order. Pure.
pub fn plan(record: &str, mapping: &EventMapping, value: &Avro) -> Result<Vec<Planned>, EventError> {
    let missing = |f: &str| EventError::Unmappable(format!("`{record}` has no `{f}` to address it"));
    let tenant = field_str(value, "tenantGuid").ok_or_else(|| missing("tenantGuid"))?.to_owned();
    let to = match mapping.to {
        Audience::Tenant => Target::Tenant { tenant },
        Audience::Agent => Target::Agent {
            tenant,
            agent: field_str(value, "agentGuid").ok_or_else(|| missing("agentGuid"))?.to_owned(),
        },
    };
    let mut data = to_json(value, Keys::Snake);
    match mapping.transform {
        Some(Transform::OffHook) => off_hook(value, &mut data)?,
        Some(Transform::PhoneValidation) => phone_validation(value, &mut data)?,
        None => {}
    }
    if mapping.notification == NotificationType::Provisioning {
        data["event_type"] = Json::String(record.to_owned());
    }
    let mut out = vec![Planned { to: to.clone(), ty: mapping.notification, data }];
    if let Some(each) = &mapping.each {
        if let Some(Avro::Array(items)) = field(value, &each.field) {
            out.extend(items.iter().map(|item| Planned {
                to: to.clone(),
                ty: each.notification,
                data: to_json(item, Keys::Snake),
            }));
        }
    }
    Ok(out)
}

/// Platform message ids 250–255 → `state` (contract section 5, `off_hook`).
fn off_hook(value: &Avro, data: &mut Json) -> Result<(), EventError> {
    let id =
        field_i64(value, "messageId").ok_or_else(|| EventError::Unmappable("OffHookEvent needs messageId".into()))?;
    let flag = |name: &str| {
        field_bool(value, name)
            .ok_or_else(|| EventError::Unmappable(format!("OffHookEvent messageId {id} needs the boolean `{name}`")))
    };
    let state = match id {
        250 => {
            if flag("enabled")? {
                "enabled"
            } else {
                "disabled"
            }
        }
        251 => "answered",
        252 => "dropped",
        253 => "rejected",
        254 => {
            if flag("connected")? {
                "connected"
            } else {
                "disconnected"
            }
        }
        255 => {
            if flag("success")? {
                "authenticated"
            } else {
                "authentication_failed"
            }
        }
        other => return Err(EventError::Unmappable(format!("OffHookEvent messageId {other} is not one of 250-255"))),
    };
    if let Json::Object(obj) = data {
        if state != "authenticated" {
            obj.remove("media_resource_id");
        }
        obj.remove("timeout");
        obj.insert("state".into(), Json::String(state.into()));
    }
    Ok(())
}

pub const PHONE_VALIDATION_STATES: [&str; 6] = ["offering", "answered", "verified", "invalid", "rejected", "dropped"];

fn phone_validation(value: &Avro, data: &mut Json) -> Result<(), EventError> {
    let state = field_str(value, "state").unwrap_or_default();
    if !PHONE_VALIDATION_STATES.contains(&state) {
        return Err(EventError::Unmappable(format!(
            "PhoneValidationEvent state `{state}` is not one of {}",
            PHONE_VALIDATION_STATES.join(", ")
        )));
    }
    if state != "offering" {
        if let Json::Object(obj) = data {
            obj.remove("timeout");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(record: &str, value: Json) -> Result<Vec<Planned>, EventError> {
        let set = SchemaSet::load(None).expect("default set");
        let (r, m) = set.event(record).expect("mapped");
        let v = set.build(r, value.as_object().expect("object")).map_err(EventError::Invalid)?;
        plan(record, m, &v)
    }

    #[test]
    fn phone_validation_keeps_timeout_only_when_offering() {
        let p = |state: &str| {
            planned("PhoneValidationEvent", json!({"tenantGuid":"t","agentGuid":"a","state":state,"timeout":30}))
        };
        assert_eq!(p("offering").expect("ok")[0].data["timeout"], 30);
        assert!(p("answered").expect("ok")[0].data.get("timeout").is_none());
        assert!(p("bogus").is_err());
    }

    #[test]
    fn interaction_list_expands_in_order_and_provisioning_is_tenant_wide() {
        let items =
            json!([{"interactionId":"i1","state":"s","channel":"c"},{"interactionId":"i2","state":"s","channel":"c"}]);
        let out = planned("AgentInteractionListEvent", json!({"tenantGuid":"t","agentGuid":"a","interactions":items}))
            .expect("ok");
        let types: Vec<_> = out.iter().map(|p| p.ty).collect();
        assert_eq!(
            types,
            [
                NotificationType::InteractionsList,
                NotificationType::AgentInteraction,
                NotificationType::AgentInteraction
            ]
        );
        assert_eq!(out[2].data["interaction_id"], "i2");
        let out = planned("QueueDeletedEvent", json!({"tenantGuid":"t","queueId":"q"})).expect("ok");
        assert_eq!(out[0].to, Target::Tenant { tenant: "t".into() });
        assert_eq!(out[0].data["event_type"], "QueueDeletedEvent");
    }
}
