//! The AsyncAPI 3.0 document of the client WebSocket (`GET /v1/asyncapi.json`,
//! `cceb asyncapi`, `docs/asyncapi.json`), generated from the loaded schema set
//! and mapping plus the contract's constants. Pure: a `SchemaSet` in, a JSON
//! value out.
//!
//! The document describes the bridge: `receive` operations are the frames a
//! client sends, `send` operations the frames the bridge sends. AsyncAPI has
//! no notion of WebSocket close codes: they are listed in the channel's
//! `x-close-codes` extension (and its description, for tools that ignore
//! extensions).
//!
//! The JSON schemas describe the JSON on the wire, as `schema::convert` makes
//! and reads it: action details keep the Avro field names (camelCase), a field
//! is required when it has no default, a union with null also takes `null`,
//! unknown keys are refused; notification data has snake_case keys and leaves
//! out null fields, so a field of a union with null is optional and never null.

use crate::actions::{CONTACT_FIELDS, RESERVED_FIELDS};
use crate::notify::PHONE_VALIDATION_STATES;
use crate::schema::convert::{snake_case, Names};
use crate::schema::{DirectoryChange, Record, SchemaSet, Transform};
use apache_avro::schema::{RecordSchema, Schema};
use cceb_protocol::{close, incoming::MAX_UUID_LEN, ErrorCode, NotificationType};
use serde_json::{json, Map, Value as Json};
use std::collections::BTreeMap;

/// The version of the wire contract (`../shared/PROTOCOL.md`) described.
pub const API_VERSION: &str = "1.0.0";

/// Every close code the bridge uses and what it means (contract section 7,
/// docs/PROTOCOL.md section 1).
pub const CLOSE_CODES: [(u16, &str); 11] = [
    (close::NORMAL, "normal closure, after `end_session`"),
    (close::GOING_AWAY, "heartbeat timeout (silent for three heartbeat intervals) or a client that does not read"),
    (close::UNSUPPORTED_DATA, "a binary frame was received"),
    (close::MESSAGE_TOO_BIG, "a frame over the size limit was received"),
    (close::SERVICE_RESTART, "server restarting or draining, sessions unavailable, or (short-lived, in a cluster) notifications lost between nodes: reconnect (through discovery) with `session_key`"),
    (close::UNAUTHORIZED, "not authenticated or unauthorized"),
    (close::TOKEN_EXPIRED, "the token expired: reconnect with a fresh token (and `session_key`)"),
    (close::HELLO_TIMEOUT, "no `hello` in time"),
    (close::TOO_MANY_UNACKED, "too many unacknowledged notifications"),
    (close::TAKEN_OVER, "the session was taken over by another connection"),
    (close::TOO_MANY_SESSIONS, "too many long-lived sessions for this agent, all connected"),
];

/// `off_hook` `data.state` values (contract section 5); `offering` is the
/// bridge's own, the others come from platform message ids 250–255.
pub const OFF_HOOK_STATES: [&str; 9] = [
    "enabled",
    "disabled",
    "answered",
    "dropped",
    "rejected",
    "connected",
    "disconnected",
    "authenticated",
    "authentication_failed",
];

const CHANNEL: &str = "bridge";

/// How an Avro schema becomes a JSON schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// What a client sends (`action_details`): Avro field names, required
    /// unless defaulted, nullable unions take null, unknown keys refused.
    Input,
    /// What a client receives (notification `data`): snake_case keys, null
    /// fields left out.
    Output,
}

