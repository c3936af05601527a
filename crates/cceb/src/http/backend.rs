//! The backend port of the embedded bus (contract section 8): backends (and
//! load tests) post events and long-poll the actions the bridge published.

use super::bearer;
use crate::bus::embedded::Page;
use crate::bus::EmbeddedBus;
use crate::metrics::Metrics;
use crate::notify::{Dispatcher, Event, EventError, EventReader, NotifyError};
use crate::secret;
use crate::store::{Store, StoreError};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cceb_protocol::{TraceParent, TraceParentError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const MAX_WAIT: Duration = Duration::from_secs(30);
const MAX_RECORDS: usize = 10_000;

/// What the backend port is given, and all it is given: built once by `app`,
/// for the embedded bus only.
pub struct Port {
    /// Validates and plans the posted events.
    pub events: Arc<EventReader>,
    /// Delivers them to the sessions and makes them durable.
    pub dispatcher: Arc<Dispatcher>,
    /// Asked only whether it can write: earlier writes not durable yet, the
    /// port takes no more events.
    pub store: Arc<dyn Store>,
    /// The log the actions are read from, and its outage switch.
    pub bus: Arc<EmbeddedBus>,
    /// The bearer token every request must carry; none (or empty): every request is refused.
    pub admin_token: Option<String>,
    /// Largest request body.
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
    /// Cancelled once, on shutdown: long polls end early.
    pub shutdown: CancellationToken,
}

pub fn router(port: Port) -> Router {
    let limit = port.max_body_bytes;
    let state = Arc::new(port);
    Router::new()
        .route("/backend/v1/events", post(post_events))
        .route("/backend/v1/actions", get(get_actions))
        .route("/backend/v1/bus", put(put_bus).get(get_bus))
        .layer(DefaultBodyLimit::max(limit))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_only))
        .with_state(state)
}

