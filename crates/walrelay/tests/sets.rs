//! Replication sets: each target gets exactly the sets it takes, with the sets' row
//! filters, column lists, renames and transforms, through the initial copy and the stream,
//! to postgres, jsonl and amqp alike; filters the source would turn against the
//! application are refused at start.

use std::time::Duration;

use walrelay_testkit::TestPg;

use crate::support::*;

const HASH_KEY: &str = "a long random s3cret";

const SOURCE: &str = "
    CREATE TABLE customers (id int PRIMARY KEY, region text NOT NULL, email text, card text,
                            phone text, tier text, note text);
    CREATE TABLE orders (id int PRIMARY KEY, customer int NOT NULL, amount numeric(10,2), internal text);
    CREATE TABLE audit (id serial PRIMARY KEY, what text NOT NULL);
    CREATE TABLE tickets (id serial PRIMARY KEY, body text);
    CREATE SEQUENCE invoice_no START 1000;
    SELECT nextval('invoice_no') FROM generate_series(1, 5);
    INSERT INTO tickets (body) SELECT 'ticket ' || g FROM generate_series(1, 10) g;
    INSERT INTO customers SELECT g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END,
                                 'user' || g || '@example.com', '4000123412340' || lpad(g::text, 3, '0'),
                                 '+33 ' || g, CASE WHEN g % 2 = 0 THEN 'gold' END, 'note ' || g
                          FROM generate_series(1, 300) g;
    INSERT INTO orders SELECT g, g % 300 + 1, g * 1.5, 'x' FROM generate_series(1, 500) g;
    INSERT INTO audit (what) SELECT 'event ' || g FROM generate_series(1, 50) g;
";

/// The customers as set `crm` delivers them: only `eu` rows, `note` dropped, `email`
/// renamed `mail` and hashed (pgcrypto's HMAC, an implementation independent of walrelay's),
/// `card` masked but for its last 4 characters, `phone` emptied, `tier` made a constant.
const EXPECTED_CLIENTS: &str =
    "(SELECT id, region, encode(hmac(email, 'a long random s3cret', 'sha256'), 'hex') AS mail,
         repeat('*', greatest(length(card) - 4, 0)) || right(card, 4) AS card,
         NULL::text AS phone, CASE WHEN tier IS NOT NULL THEN 'standard' END AS tier
  FROM customers WHERE region = 'eu')";
const EXPECTED_ORDERS: &str = "(SELECT id, customer, amount FROM orders)";

/// The shape on a target the relay does not create (the amqp consumer's).
const TARGET_SHAPE: &str = "
    CREATE SCHEMA crm;
    CREATE TABLE crm.clients (id int PRIMARY KEY, region text NOT NULL, mail text, card text, phone text, tier text);
    CREATE TABLE crm.issues (id int PRIMARY KEY, body text);
    CREATE TABLE orders (id int PRIMARY KEY, customer int NOT NULL, amount numeric(10,2));
";

