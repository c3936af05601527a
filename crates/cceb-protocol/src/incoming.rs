//! Messages a client sends, and the one parser every client frame goes through.

use crate::trace::TraceParent;
use crate::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest `uuid` accepted; the contract only asks for a sender-chosen id, but an
/// unbounded one would let a client make the bridge echo megabytes back.
pub const MAX_UUID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Hello {
        uuid: String,
        hello: Hello,
    },
    /// `traceparent`: the optional W3C trace context in `data`, carried to
    /// the bus record (not part of it).
    Action {
        uuid: String,
        action: String,
        details: Map<String, Value>,
        traceparent: Option<TraceParent>,
    },
    Ack {
        uuid: String,
    },
    Ping {
        uuid: String,
    },
    EndSession {
        uuid: String,
    },
}

impl ClientMessage {
    pub fn uuid(&self) -> &str {
        match self {
            ClientMessage::Hello { uuid, .. }
            | ClientMessage::Action { uuid, .. }
            | ClientMessage::Ack { uuid }
            | ClientMessage::Ping { uuid }
            | ClientMessage::EndSession { uuid } => uuid,
        }
    }
}

/// `hello.data` (contract section 3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_guid: Option<String>,
    #[serde(default)]
    pub long_lived: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key: Option<String>,
    #[serde(default)]
    pub auto_accept: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Push {
    pub provider: String,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
}

/// Why a frame was refused; carries what the `error` reply needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: ErrorCode,
    /// The offending message's uuid when it could be read.
    pub uuid: Option<String>,
    pub message: String,
    pub field: Option<String>,
}

impl ParseError {
    fn new(code: ErrorCode, uuid: Option<&str>, message: impl Into<String>, field: Option<&str>) -> Self {
        ParseError { code, uuid: uuid.map(str::to_owned), message: message.into(), field: field.map(str::to_owned) }
    }
}

/// Parses one text frame into a client message, or says which contract error it is.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    match canonical_ack(text) {
        Some(uuid) => Ok(ClientMessage::Ack { uuid: uuid.to_owned() }),
        None => parse_any(text),
    }
}

/// The uuid of `{"type":"ack","uuid":"…"}` written exactly so, as clients
/// (this project's and the SDK) write nearly every frame they send: a full
/// JSON parse was a sixth of the bridge's instructions per notification.
/// Only a uuid the parser would read back unchanged passes (no escape, no
/// control character); anything else goes through [`parse_any`].
fn canonical_ack(text: &str) -> Option<&str> {
    let uuid = text.strip_prefix(r#"{"type":"ack","uuid":""#)?.strip_suffix(r#""}"#)?;
    let plain = (1..=MAX_UUID_LEN).contains(&uuid.len()) && crate::needs_no_json_escape(uuid);
    plain.then_some(uuid)
}

fn parse_any(text: &str) -> Result<ClientMessage, ParseError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ParseError::new(ErrorCode::InvalidJson, None, format!("not JSON: {e}"), None))?;
    let Value::Object(mut obj) = value else {
        return Err(ParseError::new(ErrorCode::InvalidMessage, None, "a message must be a JSON object", None));
    };
    // uuid first, so every later error can echo it.
    let uuid = match obj.get("uuid") {
        Some(Value::String(u)) if !u.is_empty() && u.len() <= MAX_UUID_LEN => u.clone(),
        Some(Value::String(_)) => {
            return Err(ParseError::new(
                ErrorCode::InvalidMessage,
                None,
                format!("`uuid` must be 1 to {MAX_UUID_LEN} bytes"),
                Some("uuid"),
            ))
        }
        Some(_) => {
            return Err(ParseError::new(ErrorCode::InvalidMessage, None, "`uuid` must be a string", Some("uuid")))
        }
        None => return Err(ParseError::new(ErrorCode::InvalidMessage, None, "`uuid` is missing", Some("uuid"))),
    };
    let u = Some(uuid.as_str());
    let ty = match obj.remove("type") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(ParseError::new(ErrorCode::InvalidMessage, u, "`type` must be a string", Some("type"))),
        None => return Err(ParseError::new(ErrorCode::InvalidMessage, u, "`type` is missing", Some("type"))),
    };
    let data = match obj.remove("data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(d)) => Some(d),
        Some(_) => return Err(ParseError::new(ErrorCode::InvalidMessage, u, "`data` must be an object", Some("data"))),
    };
    match ty.as_str() {
        "hello" => {
            let data = data
                .ok_or_else(|| ParseError::new(ErrorCode::InvalidMessage, u, "`hello` needs `data`", Some("data")))?;
            let hello = parse_hello(data)
                .map_err(|(msg, field)| ParseError::new(ErrorCode::InvalidMessage, u, msg, Some(&field)))?;
            Ok(ClientMessage::Hello { uuid, hello })
        }
        "action" => {
            let mut data = data
                .ok_or_else(|| ParseError::new(ErrorCode::InvalidMessage, u, "`action` needs `data`", Some("data")))?;
            let action = match data.remove("action") {
                Some(Value::String(a)) => a,
                Some(_) => {
                    return Err(ParseError::new(
                        ErrorCode::InvalidMessage,
                        u,
                        "`data.action` must be a string",
                        Some("data.action"),
                    ))
                }
                None => {
                    return Err(ParseError::new(
                        ErrorCode::InvalidMessage,
                        u,
                        "`data.action` is missing",
                        Some("data.action"),
                    ))
                }
            };
            let details = match data.remove("action_details") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(d)) => d,
                Some(_) => {
                    return Err(ParseError::new(
                        ErrorCode::InvalidMessage,
                        u,
                        "`data.action_details` must be an object",
                        Some("data.action_details"),
                    ))
                }
            };
            let traceparent = match data.remove("traceparent") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(TraceParent::parse(&t).map_err(|e| {
                    ParseError::new(ErrorCode::InvalidActionDetails, u, e.to_string(), Some("data.traceparent"))
                })?),
                Some(_) => {
                    return Err(ParseError::new(
                        ErrorCode::InvalidActionDetails,
                        u,
                        "`traceparent` must be a string",
                        Some("data.traceparent"),
                    ))
                }
            };
            Ok(ClientMessage::Action { uuid, action, details, traceparent })
        }
        "ack" => Ok(ClientMessage::Ack { uuid }),
        "ping" => Ok(ClientMessage::Ping { uuid }),
        "end_session" => Ok(ClientMessage::EndSession { uuid }),
        other => Err(ParseError::new(
            ErrorCode::UnknownType,
            u,
            format!("`{other}` is not a message a client may send"),
            Some("type"),
        )),
    }
}

