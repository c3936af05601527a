//! Keys that change while the bridge runs (docs/PROTOCOL.md section 3): a
//! JWKS file is re-read and a JWKS URL fetched again, without a restart.

use super::*;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio_util::sync::CancellationToken;

/// What the provider answers; the test changes it to rotate keys or fail.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
    cache_control: Option<&'static str>,
    delay: Duration,
}

#[derive(Clone, Default)]
struct Endpoint {
    answer: Arc<Mutex<Option<Answer>>>,
    requests: Arc<AtomicUsize>,
}

/// An identity provider's JWKS endpoint on loopback.
struct Provider {
    url: String,
    endpoint: Endpoint,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start(body: String) -> Provider {
        let endpoint = Endpoint::default();
        *endpoint.answer.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Answer { status: 200, body, cache_control: None, delay: Duration::ZERO });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        let app = axum::Router::new().route("/jwks", axum::routing::get(jwks_answer)).with_state(endpoint.clone());
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(until).await.expect("serve");
        });
        Provider { url, endpoint, stop, server }
    }

    fn answer(&self, change: impl FnOnce(&mut Answer)) {
        if let Some(a) = self.endpoint.answer.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            change(a);
        }
    }

    fn requests(&self) -> usize {
        self.endpoint.requests.load(Ordering::SeqCst)
    }

    /// Stops listening and closes its connections: the provider is down.
    async fn down(self) {
        self.stop.cancel();
        self.server.await.expect("server ends");
    }
}

async fn jwks_answer(State(endpoint): State<Endpoint>) -> Response {
    endpoint.requests.fetch_add(1, Ordering::SeqCst);
    let answer = endpoint.answer.lock().unwrap_or_else(PoisonError::into_inner).clone().expect("an answer");
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.status).expect("status");
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], answer.body).into_response();
    if let Some(cc) = answer.cache_control {
        response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static(cc));
    }
    response
}

async fn url_bridge(provider: &Provider, min_refresh_seconds: u64) -> TestBridge {
    url_bridge_on(provider, min_refresh_seconds, Arc::new(cceb::clock::SystemClock)).await
}

/// A bridge on the JWKS URL whose `min_refresh` goes by `clock`.
async fn url_bridge_on(
    provider: &Provider,
    min_refresh_seconds: u64,
    clock: Arc<dyn cceb::clock::Clock>,
) -> TestBridge {
    TestBridge::with_clock(clock, |s| {
        s.jwt_hs256_secret = None;
        s.jwt_jwks_url = Some(provider.url.clone());
        s.jwt_jwks_min_refresh_seconds = min_refresh_seconds;
    })
    .await
}

/// `cceb_jwks_refreshes_total{outcome="failed"}` (process-wide: bridges of
/// other tests add to it, never take from it).
async fn failed_refreshes(b: &TestBridge) -> f64 {
    let text = b.http.get(b.url("/metrics")).send().await.expect("answers").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("cceb_jwks_refreshes_total{outcome=\"failed\"} "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the series exists")
}

/// Replaces the file as operators and orchestrators do: written aside, renamed over.
fn replace(path: &Path, content: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, content).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

fn es256(key: &EncodingKey, kid: &str) -> String {
    sign(Algorithm::ES256, key, &claims(), Some(kid))
}

/// Asks until `token` is accepted (or `PATIENCE` passes).
async fn eventually_accepted(b: &TestBridge, token: &str) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !accepted(b, token).await {
        assert!(std::time::Instant::now() < deadline, "still refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn file_bridge(path: &Path, poll_ms: u64) -> TestBridge {
    TestBridge::with(|s| {
        s.jwt_hs256_secret = None;
        s.jwt_jwks_file = Some(path.to_owned());
        s.jwt_jwks_file_poll_ms = poll_ms;
    })
    .await
}

#[tokio::test]
async fn a_rewritten_jwks_file_is_read_for_an_unknown_kid_and_a_bad_one_keeps_the_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace(&path, &jwks(&[ec_jwk(&ec_key(), "ec-1")]));
    // Polled hourly: only the unknown kid can make the bridge look.
    let b = file_bridge(&path, 3_600_000).await;
    assert!(accepted(&b, &es256(&ec_key(), "ec-1")).await);
    replace(&path, &jwks(&[ec_jwk(&ec_key(), "ec-1"), ec_jwk(&ec2_key(), "ec-2")]));
    assert!(accepted(&b, &es256(&ec2_key(), "ec-2")).await, "the new key is read at once");
    replace(&path, "{\"keys\": [");
    assert!(!accepted(&b, &es256(&ec2_key(), "ec-3")).await);
    assert!(accepted(&b, &es256(&ec_key(), "ec-1")).await, "a broken file keeps the keys held");
    assert!(accepted(&b, &es256(&ec2_key(), "ec-2")).await);
}

#[tokio::test]
async fn the_jwks_file_is_polled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    replace(&path, &jwks(&[ec_jwk(&ec_key(), "k")]));
    let b = file_bridge(&path, 20).await;
    assert!(accepted(&b, &es256(&ec_key(), "k")).await);
    // The same kid with another key: a token never names an unknown kid, so
    // only the poll can bring the new key (and retire the old one).
    replace(&path, &jwks(&[ec_jwk(&ec2_key(), "k")]));
    eventually_accepted(&b, &es256(&ec2_key(), "k")).await;
    assert!(!accepted(&b, &es256(&ec_key(), "k")).await, "the key taken out is no longer accepted");
}

