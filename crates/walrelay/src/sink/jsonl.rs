//! The `jsonl` sink: one JSON event per line, to a file or standard output.
//!
//! A file is durable after `fsync`, done as a group commit: when the input queue runs dry,
//! or every few megabytes or half second under load. On start the sink cuts off a line torn
//! by a crash and reads the position of the last whole line; events the source sends again
//! up to that position are skipped, so the file holds each event once.
//!
//! It runs on a blocking thread: file writes and fsync block, and this keeps them off the
//! async workers.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use walrelay_model::{Event, Lsn, Position};

use super::{advance, SinkError};
use crate::config::JsonlSinkConfig;
use crate::format::json::{line_head, JsonEncoder};

const SYNC_BYTES: usize = 8 << 20;
const SYNC_INTERVAL: Duration = Duration::from_millis(500);
const WRITE_CHUNK: usize = 1 << 20;

enum Output {
    Stdout(io::Stdout),
    File(File),
}

pub struct JsonlSink {
    name: String,
    path: String,
    output: Output,
    /// Events up to here are already in the file (or, after snapshot rows, are in them).
    resume_after: Option<Position>,
    /// The file needs the snapshot's rows: it has no event yet, or its last event is a
    /// snapshot row (the read was cut short; a finished one ends in `snapshot_end`).
    needs_snapshot: bool,
}

impl JsonlSink {
    pub fn open(config: &JsonlSinkConfig) -> Result<Self, SinkError> {
        let err = |what, source| SinkError::Io {
            name: config.name.clone(),
            what,
            path: config.path.clone(),
            source,
        };
        if config.path == "-" {
            return Ok(JsonlSink {
                name: config.name.clone(),
                path: config.path.clone(),
                output: Output::Stdout(io::stdout()),
                resume_after: None,
                needs_snapshot: false,
            });
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&config.path)
            .map_err(|e| err("opening", e))?;
        let last = repair_and_read_last_line(&mut file).map_err(|e| err("reading", e))?;
        let (resume_after, needs_snapshot) = match last {
            Some(line) => {
                let (position, kind) = line_head(&line).ok_or_else(|| {
                    err(
                        "reading",
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the last line is not a walrelay event; point the sink at a new file",
                        ),
                    )
                })?;
                match kind.as_str() {
                    // The read was cut short: done again at a new snapshot.
                    "read" => (
                        Some(Position::covered_by_snapshot(position.commit_lsn)),
                        true,
                    ),
                    "snapshot_end" => (
                        Some(Position::covered_by_snapshot(position.commit_lsn)),
                        false,
                    ),
                    _ => (Some(position), false),
                }
            }
            None => (None, true),
        };
        if let Some(p) = resume_after {
            tracing::info!(sink = %config.name, position = %p, "resuming after the last event in the file");
        }
        Ok(JsonlSink {
            name: config.name.clone(),
            path: config.path.clone(),
            output: Output::File(file),
            resume_after,
            needs_snapshot,
        })
    }

    /// When this sink takes the snapshot's rows as read events.
    pub fn reads(&self) -> super::Reads {
        if self.needs_snapshot {
            super::Reads::Needed
        } else {
            super::Reads::WithNewSlot
        }
    }

    fn io_err(&self, what: &'static str, source: io::Error) -> SinkError {
        SinkError::Io {
            name: self.name.clone(),
            what,
            path: self.path.clone(),
            source,
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), SinkError> {
        let r = match &mut self.output {
            Output::Stdout(s) => s.lock().write_all(buf),
            Output::File(f) => f.write_all(buf),
        };
        r.map_err(|e| self.io_err("writing", e))
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        let r = match &mut self.output {
            Output::Stdout(s) => s.lock().flush(),
            Output::File(f) => f.sync_data(),
        };
        r.map_err(|e| self.io_err("syncing", e))
    }

    /// Write batches until the input closes; publish what is durable after each sync.
    pub fn run(
        mut self,
        mut input: super::queue::QueueReceiver,
        durable: watch::Sender<Lsn>,
    ) -> Result<(), SinkError> {
        let mut encoder = JsonEncoder::default();
        let mut buf = Vec::with_capacity(2 * WRITE_CHUNK);
        // The highest durable LSN among the events written since the last sync.
        let mut unsynced: Option<Lsn> = None;
        let mut unsynced_bytes = 0usize;
        let mut last_sync = Instant::now();
        loop {
            let batch = match input.try_recv() {
                Ok(b) => b,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Nothing more queued: a natural moment to make everything durable.
                    self.flush_and_sync(&mut buf, &mut unsynced, &durable)?;
                    unsynced_bytes = 0;
                    last_sync = Instant::now();
                    match input.blocking_recv() {
                        Some(b) => b,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            for event in batch.iter() {
                let mark = buf.len();
                if let Some(pos) = encoder.encode(event, &mut buf) {
                    if self.resume_after.is_some_and(|r| pos <= r) {
                        buf.truncate(mark);
                    } else if let Event::Read { .. } | Event::SnapshotEnd { .. } = event {
                        // Transactions that committed before the snapshot are in its rows:
                        // what the source sends of them is skipped.
                        let covered = Position::covered_by_snapshot(pos.commit_lsn);
                        self.resume_after =
                            Some(self.resume_after.map_or(covered, |r| r.max(covered)));
                    }
                }
                if let Some(lsn) = event.durable_lsn() {
                    unsynced = Some(unsynced.map_or(lsn, |u| u.max(lsn)));
                }
                if buf.len() >= WRITE_CHUNK {
                    unsynced_bytes += buf.len();
                    self.write(&buf)?;
                    buf.clear();
                }
            }
            if unsynced_bytes + buf.len() >= SYNC_BYTES || last_sync.elapsed() >= SYNC_INTERVAL {
                self.flush_and_sync(&mut buf, &mut unsynced, &durable)?;
                unsynced_bytes = 0;
                last_sync = Instant::now();
            }
        }
        self.flush_and_sync(&mut buf, &mut unsynced, &durable)?;
        Ok(())
    }

    fn flush_and_sync(
        &mut self,
        buf: &mut Vec<u8>,
        unsynced: &mut Option<Lsn>,
        durable: &watch::Sender<Lsn>,
    ) -> Result<(), SinkError> {
        if !buf.is_empty() {
            self.write(buf)?;
            buf.clear();
        }
        if let Some(lsn) = unsynced.take() {
            self.sync()?;
            advance(durable, lsn);
        }
        Ok(())
    }
}

/// Cut a line torn by a crash off the end of `file`, and return the last whole line.
fn repair_and_read_last_line(file: &mut File) -> io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    let (last, whole_end) = last_whole_line(file, len)?;
    if whole_end < len {
        // Torn: the last line never got its newline. Drop it; the source sends it again.
        tracing::warn!(
            bytes = len - whole_end,
            "removing a line torn by a crash from the end of the file"
        );
        file.set_len(whole_end)?;
    }
    Ok(last)
}

/// The last newline-terminated line of the first `len` bytes of `file` (without its
/// newline), and where the whole lines end (before a torn one). Reads only the tail.
fn last_whole_line(file: &mut File, len: u64) -> io::Result<(Option<Vec<u8>>, u64)> {
    if len == 0 {
        return Ok((None, 0));
    }
    let line_start = last_line_start(file, len)?;
    file.seek(SeekFrom::Start(line_start))?;
    let mut last = vec![0u8; (len - line_start) as usize];
    file.read_exact(&mut last)?;
    if last.last() == Some(&b'\n') {
        last.pop();
        return Ok((Some(last).filter(|l| !l.is_empty()), len));
    }
    if line_start == 0 {
        return Ok((None, 0));
    }
    let (line, _) = last_whole_line(file, line_start)?;
    Ok((line, line_start))
}

/// The last whole line of the file at `path`, read-only (for `walrelay status`).
pub fn last_line_of(path: &str) -> io::Result<Option<Vec<u8>>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    Ok(last_whole_line(&mut file, len)?.0)
}

