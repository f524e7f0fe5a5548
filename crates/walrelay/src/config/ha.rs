//! The configuration of one HA node (`walrelay ha --config node.toml`): who this node is,
//! where etcd is, the cluster's timings, and how its PostgreSQL is run.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_slot_name, parse_toml, read_file, ConfigError};
use crate::ha::decide::Policy;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    pub node: NodeSection,
    pub cluster: ClusterSection,
    #[serde(default)]
    pub postgres: PostgresSection,
    #[serde(default)]
    pub api: ApiSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Unique in the cluster; also the replication slot and `application_name` of this
    /// node, so lower-case letters, digits and `_`.
    pub name: String,
    /// Where this node keeps PostgreSQL: `data/`, the socket directory and `server.log`.
    pub base_dir: PathBuf,
    /// The address other nodes and clients use to reach this PostgreSQL.
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    /// The REST API's listen address (also advertised to `ctl` and HAProxy).
    pub api: String,
    /// Never promote this node.
    #[serde(default)]
    pub nofailover: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// etcd client URLs (`http://host:2379`).
    pub etcd: Vec<String>,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(default = "default_loop_wait", with = "humantime_serde")]
    pub loop_wait: Duration,
    #[serde(default = "default_retry_timeout", with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// A replica more than this many bytes behind the most advanced member is not promoted.
    #[serde(default = "default_maximum_lag")]
    pub maximum_lag_on_failover: u64,
    /// Commits wait for one synchronous standby, and only it may be promoted.
    #[serde(default)]
    pub synchronous_mode: bool,
    /// Rejoin a former primary with pg_rewind (else clone it again).
    #[serde(default = "yes")]
    pub use_pg_rewind: bool,
    /// The primary's logical slots kept on every replica, so that a relay finds its slot
    /// after a failover: names, or prefixes ending in `*`. The default takes walrelay's
    /// own (the relay's default slot name is `walrelay`; name yours `walrelay_...`).
    #[serde(default = "default_logical_slots")]
    pub logical_slots: Vec<String>,
    /// The primary drops a member's physical slot once the member has been gone from etcd
    /// this long (its agent stopped for good): the slot would hold WAL for no one.
    #[serde(default = "default_departed_after", with = "humantime_serde")]
    pub drop_slots_of_departed_after: Duration,
    /// Bytes: a slot on the primary that holds more WAL than this is reported (a warning
    /// every loop it stays so). `None`: no limit of walrelay's own (PostgreSQL's
    /// `max_slot_wal_keep_size`, 4GB, still invalidates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_wal_limit: Option<u64>,
    /// ...and dropped, once no one uses it, with an error in the log.
    #[serde(default)]
    pub drop_slots_over_limit: bool,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    #[serde(default = "default_superuser")]
    pub superuser: String,
    /// `None`: not set, which means the documented default — enough to join a cluster made
    /// with it, refused for bootstrapping a new one (`unset_passwords`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superuser_password: Option<String>,
    #[serde(default = "default_replication_user")]
    pub replication_user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_password: Option<String>,
    /// Extra `pg_hba.conf` lines (loopback replication and superuser access are always
    /// there).
    #[serde(default)]
    pub hba: Vec<String>,
    /// Extra `postgresql.conf` settings, as `name = "value"` (quoted as PostgreSQL wants).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

impl Default for PostgresSection {
    fn default() -> Self {
        PostgresSection {
            superuser: default_superuser(),
            superuser_password: None,
            replication_user: default_replication_user(),
            replication_password: None,
            hba: Vec::new(),
            settings: BTreeMap::new(),
        }
    }
}

impl PostgresSection {
    pub fn superuser_password(&self) -> &str {
        self.superuser_password
            .as_deref()
            .unwrap_or(DEFAULT_PASSWORD)
    }

    pub fn replication_password(&self) -> &str {
        self.replication_password
            .as_deref()
            .unwrap_or(DEFAULT_PASSWORD)
    }

    /// The password keys not set in the file, which stand for the documented default: a
    /// new cluster is not bootstrapped with them.
    pub fn unset_passwords(&self) -> Vec<&'static str> {
        let mut unset = Vec::new();
        if self.superuser_password.is_none() {
            unset.push("postgres.superuser_password");
        }
        if self.replication_password.is_none() {
            unset.push("postgres.replication_password");
        }
        unset
    }
}

impl fmt::Debug for PostgresSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSection")
            .field("superuser", &self.superuser)
            .field("replication_user", &self.replication_user)
            .field("hba", &self.hba)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The REST API's protection: a token for its one unsafe request, and TLS.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// `POST /switchover` needs `Authorization: Bearer <token>`; without a token set, it is
    /// refused. `ctl switchover` sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certfile: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<PathBuf>,
    /// For `ctl`: the CA certificates (PEM) that agents' HTTPS certificates are checked
    /// against; without it, the system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cafile: Option<PathBuf>,
}

