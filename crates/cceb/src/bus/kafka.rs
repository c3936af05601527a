//! The Kafka bus (contract section 8): actions out through an idempotent
//! producer (acks=all), events in through a consumer group, Avro single-object
//! encoding both ways (`schema::wire`).
//!
//! Offsets are committed only after `Dispatcher::commit`, i.e. once every
//! notification the records made is in the session mailboxes and durable. A
//! record that cannot be decoded or mapped is counted, logged with its
//! topic/partition/offset, copied to the dead-letter topic when one is set, and
//! skipped: it never stops its partition.

use super::registry::{RegistryError, SchemaRegistry};
use super::{Bus, BusError, OutRecord};
use crate::config::Settings;
use crate::fault::ErrorKind;
use crate::metrics::Metrics;
use crate::notify::{Dispatcher, EventReader};
use crate::schema::wire::confluent_frame;
use crate::schema::SchemaSet;
use apache_avro::types::Value as Avro;
use async_trait::async_trait;
use futures_util::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _, PurgeConfig};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most records taken from the consumer before one commit.
const BATCH: usize = 500;

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

/// Why a record could not be decoded: worth a retry, or never.
enum DecodeError {
    Retry(String),
    Skip(String),
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

    fn topic_of(&self, record: &str) -> &str {
        self.settings.action_topics.get(record).unwrap_or(&self.settings.action_topic)
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
        let consumer: StreamConsumer = self
            .settings
            .client()
            .set("group.id", &self.settings.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|e| BusError::new(ErrorKind::Fatal, format!("kafka consumer: {e}")))?;
        let topics: Vec<&str> = self.settings.event_topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| BusError::new(ErrorKind::Fatal, format!("kafka subscribe: {e}")))?;
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

    /// The record name and value of a consumed payload: Confluent-framed when a
    /// registry is configured and the payload starts with `00`, else single-object.
    async fn decode(&self, payload: &[u8]) -> Result<(String, Avro), DecodeError> {
        let wire = self.schemas.wire();
        if let (Some(registry), Some((id, datum))) = (&self.registry, confluent_frame(payload)) {
            let writer = registry.writer(id).await.map_err(|e| match e {
                RegistryError::Http(_) | RegistryError::Refused { .. } => DecodeError::Retry(e.to_string()),
                RegistryError::BadSchema { .. } => DecodeError::Skip(e.to_string()),
            })?;
            let (name, value) =
                wire.decode_confluent(&writer.0, &writer.1, datum).map_err(|e| DecodeError::Skip(e.to_string()))?;
            return Ok((name.to_owned(), value));
        }
        wire.decode(payload).map(|(n, v)| (n.to_owned(), v)).map_err(|e| DecodeError::Skip(e.to_string()))
    }

    /// The record as it goes on the wire (registering its schema first when a registry is set).
    async fn encode(&self, topic: &str, record: String, value: Avro) -> Result<Vec<u8>, BusError> {
        let wire = self.schemas.wire();
        match &self.registry {
            Some(registry) => {
                // The schema set is the bridge's own: a record without a schema
                // is a bridge defect, not the client's.
                let schema = wire
                    .schema(&record)
                    .ok_or_else(|| BusError::new(ErrorKind::Fatal, format!("no schema {record}")))?;
                let id = registry
                    .id_for(&format!("{topic}-value"), &record, schema)
                    .await
                    .map_err(|e| BusError::new(e.kind(), e))?;
                wire.encode_confluent(&record, id, value)
            }
            None => wire.encode(&record, value),
        }
        .map_err(|e| BusError::new(ErrorKind::Rejected, e))
    }

    /// Copies a record the bridge cannot use to the dead-letter topic.
    async fn dead_letter(&self, m: &BorrowedMessage<'_>, reason: &str) {
        let Some(topic) = &self.settings.dead_letter_topic else { return };
        let headers = OwnedHeaders::new().insert(Header { key: "cceb-error", value: Some(reason) }).insert(Header {
            key: "cceb-source",
            value: Some(&format!("{}/{}/{}", m.topic(), m.partition(), m.offset())),
        });
        let mut r = FutureRecord::to(topic).payload(m.payload().unwrap_or_default()).headers(headers);
        if let Some(k) = m.key() {
            r = r.key(k);
        }
        if let Err((e, _)) = self.producer().inner.send(r, Timeout::After(self.settings.publish_timeout)).await {
            tracing::warn!(error = %e, "dead-letter topic refused a record");
        }
    }
}

