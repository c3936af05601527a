//! Settings: defaults < TOML file (`--config`) < `CCEB_*` environment, read once
//! into typed values. The names are those of contract section 9 plus the
//! bridge's own; README.md has the table.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings whose environment value is taken verbatim, never parsed.
const TEXT_SETTINGS: [&str; 24] = [
    "public_url",
    "node_id",
    "jwt_hs256_secret",
    "jwt_rs256_public_key_file",
    "jwt_es256_public_key_file",
    "jwt_jwks_file",
    "jwt_jwks_url",
    "jwt_issuer",
    "jwt_audience",
    "admin_token",
    "data_dir",
    "redis_url",
    "redis_prefix",
    "schema_dir",
    "source_name",
    "push_webhook_url",
    "push_webhook_token",
    "kafka_brokers",
    "kafka_action_topic",
    "kafka_provisioning_topic",
    "kafka_group_id",
    "kafka_dead_letter_topic",
    "schema_registry_url",
    "log",
];

/// Shortest HS256 secret accepted: 256 bits, the size of the HMAC-SHA-256 output.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Why `bus = "kafka"` is refused by a build without the `kafka` feature.
pub const NO_KAFKA: &str = "this build has no Kafka support (cargo feature `kafka`)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// In this process; backends use the backend port.
    Embedded,
    /// Only in a build with the cargo feature `kafka` (the default); refused otherwise.
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process, journaled to SQLite under `data_dir`: one node.
    Embedded,
    /// Redis (`redis_url`): state shared by every node of a cluster.
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// `/ws/v1`, discovery, health and metrics.
    pub listen: SocketAddr,
    /// Base URL discovery hands out; `ws://<listen>` when unset.
    pub public_url: Option<String>,
    /// This node's id in discovery answers.
    pub node_id: String,
    /// The embedded bus's backend port (contract section 8).
    pub backend_listen: SocketAddr,
    pub bus: BusKind,
    /// `bootstrap.servers`.
    pub kafka_brokers: String,
    /// Topic of actions that `kafka_action_topics` does not route.
    pub kafka_action_topic: String,
    /// Record name → topic.
    pub kafka_action_topics: HashMap<String, String>,
    pub kafka_event_topics: Vec<String>,
    /// Read from the beginning at start (tenant directory); empty: none.
    pub kafka_provisioning_topic: String,
    pub kafka_group_id: String,
    /// Where undecodable records are copied; empty: nowhere.
    pub kafka_dead_letter_topic: String,
    pub kafka_publish_timeout_ms: u64,
    /// Extra librdkafka properties (security.protocol, sasl.*, ssl.*…).
    pub kafka_properties: HashMap<String, String>,
    /// Confluent-compatible schema registry for Kafka records; single-object encoding when unset.
    pub schema_registry_url: Option<String>,
    pub jwt_hs256_secret: Option<String>,
    /// PEM file with an RSA public key for RS256 tokens.
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// PEM file with an EC P-256 public key for ES256 tokens.
    pub jwt_es256_public_key_file: Option<PathBuf>,
    /// JWKS file with RS256 and/or ES256 public keys.
    pub jwt_jwks_file: Option<PathBuf>,
    /// How often the JWKS file is checked for changes (also checked for a token naming an unknown `kid`).
    pub jwt_jwks_file_poll_ms: u64,
    /// An identity provider's JWKS (http:// or https://), fetched at start and refreshed.
    pub jwt_jwks_url: Option<String>,
    /// Fewest seconds between two fetches of the JWKS URL, for unknown `kid`s or on the cache lifetime.
    pub jwt_jwks_min_refresh_seconds: u64,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub admin_token: Option<String>,
    pub store: StoreKind,
    /// Where the embedded store keeps its SQLite database.
    pub data_dir: PathBuf,
    /// `redis://` or `rediss://` URL of one Redis, or a comma-separated list
    /// of seed nodes of a Redis Cluster.
    pub redis_url: String,
    /// Prefix of every key and channel: bridges of separate clusters may share one Redis.
    pub redis_prefix: String,
    /// Longest wait for one Redis reply or connection attempt.
    pub redis_timeout_ms: u64,
    /// How often a node renews its membership (cluster on Redis).
    pub node_heartbeat_ms: u64,
    /// How long a node stays a member without renewing: a dead node stops
    /// being offered by discovery after this.
    pub node_ttl_ms: u64,
    /// Directory of `.avsc` files and `mapping.toml`; the built-in set when unset.
    pub schema_dir: Option<PathBuf>,
    pub hello_timeout_ms: u64,
    pub ack_timeout_ms: u64,
    pub session_ttl_seconds: u64,
    pub off_hook_offer_timeout_seconds: u64,
    pub heartbeat_interval_ms: u64,
    /// Largest client frame; larger closes with 1009.
    pub max_frame_bytes: usize,
    pub max_unacked: usize,
    /// Most notifications one long-lived session keeps; past it the oldest is dropped.
    pub mailbox_capacity: usize,
    /// Most sessions of one agent; past it the least recently connected
    /// disconnected one is ended, or the `hello` refused.
    pub max_sessions_per_agent: usize,
    /// How often expired sessions are looked for.
    pub sweep_interval_ms: u64,
    /// Where push announcements are POSTed; no announcements when unset.
    pub push_webhook_url: Option<String>,
    /// Bearer token sent with each announcement.
    pub push_webhook_token: Option<String>,
    /// Attempts per announcement, the first included.
    pub push_webhook_attempts: u32,
    /// Wait before the first retry; doubles each time.
    pub push_webhook_backoff_ms: u64,
    pub dedup_window_seconds: u64,
    /// Most action uuids remembered for deduplication, all tenants together;
    /// past it the tenant holding the most forgets its oldest.
    pub dedup_capacity: usize,
    /// Most action uuids remembered for one tenant; past it its oldest go first.
    pub dedup_capacity_per_tenant: usize,
    /// Actions a connection may have waiting behind the one in flight; more is `rate_limited`.
    pub max_pending_actions: usize,
    /// Sustained actions per second one connection may send; more is `rate_limited`.
    pub action_rate_per_second: f64,
    /// Actions one connection may send at once before the rate applies.
    pub action_burst: u32,
    /// `source` of the records the bridge builds.
    pub source_name: String,
    /// Published actions the embedded bus keeps for `GET /backend/v1/actions`.
    pub embedded_log_capacity: usize,
    /// Bytes those records may take; past it the oldest go (never the newest).
    pub embedded_log_bytes: usize,
    /// Largest backend-port request body.
    pub backend_max_body_bytes: usize,
    /// Largest serialised `data` of one notification; a larger event is refused.
    pub max_notification_bytes: usize,
    /// How long a write to a client may block before the connection is closed.
    pub write_timeout_ms: u64,
    /// Longest wait for a complete HTTP request head on either listener, also
    /// between two requests of a kept-alive connection; then it is closed.
    pub header_read_timeout_ms: u64,
    /// Most connections the public listener holds at once, WebSocket sessions
    /// included; past it new ones are closed unserved.
    pub max_connections: usize,
    /// Most connections the backend port holds at once.
    pub backend_max_connections: usize,
    /// How long shutdown waits for connections to close.
    pub shutdown_grace_ms: u64,
    pub log_format: LogFormat,
    /// `tracing` filter, e.g. `info,cceb=debug`.
    pub log: String,
    /// Set by `serve --dev` alone, never by a file or the environment: the
    /// console may then mint client tokens (`/console/dev/token`).
    #[serde(skip)]
    pub dev: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            node_id: "node-1".into(),
            backend_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            bus: BusKind::Embedded,
            kafka_brokers: "127.0.0.1:9092".into(),
            kafka_action_topic: "cceb.actions".into(),
            kafka_action_topics: HashMap::new(),
            kafka_event_topics: vec!["cceb.events".into(), "cceb.provisioning".into()],
            kafka_provisioning_topic: "cceb.provisioning".into(),
            kafka_group_id: "cceb".into(),
            kafka_dead_letter_topic: String::new(),
            kafka_publish_timeout_ms: 5000,
            kafka_properties: HashMap::new(),
            schema_registry_url: None,
            jwt_hs256_secret: None,
            jwt_rs256_public_key_file: None,
            jwt_es256_public_key_file: None,
            jwt_jwks_file: None,
            jwt_jwks_file_poll_ms: 5000,
            jwt_jwks_url: None,
            jwt_jwks_min_refresh_seconds: 30,
            jwt_issuer: None,
            jwt_audience: None,
            admin_token: None,
            store: StoreKind::Embedded,
            data_dir: PathBuf::from("./cceb-data"),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "cceb".into(),
            redis_timeout_ms: 2000,
            node_heartbeat_ms: 1000,
            node_ttl_ms: 5000,
            schema_dir: None,
            hello_timeout_ms: 10_000,
            ack_timeout_ms: 10_000,
            session_ttl_seconds: 259_200,
            off_hook_offer_timeout_seconds: 30,
            heartbeat_interval_ms: 25_000,
            max_frame_bytes: 64 * 1024,
            max_unacked: 1000,
            mailbox_capacity: 1000,
            max_sessions_per_agent: 16,
            sweep_interval_ms: 1000,
            push_webhook_url: None,
            push_webhook_token: None,
            push_webhook_attempts: 5,
            push_webhook_backoff_ms: 500,
            dedup_window_seconds: 600,
            dedup_capacity: 1_000_000,
            dedup_capacity_per_tenant: 100_000,
            max_pending_actions: 64,
            action_rate_per_second: 50.0,
            action_burst: 100,
            source_name: "CCEB".into(),
            embedded_log_capacity: 100_000,
            embedded_log_bytes: 64 * 1024 * 1024,
            backend_max_body_bytes: 16 * 1024 * 1024,
            max_notification_bytes: 1024 * 1024,
            write_timeout_ms: 30_000,
            header_read_timeout_ms: 10_000,
            // The documented density is 50,000 idle sessions per node (~9 KiB
            // each); the rest is headroom for takeovers and plain HTTP.
            max_connections: 60_000,
            backend_max_connections: 256,
            shutdown_grace_ms: 5_000,
            log_format: LogFormat::Text,
            log: "info".into(),
            dev: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("settings: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("settings: {0}")]
    Invalid(String),
}

