//! Debezium's PostgreSQL change-event envelope (the `payload` of its JSON converter with
//! `schemas.enable=false`): `before`, `after`, `source`, `op`, `ts_ms`, `transaction`.
//!
//! Ops: `c` insert, `u` update, `d` delete, `t` truncate (one event per table), `r` a
//! snapshot row. Values are as in walrelay's own format (docs/events.md): integers and
//! booleans as JSON numbers and booleans, everything else PostgreSQL's text — which is
//! Debezium's output with `decimal.handling.mode=string` and `time.precision.mode=connect`
//! left aside: temporal values stay ISO text rather than epoch numbers. Transaction
//! boundaries, snapshot ends and non-transactional messages have no envelope and are not
//! published in this format.

use std::io::Write as _;

use walrelay_model::{Change, Column, Event, Lsn, OldRow, PgTimestamp, Relation, Row, TxnBegin};

use super::json::{row_object, string as json_string};

/// One envelope: its routing fields and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub schema: String,
    pub table: String,
    /// `c`, `u`, `d`, `t` or `r`.
    pub op: &'static str,
    pub body: Vec<u8>,
}

/// Turns events into envelopes; remembers the open transaction for `source`.
pub struct DebeziumEncoder {
    /// `source.name`: the logical name of the source server.
    server: String,
    database: String,
    txn: Option<TxnBegin>,
}

impl DebeziumEncoder {
    pub fn new(server: &str, database: &str) -> Self {
        DebeziumEncoder {
            server: server.to_string(),
            database: database.to_string(),
            txn: None,
        }
    }

    /// The envelopes of `event` (none for events Debezium has no envelope for).
    pub fn encode(&mut self, event: &Event) -> Vec<Envelope> {
        match event {
            Event::Begin(b) => {
                self.txn = Some(b.clone());
                Vec::new()
            }
            Event::Commit(_) => {
                self.txn = None;
                Vec::new()
            }
            Event::Read {
                position,
                relation,
                row,
            } => vec![self.envelope(relation, "r", None, Some(row), position.commit_lsn)],
            Event::Change { position, change } => match change {
                Change::Insert { relation, new } => {
                    vec![self.envelope(relation, "c", None, Some(new), position.commit_lsn)]
                }
                Change::Update { relation, old, new } => {
                    vec![self.envelope(relation, "u", old.as_ref(), Some(new), position.commit_lsn)]
                }
                Change::Delete { relation, old } => {
                    vec![self.envelope(relation, "d", Some(old), None, position.commit_lsn)]
                }
                Change::Truncate { relations, .. } => relations
                    .iter()
                    .map(|r| self.envelope(r, "t", None, None, position.commit_lsn))
                    .collect(),
                Change::Message { .. } => Vec::new(),
                Change::Ddl(ddl) => vec![self.schema_change(ddl, position.commit_lsn)],
            },
            _ => Vec::new(),
        }
    }

    /// Debezium's schema change event: `ddl`, and `tableChanges` with each table's shape
    /// after it. Published with op `ddl`, to the first table's routing key.
    fn schema_change(&self, ddl: &walrelay_model::Ddl, lsn: Lsn) -> Envelope {
        let ts_ms = match &self.txn {
            Some(t) => t.commit_time.unix_millis(),
            None => PgTimestamp::now().unix_millis(),
        };
        let changes: Vec<serde_json::Value> = ddl
            .tables
            .iter()
            .map(|t| {
                let columns: Vec<serde_json::Value> = t
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        serde_json::json!({
                            "name": c.name,
                            "typeName": c.type_name,
                            "optional": c.nullable,
                            "position": i + 1,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "type": t.action.as_str().to_ascii_uppercase(),
                    "id": format!("\"{}\".\"{}\".\"{}\"", self.database, t.schema, t.name),
                    "table": if t.action == walrelay_model::DdlAction::Drop {
                        serde_json::Value::Null
                    } else {
                        serde_json::json!({
                            "primaryKeyColumnNames": t.primary_key,
                            "columns": columns,
                        })
                    },
                })
            })
            .collect();
        let first = ddl.tables.first();
        let body = serde_json::json!({
            "source": {
                "version": concat!("walrelay-", env!("CARGO_PKG_VERSION")),
                "connector": "postgresql",
                "name": self.server,
                "ts_ms": ts_ms,
                "db": self.database,
                "schema": first.map(|t| t.schema.as_str()),
                "table": first.map(|t| t.name.as_str()),
                "lsn": lsn.0,
            },
            "ts_ms": ts_ms,
            "databaseName": self.database,
            "schemaName": first.map(|t| t.schema.as_str()),
            "ddl": ddl.statement,
            "tableChanges": changes,
        });
        Envelope {
            schema: first.map(|t| t.schema.clone()).unwrap_or_default(),
            table: first.map(|t| t.name.clone()).unwrap_or_default(),
            op: "ddl",
            body: serde_json::to_vec(&body).expect("a JSON value serializes"),
        }
    }