/// Offset where the last line begins: just after the last newline that is not the file's
/// final byte. Reads backwards in chunks, so a huge file costs only its tail.
fn last_line_start(file: &mut File, len: u64) -> io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut last_byte = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last_byte)?;
    let mut end = if last_byte[0] == b'\n' { len - 1 } else { len };
    let mut piece = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        piece.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut piece)?;
        if let Some(i) = piece.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_line(content: &[u8]) -> (Option<Vec<u8>>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, content).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .unwrap();
        let last = repair_and_read_last_line(&mut f).unwrap();
        (last, std::fs::read(&path).unwrap())
    }

    #[test]
    fn finds_the_last_line_and_cuts_a_torn_one() {
        assert_eq!(last_line(b""), (None, b"".to_vec()));
        assert_eq!(
            last_line(b"a\nbc\n"),
            (Some(b"bc".to_vec()), b"a\nbc\n".to_vec())
        );
        assert_eq!(
            last_line(b"a\nbc\nde"),
            (Some(b"bc".to_vec()), b"a\nbc\n".to_vec())
        );
        assert_eq!(last_line(b"torn"), (None, b"".to_vec()));
        assert_eq!(
            last_line(b"one\n"),
            (Some(b"one".to_vec()), b"one\n".to_vec())
        );
    }

    #[test]
    fn long_lines_across_chunks() {
        let long = vec![b'x'; 200_000];
        let mut content = b"first\n".to_vec();
        content.extend_from_slice(&long);
        content.push(b'\n');
        content.extend_from_slice(&long[..100_000]); // torn
        let (last, after) = last_line(&content);
        assert_eq!(last.unwrap().len(), 200_000);
        assert_eq!(after.len(), 6 + 200_001);
    }
}
