//! The initial copy: existing rows of the replicated tables go to each postgres target
//! before streaming starts, with no gap and no overlap.
//!
//! - A slot created now exports its snapshot; every copy worker imports it, so the copy
//!   is exactly the state at the slot's consistent point, where streaming starts.
//! - Tables that still need a copy when the slot already exists (a restart after a crash
//!   during the copy, or tables added to the configuration) are copied in the snapshot of
//!   a temporary slot, at a later point L. The sink then skips their changes committed
//!   before L (they are in the copy), and the source delivers streamed transactions whole
//!   until it has passed L, so that the sink knows their commit before applying them.
//! - Data moves as binary `COPY ... TO STDOUT` streamed into `COPY ... FROM STDIN`, never
//!   row by row; a big table is split into ctid page ranges copied in parallel; keys,
//!   indexes and constraints of tables walrelay created are built after their data.
//! - `walrelay.copies` on the target records each table's state; see `state.rs`.

pub mod progress;
pub mod read;
pub mod state;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures_util::SinkExt;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walrelay_model::Lsn;

use crate::config::Config;
use crate::pg::conninfo::ConnInfo;
use crate::pg::replication::ReplicationConnection;
use crate::pg::{quote, sql, PgError};
use crate::schema::{self, catalog, SchemaError, TableDef, TargetTable};
use crate::sets::Plan;
use crate::task::spawn_named;
use progress::TableProgress;
use state::CopyState;

/// Rows handed to the target's COPY at a time, about.
const COPY_BUFFER: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("sink {sink}: target table {table} is not empty, and walrelay has no record of copying it: empty it (TRUNCATE) so walrelay can copy it, or set [snapshot] enabled = false if it is complete already")]
    NotEmpty { sink: String, table: String },
    #[error("copying {table}: {error}")]
    Copy { table: String, error: PgError },
    #[error("a copy worker stopped: {0}")]
    Worker(String),
    /// Asked to stop (a signal): what was copied is kept, the rest is done at the next start.
    #[error("the copy was stopped")]
    Stopped,
}

impl SnapshotError {
    pub fn is_transient(&self) -> bool {
        match self {
            SnapshotError::Pg(e) | SnapshotError::Copy { error: e, .. } => e.is_transient(),
            _ => false,
        }
    }
}

/// A snapshot exported by a slot, and the position it stands for.
#[derive(Debug, Clone)]
pub struct SnapshotPoint {
    pub name: String,
    pub lsn: Lsn,
}

/// One table to copy into one target.
struct Job {
    /// The table on the target.
    def: TableDef,
    from: CopyFrom,
    created: bool,
    text_format: bool,
    progress: Arc<TableProgress>,
    /// Ranges of the table not yet finished.
    remaining: usize,
}

/// What a copy reads of a source table: its kept columns, the rows of its set's filter,
/// and — where the set transforms values — the shaper each row goes through.
#[derive(Clone)]
struct CopyFrom {
    table: String,
    columns: Vec<String>,
    filter: Option<String>,
    rows: Option<Arc<crate::sets::ShapedRelation>>,
}

/// A range of a table for one worker.
struct Chunk {
    job: usize,
    pages: Option<(i64, Option<i64>)>,
}

