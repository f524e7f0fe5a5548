//! A small client of etcd's v3 JSON gateway: HTTP/1.1 POSTs of JSON to `/v3/kv/...` and
//! `/v3/lease/...`, the API Patroni's etcd3 module uses. A gRPC client would need `protoc`
//! to build; this needs nothing but an HTTP client.
//!
//! The gateway speaks proto3 JSON: keys and values are base64, int64 fields are strings,
//! and fields at their default value are left out (`succeeded: false`, `TTL: 0`, an empty
//! `kvs`), so every field here defaults when absent. A refusal answers with a non-200
//! status and a body holding `code` (a gRPC status code) and `message` (or `error`).
//!
//! Several endpoints are tried in turn, each call bounded as a whole by one timeout: an
//! endpoint that does not connect or answers "unavailable" moves the call to the next one,
//! and the one that answered is tried first next time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// gRPC status codes that say "this member cannot serve now", not "no": another endpoint
/// may (no leader, a member being stopped, a request that timed out inside etcd).
const CODE_DEADLINE_EXCEEDED: i64 = 4;
const CODE_NOT_FOUND: i64 = 5;
const CODE_UNAVAILABLE: i64 = 14;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered within the call's time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// Every endpoint failed; each one's failure, in the order tried.
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    /// etcd answered no: a gRPC status code and etcd's message.
    #[error("etcd: {message} (code {code})")]
    Refused { code: i64, message: String },
    #[error("etcd answered {path} with unexpected data: {error}")]
    Decode { path: String, error: String },
}

impl EtcdError {
    /// The lease is gone (expired or revoked): a new one must be granted.
    pub fn is_lease_not_found(&self) -> bool {
        matches!(self, EtcdError::Refused { code, message }
            if *code == CODE_NOT_FOUND && message.contains("lease not found"))
    }
}

/// One key as etcd holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct KeyValue {
    #[serde(default, deserialize_with = "base64_bytes")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "base64_bytes")]
    pub value: Vec<u8>,
    /// The revision at which the key was created (a key deleted and created again gets a
    /// new one): the leader key's is the lease generation.
    #[serde(default, deserialize_with = "int64")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    pub mod_revision: i64,
    /// The lease the key is bound to (0: none).
    #[serde(default, deserialize_with = "int64")]
    pub lease: i64,
}

/// One comparison of a transaction; every one must hold for its writes to happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's create revision is this (0: the key does not exist).
    CreateRevision(String, i64),
    /// The key's last modification is at this revision.
    ModRevision(String, i64),
    /// The key exists and holds exactly this value.
    Value(String, Vec<u8>),
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        /// Bound to this lease (deleted when it expires).
        lease: Option<i64>,
    },
    Delete {
        key: String,
    },
}

impl Compare {
    fn to_json(&self) -> Value {
        // The target says which field of the comparison etcd reads.
        match self {
            Compare::CreateRevision(key, rev) => json!({
                "key": B64.encode(key), "result": "EQUAL", "target": "CREATE",
                "create_revision": rev.to_string(),
            }),
            Compare::ModRevision(key, rev) => json!({
                "key": B64.encode(key), "result": "EQUAL", "target": "MOD",
                "mod_revision": rev.to_string(),
            }),
            Compare::Value(key, value) => json!({
                "key": B64.encode(key), "result": "EQUAL", "target": "VALUE",
                "value": B64.encode(value),
            }),
        }
    }
}

impl Op {
    fn to_json(&self) -> Value {
        match self {
            Op::Put { key, value, lease } => json!({ "request_put": put_body(key, value, *lease) }),
            Op::Delete { key } => json!({ "request_delete_range": { "key": B64.encode(key) } }),
        }
    }
}

fn put_body(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
    if let Some(id) = lease {
        body["lease"] = Value::String(id.to_string());
    }
    body
}

/// The body of `/v3/kv/txn`: the writes happen only if every comparison holds.
pub fn txn_body(compare: &[Compare], success: &[Op]) -> Value {
    json!({
        "compare": compare.iter().map(Compare::to_json).collect::<Vec<_>>(),
        "success": success.iter().map(Op::to_json).collect::<Vec<_>>(),
    })
}

