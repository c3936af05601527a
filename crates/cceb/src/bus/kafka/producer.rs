//! The producer of actions: the idempotent producer (acks=all), the routing
//! table, the publish bound (librdkafka's timing derived from it, the bound as
//! backstop, a record given up on purged) and a failed delivery's kind.

use super::{KafkaBus, KafkaSettings, TRACEPARENT};
use crate::bus::{BusError, OutRecord};
use crate::fault::ErrorKind;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _, PurgeConfig};
use rdkafka::util::Timeout;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

impl KafkaBus {
    /// Answers within `publish_timeout`, whatever librdkafka does: its own
    /// delivery report normally comes first (see `ActionProducer::new`), this
    /// bound is the backstop. A record given up on is purged, so librdkafka
    /// never sends it afterwards (a retry with the same uuid would publish it twice).
    pub(super) async fn produce(&self, record: OutRecord) -> Result<(), BusError> {
        let deadline = Instant::now() + self.settings.publish_timeout;
        let give_up = deadline - purge_allowance(self.settings.publish_timeout);
        let topic = self.topic_of(&record.record);
        let Ok(bytes) = timeout_at(give_up, self.encode(topic, record.record, record.value)).await else {
            let late = "schema registry: no answer within the publish timeout";
            return Err(BusError::new(ErrorKind::Timeout, late));
        };
        let bytes = bytes?;
        let producer = self.producer();
        let mut r = FutureRecord::to(topic).key(&record.key).payload(&bytes);
        // Beside the Avro value, never in it: consumers that know nothing of
        // tracing read the same record.
        let traceparent = record.traceparent.map(|t| t.to_string());
        if let Some(t) = &traceparent {
            r = r.headers(OwnedHeaders::new().insert(Header { key: TRACEPARENT, value: Some(t.as_str()) }));
        }
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

    /// The routing table: the topic of an action record.
    fn topic_of(&self, record: &str) -> &str {
        self.settings.action_topics.get(record).unwrap_or(&self.settings.action_topic)
    }
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
pub(super) struct PidWatch(Arc<AtomicBool>);

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
pub(super) struct ActionProducer {
    pub(super) inner: FutureProducer<PidWatch>,
    has_pid: Arc<AtomicBool>,
    /// A publish failed after the producer had its producer id: its sequence
    /// state may be stale (see `health`). Failures before that leave none, and
    /// replacing the producer for them would only restart its wait for an id.
    pub(super) failed_with_pid: AtomicBool,
    /// Purges asked for so far.
    purges_asked: AtomicU64,
    /// Held while purging: one purge at a time, and all the asks made before
    /// one started are served by it.
    purging: tokio::sync::Mutex<u64>,
}

impl ActionProducer {
    pub(super) fn new(settings: &KafkaSettings) -> Result<ActionProducer, BusError> {
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

    pub(super) fn has_pid(&self) -> bool {
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
