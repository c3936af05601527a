//! The Kafka bus in a build without the cargo feature `kafka` (no librdkafka):
//! the same names as `bus::kafka`, so the wiring compiles unchanged, but
//! `KafkaBus` has no values and its constructor always refuses. `Settings::validate`
//! refuses `bus = "kafka"` first (exit 78); this covers a library caller that
//! starts a `Bridge` from settings it did not validate.

use super::{Bus, BusError, OutRecord, NO_KAFKA};
use crate::config::Settings;
use crate::fault::ErrorKind;
use crate::metrics::Metrics;
use crate::notify::{Dispatcher, EventReader};
use crate::schema::SchemaSet;
use async_trait::async_trait;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Nothing to configure: there is no Kafka bus to configure.
#[derive(Debug, Clone)]
pub struct KafkaSettings(());

impl Settings {
    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings(())
    }
}

/// No value of this type exists.
pub enum KafkaBus {}

impl KafkaBus {
    pub fn new(_: KafkaSettings, _: Arc<SchemaSet>) -> Result<KafkaBus, BusError> {
        Err(BusError::new(ErrorKind::Fatal, NO_KAFKA))
    }

    pub fn start(
        self: &Arc<Self>,
        _: Arc<Dispatcher>,
        _: Arc<EventReader>,
        _: Arc<Metrics>,
        _: &TaskTracker,
        _: CancellationToken,
    ) -> Result<(), BusError> {
        match **self {}
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, _: OutRecord) -> Result<(), BusError> {
        match *self {}
    }

    fn ready(&self) -> bool {
        match *self {}
    }
}
