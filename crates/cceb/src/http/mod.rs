//! HTTP surfaces: the public listener (`/ws/v1`, discovery, health, metrics)
//! and the embedded bus's backend port; `serve` accepts their connections;
//! `console` serves the browser console.

pub mod backend;
pub mod console;
pub mod docs;
pub mod serve;

use crate::auth::Verifier;
use crate::bus::Bus;
use crate::membership::{Answer, Membership};
use crate::metrics::Metrics;
use crate::store::Store;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Read chunk per connection, and the read buffer every connection keeps:
/// an ack is ~60 bytes and a `hello` with its token fits, while larger
/// frames (actions) take a few reads. 4 KiB was 3 of an idle session's
/// 10 KiB (BENCHMARKS.md), tungstenite's 128 KiB default would dominate.
const WS_READ_BUFFER: usize = 1024;
const WS_WRITE_BUFFER: usize = 8 * 1024;
/// What a notification frame adds to its `data`: the envelope (type, uuid,
/// seq) and the WebSocket header, with room to spare.
const FRAME_ENVELOPE: usize = 1024;

/// What the public listener's routes are given, and all they are given:
/// built once by `app`.
pub struct Public {
    /// Handed to every connection `/ws/v1` upgrades.
    pub(crate) conn: Arc<crate::conn::Context>,
    /// Frame and buffer bounds of an upgraded WebSocket.
    pub frames: FrameLimits,
    /// Checks the bearer token of `/v1/discovery`.
    pub verifier: Arc<Verifier>,
    /// What `/v1/discovery` answers.
    pub discovery: Discovery,
    /// Asked only whether it is ready (`/readyz`).
    pub bus: Arc<dyn Bus>,
    /// Asked only whether it is ready (`/readyz`).
    pub store: Arc<dyn Store>,
    /// Rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Cancelled once, on shutdown: no more upgrades, not ready.
    pub shutdown: CancellationToken,
    /// Every upgraded connection runs on it, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// `/v1/asyncapi.json` and `/v1/schemas`.
    pub documents: docs::Documents,
    /// `serve --dev` only: the console's token minting (`/console/dev/token`).
    pub dev_tokens: Option<console::DevTokens>,
}

/// The bounds of an upgraded WebSocket (from the settings, by `app`).
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest client frame and message.
    pub max_frame_bytes: usize,
    /// Largest notification `data`: its frame must always fit the write buffer.
    pub max_notification_bytes: usize,
}

/// What `/v1/discovery` tells a client with a valid token.
#[derive(Clone)]
pub struct Discovery {
    /// The `/ws/v1` URL to connect to.
    pub ws_endpoint: String,
    pub node_id: String,
    /// The cluster this node is a member of (Redis store only): the answer
    /// is then the node it chooses for the agent.
    pub cluster: Option<Arc<Membership>>,
}

pub fn public(public: Arc<Public>) -> Router {
    Router::new()
        .route("/ws/v1", get(upgrade))
        .route("/v1/discovery", get(discovery))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/asyncapi.json", get(docs::asyncapi))
        .route("/v1/schemas", get(docs::schemas))
        .merge(console::router(public.dev_tokens.clone()))
        .with_state(public)
}

async fn upgrade(State(public): State<Arc<Public>>, ws: WebSocketUpgrade) -> Response {
    if public.shutdown.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let max = public.frames.max_frame_bytes;
    // The largest notification frame must always fit behind what the buffer
    // may already hold, or it could never be written and would block its session.
    let max_write = public.frames.max_notification_bytes + WS_WRITE_BUFFER + FRAME_ENVELOPE;
    let (tasks, conn) = (public.tasks.clone(), public.conn.clone());
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(max_write)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| tasks.track_future(crate::conn::run(socket, conn)))
}

/// The bearer token of an `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

async fn discovery(State(public): State<Arc<Public>>, headers: HeaderMap) -> Response {
    let refused = |message: String| {
        (StatusCode::UNAUTHORIZED, Json(json!({"code": "unauthorized", "message": message}))).into_response()
    };
    let Some(token) = bearer(&headers) else {
        return refused("an Authorization: Bearer <token> header is required".into());
    };
    match public.verifier.verify(token).await {
        Ok(identity) => {
            let d = &public.discovery;
            let answer = match &d.cluster {
                Some(cluster) => cluster.discover(&identity.tenant_guid, &identity.agent_guid),
                None => Answer::Node { id: d.node_id.clone(), endpoint: d.ws_endpoint.clone() },
            };
            match answer {
                Answer::Node { id, endpoint } => Json(json!({"endpoint": endpoint, "node_id": id})).into_response(),
                Answer::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"code": "unavailable", "message": "this node is draining and knows no other node"})),
                )
                    .into_response(),
            }
        }
        Err(e) => refused(e.to_string()),
    }
}

/// Whether the bus and the store are ready, and the bridge with them (not
/// shutting down); also kept in `cceb_ready` for alerting.
fn readiness(public: &Public) -> (bool, bool, bool) {
    let (bus, store) = (public.bus.ready(), public.store.ready());
    let draining = public.discovery.cluster.as_ref().is_some_and(|c| c.draining());
    let ready = bus && store && !draining && !public.shutdown.is_cancelled();
    public.metrics.ready.set(if ready { 1.0 } else { 0.0 });
    (bus, store, ready)
}

async fn readyz(State(public): State<Arc<Public>>) -> Response {
    let (bus, store, ready) = readiness(&public);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"bus": bus, "store": store}))).into_response()
}

async fn metrics(State(public): State<Arc<Public>>) -> Response {
    readiness(&public);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], public.metrics.render()).into_response()
}
