//! Preparing the source server for capture: the checks that make `run` fail early with a
//! clear message, the tables the patterns select, the publication, and the slot.
//!
//! Order matters: the publication is created before the slot, because pgoutput looks the
//! publication up as of each change it decodes, and a slot older than its publication
//! fails with "publication does not exist".

use std::time::Duration;

use tokio_postgres::Client;
use walrelay_model::{Lsn, QualifiedName};

use super::SourceError;
use crate::config::{SourceConfig, TablePattern};
use crate::pg::replication::ReplicationConnection;
use crate::pg::{quote, PgError};

/// A table the configuration selects, with what the checks need to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedTable {
    pub oid: walrelay_model::Oid,
    pub schema: String,
    pub name: String,
    /// `pg_class.relreplident`: d(efault), n(othing), f(ull), i(ndex).
    pub replica_identity: char,
    pub has_primary_key: bool,
    /// The columns pgoutput publishes (not generated ones), in order.
    pub columns: Vec<String>,
    /// The replica identity's columns (none under FULL or NOTHING), in order.
    pub key: Vec<String>,
    /// The primary key's columns, in order.
    pub primary_key: Vec<String>,
    /// Columns that own a sequence (serial or identity), and the sequences, quoted and
    /// qualified, pairwise.
    pub sequence_columns: Vec<String>,
    pub sequences: Vec<String>,
}

impl SelectedTable {
    pub fn qualified_name(&self) -> QualifiedName<'_> {
        QualifiedName {
            schema: &self.schema,
            name: &self.name,
        }
    }

    /// Updates and deletes of this table can be published: PostgreSQL refuses UPDATE and
    /// DELETE on a published table without a replica identity, so publishing such a table
    /// would break the application's writes.
    pub fn has_replica_identity(&self) -> bool {
        match self.replica_identity {
            'f' | 'i' => true,
            'd' => self.has_primary_key,
            _ => false,
        }
    }

    pub fn identity_advice(&self) -> String {
        format!(
            "table {} has no primary key or replica identity: add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL (or USING INDEX on a unique index of NOT NULL columns), or give it identity = \"full\" in its [[set.table]]",
            self.qualified_name(),
            quote::qualified(&self.schema, &self.name)
        )
    }
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub slot_type: String,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub wal_status: Option<String>,
}

fn sql_err(context: &str) -> impl FnOnce(tokio_postgres::Error) -> SourceError + '_ {
    move |e| SourceError::Pg(PgError::from_sql(context, e))
}

/// Server settings walrelay depends on.
pub struct ServerFacts {
    pub wal_level: String,
    pub version_num: i32,
    pub encoding: String,
    pub wal_sender_timeout: Option<Duration>,
    pub max_replication_slots: i64,
    pub used_replication_slots: i64,
    pub max_wal_senders: i64,
    pub used_wal_senders: i64,
    pub is_superuser: bool,
    pub has_replication: bool,
    pub current_user: String,
    pub database: String,
}

pub async fn server_facts(client: &Client) -> Result<ServerFacts, SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('server_version_num')::int4,
                    current_setting('server_encoding'),
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'),
                    current_setting('max_replication_slots')::int8,
                    (SELECT count(*) FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int8,
                    (SELECT count(*) FROM pg_stat_replication),
                    r.rolsuper, r.rolreplication, current_user::text, current_database()::text
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_err("reading server settings"))?;
    let timeout_ms: Option<i64> = row.get(3);
    Ok(ServerFacts {
        wal_level: row.get(0),
        version_num: row.get(1),
        encoding: row.get(2),
        wal_sender_timeout: timeout_ms
            .filter(|&ms| ms > 0)
            .map(|ms| Duration::from_millis(ms as u64)),
        max_replication_slots: row.get(4),
        used_replication_slots: row.get(5),
        max_wal_senders: row.get(6),
        used_wal_senders: row.get(7),
        is_superuser: row.get(8),
        has_replication: row.get(9),
        current_user: row.get(10),
        database: row.get(11),
    })
}

