//! `walrelay migrate`, `cutover` and `rollback` under an application that writes all the
//! while and follows whichever server takes its writes: no acknowledged write lost, the
//! new side's sequences ahead of every value the old side handed out, the old side
//! read-only and kept current by the reverse stream, and back again; and a migrate
//! process killed with -9 after every phase and every cutover step resumes to the same end.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use walrelay_testkit::{wait_for, TestPg};

use crate::support::*;

const SCHEMA: &str = "
    CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL);
    CREATE TABLE events (id bigserial PRIMARY KEY, account int NOT NULL, amount int NOT NULL,
                         at timestamptz NOT NULL DEFAULT now());
    INSERT INTO accounts (owner) SELECT 'owner ' || g FROM generate_series(1, 1000) g;
    INSERT INTO events (account, amount) SELECT g % 1000 + 1, g FROM generate_series(1, 200000) g;
";

/// Each acknowledged event id with the server that took it (0: source, 1: target).
type Acked = Arc<Mutex<Vec<(i64, usize)>>>;

/// An application writing events one at a time to whichever of the two servers accepts
/// them: on a refused write or a lost session it tries the other. Returns each
/// acknowledged event id with the server (0: source, 1: target) that took it.
fn application(
    urls: [String; 2],
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> tokio::task::JoinHandle<()> {
    walrelay::task::spawn_named("test-application", async move {
        let mut current = 0usize;
        let mut client: Option<tokio_postgres::Client> = None;
        let mut i = 0i32;
        while !stop.load(Ordering::Relaxed) {
            let c = match &client {
                Some(c) => c,
                None => {
                    let url = named(&urls[current], "app");
                    let info =
                        walrelay::pg::conninfo::resolve(&url, &walrelay::pg::conninfo::ProcessEnv)
                            .unwrap();
                    match walrelay::pg::sql::connect(&info).await {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            current ^= 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
            };
            i += 1;
            match c
                .query_one(
                    "INSERT INTO events (account, amount) VALUES ($1, $2) RETURNING id",
                    &[&(i % 1000 + 1), &i],
                )
                .await
            {
                Ok(row) => acked.lock().unwrap().push((row.get(0), current)),
                Err(_) => {
                    client = None;
                    current ^= 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// `url` with an application_name of its own (walrelay's sessions are named `walrelay...`).
fn named(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

async fn phase(target: &tokio_postgres::Client) -> Option<String> {
    target
        .query_opt(
            "SELECT phase || coalesce('/' || step, '') FROM walrelay.migration",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

async fn wait_for_phase(target: &tokio_postgres::Client, wanted: &str, relay: &mut Relay) {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        relay.assert_running();
        if phase(target).await.as_deref() == Some(wanted) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "phase {wanted} never came (now {:?}):\n{}",
            phase(target).await,
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `walrelay cutover` or `rollback`, run to its end: exit code and output.
async fn switch(command: &'static str, cfg: &std::path::Path) -> (Option<i32>, String) {
    let cfg = cfg.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args([command, "--config"])
            .arg(&cfg)
            .args(["--timeout", "5m"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn refuses_writes(url: &str) -> bool {
    let url = named(url, "check");
    let info = walrelay::pg::conninfo::resolve(&url, &walrelay::pg::conninfo::ProcessEnv).unwrap();
    let c = walrelay::pg::sql::connect(&info).await.unwrap();
    match c
        .batch_execute("INSERT INTO accounts (owner) VALUES ('probe')")
        .await
    {
        Ok(()) => false,
        Err(e) => {
            assert_eq!(e.code().map(|c| c.code()), Some("25006"), "{e:?}");
            true
        }
    }
}

async fn ids(c: &tokio_postgres::Client) -> std::collections::HashSet<i64> {
    c.query("SELECT id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

struct Scene {
    source_pg: TestPg,
    target_pg: TestPg,
    source: tokio_postgres::Client,
    target: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
}

async fn scene() -> Scene {
    let source_pg = TestPg::builder()
        .setting("max_prepared_transactions", 2)
        .start();
    let target_pg = TestPg::start();
    let source = source_pg.create_db("app").await;
    source.batch_execute(SCHEMA).await.unwrap();
    let target = target_pg.create_db("app").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = postgres_config(
        dir.path(),
        &source_pg.url("app"),
        &target_pg.url("app"),
        &["public.*"],
        "",
    );
    Scene {
        source_pg,
        target_pg,
        source,
        target,
        _dir: dir,
        cfg,
    }
}

/// `application` writing to the scene's two servers: its stop flag, what it had
/// acknowledged, its task.
fn start_application(s: &Scene) -> (Arc<AtomicBool>, Acked, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let task = application(
        [s.source_pg.url("app"), s.target_pg.url("app")],
        stop.clone(),
        acked.clone(),
    );
    (stop, acked, task)
}

/// After a cutover: the old side refuses writes, the new side's sequences are past every
/// id the old side handed out, and writes on the new side reach the old one.
async fn assert_cut_over(s: &Scene, acked: &Acked) {
    assert!(refuses_writes(&s.source_pg.url("app")).await);
    let before: i64 = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, server)| *server == 0)
        .map(|(id, _)| *id)
        .max()
        .unwrap();
    let next: i64 = s
        .target
        .query_one("SELECT last_value FROM events_id_seq", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        next >= before,
        "target sequence at {next}, source handed out {before}"
    );
    // The application moves over and its writes come back to the source.
    wait_for("writes on the target", Duration::from_secs(60), || {
        let acked = acked.clone();
        async move {
            acked
                .lock()
                .unwrap()
                .iter()
                .any(|(_, s)| *s == 1)
                .then_some(())
        }
    })
    .await;
    let on_target: Vec<i64> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s)| *s == 1)
        .map(|(id, _)| *id)
        .collect();
    let source = &s.source;
    wait_for("the reverse stream", Duration::from_secs(60), || {
        let on_target = on_target.clone();
        async move {
            let have = ids(source).await;
            on_target.iter().all(|id| have.contains(id)).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_cutover_and_rollback_under_writes_lose_nothing() {
    let s = scene().await;
    let (stop, acked, app) = start_application(&s);
    let mut migrate = Relay::spawn("migrate", &s.cfg, Stdio::null());
    wait_for_phase(&s.target, "ready", &mut migrate).await;
    // Until the cutover the target takes no writes but walrelay's.
    assert!(refuses_writes(&s.target_pg.url("app")).await);
    let status = walrelay_with_config("status", &s.cfg);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("phase ready") && status.contains("0 differences"),
        "{status}"
    );

    // A row changed behind the relay's back on the target calls the cutover off before
    // any write waits; repaired, the cutover goes ahead.
    s.target
        .batch_execute("UPDATE events SET amount = -1 WHERE id = 4242")
        .await
        .unwrap();
    let (code, out) = switch("cutover", &s.cfg).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("called off") && out.contains("public.events"),
        "{out}"
    );
    assert_eq!(phase(&s.target).await.as_deref(), Some("ready"));
    assert!(!refuses_writes(&s.source_pg.url("app")).await);
    let repair = std::process::Command::new(BIN)
        .args(["verify", "--repair", "--config"])
        .arg(&s.cfg)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&repair.stdout);
    assert!(
        said.contains("(id) = (4242): differs in amount -> updated"),
        "{said}"
    );

    // A prepared transaction could still commit into the old side after the hand-off:
    // the cutover is called off naming it, writes allowed again.
    let twophase = s.source_pg.client("app").await;
    twophase
        .batch_execute(
            "BEGIN; UPDATE accounts SET owner = owner || ' (paid)' WHERE id = 1; PREPARE TRANSACTION 'pay-1'",
        )
        .await
        .unwrap();
    let (code, out) = switch("cutover", &s.cfg).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("called off") && out.contains("prepared transactions 'pay-1'"),
        "{out}"
    );
    assert!(!refuses_writes(&s.source_pg.url("app")).await);
    s.source
        .batch_execute("COMMIT PREPARED 'pay-1'")
        .await
        .unwrap();

    let (code, out) = switch("cutover", &s.cfg).await;
    assert_eq!(code, Some(0), "{out}\n{}", migrate.stderr());
    assert!(out.contains("write pause"), "{out}");
    println!("{}", out.trim());
    assert_cut_over(&s, &acked).await;
    // status reports the stream that runs: from the new server back into the old one.
    let status = walrelay_with_config("status", &s.cfg);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("cut over: the stream runs from the new server back to the old one")
            && status.contains("slot     walrelay_reverse: streaming")
            && status.contains("phase cut_over"),
        "{status}"
    );

    let (code, out) = switch("rollback", &s.cfg).await;
    assert_eq!(code, Some(0), "{out}\n{}", migrate.stderr());
    println!("{}", out.trim());
    assert!(refuses_writes(&s.target_pg.url("app")).await);
    let back = acked.lock().unwrap().len();
    wait_for(
        "writes on the source again",
        Duration::from_secs(60),
        || {
            let acked = acked.clone();
            async move {
                let a = acked.lock().unwrap();
                (a.len() > back + 20 && a.last().is_some_and(|(_, s)| *s == 0)).then_some(())
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    app.await.unwrap();
    // Every acknowledged write is on the source, and the forward stream brought the
    // target level again.
    let acked = acked.lock().unwrap().clone();
    let on_source = ids(&s.source).await;
    let lost: Vec<&(i64, usize)> = acked
        .iter()
        .filter(|(id, _)| !on_source.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    assert!(
        acked.iter().any(|(_, s)| *s == 1),
        "nothing was written on the target"
    );
    wait_until_equal(&s.source, &s.target, &["events", "accounts"], &mut migrate).await;
    migrate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrate_killed_after_each_phase_and_each_cutover_step_resumes() {
    let s = scene().await;
    let (stop, acked, app) = start_application(&s);
    // Each run records one more phase and is killed right after (-9, by a fail point).
    let mut seen = Vec::new();
    loop {
        let mut run = Relay::start_with_failpoint("migrate", &s.cfg, "migrate-phase-recorded");
        let status = run.wait(Duration::from_secs(180)).await;
        let now = phase(&s.target).await.unwrap();
        assert!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
            "{status}: {}",
            run.stderr()
        );
        seen.push(now.clone());
        if now == "ready" {
            break;
        }
        assert!(seen.len() < 10, "{seen:?}");
    }
    assert_eq!(seen, ["copy", "incremental", "verify", "ready"]);
    // The cutover, asked for while no migrate runs; each run does one step.
    let cfg = s.cfg.clone();
    let cutover =
        walrelay::task::spawn_named("test-cutover", async move { switch("cutover", &cfg).await });
    wait_for("the request", Duration::from_secs(30), || async {
        s.target
            .query_opt(
                "SELECT 1 FROM walrelay.migration WHERE requested = 'cutover'",
                &[],
            )
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    let mut steps = Vec::new();
    let mut migrate = loop {
        let mut run = Relay::start_with_failpoint("migrate", &s.cfg, "migrate-step-recorded");
        // Killed after its step, or — once the last step records the phase instead — on.
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        let now = loop {
            let exited = run.try_wait_signal();
            let now = phase(&s.target).await.unwrap_or_default();
            match exited {
                Some(signal) => {
                    assert_eq!(
                        signal,
                        Some(9),
                        "migrate exited on its own at {now}:\n{}",
                        run.stderr()
                    );
                    break now;
                }
                None if now == "cut_over" => break now,
                None => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no step done in 180 s (at {now}):\n{}",
                run.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        steps.push(now.clone());
        if now == "cut_over" {
            break run;
        }
        assert!(steps.len() < 10, "{steps:?}");
    };
    assert_eq!(
        steps,
        [
            "cutover/verified",
            "cutover/fence",
            "cutover/drain",
            "cutover/sequences",
            "cutover/stream",
            "cut_over"
        ]
    );
    let (code, out) = cutover.await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    // The migrate that runs on: the same end as without the crashes.
    migrate.assert_running();
    assert_cut_over(&s, &acked).await;
    stop.store(true, Ordering::Relaxed);
    app.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    // Written on the source before the cutover: on the target; written on the target
    // after: back on the source, once the reverse stream has caught up.
    let (source, target) = (&s.source, &s.target);
    let lost = |source_ids: std::collections::HashSet<i64>,
                target_ids: std::collections::HashSet<i64>| {
        acked
            .iter()
            .filter(|(id, _)| !target_ids.contains(id) || !source_ids.contains(id))
            .copied()
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing = lost(ids(source).await, ids(target).await);
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "acknowledged and lost: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    migrate.stop().await;
}
