//! RabbitMQ: the connection both the `amqp` sink and `walrelay consume` open, and the
//! consumer that applies a queue to PostgreSQL (`consume`).

pub mod consume;

use std::path::Path;
use std::str::FromStr as _;

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpUrl;

/// Heartbeat interval asked of the broker when the URL does not say.
const HEARTBEAT_SECONDS: u16 = 10;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("{url}: {message}")]
    Url { url: String, message: String },
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("RabbitMQ {url}: {what}: {source}")]
    Broker {
        url: String,
        what: &'static str,
        source: lapin::Error,
    },
    #[error("RabbitMQ {url}: the broker ended the consumer of queue {queue}")]
    ConsumerEnded { url: String, queue: String },
    #[error("RabbitMQ {url}: the broker refused message {message_id} (nack)")]
    Refused { url: String, message_id: String },
    #[error("RabbitMQ {url}: message {message_id} to exchange {exchange:?} with routing key {routing_key:?} reached no queue ({reply}): bind a queue for that key (sink queues), or give the exchange an alternate exchange")]
    Unroutable {
        url: String,
        exchange: String,
        routing_key: String,
        message_id: String,
        reply: String,
    },
}

impl AmqpError {
    /// The broker may come back: connection and channel failures. A CA file that cannot be
    /// read is the operator's to fix.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            AmqpError::CaFile { .. } | AmqpError::Url { .. } | AmqpError::Unroutable { .. }
        )
    }

    pub fn broker<'a>(
        url: &'a AmqpUrl,
        what: &'static str,
    ) -> impl FnOnce(lapin::Error) -> Self + 'a {
        move |source| AmqpError::Broker {
            url: url.redacted(),
            what,
            source,
        }
    }
}

/// Connect to the broker at `url` (TLS for `amqps://`, trusting `ca_file` if given, the
/// system's roots otherwise).
pub async fn connect(url: &AmqpUrl, ca_file: Option<&Path>) -> Result<Connection, AmqpError> {
    let cert_chain = match ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| AmqpError::CaFile {
                path: path.display().to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain,
    };
    let runtime = lapin::runtime::default_runtime().map_err(AmqpError::broker(url, "runtime"))?;
    let properties = ConnectionProperties::default().with_connection_name("walrelay".into());
    let mut uri = lapin::uri::AMQPUri::from_str(&url.0).map_err(|e| AmqpError::Url {
        url: url.redacted(),
        message: e.to_string(),
    })?;
    // Heartbeats every few seconds unless the URL sets them, so that a broker that vanished
    // without closing the connection is noticed in seconds, not minutes.
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECONDS);
    }
    Connection::connect_uri_with_config(uri, properties, tls, runtime)
        .await
        .map_err(AmqpError::broker(url, "connecting"))
}
