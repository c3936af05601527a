//! A cluster on Kafka: bridges on one Redis in one consumer group share the
//! event topics' partitions, and an event consumed by one node reaches the
//! agent's sessions on another. Runs when the suite has both a broker
//! (`CCEB_TEST_KAFKA`) and a Redis (`CCEB_TEST_REDIS`): `scripts/test` runs
//! it once with both.
//!
//! The group's session timeout is short here (`session.timeout.ms` 6 s) so a
//! dead member is evicted within a read's patience; production keeps
//! librdkafka's 45 s unless the operator sets it (README "Running on Kafka").

use crate::kafka_backend::{brokers, KafkaBackend};
use crate::sessions::{long_lived, states};
use crate::support::*;
use serde_json::json;

const AGENTS: usize = 8;

#[tokio::test]
async fn the_nodes_share_the_partitions_and_each_delivers_to_sessions_on_the_other() {
    let (Some(brokers), Some(redis)) = (brokers(), redis_url()) else {
        eprintln!("skipped: needs both a Kafka broker and a Redis (scripts/test runs it with both)");
        return;
    };
    let k = KafkaBackend::create_partitioned(&brokers, &mut test_settings(), 4).await;
    let prefix = unique_redis_prefix();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("tempdir")).collect();
    let node = |i: usize| {
        let mut cmd = cluster_node(dirs[i].path(), &redis, &prefix, &format!("k{i}"));
        for (key, v) in k.env() {
            cmd.env(key, v);
        }
        cmd.env("CCEB_KAFKA_PROPERTIES", r#"{"session.timeout.ms"="6000","heartbeat.interval.ms"="1000"}"#);
        Server::spawn(&mut cmd)
    };
    let (n0, n1) = (node(0), node(1));
    for n in [&n0, &n1] {
        k.wait_ready(n.addr.parse().expect("an address")).await;
    }
    // Every agent's session on n0; their events spread over four partitions.
    let mut clients = Vec::new();
    for a in 0..AGENTS {
        let mut c = Client::connect(&n0.ws_url()).await;
        long_lived(&mut c, "t", &format!("agent-{a}"), json!({})).await;
        clients.push(c);
    }
    let presence =
        |a: usize, state: &str| json!({"tenantGuid": "t", "agentGuid": format!("agent-{a}"), "state": state});
    for a in 0..AGENTS {
        k.produce_event(&k.events_topic, "AgentPresenceEvent", presence(a, "before")).await;
    }
    for c in &mut clients {
        let got = states(c, 1).await;
        c.ack(&got[0].0).await;
        assert_eq!(got[0].2, "before");
    }
    let consumed = |n: &Server| {
        let url = format!("http://{}/metrics", n.addr);
        async move {
            let text = reqwest::get(url).await.expect("metrics").text().await.expect("text");
            metric_value(&text, "cceb_event_ingest_seconds_count")
        }
    };
    assert!(consumed(&n1).await > 0.0, "n1 consumed partitions of its own: delivered across nodes");
    assert!(consumed(&n0).await > 0.0, "and so did n0");

    // n1 dies without leaving the group: once the group's session timeout
    // evicts it, its partitions move to n0, which delivers what n1 would have.
    n1.signal("-KILL");
    n1.wait().await;
    for a in 0..AGENTS {
        k.produce_event(&k.events_topic, "AgentPresenceEvent", presence(a, "after")).await;
    }
    for c in &mut clients {
        let got = states(c, 1).await;
        c.ack(&got[0].0).await;
        assert_eq!(got[0].2, "after", "every partition is consumed again, n1's by n0");
    }
}
