//! DDL replication: schema changes on the source reach the targets at their place in the
//! stream while writes go on, by statement replay (a superuser source: event triggers) or,
//! for a role that is not a superuser, by the additive changes the stream itself shows.

use std::process::{Child, Stdio};
use std::time::Duration;

use walrelay_testkit::TestPg;

use crate::support::*;

/// The schema changes the test runs on the source, one statement at a time (each as its
/// own query, as psql sends a script), each followed by writes that need the new shape.
/// `BEGIN`..`COMMIT` and `BEGIN`..`ROLLBACK` make transactions of DDL and rows together.
const SCRIPT: &[&str] = &[
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "CREATE TABLE items (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL DEFAULT 'x', m mood, qty int)",
    "INSERT INTO items (name, m, qty) VALUES ('a', 'ok', 1), ('b', 'sad', 2)",
    "ALTER TABLE items ADD COLUMN price numeric(8,2) DEFAULT 0",
    "UPDATE items SET price = 9.5 WHERE name = 'a'",
    "ALTER TABLE items RENAME COLUMN qty TO quantity",
    "INSERT INTO items (name, m, quantity, price) VALUES ('c', 'ok', 3, 1.25)",
    "ALTER TABLE items ALTER COLUMN quantity TYPE bigint",
    "UPDATE items SET quantity = 5000000000 WHERE name = 'c'",
    "ALTER TABLE items ALTER COLUMN name SET DEFAULT 'unnamed'",
    "INSERT INTO items (m, quantity) VALUES ('ok', 4)",
    "ALTER TYPE mood ADD VALUE 'happy'",
    "INSERT INTO items (name, m, quantity) VALUES ('d', 'happy', 8)",
    "ALTER TABLE items ADD CONSTRAINT quantity_positive CHECK (quantity > 0)",
    "ALTER TABLE items ADD CONSTRAINT items_name_key UNIQUE (name)",
    "CREATE INDEX items_price ON items (price)",
    "CREATE INDEX CONCURRENTLY items_m ON items (m)",
    "CREATE INDEX CONCURRENTLY items_quantity ON items (quantity)",
    "DROP INDEX CONCURRENTLY items_quantity",
    "ALTER TABLE items DROP CONSTRAINT quantity_positive",
    "ALTER TABLE items DROP COLUMN price",
    "INSERT INTO items (name, m, quantity) VALUES ('e', 'ok', -7)",
    "COMMENT ON TABLE items IS 'things we sell'",
    "COMMENT ON COLUMN items.name IS 'what it is called'",
    "CREATE SEQUENCE ticket_no START 100",
    "ALTER SEQUENCE ticket_no INCREMENT BY 5",
    "CREATE TABLE tickets (id int PRIMARY KEY DEFAULT nextval('ticket_no'), body text)",
    "INSERT INTO tickets (body) VALUES ('t1'), ('t2')",
    "ALTER TABLE tickets RENAME TO issues",
    "INSERT INTO issues (body) VALUES ('t3')",
    "CREATE TABLE events (id int, at date NOT NULL, what text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at)",
    "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
    "INSERT INTO events VALUES (1, '2026-05-01', 'x')",
    "CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
    "INSERT INTO events VALUES (2, '2027-05-01', 'y')",
    "CREATE TABLE scratch (id int PRIMARY KEY)",
    "INSERT INTO scratch VALUES (1)",
    "DROP TABLE scratch",
    "CREATE SEQUENCE spare",
    "DROP SEQUENCE spare",
    "BEGIN",
    "ALTER TABLE items ADD COLUMN colour text",
    "INSERT INTO items (name, m, quantity, colour) VALUES ('f', 'ok', 2, 'red')",
    "COMMIT",
    "BEGIN",
    "ALTER TABLE items ADD COLUMN never text",
    "INSERT INTO items (name, m, quantity, never) VALUES ('g', 'ok', 2, 'gone')",
    "ROLLBACK",
    "ALTER TABLE pgbench_accounts ADD COLUMN note text",
    "UPDATE pgbench_accounts SET note = 'seen' WHERE aid <= 10",
    "INSERT INTO items (name, m, quantity, colour) VALUES ('h', 'sad', 3, 'blue')",
];

