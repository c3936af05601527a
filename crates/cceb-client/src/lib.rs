//! `cceb-client`: a client of the CCEB WebSocket contract (`shared/PROTOCOL.md`).
//!
//! It does what every agent application has to do and what used to live only
//! in the tests and the benchmark: discovery, `hello`, resume of a long-lived
//! session with its key, an `ack` for every notification once the application
//! is done with it, actions that resolve on `ack` (retried with the same uuid
//! on `backend_unavailable`, `rate_limited` and across reconnects), reconnect
//! with jittered exponential backoff, a new token on 4002, and a stop on the
//! close codes a retry cannot cure.
//!
//! Token expiry (4002) and a provider that hands out an expired token: the
//! first 4002 after a connection that lived reconnects at once with a new
//! token; a 4002 after such a refresh, the connection not having stayed up
//! [`Builder::stable_after`] (10 s), goes through the backoff; a 4001 right
//! after a refresh is retried through the backoff 3 times (the provider may
//! be a moment behind), then the client stops. The backoff starts from its
//! minimum again only after a connection that stayed up that long, not on
//! every `hello_reply` (see [`policy::ReconnectPolicy`]).
//!
//! Two layers, the upper built on the lower:
//!
//! - [`Client`]: all of the above on a task of its own, for applications;
//! - [`Connection`]: one WebSocket and the contract's messages, typed both
//!   ways (plus raw frames); no task, no timer, no retry. The `cceb` tests and
//!   the benchmark drive the bridge through it, and [`Client`] runs on it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cceb_client::{Client, Event};
//! let (client, mut events) = Client::builder("http://127.0.0.1:8080/v1/discovery")
//!     .token_provider(|| async { Ok::<_, String>("eyJ...".to_owned()) })
//!     .long_lived(true)
//!     .build();
//! client.action("ChangeAgentStateEvent", serde_json::json!({"state": "Away"})).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Notification(n) = event {
//!         println!("{} {}", n.ty, n.data);
//!     } // dropping the notification acks it
//! }
//! # Ok(()) }
//! ```
//!
//! ```no_run
//! # async fn demo() -> Result<(), cceb_client::Error> {
//! use cceb_client::cceb_protocol::{incoming::Hello, outgoing::ServerMessage};
//! use cceb_client::Connection;
//! let mut conn = Connection::connect("ws://127.0.0.1:8080/ws/v1").await?;
//! let reply = conn.hello(&Hello { token: "eyJ...".into(), long_lived: true, ..Hello::default() }).await?;
//! println!("session {} (key {:?})", reply.session_id, reply.session_key);
//! while let ServerMessage::Notification { uuid, data, .. } = conn.next().await? {
//!     println!("{data}");
//!     conn.ack(&uuid).await?;
//! }
//! # Ok(()) }
//! ```

mod connection;
mod driver;
pub mod policy;

pub use connection::{Connection, Error, WebSocket};

use cceb_protocol::{ErrorCode, NotificationType};
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

pub use cceb_protocol;
/// The WebSocket library under [`Connection`] (its `Message` for raw frames).
pub use tokio_tungstenite::tungstenite;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type TokenFn = dyn Fn() -> BoxFuture<Result<String, String>> + Send + Sync;

/// Where the client keeps the long-lived session key between connections.
pub trait KeyStore: Send + Sync {
    fn load(&self) -> Option<String>;
    fn store(&self, key: Option<String>);
}

/// The default: the key lives as long as the process.
#[derive(Debug, Default)]
pub struct MemoryKeyStore(Mutex<Option<String>>);

impl KeyStore for MemoryKeyStore {
    fn load(&self) -> Option<String> {
        self.0.lock().ok().and_then(|k| k.clone())
    }
    fn store(&self, key: Option<String>) {
        if let Ok(mut k) = self.0.lock() {
            *k = key;
        }
    }
}

/// The connection's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Fetching a token, asking discovery, connecting, or waiting for `hello_reply`.
    Connecting,
    /// `hello_reply` arrived.
    Connected { session_id: String, resumed: bool },
    /// The connection ended; the client will connect again after its backoff.
    /// `code`: the close code, `None` when the socket dropped without one.
    Disconnected { code: Option<u16> },
    /// The client stopped for good (see [`Event::Closed`]).
    Closed,
}

/// What the client reports, in order.
#[derive(Debug)]
pub enum Event {
    State(State),
    Notification(Notification),
    /// The client stopped and will not reconnect: a close code a retry cannot
    /// cure (1000, 1003, 1009, 4001 — after a 4002 refresh, once it was
    /// retried 3 times —, 4005, 4006), `close()`, `end_session()`, or a
    /// discovery that refused the token. The last event.
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

/// One notification. It is acknowledged when it is dropped, that is once the
/// application is done with it ("ack after the handler returns"). A
/// redelivery of a notification already handled is acked again and not
/// reported twice.
#[derive(Debug)]
pub struct Notification {
    pub ty: NotificationType,
    pub uuid: String,
    pub seq: u64,
    pub data: Value,
    // Sends the ack when the notification is dropped.
    _ack: AckOnDrop,
}

#[derive(Debug)]
struct AckOnDrop {
    uuid: String,
    cmds: mpsc::UnboundedSender<driver::Cmd>,
}

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        let _ = self.cmds.send(driver::Cmd::Ack(std::mem::take(&mut self.uuid)));
    }
}

