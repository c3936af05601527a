//! Contract section 6, "survive a restart": the `cceb` binary stopped with
//! SIGTERM or killed with SIGKILL, then started again on the same data
//! directory. What was acknowledged to the backend (202) is never lost.

use crate::sessions::{long_lived, resume, states};
use crate::support::*;
use serde_json::{json, Value};

fn serve(data: &std::path::Path) -> Server {
    Server::spawn(cceb(data).args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET).env("CCEB_ADMIN_TOKEN", ADMIN))
}

async fn post(server: &Server, record: &str, value: Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/backend/v1/events", server.backend))
        .bearer_auth(ADMIN)
        .json(&json!({"record": record, "value": value}))
        .send()
        .await
        .expect("backend port answers");
    assert_eq!(r.status().as_u16(), 202);
}

async fn presence(server: &Server, state: &str) {
    post(server, "AgentPresenceEvent", json!({"tenantGuid": "t", "agentGuid": "a", "state": state})).await;
}

async fn published(server: &Server, record: &str) -> Vec<Value> {
    let page: Value = reqwest::Client::new()
        .get(format!("http://{}/backend/v1/actions?after=0", server.backend))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    page["records"].as_array().cloned().unwrap_or_default().into_iter().filter(|r| r["record"] == record).collect()
}

#[tokio::test]
async fn after_sigterm_every_session_resumes_and_every_unacked_notification_comes_again() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = serve(data.path());
    let mut c = Client::connect(&server.ws_url()).await;
    let hello = long_lived(&mut c, "t", "a", json!({})).await;
    let key = hello.session_key.expect("key");
    for s in ["s1", "s2", "s3"] {
        presence(&server, s).await;
    }
    let sent = states(&mut c, 3).await;
    c.ack(&sent[0].0).await;
    c.round_trip("acked").await;
    server.signal("-TERM");
    assert_eq!(c.closed().await.0, Some(1012));
    assert_eq!(server.wait().await.code(), Some(0));

    let server = serve(data.path());
    let (mut c, r) = resume(&server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    assert_eq!(r.session_id, hello.session_id);
    assert_eq!(states(&mut c, 2).await, sent[1..], "same uuid, seq and data");
    for (uuid, _, _) in &sent[1..] {
        c.ack(uuid).await;
    }
    presence(&server, "s4").await;
    assert_eq!(states(&mut c, 1).await[0].1, 4, "seq goes on after the restart");
    assert!(published(&server, "AgentChatAvailabilityEvent").await.is_empty(), "no transition, no record");
}

#[tokio::test]
async fn after_sigkill_everything_the_backend_port_accepted_is_delivered_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = serve(data.path());
    let mut c = Client::connect(&server.ws_url()).await;
    let hello = long_lived(&mut c, "t", "a", json!({"auto_accept": true})).await;
    let key = hello.session_key.expect("key");
    assert_eq!(published(&server, "AgentChatAvailabilityEvent").await.len(), 1);
    presence(&server, "s1").await;
    let first = states(&mut c, 1).await;
    drop(c);
    let offer = json!({"tenantGuid":"t","agentGuid":"a","interactionId":"i-1","state":"offered","channel":"CHAT"});
    post(&server, "InteractionUpdateEvent", offer.clone()).await;
    for s in ["s2", "s3"] {
        presence(&server, s).await;
    }
    assert_eq!(published(&server, "AcceptInteractionEvent").await.len(), 1);
    server.signal("-KILL");
    server.wait().await;

    let server = serve(data.path());
    post(&server, "InteractionUpdateEvent", offer).await;
    assert!(published(&server, "AcceptInteractionEvent").await.is_empty(), "auto-accept happened once");
    let (mut c, r) = resume(&server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got = states(&mut c, 5).await;
    assert_eq!(got[0], first[0], "the unacked one keeps its uuid and seq");
    let order: Vec<(u64, &str)> = got.iter().map(|(_, seq, s)| (*seq, s.as_str())).collect();
    assert_eq!(order, [(1, "s1"), (2, "offered"), (3, "s2"), (4, "s3"), (5, "offered")]);
    assert!(c.round_trip("no-duplicate").await.is_empty());
    assert!(published(&server, "AgentChatAvailabilityEvent").await.is_empty(), "still available: no new record");
}
