//! One client WebSocket: `hello`, then the loop that reads client messages,
//! writes notifications, redelivers, heartbeats and closes. This is the only
//! place where errors become wire errors and close codes.

use crate::actions::{ActionError, Actions, Done};
use crate::auth::{Identity, Verifier};
use crate::metrics::Metrics;
use crate::session::{AgentId, Attachment, Due, Held, OpenError, OpenRequest, Session, Sessions, TokenBucket};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use cceb_protocol::outgoing::{self, AgentRef, HelloReply};
use cceb_protocol::{close, parse_client_message, ClientMessage, ErrorCode, ParseError, TraceParent};
use futures_util::future::BoxFuture;
use futures_util::SinkExt;
use serde_json::{Map, Value as Json};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// What every connection is given, and all it is given: built once by `app`.
pub struct Context {
    /// Checks the token of `hello`.
    pub verifier: Arc<Verifier>,
    /// Opens, resumes and ends the connection's session.
    pub sessions: Arc<Sessions>,
    /// Performs the client's actions.
    pub actions: Arc<Actions>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Cancelled once, on shutdown: every connection closes with 1012.
    pub shutdown: CancellationToken,
}

/// The timeouts and limits a connection reads (from the settings, by `app`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub hello_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub ack_timeout: Duration,
    /// A client that does not take a write within it is closed.
    pub write_timeout: Duration,
    /// Told to the client in `hello_reply`.
    pub session_ttl_seconds: u64,
    /// Actions queued behind the one in flight.
    pub max_pending_actions: usize,
    pub action_rate_per_second: f64,
    pub action_burst: u32,
    /// The bridge's shutdown grace period: an action in flight at shutdown
    /// may take part of it.
    pub shutdown_grace: Duration,
}

/// Longest wait for the client's answer to our close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// A deadline no connection reaches (about 30 years ahead).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(30 * 365 * 86_400)
}

/// Why the connection ends, and how it is told to the client.
#[derive(Debug, PartialEq, Eq)]
struct Close(u16, &'static str);

/// How a `hello` that got no session is answered.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    /// Sent as an `error` before the close.
    error: Option<ErrorCode>,
    close: Close,
}

/// Decided by the failure's kind, never its text. Every store failure closes
/// with 1012: the contract has no other close for it, and another node (or
/// this one, later) may serve the client; the reason tells a store that will
/// not recover by itself, which is also logged as an error for the operator.
fn refuse_open(e: &OpenError) -> Refusal {
    let close = match e {
        OpenError::TooManySessions(_) => {
            let close = Close(close::TOO_MANY_SESSIONS, "too many sessions");
            return Refusal { error: Some(ErrorCode::TooManySessions), close };
        }
        OpenError::Store(s) if !s.is_retryable() => {
            tracing::error!(error = %e, "cannot open a session; the store will not recover by itself");
            Close(close::SERVICE_RESTART, "sessions are unavailable on this node")
        }
        OpenError::Store(_) | OpenError::EndedAtOnce => {
            tracing::warn!(error = %e, "cannot open a session");
            Close(close::SERVICE_RESTART, "sessions are unavailable, reconnect")
        }
    };
    Refusal { error: None, close }
}

type ActionFuture = BoxFuture<'static, (String, Result<Done, ActionError>)>;

struct PendingAction {
    uuid: String,
    action: String,
    details: Map<String, Json>,
    traceparent: Option<TraceParent>,
}

/// Counts a connection in the gauge for as long as its task lives, however it ends.
struct Counted(Arc<Metrics>);

