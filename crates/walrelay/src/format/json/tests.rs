use std::sync::Arc;

use serde_json::{json, Value as J};
use walrelay_model::{
    Change, Column, Event, Lsn, NonTxnMessage, OldRow, PgTimestamp, Relation, ReplicaIdentity, Row,
    TxnBegin, TxnCommit, Value,
};

use super::*;

fn col(name: &str, oid: u32, type_name: &str, key: bool) -> Column {
    Column {
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
        type_name: type_name.into(),
        is_key: key,
    }
}

fn rel() -> Arc<Relation> {
    Arc::new(Relation {
        oid: 1,
        schema: "public".into(),
        name: "t\"odd".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 20, "int8", true),
            col("ok", 16, "bool", false),
            col("n", 1700, "numeric", false),
            col("doc", 25, "text", false),
        ],
    })
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

fn encode_all(events: &[Event]) -> Vec<J> {
    let mut enc = JsonEncoder::default();
    let mut out = Vec::new();
    for e in events {
        enc.encode(e, &mut out);
    }
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("every line is JSON"))
        .collect()
}

#[test]
fn transaction_lines() {
    let r = rel();
    let begin = TxnBegin {
        xid: 7,
        commit_lsn: Lsn(0x1_0000_0010),
        commit_time: PgTimestamp(0),
        origin: None,
    };
    let events = vec![
        Event::Begin(begin),
        Event::Change {
            position: Position::new(Lsn(0x1_0000_0010), 1),
            change: Change::Insert {
                relation: r.clone(),
                new: Row(vec![
                    t("-9223372036854775808"),
                    t("t"),
                    t("NaN"),
                    t("a \"q\" ü\n"),
                ]),
            },
        },
        Event::Change {
            position: Position::new(Lsn(0x1_0000_0010), 2),
            change: Change::Update {
                relation: r.clone(),
                old: Some(OldRow::Key(Row(vec![t("1")]))),
                new: Row(vec![t("2"), Value::Null, t("1.50"), Value::UnchangedToast]),
            },
        },
        Event::Change {
            position: Position::new(Lsn(0x1_0000_0010), 3),
            change: Change::Truncate {
                relations: vec![r.clone()],
                cascade: true,
                restart_identity: false,
            },
        },
        Event::Keepalive(Lsn(5)),
        Event::Commit(TxnCommit {
            xid: 7,
            commit_lsn: Lsn(0x1_0000_0010),
            end_lsn: Lsn(0x1_0000_0040),
            commit_time: PgTimestamp(0),
            seq: 4,
        }),
        Event::Message(NonTxnMessage {
            lsn: Lsn(0x2_0000_0000),
            prefix: "p".into(),
            content: vec![0xff, 0],
        }),
    ];
    let lines = encode_all(&events);
    assert_eq!(lines.len(), 6, "keepalives make no line");
    assert_eq!(
        lines[0],
        json!({"kind":"begin","lsn":"1/10","seq":0,"xid":7,"commit_time":"2000-01-01T00:00:00.000000Z","origin":null})
    );
    assert_eq!(
        lines[1],
        json!({"kind":"insert","lsn":"1/10","seq":1,"xid":7,"commit_time":"2000-01-01T00:00:00.000000Z",
               "schema":"public","table":"t\"odd",
               "types":{"id":"int8","ok":"bool","n":"numeric","doc":"text"},"key":["id"],
               "new":{"id":-9223372036854775808i64,"ok":true,"n":"NaN","doc":"a \"q\" ü\n"}})
    );
    assert_eq!(lines[2]["old_kind"], "key");
    assert_eq!(lines[2]["old"], json!({"id":1}));
    assert_eq!(lines[2]["new"], json!({"id":2,"ok":null,"n":"1.50"}));
    assert_eq!(lines[2]["unchanged_toast"], json!(["doc"]));
    assert_eq!(
        lines[3]["tables"],
        json!([{"schema":"public","table":"t\"odd"}])
    );
    assert_eq!(lines[3]["cascade"], true);
    assert_eq!(
        lines[4],
        json!({"kind":"commit","lsn":"1/10","seq":4,"xid":7,"commit_time":"2000-01-01T00:00:00.000000Z","end_lsn":"1/40"})
    );
    assert_eq!(lines[5]["content_base64"], "/wA=");
    assert_eq!(lines[5]["transactional"], false);
}

#[test]
fn position_of_a_line() {
    let line = br#"{"kind":"insert","lsn":"1/10","seq":3,"new":{"a":"x"}}"#;
    assert_eq!(
        line_position(line),
        Some(Position::new(Lsn(0x1_0000_0010), 3))
    );
    assert_eq!(line_position(b"{\"kind\":\"ins"), None);
}
