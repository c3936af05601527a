//! Contract section 5: notifications from backend events to clients.

use crate::support::*;
use cceb_protocol::outgoing::ServerMessage;
use cceb_protocol::NotificationType as N;
use serde_json::{json, Value};

fn ev(record: &str, value: Value) -> Value {
    json!({"record": record, "value": value})
}

#[tokio::test]
async fn every_notification_type_reaches_the_agent_with_snake_case_data() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t1", "a1").await;
    let who = |extra: Value| {
        let mut v = json!({"tenantGuid": "t1", "agentGuid": "a1"});
        v.as_object_mut().expect("obj").extend(extra.as_object().expect("obj").clone());
        v
    };
    let events = vec![
        ev("InteractionUpdateEvent", who(json!({"interactionId":"i1","state":"connected","channel":"VOICE"}))),
        ev(
            "AgentInteractionListEvent",
            who(json!({"interactions":[{"interactionId":"i1","state":"connected","channel":"VOICE"}]})),
        ),
        ev("AgentPresenceEvent", who(json!({"state":"Available","subState":"Ready"}))),
        ev("CallLegEvent", who(json!({"legId":"l1","phoneNumber":"+1555"}))),
        ev("SwitchLineEvent", who(json!({"lineId":"2"}))),
        ev("RecordingReadyEvent", who(json!({"recordingId":"r1"}))),
        ev("CampaignStatusEvent", who(json!({"campaignId":"c1","recordsRemaining":5}))),
        ev("AgentLineStatusEvent", who(json!({"lineId":"1","status":"busy"}))),
        ev("MonitoringAgentListEvent", who(json!({"agents":[{"agentGuid":"a9","name":"Nine"}]}))),
        ev("QueueAddedEvent", json!({"tenantGuid":"t1","queueId":"q1","queueType":"voice"})),
        ev("PhoneValidationEvent", who(json!({"state":"offering","timeout":45,"phoneNumber":"+1555"}))),
        ev("OffHookEvent", who(json!({"messageId":255,"success":true,"mediaResourceId":"m-1"}))),
        ev("AgentUpdatedEvent", json!({"tenantGuid":"t1","agentGuid":"a1","deltas":{"recordingControls":2}})),
    ];
    let (status, body) = b.post_events(Value::Array(events)).await;
    assert_eq!(status, 202, "{body}");
    let mut got = Vec::new();
    for _ in 0..14 {
        let (ty, uuid, _, data) = c.notification().await;
        c.ack(&uuid).await;
        got.push((ty, data));
    }
    let types: Vec<N> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(
        types,
        [
            N::InteractionUpdate,
            N::InteractionsList,
            N::AgentInteraction,
            N::Presence,
            N::CallLeg,
            N::SwitchLine,
            N::RecordingReady,
            N::CampaignStatus,
            N::AgentLineStatus,
            N::MonitoringAgentList,
            N::Provisioning,
            N::PhoneValidation,
            N::OffHook,
            N::Provisioning,
        ][..]
    );
    let data = |t: N| got.iter().find(|(ty, _)| *ty == t).map(|(_, d)| d.clone()).expect("received");
    assert_eq!(
        data(N::InteractionUpdate),
        json!({"tenant_guid":"t1","agent_guid":"a1","interaction_id":"i1","state":"connected","channel":"VOICE"})
    );
    assert_eq!(data(N::Presence)["sub_state"], "Ready");
    assert_eq!(data(N::CampaignStatus)["records_remaining"], 5);
    assert_eq!(data(N::MonitoringAgentList)["agents"][0]["agent_guid"], "a9");
    assert_eq!(data(N::Provisioning)["event_type"], "QueueAddedEvent");
    assert_eq!(data(N::Provisioning)["queue_type"], "voice");
    assert_eq!(data(N::PhoneValidation)["timeout"], 45);
    assert_eq!(data(N::OffHook)["state"], "authenticated");
    assert_eq!(data(N::OffHook)["media_resource_id"], "m-1");
    // The last one: agent_phone_update follows the tenant-wide provisioning of the same AgentUpdatedEvent.
    let (ty, uuid, _, data) = c.notification().await;
    c.ack(&uuid).await;
    assert_eq!((ty, data), (N::AgentPhoneUpdate, json!({"recording_controls": 2})));
}

#[tokio::test]
async fn seq_starts_at_one_and_increases_per_session() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    for n in 0..5 {
        b.event("AgentPresenceEvent", json!({"tenantGuid":"t","agentGuid":"a","state": format!("s{n}")})).await;
    }
    for n in 1..=5u64 {
        let (_, uuid, seq, data) = c.notification().await;
        assert_eq!(seq, n);
        assert_eq!(data["state"], format!("s{}", n - 1), "delivered in the order received");
        c.ack(&uuid).await;
    }
    // A second session of the same agent counts its own seq from 1.
    let (mut c2, _) = b.agent("t", "a").await;
    b.event("AgentPresenceEvent", json!({"tenantGuid":"t","agentGuid":"a","state":"x"})).await;
    assert_eq!(c2.notification().await.2, 1);
    assert_eq!(c.notification().await.2, 6);
}

