//! walrelay event JSON read back into events, for `walrelay consume`: the inverse of
//! `format::json`, close enough for the postgres sink to apply what it reads exactly as it
//! applies the source's own events.
//!
//! A line names its table and carries every column's type and the key, so a relation is
//! rebuilt from the line itself; equal descriptions share one `Arc<Relation>` (the sink
//! caches its statements per relation).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value as J};
use walrelay_model::{
    Change, Column, Event, Lsn, NonTxnMessage, OldRow, PgTimestamp, Position, Relation,
    ReplicaIdentity, Row, TxnBegin, TxnCommit, Value,
};

#[derive(Default)]
pub struct EventParser {
    relations: HashMap<String, Arc<Relation>>,
}

impl EventParser {
    /// The event of one line (without its newline).
    pub fn parse_line(&mut self, line: &[u8]) -> Result<Event, String> {
        let v: J = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
        let o = v.as_object().ok_or("not a JSON object")?;
        let kind = text(o, "kind")?;
        let lsn: Lsn = text(o, "lsn")?
            .parse()
            .map_err(|_| "`lsn` is not an LSN".to_string())?;
        let seq = o.get("seq").and_then(J::as_u64).ok_or("`seq` is missing")?;
        let position = Position::new(lsn, seq);
        Ok(match kind {
            "begin" => Event::Begin(TxnBegin {
                xid: xid(o)?,
                commit_lsn: lsn,
                commit_time: time(o)?,
                origin: o.get("origin").and_then(J::as_str).map(str::to_string),
            }),
            "commit" => Event::Commit(TxnCommit {
                xid: xid(o)?,
                commit_lsn: lsn,
                end_lsn: text(o, "end_lsn")?
                    .parse()
                    .map_err(|_| "`end_lsn` is not an LSN".to_string())?,
                commit_time: time(o)?,
                seq,
            }),
            "insert" => {
                let relation = self.relation(o)?;
                let new = row(o, "new", &relation, false)?;
                Event::Change {
                    position,
                    change: Change::Insert { relation, new },
                }
            }
            "update" => {
                let relation = self.relation(o)?;
                let old = old_row(o, &relation)?;
                let new = row(o, "new", &relation, false)?;
                Event::Change {
                    position,
                    change: Change::Update { relation, old, new },
                }
            }
            "delete" => {
                let relation = self.relation(o)?;
                let old = old_row(o, &relation)?.ok_or("a delete without `old`")?;
                Event::Change {
                    position,
                    change: Change::Delete { relation, old },
                }
            }
            "truncate" => {
                let tables = o
                    .get("tables")
                    .and_then(J::as_array)
                    .ok_or("`tables` is missing")?;
                let mut relations = Vec::new();
                for t in tables {
                    let t = t.as_object().ok_or("a `tables` entry is not an object")?;
                    relations.push(self.shared(Relation {
                        oid: 0,
                        schema: text(t, "schema")?.to_string(),
                        name: text(t, "table")?.to_string(),
                        replica_identity: ReplicaIdentity::Default,
                        columns: Vec::new(),
                    }));
                }
                Event::Change {
                    position,
                    change: Change::Truncate {
                        relations,
                        cascade: o.get("cascade").and_then(J::as_bool).unwrap_or(false),
                        restart_identity: o
                            .get("restart_identity")
                            .and_then(J::as_bool)
                            .unwrap_or(false),
                    },
                }
            }
            "message" => {
                let prefix = text(o, "prefix")?.to_string();
                let content = match o.get("content").and_then(J::as_str) {
                    Some(c) => c.as_bytes().to_vec(),
                    None => {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD
                            .decode(text(o, "content_base64")?)
                            .map_err(|_| "`content_base64` is not base64".to_string())?
                    }
                };
                if o.get("transactional").and_then(J::as_bool) == Some(true) {
                    Event::Change {
                        position,
                        change: Change::Message { prefix, content },
                    }
                } else {
                    Event::Message(NonTxnMessage {
                        lsn,
                        prefix,
                        content,
                    })
                }
            }
            "ddl" => Event::Change {
                position,
                change: Change::Ddl(Box::new(ddl(o)?)),
            },
            "read" => {
                let relation = self.relation(o)?;
                let row = row(o, "new", &relation, false)?;
                Event::Read {
                    position,
                    relation,
                    row,
                }
            }
            "snapshot_end" => Event::SnapshotEnd {
                position,
                rows: o.get("rows").and_then(J::as_u64).unwrap_or(0),
            },
            other => return Err(format!("unknown event kind {other:?}")),
        })
    }

