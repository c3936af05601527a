//! The Kafka bus (contract section 8): actions out through an idempotent
//! producer (acks=all), events in through a consumer group, Avro both ways.
//! This module holds its settings, the `KafkaBus` value and its start, and the
//! broker health `/readyz` follows.

mod catch_up;
mod codec;
mod consumer;
mod dead_letter;
mod producer;

use super::registry::SchemaRegistry;
use super::{Bus, BusError, OutRecord};
use crate::config::Settings;
use crate::fault::ErrorKind;
use crate::metrics::Metrics;
use crate::notify::{Dispatcher, EventReader};
use crate::schema::SchemaSet;
use async_trait::async_trait;
use cceb_protocol::TraceParent;
use producer::ActionProducer;
use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::producer::Producer as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// Topic of actions the routing table does not name.
    pub action_topic: String,
    /// Record name → topic.
    pub action_topics: HashMap<String, String>,
    pub event_topics: Vec<String>,
    /// Read from the beginning at start so the tenant directory is complete before ready.
    pub provisioning_topic: Option<String>,
    pub group_id: String,
    pub dead_letter_topic: Option<String>,
    /// Longest an action waits for the broker before `backend_unavailable`.
    pub publish_timeout: Duration,
    /// Any other librdkafka property (security.protocol, sasl.*, ssl.*…);
    /// for the producer, over the bridge's tuning (`Tuning`), under what the
    /// contract rests on (idempotence, acks=all, statistics).
    pub properties: HashMap<String, String>,
    /// Confluent-compatible schema registry; without one, single-object encoding.
    pub registry_url: Option<String>,
}

impl KafkaSettings {
    fn client(&self) -> ClientConfig {
        self.client_over(&[])
    }

