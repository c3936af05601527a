//! The event bus behind a trait. Actions go out through [`Bus::publish`];
//! events come in through whatever the implementation listens to (the embedded
//! bus: the backend port; Kafka: a consumer group) and go to
//! [`crate::notify::Router::ingest`].

pub mod embedded;
pub mod kafka;
mod registry;

pub use embedded::EmbeddedBus;
pub use kafka::{KafkaBus, KafkaSettings};

use apache_avro::types::Value as Avro;
use async_trait::async_trait;

/// A record the bridge publishes: an action, keyed by agent GUID.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub record: String,
    pub key: String,
    pub value: Avro,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Returns once the bus has durably accepted the record. Records of one
    /// agent published one after another keep their order.
    async fn publish(&self, record: OutRecord) -> Result<(), BusError>;
    fn ready(&self) -> bool;
}
