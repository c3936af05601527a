//! A cluster of `cceb serve` processes on one Redis: membership and discovery
//! (ARCHITECTURE.md "Cluster"). Runs only when `CCEB_TEST_REDIS` names a
//! Redis (`scripts/test` starts one for its Redis pass); each test keeps its
//! keys under a prefix of its own, so tests sharing the server never meet.

use crate::support::*;
use cceb_protocol::outgoing::ServerMessage;
use cceb_protocol::NotificationType as N;
use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The Redis of this run; `None`, with the reason printed, when there is none.
fn redis() -> Option<String> {
    let url = std::env::var("CCEB_TEST_REDIS").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipped: no Redis (scripts/test starts one and sets CCEB_TEST_REDIS)");
    }
    url
}

/// One cluster: a Redis and a key prefix no other test uses.
struct Cluster {
    redis: String,
    prefix: String,
}

/// A node of a cluster: its process and its (embedded store's) data.
struct Node {
    id: String,
    server: Server,
    _data: tempfile::TempDir,
}

impl Cluster {
    fn new(redis: String) -> Cluster {
        Cluster { redis, prefix: format!("it-{}", uuid::Uuid::new_v4().simple()) }
    }

    /// `cceb serve` as node `id`, with a fast heartbeat; `extra` settings on top.
    fn command(&self, id: &str, data: &std::path::Path, extra: &[(&str, &str)]) -> Command {
        let mut cmd = cluster_node(data, &self.redis, &self.prefix, id);
        // Never dialled: discovery hands it out, and it tells which node was chosen.
        cmd.env("CCEB_PUBLIC_URL", endpoint(id));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    }

    fn node(&self, id: &str, extra: &[(&str, &str)]) -> Node {
        let data = tempfile::tempdir().expect("tempdir");
        let server = Server::spawn(&mut self.command(id, data.path(), extra));
        Node { id: id.into(), server, _data: data }
    }

    /// Nodes `ids`, once each of them sees all of them.
    async fn nodes(&self, ids: &[&str]) -> Vec<Node> {
        let nodes: Vec<Node> = ids.iter().map(|id| self.node(id, &[])).collect();
        for n in &nodes {
            seen(n, ids.len()).await;
        }
        nodes
    }
}

fn endpoint(id: &str) -> String {
    format!("ws://{id}.cluster.test")
}

/// Waits until `node`'s view holds `count` live members.
async fn seen(node: &Node, count: usize) {
    let http = reqwest::Client::new();
    let url = format!("http://{}/metrics", node.server.addr);
    tokio::time::timeout(PATIENCE, async {
        loop {
            let text = http.get(&url).send().await.expect("metrics").text().await.expect("text");
            if metric_value(&text, "cceb_cluster_nodes") == count as f64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("node {} sees {count} members", node.id));
}

fn agents(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("agent-{i}")).collect()
}

/// The node id `node` answers for agent `agent` of tenant `t`, checking the
/// endpoint is that node's public URL.
async fn chosen(node: &Node, agent: &str) -> String {
    let answer = discover(&node.server.addr, &token("t", agent)).await;
    let id = answer["node_id"].as_str().unwrap_or_else(|| panic!("a node in {answer}")).to_owned();
    assert_eq!(answer["endpoint"].as_str(), Some(format!("{}/ws/v1", endpoint(&id)).as_str()), "{answer}");
    id
}

/// What each of `nodes` answers for each agent, once they all agree.
async fn agreed(nodes: &[&Node], agents: &[String]) -> HashMap<String, String> {
    let mut answers = HashMap::new();
    for agent in agents {
        let first = chosen(nodes[0], agent).await;
        for n in &nodes[1..] {
            assert_eq!(chosen(n, agent).await, first, "{} and {} agree on {agent}", nodes[0].id, n.id);
        }
        answers.insert(agent.clone(), first);
    }
    answers
}

/// Polls until `check` holds for what `nodes` answer (bounded by `PATIENCE`).
async fn until(nodes: &[&Node], agents: &[String], what: &str, check: impl Fn(&HashMap<String, String>) -> bool) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let mut answers = HashMap::new();
            for n in nodes {
                for a in agents {
                    answers.insert(format!("{}/{a}", n.id), chosen(n, a).await);
                }
            }
            if check(&answers) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test]
