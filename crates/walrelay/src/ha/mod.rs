//! High availability: one agent per PostgreSQL node (`walrelay ha`) keeps a leader lease in
//! etcd and bootstraps, promotes, demotes, follows, switches over and rejoins.
//!
//! - `decide`: the decisions as pure code (observations in, actions out), unit-tested;
//! - `etcd`: etcd's v3 JSON gateway over HTTP (no gRPC, so no `protoc` to build);
//! - `store`: the cluster's keys in etcd (lease, leader by compare-and-set, members);
//! - `node`: the PostgreSQL server the agent runs (initdb, clone, rewind, promote);
//! - `slots`: the primary's slot per member, and copies of its logical slots on the
//!   replicas;
//! - `agent`: the loop that ties them together;
//! - `fence`: the process that stops a primary's PostgreSQL once its lease may be gone,
//!   whatever became of the agent;
//! - `api`: the REST API HAProxy and `ctl` use; `client`: `ctl`'s requests to it.

pub mod agent;
pub mod api;
pub mod client;
pub mod decide;
pub mod etcd;
pub mod fence;
pub mod node;
pub mod slots;
pub mod store;
