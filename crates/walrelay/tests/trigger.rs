//! Trigger capture (issue 12, in progress): the log on a source without logical decoding,
//! installed by the tables' owner, written by another role, cut into batches by ticks, and
//! removed without a trace.

use std::time::Duration;

use walrelay::pg::conninfo::{resolve, ProcessEnv};
use walrelay::pg::sql;
use walrelay::source::pgoutput::setup::select_tables;
use walrelay::source::trigger::{batch, install};
use walrelay_model::{Change, OldRow, Row, Value};
use walrelay_testkit::TestPg;

use crate::support::{relay_config_file, wait_for_line, wait_until_equal, Relay, BIN};

const ODD_SCHEMA: &str = "Odd Schema";
const ODD_TABLE: &str = "a\"; drop table x; --";

async fn connect(url: &str) -> tokio_postgres::Client {
    sql::connect(&resolve(url, &ProcessEnv).unwrap())
        .await
        .unwrap()
}

fn text(v: &str) -> Value {
    Value::Text(v.into())
}

/// What a batch holds, as (table, operation, new row, old row) for easy comparison.
fn summary(changes: &[Change]) -> Vec<(String, &'static str, Vec<Value>, Vec<Value>)> {
    changes
        .iter()
        .map(|c| match c {
            Change::Insert { relation, new } => {
                (relation.name.clone(), "insert", new.0.clone(), vec![])
            }
            Change::Update { relation, old, new } => (
                relation.name.clone(),
                "update",
                new.0.clone(),
                old.as_ref().map(|o| o.row().0.clone()).unwrap_or_default(),
            ),
            Change::Delete { relation, old } => {
                (relation.name.clone(), "delete", vec![], old.row().0.clone())
            }
            Change::Truncate { relations, .. } => {
                (relations[0].name.clone(), "truncate", vec![], vec![])
            }
            other => panic!("unexpected change {other:?}"),
        })
        .collect()
}

/// A source without logical decoding: `wal_level = replica`, the tables owned by a role
/// that is not a superuser (and may create schemas), written by another role.
pub struct Source {
    pub pg: TestPg,
    pub admin: tokio_postgres::Client,
    pub clerk: tokio_postgres::Client,
}

/// The tables of `Source` (created there by their owner), also for a replica to fill.
pub const TABLES_DDL: &str =
    "CREATE TABLE orders (id int PRIMARY KEY, code text, amount numeric(10,2),
                                  day date, at timestamptz, tags text[], doc jsonb);
                              CREATE TABLE nokey (a int, b text);
                              CREATE TABLE counter (id int PRIMARY KEY, n int8 NOT NULL);
                              CREATE TABLE load (id int PRIMARY KEY, v text);";