impl fmt::Debug for ApiSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSection")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("certfile", &self.certfile)
            .field("keyfile", &self.keyfile)
            .field("cafile", &self.cafile)
            .finish()
    }
}

impl ApiSection {
    fn validate(&self, invalid: impl Fn(&str, String) -> ConfigError) -> Result<(), ConfigError> {
        if self.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(invalid(
                "api.token",
                "must not be empty (leave it out to refuse POST /switchover)".into(),
            ));
        }
        match (&self.certfile, &self.keyfile) {
            (Some(_), None) => Err(invalid(
                "api.keyfile",
                "api.certfile is set: give its private key too".into(),
            )),
            (None, Some(_)) => Err(invalid(
                "api.certfile",
                "api.keyfile is set: give its certificate too".into(),
            )),
            _ => Ok(()),
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_namespace() -> String {
    "walrelay".into()
}
// Fast failover: a dead primary's lease runs out 8 s after its last renewal; a primary that
// cannot renew fences itself after 8 − 1 − 3 = 4 s, before the lease can expire.
fn default_ttl() -> Duration {
    Duration::from_secs(8)
}
fn default_loop_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_maximum_lag() -> u64 {
    1 << 20
}
fn default_logical_slots() -> Vec<String> {
    vec!["walrelay*".into()]
}
fn default_departed_after() -> Duration {
    Duration::from_secs(30 * 60)
}
fn yes() -> bool {
    true
}
fn default_superuser() -> String {
    "postgres".into()
}
/// The documented default of both passwords (what earlier versions bootstrapped with).
const DEFAULT_PASSWORD: &str = "walrelay";
fn default_replication_user() -> String {
    "replicator".into()
}

impl HaConfig {
    pub fn load(path: &Path) -> Result<HaConfig, ConfigError> {
        Self::parse(&read_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<HaConfig, ConfigError> {
        let config: HaConfig = parse_toml(text, path)?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        if check_slot_name(&config.node.name).is_err() {
            return Err(invalid(
                "node.name",
                "1 to 63 lower-case letters, digits or _ (it names a replication slot)".into(),
            ));
        }
        if config.node.port == 0 {
            return Err(invalid("node.port", "must not be 0".into()));
        }
        if config.node.api.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "node.api",
                format!(
                    "{:?} is not an address like 127.0.0.1:8008",
                    config.node.api
                ),
            ));
        }
        if config.cluster.etcd.is_empty() {
            return Err(invalid("cluster.etcd", "give at least one etcd URL".into()));
        }
        for key in [&config.cluster.name, &config.cluster.namespace] {
            if key.is_empty() || key.contains('/') {
                return Err(invalid(
                    "cluster.name",
                    "cluster name and namespace must be non-empty and hold no /".into(),
                ));
            }
        }
        if config.cluster.ttl.as_secs() < 2 {
            return Err(invalid("cluster.ttl", "must be at least 2 s".into()));
        }
        for pattern in &config.cluster.logical_slots {
            // `*` alone takes every slot; otherwise a name, or a prefix of one.
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if pattern != "*" && check_slot_name(name).is_err() {
                return Err(invalid(
                    "cluster.logical_slots",
                    format!("{pattern:?}: a slot name, or a prefix of one followed by *"),
                ));
            }
        }
        if config.cluster.loop_wait.is_zero() {
            return Err(invalid("cluster.loop_wait", "must be more than 0".into()));
        }
        config
            .policy()
            .validate()
            .map_err(|m| invalid("cluster.ttl", m))?;
        config.api.validate(invalid)?;
        Ok(config)
    }

    pub fn policy(&self) -> Policy {
        Policy {
            ttl: self.cluster.ttl,
            loop_wait: self.cluster.loop_wait,
            retry_timeout: self.cluster.retry_timeout,
            maximum_lag_on_failover: self.cluster.maximum_lag_on_failover,
            synchronous_mode: self.cluster.synchronous_mode,
        }
    }
}

impl ClusterSection {
    /// Whether the primary's logical slot `name` is kept on the replicas.
    pub fn keeps_logical_slot(&self, name: &str) -> bool {
        self.logical_slots
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            })
    }

    /// `/<namespace>/<cluster>/`: every key of the cluster is under it.
    pub fn prefix(&self) -> String {
        format!("/{}/{}/", self.namespace, self.name)
    }
}

/// The keys `ctl` needs (it runs with a node's file, or with a `[cluster]` section and an
/// `[api]` section alone).
#[derive(Debug, Clone, Deserialize)]
pub struct CtlConfig {
    pub cluster: ClusterSection,
    pub api: ApiSection,
}

impl CtlConfig {
    pub fn load(path: &Path) -> Result<CtlConfig, ConfigError> {
        Self::parse(&read_file(path)?, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<CtlConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Any {
            cluster: ClusterSection,
            #[serde(default)]
            api: ApiSection,
        }
        let any: Any = parse_toml(text, path)?;
        any.api.validate(|key, message| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        })?;
        Ok(CtlConfig {
            cluster: any.cluster,
            api: any.api,
        })
    }
}
