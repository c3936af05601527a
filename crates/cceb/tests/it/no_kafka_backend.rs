//! `kafka_backend` in a build without the cargo feature `kafka`: there is no
//! broker, so every test runs on the embedded bus. `KafkaBackend` has no
//! values; its methods are those the shared harness (`support`, `restart`) calls.

use serde_json::Value;
use std::convert::Infallible;

/// Never a broker here; a Kafka pass asked of this build fails loudly rather
/// than pass on the embedded bus.
pub fn brokers() -> Option<String> {
    let asked = std::env::var("CCEB_TEST_KAFKA").is_ok_and(|b| !b.is_empty());
    assert!(!asked, "CCEB_TEST_KAFKA is set, but {}", cceb::bus::NO_KAFKA);
    None
}

pub struct KafkaBackend {
    pub events_topic: String,
    never: Infallible,
}

impl KafkaBackend {
    pub async fn create(_: &str, _: &mut cceb::Settings) -> KafkaBackend {
        unreachable!("{}", cceb::bus::NO_KAFKA)
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self.never {}
    }

    pub async fn wait_ready(&self, _: std::net::SocketAddr) {
        match self.never {}
    }

    pub async fn produce_event(&self, _: &str, _: &str, _: Value) {
        match self.never {}
    }

    pub async fn post_events(&self, _: Value) -> (u16, Value) {
        match self.never {}
    }

    pub async fn actions_after(&self, _: u64, _: u64) -> Value {
        match self.never {}
    }
}
