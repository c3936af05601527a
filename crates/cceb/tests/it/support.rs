//! A real bridge on loopback, and clients that speak to it only over WebSocket
//! and HTTP, as agent applications and backends do.

use cceb::clock::{Clock, SystemClock};
use cceb::config::StoreKind;
use cceb::{Bridge, Settings};
use cceb_client::Connection;
use cceb_protocol::incoming::Hello;
use cceb_protocol::outgoing::{HelloReply, ServerMessage};
use cceb_protocol::{ClientMessage, ErrorCode, NotificationType};
use cceb_token::{mint_hs256, TokenRequest};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// At least 32 bytes: shorter HS256 secrets are refused at start.
pub const SECRET: &str = "cceb-test-secret-0123456789abcdef";
pub const ADMIN: &str = "test-admin";
/// Generous bound for anything the bridge should do "at once"; never a threshold under test.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures").join(name)
}

/// The Redis the suite runs its store on (`CCEB_TEST_REDIS`, set by
/// `scripts/test`'s Redis pass); `None`: the embedded store.
pub fn redis_url() -> Option<String> {
    std::env::var("CCEB_TEST_REDIS").ok().filter(|u| !u.is_empty())
}

/// A key prefix no other bridge uses: tests share one Redis without seeing
/// each other's keys.
pub fn unique_redis_prefix() -> String {
    format!("cceb-test-{}", uuid::Uuid::new_v4().simple())
}

/// Puts `s` on the suite's Redis, under a prefix of its own, when there is one.
pub fn on_test_redis(s: &mut Settings) {
    if let Some(url) = redis_url() {
        s.store = StoreKind::Redis;
        s.redis_url = url;
        s.redis_prefix = unique_redis_prefix();
    }
}

/// Offset of the newest action in the embedded bus's log when it lives in
/// Redis (`store = "redis"`): it outlives the process, so what a restarted
/// bridge published starts after it.
pub async fn shared_log_end(url: &str, prefix: &str) -> u64 {
    let kv = cceb::kv::Kv::connect(url, prefix, std::time::Duration::from_secs(5)).await.expect("redis");
    let offset: Option<u64> =
        redis::cmd("GET").arg(kv.key("{actions}:offset")).query_async(&mut kv.conn()).await.expect("get");
    offset.unwrap_or(0)
}

/// The key prefix `cceb()` gives processes on `data` (the suite's Redis).
pub fn data_prefix(data: &std::path::Path) -> String {
    let name: String = data.to_string_lossy().chars().filter(char::is_ascii_alphanumeric).collect();
    format!("cceb-test-{name}")
}

/// Every key under `prefix` on the Redis at `url` (on each node of a
/// cluster's list), with its value as raw bytes (each member or field of a
/// set, sorted set or hash).
pub async fn redis_dump(url: &str, prefix: &str) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for node in url.split(',') {
        out.extend(redis_dump_node(node.trim(), prefix).await);
    }
    out
}

async fn redis_dump_node(url: &str, prefix: &str) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.expect("type");
        let mut read = redis::cmd(match kind.as_str() {
            "string" => "GET",
            "hash" => "HGETALL",
            "set" => "SMEMBERS",
            "zset" => "ZRANGE",
            _ => continue,
        });
        read.arg(&key);
        if kind == "zset" {
            read.arg(0).arg(-1);
        }
        let values: Vec<Vec<u8>> = if kind == "string" {
            vec![read.query_async(&mut conn).await.expect("value")]
        } else {
            read.query_async(&mut conn).await.expect("values")
        };
        out.push((key, values));
    }
    out
}

pub fn test_settings() -> Settings {
    Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backend_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        jwt_hs256_secret: Some(SECRET.into()),
        admin_token: Some(ADMIN.into()),
        shutdown_grace_ms: 2000,
        ..Settings::default()
    }
}

pub struct TestBridge {
    pub bridge: Option<Bridge>,
    pub addr: SocketAddr,
    /// The backend port (embedded bus; unused on Kafka).
    pub backend: SocketAddr,
    pub http: reqwest::Client,
    /// Set when the suite runs against a Kafka broker (`CCEB_TEST_KAFKA`).
    pub kafka: Option<crate::kafka_backend::KafkaBackend>,
    /// Offset of the last action published before the latest restart (Kafka
    /// keeps them; the embedded log starts empty).
    published_mark: u64,
    settings: Settings,
    /// Decides session TTLs and token expiry (a test's `ManualClock`, kept across restarts).
    clock: Arc<dyn Clock>,
    /// The embedded store's directory, deleted with the bridge.
    _data: tempfile::TempDir,
}