#[tokio::test]
async fn unacked_notifications_are_redelivered_with_the_same_uuid_and_seq() {
    let b = TestBridge::with(|s| s.ack_timeout_ms = 120).await;
    let (mut c, _) = b.agent("t", "a").await;
    b.event("AgentPresenceEvent", json!({"tenantGuid":"t","agentGuid":"a","state":"Away"})).await;
    let (_, uuid, seq, data) = c.notification().await;
    let (_, uuid2, seq2, data2) = c.notification().await;
    assert_eq!((uuid2.as_str(), seq2, &data2), (uuid.as_str(), seq, &data));
    c.ack(&uuid).await;
    c.ack(&uuid).await;
    // Frames are taken in order: once the pong is here, the acks were. A
    // redelivery the bridge wrote before it read them may come first.
    let raced = c.round_trip("acked").await;
    assert!(
        raced.iter().all(|m| matches!(m, ServerMessage::Notification { uuid: u, .. } if *u == uuid)),
        "only the same notification again: {raced:?}"
    );
    let redelivered = b.metric("cceb_notifications_redelivered_total").await;
    assert!(redelivered >= 1.0);
    // After the ack nothing comes again (and the repeated ack is ignored, not
    // answered): two ack timeouts later the next thing read is the pong.
    tokio::time::sleep(std::time::Duration::from_millis(2 * 120 + 50)).await;
    let after = c.round_trip("after-ack").await;
    assert!(after.is_empty(), "nothing is redelivered after the ack: {after:?}");
    assert_eq!(b.metric("cceb_notifications_redelivered_total").await, redelivered);
}

#[tokio::test]
async fn too_many_unacked_closes_with_4004() {
    let b = TestBridge::with(|s| s.max_unacked = 3).await;
    let (mut c, _) = b.agent("t", "a").await;
    for n in 0..4 {
        b.event("AgentPresenceEvent", json!({"tenantGuid":"t","agentGuid":"a","state": format!("s{n}")})).await;
    }
    let (code, _) = c.closed().await;
    assert_eq!(code, Some(4004));
}

#[tokio::test]
async fn every_session_of_the_agent_gets_it_and_nothing_crosses_tenants() {
    let b = TestBridge::start().await;
    let (mut desktop, _) = b.agent("t1", "a1").await;
    let (mut mobile, _) = b.agent("t1", "a1").await;
    let (mut same_guid_other_tenant, _) = b.agent("t2", "a1").await;
    let (mut colleague, _) = b.agent("t1", "a2").await;
    b.event(
        "InteractionUpdateEvent",
        json!({"tenantGuid":"t1","agentGuid":"a1","interactionId":"i","state":"offered","channel":"CHAT"}),
    )
    .await;
    for c in [&mut desktop, &mut mobile] {
        let (ty, uuid, _, data) = c.notification().await;
        assert_eq!((ty, &data["interaction_id"]), (N::InteractionUpdate, &json!("i")));
        c.ack(&uuid).await;
    }
    for c in [&mut same_guid_other_tenant, &mut colleague] {
        assert!(c.round_trip("nothing").await.is_empty());
    }
}

#[tokio::test]
async fn provisioning_goes_to_every_session_of_the_tenant_only() {
    let b = TestBridge::start().await;
    let (mut a1, _) = b.agent("t1", "a1").await;
    let (mut a2, _) = b.agent("t1", "a2").await;
    let (mut other, _) = b.agent("t2", "b1").await;
    b.event("TenantUpdatedEvent", json!({"tenantGuid":"t1","deltas":{"name":"Acme"}})).await;
    for c in [&mut a1, &mut a2] {
        let (ty, _, _, data) = c.notification().await;
        assert_eq!(ty, N::Provisioning);
        assert_eq!(data, json!({"tenant_guid":"t1","deltas":{"name":"Acme"},"event_type":"TenantUpdatedEvent"}));
    }
    assert!(other.round_trip("nothing").await.is_empty());
}

#[tokio::test]
async fn interactions_list_then_one_agent_interaction_each_in_order() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let list = json!([
        {"interactionId":"i1","state":"connected","channel":"VOICE"},
        {"interactionId":"i2","state":"held","channel":"VOICE"},
        {"interactionId":"i3","state":"offered","channel":"EMAIL"}
    ]);
    b.event("AgentInteractionListEvent", json!({"tenantGuid":"t","agentGuid":"a","interactions": list})).await;
    let (ty, _, _, data) = c.notification().await;
    assert_eq!(ty, N::InteractionsList);
    assert_eq!(data["interactions"].as_array().map(Vec::len), Some(3));
    assert_eq!(data["interactions"][1]["interaction_id"], "i2");
    for id in ["i1", "i2", "i3"] {
        let (ty, _, _, data) = c.notification().await;
        assert_eq!((ty, &data["interaction_id"]), (N::AgentInteraction, &json!(id)));
    }
}

