//! W3C trace context (docs/PROTOCOL.md, "Trace context"): an action's
//! `traceparent` goes beside its bus record; an event's goes into the log
//! lines of its notifications. Runs on both buses: on Kafka the harness shows
//! a record's `traceparent` header where the backend port shows the field.

use crate::support::*;
use cceb_protocol::ErrorCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OTHER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";

fn traced_action(uuid: &str, traceparent: Value) -> Value {
    json!({"type": "action", "uuid": uuid, "data": {
        "action": "ChangeAgentStateEvent", "action_details": {"state": "Away"}, "traceparent": traceparent,
    }})
}

#[tokio::test]
async fn an_actions_traceparent_goes_beside_its_record_and_a_retry_with_another_is_the_same_action() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send(traced_action("A1", TP.into())).await;
    c.expect_ack("A1").await;
    // The same uuid with another trace: the same action, acked, not published again.
    c.send(traced_action("A1", OTHER.into())).await;
    c.expect_ack("A1").await;
    c.send(traced_action("A2", Value::Null)).await;
    c.expect_ack("A2").await;
    let published = b.published().await;
    assert_eq!(published.len(), 2, "{published:?}");
    assert_eq!(published[0]["traceparent"], TP);
    assert_eq!(published[0]["value"]["state"], "Away");
    assert!(published[0]["value"].get("traceparent").is_none(), "not part of the record: {}", published[0]);
    assert!(published[1].get("traceparent").is_none(), "none given, none shown: {}", published[1]);
}

#[tokio::test]
async fn an_invalid_traceparent_refuses_the_action_naming_the_field_and_nothing_is_published() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let bad = [
        Value::from("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"),
        Value::from("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        Value::from("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        Value::from("trace-me"),
        json!({"traceparent": TP}),
    ];
    for (n, t) in bad.into_iter().enumerate() {
        let uuid = format!("B{n}");
        c.send(traced_action(&uuid, t.clone())).await;
        let field = c.expect_error(&uuid, ErrorCode::InvalidActionDetails).await;
        assert_eq!(field.as_deref(), Some("data.traceparent"), "{t}");
    }
    // Not remembered: corrected, the same uuid is published.
    c.send(traced_action("B0", TP.into())).await;
    c.expect_ack("B0").await;
    let published = b.published().await;
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0]["traceparent"], TP);
}

/// A log writer the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("log").clone();
        String::from_utf8_lossy(&bytes).lines().map(str::to_owned).collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test]
async fn an_events_traceparent_is_in_the_log_line_of_each_notification_it_queues() {
    // The bridge runs on this test's (single-threaded) runtime: a subscriber
    // set for this thread sees its log lines, and no other test's.
    // tracing caches each call site's interest process-wide, computed when a
    // thread first reaches it; while only one dispatcher exists, from that
    // thread's own default (tokio-rs/tracing#3611). Another test's thread,
    // with none, reaching "notification queued" first would cache "never" for
    // every thread (seen once in CI under load). With a second dispatcher
    // alive, interest is asked of every dispatcher, this test's included.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    let presence = |state: &str| json!({"tenantGuid": "t", "agentGuid": "a", "state": state});
    let (status, body) =
        b.post_events(json!([{"record": "AgentPresenceEvent", "value": presence("traced"), "traceparent": TP}])).await;
    assert_eq!(status, 202, "{body}");
    let (_, traced, _, data) = c.notification().await;
    assert_eq!(data["state"], "traced");
    b.event("AgentPresenceEvent", presence("untraced")).await;
    let (_, untraced, _, _) = c.notification().await;
    let lines = log.lines();
    let line_of = |uuid: &str| {
        lines
            .iter()
            .find(|l| l.contains("notification queued") && l.contains(&format!("uuid={uuid}")))
            .unwrap_or_else(|| panic!("no log line queues {uuid}:\n{}", lines.join("\n")))
    };
    assert!(line_of(&traced).contains(&format!("traceparent={TP}")), "{}", line_of(&traced));
    assert!(!line_of(&untraced).contains("traceparent"), "{}", line_of(&untraced));
}

#[tokio::test]
async fn the_backend_port_refuses_an_event_whose_traceparent_is_invalid_naming_it() {
    let b = TestBridge::start().await;
    if b.skip_on_kafka("the backend port's refusals") {
        return;
    }
    let ok = json!({"record": "AgentPresenceEvent", "value": {"tenantGuid": "t", "agentGuid": "a", "state": "s"}});
    let mut bad = ok.clone();
    bad["traceparent"] = "00-abc".into();
    let (status, body) = b.post_events(json!([ok, bad])).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("[1]: `traceparent`"), "{error}");
    let mut not_string = ok.clone();
    not_string["traceparent"] = json!(1);
    assert_eq!(b.post_events(not_string).await.0, 400);
}