/// The AsyncAPI 3.0 document of the bridge running `set`.
pub fn document(set: &SchemaSet) -> Json {
    let mut messages = Map::new();
    let mut client_msgs: BTreeMap<&str, Vec<String>> = BTreeMap::new();

    // Frames a client sends.
    messages.insert("hello".into(), message("hello", "Authenticate (the first frame)", None, hello_payload(), true));
    client_msgs.entry("hello").or_default().push("hello".into());
    let mut actions: Vec<&Record> = set.action_names().filter_map(|n| set.action(n)).collect();
    actions.sort_by(|a, b| a.name().cmp(b.name()));
    for record in &actions {
        let key = format!("action.{}", record.name());
        let summary = format!("Action `{}`", record.name());
        messages.insert(
            key.clone(),
            message("action", &summary, record.schema.doc.as_deref(), action_payload(record, set.names()), true),
        );
        client_msgs.entry("action").or_default().push(key);
    }
    for (ty, summary) in [
        ("ack", "Acknowledge a notification (its uuid)"),
        ("ping", "Application-level ping; answered with `pong`"),
        ("end_session", "End the session (long-lived: mailbox dropped); acked, then close 1000"),
    ] {
        let key = format!("client.{ty}");
        messages.insert(key.clone(), message(ty, summary, None, bare_frame(ty, None), ty != "ack"));
        client_msgs.entry(ty).or_default().push(key);
    }

    // Frames the bridge sends.
    messages.insert(
        "hello_reply".into(),
        message("hello_reply", "The session the client got", None, hello_reply_payload(), true),
    );
    messages.insert(
        "ack".into(),
        message("ack", "An action was durably accepted, or `end_session` done", None, bare_frame("ack", None), true),
    );
    messages.insert("pong".into(), message("pong", "The answer to `ping`", None, bare_frame("pong", None), true));
    messages.insert(
        "error".into(),
        message("error", "A refused frame, by contract code", Some(&error_codes_table()), error_payload(), true),
    );
    let notifications = notification_payloads(set);
    for (ty, (payload, description)) in &notifications {
        let key = format!("notification.{ty}");
        let summary = format!("Notification `{ty}`; the client answers with `ack`");
        messages.insert(key, message(ty, &summary, Some(description), notification_frame(ty, payload.clone()), false));
    }

    // The channel lists every message; operations point into it.
    let channel_messages: Map<String, Json> = messages
        .keys()
        .map(|k| (k.clone(), json!({"$ref": format!("#/components/messages/{}", escape_pointer(k))})))
        .collect();
    let refs =
        |keys: &[&str]| -> Json { keys.iter().map(|k| json!({"$ref": channel_ref(k)})).collect::<Vec<_>>().into() };
    fn owned(keys: &[String]) -> Vec<&str> {
        keys.iter().map(String::as_str).collect()
    }
    let channel = json!({"$ref": format!("#/channels/{CHANNEL}")});
    let receive = |keys: Json, summary: &str, reply: Option<Json>| {
        let mut op = json!({"action": "receive", "channel": channel, "summary": summary, "messages": keys});
        if let Some(reply_msgs) = reply {
            op["reply"] = json!({"channel": channel, "messages": reply_msgs});
        }
        op
    };
    let notification_keys: Vec<String> = notifications.keys().map(|t| format!("notification.{t}")).collect();
    let empty = Vec::new();
    let operations = json!({
        "hello": receive(refs(&owned(client_msgs.get("hello").unwrap_or(&empty))),
            "A client authenticates; the bridge replies `hello_reply`, or `error` and a close",
            Some(refs(&["hello_reply", "error"]))),
        "action": receive(refs(&owned(client_msgs.get("action").unwrap_or(&empty))),
            "A client performs an action: one message per action record; `ack` once the bus accepted it, else `error`",
            Some(refs(&["ack", "error"]))),
        "ack": receive(refs(&["client.ack"]), "A client acknowledges a notification (no reply)", None),
        "ping": receive(refs(&["client.ping"]), "A client pings", Some(refs(&["pong"]))),
        "end_session": receive(refs(&["client.end_session"]), "A client ends its session",
            Some(refs(&["ack", "error"]))),
        "notifications": {
            "action": "send", "channel": channel,
            "summary": "The bridge delivers notifications (each with a per-session `seq`), to be acknowledged with `ack`",
            "messages": refs(&owned(&notification_keys)),
        },
        "errors": {
            "action": "send", "channel": channel,
            "summary": "The bridge answers a frame it cannot read (`invalid_json`, `invalid_message`, `unknown_type`, `not_authenticated`)",
            "messages": refs(&["error"]),
        },
    });

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "CCEB client WebSocket",
            "version": API_VERSION,
            "description": "The Client Connector Events Bridge as agent clients see it: one WebSocket \
                (`/ws/v1`, found through `GET /v1/discovery`), text frames of UTF-8 JSON, one message per frame, \
                each an envelope `{type, uuid, data}`. Generated from the schema set and mapping the bridge runs \
                with (`GET /v1/schemas`). This document describes the bridge: `receive` operations are what a \
                client sends, `send` operations what the bridge sends. Close codes: the channel's `x-close-codes`.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "bridge": {
                "host": "{host}",
                "protocol": "ws",
                "description": "The bridge's public listener; `GET /v1/discovery` hands out the endpoint to use \
                    (`wss` behind TLS).",
                "variables": {"host": {"default": "127.0.0.1:8080", "description": "host and port of the public listener"}},
            }
        },
        "channels": {
            CHANNEL: {
                "address": "/ws/v1",
                "title": "Agent connection",
                "description": close_codes_description(),
                "messages": channel_messages,
                "x-close-codes": close_codes(),
                "bindings": {"ws": {"method": "GET", "bindingVersion": "0.1.0"}},
            }
        },
        "operations": operations,
        "components": {"messages": messages},
    })
}

fn channel_ref(key: &str) -> String {
    format!("#/channels/{CHANNEL}/messages/{}", escape_pointer(key))
}

/// JSON pointer escaping of one reference token.
fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn message(name: &str, summary: &str, description: Option<&str>, payload: Json, correlated: bool) -> Json {
    let mut m = json!({"name": name, "title": name, "summary": summary, "payload": payload});
    if let Some(d) = description {
        m["description"] = d.into();
    }
    if correlated {
        m["correlationId"] = json!({
            "description": "A reply carries the uuid of the frame it answers",
            "location": "$message.payload#/uuid",
        });
    }
    m
}

fn uuid_schema() -> Json {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_UUID_LEN,
        "description": format!("Chosen by the sender of the message: any non-empty string of at most {MAX_UUID_LEN} bytes")})
}

/// An envelope `{type, uuid, data?}`; unknown extra keys are ignored by both sides.
fn envelope(ty: &str, data: Option<Json>, data_required: bool) -> Json {
    let mut properties = Map::new();
    properties.insert("type".into(), json!({"const": ty}));
    properties.insert("uuid".into(), uuid_schema());
    let mut required = vec![json!("type"), json!("uuid")];
    if let Some(d) = data {
        properties.insert("data".into(), d);
        if data_required {
            required.push(json!("data"));
        }
    }
    json!({"type": "object", "properties": properties, "required": required})
}

fn bare_frame(ty: &str, data: Option<Json>) -> Json {
    envelope(ty, data, false)
}

fn object(properties: Vec<(&str, Json)>, required: &[&str]) -> Json {
    let properties: Map<String, Json> = properties.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    json!({"type": "object", "properties": properties, "required": required})
}

