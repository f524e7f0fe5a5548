//! `walrelay verify`: compare every replicated table between the source and each postgres
//! target while replication runs, and (`--repair`) put right the rows that differ.
//!
//! - A table is walked in key ranges of `chunk_rows` rows (the source's key index gives the
//!   bounds). For each range the target's checksum is read first, then the source's: the
//!   source then holds everything the target had, so a range whose rows did not change in
//!   between compares equal at once, with no waiting, even while the target is behind.
//! - A range that differs is read row by row in rounds: the source first (rows and their
//!   versions), then — once the target has applied past the source's position after that
//!   read (the WAL insert position, or with trigger capture the session's snapshot, which
//!   a tick must see) — the target. A row is reported only when two rounds found it
//!   different with the same source row version (`compare::Settling`); rows in flight
//!   clear themselves.
//! - Compared is what the target should hold: the set's row filter, column list, renames
//!   and transforms are applied to the source's rows (`sets::TableShape`).
//! - A repair writes one proven row on the target in a transaction that first locks the
//!   target row and then checks that neither side changed since it was proven; see
//!   `repair`. The relay's later changes to that row then apply after it, in order.

pub mod compare;
mod repair;
pub mod sql;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use walrelay_model::{Lsn, Row, Value};

use crate::config::{CaptureMethod, Config, TablePattern};
use crate::pg::conninfo::ConnInfo;
use crate::pg::{quote, sql as pgsql, PgError};
use crate::schema::catalog;
use crate::sets::{ShapedRelation, TableShape};
pub use compare::Difference;
use compare::{Key, Settling, SourceRow};
pub use repair::Repair;
use sql::{Range, Side};

/// Rounds of row reads for one range before its still-changing rows are reported as such.
const ROUNDS: usize = 6;

/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{0}")]
    Setup(String),
}

fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> VerifyError {
    move |e| VerifyError::Pg(PgError::from_sql(what, e))
}

/// What to compare and how hard to press on the source.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these tables (source or target names); all when empty.
    pub tables: Vec<TablePattern>,
    pub chunk_rows: usize,
    /// Most source rows read per second, if bounded.
    pub rate: Option<u64>,
    /// Longest wait for a target to apply past a source read.
    pub wait: Duration,
    /// Key ranges compared at the same time (each with a session on either side).
    pub jobs: usize,
    /// Only these key ranges of these tables (by source name, as reports show it), instead
    /// of every range of every table: a second look at what was left unsettled.
    pub ranges: Option<std::collections::BTreeMap<String, Vec<Range>>>,
    pub repair: bool,
}

/// One difference, named by its key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Found {
    pub key: Vec<String>,
    #[serde(flatten)]
    pub difference: Difference,
    /// The target's names of the columns that differ (a changed row).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub column_names: Vec<String>,
    /// What a repair did, or why it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
}

impl Found {
    pub fn repaired(&self) -> bool {
        matches!(
            self.repair,
            Some(Repair::Inserted | Repair::Updated | Repair::Deleted)
        )
    }
}

/// The result for one table on one target.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableReport {
    pub sink: String,
    pub table: String,
    pub target: String,
    pub key_columns: Vec<String>,
    /// Source rows compared (after the set's filter).
    pub rows: u64,
    pub chunks: u64,
    pub differences: Vec<Found>,
    /// Rows or ranges that kept changing, or a target that did not catch up, so that no
    /// answer could be given for them.
    pub unsettled: Vec<String>,
    /// The key ranges of `unsettled`, to compare again later (`Options::ranges`).
    #[serde(skip)]
    pub unsettled_ranges: Vec<Range>,
    /// Why the table was not compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_compared: Option<String>,
    /// The target lacks the table (a difference, not a failure to compare).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub missing_table: bool,
    pub seconds: f64,
}

impl TableReport {
    /// Differences left after any repair (a missing table counts).
    pub fn open_differences(&self) -> usize {
        self.differences.iter().filter(|f| !f.repaired()).count() + usize::from(self.missing_table)
    }
}

