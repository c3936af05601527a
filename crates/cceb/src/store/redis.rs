//! The Redis store: everything the [`Store`] holds lives in Redis (one, or a
//! Redis Cluster), so a bridge keeps nothing that another node or a restart
//! could not read back.
//!
//! Key layout (ARCHITECTURE.md "Redis store"): every key of one agent carries
//! the agent's hash tag ([`Kv::agent_key`]) and every key of one tenant the
//! tenant's ([`Kv::tenant_key`]), so each script and each MULTI touches one
//! slot. Per agent: `s:<id>` (session record hash, with `next_seq`), `m:<id>`
//! (mailbox sorted set, score = seq), `sessions` (its session ids), `avail`
//! (`published`), `claim:<hash>` (auto-accept claims). Per tenant: `dir`
//! (agent → entry), `contacts` (contact id → agent), `d:<hash>` (dedup keys).
//! Global indexes ([`Kv::key`]): `sessions` (every long-lived session, read at
//! start) and `available` (agents whose published availability is `true`).
//!
//! Per-session writes are buffered in call order and flushed by one task:
//! everything buffered so far goes in one MULTI per hash tag, all tags at
//! once (group commit). A failed flush keeps its writes, which are all
//! idempotent, and tries them again first; until they are acknowledged every
//! `sync` fails.

use super::{
    Admitted, AgentEntry, Attached, DedupKey, DirectoryOp, Placement, Routed, SessionRecord, Store, StoreError,
    StoredSession,
};
use crate::fault::ErrorKind;
use crate::kv::{self, Kv};
use crate::model::{AgentId, Notification};
use crate::sync::lock;
use async_trait::async_trait;
use cceb_protocol::NotificationType;
use futures_util::{StreamExt, TryStreamExt};
use redis::{AsyncCommands, Pipeline, RedisError, Script};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Writes waiting for Redis (buffered and failed) past which the store
/// reports itself not ready: `/readyz` fails, new long-lived sessions and the
/// backend port are refused, so an outage cannot grow the buffer without bound
/// from new work. Each write is one record or mailbox entry (the entries are
/// bounded by `max_notification_bytes`).
const MAX_UNFLUSHED: usize = 100_000;
/// How often the health task pings Redis.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);
/// Least wait between two attempts after a failed flush, so that a burst of
/// `sync` calls during an outage does not spin on a refused connection.
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// Hash tags flushed at once (one MULTI each).
const FLUSH_CONCURRENCY: usize = 64;
/// Sessions read back at once at start.
const LOAD_CONCURRENCY: usize = 32;

/// Applies a directory change in one step and returns the entry as it was:
/// `KEYS` = (dir, contacts); `ARGV` = (op, agent, entry or patch as JSON).
/// A contact id maps to the agent that last claimed it; removing or changing
/// an agent's entry frees its contact id only if it still maps to that agent.
const DIRECTORY_APPLY: &str = r#"
local prev = redis.call('HGET', KEYS[1], ARGV[2])
local entry = nil
if ARGV[1] == 'put' then
  entry = cjson.decode(ARGV[3])
elseif ARGV[1] == 'patch' then
  if prev then entry = cjson.decode(prev) else entry = {o = false} end
  for k, v in pairs(cjson.decode(ARGV[3])) do entry[k] = v end
end
if prev then
  local old = cjson.decode(prev)
  if type(old.c) == 'string' and redis.call('HGET', KEYS[2], old.c) == ARGV[2] then
    redis.call('HDEL', KEYS[2], old.c)
  end
end
if entry then
  redis.call('HSET', KEYS[1], ARGV[2], cjson.encode(entry))
  if type(entry.c) == 'string' then redis.call('HSET', KEYS[2], entry.c, ARGV[2]) end
else
  redis.call('HDEL', KEYS[1], ARGV[2])
end
return prev
"#;

/// Ends an attachment if it is still the session's: `KEYS` = (record);
/// `ARGV` = (generation, disconnected at).
const DETACH: &str = r"
if redis.call('HGET', KEYS[1], 'gen') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'node', 'instance')
  redis.call('HSET', KEYS[1], 'disconnected_at_ms', ARGV[2])
  return 1
end
return 0
";

/// Attaches a session to a node and reads it back in the same step:
/// `KEYS` = (record, mailbox); `ARGV` = (node, now, ttl ms, auto_accept,
/// push token, whether there is one, the node's instance). Nil when the session is gone or its
/// TTL passed while detached.
const ATTACH: &str = r"
local f = redis.call('HMGET', KEYS[1], 'tenant', 'disconnected_at_ms', 'node')
if not f[1] then return false end
if f[2] and not f[3] and tonumber(f[2]) + tonumber(ARGV[3]) <= tonumber(ARGV[2]) then return false end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'instance', ARGV[7], 'auto_accept', ARGV[4])
redis.call('HDEL', KEYS[1], 'disconnected_at_ms')
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'push_token', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'push_token')
end
local dropped = redis.call('HGET', KEYS[1], 'dropped') or '0'
redis.call('HSET', KEYS[1], 'dropped', '0')
return {gen, f[3] or '', dropped, redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1)}
";

/// Takes a detached session back for the node that held it, if no other
/// attach came since: `KEYS` = (record); `ARGV` = (generation, node,
/// instance). 1: held (again); 0: attached elsewhere since, or gone.
const RECLAIM: &str = r"
local f = redis.call('HMGET', KEYS[1], 'gen', 'node', 'instance')
if f[1] ~= ARGV[1] then return 0 end
if f[2] ~= ARGV[2] or f[3] ~= ARGV[3] then
  redis.call('HSET', KEYS[1], 'node', ARGV[2], 'instance', ARGV[3])
  redis.call('HDEL', KEYS[1], 'disconnected_at_ms')
end
return 1
";

/// Deletes a session if its attachment is still the caller's: `KEYS` =
/// (record, mailbox, the agent's sessions); `ARGV` = (id, generation).
const END: &str = r"
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
";

/// Detaches a session attached to a node under a dead instance: `KEYS` =
/// (record); `ARGV` = (node, the live instance or '', now). 1: detached;
/// 0: not attached to that node (any more); -1: the live instance holds it.
const REAP: &str = r"
local f = redis.call('HMGET', KEYS[1], 'node', 'instance')
if f[1] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' and f[2] == ARGV[2] then return -1 end
redis.call('HDEL', KEYS[1], 'node', 'instance')
redis.call('HSET', KEYS[1], 'disconnected_at_ms', ARGV[3])
return 1
";