impl Counted {
    fn new(metrics: Arc<Metrics>) -> Self {
        metrics.connection_opened();
        Counted(metrics)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

pub async fn run(ws: WebSocket, cx: Arc<Context>) {
    let _counted = Counted::new(cx.metrics.clone());
    let mut conn = Conn { ws, cx, last_seen: Instant::now() };
    let end = match conn.hello().await {
        Ok(Some((held, identity))) => {
            let end = conn.serve(&held.session, &held.attachment, &identity).await;
            drop(held);
            end
        }
        Ok(None) => None,
        Err(close) => Some(close),
    };
    match end {
        Some(Close(code, reason)) => conn.close(code, reason).await,
        // The client closed: flush tungstenite's queued answer to its close frame.
        None => {
            let _ = tokio::time::timeout(CLOSE_LINGER, conn.ws.flush()).await;
        }
    }
}

struct Conn {
    ws: WebSocket,
    cx: Arc<Context>,
    last_seen: Instant,
}

/// One read from the client, classified.
enum Frame {
    Text(Utf8Bytes),
    /// Ping or pong: nothing to answer (tungstenite answers pings itself).
    Control,
    /// The client closed or the connection broke.
    Gone,
}

/// What woke the main loop.
enum Step {
    Frame(Option<Result<Message, axum::Error>>),
    ActionDone(String, Result<Done, ActionError>),
    Wake,
    Heartbeat,
    /// The timer fired before anything was due: armed again at the next deadline.
    Rearm,
    Stop(Close),
}

impl Conn {
    /// Waits for `hello`, authenticates it and opens (or resumes) the
    /// session. `Ok(None)`: the client left.
    async fn hello(&mut self) -> Result<Option<(Held, Identity)>, Close> {
        let deadline = Instant::now() + self.cx.limits.hello_timeout;
        loop {
            let frame = tokio::select! {
                _ = self.cx.shutdown.cancelled() => return Err(Close(close::SERVICE_RESTART, "server restarting")),
                _ = sleep_until(deadline) => return Err(Close(close::HELLO_TIMEOUT, "no hello in time")),
                f = self.ws.recv() => f,
            };
            let text = match self.classify(frame)? {
                Frame::Text(text) => text,
                Frame::Control => continue,
                Frame::Gone => return Ok(None),
            };
            let (uuid, hello) = match parse_client_message(&text) {
                Ok(ClientMessage::Hello { uuid, hello }) => (uuid, hello),
                Ok(other) => {
                    let uuid = other.uuid().to_owned();
                    self.send_error(&uuid, ErrorCode::NotAuthenticated, "the first message must be `hello`", None)
                        .await;
                    return Err(Close(close::UNAUTHORIZED, "not authenticated"));
                }
                Err(e) => {
                    self.send_parse_error(&e).await;
                    return Err(Close(close::UNAUTHORIZED, "not authenticated"));
                }
            };
            let identity = match self.cx.verifier.verify(&hello.token).await {
                Ok(id) => id,
                Err(e) => {
                    tracing::debug!(error = %e, "hello refused");
                    self.send_error(&uuid, ErrorCode::Unauthorized, &e.to_string(), None).await;
                    return Err(Close(close::UNAUTHORIZED, "unauthorized"));
                }
            };
            if hello.tenant_guid.as_deref().is_some_and(|t| t != identity.tenant_guid) {
                self.send_error(
                    &uuid,
                    ErrorCode::Unauthorized,
                    "the token does not serve that tenant",
                    Some("data.tenant_guid"),
                )
                .await;
                return Err(Close(close::UNAUTHORIZED, "unauthorized"));
            }
            let agent = AgentId {
                tenant_guid: identity.tenant_guid.as_str().into(),
                agent_guid: identity.agent_guid.as_str().into(),
                ir_instance: identity.ir_instance.as_str().into(),
            };
            let push_token = hello.push.filter(|p| p.provider == "webhook").map(|p| p.token);
            let request = OpenRequest {
                long_lived: hello.long_lived,
                session_key: hello.session_key,
                auto_accept: hello.auto_accept,
                push_token,
                shutdown: self.cx.shutdown.clone(),
            };
            let opened = match self.cx.sessions.open(agent, request).await {
                Ok(o) => o,
                Err(e) => {
                    let refusal = refuse_open(&e);
                    if let Some(code) = refusal.error {
                        self.send_error(&uuid, code, &e.to_string(), None).await;
                    }
                    return Err(refusal.close);
                }
            };
            let (session, attachment) = (&opened.held.session, &opened.held.attachment);
            let l = &self.cx.limits;
            let reply = HelloReply {
                session_id: session.id.to_string(),
                session_key: opened.key,
                resumed: opened.resumed,
                long_lived: session.is_long_lived(),
                auto_accept: session.auto_accept(),
                session_ttl_seconds: l.session_ttl_seconds,
                heartbeat_interval_seconds: l.heartbeat_interval.as_secs().max(1),
                agent: AgentRef {
                    tenant_guid: identity.tenant_guid.clone(),
                    agent_guid: identity.agent_guid.clone(),
                    ir_instance: identity.ir_instance.clone(),
                },
                dropped: opened.resumed.then_some(attachment.dropped),
            };
            self.send(outgoing::hello_reply(&uuid, &reply)).await?;
            tracing::debug!(session = %session.id, resumed = opened.resumed, tenant = %identity.tenant_guid, agent = %identity.agent_guid, "hello");
            return Ok(Some((opened.held, identity)));
        }
    }

    async fn serve(&mut self, session: &Arc<Session>, attachment: &Attachment, identity: &Identity) -> Option<Close> {
        let limits = &self.cx.limits;
        let (ack_timeout, hb, max_pending) =
            (limits.ack_timeout, limits.heartbeat_interval, limits.max_pending_actions);
        // A validly signed `exp` may lie centuries ahead: past what an Instant can hold, no expiry timer fires.
        let token_expiry = Instant::now().checked_add(self.cx.verifier.remaining(identity)).unwrap_or_else(far_future);
        let mut next_beat = Instant::now() + hb;
        let mut redeliver_at: Option<Instant> = None;
        let mut in_flight: Option<ActionFuture> = None;
        let mut pending: VecDeque<PendingAction> = VecDeque::new();
        let mut due = Vec::new();
        let mut bucket =
            TokenBucket::new(limits.action_rate_per_second, limits.action_burst, Instant::now().into_std());
        // Made once, not per turn of the loop: each turn is one notification or
        // ack at high rates, and each branch of the select is polled on every
        // turn. So token expiry, heartbeat and redelivery share one timer, armed
        // at the earliest of the three (profiles showed every timer polled).
        // It is moved earlier at once but never later until it fires: each
        // delivery pushes the redelivery deadline back, and a timer fired early
        // only re-arms, where moving it would cost a reset per delivery.
        let stop = attachment.stop.cancelled();
        let mut armed = next_beat.min(token_expiry);
        let mut fired = false;
        let timer = sleep_until(armed);
        tokio::pin!(stop, timer);
        loop {
            let deadline = redeliver_at.map_or(next_beat, |at| at.min(next_beat)).min(token_expiry);
            if fired || deadline < armed {
                timer.as_mut().reset(deadline);
                (armed, fired) = (deadline, false);
            }
            let step = tokio::select! {
                biased;
                // A shutdown cancels this child token too; `is_cancelled` on
                // the parent holds its lock until the whole cancel is done.
                _ = &mut stop => Step::Stop(if self.cx.shutdown.is_cancelled() {
                    Close(close::SERVICE_RESTART, "server restarting")
                } else {
                    Close(close::TAKEN_OVER, "session taken over")
                }),
                _ = &mut timer => {
                    fired = true;
                    let now = Instant::now();
                    if now >= token_expiry {
                        Step::Stop(Close(close::TOKEN_EXPIRED, "token expired"))
                    } else if redeliver_at.is_some_and(|at| at <= now) {
                        Step::Wake
                    } else if now >= next_beat {
                        Step::Heartbeat
                    } else {
                        Step::Rearm
                    }
                }
                (uuid, r) = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => Step::ActionDone(uuid, r),
                _ = attachment.wake.notified() => Step::Wake,
                f = self.ws.recv() => Step::Frame(f),
            };
            match step {
                Step::Stop(c) => {
                    if c.0 == close::SERVICE_RESTART {
                        self.finish_actions(in_flight.take(), &mut pending).await;
                    }
                    return Some(c);
                }
                Step::Wake => {
                    if session.overflowed() {
                        return Some(Close(close::TOO_MANY_UNACKED, "too many unacknowledged notifications"));
                    }
                    if session.has_missed() {
                        // A 1012 like a shutdown's: the action in flight is answered first.
                        self.finish_actions(in_flight.take(), &mut pending).await;
                        return Some(Close(close::SERVICE_RESTART, "notifications were lost on their way, reconnect"));
                    }
                    let taken = Instant::now().into_std();
                    let Ok(mut next) = session.take_due(attachment.generation, taken, ack_timeout, &mut due) else {
                        return Some(Close(close::TOO_MANY_UNACKED, "no ack while the window was full"));
                    };
                    if !due.is_empty() {
                        if let Err(c) = self.write_due(&mut due).await {
                            return Some(c);
                        }
                        next = session.written(attachment.generation, taken, Instant::now().into_std(), ack_timeout);
                    }
                    redeliver_at = next.map(Instant::from_std);
                }
                Step::Rearm => {}
                Step::Heartbeat => {
                    // A late beat delays the next one rather than bunching them.
                    next_beat = Instant::now() + hb;
                    if self.last_seen.elapsed() >= hb * 3 {
                        return Some(Close(close::GOING_AWAY, "heartbeat timeout"));
                    }
                    if let Err(c) = self.write(Message::Ping(Default::default())).await {
                        return Some(c);
                    }
                }
                Step::ActionDone(uuid, result) => {
                    if let Err(c) = self.answer_action(&uuid, result).await {
                        return Some(c);
                    }
                    in_flight = pending.pop_front().map(|p| self.start_action(session, p));
                }
                Step::Frame(frame) => {
                    let text = match self.classify(frame) {
                        Err(c) => return Some(c),
                        Ok(Frame::Gone) => return None,
                        Ok(Frame::Control) => continue,
                        Ok(Frame::Text(text)) => text,
                    };
                    let msg = match parse_client_message(&text) {
                        Ok(m) => m,
                        Err(e) => {
                            self.send_parse_error(&e).await;
                            continue;
                        }
                    };
                    let sent = match msg {
                        ClientMessage::Ack { uuid } => {
                            if let Some(waited) = session.ack(&uuid, Instant::now().into_std()) {
                                self.cx.metrics.acked.increment(1);
                                self.cx.metrics.notification_ack_seconds.record(waited.as_secs_f64());
                            }
                            Ok(())
                        }
                        ClientMessage::Ping { uuid } => self.send(outgoing::pong(&uuid)).await,
                        ClientMessage::Action { uuid, action, details, traceparent } => {
                            let p = PendingAction { uuid, action, details, traceparent };
                            if !bucket.try_take(Instant::now().into_std()) {
                                self.send_error(&p.uuid, ErrorCode::RateLimited, "too many actions; retry later", None)
                                    .await;
                            } else if in_flight.is_none() {
                                in_flight = Some(self.start_action(session, p));
                            } else if pending.len() < max_pending {
                                pending.push_back(p);
                            } else {
                                let msg = "too many actions waiting; retry later";
                                self.send_error(&p.uuid, ErrorCode::RateLimited, msg, None).await;
                            }
                            Ok(())
                        }
                        ClientMessage::EndSession { uuid } => {
                            match self.cx.sessions.end(session, attachment).await {
                                Ok(true) => {}
                                // Attached elsewhere since (cluster): not this connection's to end.
                                Ok(false) => return Some(Close(close::TAKEN_OVER, "session taken over")),
                                Err(e) => {
                                    self.send_error(&uuid, ErrorCode::BackendUnavailable, &e.to_string(), None).await;
                                    continue;
                                }
                            }
                            return match self.send(outgoing::ack(&uuid)).await {
                                Ok(()) => Some(Close(close::NORMAL, "session ended")),
                                Err(c) => Some(c),
                            };
                        }
                        ClientMessage::Hello { uuid, .. } => {
                            self.send_error(&uuid, ErrorCode::InvalidMessage, "already authenticated", Some("type"))
                                .await;
                            Ok(())
                        }
                    };
                    if let Err(c) = sent {
                        return Some(c);
                    }
                }
            }
        }
    }

    /// On shutdown: the action in flight finishes (within the grace period),
    /// so one published is also remembered and acknowledged, and a retry
    /// after the restart does not publish it twice; those still waiting are
    /// refused, to be retried with the same uuid.
    async fn finish_actions(&mut self, in_flight: Option<ActionFuture>, pending: &mut VecDeque<PendingAction>) {
        if let Some(action) = in_flight {
            // Within part of the grace period: the store closes after it, and a
            // dedup key written then would be lost.
            let bound = self.cx.limits.shutdown_grace * 3 / 4;
            match tokio::time::timeout(bound, action).await {
                // A client that cannot be written to is closed next anyway.
                Ok((uuid, result)) => {
                    let _ = self.answer_action(&uuid, result).await;
                }
                Err(_) => tracing::warn!("an action was still publishing when the grace period ran out"),
            }
        }
        for p in pending.drain(..) {
            let msg = "the bridge is restarting; retry with the same uuid";
            self.send_error(&p.uuid, ErrorCode::BackendUnavailable, msg, None).await;
        }
    }

    async fn answer_action(&mut self, uuid: &str, result: Result<Done, ActionError>) -> Result<(), Close> {
        match result {
            Ok(_) => self.send(outgoing::ack(uuid)).await,
            Err(e) => {
                self.send_error(uuid, e.code(), &e.to_string(), e.field()).await;
                Ok(())
            }
        }
    }

    fn start_action(&self, session: &Session, p: PendingAction) -> ActionFuture {
        let actions = self.cx.actions.clone();
        let metrics = self.cx.metrics.clone();
        let who = session.agent.clone();
        Box::pin(async move {
            let started = Instant::now();
            let r = actions.perform(&who, &p.uuid, &p.action, p.details, p.traceparent).await;
            metrics.action_seconds.record(started.elapsed().as_secs_f64());
            (p.uuid, r)
        })
    }

    /// Classifies a read; `Err` is a close to send.
    fn classify(&mut self, frame: Option<Result<Message, axum::Error>>) -> Result<Frame, Close> {
        self.last_seen = Instant::now();
        match frame {
            None | Some(Ok(Message::Close(_))) => Ok(Frame::Gone),
            Some(Ok(Message::Text(t))) => Ok(Frame::Text(t)),
            Some(Ok(Message::Binary(_))) => Err(Close(close::UNSUPPORTED_DATA, "binary frames are not accepted")),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(Frame::Control),
            Some(Err(e)) => {
                let too_big = e
                    .into_inner()
                    .downcast::<tungstenite::Error>()
                    .is_ok_and(|e| matches!(*e, tungstenite::Error::Capacity(_)));
                if too_big {
                    Err(Close(close::MESSAGE_TOO_BIG, "frame too large"))
                } else {
                    Ok(Frame::Gone)
                }
            }
        }
    }

    async fn write_due(&mut self, due: &mut Vec<Due>) -> Result<(), Close> {
        if due.is_empty() {
            return Ok(());
        }
        let (ws, cx) = (&mut self.ws, &self.cx);
        let write = async {
            for d in due.drain(..) {
                if d.redelivery {
                    cx.metrics.redelivered.increment(1);
                } else {
                    cx.metrics.sent(d.n.ty);
                }
                ws.feed(Message::Text(outgoing::notification(d.n.ty, &d.n.uuid, d.seq, &d.n.data).into())).await?;
            }
            ws.flush().await
        };
        match tokio::time::timeout(cx.limits.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Close(close::GOING_AWAY, "client does not read")),
        }
    }

    async fn write(&mut self, msg: Message) -> Result<(), Close> {
        match tokio::time::timeout(self.cx.limits.write_timeout, self.ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Close(close::GOING_AWAY, "client does not read")),
        }
    }

