//! Contract section 8 on a real Kafka-protocol broker: what only the Kafka
//! bus does. `scripts/test` runs this module only in the Kafka pass (the rest
//! of the suite runs in both passes).

use crate::sessions::{long_lived, resume, states};
use crate::support::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

/// The first record of partition 0 of `topic`: payload and headers.
async fn first_record(brokers: &str, topic: &str) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning).expect("offset");
        c.assign(&tpl).expect("assign");
        let m = c.poll(PATIENCE * 2).expect("a record").expect("record");
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default();
        (m.payload().unwrap_or_default().to_vec(), headers)
    })
    .await
    .expect("join")
}

/// The broker of the Kafka pass; `None`, with the reason printed, when this
/// run has none (a plain `cargo test`): the test then passes without running.
fn skip_without_broker() -> Option<String> {
    let brokers = crate::kafka_backend::brokers();
    if brokers.is_none() {
        eprintln!("skipped: no Kafka broker (scripts/test starts one and sets CCEB_TEST_KAFKA)");
    }
    brokers
}

fn kafka(b: &TestBridge) -> &crate::kafka_backend::KafkaBackend {
    b.kafka.as_ref().expect("this module runs against a Kafka broker (CCEB_TEST_KAFKA)")
}

async fn presence(b: &TestBridge, state: &str) {
    b.event("AgentPresenceEvent", json!({"tenantGuid": "t", "agentGuid": "a", "state": state})).await;
}

#[tokio::test]
async fn actions_go_to_the_routed_topic_avro_encoded_and_keyed_by_agent() {
    let routed = format!("routed-{}", uuid::Uuid::new_v4().simple());
    let Some(brokers) = skip_without_broker() else { return };
    crate::kafka_backend::create_topics(&brokers, &[&routed]).await;
    let b = TestBridge::with(|s| {
        s.kafka_action_topics.insert("AcceptInteractionEvent".into(), routed.clone());
    })
    .await;
    let (mut c, _) = b.agent("t", "a").await;
    c.expect_ack_of_action("k1", "ChangeAgentStateEvent", json!({"state": "Away"})).await;
    c.expect_ack_of_action("k2", "AcceptInteractionEvent", json!({"interactionId": "i-1"})).await;
    let page = b.actions_after(0, 5000).await;
    assert_eq!(page["records"].as_array().map(Vec::len), Some(1), "the default topic has the unrouted one");
    let r = &page["records"][0];
    assert_eq!((&r["record"], &r["key"]), (&json!("ChangeAgentStateEvent"), &json!("a")));
    assert_eq!(r["value"]["state"], "Away");
    assert_eq!(r["value"]["isSystemAction"], false);
    let page = kafka(&b).records_after(&routed, 0, 5000).await;
    assert_eq!(page["records"][0]["record"], "AcceptInteractionEvent");
    assert_eq!(page["records"][0]["value"]["interactionId"], "i-1");
}

#[tokio::test]
async fn an_undecodable_record_is_skipped_counted_and_dead_lettered_and_the_partition_goes_on() {
    let dlq = format!("dlq-{}", uuid::Uuid::new_v4().simple());
    let Some(brokers) = skip_without_broker() else { return };
    crate::kafka_backend::create_topics(&brokers, &[&dlq]).await;
    let b = TestBridge::with(|s| s.kafka_dead_letter_topic = dlq.clone()).await;
    let k = kafka(&b);
    let (mut c, _) = b.agent("t", "a").await;
    k.produce(&k.events_topic, "a", b"definitely not avro").await;
    // Decodable but not mappable: off-hook message ids are 250-255.
    k.produce_event(&k.events_topic, "OffHookEvent", json!({"tenantGuid":"t","agentGuid":"a","messageId":999})).await;
    presence(&b, "after-garbage").await;
    let (_, _, _, data) = c.notification().await;
    assert_eq!(data["state"], "after-garbage");
    assert_eq!(b.metric("cceb_events_total{outcome=\"undecodable\"}").await, 2.0);
    let (payload, headers) = first_record(&brokers, &dlq).await;
    let reason = headers.into_iter().find(|(k, _)| k == "cceb-error").map(|(_, v)| v);
    let dead = (payload, reason);
    assert_eq!(dead.0, b"definitely not avro");
    assert!(dead.1.is_some_and(|r| !r.is_empty()), "the reason travels in a header");
}

#[tokio::test]
async fn a_restart_neither_loses_nor_repeats_a_committed_notification() {
    if skip_without_broker().is_none() {
        return;
    }
    let mut b = TestBridge::start().await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    presence(&b, "s1").await;
    let first = states(&mut c, 1).await;
    drop(c);
    presence(&b, "s2").await;
    b.restart().await;
    presence(&b, "s3").await;
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got = states(&mut c, 3).await;
    assert_eq!(got[0], first[0]);
    let order: Vec<&str> = got.iter().map(|(_, _, s)| s.as_str()).collect();
    assert_eq!(order, ["s1", "s2", "s3"]);
    for (uuid, _, _) in &got {
        c.ack(uuid).await;
    }
    assert!(c.round_trip("no-repeat").await.is_empty(), "nothing consumed twice after the restart");
}