/// Appends a notification to every long-lived session of one agent, once
/// per uuid: `KEYS` = (the agent's sessions, its short-lived sessions'
/// nodes, the uuids it routed lately); `ARGV` = (the agent's key base, the
/// entry after its seq, capacity, uuid, now, the retry window in ms).
/// Returns (flat (session, seq, node, push token, dropped) for each session,
/// nodes with short-lived sessions), both empty for a uuid routed within the
/// window already (a source sent again after a failure part-way: what it
/// appended stays, nothing twice). The uuids kept are those of the window, at
/// most 128 (a set that small stays compact), and the set expires with it.
const ROUTE: &str = r#"
if redis.call('ZSCORE', KEYS[3], ARGV[4]) then return {{}, {}} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[5]) - tonumber(ARGV[6]))
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -129)
redis.call('PEXPIRE', KEYS[3], ARGV[6])
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local s = ARGV[1] .. 's:' .. id
  local m = ARGV[1] .. 'm:' .. id
  local f = redis.call('HMGET', s, 'tenant', 'next_seq', 'node', 'push_token')
  if f[1] then
    local seq = tonumber(f[2] or '1')
    local top = redis.call('ZRANGE', m, -1, -1, 'WITHSCORES')
    if top[2] and tonumber(top[2]) >= seq then seq = tonumber(top[2]) + 1 end
    local text = string.format('%d', seq)
    redis.call('HSET', s, 'next_seq', string.format('%d', seq + 1))
    redis.call('ZADD', m, text, '{"s":' .. text .. ',' .. ARGV[2])
    local dropped = 0
    if redis.call('ZCARD', m) > tonumber(ARGV[3]) then
      redis.call('ZPOPMIN', m)
      redis.call('HINCRBY', s, 'dropped', 1)
      dropped = 1
    end
    table.insert(out, id)
    table.insert(out, text)
    table.insert(out, f[3] or '')
    table.insert(out, f[4] or '')
    table.insert(out, tostring(dropped))
  end
end
local nodes = {}
local seen = {}
for _, node in ipairs(redis.call('HVALS', KEYS[2])) do
  if not seen[node] then
    seen[node] = true
    table.insert(nodes, node)
  end
end
return {out, nodes}
"#;

/// Ends one session if its TTL passed: `KEYS` = (record, mailbox, the
/// agent's sessions); `ARGV` = (id, now, ttl ms). Returns (0, the session's
/// IR instance) when it ended it, (-1, _) when it is gone, else (when to look
/// again, _). An attached session is looked at again a TTL later: if its
/// node dies meanwhile, `REAP` detaches it first.
const EXPIRE: &str = r"
local f = redis.call('HMGET', KEYS[1], 'tenant', 'node', 'disconnected_at_ms', 'ir')
if not f[1] then return {-1, ''} end
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
if f[2] then
  return {now + ttl, ''}
end
local at = tonumber(f[3] or ARGV[2])
if at + ttl > now then return {at + ttl, ''} end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return {0, f[4] or ''}
";

/// Whether a valid session of the agent asked for auto-accept: `KEYS` =
/// (the agent's sessions); `ARGV` = (key base, now, ttl ms).
const AUTO_ACCEPTS: &str = r"
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', ARGV[1] .. 's:' .. id, 'auto_accept', 'node', 'disconnected_at_ms', 'ir')
  if f[1] == '1' and (f[2] or not f[3] or tonumber(f[3]) + tonumber(ARGV[3]) > tonumber(ARGV[2])) then
    return f[4] or ''
  end
end
return false
";

/// Makes room for one more session of an agent: `KEYS` = (its sessions);
/// `ARGV` = (key base, cap). 0: room; -1: every session attached; else the
/// id of the least recently connected detached session, ended for it.
const ADMIT: &str = r"
local ids = redis.call('SMEMBERS', KEYS[1])
if #ids < tonumber(ARGV[2]) then return 0 end
local oldest, at = nil, nil
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', ARGV[1] .. 's:' .. id, 'node', 'disconnected_at_ms')
  if not f[1] and f[2] then
    local t = tonumber(f[2])
    if not at or t < at then oldest, at = id, t end
  end
end
if not oldest then return -1 end
redis.call('DEL', ARGV[1] .. 's:' .. oldest, ARGV[1] .. 'm:' .. oldest)
redis.call('SREM', KEYS[1], oldest)
return oldest
";

/// Claims the agent's next availability transition: `KEYS` = (sessions,
/// avail). Returns the availability to publish (1 or 0), -1 for none.
const AVAILABILITY_CLAIM: &str = r"
local want = '0'
if redis.call('SCARD', KEYS[1]) > 0 then want = '1' end
if (redis.call('HGET', KEYS[2], 'published') or '0') == want then return -1 end
redis.call('HSET', KEYS[2], 'published', want)
return tonumber(want)
";

/// A value read from Redis that this bridge cannot have written.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("session {id}: field `{field}` is missing or malformed")]
    Field { id: String, field: &'static str },
    #[error("mailbox entry of session {id}: {reason}")]
    Mailbox { id: String, reason: String },
    #[error("index entry `{0}` is malformed")]
    Index(String),
    #[error("directory entry: {0}")]
    Directory(serde_json::Error),
}

impl From<DecodeError> for StoreError {
    fn from(e: DecodeError) -> Self {
        StoreError::new(ErrorKind::Fatal, e)
    }
}

fn store_error(e: RedisError) -> StoreError {
    StoreError::new(kv::error_kind(&e), e)
}

/// A per-session write waiting for the next flush.
#[derive(Debug)]
enum Write {
    SessionPut(SessionRecord),
    SessionDelete {
        agent: AgentId,
        id: Box<str>,
    },
    MailboxPut {
        agent: AgentId,
        session: Arc<str>,
        seq: u64,
        n: Arc<Notification>,
    },
    MailboxRemove {
        agent: AgentId,
        session: Arc<str>,
        seq: u64,
    },
    SeqReserve {
        agent: AgentId,
        session: Arc<str>,
        upto: u64,
    },
    Dedup {
        key: DedupKey,
        window: Duration,
    },
    /// The attachment of `generation` ended at `at`; the session is due to
    /// expire at `due` unless attached again.
    Detach {
        agent: AgentId,
        id: Arc<str>,
        node: Box<str>,
        generation: u64,
        at: u64,
        due: u64,
    },
    /// A short-lived session of the agent opened on `node` (`Some`) or closed.
    ShortLived {
        agent: AgentId,
        session: Arc<str>,
        node: Option<Arc<str>>,
    },
}

#[derive(Default)]
struct Buffer {
    writes: Vec<Write>,
    after: Vec<Box<dyn FnOnce() + Send>>,
    /// Writes ever buffered: a `sync` waits for a flush that covers its count.
    pushed: u64,
    closed: bool,
}

/// What the last flush attempt did, for `sync` to wait on.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Writes acknowledged by Redis, counted like `Buffer::pushed`.
    through: u64,
    /// The last failed attempt: the writes it covered and why it failed.
    failed: Option<(u64, ErrorKind, Arc<str>)>,
}

struct Inner {
    kv: Kv,
    buf: Mutex<Buffer>,
    /// Dedup keys buffered and not yet acknowledged: already "contained".
    dedup_pending: Mutex<HashSet<(Arc<str>, u128)>>,
    wake: Notify,
    flushed: watch::Sender<Flushed>,
    reachable: AtomicBool,
    flush_ok: AtomicBool,
    unflushed: AtomicUsize,
}

pub struct RedisStore {
    inner: Arc<Inner>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    directory: Script,
    scripts: Scripts,
}

/// The scripts of [`Placement`], hashed once.
struct Scripts {
    attach: Script,
    route: Script,
    expire: Script,
    auto_accepts: Script,
    availability: Script,
    admit: Script,
    reap: Script,
    end: Script,
    reclaim: Script,
}