/// Compare every table in scope; `each` sees each table's report as it is done.
pub async fn verify(
    config: &Config,
    options: &Options,
    mut each: impl FnMut(&TableReport),
) -> Result<Vec<TableReport>, VerifyError> {
    let sinks = config.postgres_sinks();
    if sinks.is_empty() {
        return Err(VerifyError::Setup(
            "no postgres sink in the configuration: verify compares the source with postgres targets".into(),
        ));
    }
    let info =
        crate::pg::locate::locate(&config.source.url.resolve().map_err(PgError::from)?).await?;
    let catalog_session = pgsql::connect(&info).await?;
    catalog::prepare_session(&catalog_session).await?;
    let boundaries = source_session(&info).await?;
    let (plan, _) = crate::sets::Plan::resolve(&catalog_session, &config.sets())
        .await
        .map_err(|e| VerifyError::Setup(e.to_string()))?;
    let progress_names: Vec<String> = sinks
        .iter()
        .map(|s| format!("{}/{}", config.source.slot, s.name))
        .collect();
    let mut reports = Vec::new();
    for (sink, progress) in sinks.iter().zip(&progress_names) {
        let target_info = sink.url.resolve().map_err(PgError::from)?;
        let target_catalog = pgsql::connect(&target_info).await?;
        catalog::prepare_session(&target_catalog).await?;
        let mut workers = Vec::new();
        for _ in 0..options.jobs.max(1) {
            workers.push(Worker {
                source: source_session(&info).await?,
                target: target_session(&target_info, &sink.name, options.repair).await?,
                slot: &config.source.slot,
                capture: config.source.capture,
                progress,
                options,
            });
        }
        let mut ctx = Sides {
            catalog: &catalog_session,
            boundaries: &boundaries,
            target_catalog,
            workers,
            options,
        };
        for shape in plan.tables_of(sink.sets.as_deref()) {
            let wanted = options.tables.is_empty()
                || options.tables.iter().any(|p| {
                    p.matches(&shape.source.0, &shape.source.1)
                        || p.matches(&shape.target.0, &shape.target.1)
                });
            let wanted = wanted
                && options
                    .ranges
                    .as_ref()
                    .is_none_or(|r| r.contains_key(&shape.shown()));
            if !wanted {
                continue;
            }
            let report = ctx.table(&sink.name, shape).await?;
            each(&report);
            reports.push(report);
        }
    }
    if !options.tables.is_empty() && reports.is_empty() {
        return Err(VerifyError::Setup(
            "no replicated table matches --table".into(),
        ));
    }
    Ok(reports)
}

/// A session on the source that prints values as the target's does.
async fn source_session(info: &ConnInfo) -> Result<Client, VerifyError> {
    let source = pgsql::connect(info).await?;
    source
        .batch_execute(sql::SESSION_SETTINGS)
        .await
        .map_err(pg("setting up a source session"))?;
    Ok(source)
}

/// A session on a target, set up for repairs when asked.
async fn target_session(info: &ConnInfo, sink: &str, repair: bool) -> Result<Client, VerifyError> {
    let target = pgsql::connect(info).await?;
    target
        .batch_execute(sql::SESSION_SETTINGS)
        .await
        .map_err(pg("setting up a target session"))?;
    if repair {
        // As the sink applies: the target's triggers (and `protect`) leave it alone.
        if let Err(e) = target
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            tracing::warn!(%sink, error = %e, "repairs run with the target's triggers active (the role may not set session_replication_role)");
        }
    }
    Ok(target)
}

/// The sessions of one source–target pair: catalogs, key-range bounds, and the workers
/// that compare ranges at the same time.
struct Sides<'a> {
    catalog: &'a Client,
    /// Walks the key index for the ranges' bounds (one at a time, for all workers).
    boundaries: &'a Client,
    target_catalog: Client,
    workers: Vec<Worker<'a>>,
    options: &'a Options,
}

/// One worker's sessions: it compares one key range at a time.
struct Worker<'a> {
    source: Client,
    target: Client,
    /// The slot, or with trigger capture the log's consumer.
    slot: &'a str,
    capture: CaptureMethod,
    /// The sink's progress record on the target (`slot/sink`).
    progress: &'a str,
    options: &'a Options,
}

