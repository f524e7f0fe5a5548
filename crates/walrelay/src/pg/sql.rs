//! Ordinary SQL connections (tokio-postgres), opened over walrelay's own transport so that
//! TLS, Unix sockets and timeouts behave exactly as for the replication connection.

use tokio_postgres::{Client, NoTls};

use super::conninfo::ConnInfo;
use super::error::PgError;
use super::transport;
use crate::task::spawn_named;

/// Open a SQL session. The connection task ends when the client is dropped.
pub async fn connect(info: &ConnInfo) -> Result<Client, PgError> {
    connect_with(info, None).await
}

/// Open a SQL session that passes on the payload of each notification it receives
/// (`LISTEN`); the receiver ends when the connection does.
pub async fn connect_listening(
    info: &ConnInfo,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>), PgError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    Ok((connect_with(info, Some(tx)).await?, rx))
}

async fn connect_with(
    info: &ConnInfo,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Result<Client, PgError> {
    let stream = transport::connect(info).await?;
    let mut config = tokio_postgres::Config::new();
    config
        .user(&info.user)
        .dbname(&info.dbname)
        .application_name(&info.application_name)
        // TLS, if any, is already set up on `stream`.
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(p) = &info.password {
        config.password(p.expose());
    }
    if let Some(o) = &info.options {
        config.options(o);
    }
    let target = info.describe();
    let connecting = config.connect_raw(stream, NoTls);
    let (client, connection) = match tokio::time::timeout(info.connect_timeout, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(connect_error(&target, e)),
        Err(_) => {
            return Err(PgError::Transport(transport::TransportError::Timeout {
                target,
                secs: info.connect_timeout.as_secs(),
            }))
        }
    };
    match notifications {
        None => {
            spawn_named("pg-sql-connection", async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "SQL connection ended");
                }
            });
        }
        Some(tx) => {
            let mut connection = connection;
            spawn_named("pg-sql-listening-connection", async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                use futures_util::StreamExt;
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                            let _ = tx.send(n.payload().to_string());
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "SQL connection ended");
                            break;
                        }
                    }
                }
            });
        }
    }
    Ok(client)
}

fn connect_error(target: &str, e: tokio_postgres::Error) -> PgError {
    if e.as_db_error().is_none() && super::error::error_chain(&e).contains("password missing") {
        return PgError::Auth {
            target: target.to_string(),
            reason: "the server asks for a password and none is configured: put it in the URL, PGPASSWORD or ~/.pgpass".into(),
        };
    }
    match e.as_db_error() {
        Some(db) if db.code().code().starts_with("28") => PgError::Auth {
            target: target.to_string(),
            reason: db.message().to_string(),
        },
        _ => PgError::from_sql(format!("connecting to {target}"), e),
    }
}
