//! The event bus behind a trait. Actions go out through [`Bus::publish`];
//! events come in through whatever the implementation listens to (the embedded
//! bus: the backend port; Kafka: a consumer group) and go to
//! [`crate::notify::Router::ingest`].

pub mod embedded;
pub mod kafka;
mod registry;

pub use embedded::EmbeddedBus;
pub use kafka::{KafkaBus, KafkaSettings};

use crate::fault::{Cause, ErrorKind};
use apache_avro::types::Value as Avro;
use async_trait::async_trait;

/// A record the bridge publishes: an action, keyed by agent GUID.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub record: String,
    pub key: String,
    pub value: Avro,
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