#[async_trait]
impl Bus for KafkaBus {
    /// Answers within `publish_timeout`, whatever librdkafka does: its own
    /// delivery report normally comes first (see `ActionProducer::new`), this
    /// bound is the backstop. A record given up on is purged, so librdkafka
    /// never sends it afterwards (a retry with the same uuid would publish it twice).
    async fn publish(&self, record: OutRecord) -> Result<(), BusError> {
        let deadline = Instant::now() + self.settings.publish_timeout;
        let give_up = deadline - purge_allowance(self.settings.publish_timeout);
        let topic = self.topic_of(&record.record);
        let Ok(bytes) = timeout_at(give_up, self.encode(topic, record.record, record.value)).await else {
            let late = "schema registry: no answer within the publish timeout";
            return Err(BusError::new(ErrorKind::Timeout, late));
        };
        let bytes = bytes?;
        let producer = self.producer();
        let r = FutureRecord::to(topic).key(&record.key).payload(&bytes);
        let queue_timeout = Timeout::After(self.settings.publish_timeout);
        let err = match timeout_at(give_up, producer.inner.send(r, queue_timeout)).await {
            Ok(Ok(_)) => return Ok(()),
            // librdkafka reported the record failed and holds it no more.
            Ok(Err((e, _))) => BusError::new(delivery_failure(&e), format!("kafka: {e}")),
            Err(_) => {
                tracing::warn!(topic, "no delivery report within the publish timeout; purging the producer");
                if timeout_at(deadline, producer.purge()).await.is_err() {
                    tracing::warn!(topic, "the producer purge is still under way at the publish timeout");
                }
                BusError::new(ErrorKind::Timeout, "kafka: no delivery report within the publish timeout")
            }
        };
        producer.failed();
        Err(err)
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

/// How often at most librdkafka looks for timed-out records while its broker
/// connection is up (its broker threads' timeout scan): its report of one can
/// come that much after `message.timeout.ms`.
const TIMEOUT_SCAN: Duration = Duration::from_secs(1);

/// librdkafka's timing for a publish bound, so that its own delivery report
/// of a failure normally comes before the bound.
struct Tuning {
    /// `message.timeout.ms`: the bound less the slack its report needs.
    message_timeout: Duration,
    /// `reconnect.backoff.max.ms` and `retry.backoff.max.ms`. While the broker
    /// is down, librdkafka looks for timed-out records only between two
    /// connection attempts: its default wait of up to 10 s (plus 50% jitter)
    /// is what delayed its reports past the bound.
    backoff_max: Duration,
    /// `reconnect.backoff.ms` and `retry.backoff.ms`, the first wait.
    backoff: Duration,
}

impl Tuning {
    fn for_bound(bound: Duration) -> Tuning {
        // The slack after the message timeout: a timeout scan's second and
        // the purge allowance, or half of a shorter bound.
        let slack = (TIMEOUT_SCAN + purge_allowance(bound)).min(bound / 2);
        // Waits of at most this plus 50% jitter stay within the slack.
        let backoff_max = (slack / 2).max(Duration::from_millis(1));
        Tuning {
            message_timeout: (bound - slack).max(Duration::from_millis(1)),
            backoff_max,
            backoff: Duration::from_millis(100).min(backoff_max),
        }
    }

    /// As librdkafka properties, with `linger.ms`: a record waits at most a
    /// millisecond for others to share its request.
    fn properties(&self) -> [(&'static str, String); 6] {
        let ms = |d: Duration| d.as_millis().to_string();
        [
            ("message.timeout.ms", ms(self.message_timeout)),
            ("reconnect.backoff.ms", ms(self.backoff)),
            ("reconnect.backoff.max.ms", ms(self.backoff_max)),
            ("retry.backoff.ms", ms(self.backoff)),
            ("retry.backoff.max.ms", ms(self.backoff_max)),
            ("linger.ms", "1".to_owned()),
        ]
    }
}

/// The end of the publish bound kept for purging a record given up on, so the
/// purge has normally taken effect when the client gets its answer.
fn purge_allowance(bound: Duration) -> Duration {
    (bound / 20).min(Duration::from_millis(50))
}

/// How often librdkafka reports its statistics, the idempotent producer's
/// state among them.
const STATS_INTERVAL_MS: &str = "100";

/// The part of librdkafka's statistics the bridge reads.
#[derive(serde::Deserialize)]
struct Stats {
    eos: Option<EosStats>,
}

#[derive(serde::Deserialize)]
struct EosStats {
    idemp_state: String,
}

/// Follows the idempotent producer's state in librdkafka's statistics: until
/// the broker gave it a producer id, it sends nothing.
#[derive(Default)]
struct PidWatch(Arc<AtomicBool>);

impl ClientContext for PidWatch {
    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<Stats>(statistics) {
            Ok(stats) => {
                self.0.store(stats.eos.is_some_and(|e| e.idemp_state == "Assigned"), Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "unreadable librdkafka statistics"),
        }
    }
}

/// The producer of actions, and the purges that drop the records the bridge
/// gave up on.
struct ActionProducer {
    inner: FutureProducer<PidWatch>,
    has_pid: Arc<AtomicBool>,
    /// A publish failed after the producer had its producer id: its sequence
    /// state may be stale (see `health`). Failures before that leave none, and
    /// replacing the producer for them would only restart its wait for an id.
    failed_with_pid: AtomicBool,
    /// Purges asked for so far.
    purges_asked: AtomicU64,
    /// Held while purging: one purge at a time, and all the asks made before
    /// one started are served by it.
    purging: tokio::sync::Mutex<u64>,
}

impl ActionProducer {
    fn new(settings: &KafkaSettings) -> Result<ActionProducer, BusError> {
        let tuning = Tuning::for_bound(settings.publish_timeout).properties();
        let watch = PidWatch::default();
        let has_pid = watch.0.clone();
        // The tuning goes under the operator's properties (the bound holds
        // whatever they say); what the contract and readiness rest on goes over them.
        let inner = settings
            .client_over(&tuning)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("statistics.interval.ms", STATS_INTERVAL_MS)
            .create_with_context(watch)
            .map_err(|e| BusError::new(ErrorKind::Fatal, format!("kafka producer: {e}")))?;
        Ok(ActionProducer {
            inner,
            has_pid,
            failed_with_pid: AtomicBool::new(false),
            purges_asked: AtomicU64::new(0),
            purging: tokio::sync::Mutex::new(0),
        })
    }

    fn has_pid(&self) -> bool {
        self.has_pid.load(Ordering::Relaxed)
    }

    fn failed(&self) {
        if self.has_pid() {
            self.failed_with_pid.store(true, Ordering::Relaxed);
        }
    }

    /// Drops every record librdkafka holds, queued, waiting for a retry or in
    /// flight, so none is sent after the bridge gave up on it. The purge goes
    /// on when the caller stops waiting, and asks made meanwhile share it.
    fn purge(self: &Arc<Self>) -> impl std::future::Future<Output = ()> {
        let ask = self.purges_asked.fetch_add(1, Ordering::SeqCst) + 1;
        let producer = self.clone();
        let purge = tokio::spawn(async move {
            let mut served = producer.purging.lock().await;
            if *served >= ask {
                return;
            }
            let upto = producer.purges_asked.load(Ordering::SeqCst);
            let p = producer.clone();
            // Blocks until every broker thread purged its queues.
            match tokio::task::spawn_blocking(move || p.inner.purge(PurgeConfig::default().queue().inflight())).await {
                Ok(()) => *served = upto,
                Err(e) => tracing::error!(error = %e, "kafka producer purge failed"),
            }
        });
        async move {
            if let Err(e) = purge.await {
                tracing::error!(error = %e, "kafka producer purge failed");
            }
        }
    }
}

/// What a failed delivery report means for the action: whether the same
/// record, sent again, may be taken.
fn delivery_failure(e: &KafkaError) -> ErrorKind {
    use RDKafkaErrorCode as C;
    let Some(code) = e.rdkafka_error_code() else { return ErrorKind::Unavailable };
    match code {
        C::MessageTimedOut => ErrorKind::Timeout,
        // The record itself, or where the routing table sends it.
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::InvalidRecord
        | C::BadMessage
        | C::UnsupportedForMessageFormat
        | C::PolicyViolation
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::InvalidTopic => ErrorKind::Rejected,
        // The idempotent producer is unusable, or the bridge may not write:
        // no record goes through until it is recreated or reconfigured.
        C::Fatal
        | C::Fenced
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::Authentication
        | C::SaslAuthenticationFailed => ErrorKind::Fatal,
        // Brokers away, leaders moving, queues full, records purged.
        _ => ErrorKind::Unavailable,
    }
}

/// Waits a second before a retry; `false` when the bridge is stopping instead.
async fn retry_later(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}

struct Ingest {
    bus: Arc<KafkaBus>,
    dispatcher: Arc<Dispatcher>,
    events: Arc<EventReader>,
    metrics: Arc<Metrics>,
}

/// Where a record came from, for logs.
fn at(m: &BorrowedMessage<'_>) -> String {
    format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
}

impl Ingest {
    /// Reads the provisioning topic from the beginning to its end as of now,
    /// applying only directory changes (no notifications: those come through
    /// the consumer group, once).
    async fn catch_up(&self, stop: &CancellationToken) {
        let Some(topic) = self.bus.settings.provisioning_topic.clone() else { return };
        loop {
            match self.catch_up_once(&topic, stop).await {
                Ok(n) => {
                    tracing::info!(topic, records = n, "tenant directory caught up");
                    self.bus.caught_up.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => tracing::warn!(error = %e, topic, "directory catch-up failed; retrying"),
            }
            if !retry_later(stop).await {
                return;
            }
        }
    }

    async fn catch_up_once(&self, topic: &str, stop: &CancellationToken) -> Result<usize, String> {
        let settings = self.bus.settings.clone();
        let topic = topic.to_owned();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        let stop2 = stop.clone();
        let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let c: BaseConsumer = settings
                .client()
                .set("group.id", format!("{}-directory", settings.group_id))
                .set("enable.auto.commit", "false")
                .create()
                .map_err(|e| e.to_string())?;
            let md = c.fetch_metadata(Some(&topic), Duration::from_secs(5)).map_err(|e| e.to_string())?;
            let mut tpl = TopicPartitionList::new();
            let mut high: HashMap<i32, i64> = HashMap::new();
            for p in md.topics().iter().flat_map(|t| t.partitions()) {
                let (lo, hi) = c.fetch_watermarks(&topic, p.id(), Duration::from_secs(5)).map_err(|e| e.to_string())?;
                if hi > lo {
                    high.insert(p.id(), hi);
                }
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning).map_err(|e| e.to_string())?;
            }
            c.assign(&tpl).map_err(|e| e.to_string())?;
            while !high.is_empty() && !stop2.is_cancelled() {
                match c.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        if high.get(&m.partition()).is_some_and(|&h| m.offset() + 1 >= h) {
                            high.remove(&m.partition());
                        }
                        if tx.blocking_send(m.payload().unwrap_or_default().to_vec()).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => {}
                }
            }
            Ok(())
        });
        let mut n = 0;
        while let Some(payload) = rx.recv().await {
            let (record, value) = match self.bus.decode(&payload).await {
                Ok(d) => d,
                Err(DecodeError::Retry(e)) => return Err(e),
                Err(DecodeError::Skip(_)) => continue,
            };
            if let Ok(ev) = self.events.from_avro(&record, value, None) {
                self.dispatcher.apply_directory(&ev).await.map_err(|e| e.to_string())?;
                n += 1;
            }
        }
        reader.await.map_err(|e| e.to_string())??;
        self.dispatcher.commit().await.map_err(|e| e.to_string())?;
        Ok(n)
    }

