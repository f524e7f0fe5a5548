//! `walrelay check`: is the source ready for capture? Each problem is printed with what to
//! do about it; the exit status is 0 when ready, 1 otherwise.

use std::process::ExitCode;

use crate::config::Config;
use crate::pg::sql;
use crate::source::pgoutput::setup::{self, SelectedTable};
use crate::source::pgoutput::SourceError;

/// What the check found: lines that passed and problems.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: Vec<String>,
    pub problems: Vec<String>,
    /// Advice: nothing stops the relay, but something may go wrong.
    pub notes: Vec<String>,
}

impl Report {
    fn ok(&mut self, s: impl Into<String>) {
        self.ok.push(s.into());
    }
    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    fn problem(&mut self, s: impl Into<String>) {
        self.problems.push(s.into());
    }
}

pub async fn check(config: &Config) -> anyhow::Result<ExitCode> {
    let report = inspect(config).await;
    for line in &report.ok {
        println!("ok       {line}");
    }
    for line in &report.notes {
        println!("NOTE     {line}");
    }
    for line in &report.problems {
        println!("PROBLEM  {line}");
    }
    if report.problems.is_empty() {
        println!("ready: the source can be captured with this configuration");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("not ready: {} problem(s)", report.problems.len());
        Ok(ExitCode::FAILURE)
    }
}

