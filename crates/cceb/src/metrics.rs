//! Prometheus metrics. Each bridge has its own recorder, so two bridges in one
//! process (the tests) never count into each other's series; hot-path
//! counters are resolved once into handles.

use cceb_protocol::{ErrorCode, NotificationType};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Which listener, for logs and `cceb_connections_refused_total{listener}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `/ws/v1`, discovery, health, metrics.
    Public,
    /// The embedded bus's backend port.
    Backend,
}

impl Listener {
    pub const ALL: [Listener; 2] = [Listener::Public, Listener::Backend];

    pub fn label(self) -> &'static str {
        match self {
            Listener::Public => "public",
            Listener::Backend => "backend",
        }
    }
}

/// How an action ended, for `cceb_actions_total{record,outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionOutcome {
    Published,
    Duplicate,
    Refused(ErrorCode),
}

impl ActionOutcome {
    const COUNT: usize = 2 + ErrorCode::ALL.len();

    fn index(self) -> usize {
        match self {
            ActionOutcome::Published => 0,
            ActionOutcome::Duplicate => 1,
            ActionOutcome::Refused(code) => 2 + code.index(),
        }
    }

    fn label(i: usize) -> &'static str {
        match i {
            0 => "published",
            1 => "duplicate",
            _ => ErrorCode::ALL[i - 2].as_str(),
        }
    }
}

/// How a push announcement ended, for `cceb_push_announcements_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Sent,
    /// Every attempt failed.
    Failed,
    /// The queue was full.
    Shed,
    /// The bridge stopped first.
    Cancelled,
}

const PUSH_OUTCOMES: [&str; 4] = ["sent", "failed", "shed", "cancelled"];

/// Label of actions whose record is not in the schema set (keeps cardinality bounded).
const UNKNOWN_RECORD: &str = "unknown";

pub struct Metrics {
    /// Renders this bridge's series for `/metrics`.
    handle: PrometheusHandle,
    connections: Gauge,
    /// The gauge's value, which a `Gauge` handle cannot read back: the load
    /// this node reports to the cluster.
    open_connections: AtomicU64,
    /// Live members of the cluster in this node's latest view (Redis store only).
    pub cluster_nodes: Gauge,
    /// 1 while `/readyz` would answer 200 (bus and store ready, not shutting
    /// down), else 0; set at each scrape and each `/readyz`.
    pub ready: Gauge,
    /// By `Listener`: connections closed unserved because the listener was full.
    connections_refused: [Counter; Listener::ALL.len()],
    pub sessions: Gauge,
    sent: Vec<Counter>,
    pub acked: Counter,
    pub redelivered: Counter,
    pub undeliverable: Counter,
    pub events_accepted: Counter,
    pub events_rejected: Counter,
    pub events_undecodable: Counter,
    pub notification_ack_seconds: Histogram,
    pub action_seconds: Histogram,
    pub event_ingest_seconds: Histogram,
    pub sessions_resumed: Counter,
    pub sessions_expired: Counter,
    /// Ended to make room under `max_sessions_per_agent`.
    pub sessions_evicted: Counter,
    pub mailbox_dropped: Counter,
    pub availability_published: Counter,
    /// Client-token key sets (JWKS) installed while running.
    pub jwks_refreshed: Counter,
    /// JWKS refreshes that failed (the keys held stay in use).
    pub jwks_refresh_failed: Counter,
    errors: Vec<Counter>,
    /// By `PushOutcome`.
    push: Vec<Counter>,
    /// Failed, published.
    auto_accept: [Counter; 2],
    /// Record name → one counter per outcome, resolved once.
    actions: HashMap<String, Vec<Counter>>,
}

