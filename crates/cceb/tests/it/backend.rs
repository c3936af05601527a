//! Contract section 8: the backend port of the embedded bus, its refusals,
//! long-poll and outage switch. Kafka has none of these (its counterparts are
//! in `kafka`), so `scripts/test` runs this module on the embedded bus only.

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
        // Valid Avro the mapping refuses: off-hook message ids are 250-255, phone validation states a closed set.
        (json!({"record":"OffHookEvent","value":{"tenantGuid":"t","agentGuid":"a","messageId":249}}), "250"),
        (json!({"record":"PhoneValidationEvent","value":{"tenantGuid":"t","agentGuid":"a","state":"lost"}}), "lost"),
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

#[tokio::test]
async fn bus_outage_is_backend_unavailable_and_a_retry_publishes_once() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    b.set_bus(false).await;
    c.send(json!({"type":"action","uuid":"r1","data":{"action":"AcceptInteractionEvent","action_details":{"interactionId":"i"}}})).await;
    c.expect_error("r1", cceb_protocol::ErrorCode::BackendUnavailable).await;
    assert!(b.published().await.is_empty());
    b.set_bus(true).await;
    c.expect_ack_of_action("r1", "AcceptInteractionEvent", json!({"interactionId":"i"})).await;
    c.expect_ack_of_action("r1", "AcceptInteractionEvent", json!({"interactionId":"i"})).await;
    assert_eq!(b.published().await.len(), 1);
}

#[tokio::test]
async fn published_actions_can_be_long_polled_from_an_offset() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let poll = {
        let http = b.http.clone();
        let url = format!("http://{}/backend/v1/actions?after=0&wait_ms=5000", b.backend);
        tokio::spawn(async move {
            http.get(url).bearer_auth(ADMIN).send().await.expect("answers").json::<Value>().await.expect("json")
        })
    };
    // Give the poll a moment to be waiting; correctness does not depend on it.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    c.expect_ack_of_action("lp", "ChangeAgentStateEvent", json!({"state":"Away"})).await;
    let got = poll.await.expect("joined");
    assert_eq!(got["records"][0]["record"], "ChangeAgentStateEvent");
    assert_eq!(got["next"], 1);
    let after = b.actions_after(1, 0).await;
    assert_eq!(after, json!({"next": 1, "records": []}));
}

#[tokio::test]
async fn with_a_small_log_byte_bound_the_backend_port_serves_the_newest_actions_and_next_goes_on() {
    // Room for two of the records below (each about 1.3 kB), not three.
    let b = TestBridge::with(|s| s.embedded_log_bytes = 3000).await;
    if b.skip_on_redis("the log in Redis is bounded by count (the bytes are Redis's memory)") {
        return;
    }
    let (mut c, _) = b.agent("t", "a").await;
    for n in 1..=5 {
        let details = json!({"interactionId": format!("{n}-{}", "x".repeat(1000))});
        c.expect_ack_of_action(&format!("big-{n}"), "AcceptInteractionEvent", details).await;
    }
    let offsets = |page: &Value| -> Vec<u64> {
        page["records"].as_array().into_iter().flatten().filter_map(|r| r["offset"].as_u64()).collect()
    };
    let page = b.actions_after(0, 0).await;
    assert_eq!((offsets(&page), &page["next"]), (vec![4, 5], &json!(5)), "{page}");
    let id = page["records"][1]["value"]["interactionId"].as_str().unwrap_or_default();
    assert!(id.starts_with("5-"), "offset 5 is the fifth action");
    c.expect_ack_of_action("small", "ChangeAgentStateEvent", json!({"state": "Away"})).await;
    let page = b.actions_after(5, 0).await;
    assert_eq!((offsets(&page), &page["next"]), (vec![6], &json!(6)), "{page}");
    assert_eq!(page["records"][0]["record"], "ChangeAgentStateEvent");
    assert_eq!(b.actions_after(6, 0).await, json!({"next": 6, "records": []}));
}

