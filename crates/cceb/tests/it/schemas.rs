//! Contract section 8: the record set is data, loaded at start-up.

use crate::support::*;
use cceb::Bridge;
use serde_json::json;
use std::path::Path;

async fn start_error(dir: &Path) -> String {
    let mut s = test_settings();
    s.schema_dir = Some(dir.to_owned());
    match Bridge::start(s).await {
        Ok(_) => panic!("the bridge must not start"),
        Err(e) => e.to_string(),
    }
}

/// The start-up error of the default set with one file replaced by `contents`.
async fn start_error_with(file: &str, contents: &str) -> String {
    let dir = copy_default_set();
    std::fs::write(dir.path().join(file), contents).expect("write");
    start_error(dir.path()).await
}

#[tokio::test]
async fn a_malformed_schema_stops_start_up_naming_the_file() {
    let e = start_error_with("actions/BlindTransferEvent.avsc", "{ not json").await;
    assert!(e.contains("BlindTransferEvent.avsc") && e.contains("JSON"), "{e}");

    let bad_type = r#"{"type":"record","name":"OffHookEvent","fields":[{"name":"x","type":"nope"}]}"#;
    let e = start_error_with("events/OffHookEvent.avsc", bad_type).await;
    assert!(e.contains("OffHookEvent.avsc"), "{e}");

    let no_identity =
        r#"{"type":"record","name":"AcceptInteractionEvent","fields":[{"name":"interactionId","type":"string"}]}"#;
    let e = start_error_with("actions/AcceptInteractionEvent.avsc", no_identity).await;
    assert!(e.contains("AcceptInteractionEvent.avsc") && e.contains("tenantGuid"), "{e}");
}

#[tokio::test]
async fn a_malformed_mapping_stops_start_up_naming_the_file() {
    let dir = copy_default_set();
    let mapping = dir.path().join("mapping.toml");
    let text = std::fs::read_to_string(&mapping).expect("read");
    std::fs::write(&mapping, text.replace("notification = \"presence\"", "notification = \"presense\""))
        .expect("write");
    let e = start_error(dir.path()).await;
    assert!(e.contains("mapping.toml") && e.contains("presense"), "{e}");

    std::fs::write(&mapping, text.replace("[events.CallLegEvent]", "[events.CallLegEvnt]")).expect("write");
    let e = start_error(dir.path()).await;
    assert!(e.contains("mapping.toml") && e.contains("CallLegEvnt"), "{e}");
}

#[tokio::test]
async fn an_operator_can_drop_in_records_and_mappings() {
    let dir = copy_default_set();
    std::fs::write(
        dir.path().join("actions/ParkInteractionEvent.avsc"),
        json!({"type":"record","name":"ParkInteractionEvent","fields":[
            {"name":"tenantGuid","type":"string"},{"name":"agentGuid","type":"string"},{"name":"irInstance","type":"string"},
            {"name":"interactionId","type":"string"},{"name":"minutes","type":"int"}]})
        .to_string(),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("events/WallboardEvent.avsc"),
        json!({"type":"record","name":"WallboardEvent","fields":[{"name":"tenantGuid","type":"string"},{"name":"waitingCalls","type":"int"}]}).to_string(),
    )
    .expect("write");
    let mapping = dir.path().join("mapping.toml");
    let mut text = std::fs::read_to_string(&mapping).expect("read");
    text.push_str("\n[events.WallboardEvent]\nnotification = \"campaign_status\"\nto = \"tenant\"\n");
    std::fs::write(&mapping, text).expect("write");
    let b = TestBridge::with(|s| s.schema_dir = Some(dir.path().to_owned())).await;
    let (mut c, _) = b.agent("t", "a").await;
    c.expect_ack_of_action("p", "ParkInteractionEvent", json!({"interactionId":"i","minutes":5})).await;
    let rec = &b.published().await[0];
    assert_eq!(
        (&rec["record"], &rec["value"]["minutes"], &rec["value"]["agentGuid"]),
        (&json!("ParkInteractionEvent"), &json!(5), &json!("a"))
    );
    b.event("WallboardEvent", json!({"tenantGuid":"t","waitingCalls":3})).await;
    let (_, _, _, data) = c.notification().await;
    assert_eq!(data, json!({"tenant_guid":"t","waiting_calls":3}));
}