impl Metrics {
    /// `action_records`: the records clients may send; any other name counts as `unknown`.
    pub fn new<'a>(action_records: impl IntoIterator<Item = &'a str>) -> Self {
        // Only an empty bucket list is refused, and ours is a constant.
        let builder =
            PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS).unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || Self::register(handle, action_records))
    }

    fn register<'a>(handle: PrometheusHandle, action_records: impl IntoIterator<Item = &'a str>) -> Self {
        let per_outcome = |record: &str| {
            (0..ActionOutcome::COUNT)
                .map(|i| counter!("cceb_actions_total", "record" => record.to_owned(), "outcome" => ActionOutcome::label(i)))
                .collect::<Vec<_>>()
        };
        let actions =
            action_records.into_iter().chain([UNKNOWN_RECORD]).map(|r| (r.to_owned(), per_outcome(r))).collect();
        Metrics {
            handle,
            connections: gauge!("cceb_connections"),
            open_connections: AtomicU64::new(0),
            cluster_nodes: gauge!("cceb_cluster_nodes"),
            ready: gauge!("cceb_ready"),
            connections_refused: Listener::ALL
                .map(|l| counter!("cceb_connections_refused_total", "listener" => l.label())),
            sessions: gauge!("cceb_sessions"),
            sent: NotificationType::ALL
                .iter()
                .map(|t| counter!("cceb_notifications_sent_total", "type" => t.as_str()))
                .collect(),
            acked: counter!("cceb_notifications_acked_total"),
            redelivered: counter!("cceb_notifications_redelivered_total"),
            undeliverable: counter!("cceb_notifications_without_session_total"),
            events_accepted: counter!("cceb_events_total", "outcome" => "accepted"),
            events_rejected: counter!("cceb_events_total", "outcome" => "rejected"),
            events_undecodable: counter!("cceb_events_total", "outcome" => "undecodable"),
            notification_ack_seconds: histogram!("cceb_notification_ack_seconds"),
            action_seconds: histogram!("cceb_action_seconds"),
            event_ingest_seconds: histogram!("cceb_event_ingest_seconds"),
            sessions_resumed: counter!("cceb_sessions_resumed_total"),
            sessions_expired: counter!("cceb_sessions_expired_total"),
            sessions_evicted: counter!("cceb_sessions_evicted_total"),
            mailbox_dropped: counter!("cceb_mailbox_dropped_total"),
            availability_published: counter!("cceb_chat_availability_published_total"),
            jwks_refreshed: counter!("cceb_jwks_refreshes_total", "outcome" => "ok"),
            jwks_refresh_failed: counter!("cceb_jwks_refreshes_total", "outcome" => "failed"),
            errors: ErrorCode::ALL.iter().map(|c| counter!("cceb_errors_total", "code" => c.as_str())).collect(),
            push: PUSH_OUTCOMES.iter().map(|&o| counter!("cceb_push_announcements_total", "outcome" => o)).collect(),
            auto_accept: [
                counter!("cceb_auto_accept_total", "outcome" => "failed"),
                counter!("cceb_auto_accept_total", "outcome" => "published"),
            ],
            actions,
        }
    }

    /// A WebSocket connection was upgraded (`cceb_connections` up).
    pub fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        self.connections.increment(1.0);
    }

    /// A WebSocket connection ended (`cceb_connections` down).
    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.connections.decrement(1.0);
    }

    /// WebSocket connections open now.
    pub fn open_connections(&self) -> u64 {
        self.open_connections.load(Ordering::Relaxed)
    }

    pub fn connections_refused(&self, listener: Listener) -> Counter {
        self.connections_refused[listener as usize].clone()
    }

    pub fn sent(&self, ty: NotificationType) {
        self.sent[ty.index()].increment(1);
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].increment(1);
    }

    pub fn action(&self, record: &str, outcome: ActionOutcome) {
        let counters = self.actions.get(record).or_else(|| self.actions.get(UNKNOWN_RECORD));
        if let Some(c) = counters {
            c[outcome.index()].increment(1);
        }
    }

    pub fn push_outcome(&self, outcome: PushOutcome) {
        self.push[outcome as usize].increment(1);
    }

    pub fn auto_accept(&self, published: bool) {
        self.auto_accept[usize::from(published)].increment(1);
    }

    /// Folds the histograms' recent samples into their buckets; without it
    /// they grow until the next scrape, or forever if nobody scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}