async fn discovery_spreads_agents_over_every_node_and_every_node_gives_the_same_answer() {
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let nodes = cluster.nodes(&["a", "b", "c"]).await;
    let answers = agreed(&nodes.iter().collect::<Vec<_>>(), &agents(60)).await;
    let used: BTreeSet<&str> = answers.values().map(String::as_str).collect();
    assert_eq!(used, BTreeSet::from(["a", "b", "c"]), "{answers:?}");
}

#[tokio::test]
async fn a_draining_node_is_no_longer_offered_and_its_clients_get_1012() {
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let (a, b) = (cluster.node("a", &[]), cluster.node("b", &[]));
    let x = cluster.node("x", &[("CCEB_SHUTDOWN_GRACE_MS", "30000")]);
    for n in [&a, &b, &x] {
        seen(n, 3).await;
    }
    let all = agents(60);
    let answers = agreed(&[&a, &b, &x], &all).await;
    let on_x: Vec<String> = all.iter().filter(|g| answers[*g] == "x").cloned().collect();
    assert!(!on_x.is_empty(), "{answers:?}");
    // One client on each node: no node is past the load bound.
    let mut clients = Vec::new();
    for n in [&a, &b, &x] {
        let mut c = Client::connect(&n.server.ws_url()).await;
        c.hello(&token("t", &format!("client-on-{}", n.id))).await;
        clients.push(c);
    }
    until(&[&a, &b], &on_x, "the loaded view still offers x", |answers| answers.values().all(|n| n == "x")).await;
    x.server.signal("-TERM");
    until(&[&a, &b], &on_x, "the others stop offering the draining node", |answers| answers.values().all(|n| n != "x"))
        .await;
    assert_eq!(clients[2].closed().await.0, Some(1012));
    // Its agents moved, and only they: the others still agree on everyone.
    let after = agreed(&[&a, &b], &all).await;
    for agent in &all {
        if answers[agent] != "x" {
            assert_eq!(after[agent], answers[agent], "{agent} stays on its node");
        }
    }
    assert_eq!(x.server.wait().await.code(), Some(0));
}

#[tokio::test]
async fn a_killed_node_is_no_longer_offered_once_its_record_expired_and_its_id_can_be_taken_again() {
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let nodes = cluster.nodes(&["a", "b", "x"]).await;
    let (a, b, x) = (&nodes[0], &nodes[1], &nodes[2]);
    let all = agents(60);
    let answers = agreed(&[a, b, x], &all).await;
    let on_x: Vec<String> = all.iter().filter(|g| answers[*g] == "x").cloned().collect();
    assert!(!on_x.is_empty(), "{answers:?}");
    x.server.signal("-KILL");
    until(&[a, b], &on_x, "the others stop offering the killed node", |answers| answers.values().all(|n| n != "x"))
        .await;
    seen(a, 2).await;
    // A restarted `x` takes its id back once the killed one's record expired,
    // and gets its agents back.
    let again = cluster.node("x", &[]);
    seen(a, 3).await;
    until(&[a, b, &again], &on_x, "the restarted node gets its agents back", |answers| {
        answers.values().all(|n| n == "x")
    })
    .await;
}

#[tokio::test]
async fn a_second_live_bridge_with_the_same_node_id_refuses_to_start() {
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let _first = cluster.node("a", &[]);
    let data = tempfile::tempdir().expect("tempdir");
    let mut cmd = cluster.command("a", data.path(), &[]);
    let second = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn cceb");
    let out = tokio::time::timeout(PATIENCE, tokio::task::spawn_blocking(move || second.wait_with_output()))
        .await
        .expect("the second bridge gives up")
        .expect("join")
        .expect("output");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("node_id `a` is held by another live bridge"), "{stderr}");
}