/// Why an action was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The bridge refused it with this contract error (`field` names the
    /// offending field where the contract says so). Transient codes
    /// (`backend_unavailable`, `rate_limited`) only end here when the
    /// deadline passed while retrying.
    #[error("{code}: {message}")]
    Refused { code: ErrorCode, message: String, field: Option<String> },
    /// No `ack` before the action's deadline (the bridge may still have published it).
    #[error("no ack within the deadline")]
    Timeout,
    /// The client stopped before the action was acknowledged.
    #[error("the client is closed")]
    Closed,
}

/// Timing and behaviour; the defaults follow the contract and issue 10.
#[derive(Clone)]
pub struct Config {
    /// Discovery (`http(s)://…/v1/discovery`) or the WebSocket endpoint itself (`ws(s)://…/ws/v1`).
    pub url: String,
    pub long_lived: bool,
    pub auto_accept: bool,
    pub tenant_guid: Option<String>,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a connection must stay up before the backoff starts from `backoff_min` again.
    pub stable_after: Duration,
    /// Longest wait for the TCP/WebSocket handshake, discovery and `hello_reply`.
    pub connect_timeout: Duration,
    /// How long `action()` keeps retrying before [`ActionError::Timeout`].
    pub action_deadline: Duration,
    /// First wait before an action refused with a transient code is sent again (doubles, up to `backoff_max`).
    pub action_retry_min: Duration,
    /// Notification uuids remembered to suppress redeliveries.
    pub seen_capacity: usize,
    /// Room in the event channel; a slow reader holds the client back from reading the socket.
    pub event_buffer: usize,
}

impl Config {
    fn new(url: String) -> Config {
        Config {
            url,
            long_lived: false,
            auto_accept: false,
            tenant_guid: None,
            client_name: Some("cceb-client".into()),
            client_version: Some(env!("CARGO_PKG_VERSION").into()),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(20),
            stable_after: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            action_deadline: Duration::from_secs(30),
            action_retry_min: Duration::from_millis(200),
            seen_capacity: 4096,
            event_buffer: 256,
        }
    }
}

pub struct Builder {
    config: Config,
    token: Option<Arc<TokenFn>>,
    keys: Arc<dyn KeyStore>,
}

impl Builder {
    /// The token, called before the first connection and again after 4002
    /// (and after a 4001 that follows a 4002 refresh: see the crate docs).
    pub fn token_provider<F, Fut, E>(mut self, f: F) -> Builder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        self.token = Some(Arc::new(move || {
            let fut = f();
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        }));
        self
    }

    /// A fixed token (it cannot be refreshed: after 4002 the same one is sent,
    /// and refused with 4001 once expired; the client stops after the bounded retries).
    pub fn token(self, token: impl Into<String>) -> Builder {
        let token = token.into();
        self.token_provider(move || {
            let t = token.clone();
            async move { Ok::<_, String>(t) }
        })
    }

    pub fn long_lived(mut self, yes: bool) -> Builder {
        self.config.long_lived = yes;
        self
    }

    pub fn auto_accept(mut self, yes: bool) -> Builder {
        self.config.auto_accept = yes;
        self
    }

    pub fn tenant_guid(mut self, tenant: impl Into<String>) -> Builder {
        self.config.tenant_guid = Some(tenant.into());
        self
    }

    pub fn client_info(mut self, name: impl Into<String>, version: impl Into<String>) -> Builder {
        self.config.client_name = Some(name.into());
        self.config.client_version = Some(version.into());
        self
    }

    /// Reconnect backoff: `min` doubles up to `max`, jittered (default 0.5 s → 20 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Builder {
        self.config.backoff_min = min;
        self.config.backoff_max = max;
        self
    }

    /// How long a connection must stay up before the reconnect backoff starts
    /// from its minimum again, and before a 4002 counts as the token running
    /// out on a connection that lived (default 10 s).
    pub fn stable_after(mut self, d: Duration) -> Builder {
        self.config.stable_after = d;
        self
    }

    pub fn connect_timeout(mut self, d: Duration) -> Builder {
        self.config.connect_timeout = d;
        self
    }

    pub fn action_deadline(mut self, d: Duration) -> Builder {
        self.config.action_deadline = d;
        self
    }

    pub fn action_retry(mut self, min: Duration) -> Builder {
        self.config.action_retry_min = min;
        self
    }

    /// Where the session key is kept (default: memory).
    pub fn key_store(mut self, keys: Arc<dyn KeyStore>) -> Builder {
        self.keys = keys;
        self
    }

    /// Starts the client (it connects in the background, on the current Tokio
    /// runtime) and returns its handle and its events. Without a token
    /// provider the client closes at once with the reason.
    pub fn build(self) -> (Client, mpsc::Receiver<Event>) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(self.config.event_buffer.max(1));
        let (state_tx, state_rx) = watch::channel(State::Connecting);
        let token = self.token.unwrap_or_else(|| Arc::new(|| Box::pin(async { Err("no token provider".to_owned()) })));
        let deadline = self.config.action_deadline;
        tokio::spawn(driver::run(self.config, token, self.keys, cmd_rx, cmd_tx.clone(), ev_tx, state_tx));
        (Client { cmds: cmd_tx, state: state_rx, action_deadline: deadline }, ev_rx)
    }
}

