//! Values come out exactly as PostgreSQL prints them, for every type the issue lists, and
//! unchanged TOAST values and full old rows are marked as such.

use serde_json::{json, Value as J};
use walrelay_testkit::TestPg;

use crate::support::*;

pub const COLUMNS: &[(&str, &str)] = &[
    ("i2", "int2"),
    ("i4", "int4"),
    ("i8", "int8"),
    ("num", "numeric"),
    ("f4", "float4"),
    ("f8", "float8"),
    ("t", "text"),
    ("b", "bytea"),
    ("bo", "bool"),
    ("d", "date"),
    ("tm", "time"),
    ("ts", "timestamp"),
    ("tstz", "timestamptz"),
    ("iv", "interval"),
    ("u", "uuid"),
    ("j", "json"),
    ("jb", "jsonb"),
    ("arr", "int4[]"),
    ("tarr", "text[]"),
    ("m", "mood"),
    ("n", "text"),
];

/// `CREATE TYPE mood ...; CREATE TABLE v (id int PRIMARY KEY, <COLUMNS>)`.
pub fn type_schema() -> String {
    let cols: Vec<String> = COLUMNS.iter().map(|(n, t)| format!("{n} {t}")).collect();
    format!(
        "CREATE TYPE mood AS ENUM ('sad', 'happy', 'it''s complicated');
         CREATE TABLE v (id int PRIMARY KEY, {})",
        cols.join(", ")
    )
}

/// Three rows of edge values for every column of `v`.
pub const TYPE_ROWS: &str = r#"INSERT INTO v VALUES
        (1, 32767, 2147483647, 9223372036854775807, 12345678901234567890.123456789012, 3.14159,
         0.1, E'it''s "quoted" \\ ü ☃ \n\ttab', '\x00ff10', true, '2026-11-21', '23:59:59.999999',
         '2026-11-21 12:34:56.789012', '2026-11-21 12:34:56.789012+02',
         '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
         '{"b" :  1, "a":[1,2]}', '{"b" :  1, "a":[1,2]}', '{1,2,NULL}', '{"a b","c\"d",NULL}',
         'it''s complicated', NULL),
        (2, -32768, -2147483648, -9223372036854775808, 'NaN', 'NaN', 'Infinity', '', '\x', false,
         '4713-01-01 BC', '00:00', '1999-12-31 23:59:59', '1970-01-01 00:00:00+00',
         '-1 days -00:00:00.000001', '00000000-0000-0000-0000-000000000000', 'null', '[]', '{}',
         '{}', 'sad', NULL),
        (3, 0, 0, 0, -0.000000000001, '-Infinity', '-Infinity', 'x', '\xdeadbeef', NULL,
         '2000-02-29', '12:00:00.5', 'infinity', '-infinity', '0', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
         '"x"', '{"nested": {"k": [true, false, null]}}', '{{1,2},{3,4}}', '{NULL}', 'happy', NULL)"#;

/// Each insert line of table `v` carries every value as the server itself prints it, in
/// the settings walrelay's sessions use (UTC, ISO dates, `postgres` intervals, exact
/// floats).
pub async fn assert_as_the_server_prints(db: &tokio_postgres::Client, inserts: &[&J]) {
    db.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 3")
        .await
        .unwrap();
    let select: Vec<String> = COLUMNS.iter().map(|(n, _)| format!("{n}::text")).collect();
    let rows = db
        .query(
            &format!("SELECT {} FROM v ORDER BY id", select.join(", ")),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), inserts.len());
    for (row, line) in rows.iter().zip(inserts) {
        for (i, (name, ty)) in COLUMNS.iter().enumerate() {
            let text: Option<String> = row.get(i);
            let got = &line["new"][name];
            let want = match (text, *ty) {
                (None, _) => J::Null,
                (Some(t), "int2" | "int4" | "int8") => serde_json::from_str(&t).unwrap(),
                (Some(t), "bool") => J::Bool(t == "true"),
                (Some(t), _) => J::String(t),
            };
            assert_eq!(got, &want, "row {} column {name} ({ty})", line["new"]["id"]);
        }
    }
}

