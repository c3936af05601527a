//! The embedded bus: published actions go to a log, bounded by count (and, in
//! memory, by bytes), that the backend port serves with long-polling; events
//! arrive on the backend port. On one node the log is in memory; on the Redis
//! store it is a Redis stream, so the backend port of any node serves the
//! actions published by every node, under one sequence of offsets.

use super::{Bus, BusError, OutRecord};
use crate::fault::ErrorKind;
use crate::kv::{self, Kv};
use crate::schema::convert::{to_json, Keys};
use crate::sync::lock;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A published record as the backend port serves it. The fields are in the
/// order the port has always written them (sorted, as a `serde_json::Value`
/// object writes its keys).
#[derive(Debug, Serialize)]
pub struct LoggedRecord {
    key: String,
    offset: u64,
    record: String,
    /// The action's trace context, when its client gave one: beside the
    /// record, as a Kafka header is.
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    /// Serialised once, when published; a page copies it as it is.
    value: Box<RawValue>,
}

impl LoggedRecord {
    /// What the record counts against the byte bound: its text, and what
    /// holds it (the `Arc`'s allocation and the log's slot).
    fn size(&self) -> usize {
        const HELD: usize = size_of::<LoggedRecord>() + 2 * size_of::<usize>() + size_of::<Arc<LoggedRecord>>();
        let trace = self.traceparent.as_ref().map_or(0, String::len);
        self.key.len() + self.record.len() + trace + self.value.get().len() + HELD
    }
}

/// An answer of `GET /backend/v1/actions`.
#[derive(Debug, Serialize)]
pub struct Page {
    /// Offset of the last record returned, or the `after` asked for when none.
    pub next: u64,
    pub records: Vec<Arc<LoggedRecord>>,
}

/// How much of the log is kept; past either bound the oldest records go, but
/// never the newest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    pub records: usize,
    pub bytes: usize,
}

#[derive(Default)]
struct Log {
    records: VecDeque<Arc<LoggedRecord>>,
    /// Offset of `records[0]`; offsets are contiguous from it.
    first: u64,
    /// Sum of the records' `size`.
    bytes: usize,
}

pub struct EmbeddedBus {
    log: Mutex<Log>,
    limits: LogLimits,
    /// When set, the log is this Redis stream rather than `log`.
    shared: Option<SharedLog>,
    /// Offset of the newest record this node published; long-polls wait on it.
    last: watch::Sender<u64>,
    accepting: AtomicBool,
    /// Milliseconds each publish waits before it is taken: a slow broker.
    delay_ms: AtomicU64,
    /// While true, publishes wait (at most [`MAX_HOLD`]) until it is released.
    hold: watch::Sender<bool>,
    /// Publishes waiting out the delay or the hold now.
    waiting: AtomicU64,
    /// Ends every wait on the switches: a held publish must not outlive shutdown.
    stop: CancellationToken,
}

/// Longest a publish waits for a hold to be released: a switch left on must
/// not wedge clients for good.
const MAX_HOLD: Duration = Duration::from_secs(30);

/// The test switches' state, as the backend port reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Switches {
    pub accepting: bool,
    pub delay_ms: u64,
    pub hold: bool,
    /// Publishes waiting out the delay or the hold now.
    pub waiting: u64,
}

impl EmbeddedBus {
    pub fn new(limits: LogLimits) -> Self {
        EmbeddedBus {
            log: Mutex::new(Log { first: 1, ..Log::default() }),
            limits,
            shared: None,
            last: watch::Sender::new(0),
            accepting: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            hold: watch::Sender::new(false),
            waiting: AtomicU64::new(0),
            stop: CancellationToken::new(),
        }
    }

    /// Releases every delayed or held publish once `stop` is cancelled (the
    /// bridge's shutdown), so the actions in flight finish within the grace.
    pub fn released_by(mut self, stop: CancellationToken) -> Self {
        self.stop = stop;
        self
    }

