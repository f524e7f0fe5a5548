//! Routing by set: a sink that takes only some sets sees only their tables. Transactions
//! left with nothing for it become a keepalive at their end, so that its durable position
//! (and the slot) still moves past them. What it keeps of a transaction (and of the
//! snapshot's rows) is numbered again from 1, so that its positions stay gapless, as a
//! reader of the stream checks (`walrelay consume`); the numbering depends only on the
//! source's transaction and the sink's sets, so a repeat after a restart gets the same.

use std::collections::{HashMap, HashSet};

use walrelay_model::{Change, Event, Position, Relation, Xid};

/// The per-sink state of the routing: a transaction's Begin waits for its first change the
/// sink takes, and the streamed transactions it has seen changes of.
#[derive(Debug)]
pub struct SinkRoute {
    /// The tables the sink takes, by target schema, then name: looked up per event without
    /// building a key.
    tables: HashMap<String, HashSet<String>>,
    /// The sink's sets: a table a schema change brings into one of them is taken from then on.
    sets: Vec<String>,
    pending_begin: Option<Event>,
    begun: bool,
    /// Changes kept of the open transaction.
    seq: u64,
    /// Snapshot rows kept.
    reads: u64,
    streams: HashSet<Xid>,
}

impl SinkRoute {
    pub fn new(tables: Vec<(String, String)>, sets: Vec<String>) -> Self {
        let mut route = SinkRoute {
            tables: HashMap::new(),
            sets,
            pending_begin: None,
            begun: false,
            seq: 0,
            reads: 0,
            streams: HashSet::new(),
        };
        for (schema, name) in tables {
            route.take(schema, name);
        }
        route
    }

    /// From now on the sink takes `schema.name`.
    fn take(&mut self, schema: String, name: String) {
        self.tables.entry(schema).or_default().insert(name);
    }

    fn takes(&self, relation: &Relation) -> bool {
        self.tables
            .get(&relation.schema)
            .is_some_and(|names| names.contains(&relation.name))
    }

    /// What the sink takes of `change`, if anything.
    fn change(&mut self, change: &Change) -> Option<Change> {
        match change {
            Change::Insert { relation, .. }
            | Change::Update { relation, .. }
            | Change::Delete { relation, .. } => self.takes(relation).then(|| change.clone()),
            Change::Truncate {
                relations,
                cascade,
                restart_identity,
            } => {
                let kept: Vec<_> = relations
                    .iter()
                    .filter(|r| self.takes(r))
                    .cloned()
                    .collect();
                (!kept.is_empty()).then_some(Change::Truncate {
                    relations: kept,
                    cascade: *cascade,
                    restart_identity: *restart_identity,
                })
            }
            // Logical messages belong to no table: every sink takes them.
            Change::Message { .. } => Some(change.clone()),
            // A schema change of its tables, or of tables coming into its sets (created,
            // renamed), which it takes from then on; one of no table (a type, a sequence
            // in their schemas) goes to every sink.
            Change::Ddl(ddl) => {
                if ddl.tables.is_empty() {
                    return Some(change.clone());
                }
                let mut taken = false;
                for t in &ddl.tables {
                    let in_sets = t.set.as_ref().is_some_and(|s| self.sets.contains(s));
                    let known = self
                        .tables
                        .get(&t.schema)
                        .is_some_and(|n| n.contains(&t.name));
                    if in_sets && !known && t.action != walrelay_model::DdlAction::Drop {
                        self.take(t.schema.clone(), t.name.clone());
                    }
                    taken |= in_sets || known;
                }
                taken.then(|| change.clone())
            }
        }
    }