    /// The relation a change line describes: `schema`, `table`, `types` (in column order)
    /// and `key`.
    fn relation(&mut self, o: &Map<String, J>) -> Result<Arc<Relation>, String> {
        let types = o
            .get("types")
            .and_then(J::as_object)
            .ok_or("`types` is missing")?;
        let key: Vec<&str> = o
            .get("key")
            .and_then(J::as_array)
            .ok_or("`key` is missing")?
            .iter()
            .filter_map(J::as_str)
            .collect();
        let mut columns = Vec::with_capacity(types.len());
        for (name, ty) in types {
            let type_name = ty.as_str().ok_or("a type is not a string")?;
            columns.push(Column {
                name: name.clone(),
                type_oid: builtin_oid(type_name),
                type_modifier: -1,
                type_name: type_name.to_string(),
                is_key: key.contains(&name.as_str()),
            });
        }
        let full = !columns.is_empty() && columns.iter().all(|c| c.is_key);
        Ok(self.shared(Relation {
            oid: 0,
            schema: text(o, "schema")?.to_string(),
            name: text(o, "table")?.to_string(),
            replica_identity: if full {
                ReplicaIdentity::Full
            } else {
                ReplicaIdentity::Default
            },
            columns,
        }))
    }

    fn shared(&mut self, relation: Relation) -> Arc<Relation> {
        let mut id = format!("{}\0{}", relation.schema, relation.name);
        for c in &relation.columns {
            id.push_str(&format!("\0{}:{}:{}", c.name, c.type_name, c.is_key));
        }
        self.relations
            .entry(id)
            .or_insert_with(|| Arc::new(relation))
            .clone()
    }
}

fn text<'a>(o: &'a Map<String, J>, key: &str) -> Result<&'a str, String> {
    o.get(key)
        .and_then(J::as_str)
        .ok_or_else(|| format!("`{key}` is missing or not a string"))
}

fn xid(o: &Map<String, J>) -> Result<u32, String> {
    o.get("xid")
        .and_then(J::as_u64)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| "`xid` is missing".to_string())
}

fn time(o: &Map<String, J>) -> Result<PgTimestamp, String> {
    let t = chrono::DateTime::parse_from_rfc3339(text(o, "commit_time")?)
        .map_err(|_| "`commit_time` is not RFC 3339".to_string())?;
    Ok(PgTimestamp::from_unix_micros(t.timestamp_micros()))
}

/// The values of `field` in the relation's column order (its key columns only, for an old
/// key); a column left out and listed as unchanged TOAST stays unchanged.
fn row(
    o: &Map<String, J>,
    field: &str,
    relation: &Relation,
    key_only: bool,
) -> Result<Row, String> {
    let values = o
        .get(field)
        .and_then(J::as_object)
        .ok_or_else(|| format!("`{field}` is missing"))?;
    let unchanged_field = if field == "new" {
        "unchanged_toast".to_string()
    } else {
        format!("{field}_unchanged_toast")
    };
    let unchanged: Vec<&str> = o
        .get(&unchanged_field)
        .and_then(J::as_array)
        .map(|a| a.iter().filter_map(J::as_str).collect())
        .unwrap_or_default();
    let mut row = Vec::with_capacity(relation.columns.len());
    for c in relation.columns.iter().filter(|c| !key_only || c.is_key) {
        row.push(match values.get(&c.name) {
            None if unchanged.contains(&c.name.as_str()) => Value::UnchangedToast,
            None => return Err(format!("`{field}` has no column {:?}", c.name)),
            Some(J::Null) => Value::Null,
            Some(J::String(s)) => Value::Text(s.clone()),
            Some(J::Bool(b)) => Value::Text(if *b { "t" } else { "f" }.into()),
            Some(J::Number(n)) => Value::Text(n.to_string()),
            Some(other) => {
                return Err(format!(
                    "column {:?} has a value walrelay does not write: {other}",
                    c.name
                ))
            }
        });
    }
    Ok(Row(row))
}

fn old_row(o: &Map<String, J>, relation: &Relation) -> Result<Option<OldRow>, String> {
    match o.get("old_kind").and_then(J::as_str) {
        None => Ok(None),
        Some("key") => Ok(Some(OldRow::Key(row(o, "old", relation, true)?))),
        Some("row") => Ok(Some(OldRow::Full(row(o, "old", relation, false)?))),
        Some(other) => Err(format!("unknown `old_kind` {other:?}")),
    }
}

/// The OIDs of the types whose values the JSON writes as numbers and booleans, so that the
/// line written again comes out the same; other types need no OID to be applied.
fn builtin_oid(type_name: &str) -> u32 {
    match type_name {
        "bool" => 16,
        "int8" => 20,
        "int2" => 21,
        "int4" => 23,
        "oid" => 26,
        _ => 0,
    }
}

