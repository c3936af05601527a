//! Client tokens from `hello` and discovery go through `Verifier::verify`.
//!
//! Input: a first byte choosing the mode, then either a raw token, or a header
//! and claims (split at the first newline) that are encoded and signed with
//! the HS256 secret, so that claims handling past the signature is reached.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cceb::auth::Verifier;
use cceb::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use cceb::Settings;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

const SECRET: &str = "fuzz-hs256-secret-of-at-least-32-bytes";

fn fixture(name: &str) -> Option<PathBuf> {
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/cceb/tests/it/fixtures").join(name))
}

/// The runtime verification runs on (it awaits only when a token names an
/// unknown key, which the fixture JWKS file answers at once).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// An HS256-only verifier, and one with every key kind plus issuer and audience rules.
fn verifiers() -> &'static [Verifier; 2] {
    static VERIFIERS: OnceLock<[Verifier; 2]> = OnceLock::new();
    VERIFIERS.get_or_init(|| {
        let hs256 = Settings { jwt_hs256_secret: Some(SECRET.into()), ..Settings::default() };
        let all = Settings {
            jwt_rs256_public_key_file: fixture("rsa-public.pem"),
            jwt_es256_public_key_file: fixture("ec-public.pem"),
            jwt_jwks_file: fixture("jwks.json"),
            jwt_issuer: Some("fuzz-issuer".into()),
            jwt_audience: Some("fuzz-audience".into()),
            ..hs256.clone()
        };
        let (metrics, tasks, stop) = (Metrics::new([]), TaskTracker::new(), CancellationToken::new());
        [hs256, all].map(|s| runtime().block_on(Verifier::start(&s, &metrics, &tasks, &stop)).expect("fixture keys"))
    })
}

fn signed(header: &[u8], claims: &[u8]) -> String {
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("HMAC signs");
    format!("{message}.{signature}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let token = if mode % 2 == 0 {
        let Ok(raw) = std::str::from_utf8(rest) else { return };
        raw.to_owned()
    } else {
        let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        signed(&rest[..split], rest.get(split + 1..).unwrap_or_default())
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    for verifier in verifiers() {
        if let Ok(id) = runtime().block_on(verifier.verify(&token)) {
            assert!(!id.tenant_guid.is_empty() && !id.agent_guid.is_empty() && !id.ir_instance.is_empty());
            // No leeway (docs/PROTOCOL.md section 3).
            assert!(id.exp >= now, "accepted a token that expired at {} (now {now})", id.exp);
        }
    }
});
