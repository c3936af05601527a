//! The backend side on Kafka, for running the behaviour suite against a real
//! broker (`CCEB_TEST_KAFKA=host:port`, set by `scripts/test`): events are
//! produced Avro-encoded to the bridge's events topic, published actions are
//! read back from its action topic. Every bridge gets its own topics and
//! consumer group, so tests stay independent.

use cceb::schema::convert::{to_json, Keys};
use cceb::schema::SchemaSet;
use cceb::Settings;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::PATIENCE;

pub fn brokers() -> Option<String> {
    std::env::var("CCEB_TEST_KAFKA").ok().filter(|b| !b.is_empty())
}

pub struct KafkaBackend {
    brokers: String,
    producer: FutureProducer,
    schemas: Arc<SchemaSet>,
    pub events_topic: String,
    pub provisioning_topic: String,
    pub actions_topic: String,
    pub group: String,
}

impl KafkaBackend {
    /// Creates this bridge's topics and points `s` at them.
    pub async fn create(brokers: &str, s: &mut Settings) -> KafkaBackend {
        Self::create_partitioned(brokers, s, 1).await
    }

    /// `create`, with `partitions` partitions per topic (a consumer group of
    /// several bridges shares them).
    pub async fn create_partitioned(brokers: &str, s: &mut Settings, partitions: i32) -> KafkaBackend {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (events, provisioning, actions) = (format!("ev-{id}"), format!("prov-{id}"), format!("act-{id}"));
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
        let topics: Vec<NewTopic> = [&events, &provisioning, &actions]
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        for r in admin.create_topics(&topics, &AdminOptions::new()).await.expect("create topics") {
            r.expect("topic created");
        }
        s.bus = cceb::config::BusKind::Kafka;
        s.kafka_brokers = brokers.to_owned();
        s.kafka_event_topics = vec![events.clone(), provisioning.clone()];
        s.kafka_provisioning_topic = provisioning.clone();
        s.kafka_action_topic = actions.clone();
        s.kafka_group_id = format!("g-{id}");
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
            .create()
            .expect("producer");
        KafkaBackend {
            brokers: brokers.to_owned(),
            producer,
            schemas: Arc::new(SchemaSet::load(s.schema_dir.as_deref()).expect("schemas")),
            events_topic: events,
            provisioning_topic: provisioning,
            actions_topic: actions,
            group: s.kafka_group_id.clone(),
        }
    }

