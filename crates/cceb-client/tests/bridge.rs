//! `cceb-client` against a real bridge on loopback (`cceb::Bridge`, embedded
//! bus and store), seen only from the outside: WebSocket, backend port, metrics.

use cceb::{Bridge, Settings};
use cceb_client::{ActionError, Client, Event, Notification, State};
use cceb_protocol::{ErrorCode, NotificationType};
use cceb_token::{mint_hs256, TokenRequest};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// At least 32 bytes: shorter HS256 secrets are refused at start.
const SECRET: &str = "cceb-client-test-secret-0123456789";
const ADMIN: &str = "test-admin";
/// Generous bound for what should happen "at once"; never a threshold under test.
const PATIENCE: Duration = Duration::from_secs(10);
const MS: Duration = Duration::from_millis(1);

struct TestBridge {
    bridge: Option<Bridge>,
    settings: Settings,
    addr: SocketAddr,
    backend: SocketAddr,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

impl TestBridge {
    async fn start() -> TestBridge {
        Self::start_with_clock(Arc::new(cceb::clock::SystemClock)).await
    }

    /// A bridge whose session TTLs and token expiry go by `clock`.
    async fn start_with_clock(clock: Arc<dyn cceb::clock::Clock>) -> TestBridge {
        let data = tempfile::tempdir().expect("tempdir");
        let settings = Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backend_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            jwt_hs256_secret: Some(SECRET.into()),
            admin_token: Some(ADMIN.into()),
            shutdown_grace_ms: 2000,
            data_dir: data.path().to_owned(),
            ..Settings::default()
        };
        let bridge = Bridge::start_with_clock(settings.clone(), clock).await.expect("bridge starts");
        let (addr, backend) = (bridge.addr, bridge.backend_addr.expect("embedded bus"));
        // Later restarts bind the same ports, so the client finds the bridge where it was.
        let settings = Settings { listen: addr, backend_listen: backend, ..settings };
        TestBridge { bridge: Some(bridge), settings, addr, backend, http: reqwest::Client::new(), _data: data }
    }

    /// Graceful shutdown (clients closed with 1012).
    async fn shutdown(&mut self) {
        if let Some(b) = self.bridge.take() {
            b.shutdown().await;
        }
    }

    /// A new bridge on the same data directory and ports.
    async fn start_again(&mut self) {
        self.bridge = Some(Bridge::start(self.settings.clone()).await.expect("bridge restarts"));
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws/v1", self.addr)
    }

    fn discovery_url(&self) -> String {
        format!("http://{}/v1/discovery", self.addr)
    }

    async fn event(&self, value: Value, id: &str) {
        let body = json!({"record": "AgentPresenceEvent", "value": value, "id": id});
        let r = self
            .http
            .post(format!("http://{}/backend/v1/events", self.backend))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .expect("backend port answers");
        assert_eq!(r.status().as_u16(), 202);
    }

    async fn presence(&self, agent: &str, id: &str) {
        self.event(json!({"tenantGuid": "t1", "agentGuid": agent, "state": "Away"}), id).await;
    }

    async fn set_bus(&self, accepting: bool) {
        let url = format!("http://{}/backend/v1/bus", self.backend);
        let r = self.http.put(url).bearer_auth(ADMIN).json(&json!({"accepting": accepting})).send().await;
        assert_eq!(r.expect("answers").status().as_u16(), 200);
    }

    /// Records published since this bridge started.
    async fn published(&self) -> Vec<Value> {
        let url = format!("http://{}/backend/v1/actions?after=0&wait_ms=0", self.backend);
        let v: Value = self.http.get(url).bearer_auth(ADMIN).send().await.expect("answers").json().await.expect("json");
        v["records"].as_array().cloned().unwrap_or_default()
    }

    async fn metric(&self, series: &str) -> f64 {
        let url = format!("http://{}/metrics", self.addr);
        let text = self.http.get(url).send().await.expect("metrics").text().await.expect("text");
        text.lines()
            .find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `series` reaches `want` (metrics trail the wire by a moment).
    async fn metric_reaches(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self.metric(series).await;
            if v == want {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{series} is {v}, expected {want}");
            tokio::time::sleep(20 * MS).await;
        }
    }
}

fn token_ttl(agent: &str, ttl: Duration) -> String {
    mint_hs256(
        SECRET,
        &TokenRequest { tenant_guid: "t1", agent_guid: agent, ir_instance: "ir-1", contact_id: None, ttl },
    )
    .expect("mint")
}

/// A token and its `exp` (seconds since the Unix epoch).
fn token_and_exp(agent: &str, ttl: Duration) -> (String, u64) {
    let secs = || cceb_token::now_since_epoch().as_secs();
    loop {
        // Minted within one second, its exp is that second plus the TTL.
        let before = secs();
        let token = token_ttl(agent, ttl);
        if secs() == before {
            return (token, before + ttl.as_secs());
        }
    }
}

fn token(agent: &str) -> String {
    token_ttl(agent, Duration::from_secs(3600))
}

/// Reconnects in milliseconds, gives up actions after `PATIENCE`.
fn fast(url: String) -> cceb_client::Builder {
    Client::builder(url)
        .backoff(20 * MS, 200 * MS)
        .action_retry(20 * MS)
        .connect_timeout(PATIENCE)
        .action_deadline(PATIENCE)
}

/// The next notification, skipping state changes; fails on `Closed`.
async fn notification(events: &mut mpsc::Receiver<Event>) -> Notification {
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await.expect("an event in time") {
            Some(Event::Notification(n)) => return n,
            Some(Event::State(_)) => {}
            other => panic!("expected a notification, got {other:?}"),
        }
    }
}