#[tokio::test]
async fn discovery_passes_over_a_node_loaded_past_the_bound() {
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let nodes = cluster.nodes(&["a", "b", "c"]).await;
    let mut clients = Vec::new();
    for i in 0..12 {
        let mut c = Client::connect(&nodes[0].server.ws_url()).await;
        c.hello(&token("t", &format!("load-{i}"))).await;
        clients.push(c);
    }
    let fresh = agents(30);
    let others = [&nodes[1], &nodes[2]];
    until(&others, &fresh, "new agents avoid the loaded node", |answers| answers.values().all(|n| n != "a")).await;
    // Every node, the loaded one too, gives the same answer.
    until(&[&nodes[0], &nodes[1], &nodes[2]], &fresh, "the loaded node agrees", |answers| {
        fresh.iter().all(|g| {
            let on: BTreeSet<&str> =
                ["a", "b", "c"].iter().filter_map(|n| answers.get(&format!("{n}/{g}"))).map(String::as_str).collect();
            on.len() == 1 && !on.contains("a")
        })
    })
    .await;
    drop(clients);
}

/// An event the backend port of `node` acknowledged (202).
async fn post(node: &Node, record: &str, value: serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}/backend/v1/events", node.server.backend))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"record": record, "value": value}))
        .send()
        .await
        .expect("backend port answers");
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap_or_default());
}

async fn presence(node: &Node, agent: &str, state: &str) {
    post(node, "AgentPresenceEvent", serde_json::json!({"tenantGuid": "t", "agentGuid": agent, "state": state})).await;
}

