//! Progress of the initial copy: a bar per table and an overall one in a terminal, plain
//! log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// Counters of one table, updated by the workers.
#[derive(Debug)]
pub struct TableProgress {
    pub name: String,
    /// The catalog's estimate of rows and bytes (the rate and ETA come from it).
    pub rows_estimate: u64,
    pub bytes_estimate: u64,
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
    pub done: AtomicBool,
}

impl TableProgress {
    pub fn new(name: String, rows_estimate: u64, bytes_estimate: u64) -> Arc<Self> {
        Arc::new(TableProgress {
            name,
            rows_estimate,
            bytes_estimate,
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            done: AtomicBool::new(false),
        })
    }
}

/// Show the tables' progress until `stop` fires.
pub async fn report(tables: Vec<Arc<TableProgress>>, stop: CancellationToken) {
    if std::io::stderr().is_terminal() {
        bars(tables, stop).await
    } else {
        lines(tables, stop).await
    }
}

async fn bars(tables: Vec<Arc<TableProgress>>, stop: CancellationToken) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta:>4} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let total_bytes: u64 = tables.iter().map(|t| t.bytes_estimate).sum();
    let overall = multi.add(ProgressBar::new(total_bytes.max(1)));
    overall.set_style(style.clone());
    overall.set_prefix("all tables");
    let table_bars: Vec<ProgressBar> = tables
        .iter()
        .map(|t| {
            let b = multi.add(ProgressBar::new(t.bytes_estimate.max(1)));
            b.set_style(style.clone());
            b.set_prefix(t.name.chars().take(24).collect::<String>());
            b
        })
        .collect();
    loop {
        let mut sum = 0;
        for (t, b) in tables.iter().zip(&table_bars) {
            let bytes = t.bytes.load(Ordering::Relaxed);
            sum += bytes;
            b.set_length(t.bytes_estimate.max(bytes).max(1));
            b.set_position(bytes);
            b.set_message(format!("{} rows", t.rows.load(Ordering::Relaxed)));
            if t.done.load(Ordering::Relaxed) && !b.is_finished() {
                b.finish_with_message(format!("{} rows, done", t.rows.load(Ordering::Relaxed)));
            }
        }
        overall.set_length(total_bytes.max(sum).max(1));
        overall.set_position(sum);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    overall.finish();
}

async fn lines(tables: Vec<Arc<TableProgress>>, stop: CancellationToken) {
    let started = Instant::now();
    let mut reported_done = vec![false; tables.len()];
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let total: u64 = tables.iter().map(|t| t.bytes.load(Ordering::Relaxed)).sum();
        let estimate: u64 = tables.iter().map(|t| t.bytes_estimate).sum();
        tracing::info!(
            copied_mb = total / (1 << 20),
            of_mb = estimate / (1 << 20),
            mb_per_s = format!("{:.1}", total as f64 / (1 << 20) as f64 / secs),
            "copying"
        );
        for (i, t) in tables.iter().enumerate() {
            if t.done.load(Ordering::Relaxed) && !reported_done[i] {
                reported_done[i] = true;
                tracing::info!(
                    table = %t.name,
                    rows = t.rows.load(Ordering::Relaxed),
                    mb = t.bytes.load(Ordering::Relaxed) / (1 << 20),
                    "table copied"
                );
            }
        }
    }
}