    /// `defaults` under the operator's properties: tuning the operator may change.
    fn client_over(&self, defaults: &[(&str, String)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

impl Settings {
    /// The Kafka bus's settings (`kafka_*`, `schema_registry_url`). Here rather
    /// than in `config`, so a build without the `kafka` feature has no Kafka code.
    pub fn kafka(&self) -> KafkaSettings {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        KafkaSettings {
            brokers: self.kafka_brokers.clone(),
            action_topic: self.kafka_action_topic.clone(),
            action_topics: self.kafka_action_topics.clone(),
            event_topics: self.kafka_event_topics.clone(),
            provisioning_topic: non_empty(&self.kafka_provisioning_topic),
            group_id: self.kafka_group_id.clone(),
            dead_letter_topic: non_empty(&self.kafka_dead_letter_topic),
            publish_timeout: Duration::from_millis(self.kafka_publish_timeout_ms),
            properties: self.kafka_properties.clone(),
            registry_url: self.schema_registry_url.clone(),
        }
    }
}

pub struct KafkaBus {
    registry: Option<SchemaRegistry>,
    /// Replaced after an outage (see `health`).
    producer: std::sync::RwLock<Arc<ActionProducer>>,
    schemas: Arc<SchemaSet>,
    settings: KafkaSettings,
    broker_up: AtomicBool,
    caught_up: AtomicBool,
}

impl KafkaBus {
    pub fn new(settings: KafkaSettings, schemas: Arc<SchemaSet>) -> Result<KafkaBus, BusError> {
        let producer = Arc::new(ActionProducer::new(&settings)?);
        let caught_up = settings.provisioning_topic.is_none();
        let registry = match &settings.registry_url {
            Some(url) => Some(
                SchemaRegistry::new(url, settings.publish_timeout).map_err(|e| BusError::new(ErrorKind::Fatal, e))?,
            ),
            None => None,
        };
        Ok(KafkaBus {
            registry,
            producer: std::sync::RwLock::new(producer),
            schemas,
            settings,
            broker_up: AtomicBool::new(false),
            caught_up: AtomicBool::new(caught_up),
        })
    }

    fn producer(&self) -> Arc<ActionProducer> {
        crate::sync::read(&self.producer).clone()
    }

    /// Starts the directory catch-up, the consumer group and the broker
    /// health check; all stop on `stop`.
    pub fn start(
        self: &Arc<Self>,
        dispatcher: Arc<Dispatcher>,
        events: Arc<EventReader>,
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<(), BusError> {
        let consumer = consumer::subscribe(&self.settings)?;
        let ingest = Ingest { bus: self.clone(), dispatcher, events, metrics };
        let (bus, stop2) = (self.clone(), stop.clone());
        tasks.spawn(health(bus, stop2));
        tasks.spawn(async move {
            // Directory first: nothing is consumed (and no client is ready) before it is complete.
            ingest.catch_up(&stop).await;
            ingest.consume(consumer, &stop).await;
        });
        Ok(())
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, record: OutRecord) -> Result<(), BusError> {
        self.produce(record).await
    }

    fn ready(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed) && self.caught_up.load(Ordering::Relaxed)
    }
}

/// Asks the broker for metadata every second (every tenth of one while not
/// ready): `/readyz` follows the answer and whether the producer can send.
async fn health(bus: Arc<KafkaBus>, stop: CancellationToken) {
    loop {
        let mut producer = bus.producer();
        let reached = reachable(&bus, producer.clone()).await;
        // Records that timed out during an outage leave the idempotent
        // producer's sequence state behind, which a restarted broker refuses;
        // a fresh producer starts clean. It is ready once it has its producer id.
        let fatal = producer.inner.client().fatal_error().is_some();
        if reached && (fatal || producer.failed_with_pid.load(Ordering::Relaxed)) {
            match ActionProducer::new(&bus.settings) {
                Ok(p) => {
                    producer = Arc::new(p);
                    *crate::sync::write(&bus.producer) = producer.clone();
                }
                Err(e) => tracing::warn!(error = %e, "cannot recreate the kafka producer"),
            }
        }
        let up = reached && producer.has_pid();
        if up != bus.broker_up.swap(up, Ordering::Relaxed) {
            tracing::info!(up, "kafka broker reachability changed");
        }
        let next = if up { Duration::from_secs(1) } else { Duration::from_millis(100) };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Whether `producer` gets metadata from the broker within a second.
async fn reachable(bus: &KafkaBus, producer: Arc<ActionProducer>) -> bool {
    // One topic, not all: the answer is small, and it names the brokers all the same.
    let topic = bus.settings.action_topic.clone();
    tokio::task::spawn_blocking(move || {
        let md = producer.inner.client().fetch_metadata(Some(&topic), Duration::from_secs(1));
        md.is_ok_and(|m| !m.brokers().is_empty())
    })
    .await
    .unwrap_or(false)
}

/// Waits a second before a retry; `false` when the bridge is stopping instead.
async fn retry_later(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}

/// What the catch-up and the consumer group hand records to.
struct Ingest {
    bus: Arc<KafkaBus>,
    dispatcher: Arc<Dispatcher>,
    events: Arc<EventReader>,
    metrics: Arc<Metrics>,
}

/// Where a record came from, for logs and dead letters.
fn at(m: &BorrowedMessage<'_>) -> String {
    format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
}

/// The record header of the W3C trace context: set on the actions the
/// bridge produces, read from the events it consumes.
const TRACEPARENT: &str = "traceparent";

/// An event record's trace context: its one `traceparent` header, when
/// valid. A missing, repeated or invalid one is no trace context (what the
/// W3C specification asks of a receiver); the record is used all the same.
fn traceparent(m: &BorrowedMessage<'_>) -> Option<TraceParent> {
    let mut found = m.headers()?.iter().filter(|h| h.key == TRACEPARENT);
    let one = found.next()?;
    if found.next().is_some() {
        return None;
    }
    TraceParent::parse(std::str::from_utf8(one.value?).ok()?).ok()
}