fn hello_payload() -> Json {
    let data = object(
        vec![
            ("token", json!({"type": "string", "description": "The client's JWT"})),
            (
                "tenant_guid",
                json!({"type": ["string", "null"], "description": "The tenant logged into; must be the token's"}),
            ),
            ("long_lived", json!({"type": ["boolean", "null"], "default": false})),
            (
                "session_key",
                json!({"type": ["string", "null"], "description": "Resume the long-lived session of this key"}),
            ),
            ("auto_accept", json!({"type": ["boolean", "null"], "default": false})),
            (
                "push",
                json!({"oneOf": [
                    object(vec![("provider", json!({"type": "string", "description": "`webhook`; others are ignored"})),
                        ("token", json!({"type": "string", "description": "The device token"}))], &["provider", "token"]),
                    {"type": "null"}]}),
            ),
            (
                "client",
                json!({"oneOf": [
                    object(vec![("name", json!({"type": ["string", "null"]})), ("version", json!({"type": ["string", "null"]}))], &[]),
                    {"type": "null"}]}),
            ),
        ],
        &["token"],
    );
    envelope("hello", Some(data), true)
}

fn hello_reply_payload() -> Json {
    let string = || json!({"type": "string"});
    let data = object(
        vec![
            ("session_id", string()),
            ("session_key", json!({"type": ["string", "null"], "description": "Long-lived sessions only; opaque"})),
            ("resumed", json!({"type": "boolean"})),
            ("long_lived", json!({"type": "boolean"})),
            ("auto_accept", json!({"type": "boolean"})),
            ("session_ttl_seconds", json!({"type": "integer", "minimum": 0})),
            ("heartbeat_interval_seconds", json!({"type": "integer", "minimum": 0})),
            (
                "agent",
                object(
                    vec![("tenant_guid", string()), ("agent_guid", string()), ("ir_instance", string())],
                    &["tenant_guid", "agent_guid", "ir_instance"],
                ),
            ),
            (
                "dropped",
                json!({"type": "integer", "minimum": 0,
                    "description": "On resume only: notifications the mailbox dropped while the client was away"}),
            ),
        ],
        &[
            "session_id",
            "session_key",
            "resumed",
            "long_lived",
            "auto_accept",
            "session_ttl_seconds",
            "heartbeat_interval_seconds",
            "agent",
        ],
    );
    envelope("hello_reply", Some(data), true)
}

fn error_payload() -> Json {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let data = object(
        vec![
            ("code", json!({"type": "string", "enum": codes})),
            ("message", json!({"type": "string"})),
            (
                "field",
                json!({"type": "string",
                    "description": "The offending envelope key or Avro field path (`data.token`, `interactions[2].state`)"}),
            ),
        ],
        &["code", "message"],
    );
    envelope("error", Some(data), true)
}

fn error_codes_table() -> String {
    let mut s = String::from("`data.code` is one of:\n\n");
    for c in ErrorCode::ALL {
        s.push_str(&format!("- `{c}`\n"));
    }
    s.push_str("\nThe `uuid` is the offending frame's, or a new one when it could not be read.");
    s
}

fn close_codes() -> Json {
    CLOSE_CODES.iter().map(|(code, meaning)| json!({"code": code, "meaning": meaning})).collect::<Vec<_>>().into()
}

fn close_codes_description() -> String {
    let mut s = String::from(
        "One connection per agent session. `hello` first, then actions and acks in any order; \
         notifications arrive with a per-session `seq`.\n\nClose codes:\n\n| code | meaning |\n|---|---|\n",
    );
    for (code, meaning) in CLOSE_CODES {
        s.push_str(&format!("| {code} | {meaning} |\n"));
    }
    s
}