/// The tables the script leaves, with the pgbench ones.
const TABLES: &[&str] = &[
    "items",
    "issues",
    "events",
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// `pgbench` on `db` of `pg` until killed.
fn pgbench_load(pg: &TestPg, db: &str) -> Child {
    pg.server
        .command("pgbench")
        .args(["-n", "-c", "2", "-j", "1", "-T", "900", "-h"])
        .arg(pg.server.socket_dir())
        .args(["-p", &pg.port().to_string(), db])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench starts")
}

/// Run one of the server's client programs on `db` (by its socket) and return what it
/// printed; it must succeed.
fn run_tool(pg: &TestPg, program: &str, args: &[&str], db: &str) -> String {
    let out = pg
        .server
        .command(program)
        .args(args)
        .arg("-h")
        .arg(pg.server.socket_dir())
        .args(["-p", &pg.port().to_string(), db])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pgbench_init(pg: &TestPg, db: &str) {
    run_tool(pg, "pgbench", &["-i", "-s", "1", "-q"], db);
}

/// The schema of `db` (schema `public`) as `pg_dump -s` prints it, without its comments,
/// owners, privileges and the random `\restrict` keys: what the DBA compares.
fn schema_dump(pg: &TestPg, db: &str) -> String {
    let options = [
        "-s",
        "-n",
        "public",
        "--no-owner",
        "--no-privileges",
        "--no-publications",
    ];
    run_tool(pg, "pg_dump", &options, db)
        .lines()
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Run the script on `source`, one statement per query.
async fn run_script(source: &tokio_postgres::Client) {
    for statement in SCRIPT {
        source
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// Under a pgbench load, every command of the script reaches a postgres target (by the
/// relay) and a second one through amqp and `walrelay consume`, at its place: at the end
/// both hold the source's rows, column for column, and `pg_dump -s` of the three is the
/// same. The relay never stops; the rolled-back change is nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_of_schema_changes_under_load_reaches_the_targets_in_place() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    pgbench_init(&source_pg, "app");
    source
        .batch_execute("ALTER TABLE pgbench_history ADD COLUMN hid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
        .await
        .unwrap();
    let target = target_pg.create_db("app").await;
    // The consumer's target has the tables before: it gets rows, not a copy.
    let queued = target_pg.create_db("queued").await;
    queued
        .batch_execute(&schema_dump(&source_pg, "app").replace("CREATE SCHEMA public;", ""))
        .await
        .unwrap();
    // The dump empties the session's search_path.
    queued.batch_execute("RESET search_path").await.unwrap();

    let queue = format!("walrelay-test-{}-ddl", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        r#"[[sink]]
type = "postgres"
url = "{}"

[[sink]]
type = "amqp"
url = "{BROKER}"
exchange = "{queue}"
queues = [{{ name = "{queue}" }}]
"#,
        target_pg.url("app")
    );
    let cfg = relay_config_file(dir.path(), &source_pg.url("app"), &["public.*"], "", &sinks);
    let (_, said) = walrelay_check(&cfg);
    assert!(
        said.contains("DDL: statements"),
        "check must say the mode:\n{said}"
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    let consume_cfg = consume_config(dir.path(), "consume", &queue, &target_pg.url("queued"), "");
    let mut consumer = Relay::start_consume(&consume_cfg);

    let mut load = pgbench_load(&source_pg, "app");
    tokio::time::sleep(Duration::from_secs(2)).await;
    run_script(&source).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = load.kill();
    let _ = load.wait();

    // The last row of the script, on each target, before comparing (the tables the
    // script creates do not exist there until then).
    let last = "SELECT count(*) FROM items WHERE name = 'h'";
    wait_for_row(&target, last, &mut relay).await;
    wait_for_row(&queued, last, &mut consumer).await;
    wait_until_equal(&source, &target, TABLES, &mut relay).await;
    wait_until_equal(&source, &queued, TABLES, &mut consumer).await;
    let expected = schema_dump(&source_pg, "app");
    assert!(
        expected.contains("CREATE INDEX items_m ON public.items"),
        "{expected}"
    );
    assert!(!expected.contains("never"));
    for (db, log) in [("app", relay.stderr()), ("queued", consumer.stderr())] {
        let got = schema_dump(&target_pg, db);
        if got != expected {
            let diff: Vec<String> = diff_lines(&expected, &got);
            panic!(
                "the schema of {db} differs from the source's:\n{}\nlog:\n{log}",
                diff.join("\n")
            );
        }
    }
    let log = relay.stderr();
    assert!(
        !log.contains("NOT replayed"),
        "every command replays:\n{log}"
    );
    relay.assert_running();
    consumer.assert_running();
    relay.stop().await;
    consumer.stop().await;
}

/// Wait until `sql` counts one row on `target`, while `relay` runs.
async fn wait_for_row(target: &tokio_postgres::Client, sql: &str, relay: &mut Relay) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        relay.assert_running();
        let n: Option<i64> = target.query_one(sql, &[]).await.ok().map(|r| r.get(0));
        if n == Some(1) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let rows = target
                .query_one("SELECT string_agg(name, ',') FROM items", &[])
                .await
                .map(|r| r.get::<_, Option<String>>(0));
            panic!(
                "never true on the target: {sql} (items: {rows:?})\n{}",
                relay.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lines of `a` missing in `b` (`-`) and of `b` missing in `a` (`+`).
fn diff_lines(a: &str, b: &str) -> Vec<String> {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    la.iter()
        .filter(|l| !lb.contains(l))
        .map(|l| format!("- {l}"))
        .chain(
            lb.iter()
                .filter(|l| !la.contains(l))
                .map(|l| format!("+ {l}")),
        )
        .collect()
}

/// A source role that is not a superuser cannot have event triggers: new columns and
/// wider types still reach the target from the stream; a dropped column is reported as
/// not replicated and the relay goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_superuser_new_columns_and_wider_types_still_reach_the_target() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let admin = source_pg.create_db("app").await;
    admin
        .batch_execute(
            "CREATE ROLE shop LOGIN REPLICATION PASSWORD 'n0t-the-default';
             GRANT CREATE ON DATABASE app TO shop;
             CREATE TABLE orders (id int PRIMARY KEY, code varchar(4), gone text);
             ALTER TABLE orders OWNER TO shop;
             INSERT INTO orders VALUES (1, 'a', 'x'), (2, 'b', 'y');",
        )
        .await
        .unwrap();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgresql://shop:n0t-the-default@127.0.0.1:{}/app",
        source_pg.port()
    );
    let cfg = postgres_config(
        dir.path(),
        &url,
        &target_pg.url("app"),
        &["public.orders"],
        "",
    );
    let (_, said) = walrelay_check(&cfg);
    assert!(
        said.contains("DDL: additive"),
        "check must say the mode:\n{said}"
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&admin, &mut relay).await;
    wait_until_equal(&admin, &target, &["orders"], &mut relay).await;

    let shop = source_pg.client_for(&url).await;
    for statement in [
        "ALTER TABLE orders ADD COLUMN note text",
        "INSERT INTO orders VALUES (3, 'c', 'z', 'new column')",
        "ALTER TABLE orders ALTER COLUMN code TYPE varchar(20)",
        "UPDATE orders SET code = 'a much longer code' WHERE id = 1",
        "ALTER TABLE orders DROP COLUMN gone",
        "INSERT INTO orders VALUES (4, 'd', 'after the drop')",
    ] {
        shop.batch_execute(statement).await.unwrap();
    }
    let expected = "SELECT count(*) FROM orders WHERE (id = 1 AND code = 'a much longer code')
                       OR (id = 3 AND note = 'new column') OR (id = 4 AND note = 'after the drop')";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        relay.assert_running();
        let n: Option<i64> = target.query_one(expected, &[]).await.ok().map(|r| r.get(0));
        if n == Some(3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the additive changes never reached the target:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ty: String = target
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'code'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "character varying(20)");
    let log = relay.stderr();
    assert!(
        log.contains("dropped on the source") && log.contains("gone"),
        "the drop is reported:\n{log}"
    );
    relay.assert_running();
    relay.stop().await;
}

/// A command the target cannot run as the source did (here: inside a `DO` block) is
/// skipped with a warning naming it, by default, and stops the relay under
/// `on_unsafe = "stop"`. Across the restart between the two, a table the stream created
/// (in a transaction large enough that PostgreSQL streams it before its commit) is held as
/// it is: not copied again, its rows go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_replay_is_skipped_or_stops_the_relay_as_configured() {
    let source_pg = TestPg::builder()
        .setting("logical_decoding_work_mem", "64kB")
        .start();
    let target_pg = TestPg::start();
    let source = source_pg.create_db("app").await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, b int)")
        .await
        .unwrap();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let write = |policy: &str| {
        let sink = format!(
            "[ddl]\non_unsafe = \"{policy}\"\n\n[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
            target_pg.url("app")
        );
        relay_config_file(dir.path(), &source_pg.url("app"), &["public.*"], "", &sink)
    };
    let cfg = write("skip");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    for statement in [
        // A user mapping's password stays out of the stream and the log; its neighbours,
        // of no replicated table, are named there as not sent.
        "CREATE FOREIGN DATA WRAPPER plain_fdw",
        "CREATE SERVER elsewhere FOREIGN DATA WRAPPER plain_fdw",
        "CREATE USER MAPPING FOR CURRENT_USER SERVER elsewhere OPTIONS (password 'hunter2-mapping')",
        "DO $$ BEGIN EXECUTE 'CREATE INDEX t_b ON t (b)'; END $$",
        "INSERT INTO t VALUES (1, 1)",
        "BEGIN",
        "CREATE TABLE later (id int PRIMARY KEY, v text)",
        "INSERT INTO later SELECT g, repeat('x', 200) FROM generate_series(2, 5000) g",
        "INSERT INTO later VALUES (1, 'one')",
        "COMMIT",
    ] {
        source.batch_execute(statement).await.unwrap();
    }
    wait_for_row(
        &target,
        "SELECT count(*) FROM later WHERE v = 'one'",
        &mut relay,
    )
    .await;
    wait_until_equal(&source, &target, &["t", "later"], &mut relay).await;
    let log = relay.stop().await;
    assert!(
        log.contains("schema change NOT replayed") && log.contains("CREATE INDEX t_b"),
        "the skipped command is named:\n{log}"
    );
    assert!(
        log.contains("CREATE SERVER elsewhere") && !log.contains("hunter2"),
        "a user mapping is not captured:\n{log}"
    );
    let index: bool = target
        .query_one("SELECT to_regclass('t_b') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!index, "a skipped command changes nothing on the target");

    let cfg = write("stop");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    source
        .batch_execute("INSERT INTO later VALUES (5001, 'two')")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["t", "later"], &mut relay).await;
    assert!(
        !relay.stderr().contains("copying"),
        "the table the stream created is not copied again:\n{}",
        relay.stderr()
    );
    source
        .batch_execute("DO $$ BEGIN EXECUTE 'ALTER TABLE t ADD COLUMN c int'; END $$")
        .await
        .unwrap();
    let log = relay.wait_for_failure().await;
    assert!(
        log.contains("cannot be replayed") && log.contains("ALTER TABLE t ADD COLUMN c"),
        "the relay stops naming the command:\n{log}"
    );
}

/// A crash right after a schema change ran on the target, before its transaction commits:
/// the target undoes it with the transaction, and the restarted relay replays it once, at
/// the same place. The command's author is an ordinary role (not a superuser): the
/// trigger records its commands all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_replayed_schema_change_replays_it_once() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    source
        .batch_execute(
            "CREATE ROLE clerk LOGIN PASSWORD 'cl3rk-pass';
             CREATE TABLE t (id int PRIMARY KEY, b int);
             ALTER TABLE t OWNER TO clerk;
             INSERT INTO t VALUES (1, 1);",
        )
        .await
        .unwrap();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        &["public.t"],
        "",
    );
    let mut armed = Relay::start_with_failpoint("run", &cfg, "postgres-ddl-replayed");
    wait_until_streaming(&source, &mut armed).await;
    wait_until_equal(&source, &target, &["t"], &mut armed).await;
    let clerk = source_pg
        .client_for(&format!(
            "postgresql://clerk:cl3rk-pass@127.0.0.1:{}/app",
            source_pg.port()
        ))
        .await;
    clerk
        .batch_execute("ALTER TABLE t ADD COLUMN c text DEFAULT 'new'")
        .await
        .unwrap();
    clerk
        .batch_execute("INSERT INTO t VALUES (2, 2, 'two')")
        .await
        .unwrap();
    armed.wait(Duration::from_secs(60)).await;

    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    wait_for_row(
        &target,
        "SELECT count(*) FROM t WHERE c = 'two'",
        &mut relay,
    )
    .await;
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    let log = relay.stop().await;
    assert_eq!(
        log.matches("schema change replayed").count(),
        1,
        "replayed once after the crash:\n{log}"
    );
    assert!(!log.contains("NOT replayed"), "{log}");
    let columns: i64 = target
        .query_one(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 3);
}