/// Run every check against the source; connection failures are reported as problems too.
pub async fn inspect(config: &Config) -> Report {
    let mut r = Report::default();
    let cfg = &config.source;
    let info = match cfg.url.resolve() {
        Ok(i) => i,
        Err(e) => {
            r.problem(format!("source.url: {e}"));
            return r;
        }
    };
    let info = match crate::pg::locate::locate(&info).await {
        Ok(i) => i,
        Err(e) => {
            r.problem(format!("cannot connect to the source: {e}"));
            return r;
        }
    };
    let client = match sql::connect(&info).await {
        Ok(c) => {
            r.ok(format!("connected to {}", info.describe()));
            c
        }
        Err(e) => {
            r.problem(format!("cannot connect to the source: {e}"));
            return r;
        }
    };
    if cfg.capture == crate::config::CaptureMethod::Trigger {
        inspect_trigger_capture(config, &client, &mut r).await;
        return r;
    }
    let facts = match setup::server_facts(&client).await {
        Ok(f) => f,
        Err(e) => {
            r.problem(e.to_string());
            return r;
        }
    };
    let configured = config.ddl.mode;
    match crate::ddl::capture::mode_for(configured, facts.is_superuser, &facts.current_user) {
        Ok(mode) => r.ok(crate::ddl::capture::describe(mode, configured)),
        Err(problem) => r.problem(problem),
    }
    let server_problems = setup::server_problems(&facts);
    if server_problems.is_empty() {
        r.ok(format!(
            "PostgreSQL {}.{}, wal_level = logical, encoding UTF8, role {} may replicate",
            facts.version_num / 10000,
            facts.version_num % 100,
            facts.current_user
        ));
    }
    for p in server_problems {
        r.problem(p);
    }

    let slot = match setup::slot_info(&client, &cfg.slot).await {
        Ok(s) => s,
        Err(e) => {
            r.problem(e.to_string());
            None
        }
    };
    match &slot {
        None => {
            if facts.used_replication_slots >= facts.max_replication_slots {
                r.problem(format!(
                    "no free replication slot: max_replication_slots = {} and all are used; raise it (restart needed) or drop an unused slot (see pg_replication_slots)",
                    facts.max_replication_slots
                ));
            } else {
                r.ok(format!(
                    "slot {} will be created ({} of {} replication slots in use)",
                    cfg.slot, facts.used_replication_slots, facts.max_replication_slots
                ));
            }
        }
        Some(s) => match setup::slot_problem(&cfg.slot, s, &facts.database) {
            Some(p) => r.problem(p),
            None => match s.active_pid {
                Some(pid) => r.problem(format!(
                    "slot {} is in use by server process {pid}: another consumer is reading it",
                    cfg.slot
                )),
                None => r.ok(format!(
                    "slot {} exists, confirmed up to {}",
                    cfg.slot,
                    s.confirmed_flush.map(|l| l.to_string()).unwrap_or_default()
                )),
            },
        },
    }
    let slot_streaming = slot.as_ref().is_some_and(|s| s.active_pid.is_some());
    if !slot_streaming && facts.used_wal_senders >= facts.max_wal_senders {
        r.problem(format!(
            "no free WAL sender: max_wal_senders = {} and all are busy; raise it (restart needed)",
            facts.max_wal_senders
        ));
    }

    let (plan, tables) = match crate::sets::Plan::resolve(&client, &config.sets()).await {
        Ok(resolved) => resolved,
        Err(e) => {
            r.problem(e.to_string());
            Default::default()
        }
    };
    for set in &plan.sets {
        let shapes: Vec<_> = plan.tables_of(Some(std::slice::from_ref(set))).collect();
        let shaped = shapes
            .iter()
            .filter(|t| !t.keeps_columns() || t.source != t.target || t.filter.is_some())
            .count();
        r.ok(format!(
            "set {set:?}: {} table(s), {shaped} filtered, renamed or transformed",
            shapes.len()
        ));
    }
    let mut without_identity = 0;
    for (t, shape) in tables.iter().zip(plan.tables()) {
        if shape.identity_full && t.replica_identity != 'f' {
            r.ok(format!(
                "table {} gets REPLICA IDENTITY FULL at start (identity = \"full\"): its updates and deletes then log the whole old row",
                t.qualified_name()
            ));
        } else if !t.has_replica_identity() {
            without_identity += 1;
            r.problem(t.identity_advice());
        }
    }
    if !tables.is_empty() && without_identity == 0 {
        r.ok(format!(
            "{} table(s) selected, each with a primary key or replica identity",
            tables.len()
        ));
    }
    if let Err(e) = check_publication(&client, &cfg.publication, &tables, &facts, &mut r).await {
        r.problem(e.to_string());
    }
    // Row filters: what the relay would do to the publication, done and rolled back, so
    // that a filter the source refuses or that would break the application shows here.
    // As the relay will have them: `identity = "full"` applied first.
    let as_started: Vec<setup::SelectedTable> = tables
        .iter()
        .zip(plan.tables())
        .map(|(t, shape)| {
            let mut t = t.clone();
            if shape.identity_full {
                t.replica_identity = 'f';
            }
            t
        })
        .collect();
    if cfg.origin == crate::config::OriginFilter::None {
        check_two_writers(config, &client, &tables, &mut r).await;
    }
    let published = plan.published(&as_started);
    let filters = published.iter().filter(|p| p.filter.is_some()).count();
    if filters > 0 {
        let tried = setup::ensure_publication(
            &client,
            &cfg.publication,
            &published,
            facts.version_num,
            setup::PublicationMode::DryRun,
        )
        .await;
        match tried {
            Ok(()) => r.ok(format!(
                "{filters} row filter(s) accepted by the source (tried and rolled back)"
            )),
            Err(e) => r.problem(e.to_string()),
        }
    }
    r
}

