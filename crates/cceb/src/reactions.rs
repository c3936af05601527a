//! The records the bridge publishes on an agent's behalf as sessions come
//! and go (contract section 6): chat availability, one record per
//! transition, and auto-accept, once per interaction. Above `session`, which
//! only tells it what happened ([`crate::session::Reactions`]); the bus is
//! called here, never under a lock.

use crate::bus::{Bus, BusError, OutRecord};
use crate::metrics::Metrics;
use crate::schema::{Record, SchemaSet};
use crate::session::AgentId;
use crate::store::{Placement, Store, StoreError};
use crate::sync::lock;
use serde_json::{Map, Value as Json};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The record the bridge publishes when an agent's chat availability changes.
const AVAILABILITY_RECORD: &str = "AgentChatAvailabilityEvent";
/// The record auto-accept publishes.
const ACCEPT_RECORD: &str = "AcceptInteractionEvent";

/// Fills the reserved fields the record has: who acts, whether the bridge acts
/// on its own (`isSystemAction`), and the bridge's `source`.
pub fn inject_identity(record: &Record, fields: &mut Map<String, Json>, who: &AgentId, system: bool, source: &str) {
    let identity = [
        ("tenantGuid", Json::from(&*who.tenant_guid)),
        ("agentGuid", Json::from(&*who.agent_guid)),
        ("irInstance", Json::from(&*who.ir_instance)),
        ("isSystemAction", Json::Bool(system)),
        ("isRelocate", Json::Bool(false)),
        ("source", Json::from(source)),
    ];
    for (k, v) in identity {
        if record.has_field(k) {
            fields.insert(k.to_owned(), v);
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReactionSettings {
    /// `source` of the records the bridge publishes itself.
    pub source: String,
    /// How long an auto-accept claim holds (the session TTL).
    pub claim_ttl: Duration,
}

pub struct BridgeRecords {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    schemas: Arc<SchemaSet>,
    metrics: Arc<Metrics>,
    settings: ReactionSettings,
    /// Availability decisions, serialised per agent so one transition
    /// publishes one record; never held across a bus call.
    availability: Mutex<Availability>,
    /// On a cluster store, where another node may decide the same agent at
    /// once: each transition is claimed there first.
    placement: Option<Arc<dyn Placement>>,
}

#[derive(Default)]
struct Availability {
    /// Agents whose last published availability is `true`.
    published: HashSet<AgentId>,
    /// Agents whose record could not be published yet; the sweep retries.
    pending: HashSet<AgentId>,
    /// Agents whose decision is being made now (by one caller).
    running: HashSet<AgentId>,
    /// Agents whose count changed while their decision was running: it runs again.
    dirty: HashSet<AgentId>,
}

/// The claim on one agent's availability decision. A caller cancelled
/// mid-decision releases it on drop and leaves the agent to the sweep, so
/// neither the claim nor a change marked meanwhile is lost.
struct Deciding<'a> {
    availability: &'a Mutex<Availability>,
    agent: &'a AgentId,
    /// Released in order by the caller.
    done: bool,
}

impl Drop for Deciding<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut av = lock(self.availability);
            av.running.remove(self.agent);
            av.dirty.remove(self.agent);
            av.pending.insert(self.agent.clone());
        }
    }
}