impl RedisStore {
    /// A store on `kv`; starts its flush and health tasks (stopped by `close`).
    pub fn new(kv: Kv) -> RedisStore {
        let inner = Arc::new(Inner {
            kv,
            buf: Mutex::default(),
            dedup_pending: Mutex::default(),
            wake: Notify::new(),
            flushed: watch::Sender::new(Flushed::default()),
            reachable: AtomicBool::new(true),
            flush_ok: AtomicBool::new(true),
            unflushed: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(flush_loop(inner.clone(), stop.clone())),
            tokio::spawn(health_loop(inner.clone(), stop.clone())),
        ];
        let scripts = Scripts {
            attach: Script::new(ATTACH),
            route: Script::new(ROUTE),
            expire: Script::new(EXPIRE),
            auto_accepts: Script::new(AUTO_ACCEPTS),
            availability: Script::new(AVAILABILITY_CLAIM),
            admit: Script::new(ADMIT),
            reap: Script::new(REAP),
            end: Script::new(END),
            reclaim: Script::new(RECLAIM),
        };
        RedisStore { inner, stop, tasks: Mutex::new(tasks), directory: Script::new(DIRECTORY_APPLY), scripts }
    }

    fn push(&self, w: Write, after: Option<Box<dyn FnOnce() + Send>>) {
        let mut b = lock(&self.inner.buf);
        if b.closed {
            return;
        }
        b.writes.push(w);
        b.after.extend(after);
        b.pushed += 1;
        self.inner.unflushed.fetch_add(1, Ordering::Relaxed);
        drop(b);
        self.inner.wake.notify_one();
    }

    fn conn(&self) -> kv::Conn {
        self.inner.kv.conn()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Takes what is buffered and flushes it after whatever failed before, one
/// attempt at a time; wakes on a new write, or every `RETRY_AFTER` while
/// writes wait for Redis to come back.
async fn flush_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let mut pending: Vec<Write> = Vec::new();
    let mut after: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = inner.wake.notified() => false,
            _ = tokio::time::sleep(RETRY_AFTER), if !pending.is_empty() => false,
        };
        let covers = {
            let mut b = lock(&inner.buf);
            pending.append(&mut b.writes);
            after.append(&mut b.after);
            b.pushed
        };
        if pending.is_empty() {
            if stopping {
                return;
            }
            // Callbacks of writes already acknowledged (none pending): due now.
            after.drain(..).for_each(|f| f());
            inner.flushed.send_modify(|f| f.through = covers);
            continue;
        }
        match inner.apply(&pending).await {
            Ok(()) => {
                {
                    let mut d = lock(&inner.dedup_pending);
                    for w in &pending {
                        if let Write::Dedup { key, .. } = w {
                            d.remove(&(key.tenant.clone(), key.hash));
                        }
                    }
                }
                inner.unflushed.fetch_sub(pending.len(), Ordering::Relaxed);
                pending.clear();
                inner.flush_ok.store(true, Ordering::Relaxed);
                after.drain(..).for_each(|f| f());
                inner.flushed.send_modify(|f| f.through = covers);
            }
            Err(e) => {
                tracing::error!(error = %e, waiting = pending.len(), "Redis store flush failed; retrying");
                inner.flush_ok.store(false, Ordering::Relaxed);
                let failed = (covers, kv::error_kind(&e), Arc::from(e.to_string()));
                inner.flushed.send_modify(|f| f.failed = Some(failed));
                if stopping {
                    tracing::error!(lost = pending.len(), "Redis store closed with writes Redis did not acknowledge");
                    return;
                }
                // Paced: the next attempt waits at least this long.
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Pings Redis every `HEALTH_INTERVAL`: the store is not ready while it
/// cannot be reached.
async fn health_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let mut conn = inner.kv.conn();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
        }
        let ok = redis::cmd("PING").query_async::<String>(&mut conn).await;
        if let Err(e) = &ok {
            if inner.reachable.load(Ordering::Relaxed) {
                tracing::warn!(error = %e, "Redis cannot be reached");
            }
        }
        let was = inner.reachable.swap(ok.is_ok(), Ordering::Relaxed);
        if ok.is_ok() && !was {
            tracing::info!("Redis reachable again");
            // Writes that failed are tried again at once.
            inner.wake.notify_one();
        }
    }
}

impl Inner {
    /// Sends `writes` in one MULTI per hash tag (in order within each), the
    /// tags concurrently, and the global index changes they imply.
    async fn apply(&self, writes: &[Write]) -> Result<(), RedisError> {
        let kv = &self.kv;
        let mut groups: HashMap<String, Pipeline> = HashMap::new();
        // Global index: the last write of a session decides whether it is in.
        let mut index: HashMap<String, bool> = HashMap::new();
        // Sessions that may expire, and when (a candidate that is not is skipped by the sweep).
        let mut expiry: Vec<(u64, String)> = Vec::new();
        // Per node: sessions no longer attached there (each node's index has its own slot).
        let mut unattached: HashMap<String, Vec<String>> = HashMap::new();
        for w in writes {
            match w {
                Write::SessionPut(r) => {
                    let p = multi(&mut groups, kv.agent_key(&r.agent, ""));
                    let key = kv.agent_key(&r.agent, &format!("s:{}", r.id));
                    p.hset_multiple(&key, &record_fields(r)).ignore();
                    let absent: Vec<&str> = [
                        r.push_token.is_none().then_some("push_token"),
                        r.disconnected_at_ms.is_none().then_some("disconnected_at_ms"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    if !absent.is_empty() {
                        p.hdel(&key, absent).ignore();
                    }
                    p.sadd(kv.agent_key(&r.agent, "sessions"), &*r.id).ignore();
                    index.insert(index_member(&r.agent, &r.id), true);
                    // The tenant's agents with long-lived sessions: what a tenant-wide event walks.
                    let t = multi(&mut groups, kv.tenant_key(&r.agent.tenant_guid, ""));
                    // Without the IR instance: one member per agent, routed once.
                    let who = AgentId { ir_instance: "".into(), ..r.agent.clone() };
                    t.sadd(kv.tenant_key(&r.agent.tenant_guid, "agents"), agent_member(&who)).ignore();
                }
                Write::SessionDelete { agent, id } => {
                    let p = multi(&mut groups, kv.agent_key(agent, ""));
                    p.del(&[kv.agent_key(agent, &format!("s:{id}")), kv.agent_key(agent, &format!("m:{id}"))]).ignore();
                    p.srem(kv.agent_key(agent, "sessions"), &**id).ignore();
                    index.insert(index_member(agent, id), false);
                }
                Write::MailboxPut { agent, session, seq, n } => {
                    let p = multi(&mut groups, kv.agent_key(agent, ""));
                    p.zadd(kv.agent_key(agent, &format!("m:{session}")), encode_entry(*seq, n), *seq).ignore();
                }
                Write::MailboxRemove { agent, session, seq } => {
                    let p = multi(&mut groups, kv.agent_key(agent, ""));
                    p.zrembyscore(kv.agent_key(agent, &format!("m:{session}")), *seq, *seq).ignore();
                }
                Write::SeqReserve { agent, session, upto } => {
                    // A session's reservations only grow, and are flushed in order.
                    let p = multi(&mut groups, kv.agent_key(agent, ""));
                    p.hset(kv.agent_key(agent, &format!("s:{session}")), "next_seq", *upto).ignore();
                }
                Write::Detach { agent, id, node, generation, at, due } => {
                    let p = multi(&mut groups, kv.agent_key(agent, ""));
                    p.cmd("EVAL")
                        .arg(DETACH)
                        .arg(1)
                        .arg(kv.agent_key(agent, &format!("s:{id}")))
                        .arg(*generation)
                        .arg(*at)
                        .ignore();
                    expiry.push((*due, index_member(agent, id)));
                    unattached.entry(node_key(kv, node, "attached")).or_default().push(index_member(agent, id));
                }
                Write::ShortLived { agent, session, node } => {
                    // One field per session: idempotent, so a flush sent again counts nothing twice.
                    let p = multi(&mut groups, kv.agent_key(agent, ""));
                    let key = kv.agent_key(agent, "short");
                    match node {
                        Some(node) => p.hset(key, &**session, &**node).ignore(),
                        None => p.hdel(key, &**session).ignore(),
                    };
                }
                Write::Dedup { key, window } => {
                    let p = multi(&mut groups, kv.tenant_key(&key.tenant, ""));
                    let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
                    p.cmd("SET").arg(dedup_key(kv, key)).arg(1).arg("PX").arg(ms).ignore();
                }
            }
        }
        let mut pipes: Vec<Pipeline> = groups.into_values().collect();
        if !index.is_empty() {
            let (add, remove): (Vec<_>, Vec<_>) = index.into_iter().partition(|(_, present)| *present);
            let mut p = redis::pipe();
            let key = kv.key("sessions");
            if !add.is_empty() {
                p.sadd(&key, add.into_iter().map(|(m, _)| m).collect::<Vec<_>>()).ignore();
            }
            if !remove.is_empty() {
                p.srem(&key, remove.into_iter().map(|(m, _)| m).collect::<Vec<_>>()).ignore();
            }
            pipes.push(p);
        }
        if !expiry.is_empty() {
            let mut p = redis::pipe();
            p.zadd_multiple(kv.key("expiry"), &expiry).ignore();
            pipes.push(p);
        }
        for (key, members) in unattached {
            let mut p = redis::pipe();
            p.srem(key, members).ignore();
            pipes.push(p);
        }
        futures_util::stream::iter(pipes)
            .map(|p| {
                let mut conn = kv.conn();
                async move { p.exec_async(&mut conn).await }
            })
            .buffer_unordered(FLUSH_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await
            .map(drop)
    }
}

/// The MULTI of one hash tag.
fn multi(groups: &mut HashMap<String, Pipeline>, tag: String) -> &mut Pipeline {
    groups.entry(tag).or_insert_with(|| {
        let mut p = redis::pipe();
        p.atomic();
        p
    })
}

/// Puts the agent in the global `available` index, or takes it out.
async fn mark_available(kv: &Kv, conn: &mut kv::Conn, agent: &AgentId, available: bool) -> Result<(), StoreError> {
    let (index, member) = (kv.key("available"), agent_member(agent));
    let done: Result<(), RedisError> =
        if available { conn.sadd(index, member).await } else { conn.srem(index, member).await };
    done.map_err(store_error)
}

/// A key of one node, in a slot of its own (the sessions attached there).
fn node_key(kv: &Kv, node: &str, rest: &str) -> String {
    kv.key(&format!("{{n:{}}}:{rest}", kv::agent_tag("node", node)))
}

fn dedup_key(kv: &Kv, key: &DedupKey) -> String {
    kv.tenant_key(&key.tenant, &format!("d:{:032x}", key.hash))
}

/// Member of the global session index: enough to find the session's keys.
fn index_member(agent: &AgentId, id: &str) -> String {
    serde_json::json!([&*agent.tenant_guid, &*agent.agent_guid, id]).to_string()
}

fn decode_index(member: &str) -> Result<(AgentId, String), DecodeError> {
    let bad = || DecodeError::Index(member.chars().take(200).collect());
    let (tenant, agent, id): (String, String, String) = serde_json::from_str(member).map_err(|_| bad())?;
    Ok((AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: "".into() }, id))
}

/// Member of the global `available` index.
fn agent_member(agent: &AgentId) -> String {
    serde_json::json!([&*agent.tenant_guid, &*agent.agent_guid, &*agent.ir_instance]).to_string()
}

fn decode_agent(member: &str) -> Result<AgentId, DecodeError> {
    let (tenant, agent, ir): (String, String, String) =
        serde_json::from_str(member).map_err(|_| DecodeError::Index(member.chars().take(200).collect()))?;
    Ok(AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: ir.into() })
}

/// The record's fields as the session hash keeps them (`next_seq` apart).
fn record_fields(r: &SessionRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("tenant", r.agent.tenant_guid.to_string()),
        ("agent", r.agent.agent_guid.to_string()),
        ("ir", r.agent.ir_instance.to_string()),
        ("key_hash", hex(&r.key_hash)),
        ("auto_accept", if r.auto_accept { "1" } else { "0" }.to_owned()),
        ("dropped", r.dropped.to_string()),
    ];
    if let Some(t) = &r.push_token {
        f.push(("push_token", t.clone()));
    }
    if let Some(at) = r.disconnected_at_ms {
        f.push(("disconnected_at_ms", at.to_string()));
    }
    f
}

/// A session hash read back: the record and the seq its next notification gets.
fn decode_record(id: &str, fields: &HashMap<String, String>) -> Result<(SessionRecord, u64), DecodeError> {
    let bad = |field| DecodeError::Field { id: id.chars().take(100).collect(), field };
    let get = |field: &'static str| fields.get(field).ok_or_else(|| bad(field));
    let num = |field: &'static str| get(field).and_then(|v| v.parse::<u64>().map_err(|_| bad(field)));
    let key_hash = unhex32(get("key_hash")?).ok_or_else(|| bad("key_hash"))?;
    let auto_accept = match get("auto_accept")?.as_str() {
        "1" => true,
        "0" => false,
        _ => return Err(bad("auto_accept")),
    };
    let disconnected_at_ms = match fields.get("disconnected_at_ms") {
        Some(v) => Some(v.parse::<u64>().map_err(|_| bad("disconnected_at_ms"))?),
        None => None,
    };
    let next_seq = if fields.contains_key("next_seq") { num("next_seq")? } else { 1 };
    let record = SessionRecord {
        id: id.into(),
        key_hash,
        agent: AgentId {
            tenant_guid: get("tenant")?.as_str().into(),
            agent_guid: get("agent")?.as_str().into(),
            ir_instance: get("ir")?.as_str().into(),
        },
        auto_accept,
        push_token: fields.get("push_token").cloned(),
        dropped: num("dropped")?,
        disconnected_at_ms,
    };
    Ok((record, next_seq))
}

/// A mailbox member: the notification with its seq, so members are unique.
#[derive(Serialize, Deserialize)]
struct Entry<'a> {
    s: u64,
    #[serde(borrow)]
    t: Cow<'a, str>,
    #[serde(borrow)]
    u: Cow<'a, str>,
    #[serde(borrow)]
    d: Cow<'a, str>,
}