    async fn send(&mut self, text: String) -> Result<(), Close> {
        self.write(Message::Text(text.into())).await
    }

    async fn send_error(&mut self, uuid: &str, code: ErrorCode, message: &str, field: Option<&str>) {
        self.cx.metrics.error(code);
        // A client that does not read its errors is closed by the next write that times out.
        let _ = self.send(outgoing::error(uuid, code, message, field)).await;
    }

    async fn send_parse_error(&mut self, e: &ParseError) {
        let uuid = e.uuid.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        self.send_error(&uuid, e.code, &e.message, e.field.as_deref()).await;
    }

    /// Sends the close frame, then reads until the client answers (or a short
    /// linger passes) so unread input does not turn the close into a reset.
    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame { code, reason: reason.into() };
        if self.write(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(m)) = self.ws.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::ErrorKind;
    use crate::store::StoreError;

    #[test]
    fn a_hello_without_a_session_is_answered_by_the_kind_of_failure() {
        let store = |kind| refuse_open(&OpenError::Store(StoreError::new(kind, "disk")));
        let reconnect = Close(close::SERVICE_RESTART, "sessions are unavailable, reconnect");
        for kind in [ErrorKind::Unavailable, ErrorKind::Timeout] {
            assert_eq!(store(kind), Refusal { error: None, close: Close(reconnect.0, reconnect.1) }, "{kind:?}");
        }
        for kind in [ErrorKind::Rejected, ErrorKind::Fatal] {
            let close = Close(close::SERVICE_RESTART, "sessions are unavailable on this node");
            assert_eq!(store(kind), Refusal { error: None, close }, "{kind:?}");
        }
        assert_eq!(refuse_open(&OpenError::EndedAtOnce), Refusal { error: None, close: reconnect });
        let full = Refusal {
            error: Some(ErrorCode::TooManySessions),
            close: Close(close::TOO_MANY_SESSIONS, "too many sessions"),
        };
        assert_eq!(refuse_open(&OpenError::TooManySessions(3)), full);
    }
}
