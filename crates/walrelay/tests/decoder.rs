//! The pgoutput decoder against pg_walstream, an independent decoder, on the bytes a real
//! PostgreSQL 15 sends: every message kind, a streamed transaction, an aborted one.

use std::time::Duration;

use pg_walstream::{LogicalReplicationMessage as W, LogicalReplicationParser, TupleData};
use walrelay::pg::conninfo::{resolve, ProcessEnv};
use walrelay::pg::replication::{ReplicationConnection, ReplicationMessage};
use walrelay::source::pgoutput::decode::{decode, OldTuple, PgOutputMessage as P};
use walrelay_model::Value;
use walrelay_testkit::TestPg;

fn ours(values: &[Value]) -> String {
    values
        .iter()
        .map(|v| match v {
            Value::Null => "n".to_string(),
            Value::UnchangedToast => "u".to_string(),
            Value::Text(t) => format!("t{t}"),
            Value::Binary(b) => format!("b{b:?}"),
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn theirs(t: &TupleData) -> String {
    t.columns
        .iter()
        .map(|c| match c.data_type {
            b'n' => "n".to_string(),
            b'u' => "u".to_string(),
            b't' => format!("t{}", String::from_utf8(c.as_bytes().to_vec()).unwrap()),
            _ => format!("b{:?}", c.as_bytes()),
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn old_ours(o: &OldTuple) -> String {
    match o {
        OldTuple::Key(v) => format!("K{}", ours(v)),
        OldTuple::Full(v) => format!("O{}", ours(v)),
    }
}

/// One line per message, the same for both decoders when they agree.
fn summary_ours(m: &P) -> String {
    match m {
        P::Begin {
            final_lsn,
            commit_time,
            xid,
        } => format!("B {} {} {xid}", final_lsn.0, commit_time.0),
        P::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
        } => format!("C {} {} {}", commit_lsn.0, end_lsn.0, commit_time.0),
        P::Origin { commit_lsn, name } => format!("O {} {name}", commit_lsn.0),
        P::Relation { relation: r, .. } => format!(
            "R {} {}.{} {} {}",
            r.oid,
            r.schema,
            r.name,
            r.replica_identity as char,
            r.columns
                .iter()
                .map(|c| format!("{}:{}:{}:{}", c.is_key, c.name, c.type_oid, c.type_modifier))
                .collect::<Vec<_>>()
                .join(",")
        ),
        P::Type {
            oid, schema, name, ..
        } => format!("Y {oid} {schema}.{name}"),
        P::Insert { relid, new, .. } => format!("I {relid} {}", ours(new)),
        P::Update {
            relid, old, new, ..
        } => format!(
            "U {relid} {} {}",
            old.as_ref().map(old_ours).unwrap_or_default(),
            ours(new)
        ),
        P::Delete { relid, old, .. } => format!("D {relid} {}", old_ours(old)),
        P::Truncate {
            cascade,
            restart_identity,
            relids,
            ..
        } => format!("T {cascade} {restart_identity} {relids:?}"),
        P::Message {
            transactional,
            lsn,
            prefix,
            content,
            ..
        } => format!("M {transactional} {} {prefix} {content:?}", lsn.0),
        P::StreamStart { xid, first_segment } => format!("S {xid} {first_segment}"),
        P::StreamStop => "E".into(),
        P::StreamCommit {
            xid,
            commit_lsn,
            end_lsn,
            commit_time,
        } => format!("c {xid} {} {} {}", commit_lsn.0, end_lsn.0, commit_time.0),
        P::StreamAbort { xid, subxid } => format!("A {xid} {subxid}"),
    }
}

fn summary_theirs(m: &W) -> String {
    match m {
        W::Begin {
            final_lsn,
            timestamp,
            xid,
        } => format!("B {final_lsn} {timestamp} {xid}"),
        W::Commit {
            commit_lsn,
            end_lsn,
            timestamp,
            ..
        } => format!("C {commit_lsn} {end_lsn} {timestamp}"),
        W::Origin {
            origin_lsn,
            origin_name,
        } => format!("O {origin_lsn} {origin_name}"),
        W::Relation {
            relation_id,
            namespace,
            relation_name,
            replica_identity,
            columns,
        } => format!(
            "R {relation_id} {namespace}.{relation_name} {} {}",
            *replica_identity as char,
            columns
                .iter()
                .map(|c| format!(
                    "{}:{}:{}:{}",
                    c.is_key(),
                    c.name,
                    c.type_id,
                    c.type_modifier
                ))
                .collect::<Vec<_>>()
                .join(",")
        ),
        W::Type {
            type_id,
            namespace,
            type_name,
        } => format!("Y {type_id} {namespace}.{type_name}"),
        W::Insert { relation_id, tuple } => format!("I {relation_id} {}", theirs(tuple)),
        W::Update {
            relation_id,
            old_tuple,
            new_tuple,
            key_type,
        } => format!(
            "U {relation_id} {} {}",
            old_tuple
                .as_ref()
                .map(|t| format!("{}{}", key_type.unwrap_or('O'), theirs(t)))
                .unwrap_or_default(),
            theirs(new_tuple)
        ),
        W::Delete {
            relation_id,
            old_tuple,
            key_type,
        } => format!("D {relation_id} {key_type}{}", theirs(old_tuple)),
        W::Truncate {
            relation_ids,
            flags,
        } => format!("T {} {} {relation_ids:?}", flags & 1 != 0, flags & 2 != 0),
        W::Message {
            flags,
            lsn,
            prefix,
            content,
        } => format!("M {} {lsn} {prefix} {:?}", flags & 1 != 0, content.to_vec()),
        W::StreamStart { xid, first_segment } => format!("S {xid} {first_segment}"),
        W::StreamStop => "E".into(),
        W::StreamCommit {
            xid,
            commit_lsn,
            end_lsn,
            timestamp,
            ..
        } => format!("c {xid} {commit_lsn} {end_lsn} {timestamp}"),
        W::StreamAbort {
            xid,
            subtransaction_xid,
            ..
        } => format!("A {xid} {subtransaction_xid}"),
        other => format!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn decodes_a_real_stream_like_pg_walstream() {
    let pg = TestPg::builder()
        .setting("logical_decoding_work_mem", "'64kB'")
        .start();
    let db = pg.create_db("app").await;
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE a (id int PRIMARY KEY, m mood, body text, n numeric(10,2));
         CREATE TABLE full_id (x int, y text);
         ALTER TABLE full_id REPLICA IDENTITY FULL;
         CREATE PUBLICATION p FOR TABLE a, full_id;",
    )
    .await
    .unwrap();
    let info = resolve(&pg.url("app"), &ProcessEnv).unwrap();
    let mut conn = ReplicationConnection::connect(&info).await.unwrap();
    conn.simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput NOEXPORT_SNAPSHOT")
        .await
        .unwrap();
    for sql in [
        "INSERT INTO a VALUES (1, 'happy', 'x', 1.5), (2, NULL, repeat('y', 5000), NULL)",
        "UPDATE a SET n = 2 WHERE id = 1",
        "UPDATE a SET id = 3 WHERE id = 2",
        "DELETE FROM a WHERE id = 1",
        "INSERT INTO full_id VALUES (1, 'a')",
        "UPDATE full_id SET y = 'b'",
        "DELETE FROM full_id",
        "SELECT pg_logical_emit_message(false, 'nt', 'x')",
        "BEGIN; SELECT pg_logical_emit_message(true, 'tx', '\\xff00'::bytea); INSERT INTO a VALUES (10, 'sad', 'z', 0); COMMIT;",
        "TRUNCATE a, full_id RESTART IDENTITY CASCADE",
        "INSERT INTO a SELECT g, 'sad', repeat('s', 50), g FROM generate_series(100, 3000) g",
        "BEGIN; INSERT INTO a SELECT g, 'sad', repeat('r', 50), g FROM generate_series(5000, 8000) g; ROLLBACK;",
        "BEGIN; INSERT INTO a SELECT g, 'sad', 'k', g FROM generate_series(9000, 11000) g; SAVEPOINT s; INSERT INTO a SELECT g, 'sad', 'r', g FROM generate_series(12000, 14000) g; ROLLBACK TO s; COMMIT;",
        // A transaction replayed under a replication origin carries an Origin message.
        "SELECT pg_replication_origin_create('upstream'); SELECT pg_replication_origin_session_setup('upstream')",
        "INSERT INTO a VALUES (20000, 'happy', 'from upstream', 1)",
        "SELECT pg_replication_origin_session_reset()",
        "SELECT pg_logical_emit_message(false, 'done', '')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    conn.start_replication("START_REPLICATION SLOT s LOGICAL 0/0 (proto_version '2', streaming 'on', publication_names '\"p\"', messages 'true')")
        .await
        .unwrap();
    let mut oracle = LogicalReplicationParser::with_protocol_version(2);
    let mut in_stream = false;
    let (mut count, mut kinds) = (0, std::collections::BTreeSet::new());
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), conn.recv())
            .await
            .expect("stream stalled")
            .unwrap();
        let ReplicationMessage::XLogData { data, .. } = msg else {
            continue;
        };
        let mine = decode(&data, in_stream).unwrap();
        let reference = oracle.parse_wal_message(&data).unwrap();
        assert_eq!(summary_ours(&mine), summary_theirs(&reference.message));
        match &mine {
            P::StreamStart { .. } => in_stream = true,
            P::StreamStop => in_stream = false,
            _ => {}
        }
        count += 1;
        kinds.insert(summary_ours(&mine).chars().next().unwrap());
        if matches!(&mine, P::Message { prefix, .. } if prefix == "done") {
            break;
        }
    }
    let kinds: String = kinds.into_iter().collect();
    println!("{count} messages agreed; kinds: {kinds}");
    for k in "BCORYIUDTMSEcA".chars() {
        assert!(kinds.contains(k), "message kind {k} seen (saw {kinds})");
    }
}