    fn envelope(
        &self,
        relation: &Relation,
        op: &'static str,
        old: Option<&OldRow>,
        new: Option<&Row>,
        lsn: Lsn,
    ) -> Envelope {
        let mut out = Vec::with_capacity(256);
        let columns: Vec<&Column> = relation.columns.iter().collect();
        out.extend_from_slice(b"{\"before\":");
        match old {
            Some(OldRow::Full(row)) => {
                row_object(&mut out, &columns, row);
            }
            Some(OldRow::Key(row)) => {
                let keys: Vec<&Column> = relation.key_columns().map(|(_, c)| c).collect();
                row_object(&mut out, &keys, row);
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"after\":");
        match new {
            Some(row) => {
                row_object(&mut out, &columns, row);
            }
            None => out.extend_from_slice(b"null"),
        }
        let (ts_ms, xid) = match &self.txn {
            Some(t) => (t.commit_time.unix_millis(), Some(t.xid)),
            None => (PgTimestamp::now().unix_millis(), None),
        };
        out.extend_from_slice(b",\"source\":{\"version\":");
        json_string(&mut out, concat!("walrelay-", env!("CARGO_PKG_VERSION")));
        out.extend_from_slice(b",\"connector\":\"postgresql\",\"name\":");
        json_string(&mut out, &self.server);
        let _ = write!(out, ",\"ts_ms\":{ts_ms},\"snapshot\":");
        out.extend_from_slice(if op == "r" { b"\"true\"" } else { b"\"false\"" });
        out.extend_from_slice(b",\"db\":");
        json_string(&mut out, &self.database);
        out.extend_from_slice(b",\"schema\":");
        json_string(&mut out, &relation.schema);
        out.extend_from_slice(b",\"table\":");
        json_string(&mut out, &relation.name);
        match xid {
            Some(x) => {
                let _ = write!(out, ",\"txId\":{}", u64::from(x));
            }
            None => out.extend_from_slice(b",\"txId\":null"),
        }
        let _ = write!(
            out,
            ",\"lsn\":{},\"xmin\":null}},\"op\":\"{op}\",\"ts_ms\":{},\"transaction\":null}}",
            lsn.0,
            PgTimestamp::now().unix_millis()
        );
        Envelope {
            schema: relation.schema.clone(),
            table: relation.name.clone(),
            op,
            body: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value as J;
    use walrelay_model::{Position, ReplicaIdentity, Value};

    use super::*;

    fn relation() -> Arc<Relation> {
        let column = |name: &str, oid: u32, ty: &str, key: bool| Column {
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
            type_name: ty.into(),
            is_key: key,
        };
        Arc::new(Relation {
            oid: 16384,
            schema: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", 23, "int4", true),
                column("state", 25, "text", false),
            ],
        })
    }

    fn row(id: &str, state: &str) -> Row {
        Row(vec![Value::Text(id.into()), Value::Text(state.into())])
    }

    /// The fields of Debezium's documented PostgreSQL change event (payload), with their
    /// types, for each op: `before`/`after` object or null as the op demands, `source`
    /// with its connector fields, `op`, `ts_ms`.
    fn check_envelope(body: &[u8], op: &str, before: bool, after: bool) -> J {
        let e: J = serde_json::from_slice(body).unwrap();
        let o = e.as_object().unwrap();
        for k in ["before", "after", "source", "op", "ts_ms", "transaction"] {
            assert!(o.contains_key(k), "{op}: no {k}: {e}");
        }
        assert_eq!(e["op"], op);
        assert_eq!(e["before"].is_object(), before, "{op} before: {e}");
        assert_eq!(e["after"].is_object(), after, "{op} after: {e}");
        assert!(e["before"].is_object() || e["before"].is_null());
        assert!(e["after"].is_object() || e["after"].is_null());
        assert!(e["ts_ms"].is_i64());
        let s = &e["source"];
        assert_eq!(s["connector"], "postgresql");
        for k in ["version", "name", "db", "schema", "table"] {
            assert!(s[k].is_string(), "source.{k}: {e}");
        }
        assert!(s["ts_ms"].is_i64() && s["lsn"].is_u64(), "{e}");
        assert!(["true", "false", "last"].contains(&s["snapshot"].as_str().unwrap()));
        assert_eq!(
            (&s["schema"], &s["table"]),
            (&J::from("public"), &J::from("orders"))
        );
        e
    }

    #[test]
    fn inserts_updates_deletes_truncates_and_reads_fit_debeziums_envelope() {
        let rel = relation();
        let mut enc = DebeziumEncoder::new("shop", "app");
        let lsn = walrelay_model::Lsn(0x1A2B3C8);
        let at = |seq| Position::new(lsn, seq);
        assert!(enc
            .encode(&Event::Begin(TxnBegin {
                xid: 750,
                commit_lsn: lsn,
                commit_time: PgTimestamp::from_unix_micros(1_795_000_000_000_000),
                origin: None,
            }))
            .is_empty());
        let change = |seq, change| Event::Change {
            position: at(seq),
            change,
        };
        let insert = enc.encode(&change(
            1,
            Change::Insert {
                relation: rel.clone(),
                new: row("1", "new"),
            },
        ));
        let e = check_envelope(&insert[0].body, "c", false, true);
        assert_eq!(e["after"], serde_json::json!({"id": 1, "state": "new"}));
        assert_eq!(e["source"]["txId"], 750);
        assert_eq!(e["source"]["ts_ms"], 1_795_000_000_000i64);
        assert_eq!(e["source"]["lsn"], 0x1A2B3C8);
        assert_eq!(e["source"]["db"], "app");
        assert_eq!(e["source"]["name"], "shop");

        let update = enc.encode(&change(
            2,
            Change::Update {
                relation: rel.clone(),
                old: Some(OldRow::Key(Row(vec![Value::Text("1".into())]))),
                new: row("2", "shipped"),
            },
        ));
        let e = check_envelope(&update[0].body, "u", true, true);
        assert_eq!(e["before"], serde_json::json!({"id": 1}));
        let same_key = enc.encode(&change(
            3,
            Change::Update {
                relation: rel.clone(),
                old: None,
                new: row("2", "paid"),
            },
        ));
        check_envelope(&same_key[0].body, "u", false, true);

        let delete = enc.encode(&change(
            4,
            Change::Delete {
                relation: rel.clone(),
                old: OldRow::Key(Row(vec![Value::Text("2".into())])),
            },
        ));
        let e = check_envelope(&delete[0].body, "d", true, false);
        assert_eq!(e["before"], serde_json::json!({"id": 2}));

        let other = Arc::new(Relation {
            name: "orders".into(),
            ..(*rel).clone()
        });
        let truncate = enc.encode(&change(
            5,
            Change::Truncate {
                relations: vec![rel.clone(), other],
                cascade: false,
                restart_identity: false,
            },
        ));
        assert_eq!(truncate.len(), 2, "one event per table");
        for t in &truncate {
            check_envelope(&t.body, "t", false, false);
            assert_eq!(t.op, "t");
        }

        let read = enc.encode(&Event::Read {
            position: at(1),
            relation: rel.clone(),
            row: row("9", "old"),
        });
        let e = check_envelope(&read[0].body, "r", false, true);
        assert_eq!(e["source"]["snapshot"], "true");
        assert!(enc
            .encode(&Event::Commit(walrelay_model::TxnCommit {
                xid: 750,
                commit_lsn: lsn,
                end_lsn: walrelay_model::Lsn(0x1A2B3F8),
                commit_time: PgTimestamp(0),
                seq: 6,
            }))
            .is_empty());
    }

    /// A schema change becomes Debezium's schema change event: the DDL text and each
    /// table's change with its columns, on the table's routing key.
    #[test]
    fn a_schema_change_is_a_schema_change_event() {
        use walrelay_model::{Ddl, DdlAction, DdlColumn, DdlTable};
        let mut enc = DebeziumEncoder::new("shop", "app");
        let ddl = Ddl {
            tag: "ALTER TABLE".into(),
            statement: "ALTER TABLE orders ADD note text".into(),
            search_path: "public".into(),
            role: None,
            tables: vec![DdlTable {
                schema: "public".into(),
                name: "orders".into(),
                action: DdlAction::Alter,
                set: None,
                columns: vec![DdlColumn {
                    name: "note".into(),
                    type_name: "text".into(),
                    nullable: true,
                }],
                primary_key: vec!["id".into()],
            }],
            unsafe_reason: None,
        };
        let out = enc.encode(&Event::Change {
            position: Position::new(Lsn(42), 1),
            change: Change::Ddl(Box::new(ddl)),
        });
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].op, out[0].table.as_str()), ("ddl", "orders"));
        let e: J = serde_json::from_slice(&out[0].body).unwrap();
        assert_eq!(e["ddl"], "ALTER TABLE orders ADD note text");
        assert_eq!(e["databaseName"], "app");
        assert_eq!(e["tableChanges"][0]["type"], "ALTER");
        assert_eq!(e["tableChanges"][0]["id"], "\"app\".\"public\".\"orders\"");
        assert_eq!(
            e["tableChanges"][0]["table"]["columns"][0]["typeName"],
            "text"
        );
        assert_eq!(
            e["tableChanges"][0]["table"]["primaryKeyColumnNames"][0],
            "id"
        );
        assert_eq!(e["source"]["lsn"], 42);
    }
}
