//! The walrelay event JSON (one object per line), documented in `docs/events.md`.
//!
//! Values keep PostgreSQL's text form exactly: integers and booleans become JSON numbers and
//! booleans, everything else a JSON string (numeric, floats with NaN and Infinity, json,
//! bytea as `\x...`), so nothing is rounded or reformatted.

use std::io::Write as _;

use base64::Engine as _;
use walrelay_model::{Change, Column, Event, OldRow, Position, Relation, Row, TxnBegin, Value};

/// Turns events into lines. It remembers the open transaction so that each change line
/// carries the transaction's id and commit time.
#[derive(Default)]
pub struct JsonEncoder {
    txn: Option<TxnBegin>,
}

impl JsonEncoder {
    /// Append the line for `event` (with its newline) to `out`. Returns the event's position,
    /// or `None` for events that make no line (keepalives).
    pub fn encode(&mut self, event: &Event, out: &mut Vec<u8>) -> Option<Position> {
        // Keepalives and the parts of streamed transactions have no position and no line:
        // a consumer of this format gets streamed transactions whole, at their commit.
        let pos = event.position()?;
        match event {
            Event::Begin(b) => {
                self.txn = Some(b.clone());
                head(out, "begin", pos);
                field_u64(out, "xid", u64::from(b.xid));
                field_str(out, "commit_time", &b.commit_time.to_string());
                key(out, "origin");
                match &b.origin {
                    Some(o) => string(out, o),
                    None => out.extend_from_slice(b"null"),
                }
            }
            Event::Commit(c) => {
                head(out, "commit", pos);
                field_u64(out, "xid", u64::from(c.xid));
                field_str(out, "commit_time", &c.commit_time.to_string());
                field_str(out, "end_lsn", &c.end_lsn.to_string());
                self.txn = None;
            }
            Event::Message(m) => {
                head(out, "message", pos);
                out.extend_from_slice(b",\"transactional\":false");
                message_body(out, &m.prefix, &m.content);
            }
            Event::Keepalive(_)
            | Event::StreamChange { .. }
            | Event::StreamAbort { .. }
            | Event::StreamCommit { .. } => return None,
            Event::Read { relation, row, .. } => {
                head(out, "read", pos);
                table(out, relation);
                row_field(out, "new", relation, row, false);
            }
            Event::SnapshotEnd { rows, .. } => {
                head(out, "snapshot_end", pos);
                field_u64(out, "rows", *rows);
            }
            Event::Change { change, .. } => {
                let kind = match change {
                    Change::Insert { .. } => "insert",
                    Change::Update { .. } => "update",
                    Change::Delete { .. } => "delete",
                    Change::Truncate { .. } => "truncate",
                    Change::Message { .. } => "message",
                    Change::Ddl(_) => "ddl",
                };
                head(out, kind, pos);
                if let Some(t) = &self.txn {
                    field_u64(out, "xid", u64::from(t.xid));
                    field_str(out, "commit_time", &t.commit_time.to_string());
                }
                match change {
                    Change::Insert { relation, new } => {
                        table(out, relation);
                        row_field(out, "new", relation, new, false);
                    }
                    Change::Update { relation, old, new } => {
                        table(out, relation);
                        if let Some(old) = old {
                            old_field(out, relation, old);
                        }
                        row_field(out, "new", relation, new, false);
                    }
                    Change::Delete { relation, old } => {
                        table(out, relation);
                        old_field(out, relation, old);
                    }
                    Change::Truncate {
                        relations,
                        cascade,
                        restart_identity,
                    } => {
                        key(out, "tables");
                        out.push(b'[');
                        for (i, r) in relations.iter().enumerate() {
                            if i > 0 {
                                out.push(b',');
                            }
                            out.extend_from_slice(b"{\"schema\":");
                            string(out, &r.schema);
                            out.extend_from_slice(b",\"table\":");
                            string(out, &r.name);
                            out.push(b'}');
                        }
                        out.push(b']');
                        let _ = write!(
                            out,
                            ",\"cascade\":{cascade},\"restart_identity\":{restart_identity}"
                        );
                    }
                    Change::Message { prefix, content } => {
                        out.extend_from_slice(b",\"transactional\":true");
                        message_body(out, prefix, content);
                    }
                    Change::Ddl(ddl) => ddl_body(out, ddl),
                }
            }
        }
        end(out);
        Some(pos)
    }
}

fn head(out: &mut Vec<u8>, kind: &str, pos: Position) {
    out.extend_from_slice(b"{\"kind\":\"");
    out.extend_from_slice(kind.as_bytes());
    let _ = write!(out, "\",\"lsn\":\"{}\",\"seq\":{}", pos.commit_lsn, pos.seq);
}

fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"}\n");
}

fn key(out: &mut Vec<u8>, k: &str) {
    out.push(b',');
    string(out, k);
    out.push(b':');
}

fn field_str(out: &mut Vec<u8>, k: &str, v: &str) {
    key(out, k);
    string(out, v);
}

fn field_u64(out: &mut Vec<u8>, k: &str, v: u64) {
    key(out, k);
    let _ = write!(out, "{v}");
}

