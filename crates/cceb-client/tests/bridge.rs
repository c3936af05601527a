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

#[tokio::test]
async fn a_provider_that_keeps_handing_out_the_same_expired_token_does_not_hot_loop_and_stops_after_bounded_retries() {
    let b = TestBridge::start().await;
    // Valid for about a second, then expired: always the same one.
    let stale = token_ttl("a1", Duration::from_secs(1));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let (_client, mut events) = fast(b.ws_url())
        .token_provider(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let t = stale.clone();
            async move { Ok::<_, String>(t) }
        })
        .build();
    let (mut attempts, mut downs) = (0usize, Vec::new());
    let closed = loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await.expect("an event in time") {
            Some(Event::State(State::Connecting)) => attempts += 1,
            Some(Event::State(State::Disconnected { code })) => downs.push(code),
            Some(Event::State(_)) => {}
            Some(Event::Closed { code, .. }) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(closed, Some(4001), "{downs:?}");
    // Before the fix: a reconnect at once after every 4002, hundreds of hellos per second.
    assert!(attempts < 30, "{attempts} connection attempts: {downs:?}");
    assert!(downs.contains(&Some(4002)), "{downs:?}");
    // 4001 right after the refresh: retried 3 times through the backoff, then the stop.
    assert_eq!(downs.iter().filter(|c| **c == Some(4001)).count(), 4, "{downs:?}");
    // The provider was asked again for each retry.
    assert_eq!(calls.load(Ordering::SeqCst), attempts, "{downs:?}");
}

#[tokio::test]
async fn end_session_resolves_once_the_bridge_ended_the_session_and_forgets_the_key() {
    let b = TestBridge::start().await;
    let keys = Arc::new(cceb_client::MemoryKeyStore::default());
    let (client, _events) = fast(b.ws_url()).token(token("a1")).long_lived(true).key_store(keys.clone()).build();
    connected(&client).await;
    assert!(cceb_client::KeyStore::load(&*keys).is_some());
    tokio::time::timeout(PATIENCE, client.end_session()).await.expect("in time").expect("ended");
    assert_eq!(client.state(), State::Closed);
    assert_eq!(cceb_client::KeyStore::load(&*keys), None);
}

/// A fake bridge on loopback: answers `hello`, and each `end_session` as `on_end` says
/// (`true`: ack and close 1000; `false`: refuse with `backend_unavailable`).
async fn fake_bridge(on_end: Vec<bool>) -> (String, Arc<AtomicUsize>) {
    use cceb_client::tungstenite::Message;
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("ws://{}/ws/v1", listener.local_addr().expect("addr"));
    let hellos = Arc::new(AtomicUsize::new(0));
    let count = hellos.clone();
    tokio::spawn(async move {
        let mut answers = on_end.into_iter();
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { continue };
            while let Some(Ok(Message::Text(t))) = ws.next().await {
                let m: Value = serde_json::from_str(&t).expect("json");
                let uuid = m["uuid"].clone();
                let reply = match m["type"].as_str() {
                    Some("hello") => {
                        count.fetch_add(1, Ordering::SeqCst);
                        json!({"type": "hello_reply", "uuid": uuid, "data": {
                            "session_id": "s1", "session_key": "k1", "resumed": false, "long_lived": true,
                            "auto_accept": false, "session_ttl_seconds": 600, "heartbeat_interval_seconds": 25,
                            "agent": {"tenant_guid": "t1", "agent_guid": "a1", "ir_instance": "ir-1"}}})
                    }
                    Some("end_session") if answers.next() == Some(true) => {
                        let ack = json!({"type": "ack", "uuid": uuid}).to_string();
                        let _ = ws.send(Message::text(ack)).await;
                        let frame = cceb_client::tungstenite::protocol::CloseFrame {
                            code: 1000.into(),
                            reason: "session ended".into(),
                        };
                        let _ = ws.close(Some(frame)).await;
                        break;
                    }
                    Some("end_session") => json!({"type": "error", "uuid": uuid,
                        "data": {"code": "backend_unavailable", "message": "the store cannot write"}}),
                    _ => continue,
                };
                let _ = ws.send(Message::text(reply.to_string())).await;
            }
        }
    });
    (url, hellos)
}

#[tokio::test]
async fn end_session_refused_by_the_bridge_is_an_error_the_session_and_its_key_stay_and_the_next_one_ends_it() {
    let (url, hellos) = fake_bridge(vec![false, true]).await;
    let keys = Arc::new(cceb_client::MemoryKeyStore::default());
    let (client, _events) = fast(url).token("t").long_lived(true).key_store(keys.clone()).build();
    connected(&client).await;
    let refused = tokio::time::timeout(PATIENCE, client.end_session()).await.expect("an answer in time");
    match refused {
        Err(ActionError::Refused { code: ErrorCode::BackendUnavailable, .. }) => {}
        other => panic!("expected backend_unavailable, got {other:?}"),
    }
    assert_eq!(cceb_client::KeyStore::load(&*keys).as_deref(), Some("k1"), "the session lives on");
    assert!(matches!(client.state(), State::Connected { .. }), "{:?}", client.state());
    tokio::time::timeout(PATIENCE, client.end_session()).await.expect("in time").expect("ended");
    assert_eq!(client.state(), State::Closed);
    assert_eq!(cceb_client::KeyStore::load(&*keys), None);
    assert_eq!(hellos.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn end_session_whose_connection_drops_unconfirmed_is_closed_keeps_the_key_and_stops() {
    use tokio::io::AsyncReadExt;
    // Hands the client to the fake bridge through a TCP hop that is cut once end_session is sent.
    let (url, hellos) = fake_bridge(vec![]).await;
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let front_url = format!("ws://{}/ws/v1", front.local_addr().expect("addr"));
    let back = url.trim_start_matches("ws://").trim_end_matches("/ws/v1").to_owned();
    tokio::spawn(async move {
        let Ok((mut down, _)) = front.accept().await else { return };
        let Ok(mut up) = tokio::net::TcpStream::connect(&back).await else { return };
        let (mut dr, mut dw) = down.split();
        let (mut ur, mut uw) = up.split();
        let upward = async {
            let mut buf = vec![0u8; 4096];
            let mut frames = 0;
            loop {
                let Ok(n) = dr.read(&mut buf).await else { return };
                if n == 0 {
                    return;
                }
                // The HTTP upgrade, then hello: the next frame is end_session, and it is lost with the connection.
                frames += 1;
                if frames > 2 {
                    return;
                }
                if tokio::io::AsyncWriteExt::write_all(&mut uw, &buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let downward = tokio::io::copy(&mut ur, &mut dw);
        tokio::select! { _ = upward => {}, _ = downward => {} }
    });
    let keys = Arc::new(cceb_client::MemoryKeyStore::default());
    let (client, _events) = fast(front_url).token("t").long_lived(true).key_store(keys.clone()).build();
    connected(&client).await;
    let r = tokio::time::timeout(PATIENCE, client.end_session()).await.expect("an answer in time");
    assert_eq!(r, Err(ActionError::Closed));
    assert_eq!(client.state(), State::Closed);
    assert_eq!(cceb_client::KeyStore::load(&*keys).as_deref(), Some("k1"));
    assert_eq!(hellos.load(Ordering::SeqCst), 1, "no new session behind the user's back");
}
