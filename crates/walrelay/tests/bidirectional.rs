//! Two writable nodes, a relay each way: with `source.origin = "none"` a relay leaves out
//! what the other relay applied on its source, so nothing comes back.

use std::time::Duration;

use walrelay_testkit::TestPg;

use crate::support::*;

/// A write on either node reaches the other once, and causes no write back: an insert
/// would come back as a conflict (the relay would stop), an update as a new xmin. So do
/// the rows of the first node's copy to the second, while the relay back already runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_each_way_does_not_loop() {
    // Small enough that the big transaction below is streamed, both ways.
    let node = || {
        TestPg::builder()
            .setting("logical_decoding_work_mem", "'64kB'")
            .start()
    };
    let NodePair {
        a_pg: _a_pg,
        b_pg: _b_pg,
        a,
        b,
        ab,
        ba,
        dirs: _dirs,
    } = NodePair::start(
        node,
        "INSERT INTO t VALUES (1, 'first');
         INSERT INTO t SELECT g, 'copied' FROM generate_series(100000, 104999) g",
        "origin = \"none\"\nstatus_interval = \"200ms\"",
    )
    .await;
    // The way back first, without a copy (B is empty): it is reading B when A's rows are
    // copied there, and leaves the copy out (walrelay marks it), so nothing goes back.
    let mut b_to_a = Relay::start(&ba);
    wait_until_streaming(&b, &mut b_to_a).await;
    let mut a_to_b = Relay::start(&ab);
    wait_until_streaming(&a, &mut a_to_b).await;
    wait_until_equal(&a, &b, &["t"], &mut a_to_b).await;
    let copied_on_a = xmin(&a, 100000).await;

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
    assert_eq!(
        xmin(&a, 100000).await,
        copied_on_a,
        "the copy came back to A"
    );
    let rows: i64 = a
        .query_one("SELECT count(*) FROM t WHERE id < 100000", &[])
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

    // A schema change replays on B once, and B's capture of the replay is not sent back
    // (there it would fail, the index exists, and be logged as skipped).
    a.batch_execute("CREATE INDEX t_by_v ON t (v)")
        .await
        .unwrap();
    wait_for_count(
        &b,
        "SELECT count(*) FROM pg_indexes WHERE indexname = 't_by_v'",
        1,
        "the index on B",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_to_b.stop().await;
    let back = b_to_a.stop().await;
    assert!(
        !back.contains("t_by_v"),
        "the schema change came back:\n{back}"
    );
}

