//! The cluster's state in etcd, under `/<namespace>/<cluster>/`:
//!
//! - `initialize`: who bootstrapped the cluster (created once, never bound to a lease);
//! - `leader`: the primary's name, bound to its agent's lease and taken only by
//!   compare-and-set; its create revision is the lease generation stamped on promotions;
//! - `members/<name>`: each agent's view of its node (JSON), bound to its lease;
//! - `sync`: in synchronous mode, the standby that holds every acknowledged commit;
//! - `switchover`: a switchover asked for, bound to the primary's lease;
//! - `history/<generation>`: one entry per promotion; `config`: the timings at bootstrap;
//! - `slots`: the primary's logical slots that replicas keep copies of, with how far each
//!   has been confirmed.
//!
//! Every call is bounded by `retry_timeout`: an agent that cannot reach etcd must find out
//! in time to fence itself.
//!
//! The leader's writes (`sync`, `switchover`, `history`) are transactions that compare the
//! leader key's create revision and value with the generation and holder the writer read:
//! a primary deposed meanwhile (its lease expired, another node took the key) cannot
//! overwrite what the new leader decided. A member key that does not decode (another
//! walrelay version during a rolling upgrade) is skipped, with a warning, rather than
//! failing the whole read.

use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::decide::{LeaderKey, Switchover};
use super::etcd::{Compare, Etcd, EtcdError, KeyValue, Op};
use crate::config::ha::ClusterSection;
use walrelay_model::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd key {key} holds unexpected data: {error}")]
    Decode { key: String, error: String },
    /// A write only the leader may make, refused: the leader key is no longer this
    /// holder's at this generation (it expired, or another node took it).
    #[error("{holder} no longer holds the leader key of generation {generation}")]
    NotLeader { holder: String, generation: u64 },
}

