//! Behaviour tests of contract `shared/PROTOCOL.md`: a real bridge, real
//! WebSockets, real HTTP. One module per area of the contract.

mod support;

mod actions;
mod asyncapi;
mod auth;
mod backend;
mod chaos;
mod cli;
mod cluster;
mod cluster_chaos;
mod console;
mod durability;
// The Kafka bus's tests and harness need the cargo feature `kafka`; without
// it `no_kafka_backend` stands in for the harness (no broker: embedded only).
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "kafka")]
mod kafka_backend;
#[cfg(not(feature = "kafka"))]
#[path = "no_kafka_backend.rs"]
mod kafka_backend;
#[cfg(feature = "kafka")]
mod kafka_cluster;
mod lifecycle;
mod limits;
mod notifications;
mod redis;
mod restart;
mod schemas;
mod sessions;
mod trace;
mod transport;