/// Copy every replicated table that a postgres sink's target lacks. `snapshot` is the
/// main slot's exported snapshot when the slot was created now. Returns the latest
/// position a table was copied at (streamed transactions go whole until the stream
/// passes it).
pub async fn copy_for_sinks(
    config: &Config,
    source: &ConnInfo,
    plan: &Plan,
    snapshot: Option<&SnapshotPoint>,
    cancel: &CancellationToken,
) -> Result<Lsn, SnapshotError> {
    if !config.snapshot.enabled {
        return Ok(Lsn::ZERO);
    }
    let sinks = config.postgres_sinks();
    if sinks.is_empty() {
        return Ok(Lsn::ZERO);
    }
    let catalog_client = sql::connect(source).await?;
    catalog::prepare_session(&catalog_client).await?;
    // Each table as its set shapes it on the targets, and what the copy reads of it.
    let mut defs: HashMap<(String, String), (TableDef, CopyFrom)> = HashMap::new();
    let copied = plan.tables().iter().filter(|t| {
        sinks
            .iter()
            .any(|s| s.sets.as_ref().is_none_or(|sets| sets.contains(&t.set)))
    });
    for shape in copied {
        let (schema_name, table) = &shape.source;
        let source_def = catalog::read_table(&catalog_client, schema_name, table).await?;
        let columns: Vec<String> = source_def
            .data_columns()
            .filter(|c| shape.keeps(&c.name))
            .map(|c| c.name.clone())
            .collect();
        let rows = if shape.changes_values() {
            let shaper = shape
                .copy_rows(&columns)
                .map_err(|e| SnapshotError::Worker(e.to_string()))?;
            Some(Arc::new(shaper))
        } else {
            None
        };
        let from = CopyFrom {
            table: quote::qualified(schema_name, table),
            columns: columns.iter().map(|c| quote::ident(c)).collect(),
            filter: shape.filter.clone(),
            rows,
        };
        defs.insert(shape.source.clone(), (shape.table_def(&source_def), from));
    }
    // What each target needs.
    let mut plans = Vec::new();
    let mut latest = Lsn::ZERO;
    for sink in &sinks {
        let name = format!("{}/{}", config.source.slot, sink.name);
        let target_info = sink.url.resolve().map_err(PgError::from)?;
        let target = sql::connect(&target_info).await?;
        schema::prepare_target_session(&target).await?;
        state::ensure_table(&target).await?;
        let states = state::read(&target, &name).await?;
        let wanted = plan.targets_of(sink.sets.as_deref());
        for (schema_name, table) in states.keys().filter(|k| !wanted.contains(k)) {
            state::forget(&target, &name, schema_name, table).await?;
            tracing::warn!(
                sink = %sink.name,
                table = %walrelay_model::QualifiedName { schema: schema_name, name: table },
                "table no longer replicated to this sink: its rows stay on the target and stop following the source; to replicate it again, empty it first and it is copied anew"
            );
        }
        let mut jobs = Vec::new();
        for shape in plan.tables_of(sink.sets.as_deref()) {
            let Some((def, from)) = defs.get(&shape.source) else {
                continue;
            };
            let key = (def.schema.clone(), def.name.clone());
            let created = match states.get(&key) {
                Some(CopyState::Done(lsn)) => {
                    latest = latest.max(*lsn);
                    continue;
                }
                Some(CopyState::Copying { created }) => {
                    schema::prepare_target(&target, def).await?;
                    target
                        .batch_execute(&format!("TRUNCATE {}", def.qualified()))
                        .await
                        .map_err(|e| PgError::from_sql("emptying a half-copied table", e))?;
                    tracing::info!(sink = %sink.name, table = %def.shown(), "copying again a table whose copy did not finish");
                    *created
                }
                None => match schema::prepare_target(&target, def).await? {
                    TargetTable::Created => true,
                    TargetTable::Existing => {
                        let has_rows: bool = target
                            .query_one(
                                &format!("SELECT EXISTS (SELECT 1 FROM {})", def.qualified()),
                                &[],
                            )
                            .await
                            .map_err(|e| PgError::from_sql("looking into a target table", e))?
                            .get(0);
                        if has_rows {
                            return Err(SnapshotError::NotEmpty {
                                sink: sink.name.clone(),
                                table: def.shown(),
                            });
                        }
                        false
                    }
                },
            };
            jobs.push((def.clone(), from.clone(), created));
        }
        if !jobs.is_empty() {
            plans.push((name, target_info, target, jobs));
        }
    }
    if plans.is_empty() {
        return Ok(latest);
    }
    // The snapshot: the new slot's, or a temporary slot's (kept open until the copy ends).
    let mut _temporary: Option<ReplicationConnection> = None;
    let point = match snapshot {
        Some(p) => p.clone(),
        None => {
            let (conn, point) = temporary_snapshot(source, &config.source.slot).await?;
            _temporary = Some(conn);
            point
        }
    };
    for (name, target_info, target, jobs) in plans {
        for (def, _, created) in &jobs {
            state::mark_copying(&target, &name, &def.schema, &def.name, *created).await?;
        }
        let from = CopySource {
            info: source,
            point: &point,
            catalog: &catalog_client,
        };
        copy_tables(config, &from, &target_info, &name, jobs, cancel).await?;
        latest = latest.max(point.lsn);
    }
    Ok(latest)
}

