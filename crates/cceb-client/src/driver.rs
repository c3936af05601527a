//! The task behind a [`crate::Client`]: one connection at a time, commands
//! from the handle, events to the application.

use crate::policy::{retry_action, Backoff, Delivery, Reconnect, ReconnectPolicy, Seen};
use crate::{AckOnDrop, ActionError, Config, Connection, Error, Event, KeyStore, Notification, State, TokenFn};
use cceb_protocol::close;
use cceb_protocol::incoming::{ClientInfo, ClientMessage, Hello};
use cceb_protocol::outgoing::ServerMessage;
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

pub(crate) enum Cmd {
    Action(PendingAction),
    /// The handle gave up waiting (deadline).
    Forget(String),
    /// The application is done with a notification.
    Ack(String),
    Close,
    EndSession(EndReply),
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

pub(crate) struct PendingAction {
    pub uuid: String,
    pub action: String,
    pub details: Map<String, Value>,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<(), ActionError>>,
}

struct Slot {
    a: PendingAction,
    /// Set after a transient refusal: when to send it again.
    retry_at: Option<Instant>,
    retries: Backoff,
}

/// The `end_session` in flight.
struct Ending {
    uuid: String,
    /// The bridge acked it: the session is gone, the close 1000 follows.
    acked: bool,
    replies: Vec<EndReply>,
}

type EndReply = oneshot::Sender<Result<(), ActionError>>;

/// How one connection attempt ended.
enum Ended {
    /// Reconnect or stop as the close code says (`None`: no close frame).
    Closed { code: Option<u16>, reason: String },
    /// Stop now, whatever the code.
    Stop { code: Option<u16>, reason: String },
}

struct Driver {
    cfg: Config,
    token_fn: Arc<TokenFn>,
    keys: Arc<dyn KeyStore>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    /// For the notifications' ack guards; weak, so that `recv` ends once every handle is gone.
    cmd_tx: mpsc::WeakUnboundedSender<Cmd>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<State>,
    seen: Seen,
    actions: Vec<Slot>,
    token: Option<String>,
    endpoint: Option<String>,
    reconnects: ReconnectPolicy,
    /// When the current connection got its `hello_reply`.
    connected_at: Option<Instant>,
    ending: Option<Ending>,
    /// What the `end_session` callers are told once the client is closed.
    end_replies: Vec<(EndReply, Result<(), ActionError>)>,
}

pub(crate) async fn run(
    cfg: Config,
    token_fn: Arc<TokenFn>,
    keys: Arc<dyn KeyStore>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<State>,
) {
    let mut d = Driver {
        seen: Seen::new(cfg.seen_capacity),
        reconnects: ReconnectPolicy::new(
            Backoff::new(cfg.backoff_min, cfg.backoff_max),
            cfg.stable_after,
            EXPIRED_TOKEN_RETRIES,
        ),
        connected_at: None,
        ending: None,
        end_replies: Vec::new(),
        endpoint: is_ws(&cfg.url).then(|| cfg.url.clone()),
        cfg,
        token_fn,
        keys,
        cmds,
        cmd_tx: cmd_tx.downgrade(),
        events,
        state,
        actions: Vec::new(),
        token: None,
    };
    drop(cmd_tx);
    let (code, reason) = d.main().await;
    d.set_state(State::Closed).await;
    for s in d.actions.drain(..) {
        let _ = s.a.reply.send(Err(ActionError::Closed));
    }
    for (tx, r) in d.end_replies.drain(..) {
        let _ = tx.send(r);
    }
    let _ = d.events.send(Event::Closed { code, reason }).await;
}

/// How many times in a row a 4001 right after a 4002 refresh is retried
/// (the token provider may be a moment behind).
const EXPIRED_TOKEN_RETRIES: u32 = 3;

fn is_ws(url: &str) -> bool {
    url.starts_with("ws://") || url.starts_with("wss://")
}

impl Driver {
    async fn main(&mut self) -> (Option<u16>, String) {
        loop {
            self.set_state(State::Connecting).await;
            self.connected_at = None;
            let end = self.connection().await;
            let lived = self.connected_at.map(|t| t.elapsed());
            let (code, reason, by_client) = match end {
                Ended::Stop { code, reason } => (code, reason, true),
                Ended::Closed { code, reason } => (code, reason, false),
            };
            if let Some(e) = self.ending.take() {
                // However the connection ended, the client stops: no new session behind the user's back.
                // Ended: the ack, or the bridge's close 1000 that follows it.
                let confirmed = e.acked || (!by_client && code == Some(close::NORMAL));
                if confirmed {
                    self.keys.store(None);
                }
                let r = if confirmed { Ok(()) } else { Err(ActionError::Closed) };
                self.end_replies.extend(e.replies.into_iter().map(|tx| (tx, r.clone())));
                if !by_client {
                    self.set_state(State::Disconnected { code }).await;
                }
                return (code, reason);
            }
            if by_client {
                return (code, reason);
            }
            self.set_state(State::Disconnected { code }).await;
            match self.reconnects.ended(code, lived) {
                Reconnect::Stop => return (code, reason),
                Reconnect::After { delay, rediscover, refresh_token } => {
                    if rediscover && !is_ws(&self.cfg.url) {
                        self.endpoint = None;
                    }
                    if refresh_token {
                        self.token = None;
                    }
                    if !delay.is_zero() {
                        if let Some(stop) = self.idle(delay).await {
                            return stop;
                        }
                    }
                }
            }
        }
    }

