//! Messages between the nodes of a cluster, over Redis pub/sub: one channel
//! per node (sharded pub/sub, `SPUBLISH`, on Redis Cluster, so a message
//! costs the one shard its channel lives on, not the whole cluster).
//!
//! Pub/sub delivers at most once: a message published while a node's
//! subscription is down is gone. So nothing that must survive travels only
//! here: a long-lived session's notifications are in its durable mailbox
//! before its node is told, and whenever the subscription may have missed
//! something (it came back, or the node fell behind reading it) the receiver
//! is told to [`Inbound::Resync`] from the store.

use crate::kv::{self, Kv, KvError};
use crate::model::Notification;
use cceb_protocol::NotificationType;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A notification as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub ty: NotificationType,
    pub uuid: String,
    pub data: Box<str>,
}

impl From<&Notification> for Carried {
    fn from(n: &Notification) -> Self {
        Carried { ty: n.ty, uuid: n.uuid.clone(), data: n.data.clone() }
    }
}

impl From<Carried> for Notification {
    fn from(c: Carried) -> Self {
        Notification { ty: c.ty, uuid: c.uuid, data: c.data }
    }
}

/// What one node tells another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// A notification for the agent's sessions attached on the receiving
    /// node: at `seqs` (session id, seq) in long-lived sessions' mailboxes,
    /// where it is durable already; and to its short-lived sessions when
    /// `short_lived`.
    Agent { tenant: String, agent: String, n: Carried, seqs: Vec<(String, u64)>, short_lived: bool },
    /// A tenant-wide notification for the tenant's short-lived sessions on
    /// the receiving node (long-lived ones get theirs as `Agent`).
    Tenant { tenant: String, n: Carried },
    /// The session was attached elsewhere under `generation`: the receiving
    /// node's connection to it is taken over.
    Takeover { session: String, generation: u64 },
}

/// What a node receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Message(Message),
    /// Messages may have been missed: read what must not be lost (attached
    /// long-lived sessions' mailboxes) from the store again.
    Resync,
}

#[derive(Debug, thiserror::Error)]
#[error("relay: {0}")]
pub struct RelayError(#[from] redis::RedisError);

impl RelayError {
    pub fn kind(&self) -> crate::fault::ErrorKind {
        kv::error_kind(&self.0)
    }
}

/// Sends to other nodes; [`Relay::start`] also subscribes this node.
#[derive(Clone)]
pub struct Relay {
    conn: kv::Conn,
    kv: Kv,
    sharded: bool,
}

/// Messages a node holds before the handler takes them; past it, they are
/// dropped and a [`Inbound::Resync`] follows.
const INBOX: usize = 65_536;

impl Relay {
    /// Subscribes `node` to its channel and returns what it receives. The
    /// subscription is renewed after any disconnection (then a `Resync`);
    /// `liveness` is how often it is checked when nothing arrives. Its task
    /// ends with `stop`.
    pub async fn start(
        kv: &Kv,
        node: &str,
        liveness: Duration,
        timeout: Duration,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(Relay, mpsc::Receiver<Inbound>), KvError> {
        let (tx, rx) = mpsc::channel(INBOX);
        let missed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let sender = {
            let (tx, missed, dropped) = (tx.clone(), missed.clone(), dropped.clone());
            move |info: PushInfo| -> Result<(), ()> {
                if matches!(info.kind, PushKind::Unsubscribe | PushKind::SUnsubscribe) {
                    // The server dropped the subscription (a slot moved to another
                    // shard): the client will not renew it by itself.
                    dropped.store(true, Ordering::SeqCst);
                }
                on_push(&tx, &missed, info);
                Ok(())
            }
        };
        let channel = channel_of(kv, node);
        let url = kv.urls().join(",");
        let connect_err = |source| KvError::Connect { url: url.clone(), source };
        let mut subscriber = if kv.is_cluster() {
            let client = ClusterClient::builder(kv.urls().iter().map(String::as_str))
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(sender)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(connect_err)?;
            let mut conn = client.get_async_connection().await.map_err(connect_err)?;
            conn.ssubscribe(&channel).await.map_err(connect_err)?;
            Subscriber::Cluster(conn)
        } else {
            let info = kv.urls()[0].as_str().into_connection_info().map_err(connect_err)?;
            let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
            let client = redis::Client::open(info.set_redis_settings(resp3)).map_err(connect_err)?;
            let config = ConnectionManagerConfig::new()
                .set_push_sender(sender)
                .set_automatic_resubscription()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(timeout))
                .set_number_of_retries(1);
            let mut conn = ConnectionManager::new_with_config(client, config).await.map_err(connect_err)?;
            conn.subscribe(&channel).await.map_err(connect_err)?;
            Subscriber::Single(conn)
        };
        // Nothing is sent on a subscribed connection otherwise: a ping makes a
        // dropped one reconnect (and resubscribe), and a failed one means
        // messages may be lost meanwhile.
        tasks.spawn(async move {
            let mut down = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(liveness) => {}
                }
                let mut ok = subscriber.ping().await;
                if ok && dropped.swap(false, Ordering::SeqCst) {
                    ok = subscriber.subscribe(&channel).await;
                    if !ok {
                        dropped.store(true, Ordering::SeqCst);
                    }
                    // Whatever came meanwhile is gone.
                    missed.store(true, Ordering::SeqCst);
                }
                if ok && (down || missed.swap(false, Ordering::SeqCst)) && tx.try_send(Inbound::Resync).is_err() {
                    missed.store(true, Ordering::SeqCst);
                }
                down = !ok;
            }
        });
        Ok((Relay { conn: kv.conn(), kv: kv.clone(), sharded: kv.is_cluster() }, rx))
    }

    /// Publishes `message` on `node`'s channel; returns how many subscribers
    /// got it (0: the node is not listening now).
    pub async fn send(&self, node: &str, message: &Message) -> Result<usize, RelayError> {
        // Strings, numbers and an enum tag: serialising cannot fail.
        let text = serde_json::to_string(message).unwrap_or_default();
        let mut conn = self.conn.clone();
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        Ok(redis::cmd(command).arg(channel_of(&self.kv, node)).arg(text).query_async(&mut conn).await?)
    }
}

