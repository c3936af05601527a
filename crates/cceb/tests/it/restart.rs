//! Contract section 6, "survive a restart": the `cceb` binary stopped with
//! SIGTERM or killed with SIGKILL, then started again on the same data
//! directory. What was acknowledged to the backend (202 from the backend port,
//! or committed from Kafka) is never lost. Runs on both buses.

use crate::kafka_backend::{brokers, KafkaBackend};
use crate::sessions::{long_lived, resume, states};
use crate::support::*;
use serde_json::{json, Value};

/// The backend side of spawned bridges sharing one data directory: their
/// backend port, or their Kafka topics when the suite runs on Kafka.
struct Backend {
    kafka: Option<KafkaBackend>,
    data: tempfile::TempDir,
    /// Published actions before this offset belong to an earlier process.
    mark: u64,
}

impl Backend {
    async fn new() -> Backend {
        let kafka = match brokers() {
            Some(b) => Some(KafkaBackend::create(&b, &mut test_settings()).await),
            None => None,
        };
        Backend { kafka, data: tempfile::tempdir().expect("tempdir"), mark: 0 }
    }

    /// Starts `cceb serve` and waits until it is ready.
    async fn serve(&mut self) -> Server {
        if let (None, Some(url)) = (&self.kafka, redis_url()) {
            // The log outlives the process there: what is new starts after it.
            self.mark = shared_log_end(&url, &data_prefix(self.data.path())).await;
        }
        let mut cmd = cceb(self.data.path());
        cmd.args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET).env("CCEB_ADMIN_TOKEN", ADMIN);
        for (k, v) in self.kafka.iter().flat_map(KafkaBackend::env) {
            cmd.env(k, v);
        }
        if self.kafka.is_some() {
            // A killed member holds its partitions until its session times out
            // (librdkafka's default: 45 s); the restarted bridge waits that long.
            cmd.env("CCEB_KAFKA_PROPERTIES", r#"{"session.timeout.ms"="6000","heartbeat.interval.ms"="1000"}"#);
        }
        let server = Server::spawn(&mut cmd);
        // The backend port's log starts empty with every process (in memory),
        // or goes on from `mark` (in Redis).
        if let Some(k) = &self.kafka {
            k.wait_ready(server.addr.parse().expect("an address")).await;
            self.mark = k.actions_after(0, 0).await["next"].as_u64().unwrap_or(0);
        }
        server
    }

    /// An event the backend acknowledged: 202 from the port, or committed from Kafka.
    async fn post(&self, server: &Server, record: &str, value: Value) {
        if let Some(k) = &self.kafka {
            return k.produce_event(&k.events_topic, record, value).await;
        }
        let r = reqwest::Client::new()
            .post(format!("http://{}/backend/v1/events", server.backend))
            .bearer_auth(ADMIN)
            .json(&json!({"record": record, "value": value}))
            .send()
            .await
            .expect("backend port answers");
        assert_eq!(r.status().as_u16(), 202);
    }

    async fn presence(&self, server: &Server, state: &str) {
        self.post(server, "AgentPresenceEvent", json!({"tenantGuid": "t", "agentGuid": "a", "state": state})).await;
    }

    /// Records of `record` the running process published.
    async fn published(&self, server: &Server, record: &str) -> Vec<Value> {
        let page: Value = match &self.kafka {
            Some(k) => k.actions_after(self.mark, 0).await,
            None => backend_actions(&reqwest::Client::new(), &server.backend, self.mark, 0).await,
        };
        page["records"].as_array().cloned().unwrap_or_default().into_iter().filter(|r| r["record"] == record).collect()
    }
}

