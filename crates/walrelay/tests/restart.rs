//! Exactly once across restarts of the relay: a transaction that a target holds is never
//! applied to it again, whether PostgreSQL sends it again streamed, or the killed relay's
//! target session is still committing it when the new relay starts.

use std::time::Duration;

use walrelay_testkit::{wait_for, TestPg};

use crate::support::*;

/// Sessions of walrelay on a target database, other than the asking one.
const WALRELAY_SESSIONS: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE application_name LIKE 'walrelay%' AND datname = current_database() AND pid <> pg_backend_pid()";

/// The test's own sessions say so, to be told apart from the relay's (the test kit connects
/// as `walrelay` too).
async fn not_walrelay(client: &tokio_postgres::Client) {
    client
        .batch_execute("SET application_name = 'test'")
        .await
        .unwrap();
}

/// Hold the lock that every commit of a sink needs (its progress row), so that the sink's
/// next target commit waits: a commit "in progress" for as long as the test likes.
async fn block_progress_writes(target: &tokio_postgres::Client) {
    target
        .batch_execute("BEGIN; LOCK TABLE walrelay.progress IN EXCLUSIVE MODE")
        .await
        .unwrap();
}

/// Wait until a walrelay session of the target waits on a lock.
async fn wait_for_blocked_commit(target: &tokio_postgres::Client) {
    wait_for(
        "a walrelay commit waiting on the progress lock",
        Duration::from_secs(120),
        || async move {
            let n: i64 = target
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walrelay%' \
                     AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n > 0).then_some(())
        },
    )
    .await;
}

/// Item 1 of the issue "exactly once under every restart": two sinks, one holding a large
/// streamed transaction and the other not, when the relay dies. PostgreSQL sends it again,
/// streamed; the sink that holds it must skip it, the other apply it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_transaction_sent_again_is_skipped_where_it_is_held() {
    let (source_pg, target_pg) = (
        TestPg::builder()
            .setting("logical_decoding_work_mem", "'64kB'")
            .start(),
        TestPg::start(),
    );
    let source = source_pg.create_db("app").await;
    let schema = "CREATE TABLE big (id int PRIMARY KEY, v text)";
    source.batch_execute(schema).await.unwrap();
    let (a, b) = (
        target_pg.create_db("a").await,
        target_pg.create_db("b").await,
    );
    for t in [&a, &b] {
        not_walrelay(t).await;
        t.batch_execute(schema).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        "[[sink]]\ntype = \"postgres\"\nname = \"a\"\nurl = \"{}\"\n\n\
         [[sink]]\ntype = \"postgres\"\nname = \"b\"\nurl = \"{}\"\n",
        target_pg.url("a"),
        target_pg.url("b")
    );
    let cfg = relay_config_file(
        dir.path(),
        &source_pg.url("app"),
        &["public.big"],
        "",
        &sinks,
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;

    // b's commit of the big transaction waits; a commits it.
    let b_lock = target_pg.client("b").await;
    not_walrelay(&b_lock).await;
    block_progress_writes(&b_lock).await;
    source
        .batch_execute(
            "BEGIN;
             INSERT INTO big SELECT g, 'inserted' FROM generate_series(1, 20000) g;
             UPDATE big SET v = 'updated ' || id;
             COMMIT;",
        )
        .await
        .unwrap();
    wait_until_equal(&source, &a, &["big"], &mut relay).await;
    wait_for_blocked_commit(&b).await;
    let first_log = relay.kill9().await;
    assert!(
        first_log.contains("streamed transaction applied"),
        "a applied it while it streamed:\n{first_log}"
    );

    // b's killed session must not commit it: end it, then let go of the lock.
    b.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name LIKE 'walrelay%' AND pid <> pg_backend_pid()",
    )
    .await
    .unwrap();
    wait_for_count(&b, WALRELAY_SESSIONS, 0, "b's walrelay sessions to end").await;
    b_lock.batch_execute("ROLLBACK").await.unwrap();
    let in_b: i64 = b
        .query_one("SELECT count(*) FROM big", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_b, 0, "b does not hold the big transaction");

    // The slot was not confirmed past it (b did not hold it): it comes again.
    let mut relay = Relay::start(&cfg);
    wait_until_equal(&source, &b, &["big"], &mut relay).await;
    source
        .batch_execute("INSERT INTO big VALUES (0, 'after the restart')")
        .await
        .unwrap();
    wait_until_equal(&source, &a, &["big"], &mut relay).await;
    wait_until_equal(&source, &b, &["big"], &mut relay).await;
    let log = relay.stop().await;
    assert!(
        log.contains("streamed transaction committed; reading it back"),
        "the big transaction was sent again and held back whole:\n{log}"
    );
    assert!(!log.contains("conflict"), "{log}");
}

