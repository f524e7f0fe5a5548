//! Everything that talks to PostgreSQL: connection strings, the transport (TCP, Unix socket,
//! TLS), SQL sessions, the replication-protocol client, quoting, and local servers.

pub mod conninfo;
pub mod copy_text;
pub mod error;
pub mod local;
pub mod locate;
pub mod quote;
pub mod replication;
pub mod sql;
pub mod transport;
pub mod wire;

pub use conninfo::ConnInfo;
pub use error::{PgError, ServerError};
