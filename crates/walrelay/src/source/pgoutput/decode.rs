//! Decoding of pgoutput messages (logical replication protocol versions 1 and 2, as
//! PostgreSQL 15 sends them). Stateless: one message in, one typed message out. Every read is
//! checked, so arbitrary bytes give an error, never a panic.
//!
//! Between Stream Start and Stream Stop, the messages that belong to a transaction carry the
//! (sub)transaction id after their type byte; the caller says whether a stream is open.

use walrelay_model::{Lsn, Oid, PgTimestamp, Value, Xid};

use crate::pg::wire::Reader;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: Oid,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRelation {
    pub oid: Oid,
    pub schema: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RawColumn>,
}

/// The old tuple of an update or delete: key columns only (`K`) or the whole row (`O`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    Key(Vec<Value>),
    Full(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin {
        final_lsn: Lsn,
        commit_time: PgTimestamp,
        xid: Xid,
    },
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation {
        xid: Option<Xid>,
        relation: RawRelation,
    },
    Type {
        xid: Option<Xid>,
        oid: Oid,
        schema: String,
        name: String,
    },
    Insert {
        xid: Option<Xid>,
        relid: Oid,
        new: Vec<Value>,
    },
    Update {
        xid: Option<Xid>,
        relid: Oid,
        old: Option<OldTuple>,
        new: Vec<Value>,
    },
    Delete {
        xid: Option<Xid>,
        relid: Oid,
        old: OldTuple,
    },
    Truncate {
        xid: Option<Xid>,
        cascade: bool,
        restart_identity: bool,
        relids: Vec<Oid>,
    },
    Message {
        xid: Option<Xid>,
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    StreamStart {
        xid: Xid,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: Xid,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    StreamAbort {
        xid: Xid,
        subxid: Xid,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message type {0:?}")]
    UnknownType(char),
    #[error("truncated or malformed pgoutput {0} message")]
    Malformed(&'static str),
    #[error("pgoutput {message} message: unknown tuple marker {marker:?}")]
    TupleMarker { message: &'static str, marker: char },
    #[error(
        "pgoutput {0} message: a text value is not valid UTF-8 (walrelay needs a UTF8 database)"
    )]
    InvalidUtf8(&'static str),
    #[error("pgoutput {0} message has {1} trailing bytes")]
    Trailing(&'static str, usize),
}

/// Decode one pgoutput message. `in_stream`: a Stream Start has been seen without its Stream
/// Stop, so transactional messages carry a transaction id.
pub fn decode(data: &[u8], in_stream: bool) -> Result<PgOutputMessage, DecodeError> {
    let (&tag, body) = data.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader::new(body);
    let (name, msg) = match tag {
        b'B' => ("Begin", decode_begin(&mut r)),
        b'C' => ("Commit", decode_commit(&mut r)),
        b'O' => ("Origin", decode_origin(&mut r)),
        b'R' => ("Relation", decode_relation(&mut r, in_stream)),
        b'Y' => ("Type", decode_type(&mut r, in_stream)),
        b'I' => ("Insert", decode_insert(&mut r, in_stream)),
        b'U' => ("Update", decode_update(&mut r, in_stream)),
        b'D' => ("Delete", decode_delete(&mut r, in_stream)),
        b'T' => ("Truncate", decode_truncate(&mut r, in_stream)),
        b'M' => ("Message", decode_message(&mut r, in_stream)),
        b'S' => ("Stream Start", decode_stream_start(&mut r)),
        b'E' => ("Stream Stop", Ok(Some(PgOutputMessage::StreamStop))),
        b'c' => ("Stream Commit", decode_stream_commit(&mut r)),
        b'A' => ("Stream Abort", decode_stream_abort(&mut r)),
        other => return Err(DecodeError::UnknownType(other as char)),
    };
    let msg = msg
        .map_err(|e| e.named(name))?
        .ok_or(DecodeError::Malformed(name))?;
    if !r.is_empty() {
        return Err(DecodeError::Trailing(name, r.remaining()));
    }
    Ok(msg)
}

/// A failure inside one message kind, before it knows the kind's name.
enum Inner {
    Marker(u8),
    Utf8,
}

impl Inner {
    fn named(self, message: &'static str) -> DecodeError {
        match self {
            Inner::Marker(m) => DecodeError::TupleMarker {
                message,
                marker: m as char,
            },
            Inner::Utf8 => DecodeError::InvalidUtf8(message),
        }
    }
}

/// `Ok(None)`: the input ended early or a length was impossible.
type Step = Result<Option<PgOutputMessage>, Inner>;

fn lsn(r: &mut Reader<'_>) -> Option<Lsn> {
    r.u64().map(Lsn)
}

fn time(r: &mut Reader<'_>) -> Option<PgTimestamp> {
    r.i64().map(PgTimestamp)
}

fn stream_xid(r: &mut Reader<'_>, in_stream: bool) -> Option<Option<Xid>> {
    if in_stream {
        r.u32().map(Some)
    } else {
        Some(None)
    }
}

fn string(r: &mut Reader<'_>) -> Option<String> {
    r.cstr().map(str::to_string)
}

fn decode_begin(r: &mut Reader<'_>) -> Step {
    let m = (|| {
        Some(PgOutputMessage::Begin {
            final_lsn: lsn(r)?,
            commit_time: time(r)?,
            xid: r.u32()?,
        })
    })();
    Ok(m)
}

fn decode_commit(r: &mut Reader<'_>) -> Step {
    let m = (|| {
        let _flags = r.u8()?;
        Some(PgOutputMessage::Commit {
            commit_lsn: lsn(r)?,
            end_lsn: lsn(r)?,
            commit_time: time(r)?,
        })
    })();
    Ok(m)
}

fn decode_origin(r: &mut Reader<'_>) -> Step {
    let m = (|| {
        Some(PgOutputMessage::Origin {
            commit_lsn: lsn(r)?,
            name: string(r)?,
        })
    })();
    Ok(m)
}

fn decode_relation(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let m = (|| {
        let xid = stream_xid(r, in_stream)?;
        let oid = r.u32()?;
        let schema = string(r)?;
        let name = string(r)?;
        let replica_identity = r.u8()?;
        let ncols = usize::try_from(r.i16()?).ok()?;
        // Each column takes at least 10 bytes; do not trust the count for the allocation.
        let mut columns = Vec::with_capacity(ncols.min(r.remaining() / 10));
        for _ in 0..ncols {
            let flags = r.u8()?;
            columns.push(RawColumn {
                is_key: flags & 1 != 0,
                name: string(r)?,
                type_oid: r.u32()?,
                type_modifier: r.i32()?,
            });
        }
        Some(PgOutputMessage::Relation {
            xid,
            relation: RawRelation {
                oid,
                schema,
                name,
                replica_identity,
                columns,
            },
        })
    })();
    Ok(m)
}

fn decode_type(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let m = (|| {
        Some(PgOutputMessage::Type {
            xid: stream_xid(r, in_stream)?,
            oid: r.u32()?,
            schema: string(r)?,
            name: string(r)?,
        })
    })();
    Ok(m)
}

/// TupleData: a column count, then per column `n` (null), `u` (unchanged TOAST),
/// `t` (text) or `b` (binary) with a length and the bytes.
fn tuple(r: &mut Reader<'_>) -> Result<Option<Vec<Value>>, Inner> {
    let Some(n) = r.i16().and_then(|n| usize::try_from(n).ok()) else {
        return Ok(None);
    };
    let mut values = Vec::with_capacity(n.min(r.remaining()));
    for _ in 0..n {
        let Some(kind) = r.u8() else { return Ok(None) };
        let value = match kind {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' | b'b' => {
                let Some(bytes) = r
                    .i32()
                    .and_then(|l| usize::try_from(l).ok())
                    .and_then(|l| r.bytes(l))
                else {
                    return Ok(None);
                };
                if kind == b't' {
                    let s = std::str::from_utf8(bytes).map_err(|_| Inner::Utf8)?;
                    Value::Text(s.to_string())
                } else {
                    Value::Binary(bytes.to_vec())
                }
            }
            other => return Err(Inner::Marker(other)),
        };
        values.push(value);
    }
    Ok(Some(values))
}

macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

fn decode_insert(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let xid = need!(stream_xid(r, in_stream));
    let relid = need!(r.u32());
    match r.u8() {
        Some(b'N') => {}
        Some(other) => return Err(Inner::Marker(other)),
        None => return Ok(None),
    }
    let new = need!(tuple(r)?);
    Ok(Some(PgOutputMessage::Insert { xid, relid, new }))
}

fn decode_update(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let xid = need!(stream_xid(r, in_stream));
    let relid = need!(r.u32());
    let mut marker = need!(r.u8());
    let old = match marker {
        b'K' | b'O' => {
            let values = need!(tuple(r)?);
            let old = if marker == b'K' {
                OldTuple::Key(values)
            } else {
                OldTuple::Full(values)
            };
            marker = need!(r.u8());
            Some(old)
        }
        _ => None,
    };
    if marker != b'N' {
        return Err(Inner::Marker(marker));
    }
    let new = need!(tuple(r)?);
    Ok(Some(PgOutputMessage::Update {
        xid,
        relid,
        old,
        new,
    }))
}

fn decode_delete(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let xid = need!(stream_xid(r, in_stream));
    let relid = need!(r.u32());
    let marker = need!(r.u8());
    let values = need!(tuple(r)?);
    let old = match marker {
        b'K' => OldTuple::Key(values),
        b'O' => OldTuple::Full(values),
        other => return Err(Inner::Marker(other)),
    };
    Ok(Some(PgOutputMessage::Delete { xid, relid, old }))
}

fn decode_truncate(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let m = (|| {
        let xid = stream_xid(r, in_stream)?;
        let n = usize::try_from(r.i32()?).ok()?;
        let options = r.u8()?;
        let mut relids = Vec::with_capacity(n.min(r.remaining() / 4));
        for _ in 0..n {
            relids.push(r.u32()?);
        }
        Some(PgOutputMessage::Truncate {
            xid,
            cascade: options & 1 != 0,
            restart_identity: options & 2 != 0,
            relids,
        })
    })();
    Ok(m)
}

fn decode_message(r: &mut Reader<'_>, in_stream: bool) -> Step {
    let m = (|| {
        let xid = stream_xid(r, in_stream)?;
        let flags = r.u8()?;
        let lsn = lsn(r)?;
        let prefix = string(r)?;
        let len = usize::try_from(r.i32()?).ok()?;
        let content = r.bytes(len)?.to_vec();
        Some(PgOutputMessage::Message {
            xid,
            transactional: flags & 1 != 0,
            lsn,
            prefix,
            content,
        })
    })();
    Ok(m)
}

fn decode_stream_start(r: &mut Reader<'_>) -> Step {
    let m = (|| {
        Some(PgOutputMessage::StreamStart {
            xid: r.u32()?,
            first_segment: r.u8()? == 1,
        })
    })();
    Ok(m)
}

fn decode_stream_commit(r: &mut Reader<'_>) -> Step {
    let m = (|| {
        let xid = r.u32()?;
        let _flags = r.u8()?;
        Some(PgOutputMessage::StreamCommit {
            xid,
            commit_lsn: lsn(r)?,
            end_lsn: lsn(r)?,
            commit_time: time(r)?,
        })
    })();
    Ok(m)
}

fn decode_stream_abort(r: &mut Reader<'_>) -> Step {
    let m = (|| {
        Some(PgOutputMessage::StreamAbort {
            xid: r.u32()?,
            subxid: r.u32()?,
        })
    })();
    Ok(m)
}

#[cfg(test)]
mod tests;
