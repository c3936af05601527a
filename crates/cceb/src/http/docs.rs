//! `GET /v1/asyncapi.json` (the AsyncAPI document of the client WebSocket) and
//! `GET /v1/schemas` (the schema set and mapping the bridge runs with), both
//! rendered once at start-up from the loaded set. No token: they describe the
//! message formats every client author needs (the built-in set is public
//! anyway, in this repository and in the TypeScript SDK's generated types),
//! and hold no tenant, agent or secret (docs/PROTOCOL.md, section 1).

use super::Public;
use crate::schema::SchemaSet;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The two documents, serialised once.
#[derive(Debug, Clone)]
pub struct Documents {
    asyncapi: Bytes,
    schemas: Bytes,
}

impl Documents {
    pub fn new(set: &SchemaSet) -> Self {
        let render = |v: serde_json::Value| Bytes::from(serde_json::to_vec_pretty(&v).unwrap_or_default());
        Documents { asyncapi: render(crate::asyncapi::document(set)), schemas: render(set.to_json()) }
    }
}

fn json(body: &Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

pub(super) async fn asyncapi(State(public): State<Arc<Public>>) -> Response {
    json(&public.documents.asyncapi)
}

pub(super) async fn schemas(State(public): State<Arc<Public>>) -> Response {
    json(&public.documents.schemas)
}