/// What an agent publishes about its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    /// The REST API's address...
    pub api: String,
    /// ...served over HTTPS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_tls: bool,
    pub host: String,
    pub port: u16,
    /// `primary`, `replica` or `stopped`.
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped`, or what the agent is doing.
    pub state: String,
    pub timeline: u32,
    /// WAL received (a replica) or written (a primary).
    pub received: Lsn,
    pub replayed: Lsn,
    pub nofailover: bool,
    /// Why this node could not be promoted now (`None`: it could).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_promotable: Option<String>,
    /// A replica: its copies of the primary's logical slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slot_copies: Vec<SlotCopy>,
}

/// A logical slot of the primary, as the leader publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalSlot {
    pub name: String,
    pub plugin: String,
    pub database: String,
    pub restart_lsn: Lsn,
    pub confirmed_flush: Lsn,
}

/// The `slots` key: the leader's logical slots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalSlots {
    pub leader: String,
    pub slots: Vec<LogicalSlot>,
}

/// A replica's copy of one of the primary's logical slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCopy {
    pub name: String,
    /// Usable if this replica were promoted now.
    pub ready: bool,
    /// How far the copy is confirmed (behind the primary's by what this replica has not
    /// replayed yet).
    #[serde(default)]
    pub confirmed_flush: Lsn,
    /// Why it is not ready, or what is being done about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The primary that chose the standby.
    pub leader: String,
    /// `None` while a standby is being chosen: then no one may be promoted.
    pub standby: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverKey {
    /// The leader it was asked of: a request left over from an earlier leader is dropped.
    pub leader: String,
    pub candidate: Option<String>,
    pub stopped_at: Option<Lsn>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub generation: u64,
    pub leader: String,
    pub timeline: u32,
    /// Where the previous timeline ended on the new primary.
    pub lsn: Lsn,
    pub at: String,
    pub reason: String,
}

/// One consistent read of the cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub initialized: Option<String>,
    pub leader: Option<LeaderKey>,
    /// The lease the leader key is bound to.
    pub leader_lease: i64,
    pub members: Vec<MemberInfo>,
    pub sync: Option<SyncState>,
    pub switchover: Option<SwitchoverKey>,
    /// The switchover key's last modification (0: none), so that a stalled one is dropped
    /// only if no one changed it meanwhile.
    pub switchover_revision: i64,
    pub history: Vec<HistoryEntry>,
    pub slots: Option<LogicalSlots>,
}

impl ClusterView {
    pub fn member(&self, name: &str) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.name == name)
    }

    /// How far the leader has written, as its member key says.
    pub fn leader_position(&self) -> Option<Lsn> {
        let holder = &self.leader.as_ref()?.holder;
        self.member(holder).map(|m| m.received)
    }

    /// The switchover that concerns the current leader (or one already stepped down).
    pub fn switchover(&self) -> Option<Switchover> {
        let current = self.leader.as_ref().map(|l| l.holder.as_str());
        self.switchover
            .as_ref()
            .filter(|s| s.stopped_at.is_some() || current == Some(s.leader.as_str()))
            .map(|s| Switchover {
                candidate: s.candidate.clone(),
                stopped_at: s.stopped_at,
            })
    }
}

pub struct Store {
    etcd: Etcd,
    prefix: String,
    ttl: Duration,
    lease: Option<i64>,
    /// Keys skipped because they did not decode, at the revision warned about: warned once
    /// per version rather than every loop.
    skipped: std::sync::Mutex<BTreeMap<String, i64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// The comparisons that hold only while `leader.holder` still holds the leader key it
/// took at `leader.generation` (its create revision).
pub fn leader_guard(leader_key: &str, leader: &LeaderKey) -> [Compare; 2] {
    [
        Compare::CreateRevision(leader_key.to_string(), leader.generation as i64),
        Compare::Value(leader_key.to_string(), leader.holder.as_bytes().to_vec()),
    ]
}

/// A key that was skipped: its name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub mod_revision: i64,
    pub error: String,
}

/// The cluster as the keys under `prefix` say. A member or history key that does not
/// decode is left out and returned with why; `sync` and `switchover` decide who may be
/// promoted, so one of them that does not decode fails the read.
pub fn view_from(
    prefix: &str,
    kvs: &[KeyValue],
) -> Result<(ClusterView, Vec<Skipped>), StoreError> {
    let mut view = ClusterView::default();
    let mut skipped = Vec::new();
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let Some(name) = key.strip_prefix(prefix) else {
            continue;
        };
        let value = kv.value.as_slice();
        let decode = |e: serde_json::Error| StoreError::Decode {
            key: key.clone(),
            error: e.to_string(),
        };
        let mut skip = |e: serde_json::Error| {
            skipped.push(Skipped {
                key: key.clone(),
                mod_revision: kv.mod_revision,
                error: e.to_string(),
            })
        };
        match name {
            "initialize" => view.initialized = Some(String::from_utf8_lossy(value).into()),
            "leader" => {
                view.leader = Some(LeaderKey {
                    holder: String::from_utf8_lossy(value).into(),
                    generation: kv.create_revision as u64,
                });
                view.leader_lease = kv.lease;
            }
            "sync" => view.sync = Some(serde_json::from_slice(value).map_err(decode)?),
            "slots" => match serde_json::from_slice(value) {
                Ok(s) => view.slots = Some(s),
                Err(e) => skip(e),
            },
            "switchover" => {
                view.switchover = Some(serde_json::from_slice(value).map_err(decode)?);
                view.switchover_revision = kv.mod_revision;
            }
            _ if name.starts_with("members/") => match serde_json::from_slice(value) {
                Ok(m) => view.members.push(m),
                Err(e) => skip(e),
            },
            _ if name.starts_with("history/") => match serde_json::from_slice(value) {
                Ok(h) => view.history.push(h),
                Err(e) => skip(e),
            },
            _ => {}
        }
    }
    view.members.sort_by(|a, b| a.name.cmp(&b.name));
    view.history.sort_by_key(|h| h.generation);
    Ok((view, skipped))
}

impl Store {
    /// A client for the cluster's etcd, each call bounded by `retry_timeout`, leases of
    /// `ttl`. Nothing connects until the first call, so an etcd that is down now does not
    /// stop the agent from starting (it fences, and waits).
    pub async fn new(cluster: &ClusterSection) -> Result<Store, StoreError> {
        Ok(Store {
            etcd: Etcd::new(&cluster.etcd, cluster.retry_timeout)?,
            prefix: cluster.prefix(),
            ttl: cluster.ttl,
            lease: None,
            skipped: Default::default(),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Keep this agent's lease alive, or grant a new one if it is gone — expired, revoked,
    /// or not found after a restart (keys bound to it are gone then, and the loop publishes
    /// this member again on the new one). Returns the lease id.
    pub async fn renew(&mut self) -> Result<i64, StoreError> {
        if let Some(id) = self.lease {
            match self.etcd.lease_keepalive(id).await? {
                ttl if ttl > 0 => return Ok(id),
                _ => {
                    tracing::warn!(lease = id, "the agent's lease is gone; taking a new one");
                    self.lease = None;
                }
            }
        }
        let ttl = self.ttl.as_secs().max(1) as i64;
        let id = self.etcd.lease_grant(ttl).await?;
        self.lease = Some(id);
        Ok(id)
    }

    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    /// Keep `id` alive from now on instead of this agent's own lease: the leader key of an
    /// agent that restarted is still bound to its previous lease. If that lease is gone,
    /// a new one is taken (and the key with the old one is gone too).
    pub async fn adopt(&mut self, id: i64) -> Result<(), StoreError> {
        self.lease = Some(id);
        self.renew().await.map(|_| ())
    }

    /// Give up the lease: the leader key and member key go at once (a clean stop).
    pub async fn revoke(&mut self) {
        if let Some(id) = self.lease.take() {
            let _ = self.etcd.lease_revoke(id).await;
        }
    }

    pub async fn read(&self) -> Result<ClusterView, StoreError> {
        let kvs = self.etcd.range(&self.prefix, true).await?;
        let (view, skipped) = view_from(&self.prefix, &kvs)?;
        let mut warned = self.skipped.lock().expect("skipped lock");
        for s in skipped {
            if warned.get(&s.key) != Some(&s.mod_revision) {
                tracing::warn!(
                    key = s.key,
                    error = s.error,
                    "skipping a key that does not decode (another walrelay version?)"
                );
                warned.insert(s.key, s.mod_revision);
            }
        }
        Ok(view)
    }

    /// The leader key alone, as it is now (`None`: no one holds it).
    pub async fn read_leader(&self) -> Result<Option<LeaderKey>, StoreError> {
        let kvs = self.etcd.range(&self.key("leader"), false).await?;
        Ok(kvs.first().map(|kv| LeaderKey {
            holder: String::from_utf8_lossy(&kv.value).into(),
            generation: kv.create_revision as u64,
        }))
    }

    pub async fn put_member(&self, me: &MemberInfo) -> Result<(), StoreError> {
        let value = serde_json::to_vec(me).expect("member info serialises");
        self.etcd
            .put(
                &self.key(&format!("members/{}", me.name)),
                &value,
                self.lease,
            )
            .await?;
        Ok(())
    }

    /// Create `key` with `value` if it does not exist; true if this call created it.
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<i64>,
    ) -> Result<bool, StoreError> {
        let key = self.key(key);
        Ok(self
            .etcd
            .txn(
                &[Compare::CreateRevision(key.clone(), 0)],
                &[Op::Put { key, value, lease }],
            )
            .await?)
    }

    /// Put `value` (as JSON) at the cluster key `name`, unbound to any lease, only while
    /// `leader` holds the leader key at its generation.
    async fn put_as_leader(
        &self,
        leader: &LeaderKey,
        name: &str,
        value: &impl Serialize,
    ) -> Result<(), StoreError> {
        let put = Op::Put {
            key: self.key(name),
            value: serde_json::to_vec(value).expect("cluster state serialises"),
            lease: None,
        };
        self.as_leader(leader, &[put]).await
    }

    /// `ops` only while `leader` holds the leader key at its generation; `NotLeader` if
    /// not.
    async fn as_leader(&self, leader: &LeaderKey, ops: &[Op]) -> Result<(), StoreError> {
        let guard = leader_guard(&self.key("leader"), leader);
        if self.etcd.txn(&guard, ops).await? {
            Ok(())
        } else {
            Err(StoreError::NotLeader {
                holder: leader.holder.clone(),
                generation: leader.generation,
            })
        }
    }

    /// The race to bootstrap: true for the one agent that creates the key.
    pub async fn claim_initialize(&self, me: &str) -> Result<bool, StoreError> {
        self.create("initialize", me.as_bytes().to_vec(), None)
            .await
    }

    /// A failed bootstrap lets another node (or this one, fixed) try again.
    pub async fn clear_initialize(&self) -> Result<(), StoreError> {
        self.etcd.delete(&self.key("initialize")).await?;
        Ok(())
    }

    /// Take the leader key, bound to this agent's lease, if no one holds it.
    pub async fn take_leader(&self, me: &str) -> Result<bool, StoreError> {
        if self.lease.is_none() {
            return Ok(false);
        }
        self.create("leader", me.as_bytes().to_vec(), self.lease)
            .await
    }

    /// Delete the leader key if it is still mine.
    pub async fn release_leader(&self, me: &str) -> Result<bool, StoreError> {
        let key = self.key("leader");
        Ok(self
            .etcd
            .txn(
                &[Compare::Value(key.clone(), me.as_bytes().to_vec())],
                &[Op::Delete { key }],
            )
            .await?)
    }

    /// The synchronous standby, as the leader names it.
    pub async fn put_sync(&self, leader: &LeaderKey, sync: &SyncState) -> Result<(), StoreError> {
        self.put_as_leader(leader, "sync", sync).await
    }

    /// Ask `leader` for a switchover: true if asked, false if one is already under way;
    /// `NotLeader` if the leader changed since the caller looked.
    pub async fn request_switchover(
        &self,
        leader: &LeaderKey,
        candidate: Option<String>,
    ) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(&SwitchoverKey {
            leader: leader.holder.clone(),
            candidate,
            stopped_at: None,
        })
        .expect("serialises");
        let key = self.key("switchover");
        let mut compare = leader_guard(&self.key("leader"), leader).to_vec();
        compare.push(Compare::CreateRevision(key.clone(), 0));
        let put = Op::Put {
            key: key.clone(),
            value,
            lease: None,
        };
        if self.etcd.txn(&compare, &[put]).await? {
            return Ok(true);
        }
        if !self.etcd.range(&key, false).await?.is_empty() {
            return Ok(false);
        }
        Err(StoreError::NotLeader {
            holder: leader.holder.clone(),
            generation: leader.generation,
        })
    }

    /// The primary's step-down, in one transaction while it still leads: where it stopped
    /// and who takes over (bound to its lease, so that it vanishes if the old primary's
    /// agent dies), and the leader key given up.
    pub async fn step_down(&self, leader: &LeaderKey, s: &SwitchoverKey) -> Result<(), StoreError> {
        let value = serde_json::to_vec(s).expect("serialises");
        let ops = [
            Op::Put {
                key: self.key("switchover"),
                value,
                lease: self.lease,
            },
            Op::Delete {
                key: self.key("leader"),
            },
        ];
        self.as_leader(leader, &ops).await
    }

    /// The leader is done with a switchover (finished, cancelled, or asked of another).
    pub async fn clear_switchover(&self, leader: &LeaderKey) -> Result<(), StoreError> {
        let key = self.key("switchover");
        self.as_leader(leader, &[Op::Delete { key }]).await
    }

    /// Drop a switchover whose candidate never took over: only while no one leads and the
    /// key is as read (at `revision`). True if it went.
    pub async fn drop_stalled_switchover(&self, revision: i64) -> Result<bool, StoreError> {
        let key = self.key("switchover");
        let compare = [
            Compare::CreateRevision(self.key("leader"), 0),
            Compare::ModRevision(key.clone(), revision),
        ];
        Ok(self.etcd.txn(&compare, &[Op::Delete { key }]).await?)
    }

    /// The primary's logical slots, as only the leader may say.
    pub async fn put_slots(
        &self,
        leader: &LeaderKey,
        slots: &LogicalSlots,
    ) -> Result<(), StoreError> {
        self.put_as_leader(leader, "slots", slots).await
    }

    pub async fn put_history(
        &self,
        leader: &LeaderKey,
        entry: &HistoryEntry,
    ) -> Result<(), StoreError> {
        let name = format!("history/{:020}", entry.generation);
        self.put_as_leader(leader, &name, entry).await
    }

    pub async fn put_config(&self, config: &serde_json::Value) -> Result<(), StoreError> {
        self.etcd
            .put(&self.key("config"), config.to_string().as_bytes(), None)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, create_revision: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision,
            mod_revision: create_revision,
            lease: 0,
        }
    }

    fn member_json(name: &str) -> String {
        serde_json::to_string(&MemberInfo {
            name: name.into(),
            api: "127.0.0.1:8008".into(),
            api_tls: false,
            host: "127.0.0.1".into(),
            port: 5432,
            role: "replica".into(),
            state: "streaming".into(),
            timeline: 1,
            received: Lsn(1),
            replayed: Lsn(1),
            nofailover: false,
            not_promotable: None,
            slot_copies: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn a_member_key_that_does_not_decode_is_skipped_not_fatal() {
        let p = "/walrelay/c/";
        let kvs = [
            kv("/walrelay/c/leader", "n1", 5),
            kv("/walrelay/c/members/n1", &member_json("n1"), 6),
            kv(
                "/walrelay/c/members/n9",
                r#"{"format": 2, "name": "n9"}"#,
                7,
            ),
            kv("/walrelay/c/members/n2", &member_json("n2"), 8),
            kv("/walrelay/c/history/x", "not json", 9),
        ];
        let (view, skipped) = view_from(p, &kvs).unwrap();
        assert_eq!(
            view.members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>(),
            ["n1", "n2"]
        );
        assert_eq!(
            view.leader,
            Some(LeaderKey {
                holder: "n1".into(),
                generation: 5
            })
        );
        let keys: Vec<_> = skipped.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["/walrelay/c/members/n9", "/walrelay/c/history/x"]);

        // The keys that decide who may be promoted are not guessed at.
        let bad_sync = [kv("/walrelay/c/sync", "{", 3)];
        assert!(matches!(
            view_from(p, &bad_sync),
            Err(StoreError::Decode { key, .. }) if key == "/walrelay/c/sync"
        ));
    }

    #[test]
    fn leader_writes_compare_the_generation_and_the_holder() {
        let guard = leader_guard(
            "/walrelay/c/leader",
            &LeaderKey {
                holder: "n2".into(),
                generation: 42,
            },
        );
        assert_eq!(
            guard,
            [
                Compare::CreateRevision("/walrelay/c/leader".into(), 42),
                Compare::Value("/walrelay/c/leader".into(), b"n2".to_vec()),
            ]
        );
    }
}
