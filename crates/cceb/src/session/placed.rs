//! Sessions on a cluster store (Redis): any node serves any agent. The store
//! decides, one step per agent, what one node alone decided before: a
//! long-lived session's seqs (every notification is appended to every
//! long-lived mailbox of its agent, durably, by whichever node ingested it),
//! its attachment (node and generation) and its expiry. A node holds a
//! long-lived session in memory only while a connection of its own holds it;
//! its mailbox there mirrors the durable one. Other nodes are told through
//! [`Peers`]: the seqs for their attached sessions (a wake-up; the entries
//! are durable already), the notifications themselves for their short-lived
//! sessions, and takeovers.

use super::{
    AgentId, Attachment, Mailbox, Notification, OpenError, OpenRequest, Opened, Session, SessionKey, Sessions,
};
use crate::fault::ErrorKind;
use crate::push::Announcement;
use crate::store::{Admitted, Placement, SessionRecord, StoreError};
use crate::sync::lock;
use futures_util::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Agents of one tenant routed at once by a tenant-wide notification.
const TENANT_ROUTES: usize = 32;

/// What a node tells the others (implemented over Redis pub/sub by `cluster`).
#[async_trait::async_trait]
pub trait Peers: Send + Sync + 'static {
    /// The nodes alive now, this one included; empty when not known.
    fn live(&self) -> Vec<String>;
    /// A notification for the agent's sessions attached on `node`: at these
    /// seqs in long-lived mailboxes, and to its short-lived sessions when `short_lived`.
    async fn agent(
        &self,
        node: &str,
        agent: &AgentId,
        n: &Notification,
        seqs: Vec<(Arc<str>, u64)>,
        short_lived: bool,
    ) -> Result<(), StoreError>;
    /// A tenant-wide notification for the tenant's short-lived sessions on `node`.
    async fn tenant(&self, node: &str, tenant: &str, n: &Notification) -> Result<(), StoreError>;
    /// `node`'s connection to the session is taken over by an attach under `generation`.
    async fn takeover(&self, node: &str, session: &str, generation: u64) -> Result<(), StoreError>;
}

/// This node's part in a cluster.
pub struct Cluster {
    pub placement: Arc<dyn Placement>,
    pub peers: Arc<dyn Peers>,
    /// This node's id, as the store records attachments.
    pub node: Arc<str>,
    /// This process (a restarted node has the same id, another instance).
    pub instance: Arc<str>,
    /// How long a node with sessions attached must be missing from this
    /// node's view before they are detached (a node that just joined is in
    /// every view well before).
    pub reap_after: Duration,
    /// Nodes with attached sessions missing from the view, since when (ms).
    pub absent: Mutex<HashMap<String, u64>>,
}