impl Source {
    pub async fn start() -> Source {
        let pg = TestPg::builder().setting("wal_level", "replica").start();
        let admin = pg.create_db("app").await;
        let wal_level: String = admin.query_one("SHOW wal_level", &[]).await.unwrap().get(0);
        assert_eq!(wal_level, "replica");
        admin
            .batch_execute(&format!(
                "CREATE ROLE owner_role LOGIN PASSWORD 'Own3r pass';
                 CREATE ROLE clerk LOGIN PASSWORD 'cl3rk';
                 GRANT CREATE ON DATABASE app TO owner_role;
                 GRANT CREATE ON SCHEMA public TO owner_role;
                 SET ROLE owner_role;
                 {TABLES_DDL}
                 CREATE SCHEMA {schema};
                 CREATE TABLE {odd} (\"Id\" int PRIMARY KEY, \"v al\" text);
                 GRANT USAGE ON SCHEMA {schema} TO clerk;
                 GRANT INSERT, UPDATE, DELETE, SELECT, TRUNCATE
                    ON orders, nokey, counter, load, {odd} TO clerk;
                 RESET ROLE;",
                schema = walrelay::pg::quote::ident(ODD_SCHEMA),
                odd = odd_table(),
            ))
            .await
            .unwrap();
        let clerk = connect(&format!(
            "postgresql://clerk:cl3rk@127.0.0.1:{}/app",
            pg.port()
        ))
        .await;
        Source { pg, admin, clerk }
    }

    pub fn owner_url(&self) -> String {
        format!(
            "postgresql://owner_role:Own3r%20pass@127.0.0.1:{}/app",
            self.pg.port()
        )
    }
}

pub fn odd_table() -> String {
    walrelay::pg::quote::qualified(ODD_SCHEMA, ODD_TABLE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_without_logical_decoding_logs_committed_changes_in_batches() {
    let source = Source::start().await;
    let (admin, clerk) = (&source.admin, &source.clerk);
    let mut owner = connect(&source.owner_url()).await;
    let patterns = [
        walrelay::config::TablePattern::parse("public.orders").unwrap(),
        walrelay::config::TablePattern::parse("public.nokey").unwrap(),
        walrelay::config::TablePattern::parse(&format!(
            "{}.{}",
            walrelay::pg::quote::ident(ODD_SCHEMA),
            walrelay::pg::quote::ident(ODD_TABLE)
        ))
        .unwrap(),
    ];
    let tables = select_tables(&owner, &patterns).await.unwrap();
    assert_eq!(tables.len(), 3);
    let captured = install::install(&mut owner, &tables).await.unwrap();
    // Installing again changes nothing and keeps the numbers.
    assert_eq!(
        install::install(&mut owner, &tables).await.unwrap(),
        captured
    );
    let relations = batch::relations(&owner, &captured).await.unwrap();

    // The writer's own output settings do not change what the log says.
    clerk
        .batch_execute("SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let first = batch::tick(&owner, "test", None).await.unwrap();
    clerk
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO orders VALUES
               (1, 'a', 1.5, '2026-11-24', '2026-11-24 10:00:00+00', '{{x,\"y z\"}}', '{{\"k\": [1, 2]}}'),
               (2, 'b, \"quoted\" (x)', NULL, NULL, NULL, NULL, NULL);
             INSERT INTO {schema}.{table} VALUES (1, 'odd');
             COMMIT;
             BEGIN; INSERT INTO orders VALUES (3, 'rolled back'); ROLLBACK;
             BEGIN;
             UPDATE orders SET id = 10 WHERE id = 1;
             UPDATE orders SET code = 'c' WHERE id = 2;
             INSERT INTO nokey VALUES (1, 'one'), (1, 'one'), (2, NULL);
             UPDATE nokey SET b = 'two' WHERE a = 2;
             DELETE FROM orders WHERE id = 10;
             COMMIT;",
            schema = walrelay::pg::quote::ident(ODD_SCHEMA),
            table = walrelay::pg::quote::ident(ODD_TABLE),
        ))
        .await
        .unwrap();
    // A transaction still open at the second tick belongs to the batch after it.
    clerk
        .batch_execute("BEGIN; DELETE FROM nokey WHERE b IS NOT DISTINCT FROM 'two'")
        .await
        .unwrap();
    let second = batch::tick(&owner, "test", None).await.unwrap();
    clerk.batch_execute("COMMIT").await.unwrap();
    clerk.batch_execute("TRUNCATE nokey").await.unwrap();
    let third = batch::tick(&owner, "test", None).await.unwrap();
    assert!(first.lsn < second.lsn && second.lsn < third.lsn);

    let changes = batch::read(&owner, first.id, second.id, &relations)
        .await
        .unwrap();
    let n = Value::Null;
    assert_eq!(
        summary(&changes),
        vec![
            (
                "orders".to_string(),
                "insert",
                vec![
                    text("1"),
                    text("a"),
                    text("1.50"),
                    text("2026-11-24"),
                    text("2026-11-24 10:00:00+00"),
                    text("{x,\"y z\"}"),
                    text("{\"k\": [1, 2]}")
                ],
                vec![]
            ),
            (
                "orders".to_string(),
                "insert",
                vec![
                    text("2"),
                    text("b, \"quoted\" (x)"),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone()
                ],
                vec![]
            ),
            (
                ODD_TABLE.to_string(),
                "insert",
                vec![text("1"), text("odd")],
                vec![]
            ),
            (
                "orders".to_string(),
                "update",
                vec![
                    text("10"),
                    text("a"),
                    text("1.50"),
                    text("2026-11-24"),
                    text("2026-11-24 10:00:00+00"),
                    text("{x,\"y z\"}"),
                    text("{\"k\": [1, 2]}")
                ],
                vec![text("1")]
            ),
            (
                "orders".to_string(),
                "update",
                vec![
                    text("2"),
                    text("c"),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone(),
                    n.clone()
                ],
                vec![]
            ),
            (
                "nokey".to_string(),
                "insert",
                vec![text("1"), text("one")],
                vec![]
            ),
            (
                "nokey".to_string(),
                "insert",
                vec![text("1"), text("one")],
                vec![]
            ),
            (
                "nokey".to_string(),
                "insert",
                vec![text("2"), n.clone()],
                vec![]
            ),
            (
                "nokey".to_string(),
                "update",
                vec![text("2"), text("two")],
                vec![text("2"), n.clone()]
            ),
            ("orders".to_string(), "delete", vec![], vec![text("10")]),
        ]
    );
    assert!(changes.iter().all(|c| match c {
        Change::Update {
            relation,
            old: Some(old),
            ..
        } => matches!(old, OldRow::Full(_)) == (relation.name == "nokey"),
        _ => true,
    }));

    let later = batch::read(&owner, second.id, third.id, &relations)
        .await
        .unwrap();
    assert_eq!(
        summary(&later),
        vec![
            (
                "nokey".to_string(),
                "delete",
                vec![],
                vec![text("2"), text("two")]
            ),
            ("nokey".to_string(), "truncate", vec![], vec![]),
        ]
    );
    assert!(matches!(
        &later[0],
        Change::Delete {
            old: OldRow::Full(Row(_)),
            ..
        }
    ));

    // Uninstalled: no trigger, function, table or schema of the capture is left.
    assert_eq!(
        install::uninstall(&mut owner).await.unwrap(),
        install::Removed::Tables(3)
    );
    let left = capture_objects(admin).await;
    assert_eq!(left, 0, "objects of the capture left after uninstall");
    // The tables and their rows are untouched, and writes go on without the triggers.
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    clerk
        .batch_execute("INSERT INTO orders VALUES (4, 'after')")
        .await
        .unwrap();
    // A second uninstall has nothing to do.
    assert_eq!(
        install::uninstall(&mut owner).await.unwrap(),
        install::Removed::Nothing
    );
}

/// `capture = "trigger"` end to end: the existing rows are copied, then every kind of
/// change reaches a `postgres` target; a load of counted transactions runs while the relay
/// is killed with -9 ten times and started again (once after a pause under writes): the
/// target ends equal, nothing lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_capture_replicates_to_postgres_through_kills() {
    let source = Source::start().await;
    let (admin, clerk) = (&source.admin, &source.clerk);
    clerk
        .batch_execute(&format!(
            "INSERT INTO orders SELECT g, 'copied ' || g, g / 10.0, '2026-01-01'::date + g,
                    '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 hour',
                    ARRAY['a', 'b c'], jsonb_build_object('n', g)
               FROM generate_series(1, 500) g;
             INSERT INTO {odd} VALUES (1, 'copied');
             INSERT INTO nokey VALUES (1, 'copied'), (1, 'copied');
             INSERT INTO counter VALUES (1, 0);",
            odd = odd_table()
        ))
        .await
        .unwrap();
    let target_pg = TestPg::start();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let tables = [
        "public.orders",
        "public.nokey",
        "public.counter",
        "public.load",
        "\"Odd Schema\".\"a\"\"; drop table x; --\"",
    ];
    let config = relay_config_file(
        dir.path(),
        &source.owner_url(),
        &tables,
        "capture = \"trigger\"\nstatus_interval = \"200ms\"\nlog_rotation = \"1s\"",
        &format!(
            "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
            target_pg.url("app")
        ),
    );
    let all = ["orders", "nokey", "counter", "load", &odd_table()];
    let mut relay = Relay::start(&config);
    wait_until_created(&target, &all, &mut relay).await;
    wait_until_equal(admin, &target, &all, &mut relay).await;

    clerk
        .batch_execute(&format!(
            "BEGIN;
             UPDATE orders SET id = id + 1000 WHERE id <= 10;
             UPDATE orders SET code = 'it''s \"quoted\", (x)', tags = NULL WHERE id BETWEEN 11 AND 20;
             DELETE FROM orders WHERE id BETWEEN 21 AND 30;
             INSERT INTO {odd} VALUES (2, NULL), (3, '');
             UPDATE nokey SET b = 'changed' WHERE a = 1;
             COMMIT;
             TRUNCATE nokey;
             INSERT INTO nokey VALUES (2, 'after truncate');",
            odd = odd_table()
        ))
        .await
        .unwrap();
    wait_until_equal(admin, &target, &all, &mut relay).await;

    // The counted load: each transaction inserts a row and bumps the counter.
    let load_url = format!(
        "postgresql://clerk:cl3rk@127.0.0.1:{}/app",
        source.pg.port()
    );
    let load = walrelay::task::spawn_named("counted-load", async move {
        let client = connect(&load_url).await;
        for i in 1..=1500 {
            client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO load VALUES ({i}, 'row {i}');
                     UPDATE counter SET n = n + 1 WHERE id = 1;
                     UPDATE orders SET amount = amount + 1 WHERE id = {};
                     COMMIT;",
                    100 + i % 50
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
    });
    let mut rng = 0x2545_f491_u64;
    for kill in 0..10 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(300 + rng % 1200)).await;
        relay.kill9().await;
        if kill == 5 {
            // Stopped for a while under writes: the log keeps everything.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        relay = Relay::start(&config);
    }
    load.await.unwrap();
    wait_until_equal(admin, &target, &all, &mut relay).await;
    let (rows, n): (i64, i64) = target
        .query_one(
            "SELECT (SELECT count(*) FROM load), (SELECT n FROM counter WHERE id = 1)",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((rows, n), (1500, 1500), "every counted transaction once");
    // The load logged 4,500 rows; rotation emptied the log tables behind the relay.
    let logged: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM walrelay_capture.log_1) + (SELECT count(*) FROM walrelay_capture.log_2)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(logged < 1500, "{logged} rows still in the log");

    // Not while a relay captures; then every object of the capture goes, and nothing else.
    let uninstall = || {
        std::process::Command::new(BIN)
            .args(["uninstall", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let refused = uninstall();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("stop it before uninstalling"), "{err}");
    relay.stop().await;
    let removed = uninstall();
    let out = String::from_utf8_lossy(&removed.stdout);
    assert!(
        removed.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(out.contains("the triggers of 5 table(s)"), "{out}");
    assert!(!out.contains("Own3r"), "{out}");
    assert_eq!(
        capture_objects(admin).await,
        0,
        "objects of the capture left"
    );
    let orders: i64 = admin
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, 490, "the tables keep their rows");
}

/// Wait until the copy has created every table on the target.
async fn wait_until_created(target: &tokio_postgres::Client, tables: &[&str], relay: &mut Relay) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        relay.assert_running();
        let mut all = true;
        for t in tables {
            let found: bool = target
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[t])
                .await
                .unwrap()
                .get(0);
            all &= found;
        }
        if all {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tables never created on the target: {}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Objects of the capture in the database: triggers, functions, tables, the schema, and
/// anything depending on the functions.
async fn capture_objects(admin: &tokio_postgres::Client) -> i64 {
    admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'walrelay%')
                  + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'capture%')
                  + (SELECT count(*) FROM pg_class WHERE relname LIKE 'log\\_%' OR relname IN ('ticks', 'consumers', 'current_log'))
                  + (SELECT count(*) FROM pg_namespace WHERE nspname = 'walrelay_capture')
                  + (SELECT count(*) FROM pg_depend d JOIN pg_proc p ON d.refobjid = p.oid
                      WHERE d.refclassid = 'pg_proc'::regclass AND p.proname LIKE 'capture%')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// `walrelay check` with `capture = "trigger"`: the owner of the tables is ready without
/// superuser or REPLICATION on a `wal_level = replica` server; a role that may neither
/// create the schema nor the triggers is told what to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_trigger_capture_needs() {
    let source = Source::start().await;
    let dir = tempfile::tempdir().unwrap();
    let run_check = |url: &str| {
        let config = relay_config_file(
            dir.path(),
            url,
            &["public.orders", "public.nokey"],
            "capture = \"trigger\"",
            "[[sink]]\ntype = \"jsonl\"\npath = \"-\"\n",
        );
        let o = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (code, out) = run_check(&source.owner_url());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "wal_level = replica: trigger capture needs neither logical decoding nor REPLICATION"
        ),
        "{out}"
    );
    assert!(
        out.contains("2 table(s) selected; this role may create their triggers"),
        "{out}"
    );
    assert!(
        out.contains("NOTE     table public.nokey has no primary key"),
        "{out}"
    );

