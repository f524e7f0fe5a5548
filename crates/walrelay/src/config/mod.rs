//! The configuration file: typed sections, defaults, and `validate()`. Every key is listed
//! with its default in `docs/config.md`; a test keeps the two in step.

pub mod ha;
pub mod sets;
pub mod table_pattern;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::pg::conninfo;
pub use sets::{SetConfig, TableOptions, Transform};
pub use table_pattern::{NamePattern, TablePattern};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub ddl: DdlConfig,
    /// Replication sets (`[[set]]`); `source.tables` is the set named `default`.
    #[serde(default, rename = "set", skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<SetConfig>,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkConfig>,
}

/// Schema changes on the source (`[ddl]`, docs/config.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdlConfig {
    #[serde(default)]
    pub mode: DdlMode,
    #[serde(default)]
    pub on_unsafe: OnUnsafeDdl,
}

/// How schema changes are captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DdlMode {
    /// `statements` where the source role is a superuser, `additive` otherwise.
    #[default]
    Auto,
    /// An event trigger records each command in the stream; targets replay it in place.
    Statements,
    /// No trigger: a table's new columns and wider types, seen in the stream, are added
    /// on postgres targets from the stream's description of the table.
    Additive,
    /// Nothing: a target must be changed by hand, before the source.
    Off,
}

/// What happens to a command walrelay cannot replay safely on a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnsafeDdl {
    /// Log it (a warning naming the command and its position) and go on.
    #[default]
    Skip,
    /// Stop the relay at it, with the same message.
    Stop,
}

/// The initial copy of existing rows into postgres targets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Copy the tables a target lacks before streaming (and create them if missing).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Connections copying at once.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// A table is split into page ranges of about this many bytes (TOAST included), so
    /// that one big table copies on several connections.
    #[serde(default = "default_range_bytes")]
    pub range_bytes: u64,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            enabled: true,
            parallel: default_parallel(),
            range_bytes: default_range_bytes(),
        }
    }
}

fn default_range_bytes() -> u64 {
    64 << 20
}

fn default_log_rotation() -> Duration {
    Duration::from_secs(10)
}

fn default_parallel() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    /// Logical decoding with the pgoutput plugin.
    #[default]
    Pgoutput,
}

/// `source.capture`: how changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMethod {
    /// Logical decoding (pgoutput) through a replication slot.
    #[default]
    Logical,
    /// Triggers write each change to a log table (no logical decoding needed).
    Trigger,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(default, rename = "type")]
    pub kind: SourceType,
    #[serde(default)]
    pub capture: CaptureMethod,
    /// Trigger capture: how often the log switches to its other table; the one left is
    /// emptied (TRUNCATE) once every consumer is past it.
    #[serde(default = "default_log_rotation", with = "humantime_serde")]
    pub log_rotation: Duration,
    /// libpq connection string (URI or key=value).
    pub url: ConnString,
    #[serde(default = "default_name")]
    pub slot: String,
    #[serde(default = "default_name")]
    pub publication: String,
    /// Tables replicated as the set `default`, beside any `[[set]]`.
    #[serde(default)]
    pub tables: Vec<TablePattern>,
    /// How often to send a standby status update; capped at `wal_sender_timeout / 2`.
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    /// Where large streamed transactions wait for their commit. Default: a directory under
    /// the system's temporary directory, named after the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_dir: Option<PathBuf>,
    /// Capture logical messages (`pg_logical_emit_message`).
    #[serde(default = "yes")]
    pub messages: bool,
    /// Hand a transaction to the sinks only once the source's synchronous standby has it
    /// (needs `pg_read_all_stats`): after a failover to that standby, no target holds a
    /// transaction the new primary lacks.
    #[serde(default = "yes")]
    pub wait_for_sync_standby: bool,
    /// Which transactions by their replication origin: all, or only those made on the
    /// source itself (not applied there by a replication: two-way setups).
    #[serde(default)]
    pub origin: OriginFilter,
    /// Disjoint keys for writable nodes: at start, every sequence the relay carries steps
    /// by `nodes` on this source and hands out only this node's values (two-way setups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ranges: Option<KeyRanges>,
}

