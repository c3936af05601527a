//! Contract section 3: hello, tokens, and the close codes around them.

mod jwks;

use crate::support::*;
use cceb::clock::ManualClock;
use cceb_protocol::outgoing::ServerMessage;
use cceb_protocol::ErrorCode;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn claims() -> Value {
    json!({"sub": "a1", "tenant_guid": "t1", "ir_instance": "ir-1", "exp": now() + 3600})
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value, kid: Option<&str>) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).expect("sign")
}

fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), claims, None)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).expect("fixture")).expect("rsa key")
}

fn ec_key() -> EncodingKey {
    ec_key_from("ec-private.pem")
}

/// A second P-256 key, for key sets of several keys and rotation.
fn ec2_key() -> EncodingKey {
    ec_key_from("ec-2-private.pem")
}

fn ec_key_from(fixture_name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(fixture(fixture_name)).expect("fixture")).expect("ec key")
}

/// The public JWK of `key` (a P-256 key) with `kid`, as an identity provider publishes it.
fn ec_jwk(key: &EncodingKey, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).expect("json")
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// Sends hello with `token` and expects `unauthorized` then close 4001.
async fn refused(b: &TestBridge, token: &str) {
    let mut c = b.connect().await;
    c.send(json!({"type":"hello","uuid":"h","data":{"token": token}})).await;
    let (code, msgs) = c.closed().await;
    assert!(
        matches!(msgs.as_slice(), [ServerMessage::Error { uuid, error }] if uuid == "h" && error.code == ErrorCode::Unauthorized),
        "{msgs:?}"
    );
    assert_eq!(code, Some(4001));
}

