//! Replication slots across the cluster: the primary keeps a physical slot per member and
//! publishes its logical slots; every replica keeps a copy of each, close behind, so that
//! a relay finds its slot on whichever node is promoted.
//!
//! Before PostgreSQL 17 a standby cannot create a logical slot, so a copy is made the way
//! Patroni makes it: the slot's state file is read from the primary
//! (`pg_read_binary_file`), placed in the stopped replica's `pg_replslot`, and loaded at
//! its next start — a restart only when a slot first appears, never at failover. From then
//! on `pg_replication_slot_advance` moves the copy to the primary's confirmed position,
//! never past what the replica has replayed. `hot_standby_feedback` makes the primary keep
//! the catalog rows the copy's decoding reads.

use std::collections::HashSet;

use tokio_postgres::Client;
use walrelay_model::Lsn;

use super::node::NodeError;
use super::store::{LogicalSlot, SlotCopy};
use crate::config::ha::ClusterSection;

fn sql(e: tokio_postgres::Error) -> NodeError {
    NodeError::Sql(match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    })
}

/// What the primary does about one member's physical slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberSlotPlan {
    Create(String),
    /// Invalidated and unused: drop it and create it again.
    Recreate(String),
    /// Its member has been gone long enough: drop it.
    Drop(String),
}

/// The slots to make or drop for `members` (the others in etcd now), given the physical
/// slots that exist (`existing`, logical ones left out) and those whose member has been gone long enough (`departed`: only
/// names once seen as members, so a slot someone else made, for a backup tool, stays). A
/// member that is briefly away (restarting) keeps its slot, so it finds its WAL kept.
pub fn member_slot_plan(
    members: &[String],
    existing: &[LocalSlot],
    departed: &[String],
) -> Vec<MemberSlotPlan> {
    let mut plan: Vec<MemberSlotPlan> = members
        .iter()
        .filter_map(|name| match existing.iter().find(|s| s.name == *name) {
            None => Some(MemberSlotPlan::Create(name.clone())),
            Some(s) if !s.active && s.lost => Some(MemberSlotPlan::Recreate(name.clone())),
            Some(_) => None,
        })
        .collect();
    plan.extend(
        existing
            .iter()
            .filter(|s| !s.active && !members.contains(&s.name) && departed.contains(&s.name))
            .map(|s| MemberSlotPlan::Drop(s.name.clone())),
    );
    plan
}

pub async fn carry_out(client: &Client, plan: &[MemberSlotPlan]) -> Result<(), NodeError> {
    for step in plan {
        match step {
            MemberSlotPlan::Create(name) => create_physical(client, name).await?,
            MemberSlotPlan::Recreate(name) => {
                drop_slot(client, name).await?;
                create_physical(client, name).await?;
            }
            MemberSlotPlan::Drop(name) => drop_slot(client, name).await?,
        }
        tracing::info!(?step, "replication slot for a member");
    }
    Ok(())
}

async fn create_physical(client: &Client, name: &str) -> Result<(), NodeError> {
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true)",
            &[&name],
        )
        .await
        .map_err(sql)?;
    Ok(())
}

pub async fn drop_slot(client: &Client, name: &str) -> Result<(), NodeError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .map_err(sql)?;
    Ok(())
}

/// The slots over `limit`, and whether each is dropped now: `drop` set, not in use (a slot
/// in use is being read, and dropping it would only break its reader) and not a member's.
/// A member's slot is idle while its replica restarts or is being cloned — a base backup
/// alone switches WAL segments, up to 16 MB at once — and one made anew starts at the
/// current position, past the WAL that replica still needs; `drop_slots_of_departed_after`
/// and PostgreSQL's `max_slot_wal_keep_size` bound what members' slots hold.
pub fn over_limit(
    slots: &[LocalSlot],
    limit: u64,
    drop: bool,
    members: &HashSet<String>,
) -> Vec<(String, i64, bool)> {
    slots
        .iter()
        .filter_map(|s| Some((s, s.held_bytes?)))
        .filter(|(_, held)| *held > 0 && *held as u64 > limit)
        .map(|(s, held)| {
            let member = !s.logical && members.contains(&s.name);
            (s.name.clone(), held, drop && !s.active && !member)
        })
        .collect()
}