/// Trigger capture: what installing the log and the tables' triggers needs (no
/// superuser, no REPLICATION, any `wal_level`).
async fn inspect_trigger_capture(config: &Config, client: &tokio_postgres::Client, r: &mut Report) {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_user::text,
                    current_setting('wal_level'),
                    to_regnamespace('walrelay_capture') IS NOT NULL,
                    has_database_privilege(current_database(), 'CREATE'),
                    current_database()::text",
            &[],
        )
        .await;
    let row = match row {
        Ok(row) => row,
        Err(e) => {
            r.problem(format!("reading the server's settings: {e}"));
            return;
        }
    };
    let (version, user, wal_level, installed, may_create): (i32, String, String, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let database: String = row.get(5);
    if version < 130000 {
        r.problem("trigger capture needs PostgreSQL 13 or later (xid8 and pg_snapshot)");
    } else {
        r.ok(format!(
            "PostgreSQL {}.{}, wal_level = {wal_level}: trigger capture needs neither logical decoding nor REPLICATION",
            version / 10000,
            version % 100
        ));
    }
    if installed {
        match crate::source::trigger::install::schema_is_current(client).await {
            Ok(true) => r.ok("the schema walrelay_capture is installed"),
            Ok(false) => r.problem(
                "the schema walrelay_capture was installed by another version of walrelay: stop every relay of this source, then `walrelay uninstall --config FILE`",
            ),
            Err(e) => r.problem(format!("reading the schema walrelay_capture: {e}")),
        }
    } else if may_create {
        r.ok(format!(
            "role {user} may create the schema walrelay_capture (created at start)"
        ));
    } else {
        r.problem(format!(
            "role {user} may not create the schema walrelay_capture: GRANT CREATE ON DATABASE {} TO {}",
            crate::pg::quote::ident(&database),
            crate::pg::quote::ident(&user)
        ));
    }
    let (_, tables) = match crate::sets::Plan::resolve(client, &config.sets()).await {
        Ok(resolved) => resolved,
        Err(e) => {
            r.problem(e.to_string());
            return;
        }
    };
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let allowed = client
        .query(
            "SELECT c.oid, pg_has_role(c.relowner, 'USAGE') OR has_table_privilege(c.oid, 'TRIGGER')
               FROM pg_class c WHERE c.oid = ANY ($1)",
            &[&oids],
        )
        .await;
    let allowed: std::collections::HashMap<u32, bool> = match allowed {
        Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
        Err(e) => {
            r.problem(format!("reading the tables' privileges: {e}"));
            return;
        }
    };
    let mut ready = 0;
    for t in &tables {
        let table = crate::pg::quote::qualified(&t.schema, &t.name);
        if !allowed.get(&t.oid).copied().unwrap_or(false) {
            r.problem(format!(
                "table {}: creating its triggers needs its owner or the TRIGGER privilege: GRANT TRIGGER ON {table} TO {}",
                t.qualified_name(),
                crate::pg::quote::ident(&user)
            ));
            continue;
        }
        ready += 1;
        if t.primary_key.is_empty() && t.key.is_empty() {
            r.note(format!(
                "table {} has no primary key: its updates and deletes are logged by row triggers with the whole row, and matched on the targets by every column",
                t.qualified_name()
            ));
        }
    }
    if ready > 0 {
        r.ok(format!(
            "{ready} table(s) selected; this role may create their triggers"
        ));
    }
}

