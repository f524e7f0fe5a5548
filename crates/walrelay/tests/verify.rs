//! `walrelay verify`: differences made behind the relay's back on the target are found and
//! named by key in a table of 1,000,000 rows, rows still in flight are not reported while
//! the relay is behind under writes, sets are compared as the target should hold them,
//! `--repair` puts the differences right under writes, and what cannot be compared says so.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value as J;
use walrelay_testkit::TestPg;

use crate::support::*;

const SOURCE: &str = "
    CREATE TABLE t (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
    INSERT INTO t SELECT g, 'row ' || g, 0 FROM generate_series(1, 1000000) g;
    CREATE TABLE people (id bigint PRIMARY KEY, region text NOT NULL, card text, born date);
    INSERT INTO people SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END,
                              '4000-1234-' || lpad(g::text, 4, '0'), date '1970-01-01' + g
                       FROM generate_series(1, 2000) g;
    CREATE TABLE nokey (v text);
";

fn verify_config(dir: &std::path::Path, source: &str, target: &str) -> std::path::PathBuf {
    let text = format!(
        r#"[source]
url = "{source}"
spill_dir = "{spill}"
status_interval = "200ms"

[[set]]
name = "main"
tables = ["public.t", "public.nokey"]

[[set.table]]
name = "public.nokey"
identity = "full"

[[set]]
name = "eu"
tables = []

[[set.table]]
name = "public.people"
where = "region = 'eu'"
identity = "full"
target = "public.eu_people"
rename_columns = {{ born = "birthday" }}
transform = {{ card = {{ mask = 4 }} }}

[[sink]]
type = "postgres"
url = "{target}"
"#,
        spill = dir.join("spill").display()
    );
    let path = dir.join("walrelay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn verify_command(cfg: &std::path::Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["verify", "--config"]).arg(cfg).args(args);
    c
}

async fn run_verify(cfg: &std::path::Path, args: &[&str]) -> (Option<i32>, J, String) {
    let mut c = verify_command(cfg, args);
    c.arg("--json");
    let out: Output = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc: J = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), doc, stderr)
}