/// `source.key_ranges`: this node's place among the writable nodes. Its sequences hand
/// out the values `v` with `v mod nodes == node mod nodes` (node 1 of 2: 1, 3, 5, …;
/// node 2 of 2: 2, 4, 6, …), as MySQL's `auto_increment_offset`/`_increment` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRanges {
    /// This node's number, 1 to `nodes`; a different one on each node.
    pub node: u32,
    /// How many nodes write; the same on every node.
    pub nodes: u32,
}

/// `source.origin`: as the `origin` option of PostgreSQL 16's subscriptions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginFilter {
    /// Every transaction, replicated ones too (a cascade A -> B -> C passes A's on).
    #[default]
    Any,
    /// Only transactions without a replication origin: not those walrelay (or any
    /// replication) applied on the source, so that a relay each way does not loop.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    Jsonl(JsonlSinkConfig),
    Postgres(PostgresSinkConfig),
    Amqp(AmqpSinkConfig),
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Jsonl(j) => &j.name,
            SinkConfig::Postgres(p) => &p.name,
            SinkConfig::Amqp(a) => &a.name,
        }
    }

    /// The sets this sink takes; `None` for all.
    pub fn sets(&self) -> Option<&[String]> {
        match self {
            SinkConfig::Jsonl(j) => j.sets.as_deref(),
            SinkConfig::Postgres(p) => p.sets.as_deref(),
            SinkConfig::Amqp(a) => a.sets.as_deref(),
        }
    }

    /// Applies a transaction as PostgreSQL streams it, rather than whole at its commit.
    pub fn applies_streams(&self) -> bool {
        match self {
            SinkConfig::Jsonl(_) | SinkConfig::Amqp(_) => false,
            SinkConfig::Postgres(_) => true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlSinkConfig {
    /// A name for logs and status; default `jsonl`.
    #[serde(default = "default_jsonl_name")]
    pub name: String,
    /// The replication sets it takes (`[[set]]` names); default all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets: Option<Vec<String>>,
    /// A file to append to, or `-` for standard output.
    pub path: String,
}

/// What the postgres sink does when a change does not fit the target: a duplicate key on
/// insert, or no row for an update or delete; with two writable nodes
/// (`source.origin = "none"`) also a row the target changed after the incoming change was
/// made (`sink::postgres::conflict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Stop, naming the table, the key and the source position.
    #[default]
    Error,
    /// Make the target match: update the existing row, insert the missing one, ignore a
    /// missing row to delete. Every conflict is logged.
    #[serde(alias = "apply_remote")]
    Apply,
    /// Leave the target as it is and go on. Every conflict is logged.
    #[serde(alias = "keep_local")]
    Skip,
    /// The later commit wins (commit timestamps, then the node's system identifier): both
    /// nodes keep the same row. Two writable nodes only; needs `track_commit_timestamp`.
    #[serde(rename = "last_writer_wins")]
    LastWriterWins,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// A name for logs, status and the progress record; default `postgres`.
    #[serde(default = "default_postgres_name")]
    pub name: String,
    /// The replication sets it takes (`[[set]]` names); default all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets: Option<Vec<String>>,
    /// libpq connection string of the target database.
    pub url: ConnString,
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// `on_conflict` of single tables, by their qualified name on the target.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub on_conflict_tables: std::collections::BTreeMap<String, OnConflict>,
    /// Most source transactions applied in one target transaction.
    #[serde(default = "default_batch_transactions")]
    pub batch_transactions: usize,
    /// Most bytes of values applied in one target transaction.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// Longest a target transaction stays open while more changes keep coming.
    #[serde(default = "default_batch_delay", with = "humantime_serde")]
    pub batch_delay: Duration,
    /// Reject writes to the replicated target tables from any session but walrelay's.
    #[serde(default)]
    pub protect: bool,
}

impl PostgresSinkConfig {
    /// Whether any table resolves conflicts by `last_writer_wins`.
    pub fn uses_last_writer_wins(&self) -> bool {
        std::iter::once(&self.on_conflict)
            .chain(self.on_conflict_tables.values())
            .any(|p| *p == OnConflict::LastWriterWins)
    }
}

/// Publishes events to a RabbitMQ exchange (`sink::amqp`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSinkConfig {
    /// A name for logs and status; default `amqp`.
    #[serde(default = "default_amqp_name")]
    pub name: String,
    /// The replication sets it takes (`[[set]]` names); default all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sets: Option<Vec<String>>,
    /// `amqp://user:password@host:port/vhost` or `amqps://...`.
    pub url: AmqpUrl,
    /// PEM file of the CA that signed the broker's certificate (amqps); default: the
    /// system's trusted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Declared durable if missing.
    #[serde(default = "default_name")]
    pub exchange: String,
    #[serde(default)]
    pub exchange_type: ExchangeType,
    /// Where messages that no queue binding takes go, instead of stopping the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternate_exchange: Option<String>,
    /// Queues to declare (durable) and bind to the exchange.
    #[serde(default)]
    pub queues: Vec<AmqpQueueConfig>,
    #[serde(default)]
    pub format: MessageFormat,
    #[serde(default)]
    pub batch: MessageBatch,
    /// A transaction's message is cut into ordered chunks of about this many bytes.
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: usize,
    /// Messages published and not yet confirmed by the broker, at most.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpQueueConfig {
    pub name: String,
    /// The binding key; `#` (everything) by default.
    #[serde(default = "default_binding")]
    pub binding: String,
    #[serde(default)]
    pub kind: QueueKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    Fanout,
    #[default]
    Topic,
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    #[default]
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageFormat {
    /// The event JSON of docs/events.md.
    #[default]
    Walrelay,
    /// Debezium's change-event envelope.
    Debezium,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageBatch {
    /// One message per source transaction (chunked when large).
    #[default]
    Transaction,
    /// One message per event.
    Row,
    /// Consecutive whole transactions in one message, up to `chunk_bytes` or until input
    /// pauses (a message id then names a message of this run only).
    Group,
}

/// An AMQP URL, never printed whole: `Debug` hides the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AmqpUrl(pub String);

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({:?})", self.redacted())
    }
}