#[tokio::test]
async fn a_notification_over_the_size_limit_is_refused_naming_the_limit_and_the_largest_allowed_is_delivered() {
    let limit = 5 * 1024 * 1024;
    let b = TestBridge::with(|s| s.max_notification_bytes = limit).await;
    let (mut c, _) = b.agent("t", "a").await;
    // `data` is {"agent_guid":"a","state":"…","tenant_guid":"t"}: 47 bytes besides the state.
    let state = |len: usize| "x".repeat(len);
    let event = |len: usize| json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state": state(len)}});
    let (status, reply) = b.post_events(event(limit - 47 + 1)).await;
    assert_eq!(status, 400);
    let reason = reply["error"].as_str().unwrap_or_default();
    assert!(reason.contains(&limit.to_string()) && reason.contains("CCEB_MAX_NOTIFICATION_BYTES"), "{reason}");
    // Larger than the 4 MiB write buffer the bridge used to have: it must not block the session.
    b.event("AgentPresenceEvent", event(limit - 47)["value"].clone()).await;
    b.event("AgentPresenceEvent", json!({"tenantGuid":"t","agentGuid":"a","state":"after"})).await;
    let (_, big, _, data) = c.notification().await;
    assert_eq!(data["state"].as_str().map(str::len), Some(limit - 47));
    c.ack(&big).await;
    let (_, _, seq, data) = c.notification().await;
    assert_eq!((seq, data["state"].as_str()), (2, Some("after")));
}

#[tokio::test]
async fn an_event_id_yields_the_same_notification_uuid_every_time_and_no_id_a_fresh_one() {
    let mut b = TestBridge::start().await;
    let list =
        json!({"tenantGuid":"t","agentGuid":"a","interactions":[{"interactionId":"i1","state":"s","channel":"c"}]});
    let with_id = json!({"id": "evt-1", "record": "AgentInteractionListEvent", "value": list});
    let without = json!({"record": "AgentInteractionListEvent", "value": list});
    let mut uuids = Vec::new();
    // The same id across a restart (the bridge forgets which ids it queued),
    // then no id: each time a new client on a new bridge process.
    for (body, restart) in [(&with_id, false), (&with_id, true), (&without, false)] {
        if restart {
            b.restart().await;
        }
        let (mut c, _) = b.agent("t", "a").await;
        let (status, reply) = b.post_events(body.clone()).await;
        assert_eq!(status, 202, "{reply}");
        let (_, list_uuid, _, _) = c.notification().await;
        let (_, item_uuid, _, _) = c.notification().await;
        assert_ne!(list_uuid, item_uuid, "each notification of one event has its own uuid");
        uuids.push((list_uuid, item_uuid));
    }
    assert_eq!(uuids[0], uuids[1], "the same event id gives the same uuids");
    assert_ne!(uuids[0].0, uuids[2].0);
    let (status, _) = b.post_events(json!({"id": 7, "record": "AgentPresenceEvent", "value": {}})).await;
    assert_eq!(status, 400, "an id is a string");
}

#[tokio::test]
async fn an_id_given_twice_in_one_batch_is_queued_once() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let e =
        json!({"id": "same", "record": "AgentPresenceEvent", "value": {"tenantGuid":"t","agentGuid":"a","state":"s"}});
    let (status, reply) = b.post_events(json!([e, e])).await;
    assert_eq!((status, reply["notifications"].as_u64()), (202, Some(1)));
    c.notification().await;
    assert!(c.round_trip("once").await.is_empty());
    // Ids need be unique within a tenant only.
    let (mut other, _) = b.agent("t2", "a").await;
    let e2 =
        json!({"id": "same", "record": "AgentPresenceEvent", "value": {"tenantGuid":"t2","agentGuid":"a","state":"s"}});
    assert_eq!(b.post_events(e2).await.0, 202);
    other.notification().await;
}
