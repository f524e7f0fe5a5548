//! The agent's REST API, with Patroni's paths so existing HAProxy configurations work:
//! `GET /primary` (200 only on the leader holding a fresh lease), `GET /replica[?lag=]`
//! (200 on a streaming replica within `lag` bytes of the leader), `/health`, `/cluster`,
//! `/metrics` (Prometheus) and `POST /switchover`.
//!
//! The checks are open, as HAProxy needs them; `POST /switchover` takes
//! `Authorization: Bearer <api.token>` and is refused without a token configured. With
//! `api.certfile` and `api.keyfile` the API speaks HTTPS only.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::agent::{SharedStatus, Status};
use super::store::{ClusterView, Store, StoreError};
use crate::config::ha::ApiSection;

#[derive(Clone)]
struct Api {
    status: SharedStatus,
    store: Arc<Store>,
    /// `api.token`: `POST /switchover` must bear it.
    token: Option<Arc<str>>,
}

/// The HTTPS settings of `[api]`: `None` (plain HTTP) without `certfile`.
pub fn tls_config(api: &ApiSection) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(certfile), Some(keyfile)) = (&api.certfile, &api.keyfile) else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(certfile)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("api.certfile {}: {e}", certfile.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "api.certfile {} holds no certificate",
            certfile.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(keyfile)
        .map_err(|e| format!("api.keyfile {}: {e}", keyfile.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("api.certfile and api.keyfile: {e}"))?;
    Ok(Some(Arc::new(config)))
}

/// Bind now (a taken port is a configuration error reported at start), serve until
/// cancelled: HTTPS with `tls`, else HTTP.
pub async fn serve(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    token: Option<String>,
    status: SharedStatus,
    store: Arc<Store>,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let api = Api {
        status,
        store,
        token: token.map(Arc::from),
    };
    let app = Router::new()
        .route("/primary", get(primary).options(primary))
        .route("/master", get(primary).options(primary))
        .route("/leader", get(primary).options(primary))
        .route("/replica", get(replica).options(replica))
        .route("/health", get(health).options(health))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/switchover", axum::routing::post(switchover))
        .with_state(api);
    Ok(crate::task::spawn_named("rest-api", async move {
        let stop = cancel.clone();
        let served = match tls {
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
            Some(tls) => {
                axum::serve(TlsListener::new(listener, tls, cancel), app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "REST API stopped");
        }
    }))
}

/// Connections that completed a TLS handshake. Handshakes run in tasks of their own (at
/// most 64 at once, 10 s each), so a client that connects and says nothing holds up no
/// one.
struct TlsListener {
    incoming: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: std::io::Result<SocketAddr>,
}

impl TlsListener {
    fn new(
        listener: tokio::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
        cancel: CancellationToken,
    ) -> TlsListener {
        let local = listener.local_addr();
        let (tx, incoming) = tokio::sync::mpsc::channel(16);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(64));
        crate::task::spawn_named("rest-api-accept", async move {
            loop {
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "REST API: accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                crate::task::spawn_named("rest-api-handshake", async move {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    );
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            drop(permit);
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "REST API: TLS handshake"),
                        Err(_) => tracing::debug!(%peer, "REST API: TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { incoming, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            // Cancelled: the graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// Whether a request bearing `given` (its `Authorization` header) may do what needs
/// `token`; the refusal otherwise. Compared in constant time.
pub fn authorize(
    token: Option<&str>,
    given: Option<&HeaderValue>,
) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = token else {
        return Err((
            StatusCode::FORBIDDEN,
            "refused: this agent has no api.token, so POST /switchover is off\n",
        ));
    };
    let bearer = given
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let matches = bearer.is_some_and(|b| {
        b.len() == token.len()
            && b.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            "unauthorized: send Authorization: Bearer <api.token>\n",
        ))
    }
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

#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub struct SwitchoverRequest {
    /// The current leader, if the caller wants to be sure whom it steps down.
    pub leader: Option<String>,
    pub candidate: Option<String>,
}

async fn switchover(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err((code, why)) = authorize(api.token.as_deref(), headers.get(header::AUTHORIZATION)) {
        tracing::warn!(status = code.as_u16(), "POST /switchover refused");
        let mut response = (code, why).into_response();
        if code == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return response;
    }
    let req: SwitchoverRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SwitchoverRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("a JSON object with leader and candidate, both optional: {e}\n"),
                )
                    .into_response()
            }
        }
    };
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
    use super::*;

    #[test]
    fn switchover_needs_the_token_and_is_off_without_one() {
        let bearer = |v: &str| HeaderValue::from_str(v).unwrap();
        assert_eq!(
            authorize(Some("s3cret"), Some(&bearer("Bearer s3cret"))),
            Ok(())
        );
        for given in [
            None,
            Some(bearer("Bearer s3cre")),
            Some(bearer("Bearer s3cret2")),
            Some(bearer("Basic czNjcmV0")),
            Some(bearer("s3cret")),
        ] {
            assert_eq!(
                authorize(Some("s3cret"), given.as_ref()).unwrap_err().0,
                StatusCode::UNAUTHORIZED,
                "{given:?}"
            );
        }
        assert_eq!(
            authorize(None, Some(&bearer("Bearer anything")))
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn lag_takes_bytes_or_units() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_bytes("2 kB"), Some(2048));
        assert_eq!(parse_bytes("1x"), None);
        assert_eq!(parse_bytes(""), None);
    }
}