/// `action.<record>`: `data.action` names the record, `data.action_details` its fields.
fn action_payload(record: &Record, names: &Names) -> Json {
    let mut details = record_schema(&record.schema, View::Input, names, &mut Vec::new());
    let mut required: Vec<String> = details["required"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let mut alternatives = Vec::new();
    if let Some(props) = details["properties"].as_object_mut() {
        for f in RESERVED_FIELDS {
            props.remove(f);
        }
        for (contact, guid) in CONTACT_FIELDS {
            if !props.contains_key(guid) {
                continue;
            }
            props.insert(
                contact.into(),
                json!({"type": "string", "description": format!(
                    "A contact id of an agent of the caller's tenant; the bridge sets `{guid}` to that agent's GUID"
                )}),
            );
            if required.iter().any(|r| r == guid) {
                required.retain(|r| r != guid);
                alternatives.push(json!({"oneOf": [{"required": [guid]}, {"required": [contact]}]}));
            } else {
                alternatives.push(json!({"not": {"required": [guid, contact]}}));
            }
        }
    }
    required.retain(|r| !RESERVED_FIELDS.contains(&r.as_str()));
    let needs_details = !required.is_empty() || alternatives.iter().any(|a| a.get("oneOf").is_some());
    details["required"] = required.into();
    if !alternatives.is_empty() {
        details["allOf"] = alternatives.into();
    }
    let mut description = String::from("The record's fields (Avro names); the bridge sets ");
    description.push_str(&RESERVED_FIELDS.map(|f| format!("`{f}`")).join(", "));
    description.push_str(" itself, and refuses them here (`reserved_field`).");
    details["description"] = description.into();
    let data = object(
        vec![
            ("action", json!({"const": record.name()})),
            ("action_details", details),
            (
                "traceparent",
                json!({"type": ["string", "null"],
                    "pattern": concat!(
                        "^(?:00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}",
                        "|(?!00|ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?)$"
                    ),
                    "description": "W3C Trace Context, carried to the published record's `traceparent` header; \
                        an invalid one refuses the action (`invalid_action_details`, field `data.traceparent`)"}),
            ),
        ],
        if needs_details { &["action", "action_details"] } else { &["action"] },
    );
    envelope("action", Some(data), true)
}

fn notification_frame(ty: &str, payload: Json) -> Json {
    let mut f = envelope(ty, Some(payload), true);
    f["properties"]["seq"] = json!({"type": "integer", "minimum": 1,
        "description": "Per session, strictly increasing in delivery order; kept on redelivery"});
    if let Some(r) = f["required"].as_array_mut() {
        r.push(json!("seq"));
    }
    f
}

/// Every notification type with its `data` schema and a description of where
/// it comes from, in the contract's order.
fn notification_payloads(set: &SchemaSet) -> BTreeMap<&'static str, (Json, String)> {
    let mut sources: BTreeMap<&'static str, Vec<(Json, String)>> = BTreeMap::new();
    let mut events: Vec<_> = set.event_names().filter_map(|n| set.event(n)).collect();
    events.sort_by(|a, b| a.0.name().cmp(b.0.name()));
    let names = set.names();
    for (record, mapping) in events {
        let ty = mapping.notification.as_str();
        let mut data = record_schema(&record.schema, View::Output, names, &mut Vec::new());
        match mapping.transform {
            Some(Transform::OffHook) => {
                data["properties"]["state"] = json!({"type": "string", "enum": OFF_HOOK_STATES});
                push_required(&mut data, "state");
                if let Some(p) = data["properties"].as_object_mut() {
                    p.remove("timeout");
                    if let Some(m) = p.get_mut("media_resource_id") {
                        m["description"] = "Present only when `state` is `authenticated`".into();
                    }
                }
            }
            Some(Transform::PhoneValidation) => {
                data["properties"]["state"] = json!({"type": "string", "enum": PHONE_VALIDATION_STATES});
                if let Some(t) = data["properties"].get_mut("timeout") {
                    t["description"] = "Present only when `state` is `offering`".into();
                }
            }
            None => {}
        }
        if mapping.notification == NotificationType::Provisioning {
            data["properties"]["event_type"] = json!({"const": record.name()});
            push_required(&mut data, "event_type");
        }
        let to = match mapping.to {
            crate::schema::Audience::Agent => "the agent's sessions",
            crate::schema::Audience::Tenant => "every session of the tenant",
        };
        sources.entry(ty).or_default().push((data, format!("`{}` (to {to})", record.name())));
        if let Some(each) = &mapping.each {
            let item =
                record.schema.lookup.get(&each.field).map(|&i| &record.schema.fields[i].schema).and_then(|s| match s {
                    Schema::Array(a) => Some(schema_json(&a.items, View::Output, names, &mut Vec::new())),
                    _ => None,
                });
            if let Some(item) = item {
                let from = format!("each element of `{}.{}`, after `{ty}` (to {to})", record.name(), each.field);
                sources.entry(each.notification.as_str()).or_default().push((item, from));
            }
        }
        if mapping.directory == Some(DirectoryChange::AgentUpdated) {
            let data = object(
                vec![("recording_controls", json!({"type": "integer", "enum": [0, 1, 2]}))],
                &["recording_controls"],
            );
            let from = format!("`{}` changing `recordingControls` (to that agent alone)", record.name());
            sources.entry(NotificationType::AgentPhoneUpdate.as_str()).or_default().push((data, from));
        }
    }
    // The bridge's own off-hook offer (an off-hook agent becoming Available).
    sources.entry(NotificationType::OffHook.as_str()).or_default().push((
        json!({"type": "object", "properties": {"state": {"const": "offering"},
            "timeout": {"type": "integer", "minimum": 0, "description": "Seconds"}},
            "required": ["state", "timeout"], "additionalProperties": false}),
        "the bridge, when an off-hook agent sends `ChangeAgentStateEvent` `Available`".into(),
    ));
    NotificationType::ALL
        .iter()
        .map(|t| {
            let ty = t.as_str();
            let (schema, description) = match sources.remove(ty) {
                None => (
                    json!({"type": "object"}),
                    "Not produced by the loaded mapping: no event record maps to it.".to_owned(),
                ),
                Some(mut list) if list.len() == 1 => {
                    let (s, from) = list.remove(0);
                    (s, format!("From {from}."))
                }
                Some(list) => {
                    let from: Vec<String> = list.iter().map(|(_, f)| format!("- {f}")).collect();
                    let schemas: Vec<Json> = list.into_iter().map(|(s, _)| s).collect();
                    (json!({"oneOf": schemas}), format!("From one of:\n\n{}", from.join("\n")))
                }
            };
            (ty, (schema, description))
        })
        .collect()
}

fn push_required(schema: &mut Json, field: &str) {
    if let Some(r) = schema["required"].as_array_mut() {
        if !r.iter().any(|v| v == field) {
            r.push(field.into());
        }
    }
}

/// A record as a JSON schema object.
pub fn record_schema(r: &RecordSchema, view: View, names: &Names, seen: &mut Vec<String>) -> Json {
    let full = r.name.fullname(None);
    seen.push(full);
    let mut properties = Map::new();
    let mut required = Vec::new();
    for f in &r.fields {
        let nullable = matches!(&f.schema, Schema::Union(u) if u.variants().iter().any(|v| matches!(v, Schema::Null)));
        let (key, mut s) = match view {
            View::Input => (f.name.clone(), schema_json(&f.schema, view, names, seen)),
            // A null field is left out: the key is optional and never null.
            View::Output => (snake_case(&f.name), non_null(&f.schema, names, seen)),
        };
        if let Some(doc) = &f.doc {
            s["description"] = doc.clone().into();
        }
        match view {
            View::Input => match &f.default {
                Some(d) => s["default"] = d.clone(),
                None => required.push(key.clone()),
            },
            View::Output if !nullable => required.push(key.clone()),
            View::Output => {}
        }
        properties.insert(key, s);
    }
    seen.pop();
    let mut out = json!({"type": "object", "properties": properties, "required": required});
    if view == View::Input {
        out["additionalProperties"] = false.into();
    }
    if let Some(doc) = &r.doc {
        out["description"] = doc.clone().into();
    }
    out
}

