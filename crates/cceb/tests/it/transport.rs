//! Contract section 1 (transport) and section 2 (envelope), plus health and metrics.

use crate::support::*;
use cceb_protocol::outgoing::ServerMessage;
use cceb_protocol::ErrorCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn discovery_hands_out_the_endpoint_for_a_valid_token_only() {
    let b = TestBridge::with(|s| {
        s.public_url = Some("wss://cceb.example.test".into());
        s.node_id = "node-7".into();
    })
    .await;
    let r = b.http.get(b.url("/v1/discovery")).bearer_auth(token("t1", "a1")).send().await.expect("answers");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body, json!({"endpoint": "wss://cceb.example.test/ws/v1", "node_id": "node-7"}));

    for auth in [Some("Bearer nonsense"), None] {
        let mut req = b.http.get(b.url("/v1/discovery"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.expect("answers");
        assert_eq!(r.status().as_u16(), 401);
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["code"], "unauthorized");
        assert!(body["message"].is_string());
    }
}

#[tokio::test]
async fn discovery_defaults_to_the_listen_address() {
    let b = TestBridge::start().await;
    assert_eq!(discover(b.addr, &token("t", "a")).await["endpoint"], format!("ws://{}/ws/v1", b.addr));
}

#[tokio::test]
async fn binary_frame_closes_with_1003() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(c.closed().await.0, Some(1003));
}

#[tokio::test]
async fn oversize_frame_closes_with_1009() {
    let b = TestBridge::with(|s| s.max_frame_bytes = 1024).await;
    let (mut c, _) = b.agent("t", "a").await;
    let big = json!({"type":"ping","uuid":"p","pad":"x".repeat(4096)});
    c.send(big).await;
    assert_eq!(c.closed().await.0, Some(1009));
}

#[tokio::test]
async fn frame_at_the_limit_is_accepted() {
    let b = TestBridge::with(|s| s.max_frame_bytes = 1024).await;
    let (mut c, _) = b.agent("t", "a").await;
    let frame = |pad: usize| json!({"type":"ping","uuid":"p","pad":"x".repeat(pad)}).to_string();
    let msg = frame(1024 - frame(0).len());
    assert_eq!(msg.len(), 1024);
    c.send_text(&msg).await;
    assert!(matches!(c.next().await, ServerMessage::Pong { uuid } if uuid == "p"));
}

#[tokio::test]
async fn app_level_ping_gets_pong_with_the_same_uuid() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send(json!({"type":"ping","uuid":"ping-42"})).await;
    assert!(matches!(c.next().await, ServerMessage::Pong { uuid } if uuid == "ping-42"));
}