impl TestBridge {
    pub async fn start() -> TestBridge {
        Self::with(|_| {}).await
    }

    pub async fn with(f: impl FnOnce(&mut Settings)) -> TestBridge {
        Self::with_clock(Arc::new(SystemClock), f).await
    }

    /// A bridge whose session TTLs and token expiry go by `clock` (a
    /// `ManualClock` the test moves instead of sleeping).
    pub async fn with_clock(clock: Arc<dyn Clock>, f: impl FnOnce(&mut Settings)) -> TestBridge {
        let data = tempfile::tempdir().expect("tempdir");
        let mut s = Settings { data_dir: data.path().to_owned(), ..test_settings() };
        // Before `f`: a test may choose its own store; the prefix stays across restarts.
        on_test_redis(&mut s);
        f(&mut s);
        let kafka = match crate::kafka_backend::brokers() {
            Some(brokers) => Some(crate::kafka_backend::KafkaBackend::create(&brokers, &mut s).await),
            None => None,
        };
        let bridge = Bridge::start_with_clock(s.clone(), clock.clone()).await.expect("bridge starts");
        if let Some(k) = &kafka {
            k.wait_ready(bridge.addr).await;
        }
        TestBridge {
            addr: bridge.addr,
            backend: bridge.backend_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            bridge: Some(bridge),
            http: reqwest::Client::new(),
            kafka,
            published_mark: 0,
            settings: s,
            clock,
            _data: data,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn shutdown(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.shutdown().await;
        }
    }

    /// Graceful shutdown, then a new bridge on the same data directory (new
    /// ports). `published` then lists what the new bridge published.
    pub async fn restart(&mut self) {
        if self.kafka.is_some() {
            self.published_mark = self.actions_after(0, 0).await["next"].as_u64().unwrap_or(0);
        }
        self.shutdown().await;
        if self.kafka.is_none() && self.settings.store == StoreKind::Redis {
            // After the shutdown: an action in flight is published while it drains.
            self.published_mark = shared_log_end(&self.settings.redis_url, &self.settings.redis_prefix).await;
        }
        let bridge =
            Bridge::start_with_clock(self.settings.clone(), self.clock.clone()).await.expect("bridge restarts");
        if let Some(k) = &self.kafka {
            k.wait_ready(bridge.addr).await;
        }
        self.addr = bridge.addr;
        self.backend = bridge.backend_addr.unwrap_or(self.backend);
        self.bridge = Some(bridge);
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/v1", self.addr)
    }

    /// The value of one series of this bridge's `/metrics` (each bridge has
    /// its own recorder); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.http.get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        metric_value(&text, series)
    }

    /// The embedded store's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.settings.data_dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// Connects and authenticates as (tenant, agent).
    pub async fn agent(&self, tenant: &str, agent: &str) -> (Client, HelloReply) {
        let mut c = self.connect().await;
        let reply = c.hello(&token(tenant, agent)).await;
        (c, reply)
    }