/// Whether the bridge takes `token` in `hello`.
async fn accepted(b: &TestBridge, token: &str) -> bool {
    let mut c = b.connect().await;
    c.send(json!({"type":"hello","uuid":"h","data":{"token": token}})).await;
    match c.next().await {
        ServerMessage::HelloReply { .. } => true,
        ServerMessage::Error { error, .. } if error.code == ErrorCode::Unauthorized => false,
        other => panic!("expected hello_reply or unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_reply_describes_the_session() {
    let b = TestBridge::with(|s| s.heartbeat_interval_ms = 25_000).await;
    let (_c, reply) = b.agent("t1", "a1").await;
    assert!(!reply.session_id.is_empty());
    assert!(!reply.resumed);
    assert_eq!(reply.session_ttl_seconds, 259_200);
    assert_eq!(reply.heartbeat_interval_seconds, 25);
    assert_eq!(
        (reply.agent.tenant_guid.as_str(), reply.agent.agent_guid.as_str(), reply.agent.ir_instance.as_str()),
        ("t1", "a1", "ir-1")
    );
    let (_c2, other) = b.agent("t1", "a1").await;
    assert_ne!(other.session_id, reply.session_id, "every connection gets its own session");
}

#[tokio::test]
async fn no_hello_in_time_closes_with_4003() {
    let b = TestBridge::with(|s| s.hello_timeout_ms = 200).await;
    let mut c = b.connect().await;
    assert_eq!(c.closed().await.0, Some(4003));
}

#[tokio::test]
async fn anything_but_hello_first_is_not_authenticated_4001() {
    let b = TestBridge::start().await;
    let mut c = b.connect().await;
    c.send(json!({"type":"ping","uuid":"p1"})).await;
    let (code, msgs) = c.closed().await;
    assert!(
        matches!(msgs.as_slice(), [ServerMessage::Error { uuid, error }] if uuid == "p1" && error.code == ErrorCode::NotAuthenticated)
    );
    assert_eq!(code, Some(4001));
}

#[tokio::test]
async fn malformed_first_message_gets_its_error_then_4001() {
    let b = TestBridge::start().await;
    let mut c = b.connect().await;
    c.send_text("hello?").await;
    let (code, msgs) = c.closed().await;
    assert!(matches!(msgs.as_slice(), [ServerMessage::Error { error, .. }] if error.code == ErrorCode::InvalidJson));
    assert_eq!(code, Some(4001));
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let b = TestBridge::start().await;
    refused(&b, "not-a-jwt").await;
    refused(&b, &sign(Algorithm::HS256, &EncodingKey::from_secret(b"wrong"), &claims(), None)).await;
    let mut expired = claims();
    expired["exp"] = json!(now() - 10);
    refused(&b, &hs(&expired)).await;
    for missing in ["sub", "tenant_guid", "ir_instance", "exp"] {
        let mut c = claims();
        c.as_object_mut().expect("obj").remove(missing);
        refused(&b, &hs(&c)).await;
    }
    let mut early = claims();
    early["nbf"] = json!(now() + 600);
    refused(&b, &hs(&early)).await;
    // alg: none, unsigned.
    use base64::Engine;
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    refused(&b, &format!("{}.{}.", enc(&json!({"alg":"none","typ":"JWT"})), enc(&claims()))).await;
    // An RS256 token where only HS256 is configured.
    refused(&b, &sign(Algorithm::RS256, &rsa_key(), &claims(), None)).await;
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    // RSA public key configured: an HS256 token signed with that public key's PEM as secret must fail.
    let b = TestBridge::with(|s| {
        s.jwt_hs256_secret = None;
        s.jwt_rs256_public_key_file = Some(fixture("rsa-public.pem"));
    })
    .await;
    let pem = std::fs::read(fixture("rsa-public.pem")).expect("fixture");
    refused(&b, &sign(Algorithm::HS256, &EncodingKey::from_secret(&pem), &claims(), None)).await;
    let mut c = b.connect().await;
    c.hello(&sign(Algorithm::RS256, &rsa_key(), &claims(), None)).await;
}

#[tokio::test]
async fn rs256_and_es256_from_pem_files() {
    let b = TestBridge::with(|s| {
        s.jwt_rs256_public_key_file = Some(fixture("rsa-public.pem"));
        s.jwt_es256_public_key_file = Some(fixture("ec-public.pem"));
    })
    .await;
    b.connect().await.hello(&sign(Algorithm::RS256, &rsa_key(), &claims(), None)).await;
    b.connect().await.hello(&sign(Algorithm::ES256, &ec_key(), &claims(), None)).await;
    b.connect().await.hello(&hs(&claims())).await;
}

#[tokio::test]
async fn rs256_and_es256_from_a_jwks_file() {
    let b = TestBridge::with(|s| {
        s.jwt_hs256_secret = None;
        s.jwt_jwks_file = Some(fixture("jwks.json"));
    })
    .await;
    b.connect().await.hello(&sign(Algorithm::RS256, &rsa_key(), &claims(), Some("rsa-1"))).await;
    b.connect().await.hello(&sign(Algorithm::ES256, &ec_key(), &claims(), Some("ec-1"))).await;
    refused(&b, &sign(Algorithm::RS256, &rsa_key(), &claims(), Some("unknown-kid"))).await;
    refused(&b, &hs(&claims())).await;
}

#[tokio::test]
async fn kid_must_name_one_of_several_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (two, one) = (dir.path().join("two.json"), dir.path().join("one.json"));
    std::fs::write(&two, jwks(&[ec_jwk(&ec_key(), "ec-1"), ec_jwk(&ec2_key(), "ec-2")])).expect("write");
    std::fs::write(&one, jwks(&[ec_jwk(&ec_key(), "ec-1")])).expect("write");
    let b = TestBridge::with(|s| s.jwt_jwks_file = Some(two)).await;
    refused(&b, &sign(Algorithm::ES256, &ec_key(), &claims(), None)).await;
    b.connect().await.hello(&sign(Algorithm::ES256, &ec_key(), &claims(), Some("ec-1"))).await;
    b.connect().await.hello(&sign(Algorithm::ES256, &ec2_key(), &claims(), Some("ec-2"))).await;
    refused(&b, &sign(Algorithm::ES256, &ec2_key(), &claims(), Some("ec-1"))).await;
    // A lone key of the algorithm: no kid is fine, a wrong one is not.
    let b = TestBridge::with(|s| s.jwt_jwks_file = Some(one)).await;
    b.connect().await.hello(&sign(Algorithm::ES256, &ec_key(), &claims(), None)).await;
    refused(&b, &sign(Algorithm::ES256, &ec_key(), &claims(), Some("ec-2"))).await;
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let b = TestBridge::with(|s| {
        s.jwt_issuer = Some("https://idp.test".into());
        s.jwt_audience = Some("cceb".into());
    })
    .await;
    let mut good = claims();
    good["iss"] = json!("https://idp.test");
    good["aud"] = json!("cceb");
    b.connect().await.hello(&hs(&good)).await;
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("other");
    refused(&b, &hs(&wrong_aud)).await;
    let mut no_iss = good.clone();
    no_iss.as_object_mut().expect("obj").remove("iss");
    refused(&b, &hs(&no_iss)).await;
}

#[tokio::test]
async fn tenant_guid_in_hello_must_match_the_token() {
    let b = TestBridge::start().await;
    let mut c = b.connect().await;
    c.send(json!({"type":"hello","uuid":"h","data":{"token": token("t1","a1"), "tenant_guid": "t1"}})).await;
    assert!(matches!(c.next().await, ServerMessage::HelloReply { .. }));
    let mut c = b.connect().await;
    c.send(json!({"type":"hello","uuid":"h","data":{"token": token("t1","a1"), "tenant_guid": "t2"}})).await;
    let (code, msgs) = c.closed().await;
    assert!(matches!(msgs.as_slice(), [ServerMessage::Error { error, .. }] if error.code == ErrorCode::Unauthorized));
    assert_eq!(code, Some(4001));
}

#[tokio::test]
async fn token_expiring_on_an_open_connection_closes_with_4002() {
    // The bridge's clock stands 200 ms before the token's `exp`.
    let mut claims = claims();
    let exp = claims["exp"].as_u64().expect("exp");
    let clock = Arc::new(ManualClock::new(exp * 1000 - 200));
    let b = TestBridge::with_clock(clock.clone(), |_| {}).await;
    let mut c = b.connect().await;
    c.hello(&hs(&claims)).await;
    let (code, _) = c.closed().await;
    assert_eq!(code, Some(4002));
    // By the bridge's clock the token is now past its `exp` second: the same token is refused.
    clock.advance(Duration::from_millis(1200));
    refused(&b, &hs(&claims)).await;
    claims["exp"] = json!(exp + 1);
    c = b.connect().await;
    c.hello(&hs(&claims)).await;
}

#[tokio::test]
async fn second_hello_on_an_authenticated_connection_is_an_error() {
    let b = TestBridge::start().await;
    let (mut c, _) = b.agent("t", "a").await;
    c.send(json!({"type":"hello","uuid":"again","data":{"token": token("t","a")}})).await;
    c.expect_error("again", ErrorCode::InvalidMessage).await;
    c.round_trip("open").await;
}
