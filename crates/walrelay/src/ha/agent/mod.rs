//! The HA agent's loop: every `loop_wait`, renew the lease, read the cluster from etcd,
//! look at PostgreSQL, let `decide` say what to do, do it, and publish this node's state.
//! `upkeep` holds what a node keeps up besides: the primary's slots, synchronous standby
//! and step-down, a replica's copies of the logical slots.

mod upkeep;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use walrelay_model::Lsn;

use super::decide::{self, Action, LeaderKey, Member, Observation, Policy, Role};
use super::fence::Fence;
use super::node::{Node, NodeError, PgState, Upstream, Wait};
use super::store::{ClusterView, HistoryEntry, MemberInfo, SlotCopy, Store, StoreError, SyncState};
use crate::config::ha::HaConfig;
use crate::pg::local::StopMode;

/// What the REST API reports; the loop replaces it once per loop.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub me: Option<MemberInfo>,
    pub pg: PgState,
    /// This node is the primary and holds the leader key on a fresh lease...
    pub is_leader: bool,
    /// ...until then, unless renewed: past it, `/primary` says no even if the loop is late.
    pub leader_until: Option<Instant>,
    pub view: ClusterView,
    pub generation: u64,
    /// The last loop's decision when it was to wait, and why.
    pub waiting: Option<String>,
}

pub type SharedStatus = Arc<RwLock<Status>>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("starting the fence process (walrelay ha-fence): {0}")]
    Fence(std::io::Error),
    #[error("refusing to bootstrap a new cluster with the documented default password: set {0} in this node's file (the same on every node)")]
    DefaultPasswords(String),
    /// A promote or demote no longer borne out by the leader key: not done.
    #[error("{0}")]
    Stale(String),
}