impl Settings {
    /// Defaults, then the TOML file if given, then `CCEB_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            fig = fig.merge(Toml::file_exact(file));
        }
        // figment parses environment values ("007" → 7, "true" → bool); text
        // settings such as secrets must reach us exactly as written.
        fig = fig.merge(Env::prefixed("CCEB_").ignore(&TEXT_SETTINGS));
        for key in TEXT_SETTINGS {
            if let Ok(v) = std::env::var(format!("CCEB_{}", key.to_uppercase())) {
                fig = fig.merge(Serialized::default(key, v));
            }
        }
        let mut settings: Settings = fig.extract().map_err(Box::new)?;
        // An empty admin token would be a token anyone can guess: it means "no token".
        if settings.admin_token.as_deref() == Some("") {
            settings.admin_token = None;
        }
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("hello_timeout_ms", self.hello_timeout_ms),
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("max_frame_bytes", self.max_frame_bytes as u64),
            ("max_unacked", self.max_unacked as u64),
            ("mailbox_capacity", self.mailbox_capacity as u64),
            ("max_sessions_per_agent", self.max_sessions_per_agent as u64),
            ("sweep_interval_ms", self.sweep_interval_ms),
            ("session_ttl_seconds", self.session_ttl_seconds),
            ("embedded_log_capacity", self.embedded_log_capacity as u64),
            ("embedded_log_bytes", self.embedded_log_bytes as u64),
            ("write_timeout_ms", self.write_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("backend_max_connections", self.backend_max_connections as u64),
            ("max_notification_bytes", self.max_notification_bytes as u64),
            ("kafka_publish_timeout_ms", self.kafka_publish_timeout_ms),
            ("jwt_jwks_file_poll_ms", self.jwt_jwks_file_poll_ms),
            ("redis_timeout_ms", self.redis_timeout_ms),
            ("node_heartbeat_ms", self.node_heartbeat_ms),
            ("node_ttl_ms", self.node_ttl_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid(format!("{name} must be greater than 0")));
        }
        // Times far beyond any use would overflow the clock arithmetic they feed
        // (an Instant, a stored expiry): a day for timeouts, a year for lifetimes.
        const DAY_MS: u64 = 86_400_000;
        const YEAR_S: u64 = 366 * 86_400;
        let bounded = [
            ("hello_timeout_ms", self.hello_timeout_ms, DAY_MS),
            ("ack_timeout_ms", self.ack_timeout_ms, DAY_MS),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms, DAY_MS),
            ("sweep_interval_ms", self.sweep_interval_ms, DAY_MS),
            ("write_timeout_ms", self.write_timeout_ms, DAY_MS),
            ("header_read_timeout_ms", self.header_read_timeout_ms, DAY_MS),
            ("kafka_publish_timeout_ms", self.kafka_publish_timeout_ms, DAY_MS),
            ("shutdown_grace_ms", self.shutdown_grace_ms, DAY_MS),
            ("push_webhook_backoff_ms", self.push_webhook_backoff_ms, DAY_MS),
            ("jwt_jwks_file_poll_ms", self.jwt_jwks_file_poll_ms, DAY_MS),
            ("redis_timeout_ms", self.redis_timeout_ms, DAY_MS),
            ("node_heartbeat_ms", self.node_heartbeat_ms, DAY_MS),
            ("node_ttl_ms", self.node_ttl_ms, DAY_MS),
            ("jwt_jwks_min_refresh_seconds", self.jwt_jwks_min_refresh_seconds, DAY_MS / 1000),
            ("session_ttl_seconds", self.session_ttl_seconds, YEAR_S),
            ("dedup_window_seconds", self.dedup_window_seconds, YEAR_S),
            ("off_hook_offer_timeout_seconds", self.off_hook_offer_timeout_seconds, DAY_MS / 1000),
        ];
        if let Some((name, _, max)) = bounded.iter().find(|(_, v, max)| v > max) {
            return Err(ConfigError::Invalid(format!("{name} must be at most {max}")));
        }
        if self.bus == BusKind::Kafka && !cfg!(feature = "kafka") {
            return Err(ConfigError::Invalid(format!("bus = \"kafka\" (CCEB_BUS): {}", NO_KAFKA)));
        }
        if self.node_ttl_ms <= self.node_heartbeat_ms {
            return Err(ConfigError::Invalid(format!(
                "node_ttl_ms ({}) must be greater than node_heartbeat_ms ({}): a live node would drop out between two heartbeats",
                self.node_ttl_ms, self.node_heartbeat_ms
            )));
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return Err(ConfigError::Invalid("redis_prefix must be non-empty, without `{` or `}`".into()));
        }
        if self.mailbox_capacity < self.max_unacked {
            return Err(ConfigError::Invalid(format!(
                "mailbox_capacity ({}) must be at least max_unacked ({}): a long-lived connection's window must fit in its mailbox",
                self.mailbox_capacity, self.max_unacked
            )));
        }
        if self.jwt_hs256_secret.as_ref().is_some_and(|k| k.len() < MIN_HS256_SECRET_BYTES) {
            // RFC 7518 3.2: an HS256 key must be at least as long as the hash output.
            return Err(ConfigError::Invalid(format!(
                "jwt_hs256_secret (CCEB_JWT_HS256_SECRET) must be at least {MIN_HS256_SECRET_BYTES} bytes"
            )));
        }
        // A semaphore counts the connections, and it cannot hold more permits than this.
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        for (name, v) in
            [("max_connections", self.max_connections), ("backend_max_connections", self.backend_max_connections)]
        {
            if v > most {
                return Err(ConfigError::Invalid(format!("{name} must be at most {most}")));
            }
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                return Err(ConfigError::Invalid(format!("public_url `{url}` must start with ws:// or wss://")));
            }
        }
        if let Some(url) = &self.jwt_jwks_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!("jwt_jwks_url `{url}` must start with http:// or https://")));
            }
        }
        if let Some(url) = &self.push_webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "push_webhook_url `{url}` must start with http:// or https://"
                )));
            }
        }
        Ok(())
    }

    pub fn has_jwt_key(&self) -> bool {
        self.jwt_hs256_secret.is_some()
            || self.jwt_rs256_public_key_file.is_some()
            || self.jwt_es256_public_key_file.is_some()
            || self.jwt_jwks_file.is_some()
            || self.jwt_jwks_url.is_some()
    }

    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_seconds)
    }
    pub fn dedup_window(&self) -> Duration {
        Duration::from_secs(self.dedup_window_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)]
    fn environment_beats_file_beats_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "ack_timeout_ms = 5\nhello_timeout_ms = 7\nlisten = \"127.0.0.1:9\"")?;
            jail.set_env("CCEB_HELLO_TIMEOUT_MS", "11");
            jail.set_env("CCEB_JWT_HS256_SECRET", "00700000000000000000000000000000");
            jail.set_env("CCEB_ADMIN_TOKEN", "true");
            let s = Settings::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!((s.ack_timeout_ms, s.hello_timeout_ms), (5, 11));
            assert_eq!(s.listen.port(), 9);
            assert_eq!(
                s.jwt_hs256_secret.as_deref(),
                Some("00700000000000000000000000000000"),
                "text settings are taken verbatim"
            );
            assert_eq!(s.admin_token.as_deref(), Some("true"));
            assert_eq!(s.session_ttl_seconds, 259_200);
            Ok(())
        });
    }

    #[test]
    fn times_beyond_any_use_are_refused() {
        let s = Settings { dedup_window_seconds: 10_000_000_000_000, ..Settings::default() };
        assert!(s.validate().is_err_and(|e| e.to_string().contains("dedup_window_seconds")));
        let s = Settings { ack_timeout_ms: u64::MAX, ..Settings::default() };
        assert!(s.validate().is_err_and(|e| e.to_string().contains("ack_timeout_ms")));
    }

    #[test]
    fn a_mailbox_smaller_than_the_window_is_refused() {
        let s = Settings { mailbox_capacity: 10, max_unacked: 11, ..Settings::default() };
        assert!(s.validate().is_err_and(|e| e.to_string().contains("mailbox_capacity")));
        assert!(Settings { mailbox_capacity: 11, max_unacked: 11, ..Settings::default() }.validate().is_ok());
    }

    #[test]
    fn short_hs256_secret_is_refused_naming_the_setting() {
        let with = |secret: &str| Settings { jwt_hs256_secret: Some(secret.into()), ..Settings::default() };
        let e = with(&"k".repeat(31)).validate().expect_err("31 bytes is too short").to_string();
        assert!(e.contains("jwt_hs256_secret") && e.contains("CCEB_JWT_HS256_SECRET"), "{e}");
        assert!(with("").validate().is_err());
        with(&"k".repeat(32)).validate().expect("32 bytes is enough");
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn empty_admin_token_is_unset() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "admin_token = \"\"")?;
            let s = Settings::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.admin_token, None, "from the file");
            jail.set_env("CCEB_ADMIN_TOKEN", "");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.admin_token, None, "from the environment");
            Ok(())
        });
    }

    #[test]
    fn jwks_url_must_be_http() {
        let with = |url: &str| Settings { jwt_jwks_url: Some(url.into()), ..Settings::default() };
        assert!(with("ftp://idp.test/jwks").validate().is_err());
        with("https://idp.test/.well-known/jwks.json").validate().expect("https");
        with("http://127.0.0.1:9/jwks").validate().expect("http");
    }

    #[test]
    fn the_kafka_bus_needs_the_kafka_feature() {
        let r = Settings { bus: BusKind::Kafka, ..Settings::default() }.validate();
        if cfg!(feature = "kafka") {
            r.expect("a build with Kafka runs the Kafka bus");
        } else {
            let e = r.expect_err("a build without Kafka refuses it").to_string();
            assert!(e.contains("CCEB_BUS") && e.contains("cargo feature `kafka`"), "{e}");
        }
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let s = Settings { ack_timeout_ms: 0, ..Settings::default() };
        assert!(s.validate().is_err());
        let s = Settings { header_read_timeout_ms: 0, ..Settings::default() };
        assert!(s.validate().is_err());
    }

    #[test]
    fn connection_caps_are_positive_and_countable() {
        for (public, backend) in [(0, 1), (1, 0), (usize::MAX, 1), (1, usize::MAX)] {
            let s = Settings { max_connections: public, backend_max_connections: backend, ..Settings::default() };
            assert!(s.validate().is_err(), "{public} / {backend}");
        }
        assert!(Settings { max_connections: 1, backend_max_connections: 1, ..Settings::default() }.validate().is_ok());
    }
}