fn parse_hello(data: Map<String, Value>) -> Result<Hello, (String, String)> {
    // Deserialising field by field names the offending field in the error.
    let field = |name: &str| format!("data.{name}");
    let mut hello = Hello::default();
    for (k, v) in data {
        match k.as_str() {
            "token" => hello.token = string(v).ok_or_else(|| ("`token` must be a string".into(), field("token")))?,
            "tenant_guid" => hello.tenant_guid = opt_string(v).map_err(|m| (m, field("tenant_guid")))?,
            "session_key" => hello.session_key = opt_string(v).map_err(|m| (m, field("session_key")))?,
            "long_lived" => hello.long_lived = opt_bool(v).map_err(|m| (m, field("long_lived")))?,
            "auto_accept" => hello.auto_accept = opt_bool(v).map_err(|m| (m, field("auto_accept")))?,
            "push" if !v.is_null() => {
                hello.push = Some(serde_json::from_value(v).map_err(|e| (format!("`push`: {e}"), field("push")))?)
            }
            "client" if !v.is_null() => {
                hello.client = Some(serde_json::from_value(v).map_err(|e| (format!("`client`: {e}"), field("client")))?)
            }
            _ => {}
        }
    }
    if hello.token.is_empty() {
        return Err(("`token` is missing".into(), field("token")));
    }
    Ok(hello)
}

fn string(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn opt_string(v: Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err("must be a string or null".into()),
    }
}

