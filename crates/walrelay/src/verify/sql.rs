//! The statements verify runs on either side of one table: key ranges, a range's checksum,
//! its rows. Identifiers are quoted here; every value (key bounds) is bound as text and
//! cast to the column's type on the server.
//!
//! Values are compared as the server prints them (`concat(x)` is the type's output
//! function, as pgoutput and COPY use), so the same value reads the same on both sides
//! when both sessions have the same settings (`SESSION_SETTINGS`).

/// Both sides print values alike: as the replication session does (`pg::replication`).
/// Repairs write even where a migration keeps a database read-only for others.
pub const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET default_transaction_read_only = off";

/// One table on one side.
#[derive(Debug, Clone)]
pub struct Side {
    /// Quoted and qualified.
    pub table: String,
    /// The compared columns, quoted, in the same order on both sides.
    pub columns: Vec<String>,
    /// The key columns, quoted.
    pub key: Vec<String>,
    /// The key columns' types (`format_type`, qualified).
    pub key_types: Vec<String>,
    /// The set's row filter (source side only).
    pub filter: Option<String>,
}

/// A key range: after `after` (exclusive), up to `upto` (inclusive); open where `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Range {
    pub after: Option<Vec<String>>,
    pub upto: Option<Vec<String>>,
}

/// A value as its type prints it; NULL stays NULL.
fn printed(expr: &str) -> String {
    format!("CASE WHEN {expr} IS NULL THEN NULL ELSE concat({expr}) END")
}

impl Side {
    fn key_list(&self) -> String {
        format!("({})", self.key.join(", "))
    }

    /// `($1::text::int4, $2::text::text)` from parameter `first` on.
    fn bound_key(&self, first: usize) -> String {
        let values: Vec<String> = self
            .key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::text::{t}", first + i))
            .collect();
        format!("({})", values.join(", "))
    }

    /// The WHERE clause of `range` (and the filter), with its parameters.
    pub fn range_clause(&self, range: &Range) -> (String, Vec<String>) {
        let mut terms = Vec::new();
        let mut params = Vec::new();
        if let Some(after) = &range.after {
            terms.push(format!(
                "{} > {}",
                self.key_list(),
                self.bound_key(params.len() + 1)
            ));
            params.extend(after.iter().cloned());
        }
        if let Some(upto) = &range.upto {
            terms.push(format!(
                "{} <= {}",
                self.key_list(),
                self.bound_key(params.len() + 1)
            ));
            params.extend(upto.iter().cloned());
        }
        if let Some(f) = &self.filter {
            terms.push(format!("({f})"));
        }
        let clause = if terms.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", terms.join(" AND "))
        };
        (clause, params)
    }

    /// The key `rows` rows past `after` in key order (the next range's upper bound), or
    /// nothing when fewer rows are left. Walks the key's index; no filter (ranges cover
    /// the key space, filtered or not).
    pub fn boundary(&self, after: Option<&Vec<String>>, rows: usize) -> (String, Vec<String>) {
        let unfiltered = Side {
            filter: None,
            ..self.clone()
        };
        let (clause, params) = unfiltered.range_clause(&Range {
            after: after.cloned(),
            upto: None,
        });
        let keys: Vec<String> = self.key.iter().map(|k| printed(k)).collect();
        (
            format!(
                "SELECT {} FROM {}{clause} ORDER BY {} OFFSET {} LIMIT 1",
                keys.join(", "),
                self.table,
                self.key.join(", "),
                rows.saturating_sub(1)
            ),
            params,
        )
    }

    /// Rows and a checksum of the rows of `range`: the sum of each row's 64-bit hash, so
    /// order does not matter. `hashtextextended` is the hash of hash partitioning, kept
    /// stable across releases (for `pg_upgrade`); md5 would be a third as fast.
    pub fn checksum(&self, range: &Range) -> (String, Vec<String>) {
        let (clause, params) = self.range_clause(range);
        (
            format!(
                "SELECT count(*)::int8, coalesce(sum(hashtextextended(ROW({})::text, 0)), 0)::text FROM {}{clause}",
                self.columns.join(", "),
                self.table
            ),
            params,
        )
    }

    /// The rows of `range`: key values, then (with `version`) the row version, then the
    /// compared columns, all as printed.
    pub fn rows(&self, range: &Range, version: bool) -> (String, Vec<String>) {
        let (clause, params) = self.range_clause(range);
        let mut list: Vec<String> = self.key.iter().map(|k| printed(k)).collect();
        if version {
            list.push("xmin::text || ':' || ctid::text || ':' || tableoid::text".into());
        }
        list.extend(self.columns.iter().map(|c| printed(c)));
        (
            format!("SELECT {} FROM {}{clause}", list.join(", "), self.table),
            params,
        )
    }

    /// `rows`, of the row of one key only (its values are the parameters).
    pub fn row_of_key(&self, version: bool) -> String {
        let (all, _) = Side {
            filter: None,
            ..self.clone()
        }
        .rows(&Range::default(), version);
        let filter = self
            .filter
            .as_ref()
            .map(|f| format!(" AND ({f})"))
            .unwrap_or_default();
        format!(
            "{all} WHERE {} = {}{filter}",
            self.key_list(),
            self.bound_key(1)
        )
    }

    /// The row of one key, locked (the target side of a repair).
    pub fn row_for_update(&self) -> String {
        let list: Vec<String> = self.columns.iter().map(|c| printed(c)).collect();
        format!(
            "SELECT {} FROM {} WHERE {} = {} FOR UPDATE",
            list.join(", "),
            self.table,
            self.key_list(),
            self.bound_key(1)
        )
    }
}

