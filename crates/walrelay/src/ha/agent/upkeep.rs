//! What a node keeps up each loop besides deciding: as the primary, a slot per member, the
//! WAL its slots hold, the logical slots it publishes, the synchronous standby and a
//! switchover's step-down; as a replica, its copies of the primary's logical slots.

use std::time::Instant;

use super::{Agent, AgentError};
use crate::ha::decide::LeaderKey;
use crate::ha::node::{NodeError, PgState, Wait};
use crate::ha::slots;
use crate::ha::store::{LogicalSlots, StoreError, SwitchoverKey, SyncState};
use crate::pg::local::StopMode;
use walrelay_model::Lsn;

impl Agent {
    /// The leader key as this node holds it (the loop decided `Lead` on it); `NotLeader` if
    /// the last read says otherwise.
    fn held_key(&self) -> Result<LeaderKey, AgentError> {
        let me = self.me();
        match &self.view.leader {
            Some(l) if l.holder == me => Ok(l.clone()),
            other => Err(StoreError::NotLeader {
                holder: me.to_string(),
                generation: other.as_ref().map_or(0, |l| l.generation),
            }
            .into()),
        }
    }

    /// The primary's upkeep: a slot per member, the synchronous standby, a finished
    /// switchover's key removed.
    pub(super) async fn lead(&mut self) -> Result<(), AgentError> {
        let me = self.me().to_string();
        let key = self.held_key()?;
        // Slots first: a member that (re)appears must be able to stream whatever else
        // fails this loop.
        self.keep_member_slots().await?;
        self.limit_slot_wal().await?;
        self.publish_logical_slots(&key).await?;
        // A finished switchover (it stepped down, I lead now), or one asked of an earlier
        // leader: done with.
        if self
            .view
            .switchover
            .as_ref()
            .is_some_and(|s| s.stopped_at.is_some() || s.leader != me)
        {
            self.store.clear_switchover(&key).await?;
        }
        if self.policy.synchronous_mode {
            self.keep_sync_standby(&key).await?;
        } else if self.node.sync_standby().is_some() {
            self.node.set_sync_standby(None).await?;
        }
        Ok(())
    }