fn opt_bool(v: Value) -> Result<bool, String> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(b),
        _ => Err("must be a boolean".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code(text: &str) -> ErrorCode {
        parse_client_message(text).expect_err("must be refused").code
    }

    #[test]
    fn classifies_bad_frames() {
        assert_eq!(code("{"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"ping"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"uuid":"u"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":1,"uuid":"u"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"action","uuid":"u","data":[]}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":"pong","uuid":"u"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"hello","uuid":"u","data":{}}"#), ErrorCode::InvalidMessage);
        // 65 characters but 130 bytes: the limit bounds what is echoed, so it counts bytes.
        assert_eq!(code(&format!(r#"{{"type":"ping","uuid":"{}"}}"#, "é".repeat(65))), ErrorCode::InvalidMessage);
    }

    #[test]
    fn errors_echo_the_uuid() {
        let e = parse_client_message(r#"{"type":"nope","uuid":"abc"}"#).expect_err("unknown");
        assert_eq!(e.uuid.as_deref(), Some("abc"));
        assert_eq!(e.field.as_deref(), Some("type"));
    }

    #[test]
    fn parses_messages() {
        let m = parse_client_message(
            r#"{"type":"action","uuid":"A1","extra":1,"data":{"action":"X","action_details":{"interactionId":"i"}}}"#,
        )
        .expect("valid");
        match m {
            ClientMessage::Action { uuid, action, details, traceparent } => {
                assert_eq!((uuid.as_str(), action.as_str()), ("A1", "X"));
                assert_eq!(details["interactionId"], "i");
                assert_eq!(traceparent, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        let h =
            parse_client_message(r#"{"type":"hello","uuid":"U","data":{"token":"t","long_lived":true,"push":null}}"#)
                .expect("valid");
        assert!(matches!(h, ClientMessage::Hello { hello: Hello { long_lived: true, .. }, .. }));
        assert_eq!(parse_client_message(r#"{"type":"ack","uuid":"N"}"#), Ok(ClientMessage::Ack { uuid: "N".into() }));
    }

    #[test]
    fn an_actions_traceparent_is_read_and_a_bad_one_refused_naming_it() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let frame = |t: Value| {
            serde_json::json!({"type":"action","uuid":"A","data":{"action":"X","traceparent":t,"action_details":{}}})
                .to_string()
        };
        match parse_client_message(&frame(tp.into())).expect("valid") {
            ClientMessage::Action { traceparent: Some(t), details, .. } => {
                assert_eq!(t.to_string(), tp);
                assert!(details.is_empty(), "not an action detail");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_client_message(&frame(Value::Null)),
            Ok(ClientMessage::Action { traceparent: None, .. })
        ));
        for bad in [Value::from("00-abc"), Value::from(tp.to_uppercase()), Value::from(7)] {
            let e = parse_client_message(&frame(bad.clone())).expect_err("refused");
            assert_eq!(
                (e.code, e.field.as_deref(), e.uuid.as_deref()),
                (ErrorCode::InvalidActionDetails, Some("data.traceparent"), Some("A")),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_ack_written_otherwise_is_read_the_same_or_refused_the_same() {
        let cases = [
            r#"{"type":"ack","uuid":"N1"}"#,
            r#"{"uuid":"N1","type":"ack"}"#,
            r#"{ "type": "ack", "uuid": "N1" }"#,
            r#"{"type":"ack","uuid":"N\u0031"}"#,
            r#"{"type":"ack","uuid":""}"#,
            r#"{"type":"ack","uuid":"a"}x"#,
            r#"{"type":"ack","uuid":"a\"}"#,
        ];
        for text in cases {
            assert_eq!(parse_client_message(text), parse_any(text), "{text}");
        }
        assert_eq!(canonical_ack(r#"{"type":"ack","uuid":"N1"}"#), Some("N1"));
        for at_limit in ["u".repeat(MAX_UUID_LEN), "é".repeat(MAX_UUID_LEN / 2)] {
            let text = format!(r#"{{"type":"ack","uuid":"{at_limit}"}}"#);
            assert_eq!(canonical_ack(&text), Some(at_limit.as_str()), "the fast path takes it");
            assert_eq!(parse_client_message(&text), parse_any(&text));
        }
        let long = format!(r#"{{"type":"ack","uuid":"{}"}}"#, "u".repeat(MAX_UUID_LEN + 1));
        assert_eq!(canonical_ack(&long), None);
        assert!(parse_client_message(&long).is_err());
    }

    proptest! {
        #[test]
        fn the_ack_fast_path_reads_what_the_parser_reads(uuid in "\\PC{0,140}|[\\x00-\\x7f]{0,20}") {
            let text = format!(r#"{{"type":"ack","uuid":"{uuid}"}}"#);
            prop_assert_eq!(parse_client_message(&text), parse_any(&text));
            let json = serde_json::json!({"type": "ack", "uuid": uuid}).to_string();
            prop_assert_eq!(parse_client_message(&json), parse_any(&json));
        }

        #[test]
        fn an_actions_traceparent_never_panics_and_is_carried_or_refused(
            t in prop_oneof!["\\PC{0,70}", "[0-9a-fA-F]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[a-z]{0,3})?"],
        ) {
            let text = serde_json::json!({"type":"action","uuid":"A","data":{"action":"X","traceparent":t}}).to_string();
            match parse_client_message(&text) {
                Ok(ClientMessage::Action { traceparent, .. }) => prop_assert_eq!(traceparent, TraceParent::parse(&t).ok()),
                Ok(other) => prop_assert!(false, "not an action: {:?}", other),
                Err(e) => {
                    prop_assert!(TraceParent::parse(&t).is_err());
                    prop_assert_eq!(e.field.as_deref(), Some("data.traceparent"));
                }
            }
        }

        #[test]
        fn never_panics_on_arbitrary_text(s in "\\PC*") {
            let _ = parse_client_message(&s);
        }

        #[test]
        fn never_panics_on_arbitrary_json(v in arb_json()) {
            let _ = parse_client_message(&v.to_string());
        }

        #[test]
        fn envelope_like_objects_are_classified(ty in "[a-z_]{0,12}", uuid in "[a-zA-Z0-9-]{0,140}", data in arb_json()) {
            let text = serde_json::json!({"type": ty, "uuid": uuid, "data": data}).to_string();
            match parse_client_message(&text) {
                Ok(m) => prop_assert_eq!(m.uuid(), uuid.as_str()),
                Err(e) => prop_assert!(e.code != ErrorCode::InvalidJson),
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
