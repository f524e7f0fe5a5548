//! The PostgreSQL server an HA agent runs: bootstrap, clone, start as primary or replica,
//! promote, stop, rewind, and what it looks like right now.
//!
//! Settings that differ between nodes (port, socket, upstream, slot, synchronous standby)
//! live in `walrelay-node.conf`, included last from `postgresql.conf` and rewritten before
//! every start: pg_basebackup and pg_rewind copy the other node's configuration files, and
//! this file puts this node's own back on top.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use walrelay_model::Lsn;

use super::decide::Role;
use super::store::MemberInfo;
use crate::config::ha::HaConfig;
use crate::pg::local::{
    postmaster_pid, LocalServer, LocalServerError, LocalServerOptions, StopMode,
};
use crate::pg::quote;

const NODE_CONF: &str = "walrelay-node.conf";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Server(#[from] LocalServerError),
    #[error("PostgreSQL on this node: {0}")]
    Sql(String),
    #[error("{0}")]
    Other(String),
}

fn sql_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Sql(e.to_string())
}

/// How long starting a replica waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Until it accepts connections (it is about to be promoted).
    Ready,
    /// Until the postmaster runs, a few seconds at most.
    Started,
}

/// Where a replica streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl Upstream {
    pub fn of(m: &MemberInfo) -> Upstream {
        Upstream {
            name: m.name.clone(),
            host: m.host.clone(),
            port: m.port,
        }
    }
}

/// The server as one loop saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgState {
    pub running: bool,
    pub in_recovery: bool,
    /// WAL received (replica) or written (primary).
    pub received: Lsn,
    pub replayed: Lsn,
    pub timeline: u32,
    /// A replica's WAL receiver is streaming.
    pub streaming: bool,
}

impl PgState {
    pub fn role(&self) -> Role {
        match (self.running, self.in_recovery) {
            (false, _) => Role::Stopped,
            (true, true) => Role::Replica,
            (true, false) => Role::Primary,
        }
    }
}