/// Two nodes keeping commit timestamps, a relay each way with `on_conflict` as given
/// (`tables` on both; A's rows copied to B), both streaming.
struct TwoNodes {
    servers: (TestPg, TestPg),
    a: tokio_postgres::Client,
    b: tokio_postgres::Client,
    configs: (std::path::PathBuf, std::path::PathBuf),
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl TwoNodes {
    async fn start(schema: &str, tables: &[&str], on_conflict: &str) -> (TwoNodes, Relay, Relay) {
        Self::start_with(schema, tables, on_conflict, false).await
    }

    /// As `start`; with `key_ranges`, A is node 1 of 2 and B node 2 (`source.key_ranges`).
    async fn start_with(
        schema: &str,
        tables: &[&str],
        on_conflict: &str,
        key_ranges: bool,
    ) -> (TwoNodes, Relay, Relay) {
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
        let source = |node: u32| {
            let ranges = if key_ranges {
                format!("\nkey_ranges = {{ node = {node}, nodes = 2 }}")
            } else {
                String::new()
            };
            format!("origin = \"none\"\nstatus_interval = \"200ms\"{ranges}")
        };
        let ab = relay_config_file(
            dir_ab.path(),
            &a_pg.url("app"),
            tables,
            &source(1),
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
            &source(2),
            &sink(a_pg.url("app"), false),
        );
        let mut b_to_a = Relay::start(&ba);
        wait_until_streaming(&b, &mut b_to_a).await;
        (
            TwoNodes {
                servers: (a_pg, b_pg),
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
    let status = walrelay_with_config("status", &nodes.configs.1);
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
    let (code, out) = walrelay_check(&config);
    assert_eq!(code, Some(1), "{out}");
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

    // With source.key_ranges, the step is set at start: a note for the owner, a problem
    // for a role that does not own the sequence.
    a.batch_execute(
        "CREATE ROLE keeper LOGIN REPLICATION PASSWORD 'k33per-pass';
         GRANT SELECT ON s TO keeper; GRANT CREATE ON DATABASE app TO keeper",
    )
    .await
    .unwrap();
    let ranges = "origin = \"none\"\nkey_ranges = { node = 1, nodes = 2 }";
    let sink = format!(
        "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
        b_pg.url("app")
    );
    for (url, expected) in [
        (
            a_pg.url("app"),
            "NOTE     sequence s_id_seq steps by 1: at start source.key_ranges makes it step by 2 and hand out node 1's values",
        ),
        (
            format!(
                "postgresql://keeper:k33per-pass@127.0.0.1:{}/app",
                a_pg.port()
            ),
            "PROBLEM  sequence s_id_seq: source.key_ranges sets its step at start, which needs its owner",
        ),
    ] {
        let config = relay_config_file(dir.path(), &url, &["public.s"], ranges, &sink);
        let (_, out) = walrelay_check(&config);
        assert!(out.contains(expected), "{out}");
        assert!(!out.contains("k33per-pass"), "{out}");
    }
}

/// `source.key_ranges` is refused with a clear error when the relay's role does not own a
/// sequence it would change, before anything is copied or streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ranges_need_the_sequences_owner() {
    let (a_pg, b_pg) = (TestPg::start(), TestPg::start());
    let a = a_pg.create_db("app").await;
    a.batch_execute(
        "CREATE TABLE s (id serial PRIMARY KEY, v text);
         CREATE ROLE keeper LOGIN REPLICATION PASSWORD 'k33per-pass';
         GRANT SELECT ON s TO keeper; GRANT CREATE ON DATABASE app TO keeper;
         CREATE PUBLICATION walrelay FOR TABLE s",
    )
    .await
    .unwrap();
    let b = b_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgresql://keeper:k33per-pass@127.0.0.1:{}/app",
        a_pg.port()
    );
    let config = relay_config_file(
        dir.path(),
        &url,
        &["public.s"],
        "origin = \"none\"\nkey_ranges = { node = 1, nodes = 2 }",
        &format!(
            "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
            b_pg.url("app")
        ),
    );
    let o = walrelay_with_config("run", &config);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("s_id_seq needs its owner") && err.contains("source.key_ranges"),
        "{err}"
    );
    assert!(!err.contains("k33per-pass"), "{err}");
    let step: i64 = a
        .query_one(
            "SELECT increment_by FROM pg_sequences WHERE sequencename = 's_id_seq'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(step, 1, "the sequence is unchanged");
    let copied: Option<String> = b
        .query_one("SELECT to_regclass('public.s')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(copied, None, "nothing copied");
}

/// pgbench's script for one node: move money on its own accounts, and log the move under
/// a key its sequence hands out (odd on A, even on B: `source.key_ranges`).
fn two_way_script(node: &str, accounts: (i32, i32)) -> String {
    format!(
        "\\set aid random({}, {})\n\\set delta random(-5000, 5000)\nBEGIN;\n\
         UPDATE acct SET balance = balance + :delta WHERE id = :aid;\n\
         INSERT INTO hist (node, acct, delta) VALUES ('{node}', :aid, :delta);\n\
         END;\n",
        accounts.0, accounts.1
    )
}

/// pgbench with `script` on `pg`'s app database for `seconds`; it must succeed.
fn pgbench(pg: &TestPg, script: &std::path::Path, seconds: u32) -> std::process::Child {
    pg.server
        .command("pgbench")
        .args(["-n", "-c", "2", "-j", "1", "-T", &seconds.to_string(), "-f"])
        .arg(script)
        .arg("-h")
        .arg(pg.server.socket_dir())
        .args(["-p", &pg.port().to_string(), "app"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench starts")
}

/// Every account's balance is the sum of its logged moves: nothing applied twice or lost.
async fn assert_balanced(client: &tokio_postgres::Client, node: &str) {
    let off: i64 = client
        .query_one(
            "SELECT count(*) FROM acct a
             WHERE a.balance <> coalesce((SELECT sum(h.delta) FROM hist h WHERE h.acct = a.id), 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        off, 0,
        "accounts on {node} whose balance is not their moves"
    );
}

/// Both nodes take writes for 60 s (pgbench, each on its own accounts and keys), a relay
/// each way, and one relay or the other is killed with -9 now and then and started again.
/// Then, quiet: both nodes are equal, every move is on both once (each balance is its
/// moves), no conflict was met, and one more insert on A reaches B once and causes no
/// write back on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_way_load_with_kills_ends_equal_and_loop_free() {
    let (nodes, a_to_b, b_to_a) = TwoNodes::start_with(
        "CREATE TABLE acct (id int PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);
         CREATE TABLE hist (id bigserial PRIMARY KEY, node text NOT NULL, acct int NOT NULL, delta int NOT NULL);
         INSERT INTO acct (id) SELECT generate_series(1, 200);
         INSERT INTO hist (node, acct, delta) VALUES ('A', 1, 0)",
        &["public.acct", "public.hist"],
        "",
        true,
    )
    .await;
    let (a, b) = (&nodes.a, &nodes.b);
    // source.key_ranges: A's hist keys odd, B's even, from the next one on.
    for (client, node, next) in [(a, "A", 3), (b, "B", 4)] {
        let (step, value): (i64, i64) = client
            .query_one(
                "SELECT increment_by, nextval('hist_id_seq') FROM pg_sequences WHERE sequencename = 'hist_id_seq'",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert_eq!((step, value), (2, next), "hist's sequence on {node}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (script_a, script_b) = (dir.path().join("a.sql"), dir.path().join("b.sql"));
    std::fs::write(&script_a, two_way_script("A", (1, 100))).unwrap();
    std::fs::write(&script_b, two_way_script("B", (101, 200))).unwrap();
    let mut load_a = pgbench(&nodes.servers.0, &script_a, 60);
    let mut load_b = pgbench(&nodes.servers.1, &script_b, 60);

    let mut relays = [Some(a_to_b), Some(b_to_a)];
    let mut kills = 0;
    let mut rng = 0x9e37_79b9_u64;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(55) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(3000 + rng % 5000)).await;
        let which = (rng % 2) as usize;
        let relay = relays[which].take().unwrap();
        relay.kill9().await;
        kills += 1;
        let config = if which == 0 {
            &nodes.configs.0
        } else {
            &nodes.configs.1
        };
        relays[which] = Some(Relay::start(config));
    }
    for load in [&mut load_a, &mut load_b] {
        let status = load.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(load.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "pgbench: {err}");
    }
    let [Some(mut a_to_b), Some(mut b_to_a)] = relays else {
        unreachable!()
    };
    wait_until_equal(a, b, &["acct", "hist"], &mut a_to_b).await;
    wait_until_equal(a, b, &["acct", "hist"], &mut b_to_a).await;
    assert!(kills >= 5, "{kills} kills");
    for (client, node) in [(a, "A"), (b, "B")] {
        assert_balanced(client, node).await;
        let by_node: Vec<(String, i64)> = client
            .query(
                "SELECT node, count(*) FROM hist GROUP BY node ORDER BY node",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(
            by_node.len(),
            2,
            "moves of both nodes on {node}: {by_node:?}"
        );
        assert!(by_node.iter().all(|(_, n)| *n > 100), "{by_node:?}");
        assert!(conflicts(client).await.is_empty(), "no conflict on {node}");
        let off_range: i64 = client
            .query_one(
                "SELECT count(*) FROM hist WHERE (node = 'A') <> (id % 2 = 1)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(off_range, 0, "keys outside their node's range on {node}");
    }

    a.batch_execute("INSERT INTO hist VALUES (-1, 'A', 1, 0)")
        .await
        .unwrap();
    let on_a = hist_xmin(a).await;
    wait_until_equal(a, b, &["hist"], &mut a_to_b).await;
    let on_b = hist_xmin(b).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_to_b.assert_running();
    b_to_a.assert_running();
    assert_eq!(hist_xmin(a).await, on_a, "the insert came back to A");
    assert_eq!(
        hist_xmin(b).await,
        on_b,
        "the insert was applied on B again"
    );
    a_to_b.stop().await;
    b_to_a.stop().await;
}

async fn hist_xmin(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT xmin::text FROM hist WHERE id = -1", &[])
        .await
        .unwrap()
        .get(0)
}

/// Three writable nodes, a relay from each to each other (six), all writing at once, each
/// on its own keys (inserts, updates, deletes): all end equal, with no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_in_a_full_mesh_end_equal() {
    let servers: Vec<TestPg> = (0..3).map(|_| TestPg::start()).collect();
    let mut clients = Vec::new();
    for pg in &servers {
        clients.push(pg.create_db("app").await);
    }
    clients[0]
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, node int NOT NULL, v int NOT NULL);
             INSERT INTO t SELECT g, 0, 0 FROM generate_series(1, 300) g",
        )
        .await
        .unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut relays = Vec::new();
    // Node 0's rows are copied to 1 and 2 first; the other relays start without a copy.
    let pairs = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)];
    for (n, &(from, to)) in pairs.iter().enumerate() {
        let slot = format!("from_{from}_to_{to}");
        let config = relay_config_file(
            dirs[n].path(),
            &servers[from].url("app"),
            &["public.t"],
            &format!("origin = \"none\"\nslot = \"{slot}\"\nstatus_interval = \"200ms\""),
            &format!(
                "[snapshot]\nenabled = {}\n\n[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
                from == 0,
                servers[to].url("app")
            ),
        );
        let mut relay = Relay::start(&config);
        wait_until_slot_streams(&clients[from], &slot, &mut relay).await;
        if from == 0 {
            wait_until_equal(&clients[0], &clients[to], &["t"], &mut relay).await;
        }
        relays.push(relay);
    }
    // Each node: inserts of its own keys, updates and deletes of its share of the rows.
    let writes = clients.iter().enumerate().map(|(node, c)| async move {
        let node = node as i32;
        for round in 0..40 {
            c.execute(
                "INSERT INTO t SELECT 1000 * ($1 + 1) + $2 * 10 + g, $1, $2 FROM generate_series(0, 9) g",
                &[&node, &round],
            )
            .await
            .unwrap();
            c.execute(
                "UPDATE t SET v = v + 1, node = $1 WHERE id % 3 = $1 AND id <= 300",
                &[&node],
            )
            .await
            .unwrap();
            c.execute(
                "DELETE FROM t WHERE id = 1000 * ($1 + 1) + $2 * 10",
                &[&node, &round],
            )
            .await
            .unwrap();
        }
    });
    futures_util::future::join_all(writes).await;
    for (n, &(from, to)) in pairs.iter().enumerate() {
        wait_until_equal(&clients[from], &clients[to], &["t"], &mut relays[n]).await;
    }
    let rows: i64 = clients[2]
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 300 + 3 * 40 * 9);
    for relay in relays {
        relay.stop().await;
    }
}
