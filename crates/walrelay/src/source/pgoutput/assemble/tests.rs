use super::*;
use crate::source::pgoutput::decode::RawColumn;
use walrelay_model::PgTimestamp;

fn assembler(dir: &std::path::Path) -> Assembler {
    Assembler::new(
        Arc::new(Plan::unshaped("default", &[("public", "a")])),
        StreamNeeds {
            events: false,
            whole: true,
            whole_until: Lsn::ZERO,
        },
        dir.to_path_buf(),
        "t".into(),
    )
}

fn relation(oid: Oid, schema: &str, name: &str) -> PgOutputMessage {
    PgOutputMessage::Relation {
        xid: None,
        relation: RawRelation {
            oid,
            schema: schema.into(),
            name: name.into(),
            replica_identity: b'd',
            columns: vec![
                RawColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RawColumn {
                    is_key: false,
                    name: "mood".into(),
                    type_oid: 16500,
                    type_modifier: -1,
                },
            ],
        },
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

fn insert(xid: Option<Xid>, relid: Oid, id: &str) -> PgOutputMessage {
    PgOutputMessage::Insert {
        xid,
        relid,
        new: vec![t(id), Value::Null],
    }
}

fn begin(lsn: u64, xid: Xid) -> PgOutputMessage {
    PgOutputMessage::Begin {
        final_lsn: Lsn(lsn),
        commit_time: PgTimestamp(1),
        xid,
    }
}

fn commit(lsn: u64) -> PgOutputMessage {
    PgOutputMessage::Commit {
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 8),
        commit_time: PgTimestamp(1),
    }
}

/// Feed messages; streamed transactions are read back whole, as the source does.
fn run(a: &mut Assembler, msgs: Vec<PgOutputMessage>) -> Vec<Event> {
    let mut out = Vec::new();
    for m in msgs {
        if let Some(mut txn) = a.handle(m, &mut out).unwrap() {
            let mut seq = 0;
            while txn.emit(&mut out, &mut seq, 2, usize::MAX).unwrap() {}
        }
    }
    out
}

fn summary(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Begin(b) => format!("B{}", b.xid),
            Event::Commit(c) => format!("C{}@{}#{}", c.xid, c.commit_lsn.0, c.seq),
            Event::Keepalive(l) => format!("K{}", l.0),
            Event::Message(m) => format!("M{}", m.prefix),
            Event::Change { position, change } => {
                let what = match change {
                    Change::Insert { new, .. } => match &new.0[0] {
                        Value::Text(s) => format!("I{s}"),
                        _ => "I?".into(),
                    },
                    Change::Update { .. } => "U".into(),
                    Change::Delete { .. } => "D".into(),
                    Change::Truncate { relations, .. } => format!("T{}", relations.len()),
                    Change::Message { prefix, .. } => format!("m{prefix}"),
                    Change::Ddl(d) => format!("ddl {}", d.tag),
                };
                format!("{what}@{}#{}", position.commit_lsn.0, position.seq)
            }
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn whole_transaction_in_order_with_type_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    let ev = run(
        &mut a,
        vec![
            PgOutputMessage::Type {
                xid: None,
                oid: 16500,
                schema: "public".into(),
                name: "mood".into(),
            },
            relation(1, "public", "a"),
            begin(100, 5),
            PgOutputMessage::Origin {
                commit_lsn: Lsn(1),
                name: "pg_1".into(),
            },
            insert(None, 1, "1"),
            insert(None, 1, "2"),
            commit(100),
        ],
    );
    assert_eq!(summary(&ev), ["B5", "I1@100#1", "I2@100#2", "C5@100#3"]);
    let Event::Begin(b) = &ev[0] else { panic!() };
    assert_eq!(b.origin.as_deref(), Some("pg_1"));
    let Event::Change {
        change: Change::Insert { relation, .. },
        ..
    } = &ev[1]
    else {
        panic!()
    };
    assert_eq!(relation.columns[0].type_name, "int4");
    assert_eq!(relation.columns[1].type_name, "public.mood");
}

#[test]
fn unselected_tables_leave_only_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    let ev = run(
        &mut a,
        vec![
            relation(2, "private", "b"),
            begin(100, 5),
            insert(None, 2, "1"),
            PgOutputMessage::Truncate {
                xid: None,
                cascade: false,
                restart_identity: false,
                relids: vec![2],
            },
            commit(100),
        ],
    );
    assert_eq!(summary(&ev), ["K108"]);
}

