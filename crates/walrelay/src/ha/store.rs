//! The cluster's state in etcd, under `/<namespace>/<cluster>/`:
//!
//! - `initialize`: who bootstrapped the cluster (created once, never bound to a lease);
//! - `leader`: the primary's name, bound to its agent's lease and taken only by
//!   compare-and-set; its create revision is the lease generation stamped on promotions;
//! - `members/<name>`: each agent's view of its node (JSON), bound to its lease;
//! - `sync`: in synchronous mode, the standby that holds every acknowledged commit;
//! - `switchover`: a switchover asked for, bound to the primary's lease;
//! - `history/<generation>`: one entry per promotion; `config`: the timings at bootstrap.
//!
//! Every call is bounded by `retry_timeout`: an agent that cannot reach etcd must find out
//! in time to fence itself.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};

use super::decide::{LeaderKey, Switchover};
use crate::config::ha::ClusterSection;
use walrelay_model::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd key {key} holds unexpected data: {error}")]
    Decode { key: String, error: String },
}

/// What an agent publishes about its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    /// The REST API's address.
    pub api: String,
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
    pub history: Vec<HistoryEntry>,
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
    client: Client,
    prefix: String,
    timeout: Duration,
    ttl: Duration,
    lease: Option<i64>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A client for the cluster's etcd, each call bounded by `retry_timeout`, leases of
    /// `ttl`. The channel connects on first use, so an etcd that is down now does not stop
    /// the agent from starting (it fences, and waits).
    pub async fn new(cluster: &ClusterSection) -> Result<Store, StoreError> {
        let (timeout, ttl) = (cluster.retry_timeout, cluster.ttl);
        let endpoints = &cluster.etcd;
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout);
        let client =
            match tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await {
                Ok(c) => c?,
                Err(_) => return Err(StoreError::Timeout(timeout)),
            };
        Ok(Store {
            client,
            prefix: cluster.prefix(),
            timeout,
            ttl,
            lease: None,
            keeper: None,
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Keep this agent's lease alive, or grant a new one if it expired (keys bound to the
    /// old one are gone then). Returns the lease id.
    pub async fn renew(&mut self) -> Result<i64, StoreError> {
        if let (Some(id), Some((keeper, stream))) = (self.lease, self.keeper.as_mut()) {
            let timeout = self.timeout;
            let answer = tokio::time::timeout(timeout, async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) if r.ttl() > 0 => return Ok(id),
                Ok(Ok(_)) => {
                    tracing::warn!(lease = id, "the agent's lease expired; taking a new one");
                    self.lease = None;
                }
                Ok(Err(e)) => {
                    self.keeper = None;
                    return Err(e.into());
                }
                Err(_) => {
                    self.keeper = None;
                    return Err(StoreError::Timeout(timeout));
                }
            }
        }
        let mut client = self.client.clone();
        let id = match self.lease {
            Some(id) => id,
            None => {
                let ttl = self.ttl.as_secs().max(1) as i64;
                let granted = self.bounded(client.lease_grant(ttl, None)).await?;
                self.lease = Some(granted.id());
                granted.id()
            }
        };
        let keeper = self.bounded(client.lease_keep_alive(id)).await?;
        self.keeper = Some(keeper);
        // The new stream has not renewed anything yet: do it now.
        Box::pin(self.renew()).await
    }

    pub fn lease(&self) -> Option<i64> {
        self.lease
    }

    /// Keep `id` alive from now on instead of this agent's own lease: the leader key of an
    /// agent that restarted is still bound to its previous lease.
    pub async fn adopt(&mut self, id: i64) -> Result<(), StoreError> {
        self.lease = Some(id);
        self.keeper = None;
        self.renew().await.map(|_| ())
    }

    /// Give up the lease: the leader key and member key go at once (a clean stop).
    pub async fn revoke(&mut self) {
        if let Some(id) = self.lease.take() {
            let mut client = self.client.clone();
            let _ = self.bounded(client.lease_revoke(id)).await;
        }
        self.keeper = None;
    }

    pub async fn read(&self) -> Result<ClusterView, StoreError> {
        let mut client = self.client.clone();
        let response = self
            .bounded(client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut view = ClusterView::default();
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = &key[self.prefix.len()..];
            let value = kv.value();
            let decode = |e: serde_json::Error| StoreError::Decode {
                key: key.clone(),
                error: e.to_string(),
            };
            match name {
                "initialize" => view.initialized = Some(String::from_utf8_lossy(value).into()),
                "leader" => {
                    view.leader = Some(LeaderKey {
                        holder: String::from_utf8_lossy(value).into(),
                        generation: kv.create_revision() as u64,
                    });
                    view.leader_lease = kv.lease();
                }
                "sync" => view.sync = Some(serde_json::from_slice(value).map_err(decode)?),
                "switchover" => {
                    view.switchover = Some(serde_json::from_slice(value).map_err(decode)?)
                }
                _ if name.starts_with("members/") => {
                    view.members
                        .push(serde_json::from_slice(value).map_err(decode)?);
                }
                _ if name.starts_with("history/") => {
                    view.history
                        .push(serde_json::from_slice(value).map_err(decode)?);
                }
                _ => {}
            }
        }
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        view.history.sort_by_key(|h| h.generation);
        Ok(view)
    }

    fn on_lease(&self) -> Option<PutOptions> {
        self.lease.map(|id| PutOptions::new().with_lease(id))
    }

    pub async fn put_member(&self, me: &MemberInfo) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let value = serde_json::to_vec(me).expect("member info serialises");
        self.bounded(client.put(
            self.key(&format!("members/{}", me.name)),
            value,
            self.on_lease(),
        ))
        .await?;
        Ok(())
    }

    /// Create `key` with `value` if it does not exist; true if this call created it.
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        options: Option<PutOptions>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let key = self.key(key);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, options)]);
        Ok(self.bounded(client.txn(txn)).await?.succeeded())
    }

    /// The race to bootstrap: true for the one agent that creates the key.
    pub async fn claim_initialize(&self, me: &str) -> Result<bool, StoreError> {
        self.create("initialize", me.as_bytes().to_vec(), None)
            .await
    }

    /// Take the leader key, bound to this agent's lease, if no one holds it.
    pub async fn take_leader(&self, me: &str) -> Result<bool, StoreError> {
        if self.lease.is_none() {
            return Ok(false);
        }
        self.create("leader", me.as_bytes().to_vec(), self.on_lease())
            .await
    }

    /// Delete the leader key if it is still mine.
    pub async fn release_leader(&self, me: &str) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let key = self.key("leader");
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, me)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        Ok(self.bounded(client.txn(txn)).await?.succeeded())
    }

    pub async fn put_sync(&self, sync: &SyncState) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let value = serde_json::to_vec(sync).expect("sync state serialises");
        self.bounded(client.put(self.key("sync"), value, None))
            .await?;
        Ok(())
    }

    /// Ask for a switchover; fails if one is already under way.
    pub async fn request_switchover(
        &self,
        leader: &str,
        candidate: Option<String>,
    ) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(&SwitchoverKey {
            leader: leader.to_string(),
            candidate,
            stopped_at: None,
        })
        .expect("serialises");
        self.create("switchover", value, None).await
    }

    /// The primary's step-down: where it stopped and who takes over, bound to its lease so
    /// that it vanishes if the old primary's agent dies.
    pub async fn put_switchover(&self, s: &SwitchoverKey) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let value = serde_json::to_vec(s).expect("serialises");
        self.bounded(client.put(self.key("switchover"), value, self.on_lease()))
            .await?;
        Ok(())
    }

    /// Delete one key of the cluster (`switchover`, `initialize`).
    pub async fn clear_key(&self, name: &str) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.bounded(client.delete(self.key(name), None)).await?;
        Ok(())
    }

    pub async fn put_history(&self, entry: &HistoryEntry) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let value = serde_json::to_vec(entry).expect("serialises");
        self.bounded(client.put(
            self.key(&format!("history/{:020}", entry.generation)),
            value,
            None,
        ))
        .await?;
        Ok(())
    }

    pub async fn put_config(&self, config: &serde_json::Value) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        self.bounded(client.put(self.key("config"), config.to_string(), None))
            .await?;
        Ok(())
    }
}
