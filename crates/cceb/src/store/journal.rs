//! The embedded store's durability: a SQLite database (WAL, `synchronous =
//! FULL`) written by one thread. Writers append operations to a queue; the
//! thread takes everything queued, applies it in one transaction and commits
//! once (group commit), then answers the barriers that were in the batch. So a
//! busy bridge pays one fsync per batch, not per notification.

use super::{AgentEntry, SessionRecord, StoredSession};
use crate::model::{AgentId, Notification};
use crate::sync::lock;
use cceb_protocol::NotificationType;
use rusqlite::{params, Connection};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::oneshot;

/// `MIGRATIONS[i]` upgrades a database of version `i + 1` to `i + 2`; a new
/// database gets `SCHEMA` at the latest version directly.
const MIGRATIONS: [&str; 1] = [DEDUP_PER_TENANT];
const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64 + 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions(
    id TEXT PRIMARY KEY, key_hash BLOB NOT NULL, tenant TEXT NOT NULL, agent TEXT NOT NULL,
    ir_instance TEXT NOT NULL, auto_accept INTEGER NOT NULL, push_token TEXT,
    dropped INTEGER NOT NULL, disconnected_at INTEGER, next_seq INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS mailbox(
    session TEXT NOT NULL, seq INTEGER NOT NULL, uuid TEXT NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY(session, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup(
    tenant TEXT NOT NULL, key BLOB NOT NULL, expires INTEGER NOT NULL, PRIMARY KEY(tenant, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expires ON dedup(expires);
CREATE INDEX IF NOT EXISTS dedup_tenant_expires ON dedup(tenant, expires);
CREATE TABLE IF NOT EXISTS directory(
    tenant TEXT NOT NULL, agent TEXT NOT NULL, contact_id TEXT, off_hook INTEGER NOT NULL,
    recording_controls INTEGER, PRIMARY KEY(tenant, agent)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS availability(
    tenant TEXT NOT NULL, agent TEXT NOT NULL, ir_instance TEXT NOT NULL, PRIMARY KEY(tenant, agent)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS auto_accepted(
    tenant TEXT NOT NULL, agent TEXT NOT NULL, interaction TEXT NOT NULL, expires INTEGER NOT NULL,
    PRIMARY KEY(tenant, agent, interaction)) WITHOUT ROWID;
";

/// Version 2: dedup keys per tenant. A version-1 key's tenant cannot be
/// recovered from its hash, so it gets the empty name (`memory::UNKNOWN_TENANT`)
/// and is consulted for every tenant until it expires.
const DEDUP_PER_TENANT: &str = "
ALTER TABLE dedup RENAME TO dedup_v1;
CREATE TABLE dedup(
    tenant TEXT NOT NULL, key BLOB NOT NULL, expires INTEGER NOT NULL, PRIMARY KEY(tenant, key)) WITHOUT ROWID;
INSERT INTO dedup(tenant, key, expires) SELECT '', key, expires FROM dedup_v1;
DROP TABLE dedup_v1;
";

#[derive(Debug)]
pub enum Op {
    SessionPut(SessionRecord),
    SessionDelete(String),
    MailboxPut {
        session: Arc<str>,
        seq: u64,
        n: Arc<Notification>,
    },
    MailboxRemove {
        session: Arc<str>,
        seq: u64,
    },
    DedupPut {
        tenant: Arc<str>,
        key: u128,
        expires_ms: u64,
    },
    DirectoryPut {
        tenant: String,
        entry: AgentEntry,
    },
    DirectoryRemove {
        tenant: String,
        agent: String,
    },
    Availability {
        agent: AgentId,
        available: bool,
    },
    AutoAccepted {
        agent: AgentId,
        interaction: String,
        expires_ms: u64,
    },
    AutoAcceptRemove {
        agent: AgentId,
        interaction: String,
    },
    /// Deletes what expired before this time, and each listed tenant's dedup
    /// keys that expire before the given one (all of them for `None`): those
    /// memory evicted to stay within its capacity. An evicted key expiring in
    /// the same millisecond as the oldest kept one stays until it expires;
    /// loading applies the capacity again.
    Expire {
        now_ms: u64,
        dedup_trimmed: Vec<(Arc<str>, Option<u64>)>,
    },
    /// Raises the session's `next_seq` to at least `upto`.
    SeqReserve {
        session: Arc<str>,
        upto: u64,
    },
    Barrier(oneshot::Sender<Result<(), String>>),
    /// Called once every op before it is committed.
    AfterCommit(AfterCommit),
}

/// A callback for [`Op::AfterCommit`].
pub struct AfterCommit(pub Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterCommit")
    }
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    closed: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
    healthy: AtomicBool,
}

pub struct Journal {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Everything read back when the journal opens.
#[derive(Debug, Default)]
pub struct Loaded {
    pub sessions: Vec<StoredSession>,
    pub directory: Vec<(String, AgentEntry)>,
    /// Unexpired dedup keys (tenant, key, expiry), oldest expiry first.
    pub dedup: Vec<(String, u128, u64)>,
    pub published: Vec<AgentId>,
    pub accepted: Vec<(AgentId, String, u64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("data directory {dir}: {source}")]
pub struct OpenError {
    dir: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl Journal {
    /// Opens (or creates) `<dir>/cceb.sqlite3`, reads its content back and
    /// starts the writer thread.
    pub fn open(dir: &Path, now_ms: u64) -> Result<(Journal, Loaded), OpenError> {
        let err =
            |source: Box<dyn std::error::Error + Send + Sync>| OpenError { dir: dir.display().to_string(), source };
        let file = private_files(dir).map_err(|e| err(e.into()))?;
        let mut conn = Connection::open(file).map_err(|e| err(e.into()))?;
        // A commit that waits this long for a lock fails, and is retried by the writer.
        conn.busy_timeout(Duration::from_secs(1)).map_err(|e| err(e.into()))?;
        prepare(&conn).map_err(|e| err(e.into()))?;
        let loaded = load(&mut conn, now_ms).map_err(|e| err(e.into()))?;
        let inner = Arc::new(Inner { queue: Mutex::default(), ready: Condvar::new(), healthy: AtomicBool::new(true) });
        let writer = inner.clone();
        let thread = std::thread::Builder::new()
            .name("cceb-journal".into())
            .spawn(move || write_loop(conn, &writer))
            .map_err(|e| err(e.into()))?;
        Ok((Journal { inner, thread: Mutex::new(Some(thread)) }, loaded))
    }

    pub fn push(&self, op: Op) {
        let mut q = lock(&self.inner.queue);
        if q.closed {
            return;
        }
        q.ops.push(op);
        // Only the first op of a batch needs to wake the writer.
        if q.ops.len() == 1 {
            self.inner.ready.notify_one();
        }
    }

    /// Resolves once every op pushed before it is committed.
    pub async fn sync(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.push(Op::Barrier(tx));
        rx.await.unwrap_or_else(|_| Err("the store is closed".into()))
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Commits what is queued and stops the writer thread.
    pub fn close(&self) {
        {
            let mut q = lock(&self.inner.queue);
            q.closed = true;
            self.inner.ready.notify_one();
        }
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

/// The data directory (0700) and the database file (0600): they hold
/// notification payloads and push tokens. SQLite gives its `-wal` and `-shm`
/// files the database file's mode.
fn private_files(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let file = dir.join("cceb.sqlite3");
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&file)?;
    for name in ["cceb.sqlite3", "cceb.sqlite3-wal", "cceb.sqlite3-shm"] {
        match std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(file)
}

fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk before the barrier answers (power loss included).
    conn.pragma_update(None, "synchronous", "FULL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {version} is newer than this bridge ({SCHEMA_VERSION})"
        )));
    }
    // All or nothing: a failed upgrade leaves the database as it was. A new
    // database (version 0) has nothing to migrate: `SCHEMA` creates it.
    let tx = conn.unchecked_transaction()?;
    let done = usize::try_from(version - 1).unwrap_or(MIGRATIONS.len());
    for migration in MIGRATIONS.iter().skip(done) {
        tx.execute_batch(migration)?;
    }
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// How long the writer waits before trying a failed commit again.
const RETRY_AFTER: Duration = Duration::from_millis(250);

fn write_loop(mut conn: Connection, inner: &Inner) {
    // Writes whose commit failed, oldest first: they are tried again, ahead of
    // anything newer, until they commit. Until then every barrier fails, so no
    // source is told its events are durable while earlier writes are not.
    let mut unwritten: Vec<Op> = Vec::new();
    let mut after_commit: Vec<AfterCommit> = Vec::new();
    loop {
        let (batch, closing) = {
            let mut q = lock(&inner.queue);
            while q.ops.is_empty() && !q.closed {
                if unwritten.is_empty() {
                    q = inner.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                } else {
                    q = inner.ready.wait_timeout(q, RETRY_AFTER).unwrap_or_else(PoisonError::into_inner).0;
                    break;
                }
            }
            if q.ops.is_empty() && q.closed && unwritten.is_empty() {
                return;
            }
            (std::mem::take(&mut q.ops), q.closed)
        };
        let mut barriers = Vec::new();
        for op in batch {
            match op {
                Op::Barrier(tx) => barriers.push(tx),
                Op::AfterCommit(f) => after_commit.push(f),
                op => unwritten.push(op),
            }
        }
        let result = if unwritten.is_empty() {
            Ok(())
        } else {
            match apply(&mut conn, &unwritten) {
                Ok(()) => Ok(()),
                Err(e) if transient(&e) => Err(e.to_string()),
                Err(e) => {
                    tracing::error!(error = %e, "the database refuses a write; committing the batch op by op");
                    one_by_one(&mut conn, &mut unwritten)
                }
            }
        };
        match &result {
            Ok(()) => {
                unwritten.clear();
                after_commit.drain(..).for_each(|f| (f.0)());
            }
            Err(e) => tracing::error!(error = %e, waiting = unwritten.len(), "store write failed; retrying"),
        }
        inner.healthy.store(result.is_ok(), Ordering::Relaxed);
        for b in barriers {
            let _ = b.send(result.clone());
        }
        if closing && lock(&inner.queue).ops.is_empty() {
            if !unwritten.is_empty() {
                tracing::error!(lost = unwritten.len(), "store closed with writes that could not be committed");
            }
            return;
        }
    }
}

/// Whether a failed commit may succeed later (a lock, a full or failing
/// disk), as opposed to a write the database will never take.
fn transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if matches!(
        f.code,
        DatabaseBusy | DatabaseLocked | DiskFull | SystemIoFailure | CannotOpen | ReadOnly | OutOfMemory
            | FileLockingProtocolFailed
    ))
}

/// Commits `ops` one at a time, in order, dropping those the database
/// refuses for what they hold, so one bad write cannot wedge every later
/// commit; stops at a transient failure, keeping the rest to retry.
fn one_by_one(conn: &mut Connection, ops: &mut Vec<Op>) -> Result<(), String> {
    let mut done = 0;
    let mut result = Ok(());
    for op in ops.iter() {
        match apply(conn, std::slice::from_ref(op)) {
            Ok(()) => {}
            Err(e) if transient(&e) => {
                result = Err(e.to_string());
                break;
            }
            Err(e) => tracing::error!(error = %e, "discarded a write the database refuses"),
        }
        done += 1;
    }
    ops.drain(..done);
    result
}

fn apply(conn: &mut Connection, ops: &[Op]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    // Seq numbers must keep growing across restarts even once a mailbox is empty.
    let mut next_seq: HashMap<Arc<str>, u64> = HashMap::new();
    for op in ops {
        match op {
            Op::SessionPut(r) => {
                tx.prepare_cached(
                    "INSERT INTO sessions(id, key_hash, tenant, agent, ir_instance, auto_accept, push_token, dropped,
                        disconnected_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT(id) DO UPDATE SET auto_accept = ?6, push_token = ?7, dropped = ?8,
                        disconnected_at = ?9",
                )?
                .execute(params![
                    &*r.id,
                    &r.key_hash[..],
                    &*r.agent.tenant_guid,
                    &*r.agent.agent_guid,
                    &*r.agent.ir_instance,
                    r.auto_accept,
                    r.push_token,
                    r.dropped,
                    r.disconnected_at_ms,
                ])?;
            }
            Op::SessionDelete(id) => {
                tx.prepare_cached("DELETE FROM mailbox WHERE session = ?1")?.execute([&id])?;
                tx.prepare_cached("DELETE FROM sessions WHERE id = ?1")?.execute([&id])?;
            }
            Op::MailboxPut { session, seq, n } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO mailbox(session, seq, uuid, type, data) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![session.as_ref(), seq, n.uuid, n.ty.as_str(), &*n.data])?;
                let e = next_seq.entry(session.clone()).or_default();
                *e = (*e).max(seq + 1);
            }
            Op::MailboxRemove { session, seq } => {
                tx.prepare_cached("DELETE FROM mailbox WHERE session = ?1 AND seq = ?2")?
                    .execute(params![session.as_ref(), seq])?;
            }
            Op::DedupPut { tenant, key, expires_ms } => {
                tx.prepare_cached("INSERT OR REPLACE INTO dedup(tenant, key, expires) VALUES (?1, ?2, ?3)")?
                    .execute(params![tenant.as_ref(), &key.to_le_bytes()[..], expires_ms])?;
            }
            Op::DirectoryPut { tenant, entry } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO directory(tenant, agent, contact_id, off_hook, recording_controls)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    tenant,
                    entry.agent_guid,
                    entry.contact_id,
                    entry.off_hook_enabled,
                    entry.recording_controls
                ])?;
            }
            Op::DirectoryRemove { tenant, agent } => {
                tx.prepare_cached("DELETE FROM directory WHERE tenant = ?1 AND agent = ?2")?
                    .execute(params![tenant, agent])?;
            }
            Op::Availability { agent, available: true } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO availability(tenant, agent, ir_instance) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![&*agent.tenant_guid, &*agent.agent_guid, &*agent.ir_instance])?;
            }
            Op::Availability { agent, available: false } => {
                tx.prepare_cached("DELETE FROM availability WHERE tenant = ?1 AND agent = ?2")?
                    .execute(params![&*agent.tenant_guid, &*agent.agent_guid])?;
            }
            Op::AutoAccepted { agent, interaction, expires_ms } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO auto_accepted(tenant, agent, interaction, expires) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![&*agent.tenant_guid, &*agent.agent_guid, interaction, expires_ms])?;
            }
            Op::AutoAcceptRemove { agent, interaction } => {
                tx.prepare_cached("DELETE FROM auto_accepted WHERE tenant = ?1 AND agent = ?2 AND interaction = ?3")?
                    .execute(params![&*agent.tenant_guid, &*agent.agent_guid, interaction])?;
            }
            Op::Expire { now_ms, dedup_trimmed } => {
                tx.prepare_cached("DELETE FROM dedup WHERE expires <= ?1")?.execute([now_ms])?;
                for (tenant, oldest_kept) in dedup_trimmed {
                    match oldest_kept {
                        Some(expires) => tx
                            .prepare_cached("DELETE FROM dedup WHERE tenant = ?1 AND expires < ?2")?
                            .execute(params![tenant.as_ref(), expires])?,
                        None => tx.prepare_cached("DELETE FROM dedup WHERE tenant = ?1")?.execute([tenant.as_ref()])?,
                    };
                }
                tx.prepare_cached("DELETE FROM auto_accepted WHERE expires <= ?1")?.execute([now_ms])?;
            }
            Op::SeqReserve { session, upto } => {
                let e = next_seq.entry(session.clone()).or_default();
                *e = (*e).max(*upto);
            }
            Op::Barrier(_) | Op::AfterCommit(_) => {}
        }
    }
    for (session, seq) in next_seq {
        tx.prepare_cached("UPDATE sessions SET next_seq = max(next_seq, ?2) WHERE id = ?1")?
            .execute(params![&*session, seq])?;
    }
    tx.commit()
}