impl AmqpUrl {
    /// The URL with its password replaced by `***`, for messages.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let Some(scheme_end) = s.find("://").map(|i| i + 3) else {
            return "<not a URL>".into();
        };
        let rest = &s[scheme_end..];
        // The credentials end at the last '@', not at the first '/' or '?': a password may
        // hold either unencoded (the URL is then invalid, and this is what the error
        // shows). An '@' in the vhost or a parameter only hides more.
        match rest.rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{}{user}:***{}", &s[..scheme_end], &rest[at..])
            }
            None => s.clone(),
        }
    }

    fn check(&self) -> Result<(), String> {
        if !(self.0.starts_with("amqp://") || self.0.starts_with("amqps://")) {
            return Err(format!(
                "{} is not an amqp:// or amqps:// URL",
                self.redacted()
            ));
        }
        lapin::uri::AMQPUri::from_str(&self.0)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", self.redacted()))
    }
}

/// `walrelay consume`: a queue applied to a PostgreSQL target.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumeConfig {
    pub consume: ConsumeSection,
    pub target: PostgresSinkConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumeSection {
    pub url: AmqpUrl,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    pub queue: String,
    /// Messages received and not yet acknowledged, at most (raised while one transaction
    /// needs more).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    #[serde(default)]
    pub on_poison: OnPoison,
    /// Where `dead_letter` puts poison messages; default `<queue>.poison`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPoison {
    /// Stop with an error; the message stays in the queue.
    #[default]
    Stop,
    /// Move it to the dead-letter queue and go on.
    DeadLetter,
}

