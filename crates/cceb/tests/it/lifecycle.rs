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