#[tokio::test]
async fn the_directory_is_read_from_the_provisioning_topic_before_ready() {
    if skip_without_broker().is_none() {
        return;
    }
    let mut b = TestBridge::start().await;
    let k = kafka(&b);
    let agent = json!({"tenantGuid": "t", "agentGuid": "a2", "contactId": "2002", "offHookEnabled": false, "recordingControls": 0});
    k.produce_event(&k.provisioning_topic, "AgentAddedEvent", agent).await;
    // A new node: empty data directory, same topics and group (offsets committed).
    b.restart_fresh().await;
    let ready = b.http.get(b.url("/readyz")).send().await.expect("answers");
    assert_eq!(ready.status().as_u16(), 200);
    let (mut c, _) = b.agent("t", "a1").await;
    c.expect_ack_of_action(
        "x1",
        "BlindTransferEvent",
        json!({"interactionId": "i", "destinationAgentContactId": "2002"}),
    )
    .await;
    let page = b.actions_after(0, 5000).await;
    assert_eq!(page["records"][0]["value"]["destinationAgentGuid"], "a2");
}

/// A broker of this test's own, so it can be stopped and started again. Its
/// topics live in a SQLite file, so like a real broker it comes back with the
/// same topics (and topic ids): tansu's memory storage would forget them, and
/// librdkafka 2.12 crashes on tansu's answer to a fetch of a forgotten topic id.
struct Broker {
    child: std::process::Child,
    port: u16,
}