impl ConsumeConfig {
    pub fn load(path: &Path) -> Result<ConsumeConfig, ConfigError> {
        Self::parse(&read_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ConsumeConfig, ConfigError> {
        let config: ConsumeConfig = parse_toml(text, path)?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        config
            .consume
            .url
            .check()
            .map_err(|m| invalid("consume.url", m))?;
        if config.consume.queue.is_empty() {
            return Err(invalid("consume.queue", "must not be empty".into()));
        }
        if config.consume.prefetch == 0 {
            return Err(invalid("consume.prefetch", "must be at least 1".into()));
        }
        conninfo::parse(&config.target.url.0).map_err(|e| invalid("target.url", e.to_string()))?;
        Ok(config)
    }

    pub fn dead_letter_queue(&self) -> String {
        self.consume
            .dead_letter_queue
            .clone()
            .unwrap_or_else(|| format!("{}.poison", self.consume.queue))
    }
}

fn default_prefetch() -> u16 {
    1000
}
fn default_amqp_name() -> String {
    "amqp".into()
}
fn default_binding() -> String {
    "#".into()
}
fn default_chunk_bytes() -> usize {
    1 << 20
}
fn default_max_in_flight() -> usize {
    2000
}

fn default_postgres_name() -> String {
    "postgres".into()
}
fn default_batch_transactions() -> usize {
    // Large: a group commits at once when no more input waits, so this bound only matters
    // while a backlog drains, where bigger groups apply faster (fewer commits, more repeated
    // keys collapsed).
    10_000
}
fn default_batch_bytes() -> usize {
    16 << 20
}
fn default_batch_delay() -> Duration {
    Duration::from_millis(200)
}

fn default_name() -> String {
    "walrelay".into()
}
fn default_jsonl_name() -> String {
    "jsonl".into()
}
fn default_status_interval() -> Duration {
    Duration::from_secs(1)
}
fn yes() -> bool {
    true
}

/// A connection string, never printed whole: `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnString(pub String);

impl ConnString {
    pub fn resolve(&self) -> Result<conninfo::ConnInfo, conninfo::ConnInfoError> {
        conninfo::resolve(&self.0, &conninfo::ProcessEnv)
    }
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match conninfo::parse(&self.0) {
            Ok(pairs) => {
                let shown: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| {
                        if k == "password" {
                            format!("{k}=***")
                        } else {
                            format!("{k}={v}")
                        }
                    })
                    .collect();
                write!(f, "ConnString({:?})", shown.join(" "))
            }
            Err(_) => f.write_str("ConnString(<unparsable>)"),
        }
    }
}

