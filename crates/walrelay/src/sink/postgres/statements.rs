//! SQL text of the statements that apply a change to a target table. Pure: relation in,
//! SQL out. Identifiers are always quoted; values are always parameters (`$n`), sent in
//! PostgreSQL's text format so that the target parses them exactly as the source printed
//! them.

use walrelay_model::Relation;

use crate::pg::quote;

/// Types without a default btree equality operator: a REPLICA IDENTITY FULL match compares
/// their text form instead.
const NO_EQUALITY: &[&str] = &[
    "json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle", "_json", "_xml",
    "_point",
];

/// Which of a statement's columns take part, as a bit per column of the relation.
pub type ColumnMask = Vec<bool>;

fn table(rel: &Relation) -> String {
    quote::qualified(&rel.schema, &rel.name)
}

/// `INSERT INTO t (a, b) OVERRIDING SYSTEM VALUE VALUES ($1, $2)`: the source's values go
/// in also where an identity column is GENERATED ALWAYS. With `ignore_duplicates`, a
/// duplicate key does nothing (and affects 0 rows, which the caller reports as a conflict).
pub fn insert(rel: &Relation, ignore_duplicates: bool) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
        table(rel),
        cols.join(", "),
        params.join(", ")
    );
    if ignore_duplicates {
        sql.push_str(" ON CONFLICT DO NOTHING");
    }
    sql
}

/// The WHERE clause that finds the row by its key, numbering parameters from `first`.
/// `key` lists the relation's column indexes that identify the row.
fn key_condition(rel: &Relation, key: &[usize], first: usize) -> String {
    key.iter()
        .enumerate()
        .map(|(n, &i)| format!("{} = ${}", quote::ident(&rel.columns[i].name), first + n))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The WHERE clause that finds a row by all its old values (REPLICA IDENTITY FULL), one
/// row only (duplicates are possible without a key). `nulls` marks the columns whose old
/// value is NULL: they are matched with IS NULL and take no parameter.
fn full_row_condition(rel: &Relation, nulls: &[bool], first: usize) -> String {
    let mut n = first;
    let parts: Vec<String> = rel
        .columns
        .iter()
        .zip(nulls)
        .map(|(c, &is_null)| {
            let col = quote::ident(&c.name);
            if is_null {
                format!("{col} IS NULL")
            } else {
                let p = n;
                n += 1;
                if NO_EQUALITY.contains(&c.type_name.as_str()) {
                    format!("{col}::text = ${p}")
                } else {
                    format!("{col} = ${p}")
                }
            }
        })
        .collect();
    format!(
        "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
        table(rel),
        parts.join(" AND ")
    )
}

/// How an update or delete finds its row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RowMatch {
    /// By the key columns (primary key or replica identity index).
    Key(Vec<usize>),
    /// By every old value (REPLICA IDENTITY FULL); `true` marks a NULL old value.
    Full(Vec<bool>),
}

fn row_condition(rel: &Relation, how: &RowMatch, first: usize) -> String {
    match how {
        RowMatch::Key(key) => key_condition(rel, key, first),
        RowMatch::Full(nulls) => full_row_condition(rel, nulls, first),
    }
}

/// `UPDATE t SET a = $1, b = $2 WHERE ...`, setting the columns of `set` (the others kept
/// their unchanged TOAST values), then the match parameters.
pub fn update(rel: &Relation, set: &[bool], how: &RowMatch) -> String {
    let assignments: Vec<String> = rel
        .columns
        .iter()
        .zip(set)
        .filter(|(_, &s)| s)
        .enumerate()
        .map(|(n, (c, _))| format!("{} = ${}", quote::ident(&c.name), n + 1))
        .collect();
    let first = assignments.len() + 1;
    if assignments.is_empty() {
        // Nothing changes but the row must exist: count it, as an update would.
        return format!(
            "SELECT 1 FROM {} WHERE {}",
            table(rel),
            row_condition(rel, how, first)
        );
    }
    format!(
        "UPDATE {} SET {} WHERE {}",
        table(rel),
        assignments.join(", "),
        row_condition(rel, how, first)
    )
}

/// `DELETE FROM t WHERE ...`.
pub fn delete(rel: &Relation, how: &RowMatch) -> String {
    format!(
        "DELETE FROM {} WHERE {}",
        table(rel),
        row_condition(rel, how, 1)
    )
}

/// `c = $n` for every column outside `key`: an existing row made the inserted one.
pub fn set_all_but_key(cols: &[String], params: &[String], key: &[usize]) -> Vec<String> {
    cols.iter()
        .zip(params)
        .enumerate()
        .filter(|(i, _)| !key.contains(i))
        .map(|(_, (c, p))| format!("{c} = {p}"))
        .collect()
}