/// The values of the `record`s in the shared action log, read from `node`'s
/// backend port.
async fn published(node: &Node, record: &str) -> Vec<serde_json::Value> {
    let page = backend_actions(&reqwest::Client::new(), &node.server.backend, 0, 0).await;
    page["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["record"] == record)
        .map(|r| r["value"].clone())
        .collect()
}

#[tokio::test]
async fn an_event_posted_on_any_node_reaches_every_session_of_its_agent_on_every_other() {
    use crate::sessions::{long_lived, resume, states};
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let nodes = cluster.nodes(&["n1", "n2", "n3"]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut mobile = Client::connect(&n2.server.ws_url()).await;
    let key = long_lived(&mut mobile, "t", "a", serde_json::json!({})).await.session_key.expect("key");
    let mut desktop = Client::connect(&n3.server.ws_url()).await;
    desktop.hello(&token("t", "a")).await;

    presence(n1, "a", "ready").await;
    let (_, on_mobile, _, data) = mobile.notification().await;
    let (_, on_desktop, _, _) = desktop.notification().await;
    assert_eq!((on_mobile.as_str(), &data["state"]), (on_desktop.as_str(), &serde_json::json!("ready")));
    mobile.ack(&on_mobile).await;
    desktop.ack(&on_desktop).await;

    // Tenant-wide, posted on the node neither is attached to.
    post(n1, "TenantUpdatedEvent", serde_json::json!({"tenantGuid": "t", "deltas": {"name": "Acme"}})).await;
    for c in [&mut mobile, &mut desktop] {
        let (ty, uuid, _, data) = c.notification().await;
        assert_eq!((ty, &data["event_type"]), (N::Provisioning, &serde_json::json!("TenantUpdatedEvent")));
        c.ack(&uuid).await;
    }
    mobile.round_trip("acked").await;

    // The mobile leaves n2; what comes meanwhile waits in its mailbox, and it
    // resumes on n1 with its key.
    drop(mobile);
    presence(n2, "a", "away").await;
    let (_, away, _, _) = desktop.notification().await;
    let (mut mobile, r) = resume(&n1.server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got = states(&mut mobile, 1).await;
    assert_eq!((got[0].0.as_str(), got[0].2.as_str()), (away.as_str(), "away"), "same uuid");
    assert!(mobile.round_trip("nothing-else").await.is_empty(), "the acked ones do not come again");

    // Attached on n1 now: a resume on n3 takes it over.
    let (_, r) = resume(&n3.server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    assert_eq!(mobile.closed().await.0, Some(4005), "taken over from another node");

    // Actions published by every node are served by the backend port of any.
    desktop.expect_ack_of_action("act-1", "ChangeAgentStateEvent", serde_json::json!({"state": "Away"})).await;
    let actions = published(n2, "ChangeAgentStateEvent").await;
    assert_eq!(actions.len(), 1, "{actions:?}");
}

#[tokio::test]
async fn availability_gives_exactly_one_record_per_transition_when_two_nodes_race() {
    use crate::sessions::long_lived;
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let nodes = cluster.nodes(&["n1", "n2", "n3"]).await;
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut x = Client::connect(&n1.server.ws_url()).await;
    let mut y = Client::connect(&n2.server.ws_url()).await;
    // The first session of the agent opens on two nodes at once.
    let (_, _) = tokio::join!(
        long_lived(&mut x, "t", "b", serde_json::json!({})),
        long_lived(&mut y, "t", "b", serde_json::json!({}))
    );
    let available = |v: &Vec<serde_json::Value>| v.iter().map(|r| r["available"].clone()).collect::<Vec<_>>();
    assert_eq!(available(&published(n3, "AgentChatAvailabilityEvent").await), [serde_json::json!(true)]);
    // And both end at once.
    x.send(serde_json::json!({"type": "end_session", "uuid": "E1"})).await;
    y.send(serde_json::json!({"type": "end_session", "uuid": "E2"})).await;
    let (xa, ya) = tokio::join!(x.closed(), y.closed());
    assert_eq!((xa.0, ya.0), (Some(1000), Some(1000)));
    assert_eq!(
        available(&published(n3, "AgentChatAvailabilityEvent").await),
        [serde_json::json!(true), serde_json::json!(false)]
    );
}

#[tokio::test]
async fn a_killed_nodes_clients_resume_elsewhere_with_everything_acknowledged_and_the_same_uuids() {
    use crate::sessions::{long_lived, resume, states};
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    let nodes = cluster.nodes(&["n1", "n2", "n3"]).await;
    let mut c = Client::connect(&nodes[1].server.ws_url()).await;
    let key = long_lived(&mut c, "t", "a", serde_json::json!({})).await.session_key.expect("key");
    for s in ["s1", "s2", "s3"] {
        presence(&nodes[0], "a", s).await;
    }
    let sent = states(&mut c, 3).await;
    c.ack(&sent[0].0).await;
    c.round_trip("acked").await;
    let mut nodes = nodes.into_iter();
    let (n1, n2, n3) = (nodes.next().expect("n1"), nodes.next().expect("n2"), nodes.next().expect("n3"));
    n2.server.signal("-KILL");
    drop(n2);
    // Acknowledged by the backend ports while n2 is dead.
    presence(&n3, "a", "s4").await;
    presence(&n1, "a", "s5").await;
    let (mut c, r) = resume(&n3.server.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got = states(&mut c, 4).await;
    let uuids: Vec<&str> = got.iter().map(|(u, _, _)| u.as_str()).collect();
    assert_eq!(&uuids[..2], [sent[1].0.as_str(), sent[2].0.as_str()], "the unacked ones, with their uuids");
    let data: Vec<&str> = got.iter().map(|(_, _, s)| s.as_str()).collect();
    assert_eq!(data, ["s2", "s3", "s4", "s5"]);
    for (uuid, _, _) in &got {
        c.ack(uuid).await;
    }
    assert!(c.round_trip("nothing-else").await.is_empty());
}

/// A long-lived `hello` for `agent` on `node`: its session id, or the close
/// code it was refused with.
async fn try_long_lived(node: &Node, agent: &str) -> Result<String, Option<u16>> {
    let mut c = Client::connect(&node.server.ws_url()).await;
    let hello = serde_json::json!({"token": token("t", agent), "long_lived": true});
    c.send(serde_json::json!({"type": "hello", "uuid": "h", "data": hello})).await;
    match c.read().await {
        Read::Msg(ServerMessage::HelloReply { reply, .. }) => Ok(reply.session_id),
        // A refusal: its error, then the close.
        Read::Msg(ServerMessage::Error { .. }) => Err(c.closed().await.0),
        Read::Msg(other) => panic!("expected a hello_reply, got {other:?}"),
        Read::Closed(code) => Err(code),
    }
}

#[tokio::test]
async fn the_sessions_of_a_killed_node_count_as_disconnected_once_it_restarts_or_is_gone() {
    use crate::sessions::long_lived;
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis);
    // One long-lived session per agent: a second one is admitted only by
    // ending a disconnected one, never a connected one.
    let cap: [(&str, &str); 1] = [("CCEB_MAX_SESSIONS_PER_AGENT", "1")];
    let n1 = cluster.node("n1", &cap);
    let n2 = cluster.node("n2", &cap);
    seen(&n1, 2).await;
    seen(&n2, 2).await;
    let mut x = Client::connect(&n2.server.ws_url()).await;
    long_lived(&mut x, "t", "x", serde_json::json!({})).await;
    assert_eq!(try_long_lived(&n1, "x").await, Err(Some(4006)), "x's session is connected: no room");
    n2.server.signal("-KILL");
    drop(n2);
    drop(x);
    // Restarted under the same id: what its previous life held is disconnected as it starts.
    let n2 = cluster.node("n2", &cap);
    assert!(try_long_lived(&n1, "x").await.is_ok(), "room made by ending the disconnected one");

    // Killed for good: once it has been gone long enough, the others detach its sessions.
    let mut y = Client::connect(&n2.server.ws_url()).await;
    long_lived(&mut y, "t", "y", serde_json::json!({})).await;
    n2.server.signal("-KILL");
    drop(n2);
    drop(y);
    let admitted = tokio::time::timeout(PATIENCE, async {
        loop {
            match try_long_lived(&n1, "y").await {
                Ok(id) => return id,
                Err(Some(4006)) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(code) => panic!("refused with {code:?}"),
            }
        }
    })
    .await;
    assert!(admitted.is_ok(), "the dead node's session was detached and made room");
}

#[tokio::test]
async fn a_node_taken_for_dead_takes_its_sessions_back_when_it_hears_from_redis_again() {
    use crate::sessions::{long_lived, states};
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis.clone());
    let nodes = cluster.nodes(&["n1", "n2"]).await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let mut c = Client::connect(&n2.server.ws_url()).await;
    let session = long_lived(&mut c, "t", "r", serde_json::json!({})).await.session_id;
    // What the others do to a node missing from their views past its TTL
    // (cut off from Redis): its sessions detached in the store.
    let kv = cceb::kv::Kv::connect(&redis, &cluster.prefix, Duration::from_secs(5)).await.expect("redis");
    let agent = cceb::model::AgentId { tenant_guid: "t".into(), agent_guid: "r".into(), ir_instance: "".into() };
    let record = kv.agent_key(&agent, &format!("s:{session}"));
    let _: () =
        redis::cmd("HDEL").arg(&record).arg("node").arg("instance").query_async(&mut kv.conn()).await.expect("hdel");
    // Its subscription drops and comes back, as a cut-off node's does.
    for url in redis.split(',') {
        let client = redis::Client::open(url.trim()).expect("url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
        let _: redis::Value =
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await.expect("kill");
    }
    tokio::time::timeout(PATIENCE, async {
        loop {
            let node: Option<String> =
                redis::cmd("HGET").arg(&record).arg("node").query_async(&mut kv.conn()).await.expect("hget");
            if node.as_deref() == Some("n2") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("n2 took its session back");
    presence(n1, "r", "back").await;
    assert_eq!(states(&mut c, 1).await[0].2, "back", "routed to n2 again");
}

#[tokio::test]
async fn a_node_that_missed_a_message_closes_its_short_lived_sessions_with_1012_and_keeps_the_long_lived_ones() {
    use crate::sessions::{long_lived, states};
    let Some(redis) = redis() else { return };
    let cluster = Cluster::new(redis.clone());
    let nodes = cluster.nodes(&["n1", "n2"]).await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let mut short = Client::connect(&n2.server.ws_url()).await;
    short.hello(&token("t", "a")).await;
    let mut long = Client::connect(&n2.server.ws_url()).await;
    long_lived(&mut long, "t", "a", serde_json::json!({})).await;
    // A number taken on n2's channel whose message never reaches it, as one
    // published while its subscription was down.
    let kv = cceb::kv::Kv::connect(&redis, &cluster.prefix, Duration::from_secs(2)).await.expect("redis");
    let counter = kv.key(&format!("{{node:{}}}:sent", cceb::kv::agent_tag("node", "n2")));
    let _: u64 = redis::cmd("INCR").arg(&counter).query_async(&mut kv.conn()).await.expect("incr");

    presence(n1, "a", "ready").await;
    let (code, _) = short.closed().await;
    assert_eq!(code, Some(1012), "the short-lived client is told it may have missed something");
    let got = states(&mut long, 1).await;
    assert_eq!(got[0].2, "ready", "the long-lived session has it from its durable mailbox");
    long.ack(&got[0].0).await;
    assert!(long.round_trip("still-attached").await.is_empty(), "and stays connected");
}