/// A snapshot of the source now, exported by a temporary slot: valid while the returned
/// connection stays open and idle. Its position is where the slot would start streaming.
pub async fn temporary_snapshot(
    source: &ConnInfo,
    slot: &str,
) -> Result<(ReplicationConnection, SnapshotPoint), SnapshotError> {
    let mut conn = ReplicationConnection::connect(source).await?;
    let result = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote::ident(&format!("{slot}_copy_{}", std::process::id()))
        ))
        .await?;
    let command = "CREATE_REPLICATION_SLOT (temporary, for a snapshot)";
    let name = result.required(command, "snapshot_name")?.to_string();
    let lsn = result.lsn(command, "consistent_point")?;
    Ok((conn, SnapshotPoint { name, lsn }))
}

/// Where a copy reads: the source, the snapshot, and a session for its catalog.
struct CopySource<'a> {
    info: &'a ConnInfo,
    point: &'a SnapshotPoint,
    catalog: &'a Client,
}

/// Copy `jobs` into one target with `[snapshot] parallel` workers.
async fn copy_tables(
    config: &Config,
    from: &CopySource<'_>,
    target: &ConnInfo,
    name: &str,
    jobs: Vec<(TableDef, CopyFrom, bool)>,
    cancel: &CancellationToken,
) -> Result<(), SnapshotError> {
    let CopySource {
        info: source,
        point,
        catalog: catalog_client,
    } = *from;
    let mut planned = Vec::new();
    let mut chunks = Vec::new();
    // Ranges by total size, TOAST included: a table whose rows live mostly in TOAST has few
    // heap pages but much to copy.
    let range_bytes = i64::try_from(config.snapshot.range_bytes).unwrap_or(i64::MAX);
    for (def, from, created) in jobs {
        let size = catalog_client
            .query_one(
                "SELECT coalesce(max(pg_relation_size(c.oid)), 0)::int8,
                        coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8,
                        coalesce(sum(greatest(c.reltuples, 0)), 0)::int8
                 FROM pg_class c
                 WHERE c.oid = $1::text::regclass
                    OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::text::regclass)",
                &[&from.table],
            )
            .await
            .map_err(|e| PgError::from_sql("reading table sizes", e))?;
        let (largest, bytes, rows): (i64, i64, i64) = (size.get(0), size.get(1), size.get(2));
        let pages = largest / 8192;
        let job = planned.len();
        let mut ranges = Vec::new();
        let count = (bytes / range_bytes).min(pages);
        if count > 1 && def.partition_key.is_none() {
            let step = (pages + count - 1) / count;
            let mut start = 0;
            while start < pages {
                let end = start + step;
                // The last range is open: rows of the snapshot on pages added since count.
                ranges.push((start, (end < pages).then_some(end)));
                start = end;
            }
        }
        let progress = TableProgress::new(def.shown(), rows as u64, bytes as u64);
        let count = ranges.len().max(1);
        if ranges.is_empty() {
            chunks.push((bytes, Chunk { job, pages: None }));
        } else {
            for r in ranges {
                chunks.push((
                    bytes,
                    Chunk {
                        job,
                        pages: Some(r),
                    },
                ));
            }
        }
        planned.push(Job {
            text_format: from.rows.is_some() || needs_text_format(&def),
            def,
            from,
            created,
            progress,
            remaining: count,
        });
    }
    // Biggest tables first, so that the last workers do not wait on one long copy.
    chunks.sort_by_key(|(bytes, _)| std::cmp::Reverse(*bytes));
    let queue: VecDeque<Chunk> = chunks.into_iter().map(|(_, c)| c).collect();
    let tables: Vec<Arc<TableProgress>> = planned.iter().map(|j| j.progress.clone()).collect();
    tracing::info!(
        tables = planned.len(),
        ranges = queue.len(),
        parallel = config.snapshot.parallel,
        snapshot_lsn = %point.lsn,
        "copying existing rows"
    );
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        jobs: Mutex::new(planned),
    });
    let stop_progress = CancellationToken::new();
    let reporter = spawn_named(
        "copy-progress",
        progress::report(tables, stop_progress.clone()),
    );
    // One token stops every worker: a signal, or the first worker that fails (the others
    // would copy for nothing). A worker stopped mid-range drops its connections, so the
    // target rolls back the COPY under way; tables not recorded done are copied again at
    // the next start.
    let stop = cancel.child_token();
    let mut workers = Vec::new();
    for _ in 0..config.snapshot.parallel.max(1) {
        let (shared, source, target, point, name, stop) = (
            shared.clone(),
            source.clone(),
            target.clone(),
            point.clone(),
            name.to_string(),
            stop.clone(),
        );
        workers.push(spawn_named("copy-worker", async move {
            let result = tokio::select! {
                r = worker(shared, source, target, point, name) => r,
                _ = stop.cancelled() => Err(SnapshotError::Stopped),
            };
            if result.is_err() {
                stop.cancel();
            }
            result
        }));
    }
    let mut result = Ok(());
    for w in workers {
        let r = match w.await {
            Ok(r) => r,
            Err(e) => Err(SnapshotError::Worker(e.to_string())),
        };
        // The first real failure is the one to report, not the stops it caused.
        result = match (result, r) {
            (Ok(()), r) | (Err(SnapshotError::Stopped), r @ Err(_)) => r,
            (kept, _) => kept,
        };
    }
    stop_progress.cancel();
    let _ = reporter.await;
    result
}