    /// Posts events to the backend port (on Kafka: produces them to the
    /// events topic and waits until the bridge committed them); returns
    /// status and body.
    pub async fn post_events(&self, body: Value) -> (u16, Value) {
        if let Some(k) = &self.kafka {
            return k.post_events(body).await;
        }
        let r = self
            .http
            .post(format!("http://{}/backend/v1/events", self.backend))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .expect("backend port answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn event(&self, record: &str, value: Value) {
        let (status, body) = self.post_events(json!({"record": record, "value": value})).await;
        assert_eq!(status, 202, "event {record} refused: {body}");
    }

    /// Registers an agent in the tenant directory through provisioning.
    pub async fn provision(&self, tenant: &str, agent: &str, contact: &str, off_hook: bool) {
        self.event(
            "AgentAddedEvent",
            json!({"tenantGuid": tenant, "agentGuid": agent, "contactId": contact, "offHookEnabled": off_hook, "recordingControls": 0}),
        )
        .await;
    }

    /// Published actions after `after` (long-poll of the backend port; on
    /// Kafka, the action topic).
    pub async fn actions_after(&self, after: u64, wait_ms: u64) -> Value {
        if let Some(k) = &self.kafka {
            return k.actions_after(after, wait_ms).await;
        }
        backend_actions(&self.http, &self.backend.to_string(), after, wait_ms).await
    }

    /// Actions published since this bridge (re)started.
    pub async fn published(&self) -> Vec<Value> {
        self.actions_after(self.published_mark, 0).await["records"].as_array().cloned().unwrap_or_default()
    }

    /// The embedded bus's outage switch (embedded only).
    pub async fn set_bus(&self, accepting: bool) {
        self.switch_bus(json!({"accepting": accepting})).await;
    }

    /// The embedded bus's slow-broker switch: every publish waits `ms` first.
    pub async fn set_bus_delay(&self, ms: u64) {
        self.switch_bus(json!({"accepting": true, "delay_ms": ms})).await;
    }

    /// The embedded bus's hold switch: while on, every publish waits for its release.
    pub async fn set_bus_hold(&self, on: bool) {
        self.switch_bus(json!({"accepting": true, "hold": on})).await;
    }

    /// The embedded bus's switches, with how many publishes wait on them now.
    pub async fn bus_switches(&self) -> Value {
        let url = format!("http://{}/backend/v1/bus", self.backend);
        let r = self.http.get(url).bearer_auth(ADMIN).send().await.expect("answers");
        assert_eq!(r.status().as_u16(), 200);
        r.json().await.expect("json")
    }

    async fn switch_bus(&self, body: Value) {
        let url = format!("http://{}/backend/v1/bus", self.backend);
        let r = self.http.put(url).bearer_auth(ADMIN).json(&body).send().await.expect("answers");
        assert_eq!(r.status().as_u16(), 200);
    }

    /// Whether this bridge keeps its state in Redis, where a test that needs
    /// the embedded store (its SQLite file) skips, saying `why`.
    pub fn skip_on_redis(&self, why: &str) -> bool {
        let on = self.settings.store == StoreKind::Redis;
        if on {
            eprintln!("skipped on Redis: {why}");
        }
        on
    }

    /// The bridge's store settings (Redis URL and prefix).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether this bridge runs on Kafka, where a test that needs the embedded
    /// bus or store (its backend port, its SQLite file) skips, saying `why`.
    pub fn skip_on_kafka(&self, why: &str) -> bool {
        if self.kafka.is_some() {
            eprintln!("skipped on Kafka: {why}");
        }
        self.kafka.is_some()
    }
}

/// What only the Kafka tests (`kafka.rs`) use.
#[cfg(feature = "kafka")]
impl TestBridge {
    /// Wraps a bridge started by the test itself on Kafka.
    pub async fn attach(bridge: Bridge, kafka: crate::kafka_backend::KafkaBackend) -> TestBridge {
        kafka.wait_ready(bridge.addr).await;
        TestBridge {
            addr: bridge.addr,
            backend: SocketAddr::from(([127, 0, 0, 1], 0)),
            bridge: Some(bridge),
            http: reqwest::Client::new(),
            kafka: Some(kafka),
            published_mark: 0,
            settings: test_settings(),
            clock: Arc::new(SystemClock),
            _data: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Graceful shutdown, then a new bridge with an empty data directory (a new node).
    pub async fn restart_fresh(&mut self) {
        self._data = tempfile::tempdir().expect("tempdir");
        self.settings.data_dir = self._data.path().to_owned();
        self.restart().await;
    }

    /// The settings the next `restart` uses.
    pub fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }
}

/// `GET /v1/discovery` of the bridge at `addr` with a client token; the JSON answer.
pub async fn discover(addr: impl std::fmt::Display, token: &str) -> Value {
    let r = reqwest::Client::new().get(format!("http://{addr}/v1/discovery")).bearer_auth(token).send().await;
    r.expect("answers").json().await.expect("json")
}

pub fn token(tenant: &str, agent: &str) -> String {
    token_ttl(tenant, agent, Duration::from_secs(3600))
}

pub fn token_ttl(tenant: &str, agent: &str, ttl: Duration) -> String {
    mint_hs256(
        SECRET,
        &TokenRequest { tenant_guid: tenant, agent_guid: agent, ir_instance: "ir-1", contact_id: None, ttl },
    )
    .expect("mint")
}

/// A test's WebSocket client: [`cceb_client::Connection`] with assertions,
/// every read bounded by `PATIENCE`, and a panic where a test expects success.
pub struct Client {
    conn: Connection,
}

/// What a read gave: a protocol message or the close code.
#[derive(Debug)]
pub enum Read {
    Msg(ServerMessage),
    Closed(Option<u16>),
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Client { conn: Connection::connect(url).await.expect("websocket connects") }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.conn.send_text(text).await.expect("send");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.conn.send_frame(m).await.expect("send");
    }