async fn connected(client: &Client) -> State {
    tokio::time::timeout(PATIENCE, client.wait_for(|s| matches!(s, State::Connected { .. })))
        .await
        .expect("connected in time")
}

#[tokio::test]
async fn a_notification_is_handled_then_acked_through_discovery() {
    let b = TestBridge::start().await;
    let (client, mut events) = fast(b.discovery_url()).token(token("a1")).build();
    assert!(matches!(connected(&client).await, State::Connected { resumed: false, .. }));
    b.presence("a1", "e1").await;
    let n = notification(&mut events).await;
    assert_eq!((n.ty, n.seq, n.data["state"].as_str()), (NotificationType::Presence, 1, Some("Away")));
    // Held by the application: not acked yet.
    tokio::time::sleep(50 * MS).await;
    assert_eq!(b.metric("cceb_notifications_acked_total").await, 0.0);
    drop(n);
    b.metric_reaches("cceb_notifications_acked_total", 1.0).await;
    client.close();
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await.expect("closed in time") {
            Some(Event::Closed { code, .. }) => break assert_eq!(code, Some(1000)),
            Some(_) => {}
            None => panic!("no Closed event"),
        }
    }
    assert_eq!(client.state(), State::Closed);
}

#[tokio::test]
async fn a_resume_after_a_restart_delivers_the_unacked_notification_once_and_sends_queued_actions() {
    let mut b = TestBridge::start().await;
    // Through discovery: after 1012 the client asks discovery again.
    let (client, mut events) = fast(b.discovery_url()).token(token("a1")).long_lived(true).build();
    let State::Connected { session_id, resumed: false } = connected(&client).await else { panic!("a new session") };
    b.presence("a1", "e1").await;
    let first = notification(&mut events).await;
    let (first_uuid, first_seq) = (first.uuid.clone(), first.seq);
    // The bridge goes away (1012) while the application still holds the notification.
    b.shutdown().await;
    tokio::time::timeout(PATIENCE, client.wait_for(|s| !matches!(s, State::Connected { .. })))
        .await
        .expect("disconnected");
    // Its ack has no connection to go on; an action asked for now waits for one.
    drop(first);
    let c = client.clone();
    let action = tokio::spawn(async move { c.action("ChangeAgentStateEvent", json!({"state": "Away"})).await });
    b.start_again().await;
    let State::Connected { session_id: again, resumed } = connected(&client).await else { unreachable!() };
    assert!(resumed, "resumed with the stored key");
    assert_eq!(again, session_id);
    assert_eq!(action.await.expect("join"), Ok(()));
    // The bridge redelivers the unacked notification; the client acks it again
    // without handing it over twice: the next one the application sees is new.
    b.presence("a1", "e2").await;
    let second = notification(&mut events).await;
    // (Seqs are reserved on disk in blocks: after a restart they continue above the block.)
    assert!(second.uuid != first_uuid && second.seq > first_seq, "e1 was not handed over again");
    drop(second);
    b.metric_reaches("cceb_notifications_acked_total", 2.0).await;
    let actions: Vec<Value> =
        b.published().await.into_iter().filter(|r| r["record"] == "ChangeAgentStateEvent").collect();
    assert_eq!(actions.len(), 1, "{actions:?}");
}

#[tokio::test]
async fn an_action_resolves_on_ack_is_retried_after_backend_unavailable_and_refusals_are_typed() {
    let b = TestBridge::start().await;
    let (client, _events) = fast(b.ws_url()).token(token("a1")).build();
    connected(&client).await;
    client.action("ChangeAgentStateEvent", json!({"state": "Available"})).await.expect("acked");
    b.set_bus(false).await;
    let c = client.clone();
    let action =
        tokio::spawn(
            async move { c.action_with_uuid("retry-1", "ChangeAgentStateEvent", json!({"state": "Away"})).await },
        );
    let unavailable = "cceb_errors_total{code=\"backend_unavailable\"}";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while b.metric(unavailable).await < 2.0 {
        assert!(tokio::time::Instant::now() < deadline, "the action was not retried");
        tokio::time::sleep(10 * MS).await;
    }
    b.set_bus(true).await;
    assert_eq!(action.await.expect("join"), Ok(()));
    let states: Vec<Value> = b.published().await.iter().map(|r| r["value"]["state"].clone()).collect();
    assert_eq!(states, [json!("Available"), json!("Away")], "published once each");
    let refused = client.action("ChangeAgentStateEvent", json!({"state": "Away", "tenantGuid": "t2"})).await;
    match refused {
        Err(ActionError::Refused { code: ErrorCode::ReservedField, field, .. }) => {
            assert_eq!(field.as_deref(), Some("tenantGuid"))
        }
        other => panic!("expected reserved_field, got {other:?}"),
    }
    assert_eq!(b.published().await.len(), 2, "a refused action is not retried");
}

