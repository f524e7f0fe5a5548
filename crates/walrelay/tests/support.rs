//! Helpers for the integration tests: run the real `walrelay` binary, write configs, read
//! JSONL output.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value as J;
use walrelay_testkit::wait_for;

pub const BIN: &str = env!("CARGO_BIN_EXE_walrelay");

/// Write `dir/walrelay.toml`: a source capturing `tables` of `url` (plus `extra_source`
/// keys), then `sinks`.
pub fn relay_config_file(
    dir: &Path,
    url: &str,
    tables: &[&str],
    extra_source: &str,
    sinks: &str,
) -> PathBuf {
    let tables: Vec<String> = tables.iter().map(|t| format!("'{t}'")).collect();
    let text = format!(
        "[source]\nurl = \"{url}\"\ntables = [{}]\nspill_dir = \"{}\"\n{extra_source}\n\n{sinks}",
        tables.join(", "),
        dir.join("spill").display(),
    );
    let path = dir.join("walrelay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A config for `url`, capturing `tables`, writing to the JSONL file `out`.
pub fn config(dir: &Path, url: &str, tables: &[&str], out: &Path, extra_source: &str) -> PathBuf {
    let sink = format!("[[sink]]\ntype = \"jsonl\"\npath = \"{}\"\n", out.display());
    relay_config_file(dir, url, tables, extra_source, &sink)
}

/// A running `walrelay run`.
pub struct Relay {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Relay {
    pub fn start(config: &Path) -> Relay {
        Self::start_with_stdout(config, Stdio::null())
    }

    pub fn start_with_stdout(config: &Path, stdout: impl Into<Stdio>) -> Relay {
        Self::spawn("run", config, stdout)
    }

    /// `walrelay consume` with `config`.
    pub fn start_consume(config: &Path) -> Relay {
        Self::spawn("consume", config, Stdio::null())
    }

    pub fn spawn(command: &str, config: &Path, stdout: impl Into<Stdio>) -> Relay {
        Self::spawn_with_env(command, config, stdout, &[])
    }

    /// `walrelay <command>` armed to kill itself at the fail point `spec`
    /// (`name[:n]`, see `walrelay::failpoint`).
    pub fn start_with_failpoint(command: &str, config: &Path, spec: &str) -> Relay {
        Self::spawn_with_env(
            command,
            config,
            Stdio::null(),
            &[("WALRELAY_FAILPOINT", spec)],
        )
    }

    /// Wait until a relay armed with a fail point killed itself there.
    pub async fn wait_for_failpoint(&mut self, name: &str) {
        use std::os::unix::process::ExitStatusExt;
        let status = self.wait(Duration::from_secs(120)).await;
        let stderr = self.stderr();
        assert_eq!(
            status.signal(),
            Some(9),
            "killed at the fail point:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("fail point {name} reached")),
            "{stderr}"
        );
    }

    pub fn spawn_with_env(
        command: &str,
        config: &Path,
        stdout: impl Into<Stdio>,
        env: &[(&str, &str)],
    ) -> Relay {
        let stderr_path = config.with_extension(format!("stderr.{}", rand_suffix()));
        let stderr = File::create(&stderr_path).unwrap();
        let child = Command::new(BIN)
            .args([command, "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or("walrelay=debug".into()),
            )
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("starting walrelay");
        Relay { child, stderr_path }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Peak resident memory so far, in kB (VmHWM).
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn stop(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.wait(Duration::from_secs(60)).await;
        let stderr = self.stderr();
        assert!(
            status.success(),
            "walrelay did not exit cleanly ({status}):\n{stderr}"
        );
        stderr
    }

    /// SIGKILL: a crash at an arbitrary instant. Panics if walrelay had already exited on
    /// its own, since then nothing was crashed.
    pub async fn kill9(mut self) -> String {
        use std::os::unix::process::ExitStatusExt;
        let _ = self.child.kill();
        let status = self.wait(Duration::from_secs(30)).await;
        let stderr = self.stderr();
        assert_eq!(
            status.signal(),
            Some(9),
            "walrelay was running until killed:\n{stderr}"
        );
        stderr
    }

    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_for("walrelay to exit", timeout, || {
            let r = child.try_wait().unwrap();
            async move { r }
        })
        .await
    }

    /// Wait until walrelay exits on an error (status 1), and return its log.
    pub async fn wait_for_failure(&mut self) -> String {
        let status = self.wait(Duration::from_secs(60)).await;
        let stderr = self.stderr();
        assert_eq!(status.code(), Some(1), "{stderr}");
        stderr
    }

    /// `None` while running; once exited, the signal that ended it, if any.
    pub fn try_wait_signal(&mut self) -> Option<Option<i32>> {
        use std::os::unix::process::ExitStatusExt;
        self.child.try_wait().unwrap().map(|s| s.signal())
    }

    /// Still running (has not exited on an error)?
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("walrelay exited ({status}):\n{}", self.stderr());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Every line of a JSONL file, parsed; panics on a line that is not JSON.
pub fn read_jsonl(path: &Path) -> Vec<J> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Wait until the JSONL file holds a line for which `done` is true; return all lines.
pub async fn wait_for_line(
    relay: &mut Relay,
    path: &Path,
    what: &str,
    done: impl Fn(&J) -> bool,
) -> Vec<J> {
    let timeout = Duration::from_secs(120);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        relay.assert_running();
        let lines = read_jsonl_lenient(path);
        if lines.iter().any(&done) {
            return lines;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; {} lines so far; relay log:\n{}",
                lines.len(),
                relay.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Parse the complete lines (a writer may be in the middle of the last one).
pub fn read_jsonl_lenient(path: &Path) -> Vec<J> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A position as (commit LSN, seq), comparable.
pub fn position(line: &J) -> (u64, u64) {
    let lsn: walrelay_model::Lsn = line["lsn"].as_str().unwrap().parse().unwrap();
    (lsn.0, line["seq"].as_u64().unwrap())
}

/// The slot's confirmed_flush_lsn.
pub async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> u64 {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let lsn: walrelay_model::Lsn = row.get::<_, String>(0).parse().unwrap();
    lsn.0
}

/// `pg_current_wal_lsn()` as a number.
pub async fn current_lsn(client: &tokio_postgres::Client) -> u64 {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap();
    let lsn: walrelay_model::Lsn = row.get::<_, String>(0).parse().unwrap();
    lsn.0
}

/// A test database `app` on `pg` with a schema, a directory for the config and output, and
/// a relay that holds its slot (changes made before that are not captured).
pub struct Scene {
    pub db: tokio_postgres::Client,
    pub dir: tempfile::TempDir,
    pub out: PathBuf,
    pub cfg: PathBuf,
    pub relay: Relay,
}

impl Scene {
    pub async fn start(
        pg: &walrelay_testkit::TestPg,
        schema: &str,
        tables: &[&str],
        extra_source: &str,
    ) -> Scene {
        let db = pg.create_db("app").await;
        db.batch_execute(schema).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        let cfg = config(dir.path(), &pg.url("app"), tables, &out, extra_source);
        let mut relay = Relay::start(&cfg);
        wait_until_streaming(&db, &mut relay).await;
        Scene {
            db,
            dir,
            out,
            cfg,
            relay,
        }
    }
}

/// Wait until the relay streams from its slot (copy finished, sinks open).
pub async fn wait_until_streaming(client: &tokio_postgres::Client, relay: &mut Relay) {
    wait_until_slot_streams(client, "walrelay", relay).await
}

/// Wait until the relay streams from slot `slot`.
pub async fn wait_until_slot_streams(
    client: &tokio_postgres::Client,
    slot: &str,
    relay: &mut Relay,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        relay.assert_running();
        let row = client
            .query_opt(
                // Active alone is not enough: the walsender that created the slot holds it
                // while the copy runs. Past 'startup' means START_REPLICATION has been sent,
                // so the copy is done and the sinks are open.
                "SELECT coalesce(r.state NOT IN ('startup'), false) \
                 FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap();
        if row.is_some_and(|r| r.get::<_, bool>(0)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot never became active:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config that applies `tables` of `source_url` to `target_url` with a postgres sink.
pub fn postgres_config(
    dir: &Path,
    source_url: &str,
    target_url: &str,
    tables: &[&str],
    extra_sink: &str,
) -> PathBuf {
    let sink = format!("[[sink]]\ntype = \"postgres\"\nurl = \"{target_url}\"\n{extra_sink}\n");
    relay_config_file(dir, source_url, tables, "", &sink)
}

/// Row count and the sum of every row's hash: equal on two tables means equal contents,
/// whatever the row order.
pub async fn checksum(client: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtext(t::text)::int8), 0)::int8 FROM {table} t"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("checksum of {table}: {e}"));
    (row.get(0), row.get(1))
}

/// Rows on one side only (as text, a few of each), to say what a mismatch is made of.
async fn row_differences(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    table: &str,
) -> String {
    let (s, t) = (
        rows_as_text(source, table).await,
        rows_as_text(target, table).await,
    );
    let only = |a: &std::collections::BTreeSet<String>, b: &std::collections::BTreeSet<String>| {
        a.difference(b)
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "  only on the source: {}\n  only on the target: {}\n",
        only(&s, &t),
        only(&t, &s)
    )
}

async fn rows_as_text(
    client: &tokio_postgres::Client,
    table: &str,
) -> std::collections::BTreeSet<String> {
    client
        .query(&format!("SELECT t::text FROM {table} t"), &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
        .unwrap_or_default()
}

/// Copy every relay log of a failed test out of its temporary directory (which is removed
/// as the test unwinds), and say where they are.
fn keep_logs(relay: &Relay) -> String {
    let Some(dir) = relay.stderr_path.parent() else {
        return String::new();
    };
    let kept = std::env::temp_dir().join(format!(
        "walrelay-failed-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let _ = std::fs::create_dir_all(&kept);
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().contains(".stderr.") {
            let _ = std::fs::copy(entry.path(), kept.join(name));
        }
    }
    format!("every relay's log is kept in {}\n", kept.display())
}

/// Wait until every table has the same checksum on both sides.
pub async fn wait_until_equal(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    tables: &[&str],
    relay: &mut Relay,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        relay.assert_running();
        let mut equal = true;
        for t in tables {
            if checksum(source, t).await != checksum(target, t).await {
                equal = false;
                break;
            }
        }
        if equal {
            return;
        }
        if std::time::Instant::now() > deadline {
            let mut report = String::new();
            for t in tables {
                report += &format!(
                    "{t}: source {:?} target {:?}\n{}",
                    checksum(source, t).await,
                    checksum(target, t).await,
                    row_differences(source, target, t).await
                );
            }
            panic!(
                "target never matched the source:\n{report}{}relay log:\n{}",
                keep_logs(relay),
                relay.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until the single number `sql` selects equals `expected`.
pub async fn wait_for_count(client: &tokio_postgres::Client, sql: &str, expected: i64, what: &str) {
    wait_for(what, Duration::from_secs(120), || async move {
        // An error (the table is not there yet) counts as "not yet".
        let n: Option<i64> = client.query_one(sql, &[]).await.ok().map(|r| r.get(0));
        (n == Some(expected)).then_some(())
    })
    .await
}

/// The test broker: the machine's RabbitMQ.
pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A `walrelay consume` config: `queue` applied to `target_url`.
pub fn consume_config(
    dir: &Path,
    name: &str,
    queue: &str,
    target_url: &str,
    extra: &str,
) -> PathBuf {
    let text = format!(
        "[consume]\nurl = \"{BROKER}\"\nqueue = \"{queue}\"\nprefetch = 50\n{extra}\n\n[target]\nurl = \"{target_url}\"\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `walrelay COMMAND --config CFG`, run to its end.
pub fn walrelay_with_config(command: &str, cfg: &Path) -> std::process::Output {
    Command::new(BIN)
        .args([command, "--config"])
        .arg(cfg)
        .output()
        .unwrap()
}

/// `walrelay check --config cfg`: its exit code and standard output.
pub fn walrelay_check(cfg: &Path) -> (Option<i32>, String) {
    let o = walrelay_with_config("check", cfg);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// Wait until `target_table` on `target` holds the rows `expected` selects on `source`.
pub async fn wait_until_shaped(
    source: &tokio_postgres::Client,
    expected: &str,
    target: &tokio_postgres::Client,
    target_table: &str,
    relay: &mut Relay,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        relay.assert_running();
        let want = checksum(source, expected).await;
        let got = target
            .query_one(
                &format!("SELECT count(*), coalesce(sum(hashtext(t::text)::int8), 0)::int8 FROM {target_table} t"),
                &[],
            )
            .await
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .ok();
        if got == Some(want) {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "{target_table} never matched: want {want:?}, got {got:?}\nexpected rows:\n  {}\ntarget rows:\n  {}\nrelay log:\n{}",
                some_rows(source, &format!("SELECT t::text FROM {expected} t ORDER BY 1")).await,
                some_rows(target, &format!("SELECT t::text FROM {target_table} t ORDER BY 1")).await,
                relay.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first rows `sql` returns, one per line, to show in a failure.
pub async fn some_rows(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query(sql, &[])
        .await
        .map(|rows| {
            rows.iter()
                .take(5)
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n  ")
        })
        .unwrap_or_else(|e| e.to_string())
}

/// The xmin of row `id` of table `t`: it changes when anything writes the row again.
pub async fn xmin(client: &tokio_postgres::Client, id: i32) -> String {
    client
        .query_one("SELECT xmin::text FROM t WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Two writable nodes for a relay each way: table `t (id int PRIMARY KEY, v text)` on
/// both, `a_rows` (SQL) run on A, B empty; and the relays' configs with `source_keys`
/// (`origin = "none"`, …). A → B copies A's rows; B → A copies nothing (its copy's rows
/// come from A, and are marked as applied).
pub struct NodePair {
    pub a_pg: walrelay_testkit::TestPg,
    pub b_pg: walrelay_testkit::TestPg,
    pub a: tokio_postgres::Client,
    pub b: tokio_postgres::Client,
    pub ab: PathBuf,
    pub ba: PathBuf,
    /// Where the configs are: keep it as long as the relays run.
    pub dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl NodePair {
    pub async fn start(
        node: impl Fn() -> walrelay_testkit::TestPg,
        a_rows: &str,
        source_keys: &str,
    ) -> NodePair {
        let (a_pg, b_pg) = (node(), node());
        let table = "CREATE TABLE t (id int PRIMARY KEY, v text)";
        let a = a_pg.create_db("app").await;
        a.batch_execute(&format!("{table}; {a_rows}"))
            .await
            .unwrap();
        let b = b_pg.create_db("app").await;
        b.batch_execute(table).await.unwrap();
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sink = |url: String, copy: bool| {
            format!(
                "[snapshot]\nenabled = {copy}\n\n[[sink]]\ntype = \"postgres\"\nurl = \"{url}\"\n"
            )
        };
        let ab = relay_config_file(
            dirs.0.path(),
            &a_pg.url("app"),
            &["public.t"],
            source_keys,
            &sink(b_pg.url("app"), true),
        );
        let ba = relay_config_file(
            dirs.1.path(),
            &b_pg.url("app"),
            &["public.t"],
            source_keys,
            &sink(a_pg.url("app"), false),
        );
        NodePair {
            a_pg,
            b_pg,
            a,
            b,
            ab,
            ba,
            dirs,
        }
    }
}