impl Sessions {
    /// `hello` on a cluster store: resumes the session the key names (from
    /// whichever node held it), or opens a new one.
    pub(super) async fn open_placed(self: &Arc<Self>, agent: AgentId, req: OpenRequest) -> Result<Opened, OpenError> {
        let Some(c) = &self.cluster else { return Err(OpenError::EndedAtOnce) };
        if let Some(text) = &req.session_key {
            if let Some(held) = self.resume_placed(c, &agent, text, &req).await? {
                self.metrics.sessions_resumed.increment(1);
                return Ok(Opened { held, key: Some(text.clone()), resumed: true });
            }
        }
        let id: Arc<str> = uuid::Uuid::new_v4().to_string().into();
        if !(req.long_lived || req.session_key.is_some()) {
            let session = Arc::new(Session::new(id.clone(), agent.clone(), self.settings.max_unacked));
            self.add(session.clone());
            c.placement.short_lived(&agent, &id, Some(&c.node));
            // Known to the other nodes before the client is answered; a Redis
            // outage does not keep a short-lived session from opening.
            if let Err(e) = self.store.sync().await {
                tracing::debug!(error = %e, "a short-lived session not yet known to the other nodes");
            }
            let attachment = session.attach(req.auto_accept, None, &req.shutdown).ok_or(OpenError::EndedAtOnce)?;
            return Ok(Opened { held: self.hold(session, attachment), key: None, resumed: false });
        }
        if !self.store.ready() {
            return Err(StoreError::new(ErrorKind::Unavailable, "the store cannot write").into());
        }
        let cap = self.settings.max_sessions_per_agent;
        let delta = match c.placement.admit(&agent, cap).await? {
            Admitted::Room => 1,
            Admitted::Evicted(old) => {
                tracing::debug!(session = %old, agent = %agent.agent_guid, "session ended to make room");
                self.metrics.sessions_evicted.increment(1);
                0
            }
            Admitted::Full => return Err(OpenError::TooManySessions(cap)),
        };
        let (text, key) = SessionKey::generate(&id);
        let record = SessionRecord {
            id: id.clone(),
            key_hash: key.hash,
            agent: agent.clone(),
            auto_accept: req.auto_accept,
            push_token: req.push_token.clone(),
            dropped: 0,
            disconnected_at_ms: None,
        };
        self.store.session_put(&record);
        // The key must survive a crash before the client is given it.
        if let Err(e) = self.store.sync().await {
            self.store.session_delete(&agent, &id);
            self.reactions.availability_changed(&agent, delta - 1).await;
            return Err(e.into());
        }
        let attached = self
            .attach_here(c, &agent, &id, &req)
            .await
            .map_err(OpenError::from)
            .and_then(|a| a.ok_or(OpenError::EndedAtOnce))
            .and_then(|a| self.mirror(a, &req));
        let (session, attachment) = match attached {
            Ok(held) => held,
            Err(e) => {
                // The client never gets the key: nothing may be left to count or to hold a slot.
                self.store.session_delete(&agent, &id);
                self.reactions.availability_changed(&agent, delta - 1).await;
                return Err(e);
            }
        };
        // Held before anything is awaited: a hello dropped from here on
        // still detaches the session (as `resume_placed` does).
        let held = self.hold(session.clone(), attachment);
        self.catch_up(c, &session, 0).await;
        self.reactions.availability_changed(&agent, delta).await;
        Ok(Opened { held, key: Some(text), resumed: false })
    }

    /// The session `text` names, attached here, if the key is valid for the
    /// agent; `None` (a new session follows) otherwise, telling the client
    /// nothing more.
    async fn resume_placed(
        self: &Arc<Self>,
        c: &Cluster,
        agent: &AgentId,
        text: &str,
        req: &OpenRequest,
    ) -> Result<Option<super::Held>, OpenError> {
        let Some(key) = SessionKey::parse(text) else { return Ok(None) };
        let record = c.placement.record(agent, &key.session_id).await?;
        let stored = record.as_ref().map_or([0u8; 32], |r| r.key_hash);
        // Compared whether or not the session exists, so timing does not tell which ids exist.
        let owned =
            crate::secret::same(&stored, &key.hash) & record.as_ref().is_some_and(|r| same_agent(&r.agent, agent));
        if !owned {
            return Ok(None);
        }
        let Some(attached) = self.attach_here(c, agent, &key.session_id, req).await? else { return Ok(None) };
        let (previous, generation) = (attached.previous.clone(), attached.generation);
        let read_upto = attached.stored.mailbox.last().map_or(0, |(seq, _)| *seq);
        let (session, attachment) = self.mirror(attached, req)?;
        let held = self.hold(session.clone(), attachment);
        self.catch_up(c, &session, read_upto).await;
        if let Some(previous) = previous {
            if let Err(e) = c.peers.takeover(&previous, &key.session_id, generation).await {
                tracing::warn!(error = %e, node = %previous, "cannot tell a node its session was taken over");
            }
        }
        Ok(Some(held))
    }