#[tokio::test]
async fn a_new_token_is_fetched_on_4002() {
    let clock = Arc::new(cceb::clock::ManualClock::at_system_time());
    let b = TestBridge::start_with_clock(clock.clone()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let (client, mut events) = fast(b.ws_url())
        .token_provider(move || {
            let first = counter.fetch_add(1, Ordering::SeqCst) == 0;
            let token = if first {
                // The bridge's clock moves to 200 ms before the first token's expiry.
                let (token, exp) = token_and_exp("a1", Duration::from_secs(3600));
                clock.set(exp * 1000 - 200);
                token
            } else {
                // The next one lasts.
                token_ttl("a1", Duration::from_secs(7200))
            };
            async move { Ok::<_, String>(token) }
        })
        .build();
    let mut saw_4002 = false;
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await.expect("an event in time") {
            Some(Event::State(State::Disconnected { code })) => saw_4002 |= code == Some(4002),
            Some(Event::State(State::Connected { .. })) if saw_4002 => break,
            Some(Event::State(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // The new connection works.
    client.action("ChangeAgentStateEvent", json!({"state": "Away"})).await.expect("acked");
}

#[tokio::test]
async fn a_refused_token_stops_the_client_with_4001() {
    let b = TestBridge::start().await;
    let (client, mut events) = fast(b.ws_url()).token("not-a-jwt").build();
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await.expect("an event in time") {
            Some(Event::Closed { code, reason }) => {
                assert_eq!(code, Some(4001));
                assert!(reason.contains("unauthorized"), "{reason}");
                break;
            }
            Some(Event::State(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(client.action("ChangeAgentStateEvent", json!({})).await, Err(ActionError::Closed));
}

#[tokio::test]
async fn a_connection_speaks_the_contract_typed_both_ways() {
    use cceb_client::cceb_protocol::incoming::Hello;
    use cceb_client::cceb_protocol::outgoing::ServerMessage;
    use cceb_client::cceb_protocol::ClientMessage;
    use cceb_client::{Connection, Error};

    let b = TestBridge::start().await;
    // A refused token: the bridge's `error`, then its close, in one error.
    let mut refused = Connection::connect(&b.ws_url()).await.expect("connects");
    let bad = Hello { token: "not-a-jwt".into(), ..Hello::default() };
    match tokio::time::timeout(PATIENCE, refused.hello(&bad)).await.expect("in time") {
        Err(Error::Refused { code: Some(4001), error }) => assert_eq!(error.code, ErrorCode::Unauthorized),
        other => panic!("expected a refusal with 4001, got {other:?}"),
    }
    assert_eq!(refused.close_code(), Some(4001));

    let mut conn = Connection::connect(&b.ws_url()).await.expect("connects");
    let reply = conn.hello(&Hello { token: token("a1"), long_lived: true, ..Hello::default() }).await.expect("hello");
    assert!(reply.long_lived && !reply.resumed && reply.session_key.is_some());
    let mut details = serde_json::Map::new();
    details.insert("state".into(), json!("Away"));
    conn.action("act-1", "ChangeAgentStateEvent", &details).await.expect("send");
    async fn next(c: &mut Connection) -> Result<ServerMessage, Error> {
        tokio::time::timeout(PATIENCE, c.next()).await.expect("an answer in time")
    }
    assert!(matches!(next(&mut conn).await, Ok(ServerMessage::Ack { uuid }) if uuid == "act-1"));
    b.presence("a1", "e1").await;
    let Ok(ServerMessage::Notification { ty: NotificationType::Presence, uuid, seq: 1, .. }) = next(&mut conn).await
    else {
        panic!("expected the presence notification")
    };
    conn.ack(&uuid).await.expect("send");
    b.metric_reaches("cceb_notifications_acked_total", 1.0).await;
    // Raw text, as it is: the bridge answers what it could not read, and the connection stays.
    conn.send_text("{").await.expect("send");
    assert!(
        matches!(next(&mut conn).await, Ok(ServerMessage::Error { error, .. }) if error.code == ErrorCode::InvalidJson)
    );
    conn.send(&ClientMessage::EndSession { uuid: "bye".into() }).await.expect("send");
    assert!(matches!(next(&mut conn).await, Ok(ServerMessage::Ack { uuid }) if uuid == "bye"));
    assert!(matches!(next(&mut conn).await, Err(Error::Closed { code: Some(1000), .. })));
    assert_eq!(conn.close_code(), Some(1000));
    // Every read after the close says so again.
    assert!(matches!(next(&mut conn).await, Err(Error::Closed { code: Some(1000), .. })));
}