/// A key range's SQL as a DBA reads it in a report: `id > 5 AND id <= 10`.
pub fn describe(key_names: &[String], range: &Range) -> String {
    let list = key_names.join(", ");
    let shown = |k: &Vec<String>| k.join(", ");
    match (&range.after, &range.upto) {
        (None, None) => "all rows".into(),
        (Some(a), None) => format!("({list}) > ({})", shown(a)),
        (None, Some(u)) => format!("({list}) <= ({})", shown(u)),
        (Some(a), Some(u)) => format!("({list}) > ({}) and <= ({})", shown(a), shown(u)),
    }
}

/// The statements of a repair on the target: delete, insert or update the row of one key.
pub struct Writes {
    /// Parameters: the key values.
    pub delete: String,
    /// Parameters: every compared column's value.
    pub insert: String,
    /// Parameters: the values of `update_columns`, then the key values. `None` when every
    /// column is a key column (rows with the same key are then the same).
    pub update: Option<String>,
    /// The compared columns (indexes) an update sets: all but the key.
    pub update_columns: Vec<usize>,
}

/// `types` are the target's compared columns' types, in `side.columns` order.
pub fn writes(side: &Side, types: &[String]) -> Writes {
    let cast = |n: usize, t: &str| format!("${n}::text::{t}");
    let values: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| cast(i + 1, t))
        .collect();
    let update_columns: Vec<usize> = (0..side.columns.len())
        .filter(|i| !side.key.contains(&side.columns[*i]))
        .collect();
    let sets: Vec<String> = update_columns
        .iter()
        .enumerate()
        .map(|(n, i)| format!("{} = {}", side.columns[*i], cast(n + 1, &types[*i])))
        .collect();
    Writes {
        delete: format!(
            "DELETE FROM {} WHERE {} = {}",
            side.table,
            side.key_list(),
            side.bound_key(1)
        ),
        insert: format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
            side.table,
            side.columns.join(", "),
            values.join(", ")
        ),
        update: (!sets.is_empty()).then(|| {
            format!(
                "UPDATE {} SET {} WHERE {} = {}",
                side.table,
                sets.join(", "),
                side.key_list(),
                side.bound_key(sets.len() + 1)
            )
        }),
        update_columns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side() -> Side {
        Side {
            table: r#""public"."a""b""#.into(),
            columns: vec![r#""id""#.into(), r#""k2""#.into(), r#""v""#.into()],
            key: vec![r#""id""#.into(), r#""k2""#.into()],
            key_types: vec!["integer".into(), "text".into()],
            filter: Some("v <> 'x'".into()),
        }
    }

    #[test]
    fn a_range_binds_its_bounds_and_keeps_the_filter() {
        let (clause, params) = side().range_clause(&Range {
            after: Some(vec!["1".into(), "a".into()]),
            upto: Some(vec!["9".into(), "z".into()]),
        });
        assert_eq!(
            clause,
            r#" WHERE ("id", "k2") > ($1::text::integer, $2::text::text) AND ("id", "k2") <= ($3::text::integer, $4::text::text) AND (v <> 'x')"#
        );
        assert_eq!(params, vec!["1", "a", "9", "z"]);
        let (open, none) = Side {
            filter: None,
            ..side()
        }
        .range_clause(&Range::default());
        assert_eq!((open.as_str(), none.len()), ("", 0));
    }

    #[test]
    fn a_boundary_walks_the_key_without_the_filter() {
        let (sql, params) = side().boundary(Some(&vec!["3".into(), "c".into()]), 1000);
        assert!(sql.starts_with("SELECT CASE WHEN \"id\" IS NULL"), "{sql}");
        assert!(sql.contains(r#"WHERE ("id", "k2") > ($1::text::integer, $2::text::text) ORDER BY "id", "k2" OFFSET 999 LIMIT 1"#), "{sql}");
        assert!(!sql.contains("v <> 'x'"), "{sql}");
        assert_eq!(params.len(), 2);
    }

    #[test]
    fn repairs_bind_every_value() {
        let w = writes(
            &side(),
            &[
                "integer".into(),
                "text".into(),
                "character varying(5)".into(),
            ],
        );
        assert_eq!(
            w.delete,
            r#"DELETE FROM "public"."a""b" WHERE ("id", "k2") = ($1::text::integer, $2::text::text)"#
        );
        assert_eq!(
            w.update.as_deref(),
            Some(
                r#"UPDATE "public"."a""b" SET "v" = $1::text::character varying(5) WHERE ("id", "k2") = ($2::text::integer, $3::text::text)"#
            )
        );
        assert_eq!(
            w.insert,
            r#"INSERT INTO "public"."a""b" ("id", "k2", "v") VALUES ($1::text::integer, $2::text::text, $3::text::character varying(5)) ON CONFLICT DO NOTHING"#
        );
        let keys_only = Side {
            columns: vec![r#""id""#.into(), r#""k2""#.into()],
            ..side()
        };
        assert!(writes(&keys_only, &["integer".into(), "text".into()])
            .update
            .is_none());
        assert_eq!(w.update_columns, vec![2]);
    }

    #[test]
    fn ranges_read_as_conditions() {
        let key = vec!["id".to_string()];
        assert_eq!(
            describe(
                &key,
                &Range {
                    after: Some(vec!["5".into()]),
                    upto: None
                }
            ),
            "(id) > (5)"
        );
    }
}