/// Item 2: the relay is killed while its target session waits inside a commit; the new
/// relay waits for that session to end before it reads the position, then goes on. Run
/// with a superuser target (progress in a replication origin and the row) and with a plain
/// role (the row only), and with a large transaction PostgreSQL streams, whose commit
/// waits in a session of its own while the killed relay's main session, and its lock, are
/// gone. The sink's name is long and not ASCII: PostgreSQL cuts and rewrites such an
/// application name, and the fence must still find the old session.
async fn restart_while_the_old_session_commits(plain_role: bool, streamed: bool) {
    let source_pg = TestPg::builder()
        .setting("logical_decoding_work_mem", "64kB")
        .start();
    let target_pg = TestPg::start();
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    not_walrelay(&target).await;
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text)";
    source.batch_execute(schema).await.unwrap();
    target.batch_execute(schema).await.unwrap();
    let target_url = if plain_role {
        target
            .batch_execute(
                "CREATE ROLE applier LOGIN PASSWORD 'not the default pw';
                 GRANT CREATE ON DATABASE app TO applier;
                 GRANT SELECT, INSERT, UPDATE, DELETE ON t TO applier;",
            )
            .await
            .unwrap();
        format!(
            "host=127.0.0.1 port={} user=applier password='not the default pw' dbname=app sslmode=disable",
            target_pg.port()
        )
    } else {
        target_pg.url("app")
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_url,
        &["public.t"],
        "name = \"entrepôt-européen-des-ventes-de-la-région-nord-et-des-îles\"",
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'first' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["t"], &mut relay).await;

    let lock = target_pg.client("app").await;
    not_walrelay(&lock).await;
    block_progress_writes(&lock).await;
    if streamed {
        source
            .batch_execute(
                "INSERT INTO t SELECT g, repeat('in the commit ', 20) FROM generate_series(11, 5000) g",
            )
            .await
            .unwrap();
    } else {
        for id in 11..=20 {
            source
                .execute("INSERT INTO t VALUES ($1, 'in the commit')", &[&id])
                .await
                .unwrap();
        }
    }
    wait_for_blocked_commit(&target).await;
    relay.kill9().await;

    // The old session still waits, with its commit sent. The new relay must wait for it
    // rather than read the position now (or fail on the origin the old session holds).
    let mut relay = Relay::start(&cfg);
    wait_for(
        "the new relay to open its sink",
        Duration::from_secs(60),
        || {
            let log = relay.stderr();
            let done = log.contains("waiting for other walrelay sessions of this sink")
                || log.contains("target ready")
                || log.contains("error");
            async move { done.then_some(()) }
        },
    )
    .await;
    relay.assert_running();
    assert!(
        !relay.stderr().contains("target ready"),
        "the sink opened while the old session was committing:\n{}",
        relay.stderr()
    );
    lock.batch_execute("COMMIT").await.unwrap();
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    source
        .batch_execute("INSERT INTO t SELECT g, 'after' FROM generate_series(5001, 5010) g")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["t"], &mut relay).await;
    let log = relay.stop().await;
    assert!(!log.contains("conflict"), "nothing applied twice:\n{log}");
    assert!(
        log.contains("this relay owns the sink's progress"),
        "the wait ended:\n{log}"
    );
}

