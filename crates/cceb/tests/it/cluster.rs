//! A cluster of `cceb serve` processes on one Redis: membership and discovery
//! (ARCHITECTURE.md "Cluster"). Runs only when `CCEB_TEST_REDIS` names a
//! Redis (`scripts/test` starts one for its Redis pass); each test keeps its
//! keys under a prefix of its own, so tests sharing the server never meet.

use crate::support::*;
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
        let mut cmd = cceb(data);
        cmd.args(["serve"])
            .env("CCEB_JWT_HS256_SECRET", SECRET)
            .env("CCEB_ADMIN_TOKEN", ADMIN)
            .env("CCEB_STORE", "redis")
            .env("CCEB_REDIS_URL", &self.redis)
            .env("CCEB_REDIS_PREFIX", &self.prefix)
            .env("CCEB_NODE_ID", id)
            // Never dialled: discovery hands it out, and it tells which node was chosen.
            .env("CCEB_PUBLIC_URL", endpoint(id))
            .env("CCEB_NODE_HEARTBEAT_MS", "100")
            .env("CCEB_NODE_TTL_MS", "600");
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