#[tokio::test]
async fn server_pings_and_keeps_a_client_that_answers() {
    let b = TestBridge::with(|s| s.heartbeat_interval_ms = 50).await;
    let (mut c, _) = b.agent("t", "a").await;
    // Reading answers the server's pings (tungstenite replies with pongs), for
    // 6 intervals, twice what closes a silent client.
    for _ in 0..6 {
        let frame = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(c.ws_mut())).await;
        match frame.expect("the server sends protocol pings") {
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    c.round_trip("still-open").await;
}

#[tokio::test]
async fn silent_client_is_closed_after_three_missed_heartbeats() {
    let b = TestBridge::with(|s| s.heartbeat_interval_ms = 50).await;
    let (mut c, _) = b.agent("t", "a").await;
    // Do not read (so no pong goes back) for twice 3 intervals.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(c.closed().await.0, Some(1001));
}

#[tokio::test]
async fn malformed_messages_get_errors_and_the_connection_stays_open() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send_text("{not json").await;
    c.expect_error_any(ErrorCode::InvalidJson).await;
    c.send_text("[1,2]").await;
    c.expect_error_any(ErrorCode::InvalidMessage).await;
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.expect_error_any(ErrorCode::InvalidMessage).await.as_deref(), Some("uuid"));
    c.send_text(r#"{"uuid":"u1"}"#).await;
    assert_eq!(c.expect_error("u1", ErrorCode::InvalidMessage).await.as_deref(), Some("type"));
    c.send_text(r#"{"type":"action","uuid":"u2","data":"x"}"#).await;
    assert_eq!(c.expect_error("u2", ErrorCode::InvalidMessage).await.as_deref(), Some("data"));
    c.send_text(r#"{"type":"subscribe","uuid":"u3"}"#).await;
    c.expect_error("u3", ErrorCode::UnknownType).await;
    c.send_text(r#"{"type":"ack","uuid":"never-sent","extra":{"ignored":true}}"#).await;
    let before = c.round_trip("alive").await;
    assert!(before.is_empty(), "an ack of an unknown uuid is ignored: {before:?}");
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let b = TestBridge::start().await;
    let get = |p: &str| b.http.get(b.url(p)).send();
    assert_eq!(get("/healthz").await.expect("answers").status().as_u16(), 200);
    let ready = get("/readyz").await.expect("answers");
    assert_eq!(ready.status().as_u16(), 200);
    let (mut c, _) = b.agent("t-metrics", "a").await;
    c.send_text("nope").await;
    c.expect_error_any(ErrorCode::InvalidJson).await;
    c.expect_ack_of_action("m1", "ChangeAgentStateEvent", json!({"state": "Away"})).await;
    c.send(json!({"type":"action","uuid":"m2","data":{"action":"MadeUpEvent-12345"}})).await;
    c.expect_error("m2", ErrorCode::UnknownAction).await;
    b.event("AgentPresenceEvent", json!({"tenantGuid": "t-metrics", "agentGuid": "a", "state": "Away"})).await;
    let (_, uuid, _, _) = c.notification().await;
    c.ack(&uuid).await;
    c.round_trip("acked").await;
    let text = get("/metrics").await.expect("answers").text().await.expect("text");
    // Series are registered at start-up (at 0), and every bridge has its own
    // recorder: each value is exactly what this test did.
    for (series, want) in [
        ("cceb_connections", 1.0),
        ("cceb_sessions", 1.0),
        ("cceb_errors_total{code=\"invalid_json\"}", 1.0),
        ("cceb_errors_total{code=\"unknown_action\"}", 1.0),
        ("cceb_notifications_sent_total{type=\"presence\"}", 1.0),
        ("cceb_notifications_acked_total", 1.0),
        ("cceb_actions_total{record=\"ChangeAgentStateEvent\",outcome=\"published\"}", 1.0),
        ("cceb_actions_total{record=\"unknown\",outcome=\"unknown_action\"}", 1.0),
        ("cceb_events_total{outcome=\"accepted\"}", 1.0),
        ("cceb_notification_ack_seconds_count", 1.0),
        ("cceb_action_seconds_count", 2.0),
        ("cceb_event_ingest_seconds_count", 1.0),
    ] {
        assert_eq!(metric_value(&text, series), want, "{series} counts exactly what this test did");
    }
    assert!(text.contains("cceb_notifications_redelivered_total"));
    assert!(!text.contains("MadeUpEvent"), "client-chosen names never become labels");
}

#[tokio::test]
async fn abuse_from_one_client_leaves_the_others_unharmed() {
    let b = TestBridge::with(|s| s.max_frame_bytes = 1024).await;
    let (mut good, _) = b.agent("t", "good").await;
    for abuse in [
        Message::text("{"),
        Message::text("[]"),
        Message::text(
            r#"{"type":"action","uuid":"x","data":{"action":"AcceptInteractionEvent","action_details":{"interactionId":{"deep":[1,2,{"x":null}]}}}}"#,
        ),
        Message::text("x".repeat(4096)),
        Message::binary(vec![0u8; 16]),
    ] {
        let (mut bad, _) = b.agent("t", "bad").await;
        bad.send_raw(abuse).await;
        let _ = bad.read().await;
    }
    b.event("AgentPresenceEvent", json!({"tenantGuid":"t","agentGuid":"good","state":"Away"})).await;
    let (_, uuid, seq, _) = good.notification().await;
    assert_eq!(seq, 1);
    good.ack(&uuid).await;
    assert_eq!(b.http.get(b.url("/healthz")).send().await.expect("answers").status().as_u16(), 200);
}

/// Most bytes the kernel buffers for a socket it sends on (Linux autotunes
/// the send buffer up to `tcp_wmem`'s maximum); 4 MiB, the usual maximum,
/// where that cannot be read.
fn max_send_buffer() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|v| v.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * 1024 * 1024)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);
    // One notification more than the bridge's send buffer and the client's
    // (pinned small below) can hold together: its write cannot finish.
    let size = max_send_buffer() + 1024 * 1024;
    let b = TestBridge::with(|s| {
        s.write_timeout_ms = WRITE_TIMEOUT.as_millis() as u64;
        s.max_notification_bytes = size + 1024;
        s.backend_max_body_bytes = 2 * size;
    })
    .await;
    if b.skip_on_kafka(
        "megabytes in one record, past a broker's default limit; the write timeout does not depend on the bus",
    ) {
        return;
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // A fixed receive buffer: the kernel does not grow it for a client that does not read.
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let stream = socket.connect(b.addr).await.expect("connects");
    let (mut deaf, _) = tokio_tungstenite::client_async(b.ws_url(), stream).await.expect("upgrade");
    let hello = json!({"type": "hello", "uuid": "h", "data": {"token": token("t", "deaf")}});
    futures_util::SinkExt::send(&mut deaf, Message::text(hello.to_string())).await.expect("sent");
    let reply = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut deaf)).await.expect("answered");
    let reply: Value =
        serde_json::from_str(reply.expect("a frame").expect("a frame").to_text().expect("text")).expect("json");
    assert_eq!(reply["type"], "hello_reply", "{reply}");
    assert_eq!(b.metric("cceb_connections").await, 1.0);

    // From here on the client reads nothing.
    let started = tokio::time::Instant::now();
    b.event("AgentPresenceEvent", json!({"tenantGuid": "t", "agentGuid": "deaf", "state": "x".repeat(size)})).await;
    tokio::time::timeout(PATIENCE, async {
        while b.metric("cceb_connections").await > 0.0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the bridge drops a client that does not read");
    assert!(started.elapsed() >= WRITE_TIMEOUT, "dropped after {:?}, before the write timeout", started.elapsed());
    // The session was detached before the connection was uncounted; a short-lived one ends with it.
    assert_eq!(b.metric("cceb_sessions").await, 0.0);
    drop(deaf);
}
