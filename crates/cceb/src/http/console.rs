//! `/console`: the browser console (`clients/console`, built by npm into
//! `crates/cceb/console/` and committed, so `cargo build` needs no npm),
//! served from the binary without authentication (the page asks for a client
//! token); and, with `serve --dev` only, `/console/dev/token`, which mints a
//! client token for the page. Without `--dev` that route does not exist.

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use cceb_token::{mint_hs256, TokenRequest};
use include_dir::{include_dir, Dir};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

static ASSETS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/console");

/// Longest lifetime of a token minted for the console.
const MAX_DEV_TTL: Duration = Duration::from_secs(24 * 3600);

/// What `/console/dev/token` mints with: the HS256 secret `serve --dev` generated or was given.
#[derive(Clone)]
pub struct DevTokens {
    secret: String,
}

impl DevTokens {
    pub fn new(secret: String) -> DevTokens {
        DevTokens { secret }
    }
}

impl std::fmt::Debug for DevTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevTokens(..)")
    }
}

/// The console's routes; `dev` adds the token minting of `serve --dev`.
pub fn router<S: Clone + Send + Sync + 'static>(dev: Option<DevTokens>) -> Router<S> {
    let files = Router::new()
        .route("/console", get(|| async { Redirect::permanent("console/") }))
        .route("/console/", get(|| async { asset("index.html") }))
        .route(
            "/console/{*path}",
            // Any other method: nothing here (not 405, which would tell a path exists).
            get(|uri: Uri| async move { asset(uri.path().trim_start_matches("/console/")) })
                .fallback(|| async { StatusCode::NOT_FOUND }),
        );
    match dev {
        Some(dev) => files.merge(
            Router::new().route("/console/dev/token", get(dev_defaults).post(dev_mint)).with_state(Arc::new(dev)),
        ),
        None => files,
    }
}

fn asset(path: &str) -> Response {
    let Some(file) = ASSETS.get_file(path) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    let content_type = match ext {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Fixed file names: a new binary's files must be fetched again.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; connect-src 'self' ws: wss: http: https:; img-src 'self' data:; \
                 frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
        ],
        file.contents(),
    )
        .into_response()
}

/// A token request from the console; the defaults are those of the token `--dev` prints.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct MintRequest {
    tenant_guid: String,
    agent_guid: String,
    ir_instance: String,
    contact_id: Option<String>,
    ttl_seconds: u64,
}

impl Default for MintRequest {
    fn default() -> Self {
        MintRequest {
            tenant_guid: "tenant-1".into(),
            agent_guid: "agent-1".into(),
            ir_instance: "ir-1".into(),
            contact_id: Some("1001".into()),
            ttl_seconds: 3600,
        }
    }
}

/// `GET /console/dev/token`: there is a minter (the page shows its form), and its defaults.
async fn dev_defaults() -> Response {
    let d = MintRequest::default();
    Json(json!({
        "tenant_guid": d.tenant_guid, "agent_guid": d.agent_guid, "ir_instance": d.ir_instance,
        "contact_id": d.contact_id, "ttl_seconds": d.ttl_seconds,
    }))
    .into_response()
}

/// `POST /console/dev/token`: `{token}` for the tenant and agent asked.
async fn dev_mint(State(dev): State<Arc<DevTokens>>, Json(req): Json<MintRequest>) -> Response {
    let refused = |message: &str| (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response();
    if req.tenant_guid.trim().is_empty() || req.agent_guid.trim().is_empty() || req.ir_instance.trim().is_empty() {
        return refused("tenant_guid, agent_guid and ir_instance must not be empty");
    }
    let ttl = Duration::from_secs(req.ttl_seconds);
    if ttl.is_zero() || ttl > MAX_DEV_TTL {
        return refused("ttl_seconds must be between 1 and 86400");
    }
    let contact_id = req.contact_id.as_deref().map(str::trim).filter(|c| !c.is_empty());
    let request = TokenRequest {
        tenant_guid: req.tenant_guid.trim(),
        agent_guid: req.agent_guid.trim(),
        ir_instance: req.ir_instance.trim(),
        contact_id,
        ttl,
    };
    match mint_hs256(&dev.secret, &request) {
        Ok(token) => Json(json!({"token": token})).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))).into_response(),
    }
}
