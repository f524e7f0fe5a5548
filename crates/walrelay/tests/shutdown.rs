//! One shutdown path: a signal stops the relay in any phase — inside the initial copy too —
//! keeping what can be resumed; a failed copy worker stops the others; a second signal
//! exits at once.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use walrelay_testkit::{wait_for, TestPg};

use crate::support::*;

fn signal(relay: &Relay, sig: Signal) {
    kill(Pid::from_raw(relay.pid()), sig).unwrap();
}

async fn wait_for_log(relay: &mut Relay, text: &str) {
    wait_for(text, Duration::from_secs(60), || {
        let log = relay.stderr();
        let found = log.contains(text);
        async move { found.then_some(()) }
    })
    .await;
}

/// A source with tables `a` and `b` (some rows each), empty tables on the target, and a
/// config copying them with two workers.
async fn copy_scene(
    target_b: &str,
) -> (
    TestPg,
    TestPg,
    tokio_postgres::Client,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let (source_pg, target_pg) = (TestPg::start(), TestPg::start());
    let source = source_pg.create_db("app").await;
    let target = target_pg.create_db("app").await;
    source
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY, v text);
             CREATE TABLE b (id int PRIMARY KEY, v text);
             INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 1000) g;
             INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    target
        .batch_execute(&format!(
            "CREATE TABLE a (id int PRIMARY KEY, v text); {target_b}"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "[[sink]]\ntype = \"postgres\"\nurl = \"{}\"\n\n[snapshot]\nparallel = 2\n",
        target_pg.url("app")
    );
    let cfg = relay_config_file(
        dir.path(),
        &source_pg.url("app"),
        &["public.a", "public.b"],
        "",
        &sink,
    );
    (source_pg, target_pg, source, dir, cfg)
}

/// The copy of `a` waits on a lock the test holds (SHARE: catalog reads and SELECT pass,
/// COPY into it waits); SIGTERM stops the relay anyway, cleanly,
/// and the next run finishes the copy.
#[tokio::test]
async fn a_signal_stops_the_initial_copy_and_the_next_run_finishes_it() {
    let (_s, target_pg, source, _dir, cfg) =
        copy_scene("CREATE TABLE b (id int PRIMARY KEY, v text);").await;
    let lock = target_pg.client("app").await;
    lock.batch_execute("BEGIN; LOCK TABLE a IN SHARE MODE")
        .await
        .unwrap();
    let mut relay = Relay::start(&cfg);
    wait_for_log(&mut relay, "copying existing rows").await;
    let log = relay.stop().await;
    assert!(log.contains("copy stopped"), "{log}");
    lock.batch_execute("COMMIT").await.unwrap();
    let target = target_pg.client("app").await;
    let done: i64 = target
        .query_one(
            "SELECT count(*) FROM walrelay.copies WHERE table_name = 'a' AND state = 'done'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    assert_eq!(done, 0, "a was not recorded as copied");

    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&source, &mut relay).await;
    source
        .batch_execute("INSERT INTO a VALUES (0, 'after')")
        .await
        .unwrap();
    wait_until_equal(&source, &target, &["a", "b"], &mut relay).await;
    relay.stop().await;
}

/// One worker fails (the target refuses `b`'s rows); the other, stuck on a lock, is
/// stopped rather than waited for, and the error names the table.
#[tokio::test]
async fn a_failed_copy_worker_stops_the_others() {
    let (_s, target_pg, _source, _dir, cfg) =
        copy_scene("CREATE TABLE b (id int PRIMARY KEY CHECK (id < 0), v text);").await;
    let lock = target_pg.client("app").await;
    lock.batch_execute("BEGIN; LOCK TABLE a IN SHARE MODE")
        .await
        .unwrap();
    let log = Relay::start(&cfg).wait_for_failure().await;
    assert!(
        log.contains("copying public.b") || log.contains("copying b"),
        "{log}"
    );
    lock.batch_execute("ROLLBACK").await.unwrap();
}

/// The first SIGTERM asks the sinks to finish; while a target commit hangs on a lock, a
/// second one exits at once.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let (_source_pg, target_pg, source, target, _dir, mut relay) =
        crate::apply::replicate("CREATE TABLE t (id int PRIMARY KEY)", &["public.t"], "").await;
    let lock = target_pg.client("app").await;
    lock.batch_execute("BEGIN; LOCK TABLE walrelay.progress IN EXCLUSIVE MODE")
        .await
        .unwrap();
    source
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    wait_for_count(
        &target,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walrelay %' AND wait_event_type = 'Lock'",
        1,
        "the relay's commit waiting on the lock",
    )
    .await;
    signal(&relay, Signal::SIGTERM);
    wait_for_log(&mut relay, "SIGTERM: stopping").await;
    relay.assert_running();
    signal(&relay, Signal::SIGINT);
    let status = relay.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(130), "{}", relay.stderr());
    lock.batch_execute("ROLLBACK").await.unwrap();
}