pub struct Node {
    config: Arc<HaConfig>,
    pub server: LocalServer,
    client: Option<tokio_postgres::Client>,
    /// What `walrelay-node.conf` says now.
    upstream: Option<Upstream>,
    sync_standby: Option<String>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("data_dir", &self.server.data_dir())
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Node {
    pub fn new(config: Arc<HaConfig>) -> Result<Node, NodeError> {
        let server = LocalServer::open(Self::options(&config))?;
        // Local connections are trusted (the agent's own session): only the server's OS
        // user may reach the socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(server.socket_dir(), std::fs::Permissions::from_mode(0o700))
            .map_err(|e| NodeError::Other(format!("securing the socket directory: {e}")))?;
        Ok(Node {
            config,
            server,
            client: None,
            upstream: None,
            sync_standby: None,
        })
    }

    fn options(config: &HaConfig) -> LocalServerOptions {
        let mut o = LocalServerOptions::new(&config.node.base_dir, config.node.port);
        o.superuser = config.postgres.superuser.clone();
        o.password = config.postgres.superuser_password().to_string();
        o.data_checksums = true;
        o
    }

    pub fn has_data(&self) -> bool {
        self.server.data_dir().join("PG_VERSION").exists()
    }

    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    fn pgpass_path(&self) -> PathBuf {
        self.server.options.base_dir.join("pgpass")
    }

    /// Passwords go in a passfile, never on a command line or in `primary_conninfo`.
    fn write_pgpass(&self) -> Result<(), NodeError> {
        let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
        let p = &self.config.postgres;
        let text = format!(
            "*:*:*:{}:{}\n*:*:*:{}:{}\n",
            escape(&p.replication_user),
            escape(p.replication_password()),
            escape(&p.superuser),
            escape(p.superuser_password())
        );
        self.server.write_owned(&self.pgpass_path(), &text, 0o600)?;
        Ok(())
    }

    /// A `postgresql.conf` string literal.
    fn conf_literal(s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    }

    /// A libpq connection-string value.
    fn conninfo_value(s: &str) -> String {
        format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
    }

    /// This node's own settings, after everything copied from another node.
    fn write_node_conf(&mut self, upstream: Option<Upstream>) -> Result<(), NodeError> {
        self.write_pgpass()?;
        let n = &self.config.node;
        let mut conf =
            String::from("# Written by walrelay ha before every start; edits are lost.\n");
        let mut set = |k: &str, v: String| conf.push_str(&format!("{k} = {v}\n"));
        set("port", n.port.to_string());
        set("listen_addresses", Self::conf_literal(&n.host));
        set(
            "unix_socket_directories",
            Self::conf_literal(&self.server.socket_dir().display().to_string()),
        );
        set("cluster_name", Self::conf_literal(&n.name));
        set("hot_standby", "on".into());
        // A replica's copies of the primary's logical slots need the catalog rows their
        // decoding reads: the primary keeps them while the replica reports its slots' xmin.
        set("hot_standby_feedback", "on".into());
        set("wal_log_hints", "on".into());
        set("wal_keep_size", "'256MB'".into());
        // A member that never comes back keeps at most this much WAL in its slot.
        set("max_slot_wal_keep_size", "'4GB'".into());
        set("recovery_target_timeline", "'latest'".into());
        if let Some(u) = &upstream {
            let conninfo = format!(
                "host={} port={} user={} passfile={} application_name={} sslmode=prefer",
                Self::conninfo_value(&u.host),
                u.port,
                Self::conninfo_value(&self.config.postgres.replication_user),
                Self::conninfo_value(&self.pgpass_path().display().to_string()),
                Self::conninfo_value(&n.name),
            );
            set("primary_conninfo", Self::conf_literal(&conninfo));
            set("primary_slot_name", Self::conf_literal(&n.name));
        } else {
            set("primary_conninfo", "''".into());
            set("primary_slot_name", "''".into());
        }
        let sync = self
            .sync_standby
            .as_deref()
            .map(quote::ident)
            .unwrap_or_default();
        set("synchronous_standby_names", Self::conf_literal(&sync));
        for (k, v) in &self.config.postgres.settings {
            set(k, Self::conf_literal(v));
        }
        let path = self.server.data_dir().join(NODE_CONF);
        self.server.write_owned(&path, &conf, 0o600)?;
        self.upstream = upstream;
        Ok(())
    }

    fn set_standby_signal(&self, on: bool) -> Result<(), NodeError> {
        let path = self.server.data_dir().join("standby.signal");
        if on {
            self.server.write_owned(&path, "", 0o600)?;
        } else if path.exists() {
            std::fs::remove_file(&path).map_err(|e| NodeError::Other(format!("{e}")))?;
        }
        Ok(())
    }

    /// initdb with data checksums, this node's settings, the replication role; started as
    /// the primary.
    pub async fn bootstrap(&mut self) -> Result<(), NodeError> {
        let mut options = Self::options(&self.config);
        options
            .settings
            .push(("include_if_exists".into(), format!("'{NODE_CONF}'")));
        let config = self.config.clone();
        let server = blocking(move || LocalServer::init(options)).await?;
        let hba_path = server.data_dir().join("pg_hba.conf");
        let mut hba =
            std::fs::read_to_string(&hba_path).map_err(|e| NodeError::Other(e.to_string()))?;
        for line in &config.postgres.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        std::fs::write(&hba_path, hba).map_err(|e| NodeError::Other(e.to_string()))?;
        self.server = server;
        self.write_node_conf(None)?;
        self.start().await?;
        let config = self.config.clone();
        let p = &config.postgres;
        let client = self.client().await?;
        // CREATE ROLE takes no bind parameters, and the statement's text may be logged
        // (`log_statement`, `log_min_duration_statement` in `postgres.settings`) or seen in
        // pg_stat_activity: it carries the SCRAM verifier, made here, as psql's \password
        // does, never the password. Kept out of the log on error all the same.
        let verifier =
            postgres_protocol::password::scram_sha_256(p.replication_password().as_bytes());
        client
            .batch_execute(&format!(
                "SET log_min_error_statement = panic; CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {}",
                quote::ident(&p.replication_user),
                quote::literal(&verifier)
            ))
            .await
            .map_err(sql_err)?;
        Ok(())
    }

    /// A new copy of `leader`'s data directory: pg_basebackup (WAL streamed alongside). The
    /// caller starts it as a replica.
    ///
    /// The copy goes to `data.new` and replaces `data` only once complete, so a failed or
    /// interrupted clone leaves the old directory (or none) rather than half a copy.
    pub async fn clone_from(&mut self, leader: &MemberInfo) -> Result<(), NodeError> {
        self.refuse_while_running("clone")?;
        self.write_pgpass()?;
        let data = self.server.data_dir();
        let fresh = data.with_extension("new");
        let _ = std::fs::remove_dir_all(&fresh);
        let args: Vec<std::ffi::OsString> = vec![
            "-D".into(),
            fresh.clone().into(),
            "-h".into(),
            leader.host.clone().into(),
            "-p".into(),
            leader.port.to_string().into(),
            "-U".into(),
            self.config.postgres.replication_user.clone().into(),
            "-X".into(),
            "stream".into(),
            "--checkpoint=fast".into(),
            "--no-password".into(),
        ];
        if let Err(e) = self.run_tool("pg_basebackup", args).await {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e);
        }
        if data.exists() {
            std::fs::remove_dir_all(&data).map_err(|e| NodeError::Other(e.to_string()))?;
        }
        std::fs::rename(&fresh, &data).map_err(|e| NodeError::Other(e.to_string()))?;
        Ok(())
    }

