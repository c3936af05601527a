//! The Redis store (`store = "redis"`) through a Redis outage: the bridge
//! stops taking what it cannot make durable, keeps its clients, and resumes
//! by itself once Redis is back, having lost nothing it acknowledged. Runs
//! only when the suite has a Redis (`CCEB_TEST_REDIS`), on a redis-server of
//! its own that it kills and starts again on the same port and directory.

use crate::sessions::{long_lived, presence, resume, states};
use crate::support::*;
use cceb::config::StoreKind;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A redis-server of one test: append-only file fsynced on every write, so
/// whatever it acknowledged survives its kill. Shared with `cluster_chaos`.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub(crate) fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let mut s = RedisServer { child: None, port, dir: tempfile::tempdir().expect("tempdir") };
        s.spawn();
        s
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
    }

    /// Waits until it answers PING.
    pub(crate) async fn answering(&self) {
        let url = self.url();
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Ok(client) = redis::Client::open(url.as_str()) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("redis-server answers");
    }

    /// SIGKILL (`Child::kill`), then reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn readyz(b: &TestBridge) -> u16 {
    b.http.get(b.url("/readyz")).send().await.expect("answers").status().as_u16()
}

async fn until_readyz(b: &TestBridge, status: u16) {
    tokio::time::timeout(PATIENCE, async {
        while readyz(b).await != status {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("/readyz never answered {status}"));
}

#[tokio::test]
async fn through_a_redis_outage_clients_stay_connected_nothing_is_taken_that_cannot_be_kept_and_nothing_acknowledged_is_lost(
) {
    if redis_url().is_none() {
        eprintln!("skipped: no Redis (CCEB_TEST_REDIS)");
        return;
    }
    let mut redis = RedisServer::start();
    redis.answering().await;
    let url = redis.url();
    let mut b = TestBridge::with(|s| {
        s.store = StoreKind::Redis;
        s.redis_url = url;
        s.redis_prefix = unique_redis_prefix();
        s.redis_timeout_ms = 300;
    })
    .await;
    if b.skip_on_kafka("the outage is observed through the backend port") {
        return;
    }
    // A long-lived session, disconnected, with a notification acknowledged into its mailbox.
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    drop(c);
    presence(&b, "t", "a", "before").await;
    // A short-lived client that stays connected through the outage.
    let (mut short, _) = b.agent("t", "s").await;

    redis.kill();
    until_readyz(&b, 503).await;
    let (status, body) = b
        .post_events(
            json!({"record": "AgentPresenceEvent", "value": {"tenantGuid": "t", "agentGuid": "a", "state": "during"}}),
        )
        .await;
    assert_eq!(status, 503, "the backend is told to send again later: {body}");
    let mut other = b.connect().await;
    other.send(json!({"type":"hello","uuid":"h","data":{"token": token("t", "b"), "long_lived": true}})).await;
    assert_eq!(other.closed().await.0, Some(1012), "no key is handed out that could not be made durable");
    short.round_trip("still-there").await;

    redis.spawn();
    until_readyz(&b, 200).await;
    short.round_trip("after").await;
    let mut fresh = b.connect().await;
    assert!(long_lived(&mut fresh, "t", "b", json!({})).await.session_key.is_some(), "long-lived sessions open again");
    // What was acknowledged before the outage is in Redis: a restarted bridge delivers it.
    b.restart().await;
    let (mut c, reply) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(reply.resumed, "the session outlived the outage and the restart");
    let got = states(&mut c, 1).await;
    assert_eq!(got[0].2, "before");
}
