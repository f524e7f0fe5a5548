//! Spill files for streamed transactions: PostgreSQL sends a transaction larger than
//! `logical_decoding_work_mem` in chunks before it commits, interleaved with other
//! transactions. Its changes wait here, on disk, until Stream Commit, so that events still
//! leave in commit order and memory stays bounded whatever the transaction's size.
//!
//! A record is a little-endian u32 length and a postcard-encoded `Change<u32>`, the u32
//! naming a relation in the spill's own table (relations are few and stay in memory). An
//! aborted subtransaction is removed by truncating the file at its first change, as
//! PostgreSQL's own apply worker does: at the time of a Stream Abort, every change after the
//! subtransaction's first belongs to it or to its children.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use walrelay_model::{Change, Relation, Xid};

#[derive(Debug, thiserror::Error)]
#[error("spill file {path}: {source}")]
pub struct SpillError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Largest record accepted when reading back: a change is at most a few GB in theory, but a
/// length beyond this means a corrupt file, not a change.
const MAX_RECORD: u32 = 1 << 31;

/// The changes of one streamed transaction, being written. Without a file it only keeps the
/// count of changes and the subtransaction bookkeeping (when no sink needs the changes
/// kept for the commit).
pub struct SpillWriter {
    path: PathBuf,
    file: Option<BufWriter<File>>,
    relations: Vec<Arc<Relation>>,
    relation_index: HashMap<usize, u32>,
    /// First change of each subtransaction: (subxid, byte offset, change count before it).
    subxacts: Vec<(Xid, u64, u64)>,
    bytes: u64,
    count: u64,
    encoded: Vec<u8>,
    pub origin: Option<String>,
}

impl SpillWriter {
    pub fn create(
        dir: &Path,
        prefix: &str,
        xid: Xid,
        keep_changes: bool,
    ) -> Result<Self, SpillError> {
        let path = dir.join(format!("{prefix}-{xid}.spill"));
        let file = if keep_changes {
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| SpillError {
                    path: path.clone(),
                    source,
                })?;
            Some(BufWriter::with_capacity(256 * 1024, f))
        } else {
            None
        };
        Ok(SpillWriter {
            path,
            file,
            relations: Vec::new(),
            relation_index: HashMap::new(),
            subxacts: Vec::new(),
            bytes: 0,
            count: 0,
            encoded: Vec::new(),
            origin: None,
        })
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether any change came, kept or only counted (`note`).
    pub fn has_changes(&self) -> bool {
        !self.subxacts.is_empty()
    }

    /// Count a change of `subxid` without keeping it.
    pub fn note(&mut self, subxid: Xid) {
        if !self.subxacts.iter().any(|(x, _, _)| *x == subxid) {
            self.subxacts.push((subxid, self.bytes, self.count));
        }
        self.count += 1;
    }

    /// Append a change made by (sub)transaction `subxid`.
    pub fn append(&mut self, subxid: Xid, change: Change) -> Result<(), SpillError> {
        self.note(subxid);
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let relations = &mut self.relations;
        let index = &mut self.relation_index;
        let numbered = change
            .map_relations::<u32, std::convert::Infallible>(|r| {
                let key = Arc::as_ptr(&r) as usize;
                Ok(*index.entry(key).or_insert_with(|| {
                    relations.push(r);
                    (relations.len() - 1) as u32
                }))
            })
            .unwrap_or_else(|never| match never {});
        let written = postcard::to_extend(&numbered, std::mem::take(&mut self.encoded))
            .map_err(io::Error::other)
            .and_then(|encoded| {
                let len = u32::try_from(encoded.len())
                    .ok()
                    .filter(|&l| l < MAX_RECORD)
                    .ok_or_else(|| io::Error::other("change too large to spill"))?;
                file.write_all(&len.to_le_bytes())?;
                file.write_all(&encoded)?;
                Ok((len, encoded))
            });
        let (len, mut encoded) = written.map_err(|source| SpillError {
            path: self.path.clone(),
            source,
        })?;
        self.bytes += 4 + u64::from(len);
        encoded.clear();
        self.encoded = encoded;
        Ok(())
    }

    /// Forget the changes of an aborted subtransaction (and of everything after its first
    /// change). An unknown subxid had no changes here: nothing to do.
    pub fn abort_subxact(&mut self, subxid: Xid) -> Result<(), SpillError> {
        let Some(i) = self.subxacts.iter().position(|(x, _, _)| *x == subxid) else {
            return Ok(());
        };
        let (_, offset, count) = self.subxacts[i];
        if let Some(file) = self.file.as_mut() {
            let cut = file.flush().and_then(|()| {
                let f = file.get_mut();
                f.set_len(offset)?;
                f.seek(SeekFrom::Start(offset)).map(|_| ())
            });
            cut.map_err(|e| SpillError {
                path: self.path.clone(),
                source: e,
            })?;
        }
        self.bytes = offset;
        self.count = count;
        self.subxacts.truncate(i);
        Ok(())
    }

