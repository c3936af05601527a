//! Messages the bridge sends, built as text once; and a reader for them, used by
//! clients (tests, CLI, benchmark).

use crate::{ErrorCode, NotificationType};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRef {
    pub tenant_guid: String,
    pub agent_guid: String,
    pub ir_instance: String,
}

/// `hello_reply.data` (contract section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    pub session_id: String,
    pub session_key: Option<String>,
    pub resumed: bool,
    pub long_lived: bool,
    pub auto_accept: bool,
    pub session_ttl_seconds: u64,
    pub heartbeat_interval_seconds: u64,
    pub agent: AgentRef,
    /// Mailbox entries dropped while the session was away (resume only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    #[serde(rename = "type")]
    ty: &'a str,
    uuid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

fn frame<T: Serialize>(ty: &str, uuid: &str, data: Option<T>) -> String {
    // Serialising plain structs and strings into a String cannot fail.
    serde_json::to_string(&Envelope { ty, uuid, data }).unwrap_or_default()
}

pub fn hello_reply(uuid: &str, reply: &HelloReply) -> String {
    frame("hello_reply", uuid, Some(reply))
}

pub fn ack(uuid: &str) -> String {
    frame::<()>("ack", uuid, None)
}

pub fn pong(uuid: &str) -> String {
    frame::<()>("pong", uuid, None)
}

pub fn error(uuid: &str, code: ErrorCode, message: &str, field: Option<&str>) -> String {
    frame("error", uuid, Some(ErrorData { code, message: message.to_owned(), field: field.map(str::to_owned) }))
}

/// A notification frame; `data` is already-serialised JSON shared by every
/// session that receives the same notification.
/// Built once per session a notification reaches, so one allocation each:
/// no temporary strings for the uuid or the seq.
pub fn notification(ty: NotificationType, uuid: &str, seq: u64, data: &str) -> String {
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq);
    let mut s = String::with_capacity(40 + ty.as_str().len() + uuid.len() + seq.len() + data.len());
    s.push_str("{\"type\":\"");
    s.push_str(ty.as_str());
    s.push_str("\",\"uuid\":");
    push_json_string(&mut s, uuid);
    s.push_str(",\"seq\":");
    s.push_str(seq);
    s.push_str(",\"data\":");
    s.push_str(data);
    s.push('}');
    s
}

/// `v` as a JSON string. The uuids the bridge mints need no escape and are
/// copied as they are; anything else is escaped by serde_json.
fn push_json_string(s: &mut String, v: &str) {
    if crate::needs_no_json_escape(v) {
        s.push('"');
        s.push_str(v);
        s.push('"');
    } else {
        s.push_str(&serde_json::to_string(v).unwrap_or_default());
    }
}

/// What a client reads from the bridge.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    HelloReply { uuid: String, reply: HelloReply },
    Ack { uuid: String },
    Error { uuid: String, error: ErrorData },
    Pong { uuid: String },
    Notification { ty: NotificationType, uuid: String, seq: u64, data: Value },
}

#[derive(Deserialize)]
struct RawServer {
    #[serde(rename = "type")]
    ty: String,
    uuid: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    data: Option<Value>,
}

/// Parses a frame sent by the bridge.
pub fn parse_server_message(text: &str) -> Result<ServerMessage, String> {
    let raw: RawServer = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let data = || raw.data.clone().ok_or_else(|| format!("`{}` without data", raw.ty));
    Ok(match raw.ty.as_str() {
        "hello_reply" => ServerMessage::HelloReply {
            reply: serde_json::from_value(data()?).map_err(|e| e.to_string())?,
            uuid: raw.uuid,
        },
        "ack" => ServerMessage::Ack { uuid: raw.uuid },
        "pong" => ServerMessage::Pong { uuid: raw.uuid },
        "error" => {
            ServerMessage::Error { error: serde_json::from_value(data()?).map_err(|e| e.to_string())?, uuid: raw.uuid }
        }
        other => ServerMessage::Notification {
            ty: other.parse()?,
            seq: raw.seq.ok_or("notification without seq")?,
            data: data()?,
            uuid: raw.uuid,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_frames_round_trip() {
        let text = notification(NotificationType::OffHook, "n-1", 7, r#"{"state":"enabled"}"#);
        match parse_server_message(&text).expect("valid") {
            ServerMessage::Notification { ty, uuid, seq, data } => {
                assert_eq!((ty, uuid.as_str(), seq), (NotificationType::OffHook, "n-1", 7));
                assert_eq!(data["state"], "enabled");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    proptest::proptest! {
        #[test]
        fn any_uuid_and_seq_round_trip_in_a_notification_frame(uuid in "\\PC*|[\"\\\\\\x00-\\x1f\\x7f\u{2028}a-f0-9-]{0,40}", seq: u64) {
            let text = notification(NotificationType::OffHook, &uuid, seq, "{}");
            match parse_server_message(&text) {
                Ok(ServerMessage::Notification { uuid: u, seq: s, .. }) => {
                    proptest::prop_assert_eq!((u, s), (uuid, seq));
                }
                other => proptest::prop_assert!(false, "{other:?}"),
            }
        }
    }

    #[test]
    fn error_frames_carry_code_and_field() {
        let text = error("A1", ErrorCode::ReservedField, "no", Some("tenantGuid"));
        let v: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["data"]["code"], "reserved_field");
        assert_eq!(v["data"]["field"], "tenantGuid");
        assert_eq!(ack("A1"), r#"{"type":"ack","uuid":"A1"}"#);
    }
}
