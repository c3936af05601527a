//! The Redis connection and key names shared by the Redis store and the
//! cluster's membership. One Redis (`redis://`, `rediss://`) or a Redis
//! Cluster (a comma-separated list of seed nodes): either way one cloneable
//! handle that reconnects by itself.
//!
//! Every key of one agent carries the agent's hash tag and every key of one
//! tenant the tenant's, so that each lands in one slot and a script can
//! update it atomically on Redis Cluster. Tags are hashes of the identity,
//! never the identity itself: a tenant or agent GUID with `{`, `}` or `:` in
//! it cannot move a key into another agent's slot or name.

use crate::fault::ErrorKind;
use crate::model::AgentId;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RetryMethod, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// A connection to one Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("redis_url `{url}`: {source}")]
    Url { url: String, source: redis::RedisError },
    #[error("cannot reach Redis at `{url}`: {source}")]
    Connect { url: String, source: redis::RedisError },
}

/// The Redis a bridge uses, with its key prefix.
#[derive(Clone)]
pub struct Kv {
    conn: Conn,
    prefix: Arc<str>,
    urls: Arc<[String]>,
}

impl Kv {
    /// Connects to `url`: one URL for one Redis, several (comma-separated)
    /// for the seed nodes of a Redis Cluster. `timeout` bounds each reply
    /// and each connection attempt.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Kv, KvError> {
        let urls: Vec<String> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
        let err_url = |source| KvError::Url { url: url.to_owned(), source };
        let err_connect = |source| KvError::Connect { url: url.to_owned(), source };
        let conn = if urls.len() == 1 {
            let client = redis::Client::open(urls[0].as_str()).map_err(err_url)?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(timeout))
                .set_number_of_retries(2);
            Conn::Single(ConnectionManager::new_with_config(client, config).await.map_err(err_connect)?)
        } else {
            let client = ClusterClient::builder(urls.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(err_url)?;
            Conn::Cluster(client.get_async_connection().await.map_err(err_connect)?)
        };
        Ok(Kv { conn, prefix: prefix.into(), urls: urls.into() })
    }

    /// A handle for commands; clones share the connection.
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The URLs this handle was made from (pub/sub opens its own connections).
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// A key of no agent or tenant (indexes, membership).
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// A key of one agent: in the agent's slot.
    pub fn agent_key(&self, agent: &AgentId, rest: &str) -> String {
        format!("{}:{{a:{}}}:{rest}", self.prefix, agent_tag(&agent.tenant_guid, &agent.agent_guid))
    }

    /// A key of one tenant: in the tenant's slot.
    pub fn tenant_key(&self, tenant: &str, rest: &str) -> String {
        format!("{}:{{t:{}}}:{rest}", self.prefix, hex(&digest(&[tenant])))
    }
}

/// The hash tag of one agent (tenant and agent GUIDs; the IR instance does
/// not make a different agent).
pub fn agent_tag(tenant: &str, agent: &str) -> String {
    hex(&digest(&[tenant, agent]))
}

/// First 128 bits of SHA-256 over the length-prefixed parts: no two lists of
/// parts share an input.
fn digest(parts: &[&str]) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a Redis failure means for the caller: an outage or a timeout may pass,
/// anything else (a script error, a wrong type) will not.
pub fn error_kind(e: &redis::RedisError) -> ErrorKind {
    if e.is_timeout() {
        return ErrorKind::Timeout;
    }
    match e.retry_method() {
        RetryMethod::NoRetry => ErrorKind::Fatal,
        _ => ErrorKind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_tag_depends_on_tenant_and_agent_and_cannot_be_forged_by_separators() {
        assert_eq!(agent_tag("t", "a"), agent_tag("t", "a"));
        assert_ne!(agent_tag("t", "a"), agent_tag("a", "t"));
        assert_ne!(agent_tag("t:a", "b"), agent_tag("t", "a:b"));
        assert_ne!(agent_tag("t}", "a"), agent_tag("t", "}a"));
        assert!(agent_tag("{x}", "}").chars().all(|c| c.is_ascii_hexdigit()));
    }
}