fn encode_entry(seq: u64, n: &Notification) -> String {
    let e = Entry { s: seq, t: n.ty.as_str().into(), u: n.uuid.as_str().into(), d: (*n.data).into() };
    serde_json::to_string(&e).unwrap_or_default()
}

/// A mailbox member without its opening brace and seq: the route script
/// writes `{"s":<seq>,` before it, once per session.
fn entry_rest(n: &Notification) -> String {
    #[derive(Serialize)]
    struct Rest<'a> {
        t: &'a str,
        u: &'a str,
        d: &'a str,
    }
    let text = serde_json::to_string(&Rest { t: n.ty.as_str(), u: &n.uuid, d: &n.data }).unwrap_or_default();
    text.get(1..).unwrap_or_default().to_owned()
}

fn decode_entry(id: &str, member: &str) -> Result<(u64, Arc<Notification>), DecodeError> {
    let bad = |reason: String| DecodeError::Mailbox { id: id.chars().take(100).collect(), reason };
    let e: Entry<'_> = serde_json::from_str(member).map_err(|e| bad(e.to_string()))?;
    let ty = e.t.parse::<NotificationType>().map_err(|_| bad(format!("unknown type `{}`", e.t)))?;
    Ok((e.s, Arc::new(Notification { ty, uuid: e.u.into_owned(), data: e.d.into() })))
}

