//! Durability: a huge transaction streams through in bounded memory, and kill -9 at random
//! moments loses nothing that was acknowledged.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value as J;
use walrelay_testkit::TestPg;

use crate::support::*;

/// Parse a JSONL file line by line (for files too large to hold as JSON values).
fn for_each_line(path: &std::path::Path, mut f: impl FnMut(J)) {
    let reader = BufReader::new(File::open(path).unwrap());
    for line in reader.lines() {
        let line = line.unwrap();
        if let Ok(v) = serde_json::from_str(&line) {
            f(v);
        }
    }
}

/// The last complete line of a file, read from its end.
fn last_line(path: &std::path::Path) -> Option<J> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(256 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    let complete = &tail[..tail.rfind('\n')?];
    serde_json::from_str(complete.rsplit('\n').next()?).ok()
}

#[tokio::test]
async fn a_million_row_transaction_streams_through_in_bounded_memory() {
    let pg = TestPg::start();
    let Scene {
        db,
        out,
        mut relay,
        dir: _dir,
        ..
    } = Scene::start(
        &pg,
        "CREATE TABLE big (id int PRIMARY KEY, payload text)",
        &["public.big"],
        "",
    )
    .await;

    db.batch_execute("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        relay.assert_running();
        if last_line(&out).is_some_and(|l| l["kind"] == "commit") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the big transaction did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let peak_kb = relay.peak_rss_kb();
    println!(
        "peak RSS of the relay through a 1,000,000-row transaction: {} MB",
        peak_kb / 1024
    );

    let (mut begins, mut commits, mut next_id) = (0, 0, 1i64);
    for_each_line(&out, |l| match l["kind"].as_str().unwrap() {
        "begin" => begins += 1,
        "commit" => commits += 1,
        // The table was empty when the slot was made.
        "snapshot_end" => assert_eq!(l["rows"], 0),
        "insert" => {
            assert_eq!(
                l["new"]["id"].as_i64().unwrap(),
                next_id,
                "rows in order, none missing"
            );
            assert_eq!(l["seq"].as_i64().unwrap(), next_id);
            next_id += 1;
        }
        other => panic!("unexpected event {other}"),
    });
    assert_eq!((begins, commits, next_id - 1), (1, 1, 1_000_000));
    let log = relay.stop().await;
    assert!(
        log.contains("streamed transaction committed"),
        "the server streamed it:\n{log}"
    );
    assert!(peak_kb < 200 * 1024, "peak RSS {peak_kb} kB is over 200 MB");
}

#[tokio::test]
async fn an_aborted_streamed_transaction_leaves_no_trace() {
    let pg = TestPg::builder()
        .setting("logical_decoding_work_mem", "'64kB'")
        .start();
    let Scene {
        db,
        out,
        mut relay,
        dir: _dir,
        ..
    } = Scene::start(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        &["public.t"],
        "",
    )
    .await;
    // Large enough to be streamed; rolled back. Then one with an aborted subtransaction.
    db.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 20000) g; ROLLBACK;",
    )
    .await
    .unwrap();
    db.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 'kept' FROM generate_series(1, 5000) g;
         SAVEPOINT s;
         INSERT INTO t SELECT g, 'rolled back' FROM generate_series(5001, 15000) g;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO t SELECT g, 'kept' FROM generate_series(20001, 25000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    db.batch_execute("SELECT pg_logical_emit_message(false, 'done', '')")
        .await
        .unwrap();
    let lines = wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    let inserts: Vec<&J> = lines.iter().filter(|l| l["kind"] == "insert").collect();
    assert_eq!(inserts.len(), 10_000);
    assert!(inserts.iter().all(|l| l["new"]["v"] == "kept"));
    let begins = lines.iter().filter(|l| l["kind"] == "begin").count();
    assert_eq!(begins, 1, "the rolled-back transaction left nothing");
    let log = relay.stop().await;
    assert!(log.contains("streamed transaction committed"), "{log}");
}

