//! Client tokens (contract section 3): verification of the JWT in `hello` and
//! in discovery. Minting (`cceb token`, `--dev`) and the claims themselves are
//! in the `cceb-token` crate, so clients need not link the bridge.
//!
//! The algorithm a token may use is decided by which keys are configured, never
//! by the token: an HS256 token is checked only against the HS256 secret, an
//! RS256 one only against RSA keys, and `alg: none` does not parse at all.
//! Keys from a JWKS file or URL change while the bridge runs (`jwks`).
//!
//! `exp` and `nbf` are checked against the injected [`Clock`], not by
//! jsonwebtoken against the system's: tests move the clock to a token's
//! `nbf` or past its `exp` instead of waiting. (An open connection's 4002
//! timer runs on tokio's clock, set from the remaining lifetime at `hello`.)

mod jwks;

pub use cceb_token::{mint_hs256, TokenRequest};
pub use jwks::JwksError;

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use cceb_token::Claims;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub tenant_guid: String,
    pub agent_guid: String,
    pub ir_instance: String,
    pub contact_id: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Identity {
    /// Time left before the token expires, at `now_ms` (milliseconds since the Unix epoch).
    pub fn remaining_at(&self, now_ms: u64) -> Duration {
        Duration::from_secs(self.exp).saturating_sub(Duration::from_millis(now_ms))
    }
}

/// What is decoded of a token: its claims, and `nbf`, which only verification reads.
#[derive(serde::Deserialize)]
struct Decoded {
    #[serde(flatten)]
    claims: Claims,
    /// Not before, seconds since the Unix epoch (a JSON number).
    #[serde(default)]
    nbf: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token refused: {0}")]
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no client token key configured: set CCEB_JWT_HS256_SECRET, a public key file, a JWKS file or a JWKS URL")]
    NoKey,
    #[error("{file}: {problem}")]
    File { file: String, problem: String },
    #[error("JWKS {origin}: {problem}")]
    Jwks { origin: String, problem: JwksError },
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Public keys by algorithm.
#[derive(Default)]
struct KeySet {
    rs256: Vec<Key>,
    es256: Vec<Key>,
}

impl KeySet {
    fn of(&self, alg: Algorithm) -> &[Key] {
        match alg {
            Algorithm::RS256 => &self.rs256,
            Algorithm::ES256 => &self.es256,
            _ => &[],
        }
    }

    fn is_empty(&self) -> bool {
        self.rs256.is_empty() && self.es256.is_empty()
    }
}

pub struct Verifier {
    hs256: Option<DecodingKey>,
    /// Keys from PEM files: read once, without `kid`.
    pem: KeySet,
    /// Keys that may change while the bridge runs.
    sources: Vec<jwks::Source>,
    issuer: Option<String>,
    audience: Option<String>,
    /// Decides `exp` and `nbf`.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("rs256_pem", &self.pem.rs256.len())
            .field("es256_pem", &self.pem.es256.len())
            .field("sources", &self.sources.len())
            .finish()
    }
}

/// Why no key was selected for a token.
enum Miss {
    Refused(AuthError),
    /// The token names a key we do not hold; a refresh may bring it.
    UnknownKid(String),
}

