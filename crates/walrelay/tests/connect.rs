//! Connecting: SQL and replication sessions, authentication, the built-in type table.

use walrelay::pg::conninfo::{resolve, ProcessEnv};
use walrelay::pg::replication::ReplicationConnection;
use walrelay::pg::{sql, PgError};
use walrelay_testkit::TestPg;

#[tokio::test]
async fn sql_and_replication_sessions_authenticate_with_scram() {
    let pg = TestPg::start();
    let client = pg.client("postgres").await;
    let row = client.query_one("SELECT 1::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);

    let info = resolve(&pg.url("postgres"), &ProcessEnv).unwrap();
    let mut repl = ReplicationConnection::connect(&info).await.unwrap();
    let ident = repl.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert!(ident.first("systemid").is_some_and(|s| !s.is_empty()));
    assert!(ident.first("xlogpos").is_some_and(|s| s.contains('/')));
}

#[tokio::test]
async fn wrong_password_is_an_authentication_error() {
    let pg = TestPg::start();
    let url = format!(
        "postgresql://postgres:wrong@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let info = resolve(&url, &ProcessEnv).unwrap();
    let e = sql::connect(&info).await.unwrap_err();
    assert!(matches!(e, PgError::Auth { .. }), "{e}");
    assert!(!e.is_transient());
    let e = ReplicationConnection::connect(&info).await.err().unwrap();
    assert!(matches!(e, PgError::Auth { .. }), "{e}");
    assert!(
        e.to_string().contains("password authentication failed"),
        "{e}"
    );
}

#[tokio::test]
async fn builtin_type_table_matches_the_server() {
    let pg = TestPg::start();
    let client = pg.client("postgres").await;
    let rows = client
        .query(
            "SELECT oid, typname::text FROM pg_type WHERE oid < 10000",
            &[],
        )
        .await
        .unwrap();
    assert!(rows.len() > 150);
    for row in rows {
        let oid: u32 = row.get(0);
        let name: String = row.get(1);
        assert_eq!(
            walrelay_model::builtin_type_name(oid),
            Some(name.as_str()),
            "type oid {oid}"
        );
    }
}

/// The few literals walrelay writes into SQL text (enum labels, trigger bodies, the origin
/// mark) read back as written whatever `standard_conforming_strings` says.
#[tokio::test]
async fn literals_read_back_the_same_whatever_standard_conforming_strings_says() {
    let pg = TestPg::start();
    let client = pg.client("postgres").await;
    for setting in ["on", "off"] {
        client
            .batch_execute(&format!(
                "SET standard_conforming_strings = {setting}; SET escape_string_warning = off"
            ))
            .await
            .unwrap();
        for text in [
            "plain",
            "it's",
            r"back\slash",
            r"\'; DROP TABLE x; --",
            r"\\n",
            "é\t",
        ] {
            let sql = format!("SELECT {}::text", walrelay::pg::quote::literal(text));
            let read: String = client.query_one(&sql, &[]).await.unwrap().get(0);
            assert_eq!(read, text, "standard_conforming_strings = {setting}: {sql}");
        }
    }
}
