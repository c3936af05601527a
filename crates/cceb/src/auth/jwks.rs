//! Key sets that change while the bridge runs. A JWKS file is re-read when it
//! changes (polled, and at once for a token naming an unknown `kid`). A set
//! that cannot be read or parsed leaves the keys already held in place.

use super::{Key, KeyError, KeySet};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::DecodingKey;
use metrics::Counter;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a JWKS: {0}")]
    Json(#[from] serde_json::Error),
    #[error("key `{kid}`: {problem}")]
    Key { kid: String, problem: jsonwebtoken::errors::Error },
    #[error("no RSA or EC signing key in the set")]
    NoKey,
}

/// `cceb_jwks_refreshes_total{outcome}`: key sets installed, and refreshes that failed.
#[derive(Clone)]
pub(super) struct Counters {
    pub ok: Counter,
    pub failed: Counter,
}

/// A key set that may change while the bridge runs.
pub(super) enum Source {
    File(Arc<FileSource>),
}

impl Source {
    /// The keys held now.
    pub(super) fn keys(&self) -> Arc<KeySet> {
        match self {
            Source::File(f) => f.keys.get(),
        }
    }

    /// Looks for new keys because a token named a `kid` not held; true when
    /// it looked (the caller then checks again).
    pub(super) async fn refresh_for_unknown_kid(&self) -> bool {
        match self {
            Source::File(f) => f.reload().await,
        }
    }
}

/// A source's current keys, replaced whole, so a verification sees one set.
struct Held(RwLock<Arc<KeySet>>);

impl Held {
    fn new(keys: KeySet) -> Self {
        Held(RwLock::new(Arc::new(keys)))
    }

    fn get(&self) -> Arc<KeySet> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, keys: KeySet) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }
}

/// The signing keys of a JWKS document. Identity providers publish encryption
/// keys and other key types beside them: those are skipped, but a set without
/// any usable key, or with an RSA or EC key that does not decode, is refused.
pub(super) fn parse(bytes: &[u8]) -> Result<KeySet, JwksError> {
    let set: JwkSet = serde_json::from_slice(bytes)?;
    let mut keys = KeySet::default();
    for jwk in &set.keys {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let family = match jwk.algorithm {
            AlgorithmParameters::RSA(_) => &mut keys.rs256,
            AlgorithmParameters::EllipticCurve(_) => &mut keys.es256,
            _ => continue,
        };
        let kid = jwk.common.key_id.clone();
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|problem| JwksError::Key { kid: kid.clone().unwrap_or_default(), problem })?;
        family.push(Key { kid, key });
    }
    if keys.is_empty() {
        return Err(JwksError::NoKey);
    }
    Ok(keys)
}

/// A version of a file, told apart without reading it (a rename changes the inode).
type Stamp = (u64, Option<SystemTime>, u64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (m.len(), m.modified().ok(), m.ino())
}

pub(super) struct FileSource {
    path: PathBuf,
    keys: Held,
    /// The version last read, usable or not: each version is parsed, and a
    /// bad one reported, once.
    seen: tokio::sync::Mutex<Option<Stamp>>,
    counters: Counters,
}

impl FileSource {
    /// Reads the file (it must hold a usable set) and polls it every `every` until `stop`.
    pub(super) fn start(
        path: &Path,
        every: Duration,
        counters: Counters,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Source, KeyError> {
        let read = || -> Result<(Stamp, KeySet), JwksError> {
            let version = stamp(&std::fs::metadata(path)?);
            Ok((version, parse(&std::fs::read(path)?)?))
        };
        let (version, keys) =
            read().map_err(|problem| KeyError::Jwks { origin: path.display().to_string(), problem })?;
        let source = Arc::new(FileSource {
            path: path.to_owned(),
            keys: Held::new(keys),
            seen: tokio::sync::Mutex::new(Some(version)),
            counters,
        });
        let (poller, stop) = (source.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate, and the file was just read.
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        poller.reload().await;
                    }
                }
            }
        });
        Ok(Source::File(source))
    }

    /// Reads the file again if it changed; true when new keys were installed.
    async fn reload(&self) -> bool {
        let mut seen = self.seen.lock().await;
        let version = match tokio::fs::metadata(&self.path).await {
            Ok(m) => stamp(&m),
            Err(e) => {
                // Reported once per disappearance, not at every poll.
                if seen.take().is_some() {
                    self.failed(&e.into());
                }
                return false;
            }
        };
        if *seen == Some(version) {
            return false;
        }
        *seen = Some(version);
        let read = tokio::fs::read(&self.path).await.map_err(JwksError::from).and_then(|bytes| parse(&bytes));
        match read {
            Ok(keys) => {
                self.keys.set(keys);
                self.counters.ok.increment(1);
                tracing::info!(file = %self.path.display(), "JWKS file re-read");
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    fn failed(&self, e: &JwksError) {
        self.counters.failed.increment(1);
        tracing::warn!(file = %self.path.display(), error = %e, "JWKS file unusable; keeping the keys held");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/it/fixtures/jwks.json")).expect("fixture")
    }

    #[test]
    fn parse_sorts_keys_by_algorithm_and_skips_what_does_not_sign() {
        let mut set = fixture();
        let keys = set["keys"].as_array_mut().expect("keys");
        let mut enc = keys[0].clone();
        enc["use"] = json!("enc");
        keys.push(enc);
        keys.push(
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
        );
        let parsed = parse(set.to_string().as_bytes()).expect("usable");
        let kids = |keys: &[Key]| keys.iter().map(|k| k.kid.clone().unwrap_or_default()).collect::<Vec<_>>();
        assert_eq!((kids(&parsed.rs256), kids(&parsed.es256)), (vec!["rsa-1".to_owned()], vec!["ec-1".to_owned()]));
    }

    #[test]
    fn parse_refuses_sets_without_a_usable_key_and_broken_keys() {
        assert!(matches!(parse(b"{\"keys\": []}"), Err(JwksError::NoKey)));
        assert!(matches!(parse(b"{\"keys\": "), Err(JwksError::Json(_))));
        let mut set = fixture();
        set["keys"][1]["x"] = json!("not-a-point");
        assert!(matches!(parse(set.to_string().as_bytes()), Err(JwksError::Key { .. })));
    }
}
