//! The agent's REST API, with Patroni's paths so existing HAProxy configurations work:
//! `GET /primary` (200 only on the leader holding a fresh lease), `GET /replica[?lag=]`
//! (200 on a streaming replica within `lag` bytes of the leader), `/health`, `/cluster`,
//! `/metrics` (Prometheus) and `POST /switchover`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::agent::{SharedStatus, Status};
use super::store::{ClusterView, Store, StoreError};

#[derive(Clone)]
struct Api {
    status: SharedStatus,
    store: Arc<Store>,
}

/// Bind now (a taken port is a configuration error reported at start), serve until
/// cancelled.
pub async fn serve(
    addr: SocketAddr,
    status: SharedStatus,
    store: Arc<Store>,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/primary", get(primary).options(primary))
        .route("/master", get(primary).options(primary))
        .route("/leader", get(primary).options(primary))
        .route("/replica", get(replica).options(replica))
        .route("/health", get(health).options(health))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/switchover", axum::routing::post(switchover))
        .with_state(Api { status, store });
    Ok(crate::task::spawn_named("rest-api", async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "REST API stopped");
        }
    }))
}

fn snapshot(api: &Api) -> Status {
    api.status.read().expect("status lock").clone()
}

/// The node's own state as JSON, with the check's verdict as the HTTP status.
fn verdict(ok: bool, s: &Status) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "member": s.me,
        "is_leader": s.is_leader,
        "running": s.pg.running,
        "in_recovery": s.pg.in_recovery,
        "streaming": s.pg.streaming,
        "timeline": s.pg.timeline,
        "generation": s.generation,
        "waiting": s.waiting,
    });
    (code, Json(body)).into_response()
}

async fn primary(State(api): State<Api>) -> Response {
    let s = snapshot(&api);
    let leading = s.is_leader
        && s.leader_until
            .is_some_and(|t| std::time::Instant::now() < t);
    verdict(leading, &s)
}

/// Bytes, or a number with kB, MB or GB (as Patroni takes it).
fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().ok()?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

async fn replica(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let s = snapshot(&api);
    let mut ok = s.pg.running && s.pg.in_recovery && s.pg.streaming;
    if let Some(lag) = q.get("lag") {
        let Some(max) = parse_bytes(lag) else {
            return (
                StatusCode::BAD_REQUEST,
                "lag: bytes, or a number with kB, MB or GB\n",
            )
                .into_response();
        };
        let leader_at = s.view.leader_position();
        ok &= leader_at.is_some_and(|at| at.bytes_since(s.pg.received) <= max);
    }
    verdict(ok, &s)
}

async fn health(State(api): State<Api>) -> Response {
    let s = snapshot(&api);
    verdict(s.pg.running, &s)
}

async fn cluster(State(api): State<Api>) -> Response {
    let s = snapshot(&api);
    let v = &s.view;
    Json(serde_json::json!({
        "leader": v.leader.as_ref().map(|l| &l.holder),
        "generation": v.leader.as_ref().map(|l| l.generation),
        "members": v.members,
        "sync": v.sync,
        "switchover": v.switchover,
        "history": v.history,
    }))
    .into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    let s = snapshot(&api);
    let name = s.me.as_ref().map(|m| m.name.clone()).unwrap_or_default();
    let mut out = String::new();
    let mut gauge = |metric: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        let _ = writeln!(out, "{metric}{{member=\"{name}\"}} {value}");
    };
    gauge(
        "walrelay_ha_running",
        "PostgreSQL is running.",
        s.pg.running as u64,
    );
    gauge(
        "walrelay_ha_primary",
        "This node is the leader on a fresh lease.",
        s.is_leader as u64,
    );
    gauge(
        "walrelay_ha_replica",
        "This node is a replica.",
        (s.pg.running && s.pg.in_recovery) as u64,
    );
    gauge(
        "walrelay_ha_streaming",
        "The replica's WAL receiver is streaming.",
        s.pg.streaming as u64,
    );
    gauge(
        "walrelay_ha_timeline",
        "Current timeline.",
        s.pg.timeline as u64,
    );
    gauge(
        "walrelay_ha_received_lsn",
        "WAL received (replica) or written (primary), in bytes.",
        s.pg.received.0,
    );
    gauge(
        "walrelay_ha_replayed_lsn",
        "WAL replayed, in bytes.",
        s.pg.replayed.0,
    );
    gauge(
        "walrelay_ha_generation",
        "Generation of the current leader key.",
        s.generation,
    );
    let leader_at = s.view.leader_position().unwrap_or(s.pg.received);
    gauge(
        "walrelay_ha_lag_bytes",
        "Bytes the leader has written that this node has not received.",
        leader_at.bytes_since(s.pg.received),
    );
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Debug, Deserialize)]
struct SwitchoverRequest {
    /// The current leader, if the caller wants to be sure whom it steps down.
    leader: Option<String>,
    candidate: Option<String>,
}

async fn switchover(State(api): State<Api>, Json(req): Json<SwitchoverRequest>) -> Response {
    let s = snapshot(&api);
    match validate_switchover(&s.view, req.leader.as_deref(), req.candidate.as_deref()) {
        Err(why) => (StatusCode::PRECONDITION_FAILED, format!("{why}\n")).into_response(),
        Ok(()) => match api
            .store
            .request_switchover(s.view.leader.as_ref().expect("validated"), req.candidate)
            .await
        {
            Ok(true) => (StatusCode::ACCEPTED, "switchover requested\n").into_response(),
            Ok(false) => {
                (StatusCode::CONFLICT, "a switchover is already under way\n").into_response()
            }
            Err(e @ StoreError::NotLeader { .. }) => {
                (StatusCode::CONFLICT, format!("{e}: the leader changed\n")).into_response()
            }
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        },
    }
}

/// A switchover needs a leader (the one named, if named) and a candidate that is a
/// streaming replica not tagged nofailover.
pub fn validate_switchover(
    view: &ClusterView,
    leader: Option<&str>,
    candidate: Option<&str>,
) -> Result<(), String> {
    let Some(current) = view.leader.as_ref().map(|l| l.holder.as_str()) else {
        return Err("no leader: nothing to switch over from".into());
    };
    if let Some(l) = leader {
        if l != current {
            return Err(format!("the leader is {current}, not {l}"));
        }
    }
    if let Some(c) = candidate {
        let Some(m) = view.member(c) else {
            return Err(format!("no member named {c}"));
        };
        if c == current {
            return Err(format!("{c} is the leader already"));
        }
        if m.nofailover {
            return Err(format!("{c} is tagged nofailover"));
        }
        if m.state != "streaming" {
            return Err(format!("{c} is not streaming ({})", m.state));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn lag_takes_bytes_or_units() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_bytes("2 kB"), Some(2048));
        assert_eq!(parse_bytes("1x"), None);
        assert_eq!(parse_bytes(""), None);
    }
}
