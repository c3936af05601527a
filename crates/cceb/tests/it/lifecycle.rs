//! A bridge's shutdown and a session's end, as clients see them (contract section 9).

use crate::support::*;
use cceb_protocol::outgoing::ServerMessage;

#[tokio::test]
async fn shutdown_closes_every_client_with_1012_and_stops_accepting() {
    let mut b = TestBridge::start().await;
    let (mut c1, _) = b.agent("t", "a").await;
    let (mut c2, _) = b.agent("t", "b").await;
    let url = b.ws_url();
    b.shutdown().await;
    assert_eq!(c1.closed().await.0, Some(1012));
    assert_eq!(c2.closed().await.0, Some(1012));
    assert!(tokio_tungstenite::connect_async(url).await.is_err(), "no new connections after shutdown");
}

#[tokio::test]
async fn end_session_is_acknowledged_then_closed_with_1000() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send(serde_json::json!({"type":"end_session","uuid":"bye"})).await;
    let (code, before) = c.closed().await;
    assert!(matches!(before.as_slice(), [ServerMessage::Ack { uuid }] if uuid == "bye"), "{before:?}");
    assert_eq!(code, Some(1000));
}

#[tokio::test]
async fn a_token_valid_for_centuries_is_served_and_its_session_is_released_on_close() {
    let b = TestBridge::start().await;
    // exp = about 10^19 seconds from the epoch: validly signed, far past what a timer can hold.
    let forever = token_ttl("t", "a", std::time::Duration::from_secs(10_000_000_000_000_000_000));
    let mut c = b.connect().await;
    let hello = c.hello_with(serde_json::json!({"token": forever, "long_lived": true})).await;
    assert!(c.round_trip("alive").await.is_empty(), "the connection is served");
    assert_eq!(b.metric("cceb_connections").await, 1.0);
    drop(c);
    let (mut again, r) = crate::sessions::resume(&b.ws_url(), "t", "a", &hello.session_key.expect("key")).await;
    assert!(r.resumed, "the closed connection released its session");
    assert!(again.round_trip("resumed").await.is_empty());
}

#[tokio::test]
async fn shutdown_lets_the_action_in_flight_finish_so_its_retry_after_the_restart_is_not_published_twice() {
    let mut b = TestBridge::start().await;
    if b.skip_on_kafka("the slow broker is the embedded bus's delay switch") {
        return;
    }
    let (mut c, _) = b.agent("t", "a").await;
    b.set_bus_delay(250).await;
    c.send(serde_json::json!({"type":"action","uuid":"A1","data":{"action":"ChangeAgentStateEvent","action_details":{"state":"Away"}}}))
        .await;
    // The action was read, and is publishing, before the ping is answered.
    assert!(c.round_trip("publishing").await.is_empty());
    let bridge = b.bridge.take().expect("running");
    let stopping = tokio::spawn(bridge.shutdown());
    let (code, before) = c.closed().await;
    assert!(matches!(before.as_slice(), [ServerMessage::Ack { uuid }] if uuid == "A1"), "{before:?}");
    assert_eq!(code, Some(1012));
    // Answers the close, so the bridge need not linger for it.
    c.socket_closed().await;
    stopping.await.expect("stopped");
    b.restart().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.expect_ack_of_action("A1", "ChangeAgentStateEvent", serde_json::json!({"state":"Away"})).await;
    assert!(b.published().await.is_empty(), "the retry is a duplicate: acknowledged, not published again");
}

#[tokio::test]
async fn a_publish_held_by_the_bus_does_not_outlive_shutdown() {
    let mut b = TestBridge::start().await;
    if b.skip_on_kafka("the held publish is the embedded bus's hold switch") {
        return;
    }
    b.set_bus_hold(true).await;
    // A long-lived hello publishes `available: true`: the bus holds it, and the hello with it.
    let mut c = b.connect().await;
    let token = token("t", "a");
    c.send(serde_json::json!({"type":"hello","uuid":"h","data":{"token": token, "long_lived": true}})).await;
    tokio::time::timeout(PATIENCE, async {
        while b.bus_switches().await["waiting"] != 1 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the hello's publish reaches the bus");
    // The hold is never released: shutdown must end the wait (else the
    // connection lives on for the hold's 30 s after the bridge "stopped").
    b.shutdown().await;
    let (code, _) = c.closed().await;
    assert_eq!(code, Some(1012), "closed by the drain, within the grace");
}
