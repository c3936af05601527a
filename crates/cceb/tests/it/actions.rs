//! Contract section 4: actions from client to bus.

use crate::support::*;
use cceb_protocol::outgoing::ServerMessage;
use cceb_protocol::{ErrorCode, NotificationType};
use serde_json::{json, Value};

/// Minimal valid details for every one of the 36 actions of the default set.
fn all_actions() -> Vec<(&'static str, Value)> {
    let i = json!({"interactionId": "i-1"});
    vec![
        ("UpdateInteractionEvent", json!({"interactionId": "i-1", "channel": "CHAT"})),
        ("RequestAgentInteractionListEvent", json!({})),
        ("InitiatePhoneCallEvent", json!({"phoneNumber": "+15550100"})),
        ("HoldAgentTelephoneLineEvent", i.clone()),
        ("UnholdAgentTelephoneLineEvent", i.clone()),
        ("CancelTransferEvent", json!({"interactionId": "i-1", "destinationAgentContactId": "2002"})),
        ("AgentToAgentChatRequestEvent", json!({"secondAgentContactId": "2002"})),
        ("ConferenceAgentTelephoneLinesEvent", i.clone()),
        ("InitiateEmailInteractionEvent", json!({"toAddress": "x@example.test"})),
        ("EndPostProcessingEvent", i.clone()),
        ("DeleteInteractionEvent", i.clone()),
        ("EndEmailInteractionEvent", i.clone()),
        ("ForwardInteractionEvent", i.clone()),
        ("BlindTransferEvent", json!({"interactionId": "i-1", "destinationAgentContactId": "2002"})),
        ("AcceptInteractionEvent", i.clone()),
        ("TransferAgentTelephoneLinesEvent", i.clone()),
        ("HangupAgentTelephoneLineEvent", i.clone()),
        ("HangupParticipantTelephoneLineEvent", json!({"interactionId": "i-1", "participantId": "p"})),
        ("MuteAgentTelephoneLineEvent", i.clone()),
        ("UnmuteAgentTelephoneLineEvent", i.clone()),
        ("RejectInteractionEvent", i.clone()),
        ("SkipOutboundCampaignEvent", json!({"campaignId": "c"})),
        ("StartOutboundCampaignEvent", json!({"campaignId": "c"})),
        ("ChangeAgentStateEvent", json!({"state": "Away"})),
        ("ChangeAgentSubStateEvent", json!({"subState": "Lunch"})),
        ("SetAgentNextStatusEvent", json!({"nextStatus": "Away"})),
        ("TclAndDispositionRequestEvent", i.clone()),
        ("PhoneValidationValidateEvent", json!({"phoneNumber": "+15550100"})),
        ("PhoneVerificationPinEvent", json!({"pin": "1234"})),
        ("PhoneValidationCancelEvent", json!({})),
        ("PhoneValidationStatusEvent", json!({})),
        ("SetOffHookConnectionEvent", json!({"enabled": true})),
        ("RejectOffHookEvent", json!({})),
        ("OffHookConnectionStatusEvent", json!({})),
        ("OffHookAuthPinValidationEvent", json!({"pin": "1234"})),
        ("OffHookCancelledEvent", json!({})),
    ]
}

async fn with_colleague() -> (TestBridge, Client) {
    let b = TestBridge::start().await;
    b.provision("t1", "a1", "1001", false).await;
    b.provision("t1", "a2", "2002", false).await;
    b.provision("t2", "b1", "3003", false).await;
    let (c, _) = b.agent("t1", "a1").await;
    (b, c)
}

#[tokio::test]
async fn all_36_actions_are_published_with_the_identity_injected() {
    let (b, mut c) = with_colleague().await;
    let actions = all_actions();
    assert_eq!(actions.len(), 36);
    for (n, (name, details)) in actions.iter().enumerate() {
        let uuid = format!("act-{n}");
        let reply = c.action(&uuid, name, details.clone()).await;
        assert!(matches!(&reply, ServerMessage::Ack { uuid: u } if *u == uuid), "{name}: {reply:?}");
    }
    let published = b.published().await;
    assert_eq!(published.len(), 36);
    for (rec, (name, _)) in published.iter().zip(&actions) {
        assert_eq!(rec["record"], *name);
        assert_eq!(rec["key"], "a1");
        let v = &rec["value"];
        assert_eq!(
            (&v["tenantGuid"], &v["agentGuid"], &v["irInstance"]),
            (&json!("t1"), &json!("a1"), &json!("ir-1")),
            "{name}"
        );
        assert_eq!(
            (&v["isSystemAction"], &v["isRelocate"], &v["source"]),
            (&json!(false), &json!(false), &json!("CCEB")),
            "{name}"
        );
    }
    let transfer = published.iter().find(|r| r["record"] == "BlindTransferEvent").expect("published");
    assert_eq!(transfer["value"]["destinationAgentGuid"], "a2");
    assert!(transfer["value"].get("destinationAgentContactId").is_none());
    let chat = published.iter().find(|r| r["record"] == "AgentToAgentChatRequestEvent").expect("published");
    assert_eq!(chat["value"]["secondAgentGuid"], "a2");
}