struct Shared {
    queue: Mutex<VecDeque<Chunk>>,
    jobs: Mutex<Vec<Job>>,
}

impl Shared {
    /// The next range to copy. The queue's lock is released before the range is copied
    /// (a guard in a `while let` condition would live through the loop body).
    fn next_chunk(&self) -> Option<Chunk> {
        let mut queue = self.queue.lock().ok()?;
        queue.pop_front()
    }
}

/// A copy worker: imports the snapshot, then copies ranges until none are left. The worker
/// that copies a table's last range builds its keys and indexes and records it done.
async fn worker(
    shared: Arc<Shared>,
    source: ConnInfo,
    target: ConnInfo,
    point: SnapshotPoint,
    name: String,
) -> Result<(), SnapshotError> {
    // The source side reads COPY output in bulk on walrelay's own client (see
    // `ReplicationConnection::copy_out_next`).
    let mut src = ReplicationConnection::connect_plain(&source).await?;
    src.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    src.simple_query(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        quote::literal(&point.name)
    ))
    .await?;
    let dst = sql::connect(&target).await?;
    schema::prepare_target_session(&dst).await?;
    // Like the apply sessions: no target triggers or foreign-key checks while loading; and
    // the copy need not wait for each flush (the record of a finished table does).
    let _ = dst
        .batch_execute("SET session_replication_role = replica")
        .await;
    let _ = dst.batch_execute("SET synchronous_commit = off").await;
    // lz4 gives up on incompressible values at a fraction of pglz's cost (where the server
    // has lz4; columns that name a method keep theirs).
    let _ = dst
        .batch_execute("SET default_toast_compression = lz4")
        .await;
    while let Some(chunk) = shared.next_chunk() {
        let (def, from, text, progress) = {
            let jobs = shared
                .jobs
                .lock()
                .map_err(|e| SnapshotError::Worker(e.to_string()))?;
            let j = &jobs[chunk.job];
            (
                j.def.clone(),
                j.from.clone(),
                j.text_format,
                j.progress.clone(),
            )
        };
        let table = CopyTable {
            def: &def,
            from: &from,
            text,
        };
        copy_range(&mut src, &dst, &table, chunk.pages, &progress, &name).await?;
        let last = {
            let mut jobs = shared
                .jobs
                .lock()
                .map_err(|e| SnapshotError::Worker(e.to_string()))?;
            let j = &mut jobs[chunk.job];
            j.remaining -= 1;
            (j.remaining == 0).then_some(j.created)
        };
        if let Some(created) = last {
            if created {
                schema::finish_target(&dst, &def).await?;
            }
            dst.batch_execute("SET synchronous_commit = on")
                .await
                .map_err(|e| PgError::from_sql("synchronous_commit", e))?;
            state::mark_done(&dst, &name, &def.schema, &def.name, point.lsn).await?;
            let _ = dst.batch_execute("SET synchronous_commit = off").await;
            progress.done.store(true, Ordering::Relaxed);
        }
    }
    let _ = src.simple_query("COMMIT").await;
    Ok(())
}

/// One table of one copy: where it goes, what is read of it, and in which format.
struct CopyTable<'a> {
    def: &'a TableDef,
    from: &'a CopyFrom,
    text: bool,
}