#[tokio::test]
async fn a_restart_waits_for_the_killed_relays_commit_with_a_replication_origin() {
    restart_while_the_old_session_commits(false, false).await;
}

#[tokio::test]
async fn a_restart_waits_for_the_killed_relays_commit_with_the_progress_row_only() {
    restart_while_the_old_session_commits(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waits_for_the_killed_relays_streamed_commit() {
    restart_while_the_old_session_commits(true, true).await;
}

/// Kill the relay at the fail point `name` (its `n`th hit) under a write load, restart it,
/// and check the target ends equal to the source: every transaction increments a counter,
/// so a lost or repeated one shows, and a repeated insert stops the sink on its key.
async fn crash_at_failpoint(name: &str, n: u32) {
    let schema = "CREATE TABLE load (id int8 PRIMARY KEY, v text);
                  CREATE TABLE counter (id int PRIMARY KEY, n int8);";
    let (source_pg, _t, source, target, dir, relay) =
        crate::apply::replicate(schema, &["public.load", "public.counter"], "").await;
    source
        .batch_execute("INSERT INTO counter VALUES (1, 0)")
        .await
        .unwrap();
    relay.kill9().await;
    let cfg = dir.path().join("walrelay.toml");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (load, _committed) = crate::durability::start_load(&source_pg, stop.clone()).await;
    let mut armed = Relay::start_with_failpoint("run", &cfg, &format!("{name}:{n}"));
    armed.wait_for_failpoint(name).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let mut relay = Relay::start(&cfg);
    wait_until_equal(&source, &target, &["load", "counter"], &mut relay).await;
    let log = relay.stop().await;
    assert!(!log.contains("conflict"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_apply_before_commit_loses_nothing() {
    crash_at_failpoint(walrelay::failpoint::POSTGRES_BEFORE_COMMIT.name(), 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_commit_before_the_status_update_repeats_nothing() {
    crash_at_failpoint(walrelay::failpoint::POSTGRES_AFTER_COMMIT.name(), 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_a_status_update_loses_nothing() {
    crash_at_failpoint(walrelay::failpoint::BEFORE_STATUS_UPDATE.name(), 5).await;
}

/// A target database set to `synchronous_commit = off`: its COMMIT returns before the WAL
/// is written, so a target crash right after the relay confirmed the source would lose the
/// transaction for good (the source does not send it again). The relay's sessions commit
/// with `on` there: after a crash (immediate stop, with the WAL writer held to every 10 s)
/// the row is on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_crash_loses_nothing_confirmed_where_synchronous_commit_is_off() {
    let source_pg = TestPg::start();
    let target_pg = TestPg::builder().setting("wal_writer_delay", "10s").start();
    let source = source_pg.create_db("app").await;
    source
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let target = target_pg.create_db("app").await;
    target
        .batch_execute("ALTER DATABASE app SET synchronous_commit = off")
        .await
        .unwrap();
    drop(target);
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        &["public.t"],
        "",
    );
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    source
        .batch_execute("INSERT INTO t VALUES (1, 'confirmed before the crash')")
        .await
        .unwrap();
    let committed = current_lsn(&source).await;
    wait_for(
        "the source confirmed past the insert",
        Duration::from_secs(60),
        || async { (confirmed_flush(&source, "walrelay").await >= committed).then_some(()) },
    )
    .await;
    let log = relay.stop().await;
    assert!(
        log.contains("synchronous_commit = off"),
        "the relay says it commits with on:\n{log}"
    );
    target_pg.stop(walrelay::pg::local::StopMode::Immediate);
    target_pg.server.start().unwrap();
    let target = target_pg.client("app").await;
    let n: i64 = target
        .query_one("SELECT count(*) FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the confirmed row survives the target's crash");
}