/// Where the walk along a table's key stands: the last bound, whether it is done, and how
/// many ranges it gave out (their order in the report).
#[derive(Default)]
struct Walk {
    after: Option<Vec<String>>,
    done: bool,
    given_out: u64,
}

impl Walk {
    /// The next range (numbered): of `given`, or up to `rows` rows past the last bound,
    /// read on `boundaries`. Holding the walk while it runs keeps the bounds in order.
    async fn next(
        &mut self,
        boundaries: &Client,
        table: &Table,
        given: Option<&Vec<Range>>,
        rows: usize,
    ) -> Result<Option<(u64, Range)>, VerifyError> {
        if self.done {
            return Ok(None);
        }
        let range = match given {
            Some(given) => match given.get(self.given_out as usize) {
                Some(range) => range.clone(),
                None => {
                    self.done = true;
                    return Ok(None);
                }
            },
            None => {
                let (sql, params) = table.source.boundary(self.after.as_ref(), rows);
                let upto = boundaries
                    .query_opt(&sql, &bind(&params))
                    .await
                    .map_err(pg("reading a key range's bound on the source"))?
                    .map(|r| {
                        (0..table.source.key.len())
                            .map(|i| r.get(i))
                            .collect::<Vec<String>>()
                    });
                self.done = upto.is_none();
                Range {
                    after: std::mem::replace(&mut self.after, upto.clone()),
                    upto,
                }
            }
        };
        self.given_out += 1;
        Ok(Some((self.given_out, range)))
    }
}

/// What one range added to a table's report.
#[derive(Default)]
struct Part {
    rows: u64,
    differences: Vec<Found>,
    unsettled: Vec<String>,
    /// The range compared, when something in it was left unsettled.
    unsettled_range: Option<Range>,
}

/// One table as compared: both sides' statements and the shaping of source rows.
struct Table {
    source: Side,
    target: Side,
    /// The target's compared columns (unquoted) and types, for reports and repairs.
    target_columns: Vec<String>,
    target_types: Vec<String>,
    /// The target's key column names, for reports.
    key_columns: Vec<String>,
    shaper: Option<Arc<ShapedRelation>>,
}

