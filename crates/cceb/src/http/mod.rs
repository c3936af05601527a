//! HTTP surfaces: the public listener (`/ws/v1`, discovery, health, metrics)
//! and the embedded bus's backend port; `serve` accepts their connections.

pub mod backend;
pub mod serve;

use crate::shared::Shared;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// Read chunk per connection; the protocol's messages are small, and
/// tungstenite's 128 KiB default would dominate the memory of idle sessions.
const WS_READ_BUFFER: usize = 4 * 1024;
const WS_WRITE_BUFFER: usize = 8 * 1024;
/// What a notification frame adds to its `data`: the envelope (type, uuid,
/// seq) and the WebSocket header, with room to spare.
const FRAME_ENVELOPE: usize = 1024;

pub fn public(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/ws/v1", get(upgrade))
        .route("/v1/discovery", get(discovery))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn upgrade(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    if shared.shutdown.is_cancelled() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let max = shared.settings.max_frame_bytes;
    // The largest notification frame must always fit behind what the buffer
    // may already hold, or it could never be written and would block its session.
    let max_write = shared.settings.max_notification_bytes + WS_WRITE_BUFFER + FRAME_ENVELOPE;
    let tasks = shared.tasks.clone();
    ws.read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(max_write)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| tasks.track_future(crate::conn::run(socket, shared)))
}

/// The bearer token of an `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

async fn discovery(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let refused = |message: String| {
        (StatusCode::UNAUTHORIZED, Json(json!({"code": "unauthorized", "message": message}))).into_response()
    };
    let Some(token) = bearer(&headers) else {
        return refused("an Authorization: Bearer <token> header is required".into());
    };
    match shared.verifier.verify(token).await {
        Ok(_) => Json(json!({"endpoint": shared.ws_endpoint(), "node_id": shared.settings.node_id})).into_response(),
        Err(e) => refused(e.to_string()),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let (bus, store) = (shared.bus.ready(), shared.store.ready());
    let status =
        if bus && store && !shared.shutdown.is_cancelled() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"bus": bus, "store": store}))).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render()).into_response()
}