/// The connection a node's subscription lives on.
enum Subscriber {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Subscriber {
    async fn ping(&mut self) -> bool {
        let ping = redis::cmd("PING");
        match self {
            Subscriber::Single(c) => ping.query_async::<Value>(c).await.is_ok(),
            Subscriber::Cluster(c) => ping.query_async::<Value>(c).await.is_ok(),
        }
    }

    async fn subscribe(&mut self, channel: &str) -> bool {
        match self {
            Subscriber::Single(c) => c.subscribe(channel).await.is_ok(),
            Subscriber::Cluster(c) => c.ssubscribe(channel).await.is_ok(),
        }
    }
}

fn channel_of(kv: &Kv, node: &str) -> String {
    kv.key(&format!("{{node:{}}}:inbox", kv::agent_tag("node", node)))
}

/// Runs on the connection's read loop: never blocks. A message that does not
/// fit, or a subscription renewed after a disconnection, asks for a resync.
fn on_push(tx: &mpsc::Sender<Inbound>, missed: &AtomicBool, info: PushInfo) {
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            let Some(message) = info.data.last().and_then(decode) else {
                tracing::warn!("an unreadable message on this node's relay channel");
                return;
            };
            if tx.try_send(Inbound::Message(message)).is_err() {
                missed.store(true, Ordering::SeqCst);
            }
        }
        PushKind::Disconnection => missed.store(true, Ordering::SeqCst),
        PushKind::Subscribe | PushKind::SSubscribe
            if missed.swap(false, Ordering::SeqCst) && tx.try_send(Inbound::Resync).is_err() =>
        {
            missed.store(true, Ordering::SeqCst);
        }
        _ => {}
    }
}