    /// Reads the session's entries past `after` from the store: what was
    /// routed here while the session was not in the roster yet (found nobody),
    /// or what a lost or late wake-up left out.
    async fn catch_up(&self, c: &Cluster, session: &Arc<Session>, after: u64) {
        match c.placement.mailbox_after(&session.agent, &session.id, after).await {
            Ok(entries) => {
                let upto = entries.last().map_or(after, |(seq, _)| *seq);
                for (seq, n) in entries {
                    session.deliver_at(seq, &n);
                }
                session.contiguous_upto(upto);
            }
            Err(e) => tracing::warn!(error = %e, session = %session.id, "cannot read a mailbox; a later sweep will"),
        }
    }

    /// Attaches the session to this node in the store, as `req` asks.
    async fn attach_here(
        &self,
        c: &Cluster,
        agent: &AgentId,
        id: &str,
        req: &OpenRequest,
    ) -> Result<Option<crate::store::Attached>, StoreError> {
        let now = self.settings.clock.now_ms();
        let (ttl, token) = (self.settings.ttl, req.push_token.as_deref());
        c.placement.attach(agent, id, &c.node, &c.instance, now, ttl, req.auto_accept, token).await
    }

    /// The in-memory mirror of a session just attached in the store: the one
    /// this node holds already (a takeover between two connections here), or
    /// a new one from what the attach read.
    fn mirror(
        &self,
        attached: crate::store::Attached,
        req: &OpenRequest,
    ) -> Result<(Arc<Session>, Attachment), OpenError> {
        let record = &attached.stored.record;
        let (capacity, window) = (self.settings.mailbox_capacity, self.settings.max_unacked);
        let here = self.roster.long_lived(&record.id).filter(|s| s.store_generation().is_some());
        let session = match here {
            Some(s) => s,
            None => {
                let mailbox = Mailbox::restore(capacity, window, 1, Vec::new());
                let s = Arc::new(Session::mirrored(
                    record,
                    mailbox,
                    self.settings.max_unacked,
                    self.store.clone(),
                    attached.generation,
                ));
                self.add(s.clone());
                s
            }
        };
        for (seq, n) in &attached.stored.mailbox {
            session.deliver_at(*seq, n);
        }
        session.contiguous_upto(attached.stored.mailbox.last().map_or(0, |(seq, _)| *seq));
        let mut attachment = session
            .attach_as(Some(attached.generation), req.auto_accept, req.push_token.clone(), &req.shutdown)
            .ok_or(OpenError::EndedAtOnce)?;
        attachment.dropped = record.dropped;
        Ok((session, attachment))
    }

    /// A connection here ended: a short-lived session ends; a long-lived one
    /// is detached in the store (unless attached elsewhere since) and leaves
    /// this node's memory.
    pub(super) fn disconnected_placed(&self, c: &Cluster, session: &Arc<Session>, attachment: &Attachment) {
        if !session.is_long_lived() {
            if self.remove(session) {
                c.placement.short_lived(&session.agent, &session.id, None);
            }
            return;
        }
        // The generation this connection attached under, not the session's
        // now: a newer attach here must not be detached by this one's end.
        let Some(generation) = attachment.store_generation else { return };
        let now = self.settings.clock.now_ms();
        if session.detach(attachment.generation, now) {
            c.placement.detach(&session.agent, &session.id, &c.node, generation, now, self.settings.ttl);
            self.remove(session);
            // Attached again here between the two steps: it stays.
            if session.is_attached() {
                self.add(session.clone());
            }
        }
    }

    /// `end_session` on a cluster store: the session is deleted only while
    /// this node's attachment is still the store's; one taken over on another
    /// node meanwhile (its takeover message lost) is left to that node, and
    /// this connection is closed as taken over (4005).
    pub(super) async fn end_placed(
        &self,
        c: &Cluster,
        session: &Arc<Session>,
        generation: u64,
    ) -> Result<bool, StoreError> {
        if !c.placement.end(&session.agent, &session.id, generation).await? {
            return Ok(false);
        }
        if session.end(None) {
            self.remove(session);
        }
        self.reactions.availability_changed(&session.agent, -1).await;
        Ok(true)
    }