/// The problems that stop capture before it starts, each with what to do.
pub fn server_problems(f: &ServerFacts) -> Vec<String> {
    let mut problems = Vec::new();
    if f.version_num < 140000 {
        problems.push(format!(
            "the source runs PostgreSQL {}.{}; walrelay needs 14 or later (pgoutput protocol version 2)",
            f.version_num / 10000,
            f.version_num % 100
        ));
    }
    if f.wal_level != "logical" {
        problems.push(format!(
            "wal_level is '{}' on the source: set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart the server",
            f.wal_level
        ));
    }
    if f.encoding != "UTF8" {
        problems.push(format!(
            "the source database is encoded {}; walrelay needs UTF8 (events are JSON text)",
            f.encoding
        ));
    }
    if !f.is_superuser && !f.has_replication {
        problems.push(format!(
            "role {} may not start replication: ALTER ROLE {} REPLICATION (or use a superuser)",
            f.current_user,
            quote::ident(&f.current_user)
        ));
    }
    problems
}

/// The tables the patterns select, in a stable order. An exact name that matches nothing is
/// an error; a wildcard that matches nothing is only worth a warning.
pub async fn select_tables(
    client: &Client,
    patterns: &[TablePattern],
) -> Result<Vec<SelectedTable>, SourceError> {
    let mut out: Vec<SelectedTable> = Vec::new();
    for p in patterns {
        let (schema, table) = (p.schema.exact(), p.table.exact());
        // Partitions are left out of wildcards: the publication publishes them through
        // their root (publish_via_partition_root), which the wildcard selects.
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text,
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                        ARRAY(SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attgenerated = ''
                              ORDER BY a.attnum),
                        ARRAY(SELECT a.attname::text
                              FROM pg_index i
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                              WHERE i.indrelid = c.oid
                                AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                        WHEN 'i' THEN i.indisreplident
                                                        ELSE false END
                              ORDER BY array_position(i.indkey::int2[], a.attnum)),
                        ARRAY(SELECT a.attname::text
                              FROM pg_index i
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                              WHERE i.indrelid = c.oid AND i.indisprimary
                              ORDER BY array_position(i.indkey::int2[], a.attnum)),
                        ARRAY(SELECT a.attname::text
                              FROM pg_depend d
                              JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                              JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                              WHERE d.classid = 'pg_class'::regclass AND d.refobjid = c.oid
                                AND d.deptype IN ('a', 'i')
                              ORDER BY s.oid),
                        ARRAY(SELECT quote_ident(sn.nspname) || '.' || quote_ident(s.relname)
                              FROM pg_depend d
                              JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                              JOIN pg_namespace sn ON sn.oid = s.relnamespace
                              WHERE d.classid = 'pg_class'::regclass AND d.refobjid = c.oid
                                AND d.deptype IN ('a', 'i')
                              ORDER BY s.oid),
                        c.oid
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p')
                   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg\\_toast%'
                   AND n.nspname NOT LIKE 'pg\\_temp%'
                   AND ($1::text IS NULL OR n.nspname = $1)
                   AND ($2::text IS NULL OR c.relname = $2)
                   AND (($1::text IS NOT NULL AND $2::text IS NOT NULL) OR NOT c.relispartition)
                 ORDER BY 1, 2",
                &[&schema, &table],
            )
            .await
            .map_err(sql_err("listing the configured tables"))?;
        if rows.is_empty() {
            if schema.is_some() && table.is_some() {
                return Err(SourceError::Setup(format!(
                    "table {p} in source.tables does not exist on the source (names are case-sensitive when quoted)"
                )));
            }
            tracing::warn!(pattern = %p, "source.tables pattern matches no table");
        }
        for r in rows {
            let t = SelectedTable {
                oid: r.get(9),
                schema: r.get(0),
                name: r.get(1),
                replica_identity: r.get::<_, String>(2).chars().next().unwrap_or('d'),
                has_primary_key: r.get(3),
                columns: r.get(4),
                key: r.get(5),
                primary_key: r.get(6),
                sequence_columns: r.get(7),
                sequences: r.get(8),
            };
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    Ok(out)
}

/// `identity = "full"`: REPLICA IDENTITY FULL on the source table (its updates and deletes
/// then carry the whole old row).
pub async fn set_identity_full(client: &Client, t: &mut SelectedTable) -> Result<(), SourceError> {
    let sql = format!(
        "ALTER TABLE {} REPLICA IDENTITY FULL",
        quote::qualified(&t.schema, &t.name)
    );
    client.batch_execute(&sql).await.map_err(|e| {
        SourceError::Setup(format!(
            "table {}: setting REPLICA IDENTITY FULL (identity = \"full\"): {} (it needs the table's owner; or run {sql} yourself)",
            t.qualified_name(),
            PgError::from_sql("", e)
        ))
    })?;
    tracing::info!(table = %t.qualified_name(), "set REPLICA IDENTITY FULL, as the set asks");
    t.replica_identity = 'f';
    Ok(())
}

/// Whether the publication exists, and which of `tables` it does not publish yet.
pub async fn publication_gaps<'t>(
    client: &Client,
    name: &str,
    tables: &'t [SelectedTable],
) -> Result<(bool, Vec<&'t SelectedTable>), SourceError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(sql_err("looking up the publication"))?
        .is_some();
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(sql_err("listing the publication's tables"))?;
    let published: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let missing = tables
        .iter()
        .filter(|t| {
            !published
                .iter()
                .any(|(s, n)| *s == t.schema && *n == t.name)
        })
        .collect();
    Ok((exists, missing))
}

