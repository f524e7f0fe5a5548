//! High availability (issue 5, in progress): one agent per PostgreSQL node keeps a leader
//! lease in etcd and promotes, demotes or follows. This module holds the decision logic as
//! pure code — observations in, actions out — so every transition is unit-tested apart
//! from the I/O loop (etcd, PostgreSQL, the REST API), which is still to come.

pub mod decide;