#[tokio::test]
async fn source_name_is_configurable() {
    let b = TestBridge::with(|s| s.source_name = "edge-7".into()).await;
    let (mut c, _) = b.agent("t", "a").await;
    c.action("x", "ChangeAgentStateEvent", json!({"state":"Away"})).await;
    assert_eq!(b.published().await[0]["value"]["source"], "edge-7");
}

#[tokio::test]
async fn reserved_fields_are_refused_by_name_and_nothing_is_published() {
    let (b, mut c) = with_colleague().await;
    for field in ["irInstance", "tenantGuid", "agentGuid", "isSystemAction", "isRelocate", "source"] {
        let mut details = json!({"interactionId": "i-1"});
        details[field] = json!("x");
        c.send(
            json!({"type":"action","uuid": field,"data":{"action":"AcceptInteractionEvent","action_details": details}}),
        )
        .await;
        assert_eq!(c.expect_error(field, ErrorCode::ReservedField).await.as_deref(), Some(field));
    }
    assert!(b.published().await.is_empty());
}

#[tokio::test]
async fn unknown_actions_are_refused() {
    let (b, mut c) = with_colleague().await;
    for name in ["DoSomethingEvent", "AgentChatAvailabilityEvent", "InteractionUpdateEvent"] {
        c.send(json!({"type":"action","uuid": name,"data":{"action": name,"action_details":{}}})).await;
        c.expect_error(name, ErrorCode::UnknownAction).await;
    }
    assert!(b.published().await.is_empty());
}

#[tokio::test]
async fn schema_violations_name_the_field() {
    let (b, mut c) = with_colleague().await;
    let cases = [
        ("AcceptInteractionEvent", json!({}), "interactionId"),
        ("AcceptInteractionEvent", json!({"interactionId": 42}), "interactionId"),
        ("UpdateInteractionEvent", json!({"interactionId": "i", "channel": "PIGEON"}), "channel"),
        ("SetOffHookConnectionEvent", json!({"enabled": "yes"}), "enabled"),
        ("ChangeAgentStateEvent", json!({"state": "Away", "stat": "typo"}), "stat"),
    ];
    for (n, (name, details, field)) in cases.into_iter().enumerate() {
        let uuid = format!("bad-{n}");
        c.send(json!({"type":"action","uuid": uuid,"data":{"action": name,"action_details": details}})).await;
        assert_eq!(c.expect_error(&uuid, ErrorCode::InvalidActionDetails).await.as_deref(), Some(field));
    }
    assert!(b.published().await.is_empty());
}

#[tokio::test]
async fn agents_outside_the_callers_tenant_are_unknown() {
    let (b, mut c) = with_colleague().await;
    let cases = [
        (
            "BlindTransferEvent",
            json!({"interactionId": "i", "destinationAgentContactId": "3003"}),
            "destinationAgentContactId",
        ),
        (
            "BlindTransferEvent",
            json!({"interactionId": "i", "destinationAgentContactId": "9999"}),
            "destinationAgentContactId",
        ),
        ("BlindTransferEvent", json!({"interactionId": "i", "destinationAgentGuid": "b1"}), "destinationAgentGuid"),
        ("AgentToAgentChatRequestEvent", json!({"secondAgentGuid": "b1"}), "secondAgentGuid"),
        ("AgentToAgentChatRequestEvent", json!({"secondAgentContactId": "3003"}), "secondAgentContactId"),
    ];
    for (n, (name, details, field)) in cases.into_iter().enumerate() {
        let uuid = format!("x-{n}");
        c.send(json!({"type":"action","uuid": uuid,"data":{"action": name,"action_details": details}})).await;
        assert_eq!(c.expect_error(&uuid, ErrorCode::UnknownAgent).await.as_deref(), Some(field));
    }
    assert!(b.published().await.is_empty());
    // A GUID of the caller's own tenant is accepted as given.
    c.action("ok", "BlindTransferEvent", json!({"interactionId": "i", "destinationAgentGuid": "a2"})).await;
    assert_eq!(b.published().await.len(), 1);
}