/// The end of the range holding every key that starts with `prefix`: the prefix with its
/// last byte that is not 0xff incremented (and what follows dropped).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or none): "\0" means to the end of the key space.
    vec![0]
}

/// etcd's proto3 JSON writes int64 as a string; accept a number too.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(i64),
        Text(String),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(s) => s.parse().map_err(D::Error::custom),
    }
}

fn base64_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    B64.decode(text).map_err(D::Error::custom)
}

#[derive(Debug, Default, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Debug, Default, Deserialize)]
struct TxnResponse {
    #[serde(default)]
    succeeded: bool,
}

#[derive(Debug, Default, Deserialize)]
struct DeleteResponse {
    #[serde(default, deserialize_with = "int64")]
    deleted: i64,
}

#[derive(Debug, Default, Deserialize)]
struct LeaseResponse {
    #[serde(default, rename = "ID", deserialize_with = "int64")]
    id: i64,
    #[serde(default, rename = "TTL", deserialize_with = "int64")]
    ttl: i64,
    /// Lease grant reports some failures here rather than as a status.
    #[serde(default)]
    error: String,
}

/// The keep-alive is a stream in gRPC: the gateway wraps each answer in `result`, or says
/// why the stream failed in `error`.
#[derive(Debug, Default, Deserialize)]
struct KeepAliveResponse {
    #[serde(default)]
    result: Option<LeaseResponse>,
    #[serde(default)]
    error: Option<Value>,
}

/// A refusal's body. `message` and `error` hold the same text; older gateways send one.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

impl ErrorBody {
    fn text(&self) -> String {
        match (&self.message, &self.error) {
            (Some(m), _) if !m.is_empty() => m.clone(),
            (_, Some(Value::String(e))) => e.clone(),
            (_, Some(e)) => e.to_string(),
            _ => "no message".into(),
        }
    }
}

/// How one endpoint's attempt ended, when it did not succeed.
enum Attempt {
    /// etcd answered no: the same question to another member gets the same answer.
    Refused(EtcdError),
    /// This endpoint could not answer; another one may.
    Failed(String),
    TimedOut,
}

/// The endpoints of one etcd cluster, and the HTTP connections to them.
#[derive(Debug)]
pub struct Etcd {
    http: reqwest::Client,
    endpoints: Vec<String>,
    timeout: Duration,
    /// The endpoint that answered last: tried first.
    preferred: AtomicUsize,
}