fn decode(v: &Value) -> Option<Message> {
    match v {
        Value::BulkString(bytes) => serde_json::from_slice(bytes).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried() -> Carried {
        Carried { ty: NotificationType::Presence, uuid: "u-1".into(), data: r#"{"state":"READY"}"#.into() }
    }

    #[test]
    fn messages_read_back_as_they_were_sent() {
        let messages = [
            Message::Agent {
                tenant: "t".into(),
                agent: "a".into(),
                n: carried(),
                seqs: vec![("s-1".into(), 7)],
                short_lived: true,
            },
            Message::Tenant { tenant: "t".into(), n: carried() },
            Message::Takeover { session: "s-1".into(), generation: 3 },
        ];
        for m in messages {
            let text = serde_json::to_vec(&m).expect("json");
            assert_eq!(decode(&Value::BulkString(text)), Some(m));
        }
    }

    #[test]
    fn a_push_that_is_not_a_message_of_ours_is_ignored_and_a_full_inbox_asks_for_a_resync() {
        let (tx, mut rx) = mpsc::channel(1);
        let missed = AtomicBool::new(false);
        let push = |kind, data: Vec<Value>| PushInfo { kind, data };
        on_push(&tx, &missed, push(PushKind::Message, vec![Value::BulkString(b"not json".to_vec())]));
        on_push(&tx, &missed, push(PushKind::Message, vec![Value::Int(1)]));
        assert!(rx.try_recv().is_err() && !missed.load(Ordering::SeqCst));
        let takeover = serde_json::to_vec(&Message::Takeover { session: "s".into(), generation: 1 }).expect("json");
        on_push(&tx, &missed, push(PushKind::SMessage, vec![Value::BulkString(takeover.clone())]));
        on_push(&tx, &missed, push(PushKind::SMessage, vec![Value::BulkString(takeover)]));
        assert!(missed.load(Ordering::SeqCst), "the second did not fit");
        assert!(matches!(rx.try_recv(), Ok(Inbound::Message(Message::Takeover { .. }))));
        on_push(&tx, &missed, push(PushKind::SSubscribe, vec![]));
        assert_eq!(rx.try_recv().ok(), Some(Inbound::Resync));
        on_push(&tx, &missed, push(PushKind::Disconnection, vec![]));
        on_push(&tx, &missed, push(PushKind::Subscribe, vec![]));
        assert_eq!(rx.try_recv().ok(), Some(Inbound::Resync), "resubscribed after a disconnection");
        on_push(&tx, &missed, push(PushKind::Subscribe, vec![]));
        assert!(rx.try_recv().is_err(), "a subscription with nothing missed asks for nothing");
    }

    /// Against the Redis of `CCEB_TEST_REDIS` (one URL, or a comma-separated
    /// list of a cluster's nodes); without it there is nothing to test against.
    async fn next(inbox: &mut mpsc::Receiver<Inbound>) -> Option<Inbound> {
        tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.expect("in time")
    }

    #[tokio::test]
    async fn a_node_receives_what_is_sent_to_it_and_is_told_to_resync_after_its_subscription_dropped() {
        let Ok(url) = std::env::var("CCEB_TEST_REDIS") else { return };
        let prefix = format!("relay-test-{}", uuid::Uuid::new_v4());
        let timeout = Duration::from_secs(2);
        let kv = Kv::connect(&url, &prefix, timeout).await.expect("redis");
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let liveness = Duration::from_millis(50);
        let (relay, mut inbox) = Relay::start(&kv, "n1", liveness, timeout, stop.clone(), &tasks).await.expect("relay");
        let takeover = |generation| Message::Takeover { session: "s".into(), generation };
        assert_eq!(relay.send("n1", &takeover(1)).await.expect("sent"), 1, "one subscriber: n1");
        assert_eq!(relay.send("n2", &takeover(1)).await.expect("sent"), 0, "nobody listens for n2");
        assert_eq!(next(&mut inbox).await, Some(Inbound::Message(takeover(1))));
        // Every pub/sub connection of the server (or of each cluster node) is dropped.
        for node in url.split(',') {
            let client = redis::Client::open(node.trim()).expect("url");
            let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
            let _: Value =
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await.expect("kill");
        }
        assert_eq!(next(&mut inbox).await, Some(Inbound::Resync), "it may have missed something");
        let mut got = None;
        for generation in 2..200 {
            relay.send("n1", &takeover(generation)).await.expect("sent");
            match tokio::time::timeout(liveness, inbox.recv()).await {
                Ok(Some(Inbound::Message(m))) => {
                    got = Some(m);
                    break;
                }
                Ok(Some(Inbound::Resync)) | Err(_) => continue,
                Ok(None) => break,
            }
        }
        assert!(matches!(got, Some(Message::Takeover { .. })), "subscribed again: {got:?}");
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