fn sets_config(dir: &std::path::Path, source: &str, sinks: &str) -> std::path::PathBuf {
    let text = format!(
        r#"[source]
url = "{source}"
spill_dir = "{spill}"
status_interval = "200ms"

[[set]]
name = "crm"
tables = ["public.orders"]
hash_key = "{HASH_KEY}"
sequences = ["public.invoice_no"]

[[set.table]]
name = "public.tickets"
target = "crm.issues"

[[set.table]]
name = "public.orders"
columns = ["id", "customer", "amount"]

[[set.table]]
name = "public.customers"
where = "region = 'eu'"
identity = "full"
target = "crm.clients"
rename_columns = {{ email = "mail" }}
transform = {{ email = "hash", card = {{ mask = 4 }}, phone = "null", tier = {{ constant = "standard" }}, note = "drop" }}

[[set]]
name = "ops"
tables = ["public.audit"]

{sinks}
"#,
        spill = dir.join("spill").display()
    );
    let path = dir.join("walrelay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Run `statement(i)` for i = 1, 2, ... with `pause` between, until `stop`; returns how
/// many ran.
fn write_until(
    client: tokio_postgres::Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pause: Duration,
    statement: impl Fn(i64) -> String + Send + 'static,
) -> tokio::task::JoinHandle<i64> {
    walrelay::task::spawn_named("test-writes", async move {
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            client.batch_execute(&statement(i)).await.unwrap();
            tokio::time::sleep(pause).await;
        }
        i
    })
}

/// A sequence's last value.
async fn last_value(c: &tokio_postgres::Client, sequence: &str) -> i64 {
    c.query_one(&format!("SELECT last_value FROM {sequence}"), &[])
        .await
        .unwrap_or_else(|e| panic!("{sequence}: {e:?}"))
        .get(0)
}

/// The tables of schemas public and crm.
async fn tables(c: &tokio_postgres::Client) -> Vec<String> {
    c.query(
        "SELECT table_schema || '.' || table_name FROM information_schema.tables
         WHERE table_schema IN ('public', 'crm') ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect()
}

/// Changes that move customers into and out of the filter, and touch every other column.
async fn write_changes(source: &tokio_postgres::Client) {
    source
        .batch_execute(
            "INSERT INTO customers VALUES (1001, 'eu', 'new@example.com', '5555666677778888', '+1', 'gold', 'n'),
                                          (1002, 'us', 'us@example.com', '1111', '+2', NULL, 'n');
             UPDATE customers SET region = 'eu' WHERE id IN (1, 2);         -- into the filter: inserts
             UPDATE customers SET region = 'us' WHERE id IN (3, 6);         -- out of it: deletes
             UPDATE customers SET email = 'changed' || id || '@example.com', card = '12' WHERE id IN (9, 12);
             UPDATE customers SET note = 'only the dropped column' WHERE id = 15;
             DELETE FROM customers WHERE id IN (18, 19);
             UPDATE customers SET tier = NULL WHERE id = 24;
             BEGIN;
             INSERT INTO orders VALUES (501, 1001, 9.99, 'y');
             UPDATE orders SET amount = amount + 1, internal = 'z' WHERE id <= 20;
             DELETE FROM orders WHERE id BETWEEN 30 AND 40;
             INSERT INTO audit (what) VALUES ('after');
             COMMIT;
             INSERT INTO audit (what) SELECT 'more ' || g FROM generate_series(1, 20) g;
             INSERT INTO tickets (body) VALUES ('after the copy');
             SELECT nextval('invoice_no') FROM generate_series(1, 7);",
        )
        .await
        .unwrap();
}

/// Two sets, two postgres targets, a jsonl file and an amqp queue applied by `walrelay
/// consume`: each gets exactly its sets, shaped, through the copy and the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_target_gets_its_sets_filtered_renamed_and_transformed() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    source.batch_execute(SOURCE).await.unwrap();
    let expected_db = source_pg.create_db("expected").await;
    expected_db
        .batch_execute("CREATE EXTENSION pgcrypto")
        .await
        .unwrap();
    let crm = target_pg.create_db("crm").await;
    let ops = target_pg.create_db("ops").await;
    let queued = target_pg.create_db("queued").await;
    queued.batch_execute(TARGET_SHAPE).await.unwrap();
    // pgcrypto on the source computes the expected hashes; walrelay never uses it.
    source
        .batch_execute("CREATE EXTENSION pgcrypto")
        .await
        .unwrap();

    let queue = format!("walrelay-test-{}-sets", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("crm.jsonl");
    let sinks = format!(
        r#"[[sink]]
type = "postgres"
name = "crm"
url = "{}"
sets = ["crm"]

[[sink]]
type = "postgres"
name = "ops"
url = "{}"
sets = ["ops"]

[[sink]]
type = "jsonl"
path = "{}"
sets = ["crm"]

[[sink]]
type = "amqp"
url = "{BROKER}"
exchange = "{queue}"
queues = [{{ name = "{queue}" }}]
sets = ["crm"]
"#,
        target_pg.url("crm"),
        target_pg.url("ops"),
        out.display()
    );
    let cfg = sets_config(dir.path(), &source_pg.url("app"), &sinks);
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    let consume_cfg = consume_config(dir.path(), "consume", &queue, &target_pg.url("queued"), "");
    let mut consumer = Relay::start_consume(&consume_cfg);

    // The copy.
    wait_until_shaped(&source, EXPECTED_CLIENTS, &crm, "crm.clients", &mut relay).await;
    wait_until_shaped(&source, EXPECTED_ORDERS, &crm, "public.orders", &mut relay).await;
    wait_until_equal(&source, &ops, &["audit"], &mut relay).await;
    // The stream.
    write_changes(&source).await;
    wait_until_shaped(&source, EXPECTED_CLIENTS, &crm, "crm.clients", &mut relay).await;
    wait_until_shaped(&source, EXPECTED_ORDERS, &crm, "public.orders", &mut relay).await;
    wait_until_equal(&source, &ops, &["audit"], &mut relay).await;
    wait_until_shaped(
        &source,
        EXPECTED_CLIENTS,
        &queued,
        "crm.clients",
        &mut consumer,
    )
    .await;
    wait_until_shaped(
        &source,
        EXPECTED_ORDERS,
        &queued,
        "public.orders",
        &mut consumer,
    )
    .await;

    // Each target has only its sets' tables, in the sets' shape.
    wait_until_shaped(
        &source,
        "(SELECT * FROM tickets)",
        &crm,
        "crm.issues",
        &mut relay,
    )
    .await;
    assert_eq!(
        tables(&crm).await,
        ["crm.clients", "crm.issues", "public.orders"]
    );
    // Sequences: the serial of a renamed table moved with it, a named one was created, and
    // each is at least where the source's is (the inserts after the copy used them).
    for (target, source_seq, target_seq) in [
        (&crm, "public.tickets_id_seq", "crm.issues_id_seq"),
        (&crm, "public.invoice_no", "public.invoice_no"),
        (&ops, "public.audit_id_seq", "public.audit_id_seq"),
    ] {
        let (s, t) = (
            last_value(&source, source_seq).await,
            last_value(target, target_seq).await,
        );
        assert!(
            t >= s,
            "{target_seq} is {t} on the target, behind the source's {s}"
        );
    }
    assert_eq!(tables(&ops).await, ["public.audit"]);
    let columns: Vec<String> = crm
        .query(
            "SELECT column_name || ' ' || data_type FROM information_schema.columns
             WHERE table_schema = 'crm' AND table_name = 'clients' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "id integer",
            "region text",
            "mail text",
            "card text",
            "phone text",
            "tier text"
        ]
    );
    let key: String = crm
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'crm.clients'::regclass AND contype = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "PRIMARY KEY (id)");

    // The jsonl sink saw the same shape, and nothing of the other set.
    let lines = read_jsonl(&out);
    let tables_seen: std::collections::BTreeSet<String> = lines
        .iter()
        .filter_map(|l| {
            Some(format!(
                "{}.{}",
                l.get("schema")?.as_str()?,
                l.get("table")?.as_str()?
            ))
        })
        .collect();
    assert_eq!(
        tables_seen.into_iter().collect::<Vec<_>>(),
        ["crm.clients", "crm.issues", "public.orders"]
    );
    let inserted = lines
        .iter()
        .find(|l| l["kind"] == "insert" && l["new"]["id"] == 1001)
        .expect("the insert of customer 1001");
    let want_mail: String = expected_db
        .query_one(
            "SELECT encode(hmac('new@example.com', $1, 'sha256'), 'hex')",
            &[&HASH_KEY],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inserted["new"]["mail"], want_mail.as_str());
    assert_eq!(inserted["new"]["card"], "************8888");
    assert!(inserted["new"].get("note").is_none() && inserted["new"].get("email").is_none());
    assert!(
        !lines
            .iter()
            .any(|l| l["kind"] == "insert" && l["new"]["id"] == 1002),
        "a row outside the filter reached the jsonl sink"
    );

    // `walrelay status` and `walrelay check` show the sets.
    // `walrelay status` and `walrelay check` show the sets (check also finds the slot in
    // use by the running relay, so it reports a problem).
    for command in ["status", "check"] {
        let o = walrelay_with_config(command, &cfg);
        let stdout = String::from_utf8_lossy(&o.stdout);
        if command == "status" {
            assert!(
                o.status.success(),
                "{stdout}{}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                stdout.contains("set      crm: 3 table(s)")
                    && stdout
                        .contains("public.customers -> crm.clients (filtered, columns shaped)")
                    && stdout.contains("; 2 sequence(s); sinks: crm, jsonl, amqp")
                    && stdout.contains(
                        "set      ops: 1 table(s): public.audit; 1 sequence(s); sinks: ops"
                    ),
                "{stdout}"
            );
        } else {
            assert!(
                stdout.contains("set \"crm\": 3 table(s), 3 filtered, renamed or transformed")
                    && stdout.contains("1 row filter(s) accepted by the source"),
                "{stdout}"
            );
        }
    }

    relay.assert_running();
    consumer.stop().await;
    relay.stop().await;
}