impl Etcd {
    /// A client of `endpoints` (`http://host:2379`; `host:2379` is taken as `http://`),
    /// each call bounded by `timeout`. Nothing connects until the first call.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        let http = reqwest::Client::builder()
            // The cluster's coordination must not go through an HTTP proxy the
            // environment names for other traffic.
            .no_proxy()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| EtcdError::Unreachable(format!("building the HTTP client: {e}")))?;
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let e = e.trim_end_matches('/');
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        Ok(Etcd {
            http,
            endpoints,
            timeout,
            preferred: AtomicUsize::new(0),
        })
    }

    /// POST `body` to `/v3<path>` on the first endpoint that answers.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, EtcdError> {
        let deadline = Instant::now() + self.timeout;
        let n = self.endpoints.len().max(1);
        let first = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        let mut answered = false;
        for i in 0..self.endpoints.len() {
            let at = (first + i) % n;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Time for the endpoints not tried yet: one that swallows packets must not use
            // up the whole call.
            let budget = left / (n - i) as u32;
            let endpoint = &self.endpoints[at];
            match self.attempt(endpoint, path, body, budget).await {
                Ok(bytes) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return decode(path, &bytes);
                }
                Err(Attempt::Refused(e)) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Err(e);
                }
                Err(Attempt::Failed(why)) => {
                    answered = true;
                    failures.push(format!("{endpoint}: {why}"));
                }
                Err(Attempt::TimedOut) => {
                    failures.push(format!("{endpoint}: no answer within {budget:?}"))
                }
            }
        }
        if !answered {
            // Silence all along, or the deadline passed before every endpoint was tried.
            return Err(EtcdError::Timeout(self.timeout));
        }
        Err(EtcdError::Unreachable(failures.join("; ")))
    }

    async fn attempt(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
        budget: Duration,
    ) -> Result<bytes::Bytes, Attempt> {
        let url = format!("{endpoint}/v3{path}");
        let exchange = async {
            let response = self.http.post(&url).json(body).send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.bytes().await?))
        };
        let (status, bytes) = match tokio::time::timeout(budget, exchange).await {
            Err(_) => return Err(Attempt::TimedOut),
            Ok(Err(e)) => return Err(Attempt::Failed(error_chain(&e))),
            Ok(Ok(answer)) => answer,
        };
        if status.is_success() {
            return Ok(bytes);
        }
        match decode::<ErrorBody>(path, &bytes) {
            Ok(b) if b.code.is_some() => {
                let code = b.code.unwrap_or_default();
                let message = b.text();
                if code == CODE_UNAVAILABLE || code == CODE_DEADLINE_EXCEEDED {
                    Err(Attempt::Failed(message))
                } else {
                    Err(Attempt::Refused(EtcdError::Refused { code, message }))
                }
            }
            // Not etcd's gateway answering (a proxy, another server on the port).
            _ => Err(Attempt::Failed(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))),
        }
    }

    /// Every key from `key` (exactly, or with `prefix`, every key that starts with it).
    pub async fn range(&self, key: &str, prefix: bool) -> Result<Vec<KeyValue>, EtcdError> {
        let mut body = json!({ "key": B64.encode(key) });
        if prefix {
            body["range_end"] = Value::String(B64.encode(prefix_end(key.as_bytes())));
        }
        let r: RangeResponse = self.call("/kv/range", &body).await?;
        Ok(r.kvs)
    }

    pub async fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), EtcdError> {
        let _: Value = self.call("/kv/put", &put_body(key, value, lease)).await?;
        Ok(())
    }

    /// The writes in `success` if every comparison holds; whether they did.
    pub async fn txn(&self, compare: &[Compare], success: &[Op]) -> Result<bool, EtcdError> {
        let r: TxnResponse = self.call("/kv/txn", &txn_body(compare, success)).await?;
        Ok(r.succeeded)
    }

    /// Delete `key`; how many keys went (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let body = json!({ "key": B64.encode(key) });
        let r: DeleteResponse = self.call("/kv/deleterange", &body).await?;
        Ok(r.deleted)
    }

    /// A new lease of `ttl` seconds; its id.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let body = json!({ "TTL": ttl.to_string() });
        let r: LeaseResponse = self.call("/lease/grant", &body).await?;
        if !r.error.is_empty() || r.id == 0 {
            return Err(EtcdError::Refused {
                code: 0,
                message: format!("lease grant: {}", r.error),
            });
        }
        Ok(r.id)
    }

    /// Renew lease `id`: its ttl from now in seconds, or 0 if it is gone (expired,
    /// revoked, never granted).
    pub async fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let body = json!({ "ID": id.to_string() });
        let r: KeepAliveResponse = match self.call("/lease/keepalive", &body).await {
            Err(e) if e.is_lease_not_found() => return Ok(0),
            other => other?,
        };
        if let Some(error) = r.error {
            let b: ErrorBody = serde_json::from_value(error.clone()).unwrap_or_default();
            let message = b.text();
            if message.contains("lease not found") {
                return Ok(0);
            }
            return Err(EtcdError::Refused {
                code: b.code.unwrap_or_default(),
                message,
            });
        }
        // An answer without a ttl (proto3 JSON leaves out 0) says the lease is gone.
        Ok(r.result.map_or(0, |r| r.ttl))
    }

    /// Revoke lease `id`: every key bound to it goes at once.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let body = json!({ "ID": id.to_string() });
        let _: Value = self.call("/lease/revoke", &body).await?;
        Ok(())
    }
}

/// The keep-alive's answer is a stream of JSON objects (one here): read the first.
fn decode<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, EtcdError> {
    let mut values = serde_json::Deserializer::from_slice(bytes).into_iter::<T>();
    match values.next() {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(EtcdError::Decode {
            path: path.into(),
            error: e.to_string(),
        }),
        None => Err(EtcdError::Decode {
            path: path.into(),
            error: "an empty body".into(),
        }),
    }
}