    /// Expiry on a cluster store: any node ends any session whose TTL passed;
    /// each ends once, and its availability follows once.
    pub(super) async fn sweep_placed(&self, c: &Cluster) {
        // Buffered detaches first: a session detached here is then seen as such.
        if let Err(e) = self.store.sync().await {
            tracing::warn!(error = %e, "cannot flush before expiry");
        }
        let now = self.settings.clock.now_ms();
        let live = c.peers.live();
        // A connection waiting for a seq whose wake-up was lost (or is late):
        // the store has it; read before `GAP_WAIT` passes it over.
        for s in self.roster.all_long_lived() {
            if let Some(gap) = s.gap() {
                self.catch_up(c, &s, gap.saturating_sub(1)).await;
            }
        }
        self.reap_absent(c, &live, now).await;
        match c.placement.expire_due(now, self.settings.ttl).await {
            Ok(ended) => {
                for agent in ended {
                    tracing::debug!(agent = %agent.agent_guid, "session expired");
                    self.metrics.sessions_expired.increment(1);
                    self.reactions.availability_changed(&agent, -1).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "session expiry failed"),
        }
        if let Err(e) = self.store.expire().await {
            tracing::warn!(error = %e, "store expiry failed");
        }
        self.reactions.retry().await;
    }

    /// Sessions attached to a node missing from the view for `reap_after`
    /// are detached as of now: their TTL starts, pushes go to their devices,
    /// and they no longer hold a slot under the cap as if connected.
    async fn reap_absent(&self, c: &Cluster, live: &[String], now: u64) {
        if live.is_empty() {
            // Not known who is alive: nobody is declared dead.
            return;
        }
        let nodes = match c.placement.attached_nodes().await {
            Ok(nodes) => nodes,
            Err(e) => return tracing::warn!(error = %e, "cannot list the nodes sessions are attached to"),
        };
        let due: Vec<String> = {
            let mut absent = lock(&c.absent);
            absent.retain(|n, _| nodes.contains(n) && !live.contains(n));
            let after = u64::try_from(c.reap_after.as_millis()).unwrap_or(u64::MAX);
            nodes
                .iter()
                .filter(|n| !live.contains(n) && **n != *c.node)
                .filter(|n| now.saturating_sub(*absent.entry((*n).clone()).or_insert(now)) >= after)
                .cloned()
                .collect()
        };
        for node in due {
            match c.placement.reap(&node, None, now, self.settings.ttl).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(%node, sessions = n, "sessions of a node that left detached"),
                Err(e) => tracing::warn!(error = %e, %node, "cannot detach the sessions of a node that left"),
            }
        }
    }

    /// Once this node holds its id (joined, before it serves): sessions the
    /// id held in a previous life (killed) are detached now. Not before the
    /// join: a second process refused the id must not touch the live one's.
    pub async fn reap_previous(&self) -> Result<(), StoreError> {
        let Some(c) = &self.cluster else { return Ok(()) };
        let now = self.settings.clock.now_ms();
        let n = c.placement.reap(&c.node, Some(&c.instance), now, self.settings.ttl).await?;
        if n > 0 {
            tracing::info!(sessions = n, "sessions attached to this node's previous instance detached");
        }
        Ok(())
    }