/// A table added to a set (config change and restart) is copied alone while writes go on:
/// the other tables are not copied again, and the new one has no gap and no overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_set_is_copied_alone() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    source.batch_execute(SOURCE).await.unwrap();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let write = |tables: &str| {
        let text = format!(
            "[source]\nurl = \"{}\"\nspill_dir = \"{}\"\n\n[[set]]\nname = \"s\"\ntables = [{tables}]\n\n[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n",
            source_pg.url("app"),
            dir.path().join("spill").display(),
            target_pg.url("app")
        );
        let path = dir.path().join("walrelay.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let cfg = write("\"public.orders\"");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    wait_until_equal(&source, &target, &["orders"], &mut relay).await;
    let copied_before: String = target
        .query_one(
            "SELECT lsn::text FROM walrelay.copies WHERE table_name = 'orders'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|e| panic!("walrelay.copies: {e}"));
    relay.stop().await;

    // Writes go on while the relay is down and while it copies the new table.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = write_until(
        source_pg.client("app").await,
        stop.clone(),
        Duration::from_millis(5),
        |i| {
            format!(
                "INSERT INTO audit (what) VALUES ('w{i}'); UPDATE orders SET amount = amount + 1 WHERE id = {};",
                i % 500 + 1
            )
        },
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = write("\"public.orders\", \"public.audit\"");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.await.unwrap() > 10, "the writes ran");
    wait_until_equal(&source, &target, &["orders", "audit"], &mut relay).await;
    let copied_after: String = target
        .query_one(
            "SELECT lsn::text FROM walrelay.copies WHERE table_name = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copied_before, copied_after, "orders was copied again");
    let (s, t) = (
        last_value(&source, "public.audit_id_seq").await,
        last_value(&target, "public.audit_id_seq").await,
    );
    assert!(
        t >= s,
        "the target's sequence ({t}) is behind the source's ({s})"
    );
    let log = relay.stop().await;
    assert!(
        log.contains("tables=1"),
        "one table copied at the restart:\n{log}"
    );

    // Taken out of the set, audit stops following the source; the rest goes on.
    let cfg = write("\"public.orders\"");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    source
        .batch_execute(
            "INSERT INTO audit (what) VALUES ('unseen'); UPDATE orders SET amount = 0 WHERE id = 1",
        )
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["orders"], &mut relay).await;
    let log = relay.stop().await;
    assert!(log.contains("no longer replicated"), "{log}");
    let unseen: i64 = target
        .query_one("SELECT count(*) FROM audit WHERE what = 'unseen'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(unseen, 0, "a table out of the set got a change");
    // Put back, it must be copied anew: over its stale rows that is refused, with the fix.
    let cfg = write("\"public.orders\", \"public.audit\"");
    let refused = Relay::start(&cfg).wait_for_failure().await;
    assert!(
        refused.contains("TRUNCATE") && refused.contains("audit"),
        "{refused}"
    );
    target.batch_execute("TRUNCATE audit").await.unwrap();
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    wait_until_equal(&source, &target, &["orders", "audit"], &mut relay).await;
    relay.stop().await;
}