/// The schema of a field whose null is left out (output view).
fn non_null(schema: &Schema, names: &Names, seen: &mut Vec<String>) -> Json {
    match schema {
        Schema::Union(u) => {
            let variants: Vec<&Schema> = u.variants().iter().filter(|v| !matches!(v, Schema::Null)).collect();
            match variants.as_slice() {
                [one] => schema_json(one, View::Output, names, seen),
                many => {
                    json!({"anyOf": many.iter().map(|v| schema_json(v, View::Output, names, seen)).collect::<Vec<_>>()})
                }
            }
        }
        other => schema_json(other, View::Output, names, seen),
    }
}

fn integer(format: &str, description: Option<&str>) -> Json {
    let mut s = json!({"type": "integer", "format": format});
    if format == "int32" {
        s["minimum"] = i32::MIN.into();
        s["maximum"] = i32::MAX.into();
    }
    if let Some(d) = description {
        s["description"] = d.into();
    }
    s
}

/// Any Avro schema as a JSON schema, in `view`.
pub fn schema_json(schema: &Schema, view: View, names: &Names, seen: &mut Vec<String>) -> Json {
    match schema {
        Schema::Null => json!({"type": "null"}),
        Schema::Boolean => json!({"type": "boolean"}),
        Schema::Int => integer("int32", None),
        Schema::Long => integer("int64", None),
        Schema::Date => integer("int32", Some("Avro date: days since the Unix epoch")),
        Schema::TimeMillis => integer("int32", Some("Avro time-millis: milliseconds after midnight")),
        Schema::TimeMicros => integer("int64", Some("Avro time-micros: microseconds after midnight")),
        Schema::TimestampMillis => integer("int64", Some("Avro timestamp-millis: milliseconds since the Unix epoch")),
        Schema::TimestampMicros => integer("int64", Some("Avro timestamp-micros: microseconds since the Unix epoch")),
        Schema::TimestampNanos => integer("int64", Some("Avro timestamp-nanos: nanoseconds since the Unix epoch")),
        Schema::LocalTimestampMillis => integer("int64", Some("Avro local-timestamp-millis: local milliseconds")),
        Schema::LocalTimestampMicros => integer("int64", Some("Avro local-timestamp-micros: local microseconds")),
        Schema::LocalTimestampNanos => integer("int64", Some("Avro local-timestamp-nanos: local nanoseconds")),
        Schema::Float => json!({"type": "number", "format": "float"}),
        Schema::Double => json!({"type": "number", "format": "double"}),
        Schema::String => json!({"type": "string"}),
        Schema::Bytes => json!({"type": "string", "description": "Avro bytes: the string's UTF-8 bytes"}),
        Schema::Uuid => json!({"type": "string", "format": "uuid"}),
        Schema::Fixed(f) => json!({"type": "string", "minLength": f.size, "maxLength": f.size,
            "description": format!("Avro fixed `{}`: exactly {} bytes", f.name.name, f.size)}),
        Schema::Enum(e) => {
            let mut s = json!({"type": "string", "enum": e.symbols});
            if let Some(doc) = &e.doc {
                s["description"] = doc.clone().into();
            }
            s
        }
        Schema::Array(a) => json!({"type": "array", "items": schema_json(&a.items, view, names, seen)}),
        Schema::Map(m) => json!({"type": "object", "additionalProperties": schema_json(&m.types, view, names, seen),
            "description": "Keys as the backend sent them"}),
        Schema::Record(r) => {
            if seen.contains(&r.name.fullname(None)) {
                return json!({"type": "object", "description": format!("A `{}` (recursive)", r.name.name)});
            }
            record_schema(r, view, names, seen)
        }
        Schema::Union(u) => {
            let has_null = u.variants().iter().any(|v| matches!(v, Schema::Null));
            let others: Vec<Json> = u
                .variants()
                .iter()
                .filter(|v| !matches!(v, Schema::Null))
                .map(|v| schema_json(v, view, names, seen))
                .collect();
            // In the output view a null inside an array or map stays null.
            match (others.len(), has_null) {
                (0, _) => json!({"type": "null"}),
                (1, false) => others.into_iter().next().unwrap_or_default(),
                (1, true) => nullable(others.into_iter().next().unwrap_or_default()),
                (_, false) => json!({"anyOf": others}),
                (_, true) => json!({"anyOf": others.into_iter().chain([json!({"type": "null"})]).collect::<Vec<_>>()}),
            }
        }
        Schema::Ref { name } => match names.get(&name.fullname(None)) {
            Some(target) if !seen.contains(&name.fullname(None)) => schema_json(target, view, names, seen),
            _ => json!({"type": "object", "description": format!("A `{}`", name.name)}),
        },
        Schema::Decimal(_) | Schema::BigDecimal | Schema::Duration => {
            json!({"description": "An Avro decimal or duration: the bridge cannot convert it"})
        }
    }
}