/// A write load: single-row transactions with increasing ids, and now and then a
/// multi-row one. Records the ids of acknowledged commits.
pub async fn start_load(
    pg: &TestPg,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<i64>>>) {
    let committed = Arc::new(Mutex::new(Vec::new()));
    let record = committed.clone();
    let client = pg.client("app").await;
    let task = walrelay::task::spawn_named("test-load", async move {
        let mut id = 0i64;
        while !stop.load(Ordering::Relaxed) {
            let n = if id % 10 == 0 { 3 } else { 1 };
            let ids: Vec<i64> = (id + 1..=id + n).collect();
            client
                .execute(
                    "INSERT INTO load (id, v) SELECT x, 'v' || x FROM unnest($1::int8[]) x",
                    &[&ids],
                )
                .await
                .unwrap();
            client
                .execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
                .await
                .unwrap();
            record.lock().unwrap().extend(&ids);
            id += n;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (task, committed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let pg = TestPg::start();
    // The slot must exist before the load, or the first changes are not captured.
    let Scene {
        db,
        dir,
        out,
        cfg,
        relay,
    } = Scene::start(
        &pg,
        "CREATE TABLE load (id int8 PRIMARY KEY, v text);
         CREATE TABLE counter (id int PRIMARY KEY, n int8);
         INSERT INTO counter VALUES (1, 0);",
        &["public.load", "public.counter"],
        "status_interval = \"100ms\"",
    )
    .await;
    relay.kill9().await;
    // A second sink on standard output: it has no memory of its own, so it shows exactly
    // what the source sends again after each crash.
    let text = std::fs::read_to_string(&cfg).unwrap()
        + "\n[[sink]]\ntype = \"jsonl\"\nname = \"stdout\"\npath = \"-\"\n";
    std::fs::write(&cfg, text).unwrap();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("random seed {seed}");
    let mut rng = seed | 1;
    let mut next = move |bound: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % bound
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (load, committed) = start_load(&pg, stop.clone()).await;

    // confirmed[k]: the slot's position when run k started.
    let mut confirmed = vec![confirmed_flush(&db, "walrelay").await];
    let mut runs = Vec::new();
    let mut streaming_when_killed = 0;
    for k in 0..12 {
        let stdout_path = dir.path().join(format!("stdout-{k}.jsonl"));
        let relay = Relay::start_with_stdout(&cfg, File::create(&stdout_path).unwrap());
        tokio::time::sleep(Duration::from_millis(100 + next(1500))).await;
        if relay.kill9().await.contains("source ready") {
            streaming_when_killed += 1;
        }
        runs.push(stdout_path);
        confirmed.push(confirmed_flush(&db, "walrelay").await);
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    db.batch_execute("SELECT pg_logical_emit_message(false, 'done', '')")
        .await
        .unwrap();
    let final_stdout = dir.path().join("stdout-final.jsonl");
    let mut relay = Relay::start_with_stdout(&cfg, File::create(&final_stdout).unwrap());
    wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    relay.stop().await;
    runs.push(final_stdout);
    confirmed.push(confirmed_flush(&db, "walrelay").await);

    let committed: Vec<i64> = committed.lock().unwrap().clone();
    assert!(
        committed.len() > 100,
        "the load ran ({} rows)",
        committed.len()
    );

    // The file sink: every committed row exactly once, every position once, in order.
    let lines = read_jsonl(&out);
    for w in lines.windows(2) {
        assert!(
            position(&w[0]) < position(&w[1]),
            "file: positions increase: {} then {}",
            w[0],
            w[1]
        );
    }
    // The snapshot (the counter's one row) was read once, before the crashes; no restart
    // read it again.
    let snapshot: Vec<&str> = lines
        .iter()
        .map(|l| l["kind"].as_str().unwrap())
        .filter(|k| *k == "read" || *k == "snapshot_end")
        .collect();
    assert_eq!(snapshot, ["read", "snapshot_end"]);
    assert_eq!(lines[0]["new"], serde_json::json!({"id": 1, "n": 0}));
    let inserted: Vec<i64> = lines
        .iter()
        .filter(|l| l["kind"] == "insert" && l["table"] == "load")
        .map(|l| l["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        inserted, committed,
        "file: every committed row once, in commit order"
    );
    let counters: Vec<i64> = lines
        .iter()
        .filter(|l| l["kind"] == "update")
        .map(|l| l["new"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        counters,
        (1..=counters.len() as i64).collect::<Vec<_>>(),
        "file: counter updates once each, in order"
    );

    // Standard output: repeats only in the unacknowledged tail, and nothing acknowledged
    // missing. All transactions, by commit LSN, from the complete file.
    let all_commits: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l["kind"] == "commit")
        .map(|l| {
            let end: walrelay_model::Lsn = l["end_lsn"].as_str().unwrap().parse().unwrap();
            (position(l).0, end.0)
        })
        .collect();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut seen_commits: BTreeSet<u64> = BTreeSet::new();
    let mut repeats = 0;
    for (k, path) in runs.iter().enumerate() {
        for l in read_jsonl_lenient(path) {
            let pos = position(&l);
            if !seen.insert(pos) {
                repeats += 1;
                assert!(
                    pos.0 >= confirmed[k],
                    "run {k}: repeated {l} lies before the confirmed position {}",
                    walrelay_model::Lsn(confirmed[k])
                );
            }
            if l["kind"] == "commit" {
                seen_commits.insert(pos.0);
            }
        }
        // Everything the slot confirmed by the end of this run was delivered by now.
        let acked = confirmed[k + 1];
        for (commit_lsn, end_lsn) in &all_commits {
            if *end_lsn <= acked {
                assert!(
                    seen_commits.contains(commit_lsn),
                    "run {k}: acknowledged transaction at {commit_lsn} was never delivered"
                );
            }
        }
    }
    assert!(
        confirmed.windows(2).all(|w| w[0] <= w[1]),
        "the slot never moved backwards: {confirmed:?}"
    );
    assert!(
        streaming_when_killed >= 6,
        "most crashes hit a streaming relay ({streaming_when_killed} of 12)"
    );
    println!(
        "{} rows, {} transactions, {} repeated events on stdout across 12 crashes",
        committed.len(),
        all_commits.len(),
        repeats
    );
}

/// The ids of the inserts among `lines`, in order.
fn inserted_ids(lines: &[J]) -> Vec<i64> {
    lines
        .iter()
        .filter(|l| l["kind"] == "insert")
        .map(|l| l["new"]["id"].as_i64().unwrap())
        .collect()
}

/// A relay from table `t` to a file, with row 1 inserted and written.
async fn streaming_row_1(pg: &TestPg) -> Scene {
    let mut scene =
        Scene::start(pg, "CREATE TABLE t (id int PRIMARY KEY)", &["public.t"], "").await;
    scene
        .db
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    wait_for_line(&mut scene.relay, &scene.out, "the first insert", |l| {
        l["kind"] == "insert"
    })
    .await;
    scene
}

#[tokio::test]
async fn a_server_restart_is_ridden_out() {
    let pg = TestPg::start();
    let Scene {
        out,
        mut relay,
        dir: _dir,
        ..
    } = streaming_row_1(&pg).await;

    pg.restart();
    let db = pg.client("app").await;
    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let lines = wait_for_line(&mut relay, &out, "the insert after the restart", |l| {
        l["new"]["id"] == 2
    })
    .await;
    assert_eq!(inserted_ids(&lines), [1, 2]);
    let log = relay.stop().await;
    assert!(log.contains("pipeline interrupted; restarting"), "{log}");
}

/// A reconnect that finds the slot still held — the old connection's server process lives
/// on until the server notices it is gone, up to `wal_sender_timeout` on a half-open
/// connection — is retried rather than ending the relay. Here another client holds the
/// slot for longer than the relay's wait for it (10 s) once the relay's connection broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_rides_out_a_slot_still_held_by_the_old_connection() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let pg = TestPg::start();
    let Scene {
        db,
        out,
        mut relay,
        dir: _dir,
        ..
    } = streaming_row_1(&pg).await;

    // The relay's connection is cut while it cannot notice, and the slot taken meanwhile.
    kill(Pid::from_raw(relay.pid()), Signal::SIGSTOP).unwrap();
    db.batch_execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'walrelay'",
    )
    .await
    .unwrap();
    wait_for_count(
        &db,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay' AND NOT active",
        1,
        "the slot let go",
    )
    .await;
    let bin = walrelay::pg::local::find_bindir().unwrap();
    let mut holder = std::process::Command::new(bin.join("pg_recvlogical"))
        .args([
            "-d",
            &pg.url("app"),
            "--slot",
            "walrelay",
            "--start",
            "--no-loop",
        ])
        .args(["-o", "proto_version=1", "-o", "publication_names=walrelay"])
        .args(["-f", "/dev/null"])
        .spawn()
        .expect("starting pg_recvlogical");
    wait_for_count(
        &db,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walrelay' AND active",
        1,
        "pg_recvlogical holding the slot",
    )
    .await;
    kill(Pid::from_raw(relay.pid()), Signal::SIGCONT).unwrap();
    walrelay_testkit::wait_for(
        "the relay to give up waiting for the slot once, and retry",
        Duration::from_secs(120),
        || {
            let log = relay.stderr();
            let retried = log.contains("pipeline interrupted; restarting")
                && log.contains("is in use by server process");
            async move { retried.then_some(()) }
        },
    )
    .await;
    relay.assert_running();
    let _ = holder.kill();
    let _ = holder.wait();

    db.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let lines = wait_for_line(&mut relay, &out, "the insert once the slot is free", |l| {
        l["new"]["id"] == 2
    })
    .await;
    assert_eq!(inserted_ids(&lines), [1, 2]);
    relay.stop().await;
}

/// Memory is bounded by bytes, not by event counts: 1 MB rows — transactions of 40 sent
/// whole, single rows, and a transaction of 80 streamed — pass through a postgres sink and a file sink while the relay's
/// peak RSS stays under 256 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wide_rows_keep_the_relays_memory_bounded() {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    let schema = "CREATE TABLE wide (id int PRIMARY KEY, payload text)";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let sinks = format!(
        "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n\n[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n",
        target_pg.url("app"),
        out.display()
    );
    let cfg = relay_config_file(
        dir.path(),
        &source_pg.url("app"),
        &["public.wide"],
        "",
        &sinks,
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    // The target holds the rows back at first, so that the queues fill.
    let lock = target_pg.client("app").await;
    lock.batch_execute("BEGIN; LOCK TABLE wide IN SHARE MODE")
        .await
        .unwrap();
    // 1 MB each, compressible on the source (little WAL), whole in the stream.
    let row = "repeat(md5(g::text), 32768)";
    // Transactions of 40 rows: under logical_decoding_work_mem, so sent whole, 40 MB at a
    // time; then single rows.
    for t in 0..8 {
        source
            .batch_execute(&format!(
                "INSERT INTO wide SELECT g, {row} FROM generate_series({}, {}) g",
                t * 40 + 1,
                t * 40 + 40
            ))
            .await
            .unwrap();
    }
    for g in 321..=340 {
        source
            .batch_execute(&format!(
                "INSERT INTO wide SELECT g, {row} FROM (SELECT {g} AS g) s"
            ))
            .await
            .unwrap();
    }
    source
        .batch_execute(&format!(
            "INSERT INTO wide SELECT g, {row} FROM generate_series(1001, 1080) g"
        ))
        .await
        .unwrap();
    source
        .batch_execute("SELECT pg_logical_emit_message(false, 'done', '')")
        .await
        .unwrap();
    // Either everything passed into the file — and waits in memory for the blocked
    // target — or the target's queue filled up and the source waits.
    walrelay_testkit::wait_for(
        "every row in the file, or a full queue",
        Duration::from_secs(120),
        || {
            let n = read_jsonl_lenient(&out)
                .iter()
                .filter(|l| l["kind"] == "insert")
                .count();
            let full = relay.stderr().contains("the sink's queue is full");
            async move { (n == 420 || full).then_some(()) }
        },
    )
    .await;
    relay.assert_running();
    lock.batch_execute("COMMIT").await.unwrap();
    wait_until_equal(&source, &target, &["wide"], &mut relay).await;
    let lines = wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    let inserts = lines.iter().filter(|l| l["kind"] == "insert").count();
    assert_eq!(inserts, 420, "every wide row in the file");
    let peak_kb = relay.peak_rss_kb();
    println!(
        "peak RSS of the relay through 420 rows of 1 MB: {} MB",
        peak_kb / 1024
    );
    relay.stop().await;
    assert!(peak_kb < 256 * 1024, "peak RSS {peak_kb} kB is over 256 MB");
}
