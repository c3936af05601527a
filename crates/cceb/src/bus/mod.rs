//! The event bus behind a trait. Actions go out through [`Bus::publish`];
//! events come in through whatever the implementation listens to (the embedded
//! bus: the backend port; Kafka: a consumer group) and go to
//! [`crate::notify::Dispatcher::ingest`].

pub mod embedded;
// The Kafka bus and its schema registry client exist only with the cargo
// feature `kafka` (librdkafka); without it, `no_kafka` stands in under the
// same names and refuses to start.
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(not(feature = "kafka"))]
pub mod no_kafka;
#[cfg(feature = "kafka")]
mod registry;

pub use embedded::EmbeddedBus;
#[cfg(feature = "kafka")]
pub use kafka::{KafkaBus, KafkaSettings};
#[cfg(not(feature = "kafka"))]
pub use no_kafka::{KafkaBus, KafkaSettings};

use crate::fault::{Cause, ErrorKind};
use apache_avro::types::Value as Avro;
use async_trait::async_trait;
use cceb_protocol::TraceParent;

/// Why `bus = "kafka"` is refused by a build without the `kafka` feature.
pub use crate::config::NO_KAFKA;

/// A record the bridge publishes: an action, keyed by agent GUID.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub record: String,
    pub key: String,
    pub value: Avro,
    /// The client's trace context: beside the record (a Kafka header, a field
    /// of the embedded log's entry), never in it.
    pub traceparent: Option<TraceParent>,
}

/// A bus operation that failed: its kind says whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[error("bus {kind}: {source}")]
pub struct BusError {
    kind: ErrorKind,
    source: Cause,
}

impl BusError {
    pub fn new(kind: ErrorKind, source: impl Into<Cause>) -> Self {
        BusError { kind, source: source.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Returns once the bus has durably accepted the record. Records of one
    /// agent published one after another keep their order.
    async fn publish(&self, record: OutRecord) -> Result<(), BusError>;
    fn ready(&self) -> bool;
}
