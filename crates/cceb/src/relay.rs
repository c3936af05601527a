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
//!
//! What short-lived sessions get travels only here, so a node must know when
//! it missed something: every message on a node's channel carries the next
//! value of a counter of that channel, incremented in the same script that
//! publishes it. A gap in the numbers received, or a counter that ran ahead
//! of them once the subscription is back, is an [`Inbound::Lost`].

use crate::kv::{self, Kv, KvError};
use crate::model::Notification;
use cceb_protocol::NotificationType;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Script, Value};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// Messages were missed: what they carried for short-lived sessions here
    /// is gone (their clients are told to reconnect).
    Lost,
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
    publish: Script,
    /// Sends per node that failed since the last that did not (their
    /// numbers are skipped by the next one).
    failed: Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

/// Messages a node holds before the handler takes them, and their bytes;
/// past either, they are dropped and a [`Inbound::Resync`] (and
/// [`Inbound::Lost`]) follows.
const INBOX: usize = 65_536;
const INBOX_BYTES: usize = 64 << 20;

/// What a node receives, bounded in count and in bytes (a message carries a
/// notification's payload for short-lived sessions).
pub struct Inbox {
    rx: mpsc::Receiver<(Inbound, usize)>,
    bytes: Arc<AtomicUsize>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Inbound> {
        let (inbound, size) = self.rx.recv().await?;
        self.bytes.fetch_sub(size, Ordering::SeqCst);
        Some(inbound)
    }
}

/// The sending half of an [`Inbox`]: never blocks.
#[derive(Clone)]
struct Feed {
    tx: mpsc::Sender<(Inbound, usize)>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Feed {
    fn new(count: usize, max_bytes: usize) -> (Feed, Inbox) {
        let (tx, rx) = mpsc::channel(count);
        let bytes = Arc::new(AtomicUsize::new(0));
        (Feed { tx, bytes: bytes.clone(), max_bytes }, Inbox { rx, bytes })
    }

    /// Whether `inbound` (`size` bytes) fit. One message larger than the
    /// whole budget still passes into an empty inbox.
    fn put(&self, inbound: Inbound, size: usize) -> bool {
        let fits = |queued: usize| (queued == 0 || queued + size <= self.max_bytes).then_some(queued + size);
        if self.bytes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, fits).is_err() {
            return false;
        }
        if self.tx.try_send((inbound, size)).is_err() {
            self.bytes.fetch_sub(size, Ordering::SeqCst);
            return false;
        }
        true
    }
}

/// Numbers the next message of the channel (KEYS[1] its counter; ARGV[2]
/// the channel, in the same slot: a channel is not a key, and declaring it
/// one fails during a slot migration) and publishes it with ARGV[1]
/// (PUBLISH or SPUBLISH), as `<number> <message>`; returns how many
/// subscribers got it. One script, so numbers go out in the order they were
/// taken. ARGV[4] is one more than the sends to this node that failed
/// since the last that did not: their numbers are skipped, so the receiver
/// sees the gap.
const PUBLISH: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[4])
return redis.call(ARGV[1], ARGV[2], string.format('%d', n) .. ' ' .. ARGV[3])
";

/// The numbers a node received on its channel: `last` is the highest
/// (`UNKNOWN` until the first, when the counter could not be read at the
/// start); a gap means messages were missed.
struct Numbers {
    last: AtomicU64,
    lost: AtomicBool,
}

const UNKNOWN: u64 = u64::MAX;

impl Numbers {
    /// A message numbered `n` arrived. Numbers come in increasing order on
    /// one subscription: one skipped was lost, and one not above the last
    /// means the counter went back (Redis lost writes), so what it numbers
    /// again cannot be told apart.
    fn received(&self, n: u64) {
        let last = self.last.swap(n, Ordering::SeqCst);
        if last != UNKNOWN && (n > last.saturating_add(1) || n <= last) {
            self.lost.store(true, Ordering::SeqCst);
        }
    }

