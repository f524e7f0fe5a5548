//! Trigger capture (issue 12, in progress): the log on a source without logical decoding,
//! installed by the tables' owner, written by another role, cut into batches by ticks, and
//! removed without a trace.

use std::time::Duration;

use walrelay::pg::conninfo::{resolve, ProcessEnv};
use walrelay::pg::sql;
use walrelay::source::pgoutput::setup::{select_tables, Published};
use walrelay::source::trigger::{batch, install};
use walrelay_model::{Change, OldRow, Row, Value};
use walrelay_testkit::TestPg;

use crate::support::{
    relay_config_file, wait_for_line, wait_until_equal, wait_until_shaped, walrelay_check,
    walrelay_with_config, xmin, Relay,
};

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

/// A relay config capturing `tables` of `source` by triggers (`extra`: more `[source]`
/// settings), applying to the `app` database of `target`.
pub fn trigger_config(
    dir: &std::path::Path,
    source: &Source,
    tables: &[&str],
    extra: &str,
    target: &TestPg,
) -> std::path::PathBuf {
    relay_config_file(
        dir,
        &source.owner_url(),
        tables,
        &format!("capture = \"trigger\"\n{extra}"),
        &format!(
            "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
            target.url("app")
        ),
    )
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
    let published: Vec<Published> = tables
        .iter()
        .map(|table| Published {
            table,
            filter: None,
        })
        .collect();
    let captured = install::install(&mut owner, &published, "test")
        .await
        .unwrap();
    // Installing again changes nothing and keeps the numbers.
    assert_eq!(
        install::install(&mut owner, &published, "test")
            .await
            .unwrap(),
        captured
    );
    let relids: Vec<u32> = captured.iter().map(|c| c.oid).collect();
    let relations = batch::relations(&owner, &relids).await.unwrap();

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

    let changes = batch::read(&owner, first.id, second.id, &relations, false)
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

    let later = batch::read(&owner, second.id, third.id, &relations, false)
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
    admin
        .batch_execute("SET ROLE owner_role; CREATE SCHEMA later; GRANT USAGE ON SCHEMA later TO clerk; RESET ROLE")
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
        // Empty until a table is created there between two runs.
        "later.*",
    ];
    let config = trigger_config(
        dir.path(),
        &source,
        &tables,
        "status_interval = \"200ms\"\nlog_rotation = \"1s\"",
        &target_pg,
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

    // A table that appears between two runs gets its triggers at the next start and is
    // copied on its own; its sequence, used on the source, is carried to the target.
    relay.stop().await;
    admin
        .batch_execute(
            "SET ROLE owner_role;
             CREATE TABLE later.items (id serial PRIMARY KEY, v text);
             INSERT INTO later.items (v) SELECT 'before ' || g FROM generate_series(1, 50) g;
             GRANT INSERT, SELECT, UPDATE ON later.items TO clerk;
             GRANT USAGE ON SEQUENCE later.items_id_seq TO clerk;
             RESET ROLE;",
        )
        .await
        .unwrap();
    relay = Relay::start(&config);
    clerk
        .batch_execute(
            "INSERT INTO later.items (v) SELECT 'after ' || g FROM generate_series(1, 20) g;
             UPDATE later.items SET v = v || ' changed' WHERE id % 10 = 0;
             INSERT INTO load VALUES (1501, 'next run');",
        )
        .await
        .unwrap();
    let with_later = [
        "orders",
        "nokey",
        "counter",
        "load",
        "later.items",
        &odd_table(),
    ];
    wait_until_created(&target, &["later.items"], &mut relay).await;
    wait_until_equal(admin, &target, &with_later, &mut relay).await;
    let next_id: i32 = target
        .query_one("SELECT nextval('later.items_id_seq')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        next_id > 70,
        "the target's sequence hands out {next_id}, used on the source already"
    );

    // Not while a relay captures; then every object of the capture goes, and nothing else.
    let uninstall = || walrelay_with_config("uninstall", &config);
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
    assert!(out.contains("the triggers of 6 table(s)"), "{out}");
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

/// A table altered while changes of it wait in the log: at the next start the relay
/// registers the table again for its new columns, and the rows logged before still read
/// with the columns they were logged with; the earlier entry is forgotten once the log no
/// longer holds its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_logged_before_an_alter_table_read_with_their_columns() {
    let source = Source::start().await;
    let (admin, clerk) = (&source.admin, &source.clerk);
    clerk
        .batch_execute(
            "INSERT INTO orders (id, code) SELECT g, 'copied' FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    let target_pg = TestPg::start();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let config = trigger_config(
        dir.path(),
        &source,
        &["public.orders"],
        "status_interval = \"200ms\"\nlog_rotation = \"1s\"",
        &target_pg,
    );
    let mut relay = Relay::start(&config);
    wait_until_created(&target, &["orders"], &mut relay).await;
    wait_until_equal(admin, &target, &["orders"], &mut relay).await;
    relay.stop().await;

    // Logged while the relay is stopped, under the table's first entry.
    clerk
        .batch_execute(
            "UPDATE orders SET code = 'before the alter' WHERE id <= 5;
             INSERT INTO orders (id, code, amount) VALUES (100, 'before', 1.5);
             DELETE FROM orders WHERE id = 20;",
        )
        .await
        .unwrap();
    // The targets first, then the source (with its writers paused, as operations.md says).
    target
        .batch_execute(
            "ALTER TABLE orders ADD COLUMN note text, ALTER COLUMN amount TYPE numeric(12,3)",
        )
        .await
        .unwrap();
    admin
        .batch_execute(
            "SET ROLE owner_role;
             ALTER TABLE orders ADD COLUMN note text, ALTER COLUMN amount TYPE numeric(12,3);
             RESET ROLE;",
        )
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    // Writers go on once the relay has made the triggers for the new columns.
    let entries = "SELECT count(*) FROM walrelay_capture.tables WHERE relid = 'orders'::regclass";
    crate::support::wait_for_count(admin, entries, 2, "the table's two entries").await;
    clerk
        .batch_execute(
            "INSERT INTO orders (id, code, amount, note) VALUES (101, 'after', 2.25, 'with a note');
             UPDATE orders SET note = 'noted' WHERE id = 100;",
        )
        .await
        .unwrap();
    wait_until_equal(admin, &target, &["orders"], &mut relay).await;
    let first_entry_functions = "SELECT count(*) FROM pg_proc p JOIN walrelay_capture.tables t
          ON p.proname IN ('capture_' || t.id, 'capture_row_' || t.id) WHERE NOT t.current";
    crate::support::wait_for_count(
        admin,
        first_entry_functions,
        0,
        "the first entry's functions dropped",
    )
    .await;

    // Once rotation has emptied the log of the first entry's rows (it empties a log table
    // once a tick after the switch is confirmed, so keep writing), the next start
    // forgets the entry.
    let first_entry_rows = "SELECT count(*) FROM walrelay_capture.tables t
          WHERE NOT t.current
            AND (EXISTS (SELECT FROM walrelay_capture.log_1 l WHERE l.tbl = t.id)
                 OR EXISTS (SELECT FROM walrelay_capture.log_2 l WHERE l.tbl = t.id))";
    for i in 0.. {
        let left: i64 = admin.query_one(first_entry_rows, &[]).await.unwrap().get(0);
        if left == 0 {
            break;
        }
        assert!(
            i < 300,
            "the log kept the first entry's rows: {}",
            relay.stderr()
        );
        relay.assert_running();
        clerk
            .batch_execute(&format!(
                "UPDATE orders SET note = 'tick {i}' WHERE id = 101"
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until_equal(admin, &target, &["orders"], &mut relay).await;
    relay.stop().await;
    let mut relay = Relay::start(&config);
    for i in 0.. {
        let n: i64 = admin.query_one(entries, &[]).await.unwrap().get(0);
        if n == 1 {
            break;
        }
        assert!(i < 300, "{n} entries for the table: {}", relay.stderr());
        relay.assert_running();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.stop().await;
}

/// Row filters (a set's `where`) with trigger capture, decided in the triggers as
/// PostgreSQL's row filters decide: an update into the filter arrives as an insert, one
/// out of it as a delete; tables with and without a key; a column named like the
/// trigger's variable. The copy takes the filter too. A filter the server cannot evaluate
/// stops the relay at start and leaves the source's writes alone; a second consumer that
/// asks for another filter on the same table is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_filters_are_decided_in_the_triggers() {
    let source = Source::start().await;
    let (admin, clerk) = (&source.admin, &source.clerk);
    admin
        .batch_execute(
            "SET ROLE owner_role;
             CREATE TABLE regional (id int PRIMARY KEY, log text, region text);
             GRANT INSERT, UPDATE, DELETE, SELECT ON regional TO clerk;
             INSERT INTO regional VALUES (1, 'a', 'eu'), (2, 'b', 'us'), (3, NULL, 'eu');
             INSERT INTO nokey VALUES (1, 'kept'), (-1, 'left out');
             RESET ROLE;",
        )
        .await
        .unwrap();
    let target_pg = TestPg::start();
    let target = target_pg.create_db("app").await;
    let config_in = |dir: &std::path::Path, extra: &str, filter: &str| {
        relay_config_file(
            dir,
            &source.owner_url(),
            &["public.counter"],
            &format!("capture = \"trigger\"\nstatus_interval = \"200ms\"\n{extra}"),
            &format!(
                "[[set]]\nname = \"regional\"\n\n[[set.table]]\nname = \"public.regional\"\nwhere = \"{filter}\"\n\n\
                 [[set.table]]\nname = \"public.nokey\"\nwhere = \"a > 0\"\n\n\
                 [[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
                target_pg.url("app")
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path(), "", "region = 'eu' AND log IS NOT NULL");
    let regional = "(SELECT * FROM regional WHERE region = 'eu' AND log IS NOT NULL)";
    let nokey = "(SELECT * FROM nokey WHERE a > 0)";
    let mut relay = Relay::start(&config);
    wait_until_created(&target, &["regional", "nokey", "counter"], &mut relay).await;
    wait_until_shaped(admin, regional, &target, "regional", &mut relay).await;
    wait_until_shaped(admin, nokey, &target, "nokey", &mut relay).await;

    clerk
        .batch_execute(
            "INSERT INTO regional VALUES (4, 'c', 'eu'), (5, 'd', 'us');
             UPDATE regional SET region = 'eu' WHERE id = 2;
             UPDATE regional SET region = 'us' WHERE id = 1;
             UPDATE regional SET log = 'now' WHERE id = 3;
             UPDATE regional SET log = 'x' WHERE id = 5;
             BEGIN;
             UPDATE regional SET id = 40 WHERE id = 4;
             UPDATE regional SET log = 'after the key change' WHERE id = 40;
             COMMIT;
             DELETE FROM regional WHERE id = 2;
             INSERT INTO nokey VALUES (2, 'in'), (-2, 'out');
             UPDATE nokey SET a = -a WHERE b = 'kept';
             UPDATE nokey SET a = 3 WHERE a = -2;
             DELETE FROM nokey WHERE a = 2;
             INSERT INTO counter VALUES (1, 7);",
        )
        .await
        .unwrap();
    wait_until_shaped(admin, regional, &target, "regional", &mut relay).await;
    wait_until_shaped(admin, nokey, &target, "nokey", &mut relay).await;
    wait_until_equal(admin, &target, &["counter"], &mut relay).await;
    let regional_rows: Vec<String> = target
        .query("SELECT id || ':' || log FROM regional ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(regional_rows, ["3:now", "40:after the key change"]);
    relay.stop().await;

    // A filter the server cannot evaluate: refused at start, the triggers left as they were.
    let refused = |config: &std::path::Path| {
        let o = walrelay_with_config("run", config);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let bad_dir = tempfile::tempdir().unwrap();
    let (code, err) = refused(&config_in(bad_dir.path(), "", "no_such_column > 0"));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("row filter")
            && err.contains("no_such_column")
            && err.contains("public.regional"),
        "{err}"
    );
    assert!(!err.contains("Own3r"), "{err}");
    clerk
        .batch_execute("INSERT INTO regional VALUES (6, 'e', 'eu'), (7, 'f', 'us')")
        .await
        .unwrap();

    // Another consumer of the log with another filter for the same table.
    let other_dir = tempfile::tempdir().unwrap();
    let (code, err) = refused(&config_in(
        other_dir.path(),
        "slot = \"other\"",
        "region = 'us'",
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("other consumer(s) walrelay") && err.contains("same filter"),
        "{err}"
    );

    // The first relay goes on where it stopped, with what was written meanwhile.
    let mut relay = Relay::start(&config);
    wait_until_shaped(admin, regional, &target, "regional", &mut relay).await;
    relay.stop().await;
}

/// Two writable nodes, neither with logical decoding: a relay each way with trigger
/// capture and `origin = "none"`. What a relay applies is logged on its target with
/// `applied_by` and left out by the relay back, so a write on either node reaches the
/// other once and nothing comes back: not the copy, not an insert, not an update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writable_nodes_with_trigger_capture_do_not_loop() {
    let node = || {
        TestPg::builder()
            .setting("wal_level", "replica")
            .setting("track_commit_timestamp", "on")
            .start()
    };
    let crate::support::NodePair {
        a_pg: _a_pg,
        b_pg: _b_pg,
        a,
        b,
        ab,
        ba,
        dirs: _dirs,
    } = crate::support::NodePair::start(
        node,
        "INSERT INTO t SELECT g, 'copied' FROM generate_series(100, 199) g",
        "capture = \"trigger\"\norigin = \"none\"\nstatus_interval = \"200ms\"",
    )
    .await;
    // The way back first: its triggers on B log the copy's rows, marked as applied.
    let mut b_to_a = Relay::start(&ba);
    crate::support::wait_for_count(
        &b,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'walrelay_capture%'",
        5,
        "the relay back's triggers on B",
    )
    .await;
    let mut a_to_b = Relay::start(&ab);
    wait_until_equal(&a, &b, &["t"], &mut a_to_b).await;
    let copied_on_a = xmin(&a, 100).await;

    a.batch_execute(
        "INSERT INTO t VALUES (1, 'from a'); UPDATE t SET v = 'changed on a' WHERE id = 101",
    )
    .await
    .unwrap();
    b.batch_execute(
        "INSERT INTO t VALUES (2, 'from b'); UPDATE t SET v = 'changed on b' WHERE id = 102",
    )
    .await
    .unwrap();
    wait_until_equal(&a, &b, &["t"], &mut a_to_b).await;
    wait_until_equal(&a, &b, &["t"], &mut b_to_a).await;
    let written = [
        (xmin(&a, 1).await, xmin(&a, 101).await),
        (xmin(&b, 2).await, xmin(&b, 102).await),
    ];
    let applied = [
        (xmin(&b, 1).await, xmin(&b, 101).await),
        (xmin(&a, 2).await, xmin(&a, 102).await),
    ];
    // Long enough for a change to make the round trip many times (ticks every 200 ms).
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_to_b.assert_running();
    b_to_a.assert_running();
    assert_eq!(
        [
            (xmin(&a, 1).await, xmin(&a, 101).await),
            (xmin(&b, 2).await, xmin(&b, 102).await)
        ],
        written,
        "a node's own writes came back to it"
    );
    assert_eq!(
        [
            (xmin(&b, 1).await, xmin(&b, 101).await),
            (xmin(&a, 2).await, xmin(&a, 102).await)
        ],
        applied,
        "a change was applied more than once"
    );
    assert_eq!(xmin(&a, 100).await, copied_on_a, "the copy came back to A");
    let rows: i64 = a
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 102);
    a_to_b.stop().await;
    b_to_a.stop().await;
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
        walrelay_check(&config)
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

    // A capture schema made by another version of walrelay: check and run say so, and
    // uninstall removes it.
    source
        .admin
        .batch_execute(
            "SET ROLE owner_role;
             CREATE SCHEMA walrelay_capture;
             CREATE TABLE walrelay_capture.tables (id serial PRIMARY KEY, relid oid NOT NULL UNIQUE);
             CREATE TABLE walrelay_capture.log_1 (txid xid8, seq bigint);
             RESET ROLE;",
        )
        .await
        .unwrap();
    let (code, out) = run_check(&source.owner_url());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "PROBLEM  the schema walrelay_capture was installed by another version of walrelay"
        ),
        "{out}"
    );
    let config = dir.path().join("walrelay.toml");
    let run = walrelay_with_config("run", &config);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("walrelay uninstall --config FILE"), "{err}");
    let removed = walrelay_with_config("uninstall", &config);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert_eq!(capture_objects(&source.admin).await, 0);
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

/// `walrelay status` with trigger capture shows the log's consumer in place of a slot:
/// not installed before the first run; capturing, with its confirmed tick and the log's
/// size, while the relay runs; not capturing, with the sink behind, once it stopped and
/// the source wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_log_consumer() {
    let source = Source::start().await;
    let load = LoadTarget::new(&source, 100).await;
    let (target, config) = (&load.target, &load.config);
    let status = || {
        let o = walrelay_with_config("status", config);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let before = status();
    assert!(
        before.contains("consumer walrelay (trigger capture): not installed yet"),
        "{before}"
    );
    assert!(!before.contains("slot "), "{before}");

    let mut relay = load.start(&source).await;
    source
        .clerk
        .batch_execute("UPDATE load SET v = 'y' WHERE id = 1")
        .await
        .unwrap();
    wait_until_equal(&source.admin, target, &["load"], &mut relay).await;
    let running = status();
    let consumer = running
        .lines()
        .find(|l| l.starts_with("consumer walrelay (trigger capture): capturing (pid "))
        .unwrap_or_else(|| panic!("{running}"));
    assert!(
        consumer.contains("; confirmed ")
            && consumer.contains("(tick at 20")
            && consumer.contains("; log "),
        "{consumer}"
    );
    let sink = running
        .lines()
        .find(|l| l.starts_with("sink     postgres (postgres"))
        .unwrap_or_else(|| panic!("{running}"));
    assert!(
        sink.contains("applied ") && sink.ends_with(", 0 s"),
        "{sink}"
    );

    relay.stop().await;
    source
        .clerk
        .batch_execute("UPDATE load SET v = 'z' WHERE id = 2")
        .await
        .unwrap();
    let stopped = status();
    assert!(
        stopped.contains("consumer walrelay (trigger capture): not capturing: walrelay is stopped"),
        "{stopped}"
    );
    let sink = stopped
        .lines()
        .find(|l| l.starts_with("sink     postgres (postgres"))
        .unwrap_or_else(|| panic!("{stopped}"));
    assert!(!sink.ends_with(", 0 s"), "{sink}");
}

/// The first change logged after the installation is shipped when no notification comes
/// (it was written while the relay polled, so the writer did not notify): the relay's look
/// at the log must see the first number the log's sequence hands out (a new sequence's
/// `last_value` is 1 before and after its first `nextval`). Found by CI: the change waited
/// for the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_change_after_installing_is_found_without_a_notification() {
    let source = Source::start().await;
    let load = LoadTarget::new(&source, 1).await;
    let target = &load.target;
    let mut relay = load.start(&source).await;
    // Writers notify only while `wake` is 1; the relay, idle, would set it so. Off by
    // hand, the relay has only its looks at the log to find the change.
    source
        .admin
        .batch_execute("SELECT setval('walrelay_capture.wake', 0, true)")
        .await
        .unwrap();
    let logged: i64 = source
        .admin
        .query_one(
            "SELECT (SELECT count(*) FROM walrelay_capture.log_1)
                  + (SELECT count(*) FROM walrelay_capture.log_2)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "nothing logged before the change");
    source
        .clerk
        .batch_execute("UPDATE load SET v = 'y' WHERE id = 1")
        .await
        .unwrap();
    wait_until_equal(&source.admin, target, &["load"], &mut relay).await;
    relay.stop().await;
}

/// `rows` rows in the source's `load`, a new target for them and a trigger-capture relay's
/// config (an idle relay looks at the log every 200 ms), not started yet.
struct LoadTarget {
    _server: TestPg,
    target: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl LoadTarget {
    async fn new(source: &Source, rows: i32) -> LoadTarget {
        source
            .clerk
            .execute(
                "INSERT INTO load SELECT g, 'x' FROM generate_series(1, $1) g",
                &[&rows],
            )
            .await
            .unwrap();
        let server = TestPg::start();
        let target = server.create_db("app").await;
        let dir = tempfile::tempdir().unwrap();
        let config = trigger_config(
            dir.path(),
            source,
            &["public.load"],
            "status_interval = \"200ms\"",
            &server,
        );
        LoadTarget {
            _server: server,
            target,
            _dir: dir,
            config,
        }
    }

    /// The relay, started and done copying (`load` equal on both sides).
    async fn start(&self, source: &Source) -> Relay {
        let mut relay = Relay::start(&self.config);
        wait_until_created(&self.target, &["load"], &mut relay).await;
        wait_until_equal(&source.admin, &self.target, &["load"], &mut relay).await;
        relay
    }
}