/// The handle: send actions, watch the state, close. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    cmds: mpsc::UnboundedSender<driver::Cmd>,
    state: watch::Receiver<State>,
    action_deadline: Duration,
}

impl Client {
    pub fn builder(url: impl Into<String>) -> Builder {
        Builder { config: Config::new(url.into()), token: None, keys: Arc::new(MemoryKeyStore::default()) }
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Waits until the state matches `f` (or the client is gone).
    pub async fn wait_for(&self, f: impl Fn(&State) -> bool) -> State {
        let mut rx = self.state.clone();
        let r = rx.wait_for(|s| f(s)).await.map(|s| s.clone());
        r.unwrap_or(State::Closed)
    }

    /// Sends `action` with `details` (the record's fields, camelCase) under a
    /// fresh uuid and waits for its `ack`. See [`Client::action_with_uuid`].
    pub async fn action(&self, action: &str, details: Value) -> Result<(), ActionError> {
        self.action_with_uuid(&new_uuid(), action, details).await
    }

    /// Sends the action under `uuid`: sent again with the same uuid after a
    /// transient refusal (backoff) and after every reconnect until it is
    /// acknowledged, refused for good, or the deadline passes. The bridge
    /// deduplicates by uuid, so it is published once.
    pub async fn action_with_uuid(&self, uuid: &str, action: &str, details: Value) -> Result<(), ActionError> {
        let details = match details {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => {
                return Err(ActionError::Refused {
                    code: ErrorCode::InvalidMessage,
                    message: "`action_details` must be an object".into(),
                    field: Some("data.action_details".into()),
                })
            }
        };
        let (tx, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.action_deadline;
        let cmd = driver::Cmd::Action(driver::PendingAction {
            uuid: uuid.to_owned(),
            action: action.to_owned(),
            details,
            deadline,
            reply: tx,
        });
        self.cmds.send(cmd).map_err(|_| ActionError::Closed)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ActionError::Closed),
            Err(_) => {
                let _ = self.cmds.send(driver::Cmd::Forget(uuid.to_owned()));
                Err(ActionError::Timeout)
            }
        }
    }

    /// Ends a long-lived session at once (`end_session`): the bridge drops its
    /// mailbox and closes with 1000, the stored key is forgotten, and the
    /// client stops. Returns once the client is closed.
    ///
    /// [`ActionError::Refused`] when the bridge refuses it (e.g.
    /// `backend_unavailable` while its store cannot write): the session and
    /// its key stay, the client stays connected, and `end_session` may be
    /// called again. [`ActionError::Closed`] when the connection ended before
    /// the bridge confirmed it (the key is kept; the client stops, as it would
    /// not resume a session the user ended), or the client was closed already.
    /// Not connected: the key is forgotten and the client closes; the bridge
    /// ends the session at its TTL.
    pub async fn end_session(&self) -> Result<(), ActionError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(driver::Cmd::EndSession(tx)).map_err(|_| ActionError::Closed)?;
        rx.await.unwrap_or(Err(ActionError::Closed))
    }

    /// Closes the connection (1000) and stops; a long-lived session stays
    /// resumable for its TTL with the stored key.
    pub fn close(&self) {
        let _ = self.cmds.send(driver::Cmd::Close);
    }
}

/// Runs `handler` for every event until the client stops; each notification
/// is acked when its handler call returns.
pub async fn run<F, Fut>(mut events: mpsc::Receiver<Event>, mut handler: F)
where
    F: FnMut(Event) -> Fut,
    Fut: Future<Output = ()>,
{
    while let Some(e) = events.recv().await {
        handler(e).await;
    }
}

/// A random (version 4) UUID.
pub fn new_uuid() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = rand::random::<u128>().to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_look_like_v4() {
        let u = super::new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let dashes: Vec<usize> = u.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23]);
        assert!(u.chars().all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{u}");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_ne!(u, super::new_uuid());
    }
}
