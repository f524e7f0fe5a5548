//! Choosing one server of the several a connection string may name (`host=a,b,c`), the way
//! libpq does with `target_session_attrs`: in order, the first that answers and fits.
//!
//! A relay asks again at every (re)start of its pipeline, so after a failover it finds the
//! new primary among the hosts it was given.

use super::conninfo::{ConnInfo, SessionAttrs};
use super::error::PgError;
use super::sql;

/// The server to use: `info` itself when it names one host and asks for any; otherwise the
/// first of its hosts that answers and fits `target_session_attrs`.
pub async fn locate(info: &ConnInfo) -> Result<ConnInfo, PgError> {
    if info.hosts.len() <= 1 && info.target_session_attrs == SessionAttrs::Any {
        return Ok(info.clone());
    }
    let mut tried = Vec::new();
    for i in 0..info.hosts.len() {
        let candidate = info.with_host(i);
        let place = format!("{}:{}", candidate.host, candidate.port);
        match fits(&candidate).await {
            Ok(None) => return Ok(candidate),
            Ok(Some(why)) => tried.push(format!("{place} {why}")),
            // A wrong password or a bad option is the operator's to fix, not a reason to
            // try the next host.
            Err(e) if !e.is_transient() && !matches!(e, PgError::Server { .. }) => return Err(e),
            Err(e) => tried.push(format!("{place}: {e}")),
        }
    }
    Err(PgError::NoServerFits {
        attrs: info.target_session_attrs.name().into(),
        tried: tried.join("; "),
    })
}

/// `None` if the server fits, else why not.
async fn fits(candidate: &ConnInfo) -> Result<Option<&'static str>, PgError> {
    let client = sql::connect(candidate).await?;
    let query = match candidate.target_session_attrs {
        SessionAttrs::Any => return Ok(None),
        SessionAttrs::ReadWrite => "SELECT current_setting('transaction_read_only') = 'off'",
        SessionAttrs::Primary => "SELECT NOT pg_is_in_recovery()",
    };
    let fits: bool = client
        .query_one(query, &[])
        .await
        .map_err(|e| PgError::from_sql("asking whether the server takes writes", e))?
        .get(0);
    Ok(if fits {
        None
    } else {
        Some("is read-only (a replica?)")
    })
}
