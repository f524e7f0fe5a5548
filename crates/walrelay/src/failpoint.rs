//! Named fail points at the instants where durability is decided, for crash tests.
//!
//! `WALRELAY_FAILPOINT=<name>[:<n>]` makes the process kill itself with SIGKILL the `n`th
//! time (default: the first) it reaches the fail point `name` — exactly as `kill -9` would,
//! at exactly that instant. Unset (always, in production), a fail point costs one relaxed
//! atomic load. The names are the `FailPoint` constants below; `docs/development.md` lists
//! them with what a crash there must not lose or repeat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A place in the code where a crash is tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailPoint(&'static str);

/// A postgres sink sent a transaction's changes and is about to send COMMIT.
pub const POSTGRES_BEFORE_COMMIT: FailPoint = FailPoint("postgres-before-commit");
/// A postgres sink ran a schema change in the open target transaction.
pub const POSTGRES_DDL_REPLAYED: FailPoint = FailPoint("postgres-ddl-replayed");
/// A postgres sink's target transaction committed; its position is not yet reported durable,
/// nor confirmed to the source.
pub const POSTGRES_AFTER_COMMIT: FailPoint = FailPoint("postgres-after-commit");
/// An amqp sink published a message and has not yet received the broker's confirm.
pub const AMQP_BEFORE_CONFIRM: FailPoint = FailPoint("amqp-before-confirm");
/// The source is about to send a standby status update (confirm a position).
pub const BEFORE_STATUS_UPDATE: FailPoint = FailPoint("before-status-update");

/// `walrelay migrate` recorded a new phase in the target.
pub const MIGRATE_PHASE_RECORDED: FailPoint = FailPoint("migrate-phase-recorded");
/// `walrelay migrate` recorded the end of one step of a cutover or rollback.
pub const MIGRATE_STEP_RECORDED: FailPoint = FailPoint("migrate-step-recorded");

struct Armed {
    name: String,
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("WALRELAY_FAILPOINT").ok()?;
            let (name, at) = match spec.split_once(':') {
                Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                at: at.max(1),
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

impl FailPoint {
    pub fn name(self) -> &'static str {
        self.0
    }

    /// Crash here if this fail point is armed and its turn has come.
    pub fn hit(self) {
        let Some(armed) = armed() else { return };
        if armed.name != self.0 {
            return;
        }
        let n = armed.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if n == armed.at {
            eprintln!("walrelay: fail point {} reached (hit {n}): SIGKILL", self.0);
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            // Not reached; if the signal could not be raised, still stop at once.
            std::process::abort();
        }
    }
}
