//! Contract section 6: long-lived sessions — resume, takeover, end, mailbox
//! bounds, TTL expiry, chat availability, auto-accept and push, on one bridge
//! (restarts of the binary are in `restart`).

use crate::support::*;
use cceb::clock::ManualClock;
use cceb_protocol::outgoing::HelloReply;
use cceb_protocol::{ErrorCode, NotificationType as N};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `hello` asking for a long-lived session, with extra `data` keys.
pub async fn long_lived(c: &mut Client, tenant: &str, agent: &str, extra: Value) -> HelloReply {
    let mut data = json!({"token": token(tenant, agent), "long_lived": true});
    data.as_object_mut().expect("object").extend(extra.as_object().cloned().unwrap_or_default());
    c.hello_with(data).await
}

/// Resumes with `key` as (tenant, agent).
pub async fn resume(url: &str, tenant: &str, agent: &str, key: &str) -> (Client, HelloReply) {
    let mut c = Client::connect(url).await;
    let reply = c.hello_with(json!({"token": token(tenant, agent), "session_key": key})).await;
    (c, reply)
}

pub async fn presence(b: &TestBridge, tenant: &str, agent: &str, state: &str) {
    b.event("AgentPresenceEvent", json!({"tenantGuid": tenant, "agentGuid": agent, "state": state})).await;
}

/// Reads `n` notifications: (uuid, seq, data.state).
pub async fn states(c: &mut Client, n: usize) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (_, uuid, seq, data) = c.notification().await;
        out.push((uuid, seq, data["state"].as_str().unwrap_or_default().to_owned()));
    }
    out
}

/// Published records of one kind: their `value`s.
async fn published_values(b: &TestBridge, record: &str) -> Vec<Value> {
    b.published().await.into_iter().filter(|r| r["record"] == record).map(|r| r["value"].clone()).collect()
}

#[tokio::test]
async fn resume_replays_the_mailbox_in_order_then_live_traffic_without_gap_or_duplicate() {
    let b = TestBridge::start().await;
    let mut c = b.connect().await;
    let hello = long_lived(&mut c, "t", "a", json!({})).await;
    assert!(hello.long_lived && !hello.resumed);
    let key = hello.session_key.clone().expect("a long-lived session has a key");
    assert!(key.len() >= 43, "at least 128 random bits: {key}");
    presence(&b, "t", "a", "s1").await;
    presence(&b, "t", "a", "s2").await;
    let first = states(&mut c, 2).await;
    c.ack(&first[0].0).await;
    c.round_trip("acked").await;
    drop(c);
    presence(&b, "t", "a", "s3").await;
    presence(&b, "t", "a", "s4").await;

    let (mut c, again) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(again.resumed && again.long_lived);
    assert_eq!((again.session_id.as_str(), again.session_key.as_deref()), (hello.session_id.as_str(), Some(&*key)));
    assert_eq!(again.dropped, Some(0));
    let replay = states(&mut c, 3).await;
    assert_eq!(replay[0], first[1], "the unacked one comes again with its uuid and seq");
    let seqs: Vec<(u64, &str)> = replay.iter().map(|(_, seq, s)| (*seq, s.as_str())).collect();
    assert_eq!(seqs, [(2, "s2"), (3, "s3"), (4, "s4")]);
    for (uuid, _, _) in &replay {
        c.ack(uuid).await;
    }
    presence(&b, "t", "a", "s5").await;
    let live = states(&mut c, 1).await;
    assert_eq!((live[0].1, live[0].2.as_str()), (5, "s5"));
    assert!(c.round_trip("nothing-else").await.is_empty());
}