    async fn run_tool(
        &self,
        program: &'static str,
        args: Vec<std::ffi::OsString>,
    ) -> Result<String, NodeError> {
        let server = self.server.clone();
        let pgpass = self.pgpass_path();
        Ok(blocking(move || {
            let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            server.exec(program, &args, &[("PGPASSFILE", pgpass.as_os_str())])
        })
        .await?)
    }

    async fn start(&mut self) -> Result<(), NodeError> {
        self.client = None;
        let server = self.server.clone();
        blocking(move || server.start()).await?;
        Ok(())
    }

    /// Start read-only, following `upstream`. With `Wait::Started` this returns once the
    /// postmaster runs rather than once it accepts connections: a replica does so only
    /// when consistent, which after a rewind needs WAL from the primary, through the slot
    /// the primary makes once this agent publishes its member key — the loop must go on
    /// meanwhile (renewing the lease, publishing the key), not wait in `pg_ctl`.
    pub async fn start_as_replica(
        &mut self,
        upstream: Option<Upstream>,
        wait: Wait,
    ) -> Result<(), NodeError> {
        self.write_node_conf(upstream)?;
        self.set_standby_signal(true)?;
        match wait {
            Wait::Ready => self.start().await,
            Wait::Started => self.start_without_waiting().await,
        }
    }