    async fn set_state(&mut self, s: State) {
        self.state.send_replace(s.clone());
        // Nobody reading events is allowed: the client still works.
        let _ = self.events.send(Event::State(s)).await;
    }

    /// Waits `delay` before the next attempt, taking commands meanwhile.
    async fn idle(&mut self, delay: std::time::Duration) -> Option<(Option<u16>, String)> {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return None,
                cmd = self.cmds.recv() => match cmd {
                    None => return Some((None, "every client handle was dropped".into())),
                    Some(Cmd::Action(a)) => self.push_action(a),
                    Some(Cmd::Forget(u)) => self.actions.retain(|s| s.a.uuid != u),
                    // The connection that carried it is gone; a redelivery is acked again.
                    Some(Cmd::Ack(u)) => self.seen.finished(&u),
                    Some(Cmd::Close) => return Some((None, "closed by the client".into())),
                    // Not connected: the key is forgotten; the bridge ends the session at its TTL.
                    Some(Cmd::EndSession(tx)) => {
                        self.keys.store(None);
                        self.end_replies.push((tx, Ok(())));
                        return Some((None, "closed by the client".into()));
                    }
                },
            }
        }
    }

    fn push_action(&mut self, a: PendingAction) {
        let retries = Backoff::new(self.cfg.action_retry_min, self.cfg.backoff_max);
        self.actions.push(Slot { a, retry_at: None, retries });
    }

    async fn token(&mut self) -> Result<String, String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let t = tokio::time::timeout(self.cfg.connect_timeout, (self.token_fn)())
            .await
            .map_err(|_| "the token provider did not answer in time".to_owned())??;
        self.token = Some(t.clone());
        Ok(t)
    }

    async fn discover(&self, token: &str) -> Result<String, Ended> {
        let transient = |reason: String| Ended::Closed { code: None, reason };
        let http = reqwest::Client::builder()
            .timeout(self.cfg.connect_timeout)
            .build()
            .map_err(|e| transient(format!("discovery: {e}")))?;
        let r = http
            .get(&self.cfg.url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| transient(format!("discovery: {e}")))?;
        let status = r.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Ended::Stop { code: None, reason: "discovery refused the token (401)".into() });
        }
        if !status.is_success() {
            return Err(transient(format!("discovery answered {status}")));
        }
        let body: Value = r.json().await.map_err(|e| transient(format!("discovery: {e}")))?;
        body["endpoint"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| transient("discovery: no `endpoint` in the answer".into()))
    }

    async fn connection(&mut self) -> Ended {
        let token = match self.token().await {
            Ok(t) => t,
            Err(e) => return Ended::Closed { code: None, reason: format!("token provider: {e}") },
        };
        let endpoint = match &self.endpoint {
            Some(e) => e.clone(),
            None => match self.discover(&token).await {
                Ok(e) => {
                    self.endpoint = Some(e.clone());
                    e
                }
                Err(end) => return end,
            },
        };
        let connect = tokio::time::timeout(self.cfg.connect_timeout, Connection::connect(&endpoint));
        let mut conn = match connect.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Ended::Closed { code: None, reason: format!("connect {endpoint}: {e}") },
            Err(_) => return Ended::Closed { code: None, reason: format!("connect {endpoint}: timed out") },
        };
        let hello = Hello {
            token,
            tenant_guid: self.cfg.tenant_guid.clone(),
            long_lived: self.cfg.long_lived,
            session_key: self.keys.load(),
            auto_accept: self.cfg.auto_accept,
            push: None,
            client: Some(ClientInfo { name: self.cfg.client_name.clone(), version: self.cfg.client_version.clone() }),
        };
        let reply = match tokio::time::timeout(self.cfg.connect_timeout, conn.hello(&hello)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return ended(e),
            Err(_) => return Ended::Closed { code: None, reason: "no hello_reply in time".into() },
        };
        if reply.session_key.is_some() || !self.cfg.long_lived {
            self.keys.store(reply.session_key.clone());
        }
        self.connected_at = Some(Instant::now());
        self.set_state(State::Connected { session_id: reply.session_id.clone(), resumed: reply.resumed }).await;
        // Everything not yet acknowledged goes again, same uuids, in the order it was asked for.
        for i in 0..self.actions.len() {
            self.actions[i].retry_at = None;
            if let Err(e) = send_action(&mut conn, &self.actions[i].a).await {
                return ended(e);
            }
        }
        self.serve(&mut conn).await
    }

    async fn serve(&mut self, conn: &mut Connection) -> Ended {
        loop {
            let retry = self.actions.iter().filter_map(|s| s.retry_at).min();
            tokio::select! {
                msg = conn.next() => match msg {
                    Ok(m) => {
                        if let Err(end) = self.on_message(conn, m).await {
                            return end;
                        }
                    }
                    // A newer bridge may send what this client does not know: ignore it.
                    Err(Error::Protocol(_)) => {}
                    Err(e) => return ended(e),
                },
                cmd = self.cmds.recv() => {
                    let sent = match cmd {
                        None => {
                            let _ = conn.close(1000, "client gone").await;
                            return Ended::Stop { code: None, reason: "every client handle was dropped".into() };
                        }
                        Some(Cmd::Ack(u)) => {
                            self.seen.finished(&u);
                            conn.ack(&u).await
                        }
                        Some(Cmd::Action(a)) => {
                            let r = send_action(conn, &a).await;
                            self.push_action(a);
                            r
                        }
                        Some(Cmd::Forget(u)) => {
                            self.actions.retain(|s| s.a.uuid != u);
                            Ok(())
                        }
                        Some(Cmd::EndSession(tx)) => match &mut self.ending {
                            // One in flight: its outcome is this caller's too.
                            Some(e) => {
                                e.replies.push(tx);
                                Ok(())
                            }
                            None => {
                                // The key is forgotten once the bridge confirms (ack, or its close 1000).
                                let uuid = crate::new_uuid();
                                self.ending = Some(Ending { uuid: uuid.clone(), acked: false, replies: vec![tx] });
                                conn.send(&ClientMessage::EndSession { uuid }).await
                            }
                        },
                        Some(Cmd::Close) => {
                            let _ = conn.close(1000, "client closed").await;
                            return Ended::Stop { code: Some(1000), reason: "closed by the client".into() };
                        }
                    };
                    if let Err(e) = sent {
                        return ended(e);
                    }
                }
                _ = sleep_until(retry) => {
                    let now = Instant::now();
                    for i in 0..self.actions.len() {
                        if self.actions[i].retry_at.is_some_and(|t| t <= now) {
                            self.actions[i].retry_at = None;
                            if let Err(e) = send_action(conn, &self.actions[i].a).await {
                                return ended(e);
                            }
                        }
                    }
                }
            }
        }
    }

    async fn on_message(&mut self, conn: &mut Connection, msg: ServerMessage) -> Result<(), Ended> {
        match msg {
            ServerMessage::Notification { ty, uuid, seq, data } => match self.seen.offer(&uuid) {
                Delivery::Handle => {
                    let Some(cmds) = self.cmd_tx.upgrade() else {
                        return Err(Ended::Stop { code: None, reason: "every client handle was dropped".into() });
                    };
                    let ack = AckOnDrop { uuid: uuid.clone(), cmds };
                    // A closed receiver drops the notification here, which acks it.
                    let _ =
                        self.events.send(Event::Notification(Notification { ty, uuid, seq, data, _ack: ack })).await;
                }
                Delivery::AckAgain => conn.ack(&uuid).await.map_err(ended)?,
                Delivery::Ignore => {}
            },
            ServerMessage::Ack { uuid } => {
                if let Some(e) = self.ending.as_mut().filter(|e| e.uuid == uuid) {
                    e.acked = true;
                    self.keys.store(None);
                } else if let Some(i) = self.actions.iter().position(|s| s.a.uuid == uuid) {
                    let _ = self.actions.remove(i).a.reply.send(Ok(()));
                }
            }
            ServerMessage::Error { uuid, error } => {
                if self.ending.as_ref().is_some_and(|e| e.uuid == uuid && !e.acked) {
                    // Refused (the store cannot write, say): the session goes on, and so does the client.
                    let e = self.ending.take().into_iter().flat_map(|e| e.replies);
                    for tx in e {
                        let _ = tx.send(Err(ActionError::Refused {
                            code: error.code,
                            message: error.message.clone(),
                            field: error.field.clone(),
                        }));
                    }
                } else if let Some(i) = self.actions.iter().position(|s| s.a.uuid == uuid) {
                    let slot = &mut self.actions[i];
                    let at = Instant::now() + slot.retries.next_delay();
                    if retry_action(error.code) && at < slot.a.deadline {
                        slot.retry_at = Some(at);
                    } else {
                        let s = self.actions.remove(i);
                        let _ = s.a.reply.send(Err(ActionError::Refused {
                            code: error.code,
                            message: error.message,
                            field: error.field,
                        }));
                    }
                }
            }
            ServerMessage::HelloReply { .. } | ServerMessage::Pong { .. } => {}
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// How a connection that failed with `e` ended.
fn ended(e: Error) -> Ended {
    match e {
        Error::Closed { code, reason } if reason.is_empty() => {
            let reason = if code.is_some() { "closed without a reason" } else { "the socket closed" };
            Ended::Closed { code, reason: reason.into() }
        }
        Error::Closed { code, reason } => Ended::Closed { code, reason },
        // The reason is the bridge's `error`: "unauthorized: …".
        Error::Refused { code, error } => Ended::Closed { code, reason: format!("{}: {}", error.code, error.message) },
        e => Ended::Closed { code: None, reason: e.to_string() },
    }
}

async fn send_action(conn: &mut Connection, a: &PendingAction) -> Result<(), Error> {
    conn.action(&a.uuid, &a.action, &a.details).await
}