    /// Keeps the log in a Redis stream shared by every node on `kv`, trimmed
    /// to the newest `limits.records` (the byte bound is Redis's memory).
    pub fn shared_in(mut self, kv: &Kv) -> Self {
        self.shared = Some(SharedLog {
            conn: kv.conn(),
            stream: kv.key("{actions}:log"),
            counter: kv.key("{actions}:offset"),
            append: redis::Script::new(APPEND),
        });
        self
    }

    /// The backend port's outage switch: while off, publishing fails as a
    /// broker outage would, so clients can exercise `backend_unavailable`.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
    }

    /// The backend port's slow-broker switch: each publish waits this long.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The backend port's hold switch: while on, publishes wait until it is
    /// off, so a test (or a client developer) can hold an action in flight.
    pub fn set_hold(&self, on: bool) {
        self.hold.send_replace(on);
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    pub fn switches(&self) -> Switches {
        Switches {
            accepting: self.accepting(),
            delay_ms: self.delay_ms.load(Ordering::SeqCst),
            hold: *self.hold.borrow(),
            waiting: self.waiting.load(Ordering::SeqCst),
        }
    }

    /// Waits out the delay and the hold, counted in `waiting` meanwhile.
    async fn wait_switches(&self) {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        // Every publish passes here: no receiver is made unless a switch is on.
        if delay == 0 && !*self.hold.borrow() {
            return;
        }
        // A release between the check and here is still seen: `wait_for` looks at the value first.
        let mut hold = self.hold.subscribe();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Counted down however the publish ends (its caller may give up on it).
        let _counted = Waiting(&self.waiting);
        let switches = async {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let _ = tokio::time::timeout(MAX_HOLD, hold.wait_for(|&on| !on)).await;
        };
        tokio::select! {
            _ = switches => {}
            _ = self.stop.cancelled() => {}
        }
    }

    /// Records after `after`, at most `limit`, waiting up to `wait` for the first.
    pub async fn read_after(&self, after: u64, limit: usize, wait: Duration) -> Result<Page, BusError> {
        let mut rx = self.last.subscribe();
        if let Some(shared) = &self.shared {
            return self.read_shared(shared, rx, after, limit, wait).await;
        }
        if *rx.borrow_and_update() <= after && !wait.is_zero() {
            let _ = tokio::time::timeout(wait, rx.wait_for(|&last| last > after)).await;
        }
        // Every publish needs this lock: take only pointers under it.
        let log = lock(&self.log);
        let skip = after.saturating_add(1).saturating_sub(log.first);
        let start = usize::try_from(skip).unwrap_or(usize::MAX).min(log.records.len());
        let records: Vec<Arc<LoggedRecord>> = log.records.range(start..).take(limit).cloned().collect();
        let next = records.last().map_or(after, |r| r.offset);
        Ok(Page { next, records })
    }

    /// The shared log's long-poll: a publish on this node wakes it at once,
    /// one on another node at the next look ([`SHARED_POLL`]). Not a blocking
    /// `XREAD`: it would hold up every other command on the shared connection.
    async fn read_shared(
        &self,
        shared: &SharedLog,
        mut rx: watch::Receiver<u64>,
        after: u64,
        limit: usize,
        wait: Duration,
    ) -> Result<Page, BusError> {
        let deadline = Instant::now() + wait;
        loop {
            let page = shared.range(after, limit).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            if !page.records.is_empty() || left.is_zero() {
                return Ok(page);
            }
            let _ = tokio::time::timeout(left.min(SHARED_POLL), rx.changed()).await;
        }
    }
}

/// How often a long-poll of the shared log looks for other nodes' records.
const SHARED_POLL: Duration = Duration::from_millis(50);

/// Appends a record under the next offset, atomically (both keys share a slot).
const APPEND: &str = r"
local offset = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], offset .. '-0', 'r', ARGV[2])
return offset
";

