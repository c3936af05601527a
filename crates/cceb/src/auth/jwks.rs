//! Key sets that change while the bridge runs. A JWKS file is re-read when it
//! changes (polled, and at once for a token naming an unknown `kid`). A JWKS
//! URL is fetched at start, again for an unknown `kid` (at most once per
//! `min_refresh`), and when the answer's cache lifetime ends. A set that
//! cannot be read, fetched or parsed leaves the keys already held in place.

use super::{Key, KeyError, KeySet};
use crate::clock::Clock;
use crate::sync::{lock, read, write};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, PublicKeyUse};
use jsonwebtoken::DecodingKey;
use metrics::Counter;
use reqwest::header::{HeaderMap, CACHE_CONTROL};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest wait for the identity provider's answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document taken from a URL.
const MAX_BYTES: usize = 1024 * 1024;
/// Lifetime of fetched keys when the answer has no `Cache-Control: max-age`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Longest lifetime, whatever the answer says: a key the provider withdrew is
/// forgotten within it.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Shortest interval between scheduled fetches, even with `min_refresh` 0.
const MIN_LIFETIME: Duration = Duration::from_secs(1);

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
    #[error("cannot fetch: {0}")]
    Fetch(#[from] reqwest::Error),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("larger than {MAX_BYTES} bytes")]
    TooLarge,
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
    Url(Arc<UrlSource>),
}

impl Source {
    /// The keys held now.
    pub(super) fn keys(&self) -> Arc<KeySet> {
        match self {
            Source::File(f) => f.keys.get(),
            Source::Url(u) => u.keys.get(),
        }
    }