    /// The channel's counter is `counted`, read on the subscription's own
    /// connection: every message it numbered before the read has been
    /// received, or is lost. (A higher last is a message that came after
    /// the answer.) Unknown until now: adopted.
    fn counted(&self, counted: u64) {
        let up = |last: u64| Some(if last == UNKNOWN { counted } else { last.max(counted) });
        let last = self.last.fetch_update(Ordering::SeqCst, Ordering::SeqCst, up).unwrap_or(UNKNOWN);
        if last != UNKNOWN && last < counted {
            self.lost.store(true, Ordering::SeqCst);
        }
    }
}

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
    ) -> Result<(Relay, Inbox), KvError> {
        let (tx, rx) = Feed::new(INBOX, INBOX_BYTES);
        let missed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicBool::new(false));
        let numbers = Arc::new(Numbers { last: AtomicU64::new(UNKNOWN), lost: AtomicBool::new(false) });
        let renew = Arc::new(tokio::sync::Notify::new());
        let sender = {
            let (tx, missed, dropped, numbers) = (tx.clone(), missed.clone(), dropped.clone(), numbers.clone());
            let renew = renew.clone();
            move |info: PushInfo| -> Result<(), ()> {
                if matches!(info.kind, PushKind::Unsubscribe | PushKind::SUnsubscribe) {
                    // The server dropped the subscription (a slot moved to another
                    // shard): the client will not renew it by itself. At once,
                    // not at the next heartbeat: what comes meanwhile is lost.
                    dropped.store(true, Ordering::SeqCst);
                    renew.notify_one();
                }
                on_push(&tx, &missed, &numbers, info);
                Ok(())
            }
        };
        let channel = channel_of(kv, node);
        let counter = counter_of(kv, node);
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
        // Numbers up to the counter now were published before this subscription.
        if let Some(n) = subscriber.counter(&counter).await {
            numbers.counted(n);
        }
        // Nothing is sent on a subscribed connection otherwise: a ping makes a
        // dropped one reconnect (and resubscribe), and a failed one means
        // messages may be lost meanwhile. Each turn also compares the
        // channel's counter with what arrived.
        tasks.spawn(async move {
            let mut down = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(liveness) => {}
                    _ = renew.notified() => {}
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
                if ok {
                    if let Some(n) = subscriber.counter(&counter).await {
                        numbers.counted(n);
                    }
                }
                if numbers.lost.swap(false, Ordering::SeqCst) {
                    // Long-lived sessions read their mailboxes again too: the
                    // wake-up of an entry may have been among what was lost.
                    missed.store(true, Ordering::SeqCst);
                    if !tx.put(Inbound::Lost, 0) {
                        numbers.lost.store(true, Ordering::SeqCst);
                    }
                }
                if ok && (down || missed.swap(false, Ordering::SeqCst)) && !tx.put(Inbound::Resync, 0) {
                    missed.store(true, Ordering::SeqCst);
                }
                down = !ok;
            }
        });
        let failed = Arc::new(std::sync::Mutex::new(HashMap::new()));
        Ok((Relay { conn: kv.conn(), kv: kv.clone(), publish: Script::new(PUBLISH), failed }, rx))
    }

    /// Publishes `message` on `node`'s channel; returns how many subscribers
    /// got it (0: the node is not listening now).
    pub async fn send(&self, node: &str, message: &Message) -> Result<usize, RelayError> {
        // Strings, numbers and an enum tag: serialising cannot fail.
        let text = serde_json::to_string(message).unwrap_or_default();
        let command = if self.kv.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let skipped = crate::sync::lock(&self.failed).get(node).copied().unwrap_or(0);
        let mut inv = self.publish.key(counter_of(&self.kv, node));
        inv.arg(command).arg(channel_of(&self.kv, node)).arg(text).arg(skipped + 1);
        let sent = inv.invoke_async(&mut self.conn.clone()).await;
        let mut failed = crate::sync::lock(&self.failed);
        match sent {
            Ok(heard) => {
                // Failures counted meanwhile (concurrent sends) stay for the next.
                if let Some(left) = failed.get_mut(node) {
                    *left = left.saturating_sub(skipped);
                    if *left == 0 {
                        failed.remove(node);
                    }
                }
                Ok(heard)
            }
            Err(e) => {
                // Bounded by the nodes ever sent to: the ids of a cluster.
                *failed.entry(node.to_owned()).or_default() += 1;
                Err(e.into())
            }
        }
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

    /// The channel's counter, read on this connection: its answer comes after
    /// every message published before it (0 when nothing ever was).
    async fn counter(&mut self, key: &str) -> Option<u64> {
        let get = redis::cmd("GET").arg(key).clone();
        let read = match self {
            Subscriber::Single(c) => get.query_async::<Option<u64>>(c).await,
            Subscriber::Cluster(c) => get.query_async::<Option<u64>>(c).await,
        };
        read.ok().map(|n| n.unwrap_or(0))
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

/// The number of the last message published on `node`'s channel (same slot).
fn counter_of(kv: &Kv, node: &str) -> String {
    kv.key(&format!("{{node:{}}}:sent", kv::agent_tag("node", node)))
}

/// Runs on the connection's read loop: never blocks. A message that does not
/// fit, or a subscription renewed after a disconnection, asks for a resync.
fn on_push(tx: &Feed, missed: &AtomicBool, numbers: &Numbers, info: PushInfo) {
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            let raw = info.data.last();
            let Some((n, message)) = raw.and_then(decode) else {
                tracing::warn!("an unreadable message on this node's relay channel");
                return;
            };
            numbers.received(n);
            let size = match raw {
                Some(Value::BulkString(b)) => b.len(),
                _ => 0,
            };
            if !tx.put(Inbound::Message(message), size) {
                missed.store(true, Ordering::SeqCst);
                numbers.lost.store(true, Ordering::SeqCst);
            }
        }
        PushKind::Disconnection => missed.store(true, Ordering::SeqCst),
        PushKind::Subscribe | PushKind::SSubscribe
            if missed.swap(false, Ordering::SeqCst) && !tx.put(Inbound::Resync, 0) =>
        {
            missed.store(true, Ordering::SeqCst);
        }
        _ => {}
    }
}