impl Sides<'_> {
    async fn table(&mut self, sink: &str, shape: &TableShape) -> Result<TableReport, VerifyError> {
        let started = Instant::now();
        let mut report = TableReport {
            sink: sink.to_string(),
            table: shape.shown(),
            target: walrelay_model::QualifiedName {
                schema: &shape.target.0,
                name: &shape.target.1,
            }
            .to_string(),
            ..TableReport::default()
        };
        let table = match self.prepare(shape, &mut report).await? {
            Some(t) => t,
            None => return Ok(report),
        };
        // The ranges' bounds, one after the other; the workers take them as they come.
        let walk = tokio::sync::Mutex::new(Walk::default());
        let parts = std::sync::Mutex::new(Vec::<(u64, Part)>::new());
        let rows_read = std::sync::atomic::AtomicU64::new(0);
        let said = std::sync::Mutex::new(Instant::now());
        let (boundaries, options): (&Client, &Options) = (self.boundaries, self.options);
        let given = options.ranges.as_ref().and_then(|r| r.get(&report.table));
        let (table, walk, parts, rows_read, said, report_name) =
            (&table, &walk, &parts, &rows_read, &said, &report.table);
        let work = self.workers.iter_mut().map(|worker| async move {
            loop {
                let next = {
                    let mut walk = walk.lock().await;
                    walk.next(boundaries, table, given, options.chunk_rows)
                        .await?
                };
                let Some((n, range)) = next else {
                    return Ok::<(), VerifyError>(());
                };
                let part = worker.range(table, &range).await?;
                let read = rows_read.fetch_add(part.rows, std::sync::atomic::Ordering::Relaxed)
                    + part.rows;
                let ranges = {
                    let mut p = parts.lock().unwrap_or_else(|e| e.into_inner());
                    p.push((n, part));
                    p.len()
                };
                {
                    let mut said = said.lock().unwrap_or_else(|e| e.into_inner());
                    if said.elapsed() >= PROGRESS_EVERY {
                        *said = Instant::now();
                        tracing::info!(table = %report_name, rows = read, ranges, "verifying");
                    }
                }
                if let Some(rate) = options.rate.filter(|r| *r > 0) {
                    let due = Duration::from_secs_f64(read as f64 / rate as f64);
                    if let Some(early) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(early).await;
                    }
                }
            }
        });
        for result in futures_util::future::join_all(work).await {
            result?;
        }
        let mut parts = std::mem::take(&mut *parts.lock().unwrap_or_else(|e| e.into_inner()));
        parts.sort_by_key(|(n, _)| *n);
        for (_, part) in parts {
            report.rows += part.rows;
            report.chunks += 1;
            report.differences.extend(part.differences);
            report.unsettled.extend(part.unsettled);
            report.unsettled_ranges.extend(part.unsettled_range);
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Both sides' statements for `shape`, or `None` (with the report saying why) when the
    /// table cannot be compared.
    async fn prepare(
        &self,
        shape: &TableShape,
        report: &mut TableReport,
    ) -> Result<Option<Table>, VerifyError> {
        let (schema, name) = &shape.source;
        let source_def = catalog::read_table(self.catalog, schema, name).await?;
        let columns: Vec<String> = source_def
            .data_columns()
            .filter(|c| shape.keeps(&c.name))
            .map(|c| c.name.clone())
            .collect();
        let key = if shape.key.is_empty() {
            shape.primary_key.clone()
        } else {
            shape.key.clone()
        };
        report.key_columns = key
            .iter()
            .map(|k| shape.target_column(k).to_string())
            .collect();
        if key.is_empty() {
            report.not_compared = Some(
                "no primary key or replica identity index: its rows cannot be told apart by key"
                    .into(),
            );
            return Ok(None);
        }
        if let Some(k) = key
            .iter()
            .find(|k| !shape.keeps(k) || shape.transforms.contains_key(*k))
        {
            report.not_compared = Some(format!(
                "key column {k:?} is not replicated as it is (dropped or transformed), so rows cannot be matched by key"
            ));
            return Ok(None);
        }
        let target_name = quote::qualified(&shape.target.0, &shape.target.1);
        let exists: bool = self
            .target_catalog
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&target_name])
            .await
            .map_err(pg("looking up the target table"))?
            .get(0);
        if !exists {
            report.missing_table = true;
            report.not_compared = Some(format!("the target has no table {}", report.target));
            return Ok(None);
        }
        let target_def =
            catalog::read_table(&self.target_catalog, &shape.target.0, &shape.target.1).await?;
        let target_columns: Vec<String> = columns
            .iter()
            .map(|c| shape.target_column(c).to_string())
            .collect();
        let mut target_types = Vec::new();
        for c in &target_columns {
            match target_def.columns.iter().find(|d| d.name == *c) {
                Some(d) => target_types.push(d.type_sql.clone()),
                None => {
                    report.not_compared = Some(format!("the target table has no column {c:?}"));
                    return Ok(None);
                }
            }
        }
        let type_of = |def: &catalog::TableDef, column: &str| {
            def.columns
                .iter()
                .find(|c| c.name == column)
                .map(|c| c.type_sql.clone())
                .unwrap_or_else(|| "text".into())
        };
        let source_side = Side {
            table: quote::qualified(schema, name),
            columns: columns.iter().map(|c| quote::ident(c)).collect(),
            key: key.iter().map(|k| quote::ident(k)).collect(),
            key_types: key.iter().map(|k| type_of(&source_def, k)).collect(),
            filter: shape.filter.clone(),
        };
        let target_side = Side {
            table: target_name,
            columns: target_columns.iter().map(|c| quote::ident(c)).collect(),
            key: report.key_columns.iter().map(|k| quote::ident(k)).collect(),
            key_types: report
                .key_columns
                .iter()
                .map(|k| type_of(&target_def, k))
                .collect(),
            filter: None,
        };
        let shaper = if shape.changes_values() {
            let shaper = shape
                .copy_rows(&columns)
                .map_err(|e| VerifyError::Setup(e.to_string()))?;
            Some(Arc::new(shaper))
        } else {
            None
        };
        Ok(Some(Table {
            source: source_side,
            target: target_side,
            target_columns,
            target_types,
            key_columns: report.key_columns.clone(),
            shaper,
        }))
    }
}

