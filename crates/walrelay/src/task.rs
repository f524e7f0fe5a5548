//! Named tasks: every spawned task carries a name, so logs and panics say which one it was.

use std::future::Future;

use tokio::task::JoinHandle;

/// Spawn `future` as a task named `name`.
#[allow(clippy::disallowed_methods)] // the one sanctioned call of tokio::spawn
pub fn spawn_named<F>(name: &'static str, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    // A debug span: disabled at the default log level, where an enabled span would be
    // entered (and filtered) at every poll of busy tasks.
    let span = tracing::debug_span!("task", name);
    tokio::spawn(tracing::Instrument::instrument(future, span))
}

/// Run blocking work (file I/O with fsync) on tokio's blocking pool, named like a task.
pub fn spawn_blocking_named<F, R>(name: &'static str, f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let span = tracing::debug_span!("task", name);
    tokio::task::spawn_blocking(move || span.in_scope(f))
}