impl Verifier {
    /// Reads the configured keys (fetching the JWKS URL), and starts their
    /// refreshes on `tasks` until `stop`. Tokens' `exp` and `nbf` are checked
    /// against `clock`.
    pub async fn start(
        s: &Settings,
        clock: Arc<dyn Clock>,
        metrics: &Metrics,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Self, KeyError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| KeyError::File { file: path.display().to_string(), problem: e.to_string() })
        };
        let bad = |path: &std::path::Path, e: jsonwebtoken::errors::Error| KeyError::File {
            file: path.display().to_string(),
            problem: e.to_string(),
        };
        let mut v = Verifier {
            hs256: s.jwt_hs256_secret.as_deref().map(|k| DecodingKey::from_secret(k.as_bytes())),
            pem: KeySet::default(),
            sources: Vec::new(),
            issuer: s.jwt_issuer.clone(),
            audience: s.jwt_audience.clone(),
            clock,
        };
        if let Some(path) = &s.jwt_rs256_public_key_file {
            let key = DecodingKey::from_rsa_pem(&read(path)?).map_err(|e| bad(path, e))?;
            v.pem.rs256.push(Key { kid: None, key });
        }
        if let Some(path) = &s.jwt_es256_public_key_file {
            let key = DecodingKey::from_ec_pem(&read(path)?).map_err(|e| bad(path, e))?;
            v.pem.es256.push(Key { kid: None, key });
        }
        let counters =
            jwks::Counters { ok: metrics.jwks_refreshed.clone(), failed: metrics.jwks_refresh_failed.clone() };
        if let Some(path) = &s.jwt_jwks_file {
            let every = Duration::from_millis(s.jwt_jwks_file_poll_ms);
            v.sources.push(jwks::FileSource::start(path, every, counters.clone(), tasks, stop)?);
        }
        if let Some(url) = &s.jwt_jwks_url {
            let min_refresh = Duration::from_secs(s.jwt_jwks_min_refresh_seconds);
            v.sources.push(jwks::UrlSource::start(url, min_refresh, v.clock.clone(), counters, tasks, stop).await?);
        }
        if v.hs256.is_none() && v.pem.is_empty() && v.sources.is_empty() {
            return Err(KeyError::NoKey);
        }
        Ok(v)
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Refused(format!("malformed token: {e}")))?;
        let kid = header.kid.as_deref();
        let kid = match self.check(token, header.alg, kid) {
            Ok(identity) => return Ok(identity),
            Err(Miss::Refused(e)) => return Err(e),
            Err(Miss::UnknownKid(kid)) => kid,
        };
        // The issuer may have rotated a new key in since we last looked.
        let mut refreshed = false;
        for source in &self.sources {
            refreshed |= source.refresh_for_unknown_kid().await;
        }
        if !refreshed {
            return Err(unknown_kid(&kid));
        }
        self.check(token, header.alg, header.kid.as_deref()).map_err(|miss| match miss {
            Miss::Refused(e) => e,
            Miss::UnknownKid(kid) => unknown_kid(&kid),
        })
    }

    /// Verifies with the keys held now.
    fn check(&self, token: &str, alg: Algorithm, kid: Option<&str>) -> Result<Identity, Miss> {
        let held: Vec<Arc<KeySet>> = self.sources.iter().map(jwks::Source::keys).collect();
        let keys: Vec<&Key> = self.pem.of(alg).iter().chain(held.iter().flat_map(|set| set.of(alg))).collect();
        let candidates: Vec<&DecodingKey> = match alg {
            Algorithm::HS256 => self.hs256.iter().collect(),
            Algorithm::RS256 | Algorithm::ES256 => select(&keys, kid)?,
            _ => Vec::new(),
        };
        if candidates.is_empty() {
            return Err(Miss::Refused(AuthError::Refused(format!("algorithm {alg:?} is not accepted"))));
        }
        let validation = self.validation(alg);
        let mut last = AuthError::Refused("no key matched".into());
        for key in candidates {
            match jsonwebtoken::decode::<Decoded>(token, key, &validation) {
                Ok(data) => {
                    return self
                        .in_time(&data.claims)
                        .and_then(|()| identity(data.claims.claims))
                        .map_err(Miss::Refused)
                }
                Err(e) => last = AuthError::Refused(e.to_string()),
            }
        }
        Err(Miss::Refused(last))
    }

    /// Whether the clock's second is within the token's lifetime, checked to
    /// the second without leeway as jsonwebtoken checks it against the
    /// system's clock: refused after its `exp` second or before its `nbf`.
    /// (Accepted within its `exp` second, a connection has no time left: 4002.)
    fn in_time(&self, t: &Decoded) -> Result<(), AuthError> {
        let now = self.clock.now_ms() / 1000;
        if t.claims.exp < now {
            return Err(AuthError::Refused("the token expired".into()));
        }
        match t.nbf {
            // As jsonwebtoken reads it: a date is never negative, and its fraction does not count.
            Some(nbf) if !nbf.is_finite() || nbf < 0.0 => {
                return Err(AuthError::Refused("`nbf` is not a date".into()));
            }
            Some(nbf) if nbf.trunc() > now as f64 => {
                return Err(AuthError::Refused("the token is not valid yet (`nbf`)".into()));
            }
            _ => {}
        }
        Ok(())
    }

    /// Time left before `identity`'s token expires, by the verifier's clock.
    pub fn remaining(&self, identity: &Identity) -> Duration {
        identity.remaining_at(self.clock.now_ms())
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = 0;
        // `exp` must be there; it and `nbf` are checked against our clock (`in_time`).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        validation
    }
}

fn unknown_kid(kid: &str) -> AuthError {
    AuthError::Refused(format!("no key has kid `{kid}`"))
}