/// Two writable nodes (`source.origin = "none"`): what finding conflicts needs on each node,
/// and keys both nodes would hand out.
async fn check_two_writers(
    config: &Config,
    source: &tokio_postgres::Client,
    tables: &[setup::SelectedTable],
    r: &mut Report,
) {
    const TRACKS: &str = "SELECT current_setting('track_commit_timestamp')::bool, \
         has_function_privilege('pg_replication_origin_session_setup(text)', 'execute')";
    if let Ok(row) = source.query_one(TRACKS, &[]).await {
        if !row.get::<_, bool>(0) {
            r.note("track_commit_timestamp is off on the source: the relay back to it cannot tell rows changed there after an incoming change (set it on; a restart)");
        }
    }
    for sink in &config.sinks {
        let crate::config::SinkConfig::Postgres(p) = sink else {
            continue;
        };
        let Ok(info) = p.url.resolve() else { continue };
        let row = match sql::connect(&info).await {
            Ok(c) => c.query_one(TRACKS, &[]).await.ok(),
            Err(e) => {
                r.problem(format!(
                    "sink {}: cannot connect to the target: {e}",
                    p.name
                ));
                continue;
            }
        };
        let Some(row) = row else { continue };
        let lacking = crate::sink::postgres::conflict::lacking_for_newer(row.get(0), row.get(1));
        match lacking {
            None => r.ok(format!(
                "sink {}: conflicts with writes on the target are found (commit timestamps and a replication origin)",
                p.name
            )),
            Some(missing) if p.uses_last_writer_wins() => r.problem(format!(
                "sink {}: on_conflict = \"last_writer_wins\" needs on the target: {missing}",
                p.name
            )),
            Some(missing) => r.note(format!(
                "sink {}: rows changed on the target after an incoming change are not found as conflicts without {missing}",
                p.name
            )),
        }
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let sequences = source
        .query(
            "SELECT DISTINCT s.seqrelid::regclass::text, s.seqincrement,
                    pg_has_role(c.relowner, 'USAGE')
               FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.objid
               JOIN pg_class c ON c.oid = s.seqrelid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.refobjid = ANY ($1) AND d.deptype IN ('a', 'i')
              ORDER BY 1",
            &[&oids],
        )
        .await;
    let Ok(sequences) = sequences else { return };
    for row in sequences {
        let (name, increment, owned): (String, i64, bool) = (row.get(0), row.get(1), row.get(2));
        match config.source.key_ranges {
            Some(_) if !owned => r.problem(format!(
                "sequence {name}: source.key_ranges sets its step at start, which needs its owner; run as the owner, or set it by hand and remove key_ranges"
            )),
            Some(k) if increment == i64::from(k.nodes) => r.ok(format!(
                "sequence {name} steps by {increment} (source.key_ranges: node {} of {})",
                k.node, k.nodes
            )),
            Some(k) => r.note(format!(
                "sequence {name} steps by {increment}: at start source.key_ranges makes it step by {} and hand out node {}'s values",
                k.nodes, k.node
            )),
            None if increment.abs() == 1 => r.note(format!(
                "sequence {name} steps by 1: both nodes hand out the same keys, and each insert of one is a conflict; give each node its own with source.key_ranges = {{ node = 1, nodes = 2 }} here and node = 2 in the other relay (docs/operations.md, Two writable nodes)"
            )),
            None => {}
        }
    }
}

/// The publication exists with every table, or this role can create or extend it.
async fn check_publication(
    client: &tokio_postgres::Client,
    name: &str,
    tables: &[SelectedTable],
    facts: &setup::ServerFacts,
    r: &mut Report,
) -> Result<(), SourceError> {
    let sql_err = |e| SourceError::Pg(crate::pg::PgError::from_sql("checking the publication", e));
    let (exists, missing) = setup::publication_gaps(client, name, tables).await?;
    if exists && missing.is_empty() {
        r.ok(format!("publication {name} publishes every selected table"));
        return Ok(());
    }
    if facts.is_superuser {
        r.ok(format!(
            "publication {name} will be {} on the first run",
            if exists { "extended" } else { "created" }
        ));
        return Ok(());
    }
    if !exists {
        let may_create: bool = client
            .query_one(
                "SELECT has_database_privilege(current_database(), 'CREATE')",
                &[],
            )
            .await
            .map_err(sql_err)?
            .get(0);
        if !may_create {
            r.problem(format!(
                "publication {name} does not exist and role {} may not create it: GRANT CREATE ON DATABASE {} TO {}, or have the table owner run CREATE PUBLICATION",
                facts.current_user,
                crate::pg::quote::ident(&facts.database),
                crate::pg::quote::ident(&facts.current_user)
            ));
        }
    }
    for t in missing {
        let owns: bool = client
            .query_one(
                "SELECT pg_has_role(c.relowner, 'USAGE') FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(sql_err)?
            .get(0);
        if !owns {
            r.problem(format!(
                "table {} is not in publication {name}, and role {} does not own it, so it cannot add it: have the owner run ALTER PUBLICATION {} ADD TABLE {}",
                t.qualified_name(),
                facts.current_user,
                crate::pg::quote::ident(name),
                crate::pg::quote::qualified(&t.schema, &t.name)
            ));
        }
    }
    Ok(())
}
