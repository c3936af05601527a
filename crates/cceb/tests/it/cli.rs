//! The `cceb` binary: serve, signals, the token subcommand, settings (contract
//! section 9). It runs the embedded default, so `scripts/test` runs this module
//! on the embedded bus only (`restart` spawns it on Kafka too).

use crate::support::*;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sigterm(child: &Server) {
    child.signal("-TERM");
}

#[tokio::test]
async fn sigterm_closes_clients_with_1012_and_exits_0() {
    let data = tempfile::tempdir().expect("tempdir");
    let child = Server::spawn(cceb(data.path()).args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET));
    let addr = &child.addr;
    let mut c = Client::connect(&format!("ws://{addr}/ws/v1")).await;
    c.hello(&token("t", "a")).await;
    sigterm(&child);
    assert_eq!(c.closed().await.0, Some(1012));
    let status = child.wait().await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_key() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = cceb(data.path()).args(["serve"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CCEB_JWT_HS256_SECRET"));
}

/// Runs `cmd` to its end; fails if it is still running after `PATIENCE` (a
/// bridge that starts when it should not would never exit).
async fn exited(cmd: &mut Command) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn cceb");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cceb is still running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.wait_with_output().expect("output")
}

#[tokio::test]
async fn a_short_hs256_secret_exits_78_naming_the_setting() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = exited(cceb(data.path()).args(["serve"]).env("CCEB_JWT_HS256_SECRET", "k".repeat(31))).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("CCEB_JWT_HS256_SECRET") && stderr.contains("jwt_hs256_secret"), "{stderr}");
}

