//! Wiring: build the schema set, store, bus, sessions and HTTP servers from the
//! settings; run them; drain them on shutdown.

use crate::actions::{ActionSettings, Actions};
use crate::auth::{KeyError, Verifier};
use crate::bus::embedded::LogLimits;
use crate::bus::{Bus, BusError, EmbeddedBus, KafkaBus};
use crate::clock::{Clock, SystemClock};
use crate::cluster::RelayPeers;
use crate::config::{BusKind, Settings, StoreKind};
use crate::conn;
use crate::http::backend::Port;
use crate::http::serve::Limits;
use crate::http::{Discovery, FrameLimits, Public};
use crate::kv::{Kv, KvError};
use crate::membership::{Membership, MembershipError, MembershipSettings, Registration};
use crate::metrics::Listener;
use crate::metrics::Metrics;
use crate::notify::{Dispatcher, EventReader};
use crate::push::{NoPush, Push, Webhook, WebhookSettings};
use crate::reactions::{BridgeRecords, ReactionSettings};
use crate::relay::Relay;
use crate::schema::{SchemaError, SchemaSet};
use crate::session::{Cluster, Roster, SessionSettings, Sessions};
use crate::store::{DedupCapacity, EmbeddedStore, OpenError, Placement, RedisStore, Store, StoreError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] OpenError),
    /// `store = "redis"` and Redis cannot be reached (or its URL is
    /// malformed). Not a `source`: `KvError` already says its cause, once.
    #[error("store: {0}")]
    Redis(KvError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot restore sessions: {0}")]
    Restore(#[from] StoreError),
    #[error("push webhook: {0}")]
    Push(#[from] reqwest::Error),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

impl From<KvError> for StartError {
    fn from(e: KvError) -> Self {
        StartError::Redis(e)
    }
}

/// A running bridge.
pub struct Bridge {
    pub addr: SocketAddr,
    /// The backend port (embedded bus only).
    pub backend_addr: Option<SocketAddr>,
    /// Cancelled to ask for a shutdown (SIGTERM): drain starts.
    stop: CancellationToken,
    /// Cancelled once, when drain closes the clients; every task watches it.
    shutdown: CancellationToken,
    /// Every server, connection and background task, so drain can wait for them.
    tasks: TaskTracker,
    /// How long drain waits for them.
    grace: Duration,
    /// Detached at the end of drain (any connection that did not detach itself in time).
    sessions: Arc<Sessions>,
    /// Closed last, once nothing writes any more.
    store: Arc<dyn Store>,
    /// This node in the cluster (Redis store only): draining is published
    /// before the clients are closed, and the record removed at the end.
    registration: Option<Registration>,
}

impl Bridge {
    pub async fn start(settings: Settings) -> Result<Bridge, StartError> {
        Self::start_with_clock(settings, Arc::new(SystemClock)).await
    }

    /// Starts with `clock` deciding session TTLs (disconnect times, the
    /// sweep, expiry at restore) and tokens' `exp`/`nbf`: a test moves a
    /// [`ManualClock`](crate::clock::ManualClock) instead of waiting.
    pub async fn start_with_clock(settings: Settings, clock: Arc<dyn Clock>) -> Result<Bridge, StartError> {
        let schemas = Arc::new(SchemaSet::load(settings.schema_dir.as_deref())?);
        let metrics = Arc::new(Metrics::new(schemas.action_names()));
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        // Tasks spawned before a later step fails must not outlive the failed start.
        let stop_on_error = shutdown.clone().drop_guard();
        let verifier = Arc::new(Verifier::start(&settings, clock.clone(), &metrics, &tasks, &shutdown).await?);
        let listen = |addr: SocketAddr| async move { bind(addr).map_err(|source| StartError::Listen { addr, source }) };
        let public = listen(settings.listen).await?;
        let addr = public.local_addr().map_err(|source| StartError::Listen { addr: settings.listen, source })?;
        // The backend port stands in for a real bus: only the embedded bus has one.
        let backend = match settings.bus {
            BusKind::Embedded => Some(listen(settings.backend_listen).await?),
            BusKind::Kafka => None,
        };
        let backend_addr = match &backend {
            Some(l) => {
                Some(l.local_addr().map_err(|source| StartError::Listen { addr: settings.backend_listen, source })?)
            }
            None => None,
        };

        let kv = match settings.store {
            StoreKind::Redis => Some(
                Kv::connect(
                    &settings.redis_url,
                    &settings.redis_prefix,
                    Duration::from_millis(settings.redis_timeout_ms),
                )
                .await?,
            ),
            StoreKind::Embedded => None,
        };
        // This process, as membership and the store's attachments know it.
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let redis_store = kv.as_ref().map(|kv| Arc::new(RedisStore::new(kv.clone())));
        let store: Arc<dyn Store> = match &redis_store {
            Some(r) => r.clone(),
            None => Arc::new(EmbeddedStore::open(
                &settings.data_dir,
                DedupCapacity { per_tenant: settings.dedup_capacity_per_tenant, total: settings.dedup_capacity },
                clock.clone(),
            )?),
        };
        let (bus, embedded, kafka): (Arc<dyn Bus>, _, _) = match settings.bus {
            BusKind::Embedded => {
                let limits = LogLimits { records: settings.embedded_log_capacity, bytes: settings.embedded_log_bytes };
                let mut e = EmbeddedBus::new(limits).released_by(shutdown.clone());
                // On Redis, every node's backend port serves every node's actions.
                if let Some(kv) = &kv {
                    e = e.shared_in(kv);
                }
                let e = Arc::new(e);
                (e.clone(), Some(e), None)
            }
            BusKind::Kafka => {
                let k = Arc::new(KafkaBus::new(settings.kafka(), schemas.clone())?);
                (k.clone(), None, Some(k))
            }
        };
        let push: Arc<dyn Push> = match &settings.push_webhook_url {
            Some(url) => Arc::new(Webhook::start(
                WebhookSettings {
                    url: url.clone(),
                    bearer: settings.push_webhook_token.clone(),
                    attempts: settings.push_webhook_attempts,
                    first_backoff: std::time::Duration::from_millis(settings.push_webhook_backoff_ms),
                    timeout: std::time::Duration::from_secs(10),
                    queue: 10_000,
                    concurrency: 64,
                },
                metrics.clone(),
                &tasks,
                shutdown.clone(),
            )?),
            None => Arc::new(NoPush),
        };
        // On Redis every node serves every agent: sessions shared through the
        // store, the other nodes told through the relay.
        let placement: Option<Arc<dyn Placement>> = redis_store.map(|r| r as Arc<dyn Placement>);
        let relay = match &kv {
            Some(kv) => Some(
                Relay::start(
                    kv,
                    &settings.node_id,
                    Duration::from_millis(settings.node_heartbeat_ms),
                    Duration::from_millis(settings.redis_timeout_ms),
                    shutdown.clone(),
                    &tasks,
                )
                .await?,
            ),
            None => None,
        };
        let (peers, inbox) = match relay {
            Some((relay, inbox)) => (Some(Arc::new(RelayPeers::new(relay))), Some(inbox)),
            None => (None, None),
        };
        let mut records = BridgeRecords::new(
            store.clone(),
            bus.clone(),
            schemas.clone(),
            metrics.clone(),
            ReactionSettings { source: settings.source_name.clone(), claim_ttl: settings.session_ttl() },
        );
        if let Some(p) = &placement {
            records = records.claimed_in(p.clone());
        }
        let records = Arc::new(records);
        let sessions = Sessions::new(
            Arc::new(Roster::default()),
            store.clone(),
            records,
            push,
            metrics.clone(),
            SessionSettings {
                ttl: settings.session_ttl(),
                max_unacked: settings.max_unacked,
                mailbox_capacity: settings.mailbox_capacity,
                max_sessions_per_agent: settings.max_sessions_per_agent,
                clock,
            },
        );
        let sessions = Arc::new(match (&placement, &peers) {
            (Some(placement), Some(peers)) => sessions.clustered(Cluster {
                placement: placement.clone(),
                peers: peers.clone(),
                node: settings.node_id.as_str().into(),
                instance: instance.as_str().into(),
                // Past a dead node's TTL and the heartbeat every view is read at.
                reap_after: Duration::from_millis(2 * settings.node_ttl_ms + settings.node_heartbeat_ms),
                absent: Default::default(),
            }),
            _ => sessions,
        });
        if let Some(inbox) = inbox {
            crate::cluster::spawn_inbound(inbox, sessions.clone(), &tasks, shutdown.clone());
        }
        let restored = sessions.restore().await?;
        let dispatcher = Arc::new(Dispatcher::new(sessions.clone(), store.clone(), metrics.clone()));
        let events = Arc::new(EventReader::new(schemas.clone(), settings.max_notification_bytes));
        if let Some(k) = &kafka {
            k.start(dispatcher.clone(), events.clone(), metrics.clone(), &tasks, shutdown.clone())?;
        }
        let actions = Arc::new(Actions::new(
            schemas.clone(),
            store.clone(),
            bus.clone(),
            dispatcher.clone(),
            ActionSettings {
                source: settings.source_name.clone(),
                dedup_window: settings.dedup_window(),
                off_hook_offer_timeout_seconds: settings.off_hook_offer_timeout_seconds,
            },
            metrics.clone(),
        ));
        let ws_endpoint = match &settings.public_url {
            Some(url) => format!("{}/ws/v1", url.trim_end_matches('/')),
            None => format!("ws://{addr}/ws/v1"),
        };
        spawn_sweeper(sessions.clone(), Duration::from_millis(settings.sweep_interval_ms), &tasks, &shutdown);
        spawn_metrics_upkeep(metrics.clone(), &tasks, &shutdown);
        let serve = |tcp: TcpListener, listener: Listener, app: axum::Router, max_connections: usize| {
            let limits = Limits { header_read_timeout: settings.header_read_timeout(), max_connections };
            let refused = metrics.connections_refused(listener);
            crate::http::serve::spawn(tcp, listener, app, limits, refused, &tasks, shutdown.clone());
        };
        let conn = Arc::new(conn::Context {
            verifier: verifier.clone(),
            sessions: sessions.clone(),
            actions,
            metrics: metrics.clone(),
            limits: conn::Limits {
                hello_timeout: settings.hello_timeout(),
                heartbeat_interval: settings.heartbeat_interval(),
                ack_timeout: settings.ack_timeout(),
                write_timeout: settings.write_timeout(),
                session_ttl_seconds: settings.session_ttl_seconds,
                max_pending_actions: settings.max_pending_actions,
                action_rate_per_second: settings.action_rate_per_second,
                action_burst: settings.action_burst,
                shutdown_grace: Duration::from_millis(settings.shutdown_grace_ms),
            },
            shutdown: shutdown.clone(),
        });
        // Last of the fallible steps: a node refused its id must not have served anything.
        let registration = match &kv {
            Some(kv) => Some(
                Membership::join(
                    kv.clone(),
                    MembershipSettings {
                        node_id: settings.node_id.clone(),
                        endpoint: ws_endpoint.clone(),
                        heartbeat: Duration::from_millis(settings.node_heartbeat_ms),
                        ttl: Duration::from_millis(settings.node_ttl_ms),
                        instance: instance.clone(),
                    },
                    metrics.clone(),
                )
                .await?,
            ),
            None => None,
        };
        if let (Some(peers), Some(r)) = (&peers, &registration) {
            peers.joined(r.membership());
            sessions.reap_previous().await?;
        }
        let routes = Arc::new(Public {
            conn,
            frames: FrameLimits {
                max_frame_bytes: settings.max_frame_bytes,
                max_notification_bytes: settings.max_notification_bytes,
            },
            verifier,
            discovery: Discovery {
                ws_endpoint,
                node_id: settings.node_id.clone(),
                cluster: registration.as_ref().map(Registration::membership),
            },
            bus,
            store: store.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            documents: crate::http::docs::Documents::new(&schemas),
            dev_tokens: settings
                .dev
                .then(|| settings.jwt_hs256_secret.clone().map(crate::http::console::DevTokens::new))
                .flatten(),
        });
        serve(public, Listener::Public, crate::http::public(routes), settings.max_connections);
        if let (Some(tcp), Some(embedded)) = (backend, embedded) {
            let port = Port {
                events,
                dispatcher,
                store: store.clone(),
                bus: embedded,
                admin_token: settings.admin_token.clone(),
                max_body_bytes: settings.backend_max_body_bytes,
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            serve(tcp, Listener::Backend, crate::http::backend::router(port), settings.backend_max_connections);
        }
        tracing::info!(
            %addr, ?backend_addr, bus = ?settings.bus, store = ?settings.store, schemas = %schemas.origin,
            node = %settings.node_id, data_dir = %settings.data_dir.display(), restored, "cceb listening"
        );
        stop_on_error.disarm();
        let grace = Duration::from_millis(settings.shutdown_grace_ms);
        let stop = CancellationToken::new();
        Ok(Bridge { addr, backend_addr, stop, shutdown, tasks, grace, sessions, store, registration })
    }

    /// Cancel it to start the drain (what SIGTERM does).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits for the shutdown token, then drains: clients are closed with 1012
    /// and every task ends before this returns (or the grace period passes).
    pub async fn run_until_stopped(self) {
        self.stop.cancelled().await;
        self.drain().await;
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        self.drain().await;
    }

    async fn drain(mut self) {
        let mut grace = self.grace;
        if let Some(r) = &self.registration {
            // Before any client is closed: closed clients rediscover, and
            // every node must have stopped offering this one by then. Half
            // the grace at most, the other half is the clients'.
            grace = grace.saturating_sub(r.drain(self.grace / 2).await);
        }
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(left = self.tasks.len(), "shutdown grace period passed with tasks still running");
        }
        // Connections detach themselves as they close; this covers any that did not in time.
        self.sessions.detach_all();
        if let Some(r) = self.registration.take() {
            r.leave().await;
        }
        self.store.close().await;
        tracing::info!("cceb stopped");
    }
}

/// Most connections waiting to be accepted. The default (128 in std) overflowed
/// under reconnect storms: every dropped SYN costs the client a 1 s retransmit.
const ACCEPT_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // A restarted bridge can bind again while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Keeps the metrics' memory bounded between scrapes.
fn spawn_metrics_upkeep(metrics: Arc<Metrics>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => metrics.run_upkeep(),
            }
        }
    });
}

/// Expires sessions whose TTL passed, every `sweep_interval_ms`.
fn spawn_sweeper(sessions: Arc<Sessions>, period: Duration, tasks: &TaskTracker, shutdown: &CancellationToken) {
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => sessions.sweep().await,
            }
        }
    });
}