fn load(conn: &mut Connection, now_ms: u64) -> rusqlite::Result<Loaded> {
    let mut loaded = Loaded::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    {
        let mut st = conn.prepare(
            "SELECT id, key_hash, tenant, agent, ir_instance, auto_accept, push_token, dropped, disconnected_at, next_seq
             FROM sessions",
        )?;
        let rows = st.query_map([], |r| {
            let hash: Vec<u8> = r.get(1)?;
            let mut key_hash = [0u8; 32];
            if hash.len() == 32 {
                key_hash.copy_from_slice(&hash);
            }
            let id: String = r.get(0)?;
            Ok(StoredSession {
                record: SessionRecord {
                    id: id.into(),
                    key_hash,
                    agent: agent(r.get(2)?, r.get(3)?, r.get(4)?),
                    auto_accept: r.get(5)?,
                    push_token: r.get(6)?,
                    dropped: r.get(7)?,
                    disconnected_at_ms: r.get(8)?,
                },
                next_seq: r.get(9)?,
                mailbox: Vec::new(),
            })
        })?;
        for s in rows {
            let s = s?;
            index.insert(s.record.id.to_string(), loaded.sessions.len());
            loaded.sessions.push(s);
        }
    }
    {
        let mut st = conn.prepare("SELECT session, seq, uuid, type, data FROM mailbox ORDER BY session, seq")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let session: String = r.get(0)?;
            let seq: u64 = r.get(1)?;
            let ty: String = r.get(3)?;
            let (Some(&i), Ok(ty)) = (index.get(&session), ty.parse::<NotificationType>()) else { continue };
            let data: String = r.get(4)?;
            let s = &mut loaded.sessions[i];
            s.next_seq = s.next_seq.max(seq + 1);
            s.mailbox.push((seq, Arc::new(Notification { ty, uuid: r.get(2)?, data: data.into() })));
        }
    }
    {
        let mut st = conn.prepare("SELECT tenant, agent, contact_id, off_hook, recording_controls FROM directory")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                AgentEntry {
                    agent_guid: r.get(1)?,
                    contact_id: r.get(2)?,
                    off_hook_enabled: r.get(3)?,
                    recording_controls: r.get(4)?,
                },
            ))
        })?;
        loaded.directory = rows.collect::<Result<_, _>>()?;
    }
    {
        let mut st = conn.prepare("SELECT tenant, key, expires FROM dedup WHERE expires > ?1 ORDER BY expires")?;
        let rows = st.query_map([now_ms], |r| {
            let k: Vec<u8> = r.get(1)?;
            let mut b = [0u8; 16];
            if k.len() == 16 {
                b.copy_from_slice(&k);
            }
            Ok((r.get(0)?, u128::from_le_bytes(b), r.get(2)?))
        })?;
        loaded.dedup = rows.collect::<Result<_, _>>()?;
    }
    {
        let mut st = conn.prepare("SELECT tenant, agent, ir_instance FROM availability")?;
        let rows = st.query_map([], |r| Ok(agent(r.get(0)?, r.get(1)?, r.get(2)?)))?;
        loaded.published = rows.collect::<Result<_, _>>()?;
    }
    {
        let mut st =
            conn.prepare("SELECT tenant, agent, interaction, expires FROM auto_accepted WHERE expires > ?1")?;
        let rows =
            st.query_map([now_ms], |r| Ok((agent(r.get(0)?, r.get(1)?, String::new()), r.get(2)?, r.get(3)?)))?;
        loaded.accepted = rows.collect::<Result<_, _>>()?;
    }
    Ok(loaded)
}