    pub(super) async fn offered_placed(&self, c: &Cluster, tenant: &str, agent: &str, interaction: &str) {
        let now = self.settings.clock.now_ms();
        let mut who = None;
        self.roster.for_agent(tenant, agent, |s| {
            if who.is_none() && s.auto_accept() && s.valid_at(now, self.settings.ttl) {
                who = Some(s.agent.clone());
            }
        });
        if who.is_none() {
            let id = AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: "".into() };
            match c.placement.auto_accepts(&id, now, self.settings.ttl).await {
                Ok(found) => who = found,
                Err(e) => tracing::warn!(error = %e, "cannot look for sessions that auto-accept"),
            }
        }
        if let Some(who) = who {
            self.reactions.accept(&who, interaction).await;
        }
    }

    /// Shutdown: every long-lived session attached here is detached in the store.
    pub(super) fn detach_all_placed(&self, c: &Cluster) {
        let now = self.settings.clock.now_ms();
        for s in self.roster.all_long_lived() {
            if let Some(generation) = s.store_generation() {
                s.detach_any(now);
                c.placement.detach(&s.agent, &s.id, &c.node, generation, now, self.settings.ttl);
            }
        }
    }

    /// Delivers one notification to every session of an agent, on whatever
    /// node; returns how many sessions it reached. Durable for long-lived
    /// sessions and handed to the nodes of short-lived ones when it returns.
    pub async fn deliver_agent(&self, tenant: &str, agent: &str, n: &Arc<Notification>) -> Result<usize, StoreError> {
        let Some(c) = &self.cluster else { return Ok(self.deliver_to_agent(tenant, agent, n)) };
        let id = AgentId { tenant_guid: tenant.into(), agent_guid: agent.into(), ir_instance: "".into() };
        let live = c.peers.live();
        let mut reached = self.route(c, &id, n, &live, true).await?;
        // Short-lived sessions here, whatever the store counted.
        self.roster.for_agent(tenant, agent, |s| {
            if !s.is_long_lived() {
                self.deliver_to(n, s);
                reached += 1;
            }
        });
        Ok(reached)
    }

    /// Delivers one notification to every session of a tenant, on every node.
    pub async fn deliver_tenant(&self, tenant: &str, n: &Arc<Notification>) -> Result<usize, StoreError> {
        let Some(c) = &self.cluster else { return Ok(self.deliver_to_tenant(tenant, n)) };
        let live = c.peers.live();
        let agents = c.placement.tenant_agents(tenant).await?;
        // Made first, so the stream's type names no closure over a borrow (a future
        // of a closure taking `&AgentId` is not `Send` for every lifetime).
        let routes: Vec<_> = agents.iter().map(|agent| Box::pin(self.route(c, agent, n, &live, false))).collect();
        let routed: Vec<usize> =
            futures_util::stream::iter(routes).buffer_unordered(TENANT_ROUTES).try_collect().await?;
        let mut reached: usize = routed.iter().sum();
        for s in self.roster.of_tenant(tenant) {
            if !s.is_long_lived() {
                self.deliver_to(n, &s);
                reached += 1;
            }
        }
        for node in live.iter().filter(|node| **node != *c.node) {
            if let Err(e) = c.peers.tenant(node, tenant, n).await {
                tracing::warn!(error = %e, %node, "cannot send a tenant-wide notification to a node");
            }
        }
        Ok(reached)
    }

    /// Appends `n` to the agent's long-lived mailboxes and tells the nodes
    /// where its sessions are attached; returns how many long-lived sessions
    /// it went to.
    async fn route(
        &self,
        c: &Cluster,
        agent: &AgentId,
        n: &Arc<Notification>,
        live: &[String],
        short_lived: bool,
    ) -> Result<usize, StoreError> {
        let now = self.settings.clock.now_ms();
        let routed = c.placement.route(agent, n, self.settings.mailbox_capacity, now).await?;
        self.metrics.mailbox_dropped.increment(routed.dropped);
        let reached = routed.attached.len() + routed.detached.len();
        let announce = |session_id: Arc<str>, token: String| {
            self.push.announce(Announcement { token, session_id, ty: n.ty, uuid: n.uuid.clone() });
        };
        for (session_id, token) in routed.detached {
            announce(session_id, token);
        }
        let mut nodes: BTreeMap<String, Vec<(Arc<str>, u64)>> = BTreeMap::new();
        for (node, session, seq, token) in routed.attached {
            let gone = if *node == *c.node {
                // Its connection here just ended; the store hears of it with the next flush.
                !self.roster.long_lived(&session).is_some_and(|s| s.is_attached())
            } else {
                // Its node is not in a view that is known: dead, as far as this node can tell.
                !live.is_empty() && !live.contains(&node)
            };
            if let Some(token) = token.filter(|_| gone) {
                announce(session.clone(), token);
            }
            // Told whatever this node's view says: a node that just joined may
            // not be in it yet, and a message to a dead node costs nothing.
            nodes.entry(node).or_default().push((session, seq));
        }
        let short: BTreeSet<String> =
            if short_lived { routed.short_lived.into_iter().collect() } else { BTreeSet::new() };
        for node in &short {
            nodes.entry(node.clone()).or_default();
        }
        for (node, seqs) in nodes {
            if *node == *c.node {
                self.deliver_here(&seqs, n);
            } else if let Err(e) = c.peers.agent(&node, agent, n, seqs, short.contains(&node)).await {
                // The entries are durable: the node reads them when it resyncs,
                // its clients when they resume.
                tracing::warn!(error = %e, %node, "cannot tell a node of a notification");
            }
        }
        Ok(reached)
    }

    /// Entries the store holds already, for long-lived sessions attached here.
    fn deliver_here(&self, seqs: &[(Arc<str>, u64)], n: &Arc<Notification>) {
        for (id, seq) in seqs {
            if let Some(s) = self.roster.long_lived(id) {
                if s.deliver_at(*seq, n).is_some_and(|p| p.dropped.is_some()) {
                    self.metrics.mailbox_dropped.increment(1);
                }
            }
        }
    }

    /// Another node routed a notification here.
    pub fn delivered_elsewhere(
        &self,
        tenant: &str,
        agent: &str,
        n: &Arc<Notification>,
        seqs: &[(Arc<str>, u64)],
        short_lived: bool,
    ) {
        self.deliver_here(seqs, n);
        if short_lived {
            self.roster.for_agent(tenant, agent, |s| {
                if !s.is_long_lived() {
                    self.deliver_to(n, s);
                }
            });
        }
    }

    /// Another node sent a tenant-wide notification for the short-lived sessions here.
    pub fn tenant_elsewhere(&self, tenant: &str, n: &Arc<Notification>) {
        for s in self.roster.of_tenant(tenant) {
            if !s.is_long_lived() {
                self.deliver_to(n, &s);
            }
        }
    }

    /// Another node attached the session under `generation`: the connection
    /// here is closed (4005) and the session leaves this node's memory.
    pub fn taken_elsewhere(&self, session: &str, generation: u64) {
        if let Some(s) = self.roster.long_lived(session) {
            if s.taken_elsewhere(generation) {
                self.remove(&s);
            }
        }
    }

    /// Messages from other nodes were lost: what they carried for the
    /// short-lived sessions here is gone, and their clients are told so.
    pub fn lost_elsewhere(&self) {
        let short = self.roster.all_short_lived();
        if !short.is_empty() {
            tracing::warn!(
                sessions = short.len(),
                "notifications from other nodes were lost: short-lived sessions closed (1012)"
            );
        }
        for s in short {
            s.missed_notifications();
        }
    }

    /// Messages from other nodes may have been missed: every long-lived
    /// session attached here reads its durable mailbox again.
    pub async fn resync(&self) {
        let Some(c) = &self.cluster else { return };
        for s in self.roster.all_long_lived() {
            // Cut off long enough, this node was taken for dead and its sessions
            // detached by the others: taken back, unless attached elsewhere since.
            if let Some(generation) = s.store_generation().filter(|_| s.is_attached()) {
                match c.placement.reclaim(&s.agent, &s.id, generation, &c.node, &c.instance).await {
                    Ok(true) => {}
                    Ok(false) => {
                        if s.taken_elsewhere(u64::MAX) {
                            self.remove(&s);
                        }
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, session = %s.id, "cannot take a session back"),
                }
            }
            match c.placement.mailbox_after(&s.agent, &s.id, 0).await {
                Ok(entries) => {
                    let upto = entries.last().map(|(seq, _)| *seq);
                    for (seq, n) in entries {
                        s.deliver_at(seq, &n);
                    }
                    if let Some(upto) = upto {
                        s.contiguous_upto(upto);
                    }
                }
                Err(e) => tracing::warn!(error = %e, session = %s.id, "cannot read a mailbox again"),
            }
        }
    }
}

fn same_agent(a: &AgentId, b: &AgentId) -> bool {
    a.tenant_guid == b.tenant_guid && a.agent_guid == b.agent_guid
}
