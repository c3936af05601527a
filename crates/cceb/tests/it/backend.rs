//! Contract section 8: the backend port of the embedded bus.

use crate::support::*;
use serde_json::{json, Value};

#[tokio::test]
async fn backend_port_requires_the_admin_token() {
    let b = TestBridge::start().await;
    let url = format!("http://{}/backend/v1/events", b.backend);
    let body = json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state":"x"}});
    let none = b.http.post(&url).json(&body).send().await.expect("answers");
    assert_eq!(none.status().as_u16(), 401);
    let wrong = b.http.post(&url).bearer_auth("guess").json(&body).send().await.expect("answers");
    assert_eq!(wrong.status().as_u16(), 401);
    let poll = b.http.get(format!("http://{}/backend/v1/actions", b.backend)).send().await.expect("answers");
    assert_eq!(poll.status().as_u16(), 401);
}

#[tokio::test]
async fn without_an_admin_token_the_backend_port_refuses_all() {
    let b = TestBridge::with(|s| s.admin_token = None).await;
    let (status, _) = b.post_events(json!({"record":"AgentPresenceEvent","value":{}})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn invalid_events_get_400_with_the_reason() {
    let b = TestBridge::start().await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"record":"NoSuchEvent","value":{}}), "NoSuchEvent"),
        (json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a"}}), "state"),
        (json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state":7}}), "state"),
        (json!({"record":"AgentPresenceEvent","value":"x"}), "value"),
        (json!({"value":{}}), "record"),
        (
            json!({"record":"AcceptInteractionEvent","value":{"tenantGuid":"t","agentGuid":"a","irInstance":"i","interactionId":"x"}}),
            "AcceptInteractionEvent",
        ),
        (
            json!({"record":"AgentInteractionListEvent","value":{"tenantGuid":"t","agentGuid":"a","interactions":[{"interactionId":"i","state":"s"}]}}),
            "interactions[0].channel",
        ),
    ];
    for (body, mention) in cases {
        let (status, reply) = b.post_events(body.clone()).await;
        assert_eq!(status, 400, "{body}");
        let reason = reply["error"].as_str().unwrap_or_default();
        assert!(reason.contains(mention), "reason `{reason}` should name `{mention}`");
    }
    let raw = b
        .http
        .post(format!("http://{}/backend/v1/events", b.backend))
        .bearer_auth(ADMIN)
        .body("{oops")
        .send()
        .await
        .expect("answers");
    assert_eq!(raw.status().as_u16(), 400);
}

#[tokio::test]
async fn a_batch_is_taken_in_order_or_not_at_all() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let presence =
        |s: &str| json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state": s}});
    let (status, reply) = b.post_events(json!([presence("one"), {"record":"AgentPresenceEvent","value":{}}])).await;
    assert_eq!(status, 400);
    assert!(reply["error"].as_str().unwrap_or_default().starts_with("[1]"), "{reply}");
    assert!(c.round_trip("nothing-yet").await.is_empty(), "a refused batch delivers nothing");
    let (status, reply) = b.post_events(json!([presence("one"), presence("two"), presence("three")])).await;
    assert_eq!((status, &reply["accepted"], &reply["notifications"]), (202, &json!(3), &json!(3)));
    for s in ["one", "two", "three"] {
        assert_eq!(c.notification().await.3["state"], s);
    }
}