    pub async fn hello(&mut self, token: &str) -> HelloReply {
        self.hello_with(json!({"token": token})).await
    }

    /// `hello` with the given `data`; expects `hello_reply` (to its uuid).
    /// Says `hello`; the bridge's first frame must be its `hello_reply`
    /// (nothing may come before it, contract section 3).
    pub async fn hello_with(&mut self, data: Value) -> HelloReply {
        let hello: Hello = serde_json::from_value(data).expect("hello data");
        let uuid = cceb_client::new_uuid();
        self.send(json!({"type": "hello", "uuid": uuid, "data": hello})).await;
        match self.next().await {
            ServerMessage::HelloReply { uuid: u, reply } if u == uuid => reply,
            other => panic!("expected the hello_reply to {uuid} first, got {other:?}"),
        }
    }

    /// The next protocol message or close, skipping WebSocket control frames.
    pub async fn read(&mut self) -> Read {
        let read = tokio::time::timeout(PATIENCE, self.conn.next()).await.expect("the bridge answers in time");
        match read {
            Ok(m) => Read::Msg(m),
            Err(cceb_client::Error::Closed { code, .. }) => Read::Closed(code),
            Err(cceb_client::Error::Protocol(e)) => panic!("bad frame from the bridge: {e}"),
            Err(_) => Read::Closed(None),
        }
    }

    /// After the close frame: reads until the bridge has closed the socket.
    pub async fn socket_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while let Some(Ok(_)) = tokio::time::timeout_at(deadline, self.conn.get_mut().next())
            .await
            .expect("the bridge closes the socket in time")
        {}
    }

    pub async fn next(&mut self) -> ServerMessage {
        match self.read().await {
            Read::Msg(m) => m,
            Read::Closed(code) => panic!("connection closed ({code:?}) while a message was expected"),
        }
    }

    /// Reads until the close frame; returns its code. Messages before it are returned too.
    pub async fn closed(&mut self) -> (Option<u16>, Vec<ServerMessage>) {
        let mut before = Vec::new();
        loop {
            match self.read().await {
                Read::Msg(m) => before.push(m),
                Read::Closed(code) => return (code, before),
            }
        }
    }

    pub async fn expect_error(&mut self, uuid: &str, code: ErrorCode) -> Option<String> {
        match self.next().await {
            ServerMessage::Error { uuid: u, error } => {
                assert_eq!((u.as_str(), error.code), (uuid, code), "{}", error.message);
                error.field
            }
            other => panic!("expected error {code} for {uuid}, got {other:?}"),
        }
    }

    /// Sends an action (`details` as given: typed when an object, as is
    /// otherwise) and returns the next message.
    pub async fn action(&mut self, uuid: &str, action: &str, details: Value) -> ServerMessage {
        match details {
            Value::Object(details) => self.conn.action(uuid, action, &details).await.expect("send"),
            other => {
                self.send(json!({"type":"action","uuid": uuid,"data":{"action": action,"action_details": other}})).await
            }
        }
        self.next().await
    }

    pub async fn expect_ack(&mut self, uuid: &str) {
        match self.next().await {
            ServerMessage::Ack { uuid: u } => assert_eq!(u, uuid),
            other => panic!("expected ack of {uuid}, got {other:?}"),
        }
    }