/// A `ddl` event's fields.
fn ddl(o: &serde_json::Map<String, J>) -> Result<walrelay_model::Ddl, String> {
    use walrelay_model::{DdlAction, DdlColumn, DdlTable};
    let strings = |v: Option<&J>| -> Vec<String> {
        v.and_then(J::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut tables = Vec::new();
    for t in o.get("tables").and_then(J::as_array).into_iter().flatten() {
        let t = t.as_object().ok_or("a ddl table is not an object")?;
        let action = match text(t, "action")? {
            "create" => DdlAction::Create,
            "drop" => DdlAction::Drop,
            _ => DdlAction::Alter,
        };
        let mut columns = Vec::new();
        for c in t.get("columns").and_then(J::as_array).into_iter().flatten() {
            let c = c.as_object().ok_or("a ddl column is not an object")?;
            columns.push(DdlColumn {
                name: text(c, "name")?.to_string(),
                type_name: text(c, "type")?.to_string(),
                nullable: c.get("nullable").and_then(J::as_bool).unwrap_or(true),
            });
        }
        tables.push(DdlTable {
            schema: text(t, "schema")?.to_string(),
            name: text(t, "table")?.to_string(),
            action,
            set: t.get("set").and_then(J::as_str).map(str::to_string),
            columns,
            primary_key: strings(t.get("primary_key")),
        });
    }
    Ok(walrelay_model::Ddl {
        tag: text(o, "tag")?.to_string(),
        statement: text(o, "statement")?.to_string(),
        search_path: text(o, "search_path")?.to_string(),
        role: o.get("role").and_then(J::as_str).map(str::to_string),
        tables,
        unsafe_reason: o
            .get("unsafe_reason")
            .and_then(J::as_str)
            .map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::json::JsonEncoder;

    /// Lines walrelay writes read back into the same events, and write the same lines.
    #[test]
    fn lines_read_back_as_the_events_they_came_from() {
        let lines = [
            r#"{"kind":"begin","lsn":"0/1A2B3C8","seq":0,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","origin":null}"#,
            r#"{"kind":"insert","lsn":"0/1A2B3C8","seq":1,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","schema":"public","table":"orders","types":{"id":"int4","ok":"bool","state":"text"},"key":["id"],"new":{"id":1,"ok":true,"state":null}}"#,
            r#"{"kind":"update","lsn":"0/1A2B3C8","seq":2,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","schema":"public","table":"orders","types":{"id":"int4","ok":"bool","state":"text"},"key":["id"],"old_kind":"key","old":{"id":1},"new":{"id":2,"ok":false},"unchanged_toast":["state"]}"#,
            r#"{"kind":"delete","lsn":"0/1A2B3C8","seq":3,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","schema":"public","table":"orders","types":{"id":"int4","ok":"bool","state":"text"},"key":["id"],"old_kind":"key","old":{"id":2}}"#,
            r#"{"kind":"truncate","lsn":"0/1A2B3C8","seq":4,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","tables":[{"schema":"public","table":"orders"}],"cascade":false,"restart_identity":true}"#,
            r#"{"kind":"ddl","lsn":"0/1A2B3C8","seq":5,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","tag":"ALTER TABLE","statement":"ALTER TABLE orders ADD note text","search_path":"\"$user\", public","role":"app","tables":[{"action":"alter","columns":[{"name":"id","nullable":false,"type":"integer"},{"name":"note","nullable":true,"type":"text"}],"primary_key":["id"],"schema":"public","set":"default","table":"orders"}],"unsafe_reason":null}"#,
            r#"{"kind":"commit","lsn":"0/1A2B3C8","seq":6,"xid":750,"commit_time":"2026-11-21T16:20:00.123456Z","end_lsn":"0/1A2B3F8"}"#,
            r#"{"kind":"message","lsn":"0/1A2E000","seq":0,"transactional":false,"prefix":"marker","content_base64":"/wA="}"#,
            r#"{"kind":"read","lsn":"0/1A00028","seq":1,"schema":"public","table":"orders","types":{"id":"int4","ok":"bool","state":"text"},"key":["id"],"new":{"id":7,"ok":true,"state":"x"}}"#,
            r#"{"kind":"snapshot_end","lsn":"0/1A00028","seq":2,"rows":1}"#,
        ];
        let mut parser = EventParser::default();
        let mut encoder = JsonEncoder::default();
        let mut relations = Vec::new();
        for line in lines {
            let event = parser.parse_line(line.as_bytes()).unwrap();
            if let Event::Change {
                change: Change::Insert { relation, .. },
                ..
            } = &event
            {
                relations.push(relation.clone());
            }
            if let Event::Read { relation, .. } = &event {
                relations.push(relation.clone());
            }
            let mut out = Vec::new();
            encoder.encode(&event, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{line}\n"));
        }
        assert!(
            Arc::ptr_eq(&relations[0], &relations[1]),
            "one relation, shared"
        );
    }

    #[test]
    fn malformed_lines_are_errors_that_say_what_is_wrong() {
        let mut parser = EventParser::default();
        for (line, expected) in [
            ("not json", "not JSON"),
            (r#"{"kind":"begin","lsn":"x","seq":0}"#, "not an LSN"),
            (
                r#"{"kind":"warp","lsn":"0/1","seq":0}"#,
                "unknown event kind",
            ),
            (
                r#"{"kind":"insert","lsn":"0/1","seq":1,"schema":"s","table":"t","types":{"a":"int4"},"key":["a"],"new":{}}"#,
                "no column",
            ),
        ] {
            let e = parser.parse_line(line.as_bytes()).unwrap_err();
            assert!(e.contains(expected), "{line}: {e}");
        }
    }
}