/// `<number> <message>`, as [`PUBLISH`] makes it.
fn decode(v: &Value) -> Option<(u64, Message)> {
    let Value::BulkString(bytes) = v else { return None };
    let space = bytes.iter().position(|&b| b == b' ')?;
    let n = std::str::from_utf8(&bytes[..space]).ok()?.parse().ok()?;
    Some((n, serde_json::from_slice(&bytes[space + 1..]).ok()?))
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
        for (i, m) in messages.into_iter().enumerate() {
            let text = format!("{i} {}", serde_json::to_string(&m).expect("json"));
            assert_eq!(decode(&Value::BulkString(text.into_bytes())), Some((i as u64, m)));
        }
        for bad in ["", "7", "x {}", "-1 {}", "7 not json"] {
            assert_eq!(decode(&Value::BulkString(bad.as_bytes().to_vec())), None, "{bad:?}");
        }
    }

    fn numbers() -> Numbers {
        Numbers { last: AtomicU64::new(UNKNOWN), lost: AtomicBool::new(false) }
    }

    #[test]
    fn a_gap_in_the_numbers_or_a_number_again_is_a_loss() {
        let n = numbers();
        n.received(41);
        n.received(42);
        assert!(!n.lost.load(Ordering::SeqCst), "the first number, then the next");
        n.received(44);
        assert!(n.lost.swap(false, Ordering::SeqCst), "43 never came");
        n.received(45);
        assert!(!n.lost.load(Ordering::SeqCst));
        n.received(45);
        assert!(n.lost.swap(false, Ordering::SeqCst), "a number again: the counter went back");
    }

    #[test]
    fn a_counter_ahead_of_what_arrived_is_a_loss_and_one_behind_is_a_message_after_the_read() {
        let n = numbers();
        n.counted(10);
        assert!(!n.lost.load(Ordering::SeqCst), "unknown until now: adopted");
        n.received(11);
        n.counted(11);
        assert!(!n.lost.load(Ordering::SeqCst));
        n.counted(13);
        assert!(n.lost.swap(false, Ordering::SeqCst), "12 and 13 were published and never came");
        n.received(14);
        n.received(15);
        n.counted(14);
        assert!(!n.lost.load(Ordering::SeqCst), "15 came after the counter was read");
    }

    #[test]
    fn a_push_that_is_not_a_message_of_ours_is_ignored_and_a_full_inbox_asks_for_a_resync() {
        let (tx, mut inbox) = Feed::new(1, usize::MAX);
        let rx = &mut inbox.rx;
        let (missed, numbers) = (AtomicBool::new(false), numbers());
        let push = |kind, data: Vec<Value>| PushInfo { kind, data };
        on_push(&tx, &missed, &numbers, push(PushKind::Message, vec![Value::BulkString(b"1 not json".to_vec())]));
        on_push(&tx, &missed, &numbers, push(PushKind::Message, vec![Value::Int(1)]));
        assert!(rx.try_recv().is_err() && !missed.load(Ordering::SeqCst));
        let takeover = serde_json::to_string(&Message::Takeover { session: "s".into(), generation: 1 }).expect("json");
        let numbered = |n: u64| Value::BulkString(format!("{n} {takeover}").into_bytes());
        on_push(&tx, &missed, &numbers, push(PushKind::SMessage, vec![numbered(1)]));
        assert!(!numbers.lost.load(Ordering::SeqCst));
        on_push(&tx, &missed, &numbers, push(PushKind::SMessage, vec![numbered(2)]));
        assert!(missed.load(Ordering::SeqCst), "the second did not fit");
        assert!(numbers.lost.swap(false, Ordering::SeqCst), "and is lost to short-lived sessions");
        assert!(matches!(rx.try_recv(), Ok((Inbound::Message(Message::Takeover { .. }), _))));
        on_push(&tx, &missed, &numbers, push(PushKind::SSubscribe, vec![]));
        assert_eq!(rx.try_recv().ok(), Some((Inbound::Resync, 0)));
        on_push(&tx, &missed, &numbers, push(PushKind::Disconnection, vec![]));
        on_push(&tx, &missed, &numbers, push(PushKind::Subscribe, vec![]));
        assert_eq!(rx.try_recv().ok(), Some((Inbound::Resync, 0)), "resubscribed after a disconnection");
        on_push(&tx, &missed, &numbers, push(PushKind::Subscribe, vec![]));
        assert!(rx.try_recv().is_err(), "a subscription with nothing missed asks for nothing");
    }

    #[tokio::test]
    async fn the_inbox_holds_at_most_its_bytes_and_frees_them_as_messages_are_taken() {
        let (tx, mut inbox) = Feed::new(16, 250);
        let (missed, numbers) = (AtomicBool::new(false), numbers());
        let big = Carried { data: "x".repeat(150).into(), ..carried() };
        let message = Message::Tenant { tenant: "t".into(), n: big };
        let text = serde_json::to_string(&message).expect("json");
        let numbered = |n: u64| PushInfo {
            kind: PushKind::Message,
            data: vec![Value::BulkString(format!("{n} {text}").into_bytes())],
        };
        on_push(&tx, &missed, &numbers, numbered(1));
        assert!(!missed.load(Ordering::SeqCst), "one fits");
        on_push(&tx, &missed, &numbers, numbered(2));
        assert!(missed.swap(false, Ordering::SeqCst), "two do not: over the bytes, under the count");
        assert!(numbers.lost.swap(false, Ordering::SeqCst));
        assert_eq!(inbox.recv().await, Some(Inbound::Message(message)));
        on_push(&tx, &missed, &numbers, numbered(3));
        assert!(!missed.load(Ordering::SeqCst), "taken, its bytes are free again");
        assert!(inbox.recv().await.is_some());
        let (tiny, mut empty) = Feed::new(16, 10);
        on_push(&tiny, &missed, &numbers, numbered(4));
        assert!(!missed.load(Ordering::SeqCst), "larger than the budget, into an empty inbox: passes");
        on_push(&tiny, &missed, &numbers, numbered(5));
        assert!(missed.load(Ordering::SeqCst), "but not behind another");
        assert!(empty.recv().await.is_some());
    }

    /// Against the Redis of `CCEB_TEST_REDIS` (one URL, or a comma-separated
    /// list of a cluster's nodes); without it there is nothing to test against.
    async fn next(inbox: &mut Inbox) -> Option<Inbound> {
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
        // Every pub/sub connection of the server (or of each cluster node) is
        // dropped, until a message is published that nobody receives.
        let mut unheard = false;
        for generation in 2..20 {
            for node in url.split(',') {
                let client = redis::Client::open(node.trim()).expect("url");
                let mut conn = client.get_multiplexed_async_connection().await.expect("conn");
                let _: Value = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("pubsub")
                    .query_async(&mut conn)
                    .await
                    .expect("kill");
            }
            if relay.send("n1", &takeover(generation)).await.expect("sent") == 0 {
                unheard = true;
                break;
            }
        }
        assert!(unheard, "a message published while n1 was not subscribed");
        let (mut resynced, mut lost, mut got) = (false, false, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for generation in 100.. {
            if (resynced && lost && got.is_some()) || tokio::time::Instant::now() > deadline {
                break;
            }
            relay.send("n1", &takeover(generation)).await.expect("sent");
            match tokio::time::timeout(liveness, inbox.recv()).await {
                Ok(Some(Inbound::Message(m))) => got = got.or(Some(m)),
                Ok(Some(Inbound::Resync)) => resynced = true,
                Ok(Some(Inbound::Lost)) => lost = true,
                Err(_) => {}
                Ok(None) => break,
            }
        }
        assert!(resynced, "it may have missed something");
        assert!(lost, "it knows it missed a message");
        assert!(matches!(got, Some(Message::Takeover { .. })), "subscribed again: {got:?}");
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }
}
