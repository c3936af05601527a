//! Long-lived session keys: `<session id>.<secret>`, the secret 256 random
//! bits. Only SHA-256 of the secret is stored; the id part finds the session,
//! the hash is compared in constant time (`Session::key_matches`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKey {
    pub session_id: String,
    pub hash: [u8; 32],
}

impl SessionKey {
    /// A new key for `session_id`: the text for the client and its parsed form.
    pub fn generate(session_id: &str) -> (String, SessionKey) {
        let secret: [u8; 32] = rand::random();
        let text = format!("{session_id}.{}", URL_SAFE_NO_PAD.encode(secret));
        (text, SessionKey { session_id: session_id.to_owned(), hash: Sha256::digest(secret).into() })
    }

    /// Reads a key a client presents; `None` when it cannot be one of ours.
    pub fn parse(text: &str) -> Option<SessionKey> {
        let (id, secret) = text.rsplit_once('.')?;
        let secret = URL_SAFE_NO_PAD.decode(secret).ok()?;
        if id.is_empty() || secret.len() != 32 {
            return None;
        }
        Some(SessionKey { session_id: id.to_owned(), hash: Sha256::digest(&secret).into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_generated_key_parses_back_and_differs_every_time() {
        let (text, key) = SessionKey::generate("s-1");
        assert_eq!(SessionKey::parse(&text), Some(key.clone()));
        let (other, _) = SessionKey::generate("s-1");
        assert_ne!(text, other);
        let tampered = format!("s-2{}", &text[3..]);
        assert_eq!(
            SessionKey::parse(&tampered).map(|k| k.hash),
            Some(key.hash),
            "the id part does not change the hash"
        );
        assert_eq!(SessionKey::parse("s-1.short"), None);
    }

    proptest! {
        #[test]
        fn parsing_any_text_never_panics(text in ".{0,200}") {
            let _ = SessionKey::parse(&text);
        }
    }
}