/// reqwest's error with its causes ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_incremented() {
        assert_eq!(prefix_end(b"/walrelay/c/"), b"/walrelay/c0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn a_transaction_is_written_as_the_gateway_wants_it() {
        let body = txn_body(
            &[
                Compare::CreateRevision("/k/leader".into(), 42),
                Compare::Value("/k/leader".into(), b"n1".to_vec()),
            ],
            &[
                Op::Put {
                    key: "/k/sync".into(),
                    value: b"{}".to_vec(),
                    lease: Some(7),
                },
                Op::Delete {
                    key: "/k/switchover".into(),
                },
            ],
        );
        assert_eq!(
            body,
            json!({
                "compare": [
                    {"key": "L2svbGVhZGVy", "result": "EQUAL", "target": "CREATE", "create_revision": "42"},
                    {"key": "L2svbGVhZGVy", "result": "EQUAL", "target": "VALUE", "value": "bjE="},
                ],
                "success": [
                    {"request_put": {"key": "L2svc3luYw==", "value": "e30=", "lease": "7"}},
                    {"request_delete_range": {"key": "L2svc3dpdGNob3Zlcg=="}},
                ],
            })
        );
    }

    #[test]
    fn answers_decode_with_int64_as_strings_and_defaults_left_out() {
        let r: RangeResponse = decode(
            "/kv/range",
            br#"{"header":{"revision":"9"},"kvs":[{"key":"L2svbGVhZGVy","create_revision":"5","mod_revision":"5","version":"1","value":"bjE=","lease":"7587"}],"count":"1"}"#,
        )
        .unwrap();
        assert_eq!(
            r.kvs,
            [KeyValue {
                key: b"/k/leader".to_vec(),
                value: b"n1".to_vec(),
                create_revision: 5,
                mod_revision: 5,
                lease: 7587,
            }]
        );
        // No kvs, no succeeded: the defaults.
        let empty: RangeResponse = decode("/kv/range", br#"{"header":{}}"#).unwrap();
        assert!(empty.kvs.is_empty());
        let failed: TxnResponse = decode("/kv/txn", br#"{"header":{}}"#).unwrap();
        assert!(!failed.succeeded);
        // A keep-alive of a lease that is gone answers without a TTL.
        let gone: KeepAliveResponse = decode(
            "/lease/keepalive",
            b"{\"result\":{\"header\":{},\"ID\":\"12\"}}\n",
        )
        .unwrap();
        assert_eq!(gone.result.unwrap().ttl, 0);
        let alive: KeepAliveResponse = decode(
            "/lease/keepalive",
            br#"{"result":{"header":{},"ID":"12","TTL":"8"}}"#,
        )
        .unwrap();
        assert_eq!(alive.result.unwrap().ttl, 8);
    }

    #[test]
    fn a_refusal_names_its_code_and_message() {
        let b: ErrorBody = serde_json::from_str(
            r#"{"error":"etcdserver: requested lease not found","code":5,"message":"etcdserver: requested lease not found"}"#,
        )
        .unwrap();
        let e = EtcdError::Refused {
            code: b.code.unwrap(),
            message: b.text(),
        };
        assert!(e.is_lease_not_found());
        assert_eq!(
            e.to_string(),
            "etcd: etcdserver: requested lease not found (code 5)"
        );
    }

    /// A refused connection on the first endpoint moves the call to the next one, which is
    /// tried first from then on; with none answering, the error names each.
    #[tokio::test]
    async fn a_dead_endpoint_moves_the_call_to_the_next() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/v3/kv/txn",
            axum::routing::post(|| async { r#"{"header":{},"succeeded":true}"# }),
        );
        let server = crate::task::spawn_named("fake-etcd", async move {
            let _ = axum::serve(listener, app).await;
        });
        let etcd = Etcd::new(
            &[format!("http://{dead_addr}"), live.to_string()],
            Duration::from_secs(3),
        )
        .unwrap();
        assert!(etcd.txn(&[], &[]).await.unwrap());
        assert_eq!(etcd.preferred.load(Ordering::Relaxed), 1);
        server.abort();

        let none = Etcd::new(&[format!("http://{dead_addr}")], Duration::from_secs(3)).unwrap();
        let e = none.txn(&[], &[]).await.unwrap_err();
        assert!(
            matches!(&e, EtcdError::Unreachable(why) if why.contains(&dead_addr.to_string())),
            "{e}"
        );
    }
}
