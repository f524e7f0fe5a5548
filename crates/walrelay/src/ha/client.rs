//! `ctl`'s requests to an agent's REST API: one HTTP/1.0 request, over TLS when the agent
//! serves HTTPS (its member key says so), checked against `api.cafile` or the system's
//! trust store, with `Authorization: Bearer <api.token>` when a token is configured.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::ha::ApiSection;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the REST API at {addr} does not answer: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS to the REST API at {addr}: {message}")]
    Tls { addr: String, message: String },
    #[error("the REST API at {addr} did not answer within 10 s")]
    Timeout { addr: String },
    #[error("the REST API at {addr} sent something that is not an HTTP answer")]
    BadAnswer { addr: String },
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: the status and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `POST path` with a JSON `body` to the API at `addr` (`host:port`), over HTTPS if
/// `https`.
pub async fn post(
    addr: &str,
    https: bool,
    api: &ApiSection,
    path: &str,
    body: &str,
) -> Result<Answer, ClientError> {
    let mut request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = &api.token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.into(),
                source,
            })?;
        if !https {
            return exchange(tcp, request.as_bytes(), addr).await;
        }
        let host = host_of(addr);
        let name = ServerName::try_from(host.to_string()).map_err(|e| ClientError::Tls {
            addr: addr.into(),
            message: format!("{host}: {e}"),
        })?;
        let connector =
            tokio_rustls::TlsConnector::from(client_config(api).map_err(|message| {
                ClientError::Tls {
                    addr: addr.into(),
                    message,
                }
            })?);
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls {
                addr: addr.into(),
                message: e.to_string(),
            })?;
        exchange(tls, request.as_bytes(), addr).await
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout { addr: addr.into() })?
}

/// The host of `host:port` (an IPv6 address without its brackets).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn client_config(api: &ApiSection) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &api.cafile {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("api.cafile {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "api.cafile {} holds no usable certificate",
                    path.display()
                ));
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    request: &[u8],
    addr: &str,
) -> Result<Answer, ClientError> {
    let io = |source| ClientError::Connect {
        addr: addr.into(),
        source,
    };
    stream.write_all(request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer).await {
        // A server that closes without TLS's close_notify has still said all it had to.
        if e.kind() != std::io::ErrorKind::UnexpectedEof || answer.is_empty() {
            return Err(io(e));
        }
    }
    parse_answer(&answer).ok_or_else(|| ClientError::BadAnswer { addr: addr.into() })
}

fn parse_answer(answer: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    if !status_line.starts_with("HTTP/") {
        return None;
    }
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    Some(Answer {
        status,
        body: body.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_hosts_parse() {
        assert_eq!(
            parse_answer(b"HTTP/1.0 202 Accepted\r\ncontent-length: 3\r\n\r\nok\n"),
            Some(Answer {
                status: 202,
                body: "ok\n".into()
            })
        );
        assert_eq!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
        assert_eq!(parse_answer(b"HTTP/1.0 200 OK\r\n"), None);
        assert_eq!(host_of("10.0.0.11:8008"), "10.0.0.11");
        assert_eq!(host_of("[::1]:8008"), "::1");
        assert_eq!(host_of("pg1.example:8008"), "pg1.example");
    }
}
