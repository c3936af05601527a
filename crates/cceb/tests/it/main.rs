//! Behaviour tests of contract `shared/PROTOCOL.md`: a real bridge, real
//! WebSockets, real HTTP. One module per area of the contract.

mod support;

mod actions;
mod auth;
mod backend;
mod chaos;
mod cli;
mod durability;
mod kafka;
mod kafka_backend;
mod lifecycle;
mod limits;
mod notifications;
mod restart;
mod schemas;
mod sessions;
mod transport;