/// Filters that would break the application or that the server refuses stop the relay at
/// start with the fix spelled out, and leave the publication as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_filter_outside_the_key_or_not_immutable_is_refused_at_start() {
    let pg = TestPg::start();
    let source = pg.create_db("app").await;
    source.batch_execute(SOURCE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (filter, identity, said) in [
        ("region = 'eu'", "", "outside the replica identity"),
        (
            "id > extract(epoch from now())",
            "identity = \"full\"",
            "refuses the row filter",
        ),
    ] {
        let text = format!(
            "[source]\nurl = \"{}\"\nspill_dir = \"{}\"\n\n[[set]]\nname = \"s\"\n\n[[set.table]]\nname = \"public.customers\"\nwhere = \"{filter}\"\n{identity}\n\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
            pg.url("app"),
            dir.path().join("spill").display(),
            dir.path().join("out.jsonl").display()
        );
        let cfg = dir.path().join("walrelay.toml");
        std::fs::write(&cfg, text).unwrap();
        // `check` finds the problem beforehand (trying the publication and rolling it
        // back), and says what the relay will change on the source.
        let (code, stdout) = walrelay_check(&cfg);
        assert_eq!(code, Some(1), "{stdout}");
        assert!(
            stdout.contains("PROBLEM") && stdout.contains(said),
            "{stdout}"
        );
        if !identity.is_empty() {
            assert!(
                stdout.contains("table public.customers gets REPLICA IDENTITY FULL at start"),
                "{stdout}"
            );
        }
        let log = Relay::start(&cfg).wait_for_failure().await;
        assert!(log.contains(said), "{filter}: {log}");
        assert!(log.contains("customers"), "the table is named: {log}");
        // The application's writes still work: nothing was left half-made.
        source
            .batch_execute("UPDATE customers SET tier = tier WHERE id = 1; DELETE FROM customers WHERE id = 300")
            .await
            .unwrap();
        let published: i64 = source
            .query_one(
                "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'customers'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(published, 0, "{filter}: the refused filter was rolled back");
    }
}

/// A → B → C under writes: B, a target kept write-protected, is itself the source of a
/// second relay; C ends equal to A, and B refuses writes from anyone but its relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_a_to_b_to_c_under_writes_ends_with_c_equal_to_a() {
    let (a_pg, b_pg, c_pg) = (TestPg::start(), TestPg::start(), TestPg::start());
    let a = a_pg.create_db("app").await;
    a.batch_execute(SOURCE).await.unwrap();
    let b = b_pg.create_db("app").await;
    let c = c_pg.create_db("app").await;
    let tables = ["customers", "orders", "audit", "tickets"];
    let patterns: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
    let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
    let (dir_ab, dir_bc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ab = postgres_config(
        dir_ab.path(),
        &a_pg.url("app"),
        &b_pg.url("app"),
        &patterns,
        "protect = true",
    );
    let bc = postgres_config(
        dir_bc.path(),
        &b_pg.url("app"),
        &c_pg.url("app"),
        &patterns,
        "",
    );
    let mut relay_ab = Relay::start(&ab);
    wait_until_streaming(&a, &mut relay_ab).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = write_until(
        a_pg.client("app").await,
        stop.clone(),
        Duration::from_millis(4),
        |i| {
            format!(
                "BEGIN;
                 INSERT INTO audit (what) VALUES ('w{i}');
                 UPDATE customers SET region = CASE region WHEN 'eu' THEN 'us' ELSE 'eu' END WHERE id = {};
                 INSERT INTO orders VALUES ({}, 1, 1.00, 'l') ON CONFLICT (id) DO UPDATE SET amount = orders.amount + 1;
                 DELETE FROM tickets WHERE id = {i};
                 COMMIT;",
                i % 300 + 1,
                1000 + i % 50,
            )
        },
    );
    // B's tables exist once its copy is done; then B is a source in its turn.
    wait_for_count(
        &b,
        "SELECT count(*) FROM walrelay.copies WHERE state = 'done'",
        tables.len() as i64,
        "B's copy",
    )
    .await;
    let mut relay_bc = Relay::start(&bc);
    wait_until_streaming(&b, &mut relay_bc).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.await.unwrap() > 20, "the writes ran");

    wait_until_equal(&a, &b, &tables, &mut relay_ab).await;
    wait_until_equal(&a, &c, &tables, &mut relay_bc).await;
    let refused = b
        .batch_execute("UPDATE orders SET amount = 0 WHERE id = 1")
        .await
        .expect_err("B's tables refuse writes from others than the relay");
    assert!(
        format!("{refused:?}").contains("walrelay"),
        "the refusal names walrelay: {refused:?}"
    );
    relay_bc.stop().await;
    relay_ab.stop().await;
}