/// A build without the cargo feature `kafka` (no librdkafka) says so, as a
/// settings error, instead of starting on another bus.
#[cfg(not(feature = "kafka"))]
#[tokio::test]
async fn without_the_kafka_feature_the_kafka_bus_exits_78() {
    let data = tempfile::tempdir().expect("tempdir");
    let out =
        exited(cceb(data.path()).args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET).env("CCEB_BUS", "kafka")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("this build has no Kafka support (cargo feature `kafka`)"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_redis_stops_the_start_naming_its_url() {
    let data = tempfile::tempdir().expect("tempdir");
    // Port 1 on loopback: nothing listens there.
    let url = "redis://127.0.0.1:1";
    let out = exited(
        cceb(data.path())
            .args(["serve"])
            .env("CCEB_JWT_HS256_SECRET", SECRET)
            .env("CCEB_STORE", "redis")
            .env("CCEB_REDIS_URL", url)
            .env("CCEB_REDIS_TIMEOUT_MS", "500"),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach Redis at `{url}`")), "{stderr}");
}

#[tokio::test]
async fn a_jwks_url_that_cannot_be_fetched_stops_the_start() {
    let data = tempfile::tempdir().expect("tempdir");
    let out = exited(cceb(data.path()).args(["serve"]).env("CCEB_JWT_JWKS_URL", "ftp://idp.test/jwks")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "not http: a settings error; {stderr}");
    assert!(stderr.contains("jwt_jwks_url"), "{stderr}");
    // Nothing listens there any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let url = format!("http://{closed}/jwks");
    let out = exited(cceb(data.path()).args(["serve"]).env("CCEB_JWT_JWKS_URL", &url)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Not 78: the settings may be right and the provider back in a moment.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
}

#[tokio::test]
async fn an_empty_admin_token_is_no_token() {
    let data = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let actions = |backend: &str| format!("http://{backend}/backend/v1/actions?after=0&wait_ms=0");
    let child = Server::spawn(
        cceb(data.path()).args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET).env("CCEB_ADMIN_TOKEN", ""),
    );
    for auth in [None, Some("Bearer "), Some("Bearer")] {
        let mut req = http.get(actions(&child.backend));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        assert_eq!(req.send().await.expect("answers").status().as_u16(), 401, "{auth:?}");
    }
    sigterm(&child);
    child.wait().await;
    // `--dev` generates an admin token when none is set: an empty one is none.
    let child = Server::spawn(cceb(data.path()).args(["serve", "--dev"]).env("CCEB_ADMIN_TOKEN", ""));
    let admin = child.lines.iter().find_map(|l| l.trim().strip_prefix("CCEB_ADMIN_TOKEN=")).expect("printed");
    assert!(!admin.is_empty(), "{:?}", child.lines);
    let r = http.get(actions(&child.backend)).bearer_auth(admin).send().await.expect("answers");
    assert_eq!(r.status().as_u16(), 200);
    sigterm(&child);
    child.wait().await;
}

#[tokio::test]
async fn dev_mode_prints_a_secret_an_admin_token_and_a_working_token() {
    let data = tempfile::tempdir().expect("tempdir");
    let child = Server::spawn(cceb(data.path()).args(["serve", "--dev"]));
    let (lines, addr) = (&child.lines, &child.addr);
    let text = lines.concat();
    assert!(text.contains("CCEB_JWT_HS256_SECRET=") && text.contains("CCEB_ADMIN_TOKEN="), "{text}");
    let token = lines.iter().map(|l| l.trim()).find(|l| l.starts_with("ey")).expect("a token is printed").to_owned();
    let mut c = Client::connect(&format!("ws://{addr}/ws/v1")).await;
    let reply = c.hello(&token).await;
    assert_eq!(reply.agent.agent_guid, "agent-1");
    sigterm(&child);
    child.wait().await;
}

#[tokio::test]
async fn token_subcommand_mints_a_token_the_bridge_accepts() {
    let b = TestBridge::start().await;
    let data = tempfile::tempdir().expect("tempdir");
    let out = cceb(data.path())
        .args(["token", "--agent", "a-9", "--tenant", "t-9", "--ir", "ir-9", "--ttl", "10m"])
        .env("CCEB_JWT_HS256_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).expect("utf8");
    let reply = b.connect().await.hello(token.trim()).await;
    assert_eq!(
        (reply.agent.tenant_guid.as_str(), reply.agent.agent_guid.as_str(), reply.agent.ir_instance.as_str()),
        ("t-9", "a-9", "ir-9")
    );
}

#[tokio::test]
async fn settings_come_from_a_toml_file_and_the_environment_wins() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("cceb.toml");
    std::fs::write(
        &file,
        format!("jwt_hs256_secret = \"{SECRET}\"\nnode_id = \"from-file\"\nhello_timeout_ms = 150\n"),
    )
    .expect("write");
    let data = tempfile::tempdir().expect("tempdir");
    let child = Server::spawn(cceb(data.path()).args(["serve", "--config"]).arg(&file).env("CCEB_NODE_ID", "from-env"));
    let addr = &child.addr;
    assert_eq!(discover(&addr, &token("t", "a")).await["node_id"], "from-env");
    let mut c = Client::connect(&format!("ws://{addr}/ws/v1")).await;
    assert_eq!(c.closed().await.0, Some(4003), "hello_timeout_ms from the file applies");
    sigterm(&child);
    child.wait().await;
}

/// `cceb client` against `cceb serve`: an action line from stdin is acked,
/// a refused one answers a typed error, a notification is printed as one
/// JSON line and acked.
#[tokio::test]
async fn the_client_subcommand_prints_notifications_and_sends_actions() {
    use std::io::{BufRead, BufReader, Write};
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::spawn(
        cceb(data.path()).args(["serve"]).env("CCEB_JWT_HS256_SECRET", SECRET).env("CCEB_ADMIN_TOKEN", ADMIN),
    );
    let mut child = cceb(data.path())
        .args(["client", "--url", &server.ws_url(), "--token", &token("tenant-1", "agent-1")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cceb client");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let _child = Kill(child);
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut next_line = async || -> serde_json::Value {
        let line = tokio::time::timeout(PATIENCE, lines.recv()).await.expect("a line in time").expect("a line");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"))
    };
    // The ack also proves the client is connected.
    writeln!(stdin, r#"{{"action":"ChangeAgentStateEvent","details":{{"state":"Away"}},"uuid":"a-1"}}"#)
        .expect("write");
    assert_eq!(next_line().await, serde_json::json!({"ack": "a-1"}));
    writeln!(
        stdin,
        r#"{{"action":"ChangeAgentStateEvent","details":{{"state":"Away","agentGuid":"x"}},"uuid":"a-2"}}"#
    )
    .expect("write");
    let refused = next_line().await;
    assert_eq!(
        (&refused["error"]["uuid"], &refused["error"]["code"], &refused["error"]["field"]),
        (&serde_json::json!("a-2"), &serde_json::json!("reserved_field"), &serde_json::json!("agentGuid"))
    );
    let http = reqwest::Client::new();
    let r = http
        .post(format!("http://{}/backend/v1/events", server.backend))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"record": "AgentPresenceEvent", "value": {"tenantGuid": "tenant-1", "agentGuid": "agent-1", "state": "Away"}}))
        .send()
        .await
        .expect("backend port answers");
    assert_eq!(r.status().as_u16(), 202);
    let n = next_line().await;
    assert_eq!(
        (n["type"].as_str(), n["seq"].as_u64(), n["data"]["state"].as_str()),
        (Some("presence"), Some(1), Some("Away"))
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = http.get(format!("http://{}/metrics", server.addr)).send().await.expect("metrics").text().await;
        if metric_value(&text.expect("text"), "cceb_notifications_acked_total") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the notification was not acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = backend_actions(&http, &server.backend, 0, 0).await;
    assert_eq!(published["records"].as_array().map(Vec::len), Some(1), "{published}");
}