#[tokio::test]
async fn the_same_action_uuid_is_acked_again_and_published_once() {
    let (b, mut c) = with_colleague().await;
    c.expect_ack_of_action("dup", "AcceptInteractionEvent", json!({"interactionId": "i-1"})).await;
    c.expect_ack_of_action("dup", "AcceptInteractionEvent", json!({"interactionId": "i-1"})).await;
    // Another session of the same agent retrying the same uuid is deduplicated too.
    let (mut c2, _) = b.agent("t1", "a1").await;
    c2.expect_ack_of_action("dup", "AcceptInteractionEvent", json!({"interactionId": "i-1"})).await;
    // Another agent may use the same uuid.
    let (mut other, _) = b.agent("t1", "a2").await;
    other.expect_ack_of_action("dup", "AcceptInteractionEvent", json!({"interactionId": "i-1"})).await;
    let published = b.published().await;
    assert_eq!(published.len(), 2);
    assert_eq!((&published[0]["key"], &published[1]["key"]), (&json!("a1"), &json!("a2")));
}

#[tokio::test]
async fn another_tenants_traffic_does_not_make_the_bridge_forget_a_tenants_action_uuids() {
    let b = TestBridge::with(|s| s.dedup_capacity = 3).await;
    let (mut mine, _) = b.agent("t1", "a1").await;
    let (mut theirs, _) = b.agent("t2", "b1").await;
    let away = json!({"state": "Away"});
    mine.expect_ack_of_action("retried", "ChangeAgentStateEvent", away.clone()).await;
    for n in 0..10 {
        theirs.expect_ack_of_action(&format!("busy-{n}"), "ChangeAgentStateEvent", away.clone()).await;
    }
    mine.expect_ack_of_action("retried", "ChangeAgentStateEvent", away.clone()).await;
    let published = b.published().await;
    assert_eq!(published.len(), 11, "the retry is acked as a duplicate, not published again");
    assert_eq!(published.iter().filter(|r| r["key"] == "a1").count(), 1);
    // The bound still holds: the busy tenant's own traffic evicted its oldest
    // uuids. On Redis there is no count bound (each key expires after its
    // window, Redis's memory bounds them): the uuid is still known.
    theirs.expect_ack_of_action("busy-0", "ChangeAgentStateEvent", away).await;
    let bounded = b.settings().store == cceb::config::StoreKind::Embedded;
    assert_eq!(b.published().await.len(), if bounded { 12 } else { 11 });
}