/// `on_conflict = "apply"` for an insert: insert, or if a row with the key exists, update
/// it to the inserted values. Returns one row when it updated (a conflict resolved).
pub fn insert_or_update(rel: &Relation, key: &[usize]) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let key_cols: Vec<String> = key.iter().map(|&i| cols[i].clone()).collect();
    // The key is what matched: only the other columns change.
    let assignments = set_all_but_key(&cols, &params, key);
    let key_match: Vec<String> = key
        .iter()
        .map(|&i| format!("{} = {}", cols[i], params[i]))
        .collect();
    format!(
        "WITH ins AS (INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE VALUES ({params}) ON CONFLICT ({keys}) DO NOTHING RETURNING 1), \
         upd AS (UPDATE {t} SET {set} WHERE {cond} AND NOT EXISTS (SELECT 1 FROM ins) RETURNING 1) \
         SELECT 1 FROM upd",
        t = table(rel),
        cols = cols.join(", "),
        params = params.join(", "),
        keys = key_cols.join(", "),
        set = assignments.join(", "),
        cond = key_match.join(" AND ")
    )
}

/// `on_conflict = "apply"` for an update whose new row is complete: update the columns of
/// `set`, or if no row matches, insert the new row. Parameters: every column's new value
/// (`$1`..`$n`, by column position), then the match. Affects one row when it inserted (a
/// conflict resolved).
pub fn update_or_insert(rel: &Relation, set: &[bool], how: &RowMatch) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| quote::ident(&c.name)).collect();
    let params: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
    let assignments: Vec<String> = cols
        .iter()
        .zip(&params)
        .zip(set)
        .filter(|(_, &s)| s)
        .map(|((c, p), _)| format!("{c} = {p}"))
        .collect();
    format!(
        "WITH upd AS (UPDATE {t} SET {set} WHERE {cond} RETURNING 1) \
         INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE SELECT {params} WHERE NOT EXISTS (SELECT 1 FROM upd)",
        t = table(rel),
        set = assignments.join(", "),
        cond = row_condition(rel, how, cols.len() + 1),
        cols = cols.join(", "),
        params = params.join(", ")
    )
}

/// `TRUNCATE a, b [RESTART IDENTITY] [CASCADE]`, as the source did it.
pub fn truncate(rels: &[&Relation], restart_identity: bool, cascade: bool) -> String {
    let names: Vec<String> = rels.iter().map(|r| table(r)).collect();
    let mut sql = format!("TRUNCATE {}", names.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    if cascade {
        sql.push_str(" CASCADE");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use walrelay_model::{Column, ReplicaIdentity};

    fn rel() -> Relation {
        let col = |name: &str, t: &str, key| Column {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            type_name: t.into(),
            is_key: key,
        };
        Relation {
            oid: 1,
            schema: "My Schema".into(),
            name: "t\"x".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col("id", "int4", true),
                col("a b", "text", false),
                col("doc", "json", false),
            ],
        }
    }

    #[test]
    fn statements() {
        let r = rel();
        assert_eq!(
            insert(&r, false),
            r#"INSERT INTO "My Schema"."t""x" ("id", "a b", "doc") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)"#
        );
        assert!(insert(&r, true).ends_with("ON CONFLICT DO NOTHING"));
        assert_eq!(
            update(&r, &[true, true, false], &RowMatch::Key(vec![0])),
            r#"UPDATE "My Schema"."t""x" SET "id" = $1, "a b" = $2 WHERE "id" = $3"#
        );
        assert_eq!(
            delete(&r, &RowMatch::Full(vec![false, true, false])),
            r#"DELETE FROM "My Schema"."t""x" WHERE ctid = (SELECT ctid FROM "My Schema"."t""x" WHERE "id" = $1 AND "a b" IS NULL AND "doc"::text = $2 LIMIT 1)"#
        );
        assert_eq!(
            insert_or_update(&r, &[0]),
            r#"WITH ins AS (INSERT INTO "My Schema"."t""x" ("id", "a b", "doc") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3) ON CONFLICT ("id") DO NOTHING RETURNING 1), upd AS (UPDATE "My Schema"."t""x" SET "a b" = $2, "doc" = $3 WHERE "id" = $1 AND NOT EXISTS (SELECT 1 FROM ins) RETURNING 1) SELECT 1 FROM upd"#
        );
        assert_eq!(
            update_or_insert(&r, &[false, true, true], &RowMatch::Key(vec![0])),
            r#"WITH upd AS (UPDATE "My Schema"."t""x" SET "a b" = $2, "doc" = $3 WHERE "id" = $4 RETURNING 1) INSERT INTO "My Schema"."t""x" ("id", "a b", "doc") OVERRIDING SYSTEM VALUE SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT 1 FROM upd)"#
        );
        assert_eq!(
            truncate(&[&r, &r], true, true),
            r#"TRUNCATE "My Schema"."t""x", "My Schema"."t""x" RESTART IDENTITY CASCADE"#
        );
    }
}