    /// `pg_ctl start`, waiting 5 s at most; a server still starting then is fine.
    async fn start_without_waiting(&mut self) -> Result<(), NodeError> {
        self.client = None;
        let args = vec![
            "-D".into(),
            self.server.data_dir().into(),
            "-l".into(),
            self.server.log_file().into(),
            "-w".into(),
            "-t".into(),
            "5".into(),
            "start".into(),
        ];
        match self.run_tool("pg_ctl", args).await {
            Ok(_) => Ok(()),
            // Still starting (recovering, or waiting for WAL): the loop looks again.
            Err(_) if self.postmaster_running() => {
                tracing::info!("PostgreSQL is starting; it answers once consistent");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Start a stopped server that was the primary, as the primary again.
    pub async fn start_as_primary(&mut self) -> Result<(), NodeError> {
        self.write_node_conf(None)?;
        self.set_standby_signal(false)?;
        self.start().await
    }

    pub async fn stop(&mut self, mode: StopMode) -> Result<(), NodeError> {
        self.client = None;
        let server = self.server.clone();
        blocking(move || server.stop(mode)).await?;
        Ok(())
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub async fn promote(&mut self) -> Result<(), NodeError> {
        let data = self.server.data_dir();
        self.run_tool(
            "pg_ctl",
            vec![
                "-D".into(),
                data.into(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "promote".into(),
            ],
        )
        .await?;
        self.write_node_conf(None)?;
        self.reload().await
    }

    /// Point a running replica at another upstream (PostgreSQL 13+ reloads
    /// `primary_conninfo` without a restart).
    pub async fn set_upstream(&mut self, upstream: Option<Upstream>) -> Result<(), NodeError> {
        self.write_node_conf(upstream)?;
        self.reload().await
    }

    pub async fn set_sync_standby(&mut self, standby: Option<String>) -> Result<(), NodeError> {
        if self.sync_standby == standby {
            return Ok(());
        }
        self.sync_standby = standby;
        let upstream = self.upstream.clone();
        self.write_node_conf(upstream)?;
        self.reload().await
    }

    pub fn sync_standby(&self) -> Option<&str> {
        self.sync_standby.as_deref()
    }

    async fn reload(&mut self) -> Result<(), NodeError> {
        let client = self.client().await?;
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(sql_err)
    }

    /// `pg_controldata` fields.
    async fn control_data(&self) -> Result<Vec<(String, String)>, NodeError> {
        let data = self.server.data_dir();
        let out = self
            .run_tool("pg_controldata", vec!["-D".into(), data.into()])
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// Stopped as a primary (cleanly or not), rather than as a replica.
    pub async fn was_primary(&self) -> Result<bool, NodeError> {
        let control = self.control_data().await?;
        let state = field(&control, "Database cluster state")?;
        Ok(state == "in production" || state == "shut down")
    }

    /// The timeline of the last checkpoint, and (for a clean stop) where the WAL ends.
    pub async fn stopped_at(&self) -> Result<(u32, Lsn), NodeError> {
        let control = self.control_data().await?;
        let timeline = field(&control, "Latest checkpoint's TimeLineID")?
            .parse()
            .map_err(|_| NodeError::Other("pg_controldata: bad timeline".into()))?;
        let lsn = Lsn::from_str(&field(&control, "Latest checkpoint location")?)
            .map_err(|e| NodeError::Other(e.to_string()))?;
        Ok((timeline, lsn))
    }

    /// Make a stopped data directory a descendant of `leader`'s timeline: pg_rewind (it
    /// says so, and changes nothing, when no rewind is needed).
    pub async fn rewind(&mut self, leader: &MemberInfo) -> Result<(), NodeError> {
        self.refuse_while_running("rewind")?;
        self.write_pgpass()?;
        // pg_rewind finishes an interrupted recovery in single-user mode, which refuses
        // standby mode.
        self.set_standby_signal(false)?;
        let data = self.server.data_dir();
        let source = format!(
            "host={} port={} user={} dbname=postgres",
            Self::conninfo_value(&leader.host),
            leader.port,
            Self::conninfo_value(&self.config.postgres.superuser)
        );
        let out = self
            .run_tool(
                "pg_rewind",
                vec![
                    "-D".into(),
                    data.into(),
                    "--source-server".into(),
                    source.into(),
                ],
            )
            .await?;
        tracing::info!(output = %out.trim(), "pg_rewind done");
        Ok(())
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, NodeError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let url = format!(
                "host={} port={} user={} dbname=postgres connect_timeout=3 application_name=walrelay-ha",
                self.server.socket_dir().display(),
                self.config.node.port,
                self.config.postgres.superuser
            );
            let info = crate::pg::conninfo::resolve(&url, &crate::pg::conninfo::ProcessEnv)
                .map_err(sql_err)?;
            let client = crate::pg::sql::connect(&info).await.map_err(sql_err)?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// A SQL session to the leader's server as the superuser (a replica copies slots from
    /// it).
    pub async fn leader_sql(
        &self,
        leader: &MemberInfo,
    ) -> Result<tokio_postgres::Client, NodeError> {
        self.write_pgpass()?;
        let url = format!(
            "host={} port={} user={} dbname=postgres passfile={} connect_timeout=3 application_name=walrelay-ha",
            Self::conninfo_value(&leader.host),
            leader.port,
            Self::conninfo_value(&self.config.postgres.superuser),
            Self::conninfo_value(&self.pgpass_path().display().to_string()),
        );
        let info = crate::pg::conninfo::resolve(&url, &crate::pg::conninfo::ProcessEnv)
            .map_err(sql_err)?;
        crate::pg::sql::connect(&info).await.map_err(sql_err)
    }

    /// Put a logical slot's state, as read from the primary, into the stopped server's
    /// `pg_replslot`: PostgreSQL loads it at the next start.
    pub fn place_slot_state(&self, name: &str, state: &[u8]) -> Result<(), NodeError> {
        self.refuse_while_running("place a slot")?;
        crate::config::check_slot_name(name)
            .map_err(|why| NodeError::Other(format!("slot {name:?}: {why}")))?;
        let dir = self.server.data_dir().join("pg_replslot").join(name);
        self.server.create_dir_owned(&dir)?;
        self.server.write_owned(&dir.join("state"), state, 0o600)?;
        Ok(())
    }

    /// Remove every replication slot of the stopped server.
    pub fn remove_slots(&self) -> Result<(), NodeError> {
        self.refuse_while_running("remove slots")?;
        let dir = self.server.data_dir().join("pg_replslot");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            tracing::info!(slot = %entry.file_name().to_string_lossy(), "removing a former primary's slot");
            std::fs::remove_dir_all(entry.path()).map_err(|e| {
                NodeError::Other(format!("removing {}: {e}", entry.path().display()))
            })?;
        }
        Ok(())
    }

    /// A SQL session to this node's server (for the primary's upkeep).
    pub async fn sql(&mut self) -> Result<&tokio_postgres::Client, NodeError> {
        self.client().await
    }

    fn refuse_while_running(&self, what: &str) -> Result<(), NodeError> {
        if self.postmaster_running() {
            return Err(NodeError::Other(format!(
                "will not {what} while PostgreSQL runs in {}",
                self.server.data_dir().display()
            )));
        }
        Ok(())
    }

    pub fn postmaster_running(&self) -> bool {
        postmaster_pid(&self.server.data_dir()).is_some_and(|pid| {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        })
    }

    pub async fn observe(&mut self) -> PgState {
        if !self.postmaster_running() {
            self.client = None;
            return PgState::default();
        }
        match tokio::time::timeout(Duration::from_secs(5), self.query_state()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "PostgreSQL did not answer");
                self.client = None;
                PgState::default()
            }
            Err(_) => {
                self.client = None;
                PgState::default()
            }
        }
    }

    async fn query_state(&mut self) -> Result<PgState, NodeError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(),
                        CASE WHEN pg_is_in_recovery()
                             THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
                             ELSE pg_current_wal_lsn() END::text,
                        CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                             ELSE pg_current_wal_lsn() END::text,
                        CASE WHEN pg_is_in_recovery()
                             THEN (SELECT timeline_id FROM pg_control_checkpoint())::text
                             ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END,
                        (SELECT received_tli FROM pg_stat_wal_receiver),
                        coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)",
                &[],
            )
            .await
            .map_err(sql_err)?;
        let in_recovery: bool = row.get(0);
        let lsn = |i: usize| -> Lsn {
            row.get::<_, Option<String>>(i)
                .and_then(|s| Lsn::from_str(&s).ok())
                .unwrap_or_default()
        };
        let timeline_text: Option<String> = row.get(3);
        let mut timeline = match (&timeline_text, in_recovery) {
            (Some(t), false) => u32::from_str_radix(t, 16).unwrap_or(0),
            (Some(t), true) => t.parse().unwrap_or(0),
            (None, _) => 0,
        };
        if let Some(received_tli) = row.get::<_, Option<i32>>(4) {
            timeline = timeline.max(received_tli as u32);
        }
        Ok(PgState {
            running: true,
            in_recovery,
            received: lsn(1),
            replayed: lsn(2),
            timeline,
            streaming: row.get(5),
        })
    }
}

fn field(control: &[(String, String)], name: &str) -> Result<String, NodeError> {
    control
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| NodeError::Other(format!("pg_controldata printed no {name:?}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LocalServerError> + Send + 'static,
) -> Result<T, LocalServerError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(LocalServerError::Command {
            command: "a blocking task".into(),
            stderr: e.to_string(),
        })
    })
}