/// Whether `ensure_publication` commits what it made, or only checks it (`walrelay check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationMode {
    Apply,
    DryRun,
}

/// A table for the publication, with its row filter.
pub struct Published<'a> {
    pub table: &'a SelectedTable,
    pub filter: Option<&'a str>,
}

/// Create the publication for `tables`, add the tables it lacks, and give each table the
/// row filter its set has (or none). Tables it has beyond these are left alone (another
/// consumer may use them); walrelay filters their changes.
///
/// Everything happens in one transaction, checked before it commits: PostgreSQL accepts a
/// row filter on columns outside the replica identity, and then fails every UPDATE and
/// DELETE of the table on the source. A change of filter takes effect in the stream at
/// this transaction's commit (pgoutput reads the publication as of each change).
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[Published<'_>],
    version_num: i32,
    mode: PublicationMode,
) -> Result<(), SourceError> {
    let filtered: Vec<&Published> = tables.iter().filter(|t| t.filter.is_some()).collect();
    if let Some(t) = filtered.first() {
        if version_num < 150000 {
            return Err(SourceError::Setup(format!(
                "table {} has a row filter (where): row filters need PostgreSQL 15 or later on the source",
                t.table.qualified_name()
            )));
        }
    }
    let selected: Vec<SelectedTable> = tables.iter().map(|t| t.table.clone()).collect();
    let (exists, missing) = publication_gaps(client, name, &selected).await?;
    // Filters now in force (PostgreSQL 15 shows them in pg_publication_tables.rowfilter).
    let current: Vec<(String, String, Option<String>)> = if version_num >= 150000 {
        client
            .query(
                "SELECT schemaname::text, tablename::text, rowfilter FROM pg_publication_tables WHERE pubname = $1",
                &[&name],
            )
            .await
            .map_err(sql_err("reading the publication's row filters"))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    } else {
        Vec::new()
    };
    let filter_now = |t: &SelectedTable| {
        current
            .iter()
            .find(|(s, n, _)| *s == t.schema && *n == t.name)
            .and_then(|(_, _, f)| f.clone())
    };
    // Tables to add, and published tables whose filter may change: re-added in the same
    // transaction (a publication has no ALTER for one table's filter before PostgreSQL 15's
    // SET TABLE, which would also drop tables walrelay does not own).
    let mut readd = Vec::new();
    for t in tables {
        let published = !missing.contains(&t.table);
        if published && (t.filter.is_some() || filter_now(t.table).is_some()) {
            readd.push(t);
        }
    }
    if missing.is_empty() && readd.is_empty() {
        return Ok(());
    }
    let advice = |e: tokio_postgres::Error| {
        let pg = PgError::from_sql(format!("publication {name}"), e);
        match pg.code() {
            Some("42501") => SourceError::Setup(format!(
                "{pg}: creating or altering a publication needs CREATE on the database and ownership of the tables; have a superuser or the table owner run walrelay once, or create the publication yourself: CREATE PUBLICATION {} FOR TABLE ...",
                quote::ident(name)
            )),
            _ => SourceError::Pg(pg),
        }
    };
    let item = |t: &Published| match t.filter {
        Some(f) => format!(
            "{} WHERE ({f})",
            quote::qualified(&t.table.schema, &t.table.name)
        ),
        None => quote::qualified(&t.table.schema, &t.table.name),
    };
    client.batch_execute("BEGIN").await.map_err(advice)?;
    let result = async {
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} WITH (publish_via_partition_root = true)",
                    quote::ident(name)
                ))
                .await
                .map_err(advice)?;
        }
        for t in tables {
            let add = format!("ALTER PUBLICATION {} ADD TABLE {}", quote::ident(name), item(t));
            let drop = format!(
                "ALTER PUBLICATION {} DROP TABLE {}",
                quote::ident(name),
                quote::qualified(&t.table.schema, &t.table.name)
            );
            let sql = if missing.contains(&t.table) {
                add
            } else if readd.iter().any(|r| r.table == t.table) {
                format!("{drop}; {add}")
            } else {
                continue;
            };
            client.batch_execute(&sql).await.map_err(|e| match t.filter {
                Some(f) if e.as_db_error().is_some() => SourceError::Setup(format!(
                    "table {}: the source refuses the row filter {f:?}: {} (a filter may use only the table's columns, built-in immutable functions and operators)",
                    t.table.qualified_name(),
                    e.as_db_error().map(|d| d.message()).unwrap_or_default()
                )),
                _ => advice(e),
            })?;
        }
        for t in &filtered {
            check_filter_columns(client, name, t).await?;
        }
        // Nothing changed when every filter reads back as it was.
        let mut changed = !missing.is_empty() || !exists;
        for t in &readd {
            let after: Option<String> = client
                .query_one(
                    "SELECT rowfilter FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                    &[&name, &t.table.schema, &t.table.name],
                )
                .await
                .map_err(sql_err("reading a row filter back"))?
                .get(0);
            if after != filter_now(t.table) {
                tracing::warn!(
                    table = %t.table.qualified_name(),
                    before = filter_now(t.table).as_deref().unwrap_or("(none)"),
                    after = after.as_deref().unwrap_or("(none)"),
                    "row filter changed: it applies to changes from now on; rows already on the targets stay as they are (copy the table again to apply it to them)"
                );
                changed = true;
            }
        }
        Ok::<bool, SourceError>(changed)
    }
    .await;
    match result {
        Ok(true) if mode == PublicationMode::Apply => {
            client.batch_execute("COMMIT").await.map_err(advice)?;
            tracing::info!(
                publication = name,
                added = missing.len(),
                "{}",
                if exists {
                    "publication updated"
                } else {
                    "created publication"
                }
            );
            Ok(())
        }
        Ok(_) => {
            client.batch_execute("ROLLBACK").await.map_err(advice)?;
            Ok(())
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// A row filter may use only replica-identity columns (any column under FULL): otherwise
/// PostgreSQL fails the table's UPDATEs and DELETEs. The columns it uses are read from the
/// stored expression (`prqual`), where each column appears as `:varattno N`.
async fn check_filter_columns(
    client: &Client,
    publication: &str,
    t: &Published<'_>,
) -> Result<(), SourceError> {
    if t.table.replica_identity == 'f' {
        return Ok(());
    }
    let used: Vec<String> = client
        .query_one(
            "SELECT ARRAY(SELECT DISTINCT a.attname::text
                          FROM pg_publication_rel pr
                          JOIN pg_publication p ON p.oid = pr.prpubid
                          CROSS JOIN LATERAL regexp_matches(pr.prqual::text, ':varattno (\\d+)', 'g') m
                          JOIN pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = m[1]::int2
                          WHERE p.pubname = $1 AND pr.prrelid = $2::text::regclass
                          ORDER BY 1)",
            &[&publication, &quote::qualified(&t.table.schema, &t.table.name)],
        )
        .await
        .map_err(sql_err("reading the columns a row filter uses"))?
        .get(0);
    let outside: Vec<&String> = used.iter().filter(|c| !t.table.key.contains(c)).collect();
    if outside.is_empty() {
        return Ok(());
    }
    Err(SourceError::Setup(format!(
        "table {}: the row filter {:?} uses {}, outside the replica identity ({}): PostgreSQL would then refuse every UPDATE and DELETE of the table on the source. Filter on key columns only, or give the table identity = \"full\" (REPLICA IDENTITY FULL)",
        t.table.qualified_name(),
        t.filter.unwrap_or_default(),
        outside.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "),
        if t.table.key.is_empty() { "none".to_string() } else { t.table.key.join(", ") }
    )))
}

pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active_pid,
                    confirmed_flush_lsn::text, wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err("looking up the replication slot"))?;
    let Some(r) = row else { return Ok(None) };
    let confirmed_flush = match r.get::<_, Option<String>>(4) {
        None => None,
        Some(text) => Some(text.parse().map_err(|_| {
            SourceError::Setup(format!(
                "slot {slot}: confirmed_flush_lsn {text:?} is not a WAL position"
            ))
        })?),
    };
    Ok(Some(SlotInfo {
        plugin: r.get(0),
        slot_type: r.get(1),
        database: r.get(2),
        active_pid: r.get(3),
        confirmed_flush,
        wal_status: r.get(5),
    }))
}

