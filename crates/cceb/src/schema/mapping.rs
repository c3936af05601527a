//! `mapping.toml`: which event record becomes which notification, for whom.

use super::{file_error, Record, RecordKind, SchemaError};
use apache_avro::schema::Schema;
use cceb_protocol::NotificationType;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// The sessions of the record's (tenantGuid, agentGuid).
    Agent,
    /// Every session of the record's tenantGuid.
    Tenant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    OffHook,
    PhoneValidation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectoryChange {
    AgentAdded,
    AgentUpdated,
    AgentDeleted,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Each {
    pub field: String,
    pub notification: NotificationType,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventMapping {
    pub notification: NotificationType,
    pub to: Audience,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub each: Option<Each>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<DirectoryChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_accept: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    events: BTreeMap<String, EventMapping>,
}

pub(super) fn load(
    path: &str,
    text: &str,
    records: &HashMap<String, Record>,
) -> Result<HashMap<String, EventMapping>, SchemaError> {
    let file: MappingFile = toml::from_str(text).map_err(|e| file_error(path, e.to_string()))?;
    let problem = |record: &str, msg: String| file_error(path, format!("[events.{record}]: {msg}"));
    for (name, m) in &file.events {
        let record = records
            .get(name)
            .filter(|r| r.kind == RecordKind::Event)
            .ok_or_else(|| problem(name, "no such record under events/".into()))?;
        if m.to == Audience::Agent && !record.has_field("agentGuid") {
            return Err(problem(name, "to = \"agent\" needs an `agentGuid` field in the record".into()));
        }
        if let Some(each) = &m.each {
            let i = record.schema.lookup.get(&each.field).copied();
            let is_array = i.is_some_and(|i| matches!(&record.schema.fields[i].schema, Schema::Array(_)));
            if !is_array {
                return Err(problem(name, format!("each.field `{}` is not an array field of the record", each.field)));
            }
        }
        let needs = |fields: &[&str], what: &str| -> Result<(), SchemaError> {
            match fields.iter().find(|f| !record.has_field(f)) {
                Some(f) => Err(problem(name, format!("{what} needs a `{f}` field in the record"))),
                None => Ok(()),
            }
        };
        match m.transform {
            Some(Transform::OffHook) => needs(&["messageId"], "transform = \"off_hook\"")?,
            Some(Transform::PhoneValidation) => needs(&["state"], "transform = \"phone_validation\"")?,
            None => {}
        }
        match m.directory {
            Some(DirectoryChange::AgentAdded) => needs(&["agentGuid", "contactId"], "directory = \"agent_added\"")?,
            Some(DirectoryChange::AgentUpdated) => needs(&["agentGuid", "deltas"], "directory = \"agent_updated\"")?,
            Some(DirectoryChange::AgentDeleted) => needs(&["agentGuid"], "directory = \"agent_deleted\"")?,
            None => {}
        }
        if m.auto_accept.is_some() {
            needs(&["interactionId", "state", "agentGuid"], "auto_accept")?;
        }
    }
    if let Some(r) = records.values().find(|r| r.kind == RecordKind::Event && !file.events.contains_key(r.name())) {
        return Err(file_error(
            path,
            format!("event record `{}` ({}) has no [events.{}] entry", r.name(), r.file, r.name()),
        ));
    }
    Ok(file.events.into_iter().collect())
}
