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
    /// A master of a Redis Cluster (its config in `nodes.conf` of its directory).
    clustered: bool,
}

impl RedisServer {
    pub(crate) fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        Self::on(port, false)
    }

    fn on(port: u16, clustered: bool) -> RedisServer {
        let mut s = RedisServer { child: None, port, dir: tempfile::tempdir().expect("tempdir"), clustered };
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
            .args(if self.clustered {
                &["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"][..]
            } else {
                &[]
            })
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

/// The Redis of a test that kills it: one server of its own or, when the
/// suite runs on a Redis Cluster (`CCEB_TEST_REDIS` lists seed nodes), a
/// three-master cluster of its own made with `redis-cli --cluster create`.
pub(crate) struct TestRedis {
    pub(crate) servers: Vec<RedisServer>,
}

impl TestRedis {
    pub(crate) async fn start() -> TestRedis {
        if !redis_url().is_some_and(|u| u.contains(',')) {
            let one = RedisServer::start();
            one.answering().await;
            return TestRedis { servers: vec![one] };
        }
        let servers: Vec<RedisServer> = cluster_ports(3).into_iter().map(|p| RedisServer::on(p, true)).collect();
        for s in &servers {
            s.answering().await;
        }
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(servers.iter().map(|s| format!("127.0.0.1:{}", s.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create");
        let redis = TestRedis { servers };
        redis.answering().await;
        redis
    }

    /// `redis://` URL of the server, or the cluster's seed list.
    pub(crate) fn url(&self) -> String {
        self.servers.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    /// Waits until every server answers and, on a cluster, every one sees
    /// all slots served (`cluster_state:ok`).
    pub(crate) async fn answering(&self) {
        for s in &self.servers {
            s.answering().await;
            if s.clustered {
                s.cluster_ok().await;
            }
        }
    }
}

impl RedisServer {
    async fn cluster_ok(&self) {
        let url = self.url();
        tokio::time::timeout(PATIENCE * 3, async {
            loop {
                if let Ok(client) = redis::Client::open(url.as_str()) {
                    if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                        let info: String =
                            redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await.unwrap_or_default();
                        if info.contains("cluster_state:ok") {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the Redis Cluster serves every slot");
    }
}

/// `n` free loopback ports whose cluster bus port (+10000) is free too.
fn cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let p = l.local_addr().expect("addr").port();
        if p < 55_000 && !ports.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            ports.push(p);
        }
    }
    ports
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