impl Serialize for ConnString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ConnString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(ConnString)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl Config {
    /// The `postgres` sinks, in the file's order.
    pub fn postgres_sinks(&self) -> Vec<&PostgresSinkConfig> {
        self.sinks
            .iter()
            .filter_map(|s| match s {
                SinkConfig::Postgres(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// Read, parse and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(&read_file(path)?, path)
    }

    /// Parse and validate configuration text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = parse_toml(text, path)?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks that go beyond the types: `Err((key, what is wrong and what to do))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let s = &self.source;
        if let Err(e) = conninfo::parse(&s.url.0) {
            return Err(("source.url".into(), e.to_string()));
        }
        check_slot_name(&s.slot).map_err(|m| ("source.slot".to_string(), m))?;
        if s.publication.is_empty() {
            return Err(("source.publication".into(), "must not be empty".into()));
        }
        if s.tables.is_empty() && self.sets.is_empty() {
            return Err((
                "source.tables".into(),
                "list at least one table, e.g. tables = [\"public.orders\", \"sales.*\"], or configure a [[set]]".into(),
            ));
        }
        if !s.tables.is_empty() && self.sets.iter().any(|x| x.name == sets::DEFAULT_SET) {
            return Err((
                "set.name".into(),
                format!("{:?} is the set source.tables makes: rename the [[set]], or move source.tables into it", sets::DEFAULT_SET),
            ));
        }
        sets::validate(&self.sets)?;
        if s.status_interval < Duration::from_millis(10) {
            return Err((
                "source.status_interval".into(),
                "must be at least 10ms".into(),
            ));
        }
        if s.capture == CaptureMethod::Trigger
            && matches!(self.ddl.mode, DdlMode::Statements | DdlMode::Additive)
        {
            return Err((
                "ddl.mode".into(),
                "schema changes are captured from the logical stream: with capture = \"trigger\" set mode = \"off\" (or leave it at auto) and change the targets by hand first".into(),
            ));
        }
        if let Some(k) = s.key_ranges {
            if k.nodes < 2 || k.node < 1 || k.node > k.nodes {
                return Err((
                    "source.key_ranges".into(),
                    format!("node must be 1 to nodes, and nodes at least 2 (found node = {}, nodes = {})", k.node, k.nodes),
                ));
            }
            if s.origin != OriginFilter::None {
                return Err((
                    "source.key_ranges".into(),
                    "is for writable nodes with a relay each way: set origin = \"none\" too".into(),
                ));
            }
        }
        if self.snapshot.parallel == 0 {
            return Err(("snapshot.parallel".into(), "must be at least 1".into()));
        }
        if self.snapshot.range_bytes < 1 << 20 {
            return Err((
                "snapshot.range_bytes".into(),
                "must be at least 1048576 (1 MiB)".into(),
            ));
        }
        if self.sinks.is_empty() {
            return Err((
                "sink".into(),
                "configure at least one [[sink]], e.g. type = \"jsonl\", path = \"-\"".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let all_sets = self.sets();
        for (i, sink) in self.sinks.iter().enumerate() {
            for wanted in sink.sets().unwrap_or_default() {
                if !all_sets.iter().any(|x| x.name == *wanted) {
                    return Err((
                        format!("sink[{i}].sets"),
                        format!(
                            "no set is named {wanted:?}; the sets are {}",
                            all_sets
                                .iter()
                                .map(|x| format!("{:?}", x.name))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
            if !names.insert(sink.name()) {
                return Err((
                    format!("sink[{i}].name"),
                    format!(
                        "{:?} is used by two sinks; give each a distinct name",
                        sink.name()
                    ),
                ));
            }
            match sink {
                SinkConfig::Jsonl(j) => {
                    if j.path.is_empty() {
                        return Err((format!("sink[{i}].path"), "must be a file or \"-\"".into()));
                    }
                }
                SinkConfig::Postgres(p) => {
                    match conninfo::parse(&p.url.0) {
                        Err(e) => return Err((format!("sink[{i}].url"), e.to_string())),
                        Ok(pairs) if pairs.get("host").is_some_and(|h| h.contains(',')) => {
                            return Err((
                                format!("sink[{i}].url"),
                                "one host only (several hosts are for source.url)".into(),
                            ))
                        }
                        Ok(_) => {}
                    }
                    if p.batch_transactions == 0 || p.batch_bytes == 0 {
                        return Err((
                            format!("sink[{i}].batch_transactions"),
                            "batch_transactions and batch_bytes must be at least 1".into(),
                        ));
                    }
                }
                SinkConfig::Amqp(a) => {
                    a.url.check().map_err(|m| (format!("sink[{i}].url"), m))?;
                    if a.exchange.is_empty() {
                        return Err((format!("sink[{i}].exchange"), "must not be empty".into()));
                    }
                    if a.max_in_flight == 0 || a.chunk_bytes < 1024 {
                        return Err((
                            format!("sink[{i}].max_in_flight"),
                            "max_in_flight must be at least 1 and chunk_bytes at least 1024".into(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Every set: the `[[set]]`s, and `source.tables` as the set `default`.
    pub fn sets(&self) -> Vec<SetConfig> {
        let mut sets = Vec::new();
        if !self.source.tables.is_empty() {
            sets.push(SetConfig {
                name: sets::DEFAULT_SET.into(),
                tables: self.source.tables.clone(),
                options: Vec::new(),
                hash_key: None,
                sequences: Vec::new(),
            });
        }
        sets.extend(self.sets.iter().cloned());
        sets
    }

    /// Where spill files go.
    pub fn spill_dir(&self) -> PathBuf {
        self.source.spill_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("walrelay-spill-{}", self.source.slot))
        })
    }
}

/// A configuration file's text.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// TOML into a config type, with the line and column of what does not fit.
fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| line_and_column(text, s.start))
            .unwrap_or((1, 1));
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().replace('\n', " ").trim().to_string(),
        }
    })
}

/// PostgreSQL's rule for replication slot names (also what makes a name safe as a
/// directory under `pg_replslot`).
pub fn check_slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "{name:?} is not a valid slot name: use lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
