//! CCEB client tokens (contract section 3): the claims a token carries and
//! HS256 minting, for `cceb token`, `cceb serve --dev`, the tests and the
//! benchmark. Verification stays in the bridge (`cceb::auth`), which decodes
//! the same [`Claims`]. No IO: this crate depends on jsonwebtoken (pure-Rust
//! crypto) and serde only, so a client of the bridge need not link the bridge.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use jsonwebtoken::errors::Error as MintError;

/// The claims of a client token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The agent GUID.
    pub sub: String,
    pub tenant_guid: String,
    pub ir_instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// What `cceb token` (and the tests and benchmark) put in a client token.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub tenant_guid: &'a str,
    pub agent_guid: &'a str,
    pub ir_instance: &'a str,
    pub contact_id: Option<&'a str>,
    pub ttl: Duration,
}

impl TokenRequest<'_> {
    /// The claims of a token minted now.
    pub fn claims(&self) -> Claims {
        Claims {
            sub: self.agent_guid.to_owned(),
            tenant_guid: self.tenant_guid.to_owned(),
            ir_instance: self.ir_instance.to_owned(),
            contact_id: self.contact_id.map(str::to_owned),
            exp: (now_since_epoch() + self.ttl).as_secs(),
        }
    }
}

/// Mints an HS256 client token.
pub fn mint_hs256(secret: &str, req: &TokenRequest<'_>) -> Result<String, MintError> {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &req.claims(), &EncodingKey::from_secret(secret.as_bytes()))
}

/// Time since the Unix epoch (zero if the clock is before it).
pub fn now_since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn a_minted_token_carries_the_request_and_expires_after_its_ttl() {
        let req = TokenRequest {
            tenant_guid: "t",
            agent_guid: "a",
            ir_instance: "ir",
            contact_id: None,
            ttl: Duration::from_secs(60),
        };
        let token = mint_hs256("secret", &req).expect("mint");
        let decoded = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(b"secret"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid");
        assert_eq!(decoded.header.alg, Algorithm::HS256);
        let c = decoded.claims;
        assert_eq!((c.sub.as_str(), c.tenant_guid.as_str(), c.ir_instance.as_str()), ("a", "t", "ir"));
        assert_eq!(c.contact_id, None);
        let left = c.exp.saturating_sub(now_since_epoch().as_secs());
        assert!((59..=60).contains(&left), "{left}");
    }
}