    async fn consume(&self, consumer: StreamConsumer, stop: &CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                m = consumer.recv() => m,
            };
            let started = std::time::Instant::now();
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match consumer.recv().now_or_never() {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            for m in &batch {
                match m {
                    // Stopped before the record was taken: commit nothing, it comes again.
                    Ok(m) => {
                        if !self.handle(m, stop).await {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                }
            }
            // Offsets only once every notification of the batch is durable.
            while let Err(e) = self.dispatcher.commit().await {
                tracing::error!(error = %e, "cannot make notifications durable; offsets held");
                if !retry_later(stop).await {
                    return;
                }
            }
            self.metrics.event_ingest_seconds.record(started.elapsed().as_secs_f64());
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; records may be delivered again");
            }
        }
    }

    /// Takes one record (ingested, or skipped as unusable); `false` when the
    /// bridge stopped before it could be taken.
    async fn handle(&self, m: &BorrowedMessage<'_>, stop: &CancellationToken) -> bool {
        let decoded = loop {
            match self.bus.decode(m.payload().unwrap_or_default()).await {
                Err(DecodeError::Retry(e)) => {
                    // The registry is away: the record is fine, wait for it.
                    tracing::warn!(error = %e, at = %at(m), "cannot decode yet; retrying");
                    if !retry_later(stop).await {
                        return false;
                    }
                }
                other => break other,
            }
        };
        let event = match decoded {
            // Its position names the record: read again after a crash, it makes the same uuids.
            Ok((record, value)) => {
                self.events.from_avro(&record, value, Some(format!("kafka:{}", at(m)))).map_err(|e| e.to_string())
            }
            Err(DecodeError::Skip(e) | DecodeError::Retry(e)) => Err(e),
        };
        let ev = match event {
            Ok(ev) => ev,
            Err(reason) => {
                self.metrics.events_undecodable.increment(1);
                tracing::warn!(at = %at(m), %reason, "skipping a record that cannot be used");
                self.bus.dead_letter(m, &reason).await;
                return true;
            }
        };
        // A store failure must not skip the record: retry until it is taken.
        while let Err(e) = self.dispatcher.ingest(std::slice::from_ref(&ev)).await {
            tracing::error!(error = %e, at = %at(m), "cannot ingest; retrying");
            if !retry_later(stop).await {
                return false;
            }
        }
        self.metrics.events_accepted.increment(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn librdkafka_reports_a_failure_before_the_bridge_gives_up() {
        let t = Tuning::for_bound(ms(5000));
        assert_eq!((t.message_timeout, t.backoff, t.backoff_max), (ms(3950), ms(100), ms(525)));
        let t = Tuning::for_bound(ms(1000));
        assert_eq!((t.message_timeout, t.backoff, t.backoff_max), (ms(500), ms(100), ms(250)));
        for bound in (10..=60_000).step_by(7).map(ms) {
            let t = Tuning::for_bound(bound);
            let give_up = bound - purge_allowance(bound);
            // Broker down: librdkafka looks at its queue between two
            // connection attempts, each wait up to 50% over the maximum.
            assert!(t.message_timeout + t.backoff_max * 3 / 2 <= give_up, "{bound:?}");
            // Broker up: about once a second.
            if bound >= 2 * (TIMEOUT_SCAN + purge_allowance(bound)) {
                assert!(t.message_timeout + TIMEOUT_SCAN <= give_up, "{bound:?}");
            }
            assert!(t.backoff <= t.backoff_max, "{bound:?}");
        }
    }

    #[test]
    fn a_failed_delivery_is_retryable_only_when_the_same_record_may_be_taken_later() {
        use RDKafkaErrorCode as C;
        let kind = |code| delivery_failure(&KafkaError::MessageProduction(code));
        assert_eq!(kind(C::MessageTimedOut), ErrorKind::Timeout);
        for code in
            [C::AllBrokersDown, C::BrokerTransportFailure, C::NotLeaderForPartition, C::QueueFull, C::PurgeQueue]
        {
            assert_eq!(kind(code), ErrorKind::Unavailable, "{code:?}");
        }
        for code in [C::MessageSizeTooLarge, C::UnknownTopicOrPartition, C::UnknownTopic, C::InvalidRecord] {
            assert_eq!(kind(code), ErrorKind::Rejected, "{code:?}");
        }
        for code in [C::Fatal, C::ProducerFenced, C::TopicAuthorizationFailed] {
            assert_eq!(kind(code), ErrorKind::Fatal, "{code:?}");
        }
        assert_eq!(delivery_failure(&KafkaError::Canceled), ErrorKind::Unavailable, "no code: an outage");
    }

    #[test]
    fn even_the_smallest_bound_gives_librdkafka_valid_settings() {
        let t = Tuning::for_bound(ms(1));
        assert!(t.message_timeout >= ms(1) && t.backoff >= ms(1) && t.backoff <= t.backoff_max);
    }
}