pub struct Agent {
    config: Arc<HaConfig>,
    policy: Policy,
    store: Store,
    node: Node,
    status: SharedStatus,
    last_renewal: Option<Instant>,
    view: ClusterView,
    /// Loops a replica has not streamed from a leader on a newer timeline.
    stuck_loops: u32,
    /// Synchronous mode: the standby named in `synchronous_standby_names` and not yet in
    /// the `sync` key, with the WAL position it must reach first.
    sync_pending: Option<(String, Option<Lsn>)>,
    stepped_down_at: Option<Instant>,
    fence: Fence,
    /// The primary: physical slots whose member is not in etcd, since when.
    absent_since: HashMap<String, Instant>,
    /// Every member name seen in etcd since this agent started: the physical slots that
    /// are the cluster's to drop.
    known_members: HashSet<String>,
    /// A replica: its copies of the primary's logical slots, as last seen.
    slot_copies: Vec<SlotCopy>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Agent {
    pub async fn new(config: Arc<HaConfig>, status: SharedStatus) -> Result<Agent, AgentError> {
        let store = Store::new(&config.cluster).await?;
        let node = Node::new(config.clone())?;
        let fence = Fence::start(node.server.data_dir(), config.policy().fence_after())
            .map_err(AgentError::Fence)?;
        Ok(Agent {
            fence,
            policy: config.policy(),
            config,
            store,
            node,
            status,
            last_renewal: None,
            view: ClusterView::default(),
            stuck_loops: 0,
            sync_pending: None,
            stepped_down_at: None,
            absent_since: HashMap::new(),
            known_members: HashSet::new(),
            slot_copies: Vec::new(),
        })
    }

    fn me(&self) -> &str {
        &self.config.node.name
    }

    /// Run until cancelled; then stop PostgreSQL and give up the lease, so that another
    /// node takes over at once rather than after `ttl`.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), AgentError> {
        let unset = self.config.postgres.unset_passwords();
        if !unset.is_empty() {
            tracing::warn!(
                keys = unset.join(", "),
                "not set: the documented default password is in use (a new cluster is not bootstrapped with it)"
            );
        }
        self.bootstrap_if_needed(&cancel).await?;
        while !cancel.is_cancelled() {
            let started = Instant::now();
            let again = self.run_once().await;
            if again {
                continue;
            }
            let pause = self.policy.loop_wait.saturating_sub(started.elapsed());
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!("stopping PostgreSQL and giving up the lease");
        if let Err(e) = self.node.stop(StopMode::Fast).await {
            tracing::warn!(error = %e, "fast shutdown failed; immediate shutdown");
            if let Err(e) = self.node.stop(StopMode::Immediate).await {
                tracing::error!(error = %e, "PostgreSQL did not stop");
            }
        }
        if self.node.postmaster_running() {
            // Another node must not take over while this server may take writes: the
            // lease runs out on its own, and the fence, armed on a primary, stops the
            // server when this process exits.
            tracing::error!(
                "PostgreSQL still runs: keeping the leader key until the lease expires"
            );
            return Ok(());
        }
        self.fence.arm(false);
        let me = self.me().to_string();
        let _ = self.store.release_leader(&me).await;
        self.store.revoke().await;
        Ok(())
    }

    /// A node with no data directory: the first agent to claim `initialize` runs initdb and
    /// becomes the primary; every other one is cloned in the loop once a leader exists.
    async fn bootstrap_if_needed(&mut self, cancel: &CancellationToken) -> Result<(), AgentError> {
        if self.node.has_data() {
            return Ok(());
        }
        // Until etcd answers, nothing can be decided.
        let view = loop {
            match self.renew_and_read().await {
                Ok(v) => break v,
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for etcd to bootstrap");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.policy.loop_wait) => {}
                    }
                }
            }
        };
        let unset = self.config.postgres.unset_passwords();
        if view.initialized.is_none() && !unset.is_empty() {
            // Before this member is published or anything claimed: nothing to undo.
            self.store.revoke().await;
            return Err(AgentError::DefaultPasswords(unset.join(" and ")));
        }
        self.publish(&PgState::default(), "starting", None).await;
        let me = self.me().to_string();
        if view.initialized.is_some() || !self.store.claim_initialize(&me).await? {
            tracing::info!("the cluster exists: this node is cloned from its leader");
            return Ok(());
        }
        tracing::info!("bootstrapping the cluster: initdb, then start as the primary");
        if let Err(e) = self.node.bootstrap().await {
            // Let another node (or this one, fixed) try again.
            tracing::error!(error = %e, "bootstrap failed; releasing the initialize key");
            // A half-made data directory would be taken for a cluster at the next start.
            let _ = self.node.stop(StopMode::Immediate).await;
            let _ = std::fs::remove_dir_all(self.node.server.data_dir());
            let _ = self.store.clear_initialize().await;
            return Err(e.into());
        }
        self.store
            .put_config(&serde_json::json!({
                "ttl": humantime::format_duration(self.policy.ttl).to_string(),
                "loop_wait": humantime::format_duration(self.policy.loop_wait).to_string(),
                "retry_timeout": humantime::format_duration(self.policy.retry_timeout).to_string(),
                "maximum_lag_on_failover": self.policy.maximum_lag_on_failover,
                "synchronous_mode": self.policy.synchronous_mode,
            }))
            .await?;
        if self.store.take_leader(&me).await? {
            tracing::info!("bootstrapped; this node leads");
        }
        Ok(())
    }

    async fn renew_and_read(&mut self) -> Result<ClusterView, StoreError> {
        let asked = Instant::now();
        self.store.renew().await?;
        let mut view = self.store.read().await?;
        let mine = view.leader.as_ref().is_some_and(|l| l.holder == self.me());
        if mine && self.store.lease() != Some(view.leader_lease) {
            // This agent restarted while holding the key: renew the lease the key is bound
            // to, or it would expire under a primary that thinks it leads.
            tracing::info!(lease = view.leader_lease, "adopting the leader key's lease");
            self.store.adopt(view.leader_lease).await?;
            view = self.store.read().await?;
        }
        // Fresh only when the renewal and the read both succeeded, measured from when the
        // renewal was asked for (the lease runs from no later): decisions on a stale view
        // are fenced like a lost lease.
        self.last_renewal = Some(asked);
        self.fence.renewed(asked);
        self.known_members
            .extend(view.members.iter().map(|m| m.name.clone()));
        self.view = view.clone();
        Ok(view)
    }

    /// One loop; true to run the next at once (this loop took the leader key).
    pub async fn run_once(&mut self) -> bool {
        let etcd_ok = match self.renew_and_read().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "etcd");
                false
            }
        };
        let pg = self.node.observe().await;
        let role = pg.role();
        self.expire_stalled_switchover(etcd_ok).await;
        let observation = self.observation(role, &pg);
        let actions = decide::decide(&observation, &self.policy);
        tracing::debug!(?role, ?actions, "decided");
        let mut again = false;
        let mut waiting = None;
        for action in actions {
            match self.act(&action, role, &pg).await {
                Ok(took_key) => again |= took_key,
                Err(AgentError::Stale(why)) => {
                    tracing::warn!(?action, why, "skipped: the leader key changed since");
                    waiting = Some(format!("{action:?} skipped: {why}"));
                    break;
                }
                Err(e) => {
                    tracing::warn!(?action, error = %e, "action failed; retrying next loop");
                    waiting = Some(format!("{action:?} failed: {e}"));
                    break;
                }
            }
            if let Action::Wait { why } = &action {
                waiting = Some(why.clone());
            }
        }
        let mut pg = self.node.observe().await;
        if pg.running && pg.in_recovery {
            if let Err(e) = self.keep_slot_copies(&pg).await {
                tracing::warn!(error = %e, "keeping the copies of the primary's logical slots");
            }
            pg = self.node.observe().await;
        }
        // Disarmed only when surely not a primary: a server that runs but did not answer
        // may still take writes.
        if (pg.running && pg.in_recovery) || !self.node.postmaster_running() {
            self.fence.arm(false);
        }
        let fresh = self.policy.fresh(observation.since_renewal);
        let state = if !pg.running {
            "stopped"
        } else if pg.in_recovery && pg.streaming {
            "streaming"
        } else {
            "running"
        };
        let mut check = self.observation(pg.role(), &pg);
        // Could this node take over if the leader went now? Compared with the others.
        if let Some(l) = check.leader.take() {
            check.members.retain(|m| m.name != l.holder);
        }
        let not_promotable = decide::eligible(&check, &self.policy).err();
        if etcd_ok {
            self.publish(&pg, state, not_promotable).await;
        }
        let is_leader = fresh
            && pg.running
            && !pg.in_recovery
            && observation
                .leader
                .as_ref()
                .is_some_and(|l| l.holder == self.me());
        let fence_after = self.policy.fence_after();
        let mut status = self.status.write().expect("status lock");
        status.pg = pg;
        status.is_leader = is_leader;
        status.leader_until = self.last_renewal.map(|t| t + fence_after);
        status.view = self.view.clone();
        status.generation = self.view.leader.as_ref().map_or(0, |l| l.generation);
        status.waiting = waiting;
        again
    }

    fn observation(&self, role: Role, pg: &PgState) -> Observation {
        let members = self
            .view
            .members
            .iter()
            .map(|m| Member {
                name: m.name.clone(),
                // Member keys live on their agents' leases: present means alive.
                reachable: m.role != Role::Stopped.as_str(),
                timeline: m.timeline,
                received: m.received,
                nofailover: m.nofailover,
            })
            .collect();
        Observation {
            me: self.me().to_string(),
            role,
            timeline: pg.timeline,
            received: pg.received,
            nofailover: self.config.node.nofailover,
            leader: self.view.leader.clone(),
            since_renewal: self.last_renewal.map(|t| t.elapsed()),
            members,
            synchronous_standby: self.view.sync.as_ref().and_then(|s| s.standby.clone()),
            synchronous_leader: self.view.sync.as_ref().map(|s| s.leader.clone()),
            switchover: self.view.switchover(),
        }
    }

    async fn publish(&mut self, pg: &PgState, state: &str, not_promotable: Option<String>) {
        let n = &self.config.node;
        let me = MemberInfo {
            name: n.name.clone(),
            api: n.api.clone(),
            api_tls: self.config.api.certfile.is_some(),
            host: n.host.clone(),
            port: n.port,
            role: pg.role().as_str().into(),
            state: state.into(),
            timeline: pg.timeline,
            received: pg.received,
            replayed: pg.replayed,
            nofailover: n.nofailover,
            not_promotable,
            slot_copies: if pg.in_recovery {
                self.slot_copies.clone()
            } else {
                Vec::new()
            },
        };
        if let Err(e) = self.store.put_member(&me).await {
            tracing::warn!(error = %e, "publishing this member");
        }
        self.status.write().expect("status lock").me = Some(me);
    }

    /// Publish this member before a long step towards streaming (clone, rewind, start): the
    /// leader makes this member's slot once it sees the key, so the slot is there when
    /// the replica first asks for it.
    async fn publish_before(&mut self, pg: &PgState, state: &str) {
        let why = format!("PostgreSQL is not running ({state})");
        self.publish(pg, state, Some(why)).await;
    }

    /// Do one action; true if it took the leader key (the next loop runs at once).
    async fn act(&mut self, action: &Action, role: Role, pg: &PgState) -> Result<bool, AgentError> {
        if matches!(action, Action::Promote { .. } | Action::Demote { .. }) {
            // Decided on the key as read at the start of the loop: does it still say so?
            let now = self.store.read_leader().await.map_err(|e| e.to_string());
            decide::still_stands(action, self.me(), &now).map_err(AgentError::Stale)?;
        }
        match action {
            Action::Fence { generation } | Action::Demote { generation } => {
                // Health checks stop sending writes here before the server is down.
                self.status.write().expect("status lock").is_leader = false;
                if matches!(action, Action::Fence { .. }) {
                    tracing::warn!(
                        generation,
                        "fencing: the lease may have run out; stopping PostgreSQL at once"
                    );
                } else {
                    tracing::warn!(generation, "demoting: stopping PostgreSQL at once");
                }
                self.node.stop(StopMode::Immediate).await?;
                self.sync_pending = None;
            }
            Action::Lead => {
                self.fence.arm(true);
                self.lead().await?
            }
            Action::TakeLeaderKey => {
                let me = self.me().to_string();
                if self.store.take_leader(&me).await? {
                    tracing::info!("took the leader key");
                    return Ok(true);
                }
            }
            Action::Promote { generation } => self.promote(*generation, role).await?,
            Action::Follow { leader } => self.follow(leader.as_deref(), role, pg).await?,
            Action::StepDown { generation } => self.step_down(*generation).await?,
            Action::Wait { why } => tracing::debug!(why, "waiting"),
        }
        Ok(false)
    }

    async fn promote(&mut self, generation: u64, role: Role) -> Result<(), AgentError> {
        tracing::info!(generation, "promoting");
        let key = LeaderKey {
            holder: self.me().to_string(),
            generation,
        };
        if self.policy.synchronous_mode {
            // Until this primary names a standby that has caught up, no one may take over
            // from it: the key must stop naming the old one before a commit is acknowledged.
            self.store
                .put_sync(
                    &key,
                    &SyncState {
                        leader: key.holder.clone(),
                        standby: None,
                    },
                )
                .await?;
        }
        self.fence.arm(true);
        if role == Role::Stopped {
            if self.node.was_primary().await? {
                self.node.start_as_primary().await?;
                tracing::info!(generation, "started again as the primary");
                return Ok(());
            }
            // A stopped replica starts as one first: promotion opens a new timeline, so a
            // former primary's WAL beyond this point can never be mistaken for ours.
            self.node.start_as_replica(None, Wait::Ready).await?;
        }
        self.node.promote().await?;
        // The control file must show the new timeline before anyone rewinds from here
        // (pg_rewind reads it): checkpoint now rather than whenever the server gets to it.
        if let Err(e) = self.node.sql().await?.batch_execute("CHECKPOINT").await {
            tracing::warn!(error = %e, "checkpoint after promotion");
        }
        let pg = self.node.observe().await;
        tracing::info!(generation, timeline = pg.timeline, lsn = %pg.received, "promoted");
        self.store
            .put_history(
                &key,
                &HistoryEntry {
                    generation,
                    leader: self.me().to_string(),
                    timeline: pg.timeline,
                    lsn: pg.received,
                    at: chrono::Utc::now().to_rfc3339(),
                    reason: if self.view.switchover.is_some() {
                        "switchover".into()
                    } else {
                        "failover".into()
                    },
                },
            )
            .await?;
        Ok(())
    }

    async fn follow(
        &mut self,
        leader: Option<&str>,
        role: Role,
        pg: &PgState,
    ) -> Result<(), AgentError> {
        if role == Role::Stopped && self.node.postmaster_running() {
            // Running but not answering (starting, overloaded): never start, rewind or
            // clone under a live server.
            tracing::info!("PostgreSQL runs but does not answer yet; waiting");
            return Ok(());
        }
        let Some(name) = leader else {
            if role == Role::Stopped && self.node.has_data() {
                tracing::info!("starting read-only, following no one yet");
                self.node.start_as_replica(None, Wait::Started).await?;
            }
            return Ok(());
        };
        let Some(leader) = self.view.member(name).cloned() else {
            return Ok(());
        };
        let upstream = Upstream::of(&leader);
        if !self.node.has_data() {
            self.publish_before(pg, "cloning").await;
            tracing::info!(leader = name, "cloning from the leader (pg_basebackup)");
            self.node.clone_from(&leader).await?;
            self.node
                .start_as_replica(Some(upstream), Wait::Started)
                .await?;
            return Ok(());
        }
        match role {
            Role::Stopped => {
                self.publish_before(pg, "starting").await;
                self.rewind_if_needed(&leader).await?;
                tracing::info!(leader = name, "starting as a replica");
                self.node
                    .start_as_replica(Some(upstream), Wait::Started)
                    .await?;
                self.stuck_loops = 0;
            }
            Role::Replica if self.node.upstream() != Some(&upstream) => {
                tracing::info!(leader = name, "following the new leader");
                self.node.set_upstream(Some(upstream)).await?;
                self.stuck_loops = 0;
            }
            Role::Replica if !pg.streaming && leader.timeline > pg.timeline => {
                // It may have received WAL the new leader never had: it cannot follow until
                // rewound. Give the WAL receiver a while, then stop (the next loop rewinds).
                self.stuck_loops += 1;
                let patience =
                    (self.policy.ttl.as_millis() / self.policy.loop_wait.as_millis().max(1)) as u32;
                if self.stuck_loops > patience {
                    tracing::warn!(
                        leader = name,
                        "not streaming from the new timeline; stopping to rewind"
                    );
                    self.node.stop(StopMode::Fast).await?;
                    self.stuck_loops = 0;
                }
            }
            _ => self.stuck_loops = 0,
        }
        Ok(())
    }

    /// A stopped node that was a primary, or whose timeline differs from the leader's, may
    /// hold WAL the leader never had: pg_rewind it, or clone it again if that fails.
    async fn rewind_if_needed(&mut self, leader: &MemberInfo) -> Result<(), AgentError> {
        let control = match (self.node.was_primary().await, self.node.stopped_at().await) {
            (Ok(p), Ok((t, _))) => Some((p, t)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "the data directory is unreadable; cloning again");
                None
            }
        };
        let Some((was_primary, timeline)) = control else {
            return Ok(self.node.clone_from(leader).await?);
        };
        if !was_primary && timeline == leader.timeline {
            return Ok(());
        }
        if self.config.cluster.use_pg_rewind {
            tracing::info!(
                was_primary,
                timeline,
                leader_timeline = leader.timeline,
                "rewinding"
            );
            match self.node.rewind(leader).await {
                Ok(()) => {
                    // Its slots belong to the history it left: a former primary's physical
                    // ones would hold WAL for members that stream from the new leader, and
                    // logical slots (its own, or copies advanced on WAL the leader never
                    // had) could point into positions that now hold other transactions.
                    // Copies of the leader's logical slots follow (`keep_slot_copies`).
                    self.node.remove_slots()?;
                    return Ok(());
                }
                Err(e) => tracing::warn!(error = %e, "pg_rewind failed; cloning again"),
            }
        } else if !was_primary {
            return Ok(());
        }
        Ok(self.node.clone_from(leader).await?)
    }

    /// A switchover whose candidate did not take over within two ttl is dropped: the
    /// cluster falls back to an ordinary election.
    async fn expire_stalled_switchover(&mut self, etcd_ok: bool) {
        let Some(at) = self.stepped_down_at else {
            return;
        };
        if self.view.leader.is_some() || self.view.switchover.is_none() {
            self.stepped_down_at = None;
            return;
        }
        if etcd_ok && at.elapsed() > 2 * self.policy.ttl {
            tracing::warn!("switchover: the candidate did not take over; dropping it");
            let revision = self.view.switchover_revision;
            if let Ok(true) = self.store.drop_stalled_switchover(revision).await {
                self.view.switchover = None;
                self.stepped_down_at = None;
            }
        }
    }
}