/// The primary's logical slots the cluster keeps on its replicas.
pub async fn logical_slots(
    client: &Client,
    cluster: &ClusterSection,
) -> Result<Vec<LogicalSlot>, NodeError> {
    Ok(slots_here(client)
        .await?
        .into_iter()
        .filter(|s| s.logical && !s.temporary && cluster.keeps_logical_slot(&s.name))
        .map(|s| LogicalSlot {
            name: s.name,
            plugin: s.plugin,
            database: s.database,
            restart_lsn: s.restart_lsn,
            confirmed_flush: s.confirmed_flush,
        })
        .collect())
}

/// A slot of this server, as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalSlot {
    pub name: String,
    pub logical: bool,
    pub temporary: bool,
    pub active: bool,
    /// PostgreSQL invalidated it (`wal_status = 'lost'`).
    pub lost: bool,
    pub restart_lsn: Lsn,
    pub confirmed_flush: Lsn,
    /// A logical slot's output plugin and database.
    pub plugin: String,
    pub database: String,
    /// On a primary, the bytes of WAL it holds back (none without a restart position).
    pub held_bytes: Option<i64>,
}

/// What a replica does about its slots this loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    /// The cluster's slots here that are no copy of a slot the primary has now: members'
    /// physical slots (left from its days as a primary), and logical slots the cluster
    /// keeps that the primary no longer has. Slots of others' making stay.
    pub drop: Vec<String>,
    /// Copies to move forward: to the primary's confirmed position, or as far as this
    /// replica has replayed. A copy already past the primary's slot stays where it is: it
    /// was advanced from an earlier primary's confirmed position, which the targets had
    /// already made durable, and it is of this history (a node whose history forked is
    /// rewound, and a rewind removes its slots).
    pub advance: Vec<(String, Lsn)>,
    /// The primary's slots to copy now (one restart for all of them).
    pub copy: Vec<String>,
    /// The primary's slots not copied yet, and why.
    pub waiting: Vec<(String, String)>,
}

/// Decide, from the primary's logical slots, this replica's slots, how far it has replayed,
/// and where its oldest WAL begins (a copy needs the WAL from its `restart_lsn` on).
/// `ours` tells the cluster's slots (members' physical slots, logical slots it keeps) from
/// others'.
pub fn copy_plan(
    primary: &[LogicalSlot],
    local: &[LocalSlot],
    replayed: Lsn,
    oldest_wal: Lsn,
    ours: impl Fn(&LocalSlot) -> bool,
) -> CopyPlan {
    let mut plan = CopyPlan::default();
    for l in local
        .iter()
        .filter(|l| !l.active && !l.temporary && ours(l))
    {
        let original = primary.iter().find(|p| p.name == l.name);
        match original {
            Some(p) if l.logical => {
                let to = p.confirmed_flush.min(replayed);
                if to > l.confirmed_flush {
                    plan.advance.push((l.name.clone(), to));
                }
            }
            _ => plan.drop.push(l.name.clone()),
        }
    }
    for p in primary {
        let kept = local
            .iter()
            .any(|l| l.name == p.name && !l.temporary && !plan.drop.contains(&l.name));
        if kept {
            continue;
        }
        if p.restart_lsn < oldest_wal {
            plan.waiting.push((
                p.name.clone(),
                format!(
                    "its restart_lsn {} is older than this replica's oldest WAL ({oldest_wal}): copied once the primary's slot moves past it",
                    p.restart_lsn
                ),
            ));
        } else if p.restart_lsn > replayed {
            plan.waiting.push((
                p.name.clone(),
                format!(
                    "this replica has replayed up to {replayed}, before the slot's restart_lsn {}",
                    p.restart_lsn
                ),
            ));
        } else {
            plan.copy.push(p.name.clone());
        }
    }
    plan
}

/// This server's slots: the one query behind the primary's upkeep (members' slots, the
/// WAL they hold, the logical slots it publishes) and a replica's copies.
pub async fn slots_here(client: &Client) -> Result<Vec<LocalSlot>, NodeError> {
    let rows = client
        .query(
            "SELECT slot_name::text, slot_type = 'logical', temporary, active,
                    coalesce(wal_status = 'lost', false),
                    coalesce(restart_lsn, '0/0')::text, coalesce(confirmed_flush_lsn, '0/0')::text,
                    coalesce(plugin::text, ''), coalesce(database::text, ''),
                    CASE WHEN NOT pg_is_in_recovery()
                         THEN pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint END
               FROM pg_replication_slots
              ORDER BY slot_name",
            &[],
        )
        .await
        .map_err(sql)?;
    Ok(rows
        .iter()
        .map(|r| LocalSlot {
            name: r.get(0),
            logical: r.get(1),
            temporary: r.get(2),
            active: r.get(3),
            lost: r.get(4),
            restart_lsn: r.get::<_, String>(5).parse().unwrap_or_default(),
            confirmed_flush: r.get::<_, String>(6).parse().unwrap_or_default(),
            plugin: r.get(7),
            database: r.get(8),
            held_bytes: r.get(9),
        })
        .collect())
}