#[tokio::test]
async fn actions_are_published_in_the_order_sent() {
    let b = TestBridge::with(|s| {
        s.action_burst = 500;
        s.max_pending_actions = 500;
    })
    .await;
    let (mut c, _) = b.agent("t", "a").await;
    for n in 0..200 {
        c.send(json!({"type":"action","uuid": format!("o-{n}"),"data":{"action":"UpdateInteractionEvent","action_details":{"interactionId": format!("i-{n}")}}})).await;
    }
    for n in 0..200 {
        c.expect_ack(&format!("o-{n}")).await;
    }
    let ids: Vec<String> =
        b.published().await.iter().map(|r| r["value"]["interactionId"].as_str().unwrap_or("").to_owned()).collect();
    let expected: Vec<String> = (0..200).map(|n| format!("i-{n}")).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn too_many_actions_are_rate_limited() {
    let b = TestBridge::with(|s| {
        s.action_burst = 3;
        s.action_rate_per_second = 0.001;
    })
    .await;
    let (mut c, _) = b.agent("t", "a").await;
    for n in 0..3 {
        c.expect_ack_of_action(&format!("ok-{n}"), "ChangeAgentStateEvent", json!({"state":"Away"})).await;
    }
    c.send(json!({"type":"action","uuid":"over","data":{"action":"ChangeAgentStateEvent","action_details":{"state":"Away"}}})).await;
    c.expect_error("over", ErrorCode::RateLimited).await;
    assert_eq!(b.published().await.len(), 3);
    c.round_trip("still-open").await;
}

#[tokio::test]
async fn the_tenant_directory_follows_provisioning_updates_and_deletes() {
    let (b, mut c) = with_colleague().await;
    b.event("AgentUpdatedEvent", json!({"tenantGuid":"t1","agentGuid":"a2","deltas":{"contactId":"2222"}})).await;
    assert_eq!(c.notification().await.0, NotificationType::Provisioning, "tenant-wide, so a1 sees it too");
    let transfer = |contact: &str| json!({"interactionId": "i", "destinationAgentContactId": contact});
    c.send(
        json!({"type":"action","uuid":"old","data":{"action":"BlindTransferEvent","action_details": transfer("2002")}}),
    )
    .await;
    c.expect_error("old", ErrorCode::UnknownAgent).await;
    c.expect_ack_of_action("new", "BlindTransferEvent", transfer("2222")).await;
    assert_eq!(b.published().await[0]["value"]["destinationAgentGuid"], "a2");
    b.event("AgentDeletedEvent", json!({"tenantGuid":"t1","agentGuid":"a2"})).await;
    assert_eq!(c.notification().await.0, NotificationType::Provisioning);
    c.send(json!({"type":"action","uuid":"gone","data":{"action":"BlindTransferEvent","action_details": transfer("2222")}})).await;
    c.expect_error("gone", ErrorCode::UnknownAgent).await;
}

#[tokio::test]
async fn deduplication_and_the_tenant_directory_survive_a_restart() {
    let (mut b, mut c) = with_colleague().await;
    let transfer = json!({"interactionId": "i", "destinationAgentContactId": "2002"});
    c.expect_ack_of_action("before", "BlindTransferEvent", transfer.clone()).await;
    drop(c);
    b.restart().await;
    let (mut c, _) = b.agent("t1", "a1").await;
    c.expect_ack_of_action("before", "BlindTransferEvent", transfer.clone()).await;
    assert!(b.published().await.is_empty(), "a retry after the restart is not published again");
    c.expect_ack_of_action("after", "BlindTransferEvent", transfer).await;
    assert_eq!(b.published().await[0]["value"]["destinationAgentGuid"], "a2", "the contact id still resolves");
}

/// `cceb-client` sends an action refused with `rate_limited` again under the
/// same uuid: the refusal must not have taken the uuid, or the retry would be
/// acked as a duplicate and never published.
#[tokio::test]
async fn an_action_refused_as_rate_limited_is_published_when_retried_with_the_same_uuid() {
    let b = TestBridge::with(|s| {
        s.action_burst = 1;
        s.action_rate_per_second = 20.0;
    })
    .await;
    let (mut c, _) = b.agent("t", "a").await;
    c.expect_ack_of_action("first", "ChangeAgentStateEvent", json!({"state": "Away"})).await;
    let mut refused = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match c.action("again", "ChangeAgentStateEvent", json!({"state": "Available"})).await {
            ServerMessage::Ack { uuid } if uuid == "again" => break,
            ServerMessage::Error { uuid, error } if uuid == "again" && error.code == ErrorCode::RateLimited => {
                refused += 1
            }
            other => panic!("expected ack or rate_limited, got {other:?}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "the bucket refills");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused > 0, "the burst of one was spent: the first try is refused");
    let states: Vec<Value> = b.published().await.iter().map(|r| r["value"]["state"].clone()).collect();
    assert_eq!(states, [json!("Away"), json!("Available")], "the retry is published, once");
}

#[tokio::test]
async fn past_max_pending_actions_behind_the_one_in_flight_an_action_is_refused_as_rate_limited() {
    const MAX_PENDING: usize = 2;
    // The default burst (100) is far from spent: only the queue refuses.
    let b = TestBridge::with(|s| s.max_pending_actions = MAX_PENDING).await;
    if b.skip_on_kafka("the action in flight is held by the embedded bus's hold switch") {
        return;
    }
    let (mut c, _) = b.agent("t", "a").await;
    let action = |n: usize| json!({"type":"action","uuid": format!("q-{n}"),"data":{"action":"UpdateInteractionEvent","action_details":{"interactionId": format!("i-{n}")}}});
    b.set_bus_hold(true).await;
    c.send(action(0)).await;
    tokio::time::timeout(PATIENCE, async {
        while b.bus_switches().await["waiting"] != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first action's publish reaches the bus");
    // MAX_PENDING wait behind it; the two after them are refused at once, while it is still held.
    for n in 1..=MAX_PENDING + 2 {
        c.send(action(n)).await;
    }
    let refused: Vec<(String, ErrorCode)> = c
        .round_trip("while-held")
        .await
        .into_iter()
        .map(|m| match m {
            ServerMessage::Error { uuid, error } => (uuid, error.code),
            other => panic!("only refusals while the first action is held, got {other:?}"),
        })
        .collect();
    let expected: Vec<(String, ErrorCode)> =
        (MAX_PENDING + 1..=MAX_PENDING + 2).map(|n| (format!("q-{n}"), ErrorCode::RateLimited)).collect();
    assert_eq!(refused, expected, "the actions past the queue are refused, the queued ones wait");
    assert!(b.published().await.is_empty(), "nothing is published while the bus holds");
    b.set_bus_hold(false).await;
    for n in 0..=MAX_PENDING {
        c.expect_ack(&format!("q-{n}")).await;
    }
    // A refused action took no uuid: retried, it is published.
    c.send(action(MAX_PENDING + 1)).await;
    c.expect_ack(&format!("q-{}", MAX_PENDING + 1)).await;
    let ids: Vec<String> =
        b.published().await.iter().map(|r| r["value"]["interactionId"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(ids, ["i-0", "i-1", "i-2", "i-3"], "the queued ones in order, the retry after them; q-4 never");
}
