//! Errors of the PostgreSQL layer, sorted by what the caller must do: retry (the server or
//! the network may come back) or stop and tell the operator what to fix.

use std::fmt;

use super::conninfo::ConnInfoError;
use super::transport::TransportError;

/// An ErrorResponse from the server, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl ServerError {
    pub fn from_db_error(e: &tokio_postgres::error::DbError) -> Self {
        ServerError {
            severity: e.severity().to_string(),
            code: e.code().code().to_string(),
            message: e.message().to_string(),
            detail: e.detail().map(str::to_string),
            hint: e.hint().map(str::to_string),
        }
    }

    /// SQLSTATEs after which trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        let c = self.code.as_str();
        c.starts_with("08") // connection exception
            || c.starts_with("53") // insufficient resources (too many connections, disk full)
            || c.starts_with("57P") // admin/crash shutdown, cannot connect now
            || c == "55006" // object in use: a slot still held by a walsender that is exiting
            || c == "40001" // serialization failure
            || c == "40P01" // deadlock detected
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(transparent)]
    ConnInfo(#[from] ConnInfoError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{context}: {error}")]
    Server {
        context: String,
        error: Box<ServerError>,
    },
    #[error("authentication to {target} failed: {reason}")]
    Auth { target: String, reason: String },
    #[error("connection to {target} lost: {source}")]
    Io {
        target: String,
        source: std::io::Error,
    },
    #[error("protocol error from {target}: {detail}")]
    Protocol { target: String, detail: String },
    /// Of several servers, none answered as `target_session_attrs` asks (a failover may be
    /// under way).
    #[error("no server fits target_session_attrs={attrs}: {tried}")]
    NoServerFits { attrs: String, tried: String },
    /// A SQL session failed without a server error: closed, timed out, misconfigured.
    #[error("{context}: {detail}")]
    Session {
        context: String,
        detail: String,
        closed: bool,
    },
}

impl PgError {
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Transport(t) => t.is_transient(),
            PgError::Server { error, .. } => error.is_transient(),
            PgError::Io { .. } | PgError::NoServerFits { .. } => true,
            PgError::Session { closed, .. } => *closed,
            PgError::ConnInfo(_) | PgError::Auth { .. } | PgError::Protocol { .. } => false,
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Server { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    pub fn server(context: impl Into<String>, error: ServerError) -> Self {
        PgError::Server {
            context: context.into(),
            error: Box::new(error),
        }
    }

    /// Convert a tokio-postgres error, naming what was being done.
    pub fn from_sql(context: impl Into<String>, e: tokio_postgres::Error) -> Self {
        let context = context.into();
        match e.as_db_error() {
            Some(db) => PgError::server(context, ServerError::from_db_error(db)),
            None => PgError::Session {
                context,
                detail: error_chain(&e),
                closed: e.is_closed(),
            },
        }
    }
}

/// An error and its sources in one line: tokio-postgres puts the detail in the source.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