/// Where this server's oldest WAL segment in `pg_wal` begins (`pg_walfile_name` is not
/// allowed during recovery, so the segment's name is read backwards).
pub async fn oldest_wal(client: &Client) -> Result<Lsn, NodeError> {
    let row = client
        .query_one(
            "SELECT (SELECT min(substr(name, 9)) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'),
                    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
            &[],
        )
        .await
        .map_err(sql)?;
    let (Some(name), segment_size) = (row.get::<_, Option<String>>(0), row.get::<_, i64>(1)) else {
        return Ok(Lsn(u64::MAX));
    };
    Ok(segment_start(&name, segment_size as u64).unwrap_or(Lsn(u64::MAX)))
}

/// The WAL position a segment begins at, from the last 16 hex digits of its file name
/// (the log number, then the segment within it).
fn segment_start(log_and_segment: &str, segment_size: u64) -> Option<Lsn> {
    let log = u64::from_str_radix(log_and_segment.get(..8)?, 16).ok()?;
    let segment = u64::from_str_radix(log_and_segment.get(8..16)?, 16).ok()?;
    Some(Lsn((log << 32) + segment * segment_size))
}

/// Move a copy forward; an error if its WAL is gone (then it is dropped and copied anew).
pub async fn advance(client: &Client, name: &str, to: Lsn) -> Result<(), NodeError> {
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&name, &to.to_string()],
        )
        .await
        .map_err(sql)?;
    Ok(())
}

/// A logical slot's state file on the primary.
pub async fn read_state(primary: &Client, name: &str) -> Result<Vec<u8>, NodeError> {
    let path = format!("pg_replslot/{name}/state");
    Ok(primary
        .query_one("SELECT pg_read_binary_file($1)", &[&path])
        .await
        .map_err(sql)?
        .get(0))
}