/// A JSON string.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A schema change: the command as the source ran it and its tables' shapes after it.
fn ddl_body(out: &mut Vec<u8>, ddl: &walrelay_model::Ddl) {
    field_str(out, "tag", &ddl.tag);
    field_str(out, "statement", &ddl.statement);
    field_str(out, "search_path", &ddl.search_path);
    let tables: Vec<serde_json::Value> = ddl
        .tables
        .iter()
        .map(|t| {
            serde_json::json!({
                "schema": t.schema,
                "table": t.name,
                "action": t.action.as_str(),
                "set": t.set,
                "columns": t.columns.iter().map(|c| serde_json::json!({
                    "name": c.name, "type": c.type_name, "nullable": c.nullable,
                })).collect::<Vec<_>>(),
                "primary_key": t.primary_key,
            })
        })
        .collect();
    let rest = serde_json::json!({
        "role": ddl.role,
        "tables": tables,
        "unsafe_reason": ddl.unsafe_reason,
    });
    if let serde_json::Value::Object(fields) = rest {
        for (k, v) in fields {
            key(out, &k);
            // Writing a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &v);
        }
    }
}

fn message_body(out: &mut Vec<u8>, prefix: &str, content: &[u8]) {
    field_str(out, "prefix", prefix);
    match std::str::from_utf8(content) {
        Ok(text) => field_str(out, "content", text),
        Err(_) => field_str(
            out,
            "content_base64",
            &base64::engine::general_purpose::STANDARD.encode(content),
        ),
    }
}

/// `"schema"`, `"table"`, `"types"` (every column's type) and `"key"` (identity columns).
fn table(out: &mut Vec<u8>, rel: &Relation) {
    field_str(out, "schema", &rel.schema);
    field_str(out, "table", &rel.name);
    key(out, "types");
    out.push(b'{');
    for (i, c) in rel.columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, &c.name);
        out.push(b':');
        string(out, &c.type_name);
    }
    out.push(b'}');
    key(out, "key");
    out.push(b'[');
    for (i, (_, c)) in rel.key_columns().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, &c.name);
    }
    out.push(b']');
}

fn old_field(out: &mut Vec<u8>, rel: &Relation, old: &OldRow) {
    match old {
        OldRow::Key(row) => {
            field_str(out, "old_kind", "key");
            row_field(out, "old", rel, row, true);
        }
        OldRow::Full(row) => {
            field_str(out, "old_kind", "row");
            row_field(out, "old", rel, row, false);
        }
    }
}

/// An object of column name to value. Unchanged TOAST values are left out of it and listed
/// in `"<name>_unchanged_toast"` (`unchanged_toast` for the new row), so that applying the
/// object as-is leaves them untouched.
fn row_field(out: &mut Vec<u8>, name: &str, rel: &Relation, row: &Row, key_only: bool) {
    let columns: Vec<&Column> = if key_only {
        rel.key_columns().map(|(_, c)| c).collect()
    } else {
        rel.columns.iter().collect()
    };
    key(out, name);
    let unchanged = row_object(out, &columns, row);
    if !unchanged.is_empty() {
        let list_name = if name == "new" {
            "unchanged_toast".to_string()
        } else {
            format!("{name}_unchanged_toast")
        };
        key(out, &list_name);
        let _ = serde_json::to_writer(&mut *out, &unchanged);
    }
}

/// `{"column": value, ...}` of `row` over `columns`, leaving out unchanged TOAST values;
/// returns the names of those left out.
pub(crate) fn row_object<'a>(out: &mut Vec<u8>, columns: &[&'a Column], row: &Row) -> Vec<&'a str> {
    out.push(b'{');
    let mut first = true;
    let mut unchanged = Vec::new();
    for (c, v) in columns.iter().zip(&row.0) {
        if *v == Value::UnchangedToast {
            unchanged.push(c.name.as_str());
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        string(out, &c.name);
        out.push(b':');
        value(out, c, v);
    }
    out.push(b'}');
    unchanged
}

const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;

fn value(out: &mut Vec<u8>, column: &Column, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        // Left out by the caller; kept here so that every value has a form.
        Value::UnchangedToast => out.extend_from_slice(b"{\"unchanged_toast\":true}"),
        Value::Binary(b) => {
            let mut hex = String::with_capacity(2 + 2 * b.len());
            hex.push_str("\\x");
            for byte in b {
                hex.push_str(&format!("{byte:02x}"));
            }
            string(out, &hex);
        }
        Value::Text(t) => match column.type_oid {
            INT2 | INT4 | INT8 | OID if is_integer(t) => out.extend_from_slice(t.as_bytes()),
            BOOL if t == "t" => out.extend_from_slice(b"true"),
            BOOL if t == "f" => out.extend_from_slice(b"false"),
            _ => string(out, t),
        },
    }
}

fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The position written in a line (for a file sink resuming after a restart).
pub fn line_position(line: &[u8]) -> Option<Position> {
    line_head(line).map(|(position, _)| position)
}

/// The position and kind of an event line.
pub fn line_head(line: &[u8]) -> Option<(Position, String)> {
    #[derive(serde::Deserialize)]
    struct Head {
        kind: String,
        lsn: walrelay_model::Lsn,
        seq: u64,
    }
    let h: Head = serde_json::from_slice(line).ok()?;
    Some((Position::new(h.lsn, h.seq), h.kind))
}

#[cfg(test)]
mod tests;