fn reject(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn admin_only(State(b): State<Arc<Port>>, req: Request, next: Next) -> Response {
    let ok = match (&b.admin_token, bearer(req.headers())) {
        // An empty token configured means none (Settings::load says so; a library caller may not have).
        (Some(expected), Some(given)) if !expected.is_empty() => secret::same(expected.as_bytes(), given.as_bytes()),
        _ => false,
    };
    if ok {
        next.run(req).await
    } else {
        reject(StatusCode::UNAUTHORIZED, "a valid admin bearer token is required")
    }
}

/// One event of a `POST /backend/v1/events` body.
#[derive(Debug, Deserialize)]
pub struct EventIn {
    /// The backend's id of the event: the same id yields the same notification uuids.
    #[serde(default)]
    pub id: Option<String>,
    pub record: String,
    pub value: Value,
    /// The W3C trace context of the event (what a Kafka record carries as its
    /// `traceparent` header): in the log lines of its notifications.
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// A body the backend port refuses (400), with the item index for arrays.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("{at}expected {{\"record\", \"value\"}} (and optional strings \"id\", \"traceparent\"): {source}")]
    Shape { at: String, source: serde_json::Error },
    #[error("{at}`traceparent`: {source}")]
    TraceParent { at: String, source: TraceParentError },
    #[error("{at}`value` must be an object")]
    NotObject { at: String },
    #[error("{at}{record}: {source}")]
    Event { at: String, record: String, source: EventError },
}

/// Parses and validates a whole body: one event object or an array of them.
/// Pure, so that it can be fuzzed; nothing is ingested unless all of it is valid.
pub fn parse_events(reader: &EventReader, body: &[u8]) -> Result<Vec<Event>, BodyError> {
    let parsed: Value = serde_json::from_slice(body).map_err(BodyError::NotJson)?;
    let (items, batch) = match parsed {
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = if batch { format!("[{i}]: ") } else { String::new() };
        let item: EventIn = match serde_json::from_value(item) {
            Ok(e) => e,
            Err(source) => return Err(BodyError::Shape { at, source }),
        };
        let Value::Object(value) = &item.value else { return Err(BodyError::NotObject { at }) };
        let traceparent = match item.traceparent.as_deref().map(TraceParent::parse).transpose() {
            Ok(t) => t,
            Err(source) => return Err(BodyError::TraceParent { at, source }),
        };
        // Ids need be unique only within a tenant.
        let tenant = value.get("tenantGuid").and_then(Value::as_str).unwrap_or_default();
        let source = item.id.map(|id| format!("backend:{tenant}:{id}"));
        match reader.from_json(&item.record, value, source) {
            Ok(ev) => events.push(ev.traced(traceparent)),
            Err(source) => return Err(BodyError::Event { at, record: item.record, source }),
        }
    }
    Ok(events)
}

/// Validates the whole body first, so a batch is taken entirely or not at all;
/// answers 202 only once every notification is in its session's mailbox and
/// durable in the store.
async fn post_events(State(b): State<Arc<Port>>, body: Bytes) -> Response {
    let started = Instant::now();
    let metrics = &b.metrics;
    // Earlier writes are not durable yet: take nothing more until they are.
    if !b.store.ready() {
        return reject(StatusCode::SERVICE_UNAVAILABLE, "the store cannot write; retry later");
    }
    let events = match parse_events(&b.events, &body) {
        Ok(events) => events,
        Err(e) => {
            metrics.events_rejected.increment(1);
            return reject(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let notifications = match b.dispatcher.ingest(&events).await {
        Ok(n) => n,
        Err(NotifyError::Store(e)) => return reject(store_status(&e), e.to_string()),
    };
    if let Err(NotifyError::Store(e)) = b.dispatcher.commit().await {
        return reject(store_status(&e), e.to_string());
    }
    metrics.events_accepted.increment(events.len() as u64);
    metrics.event_ingest_seconds.record(started.elapsed().as_secs_f64());
    (StatusCode::ACCEPTED, Json(json!({"accepted": events.len(), "notifications": notifications}))).into_response()
}

/// 503 tells the backend to send the batch again later; 500, that sending it
/// again will not help until an operator acts.
fn store_status(e: &StoreError) -> StatusCode {
    if e.is_retryable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

#[derive(Deserialize)]
struct ActionsQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait_ms: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn get_actions(State(b): State<Arc<Port>>, Query(q): Query<ActionsQuery>) -> Response {
    let wait = Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_RECORDS);
    let page = tokio::select! {
        page = b.bus.read_after(q.after, limit, wait) => page,
        _ = b.shutdown.cancelled() => Ok(Page { next: q.after, records: Vec::new() }),
    };
    match page {
        Ok(page) => Json(page).into_response(),
        Err(e) => {
            let status =
                if e.is_retryable() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
            reject(status, format!("cannot read the action log: {e}"))
        }
    }
}

#[derive(Deserialize)]
struct BusSwitch {
    accepting: bool,
    /// Each publish waits this long first (a slow broker).
    #[serde(default)]
    delay_ms: u64,
    /// Publishes wait until a later switch releases them (at most 30 s).
    #[serde(default)]
    hold: bool,
}

/// Simulates a bus outage (or a slow broker) for the clients' benefit: while
/// off, actions get `backend_unavailable`.
async fn put_bus(State(b): State<Arc<Port>>, Json(s): Json<BusSwitch>) -> Response {
    b.bus.set_accepting(s.accepting);
    b.bus.set_delay(Duration::from_millis(s.delay_ms.min(MAX_WAIT.as_millis() as u64)));
    b.bus.set_hold(s.hold);
    Json(b.bus.switches()).into_response()
}

async fn get_bus(State(b): State<Arc<Port>>) -> Response {
    Json(b.bus.switches()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::ErrorKind;

    #[test]
    fn a_store_failure_answers_503_only_when_sending_the_batch_again_can_help() {
        let status = |kind| store_status(&StoreError::new(kind, "disk"));
        assert_eq!(status(ErrorKind::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(ErrorKind::Timeout), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status(ErrorKind::Rejected), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status(ErrorKind::Fatal), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
