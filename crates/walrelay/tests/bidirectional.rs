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

    // A transaction large enough to be streamed: applied on B (whole: with two writers the
    // sink needs each transaction's commit time), and streamed from B to the relay back,
    // where walrelay's mark leaves it out from its first change.
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
    a_to_b.stop().await;
    b_to_a.stop().await;
}

/// Two nodes keeping commit timestamps, a relay each way with `on_conflict` as given
/// (`tables` on both; A's rows copied to B), both streaming.
struct TwoNodes {
    _servers: (TestPg, TestPg),
    a: tokio_postgres::Client,
    b: tokio_postgres::Client,
    configs: (std::path::PathBuf, std::path::PathBuf),
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl TwoNodes {
    async fn start(schema: &str, tables: &[&str], on_conflict: &str) -> (TwoNodes, Relay, Relay) {
        let node = || {
            TestPg::builder()
                .setting("track_commit_timestamp", "on")
                .start()
        };
        let (a_pg, b_pg) = (node(), node());
        let a = a_pg.create_db("app").await;
        a.batch_execute(schema).await.unwrap();
        let b = b_pg.create_db("app").await;
        let (dir_ab, dir_ba) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sink = |url: String, copy: bool| {
            format!(
                "[snapshot]\nenabled = {copy}\n\n[[sink]]\ntype = \"postgres\"\nurl = \"{url}\"\n{on_conflict}\n"
            )
        };
        let source = "origin = \"none\"\nstatus_interval = \"200ms\"";
        let ab = relay_config_file(
            dir_ab.path(),
            &a_pg.url("app"),
            tables,
            source,
            &sink(b_pg.url("app"), true),
        );
        let mut a_to_b = Relay::start(&ab);
        wait_until_streaming(&a, &mut a_to_b).await;
        let names: Vec<&str> = tables
            .iter()
            .map(|t| t.trim_start_matches("public."))
            .collect();
        wait_until_equal(&a, &b, &names, &mut a_to_b).await;
        let ba = relay_config_file(
            dir_ba.path(),
            &b_pg.url("app"),
            tables,
            source,
            &sink(a_pg.url("app"), false),
        );
        let mut b_to_a = Relay::start(&ba);
        wait_until_streaming(&b, &mut b_to_a).await;
        (
            TwoNodes {
                _servers: (a_pg, b_pg),
                a,
                b,
                configs: (ab, ba),
                _dirs: (dir_ab, dir_ba),
            },
            a_to_b,
            b_to_a,
        )
    }
}

async fn value(client: &tokio_postgres::Client, table: &str, id: i32) -> Option<String> {
    client
        .query_opt(&format!("SELECT v FROM {table} WHERE id = $1"), &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// The conflicts a node logged: (kind, the key's value in the local row, resolution),
/// and whether both versions are there.
async fn conflicts(client: &tokio_postgres::Client) -> Vec<(String, String, String, bool)> {
    client
        .query(
            "SELECT kind, coalesce(local_row->>'id', remote_row->>'id'), resolution,
                    local_row IS NOT NULL AND remote_row IS NOT NULL
                    AND local_commit_time IS NOT NULL AND remote_commit_time IS NOT NULL
             FROM walrelay.conflicts ORDER BY 2, 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Both nodes change the same rows while their relays are down; then the relays run.
/// `last_writer_wins`: each row ends as the later write made it, on both nodes, and each
/// node logs the conflicts it met with both versions. `keep_local` (table k): each node
/// keeps its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_resolve_by_the_later_commit_and_are_logged() {
    let (nodes, a_to_b, b_to_a) = TwoNodes::start(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE k (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'start' FROM generate_series(1, 10) g",
        &["public.t", "public.k"],
        "on_conflict = \"last_writer_wins\"\non_conflict_tables = { \"public.k\" = \"keep_local\" }",
    )
    .await;
    a_to_b.stop().await;
    b_to_a.stop().await;
    let (a, b) = (&nodes.a, &nodes.b);
    // In this order, each its own transaction and commit time.
    for (node, sql) in [
        (a, "UPDATE t SET v = 'a' WHERE id = 1"),
        (b, "UPDATE t SET v = 'b' WHERE id = 1"),
        (b, "UPDATE t SET v = 'b' WHERE id = 2"),
        (a, "UPDATE t SET v = 'a' WHERE id = 2"),
        (a, "INSERT INTO t VALUES (100, 'a')"),
        (b, "INSERT INTO t VALUES (100, 'b')"),
        (b, "INSERT INTO k VALUES (1, 'b')"),
        (a, "INSERT INTO k VALUES (1, 'a')"),
    ] {
        node.batch_execute(sql).await.unwrap();
    }
    let mut a_to_b = Relay::start(&nodes.configs.0);
    let mut b_to_a = Relay::start(&nodes.configs.1);
    wait_until_equal(a, b, &["t"], &mut a_to_b).await;
    wait_until_equal(a, b, &["t"], &mut b_to_a).await;
    for node in [a, b] {
        assert_eq!(value(node, "t", 1).await.as_deref(), Some("b"));
        assert_eq!(value(node, "t", 2).await.as_deref(), Some("a"));
        assert_eq!(value(node, "t", 100).await.as_deref(), Some("b"));
    }
    let c = |kind: &str, id: &str, resolution: &str| {
        (
            kind.to_string(),
            id.to_string(),
            resolution.to_string(),
            true,
        )
    };
    let logged = |client| async move {
        let mut last = Vec::new();
        for _ in 0..100 {
            last = conflicts(client).await;
            if last.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    };
    assert_eq!(
        logged(a).await,
        [
            c("insert_exists", "1", "keep_local"),
            c("insert_exists", "100", "apply_remote"),
            c("update_newer_local", "2", "keep_local"),
        ]
    );
    assert_eq!(
        logged(b).await,
        [
            c("insert_exists", "1", "keep_local"),
            c("update_newer_local", "1", "keep_local"),
            c("insert_exists", "100", "keep_local"),
        ]
    );
    assert_eq!(value(a, "k", 1).await.as_deref(), Some("a"), "keep_local");
    assert_eq!(value(b, "k", 1).await.as_deref(), Some("b"), "keep_local");
    let status = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&nodes.configs.1)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status.contains("3 resolved (walrelay.conflicts)"),
        "{status}"
    );
    a_to_b.stop().await;
    b_to_a.stop().await;
}

/// `on_conflict = "error"`: the relay stops, naming the table, the key, the target row's
/// commit and the change's position and commit; it logs nothing and applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_stops_the_relay_with_both_sides_when_asked() {
    let (nodes, a_to_b, b_to_a) = TwoNodes::start(
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        &["public.t"],
        "",
    )
    .await;
    b_to_a.stop().await;
    nodes
        .b
        .batch_execute("INSERT INTO t VALUES (7, 'b')")
        .await
        .unwrap();
    nodes
        .a
        .batch_execute("INSERT INTO t VALUES (7, 'a')")
        .await
        .unwrap();
    let mut a_to_b = a_to_b;
    let log = a_to_b.wait_for_failure().await;
    for part in [
        "conflict on public.t",
        "insert of (id)=(7)",
        "insert_exists",
        "the target's row was committed at",
        "source position",
        "the change was committed on the source at",
    ] {
        assert!(log.contains(part), "{part}: {log}");
    }
    assert_eq!(value(&nodes.b, "t", 7).await.as_deref(), Some("b"));
    assert!(conflicts(&nodes.b).await.is_empty());
}

/// `walrelay check` with two writable nodes: what `last_writer_wins` needs on the target
/// is a problem; keys both nodes would hand out are a note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_two_writable_nodes_need() {
    let (a_pg, b_pg) = (TestPg::start(), TestPg::start());
    let a = a_pg.create_db("app").await;
    a.batch_execute("CREATE TABLE s (id serial PRIMARY KEY, v text)")
        .await
        .unwrap();
    let _b = b_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config_file(
        dir.path(),
        &a_pg.url("app"),
        &["public.s"],
        "origin = \"none\"",
        &format!(
            "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\non_conflict = \"last_writer_wins\"\n",
            b_pg.url("app")
        ),
    );
    let o = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("PROBLEM  sink postgres: on_conflict = \"last_writer_wins\" needs on the target: track_commit_timestamp = on"),
        "{out}"
    );
    assert!(
        out.contains("NOTE     sequence s_id_seq steps by 1"),
        "{out}"
    );
    assert!(
        out.contains("NOTE     track_commit_timestamp is off on the source"),
        "{out}"
    );
}