#[tokio::test]
async fn after_sigterm_every_session_resumes_and_every_unacked_notification_comes_again() {
    let mut backend = Backend::new().await;
    let server = backend.serve().await;
    let mut c = Client::connect(&server.ws_url()).await;
    let hello = long_lived(&mut c, "t", "a", json!({})).await;
    let key = hello.session_key.expect("key");
    for s in ["s1", "s2", "s3"] {
        backend.presence(&server, s).await;
    }
    let sent = states(&mut c, 3).await;
    c.ack(&sent[0].0).await;
    c.round_trip("acked").await;
    server.signal("-TERM");
    assert_eq!(c.closed().await.0, Some(1012));
    assert_eq!(server.wait().await.code(), Some(0));

    let server = backend.serve().await;
    let (mut c, r) = resume(&server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    assert_eq!(r.session_id, hello.session_id);
    assert_eq!(states(&mut c, 2).await, sent[1..], "same uuid, seq and data");
    for (uuid, _, _) in &sent[1..] {
        c.ack(uuid).await;
    }
    backend.presence(&server, "s4").await;
    assert!(states(&mut c, 1).await[0].1 > sent[2].1, "seq goes on increasing after the restart (gaps allowed)");
    assert!(c.round_trip("no-duplicate").await.is_empty(), "nothing consumed twice");
    assert!(backend.published(&server, "AgentChatAvailabilityEvent").await.is_empty(), "no transition, no record");
}

#[tokio::test]
async fn after_sigkill_everything_the_backend_acknowledged_is_delivered_once() {
    let mut backend = Backend::new().await;
    let server = backend.serve().await;
    let mut c = Client::connect(&server.ws_url()).await;
    let hello = long_lived(&mut c, "t", "a", json!({"auto_accept": true})).await;
    let key = hello.session_key.expect("key");
    assert_eq!(backend.published(&server, "AgentChatAvailabilityEvent").await.len(), 1);
    backend.presence(&server, "s1").await;
    let first = states(&mut c, 1).await;
    drop(c);
    let offer = json!({"tenantGuid":"t","agentGuid":"a","interactionId":"i-1","state":"offered","channel":"CHAT"});
    backend.post(&server, "InteractionUpdateEvent", offer.clone()).await;
    for s in ["s2", "s3"] {
        backend.presence(&server, s).await;
    }
    assert_eq!(backend.published(&server, "AcceptInteractionEvent").await.len(), 1);
    server.signal("-KILL");
    server.wait().await;

    let server = backend.serve().await;
    backend.post(&server, "InteractionUpdateEvent", offer).await;
    assert!(backend.published(&server, "AcceptInteractionEvent").await.is_empty(), "auto-accept happened once");
    let (mut c, r) = resume(&server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got = states(&mut c, 5).await;
    assert_eq!(got[0], first[0], "the unacked one keeps its uuid and seq");
    let order: Vec<(u64, &str)> = got.iter().map(|(_, seq, s)| (*seq, s.as_str())).collect();
    assert_eq!(order[..4], [(1, "s1"), (2, "offered"), (3, "s2"), (4, "s3")]);
    assert_eq!(order[4].1, "offered");
    assert!(order[4].0 > 4, "a seq is never used twice, even after a crash (gaps allowed)");
    assert!(c.round_trip("no-duplicate").await.is_empty());
    assert!(
        backend.published(&server, "AgentChatAvailabilityEvent").await.is_empty(),
        "still available: no new record"
    );
}

#[tokio::test]
async fn a_seq_sent_before_a_crash_is_never_given_to_another_notification() {
    let mut backend = Backend::new().await;
    if backend.kafka.is_some() {
        eprintln!("skipped on Kafka: the not-yet-durable notification is made through the backend port");
        return;
    }
    if redis_url().is_some() {
        eprintln!("skipped on Redis: the fault is SQLite's write lock; redis::* stops Redis instead");
        return;
    }
    let server = backend.serve().await;
    let mut c = Client::connect(&server.ws_url()).await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    // The disk stops taking writes: the notification reaches the connected
    // client (seq N) but is not durable, and the backend gets 503.
    let lock = rusqlite::Connection::open(backend.data.path().join("cceb.sqlite3")).expect("open");
    lock.execute_batch("BEGIN IMMEDIATE").expect("write lock");
    let r = reqwest::Client::new()
        .post(format!("http://{}/backend/v1/events", server.backend))
        .bearer_auth(ADMIN)
        .json(&json!({"record": "AgentPresenceEvent", "value": {"tenantGuid": "t", "agentGuid": "a", "state": "lost"}}))
        .send()
        .await
        .expect("answers");
    assert_eq!(r.status().as_u16(), 503);
    let seen = states(&mut c, 1).await;
    server.signal("-KILL");
    server.wait().await;
    drop(lock);

    let server = backend.serve().await;
    let (mut c, r) = resume(&server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    backend.presence(&server, "next").await;
    let after = states(&mut c, 1).await;
    assert_eq!(after[0].2, "next");
    assert!(after[0].1 > seen[0].1, "seq {} was already used by another notification before the crash", seen[0].1);
}
