//! The initial copy: existing rows reach a target that has nothing, not even the tables,
//! and the stream takes over with no gap and no overlap — also when the copy is killed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use walrelay_testkit::TestPg;

use crate::support::*;

const TABLES: &[&str] = &[
    "big",
    "small",
    "\"Sales\".orders",
    "\"Sales\".lines",
    "events",
];

/// Source data: a table big enough to be split into page ranges, and the schema test's
/// tables (types, identity and generated columns, partitions).
async fn fill_source(source: &tokio_postgres::Client) {
    source
        .batch_execute(&format!(
            "{}
             CREATE TABLE big (id int PRIMARY KEY, n int8 NOT NULL, pad text);
             INSERT INTO big SELECT g, 0, repeat(md5(g::text), 7) FROM generate_series(1, 400000) g;
             CREATE TABLE small (id int PRIMARY KEY, v text);
             INSERT INTO small SELECT g, 'v' || g FROM generate_series(1, 100) g;
             INSERT INTO events SELECT g, date '2026-01-01' + (g % 700) FROM generate_series(1, 2000) g;",
            crate::schema::SOURCE_SCHEMA
        ))
        .await
        .unwrap();
}

/// Writes to every table until `stop`.
async fn start_writes(pg: &TestPg, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let c = pg.client("app").await;
    walrelay::task::spawn_named("test-writes", async move {
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let id = (i * 7919) % 400000 + 1;
            c.batch_execute(&format!(
                "BEGIN;
                 UPDATE big SET n = n + 1 WHERE id = {id};
                 INSERT INTO small VALUES ({}, 'new') ON CONFLICT (id) DO UPDATE SET v = 'again';
                 INSERT INTO \"Sales\".orders (qty, price) VALUES ({}, 1);
                 UPDATE \"Sales\".orders SET price = price + 1 WHERE id = (SELECT max(id) FROM \"Sales\".orders);
                 INSERT INTO events VALUES ({}, date '2026-06-01');
                 COMMIT;",
                1000 + i,
                i % 50 + 1,
                10_000 + i
            ))
            .await
            .unwrap();
            if i % 500 == 0 {
                c.batch_execute(&format!("DELETE FROM small WHERE id < {}", i / 10))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        i as u64
    })
}

async fn setup() -> (
    TestPg,
    TestPg,
    tokio_postgres::Client,
    tokio_postgres::Client,
    tempfile::TempDir,
) {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    fill_source(&source).await;
    let dir = tempfile::tempdir().unwrap();
    postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        &["public.big", "public.small", "\"Sales\".*", "public.events"],
        "\n[snapshot]\nparallel = 2\nrange_bytes = 8388608",
    );
    (source_pg, target_pg, source, target, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_and_the_stream_meet_with_no_gap_and_no_overlap() {
    let (source_pg, _t, source, target, dir) = setup().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = start_writes(&source_pg, stop.clone()).await;
    let mut relay = Relay::start(&dir.path().join("walrelay.toml"));
    // Writes go on through the copy and after it.
    wait_for_count(
        &target,
        "SELECT count(*) FROM walrelay.copies WHERE state = 'done'",
        TABLES.len() as i64,
        "every table copied",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let transactions = writes.await.unwrap();
    wait_until_equal(&source, &target, TABLES, &mut relay).await;
    let log = relay.stop().await;
    assert!(
        transactions > 10,
        "writes ran during the copy ({transactions})"
    );
    assert!(log.contains("copying existing rows"), "{log}");
    // About 110 MB in ranges of 8 MiB: the big table alone makes a dozen or more.
    let ranges: usize = log
        .split("copying existing rows")
        .nth(1)
        .and_then(|l| l.split("ranges=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no range count in the log: {log}"));
    assert!(ranges > 10, "the big table went in page ranges: {log}");
    // The target tables were created by walrelay, keys and all.
    let pk: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'big_pkey'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pk, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_midway_is_finished_by_the_next_run() {
    let (source_pg, _t, source, target, dir) = setup().await;
    let cfg = dir.path().join("walrelay.toml");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("parallel = 2", "parallel = 1"),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = start_writes(&source_pg, stop.clone()).await;
    let relay = Relay::start(&cfg);
    // Kill as soon as the big table's copy has begun.
    wait_for_count(
        &target,
        "SELECT count(*) FROM walrelay.copies WHERE table_name = 'big' AND state = 'copying'",
        1,
        "the big table's copy to begin",
    )
    .await;
    relay.kill9().await;
    let unfinished: i64 = target
        .query_one(
            "SELECT count(*) FROM walrelay.copies WHERE state = 'copying'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(unfinished > 0, "killed during the copy");
    // Writes continue while nothing runs, and during the second copy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut relay = Relay::start(&cfg);
    wait_for_count(
        &target,
        "SELECT count(*) FROM walrelay.copies WHERE state = 'done'",
        TABLES.len() as i64,
        "every table copied",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();
    wait_until_equal(&source, &target, TABLES, &mut relay).await;
    let log = relay.stop().await;
    assert!(
        log.contains("copying again a table whose copy did not finish"),
        "{log}"
    );
}