    /// The same settings as `create` wrote, as the environment of a spawned `cceb serve`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CCEB_BUS", "kafka".into()),
            ("CCEB_KAFKA_BROKERS", self.brokers.clone()),
            ("CCEB_KAFKA_EVENT_TOPICS", format!("[{},{}]", self.events_topic, self.provisioning_topic)),
            ("CCEB_KAFKA_PROVISIONING_TOPIC", self.provisioning_topic.clone()),
            ("CCEB_KAFKA_ACTION_TOPIC", self.actions_topic.clone()),
            ("CCEB_KAFKA_GROUP_ID", self.group.clone()),
        ]
    }

    /// Waits until the bridge answers `/readyz` with 200 (consumer group joined,
    /// directory caught up).
    pub async fn wait_ready(&self, addr: std::net::SocketAddr) {
        let deadline = Instant::now() + PATIENCE * 3;
        loop {
            let r = reqwest::get(format!("http://{addr}/readyz")).await;
            if r.is_ok_and(|r| r.status().as_u16() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "the bridge never became ready on Kafka");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Produces one event, Avro-encoded, to `topic`; waits until the bridge committed it.
    pub async fn produce_event(&self, topic: &str, record: &str, value: Value) {
        let (r, _) = self.schemas.event(record).expect("an event record");
        let v = self.schemas.build(r, value.as_object().expect("object")).expect("valid");
        let bytes = self.schemas.wire().encode(record, v).expect("encodes");
        let (partition, offset) = self.produce(topic, value["agentGuid"].as_str().unwrap_or_default(), &bytes).await;
        self.wait_committed(topic, partition, offset).await;
    }

    /// Produces raw bytes to a topic; returns (partition, offset).
    pub async fn produce(&self, topic: &str, key: &str, payload: &[u8]) -> (i32, i64) {
        self.produce_traced(topic, key, payload, None).await
    }

    /// Produces raw bytes to a topic with a `traceparent` header when given;
    /// returns (partition, offset).
    pub async fn produce_traced(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        traceparent: Option<&str>,
    ) -> (i32, i64) {
        let mut r = FutureRecord::to(topic).key(key).payload(payload);
        if let Some(t) = traceparent {
            r = r.headers(OwnedHeaders::new().insert(Header { key: "traceparent", value: Some(t) }));
        }
        self.producer
            .send(r, Timeout::After(PATIENCE))
            .await
            .map(|d| (d.partition, d.offset))
            .expect("the broker takes the record")
    }

    /// What the backend port would do with `body`, through Kafka: each event
    /// checked against its schema and produced to the events topic, then wait
    /// until the bridge committed past the last one.
    pub async fn post_events(&self, body: Value) -> (u16, Value) {
        let items = match body {
            Value::Array(items) => items,
            other => vec![other],
        };
        let mut last = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let record = item["record"].as_str().unwrap_or_default();
            let Some((r, _)) = self.schemas.event(record) else {
                return (400, json!({"error": format!("[{i}]: unknown record {record}")}));
            };
            let built = item["value"]
                .as_object()
                .ok_or("value must be an object".to_owned())
                .and_then(|v| self.schemas.build(r, v).map_err(|e| e.to_string()));
            let value = match built {
                Ok(v) => v,
                Err(e) => return (400, json!({"error": format!("[{i}]: {e}")})),
            };
            let bytes = self.schemas.wire().encode(record, value).expect("encodes");
            // One topic keeps the order the events were posted in (contract section 5).
            let topic = &self.events_topic;
            let key = item["value"]["agentGuid"].as_str().unwrap_or_default();
            // The backend port's `traceparent` is a Kafka record's header.
            let (partition, offset) = self.produce_traced(topic, key, &bytes, item["traceparent"].as_str()).await;
            last.retain(|(t, _, _): &(String, i32, i64)| t != topic);
            last.push((topic.clone(), partition, offset));
        }
        for (topic, partition, offset) in last {
            self.wait_committed(&topic, partition, offset).await;
        }
        (202, json!({"accepted": items.len()}))
    }

    /// Waits until the bridge's consumer group committed past `offset`.
    pub async fn wait_committed(&self, topic: &str, partition: i32, offset: i64) {
        let (brokers, group, topic) = (self.brokers.clone(), self.group.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .create()
                .expect("consumer");
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&topic, partition);
            let deadline = Instant::now() + PATIENCE * 3;
            loop {
                let committed = c.committed_offsets(tpl.clone(), Duration::from_secs(2)).ok().and_then(|t| {
                    t.find_partition(&topic, partition).and_then(|p| match p.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                });
                if committed.is_some_and(|c| c > offset) {
                    return;
                }
                assert!(Instant::now() < deadline, "the bridge did not commit {topic}/{partition}/{offset}");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .await
        .expect("join");
    }

    /// Published actions with offset (1-based) after `after`, waiting up to `wait_ms` for one.
    pub async fn actions_after(&self, after: u64, wait_ms: u64) -> Value {
        self.records_after(&self.actions_topic, after, wait_ms).await
    }

    /// Avro records of `topic` (partition 0) after `after`, as the backend port shows actions.
    pub async fn records_after(&self, topic: &str, after: u64, wait_ms: u64) -> Value {
        let (brokers, topic, schemas) = (self.brokers.clone(), topic.to_owned(), self.schemas.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
            let deadline = Instant::now() + Duration::from_millis(wait_ms);
            let (_, mut high) = c.fetch_watermarks(&topic, 0, Duration::from_secs(5)).expect("watermarks");
            while high as u64 <= after && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                high = c.fetch_watermarks(&topic, 0, Duration::from_secs(5)).expect("watermarks").1;
            }
            let mut records = Vec::new();
            if high as u64 > after {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, 0, Offset::Offset(after as i64)).expect("offset");
                c.assign(&tpl).expect("assign");
                while records.len() < (high as u64 - after) as usize {
                    let Some(m) = c.poll(PATIENCE) else { panic!("the action topic did not deliver up to {high}") };
                    let m = m.expect("record");
                    let (record, value) = schemas.wire().decode(m.payload().unwrap_or_default()).expect("an Avro record");
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                    let mut r = json!({"offset": m.offset() + 1, "record": record, "key": key, "value": to_json(&value, Keys::AsIs)});
                    // The header, where the backend port shows an action's `traceparent`.
                    let trace = m.headers().and_then(|h| h.iter().find(|h| h.key == "traceparent")?.value);
                    if let Some(t) = trace {
                        r["traceparent"] = Value::from(String::from_utf8_lossy(t).into_owned());
                    }
                    records.push(r);
                }
            }
            json!({"next": records.last().map_or(after, |r| r["offset"].as_u64().unwrap_or(after)), "records": records})
        })
        .await
        .expect("join")
    }
}

/// Creates single-partition topics.
pub async fn create_topics(brokers: &str, names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let topics: Vec<NewTopic> = names.iter().map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(&topics, &AdminOptions::new()).await.expect("create topics") {
        r.expect("topic created");
    }
}