    /// The events of `batch` this sink takes, in order.
    pub fn filter(&mut self, batch: &[Event]) -> Vec<Event> {
        let mut out = Vec::with_capacity(batch.len());
        for event in batch {
            match event {
                Event::Begin(_) => {
                    self.pending_begin = Some(event.clone());
                    self.begun = false;
                    self.seq = 0;
                }
                Event::Change { position, change } => {
                    if let Some(change) = self.change(change) {
                        if let Some(begin) = self.pending_begin.take() {
                            out.push(begin);
                            self.begun = true;
                        }
                        self.seq += 1;
                        out.push(Event::Change {
                            position: Position::new(position.commit_lsn, self.seq),
                            change,
                        });
                    }
                }
                Event::Commit(c) => {
                    self.pending_begin = None;
                    if std::mem::take(&mut self.begun) {
                        let mut commit = c.clone();
                        commit.seq = self.seq + 1;
                        out.push(Event::Commit(commit));
                    } else {
                        out.push(Event::Keepalive(c.end_lsn));
                    }
                }
                Event::StreamChange {
                    xid,
                    subxid,
                    change,
                } => {
                    if let Some(change) = self.change(change) {
                        self.streams.insert(*xid);
                        out.push(Event::StreamChange {
                            xid: *xid,
                            subxid: *subxid,
                            change,
                        });
                    }
                }
                Event::StreamAbort { xid, subxid } => {
                    if self.streams.contains(xid) {
                        out.push(event.clone());
                        if xid == subxid {
                            self.streams.remove(xid);
                        }
                    }
                }
                Event::StreamCommit { begin, commit } => {
                    if self.streams.remove(&begin.xid) {
                        out.push(event.clone());
                    } else {
                        out.push(Event::Keepalive(commit.end_lsn));
                    }
                }
                Event::Read {
                    position,
                    relation,
                    row,
                } => {
                    if self.takes(relation) {
                        self.reads += 1;
                        out.push(Event::Read {
                            position: Position::new(position.commit_lsn, self.reads),
                            relation: relation.clone(),
                            row: row.clone(),
                        });
                    }
                }
                Event::SnapshotEnd { position, .. } => out.push(Event::SnapshotEnd {
                    position: Position::new(position.commit_lsn, self.reads + 1),
                    rows: self.reads,
                }),
                Event::Message(_) | Event::Keepalive(_) => out.push(event.clone()),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use walrelay_model::{Lsn, PgTimestamp, ReplicaIdentity, Row, TxnBegin, TxnCommit};

    use super::*;

    fn rel(name: &str) -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![],
        })
    }

    fn txn(commit: u64, tables: &[&str]) -> Vec<Event> {
        let begin = TxnBegin {
            xid: commit as u32,
            commit_lsn: Lsn(commit),
            commit_time: PgTimestamp(0),
            origin: None,
        };
        let mut events = vec![Event::Begin(begin)];
        for (i, t) in tables.iter().enumerate() {
            events.push(Event::Change {
                position: Position::new(Lsn(commit), i as u64 + 1),
                change: Change::Insert {
                    relation: rel(t),
                    new: Row(vec![]),
                },
            });
        }
        events.push(Event::Commit(TxnCommit {
            xid: commit as u32,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 1),
            commit_time: PgTimestamp(0),
            seq: tables.len() as u64 + 1,
        }));
        events
    }

    #[test]
    fn a_sink_sees_its_tables_and_a_keepalive_for_the_rest() {
        let mut route = SinkRoute::new(vec![("public".into(), "a".into())], vec!["s".into()]);
        let mut batch = txn(10, &["b", "a", "b"]);
        batch.extend(txn(20, &["b"]));
        let out = route.filter(&batch);
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(matches!(out[0], Event::Begin(_)));
        assert!(
            matches!(&out[1], Event::Change { change: Change::Insert { relation, .. }, position } if relation.name == "a" && position.seq == 1),
            "the kept change is numbered 1: {:?}",
            out[1]
        );
        assert!(matches!(&out[2], Event::Commit(c) if c.seq == 2));
        assert_eq!(out[3], Event::Keepalive(Lsn(21)));
    }

    #[test]
    fn a_transaction_split_across_batches_keeps_its_begin() {
        let mut route = SinkRoute::new(vec![("public".into(), "a".into())], vec!["s".into()]);
        let events = txn(10, &["b", "a"]);
        let first = route.filter(&events[..2]);
        assert!(
            first.is_empty(),
            "the begin waits for a change the sink takes"
        );
        let rest = route.filter(&events[2..]);
        assert!(matches!(rest[0], Event::Begin(_)));
        assert_eq!(rest.len(), 3);
    }

    #[test]
    fn a_table_created_in_the_sinks_set_is_taken_from_its_schema_change_on() {
        use walrelay_model::{Ddl, DdlAction, DdlTable};
        let mut route = SinkRoute::new(vec![("public".into(), "a".into())], vec!["s".into()]);
        let ddl = |set: &str, name: &str| Event::Change {
            position: Position::new(Lsn(10), 1),
            change: Change::Ddl(Box::new(Ddl {
                tag: "CREATE TABLE".into(),
                statement: format!("CREATE TABLE {name} ()"),
                search_path: "public".into(),
                role: None,
                tables: vec![DdlTable {
                    schema: "public".into(),
                    name: name.into(),
                    action: DdlAction::Create,
                    set: Some(set.into()),
                    columns: vec![],
                    primary_key: vec![],
                }],
                unsafe_reason: None,
            })),
        };
        let mut batch = txn(10, &[]);
        batch.insert(1, ddl("s", "new"));
        batch.insert(2, ddl("other", "theirs"));
        let out = route.filter(&batch);
        assert_eq!(
            out.len(),
            3,
            "begin, the sink's own schema change, commit: {out:?}"
        );
        let out = route.filter(&txn(20, &["new", "theirs"]));
        assert!(
            matches!(&out[1], Event::Change { change: Change::Insert { relation, .. }, .. } if relation.name == "new"),
            "{out:?}"
        );
        assert_eq!(out.len(), 3, "{out:?}");
    }
}