/// `T` or null: `{"type": [T, "null"]}` for a plain type, else `anyOf`.
fn nullable(mut s: Json) -> Json {
    let plain = s.get("type").and_then(Json::as_str).map(str::to_owned);
    match plain {
        Some(t) if s.get("enum").is_none() && s.get("const").is_none() => {
            s["type"] = json!([t, "null"]);
            s
        }
        _ => json!({"anyOf": [s, {"type": "null"}]}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> SchemaSet {
        SchemaSet::load(None).expect("default set")
    }

    fn field_of(avsc: &str, view: View) -> Json {
        let Schema::Record(r) = Schema::parse_str(avsc).expect("schema") else { panic!("not a record") };
        record_schema(&r, view, &Names::new(), &mut Vec::new())
    }

    #[test]
    fn every_action_record_and_every_notification_type_has_a_message() {
        let set = set();
        let doc = document(&set);
        let messages = doc["components"]["messages"].as_object().expect("messages");
        let mut actions = 0;
        for name in set.action_names() {
            let m = &messages[&format!("action.{name}")];
            assert_eq!(m["payload"]["properties"]["data"]["properties"]["action"]["const"], name);
            actions += 1;
        }
        assert_eq!(actions, 36);
        assert_eq!(doc["operations"]["action"]["messages"].as_array().expect("refs").len(), 36);
        for t in NotificationType::ALL {
            let m = &messages[&format!("notification.{t}")];
            assert_eq!(m["payload"]["properties"]["type"]["const"], t.as_str(), "{t}");
            let description = m["description"].as_str().expect("description");
            assert!(!description.starts_with("Not produced"), "{t}: {description}");
        }
        for ty in ["hello", "client.ack", "client.ping", "client.end_session", "hello_reply", "ack", "pong", "error"] {
            assert!(messages.contains_key(ty), "{ty}");
        }
        // Every channel message is a component, every operation message in the channel.
        let channel = doc["channels"][CHANNEL]["messages"].as_object().expect("channel");
        assert_eq!(channel.len(), messages.len());
        for op in doc["operations"].as_object().expect("operations").values() {
            let all = op["messages"].as_array().into_iter().chain(op["reply"]["messages"].as_array()).flatten();
            for m in all {
                let key = m["$ref"].as_str().and_then(|r| r.strip_prefix("#/channels/bridge/messages/"));
                assert!(key.is_some_and(|k| channel.contains_key(k)), "{m}");
            }
        }
        let codes: Vec<u64> = doc["channels"][CHANNEL]["x-close-codes"]
            .as_array()
            .expect("codes")
            .iter()
            .filter_map(|c| c["code"].as_u64())
            .collect();
        assert_eq!(codes, [1000, 1001, 1003, 1009, 1012, 4001, 4002, 4003, 4004, 4005, 4006]);
        let errors = &messages["error"]["payload"]["properties"]["data"]["properties"]["code"]["enum"];
        assert_eq!(errors.as_array().expect("codes").len(), ErrorCode::ALL.len());
    }

    #[test]
    fn a_nullable_union_is_null_or_the_type_in_input_and_optional_never_null_in_output() {
        let avsc = r#"{"type":"record","name":"R","fields":[
            {"name":"mediaResourceId","type":["null","string"],"default":null,"doc":"d"},
            {"name":"count","type":"int"}]}"#;
        assert_eq!(
            field_of(avsc, View::Input),
            json!({"type": "object", "additionalProperties": false, "required": ["count"], "properties": {
                "mediaResourceId": {"type": ["string", "null"], "default": null, "description": "d"},
                "count": {"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX}}})
        );
        assert_eq!(
            field_of(avsc, View::Output),
            json!({"type": "object", "required": ["count"], "properties": {
                "media_resource_id": {"type": "string", "description": "d"},
                "count": {"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX}}})
        );
    }

    #[test]
    fn enums_arrays_maps_and_logical_types_convert() {
        let avsc = r#"{"type":"record","name":"R","doc":"A record","fields":[
            {"name":"kind","type":{"type":"enum","name":"K","symbols":["A","B"]}},
            {"name":"items","type":{"type":"array","items":{"type":"record","name":"I","fields":[{"name":"lineId","type":"long"}]}}},
            {"name":"tags","type":{"type":"map","values":"string"},"default":{}},
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"maybe","type":["null",{"type":"enum","name":"M","symbols":["X"]}],"default":null}]}"#;
        let input = field_of(avsc, View::Input);
        assert_eq!(input["description"], "A record");
        assert_eq!(input["properties"]["kind"], json!({"type": "string", "enum": ["A", "B"]}));
        assert_eq!(
            input["properties"]["items"],
            json!({"type": "array", "items": {"type": "object", "additionalProperties": false, "required": ["lineId"],
                "properties": {"lineId": {"type": "integer", "format": "int64"}}}})
        );
        assert_eq!(input["properties"]["tags"]["additionalProperties"], json!({"type": "string"}));
        assert_eq!(input["properties"]["tags"]["default"], json!({}));
        assert_eq!(input["properties"]["at"]["type"], "integer");
        assert_eq!(input["properties"]["maybe"]["anyOf"][1], json!({"type": "null"}));
        assert_eq!(input["required"], json!(["kind", "items", "at"]));
        let output = field_of(avsc, View::Output);
        assert_eq!(output["properties"]["items"]["items"]["properties"]["line_id"]["type"], "integer");
        assert_eq!(output["properties"]["maybe"], json!({"type": "string", "enum": ["X"]}));
        assert_eq!(output["required"], json!(["kind", "items", "tags", "at"]));
    }

    #[test]
    fn action_details_leave_out_reserved_fields_and_take_a_contact_id_for_the_guid() {
        let doc = document(&set());
        let data = &doc["components"]["messages"]["action.BlindTransferEvent"]["payload"]["properties"]["data"];
        let details = &data["properties"]["action_details"];
        for f in RESERVED_FIELDS {
            assert!(details["properties"].get(f).is_none(), "{f}");
        }
        assert_eq!(details["required"], json!(["interactionId"]));
        assert_eq!(
            details["allOf"],
            json!([{"oneOf": [{"required": ["destinationAgentGuid"]}, {"required": ["destinationAgentContactId"]}]}])
        );
        assert_eq!(data["required"], json!(["action", "action_details"]));
    }

    #[test]
    fn notification_payloads_follow_the_mapping_and_transforms() {
        let doc = document(&set());
        let data = |t: &str| {
            doc["components"]["messages"][format!("notification.{t}")]["payload"]["properties"]["data"].clone()
        };
        let provisioning = data("provisioning");
        let variants = provisioning["oneOf"].as_array().expect("one per record");
        assert_eq!(variants.len(), 13);
        assert!(variants.iter().all(|v| v["properties"]["event_type"]["const"].is_string()));
        let off_hook = data("off_hook");
        assert_eq!(off_hook["oneOf"][0]["properties"]["state"]["enum"], json!(OFF_HOOK_STATES));
        assert_eq!(off_hook["oneOf"][1]["properties"]["state"]["const"], "offering");
        assert_eq!(data("phone_validation")["properties"]["state"]["enum"], json!(PHONE_VALIDATION_STATES));
        assert_eq!(data("agent_interaction")["required"], json!(["interaction_id", "state", "channel"]));
        assert_eq!(data("agent_phone_update")["required"], json!(["recording_controls"]));
        assert_eq!(data("interaction_update")["properties"]["interaction_id"]["type"], "string");
    }

    /// A small JSON Schema checker, for the keywords this module writes.
    fn valid(schema: &Json, v: &Json) -> Result<(), String> {
        let fail = |why: String| Err(format!("{why}: {v}"));
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Json::String(s) => vec![s.as_str()],
                Json::Array(a) => a.iter().filter_map(Json::as_str).collect(),
                _ => vec![],
            };
            let is = |t: &str| match t {
                "null" => v.is_null(),
                "boolean" => v.is_boolean(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "string" => v.is_string(),
                "array" => v.is_array(),
                "object" => v.is_object(),
                _ => false,
            };
            if !types.iter().any(|t| is(t)) {
                return fail(format!("not of type {t}"));
            }
        }
        if let Some(c) = schema.get("const") {
            if c != v {
                return fail(format!("not {c}"));
            }
        }
        if let Some(e) = schema.get("enum").and_then(Json::as_array) {
            if !e.contains(v) {
                return fail("not in the enum".into());
            }
        }
        if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Json::as_i64), v.as_i64()) {
            if n < min {
                return fail(format!("below {min}"));
            }
        }
        if let (Some(max), Some(n)) = (schema.get("maxLength").and_then(Json::as_u64), v.as_str()) {
            if n.len() as u64 > max {
                return fail(format!("longer than {max}"));
            }
        }
        if let Some(obj) = v.as_object() {
            let props = schema.get("properties").and_then(Json::as_object);
            for r in schema.get("required").and_then(Json::as_array).into_iter().flatten() {
                if !obj.contains_key(r.as_str().unwrap_or_default()) {
                    return fail(format!("missing {r}"));
                }
            }
            for (k, item) in obj {
                match props.and_then(|p| p.get(k)) {
                    Some(p) => valid(p, item).map_err(|e| format!("{k}: {e}"))?,
                    None => match schema.get("additionalProperties") {
                        Some(Json::Bool(false)) => return fail(format!("unknown key {k}")),
                        Some(s @ Json::Object(_)) => valid(s, item).map_err(|e| format!("{k}: {e}"))?,
                        _ => {}
                    },
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
            for item in arr {
                valid(items, item)?;
            }
        }
        let count = |key: &str| -> Option<usize> {
            schema.get(key).and_then(Json::as_array).map(|a| a.iter().filter(|s| valid(s, v).is_ok()).count())
        };
        if count("oneOf").is_some_and(|n| n != 1) {
            return fail("not exactly one of oneOf".into());
        }
        if count("anyOf") == Some(0) {
            return fail("none of anyOf".into());
        }
        for s in schema.get("allOf").and_then(Json::as_array).into_iter().flatten() {
            valid(s, v)?;
        }
        if schema.get("not").is_some_and(|n| valid(n, v).is_ok()) {
            return fail("matches not".into());
        }
        Ok(())
    }

    /// A JSON value of `schema`: every field (`full`) or only those without a default.
    fn sample(schema: &Schema, names: &Names, full: bool) -> Json {
        match schema {
            Schema::Null => Json::Null,
            Schema::Boolean => true.into(),
            Schema::Int | Schema::Long | Schema::Date | Schema::TimeMillis => 7.into(),
            Schema::TimestampMillis | Schema::TimeMicros | Schema::TimestampMicros => 7.into(),
            Schema::Float | Schema::Double => 1.5.into(),
            Schema::Uuid => "00000000-0000-4000-8000-000000000000".into(),
            Schema::Fixed(f) => "x".repeat(f.size).into(),
            Schema::Enum(e) => e.symbols[0].clone().into(),
            Schema::Array(a) => json!([sample(&a.items, names, full)]),
            Schema::Map(m) => json!({"someKey": sample(&m.types, names, full)}),
            Schema::Record(r) => r
                .fields
                .iter()
                .filter(|f| full || f.default.is_none())
                .map(|f| (f.name.clone(), sample(&f.schema, names, full)))
                .collect::<Map<_, _>>()
                .into(),
            Schema::Union(u) => {
                u.variants().iter().find(|v| !matches!(v, Schema::Null)).map_or(Json::Null, |v| sample(v, names, full))
            }
            Schema::Ref { name } => names.get(&name.fullname(None)).map_or(Json::Null, |s| sample(s, names, full)),
            _ => "s".into(),
        }
    }

    fn message_payload<'d>(doc: &'d Json, key: &str) -> &'d Json {
        &doc["components"]["messages"][key]["payload"]
    }

    #[test]
    fn what_the_bridge_makes_of_every_event_is_valid_against_its_notification_message() {
        let set = set();
        let doc = document(&set);
        let mut seen = std::collections::HashSet::new();
        for name in set.event_names() {
            let (record, mapping) = set.event(name).expect("event");
            for full in [false, true] {
                let mut values = vec![sample(&Schema::Record(record.schema.clone()), set.names(), full)];
                match name {
                    "OffHookEvent" => {
                        values = (250..=255)
                            .flat_map(|id| [true, false].map(|flag| (id, flag)))
                            .map(|(id, flag)| {
                                let mut v = values[0].clone();
                                v["messageId"] = id.into();
                                for f in ["enabled", "connected", "success"] {
                                    v[f] = flag.into();
                                }
                                v
                            })
                            .collect();
                    }
                    "PhoneValidationEvent" => {
                        values = PHONE_VALIDATION_STATES
                            .iter()
                            .map(|s| {
                                let mut v = values[0].clone();
                                v["state"] = (*s).into();
                                v
                            })
                            .collect();
                    }
                    _ => {}
                }
                for value in values {
                    let avro = set.build(record, value.as_object().expect("object")).expect("sample builds");
                    for planned in crate::notify::plan(name, mapping, &avro).expect("plans") {
                        let data = serde_json::to_string(&planned.data).expect("data");
                        let frame: Json =
                            serde_json::from_str(&cceb_protocol::outgoing::notification(planned.ty, "n-1", 1, &data))
                                .expect("frame");
                        let payload = message_payload(&doc, &format!("notification.{}", planned.ty));
                        valid(payload, &frame).unwrap_or_else(|e| panic!("{name} → {}: {e}", planned.ty));
                        seen.insert(planned.ty);
                    }
                }
            }
        }
        assert_eq!(seen.len(), NotificationType::ALL.len() - 1, "all but agent_phone_update (directory): {seen:?}");
        let offer = json!({"type": "off_hook", "uuid": "n", "seq": 3, "data": {"state": "offering", "timeout": 30}});
        valid(message_payload(&doc, "notification.off_hook"), &offer).expect("the bridge's own offer");
        let phone = json!({"type": "agent_phone_update", "uuid": "n", "seq": 3, "data": {"recording_controls": 2}});
        valid(message_payload(&doc, "notification.agent_phone_update"), &phone).expect("agent_phone_update");
    }

    #[test]
    fn details_valid_against_an_action_message_are_accepted_by_the_bridge_and_reserved_fields_are_not() {
        let set = set();
        let doc = document(&set);
        for name in set.action_names() {
            let record = set.action(name).expect("action");
            let payload = message_payload(&doc, &format!("action.{name}"));
            for full in [false, true] {
                let Json::Object(mut details) = sample(&Schema::Record(record.schema.clone()), set.names(), full)
                else {
                    panic!("record sample")
                };
                for f in RESERVED_FIELDS {
                    details.remove(f);
                }
                let frame =
                    json!({"type": "action", "uuid": "a-1", "data": {"action": name, "action_details": details}});
                valid(payload, &frame).unwrap_or_else(|e| panic!("{name}: {e}"));
                let who =
                    crate::model::AgentId { tenant_guid: "t".into(), agent_guid: "a".into(), ir_instance: "i".into() };
                crate::reactions::inject_identity(record, &mut details, &who, false, "CCEB");
                set.build(record, &details).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            let mut reserved = json!({"type": "action", "uuid": "a-1", "data": {"action": name, "action_details": {}}});
            reserved["data"]["action_details"]["tenantGuid"] = "t".into();
            assert!(valid(payload, &reserved).is_err(), "{name} takes a reserved field");
        }
        for (frame, key) in [
            (cceb_protocol::outgoing::error("x", ErrorCode::ReservedField, "no", Some("tenantGuid")), "error"),
            (cceb_protocol::outgoing::ack("x"), "ack"),
            (cceb_protocol::outgoing::pong("x"), "pong"),
        ] {
            let frame: Json = serde_json::from_str(&frame).expect("frame");
            valid(message_payload(&doc, key), &frame).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        let reply = cceb_protocol::outgoing::HelloReply {
            session_id: "s".into(),
            session_key: None,
            resumed: false,
            long_lived: false,
            auto_accept: false,
            session_ttl_seconds: 1,
            heartbeat_interval_seconds: 25,
            agent: cceb_protocol::outgoing::AgentRef {
                tenant_guid: "t".into(),
                agent_guid: "a".into(),
                ir_instance: "i".into(),
            },
            dropped: Some(0),
        };
        let frame: Json = serde_json::from_str(&cceb_protocol::outgoing::hello_reply("u", &reply)).expect("frame");
        valid(message_payload(&doc, "hello_reply"), &frame).expect("hello_reply");
        let hello = json!({"type": "hello", "uuid": "u", "data": {"token": "t", "long_lived": true, "push": null,
            "client": {"name": "n", "version": "1"}}});
        valid(message_payload(&doc, "hello"), &hello).expect("hello");
    }
}