#[test]
fn key_only_old_tuple_keeps_key_columns() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    let ev = run(
        &mut a,
        vec![
            relation(1, "public", "a"),
            begin(100, 5),
            PgOutputMessage::Delete {
                xid: None,
                relid: 1,
                old: OldTuple::Key(vec![t("7"), Value::Null]),
            },
            commit(100),
        ],
    );
    let Event::Change {
        change: Change::Delete { old, .. },
        ..
    } = &ev[1]
    else {
        panic!()
    };
    assert_eq!(old, &OldRow::Key(Row(vec![t("7")])));
}

#[test]
fn streamed_transaction_comes_out_whole_at_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    let s = |xid| PgOutputMessage::StreamStart {
        xid,
        first_segment: false,
    };
    let ev = run(
        &mut a,
        vec![
            relation(1, "public", "a"),
            s(9),
            insert(Some(9), 1, "s1"),
            insert(Some(10), 1, "sub-aborted"),
            PgOutputMessage::StreamStop,
            PgOutputMessage::StreamAbort { xid: 9, subxid: 10 },
            begin(100, 5),
            insert(None, 1, "w"),
            commit(100),
            s(9),
            insert(Some(9), 1, "s2"),
            insert(Some(9), 1, "s3"),
            PgOutputMessage::StreamStop,
            s(11),
            insert(Some(11), 1, "gone"),
            PgOutputMessage::StreamStop,
            PgOutputMessage::StreamAbort {
                xid: 11,
                subxid: 11,
            },
            PgOutputMessage::StreamCommit {
                xid: 9,
                commit_lsn: Lsn(200),
                end_lsn: Lsn(208),
                commit_time: PgTimestamp(2),
            },
        ],
    );
    assert_eq!(
        summary(&ev),
        [
            "B5",
            "Iw@100#1",
            "C5@100#2",
            "B9",
            "Is1@200#1",
            "Is2@200#2",
            "Is3@200#3",
            "C9@200#4"
        ]
    );
    assert_eq!(a.pending_streams(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "spill files removed"
    );
}

#[test]
fn out_of_order_messages_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    let mut out = Vec::new();
    assert!(a.handle(commit(1), &mut out).is_err());
    assert!(a.handle(insert(None, 1, "x"), &mut out).is_err());
    a.handle(begin(1, 1), &mut out).unwrap();
    assert!(matches!(
        a.handle(insert(None, 42, "x"), &mut out),
        Err(AssembleError::UnknownRelation(42))
    ));
    assert!(a.handle(begin(2, 2), &mut out).is_err());
}

#[test]
fn stream_events_for_sinks_that_apply_while_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Assembler::new(
        Arc::new(Plan::unshaped("default", &[("public", "a")])),
        StreamNeeds {
            events: true,
            whole: false,
            whole_until: Lsn::ZERO,
        },
        dir.path().to_path_buf(),
        "t".into(),
    );
    let mut out = Vec::new();
    for m in [
        relation(1, "public", "a"),
        PgOutputMessage::StreamStart {
            xid: 9,
            first_segment: true,
        },
        insert(Some(9), 1, "s1"),
        insert(Some(10), 1, "sub"),
        PgOutputMessage::StreamStop,
        PgOutputMessage::StreamAbort { xid: 9, subxid: 10 },
        PgOutputMessage::StreamStart {
            xid: 9,
            first_segment: false,
        },
        insert(Some(9), 1, "s2"),
        PgOutputMessage::StreamStop,
        PgOutputMessage::StreamCommit {
            xid: 9,
            commit_lsn: Lsn(200),
            end_lsn: Lsn(208),
            commit_time: PgTimestamp(2),
        },
    ] {
        assert!(
            a.handle(m, &mut out).unwrap().is_none(),
            "nothing to read back"
        );
    }
    let kinds: Vec<String> = out
        .iter()
        .map(|e| match e {
            Event::StreamChange { xid, subxid, .. } => format!("change {xid}/{subxid}"),
            Event::StreamAbort { xid, subxid } => format!("abort {xid}/{subxid}"),
            Event::StreamCommit { commit, .. } => {
                format!("commit {} seq {}", commit.end_lsn.0, commit.seq)
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "change 9/9",
            "change 9/10",
            "abort 9/10",
            "change 9/9",
            "commit 208 seq 3"
        ]
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no spill file without a whole-transaction sink"
    );
}