    /// A physical slot for every other member in etcd, so a replica finds its slot on
    /// whichever node leads — including a new primary, which had none as a replica, and
    /// a member that comes back after its key expired. A slot PostgreSQL invalidated (it
    /// fell more than `max_slot_wal_keep_size` behind) cannot serve its replica again: it is
    /// made anew, once no one uses it. A member briefly gone (restarting) keeps its slot;
    /// one gone for `drop_slots_of_departed_after` loses it.
    async fn keep_member_slots(&mut self) -> Result<(), AgentError> {
        let me = self.me().to_string();
        let members: Vec<String> = self
            .view
            .members
            .iter()
            .filter(|m| m.name != me)
            .map(|m| m.name.clone())
            .collect();
        let client = self.node.sql().await?;
        let existing: Vec<slots::LocalSlot> = slots::slots_here(client)
            .await?
            .into_iter()
            .filter(|s| !s.logical)
            .collect();
        let now = Instant::now();
        self.absent_since
            .retain(|name, _| existing.iter().any(|s| s.name == *name) && !members.contains(name));
        for s in existing
            .iter()
            .filter(|s| !members.contains(&s.name) && self.known_members.contains(&s.name))
        {
            self.absent_since.entry(s.name.clone()).or_insert(now);
        }
        let grace = self.config.cluster.drop_slots_of_departed_after;
        let departed: Vec<String> = self
            .absent_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= grace)
            .map(|(n, _)| n.clone())
            .collect();
        let plan = slots::member_slot_plan(&members, &existing, &departed);
        Ok(slots::carry_out(client, &plan).await?)
    }

    /// `cluster.slot_wal_limit`: report every slot holding more WAL, and drop it if so
    /// configured, no one uses it and it is no member's (see `slots::over_limit`).
    async fn limit_slot_wal(&mut self) -> Result<(), AgentError> {
        let Some(limit) = self.config.cluster.slot_wal_limit else {
            return Ok(());
        };
        let drop = self.config.cluster.drop_slots_over_limit;
        let client = self.node.sql().await?;
        let held = slots::slots_here(client).await?;
        // Every member seen, not only those in etcd now: one briefly gone keeps its slot
        // until `drop_slots_of_departed_after` (`keep_member_slots`).
        for (name, bytes, now) in slots::over_limit(&held, limit, drop, &self.known_members) {
            if now {
                tracing::error!(
                    slot = name,
                    held_bytes = bytes,
                    limit,
                    "dropping a slot that holds more WAL than cluster.slot_wal_limit (drop_slots_over_limit is on); whatever read it must start again"
                );
                slots::drop_slot(client, &name).await?;
            } else {
                tracing::warn!(
                    slot = name,
                    held_bytes = bytes,
                    limit,
                    "a slot holds more WAL than cluster.slot_wal_limit"
                );
            }
        }
        Ok(())
    }

    /// Publish the primary's logical slots that replicas keep copies of (when they moved).
    async fn publish_logical_slots(&mut self, key: &LeaderKey) -> Result<(), AgentError> {
        let client = self.node.sql().await?;
        let published = LogicalSlots {
            leader: key.holder.clone(),
            slots: slots::logical_slots(client, &self.config.cluster).await?,
        };
        if self.view.slots.as_ref() != Some(&published) {
            self.store.put_slots(key, &published).await?;
            self.view.slots = Some(published);
        }
        Ok(())
    }

    /// A replica: keep a copy of each of the primary's logical slots (see `slots`), and say
    /// how each stands. A restart only when one must be loaded.
    pub(super) async fn keep_slot_copies(&mut self, pg: &PgState) -> Result<(), AgentError> {
        let leader = self.view.leader.as_ref().map(|l| l.holder.clone());
        let published = self
            .view
            .slots
            .clone()
            .filter(|s| Some(&s.leader) == leader.as_ref());
        let (Some(leader), Some(published)) = (leader, published) else {
            // No word from the current leader yet: nothing is dropped on a guess.
            return Ok(());
        };
        let client = self.node.sql().await?;
        let local = slots::slots_here(client).await?;
        let oldest = slots::oldest_wal(client).await?;
        let cluster = &self.config.cluster;
        let known = &self.known_members;
        let plan = slots::copy_plan(&published.slots, &local, pg.replayed, oldest, |l| {
            if l.logical {
                cluster.keeps_logical_slot(&l.name)
            } else {
                known.contains(&l.name)
            }
        });
        let mut failed = Vec::new();
        for name in &plan.drop {
            slots::drop_slot(client, name).await?;
            tracing::info!(
                slot = name,
                "dropped a slot that is no copy of the primary's"
            );
        }
        for (name, to) in &plan.advance {
            if let Err(e) = slots::advance(client, name, *to).await {
                tracing::warn!(slot = name, error = %e, "advancing a slot copy failed");
                if e.to_string().contains("removed") {
                    // Its WAL is gone here: copied anew once the primary's slot allows.
                    slots::drop_slot(client, name).await?;
                }
                failed.push((name.clone(), format!("advancing failed: {e}")));
            }
        }
        let local = slots::slots_here(client).await?;
        self.slot_copies = slots::describe_copies(&published.slots, &local, &plan, &failed);
        if plan.copy.is_empty() {
            return Ok(());
        }
        let Some(primary) = self.view.member(&leader).cloned() else {
            return Ok(());
        };
        let primary = self.node.leader_sql(&primary).await?;
        let mut states = Vec::new();
        for name in &plan.copy {
            states.push((name.clone(), slots::read_state(&primary, name).await?));
        }
        tracing::info!(slots = ?plan.copy, "copying the primary's logical slots; restarting to load them");
        self.node.stop(StopMode::Fast).await?;
        let placed: Result<(), NodeError> = states
            .iter()
            .try_for_each(|(name, state)| self.node.place_slot_state(name, state));
        let upstream = self.node.upstream().cloned();
        self.node.start_as_replica(upstream, Wait::Started).await?;
        Ok(placed?)
    }

    /// Synchronous mode: the `sync` key names a standby only while every acknowledged
    /// commit is on it. Changing it: the key first says no one (no one may be promoted),
    /// then PostgreSQL waits for the new standby, and once that standby has everything
    /// written before the change took effect, the key names it.
    async fn keep_sync_standby(&mut self, key: &LeaderKey) -> Result<(), AgentError> {
        let me = self.me().to_string();
        let client = self.node.sql().await?;
        let rows = client
            .query(
                "SELECT application_name, flush_lsn::text FROM pg_stat_replication
                  WHERE state = 'streaming' AND flush_lsn IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| NodeError::Sql(e.to_string()))?;
        let current: Lsn = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| NodeError::Sql(e.to_string()))?
            .get::<_, String>(0)
            .parse()
            .unwrap_or_default();
        let nofailover = |name: &str| self.view.member(name).is_none_or(|m| m.nofailover);
        let mut streaming: Vec<(Lsn, String)> = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let flush = r.get::<_, String>(1).parse().unwrap_or_default();
                (flush, name)
            })
            .filter(|(_, name)| !nofailover(name))
            .collect();
        streaming.sort();
        let named = self
            .view
            .sync
            .as_ref()
            .filter(|s| s.leader == me)
            .and_then(|s| s.standby.clone());
        if let Some(n) = &named {
            if streaming.iter().any(|(_, s)| s == n) && self.node.sync_standby() == Some(n) {
                return Ok(());
            }
        }
        // The named standby is gone (or the key is another leader's): no one may be
        // promoted until a new one has caught up.
        if named.is_some() || self.view.sync.as_ref().is_none_or(|s| s.leader != me) {
            self.store
                .put_sync(
                    key,
                    &SyncState {
                        leader: me.clone(),
                        standby: None,
                    },
                )
                .await?;
            tracing::info!("synchronous standby: none for now");
        }
        let keep = self
            .node
            .sync_standby()
            .filter(|s| streaming.iter().any(|(_, n)| n == s))
            .map(str::to_string);
        let choice = keep.or_else(|| streaming.last().map(|(_, n)| n.clone()));
        let Some(choice) = choice else {
            self.node.set_sync_standby(None).await?;
            self.sync_pending = None;
            return Ok(());
        };
        if self.node.sync_standby() != Some(choice.as_str()) {
            self.node.set_sync_standby(Some(choice.clone())).await?;
            // The target is taken next loop, once every session has the new setting.
            self.sync_pending = Some((choice, None));
            return Ok(());
        }
        match self.sync_pending.take() {
            Some((name, None)) if name == choice => {
                self.sync_pending = Some((name, Some(current)));
            }
            Some((name, Some(target))) if name == choice => {
                let flushed = streaming
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(l, _)| *l)
                    .unwrap_or_default();
                if flushed >= target {
                    self.store
                        .put_sync(
                            key,
                            &SyncState {
                                leader: me,
                                standby: Some(name.clone()),
                            },
                        )
                        .await?;
                    tracing::info!(standby = name, "synchronous standby named");
                } else {
                    self.sync_pending = Some((name, Some(target)));
                }
            }
            _ => self.sync_pending = Some((choice, None)),
        }
        Ok(())
    }

    /// Switchover, on the primary: checkpoint (so the clean stop is short), stop cleanly
    /// (the WAL senders ship everything to connected replicas first), say where the WAL
    /// ends and who takes over, and give up the key.
    pub(super) async fn step_down(&mut self, generation: u64) -> Result<(), AgentError> {
        let me = self.me().to_string();
        let key = LeaderKey {
            holder: me.clone(),
            generation,
        };
        let requested = self.view.switchover.clone().unwrap_or(SwitchoverKey {
            leader: me.clone(),
            candidate: None,
            stopped_at: None,
        });
        let candidate = match requested.candidate {
            Some(c) => Some(c),
            None if self.policy.synchronous_mode => {
                self.view.sync.as_ref().and_then(|s| s.standby.clone())
            }
            None => self
                .view
                .members
                .iter()
                .filter(|m| m.name != me && m.state == "streaming" && !m.nofailover)
                .max_by_key(|m| (m.received, std::cmp::Reverse(m.name.clone())))
                .map(|m| m.name.clone()),
        };
        let Some(candidate) = candidate else {
            tracing::warn!("switchover: no replica can take over; cancelled");
            self.store.clear_switchover(&key).await?;
            return Ok(());
        };
        let client = self.node.sql().await?;
        // The candidate must be streaming from this primary now, or the stop would leave
        // the cluster without a primary until the switchover is dropped.
        let streaming = client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&candidate],
            )
            .await
            .map_err(|e| NodeError::Sql(e.to_string()))?
            .is_some();
        if !streaming {
            tracing::warn!(
                candidate,
                "switchover: the candidate is not streaming; cancelled"
            );
            self.store.clear_switchover(&key).await?;
            return Ok(());
        }
        tracing::info!(generation, candidate, "switchover: stepping down");
        client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(|e| NodeError::Sql(e.to_string()))?;
        self.node.stop(StopMode::Fast).await?;
        let (_, stopped_at) = self.node.stopped_at().await?;
        self.store
            .step_down(
                &key,
                &SwitchoverKey {
                    leader: me.clone(),
                    candidate: Some(candidate),
                    stopped_at: Some(stopped_at),
                },
            )
            .await?;
        // Not mine any more, whatever the last read said.
        self.view.leader = None;
        self.stepped_down_at = Some(Instant::now());
        Ok(())
    }
}