    /// The next notification: (type, uuid, seq, data).
    pub async fn notification(&mut self) -> (NotificationType, String, u64, Value) {
        match self.next().await {
            ServerMessage::Notification { ty, uuid, seq, data } => (ty, uuid, seq, data),
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    pub async fn ack(&mut self, uuid: &str) {
        self.conn.ack(uuid).await.expect("send");
    }

    /// Proves the connection is open and everything before was read: ping → pong.
    pub async fn round_trip(&mut self, tag: &str) -> Vec<ServerMessage> {
        self.conn.send(&ClientMessage::Ping { uuid: tag.to_owned() }).await.expect("send");
        let mut before = Vec::new();
        loop {
            match self.next().await {
                ServerMessage::Pong { uuid } if uuid == tag => return before,
                other => before.push(other),
            }
        }
    }

    /// The socket underneath, for frames the contract does not cover.
    pub fn ws_mut(&mut self) -> &mut cceb_client::WebSocket {
        self.conn.get_mut()
    }

    /// An error whose uuid the bridge had to make up (the frame had none).
    pub async fn expect_error_any(&mut self, code: ErrorCode) -> Option<String> {
        match self.next().await {
            ServerMessage::Error { error, .. } => {
                assert_eq!(error.code, code, "{}", error.message);
                error.field
            }
            other => panic!("expected error {code}, got {other:?}"),
        }
    }

    /// Sends an action and expects its ack.
    pub async fn expect_ack_of_action(&mut self, uuid: &str, action: &str, details: Value) {
        match self.action(uuid, action, details).await {
            ServerMessage::Ack { uuid: u } => assert_eq!(u, uuid),
            other => panic!("expected ack of {uuid}, got {other:?}"),
        }
    }
}

/// The `cceb` binary with a clean environment, loopback ports chosen by the
/// system and its data in `data` — or, on the suite's Redis, under a key
/// prefix named after `data`, so processes started on the same directory
/// share their state as they would share the directory.
pub fn cceb(data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cceb"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CCEB_LISTEN", "127.0.0.1:0")
        .env("CCEB_BACKEND_LISTEN", "127.0.0.1:0")
        .env("CCEB_DATA_DIR", data)
        .env("CCEB_LOG", "warn");
    if let Some(url) = redis_url() {
        c.env("CCEB_STORE", "redis").env("CCEB_REDIS_URL", url).env("CCEB_REDIS_PREFIX", data_prefix(data));
    }
    c
}

/// `cceb serve` as node `id` of the cluster under `prefix` on the Redis at
/// `redis`, with a fast heartbeat (100 ms) and a short TTL (600 ms).
pub fn cluster_node(data: &std::path::Path, redis: &str, prefix: &str, id: &str) -> Command {
    let mut cmd = cceb(data);
    cmd.args(["serve"])
        .env("CCEB_JWT_HS256_SECRET", SECRET)
        .env("CCEB_ADMIN_TOKEN", ADMIN)
        .env("CCEB_STORE", "redis")
        .env("CCEB_REDIS_URL", redis)
        .env("CCEB_REDIS_PREFIX", prefix)
        .env("CCEB_NODE_ID", id)
        .env("CCEB_NODE_HEARTBEAT_MS", "100")
        .env("CCEB_NODE_TTL_MS", "600");
    cmd
}

/// A `cceb serve` process, killed if a test ends without waiting for it.
pub struct Server {
    child: Option<Child>,
    /// Stdout up to and including the listening line.
    pub lines: Vec<String>,
    pub addr: String,
    pub backend: String,
}

impl Server {
    /// Starts `cceb serve` and waits for its listening line.
    pub fn spawn(cmd: &mut Command) -> Server {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn cceb");
        let stdout = child.stdout.take().expect("stdout");
        let mut server = Server { child: Some(child), lines: Vec::new(), addr: String::new(), backend: String::new() };
        let mut out = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).expect("read") > 0, "cceb exited before listening: {:?}", server.lines);
            if let Some(rest) = line.strip_prefix("listening on ") {
                // `listening on ADDR (backend port ADDR)`
                let words: Vec<&str> = rest.split_whitespace().collect();
                server.addr = words[0].to_owned();
                server.backend = words.last().map(|w| w.trim_end_matches(')')).unwrap_or_default().to_owned();
                server.lines.push(line);
                return server;
            }
            server.lines.push(line);
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.id().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    pub async fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/v1", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `GET /backend/v1/actions`: actions a bridge's backend port published after `after`.
pub async fn backend_actions(http: &reqwest::Client, backend: &str, after: u64, wait_ms: u64) -> Value {
    http.get(format!("http://{backend}/backend/v1/actions?after={after}&wait_ms={wait_ms}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("backend port answers")
        .json()
        .await
        .expect("json")
}

/// The value of `series` (name with its labels, as rendered) in a Prometheus text page; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A copy of the built-in schema set in a temporary directory, for tests that
/// start a bridge on a changed set (`CCEB_SCHEMA_DIR`).
pub fn copy_default_set() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas"), dir.path());
    dir
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read") {
        let p = e.expect("entry").path();
        let dest = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}