impl BridgeRecords {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        schemas: Arc<SchemaSet>,
        metrics: Arc<Metrics>,
        settings: ReactionSettings,
    ) -> Self {
        BridgeRecords { store, bus, schemas, metrics, settings, availability: Mutex::default(), placement: None }
    }

    /// Claims each availability transition in the cluster store before
    /// publishing it: nodes racing for one agent publish one record.
    pub fn claimed_in(mut self, placement: Arc<dyn Placement>) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Publishes the agent's chat availability if the count of its valid
    /// long-lived sessions (after `delta`) disagrees with the last published.
    /// One decision per agent at a time: a caller that finds one running
    /// leaves it to run again and returns at once.
    async fn changed(&self, agent: &AgentId, delta: i64) {
        if delta != 0 {
            if let Err(e) = self.store.availability_count(agent, delta).await {
                tracing::warn!(error = %e, "cannot count sessions for chat availability");
                lock(&self.availability).pending.insert(agent.clone());
                return;
            }
        }
        {
            let mut av = lock(&self.availability);
            if !av.running.insert(agent.clone()) {
                av.dirty.insert(agent.clone());
                return;
            }
        }
        let mut claim = Deciding { availability: &self.availability, agent, done: false };
        loop {
            self.decide_availability(agent).await;
            // Release under the same lock that reads `dirty`: a change marked
            // after this check finds the agent no longer running and decides itself.
            let mut av = lock(&self.availability);
            if !av.dirty.remove(agent) {
                av.running.remove(agent);
                claim.done = true;
                return;
            }
        }
    }

    async fn decide_availability(&self, agent: &AgentId) {
        if let Some(placement) = &self.placement {
            return self.decide_claimed(placement.as_ref(), agent).await;
        }
        let count = match self.store.availability_count(agent, 0).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count sessions for chat availability");
                lock(&self.availability).pending.insert(agent.clone());
                return;
            }
        };
        let want = count > 0;
        if lock(&self.availability).published.contains(agent) == want {
            return;
        }
        let fields = Map::from_iter([("available".to_owned(), Json::Bool(want))]);
        let published = match self.publish_system(AVAILABILITY_RECORD, agent, fields).await {
            Ok(()) => self.store.set_availability_published(agent, want).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut av = lock(&self.availability);
        match published {
            Ok(()) => {
                self.metrics.availability_published.increment(1);
                if want {
                    av.published.insert(agent.clone());
                } else {
                    av.published.remove(agent);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, agent = %agent.agent_guid, "chat availability not published; will retry");
                av.pending.insert(agent.clone());
            }
        }
    }

    /// The cluster's availability decision: the store says whether there is
    /// a transition to publish and marks it published, once across nodes; a
    /// record that cannot be published gives the mark back and is retried.
    async fn decide_claimed(&self, placement: &dyn Placement, agent: &AgentId) {
        let (want, lease) = match placement.availability_claim(agent).await {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim a chat availability transition");
                lock(&self.availability).pending.insert(agent.clone());
                return;
            }
        };
        let fields = Map::from_iter([("available".to_owned(), Json::Bool(want))]);
        match self.publish_system(AVAILABILITY_RECORD, agent, fields).await {
            Ok(()) => self.metrics.availability_published.increment(1),
            Err(e) => {
                tracing::warn!(error = %e, agent = %agent.agent_guid, "chat availability not published; will retry");
                if let Err(e) = self.store.set_availability_published(agent, !want).await {
                    tracing::warn!(error = %e, "cannot give a chat availability claim back");
                }
                lock(&self.availability).pending.insert(agent.clone());
            }
        }
        // Published, or given back and retried here: the lease is not needed.
        if let Err(e) = placement.availability_done(&lease).await {
            tracing::warn!(error = %e, "cannot release a chat availability lease");
        }
    }

    /// Transitions whose claimer died before publishing them (cluster store).
    async fn overdue(&self, placement: &dyn Placement) {
        let overdue = match placement.availability_overdue().await {
            Ok(overdue) => overdue,
            Err(e) => return tracing::warn!(error = %e, "cannot look for unpublished chat availability"),
        };
        for (agent, available, lease) in overdue {
            let fields = Map::from_iter([("available".to_owned(), Json::Bool(available))]);
            match self.publish_system(AVAILABILITY_RECORD, &agent, fields).await {
                Ok(()) => {
                    self.metrics.availability_published.increment(1);
                    if let Err(e) = placement.availability_done(&lease).await {
                        tracing::warn!(error = %e, "cannot release a chat availability lease");
                    }
                }
                // Leased to this node: tried again when the lease runs out.
                Err(e) => tracing::warn!(error = %e, agent = %agent.agent_guid, "chat availability not published"),
            }
        }
    }

    /// Publishes a record the bridge makes on the agent's behalf
    /// (`isSystemAction: true`).
    async fn publish_system(
        &self,
        name: &str,
        who: &AgentId,
        mut fields: Map<String, Json>,
    ) -> Result<(), PublishError> {
        let record = self.schemas.record(name).ok_or_else(|| PublishError::NoSchema(name.to_owned()))?;
        inject_identity(record, &mut fields, who, true, &self.settings.source);
        let value = self.schemas.build(record, &fields).map_err(|e| PublishError::Schema(e.to_string()))?;
        self.bus
            .publish(OutRecord { record: name.to_owned(), key: who.agent_guid.to_string(), value, traceparent: None })
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::session::Reactions for BridgeRecords {
    async fn availability_changed(&self, agent: &AgentId, delta: i64) {
        self.changed(agent, delta).await;
    }

    async fn restored(&self, agents: Vec<AgentId>) -> Result<(), StoreError> {
        let published = self.store.availability_published().await?;
        let mut av = lock(&self.availability);
        av.published = published.into_iter().collect();
        av.pending = av.published.clone();
        av.pending.extend(agents);
        Ok(())
    }

    async fn retry(&self) {
        if let Some(placement) = &self.placement {
            self.overdue(placement.as_ref()).await;
        }
        let pending: Vec<AgentId> = lock(&self.availability).pending.drain().collect();
        for agent in pending {
            self.changed(&agent, 0).await;
        }
    }

    async fn accept(&self, who: &AgentId, interaction: &str) {
        match self.store.auto_accept_claim(who, interaction, self.settings.claim_ttl).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(error = %e, "auto-accept not claimed");
                self.metrics.auto_accept(false);
                return;
            }
        }
        let fields = Map::from_iter([("interactionId".to_owned(), Json::String(interaction.to_owned()))]);
        match self.publish_system(ACCEPT_RECORD, who, fields).await {
            Ok(()) => self.metrics.auto_accept(true),
            Err(e) => {
                tracing::warn!(error = %e, interaction, "auto-accept not published");
                self.metrics.auto_accept(false);
                // Give the claim back so a redelivered offer can try again.
                let _ = self.store.auto_accept_release(who, interaction).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("no schema for `{0}`")]
    NoSchema(String),
    #[error("`{0}`")]
    Schema(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}
