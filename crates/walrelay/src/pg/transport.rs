//! The byte stream under every PostgreSQL connection: TCP, Unix socket, or TLS over TCP,
//! negotiated with `SSLRequest` according to `sslmode`.
//!
//! Both the SQL connections (tokio-postgres, given this stream through `connect_raw`) and the
//! replication connection use this one path, so TLS behaves the same for both.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

use super::conninfo::{ConnInfo, RootCerts, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("could not connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("timed out after {secs} s connecting to {target} (connect_timeout)")]
    Timeout { target: String, secs: u64 },
    #[error("server {target} does not support TLS, but sslmode={mode} requires it")]
    TlsRefused { target: String, mode: &'static str },
    #[error("TLS handshake with {target} failed: {source}")]
    TlsHandshake { target: String, source: io::Error },
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
}

impl TransportError {
    /// Worth retrying: the server may come back. Configuration problems are not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Timeout { .. }
        )
    }
}

pub enum PgStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for PgStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PgStream::Tcp(_) => "PgStream::Tcp",
            PgStream::Unix(_) => "PgStream::Unix",
            PgStream::Tls(_) => "PgStream::Tls",
        })
    }
}

/// Open a stream to the server `info` names, with TLS as `sslmode` asks, within
/// `connect_timeout`.
pub async fn connect(info: &ConnInfo) -> Result<PgStream, TransportError> {
    let target = format!("{}:{}", info.host, info.port);
    let secs = info.connect_timeout.as_secs();
    match tokio::time::timeout(info.connect_timeout, connect_inner(info, &target)).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout { target, secs }),
    }
}

async fn connect_inner(info: &ConnInfo, target: &str) -> Result<PgStream, TransportError> {
    let connect_err = |source| TransportError::Connect {
        target: target.to_string(),
        source,
    };
    if info.is_unix_socket() {
        let path = format!("{}/.s.PGSQL.{}", info.host, info.port);
        let s = UnixStream::connect(&path).await.map_err(connect_err)?;
        return Ok(PgStream::Unix(s));
    }
    let tcp = match info.hostaddr {
        Some(addr) => TcpStream::connect((addr, info.port)).await,
        None => TcpStream::connect((info.host.as_str(), info.port)).await,
    }
    .map_err(connect_err)?;
    tcp.set_nodelay(true).map_err(connect_err)?;
    // Notice a dead peer (a primary that vanished) within about a minute instead of hours.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&keepalive)
        .map_err(connect_err)?;

    if info.sslmode == SslMode::Disable {
        return Ok(PgStream::Tcp(tcp));
    }
    let mut tcp = tcp;
    let mut request = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(connect_err)?;
    let answer = tcp.read_u8().await.map_err(connect_err)?;
    match answer {
        b'S' => {}
        b'N' if info.sslmode.requires_tls() => {
            return Err(TransportError::TlsRefused {
                target: target.to_string(),
                mode: mode_name(info.sslmode),
            })
        }
        b'N' => return Ok(PgStream::Tcp(tcp)),
        other => {
            return Err(connect_err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer {other:#x} to SSLRequest: is this a PostgreSQL server?"),
            )))
        }
    }
    let config = tls_config(info)?;
    let name = match info.host.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(info.host.clone())
            .map_err(|e| TransportError::TlsConfig(format!("host {:?}: {e}", info.host)))?,
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| TransportError::TlsHandshake {
            target: target.to_string(),
            source,
        })?;
    Ok(PgStream::Tls(Box::new(tls)))
}

fn mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

fn tls_config(info: &ConnInfo) -> Result<rustls::ClientConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match info.sslmode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = load_roots(info)?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
            if info.sslmode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        // libpq's prefer and require encrypt without checking who is at the other end.
        _ => Arc::new(AnyCertificate(provider)),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    TransportError::TlsConfig(format!("sslcert {}: {e}", cert.display()))
                })?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| TransportError::TlsConfig(format!("sslkey {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TransportError::TlsConfig(format!("client certificate: {e}")))
        }
        (Some(_), None) => Err(TransportError::TlsConfig(
            "sslcert is set but sslkey is not: give the client key file too".into(),
        )),
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn load_roots(info: &ConnInfo) -> Result<RootCertStore, TransportError> {
    let mut roots = RootCertStore::empty();
    match &info.sslrootcert {
        Some(RootCerts::File(path)) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    TransportError::TlsConfig(format!("sslrootcert {}: {e}", path.display()))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TransportError::TlsConfig(format!(
                    "sslrootcert {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        Some(RootCerts::System) => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
        None => {
            return Err(TransportError::TlsConfig(format!(
                "sslmode={} needs trusted root certificates: set sslrootcert to a PEM file, or sslrootcert=system for the system's trust store (libpq's default, ~/.postgresql/root.crt, does not exist)",
                mode_name(info.sslmode)
            )))
        }
    }
    Ok(roots)
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require`: encryption without authentication of the server, as in libpq. The
/// handshake signatures are still checked, so the session keys belong to the certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