#[tokio::test]
async fn agent_phone_update_only_to_the_affected_agent_and_only_on_change() {
    let b = TestBridge::start().await;
    b.provision("t", "a1", "1001", false).await;
    let (mut affected, _) = b.agent("t", "a1").await;
    let (mut colleague, _) = b.agent("t", "a2").await;
    let update = |rc: i32| json!({"tenantGuid":"t","agentGuid":"a1","deltas":{"recordingControls": rc}});
    b.event("AgentUpdatedEvent", update(1)).await;
    let (ty, _, _, data) = affected.notification().await;
    assert_eq!((ty, &data["event_type"]), (N::Provisioning, &json!("AgentUpdatedEvent")));
    assert_eq!(data["deltas"]["recording_controls"], 1);
    assert_eq!(affected.notification().await.0, N::AgentPhoneUpdate);
    assert_eq!(colleague.notification().await.0, N::Provisioning);
    assert!(colleague.round_trip("only-provisioning").await.is_empty());
    // Same value again: provisioning only.
    b.event("AgentUpdatedEvent", update(1)).await;
    assert_eq!(affected.notification().await.0, N::Provisioning);
    assert!(affected.round_trip("no-change").await.is_empty());
    // Another delta without recordingControls: provisioning only.
    b.event("AgentUpdatedEvent", json!({"tenantGuid":"t","agentGuid":"a1","deltas":{"firstName":"Ann"}})).await;
    assert_eq!(affected.notification().await.0, N::Provisioning);
    assert!(affected.round_trip("other-delta").await.is_empty());
}

#[tokio::test]
async fn off_hook_platform_messages_map_to_states() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let cases = [
        (json!({"messageId":250,"enabled":true}), "enabled"),
        (json!({"messageId":250,"enabled":false}), "disabled"),
        (json!({"messageId":251}), "answered"),
        (json!({"messageId":252}), "dropped"),
        (json!({"messageId":253}), "rejected"),
        (json!({"messageId":254,"connected":true}), "connected"),
        (json!({"messageId":254,"connected":false}), "disconnected"),
        (json!({"messageId":255,"success":true,"mediaResourceId":"m"}), "authenticated"),
        (json!({"messageId":255,"success":false,"mediaResourceId":"m"}), "authentication_failed"),
    ];
    for (extra, state) in cases {
        let mut v = json!({"tenantGuid":"t","agentGuid":"a"});
        v.as_object_mut().expect("obj").extend(extra.as_object().expect("obj").clone());
        b.event("OffHookEvent", v).await;
        let (ty, uuid, _, data) = c.notification().await;
        c.ack(&uuid).await;
        assert_eq!((ty, data["state"].as_str()), (N::OffHook, Some(state)));
        assert_eq!(data.get("media_resource_id").is_some(), state == "authenticated", "{data}");
        assert!(data.get("timeout").is_none());
    }
}

#[tokio::test]
async fn available_on_an_off_hook_agent_synthesises_the_offering() {
    let b = TestBridge::with(|s| s.off_hook_offer_timeout_seconds = 42).await;
    b.provision("t", "hooked", "1", true).await;
    b.provision("t", "plain", "2", false).await;
    let (mut c, _) = b.agent("t", "hooked").await;
    c.expect_ack_of_action("av", "ChangeAgentStateEvent", json!({"state":"Available"})).await;
    let (ty, _, _, data) = c.notification().await;
    assert_eq!((ty, data), (N::OffHook, json!({"state":"offering","timeout":42})));
    assert_eq!(b.published().await.len(), 1, "the action is published too");
    // Other states, and agents without off-hook mode, get no offering.
    c.expect_ack_of_action("away", "ChangeAgentStateEvent", json!({"state":"Away"})).await;
    assert!(c.round_trip("none").await.is_empty());
    let (mut p, _) = b.agent("t", "plain").await;
    p.expect_ack_of_action("av2", "ChangeAgentStateEvent", json!({"state":"Available"})).await;
    assert!(p.round_trip("none").await.is_empty());
}

#[tokio::test]
async fn phone_validation_carries_timeout_only_when_offering() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    for state in ["offering", "answered", "verified", "invalid", "rejected", "dropped"] {
        b.event("PhoneValidationEvent", json!({"tenantGuid":"t","agentGuid":"a","state":state,"timeout":30})).await;
        let (ty, uuid, _, data) = c.notification().await;
        c.ack(&uuid).await;
        assert_eq!((ty, data["state"].as_str()), (N::PhoneValidation, Some(state)));
        assert_eq!(data.get("timeout").is_some(), state == "offering");
    }
}
