//! The command line: `walrelay check` finds what would stop capture, and bad input gives a
//! one-line error and a non-zero exit, never a panic.

use std::process::{Command, Output};

use walrelay_testkit::{free_port, TestPg};

use crate::support::*;

fn walrelay(args: &[&str], config: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("PGPASSWORD")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_reports_each_problem_with_what_to_do() {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute(
        "CREATE TABLE good (id int PRIMARY KEY);
         CREATE TABLE history (at timestamptz, what text);
         CREATE ROLE app_reader LOGIN PASSWORD 'pw';",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");

    let ready = config(dir.path(), &pg.url("app"), &["public.good"], &out, "");
    let o = walrelay(&["check"], &ready);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("ready"), "{stdout}");

    let no_key = config(
        dir.path(),
        &pg.url("app"),
        &["public.good", "public.history"],
        &out,
        "",
    );
    let o = walrelay(&["check"], &no_key);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("table public.history has no primary key or replica identity")
            && stdout.contains("REPLICA IDENTITY FULL"),
        "{stdout}"
    );
    // `run` refuses it too, before publishing a table whose updates would then fail.
    let o = walrelay(&["run"], &no_key);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr.contains("public.history has no primary key"),
        "{stderr}"
    );

    let reader_url = format!(
        "postgresql://app_reader:pw@127.0.0.1:{}/app?sslmode=disable",
        pg.port()
    );
    let no_privilege = config(dir.path(), &reader_url, &["public.good"], &out, "");
    let o = walrelay(&["check"], &no_privilege);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "role app_reader may not start replication: ALTER ROLE \"app_reader\" REPLICATION"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("may not create it"),
        "no CREATE on the database: {stdout}"
    );

    let missing = config(dir.path(), &pg.url("app"), &["public.nope"], &out, "");
    let o = walrelay(&["check"], &missing);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout.contains("public.nope") && stdout.contains("does not exist"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_reports_wal_level_replica() {
    let pg = TestPg::builder().setting("wal_level", "replica").start();
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE good (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let cfg = config(dir.path(), &pg.url("app"), &["public.good"], &out, "");
    let o = walrelay(&["check"], &cfg);
    let (stdout, _) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout.contains("wal_level is 'replica'") && stdout.contains("wal_level = logical"),
        "{stdout}"
    );
    let o = walrelay(&["run"], &cfg);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr.contains("wal_level is 'replica'"), "{stderr}");
}

/// Run `walrelay run` and expect one line on standard error, containing `expected`.
fn expect_one_line_error(config: &std::path::Path, expected: &str) {
    let o = walrelay(&["run"], config);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("walrelay: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(
        errors[0].contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

#[tokio::test]
async fn bad_config_gives_a_one_line_error() {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let good = config(dir.path(), &pg.url("app"), &["public.t"], &out, "");
    let good_text = std::fs::read_to_string(&good).unwrap();
    let write = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };

    let p = write(
        "unknown.toml",
        good_text.replace("[source]", "[source]\nslots = \"x\""),
    );
    expect_one_line_error(&p, "unknown field `slots`");

    let p = write(
        "url.toml",
        good_text.replace(&pg.url("app"), "postgresql://[::1/app"),
    );
    expect_one_line_error(&p, "source.url");

    let unreachable = format!(
        "postgresql://postgres:x@127.0.0.1:{}/app?connect_timeout=3",
        free_port()
    );
    let p = write(
        "unreachable.toml",
        good_text.replace(&pg.url("app"), &unreachable),
    );
    expect_one_line_error(&p, "could not connect to 127.0.0.1");

    let wrong = pg.url("app").replace(":walrelay@", ":wrong@");
    let p = write("password.toml", good_text.replace(&pg.url("app"), &wrong));
    expect_one_line_error(&p, "password authentication failed");

    let p = dir.path().join("missing.toml");
    expect_one_line_error(&p, "cannot read config file");

    // The password never shows up in output.
    let o = walrelay(&["run"], &dir.path().join("password.toml"));
    let (stdout, stderr) = text(&o);
    assert!(
        !stderr.contains("wrong") && !stdout.contains("wrong"),
        "{stderr}"
    );
}

#[test]
fn demo_runs_and_verifies() {
    let o = Command::new(BIN)
        .args(["demo", "--duration", "2s"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("verified: target = source: 4 tables")
            && stdout.contains("every row equal")
            && stdout.contains("tables done"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_second_relay_on_a_busy_slot_is_refused() {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &pg.url("app"),
        &["public.t"],
        &dir.path().join("a.jsonl"),
        "",
    );
    let mut first = Relay::start(&cfg);
    wait_until_streaming(&db, &mut first).await;
    let second = config(
        dir.path(),
        &pg.url("app"),
        &["public.t"],
        &dir.path().join("b.jsonl"),
        "",
    );
    let o = walrelay(&["run"], &second);
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in use by server process") && stderr.contains("another walrelay"),
        "{stderr}"
    );
    first.assert_running();
    first.stop().await;
}

#[tokio::test]
async fn password_from_pgpassword_or_pgpass() {
    let pg = TestPg::start();
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let no_password = format!(
        "postgresql://postgres@127.0.0.1:{}/app?sslmode=disable",
        pg.port()
    );
    let cfg = config(
        dir.path(),
        &no_password,
        &["public.t"],
        &dir.path().join("out.jsonl"),
        "",
    );
    let check = |envs: &[(&str, String)]| {
        let mut c = Command::new(BIN);
        c.args(["check", "--config"])
            .arg(&cfg)
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE");
        for (k, v) in envs {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let o = check(&[("HOME", dir.path().display().to_string())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o)
            .0
            .contains("asks for a password and none is configured"),
        "{}",
        text(&o).0
    );
    let o = check(&[("PGPASSWORD", "walrelay".into())]);
    assert!(o.status.success(), "{}", text(&o).0);
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!("127.0.0.1:{}:app:postgres:walrelay\n", pg.port()),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let o = check(&[("PGPASSFILE", pgpass.display().to_string())]);
    assert!(o.status.success(), "{}", text(&o).0);
}
