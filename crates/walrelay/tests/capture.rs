//! Capture end to end: changes made on a real server come out of `walrelay run` as JSONL, in
//! commit order, with the right values.

use std::time::Duration;

use serde_json::{json, Value as J};
use walrelay_testkit::{wait_for, TestPg};

use crate::support::*;

fn kinds(lines: &[J]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn changes_come_out_in_commit_order_with_their_values() {
    let pg = TestPg::start();
    let Scene {
        db,
        out,
        mut relay,
        dir: _dir,
        ..
    } = Scene::start(
        &pg,
        "CREATE TABLE orders (id int PRIMARY KEY, note text, qty int);
         CREATE TABLE other (id int PRIMARY KEY);",
        &["public.orders"],
        "",
    )
    .await;

    // One statement per call: several in one simple query would share one transaction.
    for sql in [
        "INSERT INTO orders VALUES (1, 'a', 1), (2, 'b', 2)",
        "UPDATE orders SET qty = 10 WHERE id = 1",
        "UPDATE orders SET id = 3 WHERE id = 2",
        "DELETE FROM orders WHERE id = 1",
        "SELECT pg_logical_emit_message(false, 'marker', 'hello')",
        "INSERT INTO other VALUES (1)",
        "TRUNCATE orders",
        "BEGIN",
        "SELECT pg_logical_emit_message(true, 'tx', 'in txn')",
        "INSERT INTO orders VALUES (5, 'q''s \"quote\" ü', 5)",
        "COMMIT",
        "SELECT pg_logical_emit_message(false, 'done', '')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let lines = wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    // The tables were empty: the snapshot is just its end marker.
    assert_eq!(lines[0]["kind"], "snapshot_end");
    assert_eq!(lines[0]["rows"], 0);
    let lines = &lines[1..];
    assert_eq!(
        kinds(lines),
        [
            "begin", "insert", "insert", "commit", //
            "begin", "update", "commit", //
            "begin", "update", "commit", //
            "begin", "delete", "commit",  //
            "message", //
            "begin", "truncate", "commit", //
            "begin", "message", "insert", "commit", //
            "message"
        ]
    );
    assert_eq!(lines[1]["new"], json!({"id": 1, "note": "a", "qty": 1}));
    assert_eq!(
        lines[1]["types"],
        json!({"id": "int4", "note": "text", "qty": "int4"})
    );
    assert_eq!(lines[1]["key"], json!(["id"]));
    assert_eq!(lines[5]["new"], json!({"id": 1, "note": "a", "qty": 10}));
    assert!(lines[5].get("old").is_none(), "key unchanged: no old row");
    // A primary-key change carries the old key.
    assert_eq!(lines[8]["old_kind"], "key");
    assert_eq!(lines[8]["old"], json!({"id": 2}));
    assert_eq!(lines[8]["new"], json!({"id": 3, "note": "b", "qty": 2}));
    assert_eq!(lines[11]["old"], json!({"id": 1}));
    assert_eq!(lines[13]["transactional"], false);
    assert_eq!(lines[13]["content"], "hello");
    assert_eq!(
        lines[15]["tables"],
        json!([{"schema": "public", "table": "orders"}])
    );
    assert_eq!(lines[18]["transactional"], true);
    assert_eq!(lines[18]["content"], "in txn");
    assert_eq!(lines[19]["new"]["note"], "q's \"quote\" ü");
    // Every change of a transaction carries its id and commit time; positions increase.
    for l in lines {
        if l["kind"] != "message" || l["transactional"] == true {
            assert!(l["xid"].is_u64(), "{l}");
        }
    }
    for w in lines.windows(2) {
        assert!(
            position(&w[0]) < position(&w[1]),
            "positions must increase: {} then {}",
            w[0],
            w[1]
        );
    }
    let last_commit_end: walrelay_model::Lsn =
        lines[20]["end_lsn"].as_str().unwrap().parse().unwrap();

    let log = relay.stop().await;
    assert!(log.contains("stopped cleanly"), "{log}");
    // The final status update confirmed everything that was written.
    assert!(confirmed_flush(&db, "walrelay").await >= last_commit_end.0);
}

#[tokio::test]
async fn idle_slot_advances_while_an_unpublished_table_is_busy() {
    let pg = TestPg::start();
    let Scene { db, out, relay, dir: _dir, .. } =
        Scene::start(&pg, "CREATE TABLE quiet (id int PRIMARY KEY); CREATE TABLE busy (id serial PRIMARY KEY, v text);", &["public.quiet"], "status_interval = \"200ms\"").await;
    let before = confirmed_flush(&db, "walrelay").await;
    for _ in 0..200 {
        db.batch_execute(
            "INSERT INTO busy (v) SELECT repeat('x', 100) FROM generate_series(1, 50)",
        )
        .await
        .unwrap();
    }
    let mark = current_lsn(&db).await;
    assert!(mark > before);
    let db_ref = &db;
    let reached = wait_for(
        "confirmed_flush_lsn to pass the busy writes",
        Duration::from_secs(60),
        || async move {
            let c = confirmed_flush(db_ref, "walrelay").await;
            (c >= mark).then_some(c)
        },
    )
    .await;
    assert!(reached >= mark);
    assert_eq!(
        kinds(&read_jsonl(&out)),
        ["snapshot_end"],
        "nothing of the busy table is captured"
    );
    relay.stop().await;
}

#[tokio::test]
async fn odd_names_and_hostile_values_are_data() {
    let pg = TestPg::start();
    let Scene { db, out, mut relay, dir: _dir, .. } =
        Scene::start(&pg, r#"CREATE SCHEMA "My Schema";
           CREATE TABLE "My Schema"."Odd ""Name"" ü" ("a b" int PRIMARY KEY, "x'; drop table y; --" text);
           CREATE TABLE "My Schema".other (id int PRIMARY KEY);"#, &[r#""My Schema"."Odd ""Name"" ü""#], "").await;
    for sql in [
        r#"INSERT INTO "My Schema"."Odd ""Name"" ü" VALUES (1, '''; drop table x; --')"#,
        r#"INSERT INTO "My Schema".other VALUES (1)"#,
        // Replayed under a replication origin: the begin names it, for loop prevention.
        "SELECT pg_replication_origin_create('upstream')",
        "SELECT pg_replication_origin_session_setup('upstream')",
        r#"INSERT INTO "My Schema"."Odd ""Name"" ü" VALUES (2, NULL)"#,
        "SELECT pg_replication_origin_session_reset()",
        "SELECT pg_logical_emit_message(false, 'done', '')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let lines = wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    let inserts: Vec<&J> = lines.iter().filter(|l| l["kind"] == "insert").collect();
    assert_eq!(inserts.len(), 2, "only the selected table: {lines:?}");
    assert_eq!(inserts[0]["schema"], "My Schema");
    assert_eq!(inserts[0]["table"], "Odd \"Name\" ü");
    assert_eq!(
        inserts[0]["new"],
        json!({"a b": 1, "x'; drop table y; --": "'; drop table x; --"})
    );
    let begins: Vec<&J> = lines.iter().filter(|l| l["kind"] == "begin").collect();
    assert_eq!(begins[0]["origin"], J::Null);
    assert_eq!(begins[1]["origin"], "upstream");
    let published: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walrelay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        published, 1,
        "the publication holds the selected table only"
    );
    relay.stop().await;
}

/// A file sink starts with the snapshot's rows as `read` events, then the stream; a read cut
/// short is done again in a later snapshot, and the stream skips what that snapshot holds.
#[tokio::test]
async fn a_new_file_gets_the_snapshot_as_read_events_then_the_stream() {
    let pg = TestPg::start();
    let Scene {
        db,
        out,
        cfg,
        mut relay,
        dir: _dir,
    } = Scene::start(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 3) g;
         INSERT INTO t VALUES (4, E'tab\\there');",
        &["public.t"],
        "",
    )
    .await;
    db.batch_execute("INSERT INTO t VALUES (5, 'streamed')")
        .await
        .unwrap();
    let lines = wait_for_line(&mut relay, &out, "the streamed insert", |l| {
        l["kind"] == "commit"
    })
    .await;
    assert_eq!(
        kinds(&lines),
        [
            "read",
            "read",
            "read",
            "read",
            "snapshot_end",
            "begin",
            "insert",
            "commit"
        ]
    );
    assert_eq!(lines[4]["rows"], 4);
    assert_eq!(lines[4]["lsn"], lines[0]["lsn"]);
    for (i, line) in lines[..4].iter().enumerate() {
        assert_eq!(line["seq"], json!(i + 1));
        assert_eq!(line["lsn"], lines[0]["lsn"], "one snapshot position");
        assert_eq!(line["table"], "t");
    }
    assert_eq!(lines[3]["new"], json!({"id": 4, "v": "tab\there"}));
    assert_eq!(lines[1]["types"], json!({"id": "int4", "v": "text"}));
    let lsn = |l: &J| -> walrelay_model::Lsn { l["lsn"].as_str().unwrap().parse().unwrap() };
    assert!(
        lsn(&lines[6]) >= lsn(&lines[0]),
        "the stream comes after the snapshot"
    );
    relay.stop().await;

    // A read cut short: the file ends inside the snapshot's rows. Rows change meanwhile.
    let text = std::fs::read_to_string(&out).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&out, kept.join("\n") + "\n").unwrap();
    db.batch_execute("INSERT INTO t VALUES (6, 'while stopped')")
        .await
        .unwrap();
    db.batch_execute("UPDATE t SET v = 'changed' WHERE id = 1")
        .await
        .unwrap();
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&db, &mut relay).await;
    db.batch_execute("INSERT INTO t VALUES (7, 'after')")
        .await
        .unwrap();
    let lines = wait_for_line(&mut relay, &out, "the insert after the restart", |l| {
        l["new"]["id"] == 7
    })
    .await;
    let log = relay.stop().await;
    let reread: Vec<&J> = lines[2..]
        .iter()
        .take_while(|l| l["kind"] == "read")
        .collect();
    assert_eq!(reread.len(), 6, "every row again, as of now: {lines:?}");
    assert!(lsn(reread[0]) > lsn(&lines[0]), "a later snapshot");
    assert!(reread
        .iter()
        .any(|l| l["new"] == json!({"id": 1, "v": "changed"})));
    // What committed before that snapshot (rows 5 and 6, the update) is in it, not repeated
    // as changes; the first change after it is row 7.
    assert_eq!(lines[2 + reread.len()]["kind"], "snapshot_end");
    let after = kinds(&lines[3 + reread.len()..]);
    assert!(
        after == ["begin", "insert"] || after == ["begin", "insert", "commit"],
        "{after:?}\n{log}"
    );
}