    /// Looks for new keys because a token named a `kid` not held; true when
    /// it looked (the caller then checks again).
    pub(super) async fn refresh_for_unknown_kid(&self) -> bool {
        match self {
            Source::File(f) => f.reload().await,
            Source::Url(u) => u.refresh(true).await,
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
        read(&self.0).clone()
    }

    fn set(&self, keys: KeySet) {
        *write(&self.0) = Arc::new(keys);
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

pub(super) struct UrlSource {
    url: String,
    http: reqwest::Client,
    keys: Held,
    min_refresh: Duration,
    /// Decides `min_refresh` (not the scheduled fetches, which run on tokio's clock).
    clock: Arc<dyn Clock>,
    fetching: Mutex<Fetching>,
    /// Bumped when a fetch ends: the callers waiting for it watch this.
    ended: watch::Sender<u64>,
    counters: Counters,
    tasks: TaskTracker,
    stop: CancellationToken,
}

struct Fetching {
    /// A fetch is under way: callers wait for it rather than start another.
    running: bool,
    /// When the last fetch started, by the injected clock (milliseconds since
    /// the Unix epoch): an unknown `kid` starts one only `min_refresh` later,
    /// so tokens with made-up kids cannot make us hammer the provider.
    started_ms: u64,
    /// When the keys held are due for a scheduled fetch.
    due: Instant,
}

impl UrlSource {
    /// Fetches the keys (a bridge that cannot get any must not start) and
    /// refreshes them on their cache lifetime until `stop`.
    pub(super) async fn start(
        url: &str,
        min_refresh: Duration,
        clock: Arc<dyn Clock>,
        counters: Counters,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Source, KeyError> {
        let error = |problem| KeyError::Jwks { origin: url.to_owned(), problem };
        let http = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().map_err(|e| error(e.into()))?;
        let (started, started_ms) = (Instant::now(), clock.now_ms());
        let (keys, max_age) = fetch(&http, url).await.map_err(error)?;
        let source = Arc::new(UrlSource {
            url: url.to_owned(),
            http,
            keys: Held::new(keys),
            min_refresh,
            fetching: Mutex::new(Fetching {
                running: false,
                started_ms,
                due: started + lifetime(max_age, min_refresh),
            }),
            clock,
            ended: watch::channel(0).0,
            counters,
            tasks: tasks.clone(),
            stop: stop.clone(),
        });
        tasks.spawn(source.clone().schedule());
        Ok(Source::Url(source))
    }

    fn fetching(&self) -> MutexGuard<'_, Fetching> {
        lock(&self.fetching)
    }

    /// Fetches whenever the keys held are due, until `stop`.
    async fn schedule(self: Arc<Self>) {
        loop {
            let due = self.fetching().due;
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep_until(due.into()) => {}
            }
            // A fetch for an unknown kid may have moved the date meanwhile.
            if self.fetching().due <= Instant::now() {
                self.refresh(false).await;
            }
        }
    }

    /// Starts a fetch unless one is under way, and waits for it to end; true
    /// then. `limited` (an unknown kid): starts none within `min_refresh` of
    /// the last one, and returns false.
    async fn refresh(self: &Arc<Self>, limited: bool) -> bool {
        // Subscribed first, so the end of a fetch started after this is seen.
        let mut ended = self.ended.subscribe();
        {
            let mut fetching = self.fetching();
            if !fetching.running {
                let now = self.clock.now_ms();
                // A clock stepped back (below the last start) allows a fetch rather than none for that long.
                let since = now.checked_sub(fetching.started_ms);
                if limited && since.is_some_and(|ms| Duration::from_millis(ms) < self.min_refresh) {
                    return false;
                }
                fetching.running = true;
                fetching.started_ms = now;
                // Its own task, not this caller's: a hello that goes away must
                // not abandon the fetch others wait for. No lock is held across it.
                self.tasks.spawn(self.clone().fetch_and_install());
            }
        }
        ended.changed().await.is_ok()
    }

    async fn fetch_and_install(self: Arc<Self>) {
        let fetched = tokio::select! {
            _ = self.stop.cancelled() => None,
            fetched = fetch(&self.http, &self.url) => Some(fetched),
        };
        let due = match fetched {
            Some(Ok((keys, max_age))) => {
                self.keys.set(keys);
                self.counters.ok.increment(1);
                tracing::debug!(url = %self.url, "JWKS fetched");
                Some(Instant::now() + lifetime(max_age, self.min_refresh))
            }
            Some(Err(e)) => {
                self.counters.failed.increment(1);
                tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed; keeping the keys held");
                Some(Instant::now() + self.min_refresh.max(MIN_LIFETIME))
            }
            None => None,
        };
        {
            let mut fetching = self.fetching();
            fetching.running = false;
            if let Some(due) = due {
                fetching.due = due;
            }
        }
        self.ended.send_modify(|n| *n = n.wrapping_add(1));
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> Result<(KeySet, Option<Duration>), JwksError> {
    let mut answer = http.get(url).send().await?;
    let status = answer.status();
    if !status.is_success() {
        return Err(JwksError::Status(status.as_u16()));
    }
    let max_age = max_age(answer.headers());
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        if body.len() + chunk.len() > MAX_BYTES {
            return Err(JwksError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((parse(&body)?, max_age))
}

/// `Cache-Control: max-age`: how long the provider says its keys stay good.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|directive| {
            let (name, value) = directive.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("max-age") {
                return None;
            }
            value.trim().trim_matches('"').parse().ok()
        })
        .map(Duration::from_secs)
}

/// When fetched keys are due again: the provider's lifetime, at most
/// `MAX_LIFETIME`, and never sooner than `min_refresh` (nor than a second).
fn lifetime(max_age: Option<Duration>, min_refresh: Duration) -> Duration {
    max_age.unwrap_or(DEFAULT_LIFETIME).min(MAX_LIFETIME).max(min_refresh).max(MIN_LIFETIME)
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
    fn max_age_is_read_from_cache_control() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(CACHE_CONTROL, v.parse().expect("header"));
            }
            h
        };
        assert_eq!(max_age(&headers(&["public, max-age=600"])), Some(Duration::from_secs(600)));
        assert_eq!(max_age(&headers(&["no-transform", "Max-Age = \"60\""])), Some(Duration::from_secs(60)));
        assert_eq!(max_age(&headers(&["no-cache"])), None);
        assert_eq!(max_age(&headers(&["max-age=soon"])), None);
    }

    #[test]
    fn lifetime_is_bounded() {
        let secs = Duration::from_secs;
        assert_eq!(lifetime(None, secs(30)), DEFAULT_LIFETIME);
        assert_eq!(lifetime(Some(secs(600)), secs(30)), secs(600));
        assert_eq!(lifetime(Some(secs(86_400)), secs(30)), MAX_LIFETIME);
        assert_eq!(lifetime(Some(secs(0)), secs(30)), secs(30), "never sooner than min_refresh");
        assert_eq!(lifetime(Some(secs(0)), secs(0)), MIN_LIFETIME);
        assert_eq!(lifetime(Some(secs(60)), secs(7200)), secs(7200), "min_refresh wins over the ceiling");
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