/// The keys of one algorithm a token may be checked against. With several,
/// the token must name one by `kid`: trying each in turn would let any key of
/// the set vouch for a token meant for another. A lone key needs no `kid`; a
/// key without one (a PEM file) cannot be named, so it serves only as the lone
/// key of its algorithm, and then whatever `kid` the token carries.
fn select<'k>(keys: &[&'k Key], kid: Option<&str>) -> Result<Vec<&'k DecodingKey>, Miss> {
    match (keys, kid) {
        ([], None) => Ok(Vec::new()),
        ([only], None) => Ok(vec![&only.key]),
        ([only], Some(_)) if only.kid.is_none() => Ok(vec![&only.key]),
        (_, None) => {
            Err(Miss::Refused(AuthError::Refused("the token has no `kid`, and several keys could verify it".into())))
        }
        (keys, Some(kid)) => {
            let named: Vec<_> = keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).map(|k| &k.key).collect();
            if named.is_empty() {
                return Err(Miss::UnknownKid(kid.to_owned()));
            }
            Ok(named)
        }
    }
}

fn identity(c: Claims) -> Result<Identity, AuthError> {
    for (name, v) in [("sub", &c.sub), ("tenant_guid", &c.tenant_guid), ("ir_instance", &c.ir_instance)] {
        if v.is_empty() {
            return Err(AuthError::Refused(format!("claim `{name}` is empty")));
        }
    }
    Ok(Identity {
        tenant_guid: c.tenant_guid,
        agent_guid: c.sub,
        ir_instance: c.ir_instance,
        contact_id: c.contact_id,
        exp: c.exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, SystemClock};
    use jsonwebtoken::{EncodingKey, Header};

    async fn verifier() -> Verifier {
        verifier_on(Arc::new(SystemClock)).await
    }

    async fn verifier_on(clock: Arc<dyn Clock>) -> Verifier {
        let s = Settings { jwt_hs256_secret: Some("secret".into()), ..Settings::default() };
        Verifier::start(&s, clock, &Metrics::new([]), &TaskTracker::new(), &CancellationToken::new())
            .await
            .expect("keys")
    }

    async fn start(s: &Settings) -> Result<Verifier, KeyError> {
        Verifier::start(s, Arc::new(SystemClock), &Metrics::new([]), &TaskTracker::new(), &CancellationToken::new())
            .await
    }

    /// An HS256 token (secret `secret`) with these time claims, seconds since the epoch.
    fn timed(exp: u64, nbf: Option<u64>) -> String {
        let mut claims = serde_json::json!({"sub": "a", "tenant_guid": "t", "ir_instance": "ir", "exp": exp});
        if let Some(nbf) = nbf {
            claims["nbf"] = nbf.into();
        }
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"secret"))
            .expect("sign")
    }

    /// The tokens here expire in 1970: only the injected clock finds them valid.
    #[tokio::test]
    async fn a_token_is_valid_through_its_exp_second_by_the_injected_clock_and_refused_after() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let v = verifier_on(clock.clone()).await;
        let token = timed(1_060, None);
        let id = v.verify(&token).await.expect("valid at 1000 s");
        assert_eq!(id.exp, 1_060);
        clock.set(1_060_999);
        v.verify(&token).await.expect("valid through its exp second");
        clock.set(1_061_000);
        let Err(AuthError::Refused(why)) = v.verify(&token).await else { panic!("valid past its exp") };
        assert!(why.contains("expired"), "{why}");
    }

    #[tokio::test]
    async fn a_token_is_refused_before_its_nbf_by_the_injected_clock() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let v = verifier_on(clock.clone()).await;
        let token = timed(2_000, Some(1_010));
        clock.set(1_009_999);
        let Err(AuthError::Refused(why)) = v.verify(&token).await else { panic!("valid before its nbf") };
        assert!(why.contains("nbf"), "{why}");
        clock.advance(Duration::from_millis(1));
        v.verify(&token).await.expect("valid from its nbf");
    }

    #[tokio::test]
    async fn an_nbf_counts_in_whole_seconds_and_a_negative_one_is_no_date() {
        let v = verifier_on(Arc::new(ManualClock::new(1_010_000))).await;
        let with_nbf = |nbf: serde_json::Value| {
            let claims =
                serde_json::json!({"sub": "a", "tenant_guid": "t", "ir_instance": "ir", "exp": 2_000, "nbf": nbf});
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"secret"))
                .expect("sign")
        };
        v.verify(&with_nbf(serde_json::json!(1_010.4))).await.expect("its fraction does not count");
        assert!(v.verify(&with_nbf(serde_json::json!(1_011.0))).await.is_err(), "a second ahead");
        let Err(AuthError::Refused(why)) = v.verify(&with_nbf(serde_json::json!(-1))).await else {
            panic!("a negative nbf accepted")
        };
        assert!(why.contains("nbf"), "{why}");
    }

    #[tokio::test]
    async fn the_remaining_lifetime_shrinks_as_the_clock_moves_and_stops_at_zero() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let v = verifier_on(clock.clone()).await;
        let id = v.verify(&timed(1_060, None)).await.expect("valid");
        assert_eq!(v.remaining(&id), Duration::from_secs(60));
        clock.advance(Duration::from_millis(59_750));
        assert_eq!(v.remaining(&id), Duration::from_millis(250));
        clock.advance(Duration::from_secs(1));
        assert_eq!(v.remaining(&id), Duration::ZERO);
        let forever = Identity { exp: u64::MAX, ..id };
        assert!(v.remaining(&forever) > Duration::from_secs(1 << 60), "no overflow");
    }

    #[tokio::test]
    async fn a_token_the_system_clock_finds_expired_is_valid_by_a_clock_that_says_otherwise() {
        // Its exp lies before the system's now: jsonwebtoken's own check would refuse it.
        let past = crate::clock::now_ms() / 1000 - 3600;
        let v = verifier_on(Arc::new(ManualClock::new((past - 60) * 1000))).await;
        v.verify(&timed(past, None)).await.expect("the injected clock decides");
        assert!(verifier().await.verify(&timed(past, None)).await.is_err(), "the system clock refuses it");
    }

    fn req(ttl: u64) -> TokenRequest<'static> {
        TokenRequest {
            tenant_guid: "t",
            agent_guid: "a",
            ir_instance: "ir",
            contact_id: Some("1001"),
            ttl: Duration::from_secs(ttl),
        }
    }

    #[tokio::test]
    async fn minted_tokens_verify() {
        let token = mint_hs256("secret", &req(60)).expect("mint");
        let id = verifier().await.verify(&token).await.expect("valid");
        assert_eq!(
            (id.tenant_guid.as_str(), id.agent_guid.as_str(), id.contact_id.as_deref()),
            ("t", "a", Some("1001"))
        );
        let v = verifier().await;
        assert!(v.remaining(&id) > Duration::from_secs(50));
    }

    #[tokio::test]
    async fn refuses_wrong_secret_none_and_garbage() {
        let v = verifier().await;
        assert!(v.verify(&mint_hs256("other", &req(60)).expect("mint")).await.is_err());
        assert!(v.verify("a.b.c").await.is_err());
        // {"alg":"none","typ":"JWT"} . {"sub":"a","tenant_guid":"t","ir_instance":"ir","exp":9999999999} .
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwidGVuYW50X2d1aWQiOiJ0IiwiaXJfaW5zdGFuY2UiOiJpciIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(v.verify(none).await.is_err());
    }

    #[tokio::test]
    async fn no_key_is_a_start_up_error() {
        assert!(matches!(start(&Settings::default()).await, Err(KeyError::NoKey)));
    }

    #[test]
    fn kid_must_name_one_of_several_keys() {
        let key = |kid: Option<&str>| Key { kid: kid.map(str::to_owned), key: DecodingKey::from_secret(b"k") };
        let picked = |keys: &[Key], kid| {
            let keys: Vec<&Key> = keys.iter().collect();
            match select(&keys, kid) {
                Ok(found) => Ok(found.len()),
                Err(Miss::Refused(_)) => Err("refused"),
                Err(Miss::UnknownKid(_)) => Err("unknown kid"),
            }
        };
        let several = [key(Some("a")), key(Some("b"))];
        assert_eq!(picked(&several, None), Err("refused"), "no kid among several keys");
        assert_eq!(picked(&several, Some("b")), Ok(1));
        assert_eq!(picked(&several, Some("c")), Err("unknown kid"));
        let one = [key(Some("a"))];
        assert_eq!(picked(&one, None), Ok(1), "a lone key needs no kid");
        assert_eq!(picked(&one, Some("b")), Err("unknown kid"), "a wrong kid is refused");
        let pem = [key(None)];
        assert_eq!(picked(&pem, Some("any")), Ok(1), "a key without kid cannot be named");
        let mixed = [key(None), key(Some("a"))];
        assert_eq!(picked(&mixed, None), Err("refused"));
        assert_eq!(picked(&[], None), Ok(0), "no key of the algorithm: not accepted");
        assert_eq!(picked(&[], Some("a")), Err("unknown kid"), "a refresh may bring the algorithm's first key");
    }
}