#[tokio::test]
async fn foreign_unknown_and_malformed_keys_get_a_new_session_and_reveal_nothing() {
    let b = TestBridge::start().await;
    let mut owner = b.connect().await;
    let hello = long_lived(&mut owner, "t", "a", json!({})).await;
    let key = hello.session_key.expect("key");
    presence(&b, "t", "a", "private").await;

    let tampered = format!("{}x", &key[..key.len() - 1]);
    for (tenant, agent, k) in
        [("t", "b", key.as_str()), ("t2", "a", &key), ("t", "a", &tampered), ("t", "a", "nonsense")]
    {
        let (mut c, r) = resume(&b.ws_url(), tenant, agent, k).await;
        assert!(!r.resumed, "{tenant}/{agent} with {k}");
        assert!(r.long_lived, "a hello with a key asks for a long-lived session");
        assert_ne!(r.session_id, hello.session_id);
        assert_ne!(r.session_key.as_deref(), Some(key.as_str()));
        assert_eq!(r.dropped, None);
        assert!(c.round_trip("nothing").await.is_empty(), "nothing of the other session is delivered");
    }
    // The owner was neither taken over nor robbed.
    let got = states(&mut owner, 1).await;
    assert_eq!(got[0].2, "private");
    assert!(owner.round_trip("still-open").await.is_empty());
}