/// `(table, kind, key)` of every difference in a JSON report, sorted.
fn found(doc: &J) -> Vec<(String, String, String)> {
    let mut all = Vec::new();
    for t in doc["tables"].as_array().unwrap() {
        for d in t["differences"].as_array().unwrap() {
            let key: Vec<&str> = d["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap())
                .collect();
            all.push((
                t["target"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
                key.join(","),
            ));
        }
    }
    all.sort();
    all
}

fn table<'a>(doc: &'a J, target: &str) -> &'a J {
    doc["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == target)
        .unwrap_or_else(|| panic!("no {target} in {doc}"))
}

/// Updates spread rows of `table` (ids 1..=`rows`, column `v`) one transaction at a time
/// until `stop`.
fn writer(
    client: tokio_postgres::Client,
    table: &'static str,
    rows: i64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    walrelay::task::spawn_named("test-writes", async move {
        let mut i = 0i64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            client
                .batch_execute(&format!(
                    "UPDATE {table} SET v = 'w{i}' WHERE id = {}",
                    (i * 7919) % rows + 1
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        i
    })
}

fn signal(relay: &Relay, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(relay.pid()), signal).unwrap();
}

/// `verify --json ARGS` run while the relay stops applying for 3 s (SIGSTOP, then
/// SIGCONT): the target is behind for every range the source's writes touch meanwhile.
async fn verify_while_paused(
    cfg: &std::path::Path,
    args: &[&str],
    relay: &Relay,
) -> (Option<i32>, J) {
    signal(relay, nix::sys::signal::Signal::SIGSTOP);
    let verifying = {
        let mut c = verify_command(cfg, args);
        c.arg("--json");
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(relay, nix::sys::signal::Signal::SIGCONT);
    let out = verifying.await.unwrap();
    let doc: J = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code(), doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_what_differs_in_a_million_rows_ignores_what_is_in_flight_and_repairs_it() {
    let (src_pg, dst_pg) = (TestPg::start(), TestPg::start());
    let src = src_pg.create_db("app").await;
    src.batch_execute(SOURCE).await.unwrap();
    let dst = dst_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = verify_config(dir.path(), &src_pg.url("app"), &dst_pg.url("app"));
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&src, &mut relay).await;
    wait_for_count(&dst, "SELECT count(*) FROM t", 1_000_000, "the copy of t").await;

    // All equal: exit 0, every row counted, the sets' table compared as shaped.
    let (code, doc, stderr) = run_verify(&cfg, &[]).await;
    assert_eq!(code, Some(2), "nokey cannot be compared: {doc}\n{stderr}");
    assert_eq!(found(&doc), vec![], "{doc}");
    assert_eq!(table(&doc, "public.t")["rows"], 1_000_000, "{doc}");
    assert_eq!(table(&doc, "public.eu_people")["rows"], 1000, "{doc}");
    assert!(
        table(&doc, "public.nokey")["not_compared"]
            .as_str()
            .unwrap()
            .contains("no primary key"),
        "{doc}"
    );
    let only_keyed = ["--table", "public.t", "--table", "public.eu_people"];
    let (code, doc, _) = run_verify(&cfg, &only_keyed).await;
    assert_eq!(code, Some(0), "{doc}");

    // Behind the relay's back on the target: a changed, a deleted and an extra row in t;
    // a changed (masked) value and an extra row in the shaped table.
    dst.batch_execute(
        "UPDATE t SET v = 'tampered' WHERE id = 600001;
         DELETE FROM t WHERE id = 700002;
         INSERT INTO t VALUES (1000005, 'extra', 0);
         UPDATE eu_people SET card = '4000-1234-0042' WHERE id = 42;
         INSERT INTO eu_people VALUES (3, 'eu', 'x', '2000-01-01')",
    )
    .await
    .unwrap();
    // And on the source, under a write load, a relay that stops applying for a while: the
    // target is behind for every range the writes touch.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(src_pg.client("app").await, "t", 200_000, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, doc) = verify_while_paused(&cfg, &only_keyed, &relay).await;
    let expected = vec![
        (
            "public.eu_people".to_string(),
            "changed".to_string(),
            "42".to_string(),
        ),
        ("public.eu_people".into(), "extra".into(), "3".into()),
        ("public.t".into(), "changed".into(), "600001".into()),
        ("public.t".into(), "extra".into(), "1000005".into()),
        ("public.t".into(), "missing".into(), "700002".into()),
    ];
    assert_eq!(found(&doc), expected, "{doc}");
    assert_eq!(code, Some(1), "{doc}");
    let changed = table(&doc, "public.eu_people")["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "changed")
        .unwrap()
        .clone();
    assert_eq!(
        changed["column_names"],
        serde_json::json!(["card"]),
        "{doc}"
    );
    assert!(
        table(&doc, "public.t")["unsettled"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{doc}"
    );

    // Repair under the same writes; then nothing differs, and the target equals the source.
    let (code, doc, stderr) = run_verify(&cfg, &[&only_keyed[..], &["--repair"]].concat()).await;
    let repairs: Vec<String> = doc["tables"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["differences"].as_array().unwrap().clone())
        .map(|d| d["repair"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(code, Some(0), "{repairs:?}\n{doc}\n{stderr}");
    let mut repairs_sorted = repairs.clone();
    repairs_sorted.sort();
    assert_eq!(
        repairs_sorted,
        vec!["deleted", "deleted", "inserted", "updated", "updated"],
        "{doc}"
    );
    let (code, doc, _) = run_verify(&cfg, &only_keyed).await;
    assert_eq!((code, found(&doc)), (Some(0), vec![]), "{doc}");
    stop.store(true, Ordering::Relaxed);
    let written = writes.await.unwrap();
    assert!(written > 0);
    wait_until_equal(&src, &dst, &["t"], &mut relay).await;
    let card: String = dst
        .query_one("SELECT card FROM eu_people WHERE id = 42", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(card, "**********0042");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_says_it_cannot_tell_when_the_relay_does_not_catch_up() {
    let (src_pg, dst_pg) = (TestPg::start(), TestPg::start());
    let src = src_pg.create_db("app").await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'a' FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let dst = dst_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &src_pg.url("app"),
        &dst_pg.url("app"),
        &["public.t"],
        "",
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&src, &mut relay).await;
    wait_for_count(&dst, "SELECT count(*) FROM t", 100, "the copy").await;
    relay.stop().await;
    // Written while no relay runs: the target is behind and stays so.
    src.batch_execute("UPDATE t SET v = 'b' WHERE id = 7")
        .await
        .unwrap();
    let (code, doc, stderr) = run_verify(&cfg, &["--wait", "2s"]).await;
    assert_eq!(code, Some(2), "{doc}\n{stderr}");
    assert_eq!(found(&doc), vec![], "{doc}");
    let unsettled = table(&doc, "public.t")["unsettled"].to_string();
    assert!(unsettled.contains("did not apply past"), "{doc}");
    // A target that lacks the table is a difference; a config error cannot run.
    let other = tempfile::tempdir().unwrap();
    let empty = dst_pg.create_db("empty").await;
    drop(empty);
    let cfg2 = postgres_config(
        other.path(),
        &src_pg.url("app"),
        &dst_pg.url("empty"),
        &["public.t"],
        "",
    );
    let (code, doc, _) = run_verify(&cfg2, &[]).await;
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(table(&doc, "public.t")["missing_table"], true, "{doc}");
    let (code, _, _) = {
        let out = verify_command(&cfg, &["--table", "public.nothing"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no replicated table matches"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), (), ())
    };
    assert_eq!(code, Some(2));
}

/// Trigger capture (a source at `wal_level = replica`, a non-superuser owner): the position
/// a round waits for is a batch. A difference on an idle source is proven within `--wait`
/// (the idle relay, which ticks only when notified, is woken); differences are named, and
/// nothing in flight, while a writer runs and the relay stops for 3 s; `--repair` puts
/// them right; with the relay stopped, ranges are left unsettled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_trigger_capture_waits_for_batches() {
    let source = crate::trigger::Source::start().await;
    source
        .clerk
        .batch_execute("INSERT INTO load SELECT g, 'row ' || g FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    let target_pg = TestPg::start();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    // The idle relay looks at the log only every 30 s: a tick within --wait needs the
    // notification.
    let cfg = crate::trigger::trigger_config(
        dir.path(),
        &source,
        &["public.load"],
        "status_interval = \"30s\"",
        &target_pg,
    );
    let mut relay = Relay::start(&cfg);
    wait_for_count(&target, "SELECT count(*) FROM load", 20_000, "the copy").await;
    let (code, doc, stderr) = run_verify(&cfg, &[]).await;
    assert_eq!((code, found(&doc)), (Some(0), vec![]), "{doc}\n{stderr}");
    assert_eq!(table(&doc, "public.load")["rows"], 20_000, "{doc}");

    target
        .batch_execute("UPDATE load SET v = 'tampered' WHERE id = 15001")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, doc, stderr) = run_verify(&cfg, &["--wait", "20s"]).await;
    assert_eq!(
        (code, found(&doc)),
        (
            Some(1),
            vec![("public.load".into(), "changed".into(), "15001".into())]
        ),
        "{doc}\n{stderr}"
    );

    target
        .batch_execute(
            "DELETE FROM load WHERE id = 16002; INSERT INTO load VALUES (20005, 'extra')",
        )
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clerk = tokio_postgres::connect(
        &format!(
            "postgresql://clerk:cl3rk@127.0.0.1:{}/app",
            source.pg.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .map(|(client, conn)| {
        walrelay::task::spawn_named("test-conn", conn);
        client
    })
    .unwrap();
    let writes = writer(clerk, "load", 5_000, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, doc) = verify_while_paused(&cfg, &["--chunk-rows", "1000"], &relay).await;
    assert_eq!(
        found(&doc),
        vec![
            (
                "public.load".to_string(),
                "changed".to_string(),
                "15001".to_string()
            ),
            ("public.load".into(), "extra".into(), "20005".into()),
            ("public.load".into(), "missing".into(), "16002".into()),
        ],
        "{doc}"
    );
    assert_eq!(code, Some(1), "{doc}");

    let (code, doc, stderr) = run_verify(&cfg, &["--repair"]).await;
    assert_eq!(code, Some(0), "{doc}\n{stderr}");
    assert_eq!(found(&doc).len(), 3, "{doc}");
    stop.store(true, Ordering::Relaxed);
    assert!(writes.await.unwrap() > 0);
    let (code, doc, _) = run_verify(&cfg, &[]).await;
    assert_eq!((code, found(&doc)), (Some(0), vec![]), "{doc}");
    wait_until_equal(&source.admin, &target, &["load"], &mut relay).await;

    // No relay: what the source changed since cannot be settled.
    relay.stop().await;
    source
        .clerk
        .batch_execute("UPDATE load SET v = 'later' WHERE id = 7")
        .await
        .unwrap();
    let (code, doc, stderr) = run_verify(&cfg, &["--wait", "2s"]).await;
    assert_eq!((code, found(&doc)), (Some(2), vec![]), "{doc}\n{stderr}");
    let unsettled = table(&doc, "public.load")["unsettled"].to_string();
    assert!(
        unsettled.contains("did not apply past the source's snapshot"),
        "{doc}"
    );
}