impl Worker<'_> {
    /// Compare one key range: what it proves.
    async fn range(&mut self, table: &Table, range: &Range) -> Result<Part, VerifyError> {
        let mut part = Part::default();
        // Rows whose values a transform changes can only be compared after shaping, here.
        if table.shaper.is_none() {
            let (target_count, target_sum) =
                self.checksum(&self.target, &table.target, range).await?;
            let (count, sum) = self.checksum(&self.source, &table.source, range).await?;
            if (count, &sum) == (target_count, &target_sum) {
                part.rows += count as u64;
                return Ok(part);
            }
        }
        let mut settling = Settling::default();
        let mut counted = false;
        for _ in 0..ROUNDS {
            let source_rows = self.source_rows(table, range).await?;
            let at = self.source_mark().await?;
            if !counted {
                part.rows += source_rows.len() as u64;
                counted = true;
            }
            if !self.wait_for_target(&at).await? {
                part.unsettled.push(format!(
                    "{}: the target did not apply past {at} within {} s (is the relay running?)",
                    sql::describe(&table.key_columns, range),
                    self.options.wait.as_secs()
                ));
                part.unsettled_range = Some(range.clone());
                return Ok(part);
            }
            let target_rows = self.target_rows(&table.target, range).await?;
            let found = compare::differences(&source_rows, &target_rows);
            for (key, difference) in settling.round(found, &source_rows) {
                let column_names = match &difference {
                    Difference::Changed { columns } => columns
                        .iter()
                        .filter_map(|i| table.target_columns.get(*i).cloned())
                        .collect(),
                    _ => Vec::new(),
                };
                let repair = if self.options.repair {
                    let seen = repair::Seen {
                        source: source_rows.get(&key),
                        target: target_rows.get(&key),
                    };
                    Some(self.repair(table, &key, &difference, seen).await?)
                } else {
                    None
                };
                part.differences.push(Found {
                    key,
                    difference,
                    column_names,
                    repair,
                });
            }
            if settling.is_settled() {
                return Ok(part);
            }
        }
        for key in settling.pending() {
            part.unsettled.push(format!(
                "key ({}) = ({}): kept changing on the source",
                table.key_columns.join(", "),
                key.join(", ")
            ));
            part.unsettled_range = Some(range.clone());
        }
        Ok(part)
    }

    async fn checksum(
        &self,
        client: &Client,
        side: &Side,
        range: &Range,
    ) -> Result<(i64, String), VerifyError> {
        let (sql, params) = side.checksum(range);
        let row = client
            .query_one(&sql, &bind(&params))
            .await
            .map_err(pg("computing a range's checksum"))?;
        Ok((row.get(0), row.get(1)))
    }

    /// The source's rows of `range` as the target should hold them, with their versions.
    async fn source_rows(
        &self,
        table: &Table,
        range: &Range,
    ) -> Result<BTreeMap<Key, SourceRow>, VerifyError> {
        let (sql, params) = table.source.rows(range, true);
        let rows = self
            .source
            .query(&sql, &bind(&params))
            .await
            .map_err(pg("reading rows on the source"))?;
        Ok(rows
            .iter()
            .map(|r| source_row(r, table.source.key.len(), table.shaper.as_deref()))
            .collect())
    }

    async fn target_rows(
        &self,
        side: &Side,
        range: &Range,
    ) -> Result<BTreeMap<Key, Vec<Option<String>>>, VerifyError> {
        let (sql, params) = side.rows(range, false);
        let rows = self
            .target
            .query(&sql, &bind(&params))
            .await
            .map_err(pg("reading rows on the target"))?;
        let n = side.key.len();
        Ok(rows
            .iter()
            .map(|r| {
                let key = (0..n).map(|i| r.get(i)).collect();
                let values = (n..r.len()).map(|i| r.get(i)).collect();
                (key, values)
            })
            .collect())
    }

    /// Where the source stands just after a read: past every transaction the read saw.
    async fn source_mark(&self) -> Result<Mark, VerifyError> {
        Ok(match self.capture {
            CaptureMethod::Logical => {
                Mark::Wal(crate::sink::postgres::progress::wal_insert_position(&self.source).await?)
            }
            CaptureMethod::Trigger => Mark::Snapshot(
                self.source
                    .query_one("SELECT pg_current_snapshot()::text", &[])
                    .await
                    .map_err(pg("reading the source's snapshot"))?
                    .get(0),
            ),
        })
    }

    /// Wait until the target holds every transaction `at` is past; `false` after
    /// `Options::wait`.
    async fn wait_for_target(&mut self, at: &Mark) -> Result<bool, VerifyError> {
        match at {
            Mark::Wal(lsn) => Ok(crate::sink::postgres::progress::wait_applied(
                &self.source,
                &self.target,
                self.slot,
                self.progress,
                *lsn,
                self.options.wait,
            )
            .await?),
            Mark::Snapshot(snapshot) => self.wait_for_batch(snapshot).await,
        }
    }

    /// Trigger capture: the first tick that sees all `snapshot` sees, applied on the target
    /// (its recorded position past the tick's) or confirmed by the log's consumer. The
    /// relay ticks on its own while writers log; an idle one ticks when notified, which a
    /// wait does now and then.
    async fn wait_for_batch(&mut self, snapshot: &str) -> Result<bool, VerifyError> {
        use crate::source::trigger::{batch, install::CHANNEL};
        let started = Instant::now();
        let mut notified: Option<Instant> = None;
        loop {
            let tick = batch::first_tick_seeing(&self.source, self.slot, snapshot)
                .await
                .map_err(|e| match e {
                    batch::BatchError::Pg(e) => VerifyError::Pg(e),
                    other => VerifyError::Setup(other.to_string()),
                })?;
            if let Some((tick, confirmed)) = tick {
                let recorded =
                    crate::sink::postgres::progress::recorded(&self.target, self.progress)
                        .await?
                        .map(|(lsn, _)| lsn);
                if confirmed || recorded.is_some_and(|r| r >= tick.end()) {
                    return Ok(true);
                }
            } else if notified.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                self.source
                    .execute("SELECT pg_notify($1, '')", &[&CHANNEL])
                    .await
                    .map_err(pg("waking the relay"))?;
                notified = Some(Instant::now());
            }
            if started.elapsed() >= self.options.wait {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How far the source was when rows were read, in the terms of the capture method.
enum Mark {
    /// The WAL insert position (logical decoding: the slot and the sinks' positions pass it).
    Wal(Lsn),
    /// The session's snapshot (trigger capture: a tick that sees it closes a batch).
    Snapshot(String),
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mark::Wal(lsn) => write!(f, "{lsn}"),
            Mark::Snapshot(s) => write!(f, "the source's snapshot {s}"),
        }
    }
}

/// A source row read by `Side::rows` with its version, shaped as the target holds it.
fn source_row(
    row: &tokio_postgres::Row,
    key_len: usize,
    shaper: Option<&ShapedRelation>,
) -> (Key, SourceRow) {
    let key: Key = (0..key_len).map(|i| row.get(i)).collect();
    let version: String = row.get(key_len);
    let mut values: Vec<Option<String>> = (key_len + 1..row.len()).map(|i| row.get(i)).collect();
    if let Some(shaper) = shaper {
        let shaped = shaper.row(Row(values
            .into_iter()
            .map(|v| v.map_or(Value::Null, Value::Text))
            .collect()));
        values = shaped
            .0
            .into_iter()
            .map(|v| match v {
                Value::Text(t) => Some(t),
                Value::Binary(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                Value::Null | Value::UnchangedToast => None,
            })
            .collect();
    }
    (key, SourceRow { version, values })
}

/// Text parameters as tokio-postgres takes them.
fn bind(params: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}