/// How long a slot may stay held by a previous consumer before that is an error: after a
/// crash, the server notices the dead connection and frees the slot within moments.
pub const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Wait for the slot to be free. Still held after `SLOT_RELEASE_WAIT`: `InUse`, which ends
/// a first start and is retried on a reconnect (see `SourceError::InUse`).
pub async fn wait_until_released(
    client: &Client,
    slot: &str,
    mut info: SlotInfo,
) -> Result<SlotInfo, SourceError> {
    let deadline = tokio::time::Instant::now() + SLOT_RELEASE_WAIT;
    let mut logged = false;
    while let Some(pid) = info.active_pid {
        if tokio::time::Instant::now() > deadline {
            return Err(SourceError::InUse(format!(
                "slot {slot} is in use by server process {pid}: is another walrelay running with this slot? Stop it, or choose another source.slot"
            )));
        }
        if !logged {
            tracing::info!(
                slot,
                pid,
                "waiting for the slot's previous consumer to let go"
            );
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        info = slot_info(client, slot).await?.ok_or_else(|| {
            SourceError::Setup(format!("slot {slot} was dropped while walrelay started"))
        })?;
    }
    Ok(info)
}

/// Why an existing slot cannot be used by this configuration, if it cannot.
pub fn slot_problem(slot: &str, info: &SlotInfo, database: &str) -> Option<String> {
    if info.slot_type != "logical" {
        return Some(format!(
            "slot {slot} is a {} slot; walrelay needs a logical slot: choose another source.slot, or drop it with SELECT pg_drop_replication_slot('{slot}')",
            info.slot_type
        ));
    }
    if info.plugin.as_deref() != Some("pgoutput") {
        return Some(format!(
            "slot {slot} uses plugin {}; walrelay needs pgoutput: choose another source.slot",
            info.plugin.as_deref().unwrap_or("(none)")
        ));
    }
    if info.database.as_deref() != Some(database) {
        return Some(format!(
            "slot {slot} belongs to database {}, not {database}: choose another source.slot",
            info.database.as_deref().unwrap_or("(none)")
        ));
    }
    if info.wal_status.as_deref() == Some("lost") {
        return Some(format!(
            "slot {slot} has lost WAL it needed (max_slot_wal_keep_size): changes are missing; drop the slot and copy the tables again"
        ));
    }
    None
}

/// Create the slot over the replication connection; its consistent point is where capture
/// starts. It exports its snapshot (valid while the connection stays idle) for the copy.
pub async fn create_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<(Lsn, Option<String>), SourceError> {
    let result = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote::ident(slot)
        ))
        .await?;
    let snapshot = result.first("snapshot_name").map(str::to_string);
    let point = result.lsn("CREATE_REPLICATION_SLOT", "consistent_point")?;
    tracing::info!(slot, consistent_point = %point, "created replication slot");
    Ok((point, snapshot))
}

/// The `START_REPLICATION` command for this configuration.
/// What the stream asks pgoutput for, beyond the changes.
#[derive(Debug, Clone, Copy)]
pub struct StartOptions {
    /// Logical messages (`pg_logical_emit_message`).
    pub messages: bool,
    /// Only transactions without a replication origin (`origin 'none'`, PostgreSQL 16+).
    pub no_origin: bool,
}

pub fn start_command(cfg: &SourceConfig, start: Lsn, options: StartOptions) -> String {
    let origin = if options.no_origin {
        ", origin 'none'"
    } else {
        ""
    };
    format!(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version '2', streaming 'on', publication_names {}, messages '{}'{origin})",
        quote::ident(&cfg.slot),
        start,
        quote::standard_literal(&quote::ident(&cfg.publication)),
        options.messages
    )
}