impl Broker {
    fn start(port: u16, dir: &std::path::Path) -> Broker {
        let bin = std::env::var("CCEB_TEST_TANSU").expect("CCEB_TEST_TANSU: the tansu binary");
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(bin)
            .current_dir(dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu starts");
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu listens");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Broker { child, port }
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn readyz(b: &TestBridge, want: u16) {
    let deadline = std::time::Instant::now() + PATIENCE * 3;
    loop {
        let r = b.http.get(b.url("/readyz")).send().await.expect("answers");
        if r.status().as_u16() == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "/readyz never answered {want}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The publish bound of the outage tests; small, so an answer past it is plain.
const OUTAGE_PUBLISH_TIMEOUT_MS: u64 = 1000;

/// Kills the broker under a bridge configured by `configure`; actions sent one
/// after another meanwhile are each refused within the publish bound. Once
/// the broker is back, none of them is on the action topic, a retried uuid is
/// published once, and consumption resumes.
async fn outage(configure: impl FnOnce(&mut cceb::Settings)) {
    if skip_without_broker().is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let broker_dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(port, broker_dir.path());
    let brokers = format!("127.0.0.1:{port}");
    let mut s = test_settings();
    let data = tempfile::tempdir().expect("tempdir");
    s.data_dir = data.path().to_owned();
    s.kafka_publish_timeout_ms = OUTAGE_PUBLISH_TIMEOUT_MS;
    configure(&mut s);
    let k = crate::kafka_backend::KafkaBackend::create(&brokers, &mut s).await;
    let bridge = cceb::Bridge::start(s).await.expect("starts");
    let b = TestBridge::attach(bridge, k).await;
    let (mut c, _) = b.agent("t", "a").await;
    c.expect_ack_of_action("before", "ChangeAgentStateEvent", json!({"state": "Away"})).await;

    let port = broker.stop();
    // Several in a row: librdkafka's waits between reconnection attempts grow
    // meanwhile, and with them how late it reports a record failed. Each has
    // a state of its own, so a refused record reaching the topic later shows.
    let bound = std::time::Duration::from_millis(OUTAGE_PUBLISH_TIMEOUT_MS + 500);
    for state in ["down-1", "down-2", "down-3", "down-4"] {
        let started = std::time::Instant::now();
        c.send(json!({"type":"action","uuid": state,"data":{"action":"ChangeAgentStateEvent","action_details":{"state": state}}}))
            .await;
        c.expect_error(state, cceb_protocol::ErrorCode::BackendUnavailable).await;
        let took = started.elapsed();
        assert!(
            took <= bound,
            "{state} answered after {took:?}: past the publish timeout ({OUTAGE_PUBLISH_TIMEOUT_MS} ms)"
        );
    }
    readyz(&b, 503).await;

    let _broker = Broker::start(port, broker_dir.path());
    readyz(&b, 200).await;
    // The same uuid is published now (it was not remembered while refused).
    c.expect_ack_of_action("down-1", "ChangeAgentStateEvent", json!({"state": "down-1"})).await;
    c.expect_ack_of_action("after", "ChangeAgentStateEvent", json!({"state": "after"})).await;
    // To the end of the topic, past a record published after the broker returned.
    let states: Vec<_> = b.published().await.iter().map(|r| r["value"]["state"].clone()).collect();
    assert_eq!(
        states,
        [json!("Away"), json!("down-1"), json!("after")],
        "no refused record on the topic, the retried uuid once"
    );
    presence(&b, "after-outage").await;
    let (_, _, _, data) = c.notification().await;
    assert_eq!(data["state"], "after-outage", "consumption resumed by itself");
}

#[tokio::test]
async fn a_broker_outage_refuses_each_action_within_the_publish_timeout_and_none_reaches_the_topic_later() {
    outage(|_| {}).await;
}

#[tokio::test]
async fn a_broker_outage_keeps_the_publish_timeout_and_purges_what_librdkafka_would_send_later() {
    // The operator's properties win over the bridge's tuning: librdkafka holds
    // each record for a minute, and sends it as soon as it reconnects. The
    // bridge gives up at the bound and purges the record from librdkafka.
    outage(|s| {
        s.kafka_properties.insert("message.timeout.ms".into(), "60000".into());
        s.kafka_properties.insert("reconnect.backoff.ms".into(), "10".into());
        s.kafka_properties.insert("reconnect.backoff.max.ms".into(), "10".into());
    })
    .await;
}

/// Subjects and schemas a registry received, by id (1-based).
type Registered = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// The two endpoints of the Confluent schema registry REST API the bridge
/// uses. No Confluent-compatible registry can be installed on this machine
/// (none is packaged for crates.io, PyPI, Debian or npm), so this stands in.
async fn registry() -> (String, Registered) {
    use axum::extract::{Path, State};
    use axum::routing::{get, post};
    use axum::Json;
    use serde_json::Value;
    let seen: Registered = Default::default();
    let app = axum::Router::new()
        .route(
            "/subjects/{subject}/versions",
            post(|State(seen): State<Registered>, Path(subject): Path<String>, Json(body): Json<Value>| async move {
                let schema = body["schema"].as_str().unwrap_or_default().to_owned();
                let mut seen = seen.lock().expect("lock");
                let id = match seen.iter().position(|(_, s)| *s == schema) {
                    Some(i) => i + 1,
                    None => {
                        seen.push((subject, schema));
                        seen.len()
                    }
                };
                Json(json!({ "id": id }))
            }),
        )
        .route(
            "/schemas/ids/{id}",
            get(|State(seen): State<Registered>, Path(id): Path<usize>| async move {
                let seen = seen.lock().expect("lock");
                Json(json!({ "schema": seen.get(id.wrapping_sub(1)).map(|(_, s)| s.clone()) }))
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn with_a_schema_registry_records_use_the_confluent_framing_both_ways() {
    let Some(brokers) = skip_without_broker() else { return };
    let (url, seen) = registry().await;
    let b = TestBridge::with(|s| s.schema_registry_url = Some(url.clone())).await;
    let k = kafka(&b);
    let (mut c, _) = b.agent("t", "a").await;
    c.expect_ack_of_action("r1", "ChangeAgentStateEvent", json!({"state": "Away"})).await;
    let (payload, _) = first_record(&brokers, &k.actions_topic).await;
    assert_eq!(payload[0], 0, "Confluent magic byte");
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]) as usize;
    let (subject, schema) = seen.lock().expect("lock")[id - 1].clone();
    assert_eq!(subject, format!("{}-value", k.actions_topic), "TopicNameStrategy subject");
    let writer = apache_avro::Schema::parse_str(&schema).expect("a registered Avro schema");
    let value = apache_avro::from_avro_datum(&writer, &mut &payload[5..], None).expect("decodes");
    let value = cceb::schema::convert::to_json(&value, cceb::schema::Keys::AsIs);
    assert_eq!((&value["state"], &value["agentGuid"]), (&json!("Away"), &json!("a")));

    // The backend registers its event schema and frames its record the same way.
    let set = cceb::schema::SchemaSet::load(None).expect("schemas");
    let event_schema = set.wire().schema("AgentPresenceEvent").expect("schema").clone();
    let text = serde_json::to_string(&event_schema).expect("json");
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{url}/subjects/{}-value/versions", k.events_topic))
        .json(&json!({ "schema": text }))
        .send()
        .await
        .expect("registry answers")
        .json()
        .await
        .expect("json");
    let id = r["id"].as_u64().expect("id") as u32;
    let (rec, _) = set.event("AgentPresenceEvent").expect("record");
    let v = set.build(rec, json!({"tenantGuid":"t","agentGuid":"a","state":"framed"}).as_object().expect("obj"));
    let bytes = set.wire().encode_confluent("AgentPresenceEvent", id, v.expect("valid")).expect("encodes");
    let (partition, offset) = k.produce(&k.events_topic, "a", &bytes).await;
    k.wait_committed(&k.events_topic, partition, offset).await;
    let (_, _, _, data) = c.notification().await;
    assert_eq!(data["state"], "framed");
}

#[tokio::test]
async fn a_record_read_again_yields_the_same_notification_uuid() {
    if skip_without_broker().is_none() {
        return;
    }
    let mut b = TestBridge::start().await;
    let mut c = b.connect().await;
    let key = long_lived(&mut c, "t", "a", json!({})).await.session_key.expect("key");
    presence(&b, "once").await;
    let first = states(&mut c, 1).await;
    drop(c);
    // A new consumer group reads the topic again from its start, as after a
    // crash before the offset commit.
    let group = format!("{}-again", b.kafka.as_ref().map(|k| k.group.clone()).unwrap_or_default());
    b.settings_mut().kafka_group_id = group;
    b.restart().await;
    let (mut c, r) = resume(&b.ws_url(), "t", "a", &key).await;
    assert!(r.resumed);
    let got = states(&mut c, 2).await;
    assert_eq!(got[0], first[0], "the unacked one, as it was");
    assert_eq!((got[1].0.as_str(), got[1].2.as_str()), (first[0].0.as_str(), "once"), "read again: the same uuid");
    assert!(got[1].1 > got[0].1);
}

#[tokio::test]
async fn a_record_whose_notification_is_over_the_size_limit_is_dead_lettered_and_counted() {
    let dlq = format!("dlq-{}", uuid::Uuid::new_v4().simple());
    let Some(brokers) = skip_without_broker() else { return };
    crate::kafka_backend::create_topics(&brokers, &[&dlq]).await;
    let b = TestBridge::with(|s| {
        s.kafka_dead_letter_topic = dlq.clone();
        s.max_notification_bytes = 100;
    })
    .await;
    let k = kafka(&b);
    let (mut c, _) = b.agent("t", "a").await;
    let big = json!({"tenantGuid":"t","agentGuid":"a","state": "x".repeat(200)});
    k.produce_event(&k.events_topic, "AgentPresenceEvent", big).await;
    presence(&b, "small").await;
    let (_, _, _, data) = c.notification().await;
    assert_eq!(data["state"], "small", "the partition goes on past the refused record");
    assert_eq!(b.metric("cceb_events_total{outcome=\"undecodable\"}").await, 1.0);
    let (_, headers) = first_record(&brokers, &dlq).await;
    let reason =
        headers.into_iter().find(|(k, _)| k == "cceb-error").map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
    assert!(reason.is_some_and(|r| r.contains("CCEB_MAX_NOTIFICATION_BYTES")), "the reason names the limit");
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn an_actions_traceparent_is_its_records_header_not_part_of_its_avro_value() {
    let routed = format!("routed-{}", uuid::Uuid::new_v4().simple());
    let Some(brokers) = skip_without_broker() else { return };
    crate::kafka_backend::create_topics(&brokers, &[&routed]).await;
    let b = TestBridge::with(|s| {
        s.kafka_action_topics.insert("AcceptInteractionEvent".into(), routed.clone());
    })
    .await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send(json!({"type": "action", "uuid": "T1", "data": {
        "action": "AcceptInteractionEvent", "action_details": {"interactionId": "i-1"}, "traceparent": TRACEPARENT,
    }}))
    .await;
    c.expect_ack("T1").await;
    let (_, headers) = first_record(&brokers, &routed).await;
    assert_eq!(headers, [("traceparent".to_owned(), TRACEPARENT.as_bytes().to_vec())]);
    let page = kafka(&b).records_after(&routed, 0, 5000).await;
    let value = &page["records"][0]["value"];
    assert_eq!(value["interactionId"], "i-1");
    assert!(value.get("traceparent").is_none(), "{value}");
}

#[tokio::test]
async fn a_dead_lettered_record_keeps_its_traceparent_header() {
    let dlq = format!("dlq-{}", uuid::Uuid::new_v4().simple());
    let Some(brokers) = skip_without_broker() else { return };
    crate::kafka_backend::create_topics(&brokers, &[&dlq]).await;
    let b = TestBridge::with(|s| s.kafka_dead_letter_topic = dlq.clone()).await;
    let k = kafka(&b);
    let (mut c, _) = b.agent("t", "a").await;
    k.produce_traced(&k.events_topic, "a", b"not avro", Some(TRACEPARENT)).await;
    presence(&b, "after").await;
    assert_eq!(c.notification().await.3["state"], "after");
    let (payload, headers) = first_record(&brokers, &dlq).await;
    assert_eq!(payload, b"not avro");
    let trace = headers.into_iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v);
    assert_eq!(trace.as_deref(), Some(TRACEPARENT.as_bytes()));
}
