//! CCEB, the Client Connector Events Bridge: the server as a library, so the
//! binary, the integration tests and the benchmark start the very same thing.
//! ARCHITECTURE.md at the repository root has the code map.

pub mod actions;
pub mod app;
pub mod asyncapi;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod cluster;
pub mod config;
mod conn;
pub mod fault;
pub mod http;
pub mod kv;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod push;
pub mod reactions;
pub mod relay;
pub mod schema;
pub mod secret;
pub mod session;
pub mod store;
pub mod sync;

pub use app::Bridge;
pub use config::Settings;