/// Stream one range of a table from the source's COPY into the target's: as it comes, or
/// row by row through the set's transforms.
async fn copy_range(
    src: &mut ReplicationConnection,
    dst: &Client,
    table: &CopyTable<'_>,
    pages: Option<(i64, Option<i64>)>,
    progress: &TableProgress,
    name: &str,
) -> Result<(), SnapshotError> {
    let CopyTable { def, from, text } = *table;
    let target_cols: Vec<String> = def.data_columns().map(|c| quote::ident(&c.name)).collect();
    let mut conditions = Vec::new();
    match pages {
        None => {}
        Some((start, None)) => conditions.push(format!("ctid >= '({start},0)'::tid")),
        Some((start, Some(end))) => conditions.push(format!(
            "ctid >= '({start},0)'::tid AND ctid < '({end},0)'::tid"
        )),
    }
    if let Some(f) = &from.filter {
        conditions.push(format!("({f})"));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let format = if text { "" } else { " (FORMAT binary)" };
    let out_sql = format!(
        "COPY (SELECT {} FROM {}{filter}) TO STDOUT{format}",
        from.columns.join(", "),
        from.table
    );
    let in_sql = format!(
        "COPY {} ({}) FROM STDIN{format}",
        def.qualified(),
        target_cols.join(", ")
    );
    let err = |e: tokio_postgres::Error| SnapshotError::Copy {
        table: def.shown(),
        error: PgError::from_sql("", e),
    };
    let pg_err = |error: PgError| SnapshotError::Copy {
        table: def.shown(),
        error,
    };
    src.copy_out(&out_sql).await.map_err(pg_err)?;
    // Marked as walrelay's, so that a relay reading the target does not send the rows back
    // (`crate::origin`). A failed copy's connection goes, and its transaction with it.
    dst.batch_execute(&format!("BEGIN; {}", crate::origin::mark_statement(name)))
        .await
        .map_err(err)?;
    let sink = dst.copy_in(in_sql.as_str()).await.map_err(err)?;
    futures_util::pin_mut!(sink);
    while let Some(data) = src.copy_out_next(COPY_BUFFER).await.map_err(pg_err)? {
        progress
            .bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let data = match &from.rows {
            None => data,
            Some(shaper) => shape_copy_rows(&data, shaper, from.columns.len()).map_err(|what| {
                SnapshotError::Worker(format!("copying {}: {what}", def.shown()))
            })?,
        };
        sink.send(data).await.map_err(err)?;
    }
    let rows = sink.finish().await.map_err(err)?;
    dst.batch_execute("COMMIT").await.map_err(err)?;
    progress.rows.fetch_add(rows, Ordering::Relaxed);
    Ok(())
}

/// Whole rows of COPY text through a set's transforms, back into COPY text. The source's
/// COPY output ends every row with a newline, and `copy_out_next` returns whole rows.
fn shape_copy_rows(
    data: &bytes::Bytes,
    shaper: &crate::sets::ShapedRelation,
    columns: usize,
) -> Result<bytes::Bytes, String> {
    let mut out = Vec::with_capacity(data.len());
    for line in data.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let row = shaper.row(crate::pg::copy_text::parse_row(line, columns)?);
        for (i, value) in row.0.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            crate::pg::copy_text::encode_value(value, &mut out);
        }
        out.push(b'\n');
    }
    Ok(bytes::Bytes::from(out))
}

/// Binary COPY carries the type oids of array elements and composite fields; they differ
/// between servers for user-defined types, so such tables go in text format.
fn needs_text_format(def: &TableDef) -> bool {
    let user_types: Vec<&str> = def.types.iter().map(|t| t.name()).collect();
    def.data_columns().any(|c| {
        let base = c.type_sql.trim_end_matches("[]");
        c.type_sql.ends_with("[]") && user_types.contains(&base)
    }) || def
        .types
        .iter()
        .any(|t| matches!(t, catalog::TypeDef::Composite { .. }))
}

/// What the copy costs a table's changes: transactions committed before `copied_at`
/// are in the copy. Loaded by a postgres sink at start.
pub async fn copied_positions(
    target: &Client,
    name: &str,
) -> Result<HashMap<(String, String), Lsn>, PgError> {
    Ok(state::read(target, name)
        .await?
        .into_iter()
        .filter_map(|(k, s)| match s {
            CopyState::Done(lsn) => Some((k, lsn)),
            CopyState::Copying { .. } => None,
        })
        .collect())
}
