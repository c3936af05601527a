//! The handles the client-facing surfaces (a connection, an HTTP handler)
//! are given: built once by `app`, used by `conn` and `http`, so neither of
//! those depends on the wiring.

use crate::actions::Actions;
use crate::auth::Verifier;
use crate::bus::Bus;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::notify::{Dispatcher, EventReader};
use crate::schema::SchemaSet;
use crate::session::Sessions;
use crate::store::Store;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a connection or request handler may need.
pub struct Shared {
    pub settings: Settings,
    pub verifier: Verifier,
    pub schemas: Arc<SchemaSet>,
    pub sessions: Arc<Sessions>,
    pub dispatcher: Arc<Dispatcher>,
    /// Validates and plans backend records (the bus side's parser).
    pub events: Arc<EventReader>,
    pub actions: Arc<Actions>,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    /// Cancelled once, on shutdown; every task watches it.
    pub shutdown: CancellationToken,
    /// Every connection and server task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// The `/ws/v1` URL discovery hands out.
    pub(crate) ws_endpoint: String,
}

impl Shared {
    /// The `/ws/v1` URL discovery hands out.
    pub fn ws_endpoint(&self) -> &str {
        &self.ws_endpoint
    }
}