#[tokio::test]
async fn a_key_rotated_in_at_the_jwks_url_is_fetched_for_its_kid() {
    let provider = Provider::start(jwks(&[ec_jwk(&ec_key(), "ec-1")])).await;
    let b = url_bridge(&provider, 0).await;
    assert!(accepted(&b, &es256(&ec_key(), "ec-1")).await);
    assert_eq!(provider.requests(), 1, "fetched at start");
    provider.answer(|a| a.body = jwks(&[ec_jwk(&ec2_key(), "ec-2")]));
    assert!(accepted(&b, &es256(&ec2_key(), "ec-2")).await, "the new key, without a restart");
    assert_eq!(provider.requests(), 2);
    assert!(!accepted(&b, &es256(&ec_key(), "ec-1")).await, "the key rotated out");
}

#[tokio::test]
async fn concurrent_hellos_with_an_unknown_kid_make_one_fetch() {
    let provider = Provider::start(jwks(&[ec_jwk(&ec_key(), "ec-1")])).await;
    let b = url_bridge(&provider, 0).await;
    provider.answer(|a| {
        a.body = jwks(&[ec_jwk(&ec_key(), "ec-1"), ec_jwk(&ec2_key(), "ec-2")]);
        // Long enough for every hello to arrive while the fetch is under way.
        a.delay = Duration::from_millis(300);
    });
    let token = es256(&ec2_key(), "ec-2");
    let hellos = (0..8).map(|_| accepted(&b, &token));
    assert!(futures_util::future::join_all(hellos).await.into_iter().all(|ok| ok));
    assert_eq!(provider.requests(), 2, "one fetch at start, one for all the hellos");
}

#[tokio::test]
async fn unknown_kids_fetch_at_most_once_per_min_refresh() {
    let provider = Provider::start(jwks(&[ec_jwk(&ec_key(), "ec-1")])).await;
    // The bridge's clock stands still unless moved; tokens are checked by it too.
    let clock = Arc::new(cceb::clock::ManualClock::at_system_time());
    let b = url_bridge_on(&provider, 60, clock.clone()).await;
    provider.answer(|a| a.body = jwks(&[ec_jwk(&ec_key(), "ec-1"), ec_jwk(&ec2_key(), "ec-2")]));
    assert!(!accepted(&b, &es256(&ec2_key(), "ec-2")).await, "the fetch at start was less than 60 s ago");
    assert_eq!(provider.requests(), 1);
    clock.advance(Duration::from_millis(59_999));
    assert!(!accepted(&b, &es256(&ec2_key(), "ec-2")).await, "nor now");
    assert_eq!(provider.requests(), 1);
    clock.advance(Duration::from_millis(1));
    assert!(accepted(&b, &es256(&ec2_key(), "ec-2")).await, "60 s after the last fetch, an unknown kid fetches");
    assert_eq!(provider.requests(), 2);
    clock.advance(Duration::from_secs(59));
    for kid in ["made-up-1", "made-up-2", "made-up-3"] {
        assert!(!accepted(&b, &es256(&ec2_key(), kid)).await);
    }
    assert_eq!(provider.requests(), 2, "made-up kids do not reach the provider again within 60 s");
}

#[tokio::test]
async fn a_failing_jwks_url_keeps_the_keys_held() {
    let provider = Provider::start(jwks(&[ec_jwk(&ec_key(), "ec-1")])).await;
    let b = url_bridge(&provider, 0).await;
    let failed = failed_refreshes(&b).await;
    let (old, new) = (es256(&ec_key(), "ec-1"), es256(&ec2_key(), "ec-2"));
    provider.answer(|a| a.status = 500);
    assert!(!accepted(&b, &new).await);
    assert!(accepted(&b, &old).await, "500: the keys held stay");
    provider.answer(|a| (a.status, a.body) = (200, "<html>".into()));
    assert!(!accepted(&b, &new).await);
    assert!(accepted(&b, &old).await, "not a JWKS: the keys held stay");
    assert_eq!(provider.requests(), 3);
    assert!(failed_refreshes(&b).await >= failed + 2.0, "failures are counted");
    provider.down().await;
    assert!(!accepted(&b, &new).await);
    assert!(accepted(&b, &old).await, "provider down: the keys held stay");
}

#[tokio::test]
async fn jwks_url_keys_are_fetched_again_when_their_cache_lifetime_ends() {
    let provider = Provider::start(jwks(&[ec_jwk(&ec_key(), "k")])).await;
    provider.answer(|a| a.cache_control = Some("public, max-age=1"));
    let b = url_bridge(&provider, 1).await;
    assert!(accepted(&b, &es256(&ec_key(), "k")).await);
    // The same kid with another key: no token names an unknown kid, so only
    // the scheduled fetch can bring it.
    provider.answer(|a| a.body = jwks(&[ec_jwk(&ec2_key(), "k")]));
    eventually_accepted(&b, &es256(&ec2_key(), "k")).await;
    assert!(!accepted(&b, &es256(&ec_key(), "k")).await);
    assert!(provider.requests() >= 2);
}

#[tokio::test]
async fn a_bridge_that_cannot_fetch_its_jwks_url_does_not_start() {
    let provider = Provider::start(jwks(&[ec_jwk(&ec_key(), "ec-1")])).await;
    provider.answer(|a| a.status = 503);
    let data = tempfile::tempdir().expect("tempdir");
    let settings = cceb::Settings {
        data_dir: data.path().to_owned(),
        jwt_hs256_secret: None,
        jwt_jwks_url: Some(provider.url.clone()),
        ..test_settings()
    };
    let e = cceb::Bridge::start(settings).await.err().expect("no start").to_string();
    assert!(e.contains(&provider.url) && e.contains("503"), "{e}");
}