/// What a replica publishes of its copies.
pub fn describe_copies(
    primary: &[LogicalSlot],
    local: &[LocalSlot],
    plan: &CopyPlan,
    failed: &[(String, String)],
) -> Vec<SlotCopy> {
    primary
        .iter()
        .map(|p| {
            let copy = local.iter().find(|l| {
                l.name == p.name && l.logical && !l.temporary && !plan.drop.contains(&l.name)
            });
            let problem = failed
                .iter()
                .chain(&plan.waiting)
                .find(|(n, _)| *n == p.name)
                .map(|(_, why)| why.clone());
            let copying = plan
                .copy
                .contains(&p.name)
                .then(|| "copied from the primary; loaded at this restart".to_string());
            SlotCopy {
                name: p.name.clone(),
                ready: copy.is_some() && problem.is_none(),
                confirmed_flush: copy.map_or(Lsn::ZERO, |c| c.confirmed_flush),
                note: problem
                    .or(copying)
                    .or_else(|| copy.is_none().then(|| "no copy yet".to_string())),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(name: &str, restart: u64, confirmed: u64) -> LogicalSlot {
        LogicalSlot {
            name: name.into(),
            plugin: "pgoutput".into(),
            database: "app".into(),
            restart_lsn: Lsn(restart),
            confirmed_flush: Lsn(confirmed),
        }
    }

    fn physical(name: &str, active: bool, lost: bool) -> LocalSlot {
        LocalSlot {
            name: name.into(),
            active,
            lost,
            ..Default::default()
        }
    }

    fn local(name: &str, logical: bool, restart: u64, confirmed: u64) -> LocalSlot {
        LocalSlot {
            name: name.into(),
            logical,
            restart_lsn: Lsn(restart),
            confirmed_flush: Lsn(confirmed),
            ..Default::default()
        }
    }

    #[test]
    fn every_member_gets_a_usable_slot_and_only_a_departed_ones_is_dropped() {
        let members = ["n2".to_string(), "n3".into(), "n4".into()];
        let existing = [
            physical("n2", true, false),
            // Invalidated but its replica still holds it: left until it lets go.
            physical("n3", true, true),
            // Not in etcd now, but not gone long: kept for its restart.
            physical("n8", false, false),
            // Gone long enough: dropped.
            physical("n9", false, false),
        ];
        assert_eq!(
            member_slot_plan(&members, &existing, &["n9".into()]),
            [
                MemberSlotPlan::Create("n4".into()),
                MemberSlotPlan::Drop("n9".into())
            ]
        );
        let lost = [physical("n2", false, true)];
        assert_eq!(
            member_slot_plan(&members[..1], &lost, &[]),
            [MemberSlotPlan::Recreate("n2".into())]
        );
    }

    #[test]
    fn copies_follow_the_primary_but_never_pass_the_replay_position() {
        let slots = [
            primary("walrelay", 100, 500),
            primary("walrelay_b", 300, 300),
        ];
        let mine = [
            local("walrelay", true, 100, 200),
            // Physical: left from when this node was the primary.
            local("n1", false, 50, 0),
            // The primary no longer has it.
            local("walrelay_old", true, 10, 20),
            // Not the cluster's: left alone.
            local("backup", false, 10, 0),
        ];
        let plan = copy_plan(&slots, &mine, Lsn(400), Lsn(0), |l| l.name != "backup");
        assert_eq!(plan.advance, [("walrelay".to_string(), Lsn(400))]);
        assert_eq!(plan.drop, ["n1".to_string(), "walrelay_old".into()]);
        assert_eq!(plan.copy, ["walrelay_b".to_string()]);
        assert!(plan.waiting.is_empty());
    }

    #[test]
    fn a_copy_ahead_of_a_new_primary_s_slot_is_kept_as_it_is() {
        // Advanced from the old primary further than the new primary's own copy: still a
        // position the targets hold, so no restart after a failover.
        let slots = [primary("walrelay", 100, 500)];
        let mine = [local("walrelay", true, 100, 900)];
        let plan = copy_plan(&slots, &mine, Lsn(1000), Lsn(0), |_| true);
        assert_eq!(plan, CopyPlan::default());
    }

    #[test]
    fn a_slot_whose_wal_this_replica_lacks_waits() {
        let slots = [
            primary("walrelay", 100, 500),
            primary("walrelay_b", 900, 900),
        ];
        let plan = copy_plan(&slots, &[], Lsn(800), Lsn(200), |_| true);
        assert!(plan.copy.is_empty());
        assert_eq!(plan.waiting.len(), 2);
        assert!(
            plan.waiting[0].1.contains("oldest WAL"),
            "{:?}",
            plan.waiting
        );
        assert!(plan.waiting[1].1.contains("replayed"), "{:?}", plan.waiting);
        let copies = describe_copies(&slots, &[], &plan, &[]);
        assert!(copies.iter().all(|c| !c.ready));
    }

    #[test]
    fn slots_over_the_limit_are_named_and_only_unused_ones_dropped() {
        let holding = |name: &str, active: bool, held: i64| LocalSlot {
            name: name.into(),
            active,
            held_bytes: Some(held),
            ..Default::default()
        };
        let held = [
            holding("idle", false, 5_000_000),
            holding("busy", true, 5_000_000),
            holding("small", false, 10),
            // A member's slot while its replica is being cloned: named, kept.
            holding("n2", false, 16_000_000),
            // A replica's slot: no figure, nothing said.
            local("walrelay", true, 0, 0),
        ];
        let members = HashSet::from(["n2".to_string(), "n3".to_string()]);
        assert_eq!(
            over_limit(&held, 1_000_000, true, &members),
            [
                ("idle".to_string(), 5_000_000, true),
                ("busy".into(), 5_000_000, false),
                ("n2".into(), 16_000_000, false)
            ]
        );
        assert!(over_limit(&held, 1_000_000, false, &members)
            .iter()
            .all(|(_, _, d)| !d));
    }

    #[test]
    fn segment_names_read_back_to_positions() {
        // Segment 0x10 of log 1, 16 MB segments.
        assert_eq!(
            segment_start("0000000100000010", 16 << 20),
            Some(Lsn((1 << 32) + 0x10 * (16 << 20)))
        );
        assert_eq!(segment_start("zz", 16 << 20), None);
    }
}
