//! `GET /v1/asyncapi.json` and `GET /v1/schemas`: the bridge describes the
//! contract it runs with, generated from the schema set it loaded
//! (docs/PROTOCOL.md, section 1; `docs/asyncapi.json` is the built-in set's).

use crate::support::*;
use cceb::schema::SchemaSet;
use cceb_protocol::NotificationType;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

/// GETs `path` without a token: both documents are public.
async fn get(bridge: &TestBridge, path: &str) -> Value {
    let r = bridge.http.get(bridge.url(path)).send().await.expect("answers");
    assert_eq!(r.status().as_u16(), 200, "{path}");
    let ty = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert_eq!(ty, "application/json", "{path}");
    r.json().await.expect("JSON")
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// Checks that both documents cover every record of `set`, and returns them.
async fn documents_covering(bridge: &TestBridge, set: &SchemaSet) -> (Value, Value) {
    let doc = get(bridge, "/v1/asyncapi.json").await;
    let schemas = get(bridge, "/v1/schemas").await;
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["channels"]["bridge"]["address"], "/ws/v1");
    let messages = &doc["components"]["messages"];

    let actions: BTreeSet<String> = set.action_names().map(str::to_owned).collect();
    assert_eq!(keys(&schemas["actions"]), actions);
    for name in &actions {
        assert_eq!(schemas["actions"][name]["name"], name.as_str(), "/v1/schemas serves the .avsc as written");
        let data = &messages[format!("action.{name}")]["payload"]["properties"]["data"];
        assert_eq!(data["properties"]["action"]["const"], name.as_str(), "action.{name}");
        assert_eq!(data["properties"]["action_details"]["type"], "object", "action.{name}");
    }
    let events: BTreeSet<String> = set.event_names().map(str::to_owned).collect();
    assert_eq!(keys(&schemas["events"]), events);
    assert_eq!(keys(&schemas["mapping"]["events"]), events, "every event has its mapping");
    for name in &events {
        let (_, mapping) = set.event(name).expect("event");
        assert_eq!(schemas["mapping"]["events"][name]["notification"], mapping.notification.as_str());
    }
    assert!(schemas["bridge"].get("AgentChatAvailabilityEvent").is_some());
    for t in NotificationType::ALL {
        let payload = &messages[format!("notification.{t}")]["payload"];
        assert_eq!(payload["properties"]["type"]["const"], t.as_str(), "{t}");
        assert!(payload["properties"]["data"].is_object(), "{t}");
    }
    for m in ["hello", "client.ack", "client.ping", "client.end_session", "hello_reply", "ack", "pong", "error"] {
        assert!(messages.get(m).is_some(), "{m}");
    }
    let closes: Vec<u64> = doc["channels"]["bridge"]["x-close-codes"]
        .as_array()
        .expect("close codes")
        .iter()
        .filter_map(|c| c["code"].as_u64())
        .collect();
    assert_eq!(closes, [1000, 1001, 1003, 1009, 1012, 4001, 4002, 4003, 4004, 4005, 4006]);
    (doc, schemas)
}

#[tokio::test]
async fn the_asyncapi_document_and_the_schema_set_are_served_without_a_token_and_cover_every_record() {
    let bridge = TestBridge::start().await;
    let set = SchemaSet::load(None).expect("built-in set");
    let (doc, _) = documents_covering(&bridge, &set).await;
    assert_eq!(doc, cceb::asyncapi::document(&set), "the served document is the generated one");
    assert_eq!(doc["operations"]["action"]["messages"].as_array().map(Vec::len), Some(36));
}

#[tokio::test]
async fn both_documents_follow_the_schema_set_the_bridge_loaded() {
    let dir = copy_default_set();
    let extra = json!({"type": "record", "name": "ExtraNoteEvent", "namespace": "cceb.records", "doc": "A test action.",
        "fields": [{"name": "tenantGuid", "type": "string"}, {"name": "agentGuid", "type": "string"},
            {"name": "irInstance", "type": "string"}, {"name": "note", "type": ["null", "string"], "default": null}]});
    std::fs::write(dir.path().join("actions/ExtraNoteEvent.avsc"), extra.to_string()).expect("write");
    let path = dir.path().to_owned();
    let bridge = TestBridge::with(|s| s.schema_dir = Some(path)).await;
    let set = SchemaSet::load(Some(dir.path())).expect("the set");
    assert_eq!(set.action_names().count(), 37);
    let (doc, schemas) = documents_covering(&bridge, &set).await;
    assert_eq!(schemas["actions"]["ExtraNoteEvent"], extra);
    let message = &doc["components"]["messages"]["action.ExtraNoteEvent"];
    assert_eq!(message["description"], "A test action.");
    let details = &message["payload"]["properties"]["data"]["properties"]["action_details"];
    assert_eq!(details["properties"], json!({"note": {"type": ["string", "null"], "default": null}}));
    assert_eq!(details["required"], json!([]));
}

#[test]
fn docs_asyncapi_json_is_what_the_built_in_set_generates() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/asyncapi.json");
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("docs/asyncapi.json"))
        .expect("docs/asyncapi.json is JSON");
    let generated = cceb::asyncapi::document(&SchemaSet::load(None).expect("built-in set"));
    assert!(
        committed == generated,
        "docs/asyncapi.json is stale: regenerate it with `cargo run -p cceb -- asyncapi > docs/asyncapi.json`"
    );
}