    /// Done writing: read the changes back in order. Only for a writer that keeps changes.
    pub fn into_reader(self) -> Result<SpillReader, SpillError> {
        let path = self.path.clone();
        let err = |source| SpillError {
            path: path.clone(),
            source,
        };
        let mut file = self
            .file
            .ok_or_else(|| err(io::Error::other("this transaction's changes were not kept")))?;
        file.flush().map_err(err)?;
        let mut file = file.into_inner().map_err(|e| err(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(|source| SpillError {
            path: path.clone(),
            source,
        })?;
        Ok(SpillReader {
            path,
            file: BufReader::with_capacity(256 * 1024, file),
            relations: self.relations,
            remaining: self.count,
            buf: Vec::new(),
        })
    }

    /// Abandon the transaction and delete its file.
    pub fn discard(self) {
        let path = self.path.clone();
        let had_file = self.file.is_some();
        drop(self);
        if had_file {
            let _ = fs::remove_file(path);
        }
    }
}

/// The changes of a committed streamed transaction, read back in order. The file is
/// deleted when the reader drops.
pub struct SpillReader {
    path: PathBuf,
    file: BufReader<File>,
    relations: Vec<Arc<Relation>>,
    remaining: u64,
    buf: Vec<u8>,
}

impl SpillReader {
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    pub fn next_change(&mut self) -> Result<Option<Change>, SpillError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let err = |source| SpillError {
            path: self.path.clone(),
            source,
        };
        let corrupt = |what: &str| SpillError {
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
        };
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len).map_err(err)?;
        let len = u32::from_le_bytes(len);
        if len >= MAX_RECORD {
            return Err(corrupt("record length out of range"));
        }
        self.buf.resize(len as usize, 0);
        self.file.read_exact(&mut self.buf).map_err(err)?;
        let numbered: Change<u32> =
            postcard::from_bytes(&self.buf).map_err(|_| corrupt("undecodable record"))?;
        let relations = &self.relations;
        let change = numbered
            .map_relations(|i| relations.get(i as usize).cloned().ok_or(()))
            .map_err(|()| corrupt("unknown relation number"))?;
        self.remaining -= 1;
        Ok(Some(change))
    }
}

impl Drop for SpillReader {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Create the spill directory and remove spill files of `prefix` left by an earlier run:
/// the server sends those transactions again from the start.
pub fn prepare_dir(dir: &Path, prefix: &str) -> Result<(), SpillError> {
    let err = |source| SpillError {
        path: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    for entry in fs::read_dir(dir).map_err(err)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!("{prefix}-")) && name.ends_with(".spill") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walrelay_model::{Column, ReplicaIdentity, Row, Value};

    fn rel(name: &str) -> Arc<Relation> {
        Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
                type_name: "int4".into(),
                is_key: true,
            }],
        })
    }

    fn insert(r: &Arc<Relation>, v: &str) -> Change {
        Change::Insert {
            relation: r.clone(),
            new: Row(vec![Value::Text(v.into())]),
        }
    }

    fn read_all(w: SpillWriter) -> Vec<Change> {
        let mut r = w.into_reader().unwrap();
        let mut out = Vec::new();
        while let Some(c) = r.next_change().unwrap() {
            out.push(c);
        }
        out
    }

    #[test]
    fn round_trip_keeps_order_and_relations() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (rel("a"), rel("b"));
        let mut w = SpillWriter::create(dir.path(), "s", 7, true).unwrap();
        let changes = vec![insert(&a, "1"), insert(&b, "2"), insert(&a, "3")];
        for c in &changes {
            w.append(7, c.clone()).unwrap();
        }
        let back = read_all(w);
        assert_eq!(back, changes);
        // Relations come back shared, not copied per change.
        if let (Change::Insert { relation: r1, .. }, Change::Insert { relation: r3, .. }) =
            (&back[0], &back[2])
        {
            assert!(Arc::ptr_eq(r1, r3));
        }
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "file removed after reading"
        );
    }

    #[test]
    fn aborted_subtransaction_is_cut_out() {
        let dir = tempfile::tempdir().unwrap();
        let a = rel("a");
        let mut w = SpillWriter::create(dir.path(), "s", 10, true).unwrap();
        w.append(10, insert(&a, "top-1")).unwrap();
        w.append(11, insert(&a, "sub-1")).unwrap();
        w.append(12, insert(&a, "nested")).unwrap();
        w.abort_subxact(11).unwrap(); // aborts 12 with it
        w.append(10, insert(&a, "top-2")).unwrap();
        w.append(13, insert(&a, "sub-2")).unwrap();
        w.abort_subxact(99).unwrap(); // never had changes
        assert_eq!(w.len(), 3);
        let back = read_all(w);
        assert_eq!(
            back,
            vec![
                insert(&a, "top-1"),
                insert(&a, "top-2"),
                insert(&a, "sub-2")
            ]
        );
    }

    #[test]
    fn prepare_removes_only_own_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("s-1.spill"), b"x").unwrap();
        fs::write(dir.path().join("other-1.spill"), b"x").unwrap();
        prepare_dir(dir.path(), "s").unwrap();
        assert!(!dir.path().join("s-1.spill").exists());
        assert!(dir.path().join("other-1.spill").exists());
    }
}