fn agent(tenant: String, agent: String, ir: String) -> AgentId {
    AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: ir.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0)
    }

    #[tokio::test]
    async fn the_data_directory_and_its_files_are_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let (journal, _) = Journal::open(&dir, 0).expect("open");
        journal.push(Op::DedupPut { tenant: "t".into(), key: 1, expires_ms: u64::MAX >> 1 });
        journal.sync().await.expect("commit");
        assert_eq!(mode(&dir), 0o700);
        for name in ["cceb.sqlite3", "cceb.sqlite3-wal", "cceb.sqlite3-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        drop(journal);
        // A directory an operator made too open is closed up at start.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(dir.join("cceb.sqlite3"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let _ = Journal::open(&dir, 0).expect("reopen");
        assert_eq!((mode(&dir), mode(&dir.join("cceb.sqlite3"))), (0o700, 0o600));
    }

    #[tokio::test]
    async fn a_write_the_database_refuses_is_discarded_and_does_not_wedge_the_journal() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(tmp.path(), 0).expect("open");
        // SQLite integers are signed: this expiry cannot be stored.
        journal.push(Op::DedupPut { tenant: "t".into(), key: 1, expires_ms: u64::MAX });
        journal.push(Op::DedupPut { tenant: "t".into(), key: 2, expires_ms: 1 << 40 });
        journal.sync().await.expect("the good write commits");
        journal.push(Op::DedupPut { tenant: "t".into(), key: 3, expires_ms: 1 << 40 });
        journal.sync().await.expect("later writes commit");
        let c = Connection::open(tmp.path().join("cceb.sqlite3")).expect("open");
        let n: i64 = c.query_row("SELECT count(*) FROM dedup", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn a_failed_commit_is_retried_and_no_later_sync_succeeds_before_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (journal, _) = Journal::open(tmp.path(), 0).expect("open");
        // Another connection holding the write lock makes our commits fail.
        let blocker = Connection::open(tmp.path().join("cceb.sqlite3")).expect("open");
        blocker.execute_batch("BEGIN IMMEDIATE").expect("lock");
        journal.push(Op::DedupPut { tenant: "t".into(), key: 7, expires_ms: u64::MAX >> 1 });
        assert!(journal.sync().await.is_err());
        assert!(!journal.healthy());
        // Nothing new was written, yet the earlier write is not durable: still an error.
        assert!(journal.sync().await.is_err(), "a later sync must not report success");
        blocker.execute_batch("ROLLBACK").expect("unlock");
        journal.sync().await.expect("the same write commits once the lock is gone");
        assert!(journal.healthy());
        let n: i64 = blocker.query_row("SELECT count(*) FROM dedup", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 1);
    }
}
