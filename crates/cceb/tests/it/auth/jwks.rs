//! Keys that change while the bridge runs (docs/PROTOCOL.md section 3): a
//! JWKS file is re-read, without a restart.

use super::*;
use std::path::Path;

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