/// `source.origin = "none"`: a transaction with a replication origin, whole or streamed,
/// leaves only its position; one without passes.
#[test]
fn transactions_with_an_origin_are_left_out_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    a.set_skip_replicated(true);
    let origin = || PgOutputMessage::Origin {
        commit_lsn: Lsn(0),
        name: "walrelay/back".into(),
    };
    let ev = run(
        &mut a,
        vec![
            relation(1, "public", "a"),
            begin(100, 5),
            origin(),
            insert(None, 1, "replicated"),
            commit(100),
            PgOutputMessage::StreamStart {
                xid: 9,
                first_segment: true,
            },
            origin(),
            insert(Some(9), 1, "streamed and replicated"),
            PgOutputMessage::StreamStop,
            PgOutputMessage::StreamCommit {
                xid: 9,
                commit_lsn: Lsn(200),
                end_lsn: Lsn(208),
                commit_time: PgTimestamp(2),
            },
            begin(300, 6),
            insert(None, 1, "local"),
            commit(300),
        ],
    );
    assert_eq!(
        summary(&ev),
        ["K108", "K208", "B6", "Ilocal@300#1", "C6@300#2"]
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "spill files removed"
    );
}

/// walrelay's mark (`crate::origin`) leaves out a transaction, whole or streamed, as an
/// origin does, also one written without an origin. Without `origin = "none"` the mark
/// only goes unseen by the sinks.
#[test]
fn transactions_marked_as_applied_by_walrelay_are_left_out_when_asked() {
    let mark = |xid| PgOutputMessage::Message {
        xid,
        transactional: true,
        lsn: Lsn(1),
        prefix: crate::origin::APPLIED_PREFIX.into(),
        content: b"slot/back".to_vec(),
    };
    let messages = || {
        vec![
            relation(1, "public", "a"),
            begin(100, 5),
            mark(None),
            insert(None, 1, "applied"),
            commit(100),
            PgOutputMessage::StreamStart {
                xid: 9,
                first_segment: true,
            },
            mark(Some(9)),
            insert(Some(9), 1, "streamed and applied"),
            PgOutputMessage::StreamStop,
            PgOutputMessage::StreamCommit {
                xid: 9,
                commit_lsn: Lsn(200),
                end_lsn: Lsn(208),
                commit_time: PgTimestamp(2),
            },
            begin(300, 6),
            insert(None, 1, "local"),
            mark(None),
            commit(300),
        ]
    };
    let dir = tempfile::tempdir().unwrap();
    let mut a = assembler(dir.path());
    a.set_other_messages(true);
    a.set_skip_replicated(true);
    assert_eq!(
        summary(&run(&mut a, messages())),
        ["K108", "K208", "B6", "Ilocal@300#1", "C6@300#2"],
        "a mark after a change is not walrelay's: that transaction passes"
    );
    let mut a = assembler(dir.path());
    a.set_other_messages(true);
    assert_eq!(
        summary(&run(&mut a, messages())),
        [
            "B5",
            "Iapplied@100#1",
            "C5@100#2",
            "B9",
            "Istreamed and applied@200#1",
            "C9@200#2",
            "B6",
            "Ilocal@300#1",
            "C6@300#2"
        ]
    );
}