/// A directory entry as `dir` keeps it (the agent GUID is the field name).
#[derive(Serialize, Deserialize, Default)]
struct DirEntry {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    c: Option<String>,
    #[serde(default)]
    o: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    r: Option<i32>,
}

fn decode_dir(agent_guid: &str, json: &str) -> Result<AgentEntry, DecodeError> {
    let d: DirEntry = serde_json::from_str(json).map_err(DecodeError::Directory)?;
    Ok(AgentEntry {
        agent_guid: agent_guid.to_owned(),
        contact_id: d.c,
        off_hook_enabled: d.o,
        recording_controls: d.r,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Short hash of an interaction id, for its claim's key name.
fn interaction_hash(interaction: &str) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(interaction.as_bytes())[..16])
}

impl RedisStore {
    async fn load_one(&self, member: String) -> Result<Option<StoredSession>, StoreError> {
        let (agent, id) = decode_index(&member)?;
        let mut conn = self.conn();
        let kv = &self.inner.kv;
        let (fields, members): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(kv.agent_key(&agent, &format!("s:{id}")))
            .zrange(kv.agent_key(&agent, &format!("m:{id}")), 0, -1)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        if fields.is_empty() {
            // Deleted, its index entry not: drop that too.
            let _: () = conn.srem(kv.key("sessions"), &member).await.map_err(store_error)?;
            return Ok(None);
        }
        let (record, mut next_seq) = decode_record(&id, &fields)?;
        let mut mailbox = Vec::with_capacity(members.len());
        for m in &members {
            let (seq, n) = decode_entry(&id, m)?;
            next_seq = next_seq.max(seq.saturating_add(1));
            mailbox.push((seq, n));
        }
        Ok(Some(StoredSession { record, next_seq, mailbox }))
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn directory_apply(&self, tenant: &str, op: DirectoryOp) -> Result<Option<AgentEntry>, StoreError> {
        let encode = |d: &DirEntry| serde_json::to_string(d).unwrap_or_default();
        let (mode, agent, arg) = match op {
            DirectoryOp::Put(e) => {
                let d = DirEntry { c: e.contact_id, o: e.off_hook_enabled, r: e.recording_controls };
                ("put", e.agent_guid, encode(&d))
            }
            DirectoryOp::Patch { agent_guid, patch } => {
                let mut m = serde_json::Map::new();
                if let Some(c) = patch.contact_id {
                    m.insert("c".into(), c.into());
                }
                if let Some(o) = patch.off_hook_enabled {
                    m.insert("o".into(), o.into());
                }
                if let Some(r) = patch.recording_controls {
                    m.insert("r".into(), r.into());
                }
                // An empty Lua table encodes as `{}`, an empty patch as well.
                ("patch", agent_guid, serde_json::Value::Object(m).to_string())
            }
            DirectoryOp::Remove { agent_guid } => ("remove", agent_guid, String::new()),
        };
        let kv = &self.inner.kv;
        let prev: Option<String> = self
            .directory
            .key(kv.tenant_key(tenant, "dir"))
            .key(kv.tenant_key(tenant, "contacts"))
            .arg(mode)
            .arg(&agent)
            .arg(arg)
            .invoke_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(prev.map(|p| decode_dir(&agent, &p)).transpose()?)
    }

    async fn directory_get(&self, tenant: &str, agent_guid: &str) -> Result<Option<AgentEntry>, StoreError> {
        let v: Option<String> =
            self.conn().hget(self.inner.kv.tenant_key(tenant, "dir"), agent_guid).await.map_err(store_error)?;
        Ok(v.map(|p| decode_dir(agent_guid, &p)).transpose()?)
    }

    async fn resolve_contact(&self, tenant: &str, contact_id: &str) -> Result<Option<String>, StoreError> {
        self.conn().hget(self.inner.kv.tenant_key(tenant, "contacts"), contact_id).await.map_err(store_error)
    }

    async fn dedup_contains(&self, key: &DedupKey) -> Result<bool, StoreError> {
        if lock(&self.inner.dedup_pending).contains(&(key.tenant.clone(), key.hash)) {
            return Ok(true);
        }
        self.conn().exists(dedup_key(&self.inner.kv, key)).await.map_err(store_error)
    }

    /// Buffered like the session writes (durable with the next flush), and
    /// expired by Redis after `window` (`SET PX`): Redis memory with a
    /// per-key expiry replaces the embedded store's [`super::DedupCapacity`],
    /// so no tenant's traffic makes another's keys be forgotten early.
    async fn dedup_insert(&self, key: &DedupKey, window: Duration) -> Result<(), StoreError> {
        lock(&self.inner.dedup_pending).insert((key.tenant.clone(), key.hash));
        self.push(Write::Dedup { key: key.clone(), window }, None);
        Ok(())
    }

    async fn sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        let members: Vec<String> = self.conn().smembers(self.inner.kv.key("sessions")).await.map_err(store_error)?;
        let loaded: Vec<Option<StoredSession>> = futures_util::stream::iter(members)
            .map(|m| self.load_one(m))
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(loaded.into_iter().flatten().collect())
    }

    fn session_put(&self, record: &SessionRecord) {
        self.push(Write::SessionPut(record.clone()), None);
    }

    fn session_delete(&self, agent: &AgentId, id: &str) {
        self.push(Write::SessionDelete { agent: agent.clone(), id: id.into() }, None);
    }

    fn mailbox_put(&self, agent: &AgentId, session: &Arc<str>, seq: u64, n: &Arc<Notification>) {
        self.push(Write::MailboxPut { agent: agent.clone(), session: session.clone(), seq, n: n.clone() }, None);
    }

    fn mailbox_remove(&self, agent: &AgentId, session: &Arc<str>, seq: u64) {
        self.push(Write::MailboxRemove { agent: agent.clone(), session: session.clone(), seq }, None);
    }

    fn seq_reserve(&self, agent: &AgentId, session: &Arc<str>, upto: u64, durable: Box<dyn FnOnce() + Send>) {
        self.push(Write::SeqReserve { agent: agent.clone(), session: session.clone(), upto }, Some(durable));
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let target = {
            let b = lock(&self.inner.buf);
            if b.closed {
                return Err(StoreError::new(ErrorKind::Unavailable, "the store is closed"));
            }
            b.pushed
        };
        let mut rx = self.inner.flushed.subscribe();
        let seen = rx.borrow_and_update().clone();
        if seen.through >= target {
            return Ok(());
        }
        // Only an attempt that ends from now on answers (an older failure
        // is tried again first).
        self.inner.wake.notify_one();
        loop {
            if rx.changed().await.is_err() {
                return Err(StoreError::new(ErrorKind::Unavailable, "the store is closed"));
            }
            let now = rx.borrow_and_update().clone();
            if now.through >= target {
                return Ok(());
            }
            if let Some((covers, kind, why)) = &now.failed {
                let new = seen.failed.as_ref().is_none_or(|old| !Arc::ptr_eq(&old.2, why));
                if new && *covers >= target {
                    return Err(StoreError::new(*kind, why.to_string()));
                }
            }
        }
    }

    /// The agent's count of long-lived sessions is its `sessions` set, so it
    /// cannot drift from the sessions across a crash between a session's write
    /// and its count; `delta` only says that a synced write changed it.
    async fn availability_count(&self, agent: &AgentId, _delta: i64) -> Result<u64, StoreError> {
        self.conn().scard(self.inner.kv.agent_key(agent, "sessions")).await.map_err(store_error)
    }

    async fn availability_published(&self) -> Result<Vec<AgentId>, StoreError> {
        let members: Vec<String> = self.conn().smembers(self.inner.kv.key("available")).await.map_err(store_error)?;
        Ok(members.iter().map(|m| decode_agent(m)).collect::<Result<_, _>>()?)
    }

    async fn set_availability_published(&self, agent: &AgentId, available: bool) -> Result<(), StoreError> {
        let kv = &self.inner.kv;
        let mut conn = self.conn();
        let _: () =
            conn.hset(kv.agent_key(agent, "avail"), "published", u8::from(available)).await.map_err(store_error)?;
        mark_available(kv, &mut conn, agent, available).await?;
        Ok(())
    }

    async fn auto_accept_claim(&self, agent: &AgentId, interaction: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.inner.kv.agent_key(agent, &format!("claim:{}", interaction_hash(interaction)));
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        Ok(set.is_some())
    }

    async fn auto_accept_release(&self, agent: &AgentId, interaction: &str) -> Result<(), StoreError> {
        let key = self.inner.kv.agent_key(agent, &format!("claim:{}", interaction_hash(interaction)));
        self.conn().del(key).await.map_err(store_error)
    }

    /// Redis expires dedup keys and claims by itself; what is left is to
    /// retry writes a failed flush still holds.
    async fn expire(&self) -> Result<(), StoreError> {
        self.sync().await
    }

    fn ready(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
            && self.inner.flush_ok.load(Ordering::Relaxed)
            && self.inner.unflushed.load(Ordering::Relaxed) < MAX_UNFLUSHED
    }

    async fn close(&self) {
        if let Err(e) = self.sync().await {
            tracing::error!(error = %e, "Redis store closed before its last writes were acknowledged");
        }
        lock(&self.inner.buf).closed = true;
        self.stop.cancel();
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// How long `ROUTE` remembers a notification's uuid: a source sent again
/// within it (a backend retrying a 503, a Kafka record read again after a
/// failed ingest, both seconds apart) appends nothing twice; one sent again
/// later is appended again, under the same uuid (the client sees it as a
/// redelivery).
const RETRY_WINDOW: Duration = Duration::from_secs(60);

/// How long a claimed availability transition may take to publish before
/// another node publishes it: far past any publish bound.
const AVAILABILITY_LEASE: Duration = Duration::from_secs(30);

/// When a lease taken now runs out, by the wall clock (a lease between
/// processes; the injected clock decides only what the contract times).
fn lease_deadline() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    ms(now + AVAILABILITY_LEASE)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl Placement for RedisStore {
    async fn record(&self, agent: &AgentId, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let fields: HashMap<String, String> =
            self.conn().hgetall(self.inner.kv.agent_key(agent, &format!("s:{id}"))).await.map_err(store_error)?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(decode_record(id, &fields)?.0))
    }

    async fn attach(
        &self,
        agent: &AgentId,
        id: &str,
        node: &str,
        instance: &str,
        now_ms: u64,
        ttl: Duration,
        auto_accept: bool,
        push_token: Option<&str>,
    ) -> Result<Option<Attached>, StoreError> {
        let kv = &self.inner.kv;
        // A detach of this session still buffered would take the index entry
        // back out after the SADD below: flushed first.
        self.sync().await?;
        // Indexed first: a node that dies right after the attach is reaped.
        let mut conn = self.conn();
        let _: () = conn.sadd(node_key(kv, node, "attached"), index_member(agent, id)).await.map_err(store_error)?;
        let _: () = conn.sadd(kv.key("attached-nodes"), node).await.map_err(store_error)?;
        let mut inv = self.scripts.attach.key(kv.agent_key(agent, &format!("s:{id}")));
        inv.key(kv.agent_key(agent, &format!("m:{id}")))
            .arg(node)
            .arg(now_ms)
            .arg(ms(ttl))
            .arg(if auto_accept { "1" } else { "0" })
            .arg(push_token.unwrap_or_default())
            .arg(if push_token.is_some() { "1" } else { "0" })
            .arg(instance);
        type Reply = Option<(u64, String, u64, HashMap<String, String>, Vec<String>)>;
        let reply: Reply = inv.invoke_async(&mut self.conn()).await.map_err(store_error)?;
        let Some((generation, previous, dropped, fields, members)) = reply else { return Ok(None) };
        let (mut record, mut next_seq) = decode_record(id, &fields)?;
        record.dropped = dropped;
        record.disconnected_at_ms = None;
        let mut mailbox = Vec::with_capacity(members.len());
        for m in &members {
            let (seq, n) = decode_entry(id, m)?;
            next_seq = next_seq.max(seq.saturating_add(1));
            mailbox.push((seq, n));
        }
        // Looked at again after a TTL: if this node dies attached, its TTL starts then.
        let due = now_ms.saturating_add(ms(ttl));
        let _: () = self.conn().zadd(kv.key("expiry"), index_member(agent, id), due).await.map_err(store_error)?;
        let previous = Some(previous).filter(|p| !p.is_empty() && p != node);
        Ok(Some(Attached { stored: StoredSession { record, next_seq, mailbox }, generation, previous }))
    }

    fn detach(&self, agent: &AgentId, id: &Arc<str>, node: &str, generation: u64, now_ms: u64, ttl: Duration) {
        let due = now_ms.saturating_add(ms(ttl));
        let (agent, id, node) = (agent.clone(), id.clone(), node.into());
        self.push(Write::Detach { agent, id, node, generation, at: now_ms, due }, None);
    }

    async fn reclaim(
        &self,
        agent: &AgentId,
        id: &str,
        generation: u64,
        node: &str,
        instance: &str,
    ) -> Result<bool, StoreError> {
        let kv = &self.inner.kv;
        let mut conn = self.conn();
        let _: () = conn.sadd(node_key(kv, node, "attached"), index_member(agent, id)).await.map_err(store_error)?;
        let _: () = conn.sadd(kv.key("attached-nodes"), node).await.map_err(store_error)?;
        let mut inv = self.scripts.reclaim.key(kv.agent_key(agent, &format!("s:{id}")));
        inv.arg(generation).arg(node).arg(instance);
        let held: i64 = inv.invoke_async(&mut conn).await.map_err(store_error)?;
        Ok(held == 1)
    }

    async fn end(&self, agent: &AgentId, id: &str, generation: u64) -> Result<bool, StoreError> {
        let kv = &self.inner.kv;
        let mut inv = self.scripts.end.key(kv.agent_key(agent, &format!("s:{id}")));
        inv.key(kv.agent_key(agent, &format!("m:{id}"))).key(kv.agent_key(agent, "sessions")).arg(id).arg(generation);
        let mut conn = self.conn();
        let ended: i64 = inv.invoke_async(&mut conn).await.map_err(store_error)?;
        if ended == 1 {
            // Another slot: a member left behind is found gone and dropped later.
            let dropped: Result<(), _> = conn.srem(kv.key("sessions"), index_member(agent, id)).await;
            if let Err(e) = dropped {
                tracing::warn!(error = %e, "an ended session's index entry is left for later");
            }
        }
        Ok(ended == 1)
    }

    async fn reap(&self, node: &str, alive: Option<&str>, now_ms: u64, ttl: Duration) -> Result<usize, StoreError> {
        let kv = &self.inner.kv;
        let mut conn = self.conn();
        let index = node_key(kv, node, "attached");
        let members: Vec<String> = conn.smembers(&index).await.map_err(store_error)?;
        let mut reaped = 0;
        let mut kept = 0;
        for member in members {
            let Ok((agent, id)) = decode_index(&member) else {
                let _: () = conn.srem(&index, &member).await.map_err(store_error)?;
                continue;
            };
            let mut inv = self.scripts.reap.key(kv.agent_key(&agent, &format!("s:{id}")));
            inv.arg(node).arg(alive.unwrap_or_default()).arg(now_ms);
            let done: i64 = inv.invoke_async(&mut conn).await.map_err(store_error)?;
            if done < 0 {
                kept += 1;
                continue;
            }
            if done == 1 {
                reaped += 1;
                let due = now_ms.saturating_add(ms(ttl));
                let _: () = conn.zadd(kv.key("expiry"), &member, due).await.map_err(store_error)?;
            }
            let _: () = conn.srem(&index, &member).await.map_err(store_error)?;
        }
        if kept == 0 && alive.is_none() {
            let _: () = conn.srem(kv.key("attached-nodes"), node).await.map_err(store_error)?;
        }
        Ok(reaped)
    }

    async fn attached_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.conn().smembers(self.inner.kv.key("attached-nodes")).await.map_err(store_error)
    }

    async fn route(
        &self,
        agent: &AgentId,
        n: &Notification,
        capacity: usize,
        now_ms: u64,
    ) -> Result<Routed, StoreError> {
        let kv = &self.inner.kv;
        let mut inv = self.scripts.route.key(kv.agent_key(agent, "sessions"));
        inv.key(kv.agent_key(agent, "short"))
            .key(kv.agent_key(agent, "routed"))
            .arg(kv.agent_key(agent, ""))
            .arg(entry_rest(n))
            .arg(capacity)
            .arg(&n.uuid)
            .arg(now_ms)
            .arg(ms(RETRY_WINDOW));
        let (flat, short_lived): (Vec<String>, Vec<String>) =
            inv.invoke_async(&mut self.conn()).await.map_err(store_error)?;
        let mut routed = Routed { short_lived, ..Routed::default() };
        for f in flat.chunks_exact(5) {
            let [id, seq, node, token, dropped] = f else { continue };
            let id: Arc<str> = id.as_str().into();
            let seq = seq.parse::<u64>().map_err(|_| DecodeError::Field { id: id.to_string(), field: "next_seq" })?;
            routed.dropped += u64::from(dropped == "1");
            if !node.is_empty() {
                routed.attached.push((node.clone(), id, seq, Some(token.clone()).filter(|t| !t.is_empty())));
            } else if !token.is_empty() {
                routed.detached.push((id, token.clone()));
            }
        }
        Ok(routed)
    }

    fn short_lived(&self, agent: &AgentId, session: &Arc<str>, node: Option<&Arc<str>>) {
        self.push(Write::ShortLived { agent: agent.clone(), session: session.clone(), node: node.cloned() }, None);
    }

    async fn tenant_agents(&self, tenant: &str) -> Result<Vec<AgentId>, StoreError> {
        let members: Vec<String> =
            self.conn().smembers(self.inner.kv.tenant_key(tenant, "agents")).await.map_err(store_error)?;
        Ok(members.iter().map(|m| decode_agent(m)).collect::<Result<_, _>>()?)
    }

    async fn expire_due(&self, now_ms: u64, ttl: Duration) -> Result<Vec<AgentId>, StoreError> {
        const BATCH: usize = 256;
        let kv = &self.inner.kv;
        let mut conn = self.conn();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(kv.key("expiry"))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(BATCH)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let mut ended = Vec::new();
        for member in due {
            let Ok((agent, id)) = decode_index(&member) else {
                let _: () = conn.zrem(kv.key("expiry"), &member).await.map_err(store_error)?;
                continue;
            };
            let mut inv = self.scripts.expire.key(kv.agent_key(&agent, &format!("s:{id}")));
            inv.key(kv.agent_key(&agent, &format!("m:{id}")))
                .key(kv.agent_key(&agent, "sessions"))
                .arg(&id)
                .arg(now_ms)
                .arg(ms(ttl));
            let (next, ir): (i64, String) = inv.invoke_async(&mut conn).await.map_err(store_error)?;
            match next {
                0 => {
                    // Ended: its availability follows whatever the indexes say.
                    ended.push(AgentId { ir_instance: ir.into(), ..agent });
                    // Two keys in two slots (Redis Cluster): one command each. An
                    // entry left behind is found gone and dropped by a later sweep.
                    let zrem: Result<(), _> = conn.zrem(kv.key("expiry"), &member).await;
                    let srem: Result<(), _> = conn.srem(kv.key("sessions"), &member).await;
                    if let Err(e) = zrem.and(srem) {
                        tracing::warn!(error = %e, "an expired session's index entries are left for the next sweep");
                    }
                }
                n if n < 0 => {
                    let _: () = conn.zrem(kv.key("expiry"), &member).await.map_err(store_error)?;
                }
                n => {
                    let _: () = conn.zadd(kv.key("expiry"), &member, n).await.map_err(store_error)?;
                }
            }
        }
        Ok(ended)
    }

    async fn mailbox_after(
        &self,
        agent: &AgentId,
        id: &str,
        after: u64,
    ) -> Result<Vec<(u64, Arc<Notification>)>, StoreError> {
        let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.inner.kv.agent_key(agent, &format!("m:{id}")))
            .arg(format!("({after}"))
            .arg("+inf")
            .query_async(&mut self.conn())
            .await
            .map_err(store_error)?;
        members.iter().map(|m| decode_entry(id, m).map_err(StoreError::from)).collect()
    }

    async fn auto_accepts(&self, agent: &AgentId, now_ms: u64, ttl: Duration) -> Result<Option<AgentId>, StoreError> {
        let kv = &self.inner.kv;
        let mut inv = self.scripts.auto_accepts.key(kv.agent_key(agent, "sessions"));
        inv.arg(kv.agent_key(agent, "")).arg(now_ms).arg(ms(ttl));
        let ir: Option<String> = inv.invoke_async(&mut self.conn()).await.map_err(store_error)?;
        Ok(ir.map(|ir| AgentId { ir_instance: ir.into(), ..agent.clone() }))
    }

    async fn admit(&self, agent: &AgentId, cap: usize) -> Result<Admitted, StoreError> {
        let kv = &self.inner.kv;
        let mut inv = self.scripts.admit.key(kv.agent_key(agent, "sessions"));
        inv.arg(kv.agent_key(agent, "")).arg(cap);
        let reply: redis::Value = inv.invoke_async(&mut self.conn()).await.map_err(store_error)?;
        match reply {
            redis::Value::Int(0) => Ok(Admitted::Room),
            redis::Value::Int(_) => Ok(Admitted::Full),
            redis::Value::BulkString(id) => {
                let id: Arc<str> = String::from_utf8_lossy(&id).into();
                let _: () =
                    self.conn().srem(kv.key("sessions"), index_member(agent, &id)).await.map_err(store_error)?;
                Ok(Admitted::Evicted(id))
            }
            other => Err(DecodeError::Index(format!("admit answered {other:?}")).into()),
        }
    }

    async fn availability_claim(&self, agent: &AgentId) -> Result<Option<(bool, String)>, StoreError> {
        let kv = &self.inner.kv;
        // Leased before it is claimed, under a lease of this claim alone: a
        // claimer that dies before publishing leaves it, and another node
        // publishes when it runs out.
        let leases = kv.key("availability-leases");
        let lease = serde_json::json!([
            &*agent.tenant_guid,
            &*agent.agent_guid,
            &*agent.ir_instance,
            uuid::Uuid::new_v4().simple().to_string()
        ])
        .to_string();
        let mut conn = self.conn();
        let _: () = conn.zadd(&leases, &lease, lease_deadline()).await.map_err(store_error)?;
        let mut inv = self.scripts.availability.key(kv.agent_key(agent, "sessions"));
        inv.key(kv.agent_key(agent, "avail"));
        let claimed: i64 = inv.invoke_async(&mut conn).await.map_err(store_error)?;
        let available = match claimed {
            1 => true,
            0 => false,
            _ => {
                let _: () = conn.zrem(&leases, &lease).await.map_err(store_error)?;
                return Ok(None);
            }
        };
        mark_available(kv, &mut conn, agent, available).await?;
        Ok(Some((available, lease)))
    }

    async fn availability_done(&self, lease: &str) -> Result<(), StoreError> {
        self.conn().zrem(self.inner.kv.key("availability-leases"), lease).await.map_err(store_error)
    }

    async fn availability_overdue(&self) -> Result<Vec<(AgentId, bool, String)>, StoreError> {
        let kv = &self.inner.kv;
        let leases = kv.key("availability-leases");
        let mut conn = self.conn();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&leases)
            .arg("-inf")
            .arg(lease_deadline().saturating_sub(ms(AVAILABILITY_LEASE)))
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut conn)
            .await
            .map_err(store_error)?;
        let mut out = Vec::new();
        for lease in due {
            // Taken over by this caller first: nodes sweeping at once seldom both take it.
            let _: () = conn.zadd(&leases, &lease, lease_deadline()).await.map_err(store_error)?;
            let Ok((tenant, agent, ir, _)) = serde_json::from_str::<(String, String, String, String)>(&lease) else {
                let _: () = conn.zrem(&leases, &lease).await.map_err(store_error)?;
                continue;
            };
            let agent = AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: ir.into() };
            let published: Option<String> =
                conn.hget(kv.agent_key(&agent, "avail"), "published").await.map_err(store_error)?;
            out.push((agent, published.as_deref() == Some("1"), lease));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> SessionRecord {
        SessionRecord {
            id: "s-1".into(),
            key_hash: [0xab; 32],
            agent: AgentId { tenant_guid: "t".into(), agent_guid: "a".into(), ir_instance: "ir".into() },
            auto_accept: true,
            push_token: Some("device".into()),
            dropped: 3,
            disconnected_at_ms: Some(1_700_000_000_000),
        }
    }

    fn fields_of(r: &SessionRecord, next_seq: Option<u64>) -> HashMap<String, String> {
        let mut f: HashMap<String, String> = record_fields(r).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        if let Some(n) = next_seq {
            f.insert("next_seq".into(), n.to_string());
        }
        f
    }

    #[test]
    fn a_record_reads_back_as_written_with_and_without_its_optional_fields() {
        let r = record();
        assert_eq!(decode_record("s-1", &fields_of(&r, Some(2049))).expect("decodes"), (r.clone(), 2049));
        let bare = SessionRecord { push_token: None, disconnected_at_ms: None, auto_accept: false, ..r };
        assert_eq!(decode_record("s-1", &fields_of(&bare, None)).expect("decodes"), (bare, 1));
    }

    #[test]
    fn a_mailbox_entry_and_a_directory_entry_read_back_as_written() {
        let n = Notification { ty: NotificationType::Presence, uuid: "u\n\"1".into(), data: "{\"x\":\"\\\"\"}".into() };
        let (seq, back) = decode_entry("s", &encode_entry(42, &n)).expect("decodes");
        assert_eq!((seq, back.ty, back.uuid.as_str(), &*back.data), (42, n.ty, "u\n\"1", &*n.data));
        let d = DirEntry { c: Some("100".into()), o: true, r: Some(-2) };
        let e = decode_dir("a", &serde_json::to_string(&d).expect("json")).expect("decodes");
        assert_eq!((e.contact_id.as_deref(), e.off_hook_enabled, e.recording_controls), (Some("100"), true, Some(-2)));
        let (agent, id) = decode_index(&index_member(&record().agent, "s-1")).expect("decodes");
        assert_eq!((&*agent.tenant_guid, &*agent.agent_guid, id.as_str()), ("t", "a", "s-1"));
        assert_eq!(decode_agent(&agent_member(&record().agent)).expect("decodes"), record().agent);
    }

    #[test]
    fn a_corrupt_value_is_a_fatal_store_error() {
        let mut f = fields_of(&record(), Some(5));
        f.insert("key_hash".into(), "zz".repeat(32));
        let e = StoreError::from(decode_record("s-1", &f).expect_err("corrupt"));
        assert_eq!(e.kind(), ErrorKind::Fatal);
        for member in ["", "{", "{\"s\":1,\"t\":\"no_such_type\",\"u\":\"u\",\"d\":\"{}\"}", "[1,2]"] {
            let e = StoreError::from(decode_entry("s", member).expect_err("corrupt"));
            assert_eq!(e.kind(), ErrorKind::Fatal, "{member:?}");
        }
        assert!(decode_index("[\"t\",\"a\"]").is_err());
        assert!(decode_dir("a", "{\"o\":\"yes\"}").is_err());
    }

    const FIELDS: [&str; 10] = [
        "tenant",
        "agent",
        "ir",
        "key_hash",
        "auto_accept",
        "dropped",
        "push_token",
        "disconnected_at_ms",
        "next_seq",
        "other",
    ];

    proptest! {
        #[test]
        fn arbitrary_field_values_never_panic_the_decoders(
            values in proptest::collection::vec(proptest::option::of(".{0,80}"), FIELDS.len()),
            member in ".{0,200}",
        ) {
            let fields: HashMap<String, String> = FIELDS
                .iter()
                .zip(values)
                .filter_map(|(k, v)| v.map(|v| ((*k).to_owned(), v)))
                .collect();
            let _ = decode_record("s", &fields);
            let _ = decode_entry("s", &member);
            let _ = decode_index(&member);
            let _ = decode_agent(&member);
            let _ = decode_dir("a", &member);
        }

        #[test]
        fn valid_records_survive_any_field_values(
            tenant in ".{0,40}", agent in ".{0,40}", token in proptest::option::of(".{0,40}"),
            dropped in any::<u64>(), at in proptest::option::of(any::<u64>()), hash in any::<[u8; 32]>(),
            next in any::<u64>(),
        ) {
            let r = SessionRecord {
                id: "s".into(),
                key_hash: hash,
                agent: AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: "ir".into() },
                auto_accept: false,
                push_token: token,
                dropped,
                disconnected_at_ms: at,
            };
            prop_assert_eq!(decode_record("s", &fields_of(&r, Some(next))).expect("decodes"), (r, next));
        }
    }
}