/// The log as a Redis stream: entry ids `<offset>-0`, offsets from a counter
/// beside it.
struct SharedLog {
    conn: kv::Conn,
    stream: String,
    counter: String,
    append: redis::Script,
}

/// A record as the shared log keeps it (the offset is its entry id).
#[derive(Serialize, Deserialize)]
struct Stored {
    key: String,
    record: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    value: Box<RawValue>,
}

fn redis_error(e: redis::RedisError) -> BusError {
    BusError::new(kv::error_kind(&e), e)
}

impl SharedLog {
    async fn append(&self, stored: &Stored, capacity: usize) -> Result<u64, BusError> {
        let text = serde_json::to_string(stored)
            .map_err(|e| BusError::new(ErrorKind::Rejected, format!("cannot serialise the record: {e}")))?;
        let mut conn = self.conn.clone();
        let mut call = self.append.key(&self.stream);
        call.key(&self.counter).arg(capacity).arg(text);
        call.invoke_async(&mut conn).await.map_err(redis_error)
    }

    async fn range(&self, after: u64, limit: usize) -> Result<Page, BusError> {
        let mut conn = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.stream)
            .arg(format!("({after}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut records = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let offset = entry.id.split_once('-').and_then(|(n, _)| n.parse::<u64>().ok());
            let text: Option<String> = entry.get("r");
            let stored = text.as_deref().and_then(|t| serde_json::from_str::<Stored>(t).ok());
            match (offset, stored) {
                (Some(offset), Some(s)) => records.push(Arc::new(LoggedRecord {
                    key: s.key,
                    offset,
                    record: s.record,
                    traceparent: s.traceparent,
                    value: s.value,
                })),
                // Not written by a bridge: skipped, never served half-read.
                _ => tracing::warn!(stream = %self.stream, id = %entry.id, "unreadable entry in the shared action log"),
            }
        }
        let next = records.last().map_or(after, |r| r.offset);
        Ok(Page { next, records })
    }
}

struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, record: OutRecord) -> Result<(), BusError> {
        if !self.accepting() {
            let outage = "the embedded bus is switched off on the backend port";
            return Err(BusError::new(ErrorKind::Unavailable, outage));
        }
        self.wait_switches().await;
        let value = serde_json::value::to_raw_value(&to_json(&record.value, Keys::AsIs))
            .map_err(|e| BusError::new(ErrorKind::Rejected, format!("cannot serialise the record: {e}")))?;
        if let Some(shared) = &self.shared {
            let traceparent = record.traceparent.map(|t| t.to_string());
            let stored = Stored { key: record.key, record: record.record, traceparent, value };
            let offset = shared.append(&stored, self.limits.records).await?;
            self.last.send_modify(|last| *last = (*last).max(offset));
            return Ok(());
        }
        let mut log = lock(&self.log);
        let offset = *self.last.borrow() + 1;
        let traceparent = record.traceparent.map(|t| t.to_string());
        let logged = Arc::new(LoggedRecord { key: record.key, offset, record: record.record, traceparent, value });
        log.bytes += logged.size();
        log.records.push_back(logged);
        while log.records.len() > 1 && (log.records.len() > self.limits.records || log.bytes > self.limits.bytes) {
            if let Some(old) = log.records.pop_front() {
                log.bytes -= old.size();
                log.first += 1;
            }
        }
        // Sent under the log lock so offsets are published in order.
        self.last.send_replace(offset);
        Ok(())
    }

    fn ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as Avro;
    use serde_json::json;

    fn action(text: &str) -> OutRecord {
        let value = Avro::Record(vec![("interactionId".into(), Avro::String(text.into()))]);
        OutRecord { record: "AcceptInteractionEvent".into(), key: "a1".into(), value, traceparent: None }
    }

    fn offsets(page: &Page) -> Vec<u64> {
        page.records.iter().map(|r| r.offset).collect()
    }

    #[tokio::test]
    async fn the_log_stays_within_its_byte_bound_and_keeps_offsets_across_eviction() {
        let bus = EmbeddedBus::new(LogLimits { records: 1000, bytes: 10_000 });
        for n in 1..=50u64 {
            bus.publish(action(&format!("{n:04}{}", "x".repeat(1000)))).await.expect("published");
            let log = bus.log.lock().expect("log");
            assert!(log.bytes <= 10_000, "{} bytes after {n} records", log.bytes);
            assert_eq!(log.bytes, log.records.iter().map(|r| r.size()).sum::<usize>());
            assert_eq!(log.first + log.records.len() as u64 - 1, n);
        }
        let all = bus.read_after(0, 10_000, Duration::ZERO).await.expect("page");
        let kept = offsets(&all);
        assert!(kept.len() >= 8 && kept.len() < 10, "records of about 1 KiB in 10 000 bytes: {kept:?}");
        assert_eq!(kept, (51 - kept.len() as u64..=50).collect::<Vec<_>>(), "the newest, in order");
        assert_eq!(all.next, 50);
        for (r, n) in all.records.iter().zip(&kept) {
            assert!(r.value.get().contains(&format!("{n:04}")), "offset {n} holds record {n}");
        }
        let page = bus.read_after(45, 2, Duration::ZERO).await.expect("page");
        assert_eq!((offsets(&page), page.next), (vec![46, 47], 47));
        let page = bus.read_after(47, 1000, Duration::ZERO).await.expect("page");
        assert_eq!((offsets(&page), page.next), (vec![48, 49, 50], 50));
        for after in [50, u64::MAX] {
            let page = bus.read_after(after, 1000, Duration::ZERO).await.expect("page");
            assert_eq!((offsets(&page), page.next), (vec![], after));
        }
        // A record larger than the bound is kept alone rather than lost.
        bus.publish(action(&"y".repeat(20_000))).await.expect("published");
        assert_eq!(offsets(&bus.read_after(0, 1000, Duration::ZERO).await.expect("page")), [51]);
    }

    #[tokio::test]
    async fn the_log_keeps_the_newest_records_by_count_too() {
        let bus = EmbeddedBus::new(LogLimits { records: 3, bytes: 1 << 20 });
        for n in 0..10 {
            bus.publish(action(&n.to_string())).await.expect("published");
        }
        assert_eq!(offsets(&bus.read_after(2, 1000, Duration::ZERO).await.expect("page")), [8, 9, 10]);
    }

    #[tokio::test]
    async fn a_page_is_written_as_the_backend_port_always_wrote_it() {
        let bus = EmbeddedBus::new(LogLimits { records: 10, bytes: 1 << 20 });
        bus.publish(action("i-\"1\"")).await.expect("published");
        let page = bus.read_after(0, 10, Duration::ZERO).await.expect("page");
        let before = json!({"next": 1, "records": [{
            "offset": 1, "record": "AcceptInteractionEvent", "key": "a1", "value": {"interactionId": "i-\"1\""},
        }]});
        assert_eq!(serde_json::to_string(&page).expect("json"), before.to_string());
    }

    #[tokio::test]
    async fn a_records_traceparent_is_kept_beside_its_value() {
        let bus = EmbeddedBus::new(LogLimits { records: 10, bytes: 1 << 20 });
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        bus.publish(OutRecord { traceparent: tp.parse().ok(), ..action("i") }).await.expect("published");
        let page = bus.read_after(0, 10, Duration::ZERO).await.expect("page");
        let want = json!({"next": 1, "records": [{
            "offset": 1, "record": "AcceptInteractionEvent", "key": "a1", "traceparent": tp,
            "value": {"interactionId": "i"},
        }]});
        assert_eq!(serde_json::to_value(&page).expect("json"), want);
        let log = bus.log.lock().expect("log");
        assert_eq!(log.bytes, log.records.iter().map(|r| r.size()).sum::<usize>());
    }
}