#[tokio::test]
async fn a_second_connection_with_the_key_takes_over_and_the_first_is_closed_with_4005() {
    let b = TestBridge::start().await;
    let mut first = b.connect().await;
    let key = long_lived(&mut first, "t", "a", json!({})).await.session_key.expect("key");
    presence(&b, "t", "a", "before").await;
    let sent = states(&mut first, 1).await;
    let (mut second, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    assert_eq!(first.closed().await.0, Some(4005));
    assert_eq!(states(&mut second, 1).await, sent, "what the first did not ack goes to the second");
    presence(&b, "t", "a", "after").await;
    assert_eq!(states(&mut second, 1).await[0].2, "after");
}

#[tokio::test]
async fn end_session_drops_the_mailbox_and_kills_the_key_also_across_a_restart() {
    let mut b = TestBridge::start().await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    presence(&b, "t", "a", "unacked").await;
    states(&mut c, 1).await;
    c.send(json!({"type":"end_session","uuid":"E1"})).await;
    c.expect_ack("E1").await;
    assert_eq!(c.closed().await.0, Some(1000));
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(!r.resumed);
    assert!(c.round_trip("empty").await.is_empty(), "the mailbox went with the session");
    drop(c);
    b.restart().await;
    let (_, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(!r.resumed, "an ended session does not come back after a restart");
}

#[tokio::test]
async fn the_mailbox_keeps_the_newest_and_counts_what_it_dropped() {
    let b = TestBridge::with(|s| s.mailbox_capacity = 3).await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    drop(c);
    for n in 1..=5 {
        presence(&b, "t", "a", &format!("s{n}")).await;
    }
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert_eq!(r.dropped, Some(2));
    let got: Vec<(u64, String)> = states(&mut c, 3).await.into_iter().map(|(_, seq, s)| (seq, s)).collect();
    assert_eq!(got, [(3, "s3".to_owned()), (4, "s4".to_owned()), (5, "s5".to_owned())]);
    assert_eq!(b.metric("cceb_mailbox_dropped_total").await, 2.0);
    // The count is reported once.
    drop(c);
    let (_, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert_eq!(r.dropped, Some(0));
}

#[tokio::test]
async fn a_long_lived_connection_has_at_most_max_unacked_in_flight_and_4004_only_after_a_full_window_waits_ack_timeout()
{
    let b = TestBridge::with(|s| {
        s.max_unacked = 2;
        s.ack_timeout_ms = 300;
    })
    .await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    let event = |n: u32| json!({"record":"AgentPresenceEvent","value":{"tenantGuid":"t","agentGuid":"a","state":format!("s{n}")}});
    let (status, _) = b.post_events(json!([event(1), event(2), event(3)])).await;
    assert_eq!(status, 202);
    let window = states(&mut c, 2).await;
    assert_eq!((window[0].2.as_str(), window[1].2.as_str()), ("s1", "s2"));
    c.ack(&window[0].0).await;
    let next = states(&mut c, 1).await;
    assert_eq!(next[0].2, "s3", "an ack frees the window for the one waiting");
    // No more acks: the window (s2, s3) stays full for ack_timeout.
    let (code, _redelivered) = c.closed().await;
    assert_eq!(code, Some(4004));
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got: Vec<String> = states(&mut c, 2).await.into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(got, ["s2", "s3"], "the mailbox keeps what it holds");
}

#[tokio::test]
async fn a_resume_with_a_backlog_larger_than_the_window_is_replayed_window_by_window_without_4004() {
    let b = TestBridge::with(|s| s.max_unacked = 3).await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    drop(c);
    for n in 1..=10 {
        presence(&b, "t", "a", &format!("s{n}")).await;
    }
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert_eq!(r.dropped, Some(0));
    let mut got = Vec::new();
    while got.len() < 10 {
        let window = states(&mut c, 3.min(10 - got.len())).await;
        assert!(c.round_trip(&format!("w{}", got.len())).await.is_empty(), "never more than the window in flight");
        for (uuid, _, state) in window {
            c.ack(&uuid).await;
            got.push(state);
        }
    }
    let want: Vec<String> = (1..=10).map(|n| format!("s{n}")).collect();
    assert_eq!(got, want);
}

/// The session TTL of the tests that move a `ManualClock` past it.
const TTL: Duration = Duration::from_secs(60);
/// The sweep interval of those tests: sweeps run every few ms of real time.
const SWEEP_MS: u64 = 20;

/// A bridge whose session TTL is `TTL` by `clock`, swept every `SWEEP_MS`.
async fn on_clock(clock: &Arc<ManualClock>) -> TestBridge {
    TestBridge::with_clock(clock.clone(), |s| {
        s.session_ttl_seconds = TTL.as_secs();
        s.sweep_interval_ms = SWEEP_MS;
    })
    .await
}

/// Waits until the bridge holds no connection: a client's session is detached
/// (and its TTL started) before its connection is uncounted.
async fn all_disconnected(b: &TestBridge) {
    tokio::time::timeout(PATIENCE, async {
        while b.metric("cceb_connections").await > 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the bridge sees the clients go");
}

#[tokio::test]
async fn the_ttl_counts_from_disconnect_and_the_sweeper_expires_the_session() {
    let clock = Arc::new(ManualClock::at_system_time());
    let b = on_clock(&clock).await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    // Connected for longer than the TTL, with sweeps running: still valid.
    clock.advance(TTL * 2);
    tokio::time::sleep(Duration::from_millis(5 * SWEEP_MS)).await;
    assert!(c.round_trip("alive").await.is_empty());
    assert_eq!(b.metric("cceb_sessions_expired_total").await, 0.0);
    drop(c);
    all_disconnected(&b).await;
    let (c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(r.resumed, "a connected session does not expire");
    drop(c);
    all_disconnected(&b).await;
    // Nobody reconnects within the TTL: the sweeper ends it and clears the availability.
    clock.advance(TTL);
    let mut after = 0;
    let off = loop {
        let page = b.actions_after(after, 5000).await;
        after = page["next"].as_u64().expect("next");
        let off = page["records"]
            .as_array()
            .expect("records")
            .iter()
            .find(|r| r["record"] == "AgentChatAvailabilityEvent" && r["value"]["available"] == false);
        if let Some(off) = off {
            break off.clone();
        }
    };
    assert_eq!(off["value"]["agentGuid"], "a");
    let (_, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(!r.resumed, "an expired key starts a new session");
}

#[tokio::test]
async fn chat_availability_is_published_once_per_transition() {
    let b = TestBridge::start().await;
    // Short-lived sessions do not count.
    let (_short, _) = b.agent("t", "a").await;
    assert!(published_values(&b, "AgentChatAvailabilityEvent").await.is_empty());
    let mut one = b.connect().await;
    long_lived(&mut one, "t", "a", json!({})).await;
    let mut two = b.connect().await;
    let key_two = long_lived(&mut two, "t", "a", json!({})).await.session_key.expect("key");
    let records = published_values(&b, "AgentChatAvailabilityEvent").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        records[0],
        json!({"tenantGuid":"t","agentGuid":"a","irInstance":"ir-1","available":true,"isSystemAction":true,"isRelocate":false,"source":"CCEB"})
    );
    // Disconnecting is not ending: the session is still valid.
    drop(two);
    one.send(json!({"type":"end_session","uuid":"E1"})).await;
    one.expect_ack("E1").await;
    assert_eq!(published_values(&b, "AgentChatAvailabilityEvent").await.len(), 1);
    let (mut two, _) = resume(&b.ws_url(), "t", "a", &key_two).await;
    two.send(json!({"type":"end_session","uuid":"E2"})).await;
    two.expect_ack("E2").await;
    let records = published_values(&b, "AgentChatAvailabilityEvent").await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["available"], false);
}

#[tokio::test]
async fn auto_accept_publishes_one_accept_per_offered_interaction_connected_or_not() {
    let mut b = TestBridge::start().await;
    let mut c = b.connect().await;
    let hello = long_lived(&mut c, "t", "a", json!({"auto_accept": true})).await;
    assert!(hello.auto_accept);
    let key = hello.session_key.expect("key");
    let (_plain, _) = b.agent("t", "other").await;
    drop(c);
    let offer = |agent: &str, interaction: &str, state: &str| json!({"tenantGuid":"t","agentGuid": agent,"interactionId": interaction,"state": state,"channel":"CHAT"});
    b.event("InteractionUpdateEvent", offer("a", "i-1", "offered")).await;
    b.event("InteractionUpdateEvent", offer("a", "i-1", "offered")).await;
    b.event("InteractionUpdateEvent", offer("a", "i-2", "connected")).await;
    b.event("InteractionUpdateEvent", offer("other", "i-3", "offered")).await;
    let accepts = published_values(&b, "AcceptInteractionEvent").await;
    assert_eq!(
        accepts,
        [
            json!({"tenantGuid":"t","agentGuid":"a","irInstance":"ir-1","interactionId":"i-1","isSystemAction":true,"isRelocate":false,"source":"CCEB"})
        ]
    );
    b.restart().await;
    b.event("InteractionUpdateEvent", offer("a", "i-1", "offered")).await;
    assert!(published_values(&b, "AcceptInteractionEvent").await.is_empty(), "not again after a restart");
    // The notifications were still delivered.
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    for _ in 0..4 {
        let (ty, _, _, data) = c.notification().await;
        assert_eq!((ty, &data["agent_guid"]), (N::InteractionUpdate, &json!("a")));
    }
}

/// Announcements received: (Authorization header, body).
type Received = Arc<Mutex<Vec<(Option<String>, Value)>>>;

/// A real HTTP receiver for push announcements; answers 503 to the first
/// `fail_first` requests so the bridge has to retry.
struct Receiver {
    url: String,
    got: Received,
    arrived: Arc<tokio::sync::Notify>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        use axum::http::{HeaderMap, StatusCode};
        let got: Received = Arc::default();
        let arrived = Arc::new(tokio::sync::Notify::new());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (g, a) = (got.clone(), arrived.clone());
        let app = axum::Router::new().route(
            "/push",
            axum::routing::post(move |headers: HeaderMap, axum::Json(v): axum::Json<Value>| {
                let (g, a, calls) = (g.clone(), a.clone(), calls.clone());
                async move {
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let auth = headers.get("authorization").and_then(|h| h.to_str().ok()).map(str::to_owned);
                    g.lock().expect("lock").push((auth, v));
                    a.notify_one();
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/push", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, got, arrived }
    }

    async fn next(&self) -> (Option<String>, Value) {
        loop {
            if let Some(v) = self.got.lock().expect("lock").pop() {
                return v;
            }
            tokio::time::timeout(PATIENCE, self.arrived.notified()).await.expect("an announcement arrives");
        }
    }
}

#[tokio::test]
async fn push_announces_to_the_webhook_while_disconnected_and_the_payload_stays_in_the_mailbox() {
    let hook = Receiver::start(2).await;
    let b = TestBridge::with(|s| {
        s.push_webhook_url = Some(hook.url.clone());
        s.push_webhook_token = Some("hook-secret".into());
        s.push_webhook_backoff_ms = 10;
    })
    .await;
    let mut c = b.connect().await;
    let hello = long_lived(&mut c, "t", "a", json!({"push": {"provider": "webhook", "token": "device-1"}})).await;
    let key = hello.session_key.expect("key");
    // Connected: delivered, not announced.
    presence(&b, "t", "a", "connected").await;
    let (_, first, _, _) = c.notification().await;
    c.ack(&first).await;
    c.round_trip("acked").await;
    drop(c);
    presence(&b, "t", "a", "away").await;
    let (auth, announced) = hook.next().await;
    assert_eq!(auth.as_deref(), Some("Bearer hook-secret"));
    let uuid = announced["uuid"].as_str().expect("uuid").to_owned();
    assert_eq!(
        announced,
        json!({"token": "device-1", "session_id": hello.session_id, "type": "presence", "uuid": uuid})
    );
    assert!(hook.got.lock().expect("lock").is_empty(), "the connected-time notification was not announced");
    let (mut c, _) = resume(&b.ws_url(), "t", "a", &key).await;
    let (ty, got_uuid, _, data) = c.notification().await;
    assert_eq!((ty, got_uuid.as_str(), &data["state"]), (N::Presence, uuid.as_str(), &json!("away")));
}

#[tokio::test]
async fn the_other_sessions_of_the_agent_keep_their_own_mailboxes() {
    let b = TestBridge::start().await;
    let mut mobile = b.connect().await;
    let key = long_lived(&mut mobile, "t", "a", json!({})).await.session_key.expect("key");
    let (mut desktop, _) = b.agent("t", "a").await;
    drop(mobile);
    presence(&b, "t", "a", "both").await;
    let (_, uuid, _, _) = desktop.notification().await;
    desktop.ack(&uuid).await;
    desktop.round_trip("acked").await;
    let (mut mobile, _) = resume(&b.ws_url(), "t", "a", &key).await;
    let (_, again, _, _) = mobile.notification().await;
    assert_eq!(again, uuid, "an ack on one session does not ack another's copy");
    assert!(mobile.round_trip("nothing-else").await.is_empty());
}

#[tokio::test]
async fn a_session_whose_ttl_passed_while_the_bridge_was_down_is_gone_after_the_restart() {
    let clock = Arc::new(ManualClock::at_system_time());
    let mut b = on_clock(&clock).await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    // Connected at shutdown: closed with 1012 (answered at once, so the bridge need not linger).
    let closed = async {
        let (code, _) = c.closed().await;
        c.socket_closed().await;
        code
    };
    let ((), code) = tokio::join!(b.shutdown(), closed);
    assert_eq!(code, Some(1012));
    clock.advance(TTL);
    b.restart().await;
    let records = published_values(&b, "AgentChatAvailabilityEvent").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["available"], false);
    let (_, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(!r.resumed);
}

#[tokio::test]
async fn a_webhook_that_never_answers_does_not_hold_up_delivery() {
    // Accepts connections and reads nothing: every announcement hangs until its timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/push", silent.local_addr().expect("addr"));
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = silent.accept().await {
            keep.lock().expect("lock").push(sock);
        }
    });
    let b = TestBridge::with(|s| s.push_webhook_url = Some(url)).await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({"push": {"provider": "webhook", "token": "d"}})).await;
    let key = key.session_key.expect("key");
    drop(c);
    for n in 1..=3 {
        let posted = tokio::time::timeout(PATIENCE, presence(&b, "t", "a", &format!("s{n}"))).await;
        posted.expect("the backend port answers without waiting for the webhook");
    }
    let (mut c, _) = resume(&b.ws_url(), "t", "a", &key).await;
    let got: Vec<String> = states(&mut c, 3).await.into_iter().map(|(_, _, s)| s).collect();
    assert_eq!(got, ["s1", "s2", "s3"]);
    // And the announcements were attempted, hanging on the silent receiver.
    tokio::time::timeout(PATIENCE, async {
        while held.lock().expect("lock").is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the bridge tried to announce");
}

#[tokio::test]
async fn past_the_cap_the_least_recently_connected_idle_session_is_ended_and_then_hello_is_refused_with_4006() {
    let b = TestBridge::with(|s| s.max_sessions_per_agent = 2).await;
    let mut first = b.connect().await;
    let key1 = long_lived(&mut first, "t", "a", json!({})).await.session_key.expect("key");
    drop(first);
    let mut second = b.connect().await;
    let key2 = long_lived(&mut second, "t", "a", json!({})).await.session_key.expect("key");
    second.round_trip("hello-done").await;
    drop(second);
    // Short-lived sessions, another agent and another tenant do not count.
    let _short = b.agent("t", "a").await;
    let mut other = b.connect().await;
    long_lived(&mut other, "t", "b", json!({})).await;
    let mut elsewhere = b.connect().await;
    long_lived(&mut elsewhere, "t2", "a", json!({})).await;
    let mut third = b.connect().await;
    long_lived(&mut third, "t", "a", json!({})).await;
    assert_eq!(b.metric("cceb_sessions_evicted_total").await, 1.0);
    let (_two, r) = resume(&b.ws_url(), "t", "a", &key2).await;
    assert!(r.resumed, "the more recently connected one stays");
    // Both of the agent's sessions are connected now: no room.
    let mut fourth = b.connect().await;
    fourth.send(json!({"type":"hello","uuid":"h4","data":{"token": token("t", "a"), "session_key": key1}})).await;
    fourth.expect_error("h4", ErrorCode::TooManySessions).await;
    assert_eq!(fourth.closed().await.0, Some(4006));
    let records = published_values(&b, "AgentChatAvailabilityEvent").await;
    let of_a: Vec<&Value> = records.iter().filter(|r| r["tenantGuid"] == "t" && r["agentGuid"] == "a").collect();
    assert_eq!(of_a.len(), 1, "still available throughout: {records:?}");
}

#[tokio::test]
async fn a_slow_availability_publish_holds_up_no_other_hello() {
    let b = TestBridge::start().await;
    if b.skip_on_kafka("the slow broker is the embedded bus's delay switch") {
        return;
    }
    b.set_bus_hold(true).await;
    // The first long-lived hello publishes `available: true`, which the bus holds.
    let url = b.ws_url();
    let first = tokio::spawn(async move {
        let mut c = Client::connect(&url).await;
        long_lived(&mut c, "t", "a", json!({})).await;
        c
    });
    tokio::time::timeout(PATIENCE, async {
        while b.bus_switches().await["waiting"] != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first hello's publish reaches the bus");
    let mut second = b.connect().await;
    long_lived(&mut second, "t", "a", json!({})).await;
    assert!(!first.is_finished(), "the second hello was answered while the first one's publish was still under way");
    b.set_bus_hold(false).await;
    first.await.expect("first hello");
    assert_eq!(published_values(&b, "AgentChatAvailabilityEvent").await.len(), 1, "one transition, one record");
}

#[tokio::test]
async fn a_session_key_is_never_written_to_disk_only_its_hash() {
    use base64::Engine;
    let mut b = TestBridge::start().await;
    if b.skip_on_kafka("the data directory is the same on both buses") {
        return;
    }
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    drop(c);
    // Everything the bridge keeps is on disk once it has stopped.
    b.shutdown().await;
    let (id, secret) = key.rsplit_once('.').expect("<id>.<secret>");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(secret).expect("base64 secret");
    let mut files = 0;
    let mut id_seen = false;
    if b.settings().store == cceb::config::StoreKind::Redis {
        // On Redis: every key and value under the bridge's prefix.
        let has = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        for (key, values) in redis_dump(&b.settings().redis_url, &b.settings().redis_prefix).await {
            for bytes in std::iter::once(&key).chain(&values) {
                files += 1;
                assert!(!has(bytes, secret.as_bytes()) && !has(bytes, &raw), "the key's secret is in Redis");
                id_seen |= has(bytes, id.as_bytes());
            }
        }
        assert!(files > 0 && id_seen, "the session itself is in Redis (else this test proves nothing)");
        return;
    }
    for entry in std::fs::read_dir(b.data_dir()).expect("data dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("readable");
        files += 1;
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!has(secret.as_bytes()) && !has(&raw), "the key's secret is on disk");
        id_seen |= has(id.as_bytes());
    }
    assert!(files > 0 && id_seen, "the session itself is on disk (else this test proves nothing)");
}