    let (code, out) = run_check(&format!(
        "postgresql://clerk:cl3rk@127.0.0.1:{}/app",
        source.pg.port()
    ));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("PROBLEM  role clerk may not create the schema walrelay_capture: GRANT CREATE ON DATABASE \"app\" TO \"clerk\""), "{out}");
    assert!(out.contains("PROBLEM  table public.orders: creating its triggers needs its owner or the TRIGGER privilege: GRANT TRIGGER ON \"public\".\"orders\" TO \"clerk\""), "{out}");
    assert!(!out.contains("cl3rk"), "{out}");
}

/// Every type of the matrix, written by a session with other output settings (day-first
/// dates, Tokyo time, SQL-standard intervals, short floats, escaped bytea), comes out of
/// the log exactly as the server prints it in walrelay's settings, and the `postgres`
/// target ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_comes_out_of_the_log_exactly() {
    let source = Source::start().await;
    let (admin, clerk) = (&source.admin, &source.clerk);
    admin
        .batch_execute(&format!(
            "SET ROLE owner_role; {}; GRANT INSERT, SELECT ON v TO clerk; RESET ROLE",
            crate::values::type_schema()
        ))
        .await
        .unwrap();
    let target_pg = TestPg::start();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.jsonl");
    let config = relay_config_file(
        dir.path(),
        &source.owner_url(),
        &["public.v"],
        "capture = \"trigger\"\nstatus_interval = \"200ms\"",
        &format!(
            "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
            target_pg.url("app"),
            out.display()
        ),
    );
    let mut relay = Relay::start(&config);
    wait_until_created(&target, &["v"], &mut relay).await;
    clerk
        .batch_execute(
            "SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo';
             SET IntervalStyle = 'sql_standard'; SET extra_float_digits = 0;
             SET bytea_output = 'escape'",
        )
        .await
        .unwrap();
    clerk.batch_execute(crate::values::TYPE_ROWS).await.unwrap();
    let lines = wait_for_line(&mut relay, &out, "the three inserts", |l| {
        l["kind"] == "insert" && l["new"]["id"] == 3
    })
    .await;
    let inserts: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "insert").collect();
    crate::values::assert_as_the_server_prints(admin, &inserts).await;
    assert_eq!(inserts[0]["new"]["tstz"], "2026-11-21 10:34:56.789012+00");
    assert_eq!(inserts[0]["new"]["b"], "\\x00ff10");
    assert_eq!(inserts[0]["types"]["m"], "public.mood");
    wait_until_equal(admin, &target, &["v"], &mut relay).await;
    relay.stop().await;
}
