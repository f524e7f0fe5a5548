//! Two writable nodes, a relay each way: with `source.origin = "none"` a relay leaves out
//! what the other relay applied on its source, so nothing comes back.

use std::time::Duration;

use walrelay_testkit::TestPg;

use crate::support::*;

/// A row's xmin: it changes when anything writes the row again.
async fn xmin(client: &tokio_postgres::Client, id: i32) -> String {
    client
        .query_one("SELECT xmin::text FROM t WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// A write on either node reaches the other once, and causes no write back: an insert
/// would come back as a conflict (the relay would stop), an update as a new xmin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_each_way_does_not_loop() {
    // Small enough that the big transaction below is streamed, both ways.
    let node = || {
        TestPg::builder()
            .setting("logical_decoding_work_mem", "'64kB'")
            .start()
    };
    let (a_pg, b_pg) = (node(), node());
    let a = a_pg.create_db("app").await;
    a.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'first')",
    )
    .await
    .unwrap();
    let b = b_pg.create_db("app").await;
    let (dir_ab, dir_ba) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = |url: String, copy: bool| {
        format!("[snapshot]\nenabled = {copy}\n\n[[sink]]\ntype = \"postgres\"\nurl = \"{url}\"\n")
    };
    let origin = "origin = \"none\"\nstatus_interval = \"200ms\"";
    let ab = relay_config_file(
        dir_ab.path(),
        &a_pg.url("app"),
        &["public.t"],
        origin,
        &sink(b_pg.url("app"), true),
    );
    let mut a_to_b = Relay::start(&ab);
    wait_until_streaming(&a, &mut a_to_b).await;
    wait_until_equal(&a, &b, &["t"], &mut a_to_b).await;
    // B has A's rows: the way back starts from now, without a copy.
    let ba = relay_config_file(
        dir_ba.path(),
        &b_pg.url("app"),
        &["public.t"],
        origin,
        &sink(a_pg.url("app"), false),
    );
    let mut b_to_a = Relay::start(&ba);
    wait_until_streaming(&b, &mut b_to_a).await;

    a.batch_execute(
        "INSERT INTO t VALUES (2, 'from a'); UPDATE t SET v = 'changed on a' WHERE id = 1",
    )
    .await
    .unwrap();
    b.batch_execute("INSERT INTO t VALUES (3, 'from b')")
        .await
        .unwrap();
    wait_until_equal(&a, &b, &["t"], &mut a_to_b).await;
    wait_until_equal(&a, &b, &["t"], &mut b_to_a).await;
    let (a1, b3) = (xmin(&a, 1).await, xmin(&b, 3).await);
    let (on_b, on_a) = (xmin(&b, 1).await, xmin(&a, 3).await);
    // Long enough for a change to make the round trip many times (status every 200 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_to_b.assert_running();
    b_to_a.assert_running();
    assert_eq!(xmin(&a, 1).await, a1, "A's update came back to A");
    assert_eq!(xmin(&b, 3).await, b3, "B's insert came back to B");
    assert_eq!(
        xmin(&b, 1).await,
        on_b,
        "A's update was applied on B more than once"
    );
    assert_eq!(
        xmin(&a, 3).await,
        on_a,
        "B's insert was applied on A more than once"
    );
    let rows: i64 = a
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 3);

    // A transaction large enough to be streamed: applied on B while it streams, where it
    // is streamed to the relay back too, which PostgreSQL 15 tells its origin only at the
    // commit. walrelay's mark leaves it out from its first change.
    a.batch_execute("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(10, 5009) g")
        .await
        .unwrap();
    wait_until_equal(&a, &b, &["t"], &mut a_to_b).await;
    let a10 = xmin(&a, 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_to_b.assert_running();
    b_to_a.assert_running();
    assert_eq!(
        xmin(&a, 10).await,
        a10,
        "the streamed insert came back to A"
    );
    let log = a_to_b.stop().await;
    assert!(
        log.contains("streamed transaction applied"),
        "B applied it as it streamed:\n{log}"
    );
    b_to_a.stop().await;
}
