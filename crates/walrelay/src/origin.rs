//! The mark walrelay leaves on what it writes to a database, so that a relay reading that
//! database can leave it out: two writable nodes with a relay each way, without loops.
//!
//! Each transaction walrelay writes to a target (applied changes, a copy's rows) begins
//! with a transactional logical message under [`APPLIED_PREFIX`]. A replication origin
//! marks the transactions of a sink that holds one; the message marks them all, also where
//! the sink's role may not use origins, and the copy's (which holds none). It is the
//! transaction's first change, so a relay with `source.origin = "none"` knows before
//! anything of it is passed on, streamed or not. It costs one small WAL record per target
//! transaction. The same statement sets `walrelay.applied_by` for the transaction, which
//! trigger capture's log records with each change (the log has no logical messages).

use crate::pg::quote;

/// The prefix of the mark's logical message; its content names the relay that wrote.
pub const APPLIED_PREFIX: &str = "walrelay.applied";

/// The transaction-local setting that trigger capture's log records as `applied_by`.
pub const APPLIED_SETTING: &str = "walrelay.applied_by";

/// The statement that marks the open transaction as written by relay `name`.
pub fn mark_statement(name: &str) -> String {
    let name = quote::literal(name);
    format!(
        "SELECT pg_logical_emit_message(true, {}, {name}), set_config({}, {name}, true)",
        quote::literal(APPLIED_PREFIX),
        quote::literal(APPLIED_SETTING),
    )
}
