//! TLS to PostgreSQL: the sslmode rules of libpq, on SQL and replication connections alike.

use walrelay::pg::conninfo::{resolve, ProcessEnv};
use walrelay::pg::replication::ReplicationConnection;
use walrelay::pg::{sql, PgError};
use walrelay_testkit::{make_certs, TestCerts, TestPg};

use crate::support::*;

/// Turn TLS on for a running test server with the certificate `certs`.
fn enable_tls(pg: &TestPg, certs: &TestCerts) {
    let data = pg.server.data_dir();
    for (from, f) in [(&certs.cert, "server.crt"), (&certs.key, "server.key")] {
        std::fs::copy(from, data.join(f)).unwrap();
        let owner = std::fs::metadata(&data).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        nix::unistd::chown(
            &data.join(f),
            Some(nix::unistd::Uid::from_raw(owner.uid())),
            Some(nix::unistd::Gid::from_raw(owner.gid())),
        )
        .unwrap();
        std::fs::set_permissions(data.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    pg.server.append_settings(&[("ssl", "on")]).unwrap();
    pg.restart();
}

fn url(pg: &TestPg, host: &str, params: &str) -> String {
    format!(
        "postgresql://postgres:walrelay@{host}:{}/postgres?{params}",
        pg.port()
    )
}

async fn both_connect(url: &str) -> Result<(), PgError> {
    let info = resolve(url, &ProcessEnv)?;
    let client = sql::connect(&info).await?;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the SQL session is encrypted");
    let mut repl = ReplicationConnection::connect(&info).await?;
    repl.simple_query("IDENTIFY_SYSTEM").await?;
    Ok(())
}

#[tokio::test]
async fn sslmodes_verify_as_libpq_does() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), "DNS:localhost");
    let ca = certs.ca.clone();
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = make_certs(other_dir.path(), "DNS:localhost").ca;
    let pg = TestPg::start();
    enable_tls(&pg, &certs);
    let ca = ca.display().to_string();

    both_connect(&url(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let e = both_connect(&url(
        &pg,
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    both_connect(&url(
        &pg,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await
    .unwrap();
    // A certificate from another CA is refused.
    let other = other_ca.display();
    let e = both_connect(&url(
        &pg,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    // require encrypts without verifying.
    both_connect(&url(&pg, "127.0.0.1", "sslmode=require"))
        .await
        .unwrap();
    // verify-full without any root certificate: a clear configuration error.
    let e = both_connect(&url(
        &pg,
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("sslrootcert /nonexistent/ca.pem"),
        "{e}"
    );
}

#[tokio::test]
async fn require_fails_against_a_server_without_tls() {
    let pg = TestPg::start();
    let e = both_connect(&url(&pg, "127.0.0.1", "sslmode=require"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not support TLS"), "{e}");
    assert!(!e.is_transient());
}

#[tokio::test]
async fn capture_runs_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), "DNS:localhost");
    let ca = certs.ca.clone();
    let pg = TestPg::start();
    enable_tls(&pg, &certs);
    let db = pg.create_db("app").await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let tls_url = format!(
        "postgresql://postgres:walrelay@localhost:{}/app?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        ca.display()
    );
    let out = dir.path().join("out.jsonl");
    let cfg = config(dir.path(), &tls_url, &["public.t"], &out, "");
    let mut relay = Relay::start(&cfg);
    wait_until_streaming(&db, &mut relay).await;
    let ssl: bool = db
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the replication connection is encrypted");
    db.batch_execute("INSERT INTO t VALUES (42)").await.unwrap();
    let lines = wait_for_line(&mut relay, &out, "the insert", |l| l["kind"] == "insert").await;
    assert_eq!(lines[0]["kind"], "snapshot_end", "the table was empty");
    assert_eq!(lines[2]["new"]["id"], 42);
    relay.stop().await;
}
