//! This node in a cluster on Redis: what the sessions tell other nodes
//! ([`crate::session::Peers`]) goes out through the relay, addressed with the
//! membership's view of who is alive; what other nodes send is handed to the
//! sessions here.

use crate::membership::Membership;
use crate::model::{AgentId, Notification};
use crate::relay::{Carried, Inbound, Inbox, Message, Relay, RelayError};
use crate::session::{Peers, Sessions};
use crate::store::StoreError;
use std::sync::{Arc, OnceLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct RelayPeers {
    relay: Relay,
    /// Set once the node joined; until then who is alive is not known.
    membership: OnceLock<Arc<Membership>>,
}

impl RelayPeers {
    pub fn new(relay: Relay) -> Self {
        RelayPeers { relay, membership: OnceLock::new() }
    }

    /// The node joined: `live` answers from its view from now on.
    pub fn joined(&self, membership: Arc<Membership>) {
        let _ = self.membership.set(membership);
    }

    async fn send(&self, node: &str, message: &Message) -> Result<(), StoreError> {
        self.relay.send(node, message).await.map(drop).map_err(|e: RelayError| StoreError::new(e.kind(), e))
    }
}

#[async_trait::async_trait]
impl Peers for RelayPeers {
    fn live(&self) -> Vec<String> {
        self.membership.get().map(|m| m.live()).unwrap_or_default()
    }

    async fn agent(
        &self,
        node: &str,
        agent: &AgentId,
        n: &Notification,
        seqs: Vec<(Arc<str>, u64)>,
        short_lived: bool,
    ) -> Result<(), StoreError> {
        let message = Message::Agent {
            tenant: agent.tenant_guid.to_string(),
            agent: agent.agent_guid.to_string(),
            n: Carried::from(n),
            seqs: seqs.into_iter().map(|(s, seq)| (s.to_string(), seq)).collect(),
            short_lived,
        };
        self.send(node, &message).await
    }

    async fn tenant(&self, node: &str, tenant: &str, n: &Notification) -> Result<(), StoreError> {
        self.send(node, &Message::Tenant { tenant: tenant.to_owned(), n: Carried::from(n) }).await
    }

    async fn takeover(&self, node: &str, session: &str, generation: u64) -> Result<(), StoreError> {
        self.send(node, &Message::Takeover { session: session.to_owned(), generation }).await
    }
}

/// Hands what other nodes send to the sessions here, until `stop`.
pub fn spawn_inbound(mut inbox: Inbox, sessions: Arc<Sessions>, tasks: &TaskTracker, stop: CancellationToken) {
    tasks.spawn(async move {
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                received = inbox.recv() => received,
            };
            match received {
                None => return,
                Some(Inbound::Resync) => sessions.resync().await,
                Some(Inbound::Lost) => sessions.lost_elsewhere(),
                Some(Inbound::Message(Message::Agent { tenant, agent, n, seqs, short_lived })) => {
                    let seqs: Vec<(Arc<str>, u64)> = seqs.into_iter().map(|(s, seq)| (s.into(), seq)).collect();
                    sessions.delivered_elsewhere(&tenant, &agent, &Arc::new(n.into()), &seqs, short_lived);
                }
                Some(Inbound::Message(Message::Tenant { tenant, n })) => {
                    sessions.tenant_elsewhere(&tenant, &Arc::new(n.into()));
                }
                Some(Inbound::Message(Message::Takeover { session, generation })) => {
                    sessions.taken_elsewhere(&session, generation);
                }
            }
        }
    });
}
