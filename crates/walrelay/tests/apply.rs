//! The postgres sink: changes reach a second real server exactly once, in commit order.

use walrelay_testkit::TestPg;

use crate::support::*;

const SCHEMA: &str = "CREATE TABLE accounts (id int PRIMARY KEY, counter int8 NOT NULL, note text);
                      CREATE TABLE items (id int PRIMARY KEY, name text);";

/// Source and target servers with `schema` on both, and a relay applying `tables`.
pub async fn replicate(
    schema: &str,
    tables: &[&str],
    extra_sink: &str,
) -> (
    TestPg,
    TestPg,
    tokio_postgres::Client,
    tokio_postgres::Client,
    tempfile::TempDir,
    Relay,
) {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        tables,
        extra_sink,
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    (source_pg, target_pg, source, target, dir, relay)
}

#[tokio::test]
async fn a_mixed_workload_arrives_exactly() {
    let (_s, _t, source, target, _dir, mut relay) = replicate(SCHEMA, &["public.*"], "").await;
    source
        .batch_execute("INSERT INTO accounts SELECT g, 0, 'n' || g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    for i in 0..300 {
        let id = (i * 37) % 100 + 1;
        source
            .execute(
                "UPDATE accounts SET counter = counter + 1 WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
    }
    for sql in [
        "DELETE FROM accounts WHERE id BETWEEN 91 AND 100",
        "UPDATE accounts SET id = id + 1000 WHERE id = 5",
        "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g",
        "TRUNCATE items",
        "INSERT INTO items SELECT g, 'again ' || g FROM generate_series(1, 20) g",
        "BEGIN; UPDATE accounts SET note = NULL WHERE id < 10; DELETE FROM items WHERE id = 3; COMMIT;",
    ] {
        source.batch_execute(sql).await.unwrap();
    }
    wait_until_equal(&source, &target, &["accounts", "items"], &mut relay).await;
    // Each update counted once: the surviving rows hold exactly the updates made to them.
    let expected: i64 = (0..300)
        .map(|i| (i * 37) % 100 + 1)
        .filter(|&id| id <= 90)
        .count() as i64;
    let total: i64 = target
        .query_one("SELECT sum(counter)::int8 FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, expected);
    let moved: i64 = target
        .query_one("SELECT count(*) FROM accounts WHERE id = 1005", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(moved, 1, "the key change arrived");
    // A superuser target records its position in a replication origin, at the source
    // position of the last transaction.
    let progress: String = target
        .query_one(
            "SELECT pg_replication_origin_progress('walrelay/postgres', true)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let source_now = current_lsn(&source).await;
    let recorded: walrelay_model::Lsn = progress.parse().unwrap();
    assert!(recorded.0 > 0 && recorded.0 <= source_now, "{progress}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_9s_neither_lose_nor_repeat_a_change() {
    let schema = "CREATE TABLE load (id int8 PRIMARY KEY, v text);
                  CREATE TABLE counter (id int PRIMARY KEY, n int8);";
    let (source_pg, _t, source, target, dir, relay) =
        replicate(schema, &["public.load", "public.counter"], "").await;
    source
        .batch_execute("INSERT INTO counter VALUES (1, 0)")
        .await
        .unwrap();
    relay.kill9().await;
    let cfg = dir.path().join("walrelay.toml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (load, committed) = crate::durability::start_load(&source_pg, stop.clone()).await;
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("random seed {rng}");
    for _ in 0..20 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let relay = Relay::start(&cfg);
        tokio::time::sleep(std::time::Duration::from_millis(100 + rng % 1200)).await;
        relay.kill9().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let mut relay = Relay::start(&cfg);
    wait_until_equal(&source, &target, &["load", "counter"], &mut relay).await;
    let committed = committed.lock().unwrap().clone();
    let rows: i64 = target
        .query_one("SELECT count(*) FROM load", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows as usize, committed.len(), "every committed row, once");
    // The load updates the counter once per transaction: a repeat or a skip shows here.
    let n: i64 = target
        .query_one("SELECT n FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    let transactions = committed
        .iter()
        .filter(|&&id| id % 10 != 2 && id % 10 != 3)
        .count() as i64;
    assert_eq!(n, transactions, "one counter update per source transaction");
    relay.stop().await;
    println!(
        "{} rows in {transactions} transactions through 20 crashes",
        committed.len()
    );
}

#[tokio::test]
async fn every_type_round_trips_byte_exact() {
    let (_s, _t, source, target, _dir, mut relay) =
        replicate(&crate::values::type_schema(), &["public.v"], "").await;
    source
        .batch_execute(crate::values::TYPE_ROWS)
        .await
        .unwrap();
    // Row by row (three rows), then in bulk: a run of 15 inserts goes by COPY, a run of 18
    // updates through a staging table, and ten updates of one row collapse to the last.
    let cols: Vec<&str> = crate::values::COLUMNS.iter().map(|(n, _)| *n).collect();
    for sql in [
        "UPDATE v SET t = t || '!', arr = '{9}' WHERE id = 1".to_string(),
        format!(
            "INSERT INTO v SELECT id + 10 * g, {} FROM v, generate_series(1, 5) g",
            cols.join(", ")
        ),
        "UPDATE v SET t = coalesce(t, '') || '?', f8 = f8 * 2".to_string(),
        format!(
            "BEGIN; {} COMMIT;",
            "UPDATE v SET i4 = i4 - 1 WHERE id = 1; ".repeat(10)
        ),
        "DELETE FROM v WHERE id = 3".to_string(),
    ] {
        source.batch_execute(&sql).await.unwrap();
    }
    wait_until_equal(&source, &target, &["v"], &mut relay).await;
    let (s, t) = (rows_as_json(&source).await, rows_as_json(&target).await);
    assert_eq!(s.len(), 17);
    assert_eq!(s, t);
    let log = relay.stop().await;
    assert!(
        log.contains("applying a run in bulk") && log.contains("kind=Insert"),
        "{log}"
    );
    assert!(log.contains("kind=Update"), "{log}");
}

async fn rows_as_json(c: &tokio_postgres::Client) -> Vec<String> {
    c.query("SELECT row_to_json(v)::text FROM v ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

#[tokio::test]
async fn odd_names_and_hostile_values_replicate_as_data() {
    let schema = r#"CREATE SCHEMA "My Schema";
                    CREATE TABLE "My Schema"."Odd ""Name"" ü" ("a b" int PRIMARY KEY, "x'; drop table y; --" text);"#;
    let (_s, _t, source, target, _dir, mut relay) =
        replicate(schema, &[r#""My Schema"."Odd ""Name"" ü""#], "").await;
    source
        .batch_execute(
            r#"INSERT INTO "My Schema"."Odd ""Name"" ü" VALUES (1, '''; drop table x; --'), (2, E'\\x00 \u2603');
               UPDATE "My Schema"."Odd ""Name"" ü" SET "x'; drop table y; --" = 'a"b' WHERE "a b" = 2;"#,
        )
        .await
        .unwrap();
    wait_until_equal(
        &source,
        &target,
        &[r#""My Schema"."Odd ""Name"" ü""#],
        &mut relay,
    )
    .await;
    let v: String = target
        .query_one(
            r#"SELECT "x'; drop table y; --" FROM "My Schema"."Odd ""Name"" ü" WHERE "a b" = 1"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "'; drop table x; --");
    relay.stop().await;
}

#[tokio::test]
async fn conflicts_stop_the_sink_by_default_with_table_key_and_position() {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let (_s, _t, source, target, dir, mut relay) = replicate(schema, &["public.t"], "").await;
    target
        .batch_execute("INSERT INTO t VALUES (1, 'target only')")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO t VALUES (1, 'from source')")
        .await
        .unwrap();
    let status = relay.wait(std::time::Duration::from_secs(60)).await;
    let log = relay.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("walrelay: error:"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        error.contains("conflict on public.t")
            && error.contains("(id)=(1)")
            && error.contains("source position"),
        "{error}"
    );
    assert!(error.contains("on_conflict"), "says what to do: {error}");
    let v: String = target
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "target only", "nothing half-applied");

    // Once the operator removes the stray row, the insert goes in; a row missing for an
    // update is the next conflict, named the same way.
    target.batch_execute("DELETE FROM t").await.unwrap();
    let cfg = dir.path().join("walrelay.toml");
    let mut relay = Relay::start(&cfg);
    wait_for_count(
        &target,
        "SELECT count(*) FROM t",
        1,
        "the insert to be applied",
    )
    .await;
    target.batch_execute("DELETE FROM t").await.unwrap();
    source
        .batch_execute("UPDATE t SET v = 'changed' WHERE id = 1")
        .await
        .unwrap();
    let status = relay.wait(std::time::Duration::from_secs(60)).await;
    let log = relay.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("update of (id)=(1) found no such row on the target"),
        "{log}"
    );

    // The same conflict inside a bulk run of updates names the missing key too. The
    // target is prepared by hand, and its progress set past the source's rows.
    source
        .batch_execute("DELETE FROM t; INSERT INTO t SELECT g, 'x' FROM generate_series(1, 20) g")
        .await
        .unwrap();
    target
        .batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 20) g; DELETE FROM t WHERE id = 13")
        .await
        .unwrap();
    let skip_to: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    target
        .execute(
            "UPDATE walrelay.progress SET lsn = $1::text::pg_lsn WHERE name = 'walrelay/postgres'",
            &[&skip_to],
        )
        .await
        .unwrap();
    source
        .batch_execute("UPDATE t SET v = 'bulk'")
        .await
        .unwrap();
    let mut relay = Relay::start(&cfg);
    let status = relay.wait(std::time::Duration::from_secs(60)).await;
    let log = relay.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("update of (id)=(13) found no such row on the target"),
        "{log}"
    );
}

#[tokio::test]
async fn on_conflict_apply_and_skip_resolve_and_log() {
    for mode in ["apply", "skip"] {
        let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
        let source = source_pg.create_db("app").await;
        let target = target_pg.create_db("app").await;
        let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
        source.batch_execute(schema).await.unwrap();
        target.batch_execute(schema).await.unwrap();
        // Rows only the target has, and rows only the source has (written before the slot
        // existed, so never replicated).
        target
            .batch_execute("INSERT INTO t VALUES (1, 'target only'), (3, 'target only')")
            .await
            .unwrap();
        source
            .batch_execute("INSERT INTO t VALUES (5, 'source only'), (6, 'source only')")
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The targets differ on purpose: no copy.
        let extra = format!("on_conflict = \"{mode}\"\n[snapshot]\nenabled = false");
        let cfg = postgres_config(
            dir.path(),
            &source_pg.url("app"),
            &target_pg.url("app"),
            &["public.t"],
            &extra,
        );
        let mut relay = Relay::start(&cfg);
        wait_until_streaming(&source, &mut relay).await;
        for sql in [
            "INSERT INTO t VALUES (1, 'from source'), (2, 'two')",
            "UPDATE t SET v = 'new' WHERE id = 5",
            "DELETE FROM t WHERE id = 6",
            "INSERT INTO t VALUES (100, 'end')",
        ] {
            source.batch_execute(sql).await.unwrap();
        }
        wait_for_count(
            &target,
            "SELECT count(*) FROM t WHERE id = 100",
            1,
            "the last insert",
        )
        .await;
        let rows: Vec<(i32, String)> = target
            .query("SELECT id, v FROM t ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let log = relay.stop().await;
        let row = |id: i32, v: &str| (id, v.to_string());
        if mode == "apply" {
            assert_eq!(
                rows,
                [
                    row(1, "from source"),
                    row(2, "two"),
                    row(3, "target only"),
                    row(5, "new"),
                    row(100, "end")
                ]
            );
            for expected in [
                "updated to the inserted values",
                "the new row was inserted",
                "the delete was skipped",
            ] {
                assert!(log.contains(expected), "{expected:?} logged:\n{log}");
            }
        } else {
            assert_eq!(
                rows,
                [
                    row(1, "target only"),
                    row(2, "two"),
                    row(3, "target only"),
                    row(100, "end")
                ]
            );
            for expected in [
                "the insert was skipped",
                "the update was skipped",
                "the delete was skipped",
            ] {
                assert!(log.contains(expected), "{expected:?} logged:\n{log}");
            }
        }
    }
}

#[tokio::test]
async fn streamed_transactions_apply_while_streaming_and_aborts_leave_no_trace() {
    let (source_pg, target_pg) = (
        TestPg::builder()
            .setting("logical_decoding_work_mem", "'64kB'")
            .start(),
        TestPg::start(),
    );
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        &["public.t"],
        "",
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    for sql in [
        "BEGIN; INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g; ROLLBACK;",
        "BEGIN;
         INSERT INTO t SELECT g, 'kept' FROM generate_series(1, 5000) g;
         SAVEPOINT s;
         INSERT INTO t SELECT g, 'rolled back' FROM generate_series(5001, 15000) g;
         SAVEPOINT inner_s;
         UPDATE t SET v = 'nested' WHERE id < 100;
         ROLLBACK TO SAVEPOINT s;
         UPDATE t SET v = 'updated' WHERE id <= 1000;
         INSERT INTO t SELECT g, 'kept' FROM generate_series(20001, 25000) g;
         COMMIT;",
        "INSERT INTO t VALUES (0, 'small, after')",
    ] {
        source.batch_execute(sql).await.unwrap();
    }
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    let n: i64 = target
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10_001);
    let log = relay.stop().await;
    assert!(log.contains("streamed transaction applied"), "{log}");
}

#[tokio::test]
async fn a_plain_target_role_records_progress_in_a_table_and_keeps_order_across_tables() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    let schema = "CREATE TABLE parent (id int PRIMARY KEY);
                  CREATE TABLE child (id int PRIMARY KEY, parent int NOT NULL REFERENCES parent);";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    // Not a superuser: no replication origin, no session_replication_role, so the target's
    // foreign key is checked on every change, and changes must keep their order.
    target
        .batch_execute(
            "CREATE ROLE applier LOGIN PASSWORD 'pw';
             GRANT CREATE ON DATABASE app TO applier;
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO applier;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target_url = format!(
        "postgresql://applier:pw@127.0.0.1:{}/app?sslmode=disable",
        target_pg.port()
    );
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_url,
        &["public.*"],
        "",
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    for sql in [
        "BEGIN; INSERT INTO parent SELECT generate_series(1, 20); INSERT INTO child SELECT g, g FROM generate_series(1, 20) g; COMMIT;",
        "BEGIN; DELETE FROM child WHERE id > 10; DELETE FROM parent WHERE id > 10; INSERT INTO parent SELECT generate_series(100, 130); COMMIT;",
        "UPDATE child SET parent = 100 + id",
    ] {
        source.batch_execute(sql).await.unwrap();
    }
    wait_until_equal(&source, &target, &["parent", "child"], &mut relay).await;
    let recorded: i64 = target
        .query_one(
            "SELECT count(*) FROM walrelay.progress WHERE name = 'walrelay/postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
    let log = relay.stop().await;
    assert!(log.contains("triggers and foreign keys active"), "{log}");
    assert!(
        log.contains("walrelay.progress row walrelay/postgres"),
        "{log}"
    );
}

#[tokio::test]
async fn protected_target_tables_refuse_other_writers() {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let (_s, _t, source, target, dir, mut relay) =
        replicate(schema, &["public.t"], "protect = true").await;
    source
        .batch_execute("INSERT INTO t VALUES (1, 'replicated')")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    let e = target
        .batch_execute("INSERT INTO t VALUES (2, 'local')")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "25006");
    assert!(
        db.message().contains("is a replica kept by walrelay"),
        "{}",
        db.message()
    );
    assert!(db
        .hint()
        .unwrap_or("")
        .contains("DISABLE TRIGGER walrelay_protect"));
    assert!(
        target.batch_execute("TRUNCATE t").await.is_err(),
        "TRUNCATE refused too"
    );
    // walrelay itself passes.
    source
        .batch_execute("UPDATE t SET v = 'again'; INSERT INTO t VALUES (3, 'three')")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    relay.stop().await;

    // Protection off: the trigger goes at the next start.
    let cfg = dir.path().join("walrelay.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("protect = true", "protect = false");
    std::fs::write(&cfg, text).unwrap();
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    wait_for_count(
        &target,
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'walrelay_protect'",
        0,
        "the protection to be removed",
    )
    .await;
    target
        .batch_execute("INSERT INTO t VALUES (2, 'local')")
        .await
        .unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn status_shows_each_sink_position_and_lag() {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let (_s, _t, source, target, dir, mut relay) = replicate(schema, &["public.t"], "").await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    let cfg = dir.path().join("walrelay.toml");
    let status = || {
        let o = walrelay_with_config("status", &cfg);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let running = status();
    assert!(
        running.contains("slot     walrelay: streaming (pid"),
        "{running}"
    );
    let sink = running
        .lines()
        .find(|l| l.starts_with("sink     postgres (postgres"))
        .unwrap_or_else(|| panic!("{running}"));
    assert!(
        sink.contains("applied ") && sink.contains("(source commit 20") && sink.ends_with(", 0 s"),
        "{sink}"
    );

    relay.stop().await;
    source
        .batch_execute(
            "INSERT INTO t SELECT g, repeat('y', 1000) FROM generate_series(101, 3000) g",
        )
        .await
        .unwrap();
    let stopped = status();
    assert!(stopped.contains("not streaming"), "{stopped}");
    let sink = stopped
        .lines()
        .find(|l| l.starts_with("sink     postgres"))
        .unwrap();
    assert!(
        sink.contains(" MB, ") || sink.contains(" kB, "),
        "lag in bytes: {sink}"
    );
    assert!(
        !sink.ends_with(", 0 s"),
        "lag in seconds while stopped: {sink}"
    );
}

#[tokio::test]
async fn a_five_million_row_update_applies_while_streaming_in_bounded_memory() {
    let server = || {
        TestPg::builder()
            .setting("shared_buffers", "'512MB'")
            .setting("max_wal_size", "'4GB'")
            .start()
    };
    let (source_pg, target_pg) = (server(), server());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    // The same rows on both sides before replication starts.
    let schema = "CREATE TABLE accounts (id int PRIMARY KEY, balance int8 NOT NULL, note text);
                  INSERT INTO accounts SELECT g, g % 1000, 'account ' || g FROM generate_series(1, 5000000) g;";
    let (a, b) = tokio::join!(source.batch_execute(schema), target.batch_execute(schema));
    a.unwrap();
    b.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        &["public.accounts"],
        // The rows exist on both sides already.
        "\n[snapshot]\nenabled = false",
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;

    source
        .batch_execute("UPDATE accounts SET balance = balance + 1")
        .await
        .unwrap();
    source
        .batch_execute("UPDATE accounts SET note = 'last' WHERE id = 1")
        .await
        .unwrap();
    let t = &target;
    walrelay_testkit::wait_for(
        "the update to arrive",
        std::time::Duration::from_secs(900),
        || async move {
            let note: String = t
                .query_one("SELECT note FROM accounts WHERE id = 1", &[])
                .await
                .unwrap()
                .get(0);
            (note == "last").then_some(())
        },
    )
    .await;
    let peak_kb = relay.peak_rss_kb();
    println!(
        "peak RSS of the relay through a 5,000,000-row UPDATE: {} MB",
        peak_kb / 1024
    );
    assert_eq!(
        checksum(&source, "accounts").await,
        checksum(&target, "accounts").await
    );
    let log = relay.stop().await;
    assert!(
        log.contains("streamed transaction applied"),
        "applied as it streamed:\n{log}"
    );
    assert!(peak_kb < 256 * 1024, "peak RSS {peak_kb} kB is over 256 MB");
}

#[tokio::test]
async fn replica_identities_toast_and_truncate_cascade_apply_as_on_the_source() {
    let schema = "
        CREATE TABLE nokey (a int, b text);
        ALTER TABLE nokey REPLICA IDENTITY FULL;
        CREATE TABLE byindex (id int NOT NULL, code text NOT NULL, v text);
        CREATE UNIQUE INDEX byindex_code ON byindex (code);
        ALTER TABLE byindex REPLICA IDENTITY USING INDEX byindex_code;
        CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
        ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
        CREATE TABLE parent (id serial PRIMARY KEY);
        CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent);";
    let (_s, _t, source, target, _dir, mut relay) = replicate(schema, &["public.*"], "").await;
    for sql in [
        // FULL: duplicates and NULLs; each statement touches exactly one of two equal rows.
        "INSERT INTO nokey VALUES (1, 'x'), (1, 'x'), (2, NULL), (3, NULL)",
        "UPDATE nokey SET b = 'y' WHERE ctid = (SELECT min(ctid) FROM nokey WHERE a = 1)",
        "UPDATE nokey SET b = 'z' WHERE a = 2",
        "DELETE FROM nokey WHERE a = 3",
        // USING INDEX: rows found by code; a change of the code itself.
        "INSERT INTO byindex SELECT g, 'c' || g, 'v' FROM generate_series(1, 20) g",
        "UPDATE byindex SET v = 'w' WHERE id <= 10",
        "UPDATE byindex SET code = 'renamed' WHERE code = 'c1'",
        "DELETE FROM byindex WHERE code = 'c2'",
        // Unchanged TOAST: the body is not sent with the title's update, and stays.
        "INSERT INTO docs SELECT g, 'a', string_agg(md5(g::text || i::text), '') FROM generate_series(1, 10) g, generate_series(1, 200) i GROUP BY g",
        "UPDATE docs SET title = 'b'",
        // TRUNCATE ... RESTART IDENTITY CASCADE as sent.
        "INSERT INTO parent SELECT FROM generate_series(1, 5)",
        "INSERT INTO child SELECT g, g FROM generate_series(1, 5) g",
        "TRUNCATE parent RESTART IDENTITY CASCADE",
        "INSERT INTO parent DEFAULT VALUES",
    ] {
        source.batch_execute(sql).await.unwrap();
    }
    wait_until_equal(
        &source,
        &target,
        &["nokey", "byindex", "docs", "parent", "child"],
        &mut relay,
    )
    .await;
    let long: i64 = target
        .query_one(
            "SELECT count(*) FROM docs WHERE length(body) = 6400 AND title = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(long, 10, "TOASTed bodies kept through the title update");
    relay.stop().await;
}