#[tokio::test]
async fn every_type_comes_out_exactly() {
    let pg = TestPg::start();
    let schema = type_schema();
    let Scene {
        db,
        out,
        mut relay,
        dir,
        cfg,
    } = Scene::start(&pg, &schema, &["public.v"], "").await;

    db.batch_execute(TYPE_ROWS).await.unwrap();
    // A separate statement: in the INSERT's transaction, this non-transactional marker
    // could arrive before the INSERT commits.
    db.batch_execute("SELECT pg_logical_emit_message(false, 'done', '')")
        .await
        .unwrap();
    let lines = wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    let inserts: Vec<&J> = lines.iter().filter(|l| l["kind"] == "insert").collect();
    assert_eq!(inserts.len(), 3);

    assert_as_the_server_prints(&db, &inserts).await;
    // A few values spelled out, so that a change in the server's output cannot hide a bug.
    let first = &inserts[0]["new"];
    assert_eq!(first["i8"], json!(9223372036854775807i64));
    assert_eq!(first["num"], "12345678901234567890.123456789012");
    assert_eq!(first["t"], "it's \"quoted\" \\ ü ☃ \n\ttab");
    assert_eq!(first["b"], "\\x00ff10");
    assert_eq!(first["tstz"], "2026-11-21 10:34:56.789012+00");
    assert_eq!(
        first["j"], "{\"b\" :  1, \"a\":[1,2]}",
        "json keeps its text"
    );
    assert_eq!(
        first["jb"], "{\"a\": [1, 2], \"b\": 1}",
        "jsonb is normalised by the server"
    );
    assert_eq!(first["m"], "it's complicated");
    assert_eq!(first["tarr"], "{\"a b\",\"c\\\"d\",NULL}");
    assert_eq!(first["n"], J::Null);
    let second = &inserts[1]["new"];
    assert_eq!(
        (&second["num"], &second["f4"], &second["f8"]),
        (&json!("NaN"), &json!("NaN"), &json!("Infinity"))
    );
    assert_eq!(inserts[2]["new"]["f8"], "-Infinity");
    assert_eq!(inserts[0]["types"]["m"], "public.mood");
    assert_eq!(inserts[0]["types"]["arr"], "_int4");
    assert_eq!(inserts[0]["types"]["tstz"], "timestamptz");
    relay.stop().await;

    // A second file, added now, starts with the rows as `read` lines (from COPY, not from
    // pgoutput): every value, type and key reads exactly as in the inserts.
    let second = dir.path().join("second.jsonl");
    let text = std::fs::read_to_string(&cfg).unwrap()
        + &format!(
            "\n[[sink]]\ntype = \"jsonl\"\nname = \"second\"\npath = \"{}\"\n",
            second.display()
        );
    std::fs::write(&cfg, text).unwrap();
    let mut relay = Relay::start(&cfg);
    let reads = wait_for_line(&mut relay, &second, "the snapshot's end", |l| {
        l["kind"] == "snapshot_end"
    })
    .await;
    relay.stop().await;
    assert_eq!(reads.len(), 4, "{reads:?}");
    for (read, insert) in reads.iter().zip(&inserts) {
        assert_eq!(read["kind"], "read");
        for field in ["schema", "table", "types", "key", "new"] {
            assert_eq!(
                read[field], insert[field],
                "{field} of row {}",
                insert["new"]["id"]
            );
        }
    }
    assert_eq!(reads[3]["rows"], 3);
}

#[tokio::test]
async fn unchanged_toast_and_full_old_rows_are_marked() {
    let pg = TestPg::start();
    let Scene {
        db,
        out,
        mut relay,
        dir: _dir,
        ..
    } = Scene::start(
        &pg,
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE nokey (a int, b text);
         ALTER TABLE nokey REPLICA IDENTITY FULL;",
        &["public.*"],
        "",
    )
    .await;
    for sql in [
        "INSERT INTO docs SELECT 1, 'a', string_agg(md5(g::text), '') FROM generate_series(1, 200) g",
        "UPDATE docs SET title = 'b' WHERE id = 1",
        "INSERT INTO nokey VALUES (1, 'x'), (1, 'x')",
        "UPDATE nokey SET b = 'y' WHERE ctid = (SELECT min(ctid) FROM nokey)",
        "DELETE FROM nokey WHERE b = 'y'",
        "SELECT pg_logical_emit_message(false, 'done', '')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let lines = wait_for_line(&mut relay, &out, "the done marker", |l| {
        l["prefix"] == "done"
    })
    .await;
    let update = lines
        .iter()
        .find(|l| l["kind"] == "update" && l["table"] == "docs")
        .unwrap();
    assert_eq!(update["new"], json!({"id": 1, "title": "b"}));
    assert_eq!(update["unchanged_toast"], json!(["body"]));
    let update = lines
        .iter()
        .find(|l| l["kind"] == "update" && l["table"] == "nokey")
        .unwrap();
    assert_eq!(update["old_kind"], "row");
    assert_eq!(update["old"], json!({"a": 1, "b": "x"}));
    assert_eq!(
        update["key"],
        json!(["a", "b"]),
        "under FULL every column identifies the row"
    );
    let delete = lines.iter().find(|l| l["kind"] == "delete").unwrap();
    assert_eq!(delete["old"], json!({"a": 1, "b": "y"}));
    relay.stop().await;
}
