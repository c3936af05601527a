//! "Nothing lost silently": what the bridge does when its disk fails, when it
//! is killed under load, and when a source delivers again (contract sections
//! 5 and 6; README "What survives a restart"). Embedded store and bus: the
//! faults are injected into the SQLite journal from outside.

use crate::sessions::{long_lived, presence, states};
use crate::support::*;
use cceb_protocol::outgoing::ServerMessage;
use cceb_protocol::ErrorCode;
use serde_json::json;

/// Holds SQLite's write lock on the bridge's database, as a stuck disk or a
/// stray process would: every commit of the bridge fails until it is dropped.
struct WriteLock {
    _held: rusqlite::Connection,
}

impl WriteLock {
    fn take(b: &TestBridge) -> WriteLock {
        let c = rusqlite::Connection::open(b.data_dir().join("cceb.sqlite3")).expect("open the database");
        c.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
        WriteLock { _held: c }
    }
}

async fn readyz(b: &TestBridge) -> u16 {
    b.http.get(b.url("/readyz")).send().await.expect("answers").status().as_u16()
}

async fn until_ready(b: &TestBridge) {
    tokio::time::timeout(PATIENCE, async {
        while readyz(b).await != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("ready again");
}

fn mailbox_uuids(b: &TestBridge) -> Vec<String> {
    let c = rusqlite::Connection::open(b.data_dir().join("cceb.sqlite3")).expect("open");
    let mut st = c.prepare("SELECT uuid FROM mailbox ORDER BY seq").expect("query");
    let rows = st.query_map([], |r| r.get(0)).expect("rows");
    rows.collect::<Result<_, _>>().expect("uuids")
}

/// A bridge with a long-lived session of t/a; `None` on Kafka, where the
/// faults cannot be injected through the backend port, and on Redis, which
/// has no SQLite file to lock (`redis::*` takes Redis away instead).
async fn long_lived_agent() -> Option<(TestBridge, Client)> {
    let b = TestBridge::start().await;
    if b.skip_on_kafka("the fault is injected through the backend port")
        || b.skip_on_redis("the fault is SQLite's write lock; redis::* stops Redis instead")
    {
        return None;
    }
    let mut c = b.connect().await;
    long_lived(&mut c, "t", "a", json!({})).await;
    Some((b, c))
}

#[tokio::test]
async fn a_failed_commit_acknowledges_nothing_until_its_writes_are_durable() {
    let Some((b, mut c)) = long_lived_agent().await else { return };
    let lock = WriteLock::take(&b);
    let (status, _) = b
        .post_events(json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state":"s1"}}))
        .await;
    assert_eq!(status, 503, "the mailbox row could not be committed");
    assert_eq!(readyz(&b).await, 503);
    // An event that writes nothing at all is still not acknowledged while earlier writes wait.
    let (status, _) = b
        .post_events(json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"nobody","state":"x"}}))
        .await;
    assert_eq!(status, 503);
    let live = states(&mut c, 1).await;
    drop(lock);
    until_ready(&b).await;
    assert_eq!(mailbox_uuids(&b), [live[0].0.clone()], "the failed write was retried, not dropped");
    presence(&b, "t", "a", "s2").await;
}

#[tokio::test]
async fn an_array_retried_after_a_failed_commit_is_taken_once() {
    let Some((b, mut c)) = long_lived_agent().await else { return };
    let batch = json!([
        {"id": "e1", "record": "AgentPresenceEvent", "value": {"tenantGuid":"t","agentGuid":"a","state":"s1"}},
        {"id": "e2", "record": "AgentPresenceEvent", "value": {"tenantGuid":"t","agentGuid":"a","state":"s2"}},
    ]);
    let lock = WriteLock::take(&b);
    assert_eq!(b.post_events(batch.clone()).await.0, 503);
    let first = states(&mut c, 2).await;
    drop(lock);
    until_ready(&b).await;
    // The backend retries what it was refused.
    let (status, reply) = b.post_events(batch).await;
    assert_eq!(status, 202, "{reply}");
    assert!(c.round_trip("no-duplicates").await.is_empty(), "the retry queued nothing twice");
    let queued: Vec<String> = first.into_iter().map(|(uuid, _, _)| uuid).collect();
    assert_eq!(mailbox_uuids(&b), queued, "each event is in the mailbox once, durably");
}

#[tokio::test]
async fn while_the_store_cannot_write_actions_and_new_long_lived_sessions_are_refused_and_end_session_still_withdraws_availability(
) {
    let Some((b, mut c)) = long_lived_agent().await else { return };
    let lock = WriteLock::take(&b);
    // A write fails: the store is not ready until it is retried successfully.
    let (status, _) = b
        .post_events(json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state":"s1"}}))
        .await;
    assert_eq!(status, 503);
    states(&mut c, 1).await;
    match c.action("A1", "ChangeAgentStateEvent", json!({"state": "Away"})).await {
        ServerMessage::Error { uuid, error } => {
            assert_eq!((uuid.as_str(), error.code), ("A1", ErrorCode::BackendUnavailable))
        }
        other => panic!("expected backend_unavailable, got {other:?}"),
    }
    let mut other = b.connect().await;
    other.send(json!({"type":"hello","uuid":"h","data":{"token": token("t", "b"), "long_lived": true}})).await;
    assert_eq!(other.closed().await.0, Some(1012), "no key is handed out that could not be made durable");
    c.send(json!({"type":"end_session","uuid":"E1"})).await;
    c.expect_error("E1", ErrorCode::BackendUnavailable).await;
    drop(lock);
    until_ready(&b).await;
    let off = tokio::time::timeout(PATIENCE, async {
        loop {
            let records = b.published().await;
            if let Some(r) =
                records.iter().find(|r| r["record"] == "AgentChatAvailabilityEvent" && r["value"]["available"] == false)
            {
                return r.clone();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(off.is_ok(), "the ended session's availability is withdrawn once the disk is back");
    assert!(
        b.published().await.iter().all(|r| r["record"] != "ChangeAgentStateEvent"),
        "nothing published while refusing"
    );
}
